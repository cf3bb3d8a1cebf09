"""The HTTP/1.1 reverse proxy: h11 towards clients and towards replicas.

One task per client connection (kept alive between requests). For each
request: the longest matching ``--route`` names the app (none: 404), the
replica table picks the next ready, non-draining replica round robin (none:
503 with ``Retry-After``), a pooled keep-alive connection to it carries the
request, and the response streams back. Bodies stream chunk by chunk in both
directions; nothing is buffered whole. ``X-Forwarded-For`` gets the client's
address appended and ``X-Forwarded-Proto`` is set; hop-by-hop headers are not
forwarded (:mod:`skr8tr.ingress.headers`).

Retries go to another replica, never the same one twice, at most
``ProxyLimits.retries`` times:

- a connect failure, for any method (nothing reached the replica);
- a failure before the first response byte, for idempotent methods without
  a request body (GET, HEAD, OPTIONS, TRACE, PUT, DELETE): typically a
  keep-alive connection the replica closed as the request went out.

Anything later (a timeout, a failure after a request body was sent or after
the response began) is not retried: 502 or 504 before the response began,
otherwise the client connection is closed mid-response so the client sees
the truncation.

Time limits keep slow clients from holding connections (no slowloris): the
first request's head must arrive whole within ``header_timeout_s`` of the
connection's accept, whatever trickles in meanwhile; a later request's head
within ``header_timeout_s`` of its first byte; an idle keep-alive connection
is closed after ``idle_timeout_s`` between requests; each read of a request
body and each write to a client must progress within ``body_timeout_s``. At
most ``max_connections`` client connections are served at once, and at most
``max_connections_per_address`` from one client address (IPv6: one /64);
further ones get a 503 with ``Connection: close`` and are closed. Refusals and
head timeouts are counted in :class:`Stats` and logged at most once per reason
every ``LOG_EVERY_S`` (see :mod:`skr8tr.ingress.limits`).
"""

from __future__ import annotations

import contextlib
import http
import logging
from collections import Counter
from dataclasses import dataclass, field

import h11
import trio

from skr8tr.ingress.headers import (
    HOST_PLACEHOLDER,
    IDEMPOTENT_METHODS,
    origin_form,
    request_framing,
    response_headers,
    upstream_headers,
)
from skr8tr.ingress.limits import (
    LOG_EVERY_S,
    AddressSlots,
    LogThrottle,
    ProxyLimits,
    address_key,
)
from skr8tr.ingress.pool import ConnectFailed, Pool, UpstreamConnection
from skr8tr.ingress.routes import Backend, BackendTable, RouteTable
from skr8tr.ingress.traffic import TrafficCounter

log = logging.getLogger("skr8tr.ingress")

RECEIVE_BYTES = 64 * 1024
DISCARD_BODY_BYTES = 1024 * 1024  # an unread body up to this size is read away after an error
DISCARD_BODY_S = 2.0
REFUSE_SEND_S = 1.0
CLOSE_S = 1.0
DEFAULT_LIMITS = ProxyLimits()


@dataclass
class Stats:
    connections: int = 0
    refused_connections: int = 0  # over max_connections, or while shutting down
    refused_per_address: int = 0  # over max_connections_per_address
    head_timeouts: int = 0  # no whole first request head within header_timeout_s
    requests: int = 0
    retries: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    aborted: int = 0  # responses cut off mid-body

    def summary(self) -> str:
        codes = ", ".join(f"{code}: {n}" for code, n in sorted(self.statuses.items()))
        return (f"{self.requests} request(s) on {self.connections} connection(s); "
                f"responses {{{codes}}}; {self.retries} retried, {self.aborted} cut off, "
                f"{self.refused_connections} connection(s) refused at the limit, "
                f"{self.refused_per_address} over the per-address limit, "
                f"{self.head_timeouts} closed waiting for a first request head")


class _ClientGone(Exception):
    """The client side failed or was too slow; its connection is closed."""


class _SilentTooLong(Exception):
    """The first request head did not begin before its deadline."""


class _UpstreamFailed(Exception):
    def __init__(self, why: str, *, timeout: bool = False, retryable: bool = False,
                 ours: bool = False) -> None:
        super().__init__(why)
        self.timeout = timeout
        self.retryable = retryable
        self.ours = ours  # the ingress could not forward it: says nothing of the replica


class Proxy:
    """Serves client connections; see the module docstring for the rules. With
    *traffic*, every attempt on a replica is counted there (:mod:`skr8tr.ingress.traffic`)."""

    def __init__(self, routes: RouteTable, table: BackendTable, pool: Pool,
                 limits: ProxyLimits = DEFAULT_LIMITS, *, scheme: str = "http",
                 traffic: TrafficCounter | None = None) -> None:
        self.routes = routes
        self.traffic = traffic
        self.table = table
        self.pool = pool
        self.limits = limits
        self.scheme = scheme.encode()
        self.stats = Stats()
        self.active = 0
        self.closing = False
        self.slots = AddressSlots(limits.max_connections_per_address)
        self._log_throttle = LogThrottle(LOG_EVERY_S)
        self._latest: dict[str, str] = {}  # reason -> the client it last happened to
        self._idle_scopes: set[trio.CancelScope] = set()

    def begin_shutdown(self) -> None:
        """Finish the requests in flight, close idle connections, keep-alive no more."""
        self.closing = True
        for scope in list(self._idle_scopes):
            scope.cancel()

    # ------------------------------------------------------------------ connections

    async def serve_connection(self, stream: trio.SocketStream) -> None:
        """Serve one client connection until it closes; never raises but for cancellation."""
        accepted_at = trio.current_time()
        client_ip = _peer_ip(stream)
        key = address_key(client_ip)
        if self.closing:
            self.stats.refused_connections += 1
            await _refuse(stream, "the ingress is shutting down")
            return
        if not self.slots.acquire(key):
            self.stats.refused_per_address += 1
            self._note("per_address", key)
            await _refuse(stream, "too many connections from your address")
            return
        if self.active >= self.limits.max_connections:
            self.slots.release(key)
            self.stats.refused_connections += 1
            self._note("total", client_ip)
            await _refuse(stream, "the ingress is at its connection limit")
            return
        self.active += 1
        self.stats.connections += 1
        try:
            # A client that goes away mid-exchange ends its connection, nothing more.
            with contextlib.suppress(_ClientGone, trio.BrokenResourceError,
                                     trio.ClosedResourceError):
                await self._serve(stream, client_ip, accepted_at)
        finally:
            self.active -= 1
            self.slots.release(key)
            with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_S):
                await stream.aclose()

    def _note(self, reason: str, who: str) -> None:
        """Log a limit at work: at most one line per reason every LOG_EVERY_S."""
        self._latest[reason] = who
        count = self._log_throttle.note(reason, trio.current_time())
        if count:
            self._say(reason, count)

    def _say(self, reason: str, count: int) -> None:
        who = self._latest.get(reason, "?")
        if reason == "per_address":
            log.warning("refused %d connection(s) over --max-connections-per-address %d; "
                        "the latest from %s", count, self.limits.max_connections_per_address,
                        who)
        elif reason == "total":
            log.warning("refused %d connection(s) over --max-connections %d; the latest "
                        "from %s", count, self.limits.max_connections, who)
        else:
            log.info("closed %d connection(s) that sent no whole request head within "
                     "--header-timeout %g s of connecting; the latest from %s", count,
                     self.limits.header_timeout_s, who)

    async def run_limit_logs(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Every LOG_EVERY_S, log what the limits did that no line has told yet (the
        tail of a burst), until cancelled."""
        task_status.started()
        while True:
            await trio.sleep(LOG_EVERY_S)
            for reason, count in self._log_throttle.flush(trio.current_time()).items():
                self._say(reason, count)

    async def _serve(self, stream: trio.SocketStream, client_ip: str,
                     accepted_at: float) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.limits.max_head_bytes)
        # The first head is due a fixed time after accept, bytes or none: a client that
        # connects and stays silent (or trickles) must not hold a slot for a keep-alive
        # idle period, renewable by reconnecting.
        first_deadline: float | None = accepted_at + self.limits.header_timeout_s
        while True:
            try:
                req = await self._read_head(stream, conn, first_deadline)
            except h11.RemoteProtocolError as exc:
                await self._error(stream, conn, exc.error_status_hint, f"bad request: {exc}")
                return
            except trio.TooSlowError:
                if first_deadline is not None:
                    self._head_timed_out(client_ip)
                await self._error(stream, conn, 408, "the request head took too long")
                return
            except _SilentTooLong:
                self._head_timed_out(client_ip)
                return
            if req is None:
                return
            first_deadline = None
            await self._handle(stream, conn, req, client_ip)
            if (self.closing or conn.our_state is not h11.DONE
                    or conn.their_state is not h11.DONE):
                return
            conn.start_next_cycle()

    def _head_timed_out(self, client_ip: str) -> None:
        self.stats.head_timeouts += 1
        self._note("head_timeout", client_ip)

    async def _read_head(self, stream: trio.SocketStream, conn: h11.Connection,
                         first_deadline: float | None = None) -> h11.Request | None:
        """The next request head; None when the client closed, stayed idle past
        ``idle_timeout_s`` (after a request) or the ingress is shutting down.

        Raises _SilentTooLong when nothing came by ``first_deadline`` (the first
        request), TooSlowError when a started head did not complete in time: by
        ``first_deadline`` for the first request, within ``header_timeout_s`` of
        its first byte for a later one."""
        pending, _ = conn.trailing_data
        started = bool(pending)
        if first_deadline is not None:
            deadline = first_deadline
        else:
            deadline = trio.current_time() + (self.limits.header_timeout_s if started
                                              else self.limits.idle_timeout_s)
        while True:
            event = conn.next_event()
            if isinstance(event, h11.Request):
                # h11 caps a head still incomplete; one that came whole in a read is
                # measured here.
                size = len(event.method) + len(event.target) + 12 + sum(
                    len(name) + len(value) + 4 for name, value in event.headers.raw_items())
                if size > self.limits.max_head_bytes:
                    raise h11.RemoteProtocolError(
                        f"request head of {size} bytes is over the "
                        f"{self.limits.max_head_bytes} byte limit", 431)
                return event
            if event is not h11.NEED_DATA:
                return None  # ConnectionClosed
            if self.closing and not started:
                return None
            with trio.move_on_at(deadline) as scope:
                if not started:
                    self._idle_scopes.add(scope)
                try:
                    data = await stream.receive_some(RECEIVE_BYTES)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return None
                finally:
                    self._idle_scopes.discard(scope)
            if scope.cancelled_caught:
                if started:
                    raise trio.TooSlowError
                if first_deadline is not None and not self.closing:
                    raise _SilentTooLong
                return None
            if data and not started:
                started = True
                if first_deadline is None:
                    deadline = trio.current_time() + self.limits.header_timeout_s
            conn.receive_data(data)

    # ------------------------------------------------------------------ one request

    async def _handle(self, stream: trio.SocketStream, conn: h11.Connection,
                      req: h11.Request, client_ip: str) -> None:
        t0 = trio.current_time()
        self.stats.requests += 1
        method = req.method.decode("ascii", "replace")
        target = origin_form(req.target.decode("latin-1"))
        if method == "CONNECT":
            await self._error(stream, conn, 501, "CONNECT is not supported")
            return
        route = self.routes.match(target)
        if route is None:
            await self._error(stream, conn, 404, f"no route matches {target.split('?')[0]}")
            return
        framing = request_framing(req.headers)
        if framing is None and not isinstance(conn.next_event(), h11.EndOfMessage):
            raise _ClientGone("a request without a body did not end")  # cannot happen
        headers = upstream_headers(req, client_ip, framing, self.scheme)
        may_resend = method in IDEMPOTENT_METHODS and framing is None
        tried: list[Backend] = []
        last_error = ""
        while True:
            backend = self.table.pick(route.app, exclude={b.replica for b in tried})
            if backend is None:
                if not tried:
                    await self._no_replica(stream, conn, route.app, target)
                else:
                    await self._error(stream, conn, 502, f"no replica of {route.app} could "
                                      f"be reached: {last_error}")
                return
            tried.append(backend)
            started = trio.current_time()
            try:
                uc = await self.pool.connect(backend)
            except ConnectFailed as exc:
                if self.traffic is not None:
                    self.traffic.failed(backend.replica)
                last_error = str(exc)
                if self._retry(method, target, route.app, last_error, tried):
                    continue
                await self._error(stream, conn, 502, f"no replica of {route.app} could be "
                                  f"reached: {last_error}")
                return
            try:
                status = await self._exchange(stream, conn, req, target, headers, framing, uc,
                                              started)
            except _UpstreamFailed as exc:
                uc.close()
                if self.traffic is not None and not exc.ours:
                    self.traffic.failed(backend.replica)
                last_error = f"{backend}: {exc}"
                if (exc.retryable and may_resend
                        and self._retry(method, target, route.app, last_error, tried)):
                    continue
                await self._error(stream, conn, 504 if exc.timeout else 502,
                                  f"replica {backend.replica} of {route.app} failed: {exc}")
                return
            except BaseException:
                uc.close()
                raise
            self.pool.release(uc)
            self.stats.statuses[status] += 1
            if log.isEnabledFor(logging.DEBUG):
                log.debug("%s %s %s -> %s %d %.1f ms", client_ip, method, target, backend,
                          status, (trio.current_time() - t0) * 1000)
            return

    def _retry(self, method: str, target: str, app: str, why: str, tried: list[Backend]
               ) -> bool:
        if len(tried) > self.limits.retries:
            return False
        self.stats.retries += 1
        log.info("retry: %s %s on another replica of %s after %s", method, target, app, why)
        return True

    async def _exchange(self, stream: trio.SocketStream, conn: h11.Connection,
                        req: h11.Request, target: str, headers: list[tuple[bytes, bytes]],
                        framing: str | None, uc: UpstreamConnection, started: float) -> int:
        """Send the request to ``uc`` and stream the response back; returns its status.
        The response head is counted (``traffic``) as it arrives, *started* being the
        attempt's start.

        Raises _UpstreamFailed before the response head came (so before anything was
        sent to the client), and _ClientGone when the client failed or the response
        had to be cut off."""
        if HOST_PLACEHOLDER in headers:
            host = f"{uc.backend.address}:{uc.backend.port}".encode()
            headers = [(n, host if (n, v) == HOST_PLACEHOLDER else v) for n, v in headers]
        try:
            head = uc.h11.send(h11.Request(method=req.method, target=target.encode("latin-1"),
                                           headers=headers))
        except h11.LocalProtocolError as exc:
            raise _UpstreamFailed(f"cannot forward the request: {exc}", ours=True) from None
        if framing is None:  # the client's end of message was read by _handle
            await self._upstream_send(uc, head + uc.h11.send(h11.EndOfMessage()),
                                      retryable=True)
        else:
            await self._upstream_send(uc, head, retryable=True)
            if conn.they_are_waiting_for_100_continue:
                await self._client_send(stream, conn.send(
                    h11.InformationalResponse(status_code=100, headers=[])))
            while True:
                event = await self._client_next(stream, conn)
                if isinstance(event, h11.Data):
                    await self._upstream_send(uc, uc.h11.send(h11.Data(data=event.data)))
                elif isinstance(event, h11.EndOfMessage):
                    await self._upstream_send(uc, uc.h11.send(h11.EndOfMessage()))
                    break
                else:
                    raise _ClientGone("the client closed mid-body")
        while True:
            event = await self._upstream_next(uc)
            if isinstance(event, h11.Response):
                break
            if not isinstance(event, h11.InformationalResponse):
                raise _UpstreamFailed("the connection closed before a response",
                                      retryable=uc.received_bytes == 0)
        status = event.status_code
        if self.traffic is not None:
            self.traffic.answered(uc.backend.replica, status, started, trio.current_time())
        back = response_headers(event.headers)
        if self.closing:
            back.append((b"connection", b"close"))
        try:
            data = conn.send(h11.Response(status_code=status, headers=back,
                                          reason=event.reason))
        except h11.LocalProtocolError as exc:
            raise _ClientGone(f"cannot forward the response head: {exc}") from None
        # What the replica has already sent goes out in one write; we write before
        # waiting for more, so the body still streams.
        pending = data
        while True:
            try:
                event = uc.h11.next_event()  # already received: no waiting
                if event is h11.NEED_DATA:
                    if pending:
                        await self._client_send(stream, pending)
                        pending = b""
                    event = await self._upstream_next(uc)
            except (_UpstreamFailed, h11.RemoteProtocolError) as exc:
                raise self._cut_off(uc, str(exc)) from None
            if isinstance(event, h11.Data):
                pending += conn.send(h11.Data(data=event.data)) or b""
            elif isinstance(event, h11.EndOfMessage):
                pending += conn.send(h11.EndOfMessage()) or b""
                await self._client_send(stream, pending)
                return status
            else:
                raise self._cut_off(uc, "the connection closed mid-response")

    def _cut_off(self, uc: UpstreamConnection, why: str) -> _ClientGone:
        self.stats.aborted += 1
        log.warning("replica %s failed mid-response (%s); closing the client connection",
                    uc.backend, why)
        return _ClientGone(why)

    # ------------------------------------------------------------------ I/O with limits

    async def _upstream_send(self, uc: UpstreamConnection, data: bytes, *,
                             retryable: bool = False) -> None:
        try:
            with trio.fail_after(self.limits.upstream_timeout_s):
                await uc.stream.send_all(data)
        except trio.TooSlowError:
            raise _UpstreamFailed("sending the request timed out", timeout=True) from None
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise _UpstreamFailed(f"sending failed: {_why(exc)}",
                                  retryable=retryable and uc.received_bytes == 0) from None

    async def _upstream_next(self, uc: UpstreamConnection):
        try:
            while True:
                event = uc.h11.next_event()
                if event is not h11.NEED_DATA:
                    return event
                with trio.fail_after(self.limits.upstream_timeout_s):
                    data = await uc.stream.receive_some(RECEIVE_BYTES)
                uc.received_bytes += len(data)
                uc.h11.receive_data(data)
        except trio.TooSlowError:
            raise _UpstreamFailed(f"no answer within {self.limits.upstream_timeout_s:g} s",
                                  timeout=True) from None
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError,
                h11.RemoteProtocolError) as exc:
            raise _UpstreamFailed(_why(exc), retryable=uc.received_bytes == 0) from None

    async def _client_send(self, stream: trio.SocketStream, data: bytes | None) -> None:
        if not data:
            return
        try:
            with trio.fail_after(self.limits.body_timeout_s):
                await stream.send_all(data)
        except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError,
                OSError) as exc:
            raise _ClientGone(_why(exc)) from None

    async def _client_next(self, stream: trio.SocketStream, conn: h11.Connection):
        try:
            while True:
                event = conn.next_event()
                if event is not h11.NEED_DATA:
                    return event
                with trio.fail_after(self.limits.body_timeout_s):
                    data = await stream.receive_some(RECEIVE_BYTES)
                conn.receive_data(data)
        except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError,
                OSError, h11.RemoteProtocolError) as exc:
            raise _ClientGone(_why(exc)) from None

    # ------------------------------------------------------------------ answers of our own

    async def _no_replica(self, stream: trio.SocketStream, conn: h11.Connection, app: str,
                          target: str) -> None:
        if not self.table.synced:
            why = "the ingress has not heard from the conductor yet"
        else:
            why = (f"no ready replica of app {app} (it may be starting, rolling out or "
                   "scaled to zero)")
        await self._error(stream, conn, 503, f"{why}; retry shortly", retry_after=True)

    async def _error(self, stream: trio.SocketStream, conn: h11.Connection, status: int,
                     message: str, *, retry_after: bool = False) -> None:
        """Answer with a short text response of our own, if a response can still be sent."""
        self.stats.statuses[status] += 1
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            raise _ClientGone(message)
        if conn.their_state is h11.SEND_BODY and not conn.they_are_waiting_for_100_continue:
            await self._discard_body(stream, conn)
        body = f"{status} {message}\n".encode("utf-8", "replace")
        headers = [(b"content-type", b"text/plain; charset=utf-8"),
                   (b"content-length", str(len(body)).encode()), (b"cache-control", b"no-store"),
                   (b"x-content-type-options", b"nosniff")]
        if retry_after:
            headers.append((b"retry-after", b"1"))
        if self.closing or conn.their_state not in (h11.DONE, h11.MUST_CLOSE):
            headers.append((b"connection", b"close"))
        try:
            data = conn.send(h11.Response(status_code=status, headers=headers,
                                          reason=_reason(status)))
            data += conn.send(h11.Data(data=body)) or b""
            data += conn.send(h11.EndOfMessage()) or b""
        except h11.LocalProtocolError as exc:
            raise _ClientGone(str(exc)) from None
        await self._client_send(stream, data)

    async def _discard_body(self, stream: trio.SocketStream, conn: h11.Connection) -> None:
        """Read away a small unread request body so the connection can be kept."""
        read = 0
        with trio.move_on_after(DISCARD_BODY_S), contextlib.suppress(_ClientGone):
            while read <= DISCARD_BODY_BYTES:
                event = await self._client_next(stream, conn)
                if isinstance(event, h11.Data):
                    read += len(event.data)
                else:
                    return


def _peer_ip(stream: trio.abc.Stream) -> str:
    # A TLS stream keeps its socket one level down; a test's memory stream has none.
    sock = getattr(stream, "socket", None) or getattr(
        getattr(stream, "transport_stream", None), "socket", None)
    try:
        return str(sock.getpeername()[0]) if sock is not None else "unknown"
    except (OSError, IndexError):
        return "unknown"


def _why(exc: BaseException) -> str:
    cause = exc.__cause__ or exc.__context__
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror.lower()
    return str(exc) or type(exc).__name__


async def _refuse(stream: trio.SocketStream, why: str) -> None:
    """Answer 503 with ``Connection: close`` and close, each step briefly bounded: a
    refused connection must give its descriptor back at once."""
    body = f"503 {why}; retry shortly\n".encode()
    head = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\n"
            b"content-length: %d\r\nretry-after: 1\r\nconnection: close\r\n\r\n" % len(body))
    with trio.move_on_after(REFUSE_SEND_S):
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await stream.send_all(head + body)
    with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_S):
        await stream.aclose()


def _reason(status: int) -> bytes:
    """The standard reason phrase of *status* (``503 Service Unavailable``), for the
    answers the ingress makes itself; h11 would send none."""
    try:
        return http.HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b""
