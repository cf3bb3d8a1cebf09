"""Issue #17, attacked: the verbs added today (describe, revision, restart, undo with
force, logs --follow) need an admin signature like every mutating command, and the
signed ones are audited with their arguments (an in-process conductor, real sockets)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import trio

from skr8tr.core import protocol
from skr8tr.ws import trio_client
from tests.security_helpers import open_conductor

NEW_VERBS = [
    ("describe", {"app": "web"}),
    ("revision", {"app": "web", "generation": 1}),
    ("restart", {"app": "web", "force": True}),
    ("rollout-undo", {"app": "web", "to": None, "force": True}),
    ("logs", {"app": "web", "tail": 0, "follow": True}),
]


async def call(url: str, cmd: str, args: dict, signer=None) -> dict:
    """One request on its own connection (a follow's first reply is enough)."""
    msg = protocol.request_message(
        id=cmd, cmd=cmd, args=args, signing_key=signer, ts=time.time() if signer else None
    )
    async with trio_client.open_websocket(url + "/v1/cli") as ws:
        await ws.send_message(json.dumps(msg))
        return json.loads(await ws.get_message())


async def test_new_verbs_need_an_admin_signature_and_are_audited(tmp_path: Path):
    audit_file = tmp_path / "audit.log"
    with trio.fail_after(30):
        async with open_conductor(tmp_path, audit_log=str(audit_file)) as c:
            reply = await call(
                c.url,
                "up",
                {
                    "manifest": "app web\n  exec /bin/sleep\n",
                    "format": "skr8tr",
                    "base_dir": str(tmp_path),
                },
                c.admin,
            )
            assert reply["error"]["code"] == "NO_CAPACITY"  # no node; the app is kept
            for cmd, args in NEW_VERBS:
                unsigned = await call(c.url, cmd, args)
                assert unsigned["error"]["code"] == "UNAUTHORIZED", (cmd, unsigned)
                by_node = await call(c.url, cmd, args, c.node)
                assert by_node["error"]["code"] == "UNAUTHORIZED", (cmd, by_node)
                by_admin = await call(c.url, cmd, args, c.admin)
                assert by_admin.get("error", {}).get("code") != "UNAUTHORIZED", (cmd, by_admin)
    entries = [json.loads(x) for x in audit_file.read_text().splitlines()]
    accepted = {e["cmd"]: e for e in entries if e["verified"]}
    assert set(accepted) >= {cmd for cmd, _ in NEW_VERBS}
    for cmd in ("restart", "rollout-undo"):
        assert accepted[cmd]["args"]["force"] is True
    # A refused request is audited too (at a bounded rate): the unsigned restart is there.
    assert any(e["cmd"] == "restart" and not e["verified"] for e in entries)


@pytest.mark.parametrize("cmd", ["describe", "revision"])
async def test_describe_and_revision_unsigned_never_show_the_manifest(tmp_path, cmd):
    secret = "s3cr3t-value"
    async with open_conductor(tmp_path) as c:
        await call(
            c.url,
            "up",
            {
                "manifest": f"app web\n  exec /bin/sleep\n  env\n    TOKEN {secret}\n",
                "format": "skr8tr",
                "base_dir": str(tmp_path),
            },
            c.admin,
        )
        args = dict(NEW_VERBS)[cmd]
        for signer in (None, c.node):
            reply = await call(c.url, cmd, args, signer)
            assert secret not in json.dumps(reply)
        assert secret in json.dumps(await call(c.url, cmd, args, c.admin))
