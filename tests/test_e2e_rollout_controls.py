"""`rollout promote | pause | resume APP` end to end (DESIGN.md §11): their answers and
refusals from a real conductor with two real node agents running the example service,
through the real CLI. (Their effect on a rollout's timing is proved on the mock clock in
tests/test_analysis_sim.py; traffic-judged rollouts under real load are the ingress
tests'.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import http_get
from tests.e2e import Cluster, poll, running_cluster
from tests.test_e2e_rollout import web

pytestmark = pytest.mark.e2e


@pytest.fixture
def cluster(tmp_path: Path):
    with running_cluster(tmp_path, nodes=("n1", "n2")) as c:
        yield c


def test_promote_pause_resume_answers_and_refusals(cluster: Cluster, tmp_path: Path):
    for sub in ("promote", "pause", "resume"):
        proc = cluster.cli("rollout", sub, "nope")
        assert proc.returncode == 1 and "error: NOT_FOUND: no app named 'nope'" in proc.stderr
    cluster.json("up", str(web(tmp_path, "v1")))
    cluster.wait_ready("web", 3, generation=1)
    for sub in ("promote", "pause", "resume"):
        proc = cluster.cli("rollout", sub, "web")
        assert proc.returncode == 1, proc.stderr
        assert f"error: CONFLICT: cannot {sub}: no rollout of web is running" in proc.stderr
        # signed: refused without a key before anything is sent
        proc = cluster.cli("rollout", sub, "web", signed=False)
        assert proc.returncode == 2 and "NO_KEY" in proc.stderr

    # A rollout whose first batch never gets ready: it stays under way meanwhile.
    slow = web(tmp_path, "v2", extra_args="--fail-health", rollout="ready-timeout 120s")
    started = cluster.json("rollout", str(slow))
    assert started["state"] == "rolling"
    assert started["paused"] is False and started["analysis"] is None
    assert {row["generation"] for row in started["traffic"]} == {1, 2}
    paused = cluster.json("rollout", "pause", "web")
    assert paused["paused"] is True and paused["state"] == "rolling"
    assert cluster.json("rollout", "status", "web")["paused"] is True
    _, _, body = http_get("127.0.0.1", cluster.http_port, "/api/state")  # the status page's
    shown = next(r for r in json.loads(body)["rollouts"] if r["app"] == "web")
    assert shown["paused"] is True and shown["analysis"] is None
    proc = cluster.cli("rollout", "pause", "web")
    assert proc.returncode == 1 and "CONFLICT: cannot pause: the rollout of web is " \
        "already paused" in proc.stderr
    human = cluster.cli_ok("rollout", "status", "web")
    assert "1 -> 2, 0/3 replaced · paused ·" in human
    # no analysis block: nothing to promote
    proc = cluster.cli("rollout", "promote", "web")
    assert proc.returncode == 1 and "CONFLICT: cannot promote: the rollout of web is not " \
        "judging a batch on its traffic now" in proc.stderr
    resumed = cluster.json("rollout", "resume", "web")
    assert resumed["paused"] is False
    proc = cluster.cli("rollout", "resume", "web")
    assert proc.returncode == 1 and "cannot resume: the rollout of web is not paused" \
        in proc.stderr
    assert cluster.json("rollout", "abort", "web")["state"] == "aborted"
    poll(lambda: cluster.json("rollout", "status", "web")["state"] == "aborted",
         what="the abort")
    proc = cluster.cli("rollout", "resume", "web")
    assert proc.returncode == 1 and "no rollout of web is running (the last one ended " \
        "aborted)" in proc.stderr
