"""The node agent's WebSocket connection to the conductor: :mod:`skr8tr.wsclient` on trio.

The agent used trio-websocket for this one client connection. That library
runs a reader task per connection and hands every message over a memory
channel (a scheduling round per message each way), and its import costs the
agent ~2 MB of its idle footprint. Here the task that asks for a message
reads the socket itself, and the sans-IO protocol of :mod:`skr8tr.wsclient`
(shared with the CLI's blocking client) does the framing.

One task reads (:meth:`Link.get_message`), any number may send
(:meth:`Link.send_message`, serialized by a lock); pings are answered by the
reader. Every way the connection can end surfaces as :class:`ConnectionClosed`
with the close code and reason (1006 when the stream just ended).
"""

from __future__ import annotations

import contextlib
import ssl
from urllib.parse import urlsplit

import trio

from skr8tr import wsclient
from skr8tr.tls import TlsError, describe_failure

RECEIVE_BYTES = 64 * 1024


class ConnectionClosed(Exception):
    """The connection is over: ``code`` and ``reason`` of the close (1006: no close frame)."""

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(f"code {code}" + (f": {reason}" if reason else ""))
        self.code = code
        self.reason = reason


HandshakeError = wsclient.HandshakeError


def split_url(url: str) -> tuple[bool, str, int, str]:
    """``(tls, host, port, path)`` of a ``ws://`` or ``wss://`` URL. Raises ValueError."""
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ValueError(f"not a ws:// or wss:// URL: {url!r}")
    tls = parts.scheme == "wss"
    port = parts.port or (443 if tls else 80)
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return tls, parts.hostname, port, path


async def connect(url: str, *, ssl_context: ssl.SSLContext | None = None,
                  max_message_bytes: int = wsclient.DEFAULT_MAX_MESSAGE_BYTES) -> Link:
    """Open a WebSocket to *url*. Raises OSError (connect), TlsError (the TLS
    handshake failed; the message says why), trio.BrokenResourceError,
    HandshakeError; bound it with ``fail_after``.

    The TLS handshake of a ``wss://`` URL is done first, on this connection,
    so that its failure is told apart from the WebSocket's."""
    tls, host, port, path = split_url(url)
    stream: trio.abc.Stream
    if tls:
        if ssl_context is None:
            raise ValueError(f"{url} needs an SSL context")
        stream = await trio.open_ssl_over_tcp_stream(host, port, ssl_context=ssl_context)
    else:
        stream = await trio.open_tcp_stream(host, port)
    try:
        if isinstance(stream, trio.SSLStream):
            await _tls_handshake(stream, host, port)
        host_header = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        proto = wsclient.ClientProtocol(host_header, path, max_message_bytes=max_message_bytes)
        await stream.send_all(proto.handshake_request())
        while True:
            data = await stream.receive_some(RECEIVE_BYTES)
            if not data:
                raise HandshakeError("the server closed the connection during the handshake")
            rest = proto.receive_handshake(data)
            if rest is not None:
                return Link(stream, proto, rest)
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise


async def _tls_handshake(stream: trio.SSLStream, host: str, port: int) -> None:
    try:
        await stream.do_handshake()
    except trio.BrokenResourceError as exc:
        why = describe_failure(exc) or f"TLS handshake with {host}:{port} failed"
        raise TlsError(why) from None


class Link:
    """An open client WebSocket; see the module docstring. Create it with :func:`connect`."""

    def __init__(self, stream: trio.abc.Stream, proto: wsclient.ClientProtocol,
                 rest: bytes) -> None:
        self._stream = stream
        self._proto = proto
        self._events: list[wsclient.Event] = []
        self._next = 0
        self._closed: ConnectionClosed | None = None
        self._send_lock = trio.StrictFIFOLock()
        if rest:
            self._events = proto.receive(rest)

    @property
    def local_address(self) -> str | None:
        """Our end's IP address (what the conductor sees us as), if the stream has one."""
        stream = self._stream
        if isinstance(stream, trio.SSLStream):
            stream = stream.transport_stream
        sock = getattr(stream, "socket", None)
        try:
            return str(sock.getsockname()[0]) if sock is not None else None
        except OSError:
            return None

    @property
    def closed(self) -> ConnectionClosed | None:
        """Why the connection ended, or None while it is open."""
        return self._closed

    async def get_message(self) -> str | bytes:
        """The next message. Raises ConnectionClosed once the connection is over."""
        while True:
            if self._closed is not None:
                raise self._closed_error()
            if self._next < len(self._events):
                event = self._events[self._next]
                self._next += 1
                if isinstance(event, wsclient.Message):
                    return event.data
                if isinstance(event, wsclient.Ping):
                    await self._send_raw(self._proto.reply_to(event))
                elif isinstance(event, wsclient.Close):
                    await self._on_close(event)
                continue
            self._events, self._next = [], 0
            try:
                data = await self._stream.receive_some(RECEIVE_BYTES)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                self._end(wsclient.ABNORMAL, "the connection was lost")
                continue
            self._events = self._proto.receive(data)

    async def send_message(self, message: str) -> None:
        """Send a text message. Raises ConnectionClosed if the connection is over."""
        if self._closed is not None:
            raise self._closed_error()
        if self._proto.close_sent:
            raise ConnectionClosed(1000, "this side is closing the connection")
        await self._send_raw(self._proto.encode_text(message))

    async def aclose(self, code: int = 1000, reason: str = "") -> None:
        """Close: send our close frame, wait for the server's, then close the stream.

        Bound it with ``move_on_after``; the stream is closed whatever happens.
        """
        try:
            if self._closed is None:
                await self._send_raw(self._proto.encode_close(code, reason))
                while self._closed is None:
                    try:
                        await self.get_message()
                    except ConnectionClosed:
                        break
        finally:
            if self._closed is None:
                self._end(code, reason)
            await trio.aclose_forcefully(self._stream)

    async def _on_close(self, event: wsclient.Close) -> None:
        reply = self._proto.reply_to(event)
        self._end(event.code, event.reason)
        if reply:
            # If the server is gone already, there is no one to tell.
            with contextlib.suppress(ConnectionClosed):
                await self._send_raw(reply, after_close=True)

    def _closed_error(self) -> ConnectionClosed:
        assert self._closed is not None
        return ConnectionClosed(self._closed.code, self._closed.reason)

    def _end(self, code: int, reason: str) -> None:
        if self._closed is None:
            self._closed = ConnectionClosed(code, reason)

    async def _send_raw(self, data: bytes, *, after_close: bool = False) -> None:
        if not data:
            return
        if self._closed is not None and not after_close:
            raise self._closed_error()
        try:
            self._send_lock.acquire_nowait()  # uncontended: no scheduling round here
        except trio.WouldBlock:
            await self._send_lock.acquire()
        try:
            await self._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._end(wsclient.ABNORMAL, "the connection was lost")
            raise self._closed_error() from None
        finally:
            self._send_lock.release()
