"""A stolen node key floods the real conductor with 1 MiB messages: the conductor
slows that session down to ``--max-node-bytes-per-s`` (it stops reading: TCP holds the
node back) instead of closing it, and keeps answering everyone else.

No wall-clock asserts: the counts say it (the pauses in /metrics, no session closed,
the node still connected, ``ping`` and ``status`` answered while the flood goes on).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import trio

from skr8tr.core.node_protocol import encode_node_message
from tests.conftest import http_get
from tests.e2e import running_cluster
from tests.node_impostor import impostor_node

pytestmark = pytest.mark.e2e

BUDGET = 1024 * 1024  # --max-node-bytes-per-s: 2 MiB at once, then 1 MiB/s


def big_push(n: int) -> str:
    """A valid logs_push of ~1 MiB (15 lines of 64 KiB) for a request nobody made."""
    lines = [
        {
            "replica": "web-abcdef",
            "ts": time.time(),
            "stream": "stdout",
            "text": "x" * 65_000,
            "seq": n * 100 + i + 1,
        }
        for i in range(15)
    ]
    return encode_node_message("logs_push", req=f"r{n}", skipped=0, lines=lines)


def metric(cluster, name: str) -> float:
    _, _, text = http_get("127.0.0.1", cluster.http_port, "/metrics")
    total = 0.0
    for row in text.decode().splitlines() if isinstance(text, bytes) else text.splitlines():
        if row.startswith(name):
            total += float(row.rsplit(" ", 1)[1])
    return total


async def test_a_flooding_node_is_slowed_not_closed(tmp_path: Path):
    with running_cluster(
        tmp_path, "--max-node-bytes-per-s", str(BUDGET), node_timeout_s=60.0
    ) as cluster:
        sent = 0
        with trio.fail_after(120):
            async with impostor_node(cluster.url, cluster.node_key, "flood") as ws:

                async def send_forever() -> None:
                    nonlocal sent
                    while True:
                        await ws.send_message(big_push(sent))
                        sent += 1

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(send_forever)
                    # The flood is well past the budget's burst and the conductor paused.
                    while metric(cluster, "skr8tr_node_reads_paused_total") < 3:
                        await trio.sleep(0.1)
                    # Everyone else is still served while it goes on.
                    for _ in range(3):
                        ping = await trio.to_thread.run_sync(lambda: cluster.cli("ping"))
                        assert ping.returncode == 0, ping.stderr
                        nodes = await trio.to_thread.run_sync(lambda: cluster.json("nodes"))
                        assert [n["node"] for n in nodes] == ["flood"]
                        assert metric(cluster, "skr8tr_nodes_live") == 1
                    # Not closed: no limit closed a connection.
                    assert metric(cluster, "skr8tr_connections_closed_total") == 0
                    nursery.cancel_scope.cancel()  # (breaks our write: the test's side)
        assert sent >= 3
        assert "flood" in cluster.conductor.log()
        assert "paused reading" in cluster.conductor.log()
