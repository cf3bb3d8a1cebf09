"""Issue #17, attacked: whose log lines an ended replica's id may carry.

The conductor remembers which node ran each replica it placed (the last 1,000 of
each app, ``tables.RanLog``), after the replica has ended: a node's lines of an
id the conductor does not have a row for are taken only from the node that ran
it, and an id it never placed is dropped. Real conductor, real node agents, real
workloads, the real CLI; the hostile node holds a real node key
(tests/node_impostor.py).

After a conductor restart the conductor knows nothing of replicas that ended
before it: their lines (files still on the node) are no longer shown; live
replicas are re-adopted from the nodes' hellos (with their placement tokens) and
their lines show as before.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
import trio

from skr8tr.core.node_protocol import encode_node_message
from tests.e2e import poll, running_cluster
from tests.node_impostor import impostor_node
from tests.test_e2e_logs import counter_manifest

pytestmark = pytest.mark.e2e


def job_manifest(tmp_path: Path) -> Path:
    path = tmp_path / "job.skr8tr"
    path.write_text("app job\n  exec /bin/echo\n  args job ran\n  restart never\n")
    return path


def texts(cluster, app: str, *args: str) -> dict[str, list[str]]:
    """Per replica, the texts `logs APP` shows."""
    shown: dict[str, list[str]] = {}
    for doc in cluster.json("logs", app, *args)["lines"]:
        shown.setdefault(doc["replica"], []).append(doc["text"])
    return shown


async def answer_with_invented_lines(ws, asked: list[dict]) -> None:
    while True:
        msg = json.loads(await ws.get_message())
        if msg["type"] != "logs":
            continue
        asked.append(msg)
        lines = [
            {
                "replica": rid,
                "ts": time.time(),
                "stream": "stdout",
                "text": f"invented {rid}",
                "seq": 1,
            }
            for rid in ("job-zzzzzz", "count-zzzzzz")
        ]
        await ws.send_message(encode_node_message("logs_reply", req=msg["req"], lines=lines))


async def test_an_ended_replicas_lines_come_only_from_its_node(tmp_path: Path):
    state = tmp_path / "state" / "conductor.toml"
    with running_cluster(tmp_path, "--state", str(state), node_timeout_s=30.0) as cluster:
        cluster.start_node("n1")
        cluster.start_node("n2")
        cluster.json("up", str(job_manifest(tmp_path)))
        cluster.json("up", str(counter_manifest(tmp_path, "v1", replicas=2)))
        live = cluster.wait_ready("count", 2)
        # The job ran and ended; its line still shows, from the node that ran it.
        shown = poll(lambda: texts(cluster, "job") or None, what="the job's line")
        (job_id,) = shown
        assert shown[job_id] == ["job ran"]
        poll(
            lambda: all(
                r["state"] not in ("pending", "running", "ready") for r in cluster.replicas("job")
            ),
            what="the job to end",
        )
        assert texts(cluster, "job") == {job_id: ["job ran"]}

        asked: list[dict] = []
        with trio.fail_after(90):
            async with (
                impostor_node(cluster.url, cluster.node_key, "evil") as ws,
                trio.open_nursery() as nursery,
            ):
                nursery.start_soon(answer_with_invented_lines, ws, asked)
                for app in ("job", "count"):
                    shown = await trio.to_thread.run_sync(lambda a=app: texts(cluster, a))
                    assert not [rid for rid in shown if rid.endswith("zzzzzz")], shown
                for rid in ("job-zzzzzz", "count-zzzzzz"):
                    app = rid.split("-")[0]
                    shown = await trio.to_thread.run_sync(
                        lambda a=app, r=rid: texts(cluster, a, "--replica", r)
                    )
                    assert shown == {}
                nursery.cancel_scope.cancel()
        assert {m["app"] for m in asked} == {"job", "count"}  # it was asked, and ignored

        # A restart: the job's replica ended before it, unknown to the new conductor.
        cluster.conductor.stop(signal.SIGKILL)
        cluster.start_conductor("--state", str(state), node_timeout_s=30.0)
        cluster.wait_ready("count", 2)
        shown = poll(
            lambda: (s := texts(cluster, "count")) and set(s) == {r["replica"] for r in live} and s,
            what="the re-adopted replicas' lines",
        )
        assert all(lines for lines in shown.values())
        assert job_id not in texts(cluster, "job")
        # Its file is still on the node that ran it: only the conductor forgot it.
        assert any("job ran" in cluster.replica_log(n, job_id) for n in ("n1", "n2"))
