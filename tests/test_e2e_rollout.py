"""Rollouts end to end: real conductor, two real node agents, hello_http, the real CLI."""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest

from tests.conftest import HELLO_HTTP, free_port, http_get
from tests.e2e import Cluster, poll, running_cluster

pytestmark = pytest.mark.e2e


@pytest.fixture
def cluster(tmp_path: Path):
    with running_cluster(tmp_path) as c:
        yield c


def web(tmp_path: Path, version: str, *, extra_args: str = "", replicas: int = 3,
        port: str = "auto", rollout: str = "ready-timeout 20s",
        health: str = "interval 200ms", analysis: str = "") -> Path:
    """A manifest of the example service at ``version`` (same app, new file each time);
    *rollout* and *health* are that block's lines after the check, *analysis* the lines
    of the rollout's analysis block (none when empty), each ``;``-separated."""
    path = tmp_path / f"web-{version}.skr8tr"
    lines = [
        "app web",
        f"  exec {HELLO_HTTP}",
        f"  args --host {{host}} --port {{port}} --version {version} {extra_args}".rstrip(),
        f"  port {port}",
        f"  replicas {replicas}",
        "  health",
        "    check GET /healthz 200",
        *[f"    {item.strip()}" for item in health.split(";")],
        "  rollout",
        *[f"    {item.strip()}" for item in rollout.split(";")],
    ]
    if analysis:
        lines += ["    analysis", *[f"      {item.strip()}" for item in analysis.split(";")]]
    path.write_text("\n".join(lines) + "\n")
    return path


def used_ports(cluster: Cluster) -> list[tuple[str, int]]:
    return sorted((n["address"], p) for n in cluster.json("nodes") for p in n["ports"])


def test_rollout_abort_and_auto_rollback(cluster: Cluster, tmp_path: Path):
    cluster.start_node("n1")
    cluster.start_node("n2")
    cluster.json("up", str(web(tmp_path, "v1")))
    v1 = cluster.wait_ready("web", 3, generation=1)
    assert cluster.versions(v1) == {"v1"}

    # v1 -> v2 with --watch: exit 0 only when complete; a live line, then a summary.
    # v2 answers its health check 1 s after it starts, so the watch (which polls every
    # 0.2 s) sees batches waiting for readiness however fast the machine is.
    proc = cluster.cli("rollout", str(web(tmp_path, "v2", extra_args="--ready-after 1")),
                       "--watch", timeout_s=120)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("web: rolling generation 1 -> 2, 0/3 replaced")
    assert any("to become ready" in line for line in lines)
    assert lines[-1].startswith("web: complete generation 1 -> 2, 3/3 replaced")
    v2 = cluster.wait_ready("web", 3, generation=2)
    assert cluster.versions(v2) == {"v2"}
    poll(lambda: not any(psutil.pid_exists(r["pid"]) for r in v1), what="v1 pids to exit")
    history = cluster.json("rollout", "history", "web")
    assert [(h["generation"], h["state"]) for h in history] == [(1, "complete"),
                                                                 (2, "complete")]
    assert history[0]["manifest_sha256"] != history[1]["manifest_sha256"]
    assert all(h["finished"] >= h["started"] for h in history)
    ports_v2 = used_ports(cluster)

    # v3 never becomes ready: abort it; v2 keeps serving, nothing leaks
    status = cluster.json("rollout", str(web(tmp_path, "v3", extra_args="--fail-health",
                                              rollout="ready-timeout 120s")))
    assert status["state"] == "rolling" and status["to_generation"] == 3
    poll(lambda: any(r["generation"] == 3 for r in cluster.replicas("web")),
         what="a v3 replica to start")
    aborted = cluster.json("rollout", "abort", "web")
    assert aborted["state"] == "aborted"
    rows = cluster.wait_ready("web", 3, generation=2)
    assert {r["pid"] for r in rows} == {r["pid"] for r in v2}, "v2 untouched"
    assert cluster.versions(rows) == {"v2"}
    assert used_ports(cluster) == ports_v2, "the aborted rollout released its ports"

    # v4 crashes on start: the rollout rolls back by itself; exit code 1
    proc = cluster.cli("rollout", str(web(tmp_path, "v4",
                                          extra_args="--ready-after 30 --crash-after 0.5")),
                       "--watch", timeout_s=120)
    assert proc.returncode == 1
    assert "web: rolled_back generation 2 -> 4" in proc.stdout.strip().splitlines()[-1]
    status = cluster.json("rollout", "status", "web")
    assert status["state"] == "rolled_back"
    # The exit code, said once (the node's "exited with code 3", not "exit code 3" again).
    assert status["message"].count("code 3") == 1 and "exited with code 3" in status["message"]
    # What the workload printed reaches only the signed `logs` verb: never the reason
    # that `rollout status`, /api/state and the watch stream show to anyone.
    assert "crashing on purpose" not in status["message"]
    assert "skr8tr logs web --replica" in status["message"]
    failed = status["message"].split("--replica ", 1)[1].split(")", 1)[0]
    _, _, api_state = http_get("127.0.0.1", cluster.http_port, "/api/state")
    _, _, api_events = http_get("127.0.0.1", cluster.http_port, "/api/events")
    assert "crashing on purpose" not in api_state + api_events
    assert "crashing on purpose" in cluster.cli_ok("logs", "web", "--replica", failed)
    rows = cluster.wait_ready("web", 3, generation=2)
    assert {r["pid"] for r in rows} == {r["pid"] for r in v2}
    assert used_ports(cluster) == ports_v2

    # undo goes back to v1's manifest under a new generation
    cluster.cli_ok("rollout", "undo", "web")
    poll(lambda: cluster.json("rollout", "status", "web")["state"] != "rolling",
         timeout_s=90, what="the undo to finish")
    assert cluster.json("rollout", "status", "web")["to_generation"] == 5
    rows = cluster.wait_ready("web", 3, generation=5)
    assert cluster.versions(rows) == {"v1"}
    states = [h["state"] for h in cluster.json("rollout", "history", "web")]
    assert states == ["complete", "complete", "aborted", "rolled_back", "complete"]


def test_fixed_port_rollouts(cluster: Cluster, tmp_path: Path):
    port = free_port()
    cluster.start_node("n1", "127.0.0.1")
    cluster.start_node("n2", "127.0.0.2")
    # one replica, two addresses: the new one starts on the other host, no collision
    cluster.json("up", str(web(tmp_path, "v1", replicas=1, port=str(port))))
    (old,) = cluster.wait_ready("web", 1)
    proc = cluster.cli("rollout", str(web(tmp_path, "v2", replicas=1, port=str(port))),
                       "--watch", timeout_s=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (new,) = cluster.wait_ready("web", 1, generation=2)
    assert new["node"] != old["node"] and new["port"] == port
    assert cluster.versions([new]) == {"v2"}

    # two replicas on two addresses: start-first cannot place a third; it says how to fix it
    cluster.json("scale", "web", "2")
    cluster.wait_ready("web", 2, generation=2)
    proc = cluster.cli("rollout", str(web(tmp_path, "v3", replicas=2, port=str(port))))
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: NO_CAPACITY: cannot start the rollout of web")
    assert "order stop-first" in proc.stderr
    # ... and stop-first does it
    proc = cluster.cli("rollout", str(web(tmp_path, "v3", replicas=2, port=str(port),
                                          rollout="order stop-first; ready-timeout 20s")),
                       "--watch", timeout_s=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = cluster.wait_ready("web", 2, generation=3)
    assert cluster.versions(rows) == {"v3"}
    assert sorted(cluster.addresses()[r["node"]] for r in rows) == ["127.0.0.1", "127.0.0.2"]
    assert [h["generation"] for h in cluster.json("rollout", "history", "web")] == [1, 2, 3]
