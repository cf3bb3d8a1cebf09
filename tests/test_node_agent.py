"""The node agent against a scripted conductor (a small WebSocket server written here)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import sys
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from skr8tr.core.envelope import new_challenge, verify_challenge
from skr8tr.core.keys import parse_authorized_keys
from skr8tr.core.node_protocol import (
    NodeDecodeError,
    NodeMessage,
    decode_node_message,
    encode_node_message,
)
from skr8tr.keyfiles import write_keypair
from skr8tr.node.agent import (
    AgentConfig,
    AgentConfigError,
    default_node_id,
    main,
    node_url,
    prepare,
    run_agent,
)
from skr8tr.node.session import fit_lines
from skr8tr.ws import server as wsserver
from skr8tr.ws import trio_client
from tests.test_node_supervisor import alive, assert_gone, wait_until
from tests.ws_helpers import serve_websocket

TEST_DEADLINE_S = 30
STEP_S = 10


def wire(msg: NodeMessage | dict | NodeDecodeError) -> dict[str, Any]:
    """A decoded message as the JSON object it came as: what these tests check."""
    assert not isinstance(msg, NodeDecodeError), msg
    return msg if isinstance(msg, dict) else {"v": 1, "type": msg.TYPE, **msg.fields()}


class Peer:
    """One WebSocket connection from the agent, seen from the conductor's side."""

    def __init__(self, ws: trio_client.ClientConnection) -> None:
        self.ws = ws
        self.seen: list[dict[str, Any]] = []

    async def send(self, kind: str, **fields: Any) -> None:
        await self.ws.send_message(encode_node_message(kind, **fields))

    async def expect(self, kind: str, **match: Any) -> dict[str, Any]:
        """The next message of *kind* whose fields include *match*; others are kept in seen."""
        with trio.fail_after(STEP_S):
            while True:
                msg = wire(decode_node_message(await self.ws.get_message()))
                self.seen.append(msg)
                if msg["type"] == kind and all(msg.get(k) == v for k, v in match.items()):
                    return msg

    async def challenge(self) -> tuple[bytes, dict[str, Any]]:
        nonce = new_challenge()
        await self.send("challenge", nonce=nonce.hex())
        return nonce, await self.expect("hello")


class ScriptedConductor:
    """Accepts the agent's connections on /v1/node and hands each one to the test."""

    def __init__(self) -> None:
        self._send, self._recv = trio.open_memory_channel[Peer](10)

    async def handler(self, request: wsserver.Request) -> None:
        assert request.path == "/v1/node"
        ws = await request.accept()
        await self._send.send(Peer(ws))
        await trio.sleep_forever()  # the test drives the connection

    async def next_peer(self) -> Peer:
        with trio.fail_after(STEP_S):
            return await self._recv.receive()


async def start_conductor(nursery: trio.Nursery) -> tuple[ScriptedConductor, str]:
    """Serve a scripted conductor on a free port; return it and its URL."""
    conductor = ScriptedConductor()
    server = await nursery.start(
        partial(serve_websocket, conductor.handler, "127.0.0.1", 0, None))
    return conductor, f"ws://127.0.0.1:{server.port}"


@pytest.fixture
def key_path(tmp_path: Path) -> Path:
    write_keypair(tmp_path / "keys")
    return tmp_path / "keys" / "signing.sec"


def node_key_hex(key_path: Path) -> str:
    return (key_path.parent / "signing.pub").read_text().strip()


def sleep_launch(replica: str, **kw: Any) -> dict[str, Any]:
    fields = dict(replica=replica, app="demo", generation=1, app_type="process",
                  exec="/bin/sh",
                  args=["-c", "echo hello from $SKR8TR_REPLICA; exec sleep 60"], env={},
                  workdir=None, port=None, host="127.0.0.1", health=None, settle_ms=100,
                  stop_grace_ms=2000)
    fields.update(kw)
    return fields


async def test_session_handshake_reports_reconnect_and_refusal(
        tmp_path: Path, key_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="skr8tr.node")
    authorized = parse_authorized_keys(f"node {node_key_hex(key_path)} test node\n")
    data_dir = tmp_path / "data"
    pids: list[int] = []
    with trio.fail_after(TEST_DEADLINE_S):
        async with trio.open_nursery() as nursery:
            conductor, url = await start_conductor(nursery)
            config = AgentConfig(conductor_url=url, key_path=str(key_path), node_id="node-a",
                                 data_dir=str(data_dir), advertise=None, stop_workloads=True)
            await nursery.start(run_agent, config)

            # Session 1: challenge -> hello (signed) -> welcome -> heartbeats.
            peer = await conductor.next_peer()
            nonce, hello = await peer.challenge()
            assert verify_challenge(key=hello["key"], sig=hello["sig"], challenge=nonce,
                                    node_id=hello["node_id"], authorized=authorized)
            assert hello["node_id"] == "node-a"
            assert hello["address"] == "127.0.0.1"
            assert hello["replicas"] == []
            assert hello["cores"] >= 1 and hello["ram_total_mb"] >= hello["ram_free_mb"] > 0
            await peer.send("welcome", node_id="node-a", heartbeat_s=0.05)
            heartbeat = await peer.expect("heartbeat")
            assert set(heartbeat) == {"v", "type", "cpu_pct", "ram_free_mb", "ram_total_mb",
                                      "cores"}
            await peer.expect("heartbeat")

            # launch -> running, ready; logs -> logs_reply.
            await peer.send("launch", **sleep_launch("r1"))
            running = await peer.expect("replica", replica="r1", state="running")
            pids.append(running["pid"])
            await peer.expect("replica", replica="r1", state="ready")
            with trio.fail_after(STEP_S):
                while True:
                    await peer.send("logs", req="q1", app="demo", replica=None, tail=10)
                    reply = await peer.expect("logs_reply", req="q1")
                    if reply["lines"]:
                        break
                    await trio.sleep(0.05)
            assert [(x["replica"], x["stream"], x["text"]) for x in reply["lines"]] == [
                ("r1", "stdout", "hello from r1")]

            # Nonsense and a launch that cannot be read are answered, not fatal.
            await peer.ws.send_message("not json")
            await peer.ws.send_message(json.dumps({"v": 1, "type": "launch", "replica": "bad",
                                                   "app": "demo", "generation": 2}))
            failed = await peer.expect("replica", replica="bad", state="failed")
            assert "bad launch message" in failed["message"]

            # The conductor goes away; the agent reconnects and lists what still runs.
            await peer.ws.aclose()
            peer = await conductor.next_peer()
            nonce, hello = await peer.challenge()
            assert [(r["replica"], r["state"], r["pid"]) for r in hello["replicas"]] == [
                ("r1", "ready", running["pid"])]

            # Refused: logged at error level, retried with backoff.
            await peer.send("refused", code="UNAUTHORIZED", message="key not authorized")
            await peer.ws.aclose()
            peer = await conductor.next_peer()
            nonce, hello = await peer.challenge()
            assert [r["replica"] for r in hello["replicas"]] == ["r1"]
            assert any(r.levelno == logging.ERROR and "UNAUTHORIZED" in r.getMessage()
                       for r in caplog.records)

            # Welcome again; stop -> exited.
            await peer.send("welcome", node_id="node-a", heartbeat_s=5)
            await peer.send("stop", replica="r1")
            exited = await peer.expect("replica", replica="r1", state="exited")
            assert exited["signal"] == signal.SIGTERM
            # Records are removed in a worker thread, just after the report.
            await wait_until(lambda: not (data_dir / "replicas" / "r1.json").exists())
            await peer.send("stop", replica="r1")  # idempotent
            again = await peer.expect("replica", replica="r1")
            assert again == exited

            # Cancelling the agent (stop_workloads=True) stops what still runs.
            await peer.send("launch", **sleep_launch("r2"))
            pids.append((await peer.expect("replica", replica="r2", state="running"))["pid"])
            nursery.cancel_scope.cancel()
    await assert_gone(pids)


async def test_agent_keeps_retrying_an_unreachable_conductor(
        tmp_path: Path, key_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="skr8tr.node")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here
    config = AgentConfig(conductor_url=f"ws://127.0.0.1:{port}", key_path=str(key_path),
                         node_id="node-a", data_dir=str(tmp_path / "data"), advertise="10.1.2.3")
    with trio.fail_after(TEST_DEADLINE_S):
        async with trio.open_nursery() as nursery:
            await nursery.start(run_agent, config)
            await wait_until(lambda: sum("reconnecting" in r.getMessage()
                                         for r in caplog.records) >= 2)
            nursery.cancel_scope.cancel()
    assert any("cannot connect" in r.getMessage() for r in caplog.records)


async def test_advertised_address_is_sent(tmp_path: Path, key_path: Path) -> None:
    with trio.fail_after(TEST_DEADLINE_S):
        async with trio.open_nursery() as nursery:
            conductor, url = await start_conductor(nursery)
            config = AgentConfig(url + "/", str(key_path), "node-b", str(tmp_path / "d"),
                                 advertise="10.1.2.3")
            nursery.start_soon(run_agent, config)
            peer = await conductor.next_peer()
            _, hello = await peer.challenge()
            assert (hello["address"], hello["node_id"]) == ("10.1.2.3", "node-b")
            nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------- agent process


def agent_command(url: str, key_path: Path, data_dir: Path, stop_workloads: bool) -> list[str]:
    opts = dict(conductor=url, key=str(key_path), node_id="node-p", data_dir=str(data_dir),
                advertise=None, log_level="debug", stop_workloads=stop_workloads)
    code = ("import argparse, sys; from skr8tr.node.agent import main; "
            f"sys.exit(main(argparse.Namespace(**{opts!r})))")
    return [sys.executable, "-c", code]


@pytest.mark.parametrize("stop_workloads", [False, True])
async def test_sigterm_disconnects_and_exits_zero(tmp_path: Path, key_path: Path,
                                                  stop_workloads: bool) -> None:
    data_dir = tmp_path / "data"
    agent_log = tmp_path / "agent.log"
    workload_pid = None
    try:
        with trio.fail_after(TEST_DEADLINE_S), open(agent_log, "wb") as log_file:
            async with trio.open_nursery() as nursery:
                conductor, url = await start_conductor(nursery)
                agent = await trio.lowlevel.open_process(
                    agent_command(url, key_path, data_dir, stop_workloads),
                    stdout=log_file, stderr=log_file)
                try:
                    peer = await conductor.next_peer()
                    await peer.challenge()
                    await peer.send("welcome", node_id="node-p", heartbeat_s=5)
                    await peer.send("launch", **sleep_launch("r1", stop_grace_ms=500))
                    running = await peer.expect("replica", replica="r1", state="running")
                    workload_pid = running["pid"]

                    agent.send_signal(signal.SIGTERM)
                    with trio.fail_after(STEP_S):
                        # The agent closes the session itself (code 1001, going away).
                        with pytest.raises(trio_client.ConnectionClosed) as closed:
                            while True:
                                await peer.ws.get_message()
                        assert closed.value.code == 1001
                        assert await agent.wait() == 0
                finally:
                    if agent.returncode is None:
                        agent.kill()
                        await agent.wait()
                nursery.cancel_scope.cancel()
        record = data_dir / "replicas" / "r1.json"
        if stop_workloads:
            await assert_gone([workload_pid])
            assert not record.exists()
        else:
            assert alive(workload_pid)
            assert json.loads(record.read_text())["pid"] == workload_pid
    finally:
        if workload_pid is not None and alive(workload_pid):
            os.killpg(workload_pid, signal.SIGKILL)
            await assert_gone([workload_pid])
    text = agent_log.read_text()
    assert "SIGTERM received" in text


# --------------------------------------------------------------------------- start-up checks


def options(tmp_path: Path, key_path: Path, **kw: Any) -> argparse.Namespace:
    fields = dict(conductor="ws://127.0.0.1:7771", key=str(key_path), node_id="n1",
                  data_dir=str(tmp_path / "data"), advertise=None, log_level="info",
                  stop_workloads=False)
    fields.update(kw)
    return argparse.Namespace(**fields)


@pytest.mark.parametrize(("change", "code", "words"), [
    ({"conductor": "http://127.0.0.1:7771"}, "BAD_URL", "ws://"),
    ({"conductor": "ws://"}, "BAD_URL", "ws://"),
    ({"key": "/nonexistent/signing.sec"}, "BAD_KEY", "skr8tr keygen"),
    ({"node_id": "bad id!"}, "BAD_NODE_ID", "--node-id"),
    ({"data_dir": "/proc/nope/data"}, "BAD_DATA_DIR", "--data-dir"),
])
def test_main_refuses_to_start(tmp_path: Path, key_path: Path, capsys: pytest.CaptureFixture,
                               change: dict[str, str], code: str, words: str) -> None:
    assert main(options(tmp_path, key_path, **change)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith(f"error: {code}: ")
    assert words in err[0]


def test_prepare_creates_the_data_dir(tmp_path: Path, key_path: Path) -> None:
    data_dir = tmp_path / "a" / "b"
    config = AgentConfig("ws://h:1", str(key_path), "n1", str(data_dir), None)
    _, url = prepare(config)
    assert url == "ws://h:1/v1/node"
    assert (data_dir / "logs").is_dir() and (data_dir / "replicas").is_dir()
    (tmp_path / "file").write_text("")
    with pytest.raises(AgentConfigError) as err:
        prepare(AgentConfig("ws://h:1", str(key_path), "n1", str(tmp_path / "file"), None))
    assert err.value.code == "BAD_DATA_DIR"


@pytest.mark.parametrize(("given", "expected"), [
    ("ws://127.0.0.1:7771", "ws://127.0.0.1:7771/v1/node"),
    ("ws://127.0.0.1:7771/", "ws://127.0.0.1:7771/v1/node"),
    ("wss://conductor.example:443/v1/node", "wss://conductor.example:443/v1/node"),
])
def test_node_url(given: str, expected: str) -> None:
    assert node_url(given) == expected


def test_default_node_id_is_a_valid_id(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: "my host (büro).lan")
    assert default_node_id() == "myhostbro.lan"
    monkeypatch.setattr(socket, "gethostname", lambda: "...")
    assert default_node_id() == "node"


def test_logs_reply_is_trimmed_to_fit() -> None:
    lines = [{"replica": "r", "ts": float(i), "stream": "stdout", "text": "x" * 100}
             for i in range(100)]
    kept = fit_lines(lines, limit=1500)
    assert kept == lines[-len(kept):]
    assert 5 < len(kept) < 15


def test_release_free_heap_works_where_there_is_glibc() -> None:
    import platform

    from skr8tr.heap import release_free_heap

    assert release_free_heap() is (platform.libc_ver()[0] == "glibc")


def test_a_trim_is_due_once_connections_fall_far_from_their_peak() -> None:
    from skr8tr.heap import TrimAfterPeaks

    peaks = TrimAfterPeaks(min_drop=100)
    assert [peaks.due(n) for n in (0, 50, 400, 350, 301)] == [False] * 5
    assert peaks.due(300) is True  # 100 below the peak of 400
    assert peaks.due(250) is False  # the peak restarted at 300
    assert peaks.due(200) is True
