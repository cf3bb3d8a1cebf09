"""A WebSocket client on one blocking socket, for the CLI: no event loop, no trio.

A CLI run makes one or a few requests and exits, so it needs no event loop:
the standard library's :mod:`socket` (and :mod:`ssl` for ``wss://``, imported
only then) under the framing of :mod:`skr8tr.ws.frames`. That keeps trio and
h11 out of the CLI's start-up; the conductor's client on top of it is
:mod:`skr8tr.blocking_client`.

:func:`connect` opens a :class:`Connection`; on it, ``send_text`` and
``receive_message`` take a deadline (a :func:`time.monotonic` value) and raise
TimeoutError past it. Every way the connection ends surfaces as
:class:`~skr8tr.ws.frames.ConnectionClosed` (1006 when the stream just
ended). Ctrl-C (KeyboardInterrupt) is never caught here: it leaves at once,
closing the socket on the way out.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections import deque
from typing import TYPE_CHECKING

from skr8tr.ws.frames import (
    ABNORMAL_CLOSURE,
    DEFAULT_MAX_MESSAGE_BYTES,
    ClientProtocol,
    Close,
    ConnectionClosed,
    HandshakeError,
    Message,
)

if TYPE_CHECKING:
    import ssl

__all__ = ["Connection", "connect"]

RECEIVE_BYTES = 65536
DISCONNECT_TIMEOUT_S = 2.0  # for the server's answer to our close frame
LOST = "the connection was lost"  # the reason of a 1006, as the Trio transports give it


class Connection:
    """An open WebSocket over a blocking socket; a context manager.

    Leaving the ``with`` block normally does the close handshake; leaving it
    with an exception (Ctrl-C included) only sends a close frame if it can at
    once, and closes the socket.
    """

    def __init__(self, sock: socket.socket, proto: ClientProtocol, url: str,
                 pending: bytes = b"") -> None:
        self.url = url
        self._sock: socket.socket | None = sock
        self._proto = proto
        self._messages: deque[str | bytes] = deque()
        self._closed: ConnectionClosed | None = None
        self._feed(pending)

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def send_text(self, text: str, deadline: float | None = None) -> None:
        """Send one text message. Raises ConnectionClosed, or TimeoutError past
        *deadline* (a :func:`time.monotonic` value; None waits as long as it takes)."""
        if self._closed is not None:
            raise self._closed
        self._send(self._proto.encode_text(text), deadline)

    def receive_message(self, deadline: float | None = None) -> str | bytes:
        """The next message (str for text, bytes for binary), answering pings on the way.

        Messages that arrived before the close are returned first. Raises
        ConnectionClosed when the connection is closed (by the server, by a
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
                self._closed = ConnectionClosed(ABNORMAL_CLOSURE, LOST)
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
        except (ConnectionClosed, OSError):
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
            if type(event) is Message:
                self._messages.append(event.data)
                continue
            answer = self._proto.reply_to(event)  # a pong, or the close handshake's answer
            if answer:
                with contextlib.suppress(ConnectionClosed, OSError):  # reported anyway
                    self._send(answer, time.monotonic() + DISCONNECT_TIMEOUT_S)
            if type(event) is Close and self._closed is None:
                self._closed = ConnectionClosed(event.code, event.reason)

    def _send(self, data: bytes, deadline: float | None) -> None:
        sock = self._socket(deadline)
        try:
            sock.sendall(data)
        except TimeoutError:
            raise
        except OSError:
            self._closed = ConnectionClosed(ABNORMAL_CLOSURE, LOST)
            raise self._closed from None

    def _socket(self, deadline: float | None) -> socket.socket:
        """The socket, its timeout set to what is left until *deadline*."""
        if self._sock is None:
            raise self._closed or ConnectionClosed(ABNORMAL_CLOSURE, LOST)
        if deadline is None:
            self._sock.settimeout(None)
        else:
            _settimeout(self._sock, deadline)
        return self._sock

    def _release(self) -> None:
        sock, self._sock = self._sock, None
        if self._closed is None:
            self._closed = ConnectionClosed(1000)
        if sock is not None:
            sock.close()


def connect(host: str, port: int, target: str, deadline: float, *,
            ssl_context: ssl.SSLContext | None = None, url: str = "",
            max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> Connection:
    """Open a WebSocket to *host*:*port* for request *target* before *deadline*
    (a :func:`time.monotonic` value), over TLS with *ssl_context* if given.

    Raises socket.gaierror when *host* does not resolve, OSError when no
    address answers, :class:`skr8tr.tls.TlsError` when the TLS handshake fails
    (saying why), HandshakeError when the server refuses or answers wrongly,
    TimeoutError past *deadline*. The socket is closed on any failure.
    """
    sock: socket.socket | None = None
    try:
        sock = _open_tcp(host, port, deadline)
        if ssl_context is not None:
            sock = _start_tls(sock, ssl_context, host, port, deadline)
        name = f"[{host}]" if ":" in host else host
        proto = ClientProtocol(name if port in (80, 443) else f"{name}:{port}", target,
                               max_message_bytes=max_message_bytes)
        _settimeout(sock, deadline)
        sock.sendall(proto.handshake_request())
        pending = None
        while pending is None:
            _settimeout(sock, deadline)
            data = sock.recv(RECEIVE_BYTES)
            if not data:
                raise HandshakeError("the connection closed during the handshake")
            pending = proto.receive_handshake(data)
    except BaseException:
        if sock is not None:
            sock.close()
        raise
    return Connection(sock, proto, url, pending)


def _open_tcp(host: str, port: int, deadline: float) -> socket.socket:
    """A TCP connection to the first address of *host* that answers."""
    # An ASCII name goes as bytes: a str would load the IDNA codec (~1 ms) for nothing.
    name: str | bytes = host.encode("ascii") if host.isascii() else host
    addresses = socket.getaddrinfo(name, port, type=socket.SOCK_STREAM)
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
    raise OSError(f"all attempts to connect to {shown} failed")


def _start_tls(sock: socket.socket, context: ssl.SSLContext, host: str, port: int,
               deadline: float) -> socket.socket:
    """The TLS handshake on *sock*; one that fails is TlsError, saying why."""
    import ssl

    from skr8tr.tls import TlsError, describe_failure

    _settimeout(sock, deadline)
    try:
        return context.wrap_socket(sock, server_hostname=host)
    except TimeoutError:
        raise
    except ssl.SSLError as exc:
        raise TlsError(describe_failure(exc) or f"TLS handshake with {host}:{port} failed"
                       ) from None
    except OSError:
        raise TlsError(f"TLS handshake with {host}:{port} failed") from None


def _settimeout(sock: socket.socket, deadline: float) -> None:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError
    sock.settimeout(remaining)
