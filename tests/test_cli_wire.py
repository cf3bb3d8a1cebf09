"""The real CLI against a scripted WebSocket peer that checks what arrives on the wire.

The peer verifies every signed request with the same code the conductor uses
(:func:`skr8tr.core.envelope.verify_request`) and answers with scripted
results, so these tests pin down the client half of the wire contract:
what is signed (every field but ``sig``, canonical JSON), what is sent, how
replies and errors are printed (``error: CODE: message``, and the error
document with ``--json``), and the exit codes.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import trio

from skr8tr import keyfiles
from skr8tr.core import envelope, keys, protocol, signatures
from skr8tr.ws import server as wsserver
from skr8tr.ws import trio_client
from tests.conftest import MANIFESTS, skr8tr_command
from tests.wire_helpers import decode_request
from tests.ws_helpers import serve_websocket

REPLICAS = [
    {
        "app": "web",
        "replica": "web-1a2b",
        "node": "n1",
        "pid": 4242,
        "port": 20001,
        "generation": 1,
        "state": "ready",
    },
    {
        "app": "web",
        "replica": "web-3c4d",
        "node": "n2",
        "pid": 4343,
        "port": 20002,
        "generation": 1,
        "state": "running",
    },
]


class ScriptedConductor:
    """Answers /v1/cli requests from a script: cmd -> list of (ok, payload) answers."""

    def __init__(self, authorized: keys.AuthorizedKeys) -> None:
        self.authorized = authorized
        self.guard = envelope.ReplayGuard()
        self.script: dict[str, list[tuple[bool, object]]] = {}
        self.received: list[dict] = []
        self.fingerprints: list[str | None] = []
        self.silent = False

    async def handle(self, request: wsserver.Request) -> None:
        ws = await request.accept()
        while True:
            try:
                raw = await ws.get_message()
            except trio_client.ConnectionClosed:
                return
            msg = json.loads(raw)
            self.received.append(msg)
            if self.silent:
                continue
            req = decode_request(raw)
            assert not isinstance(req, protocol.DecodeError), req
            fp = None
            if req.cmd in envelope.SIGNED_COMMANDS:
                try:
                    fp = envelope.verify_request(
                        msg, authorized=self.authorized, guard=self.guard, now=time.time()
                    )
                except envelope.AuthError as exc:
                    await ws.send_message(protocol.error_reply(req.id, exc.code, exc.message))
                    continue
            self.fingerprints.append(fp)
            answers = self.script[req.cmd]
            ok, payload = answers.pop(0) if len(answers) > 1 else answers[0]
            if ok:
                await ws.send_message(protocol.ok_reply(req.id, payload))
            else:
                code, message = payload
                await ws.send_message(protocol.error_reply(req.id, code, message))


@pytest.fixture
def admin_key(tmp_path: Path) -> tuple[Path, str]:
    pub = keyfiles.write_keypair(str(tmp_path / "keys"))
    return tmp_path / "keys" / "signing.sec", pub


@pytest.fixture
async def conductor(nursery, admin_key):
    _, pub = admin_key
    authorized = keys.parse_authorized_keys(f"admin {pub} test\n", filename="authorized_keys")
    peer = ScriptedConductor(authorized)
    server = await nursery.start(serve_websocket, peer.handle, "127.0.0.1", 0, None)
    peer.url = f"ws://127.0.0.1:{server.port}"
    return peer


async def cli(
    peer: ScriptedConductor, *argv: str, key: Path | None = None, home: Path | None = None
) -> trio.Process:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKR8TR_")}
    env["HOME"] = str(home or "/nonexistent-home")
    flags = ["--conductor", peer.url]
    if key is not None:
        flags += ["--key", str(key)]
    with trio.fail_after(30):
        return await trio.run_process(
            [*skr8tr_command(), *argv, *flags],
            env=env,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            stdin=b"",
        )


async def test_up_sends_signed_manifest_and_prints_placements(conductor, admin_key):
    sec, pub = admin_key
    conductor.script["up"] = [(True, {"app": "web", "generation": 1, "replicas": REPLICAS})]
    proc = await cli(conductor, "up", str(MANIFESTS / "web.skr8tr"), key=sec)
    assert proc.returncode == 0, proc.stderr
    sent = conductor.received[-1]
    assert sent["cmd"] == "up"
    assert sent["key"] == pub
    assert sent["args"] == {
        "manifest": (MANIFESTS / "web.skr8tr").read_text(),
        "format": "skr8tr",
        "base_dir": str(MANIFESTS),
    }
    assert conductor.fingerprints[-1] == signatures.fingerprint(pub)
    out = proc.stdout.decode()
    assert "web: generation 1, 2 replicas" in out
    assert "web-1a2b" in out and "4343" in out


async def test_json_prints_exactly_the_result(conductor, admin_key):
    sec, _ = admin_key
    conductor.script["list"] = [(True, REPLICAS)]
    proc = await cli(conductor, "list", "--json", key=sec)
    assert proc.returncode == 0
    assert json.loads(proc.stdout) == REPLICAS


async def test_read_only_verb_without_key_is_sent_unsigned(conductor):
    conductor.script["nodes"] = [(True, [])]
    proc = await cli(conductor, "nodes")
    assert proc.returncode == 0, proc.stderr
    sent = conductor.received[-1]
    assert "sig" not in sent and "key" not in sent
    assert proc.stdout.decode().strip() == "no nodes connected"


async def test_conductor_error_exits_1_with_one_line(conductor, admin_key):
    sec, _ = admin_key
    conductor.script["up"] = [
        (False, ("CONFLICT", "app web exists with another manifest; use rollout"))
    ]
    proc = await cli(conductor, "up", str(MANIFESTS / "web.skr8tr"), "--json", key=sec)
    assert proc.returncode == 1
    assert proc.stderr.decode() == (
        "error: CONFLICT: app web exists with another manifest; use rollout\n"
    )
    assert json.loads(proc.stdout) == {
        "error": {
            "code": "CONFLICT",
            "message": "app web exists with another manifest; use rollout",
        }
    }


async def test_key_not_authorized_is_refused_by_the_peer(conductor, tmp_path):
    keyfiles.write_keypair(str(tmp_path / "other"))
    proc = await cli(conductor, "down", "web", key=tmp_path / "other" / "signing.sec")
    assert proc.returncode == 1
    assert proc.stderr.decode().startswith("error: UNAUTHORIZED: ")


def _status(state: str, replaced: int, message: str = "") -> dict:
    return {
        "app": "web",
        "state": state,
        "from_generation": 1,
        "to_generation": 2,
        "replaced": replaced,
        "total": 3,
        "message": message,
    }


@pytest.mark.parametrize("final, code", [("complete", 0), ("rolled_back", 1), ("aborted", 1)])
async def test_rollout_watch_follows_until_the_end(conductor, admin_key, final, code):
    sec, _ = admin_key
    conductor.script["rollout"] = [(True, _status("rolling", 0))]
    conductor.script["rollout-status"] = [
        (True, _status("rolling", 1, "waiting for web-7f3 to become ready")),
        (True, _status("rolling", 2)),
        (True, _status(final, 3 if final == "complete" else 2, "done")),
    ]
    proc = await cli(conductor, "rollout", str(MANIFESTS / "web.skr8tr"), "--watch", key=sec)
    assert proc.returncode == code, proc.stderr
    lines = proc.stdout.decode().splitlines()
    assert lines[0] == "web: rolling generation 1 -> 2, 0/3 replaced"
    assert "waiting for web-7f3 to become ready" in lines[1]
    assert lines[-1].startswith(f"web: {final} generation 1 -> 2")
    assert [m["cmd"] for m in conductor.received].count("rollout-status") == 3
    assert conductor.received[0]["args"]["force"] is False


async def test_rollout_without_watch_returns_at_once(conductor, admin_key):
    sec, _ = admin_key
    conductor.script["rollout"] = [(True, _status("rolling", 0))]
    proc = await cli(
        conductor, "rollout", str(MANIFESTS / "web.skr8tr"), "--force", "--json", key=sec
    )
    assert proc.returncode == 0
    assert json.loads(proc.stdout) == _status("rolling", 0)
    assert [m["cmd"] for m in conductor.received] == ["rollout"]
    assert conductor.received[0]["args"]["force"] is True


@pytest.mark.parametrize(
    "argv, cmd, args",
    [
        (["rollout", "status", "web"], "rollout-status", {"app": "web"}),
        (["rollout", "abort", "web"], "rollout-abort", {"app": "web"}),
        (["rollout", "promote", "web"], "rollout-promote", {"app": "web"}),
        (["rollout", "pause", "web"], "rollout-pause", {"app": "web"}),
        (["rollout", "resume", "web"], "rollout-resume", {"app": "web"}),
        (["rollout", "undo", "web"], "rollout-undo", {"app": "web", "to": None}),
        (["rollout", "undo", "web", "--to", "3"], "rollout-undo", {"app": "web", "to": 3}),
        (["scale", "web", "5"], "scale", {"app": "web", "replicas": 5}),
        (["down", "web"], "down", {"app": "web"}),
        (["list", "web"], "list", {"app": "web"}),
        (["list"], "list", {"app": None}),
        (
            ["logs", "web", "--tail", "7", "--replica", "web-1a2b"],
            "logs",
            {"app": "web", "replica": "web-1a2b", "tail": 7},
        ),
    ],
)
async def test_verbs_send_the_documented_args(conductor, admin_key, argv, cmd, args):
    sec, _ = admin_key
    results = {
        "rollout-status": _status("rolling", 1),
        "rollout-abort": _status("aborted", 1),
        "rollout-promote": _status("rolling", 1),
        "rollout-pause": dict(_status("rolling", 1), paused=True),
        "rollout-resume": dict(_status("rolling", 1), paused=False),
        "rollout-undo": _status("rolling", 0),
        "scale": {"app": "web", "generation": 1, "replicas": REPLICAS},
        "down": {"app": "web", "stopped": 2},
        "list": REPLICAS,
        "logs": {
            "lines": [{"replica": "web-1a2b", "ts": 1.0, "stream": "stdout", "text": "hello"}]
        },
    }
    conductor.script[cmd] = [(True, results[cmd])]
    proc = await cli(conductor, *argv, "--json", key=sec)
    assert proc.returncode == 0, proc.stderr
    assert conductor.received[-1]["cmd"] == cmd
    assert conductor.received[-1]["args"] == args
    assert json.loads(proc.stdout) == results[cmd]


async def test_no_reply_within_timeout_exits_3(conductor):
    conductor.silent = True
    proc = await cli(conductor, "ping", "--timeout", "0.5")
    assert proc.returncode == 3
    assert proc.stderr.decode().startswith("error: TIMEOUT: no reply from ")
