"""skr8tr's one WebSocket stack (RFC 6455), on wsproto; what is where:

- :mod:`skr8tr.ws.frames`: the framing every transport uses (wsproto's
  ``Connection``, messages made whole and limited in size), the client's
  opening handshake, and the errors all of them raise: ``ConnectionClosed``
  (with the close code and reason) and ``HandshakeError``. No I/O, no trio.
- :mod:`skr8tr.ws.connection`: an open WebSocket on a trio stream, either
  side, with no reader task (the task that asks for a message reads).
- :mod:`skr8tr.ws.server`: the conductor's side: the HTTP upgrade (h11),
  accept or reject, frames made once for many connections.
- :mod:`skr8tr.ws.trio_client`: the Trio client (node agent, ingress,
  :mod:`skr8tr.client`, tests): ``connect`` / ``open_websocket`` to a URL.
- :mod:`skr8tr.ws.blocking`: the client on one blocking socket, for the CLI
  (no trio, no h11).

Importing this package imports nothing: the CLI pays only for what it uses.
"""
