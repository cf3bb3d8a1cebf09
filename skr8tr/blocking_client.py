"""The CLI's client of the conductor: one blocking socket, one request at a time.

A CLI run makes one or a few requests and exits, so it needs no event loop:
the WebSocket is :mod:`skr8tr.ws.blocking` (the standard library's sockets
under wsproto's framing). That keeps trio and h11 out of the CLI's start-up
and a round trip on an open connection well under 0.3 ms.

Failures are the :class:`~skr8tr.wire.ClientError` of the trio client
(:mod:`skr8tr.client`), with the same codes, exit statuses and texts:
UNREACHABLE (exit 3) when the conductor cannot be reached, refuses the
handshake, fails TLS verification or closes the connection; TIMEOUT (exit 3)
when a reply does not come in time; BAD_REPLY (exit 1) for a reply that cannot
be read; the conductor's own error code (exit 1) when it answers with one.
Ctrl-C (KeyboardInterrupt) is never caught here: it leaves at once, closing
the socket on the way out.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from skr8tr import wire
from skr8tr.wire import CallOptions, ClientError
from skr8tr.ws.blocking import Connection
from skr8tr.ws.blocking import connect as _connect
from skr8tr.ws.frames import ConnectionClosed, HandshakeError

if TYPE_CHECKING:
    from skr8tr.core import protocol

__all__ = [
    "CallOptions",
    "ClientError",
    "Connection",
    "ConnectionClosed",
    "WatchStream",
    "connect",
    "open_conductor",
    "call",
    "call_on",
    "open_watch",
]


def connect(url: str, timeout_s: float, *, ca_file: str | None = None) -> Connection:
    """Open the WebSocket at *url* (``ws://`` or ``wss://``) within *timeout_s*.

    A ``wss://`` conductor's certificate is verified against *ca_file* (PEM),
    or the system's trust store without one (:mod:`skr8tr.tls`).

    Raises ClientError: exit 2 for a malformed URL or a bad *ca_file*; exit 3
    (UNREACHABLE) when the connection, the TLS handshake or the WebSocket
    handshake fails or takes longer than *timeout_s*.
    """
    host, port, target = _split(url)
    ssl_context = wire.ssl_context_for(url, ca_file)
    tls_errors: tuple[type[Exception], ...] = ()
    if ssl_context is not None:
        from skr8tr.tls import TlsError

        tls_errors = (TlsError,)
    try:
        return _connect(host, port, target, time.monotonic() + timeout_s,
                        ssl_context=ssl_context, url=url,
                        max_message_bytes=wire.CLIENT_MAX_MESSAGE_BYTES)
    except TimeoutError:
        raise wire.unreachable(url, f"no answer within {timeout_s:g} s") from None
    except (HandshakeError, *tls_errors) as exc:
        raise wire.unreachable(url, str(exc)) from None
    except socket.gaierror as exc:
        raise wire.unreachable(url, (exc.strerror or str(exc)).lower()) from None
    except OSError as exc:
        raise wire.unreachable(url, _describe(exc)) from None


def _split(url: str) -> tuple[str, int, str]:
    """(host, port, request target) of a ws:// or wss:// URL; ClientError BAD_URL (exit 2)."""
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port
    except ValueError as exc:
        raise ClientError("BAD_URL", f"conductor URL {url!r}: {exc}", wire.EXIT_USAGE) from None
    if not host:
        raise ClientError("BAD_URL", f"conductor URL {url!r} has no host", wire.EXIT_USAGE)
    if port is None:
        port = 443 if parts.scheme == "wss" else 80
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return host, port, target


def _describe(exc: OSError) -> str:
    ssl = sys.modules.get("ssl")
    if ssl is not None and isinstance(exc, ssl.SSLError):
        from skr8tr import tls

        return tls.describe_failure(exc) or "TLS failed"
    why = os.strerror(exc.errno) if exc.errno else str(exc)
    return why.lower() or "handshake failed"


def open_conductor(
    base_url: str, path: str, timeout_s: float, *, ca_file: str | None = None
) -> Connection:
    """Connect to the conductor's *path*; use it as ``with open_conductor(...) as conn:``.

    Raises ClientError as :func:`connect` does (BAD_URL exit 2 for a URL that
    is not ws:// or wss://).
    """
    return connect(wire.endpoint_url(base_url, path), timeout_s, ca_file=ca_file)


# --------------------------------------------------------------------------- calls


def call(opts: CallOptions, cmd: str, args: dict) -> Any:
    """Send one request and return the reply's ``result``.

    Raises ClientError: exit 3 when the conductor cannot be reached or does not
    answer within the timeout, exit 1 when it answers with an error.
    """
    with open_conductor(opts.conductor, "/v1/cli", opts.timeout_s, ca_file=opts.ca_file) as conn:
        return call_on(conn, opts, cmd, args)


def call_on(conn: Connection, opts: CallOptions, cmd: str, args: dict) -> Any:
    """Like :func:`call`, on a connection that is already open (for polling loops)."""
    request = wire.build_request(cmd, args, opts.signing_key)
    url = wire.endpoint_url(opts.conductor, "/v1/cli")
    deadline = time.monotonic() + opts.timeout_s
    try:
        conn.send_text(json.dumps(request), deadline)
        reply = None
        while reply is None:  # replies to other requests are skipped
            reply = wire.match_reply(conn.receive_message(deadline), request["id"])
    except TimeoutError:
        raise wire.timed_out(url, opts.timeout_s) from None
    except ConnectionClosed as closed:
        raise wire.unreachable(url, f"the connection closed: {closed.close_reason}") from None
    return wire.result_of(reply)


class WatchStream:
    """Iterator over the messages of an open ``/v1/watch`` connection; a context manager.

    Iteration blocks until the next message and ends only with an error:
    ClientError UNREACHABLE when the stream closes, BAD_REPLY for a message
    that cannot be read.
    """

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    def __enter__(self) -> WatchStream:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._conn.__exit__(*exc_info)

    def __iter__(self) -> Iterator[protocol.WatchMessage]:
        return self

    def __next__(self) -> protocol.WatchMessage:
        try:
            raw = self._conn.receive_message()
        except ConnectionClosed as closed:
            raise wire.unreachable(self._conn.url,
                                   f"the stream closed: {closed.close_reason}") from None
        return wire.watch_message(raw)


def open_watch(opts: CallOptions) -> WatchStream:
    """Open ``/v1/watch``: ``with open_watch(opts) as stream: for msg in stream: ...``."""
    return WatchStream(
        open_conductor(opts.conductor, "/v1/watch", opts.timeout_s, ca_file=opts.ca_file)
    )
