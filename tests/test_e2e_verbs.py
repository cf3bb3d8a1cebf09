"""The operator's verbs end to end (issue #17, items 5 and 6): `restart`, `describe`,
`rollout history --generation`, `rollout undo --to` of an unfinished generation,
`rollout status/undo --watch` and `version`, against a real conductor, two real node
agents and the example HTTP service, through the real CLI."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from skr8tr import __version__
from tests.conftest import free_port, http_get, skr8tr_command
from tests.e2e import Cluster, poll, running_cluster
from tests.test_e2e_rollout import web

pytestmark = pytest.mark.e2e


@pytest.fixture
def cluster(tmp_path: Path):
    with running_cluster(tmp_path, nodes=("n1", "n2")) as c:
        yield c


def api_state(cluster: Cluster) -> dict:
    status, _, body = http_get("127.0.0.1", cluster.http_port, "/api/state")
    assert status == 200
    return json.loads(body)


def test_restart_replaces_every_replica_without_dropping_below_the_desired_count(
        cluster: Cluster, tmp_path: Path):
    # Each new replica answers its health check 0.5 s after it starts: the restart takes
    # a few seconds, during which the rows are sampled many times.
    manifest = web(tmp_path, "v1", extra_args="--ready-after 0.5", rollout="drain 200ms")
    cluster.json("up", str(manifest))
    before = cluster.wait_ready("web", 3, generation=1)
    cluster.seen_pids.update(r["pid"] for r in before)

    proc = subprocess.Popen(
        [*skr8tr_command(), "restart", "web", "--watch", "--conductor", cluster.url,
         "--key", str(cluster.admin_key)],
        env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        stdin=subprocess.DEVNULL)
    lowest, samples, saw_new = 3, 0, False
    try:
        deadline = time.monotonic() + 90
        while proc.poll() is None:
            assert time.monotonic() < deadline, "the restart did not end within 90 s"
            rows = [r for r in api_state(cluster)["replicas"] if r["app"] == "web"]
            cluster.seen_pids.update(r["pid"] for r in rows if r["pid"])
            lowest = min(lowest, sum(r["state"] == "ready" for r in rows))
            saw_new = saw_new or any(r["generation"] == 2 for r in rows)
            samples += 1
            time.sleep(0.05)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err + out
    assert samples >= 10 and saw_new, f"only {samples} samples taken during the restart"
    assert lowest >= 3, f"ready replicas fell to {lowest} during the restart"
    lines = out.strip().splitlines()
    assert lines[0].startswith("web: rolling generation 1 -> 2, 0/3 replaced")
    assert lines[-1].startswith("web: complete generation 1 -> 2, 3/3 replaced")

    after = cluster.wait_ready("web", 3, generation=2)
    assert not {r["pid"] for r in after} & {r["pid"] for r in before}, "every pid replaced"
    assert cluster.versions(after) == {"v1"}, "the same manifest"
    poll(lambda: not any(psutil.pid_exists(r["pid"]) for r in before),
         what="the old pids to exit")
    # A restart is a rollout attempt: a new generation with the same manifest.
    history = cluster.json("rollout", "history", "web")
    assert [(h["generation"], h["state"]) for h in history] == [(1, "complete"),
                                                                 (2, "complete")]
    assert history[0]["manifest_sha256"] == history[1]["manifest_sha256"]

    # Gated like a rollout: refused while one runs, unless --force.
    slow = web(tmp_path, "v2", extra_args="--fail-health", rollout="ready-timeout 120s")
    assert cluster.json("rollout", str(slow))["state"] == "rolling"
    proc = cluster.cli("restart", "web")
    assert proc.returncode == 1
    assert "error: CONFLICT: a rollout of web (2 -> 3) is running" in proc.stderr
    assert "--force" in proc.stderr
    forced = cluster.json("restart", "web", "--force")
    assert (forced["state"], forced["from_generation"], forced["to_generation"]) == (
        "rolling", 2, 4)
    poll(lambda: cluster.json("rollout", "status", "web")["state"] != "rolling",
         timeout_s=60, what="the forced restart to end")
    assert cluster.json("rollout", "status", "web")["state"] == "complete"
    rows = cluster.wait_ready("web", 3, generation=4)
    assert cluster.versions(rows) == {"v1"}
    assert [h["state"] for h in cluster.json("rollout", "history", "web")] == [
        "complete", "complete", "aborted", "complete"]

    # A restart keeps the count `scale` set (not the manifest's 3), and an unknown app
    # is NOT_FOUND.
    cluster.json("scale", "web", "2")
    cluster.wait_ready("web", 2, generation=4)
    assert cluster.json("restart", "web", "--watch")["state"] == "complete"
    cluster.wait_ready("web", 2, generation=5)
    proc = cluster.cli("restart", "nope")
    assert proc.returncode == 1 and "error: NOT_FOUND: no app named 'nope'" in proc.stderr
    # Signed: without a key it is refused before anything is sent.
    proc = cluster.cli("restart", "web", signed=False)
    assert proc.returncode == 2 and "NO_KEY" in proc.stderr


def test_describe_and_history_generation(cluster: Cluster, tmp_path: Path):
    v1 = web(tmp_path, "v1")
    v1.write_text("# the first version\n" + v1.read_text())
    cluster.json("up", str(v1))
    cluster.wait_ready("web", 3, generation=1)
    proc = cluster.cli("rollout", str(web(tmp_path, "v2")), "--watch", timeout_s=120)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    rows = cluster.wait_ready("web", 3, generation=2)

    doc = cluster.json("describe", "web")
    assert (doc["app"], doc["generation"], doc["desired"], doc["type"]) == ("web", 2, 3,
                                                                           "process")
    assert doc["manifest"] == web(tmp_path, "v2").read_text()
    assert doc["format"] == "skr8tr" and doc["base_dir"] == str(tmp_path)
    assert sorted(r["replica"] for r in doc["replicas"]) == sorted(r["replica"] for r in rows)
    assert {r["state"] for r in doc["replicas"]} == {"ready"}
    assert doc["counts"]["ready"] == 3
    assert doc["rollout"]["state"] == "complete" and doc["rollout"]["to_generation"] == 2
    assert [h["generation"] for h in doc["history"]] == [1, 2]
    names = [e["event"] for e in doc["events"]]
    assert 0 < len(names) <= 20
    assert "rollout.finished" in names
    assert all(e["data"]["app"] == "web" for e in doc["events"])
    assert [e["seq"] for e in doc["events"]] == sorted(e["seq"] for e in doc["events"])

    text = cluster.cli_ok("describe", "web")
    assert "Name:        web" in text and "Generation:  2" in text
    assert "web: complete generation 1 -> 2, 3/3 replaced" in text
    for r in rows:
        assert r["replica"] in text
    assert "rollout.finished" in text
    assert "\nManifest text:\n  app web\n" in text and "--version v2" in text

    proc = cluster.cli("describe", "nope")
    assert proc.returncode == 1 and "error: NOT_FOUND: no app named 'nope'" in proc.stderr
    proc = cluster.cli("describe", "web", signed=False)  # the manifest may hold secrets
    assert proc.returncode == 2 and "NO_KEY" in proc.stderr

    # An old generation's manifest, as submitted (its comment kept), with state and times.
    old = cluster.json("rollout", "history", "web", "--generation", "1")
    assert old["manifest"] == v1.read_text()
    assert (old["generation"], old["state"], old["current"]) == (1, "complete", False)
    history = cluster.json("rollout", "history", "web")
    assert old["manifest_sha256"] == history[0]["manifest_sha256"]
    assert old["started"] == history[0]["started"]
    assert old["finished"] == history[0]["finished"]
    text = cluster.cli_ok("rollout", "history", "web", "--generation", "1")
    assert "Generation:  1\n" in text and "State:       complete" in text
    assert text.endswith(v1.read_text())
    assert "# the first version\napp web\n" in text
    current = cluster.json("rollout", "history", "web", "--generation", "2")
    assert current["current"] is True and "--version v2" in current["manifest"]
    proc = cluster.cli("rollout", "history", "web", "--generation", "7")
    assert proc.returncode == 1
    assert "error: NOT_FOUND: web has no generation 7 (known: 1, 2)" in proc.stderr
    proc = cluster.cli("rollout", "history", "web", "--generation", str(10**30))
    assert proc.returncode == 1 and "BAD_REQUEST" in proc.stderr


def test_undo_guard_and_watching_any_rollout(cluster: Cluster, tmp_path: Path):
    cluster.json("up", str(web(tmp_path, "v1")))
    cluster.wait_ready("web", 3, generation=1)
    # A completed rollout followed after the fact: it ended complete, exit 0 at once.
    proc = cluster.cli("rollout", str(web(tmp_path, "v2")), "--watch", timeout_s=120)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    proc = cluster.cli("rollout", "status", "web", "--watch")
    assert proc.returncode == 0
    assert proc.stdout.startswith("web: complete generation 1 -> 2, 3/3 replaced")
    assert len(proc.stdout.strip().splitlines()) == 1

    # Generation 3 never becomes ready and is aborted; `status --watch` follows it from
    # another CLI to its end and exits 1, since it did not complete.
    status = cluster.json("rollout", str(web(tmp_path, "v3", extra_args="--fail-health",
                                              rollout="ready-timeout 120s")))
    assert status["to_generation"] == 3
    watcher = subprocess.Popen(
        [*skr8tr_command(), "rollout", "status", "web", "--watch", "--conductor",
         cluster.url], env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, stdin=subprocess.DEVNULL)
    try:
        poll(lambda: any(r["generation"] == 3 for r in cluster.replicas("web")),
             what="a v3 replica to start")
        assert watcher.poll() is None, "the watch ended while the rollout ran"
        assert cluster.json("rollout", "abort", "web")["state"] == "aborted"
        out, err = watcher.communicate(timeout=30)
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.communicate()
    assert watcher.returncode == 1, err + out
    lines = out.strip().splitlines()
    assert lines[0].startswith("web: rolling generation 2 -> 3")
    assert lines[-1].startswith("web: aborted generation 2 -> 3")
    cluster.wait_ready("web", 3, generation=2)

    # `undo --to` the aborted generation: refused, and nothing changes ...
    proc = cluster.cli("rollout", "undo", "web", "--to", "3")
    assert proc.returncode == 1
    assert ("error: CONFLICT: cannot undo web: generation 3's rollout ended aborted"
            in proc.stderr) and "--force" in proc.stderr
    assert [h["generation"] for h in cluster.json("rollout", "history", "web")] == [1, 2, 3]
    proc = cluster.cli("rollout", "undo", "web", "--to", "3", "--json")
    assert proc.returncode == 1 and json.loads(proc.stdout)["error"]["code"] == "CONFLICT"
    # ... unless forced: generation 3's manifest under generation 4 (which fails its
    # health check again; aborted here rather than waited for).
    forced = cluster.json("rollout", "undo", "web", "--to", "3", "--force")
    assert (forced["state"], forced["from_generation"], forced["to_generation"]) == (
        "rolling", 2, 4)
    poll(lambda: any(r["generation"] == 4 for r in cluster.replicas("web")),
         what="a generation 4 replica (v3's manifest) to start")
    assert cluster.json("rollout", "abort", "web")["state"] == "aborted"
    cluster.wait_ready("web", 3, generation=2)

    # Plain undo goes back to the newest complete generation before the current one,
    # followed with --watch: exit 0, the last line says complete.
    proc = cluster.cli("rollout", "undo", "web", "--watch", timeout_s=120)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("web: rolling generation 2 -> 5")
    assert lines[-1].startswith("web: complete generation 2 -> 5, 3/3 replaced")
    rows = cluster.wait_ready("web", 3, generation=5)
    assert cluster.versions(rows) == {"v1"}
    assert [h["state"] for h in cluster.json("rollout", "history", "web")] == [
        "complete", "complete", "aborted", "aborted", "complete"]
    # --json with --watch: one document, the final status.
    proc = cluster.cli("rollout", "status", "web", "--watch", "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["to_generation"] == 5

    # A rollout that crashes rolls back by itself; `undo --to` it is refused, and forced
    # and followed it rolls back again: --watch exits 1 with the final line.
    crash = web(tmp_path, "v6", extra_args="--ready-after 30 --crash-after 0.5")
    proc = cluster.cli("rollout", str(crash), "--watch", timeout_s=120)
    assert proc.returncode == 1 and "rolled_back generation 5 -> 6" in proc.stdout
    cluster.wait_ready("web", 3, generation=5)
    proc = cluster.cli("rollout", "undo", "web", "--to", "6")
    assert proc.returncode == 1
    assert "CONFLICT: cannot undo web: generation 6's rollout ended rolled_back" in proc.stderr
    proc = cluster.cli("rollout", "undo", "web", "--to", "6", "--force", "--watch",
                       timeout_s=120)
    assert proc.returncode == 1, proc.stderr + proc.stdout
    assert proc.stdout.strip().splitlines()[-1].startswith(
        "web: rolled_back generation 5 -> 7")
    rows = cluster.wait_ready("web", 3, generation=5)
    assert cluster.versions(rows) == {"v1"}


def test_version(cluster: Cluster):
    doc = cluster.json("version")
    assert doc == {"client": __version__, "conductor": __version__}
    text = cluster.cli_ok("version")
    assert text == f"client: {__version__}\nconductor: {__version__}\n"
    # Unreachable: the client's version is still printed, and the exit code says why.
    nowhere = f"ws://127.0.0.1:{free_port()}"
    proc = cluster.cli("version", url=nowhere, timeout_s=60)
    assert proc.returncode == 3
    assert proc.stdout == f"client: {__version__}\n"
    assert proc.stderr.startswith("error: UNREACHABLE: cannot reach the conductor at")
    proc = cluster.cli("version", "--json", url=nowhere, timeout_s=60)
    assert proc.returncode == 3
    doc = json.loads(proc.stdout)
    assert doc["client"] == __version__ and doc["conductor"] is None
    assert doc["error"]["code"] == "UNREACHABLE"
