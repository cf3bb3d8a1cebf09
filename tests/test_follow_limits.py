"""Issue #17, attacked: the request that ends a ``logs --follow`` counts against the
connection's rate like any other (an in-process conductor, a real WebSocket)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import trio

from skr8tr.conductor.limits import Limits
from skr8tr.core import protocol
from skr8tr.ws import trio_client
from tests.security_helpers import open_conductor, ping_text

# Two requests per connection, then (nearly) nothing more.
TIGHT = Limits(messages_per_s=0.01, message_burst=2)


def signed(signer, cmd: str, args: dict, rid: str) -> str:
    return json.dumps(
        protocol.request_message(id=rid, cmd=cmd, args=args, signing_key=signer, ts=time.time())
    )


async def test_the_message_that_ends_a_follow_is_counted(tmp_path: Path):
    manifest = "app web\n  exec /bin/sleep\n  args 600\n"
    with trio.fail_after(30):
        async with open_conductor(tmp_path, limits=TIGHT) as c:
            async with trio_client.open_websocket(c.url + "/v1/cli") as ws:
                # No node: NO_CAPACITY, and the app is kept (what a follow needs).
                await ws.send_message(
                    signed(
                        c.admin,
                        "up",
                        {"manifest": manifest, "format": "skr8tr", "base_dir": str(tmp_path)},
                        "u",
                    )
                )
                assert json.loads(await ws.get_message())["error"]["code"] == "NO_CAPACITY"
            async with trio_client.open_websocket(c.url + "/v1/cli") as ws:
                await ws.send_message(
                    signed(c.admin, "logs", {"app": "web", "tail": 0, "follow": True}, "f")
                )  # 1st
                first = json.loads(await ws.get_message())
                assert first["ok"] and first["result"]["follow"] is True
                await ws.send_message(ping_text("p1"))  # 2nd: ends the follow, answered
                assert json.loads(await ws.get_message())["result"]["pong"] == "conductor"
                await ws.send_message(ping_text("p2"))  # 3rd: over the burst
                with pytest.raises(trio_client.ConnectionClosed) as closed:
                    await ws.get_message()
                assert closed.value.code == 1008 and "messages/s" in closed.value.reason
