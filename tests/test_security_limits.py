"""Limits: each one closes only the connection that broke it, says why, and is counted.

A real conductor runs in-process with small limits; after every offence the
test checks the count in /metrics and that everyone else is still served.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio
import trio.testing

from skr8tr.conductor.limits import AddressSlots, Limits, TokenBucket
from skr8tr.core import envelope
from skr8tr.core.node_protocol import decode_node_message, encode_node_message
from skr8tr.ws import trio_client
from tests.conftest import read_until_closed
from tests.security_helpers import (
    closed_count,
    http_get,
    open_conductor,
    ping,
    ping_text,
    scrape,
)

DEADLINE_S = 30
SMALL = Limits(max_connections_per_address=3, messages_per_s=20, message_burst=5,
               handshake_timeout_s=0.5, idle_timeout_s=0.5, http_max_header_bytes=2048,
               http_header_timeout_s=0.5, http_idle_timeout_s=0.5, http_io_timeout_s=0.5)


# ---------------------------------------------------------------------- the pure parts


def test_token_bucket_allows_the_burst_then_the_rate():
    bucket = TokenBucket(rate=10, burst=3, now=0.0)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.take(0.05) is False  # half a token
    assert bucket.take(0.1) is True
    assert [bucket.take(100.0) for _ in range(4)] == [True, True, True, False], "capped"


def test_address_slots_count_per_address():
    slots = AddressSlots(limit=2)
    assert slots.acquire("a") and slots.acquire("a") and not slots.acquire("a")
    assert slots.acquire("b")
    slots.release("a")
    assert slots.acquire("a")
    for _ in range(3):
        slots.release("a")
    assert "a" not in slots.open


@pytest.mark.parametrize("field, value", [("max_connections_per_address", 0),
                                          ("messages_per_s", 0), ("idle_timeout_s", -1),
                                          ("handshake_timeout_s", float("nan"))])
def test_limits_refuse_nonsense(field, value):
    with pytest.raises(ValueError, match=field):
        Limits(**{field: value})


# ---------------------------------------------------------------------- a real conductor


async def still_serving(c) -> None:
    assert (await ping(c.url))["ok"]
    status, _, body = await http_get(c.http_port, "/healthz")
    assert (status, body) == (200, b"ok\n")


async def test_connections_per_address(tmp_path: Path):
    with trio.fail_after(DEADLINE_S):
        async with open_conductor(tmp_path, limits=SMALL) as c:
            async with trio.open_nursery() as nursery:
                held = []
                for _ in range(3):
                    held.append(await trio_client.connect(c.url + "/v1/cli"))
                # A fourth from the same address is closed before any handshake.
                stream = await trio.open_tcp_stream("127.0.0.1", c.ws_port)
                await stream.send_all(b"GET /v1/cli HTTP/1.1\r\nHost: x\r\n\r\n")
                assert await read_until_closed(stream) == b""
                await stream.aclose()
                # The three held connections are fine.
                for ws in held:
                    await ws.send_message(ping_text())
                    assert json.loads(await ws.get_message())["ok"]
                await held.pop().aclose()
                for ws in held:
                    await ws.aclose()
                nursery.cancel_scope.cancel()
            await still_serving(c)
            assert closed_count(await scrape(c.http_port), "too_many_connections") == 1

            # The HTTP listener counts its own connections the same way.
            streams = [await trio.open_tcp_stream("127.0.0.1", c.http_port) for _ in range(3)]
            extra = await trio.open_tcp_stream("127.0.0.1", c.http_port)
            assert await read_until_closed(extra) == b""
            for s in [*streams, extra]:
                await s.aclose()
            await still_serving(c)
            assert closed_count(await scrape(c.http_port), "too_many_connections") == 2


async def test_message_rate_per_connection(tmp_path: Path):
    with trio.fail_after(DEADLINE_S):
        async with open_conductor(tmp_path, limits=SMALL) as c:
            async with trio_client.open_websocket(c.url + "/v1/cli") as ws:
                for i in range(40):  # far past the burst of 5, at once
                    await ws.send_message(ping_text(f"p{i}"))
                with pytest.raises(trio_client.ConnectionClosed) as closed:
                    while True:
                        await ws.get_message()
                assert closed.value.code == 1008
                assert "messages/s" in closed.value.reason
            # A client that keeps within the rate is never bothered. The sleep paces it
            # (about 16 messages/s against a limit of 20): it is the load, not a wait.
            async with trio_client.open_websocket(c.url + "/v1/cli") as ws:
                for i in range(12):
                    await ws.send_message(ping_text(f"q{i}"))
                    assert json.loads(await ws.get_message())["ok"]
                    await trio.sleep(0.06)
            await still_serving(c)
            assert closed_count(await scrape(c.http_port), "rate_limit") == 1


async def test_watchers_are_rate_limited_too(tmp_path: Path):
    with trio.fail_after(DEADLINE_S):
        async with open_conductor(tmp_path, limits=SMALL) as c:
            async with trio_client.open_websocket(c.url + "/v1/watch") as ws:
                assert json.loads(await ws.get_message())["type"] == "snapshot"
                with pytest.raises(trio_client.ConnectionClosed) as closed:
                    for _ in range(200):
                        await ws.send_message("noise")
                    while True:
                        await ws.get_message()
                assert closed.value.code == 1008
            await still_serving(c)
            assert closed_count(await scrape(c.http_port), "rate_limit") == 1


async def test_handshake_deadline_and_bad_handshakes(tmp_path: Path):
    with trio.fail_after(DEADLINE_S):
        async with open_conductor(tmp_path, limits=SMALL) as c:
            silent = await trio.open_tcp_stream("127.0.0.1", c.ws_port)
            # Without the handshake deadline this would wait until the test's own.
            assert await read_until_closed(silent) == b""
            await silent.aclose()
            garbage = await trio.open_tcp_stream("127.0.0.1", c.ws_port)
            await garbage.send_all(b"\x16\x03\x01 not a websocket upgrade\r\n\r\n")
            await read_until_closed(garbage)
            await garbage.aclose()
            await still_serving(c)
            samples = await scrape(c.http_port)
            assert closed_count(samples, "handshake_timeout") == 1
            assert closed_count(samples, "bad_handshake") == 1


async def test_idle_cli_connections_are_closed(tmp_path: Path):
    with trio.fail_after(DEADLINE_S):
        async with open_conductor(tmp_path, limits=SMALL) as c:
            async with trio_client.open_websocket(c.url + "/v1/cli") as ws:
                with pytest.raises(trio_client.ConnectionClosed) as closed:
                    await ws.get_message()
                assert closed.value.code == 1000
                assert "idle" in closed.value.reason
            await still_serving(c)
            assert closed_count(await scrape(c.http_port), "idle_timeout") == 1


async def test_oversized_messages_are_counted(tmp_path: Path):
    with trio.fail_after(DEADLINE_S):
        async with open_conductor(tmp_path) as c:
            async with trio_client.open_websocket(c.url + "/v1/cli") as ws:
                await ws.send_message("x" * (2**20 + 1))
                with pytest.raises(trio_client.ConnectionClosed) as closed:
                    await ws.get_message()
                assert closed.value.code == 1009
            await still_serving(c)
            assert closed_count(await scrape(c.http_port), "message_too_big") == 1


async def _join(url: str, signing_key, node_id: str):
    """A raw node session up to the welcome; returns the open WebSocket."""
    ws = await trio_client.connect(url + "/v1/node")
    challenge = decode_node_message(await ws.get_message())
    sig = envelope.sign_challenge(signing_key, bytes.fromhex(challenge.nonce), node_id)
    await ws.send_message(encode_node_message(
        "hello", node_id=node_id, key=signing_key.public, sig=sig, version="t",
        address="127.0.0.1", cores=1, ram_total_mb=1, ram_free_mb=1, cpu_pct=0.0,
        replicas=[]))
    return ws, decode_node_message(await ws.get_message())


async def test_node_sessions_hello_deadline_and_rate(tmp_path: Path):
    with trio.fail_after(DEADLINE_S):
        async with open_conductor(tmp_path, limits=SMALL) as c, \
                trio.open_nursery() as nursery:
            _join.nursery = nursery
            # Take the challenge and never answer it.
            ws = await trio_client.connect(c.url + "/v1/node")
            assert decode_node_message(await ws.get_message()).TYPE == "challenge"
            refused = decode_node_message(await ws.get_message())
            assert refused.TYPE == "refused" and "no hello within 0.5 s" in refused.message
            # A welcomed node that floods is closed; the node stays known, merely detached.
            ws, welcome = await _join(c.url, c.node, "flooder")
            assert welcome.TYPE == "welcome"
            beat = encode_node_message("heartbeat", cpu_pct=1.0, ram_free_mb=1,
                                       ram_total_mb=1, cores=1)
            with pytest.raises(trio_client.ConnectionClosed) as closed:
                for _ in range(100):
                    await ws.send_message(beat)
                while True:
                    await ws.get_message()
            assert closed.value.code == 1008
            await still_serving(c)
            samples = await scrape(c.http_port)
            assert closed_count(samples, "handshake_timeout") == 1
            assert closed_count(samples, "rate_limit") == 1
            nursery.cancel_scope.cancel()


# ---------------------------------------------------------------------- slow HTTP clients


async def test_http_header_size_and_slow_clients(tmp_path: Path):
    with trio.fail_after(DEADLINE_S):
        async with open_conductor(tmp_path, limits=SMALL) as c:
            port = c.http_port
            big = await trio.open_tcp_stream("127.0.0.1", port)
            await big.send_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 4096
                               + b"\r\n\r\n")
            answer = await read_until_closed(big)
            assert answer.startswith(b"HTTP/1.1 431 ")
            await big.aclose()

            # Slowloris: a header line dribbled out byte by byte never completes.
            slow = await trio.open_tcp_stream("127.0.0.1", port)
            cut_off = False
            # Dribbling the whole line would take 20 s; the head deadline must end it.
            # The sleep is the dribble's pace, not a wait for the server.
            try:
                for byte in b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"z" * 1000:
                    await slow.send_all(bytes([byte]))
                    await trio.sleep(0.02)
            except trio.BrokenResourceError:
                cut_off = True
            assert cut_off, "the server never cut the dribbling client off"
            await slow.aclose()

            # Keep-alive: one request served, then an idle connection is closed.
            idle = await trio.open_tcp_stream("127.0.0.1", port)
            await idle.send_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            data = await read_until_closed(idle)
            assert data.startswith(b"HTTP/1.1 200 ") and data.endswith(b"ok\n")
            await idle.aclose()

            # A client that sends requests and never reads the answers (200 copies of
            # app.js, more than the socket buffers hold): the server's write times out
            # and it closes the connection. Wait for the count that says so.
            stuck = await trio.open_tcp_stream("127.0.0.1", port)
            request = b"GET /static/app.js HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
            await stuck.send_all(request * 200)
            await wait_for_closed_count(port, "http_slow_client", 1)
            await stuck.aclose()

            await still_serving(c)
            samples = await scrape(port)
            assert closed_count(samples, "http_header_too_large") == 1
            assert closed_count(samples, "http_header_timeout") == 1
            assert closed_count(samples, "http_idle_timeout") >= 1


async def wait_for_closed_count(port: int, reason: str, count: int) -> None:
    """Poll /metrics until *reason* has closed *count* connections (the caller's
    deadline bounds the wait)."""
    while closed_count(await scrape(port), reason) < count:
        await trio.sleep(0.05)


async def test_a_failing_handler_closes_only_its_connection():
    from skr8tr.conductor.limits import ClosedCounter
    from skr8tr.conductor.listen import WebSocketListener
    from skr8tr.ws.server import Request

    async def handler(request: Request) -> None:
        ws = await request.accept()
        if request.path == "/boom":
            raise RuntimeError("a bug in one handler")
        await ws.send_message("fine")

    listener = WebSocketListener(handler, limits=Limits(), closed=ClosedCounter(),
                                 max_message_size=1024)
    with trio.fail_after(DEADLINE_S):
        async with trio.open_nursery() as nursery:
            await nursery.start(listener.serve, "127.0.0.1", 0)
            url = f"ws://127.0.0.1:{listener.port}"
            for _ in range(3):
                async with trio_client.open_websocket(url + "/boom") as ws:
                    with pytest.raises(trio_client.ConnectionClosed):
                        await ws.get_message()
                async with trio_client.open_websocket(url + "/ok") as ws:
                    assert await ws.get_message() == "fine"
            while listener.slots.open:  # the server side finishes its close
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()


async def test_ingress_measures_a_request_head_that_came_in_one_read():
    from skr8tr.ingress.limits import ProxyLimits
    from skr8tr.ingress.pool import Pool
    from skr8tr.ingress.proxy import Proxy
    from skr8tr.ingress.routes import BackendTable, RouteTable, parse_route

    table = BackendTable()
    proxy = Proxy(RouteTable([parse_route("/:web")]), table, Pool(table.is_routable),
                  ProxyLimits(max_head_bytes=1024))
    client, server = trio.testing.memory_stream_pair()
    with trio.fail_after(DEADLINE_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(proxy.serve_connection, server)
            await client.send_all(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 2000
                                  + b"\r\n\r\n")
            answer = b""
            while chunk := await client.receive_some(65536):
                answer += chunk
    assert answer.startswith(b"HTTP/1.1 431 ")
