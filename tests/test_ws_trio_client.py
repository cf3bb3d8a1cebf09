"""The Trio client (skr8tr.ws.trio_client: the node agent's link, skr8tr.client) against a server.

Every way a connection can go or end, seen from the client. The server is
skr8tr.ws.server without the conductor's listener (tests/ws_helpers.py); the
server's own behaviour, against hand-made frames, is tested in
tests/test_wsserver.py, and the framing against wsproto's own handshake and
peer in tests/test_ws_frames.py.
"""

from __future__ import annotations

import base64
import hashlib
from functools import partial

import pytest
import trio

from skr8tr.ws import server as wsserver
from skr8tr.ws import trio_client
from tests.ws_helpers import serve_websocket

STEP_S = 10


async def serve(nursery: trio.Nursery, handler) -> str:
    async def on_request(request: wsserver.Request) -> None:
        ws = await request.accept()
        await handler(ws)

    server = await nursery.start(partial(serve_websocket, on_request,
                                         "127.0.0.1", 0, ssl_context=None,
                                         max_message_size=4 * 1024 * 1024))
    return f"ws://127.0.0.1:{server.port}/v1/node"


async def test_messages_both_ways_pings_and_a_close_by_us() -> None:
    seen: list[str] = []
    closed = trio.Event()
    codes: list[int] = []

    async def echo(ws: trio_client.ClientConnection) -> None:
        try:
            while True:
                text = await ws.get_message()
                seen.append(text)
                await ws.send_ping(b"are you there")  # the client's reader answers with a pong
                await ws.send_message(text.upper())
        except trio_client.ConnectionClosed as exc:
            codes.append(exc.code)
            closed.set()

    with trio.fail_after(STEP_S):
        async with trio.open_nursery() as nursery:
            url = await serve(nursery, echo)
            ws = await trio_client.connect(url)
            assert ws.local_address == "127.0.0.1"
            for text in ("hello", "", "x" * 70_000, "é" * 1000):
                await ws.send_message(text)
                assert await ws.get_message() == text.upper()
            await ws.aclose(1001, "going away")
            await closed.wait()
            assert codes == [1001]
            assert seen == ["hello", "", "x" * 70_000, "é" * 1000]
            with pytest.raises(trio_client.ConnectionClosed):
                await ws.send_message("after the close")
            nursery.cancel_scope.cancel()


async def test_a_close_by_the_server_ends_get_message_with_its_code() -> None:
    async def closer(ws: trio_client.ClientConnection) -> None:
        await ws.send_message("last words")
        await ws.aclose(4000, "node revoked")

    with trio.fail_after(STEP_S):
        async with trio.open_nursery() as nursery:
            url = await serve(nursery, closer)
            ws = await trio_client.connect(url)
            assert await ws.get_message() == "last words"
            with pytest.raises(trio_client.ConnectionClosed) as closed:
                await ws.get_message()
            assert (closed.value.code, closed.value.reason) == (4000, "node revoked")
            assert ws.closed is not None and ws.closed.code == 4000
            await ws.aclose()  # nothing left to do; closes the stream
            nursery.cancel_scope.cancel()


async def test_a_message_over_the_limit_closes_with_1009() -> None:
    codes: list[int] = []
    done = trio.Event()

    async def big(ws: trio_client.ClientConnection) -> None:
        await ws.send_message("y" * 2000)
        try:
            await ws.get_message()
        except trio_client.ConnectionClosed as exc:
            codes.append(exc.code)
        done.set()

    with trio.fail_after(STEP_S):
        async with trio.open_nursery() as nursery:
            url = await serve(nursery, big)
            ws = await trio_client.connect(url, max_message_bytes=1000)
            with pytest.raises(trio_client.ConnectionClosed) as closed:
                await ws.get_message()
            assert closed.value.code == 1009
            await done.wait()
            assert codes == [1009]  # the server was told why
            await ws.aclose()
            nursery.cancel_scope.cancel()


async def test_a_dropped_tcp_connection_is_1006() -> None:
    async def raw_server(stream: trio.SocketStream) -> None:
        # Accept the upgrade by hand, then hang up without a close frame.
        data = b""
        while b"\r\n\r\n" not in data:
            data += await stream.receive_some(4096)
        key = [line.split(b":", 1)[1].strip() for line in data.split(b"\r\n")
               if line.lower().startswith(b"sec-websocket-key:")][0]
        accept = base64.b64encode(hashlib.sha1(
            key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
        await stream.send_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                              b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept +
                              b"\r\n\r\n\x81\x02hi")
        await stream.aclose()

    with trio.fail_after(STEP_S):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(trio.serve_tcp, raw_server, 0)
            port = listeners[0].socket.getsockname()[1]
            ws = await trio_client.connect(f"ws://127.0.0.1:{port}/")
            assert await ws.get_message() == "hi"  # frames that came with the handshake
            with pytest.raises(trio_client.ConnectionClosed) as closed:
                await ws.get_message()
            assert closed.value.code == 1006
            await ws.aclose()
            nursery.cancel_scope.cancel()


async def test_a_refused_handshake_names_the_http_status() -> None:
    async def not_websocket(stream: trio.SocketStream) -> None:
        await stream.receive_some(4096)
        await stream.send_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
        await stream.aclose()

    with trio.fail_after(STEP_S):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(trio.serve_tcp, not_websocket, 0)
            port = listeners[0].socket.getsockname()[1]
            with pytest.raises(trio_client.HandshakeError) as refused:
                await trio_client.connect(f"ws://127.0.0.1:{port}/v1/node")
            assert refused.value.status == 404
            assert "refused with HTTP 404" in str(refused.value)
            nursery.cancel_scope.cancel()


async def test_nothing_listening_is_an_os_error() -> None:
    with trio.socket.socket() as s:
        await s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(OSError):
        await trio_client.connect(f"ws://127.0.0.1:{port}/")


@pytest.mark.parametrize("url", ["http://x/", "ws:///nohost", "wss://x/"])
async def test_bad_urls(url: str) -> None:
    with pytest.raises(ValueError):
        await trio_client.connect(url)  # wss:// without an SSL context is a ValueError too


def test_split_url() -> None:
    assert trio_client.split_url("ws://127.0.0.1:7771/v1/node") == (False, "127.0.0.1", 7771,
                                                             "/v1/node")
    assert trio_client.split_url("wss://example.org") == (True, "example.org", 443, "/")
    assert trio_client.split_url("ws://[::1]:80/a?b=c") == (False, "::1", 80, "/a?b=c")
