"""Rollout decisions, pure: what a rolling update does next.

The runner in :mod:`skr8tr.conductor.rollout` only drives: it observes the
app's replicas, asks :func:`decide` for the next :data:`Step`, does that step's
I/O (launch, wait for a change, drain, stop, publish), and asks again. Every
decision lives here, as a function of a frozen :class:`Progress`, views of the
replicas and the time passed in; nothing here imports trio, reads a clock or
touches a socket.

The rules, as the runner has always followed them:

- A rollout replaces the app's replicas ``surge`` at a time (:func:`batches`).
  ``start-first``: launch a batch, wait until all of it is ready, then drain and
  stop as many old replicas. ``stop-first``: drain and stop first, then launch
  and wait. Old replicas go in the order of :func:`next_to_replace`: those not
  serving first, then the oldest. Then the new manifest's ``replicas`` count is
  applied (grow batch by batch, or drain the surplus), and the rollout is
  ``complete``.
- A new replica that ends (or starts leaving) before it is ready, a batch not
  ready within ``ready-timeout``, or no room to place a replica fails the
  rollout. So does a new replica whose health check got a definite wrong answer
  (a complete HTTP response with another status than the one wanted) ``retries``
  times in a row (:func:`probe_verdict`): it will not become ready by waiting, and
  the rollout fails at once instead of at ``ready-timeout``. A refused connection,
  a timeout or a 503 ("not yet") is what a starting process gives: those wait for
  ``ready-timeout``.
  A replica whose launch found its port taken on the host is not a failure: it
  is replaced, up to :data:`PORT_CLASH_RETRIES` times per batch.
- A failure with ``auto-rollback yes`` (the new revision's) rolls back: the new
  replicas that are not ready are stopped at once, the ready ones are replaced
  by the previous revision batch by batch, with that revision's ``rollout``
  block; the state is ``rolled_back``, or ``failed`` if the rollback fails too.
  Without auto-rollback the state is ``failed`` and the old replicas stay.
- A rollout a conductor restart cut short (:func:`interrupted_generation`) is
  ended by that same policy (:func:`recover`): rolled back or failed, never
  resumed.
- With an ``analysis`` block, each forward batch (replacing or growing, never a
  rollback) is judged on its traffic once all of it is ready, before its old replicas
  go (:class:`AwaitTraffic`; the arithmetic is :mod:`skr8tr.core.analysis`).
  :func:`promote` passes the batch under analysis at once. A paused rollout
  (:func:`pause`) holds before it starts its next batch (:class:`Hold`).

How a failure is told to a person is :mod:`skr8tr.core.rollout_failures`. Which
generation number comes next, which revision ``undo`` returns to and which revisions
are kept is :mod:`skr8tr.core.revisions`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal

from skr8tr.core import analysis, protocol, replica_state
from skr8tr.core.manifest import HealthCheck, RolloutPolicy
from skr8tr.core.revisions import HistoryView
from skr8tr.core.rollout_failures import describe_failure, probe_line, probe_verdict
from skr8tr.core.traffic import Counts

__all__ = [
    "FINAL_STATES",
    "PORT_CLASH_RETRIES",
    "AnalysisDone",
    "AwaitReady",
    "AwaitTraffic",
    "Announce",
    "BatchDone",
    "Failed",
    "Finish",
    "Hold",
    "Launch",
    "Pass",
    "Progress",
    "Relaunch",
    "ReplicaView",
    "Retire",
    "Step",
    "StopNow",
    "aborted",
    "batches",
    "begin",
    "decide",
    "interrupted_generation",
    "launched",
    "next_to_replace",
    "pause",
    "promote",
    "recover",
    "refused",
    "relaunched",
    "watching",
]

FINAL_STATES = frozenset(protocol.ROLLOUT_FINAL_STATES)
PORT_CLASH_RETRIES = 5  # per batch: a port found taken on the host is replaced by another


def batches(total: int, surge: int) -> list[int]:
    """Sizes of the replacement batches: ``surge`` at a time, the rest last.

    >>> batches(5, 2)
    [2, 2, 1]
    """
    if surge < 1:
        raise ValueError(f"surge must be >= 1, got {surge}")
    full, rest = divmod(max(total, 0), surge)
    return [surge] * full + ([rest] if rest else [])


# ------------------------------------------------------------------ what the runner sees


@dataclass(frozen=True)
class ReplicaView:
    """One replica of the app as the conductor knows it, live or ended."""

    replica_id: str
    generation: int
    state: str  # one of replica_state.STATES
    seq: int  # creation order: lower is older
    port_clash: bool = False  # its launch failed because the port was taken on the host
    exit_code: int | None = None
    signal: int | None = None
    message: str | None = None
    # Its node's last health probe: what it got, the HTTP status of a complete answer
    # (None: no answer), how many probes in a row had that kind of outcome.
    probe: str | None = None
    probe_status: int | None = None
    probe_count: int = 0


Replicas = Mapping[str, ReplicaView]  # the app's replicas by id
# What the ingresses counted for some replicas, a running sum (TrafficBook.sum_of).
Traffic = Callable[[Iterable[str]], Counts]


def _no_traffic(ids: Iterable[str]) -> Counts:
    return Counts()


def next_to_replace(replicas: Replicas, generation: int, count: int) -> tuple[str, ...]:
    """The ``count`` live replicas of ``generation`` a rollout takes out next: those not
    serving yet first (they cost no capacity), then the oldest."""
    rows = [r for r in replicas.values()
            if r.generation == generation and r.state in replica_state.LIVE]
    rows.sort(key=lambda r: (r.state == "ready", r.seq))
    return tuple(r.replica_id for r in rows[:count])


# ------------------------------------------------------------------ where a rollout is

# Where a rollout is. Forward: replacing -> resizing -> (growing ->) complete. A failure
# while replacing or growing leads to `failed`, or with auto-rollback to stopping unready
# -> rolling back -> rolled back; a failure while rolling back ends it as failed. A
# rollout a restart cut short starts at `failed` or `stopping unready`.
Stage = Literal["replacing", "resizing", "growing", "complete", "failed",
                "stopping unready", "rolling back", "rolled back"]


@dataclass(frozen=True)
class Pass:
    """Replace live replicas of ``old_generation`` by new ones of ``new_generation``,
    one batch of ``sizes`` at a time (the current batch first). Generation 0 never
    exists: a pass from it only launches."""

    new_generation: int
    old_generation: int
    sizes: tuple[int, ...]
    policy: RolloutPolicy  # the rollout block of the revision launched
    counted: bool = False  # its batches count toward the rollout's `replaced`
    new: tuple[str, ...] | None = None  # the current batch's new replicas, once launched
    deadline: float = math.inf  # by when they must all be ready
    clashes: int = 0  # of them, replaced because their port was taken
    ready: bool = False  # all of them were ready together: the batch is not judged again
    old_gone: bool = False  # the current batch's old replicas are drained and stopped
    health: HealthCheck | None = None  # the health check of the revision launched
    # The current batch's analysis: when it started (all of it ready), the sum of its
    # traffic then; `judged`: passed (or promoted), not judged again.
    since: float | None = None
    baseline: Counts | None = None
    judged: bool = False
    promoted: bool = False  # `rollout promote`: the analysis under way passes at once


@dataclass(frozen=True)
class Progress:
    """How far a rollout of ``app`` from ``from_generation`` to ``to_generation`` got."""

    app: str
    from_generation: int
    to_generation: int
    total: int  # replicas to replace: the app's count when the rollout started
    want: int  # the new revision's `replicas`
    forward: RolloutPolicy  # the new revision's rollout block
    back: RolloutPolicy  # the previous revision's, for a rollback
    started_at: float
    stage: Stage = "replacing"
    work: Pass | None = None  # the pass under way, if any
    replaced: int = 0
    reason: str = ""  # why it failed
    failure: str | None = None  # a failure the runner saw, for the next decision
    recovering: bool = False  # ending a rollout a conductor restart cut short
    forward_health: HealthCheck | None = None  # the new revision's health check
    back_health: HealthCheck | None = None  # the previous revision's
    paused: bool = False  # `rollout pause`: hold before the next batch starts
    # A batch that failed its analysis while its old replicas still serve: stopped at
    # once with the unready ones (replacing them would keep them serving meanwhile).
    judged_out: tuple[str, ...] = ()


def begin(*, app: str, from_generation: int, to_generation: int, total: int, want: int,
          forward: RolloutPolicy, back: RolloutPolicy, now: float,
          forward_health: HealthCheck | None = None,
          back_health: HealthCheck | None = None) -> Progress:
    """A rollout that has not done anything yet. The health checks (of the new and the
    previous revision) let it fail early on definite wrong answers (:func:`probe_verdict`)."""
    work = Pass(to_generation, from_generation, tuple(batches(total, forward.surge)), forward,
                counted=True, health=forward_health)
    return Progress(app, from_generation, to_generation, total, want, forward, back, now,
                    work=work, forward_health=forward_health, back_health=back_health)


def interrupted_generation(history: Sequence[HistoryView], revisions: Collection[int]
                           ) -> int | None:
    """The generation whose rollout a conductor restart cut short: the one still
    recorded as rolling, if its revision is stored; None: nothing to end."""
    entry = next((h for h in history if h.state == "rolling"), None)
    if entry is None or entry.generation not in revisions:
        return None
    return entry.generation


def recover(*, app: str, from_generation: int, to_generation: int, total: int,
            replaced: int, forward: RolloutPolicy, back: RolloutPolicy, replicas: Replicas,
            now: float, forward_health: HealthCheck | None = None,
            back_health: HealthCheck | None = None) -> Progress:
    """How to end a rollout a restart interrupted, by the new revision's policy: roll back
    with auto-rollback, else fail. ``replaced`` is the count last stored; a new replica
    the nodes report ready counts as replaced even if its batch ended after that write."""
    serving_new = sum(1 for r in replicas.values()
                      if r.generation == to_generation and r.state == "ready")
    replaced = min(total, max(replaced, serving_new))
    return Progress(app, from_generation, to_generation, total, total, forward, back, now,
                    stage="stopping unready" if forward.auto_rollback else "failed",
                    replaced=replaced, recovering=True,
                    reason=f"interrupted by a conductor restart after {replaced}/{total} "
                           "replaced", forward_health=forward_health, back_health=back_health)


def watching(p: Progress) -> tuple[str, ...]:
    """The replicas whose end the next decision must see even once the conductor has
    dropped their rows: the current batch's new ones."""
    return () if p.work is None or p.work.new is None else p.work.new


# ------------------------------------------------------------------ what to do next


@dataclass(frozen=True)
class Launch:
    """Place and start ``count`` replicas of ``generation``; then go on from ``then``
    with them recorded by :func:`launched`, or by :func:`refused` if one found no room."""

    generation: int
    count: int
    then: Progress


@dataclass(frozen=True)
class Relaunch:
    """Forget ``replica_id`` (its port was taken on the host) and launch one replica of
    ``generation`` in its place; then go on from ``then`` with :func:`relaunched` (or
    :func:`refused`)."""

    replica_id: str
    generation: int
    then: Progress


@dataclass(frozen=True)
class AwaitReady:
    """Wait for the next change, or until ``deadline``; then decide again from ``then``.
    ``probe``: the last health probe of the first replica waited for, if any."""

    waiting: tuple[str, ...]
    deadline: float
    phase: str
    then: Progress
    probe: str | None = None


@dataclass(frozen=True)
class AwaitTraffic:
    """The batch ``waiting`` (all ready) is judged on its traffic: wait for the next
    change (new traffic among them), or until ``until``; then decide again from
    ``then``. ``seen``: its traffic since the analysis started at ``since``."""

    waiting: tuple[str, ...]
    generation: int
    until: float
    since: float
    seen: Counts
    phase: str
    then: Progress


@dataclass(frozen=True)
class AnalysisDone:
    """The analysis of batch ``replicas`` ended: ``verdict`` "passed", "promoted" or
    "failed" (``then`` carries the failure), on ``seen`` in ``elapsed_s``."""

    verdict: str
    replicas: tuple[str, ...]
    generation: int
    seen: Counts
    elapsed_s: float
    then: Progress


@dataclass(frozen=True)
class Hold:
    """The rollout is paused between batches: wait until it is resumed (no deadline
    runs meanwhile); then decide again from ``then``."""

    phase: str
    then: Progress


@dataclass(frozen=True)
class Retire:
    """Drain these replicas (they leave the ingress, then ``drain``), stop them and wait
    for their exits; then go on from ``then``."""

    replica_ids: tuple[str, ...]
    then: Progress


@dataclass(frozen=True)
class StopNow:
    """Stop these replicas at once and wait for their exits; then go on from ``then``."""

    replica_ids: tuple[str, ...]
    phase: str
    then: Progress


@dataclass(frozen=True)
class Announce:
    """Tell people what starts now; then go on from ``then``."""

    phase: str
    then: Progress


@dataclass(frozen=True)
class BatchDone:
    """A batch of the rollout proper is through: ``replaced`` so far (worth an event and
    a durable write); then go on from ``then``."""

    replaced: int
    then: Progress


@dataclass(frozen=True)
class Failed:
    """The rollout failed for ``reason``: tell people; then go on from ``then`` (a
    rollback, or the end)."""

    reason: str
    then: Progress


@dataclass(frozen=True)
class Finish:
    """The rollout is over: its final ``state`` and the message it keeps. ``complete``:
    the new revision becomes the app's current one."""

    state: str
    message: str


Step = (Launch | Relaunch | AwaitReady | AwaitTraffic | AnalysisDone | Hold | Retire
        | StopNow | Announce | BatchDone | Failed | Finish)


def decide(p: Progress, replicas: Replicas, now: float, traffic: Traffic = _no_traffic
           ) -> Step:
    """The next step of the rollout ``p``, given the app's replicas as they are now
    (including the ended ones :func:`watching` names, as far as they are known) and
    what the ingresses counted for them (``traffic``: ids -> a running sum).

    Deterministic and total: it never raises for any observed state, and a rollout
    that keeps being driven ends in a :class:`Finish`.
    """
    if p.failure is not None:
        return _fail(replace(p, failure=None), p.failure)
    if p.work is not None:
        step = _pass_step(p, p.work, replicas, now, traffic)
        if step is not None:
            return step
        after: dict[Stage, Stage] = {"replacing": "resizing", "growing": "complete",
                                     "rolling back": "rolled back"}
        return decide(replace(p, stage=after[p.stage], work=None), replicas, now, traffic)
    if p.stage == "resizing":
        return _resize(p, replicas, now, traffic)
    if p.stage == "stopping unready":
        unready = tuple(r.replica_id for r in sorted(replicas.values(), key=lambda r: r.seq)
                        if r.generation == p.to_generation and r.state not in replica_state.ENDED
                        and (r.state != "ready" or r.replica_id in p.judged_out))
        then = replace(p, stage="rolling back")
        if not unready:
            return decide(then, replicas, now, traffic)
        return StopNow(unready, f"rolling back: stopping {', '.join(unready)}", then)
    if p.stage == "rolling back":
        serving = sum(1 for r in replicas.values()
                      if r.generation == p.to_generation and r.state == "ready")
        if not serving:
            return decide(replace(p, stage="rolled back"), replicas, now, traffic)
        work = Pass(p.from_generation, p.to_generation, tuple(batches(serving, p.back.surge)),
                    p.back, health=p.back_health)
        return Announce(f"rolling back {serving} replica(s) to generation {p.from_generation}",
                        replace(p, work=work))
    if p.stage == "rolled back":
        return Finish("rolled_back", f"rolled back to generation {p.from_generation}: "
                                     f"{p.reason}")
    if p.stage == "failed":
        return Finish("failed", f"failed: {p.reason}")
    return Finish("complete", f"{p.replaced}/{p.total} replaced in {now - p.started_at:.1f} s")


def promote(p: Progress) -> Progress | None:
    """``rollout promote``: the analysis under way passes at the next decision (only
    this batch's: a later batch is judged again). None: no analysis is under way."""
    w = p.work
    if w is None or w.since is None or w.judged or p.failure is not None:
        return None
    return replace(p, work=replace(w, promoted=True))


def pause(p: Progress, paused: bool) -> Progress:
    """``rollout pause`` (True) / ``resume`` (False): a paused rollout finishes the
    batch under way, analysis included, and holds before it starts the next one."""
    return replace(p, paused=paused)


def aborted(p: Progress) -> Finish:
    """An abort ends the rollout where it is; the previous generation keeps serving."""
    if p.recovering:
        return Finish("aborted", f"aborted while recovering: {p.reason}")
    return Finish("aborted", f"aborted after {p.replaced}/{p.total} replaced; generation "
                             f"{p.from_generation} keeps serving")


def launched(p: Progress, replica_ids: Sequence[str], now: float) -> Progress:
    """The batch's new replicas were launched at ``now``: its ready-timeout starts."""
    assert p.work is not None
    return replace(p, work=replace(p.work, new=tuple(replica_ids),
                                   deadline=now + p.work.policy.ready_timeout_s))


def relaunched(p: Progress, old: str, new: str) -> Progress:
    """``new`` took the place of ``old`` in the batch (same deadline)."""
    assert p.work is not None and p.work.new is not None
    ids = tuple(new if rid == old else rid for rid in p.work.new)
    return replace(p, work=replace(p.work, new=ids, clashes=p.work.clashes + 1))


def refused(p: Progress, message: str) -> Progress:
    """A launch found no node with room: the rollout fails (next decision)."""
    return replace(p, failure=f"NO_CAPACITY: {message}")


def _pass_step(p: Progress, w: Pass, replicas: Replicas, now: float, traffic: Traffic
               ) -> Step | None:
    """The next step of pass ``w``; None once its last batch is through."""
    if not w.sizes:
        return None
    if p.paused and w.new is None and not w.old_gone and p.stage != "rolling back":
        return Hold(f"paused before the next batch ({p.replaced}/{p.total} replaced); "
                    f"`skr8tr rollout resume {p.app}` continues", p)
    if w.policy.order == "stop-first" and not w.old_gone:
        return _retire_old(p, w, replicas, now, traffic)
    if w.new is None:
        return Launch(w.new_generation, w.sizes[0], p)
    if not w.ready:
        step = _readiness(p, w, replicas, now)
        if step is not None:
            return step
        w = replace(w, ready=True)
        if _judged_by_traffic(p, w):
            w = replace(w, since=now, baseline=traffic(w.new))
    if _judged_by_traffic(p, w) and not w.judged:
        return _analysis_step(replace(p, work=w), w, replicas, now, traffic)
    if not w.old_gone:
        return _retire_old(p, w, replicas, now, traffic)
    nxt = replace(p, work=Pass(w.new_generation, w.old_generation, w.sizes[1:], w.policy,
                               w.counted, health=w.health))
    if w.counted:
        nxt = replace(nxt, replaced=p.replaced + w.sizes[0])
        return BatchDone(nxt.replaced, nxt)
    return decide(nxt, replicas, now, traffic)


def _judged_by_traffic(p: Progress, w: Pass) -> bool:
    """Forward batches are judged when the new revision has an analysis block; a
    rollback never is."""
    return w.policy.analysis is not None and p.stage in ("replacing", "growing")


def _analysis_step(p: Progress, w: Pass, replicas: Replicas, now: float, traffic: Traffic
                   ) -> Step:
    """Judge the ready batch ``w`` on the traffic users sent it since ``w.since``."""
    assert w.new is not None and w.since is not None and w.policy.analysis is not None
    seen = traffic(w.new).minus(w.baseline or Counts())
    elapsed = now - w.since

    def done(verdict: str, then: Progress) -> AnalysisDone:
        return AnalysisDone(verdict, w.new or (), w.new_generation, seen, elapsed, then)

    for rid in w.new:
        r = replicas.get(rid)
        if r is None or r.state not in replica_state.LIVE:
            why = "ended while its traffic was judged"
            return done("failed", replace(p, failure=_describe(p.app, rid, r, why)))
    passed = replace(p, work=replace(w, judged=True))
    if w.promoted:
        return done("promoted", passed)
    verdict = analysis.judge(w.policy.analysis, ready_timeout_s=w.policy.ready_timeout_s,
                             since=w.since, now=now, seen=seen, generation=w.new_generation,
                             replicas=w.new)
    if isinstance(verdict, analysis.Fail):
        out = w.new if not w.old_gone else ()  # start-first: their old ones serve still
        return done("failed", replace(p, failure=verdict.reason, judged_out=out))
    if isinstance(verdict, analysis.Pass):
        return done("passed", passed)
    phase = analysis.phase(w.policy.analysis, verdict, w.new)
    return AwaitTraffic(w.new, w.new_generation, verdict.until, w.since, seen, phase, p)


def _readiness(p: Progress, w: Pass, replicas: Replicas, now: float) -> Step | None:
    """Judge the batch's new replicas in launch order; None: all of them are ready."""
    assert w.new is not None
    waiting: list[str] = []
    for rid in w.new:
        r = replicas.get(rid)
        if (r is not None and r.port_clash and r.state in replica_state.ENDED
                and w.clashes < PORT_CLASH_RETRIES):
            return Relaunch(rid, w.new_generation, p)
        if r is None or r.state not in replica_state.LIVE:
            return _fail(p, _describe(p.app, rid, r, "exited before it was ready"))
        if r.state != "ready":
            verdict = probe_verdict(r, w.health)
            if verdict is not None:
                return _fail(p, _describe(p.app, rid, r, verdict))
            waiting.append(rid)
    if not waiting:
        return None
    first = replicas.get(waiting[0])
    if now >= w.deadline:
        why = f"was not ready within {w.policy.ready_timeout_s:g} s (ready-timeout)"
        if first is not None and first.probe:
            why += f"; last probe: {probe_line(first.probe, first.probe_count)}"
        return _fail(p, _describe(p.app, waiting[0], first, why))
    phase = (f"waiting for {waiting[0]} to become ready" if len(waiting) == 1
             else f"waiting for {len(waiting)} replicas to become ready")
    return AwaitReady(tuple(waiting), w.deadline, phase, p,
                      probe=None if first is None else probe_line(first.probe,
                                                                  first.probe_count))


def _retire_old(p: Progress, w: Pass, replicas: Replicas, now: float, traffic: Traffic
                ) -> Step:
    """Take out as many old replicas as the batch brings new ones (fewer if fewer live)."""
    then = replace(p, work=replace(w, old_gone=True))
    victims = next_to_replace(replicas, w.old_generation, w.sizes[0])
    return Retire(victims, then) if victims else decide(then, replicas, now, traffic)


def _resize(p: Progress, replicas: Replicas, now: float, traffic: Traffic) -> Step:
    """After the replacement: grow or shrink to the new revision's ``replicas``."""
    if p.want > p.total:
        work = Pass(p.to_generation, 0, tuple(batches(p.want - p.total, p.forward.surge)),
                    p.forward, health=p.forward_health)
        return Announce(f"scaling {p.total} -> {p.want}",
                        replace(p, stage="growing", work=work))
    done = replace(p, stage="complete")
    surplus = next_to_replace(replicas, p.to_generation, p.total - p.want)
    return Retire(surplus, done) if surplus else decide(done, replicas, now, traffic)


def _fail(p: Progress, reason: str) -> Step:
    """A failure: roll back by the new revision's policy, or end; a failing rollback ends."""
    if p.stage == "rolling back":
        return Finish("failed", f"failed: {p.reason}; the rollback failed too: {reason}")
    then = replace(p, stage="stopping unready" if p.forward.auto_rollback else "failed",
                   work=None, reason=reason)
    return Failed(reason, then)


def _describe(app: str, rid: str, r: ReplicaView | None, why: str) -> str:
    return describe_failure(rid, app=app, why=why,
                            exit_code=None if r is None else r.exit_code,
                            signal=None if r is None else r.signal,
                            message=None if r is None else r.message)
