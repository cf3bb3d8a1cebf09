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

``CallOptions.conductor`` may list several conductors (``URL,URL,...``, DESIGN.md
§9): :func:`call`, :class:`Session`, :func:`open_watch` and
:func:`follow_watch` follow ``NOT_LEADER`` to the leader and go round the list
(:class:`skr8tr.wire.FailoverCall`); :func:`open_conductor` and
:func:`call_on` talk to the one URL they are given.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

from skr8tr import wire
from skr8tr.core import protocol
from skr8tr.wire import CallOptions, ClientError
from skr8tr.ws.blocking import Connection
from skr8tr.ws.blocking import connect as _connect
from skr8tr.ws.frames import ConnectionClosed, HandshakeError

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
    "follow_watch",
    "Session",
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
    """Send one request to the leading conductor and return the reply's ``result``.

    ``opts.conductor`` may list several conductors (``URL,URL,...``): the
    request follows ``NOT_LEADER`` to the leader and goes round the list on
    ``UNAVAILABLE`` or a failed connection (:class:`skr8tr.wire.FailoverCall`).
    Raises ClientError: exit 3 when no conductor could be reached or one did not
    answer within the timeout, exit 1 when the leader answers with an error or
    only followers answered until the timeout, exit 2 for a bad URL.
    """
    with Session(opts) as session:
        return session.call(cmd, args)


class Session:
    """Requests to whichever conductor leads, on a connection kept open between them.

    :meth:`call` sends each request to the conductor that answered the previous
    one, and looks for the leader again (:class:`skr8tr.wire.FailoverCall`)
    when that conductor says ``NOT_LEADER`` or ``UNAVAILABLE`` or the
    connection drops. One signed envelope (one nonce) is built per call and
    sent unchanged to every conductor tried: a follower refuses before it
    spends the nonce, and the leader records it in etcd, so a request that a
    dropped conductor had already accepted is ``REPLAY`` everywhere else
    (reported as "accepted before the connection dropped") instead of being
    run twice. A context manager; leaving it closes the connection.
    """

    def __init__(self, opts: CallOptions, path: str = "/v1/cli") -> None:
        self.opts = opts
        self.path = path
        self._conn: Connection | None = None
        self._base: str | None = None  # the conductor self._conn goes to, as listed or named
        self._request_id: str | None = None  # of the last call (next_result reads its replies)

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self._conn is not None:
            self._conn.__exit__(*exc_info)
            self._conn = None

    @property
    def conductor(self) -> str | None:
        """The conductor the last request was answered by (its base URL)."""
        return self._base

    def call(self, cmd: str, args: dict, *, patient_s: float | None = None) -> Any:
        """Send one request; return its result or raise ClientError as :func:`call` does.

        With *patient_s*, a lost conductor is looked for that long (passes with no
        conductor answering included) before giving up: for the polls of
        ``rollout --watch`` and ``logs --follow``, which outlive a failover.
        """
        opts = self.opts
        request = wire.build_request(cmd, args, opts.signing_key)
        self._request_id = request["id"]
        text = json.dumps(request)
        run = wire.FailoverCall(opts.conductor, self.path, opts.timeout_s, time.monotonic(),
                                patient_s=patient_s, first=self._base)
        while True:
            attempt = run.next(time.monotonic())
            if self._conn is None or self._base != attempt.url:
                self._drop()
                time.sleep(attempt.wait_s)
                try:
                    self._conn = connect(run.url, run.connect_timeout_s, ca_file=opts.ca_file)
                except ClientError as err:
                    if err.exit == wire.EXIT_USAGE:
                        raise
                    run.unreachable(err)
                    continue
                self._base = attempt.url
            deadline = time.monotonic() + opts.timeout_s
            try:
                self._conn.send_text(text, deadline)
                reply = None
                while reply is None:  # replies to other requests are skipped
                    reply = wire.match_reply(self._conn.receive_message(deadline), request["id"])
            except TimeoutError:
                self._drop()
                raise wire.timed_out(run.url, opts.timeout_s) from None
            except ConnectionClosed as closed:
                self._drop()
                run.dropped_after_send(
                    wire.unreachable(run.url, f"the connection closed: {closed.close_reason}"))
                continue
            if run.settles(reply):
                return run.result(reply)
            self._drop()

    def next_result(self) -> Any:
        """The next reply to the last request on its connection, waiting as long as it
        takes (a ``logs`` follow sends one per batch of lines); its result.

        Raises ClientError: UNREACHABLE (exit 3) when the connection closes (it is
        dropped: the next :meth:`call` looks for the leader again), BAD_REPLY for a
        message that cannot be read, the conductor's code for an error reply.
        """
        if self._conn is None or self._request_id is None:
            raise wire.unreachable(self._base or self.opts.conductor, "no open connection")
        url = self._conn.url
        try:
            reply = None
            while reply is None:
                reply = wire.match_reply(self._conn.receive_message(), self._request_id)
        except ConnectionClosed as closed:
            self._drop()
            raise wire.unreachable(url, f"the connection closed: {closed.close_reason}") from None
        return wire.result_of(reply)

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._conn = None
        self._base = None


def call_on(conn: Connection, opts: CallOptions, cmd: str, args: dict) -> Any:
    """Send one request on a connection that is already open, to that conductor only
    (no following: a ``NOT_LEADER`` is its ClientError, exit 1)."""
    request = wire.build_request(cmd, args, opts.signing_key)
    url = conn.url
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
    that cannot be read. ``conductor`` is the base URL it came from.
    """

    def __init__(self, conn: Connection, *, first: protocol.WatchMessage | None = None,
                 conductor: str = "") -> None:
        self._conn = conn
        self._first = first
        self.conductor = conductor

    @property
    def url(self) -> str:
        return self._conn.url

    def __enter__(self) -> WatchStream:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._conn.__exit__(*exc_info)

    def __iter__(self) -> Iterator[protocol.WatchMessage]:
        return self

    def __next__(self) -> protocol.WatchMessage:
        if self._first is not None:
            first, self._first = self._first, None
            return first
        try:
            raw = self._conn.receive_message()
        except ConnectionClosed as closed:
            raise wire.unreachable(self._conn.url,
                                   f"the stream closed: {closed.close_reason}") from None
        return wire.watch_message(raw)


def open_watch(opts: CallOptions, *, patient_s: float | None = None,
               first: str | None = None) -> WatchStream:
    """Open ``/v1/watch`` on the leading conductor:
    ``with open_watch(opts) as stream: for msg in stream: ...``.

    A follower's first message (``NOT_LEADER``) sends it to the leader, as
    :func:`call` goes; the stream returned starts with the leader's snapshot.
    *patient_s* and *first* are :class:`skr8tr.wire.FailoverCall`'s (for a
    reconnection). Raises ClientError as :func:`call` does; exit 3 (TIMEOUT)
    also when a conductor sends nothing within the timeout.
    """
    run = wire.FailoverCall(opts.conductor, "/v1/watch", opts.timeout_s, time.monotonic(),
                            patient_s=patient_s, first=first)
    while True:
        attempt = run.next(time.monotonic())
        time.sleep(attempt.wait_s)
        try:
            conn = connect(run.url, run.connect_timeout_s, ca_file=opts.ca_file)
        except ClientError as err:
            if err.exit == wire.EXIT_USAGE:
                raise
            run.unreachable(err)
            continue
        try:
            msg = wire.watch_message(conn.receive_message(time.monotonic() + opts.timeout_s))
        except TimeoutError:
            conn.abort()
            run.unreachable(wire.timed_out(run.url, opts.timeout_s))
            continue
        except ConnectionClosed as closed:
            conn.abort()
            run.unreachable(wire.unreachable(run.url, f"the stream closed: {closed.close_reason}"))
            continue
        except BaseException:
            conn.abort()
            raise
        if isinstance(msg, protocol.WatchError) and msg.code in wire.FOLLOW_CODES:
            conn.close()
            run.refused(msg.code, msg.message, msg.leader)
            continue
        run.search.served()
        return WatchStream(conn, first=msg, conductor=attempt.url)


def follow_watch(opts: CallOptions, *, reconnect_s: float = wire.RECONNECT_BUDGET_S,
                 note: Callable[[str], None] = lambda text: None
                 ) -> Iterator[protocol.WatchMessage]:
    """The messages of ``/v1/watch`` on the leader, across failovers: when the
    stream drops (or the leader steps down), the list is searched again for up to
    *reconnect_s*, and the new leader's stream (a fresh snapshot first) goes on.

    *note* is told, in one line each, when a stream is lost and which conductor
    took over. Raises ClientError as :func:`open_watch` (for the reconnection,
    exit 3 when no conductor answered for *reconnect_s*) and BAD_REPLY (exit 1).
    """
    stream = open_watch(opts)
    while True:
        with stream:
            try:
                for msg in stream:
                    if isinstance(msg, protocol.WatchError):
                        note(f"{stream.conductor} stopped serving the stream ({msg.code}: "
                             f"{msg.message}); looking for the leader")
                        break
                    yield msg
            except ClientError as err:
                if err.code != "UNREACHABLE":
                    raise
                note(f"lost the stream from {stream.conductor}; looking for the leader "
                     f"for up to {reconnect_s:g} s")
        stream = open_watch(opts, patient_s=reconnect_s, first=stream.conductor)
        note(f"following {stream.conductor}")
