"""The CLI's client: one blocking socket, one request at a time (DESIGN.md §1, §4).

A CLI run makes one or a few requests and exits, so it needs no event loop:
the standard library's :mod:`socket` (and :mod:`ssl` for ``wss://``, imported
only then) under the sans-IO WebSocket of :mod:`skr8tr.wsclient`. That keeps
trio and trio-websocket out of the CLI's start-up and takes a round trip on an
open connection from ~0.3 ms to well under that.

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

import contextlib
import json
import os
import socket
import sys
import time
from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from skr8tr import wire, wsclient
from skr8tr.wire import CallOptions, ClientError

if TYPE_CHECKING:
    import ssl

    from skr8tr.core import protocol

__all__ = [
    "CallOptions",
    "ClientError",
    "Closed",
    "Connection",
    "WatchStream",
    "connect",
    "open_conductor",
    "call",
    "call_on",
    "open_watch",
]

RECEIVE_BYTES = 65536
DISCONNECT_TIMEOUT_S = 2.0  # for the server's answer to our close frame


class Closed(Exception):
    """The WebSocket is closed; ``reason`` describes how, as messages print it."""

    def __init__(self, code: int, reason: str | None) -> None:
        self.code = code
        self.reason = (
            f"CloseReason<code={code}, name={wsclient.close_code_name(code)}, "
            f"reason={reason or None}>"
        )
        super().__init__(self.reason)


class Connection:
    """An open WebSocket to the conductor over a blocking socket; a context manager.

    Leaving the ``with`` block normally does the close handshake; leaving it
    with an exception (Ctrl-C included) only sends a close frame if it can at
    once, and closes the socket.
    """

    def __init__(
        self, sock: socket.socket, proto: wsclient.ClientProtocol, url: str, pending: bytes = b""
    ) -> None:
        self.url = url
        self._sock: socket.socket | None = sock
        self._proto = proto
        self._messages: deque[str | bytes] = deque()
        self._closed: Closed | None = None
        self._feed(pending)

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def send_text(self, text: str, deadline: float | None = None) -> None:
        """Send one text message. Raises Closed, or TimeoutError past *deadline*
        (a :func:`time.monotonic` value; None waits as long as it takes)."""
        if self._closed is not None:
            raise self._closed
        self._send(self._proto.encode_text(text), deadline)

    def receive_message(self, deadline: float | None = None) -> str | bytes:
        """The next message (str for text, bytes for binary), answering pings on the way.

        Raises Closed when the connection is closed (by the server, by a
        protocol failure, or by the network), TimeoutError past *deadline*.
        """
        while not self._messages:
            if self._closed is not None:
                raise self._closed
            sock = self._socket(deadline)
            try:
                data = sock.recv(RECEIVE_BYTES)
            except TimeoutError:
                raise
            except OSError:
                data = b""
            if data:
                self._feed(data)
            else:  # the TCP connection ended without a close frame
                self._closed = Closed(wsclient.ABNORMAL, None)
        return self._messages.popleft()

    def close(self) -> None:
        """The close handshake (waiting at most DISCONNECT_TIMEOUT_S); never raises."""
        if self._sock is None:
            return
        deadline = time.monotonic() + DISCONNECT_TIMEOUT_S
        try:
            if self._closed is None:
                self._send(self._proto.encode_close(1000), deadline)
                while True:  # until the server's close frame; later messages are dropped
                    self.receive_message(deadline)
        except (Closed, OSError):
            pass  # the answer to our close, or the server gone: either way, done
        finally:
            self._release()

    def abort(self) -> None:
        """Send a close frame if the socket takes it at once, then close the socket."""
        if self._sock is None:
            return
        try:
            if self._closed is None:
                self._sock.settimeout(0)
                self._sock.send(self._proto.encode_close(1000))
        except OSError:
            pass  # best effort on the way out: the socket is closed next anyway
        finally:
            self._release()

    def _feed(self, data: bytes) -> None:
        for event in self._proto.receive(data):
            if isinstance(event, wsclient.Message):
                self._messages.append(event.data)
                continue
            answer = self._proto.reply_to(event)  # a pong, or the close handshake's answer
            if answer:
                with contextlib.suppress(Closed, OSError):  # the close is reported anyway
                    self._send(answer, time.monotonic() + DISCONNECT_TIMEOUT_S)
            if isinstance(event, wsclient.Close):
                self._closed = Closed(event.code, event.reason)

    def _send(self, data: bytes, deadline: float | None) -> None:
        sock = self._socket(deadline)
        try:
            sock.sendall(data)
        except TimeoutError:
            raise
        except OSError:
            self._closed = Closed(wsclient.ABNORMAL, None)
            raise self._closed from None

    def _socket(self, deadline: float | None) -> socket.socket:
        """The socket, its timeout set to what is left until *deadline*."""
        if self._sock is None:
            raise self._closed or Closed(wsclient.ABNORMAL, None)
        if deadline is None:
            self._sock.settimeout(None)
        else:
            _settimeout(self._sock, deadline)
        return self._sock

    def _release(self) -> None:
        sock, self._sock = self._sock, None
        if self._closed is None:
            self._closed = Closed(1000, None)
        if sock is not None:
            sock.close()


# --------------------------------------------------------------------------- connecting


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
    deadline = time.monotonic() + timeout_s
    sock: socket.socket | None = None
    try:
        sock = _open_tcp(url, host, port, deadline)
        if ssl_context is not None:
            sock = _start_tls(url, sock, ssl_context, host, port, deadline)
        name = f"[{host}]" if ":" in host else host
        proto = wsclient.ClientProtocol(
            name if port in (80, 443) else f"{name}:{port}",
            target,
            max_message_bytes=wire.CLIENT_MAX_MESSAGE_BYTES,
        )
        _settimeout(sock, deadline)
        sock.sendall(proto.handshake_request())
        pending = None
        while pending is None:
            _settimeout(sock, deadline)
            data = sock.recv(RECEIVE_BYTES)
            if not data:
                raise wire.unreachable(url, "the connection closed during the handshake")
            pending = proto.receive_handshake(data)
    except TimeoutError:
        _close(sock)
        raise wire.unreachable(url, f"no answer within {timeout_s:g} s") from None
    except wsclient.HandshakeError as exc:
        _close(sock)
        raise wire.unreachable(url, str(exc)) from None
    except OSError as exc:
        _close(sock)
        raise wire.unreachable(url, _describe(exc)) from None
    except BaseException:
        _close(sock)
        raise
    return Connection(sock, proto, url, pending)


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


def _open_tcp(url: str, host: str, port: int, deadline: float) -> socket.socket:
    """A TCP connection to the first address of *host* that answers."""
    # An ASCII name goes as bytes: a str would load the IDNA codec (~1 ms) for nothing.
    name: str | bytes = host.encode("ascii") if host.isascii() else host
    try:
        addresses = socket.getaddrinfo(name, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise wire.unreachable(url, (exc.strerror or str(exc)).lower()) from None
    for family, kind, proto, _, address in addresses:
        sock = socket.socket(family, kind, proto)
        try:
            _settimeout(sock, deadline)
            sock.connect(address)
        except TimeoutError:
            sock.close()
            raise
        except OSError:
            sock.close()
            continue
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    raise wire.unreachable(url, f"all attempts to connect to {shown} failed".lower())


def _start_tls(
    url: str, sock: socket.socket, context: ssl.SSLContext, host: str, port: int, deadline: float
) -> socket.socket:
    """The TLS handshake on *sock*; a certificate that does not verify is UNREACHABLE."""
    import ssl

    from skr8tr import tls

    _settimeout(sock, deadline)
    try:
        return context.wrap_socket(sock, server_hostname=host)
    except TimeoutError:
        raise
    except ssl.SSLError as exc:
        why = tls.describe_failure(exc) or f"TLS handshake with {host}:{port} failed"
        raise wire.unreachable(url, why) from None
    except OSError:
        raise wire.unreachable(url, f"TLS handshake with {host}:{port} failed") from None


def _describe(exc: OSError) -> str:
    ssl = sys.modules.get("ssl")
    if ssl is not None and isinstance(exc, ssl.SSLError):
        from skr8tr import tls

        return tls.describe_failure(exc) or "TLS failed"
    why = os.strerror(exc.errno) if exc.errno else str(exc)
    return why.lower() or "handshake failed"


def _settimeout(sock: socket.socket, deadline: float) -> None:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError
    sock.settimeout(remaining)


def _close(sock: socket.socket | None) -> None:
    if sock is not None:
        sock.close()


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
    except Closed as closed:
        raise wire.unreachable(url, f"the connection closed: {closed.reason}") from None
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
        except Closed as closed:
            raise wire.unreachable(self._conn.url, f"the stream closed: {closed.reason}") from None
        return wire.watch_message(raw)


def open_watch(opts: CallOptions) -> WatchStream:
    """Open ``/v1/watch``: ``with open_watch(opts) as stream: for msg in stream: ...``."""
    return WatchStream(
        open_conductor(opts.conductor, "/v1/watch", opts.timeout_s, ca_file=opts.ca_file)
    )
