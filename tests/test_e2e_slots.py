"""End to end: a crash loop's slot and restart count survive a conductor restart (#17).

A real conductor with ``--state``, two real node agents, a real workload that crashes
(exit code 1), the real CLI. The conductor is killed with SIGKILL and started again:
the replica it re-adopts shows the same slot, the restarts counted before and why the
one before it ended, and the count goes on from there. A node key holder copying a
replica's record (its placement token and sealed slot) to another node id changes
nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio

from tests.e2e import Cluster, poll, running_cluster
from tests.ha import running_ha_cluster
from tests.node_impostor import impostor_node, report
from tests.test_e2e_restart import NODE_TIMEOUT_S, kill_conductor, restart_conductor

pytestmark = pytest.mark.e2e

QUICK_CRASHES = 2  # the first launches exit at once; the next ones run RUN_S, then exit 1
RUN_S = 15


@pytest.fixture
def cluster(tmp_path: Path):
    with running_cluster(tmp_path, node_timeout_s=NODE_TIMEOUT_S, state=True) as c:
        yield c


def crash_loop_manifest(tmp_path: Path) -> Path:
    """An app whose first QUICK_CRASHES launches exit 1 at once and every later one after
    RUN_S seconds (long enough to restart the conductor while one runs)."""
    count = tmp_path / "launches"
    script = tmp_path / "crash-later.sh"
    script.write_text(
        "#!/bin/sh\n"
        f"n=$(cat {count} 2>/dev/null || echo 0); n=$((n + 1)); echo $n > {count}\n"
        f"if [ $n -gt {QUICK_CRASHES} ]; then sleep {RUN_S}; fi\n"
        "exit 1\n")
    script.chmod(0o755)
    path = tmp_path / "crash.skr8tr"
    path.write_text(f"app crash\n  exec {script}\n  replicas 1\n")
    return path


def the_row(cluster: Cluster) -> dict | None:
    """The app's one row; None while there is none (a conductor that just started,
    before the nodes' hellos)."""
    rows = cluster.json("list", "crash")  # (an HaCluster asks every conductor's URL)
    assert len(rows) <= 1, rows  # one slot, never a pile of rows
    return rows[0] if rows else None


def record(cluster: Cluster, node: str, replica: str) -> dict:
    return json.loads((cluster.root / "nodes" / node / "replicas" / f"{replica}.json")
                      .read_text())


async def test_a_crash_loops_slot_and_restarts_survive_a_conductor_kill_9(
        cluster: Cluster, tmp_path: Path):
    cluster.start_node("n1")
    cluster.start_node("n2")
    (first,) = cluster.json("up", str(crash_loop_manifest(tmp_path)))["replicas"]
    slot = first["replica"]

    # The third launch in the slot runs (the first two exited): restarts 2.
    before = poll(lambda: (row := the_row(cluster)) and row["restarts"] >= QUICK_CRASHES
                  and row["state"] in ("running", "ready") and row,
                  timeout_s=60, what="the crash loop's third launch to run")
    assert before["slot"] == slot and before["replica"] != slot
    assert (before["reason"], before["exit_code"]) == ("exited with code 1", 1)
    assert record(cluster, before["node"], before["replica"])["launch"]["slot"]["restarts"] \
        == before["restarts"]

    kill_conductor(cluster)
    restart_conductor(cluster)

    # Re-adopted from its node's hello: the same process, the same slot and count.
    after = poll(lambda: (row := the_row(cluster)) and row["state"] in ("running", "ready") and row,
                 timeout_s=30, what="the replica to be re-adopted")
    assert (after["replica"], after["pid"], after["node"]) == (
        before["replica"], before["pid"], before["node"])
    assert (after["slot"], after["restarts"], after["reason"], after["exit_code"],
            after["signal"]) == (slot, before["restarts"], "exited with code 1", 1, None)
    text = cluster.cli_ok("list", "crash")
    assert text.splitlines()[1].split()[2] == slot  # the table's SLOT column

    # A node key holder copies the replica's record (its token and sealed slot) to
    # another node id, and claims that replica, and a made-up one in the same slot with
    # a higher count: refused, and the row keeps its slot and count.
    launch = record(cluster, after["node"], after["replica"])["launch"]
    forged = dict(launch["slot"], restarts=999)
    claims = [report(after["replica"], "crash", 1, pid=after["pid"], token=launch["token"],
                     slot=launch["slot"]),
              report("crash-ffffff", "crash", 1, pid=after["pid"], token=launch["token"],
                     slot=forged)]
    with trio.fail_after(60):
        async with impostor_node(cluster.url, cluster.node_key, "evil", replicas=claims):
            poll(lambda: "claims replica" in cluster.conductor.log()
                 and "reports replica crash-ffffff" in cluster.conductor.log(),
                 what="the conductor to refuse both claims")
            row = the_row(cluster)
            assert row is not None
            assert (row["replica"], row["node"], row["slot"], row["restarts"]) == (
                after["replica"], after["node"], slot, before["restarts"])

    # It crashes under the new conductor: the count goes on in the same slot.
    grown = poll(lambda: (row := the_row(cluster)) and row["restarts"] > before["restarts"] and row,
                 timeout_s=RUN_S + 30, what="the next restart in the slot")
    assert grown["slot"] == slot and grown["replica"] != before["replica"]
    assert grown["reason"] == "exited with code 1"
    assert "999" not in json.dumps(cluster.json("list", "crash"))


def test_a_new_leader_shows_the_slot_and_restarts_after_a_failover(tmp_path: Path):
    """Three conductors on a real etcd: the leader is killed -9 while the crash loop's
    third launch runs; the new leader re-adopts it with its slot and count (the seal's
    secret is in the shared store), and counts on from there."""
    with running_ha_cluster(tmp_path) as ha:
        (first,) = ha.json("up", str(crash_loop_manifest(tmp_path)))["replicas"]
        before = poll(lambda: (row := the_row(ha)) and row["restarts"] >= QUICK_CRASHES
                      and row["state"] in ("running", "ready") and row,
                      timeout_s=60, what="the crash loop's third launch to run")
        old = ha.leader()
        ha.kill(old)
        poll(lambda: (name := ha.leader()) and name != old, what="another conductor to lead")
        ha.nodes_on()
        after = poll(lambda: (row := the_row(ha)) and row["state"] in ("running", "ready") and row,
                     timeout_s=30, what="the replica to be re-adopted by the new leader")
        assert (after["replica"], after["pid"]) == (before["replica"], before["pid"])
        assert (after["slot"], after["restarts"], after["reason"]) == (
            first["replica"], before["restarts"], "exited with code 1")
        grown = poll(lambda: (row := the_row(ha)) and row["restarts"] > before["restarts"] and row,
                     timeout_s=RUN_S + 30, what="the next restart in the slot")
        assert grown["slot"] == first["replica"]
