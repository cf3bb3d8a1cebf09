"""End to end: why a replica failed, read through the real CLI (issue #17, item 2).

A real conductor, two real node agents, real workloads that exit at once or cannot
start; ``list``/``status`` (tables and ``--json``) must tell the exit code, the
reason and a growing restart count, under one slot.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.e2e import Cluster, poll, running_cluster

pytestmark = pytest.mark.e2e


@pytest.fixture
def cluster(tmp_path: Path):
    with running_cluster(tmp_path) as c:
        yield c


def crash_manifest(tmp_path: Path) -> Path:
    script = tmp_path / "crash.sh"
    script.write_text("#!/bin/sh\necho 'giving up on purpose' >&2\nexit 1\n")
    script.chmod(0o755)
    path = tmp_path / "crash.skr8tr"
    path.write_text(f"app crash\n  exec {script}\n  replicas 1\n")
    return path


def missing_manifest(tmp_path: Path) -> Path:
    path = tmp_path / "missing.skr8tr"
    path.write_text(f"app missing\n  exec {tmp_path / 'no-such-server'}\n  replicas 1\n")
    return path


def test_a_crash_loop_reads_as_one_slot_with_its_exit_code_and_restarts(
        cluster: Cluster, tmp_path: Path):
    cluster.start_node("n1")
    cluster.start_node("n2")
    up = cluster.json("up", str(crash_manifest(tmp_path)))
    (first,) = up["replicas"]
    assert first["slot"] == first["replica"] and first["restarts"] == 0

    seen: list[dict] = []  # every failed row observed, in order

    def failed_thrice() -> bool:
        rows = cluster.json("list", "crash")
        assert len(rows) == 1, rows  # one slot, never a pile of rows
        (row,) = rows
        if row["state"] == "failed":
            seen.append(row)
        return row["state"] == "failed" and row["restarts"] >= 3

    poll(failed_thrice, timeout_s=60, what="the third restart of crash")
    assert {row["slot"] for row in seen} == {first["replica"]}
    restarts = [row["restarts"] for row in seen]
    assert restarts == sorted(restarts) and restarts[-1] >= 3
    assert len({row["replica"] for row in seen}) >= 2  # a new launch each time, one slot
    last = seen[-1]
    assert (last["exit_code"], last["signal"]) == (1, None)
    assert last["reason"] == "exited with code 1"
    assert isinstance(last["next_restart"], int | float) and 0 <= last["next_restart"] <= 60
    # the workload's own output never reaches the row (it is one signed `logs` away)
    assert "giving up" not in json.dumps(seen)

    # the human table: RESTARTS and the reason, with when it restarts
    def table_says_why() -> str | None:
        text = cluster.cli_ok("list", "crash")
        return text if "failed" in text and "restarting" in text else None

    text = poll(table_says_why, timeout_s=60, what="a failed row in the table")
    header, row = text.splitlines()[:2]
    assert header.split() == ["APP", "REPLICA", "SLOT", "NODE", "PID", "PORT", "GEN", "STATE",
                              "RESTARTS", "REASON"]
    assert row.split()[2] == first["replica"]  # the slot of the first launch
    assert "exited with code 1; restarting in" in row
    assert int(row.split()[8]) >= 3

    status = cluster.json("status")
    (row,) = [r for r in status["replicas"] if r["app"] == "crash"]
    assert row["slot"] == first["replica"] and row["restarts"] >= 3
    assert "RESTARTS" in cluster.cli_ok("status")
    cluster.cli_ok("down", "crash")


def test_a_missing_exec_says_cannot_start_with_the_os_error(cluster: Cluster, tmp_path: Path):
    cluster.start_node("n1")
    cluster.start_node("n2")
    cluster.json("up", str(missing_manifest(tmp_path)))

    def failed_row() -> dict | None:
        rows = [r for r in cluster.json("list", "missing") if r["state"] == "failed"]
        return rows[0] if rows and rows[0]["restarts"] >= 1 else None

    row = poll(failed_row, timeout_s=60, what="a failed launch of missing, restarted")
    assert row["reason"].startswith("cannot start: [Errno 2] No such file or directory")
    assert "no-such-server" in row["reason"]
    assert row["exit_code"] is None and row["pid"] is None
    text = cluster.cli_ok("list", "missing")
    assert "cannot start: [Errno 2] No such file or directory" in text
    cluster.cli_ok("down", "missing")


def test_a_healthy_list_has_no_reason_column(cluster: Cluster, tmp_path: Path):
    cluster.start_node("n1")
    script = tmp_path / "sleeper.sh"
    script.write_text("#!/bin/sh\nexec sleep 600\n")
    script.chmod(0o755)
    manifest = tmp_path / "calm.skr8tr"
    manifest.write_text(f"app calm\n  exec {script}\n  replicas 2\n  rollout\n    settle 200ms\n")
    cluster.json("up", str(manifest))
    cluster.wait_ready("calm", 2)
    header = cluster.cli_ok("list", "calm").splitlines()[0]
    assert header.split()[-2:] == ["STATE", "RESTARTS"]
    rows = cluster.json("list", "calm")
    assert all((r["restarts"], r["reason"], r["next_restart"]) == (0, None, None) for r in rows)
    cluster.cli_ok("down", "calm")


SICKENS = """#!/usr/bin/env python3
import http.server, sys, time
port, healthy_s = int(sys.argv[1]), float(sys.argv[2])
born = time.monotonic()
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        code = 200 if time.monotonic() - born < healthy_s else 500
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()
    def log_message(self, *args):
        return  # quiet: no line per probe in the replica's log
http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
"""


def test_an_unhealthy_replica_hands_its_slot_on_with_the_probe_result(
        cluster: Cluster, tmp_path: Path):
    cluster.start_node("n1")
    script = tmp_path / "sickens.py"
    script.write_text(SICKENS)
    script.chmod(0o755)
    manifest = tmp_path / "sick.skr8tr"
    manifest.write_text(
        f"app sick\n  exec {script}\n  args {{port}} 2\n  port auto\n  replicas 1\n"
        "  health\n    check GET /healthz 200\n    interval 200ms\n    retries 2\n")
    (first,) = cluster.json("up", str(manifest))["replicas"]

    def handed_on() -> dict | None:
        rows = [r for r in cluster.json("list", "sick") if r["restarts"] >= 1]
        return rows[0] if rows else None

    row = poll(handed_on, timeout_s=60, what="the successor of the unhealthy replica")
    assert row["slot"] == first["replica"] and row["replica"] != first["replica"]
    assert row["reason"].startswith("unhealthy: health check failed 2 time(s) in a row "
                                    "(last: GET /healthz -> 500, want 200")
    assert row["exit_code"] is None
    text = cluster.cli_ok("list", "sick")
    assert "last: unhealthy: health check failed 2 time(s)" in text
    cluster.cli_ok("down", "sick")
