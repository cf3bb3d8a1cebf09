"""The conductor's side of a WebSocket: wsproto on a trio stream, with no reader task.

Why it exists: the conductor used trio-websocket, which runs a reader task per
connection (socket -> wsproto -> a memory channel -> ``get_message`` in the
handler's task) and whose ``send_message`` always yields at its lock before
writing. A ``ping`` on an open ``/v1/cli`` connection cost ~300 µs of which
the conductor's own work was ~16 µs: the rest was those scheduling rounds.
Here the task that asks for a message reads the socket itself, feeds wsproto
and returns the next message; a send writes at once when nobody else is
sending. That leaves one scheduling round per request (trio's own, after the
write) instead of three or more.

wsproto does the framing (frame parsing, masking, UTF-8 checks, close codes);
h11 parses the upgrade request, and the answers (101, a 4xx for what is not an
upgrade, a handler's reject) are formatted here. The upgrade goes through h11
rather than wsproto's handshake so that frames a client sends right behind
its request are kept (wsproto's server handshake drops them).

A session::

    request = await read_request(stream, peer)  # BadHandshake: answered and to be closed
    ws = await request.accept()               # or: await request.reject(404, body=b"...")
    message = await ws.get_message()           # str for text, bytes for binary
    await ws.send_message(reply)
    await ws.aclose(1008, "too fast")          # or the peer closes: ConnectionClosed

Rules of use:

- One task reads at a time (:meth:`ServerConnection.get_message`); any number
  may send (:meth:`~ServerConnection.send_message`,
  :meth:`~ServerConnection.send_messages`), serialized by a lock that is
  taken without a scheduling round when it is free.
- The reader answers pings and close frames. A handler busy with a command
  answers a ping when it next reads; no client of the conductor pings.
  :attr:`ServerConnection.last_received` says when the peer last sent
  anything (a pong included), for keep-alive checks with
  :meth:`~ServerConnection.send_ping`.
- Messages that many connections send alike (``/v1/watch``) can be framed
  once with :func:`frame_text` and sent with
  :meth:`~ServerConnection.send_frames`: a server's frames are not masked, so
  the same bytes serve every connection.
- A write goes to the stream in pieces of at most :data:`WRITE_CHUNK_BYTES`,
  so that a TLS stream never holds more than that of it encrypted for a
  peer that does not read.
- A message over ``max_message_size`` bytes (UTF-8 for text) is refused with
  close code 1009, a frame that breaks RFC 6455 with 1002 (1007: text that is
  not UTF-8). The peer's own close is answered with its code.
- Every way the connection ends surfaces as :class:`ConnectionClosed`
  carrying the close code and reason: the peer's close, ours, a limit, or
  1006 when the stream ended or broke without a close frame. Messages that
  arrived before the peer's close are still returned first; once this side
  starts a close (``aclose`` or a limit), pending messages are dropped.
- :meth:`~ServerConnection.aclose` does the closing handshake and always
  closes the stream, also when cancelled; bound it with ``move_on_after``.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http
import struct
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

import h11
import trio
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, TextMessage

__all__ = [
    "BadHandshake",
    "CloseReason",
    "ConnectionClosed",
    "Request",
    "ServerConnection",
    "frame_text",
    "read_request",
]

RECEIVE_BYTES = 64 * 1024
# What a stuck write may hold of its own per connection; a TLS record's size.
WRITE_CHUNK_BYTES = 16 * 1024
MAX_REQUEST_HEAD_BYTES = 16 * 1024
DEFAULT_MAX_MESSAGE_BYTES = 1024 * 1024
ABNORMAL_CLOSURE = 1006
_ACCEPT_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

_CLOSE_CODE_NAMES = {
    1000: "NORMAL_CLOSURE", 1001: "GOING_AWAY", 1002: "PROTOCOL_ERROR",
    1003: "UNSUPPORTED_DATA", 1005: "NO_STATUS_RCVD", 1006: "ABNORMAL_CLOSURE",
    1007: "INVALID_FRAME_PAYLOAD_DATA", 1008: "POLICY_VIOLATION", 1009: "MESSAGE_TOO_BIG",
    1010: "MANDATORY_EXT", 1011: "INTERNAL_ERROR", 1012: "SERVICE_RESTART",
    1013: "TRY_AGAIN_LATER", 1015: "TLS_HANDSHAKE_FAILED",
}


@dataclass(frozen=True, slots=True)
class CloseReason:
    """Why a connection ended: the close code (1006: no close frame) and its reason."""

    code: int
    reason: str = ""

    @property
    def name(self) -> str:
        """The RFC 6455 name of the code (the names wsproto and trio-websocket print)."""
        return _CLOSE_CODE_NAMES.get(self.code, "UNKNOWN")


class ConnectionClosed(Exception):
    """The connection is over, or this side is closing it: ``code`` and ``reason`` say why."""

    def __init__(self, code: int, reason: str = "") -> None:
        self.code = code
        self.reason = reason
        super().__init__(f"WebSocket closed with {code} ({CloseReason(code).name})"
                         + (f": {reason}" if reason else ""))


class BadHandshake(Exception):
    """The peer did not open a WebSocket; when it spoke HTTP it was answered with a 4xx.

    The stream is left open for the caller to close.
    """


def frame_text(text: str) -> bytes:
    """*text* as one unmasked, unfragmented text frame (RFC 6455 §5.2): the bytes a
    server sends for it, the same on every connection without extensions."""
    payload = text.encode()
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x81, n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", 0x81, 126, n)
    else:
        head = struct.pack("!BBQ", 0x81, 127, n)
    return head + payload


# ---------------------------------------------------------------------- the upgrade


async def read_request(stream: trio.abc.Stream, peer: str = "?", *,
                       max_message_size: int = DEFAULT_MAX_MESSAGE_BYTES) -> Request:
    """Read an HTTP upgrade request from *stream*; the caller answers it (accept/reject).

    *peer* names the client in logs (:attr:`ServerConnection.peer`). Raises
    :class:`BadHandshake` if the stream ends or breaks first, or carries
    something that is not a WebSocket upgrade (then answered with 400, 426 or
    431 before raising). Bound it with a deadline: a silent peer is waited for.
    """
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD_BYTES)
    received = 0
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            await _answer(stream, exc.error_status_hint,
                          "expected a WebSocket upgrade (an HTTP/1.1 GET)\n")
            raise BadHandshake(f"not an HTTP request: {exc}") from None
        if isinstance(event, h11.Request):
            break
        if isinstance(event, h11.ConnectionClosed):
            raise BadHandshake("the connection closed before a request")
        try:
            # h11 measures only an incomplete head: never hand it more than the limit.
            data = await stream.receive_some(max(1, MAX_REQUEST_HEAD_BYTES + 1 - received))
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise BadHandshake(f"the connection broke before a request: {exc!r}") from None
        received += len(data)
        conn.receive_data(data)

    headers = [(bytes(name), bytes(value)) for name, value in event.headers]
    fields: dict[bytes, bytes] = {}
    for name, value in headers:
        fields[name] = fields[name] + b", " + value if name in fields else value

    def tokens(name: bytes) -> set[bytes]:
        return {t.strip().lower() for t in fields.get(name, b"").split(b",")}

    problem, status, extra = "", 400, b""
    if event.method != b"GET":
        problem = f"method {event.method.decode('ascii', 'replace')} (a WebSocket upgrade is a GET)"
    elif b"websocket" not in tokens(b"upgrade") or b"upgrade" not in tokens(b"connection"):
        problem = "no `Upgrade: websocket` and `Connection: Upgrade`"
    elif fields.get(b"sec-websocket-version") != b"13":
        problem, status = "Sec-WebSocket-Version is not 13", 426
        extra = b"Sec-WebSocket-Version: 13\r\n"
    elif not fields.get(b"sec-websocket-key"):
        problem = "no Sec-WebSocket-Key"
    if problem:
        await _answer(stream, status, f"expected a WebSocket upgrade: {problem}\n", extra)
        raise BadHandshake(f"not a WebSocket upgrade: {problem}")
    trailing, _ = conn.trailing_data
    return Request(stream, peer, event.target.decode("ascii", "replace"), headers,
                   fields[b"sec-websocket-key"], trailing, max_message_size)


class Request:
    """A WebSocket upgrade request, read but not answered yet."""

    def __init__(self, stream: trio.abc.Stream, peer: str, path: str,
                 headers: list[tuple[bytes, bytes]], key: bytes, trailing: bytes,
                 max_message_size: int) -> None:
        self.stream = stream
        self.peer = peer
        #: The request target, query included.
        self.path = path
        #: Header (lowercase name, value) pairs as sent.
        self.headers = headers
        #: The connection, once accepted.
        self.connection: ServerConnection | None = None
        self._key = key
        self._trailing = trailing
        self._max_message_size = max_message_size
        self._answered = False

    async def accept(self) -> ServerConnection:
        """Answer 101 and return the open connection. Raises ConnectionClosed if the
        peer is gone, RuntimeError if the request was answered already."""
        self._answering()
        accept = base64.b64encode(hashlib.sha1(self._key + _ACCEPT_GUID).digest())
        ws = ServerConnection(self.stream, self.peer, trailing=self._trailing,
                              max_message_size=self._max_message_size)
        self.connection = ws
        await ws._write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                        b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n")
        return ws

    async def reject(self, status: int, *, body: bytes = b"") -> None:
        """Answer with HTTP *status* and *body* (plain text); the stream is then closed."""
        self._answering()
        try:
            await _answer(self.stream, status, body)
        finally:
            await _close_stream(self.stream)

    async def aclose(self) -> None:
        """End whatever this request became: the connection's closing handshake, or
        just the stream. Bound it with ``move_on_after``."""
        if self.connection is not None:
            await self.connection.aclose()
        else:
            await _close_stream(self.stream)

    def _answering(self) -> None:
        if self._answered:
            raise RuntimeError("this upgrade request was answered already")
        self._answered = True


async def _answer(stream: trio.abc.Stream, status: int, body: str | bytes,
                  extra_headers: bytes = b"") -> None:
    """An HTTP answer that ends the exchange; a peer that is gone is not an error."""
    if isinstance(body, str):
        body = body.encode()
    try:
        phrase = http.HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    head = (f"HTTP/1.1 {status} {phrase}\r\nContent-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n").encode("latin-1")
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await stream.send_all(head + extra_headers + b"\r\n" + body)


async def _close_stream(stream: trio.abc.Stream) -> None:
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await stream.aclose()


# ---------------------------------------------------------------------- the connection


class ServerConnection:
    """An accepted WebSocket; see the module docstring. Made by :meth:`Request.accept`."""

    def __init__(self, stream: trio.abc.Stream, peer: str = "?", *, trailing: bytes = b"",
                 max_message_size: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        self.stream = stream
        #: The client's address, for logs.
        self.peer = peer
        self.max_message_size = max_message_size
        self._proto = Connection(ConnectionType.SERVER, trailing_data=trailing)
        self._messages: deque[str | bytes] = deque()
        self._parts: list[str | bytes] = []
        self._size = 0
        self._closed: CloseReason | None = None
        self._readable = True  # False once the stream ended or the parser gave up
        self._backlog = bool(trailing)  # wsproto may hold events not handled yet
        self._reading = False
        self._broken = False  # a write failed part-way: nothing more may be written
        self._send_lock = trio.StrictFIFOLock()
        #: When (``trio.current_time()``) bytes last came from the peer.
        self.last_received = trio.current_time()

    @property
    def closed(self) -> CloseReason | None:
        """Why the connection ended or is ending; None while it is open."""
        return self._closed

    # ------------------------------------------------------------------ receiving

    async def get_message(self) -> str | bytes:
        """The next message: ``str`` for text, ``bytes`` for binary.

        Raises ConnectionClosed once the connection is over and every message
        received before the peer's close was returned. Cancelling it loses
        nothing: what was read stays for the next call. Raises
        trio.BusyResourceError if another task is reading.
        """
        if self._reading:
            raise trio.BusyResourceError("another task is reading this WebSocket")
        self._reading = True
        try:
            while True:
                if self._messages:
                    await trio.lowlevel.checkpoint_if_cancelled()
                    return self._messages.popleft()
                if self._closed is not None or not self._readable:
                    await trio.lowlevel.checkpoint_if_cancelled()
                    raise self._closed_error()
                await self._receive()
        finally:
            self._reading = False

    async def _receive(self) -> None:
        """Read once (unless wsproto holds unhandled events) and handle the events."""
        if not self._backlog:
            try:
                data = await self.stream.receive_some(RECEIVE_BYTES)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                self._readable = False
                self._end(ABNORMAL_CLOSURE, "the connection was lost")
                return
            self.last_received = trio.current_time()
            self._proto.receive_data(data)
            self._backlog = True
        await self._handle_events()
        self._backlog = False

    async def _handle_events(self) -> None:
        proto = self._proto
        for event in proto.events():
            kind = type(event)
            if kind is TextMessage or kind is BytesMessage:
                if self._closed is None:
                    await self._on_data(event)  # type: ignore[arg-type]
            elif kind is Ping:
                if self._closed is None:
                    await self._write(proto.send(event.response()))  # type: ignore[union-attr]
            elif kind is CloseConnection:
                assert isinstance(event, CloseConnection)
                if proto.state is ConnectionState.REMOTE_CLOSING:
                    # The peer closes: echo its code; the stream is closed by aclose.
                    self._readable = False
                    self._end(event.code, event.reason or "")
                    with contextlib.suppress(ConnectionClosed):
                        await self._write(proto.send(event.response()), closing=True)
                elif proto.state is ConnectionState.CLOSED:
                    self._readable = False  # the answer to our close
                else:
                    # wsproto could not parse a frame (its state did not move):
                    # nothing after it can be read.
                    self._readable = False
                    await self._fail(event.code, event.reason or "")
                return

    async def _on_data(self, event: TextMessage | BytesMessage) -> None:
        data = event.data
        if isinstance(data, str):
            self._size += len(data) if data.isascii() else len(data.encode())
        else:
            data = bytes(data)
            self._size += len(data)
        if self._size > self.max_message_size:
            await self._fail(1009, f"Exceeded maximum message size: {self.max_message_size} "
                                   "bytes")
            return
        if not event.message_finished:
            self._parts.append(data)
            return
        if self._parts:
            self._parts.append(data)
            data = "".join(self._parts) if isinstance(data, str) else b"".join(self._parts)  # type: ignore[arg-type]
            self._parts = []
        self._size = 0
        self._messages.append(data)

    async def _fail(self, code: int, reason: str) -> None:
        """The peer broke a rule: say so with *code* and stop taking its messages."""
        if self._closed is not None:
            return
        self._end(code, reason)
        self._messages.clear()
        self._parts = []
        with contextlib.suppress(ConnectionClosed):
            await self._write(self._proto.send(CloseConnection(code, reason)), closing=True)

    # ------------------------------------------------------------------ sending

    async def send_message(self, message: str | bytes) -> None:
        """Send one message (text for ``str``, binary for ``bytes``).

        Writes before any scheduling round when nobody else is sending. Raises
        ConnectionClosed if the connection is over or closing.
        """
        if self._closed is not None:
            raise self._closed_error()
        if isinstance(message, str):
            event: TextMessage | BytesMessage = TextMessage(data=message)
        else:
            event = BytesMessage(data=message)
        await self._write(self._proto.send(event))

    async def send_messages(self, texts: Iterable[str]) -> None:
        """Send *texts* as that many text messages, in one write to the socket.

        On loopback each write wakes the peer and can cost the conductor ~100 µs
        when the machine is busy; a command publishes several events at once,
        and a rollout batch queues several launches for a node, so they go
        together. What is sent this way goes out before a send started later
        in the same scheduling round. Raises ConnectionClosed like send_message.
        """
        if self._closed is not None:
            raise self._closed_error()
        proto = self._proto
        await self._write(b"".join(proto.send(TextMessage(data=text)) for text in texts))

    async def send_frames(self, frames: Iterable[bytes]) -> int:
        """Send frames made by :func:`frame_text`, in order, several to a write up to
        :data:`WRITE_CHUNK_BYTES` (a larger frame alone, never copied); returns the
        bytes written. Each write takes the send lock anew, so that a ping or a close
        can go out between them. Raises ConnectionClosed like send_message.
        """
        if self._closed is not None:
            raise self._closed_error()
        written = 0
        batch: list[bytes] = []
        size = 0
        for frame in frames:
            if batch and size + len(frame) > WRITE_CHUNK_BYTES:
                await self._write(batch[0] if len(batch) == 1 else b"".join(batch))
                written += size
                batch, size = [], 0
            batch.append(frame)
            size += len(frame)
        if batch:
            await self._write(batch[0] if len(batch) == 1 else b"".join(batch))
            written += size
        return written

    async def send_ping(self, payload: bytes = b"") -> None:
        """Send a ping; its pong moves :attr:`last_received` when a task reads.
        Raises ConnectionClosed like send_message."""
        if self._closed is not None:
            raise self._closed_error()
        await self._write(self._proto.send(Ping(payload)))

    async def _write(self, data: bytes, *, closing: bool = False) -> None:
        """Write *data* whole, or mark the connection broken.

        *closing* lets a close frame go out after ``closed`` was set.
        """
        if self._broken or (self._closed is not None and not closing):
            raise self._closed_error()
        lock = self._send_lock
        try:
            lock.acquire_nowait()  # uncontended: no scheduling round here
        except trio.WouldBlock:
            await lock.acquire()
        try:
            if self._broken:
                raise self._closed_error()
            # Cancelled here nothing was written; later, a part may have been.
            await trio.lowlevel.checkpoint_if_cancelled()
            try:
                if len(data) <= WRITE_CHUNK_BYTES:
                    await self.stream.send_all(data)
                else:
                    view = memoryview(data)
                    for start in range(0, len(view), WRITE_CHUNK_BYTES):
                        await self.stream.send_all(view[start:start + WRITE_CHUNK_BYTES])
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._broken = True
                self._end(ABNORMAL_CLOSURE, "the connection was lost")
                raise self._closed_error() from None
            except BaseException:
                self._broken = True  # cancelled part-way: the framing is lost
                self._end(ABNORMAL_CLOSURE, "a write was interrupted")
                raise
        finally:
            lock.release()

    # ------------------------------------------------------------------ closing

    async def aclose(self, code: int = 1000, reason: str = "") -> None:
        """Close with *code* and *reason*: our close frame (unless a close went either
        way already), the peer's answer (messages meanwhile are dropped), then
        the stream.

        Idempotent; never raises ConnectionClosed. The stream is closed
        whatever happens, cancellation included. If another task is reading,
        the peer's answer is not waited for.
        """
        try:
            if self._closed is None:
                self._end(code, reason)
                self._messages.clear()
                self._parts = []
                await self._write(self._proto.send(CloseConnection(code, reason)),
                                  closing=True)
            while self._readable and not self._reading and not self._broken:
                await self._receive()
        except ConnectionClosed:
            pass  # the peer answered our close (or left): what aclose waits for
        finally:
            self._readable = False
            await _close_stream(self.stream)

    def _end(self, code: int, reason: str) -> None:
        if self._closed is None:
            self._closed = CloseReason(code, reason)

    def _closed_error(self) -> ConnectionClosed:
        closed = self._closed or CloseReason(ABNORMAL_CLOSURE, "the connection was lost")
        return ConnectionClosed(closed.code, closed.reason)
