"""The conductor's WebSocket listener: TLS, connection caps, handshake deadline, Host/Origin.

This module accepts the TCP connections itself (:mod:`skr8tr.conductor.accept`)
and serves each with our own server connection
(:mod:`skr8tr.ws.server`: wsproto, no reader task):

1. a connection over the total cap (``max_connections``, both listeners
   together) or from a client address already holding
   ``max_connections_per_address`` is closed at once (``max_connections``,
   ``too_many_connections``);
2. with TLS, the stream is wrapped in ``trio.SSLStream``;
3. the TLS handshake and the WebSocket upgrade request must both be done
   within ``handshake_timeout_s``, else the connection is closed
   (``handshake_timeout``); a connection that closes or sends something that
   is not a WebSocket upgrade before that is ``bad_handshake`` (an HTTP
   request is answered 400 first);
4. an upgrade from a browser (it carries ``Origin``) whose ``Host`` is not
   this conductor's is answered 421, one from a foreign page 403
   (:mod:`skr8tr.conductor.origins`); one without ``Origin`` (the CLI, node
   agents, the ingress) may name the conductor by any host;
5. the handler gets the :class:`~skr8tr.ws.server.Request` to accept
   or reject, and when it returns the connection is closed (the closing
   handshake bounded by ``DISCONNECT_TIMEOUT_S``).
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Awaitable, Callable

import trio

from skr8tr.conductor.accept import Admission, serve_accepting
from skr8tr.conductor.limits import AddressSlots, ClosedCounter, ConnectionGate, Limits
from skr8tr.conductor.origins import HostPolicy
from skr8tr.daemon_errors import bind
from skr8tr.ws import server as wsserver

log = logging.getLogger("skr8tr.conductor")

DISCONNECT_TIMEOUT_S = 2.0

Handler = Callable[[wsserver.Request], Awaitable[None]]


class WebSocketListener:
    """Serves WebSockets on a bound TCP listener; see the module docstring.

    *admission* is shared with the HTTP listener (the total cap); without one the
    listener has a gate of its own. Without a *policy* every Host and Origin passes.
    """

    def __init__(self, handler: Handler, *, limits: Limits, closed: ClosedCounter,
                 max_message_size: int, ssl_context: ssl.SSLContext | None = None,
                 admission: Admission | None = None,
                 policy: HostPolicy | None = None) -> None:
        self.handler = handler
        self.limits = limits
        self.closed = closed
        self.max_message_size = max_message_size
        self.ssl_context = ssl_context
        self.admission = admission or Admission(
            ConnectionGate(limits.max_connections or 2 * limits.max_connections_per_address),
            closed)
        self.policy = policy
        self.slots = AddressSlots(limits.max_connections_per_address)
        self.port = 0

    async def serve(self, host: str, port: int, *,
                    task_status: trio.TaskStatus[WebSocketListener] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        """Bind ``host:port`` and serve until cancelled; ``started(self)`` once bound."""
        listeners = await bind(host, port, "--listen")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(serve_accepting, listener, self.serve_stream,
                                   self.admission, self.slots, "API")
            task_status.started(self)

    async def serve_stream(self, stream: trio.SocketStream, address: str) -> None:
        """One admitted TCP connection from *address*, from TLS to the close."""
        try:
            local = str(stream.socket.getsockname()[0])
        except OSError:
            return  # gone already; the accept loop closes it
        transport: trio.abc.Stream = stream
        if self.ssl_context is not None:
            transport = trio.SSLStream(stream, self.ssl_context, server_side=True)
        await self._serve_websocket(transport, address, local)

    async def _serve_websocket(self, stream: trio.abc.Stream, address: str,
                               local: str = "") -> None:
        request: wsserver.Request | None = None
        why = ""
        with trio.move_on_after(self.limits.handshake_timeout_s) as deadline:
            try:
                request = await wsserver.read_request(
                    stream, address, max_message_size=self.max_message_size)
            except wsserver.HandshakeError as exc:
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
        if await self._refused(request, local):
            return
        try:
            await self.handler(request)
        except wsserver.ConnectionClosed:
            pass  # the client left while the handler was answering it
        finally:
            with trio.move_on_after(DISCONNECT_TIMEOUT_S):
                await request.aclose()

    async def _refused(self, request: wsserver.Request, local: str) -> bool:
        """Answer an upgrade with a foreign Host (421) or Origin (403); True if it was."""
        policy = self.policy
        if policy is None:
            return False
        fields: dict[bytes, bytes] = {}
        for name, value in request.headers:  # sent twice: both, which then do not parse
            fields[name] = fields[name] + b", " + value if name in fields else value
        if b"origin" not in fields:
            # Not a browser (browsers always send Origin on a WebSocket handshake), so
            # neither DNS rebinding nor a foreign page: the CLI, node agents and the
            # ingress may reach the conductor by any name.
            return False
        status, header = 421, "host"
        why = policy.check_host(fields.get(b"host"))
        if why is None:
            status, header = 403, "origin"
            why = policy.check_origin(fields.get(b"origin"), local)
        if why is None:
            return False
        if self.admission.throttle.note(f"API:{header}", trio.current_time()):
            log.warning("refused a WebSocket handshake from %s for %s (%d): %s",
                        request.peer, request.path[:100], status, why)
        with trio.move_on_after(DISCONNECT_TIMEOUT_S):
            await request.reject(status, body=why.encode() + b"\n")
        return True
