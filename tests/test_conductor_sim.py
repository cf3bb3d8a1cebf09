"""The conductor's state machine with fake nodes under MockClock: exact times, exact counts."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import trio

from skr8tr.conductor import commands, logs, loops
from skr8tr.conductor.cluster import Cluster
from skr8tr.conductor.errors import CommandError
from skr8tr.conductor.rollout import RolloutManager
from skr8tr.core import reconcile
from skr8tr.core.node_protocol import ReplicaReport
from tests.fakes import FakeNode, wait_for

BASE = "/srv/apps"


def manifest(name: str = "web", *, replicas: int = 3, port: str = "auto", extra: str = "",
             type_: str = "process") -> dict:
    text = f"app {name}\n  type {type_}\n  exec /bin/server\n  replicas {replicas}\n"
    if port:
        text += f"  port {port}\n"
    text += extra
    return {"manifest": text, "format": "skr8tr", "base_dir": BASE}


@pytest.fixture
async def cluster(nursery):
    c = Cluster(node_timeout_s=15.0, port_range=(20000, 20100))
    await nursery.start(loops.serve_reconciler, c)
    await nursery.start(loops.serve_expiry_watchdog, c)
    return c


async def start_nodes(nursery, cluster, *specs: tuple[str, str], **kw) -> list[FakeNode]:
    nodes = []
    for node_id, address in specs:
        node = FakeNode(cluster, node_id, address, **kw)
        await nursery.start(node.run)
        nodes.append(node)
    return nodes


async def run(cluster: Cluster, cmd: str, args: dict):
    handlers = commands.handlers(logs.LogRequests(), RolloutManager(cluster))
    return await handlers[cmd](cluster, args)


def live(cluster: Cluster, app: str = "web") -> list:
    return [r for r in cluster.replicas.values()
            if r.app == app and r.state in reconcile.LIVE_STATES]


def assert_no_port_held_twice(cluster: Cluster) -> None:
    seen = set()
    for r in cluster.replicas.values():
        if r.port is not None and r.state not in reconcile.ENDED_STATES:
            key = (r.address, r.port)
            assert key not in seen, f"port {key} held twice"
            seen.add(key)


async def test_up_spreads_replicas_and_claims_distinct_ports(cluster, nursery, autojump_clock):
    await start_nodes(nursery, cluster, ("n1", "127.0.0.1"), ("n2", "127.0.0.1"),
                      ("n3", "127.0.0.2"))
    result = await run(cluster, "up", manifest(replicas=6))
    assert result["generation"] == 1
    per_node = {}
    for row in result["replicas"]:
        per_node[row["node"]] = per_node.get(row["node"], 0) + 1
        assert row["state"] == "pending"
    assert per_node == {"n1": 2, "n2": 2, "n3": 2}
    # n1 and n2 share an address, so they share one port space
    shared = sorted(r["port"] for r in result["replicas"] if r["node"] in ("n1", "n2"))
    assert shared == [20000, 20001, 20002, 20003]
    assert_no_port_held_twice(cluster)
    await wait_for(lambda: all(r.state == "ready" for r in cluster.replicas.values()))
    assert len(live(cluster)) == 6


async def test_fixed_port_with_two_addresses_runs_two_and_reports_no_capacity(
        cluster, nursery, autojump_clock):
    await start_nodes(nursery, cluster, ("n1", "127.0.0.1"), ("n2", "127.0.0.2"))
    with pytest.raises(CommandError) as err:
        await run(cluster, "up", manifest(port="8080"))
    assert err.value.code == "NO_CAPACITY"
    assert "placed 2 of 3" in err.value.message
    assert "port 8080 is taken on 127.0.0.1" in err.value.message
    assert "port auto" in err.value.message  # the hint
    assert sorted((r.node_id, r.port) for r in cluster.replicas.values()) == [
        ("n1", 8080), ("n2", 8080)]


async def test_fixed_port_with_one_shared_address_runs_one(cluster, nursery, autojump_clock):
    await start_nodes(nursery, cluster, ("n1", "127.0.0.1"), ("n2", "127.0.0.1"))
    with pytest.raises(CommandError) as err:
        await run(cluster, "up", manifest(port="8080"))
    assert "placed 1 of 3" in err.value.message
    assert len(cluster.replicas) == 1


async def test_no_capacity_counts_what_is_placed_not_what_is_leaving(
        cluster, nursery, autojump_clock):
    await start_nodes(nursery, cluster, ("n1", "127.0.0.1"), ("n2", "127.0.0.2"))
    drain = "  rollout\n    drain 5s\n"
    await run(cluster, "up", manifest(port="8080", replicas=2, extra=drain))
    await wait_for(lambda: len([r for r in live(cluster) if r.state == "ready"]) == 2)
    await run(cluster, "scale", {"app": "web", "replicas": 1})
    assert [r.state for r in cluster.replicas.values()].count("draining") == 1
    with pytest.raises(CommandError) as err:  # the draining one still holds its port
        await run(cluster, "scale", {"app": "web", "replicas": 3})
    assert "scaled to 3 but only 1 replica(s) could be placed" in err.value.message


async def test_the_missing_replica_is_placed_when_capacity_appears(
        cluster, nursery, autojump_clock):
    await start_nodes(nursery, cluster, ("n1", "127.0.0.1"))
    with pytest.raises(CommandError):
        await run(cluster, "up", manifest(port="8080", replicas=2))
    await start_nodes(nursery, cluster, ("n2", "127.0.0.2"))
    await wait_for(lambda: len(live(cluster)) == 2)
    assert cluster.apps["web"].placement_error is None


async def test_up_same_manifest_is_a_noop_and_a_different_one_conflicts(
        cluster, nursery, autojump_clock):
    await start_nodes(nursery, cluster, ("n1", "127.0.0.1"))
    first = await run(cluster, "up", manifest(replicas=2))
    again = await run(cluster, "up", manifest(replicas=2))
    assert [r["replica"] for r in again["replicas"]] == [r["replica"] for r in first["replicas"]]
    with pytest.raises(CommandError) as err:
        await run(cluster, "up", manifest(replicas=3))
    assert err.value.code == "CONFLICT" and "use `skr8tr rollout" in err.value.message


async def test_node_expires_exactly_at_node_timeout_and_replicas_move(
        cluster, nursery, autojump_clock):
    n1, n2 = await start_nodes(nursery, cluster, ("n1", "127.0.0.1"), ("n2", "127.0.0.2"))
    await run(cluster, "up", manifest(replicas=4))
    await wait_for(lambda: len([r for r in live(cluster) if r.state == "ready"]) == 4)
    await trio.sleep(0.5)  # between two heartbeats
    n1.silent = True
    last_seen = cluster.nodes["n1"].last_seen
    await wait_for(lambda: cluster.nodes["n1"].expired, step_s=0.001)
    lost = [e for e in cluster.events.recent if e.event == "node.lost"]
    assert len(lost) == 1
    assert trio.current_time() == pytest.approx(last_seen + 15.0, abs=0.001)
    await wait_for(lambda: len([r for r in live(cluster) if r.node_id == "n2"]) == 4)
    assert not [r for r in cluster.replicas.values() if r.node_id == "n1"]
    assert "127.0.0.1" not in cluster.ports.held  # n1's port claims are released
    assert_no_port_held_twice(cluster)


async def test_crash_loop_restarts_follow_the_backoff_exactly(cluster, nursery, autojump_clock):
    (node,) = await start_nodes(nursery, cluster, ("n1", "127.0.0.1"), crash_after_s=0.0)
    t0 = trio.current_time()
    await run(cluster, "up", manifest(replicas=1))
    await wait_for(lambda: len(node.launches) >= 9, timeout_s=1000)
    times = [round(t - t0, 6) for t, _ in node.launches[:9]]
    assert times == [0, 1, 3, 7, 15, 31, 63, 123, 183]
    # every launch after the first carries the crash count forward
    assert reconcile.backoff_s(7) == 60.0


async def test_a_replica_that_ran_long_restarts_after_one_second(cluster, nursery,
                                                                 autojump_clock):
    (node,) = await start_nodes(nursery, cluster, ("n1", "127.0.0.1"), crash_after_s=100.0)
    t0 = trio.current_time()
    await run(cluster, "up", manifest(replicas=1))
    await wait_for(lambda: len(node.launches) >= 3, timeout_s=1000)
    times = [round(t - t0, 6) for t, _ in node.launches[:3]]
    assert times == [0, 101, 202]


async def test_restart_never_and_jobs(cluster, nursery, autojump_clock):
    (node,) = await start_nodes(nursery, cluster, ("n1", "127.0.0.1"), crash_after_s=1.0,
                                exit_code=0)
    await run(cluster, "up", manifest("batch", replicas=2, port="", type_="job"))
    await wait_for(lambda: cluster.apps["batch"].completed == 2)
    await trio.sleep(120)
    assert len(node.launches) == 2  # a finished job is not run again
    assert not [r for r in cluster.replicas.values() if r.app == "batch"]
    node.exit_code = 1
    await run(cluster, "up", manifest("once", replicas=1, port="",
                                      extra="  restart never\n"))
    await wait_for(lambda: cluster.apps["once"].given_up == 1)
    await trio.sleep(120)
    assert len([m for _, m in node.launches if m["app"] == "once"]) == 1


async def test_failing_job_is_retried_with_backoff(cluster, nursery, autojump_clock):
    (node,) = await start_nodes(nursery, cluster, ("n1", "127.0.0.1"), crash_after_s=0.0,
                                exit_code=2)
    t0 = trio.current_time()
    await run(cluster, "up", manifest("batch", replicas=1, port="", type_="job"))
    await wait_for(lambda: len(node.launches) >= 4)
    assert [round(t - t0, 6) for t, _ in node.launches[:4]] == [0, 1, 3, 7]


async def test_scale_up_and_down_then_down(cluster, nursery, autojump_clock):
    n1, n2 = await start_nodes(nursery, cluster, ("n1", "127.0.0.1"), ("n2", "127.0.0.2"))
    await run(cluster, "up", manifest(replicas=3))
    await wait_for(lambda: len(live(cluster)) == 3)
    result = await run(cluster, "scale", {"app": "web", "replicas": 5})
    assert len(result["replicas"]) == 5
    await wait_for(lambda: len([r for r in live(cluster) if r.state == "ready"]) == 5)
    await run(cluster, "scale", {"app": "web", "replicas": 1})
    await wait_for(lambda: len(cluster.replicas) == 1)
    assert len(n1.running) + len(n2.running) == 1
    result = await run(cluster, "down", {"app": "web"})
    assert result == {"app": "web", "stopped": 1}
    await wait_for(lambda: not cluster.replicas)
    assert not n1.running and not n2.running
    assert not cluster.ports.held
    with pytest.raises(CommandError) as err:
        await run(cluster, "scale", {"app": "web", "replicas": 2})
    assert err.value.code == "NOT_FOUND"


async def test_unhealthy_replica_is_replaced(cluster, nursery, autojump_clock):
    (node,) = await start_nodes(nursery, cluster, ("n1", "127.0.0.1"))
    await run(cluster, "up", manifest(replicas=1))
    await wait_for(lambda: len([r for r in live(cluster) if r.state == "ready"]) == 1)
    (victim,) = node.running.values()
    node._report(victim, "unhealthy")
    await wait_for(lambda: len(node.launches) == 2 and len(node.running) == 1)
    assert victim.replica not in node.running
    assert [rid for _, rid in node.stops] == [victim.replica]


async def test_port_clash_blocks_the_port_and_picks_another(cluster, nursery, autojump_clock):
    (node,) = await start_nodes(nursery, cluster, ("n1", "127.0.0.1"))
    original_launch = node._launch
    clashed = []

    async def clash_once(msg):
        if not clashed:
            clashed.append(msg["port"])
            node.launches.append((trio.current_time(), msg))
            cluster.replica_report(node.node_id, ReplicaReport(
                replica=msg["replica"], app=msg["app"], generation=msg["generation"],
                state="failed", pid=None, port=msg["port"], reason="port_in_use", ts=0.0,
                message=f"port {msg['port']} is already in use on 127.0.0.1"))
            return
        await original_launch(msg)

    node._launch = clash_once
    t0 = trio.current_time()
    await run(cluster, "up", manifest(replicas=1))
    await wait_for(lambda: len(live(cluster)) == 1 and len(node.launches) == 2)
    assert clashed == [20000]
    assert node.launches[1][1]["port"] == 20001
    assert node.launches[1][0] == t0  # a clash is not a crash: no backoff


async def test_reconnect_replaces_the_session_and_keeps_replicas(cluster, nursery,
                                                                 autojump_clock):
    (node,) = await start_nodes(nursery, cluster, ("n1", "127.0.0.1"))
    await run(cluster, "up", manifest(replicas=2))
    await wait_for(lambda: len(node.running) == 2)
    ids = sorted(cluster.replicas)
    hello = replace(node.hello(), replicas=tuple(
        ReplicaReport(replica=r.replica, app=r.app, generation=r.generation, state="ready",
                      pid=r.pid, port=r.port, ts=0.0) for r in node.running.values()))
    send, recv = trio.open_memory_channel(100)
    cluster.attach_node(hello, send)
    assert sorted(cluster.replicas) == ids
    assert all(r.state == "ready" for r in cluster.replicas.values())


async def test_another_key_cannot_take_a_live_node_id(cluster, nursery, autojump_clock):
    (node,) = await start_nodes(nursery, cluster, ("n1", "127.0.0.1"))
    hello = replace(node.hello(), key="cd" * 32)
    send, recv = trio.open_memory_channel(100)
    with pytest.raises(CommandError) as err:
        cluster.attach_node(hello, send)
    assert err.value.code == "UNAUTHORIZED"
    assert cluster.nodes["n1"].key == node.key


async def test_scale_down_and_down_drain_before_stopping(cluster, nursery, autojump_clock):
    (node,) = await start_nodes(nursery, cluster, ("n1", "127.0.0.1"))
    await run(cluster, "up", manifest(replicas=3, extra="  rollout\n    drain 2s\n"))
    await wait_for(lambda: len([r for r in live(cluster) if r.state == "ready"]) == 3)
    t0 = trio.current_time()
    await run(cluster, "scale", {"app": "web", "replicas": 1})
    draining = [r.replica_id for r in cluster.replicas.values() if r.state == "draining"]
    assert len(draining) == 2 and not node.stops
    await wait_for(lambda: len(node.stops) == 2)
    assert [round(t - t0, 6) for t, _ in node.stops] == [2.0, 2.0]
    assert sorted(rid for _, rid in node.stops) == sorted(draining)
    t1 = trio.current_time()
    assert (await run(cluster, "down", {"app": "web"}))["stopped"] == 1
    await wait_for(lambda: len(node.stops) == 3)
    assert node.stops[-1][0] - t1 == pytest.approx(2.0)
    await wait_for(lambda: not cluster.replicas)


async def test_a_crash_loop_is_one_slot_with_a_growing_restart_count(
        cluster, nursery, autojump_clock):
    (node,) = await start_nodes(nursery, cluster, ("n1", "127.0.0.1"), crash_after_s=0.0,
                                exit_code=3)
    # the sixth launch stays up
    node.launch_hook = lambda msg: {"crash_after_s": None} if len(node.launches) == 6 else {}
    t0 = trio.current_time()
    first = (await run(cluster, "up", manifest(replicas=1)))["replicas"][0]
    assert (first["slot"], first["restarts"], first["reason"]) == (first["replica"], 0, None)
    seen = []  # (restarts, next_restart) of each failed row, when it failed
    for i in range(5):
        await wait_for(lambda: any(r.state == "failed" and r.restarts == i  # noqa: B023
                                   for r in cluster.replicas.values()), timeout_s=100)
        (row,) = await run(cluster, "list", {"app": "web"})
        assert row["state"] == "failed" and row["slot"] == first["replica"]
        assert (row["exit_code"], row["signal"]) == (3, None)
        assert row["reason"] == "exited with code 3"
        seen.append((row["restarts"], row["next_restart"]))
    # the backoff, 1, 2, 4, 8, 16 s, is what next_restart said each time
    assert seen == [(0, 1.0), (1, 2.0), (2, 4.0), (3, 8.0), (4, 16.0)]
    assert [round(t - t0, 6) for t, _ in node.launches[:5]] == [0, 1, 3, 7, 15]
    # the one launched in the slot tells why the one before it ended
    await wait_for(lambda: any(r.state == "ready" for r in cluster.replicas.values()),
                   timeout_s=100)
    (row,) = await run(cluster, "list", {"app": "web"})
    assert row["replica"] != first["replica"] and row["slot"] == first["replica"]
    assert (row["restarts"], row["reason"], row["exit_code"]) == (5, "exited with code 3", 3)
    assert row["state"] == "ready" and row["next_restart"] is None
    placed = [e for e in cluster.events.recent if e.event == "replica.placed"]
    assert [e.data.get("restarts", 0) for e in placed] == [0, 1, 2, 3, 4, 5]


async def test_a_missing_exec_reads_as_cannot_start(cluster, nursery, autojump_clock):
    (node,) = await start_nodes(nursery, cluster, ("n1", "127.0.0.1"), ready_after_s=math.inf)
    await run(cluster, "up", manifest(replicas=1))
    await wait_for(lambda: any(r.state == "running" for r in cluster.replicas.values()))
    (r,) = cluster.replicas.values()
    node.running.pop(r.replica_id)
    cluster.replica_report("n1", ReplicaReport(
        replica=r.replica_id, app="web", generation=1, state="failed", pid=None, port=r.port,
        ts=0.0, reason="launch_error",
        message="[Errno 2] No such file or directory: '/bin/server'\x1b[2J" + "y" * 4000))
    (row,) = await run(cluster, "list", {"app": "web"})
    assert row["state"] == "failed" and row["exit_code"] is None
    assert row["reason"].startswith(
        "cannot start: [Errno 2] No such file or directory: '/bin/server' [2Jyyy")
    assert len(row["reason"]) == 200 and "\x1b" not in row["reason"]
    assert row["next_restart"] == 1.0


async def test_a_node_cannot_set_the_reason_of_another_nodes_replica(
        cluster, nursery, autojump_clock):
    await start_nodes(nursery, cluster, ("n1", "127.0.0.1"), ("n2", "127.0.0.2"))
    await run(cluster, "up", manifest(replicas=1))
    await wait_for(lambda: any(r.state == "ready" for r in cluster.replicas.values()))
    (r,) = cluster.replicas.values()
    other = "n2" if r.node_id == "n1" else "n1"
    cluster.replica_report(other, ReplicaReport(
        replica=r.replica_id, app="web", generation=1, state="exited", pid=None,
        port=r.port, ts=0.0, exit_code=1, message="forged"))
    (row,) = await run(cluster, "list", {"app": "web"})
    assert (row["state"], row["reason"], row["exit_code"], row["restarts"]) == (
        "ready", None, None, 0)


async def test_an_unhealthy_replicas_successor_takes_its_slot_and_says_why(
        cluster, nursery, autojump_clock):
    await start_nodes(nursery, cluster, ("n1", "127.0.0.1"))
    (first,) = (await run(cluster, "up", manifest(replicas=1)))["replicas"]
    await wait_for(lambda: any(r.state == "ready" for r in cluster.replicas.values()))
    r = cluster.replicas[first["replica"]]
    cluster.replica_report("n1", ReplicaReport(
        replica=r.replica_id, app="web", generation=1, state="unhealthy", pid=r.pid,
        port=r.port, ts=0.0, message="3 probes failed: GET /healthz -> 500\nwant 200"))
    await wait_for(lambda: first["replica"] not in cluster.replicas
                   and any(r.state == "ready" for r in cluster.replicas.values()))
    (row,) = await run(cluster, "list", {"app": "web"})
    assert row["replica"] != first["replica"] and row["slot"] == first["replica"]
    assert row["restarts"] == 1
    assert row["reason"] == "unhealthy: 3 probes failed: GET /healthz -> 500 want 200"
    assert (row["exit_code"], row["signal"], row["next_restart"]) == (None, None, None)


async def test_scaling_down_passes_no_slot_on(cluster, nursery, autojump_clock):
    await start_nodes(nursery, cluster, ("n1", "127.0.0.1"))
    await run(cluster, "up", manifest(replicas=2))
    await wait_for(lambda: len([r for r in live(cluster) if r.state == "ready"]) == 2)
    await run(cluster, "scale", {"app": "web", "replicas": 1})
    await wait_for(lambda: len(cluster.replicas) == 1)
    await run(cluster, "scale", {"app": "web", "replicas": 2})
    await wait_for(lambda: len([r for r in live(cluster) if r.state == "ready"]) == 2)
    rows = await run(cluster, "list", {"app": "web"})
    assert all(r["slot"] == r["replica"] and r["restarts"] == 0 and r["reason"] is None
               for r in rows)
