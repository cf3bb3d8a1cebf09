"""Issue #13.2, .3, .10, .12 end to end: the conductor's rows stay true to the processes.

Real conductor, two real node agents, hello_http workloads, the real CLI; a
hostile node is played with a real node key (tests/node_impostor.py).
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import psutil
import pytest
import trio

from tests.e2e import Cluster, poll, running_cluster
from tests.node_impostor import impostor_node, report
from tests.test_e2e_rollout import web

pytestmark = pytest.mark.e2e

NODE_TIMEOUT_S = 2.0


def workloads(cluster: Cluster) -> set[int]:
    """Pids of every live process the node agents have started (their children)."""
    pids = set()
    for daemon in cluster.nodes.values():
        try:
            children = psutil.Process(daemon.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            continue
        pids.update(c.pid for c in children
                    if c.is_running() and c.status() != psutil.STATUS_ZOMBIE)
    return pids


async def test_a_node_key_cannot_take_over_another_nodes_replicas(tmp_path: Path):
    with running_cluster(tmp_path) as cluster:
        cluster.start_node("n1")
        cluster.start_node("n2")
        cluster.json("up", str(web(tmp_path, "v1", replicas=2)))
        before = cluster.wait_ready("web", 2)
        cluster.seen_pids.update(r["pid"] for r in before)
        claims = [report(r["replica"], "web", 1, state="ready", pid=r["pid"], port=r["port"])
                  for r in before]
        with trio.fail_after(60):
            async with impostor_node(cluster.url, cluster.node_key, "evil",
                                     replicas=claims) as ws:
                rows = [(r["replica"], r["node"], r["pid"], r["port"]) for r in before]
                # The hello's claims were judged when it joined.
                assert "evil" in {n["node"] for n in cluster.json("nodes")}
                after = cluster.replicas("web")
                assert [(r["replica"], r["node"], r["pid"], r["port"]) for r in after] == rows
                # Claimed again, one by one, after joining.
                for claim in claims:
                    await ws.send_message(json.dumps({"v": 1, "type": "replica", **claim}))
                poll(lambda: cluster.conductor.log().count("claims replica") >= 4,
                     what="the conductor to log the refused claims")
                after = cluster.replicas("web")
                assert [(r["replica"], r["node"], r["pid"], r["port"]) for r in after] == rows
                evil = [n for n in cluster.json("nodes") if n["node"] == "evil"]
                assert evil and evil[0]["replicas"] == 0 and evil[0]["ports"] == []
                # `down` still reaches the real processes on the rightful nodes.
                cluster.cli_ok("down", "web")
                poll(lambda: not any(psutil.pid_exists(r["pid"]) for r in before),
                     what="down to stop the real workloads")


def assert_only(cluster: Cluster, pids: set[int]) -> None:
    """The node agents run exactly *pids*, now and over a few heartbeats."""
    for _ in range(5):
        assert workloads(cluster) == pids
        time.sleep(0.5)


def test_a_conductor_paused_past_node_timeout_keeps_its_nodes_and_processes(tmp_path: Path):
    with running_cluster(tmp_path, node_timeout_s=NODE_TIMEOUT_S) as cluster:
        cluster.start_node("n1")
        cluster.start_node("n2")
        cluster.json("up", str(web(tmp_path, "v1", replicas=4)))
        before = cluster.wait_ready("web", 4)
        assert workloads(cluster) == {r["pid"] for r in before}
        cluster.conductor.proc.send_signal(signal.SIGSTOP)
        try:
            time.sleep(3 * NODE_TIMEOUT_S)  # the fault itself: silent past --node-timeout
        finally:
            cluster.conductor.proc.send_signal(signal.SIGCONT)
        # Its nodes were silent only because it was: none is lost, nothing is replaced.
        rows = poll(lambda: (rows := cluster.replicas("web")) and len(rows) == 4
                    and all(r["state"] == "ready" for r in rows) and rows,
                    what="the four replicas, ready")
        assert {(r["replica"], r["pid"]) for r in rows} == {
            (r["replica"], r["pid"]) for r in before}
        assert_only(cluster, {r["pid"] for r in before})
        assert "lost: no heartbeat" not in cluster.conductor.log()
        assert "the conductor did not run for" in cluster.conductor.log()


def test_a_node_silent_past_node_timeout_is_readopted_not_run_twice(tmp_path: Path):
    with running_cluster(tmp_path, node_timeout_s=NODE_TIMEOUT_S) as cluster:
        cluster.start_node("n1")
        cluster.json("up", str(web(tmp_path, "v1", replicas=3)))
        before = cluster.wait_ready("web", 3)
        agent = cluster.nodes["n1"].proc
        agent.send_signal(signal.SIGSTOP)  # a partition, as the conductor sees it
        try:
            poll(lambda: "node n1 lost" in cluster.conductor.log(),
                 what="the conductor to declare n1 lost")
            rows = cluster.replicas("web")
            assert {r["state"] for r in rows} == {"failed"}, rows
        finally:
            agent.send_signal(signal.SIGCONT)
        # n1 comes back with the same three processes: they are adopted again.
        rows = poll(lambda: (rows := cluster.replicas("web")) and len(rows) == 3
                    and all(r["state"] == "ready" for r in rows) and rows,
                    what="the three replicas to be adopted again")
        assert {(r["replica"], r["pid"]) for r in rows} == {
            (r["replica"], r["pid"]) for r in before}
        assert "re-adopted" in cluster.conductor.log()
        assert_only(cluster, {r["pid"] for r in before})


def test_an_aborted_rollout_never_puts_an_unready_replica_in_service(tmp_path: Path):
    with running_cluster(tmp_path) as cluster:
        cluster.start_node("n1")
        cluster.start_node("n2")
        # Generation 1 never passes its health check: its replicas stay `running`. Its
        # `drain` (the old generation's) holds a replaced one in `draining` for a minute.
        cluster.json("up", str(web(tmp_path, "v1", replicas=2, extra_args="--ready-after 600",
                                   rollout="drain 60s")))
        poll(lambda: (rows := cluster.replicas("web")) and len(rows) == 2
             and all(r["state"] == "running" and r["pid"] for r in rows),
             what="two running (never ready) replicas")
        cluster.json("rollout", str(web(tmp_path, "v2", replicas=2)))
        drained = poll(lambda: [r for r in cluster.replicas("web") if r["state"] == "draining"],
                       what="an old replica to be draining")
        assert drained[0]["generation"] == 1
        status = cluster.json("rollout", "abort", "web")
        assert status["state"] == "aborted"
        rows = poll(lambda: (rows := cluster.replicas("web")) and len(rows) == 2
                    and all(r["generation"] == 1 for r in rows) and rows,
                    what="generation 1 alone again")
        back = next(r for r in rows if r["replica"] == drained[0]["replica"])
        assert back["state"] == "running", "a replica that never passed its check came back"
        assert all(r["state"] != "ready" for r in rows)


def test_rollout_counts_survive_a_conductor_kill_9(tmp_path: Path):
    state_file = tmp_path / "state" / "conductor.toml"
    with running_cluster(tmp_path, "--state", str(state_file),
                         node_timeout_s=3.0) as cluster:
        cluster.start_node("n1")
        cluster.start_node("n2")
        cluster.json("up", str(web(tmp_path, "v1", replicas=4)))
        cluster.wait_ready("web", 4)
        cluster.json("rollout", str(web(tmp_path, "v2", replicas=4,
                                        extra_args="--ready-after 4")))
        seen = poll(lambda: (s := cluster.json("rollout", "status", "web"))["replaced"] >= 1
                    and s, timeout_s=60, what="the first batch to be replaced")
        cluster.conductor.proc.kill()
        cluster.conductor.proc.wait(timeout=10)
        cluster.start_conductor("--state", str(state_file), node_timeout_s=3.0)
        status = poll(lambda: (s := cluster.json("rollout", "status", "web"))["state"]
                      != "rolling" and s, timeout_s=90, what="the interrupted rollout to end")
        assert status["state"] == "rolled_back"
        replaced = int(status["message"].split(" after ", 1)[1].split("/", 1)[0])
        assert replaced >= seen["replaced"] >= 1, status["message"]
        assert status["replaced"] == replaced
        cluster.wait_ready("web", 4, generation=1, timeout_s=60)


async def test_after_a_restart_only_replicas_with_their_nodes_token_are_adopted(
        tmp_path: Path):
    state_file = tmp_path / "state" / "conductor.toml"
    with running_cluster(tmp_path, "--state", str(state_file),
                         node_timeout_s=3.0) as cluster:
        cluster.start_node("n1")
        cluster.json("up", str(web(tmp_path, "v1", replicas=2)))
        before = cluster.wait_ready("web", 2)
        cluster.conductor.proc.kill()
        cluster.conductor.proc.wait(timeout=10)
        cluster.start_conductor("--state", str(state_file), node_timeout_s=3.0)
        # A node key claims replicas of the real app that were never placed on it: one
        # made up, one of n1's with n1's pid and port, with and without a token.
        fake = report("web-f00d00", "web", 1, state="ready", pid=before[0]["pid"],
                      port=before[0]["port"])
        stolen = report(before[1]["replica"], "web", 1, state="ready", pid=before[1]["pid"],
                        port=before[1]["port"], token="0" * 32)
        with trio.fail_after(60):
            async with impostor_node(cluster.url, cluster.node_key, "evil",
                                     replicas=[fake, stolen]):
                poll(lambda: cluster.conductor.log().count("without a placement token") >= 1,
                     what="the claims to be refused")
                # n1's own reports carry its tokens: its two replicas are adopted, same pids.
                rows = cluster.wait_ready("web", 2, timeout_s=30)
                assert {(r["replica"], r["node"], r["pid"]) for r in rows} == {
                    (r["replica"], "n1", r["pid"]) for r in before}
                assert all(r["node"] != "evil" for r in cluster.replicas())
