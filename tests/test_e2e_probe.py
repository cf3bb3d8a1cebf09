"""Issue #17.3 end to end: health probes explained, and a definite wrong answer fails early.

Real conductor, two real node agents, hello_http workloads, the real CLI.
"""

from __future__ import annotations

import time
from pathlib import Path

import psutil
import pytest

from tests.e2e import Cluster, poll, running_cluster
from tests.test_e2e_rollout import web as example_manifest

pytestmark = pytest.mark.e2e

READY_TIMEOUT_S = 90  # far longer than either test needs: a failure that waits for it shows


def web(tmp_path: Path, version: str, extra_args: str = "", replicas: int = 2) -> Path:
    return example_manifest(tmp_path, version, extra_args=extra_args, replicas=replicas,
                            health="interval 200ms; retries 3",
                            rollout=f"ready-timeout {READY_TIMEOUT_S}s")


@pytest.fixture
def cluster(tmp_path: Path):
    with running_cluster(tmp_path, nodes=("n1", "n2")) as c:
        yield c


def test_a_release_whose_healthz_answers_404_fails_at_once_and_rolls_back(
        cluster: Cluster, tmp_path: Path):
    cluster.json("up", str(web(tmp_path, "v1")))
    v1 = cluster.wait_ready("web", 2, generation=1)
    started = time.monotonic()
    proc = cluster.cli("rollout", str(web(tmp_path, "v2", "--health-status 404")), "--watch",
                       timeout_s=READY_TIMEOUT_S)
    took_s = time.monotonic() - started
    assert proc.returncode == 1, proc.stdout + proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("web: rolled_back generation 1 -> 2"), proc.stdout
    status = cluster.json("rollout", "status", "web")
    assert status["state"] == "rolled_back"
    # the probe's own words, and not the ready-timeout: it did not wait for it
    assert ("failed its health check 3 times in a row: GET /healthz -> 404, want 200"
            in status["message"]), status["message"]
    assert "ready-timeout" not in status["message"]
    assert took_s < READY_TIMEOUT_S / 2, f"the rollout took {took_s:.1f} s"
    rows = cluster.wait_ready("web", 2, generation=1)
    assert {r["pid"] for r in rows} == {r["pid"] for r in v1}, "v1 untouched"
    assert cluster.versions(rows) == {"v1"}
    failed = [e for e in cluster.json("status")["rollouts"] if e["app"] == "web"]
    assert failed[0]["state"] == "rolled_back"
    poll(lambda: not any(r["generation"] == 2 for r in cluster.replicas("web")),
         what="the v2 replicas to be gone")


def test_a_release_that_refuses_connections_a_while_says_so_and_completes(
        cluster: Cluster, tmp_path: Path):
    cluster.json("up", str(web(tmp_path, "v1", replicas=1)))
    cluster.wait_ready("web", 1, generation=1)
    # v2 binds its port 4 s after it starts: refused probes are no verdict
    status = cluster.json("rollout", str(web(tmp_path, "v2", "--listen-after 4", replicas=1)))
    assert status["state"] == "rolling"
    refused = "GET /healthz -> connection refused"

    def waiting_with_probe() -> dict | None:
        s = cluster.json("rollout", "status", "web")
        return s if f"(last probe: {refused}" in s["message"] else None

    s = poll(waiting_with_probe, timeout_s=30, what="rollout status to name the last probe")
    assert s["state"] == "rolling" and "to become ready" in s["message"]
    rows = [r for r in cluster.json("list", "web") if r["generation"] == 2]
    assert rows and rows[0]["probe"].startswith(refused), rows
    assert f"(last probe: {refused}" in cluster.cli_ok("rollout", "status", "web")
    poll(lambda: cluster.json("rollout", "status", "web")["state"] != "rolling",
         timeout_s=60, what="the rollout to end")
    final = cluster.json("rollout", "status", "web")
    assert final["state"] == "complete", final
    (row,) = cluster.wait_ready("web", 1, generation=2)
    assert row["probe"] == "GET /healthz -> 200"
    assert psutil.pid_exists(row["pid"])


def test_rollout_watch_lines_say_the_last_probe(cluster: Cluster, tmp_path: Path):
    cluster.json("up", str(web(tmp_path, "v1", replicas=1)))
    cluster.wait_ready("web", 1, generation=1)
    proc = cluster.cli("rollout", str(web(tmp_path, "v2", "--listen-after 3", replicas=1)),
                       "--watch", timeout_s=READY_TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert any("to become ready (last probe: GET /healthz -> connection refused" in line
               for line in lines), lines
    assert lines[-1].startswith("web: complete generation 1 -> 2, 1/1 replaced"), lines
    # a new line only when more than the time changed: the count grows every 2 s at most
    assert len(lines) < 15, lines
