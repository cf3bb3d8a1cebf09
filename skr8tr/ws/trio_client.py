"""The Trio WebSocket client: :func:`connect` / :func:`open_websocket` to a ``ws://`` or
``wss://`` URL, then a :class:`ClientConnection`.

The node agent's link to the conductor, the trio client of the conductor
(:mod:`skr8tr.client`, used by the ingress and the benchmarks) and the tests
use it. It has no reader task: the task that asks for a message reads the
socket itself (the rules of :mod:`skr8tr.ws.connection`), and pings are
answered by the reader. The opening handshake is the hand-written one of
:class:`skr8tr.ws.frames.ClientProtocol`, so importing this module loads
neither h11 nor wsproto's handshake: an idle node agent stays small.

A ``wss://`` URL's TLS handshake is done first, on its own, so that a
certificate that does not verify is told apart from a WebSocket that was
refused (:class:`skr8tr.tls.TlsError`, saying why).
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

import trio

from skr8tr.tls import TlsError, describe_failure
from skr8tr.ws.connection import RECEIVE_BYTES, WebSocket
from skr8tr.ws.frames import (
    DEFAULT_MAX_MESSAGE_BYTES,
    ClientProtocol,
    ConnectionClosed,
    HandshakeError,
)

__all__ = [
    "DISCONNECT_TIMEOUT_S",
    "ClientConnection",
    "ConnectionClosed",
    "HandshakeError",
    "TlsError",
    "connect",
    "open_websocket",
    "split_url",
]

DISCONNECT_TIMEOUT_S = 2.0  # for the server's answer to our close frame, in open_websocket


def split_url(url: str) -> tuple[bool, str, int, str]:
    """``(tls, host, port, request target)`` of a ``ws://`` or ``wss://`` URL.

    Raises ValueError for another scheme, no host or a bad port.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ValueError(f"not a ws:// or wss:// URL: {url!r}")
    tls = parts.scheme == "wss"
    port = parts.port or (443 if tls else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return tls, parts.hostname, port, target


class ClientConnection(WebSocket):
    """An open client WebSocket; made by :func:`connect`. See :mod:`skr8tr.ws.connection`."""

    @property
    def local_address(self) -> str | None:
        """Our end's IP address (what the server sees us as), if the stream has one."""
        stream = self.stream
        if isinstance(stream, trio.SSLStream):
            stream = stream.transport_stream
        sock = getattr(stream, "socket", None)
        try:
            return str(sock.getsockname()[0]) if sock is not None else None
        except OSError:
            return None


async def connect(url: str, *, ssl_context: ssl.SSLContext | None = None,
                  headers: list[tuple[str, str]] | None = None,
                  max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> ClientConnection:
    """Open a WebSocket to *url*, sending *headers* with the upgrade request.

    A ``wss://`` URL needs *ssl_context*, which verifies the server. Raises
    ValueError for a bad URL or a ``wss://`` one without a context, OSError when the connection
    fails, TlsError when the TLS handshake does (the message says why),
    HandshakeError when the server refuses the upgrade or answers wrongly.
    Bound it with ``fail_after``; the stream is closed on any failure.
    """
    tls, host, port, target = split_url(url)
    stream: trio.abc.Stream
    if tls:
        if ssl_context is None:
            raise ValueError(f"{url} needs an SSL context (skr8tr.tls.client_context)")
        stream = await trio.open_ssl_over_tcp_stream(host, port, ssl_context=ssl_context)
    else:
        stream = await trio.open_tcp_stream(host, port)
    try:
        if isinstance(stream, trio.SSLStream):
            try:
                await stream.do_handshake()
            except trio.BrokenResourceError as exc:
                why = describe_failure(exc) or f"TLS handshake with {host}:{port} failed"
                raise TlsError(why) from None
        shown = f"[{host}]" if ":" in host else host
        host_header = shown if port == (443 if tls else 80) else f"{shown}:{port}"
        proto = ClientProtocol(host_header, target, headers=headers,
                               max_message_bytes=max_message_bytes)
        await stream.send_all(proto.handshake_request())
        while True:
            try:
                data = await stream.receive_some(RECEIVE_BYTES)
            except trio.BrokenResourceError:
                data = b""
            if not data:
                raise HandshakeError("the server closed the connection during the handshake")
            rest = proto.receive_handshake(data)
            if rest is not None:
                return ClientConnection(stream, proto, peer=f"{shown}:{port}", received=rest)
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise


@asynccontextmanager
async def open_websocket(url: str, *, ssl_context: ssl.SSLContext | None = None,
                         headers: list[tuple[str, str]] | None = None,
                         max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                         ) -> AsyncIterator[ClientConnection]:
    """:func:`connect`, closed on the way out (the close handshake waits at most
    :data:`DISCONNECT_TIMEOUT_S`). Raises what connect raises; bound it yourself."""
    ws = await connect(url, ssl_context=ssl_context, headers=headers,
                       max_message_bytes=max_message_bytes)
    try:
        yield ws
    finally:
        with trio.move_on_after(DISCONNECT_TIMEOUT_S):
            await ws.aclose()
