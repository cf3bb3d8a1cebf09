"""The trio client of the conductor: one signed request, one reply; or a watch stream.

Everything here talks to the conductor only through its WebSocket paths
(``/v1/cli`` for requests, ``/v1/watch`` for the stream of state), over the
Trio client of :mod:`skr8tr.ws.trio_client`. Failures come out as
:class:`ClientError` with a code and an exit status, so a caller can print one
line and exit without a traceback.

The ingress and the benchmarks use this client inside their trio runs. The CLI
uses :mod:`skr8tr.blocking_client` instead, which gives the same errors without
importing trio; what both share (requests, reply checks, errors) is in
:mod:`skr8tr.wire`.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

from skr8tr.core import protocol

# The trio-free half lives in skr8tr.wire (the CLI's blocking client shares it);
# its names stay importable from here for the ingress, tests and benchmarks.
from skr8tr.wire import (
    CLIENT_MAX_MESSAGE_BYTES,
    DEFAULT_CONDUCTOR_URL,
    DEFAULT_TIMEOUT_S,
    EXIT_OK,
    EXIT_REMOTE_ERROR,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    CallOptions,
    ClientError,
    build_request,
    endpoint_url,
    match_reply,
    result_of,
    timed_out,
    watch_message,
)
from skr8tr.wire import ssl_context_for as _ssl_context
from skr8tr.wire import unreachable as _unreachable
from skr8tr.ws import trio_client
from skr8tr.ws.frames import ConnectionClosed
from skr8tr.ws.trio_client import ClientConnection

__all__ = [
    "DEFAULT_CONDUCTOR_URL",
    "DEFAULT_TIMEOUT_S",
    "EXIT_OK",
    "EXIT_REMOTE_ERROR",
    "EXIT_USAGE",
    "EXIT_UNREACHABLE",
    "ClientError",
    "CallOptions",
    "endpoint_url",
    "build_request",
    "open_conductor",
    "call",
    "call_on",
    "WatchStream",
    "open_watch",
]

@asynccontextmanager
async def open_conductor(base_url: str, path: str, timeout_s: float, *,
                         ca_file: str | None = None) -> AsyncIterator[ClientConnection]:
    """Connect to the conductor's ``path``; connection failures become ClientError (exit 3).

    A ``wss://`` conductor's certificate is verified against *ca_file* (PEM), or
    the system's trust store without one (:mod:`skr8tr.tls`); a failed check is
    exit 3 too, with the reason. *ca_file* with a ``ws://`` URL is a usage error
    (exit 2). Leaving the block closes the connection (the close handshake
    waits at most ``trio_client.DISCONNECT_TIMEOUT_S``).
    """
    url = endpoint_url(base_url, path)
    ssl_context = _ssl_context(url, ca_file)
    try:
        trio_client.split_url(url)
    except ValueError as exc:
        raise ClientError("BAD_URL", f"conductor URL {url!r}: {exc}", EXIT_USAGE) from None
    ws = None
    with trio.move_on_after(timeout_s):
        try:
            ws = await trio_client.connect(url, ssl_context=ssl_context,
                                           max_message_bytes=CLIENT_MAX_MESSAGE_BYTES)
        except (trio_client.HandshakeError, trio_client.TlsError) as exc:
            raise _unreachable(url, str(exc)) from None
        except OSError as exc:
            why = os.strerror(exc.errno) if exc.errno else str(exc)
            raise _unreachable(url, why.lower() or "cannot connect") from None
    if ws is None:
        raise _unreachable(url, f"no answer within {timeout_s:g} s")
    try:
        yield ws
    except ConnectionClosed as exc:
        raise _unreachable(url, f"the connection closed: {exc.close_reason}") from None
    finally:
        with trio.move_on_after(trio_client.DISCONNECT_TIMEOUT_S):
            await ws.aclose()


async def call(opts: CallOptions, cmd: str, args: dict) -> Any:
    """Send one request and return the reply's ``result``.

    Raises ClientError: exit 3 when the conductor cannot be reached or does not
    answer within the timeout, exit 1 when it answers with an error.
    """
    async with open_conductor(opts.conductor, "/v1/cli", opts.timeout_s,
                              ca_file=opts.ca_file) as ws:
        return await call_on(ws, opts, cmd, args)


async def call_on(ws: ClientConnection, opts: CallOptions, cmd: str, args: dict) -> Any:
    """Like :func:`call`, on a connection that is already open (for polling loops)."""
    request = build_request(cmd, args, opts.signing_key)
    url = endpoint_url(opts.conductor, "/v1/cli")
    with trio.move_on_after(opts.timeout_s) as scope:
        try:
            await ws.send_message(json.dumps(request))
            reply = None
            while reply is None:  # replies to other requests are skipped
                reply = match_reply(await ws.get_message(), request["id"])
        except ConnectionClosed as exc:
            raise _unreachable(url, f"the connection closed: {exc.close_reason}") from None
    if scope.cancelled_caught:
        raise timed_out(url, opts.timeout_s)
    return result_of(reply)


class WatchStream:
    """Async iterator over the messages of an open ``/v1/watch`` connection."""

    def __init__(self, ws: ClientConnection, url: str) -> None:
        self._ws = ws
        self._url = url

    def __aiter__(self) -> WatchStream:
        return self

    async def __anext__(self) -> protocol.WatchMessage:
        try:
            raw = await self._ws.get_message()
        except ConnectionClosed as exc:
            raise _unreachable(self._url, f"the stream closed: {exc.close_reason}") from None
        return watch_message(raw)


@asynccontextmanager
async def open_watch(opts: CallOptions) -> AsyncIterator[WatchStream]:
    """Open ``/v1/watch``; iterate the yielded stream until the conductor closes it."""
    async with open_conductor(opts.conductor, "/v1/watch", opts.timeout_s,
                              ca_file=opts.ca_file) as ws:
        yield WatchStream(ws, endpoint_url(opts.conductor, "/v1/watch"))
