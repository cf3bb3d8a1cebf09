"""Revision retention end to end (#17): a real conductor with --state and
--keep-revisions, two real node agents, real workloads, the real CLI."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from tests.e2e import running_cluster
from tests.test_e2e_rollout import web

pytestmark = pytest.mark.e2e

KEEP = 3
RESTARTS = 15
NODE_TIMEOUT_S = 3.0


def stored_web(state_file: Path) -> dict:
    return tomllib.loads(state_file.read_text())["apps"]["web"]


def test_restarts_prune_old_manifests_undo_works_and_the_counter_survives_a_restart(
        tmp_path: Path):
    state_file = tmp_path / "state" / "conductor.toml"
    flags = ("--state", str(state_file), "--keep-revisions", str(KEEP))
    with running_cluster(tmp_path, *flags, node_timeout_s=NODE_TIMEOUT_S) as cluster:
        cluster.start_node("n1")
        cluster.start_node("n2")
        cluster.json("up", str(web(tmp_path, "v1", replicas=2)))
        cluster.wait_ready("web", 2, generation=1)
        assert cluster.json("rollout", str(web(tmp_path, "v2", replicas=2)),
                            "--watch")["state"] == "complete"
        largest = 0
        for i in range(RESTARTS):  # generations 3..17, every one of v2
            final = cluster.json("restart", "web", "--watch")
            assert (final["state"], final["to_generation"]) == ("complete", i + 3), final
            # Never more than KEEP + 1 manifests in the state file, after any restart.
            largest = max(largest, len(stored_web(state_file)["revisions"]))
        assert largest == KEEP + 1
        stored = stored_web(state_file)
        # The current one, the last v1 (what a plain undo returns to), the newest others.
        assert [r["generation"] for r in stored["revisions"]] == [1, 15, 16, 17]
        assert stored["last_generation"] == 17

        history = cluster.json("rollout", "history", "web")
        assert [h["generation"] for h in history] == list(range(1, 18))
        assert [h["generation"] for h in history if not h["manifest_kept"]] == list(
            range(2, 15))
        assert all(h["manifest_sha256"] for h in history)  # pruned rows keep their hash
        table = cluster.cli_ok("rollout", "history", "web")
        assert table.count("(pruned)") == 13

        for args in (("rollout", "history", "web", "--generation", "5"),
                     ("rollout", "undo", "web", "--to", "5")):
            proc = cluster.cli(*args)
            assert proc.returncode == 1, proc.stderr
            assert "error: NOT_FOUND:" in proc.stderr and "was pruned" in proc.stderr
            assert f"{KEEP} others" in proc.stderr and "--keep-revisions" in proc.stderr
        kept = cluster.json("rollout", "history", "web", "--generation", "16")
        assert kept["generation"] == 16 and "--version v2" in kept["manifest"]

        # A plain undo returns to v1, kept for it although 15 restarts came after.
        undone = cluster.json("rollout", "undo", "web", "--watch")
        assert (undone["state"], undone["to_generation"]) == ("complete", 18)
        assert cluster.versions(cluster.wait_ready("web", 2, generation=18)) == {"v1"}
        assert len(stored_web(state_file)["revisions"]) <= KEEP + 1

        # The conductor restarted from the state file takes the next number, 19.
        assert cluster.conductor.stop() == 0
        cluster.start_conductor(*flags, node_timeout_s=NODE_TIMEOUT_S)
        cluster.wait_ready("web", 2, generation=18)
        final = cluster.json("restart", "web", "--watch")
        assert (final["state"], final["from_generation"], final["to_generation"]) == (
            "complete", 18, 19)
        assert cluster.versions(cluster.wait_ready("web", 2, generation=19)) == {"v1"}
        assert len(stored_web(state_file)["revisions"]) <= KEEP + 1
