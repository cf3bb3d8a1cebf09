"""The conductor's HTTP listener (h11): the status page, ``/api/*``, ``/metrics``.

A small keep-alive HTTP/1.1 server: one task per connection, bad requests
answered with 400 and the connection closed. Handlers are plain functions
from (method, path) to a :class:`Response`. A handler that has background
work of its own (the status routes count events from the bus) exposes it as
an async ``run(task_status=)`` method: :func:`serve_http` runs it next to the
listener, in the same nursery, so it lives exactly as long as the listener.

Slow or greedy clients (:class:`~skr8tr.conductor.limits.Limits`): at most
``max_connections`` connections on both listeners together and
``max_connections_per_address`` per client address
(:mod:`skr8tr.conductor.accept`); a request
head of at most ``http_max_header_bytes`` (else 431), whole within
``http_header_timeout_s`` of the connection (or, on a kept-alive
connection, of its first byte); ``http_idle_timeout_s`` between requests;
each body read and each response write must progress within
``http_io_timeout_s``. Every connection closed by one of these is counted by
reason. With an ``ssl_context`` the listener speaks HTTPS, and the TLS
handshake counts against the head's deadline. A request whose ``Host`` is not
this conductor's (:mod:`skr8tr.conductor.origins`) is answered 421.
"""

from __future__ import annotations

import contextlib
import http
import json
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass

import h11
import trio

from skr8tr.conductor.accept import Admission, serve_accepting
from skr8tr.conductor.limits import AddressSlots, ClosedCounter, ConnectionGate, Limits
from skr8tr.daemon_errors import bind

log = logging.getLogger("skr8tr.conductor")

MAX_BODY_BYTES = 64 * 1024
_REASONS = {s.value: s.phrase.encode("ascii") for s in http.HTTPStatus}


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def json(cls, doc: object, status: int = 200) -> Response:
        return cls(status, json.dumps(doc).encode() + b"\n", "application/json")


Handler = Callable[[str, str], Response]
#: ``check_host(value of Host or None)``: None to answer the request, else why not.
HostCheck = Callable[[bytes | None], str | None]


class _Close(Exception):
    """End this connection; ``reason`` is counted (None: an ordinary end)."""

    def __init__(self, reason: str | None = None) -> None:
        super().__init__(reason or "closed")
        self.reason = reason


class _Connection:
    """One client connection: its h11 state, stream and deadlines."""

    def __init__(self, stream: trio.abc.Stream, limits: Limits) -> None:
        self.stream = stream
        self.limits = limits
        self.conn = h11.Connection(h11.SERVER,
                                   max_incomplete_event_size=limits.http_max_header_bytes)

    async def send_all(self, data: bytes) -> None:
        with trio.move_on_after(self.limits.http_io_timeout_s) as scope:
            await self.stream.send_all(data)
        if scope.cancelled_caught:
            raise _Close("http_slow_client")

    async def send(self, resp: Response, method: str = "GET") -> None:
        headers = [("Content-Type", resp.content_type), ("Content-Length", str(len(resp.body))),
                   ("Cache-Control", "no-store"), ("X-Content-Type-Options", "nosniff"),
                   ("Server", "skr8tr"), *resp.headers]
        reason = _REASONS.get(resp.status, b"")
        conn = self.conn
        data = conn.send(h11.Response(status_code=resp.status, headers=headers, reason=reason))
        if method != "HEAD":
            data += conn.send(h11.Data(data=resp.body))
        await self.send_all(data + conn.send(h11.EndOfMessage()))

    async def receive(self) -> None:
        data = await self.stream.receive_some(8192)
        self.conn.receive_data(data)

    async def next_head(self, first: bool) -> h11.Request | None:
        """The next request head, or None when the client closed between requests."""
        conn, limits = self.conn, self.limits
        event = conn.next_event()
        if event is h11.NEED_DATA and not first:
            with trio.move_on_after(limits.http_idle_timeout_s) as idle:
                await self.receive()
            if idle.cancelled_caught:
                raise _Close("http_idle_timeout")
            event = conn.next_event()
        with trio.move_on_after(limits.http_header_timeout_s) as head:
            while event is h11.NEED_DATA:
                await self.receive()
                event = conn.next_event()
        if head.cancelled_caught:
            raise _Close("http_header_timeout")
        if isinstance(event, h11.Request):
            # h11 caps only a head that is still incomplete; one that came whole in a
            # single read is measured here.
            size = len(event.method) + len(event.target) + 12 + sum(
                len(name) + len(value) + 4 for name, value in event.headers)
            if size > limits.http_max_header_bytes:
                raise h11.RemoteProtocolError(
                    f"request head of {size} bytes is over the "
                    f"{limits.http_max_header_bytes} byte limit", 431)
            return event
        return None  # ConnectionClosed, or the client half-closed

    async def skip_body(self) -> None:
        body = 0
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                with trio.move_on_after(self.limits.http_io_timeout_s) as scope:
                    await self.receive()
                if scope.cancelled_caught:
                    raise _Close("http_slow_client")
            elif isinstance(event, h11.Data):
                body += len(event.data)
                if body > MAX_BODY_BYTES:
                    raise h11.RemoteProtocolError("request body too large", 413)
            elif isinstance(event, h11.EndOfMessage):
                return
            else:
                raise _Close()


async def handle_connection(stream: trio.abc.Stream, handler: Handler,
                            limits: Limits | None = None,
                            closed: ClosedCounter | None = None,
                            check_host: HostCheck | None = None) -> None:
    """Serve one client connection until it ends; never raises (but for cancellation).

    With *check_host*, a request it refuses is answered 421 with its reason."""
    connection = _Connection(stream, limits or Limits())
    try:
        await _serve_requests(connection, handler, check_host)
    except _Close as exc:
        if exc.reason is not None and closed is not None:
            closed.count(exc.reason)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        log.debug("HTTP client went away (or its TLS handshake failed)")
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(1):
            if _pending(connection):
                await trio.aclose_forcefully(stream)
            else:
                await stream.aclose()


def _pending(connection: _Connection) -> bool:
    # A TLS close_notify to a client that stopped reading would wait; just drop it then.
    return connection.conn.our_state not in (h11.IDLE, h11.DONE, h11.MUST_CLOSE, h11.CLOSED)


async def _serve_requests(connection: _Connection, handler: Handler,
                          check_host: HostCheck | None = None) -> None:
    conn = connection.conn
    first = True
    while True:
        method = "GET"
        try:
            request = await connection.next_head(first)
            first = False
            if request is None:
                return
            method = request.method.decode("ascii", "replace")
            target = request.target.decode("ascii", "replace")
            await connection.skip_body()
        except h11.RemoteProtocolError as exc:
            status = exc.error_status_hint
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                # The method matters: the answer to a HEAD has no body.
                with contextlib.suppress(h11.LocalProtocolError):
                    await connection.send(Response(status, f"{exc}\n".encode()), method)
            raise _Close("http_header_too_large" if status == 431
                         else "http_bad_request") from None
        misdirected = None
        if check_host is not None:
            hosts = [value for name, value in request.headers if name == b"host"]
            misdirected = check_host(b", ".join(hosts) if hosts else None)
        if misdirected is not None:
            resp = Response(421, misdirected.encode() + b"\n")
        elif method not in ("GET", "HEAD"):
            resp = Response(405, b"only GET and HEAD\n")
        else:
            try:
                resp = handler(method, target.split("?", 1)[0])
            except Exception:
                log.exception("HTTP handler failed for %s", target[:200])
                resp = Response(500, b"internal error; see the conductor log\n")
        await connection.send(resp, method)
        if conn.our_state is h11.MUST_CLOSE:
            return
        try:
            conn.start_next_cycle()
        except h11.LocalProtocolError:
            return


async def serve_http(handler: Handler, host: str, port: int, *,
                     ssl_context: ssl.SSLContext | None = None, limits: Limits | None = None,
                     closed: ClosedCounter | None = None, admission: Admission | None = None,
                     check_host: HostCheck | None = None,
                     task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve until cancelled; ``task_status.started`` gets the bound listeners.

    When ``handler`` has a ``run`` method, it is started first (``nursery.start``)
    and cancelled with the listener. *admission* is shared with the WebSocket
    listener (the total cap); without one this listener has a gate of its own.
    """
    limits = limits or Limits()
    closed = closed if closed is not None else ClosedCounter()
    if admission is None:
        admission = Admission(ConnectionGate(
            limits.max_connections or 2 * limits.max_connections_per_address), closed)
    slots = AddressSlots(limits.max_connections_per_address)

    async def on_connection(stream: trio.SocketStream, address: str) -> None:
        transport: trio.abc.Stream = stream
        if ssl_context is not None:
            transport = trio.SSLStream(stream, ssl_context, server_side=True,
                                       https_compatible=True)
        await handle_connection(transport, handler, limits, closed, check_host)

    async with trio.open_nursery() as nursery:
        run = getattr(handler, "run", None)
        if run is not None:
            await nursery.start(run)
        listeners = await bind(host, port, "--http")
        for listener in listeners:
            nursery.start_soon(serve_accepting, listener, on_connection, admission, slots,
                               "HTTP")
        task_status.started(listeners)
