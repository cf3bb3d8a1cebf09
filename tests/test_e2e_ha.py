"""Several conductors on a real etcd, end to end: failovers restart no workload.

Three conductors (``--store etcd://...``, ``--lease-ttl 2``), two node agents and
real workloads, driven by the real CLI given every conductor's URL. After each
fault: exactly one leader, the same pids, exact replica counts, no duplicates,
rollouts ended by policy, no acknowledged command lost, and (under load) no
failed request through the ingress.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from skr8tr.blocking_client import call_on, open_conductor
from skr8tr.core.protocol import Reply, decode_reply
from skr8tr.keyfiles import load_signing_key
from skr8tr.wire import CallOptions, ClientError, build_request
from tests import netns
from tests.conftest import free_port, http_get
from tests.e2e import new_port_block, poll, private_env
from tests.etcd import Etcd
from tests.ha import Conductor, HaCluster, running_ha_cluster
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


def send_raw(url: str, text: str) -> Reply:
    """One request as it is (no signing, no following) to this conductor; its reply."""
    with open_conductor(url, "/v1/cli", 10.0) as conn:
        deadline = time.monotonic() + 10
        conn.send_text(text, deadline)
        reply = decode_reply(conn.receive_message(deadline))
    assert isinstance(reply, Reply), reply
    return reply


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
    old = ha.leader()
    # Acknowledged just before the kill: must not be lost; and the same signed envelope
    # sent again to the next leader must be REPLAY there (the nonce is in etcd).
    envelope = json.dumps(build_request("scale", {"app": "web", "replicas": 4},
                                        load_signing_key(ha.admin_key)))
    assert send_raw(ha.conductors[old].url, envelope).ok
    before = ha.wait_ready("web", 4)
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
    table = ha.cli_ok("status").split("NODES")[0]
    assert table.startswith("CONDUCTORS")
    assert table.splitlines()[2].split()[:2] == [ha.conductors[leader].url, "leader"]
    replayed = send_raw(ha.conductors[leader].url, envelope)
    assert (replayed.ok, replayed.error_code) == (False, "REPLAY"), replayed
    # The new leader takes commands, and knows the generation history.
    ha.json("scale", "web", "2")
    after = ha.wait_ready("web", 2)
    assert set(pids(after)) <= set(pids(before))
    assert [h["generation"] for h in ha.json("rollout", "history", "web")] == [1]


def test_kill_9_of_the_leader_during_a_rollout_ends_it_by_policy(
        ha: HaCluster, tmp_path: Path):
    # A replica drains for its own manifest's `drain`: v1's 3 s make each batch last.
    slow = "ready-timeout 20s; drain 3s"
    ha.json("up", str(web(tmp_path, "v1", replicas=3, rollout=slow)))
    ha.wait_ready("web", 3)
    ha.json("rollout", str(web(tmp_path, "v2", replicas=3, rollout=slow)))
    poll(lambda: ha.json("rollout", "status", "web")["replaced"] >= 1,
         what="the rollout's first batch")
    alive_at_kill = ha.replicas("web")
    assert ha.json("rollout", "status", "web")["state"] == "rolling", "killed mid-rollout"
    old = ha.leader()
    ha.kill(old)
    leader = new_leader(ha, old)
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
    # The new leader ended it, and its /metrics count it (its own term's events).
    _status, _headers, body = http_get("127.0.0.1", ha.conductors[leader].http_port,
                                       "/metrics")
    counted = {s.labels["state"]: s.value for family in text_string_to_metric_families(body)
               for s in family.samples if s.name == "skr8tr_rollouts_total"}
    assert counted[status["state"]] == 1, counted


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
    conn = open_conductor(old_url, "/v1/cli", 10.0)  # to it alone, opened while it leads
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
    # Sent to the woken conductor alone, at once, on a connection opened while it led
    # (no following, unlike the CLI): it must not be acknowledged, whether
    # it has noticed yet or its fenced write is what fails.
    with pytest.raises(ClientError) as refused:
        call_on(conn, CallOptions(old_url, 10.0, load_signing_key(ha.admin_key)),
                "scale", {"app": "web", "replicas": 1})
    conn.close()
    assert refused.value.code in ("NOT_LEADER", "UNAVAILABLE"), refused.value
    poll(lambda: (a := ha.ping(old)) and a["role"] == "follower"
         and a["leader"] == ha.conductors[leader].url,
         what="the woken conductor to follow the new leader")
    assert ha.leader() == leader
    assert pids(ha.replicas("web")) == pids(before), "scale 1 was never applied"
    assert "no longer leading" in ha.conductors[old].daemon.log()
    # Its page and /api/state show no stale copy of the cluster, and name the leader.
    _status, _headers, body = http_get("127.0.0.1", ha.conductors[old].http_port,
                                       "/api/state")
    state = json.loads(body)
    assert (state["apps"], state["nodes"], state["leader"]) == (
        [], [], ha.conductors[leader].url)


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


def test_a_leader_partitioned_from_etcd_and_nodes_steps_down_and_nothing_restarts(
        tmp_path: Path):
    """The leader runs in its own network namespace; its veth link is set down: a
    partition (packets lost, no reset), not a crash. The others elect a leader, the
    nodes leave the silent one for it with their workloads untouched, and the cut-off
    conductor steps down by itself; healed, it follows."""
    why = netns.available()
    if why is not None:
        pytest.fail(f"network namespaces are needed for the partition test (run as root, "
                    f"with CAP_NET_ADMIN): {why}")
    part = netns.Partitionable()
    ha = HaCluster(root=tmp_path, env=private_env(tmp_path), port_block=new_port_block())
    try:
        ha.etcd = Etcd(tmp_path / "etcd")
        ha.etcd.extra_listen = [f"http://{part.host_ip}:{ha.etcd.client_port}"]
        ha.etcd.start()
        ha.make_keys()
        ha.conductors["c1"] = Conductor("c1", free_port(), free_port(), host=part.ns_ip,
                                        netns=part, store_url=f"etcd://{part.host_ip}:"
                                        f"{ha.etcd.client_port}")
        ha.start_ha_conductor("c1")
        poll(lambda: ha.leader() == "c1", what="c1, in the namespace, to lead")
        for name in ("c2", "c3"):
            ha.conductors[name] = Conductor(name, free_port(), free_port())
            ha.start_ha_conductor(name)
        assert ha.leader() == "c1"
        ha.start_node("n1")
        ha.start_node("n2")
        ha.json("up", str(web(tmp_path, "v1", replicas=3)))
        before = ha.wait_ready("web", 3)

        part.cut()
        leader = poll(lambda: ha.leader(among=("c2", "c3")), what="c2 or c3 to lead")
        ha.nodes_on()
        exactly(ha, "web", before)
        c1 = ha.conductors["c1"].daemon
        poll(lambda: "no longer leading" in c1.log(), what="c1 to step down by itself")

        part.heal()
        poll(lambda: (a := ha.ping("c1")) and a["role"] == "follower"
             and a["leader"] == ha.conductors[leader].url,
             what="the healed conductor to follow the new leader")
        assert ha.leader() == leader
        assert pids(ha.replicas("web")) == pids(before)
    finally:
        try:
            ha.shutdown()
        finally:
            part.close()


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
