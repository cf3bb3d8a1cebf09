"""The server's side of a WebSocket: the HTTP upgrade (h11), then a :class:`ServerConnection`.

The upgrade goes through h11 rather than wsproto's server handshake so that
frames a client sends right behind its request are kept (wsproto's drops
them); the answers (101, a 4xx for what is not an upgrade, a handler's
reject) are formatted here. Framing is :mod:`skr8tr.ws.frames` (wsproto) and
the open connection follows the rules of :mod:`skr8tr.ws.connection`: no
reader task, one scheduling round per request.

A session::

    request = await read_request(stream, peer)  # HandshakeError: answered and to be closed
    ws = await request.accept()               # or: await request.reject(404, body=b"...")
    message = await ws.get_message()           # str for text, bytes for binary
    await ws.send_message(reply)
    await ws.aclose(1008, "too fast")          # or the peer closes: ConnectionClosed

Messages that many connections send alike (``/v1/watch``) can be framed once
with :func:`frame_text` and sent with :meth:`ServerConnection.send_frames`: a
server's frames are not masked, so the same bytes serve every connection.
"""

from __future__ import annotations

import contextlib
import http
from collections.abc import Iterable

import h11
import trio

from skr8tr.ws.connection import WRITE_CHUNK_BYTES, WebSocket
from skr8tr.ws.frames import (
    ABNORMAL_CLOSURE,
    DEFAULT_MAX_MESSAGE_BYTES,
    CloseReason,
    ConnectionClosed,
    HandshakeError,
    Protocol,
    accept_token,
    frame_text,
)

__all__ = [
    "ABNORMAL_CLOSURE",
    "WRITE_CHUNK_BYTES",
    "CloseReason",
    "ConnectionClosed",
    "HandshakeError",
    "Request",
    "ServerConnection",
    "frame_text",
    "read_request",
]

MAX_REQUEST_HEAD_BYTES = 16 * 1024


# ---------------------------------------------------------------------- the upgrade


async def read_request(stream: trio.abc.Stream, peer: str = "?", *,
                       max_message_size: int = DEFAULT_MAX_MESSAGE_BYTES) -> Request:
    """Read an HTTP upgrade request from *stream*; the caller answers it (accept/reject).

    *peer* names the client in logs (:attr:`ServerConnection.peer`). Raises
    :class:`HandshakeError` if the stream ends or breaks first, or carries
    something that is not a WebSocket upgrade (then answered with 400, 426 or
    431 before raising; ``status`` says which). The stream is left open for
    the caller to close. Bound it with a deadline: a silent peer is waited for.
    """
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD_BYTES)
    received = 0
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            await _answer(stream, exc.error_status_hint,
                          "expected a WebSocket upgrade (an HTTP/1.1 GET)\n")
            raise HandshakeError(f"not an HTTP request: {exc}", exc.error_status_hint) from None
        if isinstance(event, h11.Request):
            break
        if isinstance(event, h11.ConnectionClosed):
            raise HandshakeError("the connection closed before a request")
        try:
            # h11 measures only an incomplete head: never hand it more than the limit.
            data = await stream.receive_some(max(1, MAX_REQUEST_HEAD_BYTES + 1 - received))
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise HandshakeError(f"the connection broke before a request: {exc!r}") from None
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
        raise HandshakeError(f"not a WebSocket upgrade: {problem}", status)
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

    async def accept(self, *, max_message_size: int | None = None) -> ServerConnection:
        """Answer 101 and return the open connection, whose messages may be at most
        *max_message_size* bytes (default: the listener's). Raises ConnectionClosed if the
        peer is gone, RuntimeError if the request was answered already."""
        self._answering()
        accept = accept_token(self._key)
        ws = ServerConnection(self.stream, self.peer, trailing=self._trailing,
                              max_message_size=max_message_size or self._max_message_size)
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


class ServerConnection(WebSocket):
    """An accepted WebSocket (made by :meth:`Request.accept`); see :mod:`skr8tr.ws.connection`."""

    def __init__(self, stream: trio.abc.Stream, peer: str = "?", *, trailing: bytes = b"",
                 max_message_size: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        super().__init__(stream, Protocol(client=False, max_message_bytes=max_message_size),
                         peer=peer, received=trailing)

    @property
    def max_message_size(self) -> int:
        return self.max_message_bytes

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
