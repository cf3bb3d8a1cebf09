"""The human output of `describe` and `rollout history --generation` (skr8tr.output)."""

from __future__ import annotations

from skr8tr import output

ROW = {"app": "web", "replica": "web-1a2b", "node": "n1", "pid": 4242, "port": 20001,
       "generation": 2, "state": "ready"}
DOC = {
    "app": "web", "type": "process", "generation": 2, "desired": 3,
    "counts": {"app": "web", "running": 1, "ready": 1, "message": None},
    "manifest_sha256": "ab" * 32, "format": "skr8tr", "base_dir": "/srv/web",
    "manifest": "app web\n  exec ./hello\n",
    "replicas": [ROW], "rollout": None, "history": [],
    "events": [{"seq": 7, "ts": 0.0, "event": "replica.ready",
                "data": {"app": "web", "replica": "web-1a2b"}}],
}


def test_describe_reads_top_to_bottom():
    text = output.describe(DOC)
    lines = text.splitlines()
    assert lines[:4] == ["Name:        web", "Type:        process", "Generation:  2",
                         "Replicas:    3 desired, 1 running, 1 ready"]
    assert "Rollout:     none yet" in text
    assert "  REPLICA   NODE  PID   PORT   GEN  STATE" in text
    assert "#7 replica.ready replica=web-1a2b" in text and "app=web" not in text
    assert text.endswith("Manifest text:\n  app web\n    exec ./hello")


def test_describe_shows_extra_replica_fields_only_when_present():
    assert "REASON" not in output.describe(DOC)
    failed = dict(ROW, state="failed", reason="exec not found", exit_code=None, restarts=4,
                  slot="web-0000", next_restart=3.2, rss_mb=12)
    text = output.describe(dict(DOC, replicas=[ROW, failed]))
    header = next(line for line in text.splitlines() if "REPLICA" in line)
    # the columns of `list` (SLOT and REASON as there), then any other field
    assert header.split() == ["REPLICA", "SLOT", "NODE", "PID", "PORT", "GEN", "STATE",
                              "RESTARTS", "REASON", "RSS", "MB"]
    assert "exec not found; restarting in 3 s" in text


def test_revision_prints_facts_then_the_manifest_as_submitted():
    text = output.revision({"app": "web", "generation": 1, "state": "aborted",
                            "started": 0.0, "finished": None, "manifest_sha256": "cd" * 32,
                            "format": "toml", "base_dir": "/srv", "current": False,
                            "manifest": "# note\n[app]\nname = \"web\"\n"})
    assert "Generation:  1\n" in text and "State:       aborted" in text
    assert "Finished:    -" in text
    assert text.endswith("\n\n# note\n[app]\nname = \"web\"")


def test_history_marks_rows_whose_manifest_was_pruned():
    rows = [{"generation": g, "state": "complete", "started": 0.0, "finished": 1.0,
             "manifest_sha256": "ab" * 32, "manifest_kept": kept}
            for g, kept in ((1, True), (2, False), (3, True))]
    rows.append({"generation": 4, "state": "rolling", "started": 2.0, "finished": None,
                 "manifest_sha256": "cd" * 32})  # from a conductor before retention
    lines = output.history(rows).splitlines()
    assert ["(pruned)" in line for line in lines[1:]] == [False, True, False, False]
    assert "abababababab (pruned)" in lines[2]


def test_describe_counts_the_replicas_on_the_move_too():
    counts = {"app": "web", "running": 4, "ready": 3, "starting": 1, "draining": 1,
              "stopping": 0, "message": None}
    line = output.describe(dict(DOC, counts=counts)).splitlines()[3]
    assert line == "Replicas:    3 desired, 4 running, 3 ready, 1 starting, 1 draining"
