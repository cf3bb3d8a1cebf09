"""Several conductors on a real etcd, end to end: failovers restart no workload.

Three conductors (``--store etcd://...``, ``--lease-ttl 2``), two node agents and
real workloads, driven by the real CLI given every conductor's URL. After each
fault: exactly one leader, the same pids, exact replica counts, no duplicates,
rollouts ended by policy, no acknowledged command lost, and (under load) no
failed request through the ingress.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import psutil
import pytest

from tests.e2e import poll
from tests.ha import HaCluster, running_ha_cluster
from tests.test_e2e_rollout import web
from tests.test_ingress_load import assert_steady, failures, start_load, wait_serving
from tests.test_ingress_load import web as load_web

pytestmark = pytest.mark.e2e


@pytest.fixture
def ha(tmp_path: Path):
    with running_ha_cluster(tmp_path) as cluster:
        yield cluster


def pids(rows: list[dict]) -> list[int]:
    return sorted(r["pid"] for r in rows)


def new_leader(ha: HaCluster, old: str) -> str:
    leader = poll(lambda: (name := ha.leader()) and name != old and name,
                  what="another conductor to lead")
    assert leader != old
    return leader


def exactly(ha: HaCluster, app: str, before: list[dict]) -> list[dict]:
    """The same replicas (ids and pids) as ``before``, all ready, on the new leader, and
    still exactly those once its adopt grace is over (nothing placed twice)."""
    count = len(before)
    after = poll(lambda: (rows := ha.replicas(app)) and len(rows) == count
                 and all(r["state"] == "ready" for r in rows) and rows,
                 what=f"{count} adopted replicas of {app}")
    assert pids(after) == pids(before), "a failover restarts no workload"
    assert sorted(r["replica"] for r in after) == sorted(r["replica"] for r in before)
    settle_until = time.monotonic() + 4  # 2 x the adopt grace of --node-timeout 5
    while time.monotonic() < settle_until:
        rows = ha.replicas(app)
        assert pids(rows) == pids(before), rows
        time.sleep(0.5)
    return after


def test_kill_9_of_the_idle_leader_restarts_nothing_and_loses_no_command(
        ha: HaCluster, tmp_path: Path):
    ha.json("up", str(web(tmp_path, "v1", replicas=3)))
    ha.wait_ready("web", 3)
    ha.json("scale", "web", "4")  # acknowledged just before the kill: must not be lost
    before = ha.wait_ready("web", 4)
    old = ha.leader()
    ha.kill(old)
    assert all(psutil.pid_exists(p) for p in pids(before))
    leader = new_leader(ha, old)
    ha.nodes_on()
    exactly(ha, "web", before)
    status = ha.json("status")
    assert status["leader"] == ha.conductors[leader].url
    roles = {c["url"]: c["role"] for c in status["conductors"]}
    assert roles[ha.conductors[leader].url] == "leader"
    assert ha.conductors[old].url not in roles or roles[ha.conductors[old].url] == "follower"
    # The new leader takes commands, and knows the generation history.
    ha.json("scale", "web", "2")
    after = ha.wait_ready("web", 2)
    assert set(pids(after)) <= set(pids(before))
    assert [h["generation"] for h in ha.json("rollout", "history", "web")] == [1]


def test_kill_9_of_the_leader_during_a_rollout_ends_it_by_policy(
        ha: HaCluster, tmp_path: Path):
    ha.json("up", str(web(tmp_path, "v1", replicas=3)))
    ha.wait_ready("web", 3)
    ha.json("rollout", str(web(tmp_path, "v2", replicas=3,
                               rollout="ready-timeout 20s; drain 2s")))
    poll(lambda: ha.json("rollout", "status", "web")["replaced"] >= 1,
         what="the rollout's first batch")
    alive_at_kill = ha.replicas("web")
    old = ha.leader()
    ha.kill(old)
    new_leader(ha, old)
    ha.nodes_on()
    status = poll(lambda: (s := ha.json("rollout", "status", "web"))["state"] != "rolling"
                  and s, timeout_s=60, what="the interrupted rollout to end")
    assert status["to_generation"] == 2
    assert status["state"] in ("rolled_back", "failed", "complete"), status
    gen = 2 if status["state"] == "complete" else 1
    rows = poll(lambda: (rows := ha.replicas("web")) and len(rows) == 3
                and all(r["state"] == "ready" and r["generation"] == gen for r in rows)
                and rows, timeout_s=60, what=f"3 ready replicas of generation {gen}")
    assert len(set(pids(rows))) == 3
    kept = {r["replica"]: r["pid"] for r in alive_at_kill if r["generation"] == gen}
    for r in rows:  # what ran at the kill and belongs to the outcome kept its pid
        if r["replica"] in kept:
            assert r["pid"] == kept[r["replica"]]
    history = {h["generation"]: h["state"] for h in ha.json("rollout", "history", "web")}
    assert history == {1: "complete", 2: status["state"]}


def test_kill_9_of_the_leader_under_load_drops_no_request(ha: HaCluster, tmp_path: Path):
    ha.json("up", str(load_web(tmp_path, "v1")))
    before = ha.wait_ready("web", 3)
    _daemon, url = ha.start_ingress("/:web")
    wait_serving(url, "v1")
    load = start_load(ha, url)
    old = ha.leader()
    ha.kill(old)
    new_leader(ha, old)
    ha.nodes_on()
    exactly(ha, "web", before)
    samples = load.stop()
    assert samples and failures(samples) == [], failures(samples)[:5]
    assert_steady(samples)


def test_a_stopped_leader_that_wakes_up_does_not_lead_again(ha: HaCluster, tmp_path: Path):
    ha.json("up", str(web(tmp_path, "v1", replicas=3)))
    before = ha.wait_ready("web", 3)
    old = ha.leader()
    old_url = ha.conductors[old].url
    ha.kill(old, signal.SIGSTOP)
    try:
        leader = poll(lambda: (answers := {n: ha.ping(n) for n in ha.conductors if n != old})
                      and all(a and a["leader"] != old_url and a["leader"] for a in
                              answers.values())
                      and [n for n, a in answers.items() if a["role"] == "leader"],
                      what="a new leader while the old one is stopped")[0]
        ha.nodes_on()
        exactly(ha, "web", before)
    finally:
        ha.kill(old, signal.SIGCONT)
    # Sent to the woken conductor alone, at once: it must not be acknowledged, whether
    # it has noticed yet or its fenced write is what fails.
    woken = ha.cli("scale", "web", "1", "--timeout", "5", url=old_url)
    assert woken.returncode == 1, woken.stdout + woken.stderr
    assert "NOT_LEADER" in woken.stderr or "UNAVAILABLE" in woken.stderr, woken.stderr
    poll(lambda: (a := ha.ping(old)) and a["role"] == "follower"
         and a["leader"] == ha.conductors[leader].url,
         what="the woken conductor to follow the new leader")
    assert ha.leader() == leader
    assert pids(ha.replicas("web")) == pids(before), "scale 1 was never applied"
    assert "no longer leading" in ha.conductors[old].daemon.log()


def test_etcd_stopped_and_restarted(ha: HaCluster, tmp_path: Path):
    ha.json("up", str(web(tmp_path, "v1", replicas=3)))
    before = ha.wait_ready("web", 3)
    assert ha.etcd is not None
    ha.etcd.stop()
    refused = poll(lambda: (p := ha.cli("scale", "web", "5", "--timeout", "3"))
                   .returncode == 1 and "UNAVAILABLE" in p.stderr and p,
                   what="mutating commands to be refused UNAVAILABLE")
    assert "UNAVAILABLE" in refused.stderr
    assert all(psutil.pid_exists(p) for p in pids(before)), "workloads keep running"
    ha.etcd.start()
    poll(ha.leader, what="a leader once etcd is back")
    ha.nodes_on()
    exactly(ha, "web", before)
    ha.json("scale", "web", "2")
    assert set(pids(ha.wait_ready("web", 2))) <= set(pids(before))


def test_a_leader_stopped_with_sigterm_resigns(tmp_path: Path):
    """SIGTERM: the leader revokes its lease on the way out (etcd still open then), so
    another leads at once instead of after the lease TTL (30 s here), and it exits 0."""
    with running_ha_cluster(tmp_path, "--lease-ttl", "30", nodes=0) as ha:
        old = ha.leader()
        daemon = ha.conductors[old].daemon
        began = time.monotonic()
        assert daemon.stop(signal.SIGTERM) == 0, daemon.log()[-3000:]
        new_leader(ha, old)
        assert time.monotonic() - began < 15, "the next leader waited for the lease TTL"
        assert "Traceback" not in daemon.log(), daemon.log()[-3000:]
