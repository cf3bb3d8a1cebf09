"""Issue #17, attacked: the request that ends a ``logs --follow`` counts against the
connection's rate like any other (an in-process conductor, a real WebSocket)."""

from __future__ import annotations

import functools
import json
import signal
import time
from pathlib import Path

import pytest
import trio

from skr8tr.conductor.limits import Limits
from skr8tr.core import protocol
from skr8tr.ws import trio_client
from tests.conftest import skr8tr_command
from tests.security_helpers import closed_count, open_conductor, ping_text, scrape

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


PINGED = Limits(watch_idle_timeout_s=1.0)


async def open_quiet_follow(c, ws, tmp_path: Path) -> None:
    """An app with no node (nothing is ever pushed) and a follow of it on *ws*."""
    async with trio_client.open_websocket(c.url + "/v1/cli") as other:
        await other.send_message(
            signed(
                c.admin,
                "up",
                {
                    "manifest": "app web\n  exec /bin/sleep\n",
                    "format": "skr8tr",
                    "base_dir": str(tmp_path),
                },
                "u",
            )
        )
        await other.get_message()
    await ws.send_message(signed(c.admin, "logs", {"app": "web", "tail": 0, "follow": True}, "f"))
    assert json.loads(await ws.get_message())["result"]["follow"] is True


async def test_a_follow_whose_client_is_gone_without_a_word_ends(tmp_path: Path):
    # The client no longer reads (so it answers no ping): a dropped network looks so.
    with trio.fail_after(30):
        async with (
            open_conductor(tmp_path, limits=PINGED) as c,
            trio_client.open_websocket(c.url + "/v1/cli") as ws,
        ):
            await open_quiet_follow(c, ws, tmp_path)
            started = trio.current_time()
            while closed_count(await scrape(c.http_port), "ping_timeout") == 0:
                await trio.sleep(0.1)
            assert 1.0 <= trio.current_time() - started < 5.0
            with pytest.raises(trio_client.ConnectionClosed):
                await ws.get_message()


async def test_a_follow_whose_client_answers_pings_stays(tmp_path: Path):
    with trio.fail_after(30):
        async with (
            open_conductor(tmp_path, limits=PINGED) as c,
            trio_client.open_websocket(c.url + "/v1/cli") as ws,
        ):
            await open_quiet_follow(c, ws, tmp_path)
            with trio.move_on_after(3.5):  # reading answers the pings
                await ws.get_message()
                raise AssertionError("a quiet follow sent something")
            await ws.send_message(ping_text("p"))
            assert json.loads(await ws.get_message())["result"]["pong"] == "conductor"
            assert closed_count(await scrape(c.http_port), "ping_timeout") == 0


async def test_the_real_cli_keeps_a_quiet_follow(tmp_path: Path, cli_env):
    # The CLI answers the pings while it waits for lines: its follow outlives several
    # ping periods (1 s here), until the user ends it.
    from skr8tr import keyfiles

    keyfiles.write_keypair(tmp_path / "key")
    with trio.fail_after(60):
        async with open_conductor(tmp_path, limits=PINGED, insecure=True) as c:
            async with trio_client.open_websocket(c.url + "/v1/cli") as ws:
                await open_quiet_follow(c, ws, tmp_path)  # (makes the app; ends here)
            async with trio.open_nursery() as nursery:
                proc = await nursery.start(
                    functools.partial(
                        trio.run_process,
                        [
                            *skr8tr_command(),
                            "logs",
                            "web",
                            "--follow",
                            "--conductor",
                            c.url,
                            "--key",
                            str(tmp_path / "key" / "signing.sec"),
                        ],
                        env=cli_env,
                        stdin=b"",
                        capture_stdout=True,
                        capture_stderr=True,
                        check=False,
                    )
                )
                await trio.sleep(4.0)  # four ping periods
                assert proc.returncode is None  # still following
                proc.send_signal(signal.SIGINT)
            assert closed_count(await scrape(c.http_port), "ping_timeout") == 0


async def test_a_message_over_the_limit_that_ends_a_follow_is_counted(tmp_path: Path):
    with trio.fail_after(30):
        async with open_conductor(tmp_path) as c:
            async with trio_client.open_websocket(c.url + "/v1/cli") as ws:
                await open_quiet_follow(c, ws, tmp_path)
                await ws.send_message("x" * (protocol.MAX_MESSAGE_BYTES + 1))
                with pytest.raises(trio_client.ConnectionClosed) as closed:
                    await ws.get_message()
                assert closed.value.code == 1009
            assert closed_count(await scrape(c.http_port), "message_too_big") == 1
