"""The conductor's WebSocket listener: TLS, connections per address, handshake deadline.

trio-websocket's own ``serve_websocket`` gives no hook before the handshake,
so this module accepts the TCP connections itself and drives one
:class:`trio_websocket.WebSocketConnection` per connection, as
``WebSocketServer`` does:

1. a client address already holding ``max_connections_per_address``
   connections is closed at once (``too_many_connections``);
2. with TLS, the stream is wrapped in ``trio.SSLStream``;
3. the TLS handshake and the WebSocket upgrade must both be done within
   ``handshake_timeout_s``, else the connection is closed
   (``handshake_timeout``); a connection that closes or sends something that
   is not a WebSocket upgrade before that is ``bad_handshake``;
4. the handler gets the :class:`~trio_websocket.WebSocketRequest`, and when it
   returns the connection is closed (bounded by ``DISCONNECT_TIMEOUT_S``).

:func:`send_messages` writes several messages with one ``send_all`` (a watch
stream's burst of events). It and the listener are the only code that reaches
into trio-websocket's internals (``_reader_task``, ``_get_request``,
``_wsproto``, ``_stream_lock``, ``_stream``); the suite fails if an upgrade
moves them.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Awaitable, Callable
from functools import partial

import trio
import trio_websocket
from wsproto import ConnectionType, WSConnection
from wsproto.events import TextMessage

from skr8tr.conductor.limits import AddressSlots, ClosedCounter, Limits

log = logging.getLogger("skr8tr.conductor")

DISCONNECT_TIMEOUT_S = 2.0
MESSAGE_QUEUE_SIZE = 1
RECEIVE_BYTES = 4 * 1024

Handler = Callable[[trio_websocket.WebSocketRequest], Awaitable[None]]

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
        connection = trio_websocket.WebSocketConnection(
            stream, WSConnection(ConnectionType.SERVER),
            message_queue_size=MESSAGE_QUEUE_SIZE, max_message_size=self.max_message_size,
            receive_buffer_size=RECEIVE_BYTES)
        async with trio.open_nursery() as nursery:
            request: trio_websocket.WebSocketRequest | None = None
            with trio.move_on_after(self.limits.handshake_timeout_s) as deadline:
                async with trio.open_nursery() as handshake:
                    async def read() -> None:
                        try:
                            await connection._reader_task()
                        finally:
                            # The reader is done: no upgrade request is coming.
                            handshake.cancel_scope.cancel()

                    nursery.start_soon(read)
                    request = await connection._get_request()
                    handshake.cancel_scope.cancel()
            if request is None:
                reason = "handshake_timeout" if deadline.cancelled_caught else "bad_handshake"
                self.closed.count(reason)
                log.info("closed a connection from %s: %s", address, {
                    "handshake_timeout": f"no TLS/WebSocket handshake within "
                                         f"{self.limits.handshake_timeout_s:g} s",
                    "bad_handshake": "it did not send a WebSocket upgrade"}[reason])
                nursery.cancel_scope.cancel()
                await trio.aclose_forcefully(stream)
                return
            try:
                await self.handler(request)
            finally:
                with trio.move_on_after(DISCONNECT_TIMEOUT_S):
                    await connection.aclose()
                nursery.cancel_scope.cancel()


async def send_messages(ws: trio_websocket.WebSocketConnection, texts: list[str]) -> None:
    """Send *texts* as that many WebSocket messages, in one write to the socket.

    On loopback each write wakes the peer and can cost the conductor ~100 µs
    when the machine is busy; a command publishes several events at once, and
    a rollout batch queues several launches for a node, so they go together.
    Unlike ``send_message`` the write happens before the first scheduling
    round when nobody else is sending (``send_message`` always yields at its
    lock): what is sent this way goes out before a ``send_message`` started in
    the same round. Raises ConnectionClosed like ``send_message``.
    """
    if ws._close_reason:
        raise trio_websocket.ConnectionClosed(ws._close_reason)
    data = b"".join(ws._wsproto.send(TextMessage(data=text)) for text in texts)
    lock = ws._stream_lock
    try:
        lock.acquire_nowait()
    except trio.WouldBlock:
        await lock.acquire()
    try:
        await ws._stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        lock.release()
        await ws._abort_web_socket()
        raise trio_websocket.ConnectionClosed(ws._close_reason) from None
    else:
        lock.release()
