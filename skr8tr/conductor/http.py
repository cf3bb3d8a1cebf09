"""The conductor's plain-HTTP listener (h11): the status page, ``/api/*``, ``/metrics``.

A small keep-alive HTTP/1.1 server: one task per connection, every read under
a time limit, headers capped in size, bad requests answered with 400 and the
connection closed. Handlers are plain functions from (method, path) to a
:class:`Response`. A handler that has background work of its own (the status
routes count events from the bus) exposes it as an async ``run(task_status=)``
method: :func:`serve_http` runs it next to the listener, in the same nursery,
so it lives exactly as long as the listener does.
"""

from __future__ import annotations

import http
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import h11
import trio

log = logging.getLogger("skr8tr.conductor")

READ_TIMEOUT_S = 10.0
MAX_HEADER_BYTES = 16 * 1024
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


async def _send(stream: trio.SocketStream, conn: h11.Connection, resp: Response,
                method: str = "GET") -> None:
    headers = [("Content-Type", resp.content_type), ("Content-Length", str(len(resp.body))),
               ("Cache-Control", "no-store"), ("X-Content-Type-Options", "nosniff"),
               ("Server", "skr8tr"), *resp.headers]
    reason = _REASONS.get(resp.status, b"")
    await stream.send_all(conn.send(h11.Response(status_code=resp.status, headers=headers,
                                                 reason=reason)))
    if method != "HEAD":
        await stream.send_all(conn.send(h11.Data(data=resp.body)))
    await stream.send_all(conn.send(h11.EndOfMessage()))


async def _next_event(stream: trio.SocketStream, conn: h11.Connection):
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        with trio.fail_after(READ_TIMEOUT_S):
            data = await stream.receive_some(8192)
        conn.receive_data(data)


async def handle_connection(stream: trio.SocketStream, handler: Handler) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
    try:
        await _serve_requests(stream, conn, handler)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return  # the client went away mid-response
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(1):
            await stream.aclose()


async def _serve_requests(stream: trio.SocketStream, conn: h11.Connection,
                          handler: Handler) -> None:
    while True:
        try:
            event = await _next_event(stream, conn)
            if not isinstance(event, h11.Request):
                return  # the client closed (ConnectionClosed) between requests
            method = event.method.decode("ascii", "replace")
            target = event.target.decode("ascii", "replace")
            body = 0
            while True:
                ev = await _next_event(stream, conn)
                if isinstance(ev, h11.Data):
                    body += len(ev.data)
                    if body > MAX_BODY_BYTES:
                        raise h11.RemoteProtocolError("request body too large", 413)
                elif isinstance(ev, h11.EndOfMessage):
                    break
                else:
                    return
        except h11.RemoteProtocolError as exc:
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                status = exc.error_status_hint
                await _send(stream, conn, Response(status, f"{exc}\n".encode()))
            return
        except trio.TooSlowError:
            return
        if method not in ("GET", "HEAD"):
            resp = Response(405, b"only GET and HEAD\n")
        else:
            try:
                resp = handler(method, target.split("?", 1)[0])
            except Exception:
                log.exception("HTTP handler failed for %s", target)
                resp = Response(500, b"internal error; see the conductor log\n")
        await _send(stream, conn, resp, method)
        if conn.our_state is h11.MUST_CLOSE:
            return
        try:
            conn.start_next_cycle()
        except h11.LocalProtocolError:
            return


async def serve_http(handler: Handler, host: str, port: int, *,
                     task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve until cancelled; ``task_status.started`` gets the bound listeners.

    When ``handler`` has a ``run`` method, it is started first (``nursery.start``)
    and cancelled with the listener.
    """
    async def on_connection(stream: trio.SocketStream) -> None:
        await handle_connection(stream, handler)

    async with trio.open_nursery() as nursery:
        run = getattr(handler, "run", None)
        if run is not None:
            await nursery.start(run)
        listeners = await nursery.start(partial(trio.serve_tcp, on_connection, port, host=host))
        task_status.started(listeners)
