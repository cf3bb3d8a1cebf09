"""The server side of skr8tr.ws (skr8tr.ws.server) against real clients.

The peers are the clients the conductor meets: the Trio client (skr8tr.ws.trio_client:
the node agent, skr8tr.client, the ingress, the benches) and the CLI's blocking
one (skr8tr.ws.blocking), plus a raw client that writes frames by hand for
what well-behaved clients never send. The server side runs behind the
conductor's own listener (skr8tr.conductor.listen), as in production.
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Awaitable, Callable
from functools import partial

import pytest
import trio
import trio.testing

from skr8tr import blocking_client, tls
from skr8tr.conductor.limits import ClosedCounter, Limits
from skr8tr.conductor.listen import WebSocketListener
from skr8tr.ws import frames as wsframes
from skr8tr.ws import server as wsserver
from skr8tr.ws import trio_client
from tests.conftest import read_until_closed
from tests.security_helpers import make_pki

STEP_S = 20
LIMIT = 1024 * 1024

# Sizes around every frame-length boundary (125/126, 65535/65536) up to the limit.
SIZES = [0, 1, 125, 126, 127, 4096, 65535, 65536, 65537, 300_000, LIMIT]


class Server:
    """A listener whose connections run *on_open*; what the server saw is kept here."""

    def __init__(self, on_open: Callable[[wsserver.ServerConnection], Awaitable[None]], *,
                 max_message_size: int = LIMIT, ssl_context=None) -> None:
        self.on_open = on_open
        self.closes: list[tuple[int, str]] = []  # ConnectionClosed seen by handlers
        self.done = trio.Event()  # a handler returned
        self.finished = 0
        self._finishing = trio.Event()  # set (and replaced) each time a handler returns
        self.listener = WebSocketListener(self.handle, limits=Limits(), closed=ClosedCounter(),
                                          max_message_size=max_message_size,
                                          ssl_context=ssl_context)

    async def handle(self, request: wsserver.Request) -> None:
        ws = await request.accept()
        try:
            await self.on_open(ws)
        except wsserver.ConnectionClosed as exc:
            self.closes.append((exc.code, exc.reason))
        finally:
            self.finished += 1
            self.done.set()
            self._finishing.set()
            self._finishing = trio.Event()

    async def start(self, nursery: trio.Nursery) -> Server:
        await nursery.start(self.listener.serve, "127.0.0.1", 0)
        return self

    @property
    def port(self) -> int:
        return self.listener.port

    def url(self, path: str = "/t", scheme: str = "ws") -> str:
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    async def wait_finished(self, count: int) -> None:
        """Until *count* handlers have returned."""
        while self.finished < count:
            await self._finishing.wait()

    async def wait_closed(self) -> None:
        """Until every connection's slot is given back (its stream closed)."""
        while self.listener.slots.open:
            await trio.sleep(0.005)


async def echo(ws: wsserver.ServerConnection, seen: list | None = None) -> None:
    while True:
        message = await ws.get_message()
        if seen is not None:
            seen.append(message)
        await ws.send_message(message)


def texts() -> list[str]:
    out = []
    for n in SIZES:
        out.append("x" * n)
        out.append("é" * (n // 2))  # two UTF-8 bytes a character
    out.append("mixed ✓ ascii and 🚀 four-byte")
    return out


# ---------------------------------------------------------------------- a raw client


def frame(opcode: int, payload: bytes = b"", *, fin: bool = True, mask: bool = True,
          rsv: int = 0) -> bytes:
    """One client frame, any bits we like."""
    n = len(payload)
    b0 = (0x80 if fin else 0) | rsv | opcode
    m = 0x80 if mask else 0
    if n < 126:
        head = struct.pack("!BB", b0, m | n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", b0, m | 126, n)
    else:
        head = struct.pack("!BBQ", b0, m | 127, n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    stream = (key * (n // 4 + 1))[:n]
    masked = (int.from_bytes(payload, "little") ^ int.from_bytes(stream, "little")
              ).to_bytes(n, "little") if n else b""
    return head + key + masked


def close_payload(code: int, reason: str = "") -> bytes:
    return struct.pack("!H", code) + reason.encode()


class RawClient:
    """A WebSocket client that sends hand-made frames; the server's frames are
    decoded with skr8tr.ws.frames."""

    def __init__(self, stream: trio.SocketStream, proto: wsframes.ClientProtocol) -> None:
        self.stream = stream
        self.proto = proto
        self.pending: list[wsframes.Event] = []

    @classmethod
    async def connect(cls, port: int, *, then: bytes = b"") -> RawClient:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        proto = wsframes.ClientProtocol(f"127.0.0.1:{port}", "/raw")
        await stream.send_all(proto.handshake_request() + then)
        rest = None
        while rest is None:
            data = await stream.receive_some(65536)
            assert data, "the server hung up during the handshake"
            rest = proto.receive_handshake(data)
        client = cls(stream, proto)
        client.pending = proto.receive(rest) if rest else []
        return client

    async def send(self, *frames: bytes) -> None:
        await self.stream.send_all(b"".join(frames))

    async def next_event(self) -> wsframes.Event | None:
        """The next event from the server; None when the stream ended."""
        while not self.pending:
            try:
                data = await self.stream.receive_some(65536)
            except trio.BrokenResourceError:
                data = b""
            if not data:
                return None
            self.pending = self.proto.receive(data)
        return self.pending.pop(0)

    async def ended(self) -> bool:
        """True once the server closed the TCP connection (after whatever it sent)."""
        while True:
            try:
                data = await self.stream.receive_some(65536)
            except trio.BrokenResourceError:
                return True
            if not data:
                return True
            self.pending += self.proto.receive(data)


# ---------------------------------------------------------------------- messages both ways


async def test_messages_both_ways_with_the_trio_client() -> None:
    seen: list = []
    with trio.fail_after(STEP_S):
        async with trio.open_nursery() as nursery:
            server = await Server(partial(echo, seen=seen)).start(nursery)
            sent: list = []
            async with trio_client.open_websocket(
                    server.url(), max_message_bytes=2 * LIMIT) as ws:
                for text in texts():
                    if len(text.encode()) > LIMIT:
                        continue
                    await ws.send_message(text)
                    assert await ws.get_message() == text
                    sent.append(text)
                for n in SIZES:
                    data = os.urandom(n)
                    await ws.send_message(data)
                    assert await ws.get_message() == data
                    sent.append(data)
            await server.done.wait()
            assert seen == sent
            assert server.closes == [(1000, "")]
            await server.wait_closed()
            nursery.cancel_scope.cancel()


async def test_messages_both_ways_with_the_blocking_client() -> None:
    def session(url: str) -> None:
        with blocking_client.connect(url, 10.0) as conn:
            for text in texts():
                if len(text.encode()) > LIMIT:
                    continue
                conn.send_text(text)
                assert conn.receive_message() == text

    with trio.fail_after(STEP_S):
        async with trio.open_nursery() as nursery:
            server = await Server(echo).start(nursery)
            await trio.to_thread.run_sync(session, server.url())
            await server.done.wait()
            assert server.closes == [(1000, "")]
            await server.wait_closed()
            nursery.cancel_scope.cancel()


async def test_messages_both_ways_with_a_trio_client_that_closes() -> None:
    with trio.fail_after(STEP_S):
        async with trio.open_nursery() as nursery:
            server = await Server(echo).start(nursery)
            ws = await trio_client.connect(server.url(), max_message_bytes=2 * LIMIT)
            for text in texts():
                if len(text.encode()) <= LIMIT:
                    await ws.send_message(text)
                    assert await ws.get_message() == text
            await ws.aclose(1001, "going away")
            await server.done.wait()
            assert server.closes == [(1001, "going away")]
            nursery.cancel_scope.cancel()


async def test_fragmented_messages_and_pings_between_fragments() -> None:
    seen: list = []
    with trio.fail_after(STEP_S):
        async with trio.open_nursery() as nursery:
            server = await Server(partial(echo, seen=seen)).start(nursery)
            raw = await RawClient.connect(server.port)
            text = "héllo wörld, 🚀 and more".encode()
            cut = text.index("ö".encode()) + 1  # inside a two-byte character
            await raw.send(frame(0x1, text[:cut], fin=False),
                           frame(0x9, b"between fragments"),
                           frame(0x0, text[cut:-3], fin=False),
                           frame(0x0, b"", fin=False),
                           frame(0x0, text[-3:]))
            assert await raw.next_event() == wsframes.Pong(b"between fragments")
            assert await raw.next_event() == wsframes.Message(text.decode())
            # A binary message in many small pieces, sent one write at a time.
            blob = os.urandom(10_000)
            pieces = [blob[i:i + 999] for i in range(0, len(blob), 999)]
            for i, piece in enumerate(pieces):
                await raw.send(frame(0x2 if i == 0 else 0x0, piece,
                                     fin=i == len(pieces) - 1))
            assert await raw.next_event() == wsframes.Message(blob)
            assert seen == [text.decode(), blob]
            nursery.cancel_scope.cancel()


async def test_frames_sent_right_behind_the_handshake_are_kept() -> None:
    seen: list = []
    with trio.fail_after(STEP_S):
        async with trio.open_nursery() as nursery:
            server = await Server(partial(echo, seen=seen)).start(nursery)
            raw = await RawClient.connect(server.port, then=frame(0x1, b"eager")
                                          + frame(0x9, b"p"))
            # The reader answers the ping as it reads it, before the handler's echo.
            assert await raw.next_event() == wsframes.Pong(b"p")
            assert await raw.next_event() == wsframes.Message("eager")
            assert seen == ["eager"]
            nursery.cancel_scope.cancel()


async def test_a_cancelled_get_message_loses_nothing() -> None:
    got: list = []

    async def patient(ws: wsserver.ServerConnection) -> None:
        # Cancelled reads (the idle timeout does this) at any point of a frame's arrival.
        while len(got) < 3:
            with trio.move_on_after(0.001):
                got.append(await ws.get_message())
        await ws.send_message("done")
        await ws.get_message()

    with trio.fail_after(STEP_S):
        async with trio.open_nursery() as nursery:
            server = await Server(patient).start(nursery)
            raw = await RawClient.connect(server.port)
            data = frame(0x1, b"a" * 3000) + frame(0x1, "é".encode() * 2000) + frame(0x1, b"z")
            for i in range(0, len(data), 700):
                await raw.send(data[i:i + 700])
                await trio.sleep(0.002)
            assert await raw.next_event() == wsframes.Message("done")
            assert got == ["a" * 3000, "é" * 2000, "z"]
            nursery.cancel_scope.cancel()


# ---------------------------------------------------------------------- closing


@pytest.mark.parametrize("code, reason", [(1000, ""), (1001, "going away"),
                                          (4000, "node revoked ✓")])
async def test_a_close_by_the_client_is_answered_then_the_server_hangs_up(code, reason):
    seen: list = []
    with trio.fail_after(STEP_S):
        async with trio.open_nursery() as nursery:
            server = await Server(partial(echo, seen=seen)).start(nursery)
            raw = await RawClient.connect(server.port)
            # Messages before the close are still delivered (and answered, while the
            # server can: here the close came in the same write, so it cannot).
            await raw.send(frame(0x1, b"one"), frame(0x1, b"two"),
                           frame(0x8, close_payload(code, reason)))
            event = await raw.next_event()
            while isinstance(event, wsframes.Message):
                event = await raw.next_event()
            assert event == wsframes.Close(code, reason)
            assert await raw.ended()
            await server.done.wait()
            assert seen == ["one"]  # its echo met the close; "two" was never asked for
            assert server.closes == [(code, reason)]
            nursery.cancel_scope.cancel()


async def test_a_close_without_a_code_is_answered_without_one() -> None:
    with trio.fail_after(STEP_S):
        async with trio.open_nursery() as nursery:
            server = await Server(echo).start(nursery)
            raw = await RawClient.connect(server.port)
            await raw.send(frame(0x8))
            assert await raw.next_event() == wsframes.Close(1005, "")
            assert await raw.ended()
            await server.done.wait()
            assert server.closes == [(1005, "")]
            nursery.cancel_scope.cancel()


async def closer(ws: wsserver.ServerConnection) -> None:
    await ws.send_message("last words")
    await ws.aclose(4000, "node revoked")
    assert ws.closed == wsserver.CloseReason(4000, "node revoked")
    with pytest.raises(wsserver.ConnectionClosed) as closed:
        await ws.send_message("too late")
    assert (closed.value.code, closed.value.reason) == (4000, "node revoked")
    with pytest.raises(wsserver.ConnectionClosed):
        await ws.get_message()
    await ws.aclose()  # again: nothing to do


async def test_a_close_by_the_server_reaches_the_trio_client() -> None:
    with trio.fail_after(STEP_S):
        async with trio.open_nursery() as nursery:
            server = await Server(closer).start(nursery)
            async with trio_client.open_websocket(server.url()) as ws:
                assert await ws.get_message() == "last words"
                with pytest.raises(trio_client.ConnectionClosed) as closed:
                    await ws.get_message()
                assert closed.value.code == 4000
                assert closed.value.reason == "node revoked"
            await server.done.wait()
            assert server.closes == [] and server.finished == 1
            await server.wait_closed()
            nursery.cancel_scope.cancel()


async def test_a_close_by_the_server_reaches_both_clients() -> None:
    def blocking(url: str) -> int:
        with blocking_client.connect(url, 10.0) as conn:
            assert conn.receive_message() == "last words"
            with pytest.raises(blocking_client.ConnectionClosed) as closed:
                conn.receive_message()
            return closed.value.code

    with trio.fail_after(STEP_S):
        async with trio.open_nursery() as nursery:
            server = await Server(closer).start(nursery)
            assert await trio.to_thread.run_sync(blocking, server.url()) == 4000
            ws = await trio_client.connect(server.url())
            assert await ws.get_message() == "last words"
            with pytest.raises(trio_client.ConnectionClosed) as closed:
                await ws.get_message()
            assert (closed.value.code, closed.value.reason) == (4000, "node revoked")
            await ws.aclose()
            await server.wait_finished(2)
            assert server.closes == []
            await server.wait_closed()
            nursery.cancel_scope.cancel()


async def test_aclose_drops_what_arrives_until_the_peer_answers() -> None:
    returned = trio.Event()

    async def hang_up(ws: wsserver.ServerConnection) -> None:
        await ws.aclose(1008, "too fast")
        returned.set()

    with trio.fail_after(STEP_S):
        async with trio.open_nursery() as nursery:
            server = await Server(hang_up).start(nursery)
            raw = await RawClient.connect(server.port)
            await raw.send(frame(0x1, b"ignored"), frame(0x9, b"not answered"))
            assert await raw.next_event() == wsframes.Close(1008, "too fast")
            await trio.testing.wait_all_tasks_blocked()  # the server read what was sent
            assert not returned.is_set(), "aclose waits for the client's close"
            await raw.send(frame(0x1, b"dropped"), frame(0x8, close_payload(1008)))
            await returned.wait()
            assert await raw.ended()
            assert raw.pending == []  # no pong, no echo
            nursery.cancel_scope.cancel()


async def test_aclose_is_bounded_by_its_caller_and_still_closes_the_stream() -> None:
    async def impatient(ws: wsserver.ServerConnection) -> None:
        with trio.move_on_after(0.05):
            await ws.aclose(1000, "bye")
        # The client never answered: the stream is closed anyway.
        with pytest.raises(wsserver.ConnectionClosed):
            await ws.send_message("x")

    with trio.fail_after(STEP_S):
        async with trio.open_nursery() as nursery:
            server = await Server(impatient).start(nursery)
            raw = await RawClient.connect(server.port)
            assert await raw.next_event() == wsframes.Close(1000, "bye")
            assert await raw.ended()
            await server.done.wait()
            nursery.cancel_scope.cancel()


async def test_aclose_while_another_task_reads_ends_that_read_with_its_code() -> None:
    seen: list = []

    async def two_tasks(ws: wsserver.ServerConnection) -> None:
        async def reader() -> None:
            try:
                await ws.get_message()
            except wsserver.ConnectionClosed as exc:
                seen.append(exc.code)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(trio.BusyResourceError):
                await ws.get_message()  # one reader at a time
            await ws.aclose(1008, "limit")  # does not wait: the reader owns the stream

    with trio.fail_after(STEP_S):
        async with trio.open_nursery() as nursery:
            server = await Server(two_tasks).start(nursery)
            raw = await RawClient.connect(server.port)
            assert await raw.next_event() == wsframes.Close(1008, "limit")
            assert await raw.ended()
            await server.done.wait()
            assert seen == [1008]
            nursery.cancel_scope.cancel()


async def test_an_abrupt_disconnect_is_1006() -> None:
    with trio.fail_after(STEP_S):
        async with trio.open_nursery() as nursery:
            server = await Server(echo).start(nursery)
            raw = await RawClient.connect(server.port)
            await raw.send(frame(0x1, b"x" * 1000)[:300])  # half a message, then nothing
            await raw.stream.aclose()
            await server.done.wait()
            assert server.closes == [(1006, "the connection was lost")]
            await server.wait_closed()
            nursery.cancel_scope.cancel()


async def test_messages_before_an_abrupt_disconnect_are_still_delivered() -> None:
    got: list = []
    ready = trio.Event()

    async def slow(ws: wsserver.ServerConnection) -> None:
        await ready.wait()
        while True:
            got.append(await ws.get_message())

    with trio.fail_after(STEP_S):
        async with trio.open_nursery() as nursery:
            server = await Server(slow).start(nursery)
            raw = await RawClient.connect(server.port)
            await raw.send(frame(0x1, b"one"), frame(0x2, b"two"))
            await raw.stream.aclose()
            ready.set()
            await server.done.wait()
            assert got == ["one", b"two"]
            assert server.closes == [(1006, "the connection was lost")]
            nursery.cancel_scope.cancel()


# ---------------------------------------------------------------------- limits and faults


async def test_a_message_over_the_limit_is_closed_with_1009() -> None:
    limit = 1000
    with trio.fail_after(STEP_S):
        async with trio.open_nursery() as nursery:
            server = await Server(echo, max_message_size=limit).start(nursery)
            async with trio_client.open_websocket(server.url()) as ws:
                await ws.send_message("x" * limit)  # exactly the limit: fine
                assert await ws.get_message() == "x" * limit
                await ws.send_message("x" * (limit + 1))
                with pytest.raises(trio_client.ConnectionClosed) as closed:
                    await ws.get_message()
                assert closed.value.code == 1009
            await server.done.wait()
            assert server.closes == [(1009, f"Exceeded maximum message size: {limit} bytes")]
            await server.wait_closed()
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("frames", [
    # Characters under the limit, bytes over it: the limit is in UTF-8 bytes.
    [frame(0x1, "é".encode() * 501)],
    # Fragments that add up to more than the limit.
    [frame(0x2, b"a" * 600, fin=False), frame(0x0, b"b" * 600)],
    # A frame far over the limit, refused before most of it arrived.
    [frame(0x1, b"c" * 70_000)],
], ids=["utf8-bytes", "fragments", "huge-frame"])
async def test_the_limit_counts_bytes_over_all_fragments(frames) -> None:
    with trio.fail_after(STEP_S):
        async with trio.open_nursery() as nursery:
            server = await Server(echo, max_message_size=1000).start(nursery)
            raw = await RawClient.connect(server.port)
            data = b"".join(frames)
            await raw.send(data[:5000])
            event = await raw.next_event()
            assert isinstance(event, wsframes.Close) and event.code == 1009
            # The server reads on (dropping it) until the client answers the close.
            await raw.send(data[5000:] + frame(0x8, close_payload(1009)))
            assert await raw.ended()
            await server.done.wait()
            assert [code for code, _ in server.closes] == [1009]
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("bad, code", [
    (frame(0x1, b"unmasked", mask=False), 1002),
    (frame(0x1, b"rsv1", rsv=0x40), 1002),
    (frame(0x3, b"unknown opcode"), 1002),
    (frame(0x0, b"continues nothing"), 1002),
    (frame(0x9, b"fragmented ping", fin=False), 1002),
    (frame(0x9, b"p" * 126), 1002),
    (frame(0x1, b"part", fin=False) + frame(0x1, b"new message inside"), 1002),
    (frame(0x8, b"\x03"), 1002),
    (frame(0x8, close_payload(999)), 1002),
    (frame(0x1, b"\xff\xfe not UTF-8"), 1007),
    (frame(0x1, b"split \xc3", fin=False) + frame(0x0, b"("), 1007),
], ids=["unmasked", "rsv1", "opcode", "continuation", "fragmented-ping", "long-ping",
        "interleaved", "short-close", "close-code", "utf8", "utf8-split"])
async def test_bad_frames_are_closed_with_a_protocol_error(bad, code) -> None:
    seen: list = []
    with trio.fail_after(STEP_S):
        async with trio.open_nursery() as nursery:
            server = await Server(partial(echo, seen=seen)).start(nursery)
            raw = await RawClient.connect(server.port)
            await raw.send(frame(0x1, b"fine"))
            assert await raw.next_event() == wsframes.Message("fine")
            await raw.send(bad)
            event = await raw.next_event()
            assert isinstance(event, wsframes.Close) and event.code == code, event
            assert await raw.ended()
            await server.done.wait()
            assert seen == ["fine"]
            assert [c for c, _ in server.closes] == [code]
            await server.wait_closed()
            nursery.cancel_scope.cancel()


async def test_pings_are_answered_with_their_payload() -> None:
    with trio.fail_after(STEP_S):
        async with trio.open_nursery() as nursery:
            server = await Server(echo).start(nursery)
            raw = await RawClient.connect(server.port)
            await raw.send(frame(0x9), frame(0x9, b"x" * 125), frame(0xA, b"unsolicited"))
            assert await raw.next_event() == wsframes.Pong(b"")
            assert await raw.next_event() == wsframes.Pong(b"x" * 125)
            async with trio_client.open_websocket(server.url()) as ws, \
                    trio.open_nursery() as client:
                client.start_soon(ws.get_message)  # the reader, which sees the pongs
                for i in range(3):
                    await ws.ping(b"%d" % i)  # returns on the matching pong
                await ws.send_message("bye")  # echoed: the reader returns
            nursery.cancel_scope.cancel()


async def test_concurrent_senders_keep_every_message_whole_and_in_order() -> None:
    count = 150

    async def chatty(ws: wsserver.ServerConnection) -> None:
        async def sender(name: str) -> None:
            for i in range(count):
                body = f"{name}:{i}:" + name * (i * 997 % 40_000)
                if i % 3:
                    await ws.send_message(body)
                else:
                    await ws.send_messages([body, f"{name}:{i}:b"])

        async with trio.open_nursery() as inner:
            for name in "abc":
                inner.start_soon(sender, name)
            # This task reads (and so answers pings) while the others send.
            await ws.get_message()

    with trio.fail_after(STEP_S):
        async with trio.open_nursery() as nursery:
            server = await Server(chatty).start(nursery)
            async with trio_client.open_websocket(server.url()) as ws, \
                    trio.open_nursery() as client:
                pongs = 0
                pinged = trio.Event()

                async def pinger() -> None:
                    nonlocal pongs
                    for i in range(5):  # answered in between the senders' writes
                        await ws.ping(b"%d" % i)
                        pongs += 1
                    pinged.set()

                async def read_pongs() -> None:
                    with contextlib.suppress(trio_client.ConnectionClosed):
                        await ws.get_message()  # no message comes: the close ends it

                await trio.testing.wait_all_tasks_blocked()  # the senders filled the buffers
                client.start_soon(pinger)
                got: dict[str, list[str]] = {"a": [], "b": [], "c": []}
                expected = count + (count + 2) // 3
                while sum(map(len, got.values())) < 3 * expected:
                    text = await ws.get_message()
                    name, i, rest = text.split(":", 2)
                    assert rest in ("b", name * (int(i) * 997 % 40_000)), text[:40]
                    got[name].append(f"{i}:{'b' if rest == 'b' else ''}")
                for name, ids in got.items():
                    want = []
                    for i in range(count):
                        want.append(f"{i}:")
                        if i % 3 == 0:
                            want.append(f"{i}:b")
                    assert ids == want, name
                client.start_soon(read_pongs)  # pongs that came after the last message
                await pinged.wait()
                assert pongs == 5
                await ws.send_message("bye")
            await server.done.wait()
            nursery.cancel_scope.cancel()


# ---------------------------------------------------------------------- the upgrade


async def http_exchange(port: int, request: bytes) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request)
        return await read_until_closed(stream)


UPGRADE = (b"Host: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n")


@pytest.mark.parametrize("request_bytes, status", [
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    (b"POST /t HTTP/1.1\r\n" + UPGRADE + b"Sec-WebSocket-Version: 13\r\n\r\n", 400),
    (b"GET /t HTTP/1.1\r\n" + UPGRADE + b"Sec-WebSocket-Version: 8\r\n\r\n", 426),
    (b"GET /t HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
     b"Sec-WebSocket-Version: 13\r\n\r\n", 400),
    (b"\x16\x03\x01\x02\x00 not HTTP\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n", 431),
], ids=["plain-get", "post", "version", "no-key", "garbage", "huge-head"])
async def test_what_is_not_an_upgrade_is_answered_and_counted(request_bytes, status) -> None:
    with trio.fail_after(STEP_S):
        async with trio.open_nursery() as nursery:
            server = await Server(echo).start(nursery)
            answer = await http_exchange(server.port, request_bytes)
            assert answer.startswith(b"HTTP/1.1 %d " % status), answer[:80]
            if status == 426:
                assert b"Sec-WebSocket-Version: 13\r\n" in answer
            await server.wait_closed()
            assert server.listener.closed.by_reason["bad_handshake"] == 1
            assert server.finished == 0
            # An upgrade that is answered: the accept key of RFC 6455's example.
            ok = await http_exchange(server.port, b"GET /t HTTP/1.1\r\n" + UPGRADE
                                     + b"Sec-WebSocket-Version: 13\r\n\r\n" + frame(0x8))
            assert ok.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
            assert b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in ok
            nursery.cancel_scope.cancel()


async def test_a_handler_can_reject_the_upgrade() -> None:
    async def handler(request: wsserver.Request) -> None:
        assert request.path == "/nowhere?x=1"
        assert request.peer == "127.0.0.1"
        assert (b"upgrade", b"websocket") in request.headers
        await request.reject(404, body=b"unknown path\n")
        with pytest.raises(RuntimeError):
            await request.accept()

    listener = WebSocketListener(handler, limits=Limits(), closed=ClosedCounter(),
                                 max_message_size=LIMIT)
    with trio.fail_after(STEP_S):
        async with trio.open_nursery() as nursery:
            await nursery.start(listener.serve, "127.0.0.1", 0)
            with pytest.raises(trio_client.HandshakeError) as refused:
                async with trio_client.open_websocket(
                        f"ws://127.0.0.1:{listener.port}/nowhere?x=1"):
                    pass  # refused before the body: pytest.raises checks it
            assert refused.value.status == 404
            answer = await http_exchange(listener.port, b"GET /nowhere?x=1 HTTP/1.1\r\n"
                                         + UPGRADE + b"Sec-WebSocket-Version: 13\r\n\r\n")
            assert answer.startswith(b"HTTP/1.1 404 ")
            assert answer.endswith(b"\r\n\r\nunknown path\n")
            nursery.cancel_scope.cancel()


async def test_tls(tmp_path) -> None:
    pki = make_pki(tmp_path / "pki")
    server_context = tls.server_context(str(pki.cert), str(pki.key))

    def blocking(url: str) -> None:
        with blocking_client.connect(url, 10.0, ca_file=str(pki.ca)) as conn:
            for text in ("over TLS", "y" * 200_000):
                conn.send_text(text)
                assert conn.receive_message() == text

    with trio.fail_after(STEP_S):
        async with trio.open_nursery() as nursery:
            server = await Server(echo, ssl_context=server_context).start(nursery)
            url = server.url(scheme="wss")
            await trio.to_thread.run_sync(blocking, url)
            ws = await trio_client.connect(url, ssl_context=tls.client_context(str(pki.ca)))
            await ws.send_message("node over TLS")
            assert await ws.get_message() == "node over TLS"
            await ws.aclose()
            await server.wait_finished(2)
            assert server.closes == [(1000, ""), (1000, "")]
            await server.wait_closed()
            nursery.cancel_scope.cancel()
