"""Rollouts against fake nodes under MockClock: exact timing, failures, aborts, invariants."""

from __future__ import annotations

import math

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from skr8tr.conductor import commands, logs, loops
from skr8tr.conductor.cluster import Cluster
from skr8tr.conductor.errors import CommandError
from skr8tr.conductor.file_store import FileStore
from skr8tr.conductor.rollout import RolloutManager
from skr8tr.core import reconcile
from tests.fakes import FakeNode, wait_for

BASE = "/srv/apps"


def manifest(version: str = "v1", *, replicas: int = 3, port: str = "auto", rollout: str = "",
             health: bool = False) -> dict:
    text = (f"app web\n  exec /bin/server\n  args --version {version}\n"
            f"  replicas {replicas}\n")
    if port:
        text += f"  port {port}\n"
    if health:
        text += "  health\n    check GET /healthz\n    interval 100ms\n"
    if rollout:
        text += "  rollout\n" + "".join(f"    {line.strip()}\n" for line in rollout.split(";"))
    return {"manifest": text, "format": "skr8tr", "base_dir": BASE}


class Harness:
    """A conductor without sockets: cluster, reconciler, rollouts, command handlers."""

    def __init__(self, nursery: trio.Nursery, node_timeout_s: float = 15.0,
                 state_path: str | None = None) -> None:
        self.nursery = nursery
        self.store = None if state_path is None else FileStore(state_path)
        self.cluster = Cluster(node_timeout_s=node_timeout_s, port_range=(20000, 20100),
                               store=self.store)
        self.rollouts = RolloutManager(self.cluster)
        self.handlers = commands.handlers(logs.LogRequests(), self.rollouts)
        self.nodes: list[FakeNode] = []

    async def reattach(self, node: FakeNode) -> FakeNode:
        """A node that survived a conductor restart reconnects to this one."""
        node.cluster = self.cluster
        await self.nursery.start(node.run)
        self.nodes.append(node)
        return node

    async def start(self) -> Harness:
        if self.store is not None:  # what the daemon does at start-up
            stored, self.rollouts.interrupted = await self.cluster.open_store(self.store.path)
            if stored is not None:
                self.rollouts.restore(stored.rollouts)
                self.cluster.start_adopt_grace()
        await self.nursery.start(loops.serve_reconciler, self.cluster)
        await self.nursery.start(loops.serve_store_writes, self.cluster)
        await self.nursery.start(loops.serve_expiry_watchdog, self.cluster)
        await self.nursery.start(self.rollouts.run)
        return self

    async def node(self, node_id: str, address: str = "127.0.0.1", **kw) -> FakeNode:
        node = FakeNode(self.cluster, node_id, address, **kw)
        await self.nursery.start(node.run)
        self.nodes.append(node)
        return node

    async def run(self, cmd: str, args: dict):
        return await self.handlers[cmd](self.cluster, args)

    async def until_done(self, app: str = "web") -> dict:
        record = self.rollouts.last[app]
        await record.done.wait()
        return record.status(self.cluster.clock())

    def replicas(self, generation: int | None = None, states=reconcile.LIVE_STATES) -> list:
        return [r for r in self.cluster.replicas.values()
                if r.app == "web" and r.state in states
                and (generation is None or r.generation == generation)]

    async def settled(self, generation: int, count: int) -> None:
        await wait_for(lambda: len(self.replicas(generation, {"ready"})) == count
                       and len(self.cluster.replicas) == count)


@pytest.fixture
async def h(nursery) -> Harness:
    return await Harness(nursery).start()


async def deploy(h: Harness, **kw) -> None:
    await h.run("up", manifest("v1", **kw))
    await h.settled(1, kw.get("replicas", 3))


@pytest.mark.parametrize("rollout, surge_ok, expected_s", [
    ("", True, 24.0),  # 3 x the default 8 s settle
    ("settle 2s", True, 6.0),
    ("surge 3", True, 8.0),  # all three at once
    ("surge 2; settle 1s", True, 2.0),  # batches of 2 and 1
])
async def test_rollout_without_health_takes_exactly_the_settle_windows(
        h, autojump_clock, rollout, surge_ok, expected_s):
    await h.node("n1", ready_after_s=None)
    await h.node("n2", "127.0.0.2", ready_after_s=None)
    await h.run("up", manifest("v1", rollout=rollout))
    await h.settled(1, 3)
    t0 = trio.current_time()
    first = await h.run("rollout", manifest("v2", rollout=rollout))
    assert first == {"app": "web", "state": "rolling", "from_generation": 1,
                     "to_generation": 2, "replaced": 0, "total": 3,
                     "message": first["message"],
                     # §11's fields: no analysis block, nothing routed yet
                     "paused": False, "analysis": None,
                     "traffic": [{"generation": g, "requests": 0, "errors": 0, "failed": 0,
                                  "error_rate": None, "p99_ms": None} for g in (1, 2)]}
    final = await h.until_done()
    assert trio.current_time() - t0 == pytest.approx(expected_s)
    assert final["state"] == "complete" and final["replaced"] == 3
    await h.settled(2, 3)
    assert h.cluster.apps["web"].generation == 2


async def test_rollout_with_health_check_ends_when_probes_pass(h, autojump_clock):
    await h.node("n1", ready_after_s=None, probe_ready_after_s=0.3)
    await deploy(h, health=True)
    t0 = trio.current_time()
    await h.run("rollout", manifest("v2", health=True))
    final = await h.until_done()
    assert final["state"] == "complete"
    assert trio.current_time() - t0 == pytest.approx(0.9)  # 3 x 300 ms, not 3 x 8 s


async def test_start_first_never_drops_below_the_desired_ready_count(h, autojump_clock):
    await h.node("n1", ready_after_s=None)
    await deploy(h, rollout="settle 1s; drain 500ms")
    lowest = []

    async def watch():
        while True:
            lowest.append(len([r for r in h.cluster.replicas.values()
                               if r.state == "ready"]))
            await h.cluster.wait_changed()

    async with trio.open_nursery() as n:
        n.start_soon(watch)
        await h.run("rollout", manifest("v2", rollout="settle 1s; drain 500ms"))
        final = await h.until_done()
        n.cancel_scope.cancel()
    assert final["state"] == "complete"
    assert min(lowest) == 3
    drained = [e for e in h.cluster.events.recent if e.event == "replica.draining"]
    assert len(drained) == 3 and all(e.data["generation"] == 1 for e in drained)


def crash_generation(gen: int, after_s: float = 0.0, code: int = 3):
    return lambda msg: ({"crash_after_s": after_s, "exit_code": code}
                        if msg["generation"] == gen else {})


async def test_crash_on_start_rolls_back_by_itself(h, autojump_clock):
    node = await h.node("n1", launch_hook=crash_generation(2))
    await deploy(h)
    old_ids = sorted(r.replica_id for r in h.replicas(1))
    await h.run("rollout", manifest("v4"))
    final = await h.until_done()
    assert final["state"] == "rolled_back"
    assert "exited before it was ready" in final["message"]
    assert "exit code 3" in final["message"]
    assert sorted(r.replica_id for r in h.replicas(1)) == old_ids  # never touched
    assert not h.replicas(2, reconcile.LIVE_STATES | {"stopping", "draining"})
    assert h.cluster.apps["web"].generation == 1
    history = await h.run("history", {"app": "web"})
    assert [(e["generation"], e["state"]) for e in history] == [(1, "complete"),
                                                                 (2, "rolled_back")]
    # the next attempt takes the next number
    node.launch_hook = None
    second = await h.run("rollout", manifest("v5"))
    assert second["to_generation"] == 3
    assert (await h.until_done())["state"] == "complete"


async def test_never_ready_fails_at_exactly_the_ready_timeout(h, autojump_clock):
    await h.node("n1", launch_hook=lambda m: {"ready_after_s": math.inf}
                 if m["generation"] == 2 else {})
    await deploy(h, rollout="ready-timeout 5s")
    t0 = trio.current_time()
    await h.run("rollout", manifest("v3", rollout="ready-timeout 5s"))
    final = await h.until_done()
    assert final["state"] == "rolled_back"
    assert "was not ready within 5 s" in final["message"]
    assert trio.current_time() - t0 == pytest.approx(5.0)
    await h.settled(1, 3)


async def test_without_auto_rollback_it_fails_and_keeps_the_old_replicas(h, autojump_clock):
    await h.node("n1", launch_hook=crash_generation(2))
    await deploy(h)
    old_ids = sorted(r.replica_id for r in h.replicas(1))
    await h.run("rollout", manifest("v4", rollout="auto-rollback no"))
    final = await h.until_done()
    assert final["state"] == "failed" and "exit code 3" in final["message"]
    assert sorted(r.replica_id for r in h.replicas(1)) == old_ids
    assert not h.replicas(2)


def crash_second_of(generation: int, launches: list[int]):
    """A launch hook that records each launch's generation in *launches* and makes the
    second replica of *generation* crash 0.5 s after it starts."""

    def hook(msg):
        launches.append(msg["generation"])
        if msg["generation"] == generation and launches.count(generation) == 2:
            return {"crash_after_s": 0.5}
        return {}

    return hook


async def test_failure_in_a_later_batch_rolls_back_the_ready_ones_gated(h, autojump_clock):
    launches: list[int] = []
    hook = crash_second_of(2, launches)  # the first replica of generation 2 is fine
    await h.node("n1", launch_hook=hook, ready_after_s=None)
    await h.node("n2", "127.0.0.2", launch_hook=hook, ready_after_s=None)
    await deploy(h, rollout="settle 1s")
    await h.run("rollout", manifest("v2", rollout="settle 1s"))
    final = await h.until_done()
    assert final["state"] == "rolled_back" and final["replaced"] == 1
    # the ready v2 replica was replaced by a new generation-1 replica before it stopped
    assert launches == [1, 1, 1, 2, 2, 1]
    await h.settled(1, 3)


async def test_node_lost_mid_rollout_rolls_back(autojump_clock, nursery):
    h = await Harness(nursery, node_timeout_s=5.0).start()
    n1 = await h.node("n1")
    await deploy(h)
    # n2 joins (the least loaded: it gets the new replica) and then goes silent
    n2 = await h.node("n2", "127.0.0.2", launch_hook=lambda m: {"ready_after_s": math.inf})
    await h.run("rollout", manifest("v2", rollout="ready-timeout 60s"))
    await wait_for(lambda: n2.running)
    n2.silent = True
    final = await h.until_done()
    assert final["state"] == "rolled_back"
    assert "n2 lost" in final["message"] or "exited before it was ready" in final["message"]
    await h.settled(1, 3)
    assert all(r.node_id == "n1" for r in h.cluster.replicas.values())
    assert len(n1.running) == 3


async def test_abort_stops_what_it_started_and_restores_the_old_count(h, autojump_clock):
    await h.node("n1", ready_after_s=None)
    await h.node("n2", "127.0.0.2", ready_after_s=None)
    await deploy(h, rollout="settle 4s")
    await h.run("rollout", manifest("v2", rollout="settle 4s"))
    await trio.sleep(6)  # batch 1 done (4 s), batch 2 launched and settling
    assert h.rollouts.last["web"].replaced == 1
    status = await h.run("rollout-abort", {"app": "web"})
    assert status["state"] == "aborted"
    assert "generation 1 keeps serving" in status["message"]
    assert not h.replicas(2, reconcile.LIVE_STATES | {"stopping", "draining"})
    await h.settled(1, 3)  # the replica stopped by batch 1 is relaunched as generation 1
    held = {(r.address, r.port) for r in h.cluster.replicas.values()}
    assert held == {(a, p) for a, ports in h.cluster.ports.held.items() for p in ports}
    history = await h.run("history", {"app": "web"})
    assert [e["state"] for e in history] == ["complete", "aborted"]


async def test_a_port_taken_outside_skr8tr_is_replaced_not_fatal(h, autojump_clock):
    clashed = []

    def hook(msg):
        if msg["generation"] == 2 and len(clashed) < 2:
            clashed.append(msg["port"])
            return {"port_in_use": True}
        return {}

    node = await h.node("n1", launch_hook=hook)
    await deploy(h)
    await h.run("rollout", manifest("v2"))
    final = await h.until_done()
    assert final["state"] == "complete"
    assert clashed == [20003, 20004]
    gen2_ports = [m["port"] for _, m in node.launches if m["generation"] == 2]
    assert len(gen2_ports) == 5 and gen2_ports[:3] == [20003, 20004, 20005]
    assert not set(gen2_ports[2:]) & set(clashed)  # blocked ports are not offered again
    await h.settled(2, 3)


async def test_a_second_rollout_conflicts_unless_forced(h, autojump_clock):
    await h.node("n1", ready_after_s=None)
    await deploy(h)
    await h.run("rollout", manifest("v2"))
    with pytest.raises(CommandError) as err:
        await h.run("rollout", manifest("v3"))
    assert err.value.code == "CONFLICT" and "--force" in err.value.message
    forced = await h.run("rollout", dict(manifest("v3"), force=True))
    assert forced["to_generation"] == 3 and forced["from_generation"] == 1
    assert (await h.until_done())["state"] == "complete"
    history = await h.run("history", {"app": "web"})
    assert [(e["generation"], e["state"]) for e in history] == [
        (1, "complete"), (2, "aborted"), (3, "complete")]
    await h.settled(3, 3)


async def test_replica_count_change_is_applied_after_replacement(h, autojump_clock):
    await h.node("n1")
    await deploy(h)
    await h.run("rollout", manifest("v2", replicas=5))
    final = await h.until_done()
    assert final["state"] == "complete" and final["total"] == 3 and final["replaced"] == 3
    assert len(h.replicas(2, {"ready"})) == 5
    await h.run("rollout", manifest("v3", replicas=2))
    await h.until_done()
    await h.settled(3, 2)


async def test_fixed_port_on_one_address_fails_fast_with_a_hint(h, autojump_clock):
    await h.node("n1")
    await h.node("n2", "127.0.0.2")
    await h.run("up", manifest("v1", port="8080", replicas=2))
    await h.settled(1, 2)
    with pytest.raises(CommandError) as err:
        await h.run("rollout", manifest("v2", port="8080", replicas=2))
    assert err.value.code == "NO_CAPACITY"
    assert "order stop-first" in err.value.message
    assert [e["generation"] for e in await h.run("history", {"app": "web"})] == [1]


async def test_stop_first_rolls_a_fixed_port_app(h, autojump_clock):
    await h.node("n1")
    await h.node("n2", "127.0.0.2")
    await h.run("up", manifest("v1", port="8080", replicas=2, rollout="order stop-first"))
    await h.settled(1, 2)
    await h.run("rollout", manifest("v2", port="8080", replicas=2, rollout="order stop-first"))
    final = await h.until_done()
    assert final["state"] == "complete"
    await h.settled(2, 2)
    assert {r.port for r in h.cluster.replicas.values()} == {8080}


async def test_undo_rolls_out_the_previous_complete_revision(h, autojump_clock):
    await h.node("n1")
    await deploy(h)
    await h.run("rollout", manifest("v2"))
    await h.until_done()
    status = await h.run("rollout-undo", {"app": "web", "to": None})
    assert status["from_generation"] == 2 and status["to_generation"] == 3
    await h.until_done()
    app = h.cluster.apps["web"]
    assert app.generation == 3 and "--version v1" in app.revision.text
    with pytest.raises(CommandError) as err:
        await h.run("rollout-undo", {"app": "web", "to": 9})
    assert err.value.code == "NOT_FOUND"
    with pytest.raises(CommandError):
        await h.run("rollout", dict(manifest("v2"), manifest=manifest("v2")["manifest"]
                                    .replace("app web", "app nope")))


# ------------------------------------------------------------------ property: abort anywhere


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    replicas=st.integers(1, 10),
    surge=st.integers(1, 3),
    ready_times=st.lists(st.floats(0.0, 5.0), min_size=1, max_size=8),
    abort_at=st.floats(0.0, 40.0),
    lose_node_at=st.one_of(st.none(), st.floats(0.0, 40.0)),
    stop_first=st.booleans(),
)
def test_abort_at_any_moment_leaves_a_clean_cluster(replicas, surge, ready_times, abort_at,
                                                    lose_node_at, stop_first):
    async def scenario():
        async with trio.open_nursery() as nursery:
            h = await Harness(nursery, node_timeout_s=3.0).start()
            times = iter(ready_times * 100)

            def hook(msg: dict) -> dict:
                return {"ready_after_s": next(times)} if msg["generation"] == 2 else {}

            await h.node("n1", launch_hook=hook)
            await h.node("n2", "127.0.0.2", launch_hook=hook)
            spare = await h.node("n3", "127.0.0.3", launch_hook=hook)
            policy = f"surge {surge}; ready-timeout 30s"
            if stop_first:
                policy += "; order stop-first"
            await h.run("up", manifest("v1", replicas=replicas, rollout=policy))
            await h.settled(1, replicas)
            await h.run("rollout", manifest("v2", replicas=replicas, rollout=policy))
            t0 = trio.current_time()
            events = sorted([(abort_at, "abort")] +
                            ([(lose_node_at, "lose")] if lose_node_at is not None else []))
            for at, what in events:
                await trio.sleep_until(t0 + at)
                if what == "lose":
                    spare.silent = True
                elif "web" in h.rollouts.active:
                    await h.run("rollout-abort", {"app": "web"})
            record = h.rollouts.last["web"]
            await record.done.wait()
            final_gen = 2 if record.state == "complete" else 1
            await h.settled(final_gen, replicas)
            # invariants
            for address, ports in h.cluster.ports.held.items():
                for port, rid in ports.items():
                    r = h.cluster.replicas[rid]
                    assert r.state in reconcile.LIVE_STATES and r.address == address
                    assert r.port == port
            # A lost node's processes are out of reach (a returning node's leftovers are
            # stopped when it says hello again); every reachable node must be clean.
            reachable = [n for n in h.nodes if not h.cluster.nodes[n.node_id].expired]
            other = 1 if final_gen == 2 else 2
            alive = [r for n in reachable for r in n.running.values()
                     if r.generation == other]
            assert not alive, f"generation {other} still alive: {alive}"
            assert len([r for n in reachable for r in n.running.values()]) == replicas
            nursery.cancel_scope.cancel()

    trio.run(scenario, clock=trio.testing.MockClock(autojump_threshold=0))


def probes(gen: int, *script: tuple[float, int | None, int], text: str | None = None):
    """A launch hook: replicas of ``gen`` report these probes ((after_s, status, count))
    and are never ready by themselves."""
    def hook(msg):
        if msg["generation"] != gen:
            return {}
        return {"ready_after_s": math.inf, "probes": [
            (t, {"text": text or (f"GET /healthz -> {status}, want 200" if status
                                  else "GET /healthz -> connection refused"),
                 "status": status, "count": count}) for t, status, count in script]}
    return hook


async def test_definite_wrong_answers_fail_the_rollout_at_the_retries_th(h, autojump_clock):
    # retries 3 (the default): the third 404 in a row fails it, 59.7 s before ready-timeout
    await h.node("n1", ready_after_s=None,
                 launch_hook=probes(2, (0.1, 404, 1), (0.2, 404, 2), (0.3, 404, 3)))
    await deploy(h, health=True, rollout="ready-timeout 60s")
    old_ids = sorted(r.replica_id for r in h.replicas(1))
    t0 = trio.current_time()
    await h.run("rollout", manifest("v2", health=True, rollout="ready-timeout 60s"))
    final = await h.until_done()
    assert trio.current_time() - t0 == pytest.approx(0.3)
    assert final["state"] == "rolled_back"
    assert ("failed its health check 3 times in a row: GET /healthz -> 404, want 200"
            in final["message"])
    assert sorted(r.replica_id for r in h.replicas(1)) == old_ids  # never touched
    failed = [e for e in h.cluster.events.recent if e.event == "rollout.failed"]
    assert "GET /healthz -> 404, want 200" in failed[0].data["reason"]


async def test_fewer_wrong_answers_than_retries_wait_and_pass(h, autojump_clock):
    def hook(msg):
        if msg["generation"] != 2:
            return {}
        return {"ready_after_s": 1.0, "probes": [
            (0.1, {"text": "GET /healthz -> 404, want 200", "status": 404, "count": 1}),
            (0.2, {"text": "GET /healthz -> 404, want 200", "status": 404, "count": 2})]}
    await h.node("n1", ready_after_s=None, launch_hook=hook)
    await deploy(h, health=True, rollout="surge 3")
    t0 = trio.current_time()
    await h.run("rollout", manifest("v2", health=True, rollout="surge 3"))
    final = await h.until_done()
    assert final["state"] == "complete"
    assert trio.current_time() - t0 == pytest.approx(1.0)


async def test_refused_connections_wait_for_readiness_however_many(h, autojump_clock):
    # 50 refused probes in a row are no verdict: a starting process refuses connections
    script = [(0.1 * i, None, i) for i in range(1, 51)]
    def hook(msg):
        return {} if msg["generation"] != 2 else {**probes(2, *script)(msg),
                                                    "ready_after_s": 6.0}
    await h.node("n1", ready_after_s=None, launch_hook=hook)
    await deploy(h, health=True, rollout="surge 3")
    t0 = trio.current_time()
    await h.run("rollout", manifest("v2", health=True, rollout="surge 3"))
    await wait_for(lambda: trio.current_time() - t0 >= 2.05)
    status = await h.run("rollout-status", {"app": "web"})
    assert status["state"] == "rolling"
    assert ("(last probe: GET /healthz -> connection refused (20 in a row))"
            in status["message"]), status["message"]
    rows = await h.run("list", {"app": "web"})
    assert {r["probe"] for r in rows if r["generation"] == 2} == {
        "GET /healthz -> connection refused (20 in a row)"}
    final = await h.until_done()
    assert final["state"] == "complete"
    assert trio.current_time() - t0 == pytest.approx(6.0)


async def test_ready_timeout_names_the_last_probe(h, autojump_clock):
    await h.node("n1", ready_after_s=None,
                 launch_hook=probes(2, (0.5, None, 1), (1.0, None, 2)))
    await deploy(h, health=True, rollout="ready-timeout 5s")
    t0 = trio.current_time()
    await h.run("rollout", manifest("v2", health=True, rollout="ready-timeout 5s"))
    final = await h.until_done()
    assert trio.current_time() - t0 == pytest.approx(5.0)
    assert final["state"] == "rolled_back"
    assert ("was not ready within 5 s (ready-timeout); last probe: GET /healthz -> "
            "connection refused (2 in a row)") in final["message"]


async def test_a_node_cannot_fail_another_nodes_replica_by_its_probes(h, autojump_clock):
    from skr8tr.core.node_protocol import ReplicaReport

    await h.node("n1", ready_after_s=None,
                 launch_hook=lambda m: {"ready_after_s": 2.0} if m["generation"] == 2 else {})
    await h.node("n2", "127.0.0.2", ready_after_s=None,
                 launch_hook=lambda m: {"ready_after_s": 2.0} if m["generation"] == 2 else {})
    await deploy(h, health=True, rollout="surge 3")
    await h.run("rollout", manifest("v2", health=True, rollout="surge 3"))
    await wait_for(lambda: len(h.replicas(2)) == 3)
    for r in h.replicas(2):
        other = "n2" if r.node_id == "n1" else "n1"
        h.cluster.replica_report(other, ReplicaReport(
            replica=r.replica_id, app="web", generation=2, state="running", ts=0.0,
            probe={"text": "GET /healthz -> 404, want 200", "status": 404, "count": 99}))
    assert all(r.probe_text is None for r in h.replicas(2))
    final = await h.until_done()
    assert final["state"] == "complete"


async def test_app_counts_stay_true_through_a_rollout(h, autojump_clock):
    from skr8tr.conductor import views

    await h.node("n1", ready_after_s=None)
    await deploy(h, rollout="settle 1s; drain 500ms")
    seen = []

    async def watch():
        while True:
            (row,) = views.app_rows(h.cluster)
            live = [r for r in h.cluster.replicas.values()]
            seen.append((row, sum(r.state == "ready" for r in live)))
            await h.cluster.wait_changed()

    async with trio.open_nursery() as n:
        n.start_soon(watch)
        await h.run("rollout", manifest("v2", rollout="settle 1s; drain 500ms"))
        final = await h.until_done()
        n.cancel_scope.cancel()
    assert final["state"] == "complete"
    # ready is what serves, of any generation: never a false outage mid-rollout
    assert all(row["ready"] == serving for row, serving in seen)
    assert min(row["ready"] for row, _ in seen) == 3
    assert any(row["starting"] == 1 for row, _ in seen)  # the surge
    assert any(row["draining"] == 1 for row, _ in seen)
    assert all(row["running"] == row["ready"] + row["starting"] for row, _ in seen)


async def test_scale_answers_the_count_before_and_after(h, autojump_clock):
    await h.node("n1", ready_after_s=None)
    await deploy(h, replicas=5, rollout="settle 1s")
    down = await h.run("scale", {"app": "web", "replicas": 2})
    assert (down["previous"], down["desired"]) == (5, 2)
    assert len(down["replicas"]) == 5  # three of them on their way out
    assert sum(r["state"] == "ready" for r in down["replicas"]) == 2
    await h.settled(1, 2)
    (row,) = (await h.run("status", {}))["apps"]
    assert (row["desired"], row["ready"], row["draining"], row["stopping"]) == (2, 2, 0, 0)


async def test_status_keeps_every_recent_rollout_with_how_it_ended(h, autojump_clock):
    node = await h.node("n1", launch_hook=crash_generation(2))
    await deploy(h)
    await h.run("rollout", manifest("v4"))
    assert (await h.until_done())["state"] == "rolled_back"
    node.launch_hook = None
    await h.run("rollout", manifest("v5"))
    assert (await h.until_done())["state"] == "complete"
    status = await h.run("status", {})
    rows = status["history"]["web"]
    assert [(r["generation"], r["state"]) for r in rows] == [
        (1, "complete"), (2, "rolled_back"), (3, "complete")]
    assert rows[0]["message"] is None  # `up`'s
    assert "exit code 3" in rows[1]["message"] and len(rows[1]["message"]) <= 300
    assert rows[2]["message"]
    # the last rollout alone is what `rollouts` shows: the rolled back one only here
    assert [r["to_generation"] for r in status["rollouts"]] == [3]
    # `rollout history` keeps its shape
    history = await h.run("history", {"app": "web"})
    assert set(history[1]) == {"generation", "state", "started", "finished", "manifest_sha256",
                               "manifest_kept"}


async def test_status_history_is_bounded_per_app(h, autojump_clock):
    await h.node("n1")
    await deploy(h, replicas=1)
    for n in range(2, 14):
        await h.run("rollout", manifest(f"v{n}", replicas=1))
        assert (await h.until_done())["state"] == "complete"
    status = await h.run("status", {})
    assert [r["generation"] for r in status["history"]["web"]] == list(range(4, 14))
    assert len(await h.run("history", {"app": "web"})) == 13  # all of them there
