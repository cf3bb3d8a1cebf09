"""A node key cannot break status for everyone: every field a node sends is bounded.

Issue #13, item 6: twenty fake nodes whose hello carried a 1 MB address made
/api/state 20 MB, and `status` and `nodes` failed for every client (1009).
Here the conductor is a real OS process with a real node agent joined; fake
nodes join with the cluster's node key and send oversized fields, in the
hello and after it; the real CLI must still answer, /api/state must stay
small, and the conductor's log must not quote the values. The agent itself
refuses to start with an --advertise the conductor would refuse.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from skr8tr import keyfiles
from skr8tr.core import envelope
from skr8tr.core.node_protocol import (
    MAX_NODE_MESSAGE_BYTES,
    decode_node_message,
    encode_node_message,
)
from skr8tr.ws import trio_client
from tests.conftest import http_get, run_cli
from tests.e2e import Cluster, poll, running_cluster

pytestmark = pytest.mark.e2e

FAKE_NODES = 20
HUGE_CHARS = 1_000_000  # what the attack sent: the hello stays under the 1 MiB message limit
SMALL_STATE_BYTES = 64 * 1024  # /api/state with one node and no apps is far below this
LONGEST_LOG_LINE_CHARS = 2000  # no log line quotes a value of HUGE_CHARS
# The documented limits (SECURITY.md; skr8tr.core.node_protocol's MAX_* constants).
MAX_ADDRESS_CHARS = 253
MAX_VERSION_CHARS = 64
MAX_HELLO_REPLICAS = 10_000
MAX_REPORT_MESSAGE_CHARS = 4096
MAX_CORES = 65_536


@pytest.fixture
def cluster(tmp_path: Path):
    with running_cluster(tmp_path) as c:
        yield c


def raw(kind: str, **fields: Any) -> str:
    """A node message as JSON text, without the encoder's checks (an attacker has none)."""
    return json.dumps({"v": 1, "type": kind, **fields})


def minimal_reports(count: int) -> list[dict[str, Any]]:
    return [{"replica": f"r-{i}", "app": "a", "generation": 1, "state": "ready", "ts": 0}
            for i in range(count)]


async def join(nursery: trio.Nursery, url: str, signing_key, node_id: str,
               **over: Any) -> tuple[trio_client.ClientConnection, dict]:
    """Open /v1/node, answer the challenge with a valid signature and a hello whose
    fields are *over* where given; the conductor's answer."""
    ws = await trio_client.connect(url + "/v1/node")
    challenge = decode_node_message(await ws.get_message())
    sig = envelope.sign_challenge(signing_key, bytes.fromhex(challenge.nonce), node_id)
    hello = {"node_id": node_id, "key": signing_key.public, "sig": sig,
             "version": "fake", "address": "127.0.0.1", "cores": 2, "ram_total_mb": 2048,
             "ram_free_mb": 1024, "cpu_pct": 1.0, "replicas": [], **over}
    text = raw("hello", **hello)
    assert len(text.encode()) <= MAX_NODE_MESSAGE_BYTES  # refused for its content, not size
    await ws.send_message(text)
    return ws, decode_node_message(await ws.get_message())


def metrics(cluster: Cluster) -> dict[tuple[str, tuple], float]:
    status, _, body = http_get("127.0.0.1", cluster.http_port, "/metrics")
    assert status == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body) for s in family.samples}


def refused_bad_requests(cluster: Cluster) -> float:
    return metrics(cluster).get(("skr8tr_requests_refused_total", (("reason", "BAD_REQUEST"),)),
                                0.0)


def assert_status_works_and_stays_small(cluster: Cluster, nodes: set[str]) -> None:
    status = cluster.cli("status", "--json")
    assert status.returncode == 0, status.stderr
    assert {n["node"] for n in json.loads(status.stdout)["nodes"]} == nodes
    listed = cluster.json("nodes")
    assert {n["node"] for n in listed} == nodes
    assert all(n["address"] == "127.0.0.1" for n in listed)
    code, _, body = http_get("127.0.0.1", cluster.http_port, "/api/state")
    assert code == 200 and len(body.encode()) < SMALL_STATE_BYTES, len(body)
    longest = max(len(line) for line in cluster.conductor.log().splitlines())
    assert longest < LONGEST_LOG_LINE_CHARS, longest


async def test_oversized_hellos_are_refused_and_status_keeps_working(cluster: Cluster):
    await trio.to_thread.run_sync(cluster.start_node, "n1")
    signing_key = keyfiles.load_signing_key(str(cluster.node_key))
    # (node id, the oversized field, what the refusal names: the field and its limit)
    attacks: list[tuple[str, dict[str, Any], tuple[str, str]]] = [
        (f"fake-{i}", {"address": "a" * HUGE_CHARS}, ("'address'", str(MAX_ADDRESS_CHARS)))
        for i in range(FAKE_NODES)]
    attacks += [
        ("fake-version", {"version": "v" * HUGE_CHARS}, ("'version'", str(MAX_VERSION_CHARS))),
        ("fake-count", {"replicas": minimal_reports(MAX_HELLO_REPLICAS + 1)},
         ("'replicas'", str(MAX_HELLO_REPLICAS))),
        ("fake-message", {"replicas": [{**minimal_reports(1)[0], "message": "m" * HUGE_CHARS}]},
         ("replicas[0]: bad value for 'message'", str(MAX_REPORT_MESSAGE_CHARS))),
        ("fake-cores", {"cores": 10**300}, ("'cores'", str(MAX_CORES))),
    ]
    before = await trio.to_thread.run_sync(refused_bad_requests, cluster)
    async with trio.open_nursery() as nursery:
        for node_id, over, named in attacks:
            with trio.fail_after(30):
                ws, answer = await join(nursery, cluster.url, signing_key, node_id, **over)
            assert answer.TYPE == "refused" and answer.code == "BAD_REQUEST", answer
            assert all(part in answer.message for part in named), answer.message
            assert len(answer.message) < 400, answer.message
            await ws.aclose()
    after = await trio.to_thread.run_sync(refused_bad_requests, cluster)
    assert after - before == len(attacks)
    await trio.to_thread.run_sync(assert_status_works_and_stays_small, cluster, {"n1"})
    log = cluster.conductor.log()
    assert log.count("refused a node session from 127.0.0.1: hello: ") == len(attacks)


async def test_oversized_fields_after_the_hello_are_dropped_and_the_session_goes_on(
        cluster: Cluster):
    await trio.to_thread.run_sync(cluster.start_node, "n1")
    signing_key = keyfiles.load_signing_key(str(cluster.node_key))
    bad = [
        raw("heartbeat", cpu_pct=1e308, ram_free_mb=1, ram_total_mb=1, cores=1),
        raw("heartbeat", cpu_pct=1.0, ram_free_mb=2**62, ram_total_mb=2**62, cores=10**30),
        raw("replica", **{**minimal_reports(1)[0], "message": "m" * HUGE_CHARS}),
        raw("replica", **{**minimal_reports(1)[0], "app": "a" * HUGE_CHARS}),
        raw("replica", **{**minimal_reports(1)[0], "pid": 2**62}),
        raw("logs_reply", req="q1", lines=[{"replica": "r-1", "ts": 1.0, "stream": "stdout",
                                            "text": "t" * HUGE_CHARS}]),
        raw("heartbeat", cpu_pct=1.0, ram_free_mb=1, ram_total_mb=1, cores=1,
            **{"k" * HUGE_CHARS: 1}),
    ]
    async with trio.open_nursery() as nursery:
        with trio.fail_after(30):
            ws, answer = await join(nursery, cluster.url, signing_key, "fake-ok")
            assert answer.TYPE == "welcome", answer
            for text in bad:
                await ws.send_message(text)
            await ws.send_message(encode_node_message("heartbeat", cpu_pct=2.0, ram_free_mb=1,
                                                      ram_total_mb=1, cores=1))
        # The good heartbeat counts (so every bad message before it has been read);
        # the bad ones changed nothing.
        await trio.to_thread.run_sync(lambda: poll(
            lambda: {n["node"]: n["cpu_pct"] for n in cluster.json("nodes")}.get("fake-ok") == 2.0,
            what="fake-ok's good heartbeat"))
        await trio.to_thread.run_sync(assert_status_works_and_stays_small, cluster,
                                      {"n1", "fake-ok"})
        assert ws.closed is None, ws.closed  # the conductor kept the session
        await ws.aclose()
        nursery.cancel_scope.cancel()
    log = cluster.conductor.log()
    assert log.count("node fake-ok sent a message we cannot read") == len(bad)


@pytest.mark.parametrize("advertise", ["not a host", "a" * 300, "999.1.1.1", "[::1]"])
def test_the_agent_refuses_an_advertise_its_conductor_would_refuse(advertise, cli_env,
                                                                   tmp_path: Path):
    proc = run_cli("node", "--advertise", advertise, "--data-dir", str(tmp_path / "d"),
                   "--conductor", "ws://127.0.0.1:9", env=cli_env)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: BAD_ADVERTISE: --advertise "), proc.stderr
    assert "host name or an IP address" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and len(proc.stderr) < 400
    assert not os.path.exists(tmp_path / "d")  # refused before anything was created
