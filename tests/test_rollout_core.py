"""Pure rollout decisions: the steps of a rollout, batches, generation numbers, undo
targets, failure text. No trio: whole rollouts run in a plain-Python cluster (Sim)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from skr8tr.core import replica_state
from skr8tr.core.manifest import HealthCheck, RolloutPolicy
from skr8tr.core.revisions import (
    HistoryView,
    UndoError,
    UndoRefused,
    next_generation,
    retain,
    undo_target,
)
from skr8tr.core.rollout import (
    PORT_CLASH_RETRIES,
    Announce,
    AwaitReady,
    BatchDone,
    Failed,
    Finish,
    Launch,
    Pass,
    Progress,
    Relaunch,
    ReplicaView,
    Retire,
    StopNow,
    aborted,
    batches,
    begin,
    decide,
    interrupted_generation,
    launched,
    next_to_replace,
    recover,
    refused,
    relaunched,
    watching,
)
from skr8tr.core.rollout_failures import describe_failure, probe_line, probe_verdict


@pytest.mark.parametrize("total, surge, expected", [
    (3, 1, [1, 1, 1]), (3, 3, [3]), (5, 2, [2, 2, 1]), (2, 5, [2]), (0, 1, []), (10, 3,
                                                                                 [3, 3, 3, 1]),
])
def test_batches(total, surge, expected):
    assert batches(total, surge) == expected


def test_batches_refuses_a_zero_surge():
    with pytest.raises(ValueError):
        batches(3, 0)


@pytest.mark.parametrize("used, expected", [([], 1), ([1], 2), ([1, 2, 5], 6), ({3: 0}, 4)])
def test_generations_are_never_reused(used, expected):
    assert next_generation(used) == expected


H = [HistoryView(1, "complete"), HistoryView(2, "complete"), HistoryView(3, "rolled_back"),
     HistoryView(4, "aborted")]


@pytest.mark.parametrize("history, current, to, expected", [
    (H, 2, None, 1),  # the newest complete generation older than the current one
    (H, 2, 1, 1),
    (H, 1, 2, 2),  # --to may name any complete generation, a newer one too
    ([HistoryView(1, "complete"), HistoryView(2, "failed"), HistoryView(3, "complete")], 3,
     None, 1),
])
def test_undo_target(history, current, to, expected):
    assert undo_target(history, current, to) == expected


@pytest.mark.parametrize("history, current, to, message", [
    ([HistoryView(1, "complete")], 1, None, "no complete generation before 1"),
    (H, 2, 9, "generation 9 does not exist (known: 1, 2, 3, 4)"),
    (H, 2, 2, "generation 2 is the current one"),
])
def test_undo_refusals(history, current, to, message):
    with pytest.raises(UndoError, match=message.replace("(", r"\(").replace(")", r"\)")):
        undo_target(history, current, to)


@pytest.mark.parametrize("to, state", [(3, "rolled_back"), (4, "aborted"), (5, "failed")])
def test_undo_to_a_generation_that_never_completed_needs_force(to, state):
    history = [*H, HistoryView(5, "failed")]
    with pytest.raises(UndoRefused, match=f"generation {to}'s rollout ended {state}.*--force"):
        undo_target(history, 2, to)
    assert undo_target(history, 2, to, force=True) == to


def test_undo_refused_is_an_undo_error_and_force_does_not_invent_generations():
    assert issubclass(UndoRefused, UndoError)
    with pytest.raises(UndoError, match="generation 9 does not exist"):
        undo_target(H, 2, 9, force=True)


def test_plain_undo_skips_generations_with_the_current_manifest():
    # 1 (a), 2 (b), 3 = restart of 2 (b): undo from 3 goes back to a, not to b again.
    history = [HistoryView(1, "complete", "a"), HistoryView(2, "complete", "b"),
               HistoryView(3, "complete", "b")]
    assert undo_target(history, 3, None) == 1
    with pytest.raises(UndoError, match="no complete generation before 2 with another"):
        undo_target([HistoryView(1, "complete", "b"), HistoryView(2, "complete", "b")], 2,
                    None)


def restarts(count: int) -> list[HistoryView]:
    """Generation 1 (manifest a), 2 (b), then ``count`` restarts of b, all complete."""
    return [HistoryView(1, "complete", "a"), HistoryView(2, "complete", "b"),
            *(HistoryView(g, "complete", "b") for g in range(3, count + 3))]


@pytest.mark.parametrize("keep", [2, 3, 10])
def test_retain_keeps_the_current_the_undo_target_and_the_newest_up_to_keep(keep):
    history = restarts(15)  # generations 1..17, current 17, undo target 1
    kept = retain(range(1, 18), history, current=17, rollout=(16, 17), keep=keep)
    assert len(kept.revisions) == keep + 1  # never more than keep + 1 manifests
    assert {17, 16, 1} <= kept.revisions  # current, last rollout's from, plain undo target
    newest = sorted(set(range(2, 16)), reverse=True)[:keep + 1 - 3]
    assert kept.revisions == {17, 16, 1, *newest}
    assert undo_target(history, 17, None) == 1
    pruned = [h for h in history if h.generation in kept.history]
    assert undo_target(pruned, 17, None) == 1  # the same decision from what is kept


def test_retain_never_prunes_a_running_rollouts_generations():
    # current 5 (a), an aborted 6..19 (b), rolling 20 (c); keep 2: 5, 20 and one more.
    history = [*(HistoryView(g, "complete", "a") for g in range(1, 6)),
               *(HistoryView(g, "aborted", "b") for g in range(6, 20)),
               HistoryView(20, "rolling", "c")]
    kept = retain(range(1, 21), history, current=5, rollout=(5, 20), keep=2)
    assert kept.revisions == {5, 20, 19}  # no plain undo target: 1..4 have 5's manifest


def test_retain_bounds_history_rows_but_keeps_those_of_kept_manifests():
    history = restarts(300)  # generations 1..302
    kept = retain(range(1, 303), history, current=302, rollout=(301, 302), keep=10,
                  keep_history=100)
    assert kept.history == set(range(203, 303)) | {1}
    assert kept.revisions <= kept.history
    only = retain([1], [HistoryView(1, "complete")], current=1, keep=2, keep_history=1)
    assert only.revisions == {1} and only.history == {1}


def test_retain_is_stable_once_within_bounds():
    history = restarts(8)
    kept = retain(range(1, 11), history, current=10, rollout=(9, 10), keep=10)
    assert kept.revisions == set(range(1, 11)) and kept.history == set(range(1, 11))


def test_undo_known_list_is_bounded():
    history = [HistoryView(g, "complete") for g in range(1, 1001)]
    with pytest.raises(UndoError) as info:
        undo_target(history, 1000, 5000)
    assert len(str(info.value)) < 200 and "..., 981," in str(info.value)


def test_describe_failure_names_replica_cause_and_where_its_output_is():
    text = describe_failure("web-1a2b", app="web", why="exited before it was ready",
                            exit_code=3, message="boom")
    assert text == ("replica web-1a2b exited before it was ready, exit code 3, boom "
                    "(its output: skr8tr logs web --replica web-1a2b)")
    assert describe_failure("w", app="a", why="was not ready", signal=9) == (
        "replica w was not ready, killed by signal 9 (its output: skr8tr logs a --replica w)")


# ------------------------------------------------------------------ decide: one step at a time

POLICY = RolloutPolicy()  # surge 1, start-first, ready-timeout 60 s, auto-rollback yes


def policy(**kw) -> RolloutPolicy:
    return dataclasses.replace(POLICY, **kw)


def v(rid: str, generation: int, state: str = "ready", seq: int = 0, **kw) -> ReplicaView:
    return ReplicaView(rid, generation, state, seq, **kw)


def table(*views: ReplicaView) -> dict[str, ReplicaView]:
    return {r.replica_id: r for r in views}


OLD3 = table(v("o1", 1, seq=1), v("o2", 1, seq=2), v("o3", 1, seq=3))


def start(total=3, want=None, now=0.0, **kw) -> Progress:
    forward = policy(**kw)
    return begin(app="web", from_generation=1, to_generation=2, total=total,
                 want=total if want is None else want, forward=forward, back=POLICY, now=now)


def test_next_to_replace_takes_what_does_not_serve_first_then_the_oldest():
    replicas = table(v("a", 1, "ready", 1), v("b", 1, "running", 5), v("c", 1, "pending", 9),
                     v("d", 1, "ready", 0), v("e", 1, "draining", 2), v("f", 1, "failed", 3),
                     v("g", 2, "pending", 4))
    assert next_to_replace(replicas, 1, 9) == ("b", "c", "d", "a")
    assert next_to_replace(replicas, 1, 2) == ("b", "c")
    assert next_to_replace(replicas, 3, 2) == ()


def test_start_first_launches_a_batch_then_waits_with_the_ready_timeout():
    p = start(surge=2, ready_timeout_ms=5000)
    step = decide(p, OLD3, 10.0)
    assert step == Launch(2, 2, p)
    p = launched(step.then, ["n1", "n2"], 10.0)
    seen = OLD3 | table(v("n1", 2, "running", 10), v("n2", 2, "pending", 11))
    step = decide(p, seen, 12.0)
    assert isinstance(step, AwaitReady)
    assert (step.waiting, step.deadline, step.phase) == (
        ("n1", "n2"), 15.0, "waiting for 2 replicas to become ready")
    seen |= table(v("n1", 2, "ready", 10))
    assert decide(p, seen, 13.0).phase == "waiting for n2 to become ready"


def test_a_ready_batch_stops_as_many_old_replicas_then_counts():
    p = launched(start(), ["n1"], 0.0)
    seen = OLD3 | table(v("n1", 2, "ready", 10))
    step = decide(p, seen, 1.0)
    assert isinstance(step, Retire) and step.replica_ids == ("o1",)
    done = decide(step.then, seen | table(v("n1", 2, "failed", 10)), 2.0)
    # judged once: a batch that was ready is through, whatever happens to it later
    assert isinstance(done, BatchDone) and done.replaced == 1
    assert decide(done.then, seen, 2.0) == Launch(2, 1, done.then)


def test_stop_first_stops_before_it_launches():
    p = start(order="stop-first")
    step = decide(p, OLD3, 0.0)
    assert isinstance(step, Retire) and step.replica_ids == ("o1",)
    assert isinstance(decide(step.then, OLD3, 0.0), Launch)


@pytest.mark.parametrize("state, extra, why", [
    (None, {}, "exited before it was ready"),
    ("failed", {"exit_code": 3, "message": "boom"},
     "exited before it was ready, exit code 3, boom"),
    ("exited", {"signal": 9}, "exited before it was ready, killed by signal 9"),
    ("stopping", {}, "exited before it was ready"),
    ("draining", {}, "exited before it was ready"),
])
def test_a_new_replica_that_ends_before_it_is_ready_fails_the_rollout(state, extra, why):
    p = launched(start(), ["n1"], 0.0)
    seen = OLD3 if state is None else OLD3 | table(v("n1", 2, state, 10, **extra))
    step = decide(p, seen, 1.0)
    assert isinstance(step, Failed)
    assert step.reason == f"replica n1 {why} (its output: skr8tr logs web --replica n1)"
    assert step.then.stage == "stopping unready"


def test_the_ready_timeout_fails_exactly_at_the_deadline_and_ready_wins_a_tie():
    p = launched(start(ready_timeout_ms=5000), ["n1"], 100.0)
    waiting = OLD3 | table(v("n1", 2, "running", 10))
    assert isinstance(decide(p, waiting, 104.999), AwaitReady)
    step = decide(p, waiting, 105.0)
    assert isinstance(step, Failed)
    assert step.reason.startswith("replica n1 was not ready within 5 s (ready-timeout)")
    assert isinstance(decide(p, OLD3 | table(v("n1", 2, "ready", 10)), 105.0), Retire)


def test_a_port_taken_on_the_host_is_relaunched_a_few_times_then_fails():
    p = launched(start(), ["n0"], 0.0)
    for i in range(PORT_CLASH_RETRIES):
        seen = OLD3 | table(v(f"n{i}", 2, "failed", 10 + i, port_clash=True))
        step = decide(p, seen, 1.0)
        assert step == Relaunch(f"n{i}", 2, p)
        p = relaunched(step.then, f"n{i}", f"n{i + 1}")
        assert p.work.new == (f"n{i + 1}",) and p.work.deadline == 60.0  # same deadline
    last = f"n{PORT_CLASH_RETRIES}"
    step = decide(p, OLD3 | table(v(last, 2, "failed", 20, port_clash=True)), 1.0)
    assert isinstance(step, Failed) and "exited before it was ready" in step.reason


def test_no_room_fails_the_rollout():
    p = refused(start(auto_rollback=False), "no node can run a replica of web")
    step = decide(p, OLD3, 0.0)
    assert step == Failed("NO_CAPACITY: no node can run a replica of web",
                          dataclasses.replace(p, stage="failed", work=None, failure=None,
                                              reason=step.reason))
    assert decide(step.then, OLD3, 0.0) == Finish(
        "failed", "failed: NO_CAPACITY: no node can run a replica of web")


def test_a_rollback_stops_the_unready_then_replaces_the_ready_with_the_old_revision():
    p = dataclasses.replace(start(), stage="stopping unready", work=None, reason="boom")
    seen = table(v("o2", 1, seq=2), v("o3", 1, seq=3), v("n1", 2, "ready", 10),
                 v("n3", 2, "pending", 12), v("n2", 2, "running", 11), v("gone", 2, "failed"))
    step = decide(p, seen, 0.0)
    assert isinstance(step, StopNow) and step.replica_ids == ("n2", "n3")
    assert step.phase == "rolling back: stopping n2, n3"
    seen = table(v("o2", 1, seq=2), v("o3", 1, seq=3), v("n1", 2, "ready", 10))
    step = decide(step.then, seen, 0.0)
    assert step.phase == "rolling back 1 replica(s) to generation 1"
    step = decide(step.then, seen, 0.0)
    assert step == Launch(1, 1, step.then)
    p = launched(step.then, ["o4"], 0.0)
    step = decide(p, seen | table(v("o4", 1, "ready", 13)), 1.0)
    assert isinstance(step, Retire) and step.replica_ids == ("n1",)
    assert decide(step.then, seen, 1.0) == Finish("rolled_back",
                                                   "rolled back to generation 1: boom")


def test_a_failing_rollback_ends_the_rollout_as_failed_with_both_reasons():
    p = dataclasses.replace(start(), stage="rolling back", reason="first")
    p = dataclasses.replace(p, work=Pass(1, 2, (1,), POLICY), failure="NO_CAPACITY: full")
    assert decide(p, OLD3, 0.0) == Finish(
        "failed", "failed: first; the rollback failed too: NO_CAPACITY: full")


@pytest.mark.parametrize("want, first", [
    (5, Announce), (3, Finish), (2, Retire), (1, Retire)])
def test_the_new_count_is_applied_after_the_replacement(want, first):
    p = dataclasses.replace(start(want=want), stage="resizing", work=None, replaced=3)
    seen = table(v("n1", 2, "ready", 10), v("n2", 2, "running", 11), v("n3", 2, "ready", 12))
    step = decide(p, seen, 7.5)
    assert isinstance(step, first)
    if first is Announce:
        assert step.phase == "scaling 3 -> 5"
        assert decide(step.then, seen, 7.5) == Launch(2, 1, step.then)  # nothing to stop
    elif first is Retire:
        assert step.replica_ids == ("n2", "n1")[: 3 - want]
    else:
        assert step == Finish("complete", "3/3 replaced in 7.5 s")


@pytest.mark.parametrize("auto_rollback, stored, ready_new, first, replaced", [
    (True, 1, 2, StopNow, 2),
    (True, 3, 0, StopNow, 3),
    (False, 1, 0, Finish, 1),
])
def test_a_rollout_cut_short_by_a_restart_is_ended_by_its_policy(
        auto_rollback, stored, ready_new, first, replaced):
    seen = OLD3 | table(*[v(f"n{i}", 2, "ready", 10 + i) for i in range(ready_new)],
                        v("late", 2, "running", 20))
    p = recover(app="web", from_generation=1, to_generation=2, total=3, replaced=stored,
                forward=policy(auto_rollback=auto_rollback), back=POLICY, replicas=seen,
                now=0.0)
    why = f"interrupted by a conductor restart after {replaced}/3 replaced"
    assert (p.replaced, p.reason) == (replaced, why)
    step = decide(p, seen, 0.0)
    assert isinstance(step, first)
    if first is Finish:
        assert step == Finish("failed", f"failed: {why}")
    assert aborted(p) == Finish("aborted", f"aborted while recovering: {why}")


def test_an_abort_says_how_far_it_got():
    p = dataclasses.replace(start(), replaced=2)
    assert aborted(p) == Finish("aborted",
                                "aborted after 2/3 replaced; generation 1 keeps serving")


@pytest.mark.parametrize("history, revisions, expected", [
    ([HistoryView(1, "complete"), HistoryView(2, "rolling")], {1, 2}, 2),
    ([HistoryView(1, "complete"), HistoryView(2, "rolling")], {1}, None),
    ([HistoryView(1, "complete"), HistoryView(2, "failed")], {1, 2}, None),
])
def test_interrupted_generation(history, revisions, expected):
    assert interrupted_generation(history, revisions) == expected


def test_watching_names_the_batch_being_waited_for():
    p = start()
    assert watching(p) == ()
    assert watching(launched(p, ["n1"], 0.0)) == ("n1",)


# ------------------------------------------------------------------ properties over whole rollouts


@dataclasses.dataclass
class Sim:
    """A cluster in plain Python: replicas become ready or crash at set times, stops and
    drains are instant. It drives :func:`decide` the way the conductor's runner does."""

    replicas: dict[str, ReplicaView]
    # (generation, how many of it were launched before) -> (ready in s, crash in s)
    fate: Callable[[int, int], tuple[float | None, float | None]]
    capacity: int = 10**6  # live replicas at most; a launch beyond it is refused
    now: float = 0.0
    seq: int = 100
    due: list[tuple[float, str, str]] = dataclasses.field(default_factory=list)
    steps: list = dataclasses.field(default_factory=list)
    launches: dict[int, int] = dataclasses.field(default_factory=dict)
    became_ready: set[str] = dataclasses.field(default_factory=set)

    def live(self, generation: int | None = None, states=replica_state.LIVE) -> list[str]:
        return [r.replica_id for r in self.replicas.values() if r.state in states
                and (generation is None or r.generation == generation)]

    def set(self, rid: str, state: str, **kw) -> None:
        self.replicas[rid] = dataclasses.replace(self.replicas[rid], state=state, **kw)

    def launch(self, generation: int) -> str | None:
        if len(self.live()) >= self.capacity:
            return None
        self.seq += 1
        rid = f"g{generation}-{self.seq}"
        self.replicas[rid] = ReplicaView(rid, generation, "running", self.seq)
        n = self.launches.get(generation, 0)
        self.launches[generation] = n + 1
        ready_in, crash_in = self.fate(generation, n)
        if ready_in is not None:
            self.due.append((self.now + ready_in, rid, "ready"))
        if crash_in is not None:
            self.due.append((self.now + crash_in, rid, "crash"))
        return rid

    def stop(self, rids) -> None:
        for rid in rids:
            self.replicas.pop(rid, None)
        self.due = [d for d in self.due if d[1] in self.replicas]

    def wait(self, deadline: float) -> None:
        """Until the next change, or the deadline."""
        if not self.due or min(self.due)[0] > deadline:
            self.now = deadline
            return
        self.now = min(self.due)[0]
        for _, rid, what in sorted(d for d in self.due if d[0] == self.now):
            r = self.replicas.get(rid)
            if r is None or r.state not in replica_state.LIVE:
                continue
            if what == "crash":
                self.set(rid, "failed", exit_code=1)
            elif r.state != "ready":
                self.set(rid, "ready")
                self.became_ready.add(rid)
        self.due = [d for d in self.due if d[0] > self.now]

    def run(self, p: Progress, check=lambda step: None, limit: int = 10_000) -> Finish:
        for _ in range(limit):
            step = decide(p, self.replicas, self.now)
            self.steps.append((self.now, step))
            check(step)
            match step:
                case Finish():
                    return step
                case Launch(generation, count, then):
                    ids = [self.launch(generation) for _ in range(count)]
                    p = refused(then, "no room") if None in ids else launched(then, ids, self.now)
                case Relaunch(rid, generation, then):
                    self.stop([rid])
                    new = self.launch(generation)
                    p = refused(then, "no room") if new is None else relaunched(then, rid, new)
                case AwaitReady(_, deadline, _, then):
                    self.wait(deadline)
                    p = then
                case Retire(rids, then) | StopNow(rids, _, then):
                    self.stop(rids)
                    p = then
                case Announce(_, then) | BatchDone(_, then) | Failed(_, then):
                    p = then
        raise AssertionError("the rollout never finished")


def cluster_of(count: int, generation: int = 1) -> dict[str, ReplicaView]:
    return table(*[v(f"g{generation}-{i}", generation, "ready", i) for i in range(count)])


@given(total=st.integers(0, 60), surge=st.integers(1, 12))
def test_batches_cover_the_total_surge_at_a_time(total, surge):
    sizes = batches(total, surge)
    assert sum(sizes) == total
    assert all(0 < s <= surge for s in sizes)
    assert all(s == surge for s in sizes[:-1])


fates = st.lists(st.tuples(st.one_of(st.none(), st.floats(0.0, 9.0)),
                           st.one_of(st.none(), st.floats(0.0, 9.0))), min_size=1, max_size=12)


def fate_of(new_fates):
    """The new generation follows ``new_fates`` in turn; the old one is ready in 1 s."""
    return lambda generation, n: (new_fates[n % len(new_fates)] if generation == 2
                                  else (1.0, None))


@given(total=st.integers(1, 12), want=st.integers(0, 15), surge=st.integers(1, 4),
       stop_first=st.booleans(), auto_rollback=st.booleans(), new_fates=fates,
       timeout_s=st.integers(1, 10), room=st.integers(0, 6))
def test_every_rollout_ends_and_keeps_its_promises(total, want, surge, stop_first,
                                                   auto_rollback, new_fates, timeout_s, room):
    forward = policy(surge=surge, order="stop-first" if stop_first else "start-first",
                     auto_rollback=auto_rollback, ready_timeout_ms=timeout_s * 1000)
    sim = Sim(cluster_of(total), fate_of(new_fates), capacity=max(total, want) + room)
    stopped_old = 0
    failed: list[Failed] = []
    last_launch = 0.0

    def check(step) -> None:
        nonlocal stopped_old, last_launch
        if failed:
            # Without auto-rollback, nothing is touched after the failure.
            assert auto_rollback or isinstance(step, Finish)
        elif isinstance(step, Retire) and step.then.stage == "replacing":
            stopped_old += len(step.replica_ids)
            assert all(sim.replicas[rid].generation == 1 for rid in step.replica_ids)
            if not stop_first:  # never more old ones stopped than new ones became ready
                assert stopped_old <= len([r for r in sim.became_ready if r.startswith("g2")])
        elif isinstance(step, Launch) and step.then.stage == "replacing" and stop_first:
            assert len(sim.live()) + step.count <= total  # never more than the count
        if isinstance(step, Launch):
            last_launch = sim.now
        if isinstance(step, Failed):
            failed.append(step)
            if "(ready-timeout)" in step.reason:  # exactly at the batch's deadline
                assert sim.now == last_launch + timeout_s

    end = sim.run(begin(app="web", from_generation=1, to_generation=2, total=total,
                        want=want, forward=forward, back=POLICY, now=0.0), check)
    if not failed:
        assert end.state == "complete" and not sim.live(1)
        assert end.message.startswith(f"{total}/{total} replaced in ")
        # A batch is judged once: a new replica that crashes after its batch passed is
        # the reconciler's to restart once the rollout is over, not a failure.
        serving = len(sim.live(2, {"ready"}))
        crashed = len(sim.live(2, replica_state.ENDED))
        assert serving <= want <= serving + crashed
        if all(crash_in is None for _, crash_in in new_fates):
            assert serving == want
    elif not auto_rollback:
        assert end == Finish("failed", f"failed: {failed[0].reason}")
    elif end.state == "rolled_back":  # a failure leads to a rollback with auto-rollback
        assert end.message.endswith(f": {failed[0].reason}")
        assert not sim.live(2)
        # The old count is back, but for a batch stopped first and new replicas that
        # crashed after their batch passed (the reconciler makes up for both).
        crashed = len(sim.live(2, replica_state.ENDED))
        assert len(sim.live(1)) + crashed >= total - (surge if stop_first else 0)
    else:  # unless the rollback found no room either
        assert end.state == "failed" and "the rollback failed too: NO_CAPACITY" in end.message
    assert len(failed) <= 1


@given(total=st.integers(0, 20), surge=st.integers(1, 5), ready_in=st.floats(0.0, 10.0),
       stop_first=st.booleans())
def test_a_rollout_takes_exactly_its_batches_readiness_time(total, surge, ready_in,
                                                            stop_first):
    forward = policy(surge=surge, order="stop-first" if stop_first else "start-first")
    sim = Sim(cluster_of(total), lambda generation, n: (ready_in, None))
    end = sim.run(begin(app="web", from_generation=1, to_generation=2, total=total,
                        want=total, forward=forward, back=POLICY, now=0.0))
    assert end.state == "complete"
    elapsed = 0.0
    for _ in batches(total, surge):
        elapsed += ready_in
    assert sim.now == elapsed
    assert end.message == f"{total}/{total} replaced in {elapsed:.1f} s"
    assert sum(isinstance(s, BatchDone) for _, s in sim.steps) == len(batches(total, surge))


def test_a_failure_says_its_exit_code_or_signal_once():
    # The node's message already says it: not "exit code 1, exited with code 1".
    text = describe_failure("web-1", app="web", why="exited", exit_code=1,
                            message="exited with code 1")
    assert text == ("replica web-1 exited, exited with code 1 "
                    "(its output: skr8tr logs web --replica web-1)")
    text = describe_failure("web-1", app="web", why="exited", signal=9,
                            message="killed by signal 9 (SIGKILL)")
    assert text.count("signal 9") == 1
    # A message that does not say it keeps the figure.
    text = describe_failure("web-1", app="web", why="exited", exit_code=3,
                            message="gone after a stop")
    assert "exit code 3, gone after a stop" in text


HEALTH = HealthCheck(path="/healthz", expect_status=200, retries=3)


@pytest.mark.parametrize(("status", "count", "health", "fails"), [
    (404, 3, HEALTH, True),     # a definite wrong answer, retries times in a row
    (500, 7, HEALTH, True),
    (404, 2, HEALTH, False),    # not yet
    (None, 50, HEALTH, False),  # refused or timed out: what a starting process does
    (503, 50, HEALTH, False),   # Service Unavailable: "not yet", as a warming-up process says
    (200, 9, HEALTH, False),    # the wanted answer
    (404, 9, None, False),      # no health check to judge by
    (204, 1, HealthCheck(path="/", expect_status=200, retries=1), True),
    (503, 3, HealthCheck(path="/", expect_status=503, retries=3), False),
])
def test_probe_verdict_only_for_definite_wrong_answers(status, count, health, fails):
    r = ReplicaView("r1", 2, "running", 1, probe=f"GET /healthz -> {status}",
                    probe_status=status, probe_count=count)
    verdict = probe_verdict(r, health)
    assert (verdict is not None) == fails
    if fails:
        assert verdict == (f"failed its health check {count} times in a row: "
                           f"GET /healthz -> {status}")


def test_probe_line_counts_repeats():
    assert probe_line(None, 0) is None
    assert probe_line("GET / -> 404, want 200", 1) == "GET / -> 404, want 200"
    assert probe_line("GET / -> 404, want 200", 4) == "GET / -> 404, want 200 (4 in a row)"
