"""A WebSocket server for tests that play the conductor: skr8tr.ws.server on trio.serve_tcp.

``await nursery.start(serve_websocket, handler, "127.0.0.1", 0, None)`` gives a
server whose ``port`` is the one bound; *handler* gets each upgrade
:class:`~skr8tr.ws.server.Request` to accept or reject, and the connection is
closed when it returns (as the conductor's listener does, without its limits).
"""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from skr8tr.ws import server as wsserver

DISCONNECT_TIMEOUT_S = 2.0
HANDSHAKE_TIMEOUT_S = 10.0


@dataclass
class ListeningServer:
    port: int


async def serve_websocket(handler: Callable[[wsserver.Request], Awaitable[None]], host: str,
                          port: int, ssl_context: ssl.SSLContext | None, *,
                          max_message_size: int = wsserver.DEFAULT_MAX_MESSAGE_BYTES,
                          task_status: trio.TaskStatus[ListeningServer] = trio.TASK_STATUS_IGNORED
                          ) -> None:
    async def serve_one(stream: trio.abc.Stream) -> None:
        if ssl_context is not None:
            stream = trio.SSLStream(stream, ssl_context, server_side=True)
        request = None
        try:
            with trio.move_on_after(HANDSHAKE_TIMEOUT_S):
                request = await wsserver.read_request(stream, "test",
                                                      max_message_size=max_message_size)
        except (wsserver.HandshakeError, trio.BrokenResourceError):
            pass  # answered already (a 4xx), or the client left: nothing to serve
        if request is None:
            await trio.aclose_forcefully(stream)
            return
        try:
            await handler(request)
        except wsserver.ConnectionClosed:
            pass  # the client closed first: the handler's work is over either way
        finally:
            with trio.move_on_after(DISCONNECT_TIMEOUT_S):
                await request.aclose()

    listeners = await trio.open_tcp_listeners(port, host=host)
    task_status.started(ListeningServer(listeners[0].socket.getsockname()[1]))
    await trio.serve_listeners(serve_one, listeners)
