"""The conductor's WebSocket listener: TLS, connections per address, handshake deadline.

This module accepts the TCP connections itself and serves each with our own
server connection (:mod:`skr8tr.conductor.wsserver`: wsproto, no reader task):

1. a client address already holding ``max_connections_per_address``
   connections is closed at once (``too_many_connections``);
2. with TLS, the stream is wrapped in ``trio.SSLStream``;
3. the TLS handshake and the WebSocket upgrade request must both be done
   within ``handshake_timeout_s``, else the connection is closed
   (``handshake_timeout``); a connection that closes or sends something that
   is not a WebSocket upgrade before that is ``bad_handshake`` (an HTTP
   request is answered 400 first);
4. the handler gets the :class:`~skr8tr.conductor.wsserver.Request` to accept
   or reject, and when it returns the connection is closed (the closing
   handshake bounded by ``DISCONNECT_TIMEOUT_S``).
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Awaitable, Callable
from functools import partial

import trio

from skr8tr.conductor import wsserver
from skr8tr.conductor.limits import AddressSlots, ClosedCounter, Limits

log = logging.getLogger("skr8tr.conductor")

DISCONNECT_TIMEOUT_S = 2.0

Handler = Callable[[wsserver.Request], Awaitable[None]]


class WebSocketListener:
    """Serves WebSockets on a bound TCP listener; see the module docstring."""

    def __init__(self, handler: Handler, *, limits: Limits, closed: ClosedCounter,
                 max_message_size: int, ssl_context: ssl.SSLContext | None = None) -> None:
        self.handler = handler
        self.limits = limits
        self.closed = closed
        self.max_message_size = max_message_size
        self.ssl_context = ssl_context
        self.slots = AddressSlots(limits.max_connections_per_address)
        self.port = 0

    async def serve(self, host: str, port: int, *,
                    task_status: trio.TaskStatus[WebSocketListener] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        """Bind ``host:port`` and serve until cancelled; ``started(self)`` once bound."""
        listeners = await trio.open_tcp_listeners(port, host=host)
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(trio.serve_listeners, self.serve_stream, listeners))
            task_status.started(self)

    async def serve_stream(self, stream: trio.SocketStream) -> None:
        """One accepted TCP connection, from the limit check to the close."""
        try:
            address = str(stream.socket.getpeername()[0])
        except OSError:
            await trio.aclose_forcefully(stream)
            return
        if not self.slots.acquire(address):
            self.closed.count("too_many_connections")
            log.warning("closed a connection from %s: it already holds %d connections "
                        "(--max-connections-per-address)", address, self.slots.limit)
            await trio.aclose_forcefully(stream)
            return
        try:
            transport: trio.abc.Stream = stream
            if self.ssl_context is not None:
                transport = trio.SSLStream(stream, self.ssl_context, server_side=True)
            await self._serve_websocket(transport, address)
        except Exception:
            # A bug in serving one connection must not take the conductor down.
            log.exception("the connection from %s failed; it is closed, the others go on",
                          address)
            await trio.aclose_forcefully(stream)
        finally:
            self.slots.release(address)

    async def _serve_websocket(self, stream: trio.abc.Stream, address: str) -> None:
        request: wsserver.Request | None = None
        why = ""
        with trio.move_on_after(self.limits.handshake_timeout_s) as deadline:
            try:
                request = await wsserver.read_request(
                    stream, address, max_message_size=self.max_message_size)
            except wsserver.BadHandshake as exc:
                why = str(exc)
        if request is None:
            reason = "handshake_timeout" if deadline.cancelled_caught else "bad_handshake"
            self.closed.count(reason)
            log.info("closed a connection from %s: %s", address, {
                "handshake_timeout": f"no TLS/WebSocket handshake within "
                                     f"{self.limits.handshake_timeout_s:g} s",
                "bad_handshake": f"it did not send a WebSocket upgrade ({why})"}[reason])
            await trio.aclose_forcefully(stream)
            return
        try:
            await self.handler(request)
        except wsserver.ConnectionClosed:
            pass  # the client left while the handler was answering it
        finally:
            with trio.move_on_after(DISCONNECT_TIMEOUT_S):
                await request.aclose()
