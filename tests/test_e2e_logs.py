"""Logs end to end: ``logs --follow`` as a stream, ``--tail 0``, the start error of a
replica that cannot start, and log files removed with their app.

Real conductor, two real node agents, real workloads, the real CLI as a subprocess.
The workload prints a numbered line every 20 ms; a follow must show every number
of every replica once, in order, with no gap, across a rollout (new replicas
join the stream from their first line) and a conductor restart (the CLI resumes
after the last line it printed).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import skr8tr_command
from tests.e2e import Cluster, poll, running_cluster

pytestmark = pytest.mark.e2e

COUNTER = f"""#!{sys.executable}
import signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
version = sys.argv[1]
i = 0
while True:
    i += 1
    print(f"{{version}} {{i}}", flush=True)
    time.sleep(0.02)
"""


@pytest.fixture
def cluster(tmp_path: Path):
    with running_cluster(tmp_path, nodes=("n1", "n2"), state=True) as c:
        yield c


def counter_manifest(tmp_path: Path, version: str, *, app: str = "count",
                     replicas: int = 2) -> Path:
    script = tmp_path / "counter.py"
    if not script.exists():
        script.write_text(COUNTER)
        script.chmod(0o755)
    path = tmp_path / f"{app}-{version}.skr8tr"
    path.write_text(f"app {app}\n  exec {script}\n  args {version}\n  replicas {replicas}\n"
                    "  rollout\n    settle 300ms\n    drain 0s\n")
    return path


class Follow:
    """``skr8tr logs APP --follow --json ...`` running as a subprocess."""

    def __init__(self, cluster: Cluster, tmp_path: Path, app: str, *args: str) -> None:
        self.out = tmp_path / f"follow-{time.monotonic_ns()}.jsonl"
        self.err = self.out.with_suffix(".err")
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.proc = subprocess.Popen(
                [*skr8tr_command(), "logs", app, "--follow", "--json", *args,
                 "--conductor", cluster.url, "--key", str(cluster.admin_key)],
                env=cluster.env, stdout=out, stderr=err, stdin=subprocess.DEVNULL)

    def docs(self) -> list[dict]:
        """The complete JSON lines printed so far."""
        text = self.out.read_text(errors="replace")
        return [json.loads(line) for line in text.split("\n")[:-1]]

    def numbers(self) -> dict[str, list[tuple[str, int]]]:
        """Per replica, the (version, number) of each line shown, in order."""
        seen: dict[str, list[tuple[str, int]]] = {}
        for doc in self.docs():
            assert "skipped" not in doc, f"lines were skipped: {doc}"
            version, number = doc["text"].split()
            seen.setdefault(doc["replica"], []).append((version, int(number)))
        return seen

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGINT)  # Ctrl-C
        try:
            return self.proc.wait(timeout=10)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")


def assert_consecutive(seen: dict[str, list[tuple[str, int]]]) -> None:
    for replica, lines in seen.items():
        numbers = [n for _, n in lines]
        assert numbers == list(range(numbers[0], numbers[0] + len(numbers))), (
            f"{replica}: a gap or a repeat in {numbers}")


def node_log_lines(cluster: Cluster, node: str, replica: str) -> list[str]:
    return cluster.replica_log(node, replica).splitlines()


def test_follow_streams_every_line_once_across_a_rollout(cluster: Cluster, tmp_path: Path):
    cluster.json("up", str(counter_manifest(tmp_path, "v1")))
    old = cluster.wait_ready("count", 2)
    follow = Follow(cluster, tmp_path, "count", "--tail", "0")
    try:
        poll(lambda: len(follow.numbers()) == 2 and all(
            len(lines) >= 20 for lines in follow.numbers().values()),
             what="lines of both replicas")
        cluster.json("rollout", str(counter_manifest(tmp_path, "v2")))
        poll(lambda: cluster.json("rollout", "status", "count")["state"] == "complete",
             what="the rollout to complete")
        new = cluster.wait_ready("count", 2, generation=2)
        poll(lambda: sum(r in follow.numbers() and len(follow.numbers()[r]) >= 20
                         for r in (x["replica"] for x in new)) == 2,
             what="lines of the new replicas")
    finally:
        assert follow.stop() in (0, 130), follow.stderr()
    seen = follow.numbers()
    assert_consecutive(seen)
    old_ids = {r["replica"] for r in old}
    new_ids = {r["replica"] for r in new}
    assert set(seen) == old_ids | new_ids
    for replica in new_ids:
        # It joined the stream from its very first line.
        assert seen[replica][0] == ("v2", 1)
    # What was printed is exactly what the replicas wrote, in the node's own files.
    where = {r["replica"]: r["node"] for r in [*old, *new]}
    for replica, lines in seen.items():
        written = node_log_lines(cluster, where[replica], replica)
        shown = [f"{v} {n}" for v, n in lines]
        start = written.index(shown[0])
        assert written[start:start + len(shown)] == shown
    # The old replicas were followed until they stopped: their last line was shown.
    for replica in old_ids:
        last = node_log_lines(cluster, where[replica], replica)[-1]
        assert "{} {}".format(*seen[replica][-1]) == last


def test_tail_then_follow_has_no_gap_or_repeat_at_the_seam(cluster: Cluster, tmp_path: Path):
    cluster.json("up", str(counter_manifest(tmp_path, "v1", replicas=1)))
    [row] = cluster.wait_ready("count", 1)
    poll(lambda: len(node_log_lines(cluster, row["node"], row["replica"])) >= 30,
         what="30 lines written")
    follow = Follow(cluster, tmp_path, "count", "--tail", "3")
    try:
        poll(lambda: len(follow.docs()) >= 40, what="40 lines followed")
    finally:
        follow.stop()
    lines = follow.numbers()[row["replica"]]
    assert lines[0][1] > 20  # the tail: the last 3 lines when the follow began
    assert_consecutive({row["replica"]: lines})


def test_tail_zero_without_follow_prints_nothing(cluster: Cluster, tmp_path: Path):
    cluster.json("up", str(counter_manifest(tmp_path, "v1", replicas=1)))
    cluster.wait_ready("count", 1)
    proc = cluster.cli("logs", "count", "--tail", "0")
    assert (proc.returncode, proc.stdout) == (0, "")
    assert cluster.json("logs", "count", "--tail", "0") == {"lines": []}
    assert len(cluster.json("logs", "count", "--tail", "5")["lines"]) == 5


def test_a_follow_resumes_after_a_conductor_restart(cluster: Cluster, tmp_path: Path):
    cluster.json("up", str(counter_manifest(tmp_path, "v1")))
    rows = cluster.wait_ready("count", 2)
    follow = Follow(cluster, tmp_path, "count", "--tail", "0")
    try:
        poll(lambda: len(follow.docs()) >= 40, what="lines followed")
        cluster.conductor.stop(signal.SIGKILL)
        before = len(follow.docs())
        cluster.start_conductor("--state", str(cluster.state_file))
        poll(lambda: "following the logs on" in follow.stderr() or follow.proc.poll() is not None,
             what="the follow to resume")
        assert follow.proc.poll() is None, follow.stderr()
        poll(lambda: len(follow.docs()) >= before + 100, what="lines after the restart")
    finally:
        follow.stop()
    assert "lost the log stream" in follow.stderr()
    seen = follow.numbers()
    assert set(seen) == {r["replica"] for r in rows}
    assert_consecutive(seen)  # the lines written while no conductor ran are there, once


def test_the_nodes_stop_pushing_when_the_follower_goes(cluster: Cluster, tmp_path: Path):
    cluster.json("up", str(counter_manifest(tmp_path, "v1")))
    cluster.wait_ready("count", 2)
    follow = Follow(cluster, tmp_path, "count", "--tail", "0")
    poll(lambda: all("log follow" in cluster.nodes[n].log() and "started (1 served)"
                     in cluster.nodes[n].log() for n in ("n1", "n2")),
         what="both nodes to serve the follow")
    poll(lambda: len(follow.docs()) >= 10, what="lines followed")
    follow.proc.kill()  # not even a close frame
    follow.proc.wait()
    poll(lambda: all("ended (0 still served)" in cluster.nodes[n].log()
                     for n in ("n1", "n2")), what="both nodes to drop the follow")


def test_logs_shows_why_a_replica_could_not_start(cluster: Cluster, tmp_path: Path):
    manifest = tmp_path / "broken.skr8tr"
    manifest.write_text("app broken\n  exec ./no-such-program\n  replicas 1\n")
    cluster.cli("up", str(manifest))  # the launch fails on the node, not here
    missing = tmp_path / "no-such-program"
    want = f"skr8tr: cannot start {missing}: [Errno 2] No such file or directory"

    def shown() -> str:
        return cluster.cli_ok("logs", "broken")

    out = poll(lambda: want in shown() and shown(), what="the start error in logs")
    assert "stderr" in out


def logs_of(cluster: Cluster, node: str, app: str) -> list[str]:
    folder = cluster.root / "nodes" / node / "logs"
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(f"{app}-"))


def test_down_removes_the_log_files_on_every_node(cluster: Cluster, tmp_path: Path):
    cluster.json("up", str(counter_manifest(tmp_path, "v1", replicas=2)))
    cluster.json("up", str(counter_manifest(tmp_path, "v1", app="keep", replicas=2)))
    rows = cluster.wait_ready("count", 2)
    cluster.wait_ready("keep", 2)
    assert {r["node"] for r in rows} == {"n1", "n2"}
    for node in ("n1", "n2"):
        assert logs_of(cluster, node, "count"), "each node has files of the app"
    cluster.json("down", "count")
    poll(lambda: not logs_of(cluster, "n1", "count") and not logs_of(cluster, "n2", "count"),
         what="the app's log files to go")
    for node in ("n1", "n2"):
        assert len(logs_of(cluster, node, "keep")) == 2, "another app's files stay"


def test_keep_logs_bounds_the_files_of_a_crash_loop(tmp_path: Path):
    # The 80 files of one crash-looping app: with --keep-logs 1 a node keeps the
    # files of one finished replica of the app (besides the one running or waiting).
    script = tmp_path / "crash.sh"
    script.write_text("#!/bin/sh\necho crashing\nexit 1\n")
    script.chmod(0o755)
    manifest = tmp_path / "crash.skr8tr"
    manifest.write_text(f"app crash\n  exec {script}\n  replicas 1\n")
    with running_cluster(tmp_path) as c:
        c.start_node("n1", "127.0.0.1", "--keep-logs", "1")
        c.json("up", str(manifest))
        poll(lambda: any(r["restarts"] >= 3 for r in c.json("list", "crash")),
             what="three restarts", timeout_s=60)
        ids = {name.split(".")[0] for name in logs_of(c, "n1", "crash")}
        assert 1 <= len(ids) <= 2, ids  # 4+ launches so far, one id each


def test_a_follow_goes_on_across_a_failover_of_the_leader(tmp_path: Path):
    from tests.ha import running_ha_cluster

    with running_ha_cluster(tmp_path) as ha:
        ha.json("up", str(counter_manifest(tmp_path, "v1")))
        rows = ha.wait_ready("count", 2)
        old = poll(ha.leader, what="a leader")
        follow = Follow(ha, tmp_path, "count", "--tail", "0")  # given all three conductors
        try:
            poll(lambda: len(follow.docs()) >= 40, what="lines followed")
            ha.kill(old)
            poll(lambda: "following the logs on" in follow.stderr()
                 or follow.proc.poll() is not None, what="the follow to resume")
            assert follow.proc.poll() is None, follow.stderr()
            before = len(follow.docs())
            poll(lambda: len(follow.docs()) >= before + 100, what="lines after the failover")
        finally:
            follow.stop()
        leader = poll(lambda: (name := ha.leader()) and name != old and name,
                      what="another leader")
        resumed_on = follow.stderr().rsplit("following the logs on ", 1)[1].split()[0]
        assert resumed_on == ha.conductors[leader].url
        seen = follow.numbers()
        assert set(seen) == {r["replica"] for r in rows}
        assert_consecutive(seen)
