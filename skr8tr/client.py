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
    FOLLOW_CODES,
    CallOptions,
    ClientError,
    FailoverCall,
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
                         ca_file: str | None = None,
                         max_message_bytes: int = CLIENT_MAX_MESSAGE_BYTES,
                         ) -> AsyncIterator[ClientConnection]:
    """Connect to the conductor's ``path``; connection failures become ClientError (exit 3).

    A ``wss://`` conductor's certificate is verified against *ca_file* (PEM), or
    the system's trust store without one (:mod:`skr8tr.tls`); a failed check is
    exit 3 too, with the reason. *ca_file* with a ``ws://`` URL is a usage error
    (exit 2). Leaving the block closes the connection (the close handshake
    waits at most ``trio_client.DISCONNECT_TIMEOUT_S``). One URL only: no
    following of a leader (that is :func:`call` and :func:`open_watch`). A
    message from the conductor over *max_message_bytes* closes the connection (1009).
    """
    url = endpoint_url(base_url, path)
    ws = await _connect(url, timeout_s, ca_file, max_message_bytes)
    try:
        yield ws
    except ConnectionClosed as exc:
        raise _unreachable(url, f"the connection closed: {exc.close_reason}") from None
    finally:
        await _close(ws)


async def _connect(url: str, timeout_s: float, ca_file: str | None,
                   max_message_bytes: int = CLIENT_MAX_MESSAGE_BYTES) -> ClientConnection:
    """The WebSocket at *url* (an endpoint URL); ClientError as :func:`open_conductor`."""
    ssl_context = _ssl_context(url, ca_file)
    try:
        trio_client.split_url(url)
    except ValueError as exc:
        raise ClientError("BAD_URL", f"conductor URL {url!r}: {exc}", EXIT_USAGE) from None
    with trio.move_on_after(timeout_s):
        try:
            return await trio_client.connect(url, ssl_context=ssl_context,
                                             max_message_bytes=max_message_bytes)
        except (trio_client.HandshakeError, trio_client.TlsError) as exc:
            raise _unreachable(url, str(exc)) from None
        except OSError as exc:
            why = os.strerror(exc.errno) if exc.errno else str(exc)
            raise _unreachable(url, why.lower() or "cannot connect") from None
    raise _unreachable(url, f"no answer within {timeout_s:g} s")


async def _close(ws: ClientConnection) -> None:
    with trio.move_on_after(trio_client.DISCONNECT_TIMEOUT_S) as scope:
        scope.shield = True
        await ws.aclose()


async def _dial(run: FailoverCall, ca_file: str | None) -> ClientConnection | None:
    """The next conductor of *run*, connected; None (reported to *run*) when it fails."""
    await trio.sleep(run.next(trio.current_time()).wait_s)
    try:
        return await _connect(run.url, run.connect_timeout_s, ca_file)
    except ClientError as exc:
        if exc.code != "UNREACHABLE":
            raise
        run.unreachable(exc)
        return None


async def call(opts: CallOptions, cmd: str, args: dict) -> Any:
    """Send one request to the leading conductor and return the reply's ``result``.

    ``opts.conductor`` may list several conductors: the request follows
    ``NOT_LEADER`` and goes round the list exactly as the CLI's does
    (:class:`skr8tr.wire.FailoverCall`, one envelope for every conductor tried).
    Raises ClientError: exit 3 when no conductor can be reached or one does not
    answer within the timeout, exit 1 when the leader answers with an error or
    only followers answered until the timeout.
    """
    request = build_request(cmd, args, opts.signing_key)
    text = json.dumps(request)
    run = FailoverCall(opts.conductor, "/v1/cli", opts.timeout_s, trio.current_time())
    while True:
        ws = await _dial(run, opts.ca_file)
        if ws is None:
            continue
        reply = None
        try:
            with trio.move_on_after(opts.timeout_s):
                await ws.send_message(text)
                while reply is None:  # replies to other requests are skipped
                    reply = match_reply(await ws.get_message(), request["id"])
        except ConnectionClosed as exc:
            run.dropped_after_send(
                _unreachable(run.url, f"the connection closed: {exc.close_reason}"))
            continue
        finally:
            await _close(ws)
        if reply is None:
            raise timed_out(run.url, opts.timeout_s)
        if run.settles(reply):
            return run.result(reply)


async def call_on(ws: ClientConnection, opts: CallOptions, cmd: str, args: dict) -> Any:
    """Send one request on a connection that is already open, to that conductor only
    (no following: a ``NOT_LEADER`` is its ClientError, exit 1)."""
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
    """Async iterator over the messages of an open ``/v1/watch`` connection.

    ``conductor`` is the base URL of the conductor it comes from."""

    def __init__(self, ws: ClientConnection, url: str, *,
                 first: protocol.WatchMessage | None = None, conductor: str = "") -> None:
        self._ws = ws
        self._url = url
        self._first = first
        self.conductor = conductor

    def __aiter__(self) -> WatchStream:
        return self

    async def __anext__(self) -> protocol.WatchMessage:
        if self._first is not None:
            first, self._first = self._first, None
            return first
        try:
            raw = await self._ws.get_message()
        except ConnectionClosed as exc:
            raise _unreachable(self._url, f"the stream closed: {exc.close_reason}") from None
        return watch_message(raw)


@asynccontextmanager
async def open_watch(opts: CallOptions) -> AsyncIterator[WatchStream]:
    """Open ``/v1/watch`` on the leading conductor; iterate the yielded stream until
    the conductor closes it.

    A follower's first message (``NOT_LEADER``) sends it on to the leader, and
    the list is gone round as :func:`call` does; the stream yielded starts with
    the leader's snapshot. A conductor that sends nothing within the timeout
    counts as unreachable (TIMEOUT).
    """
    run = FailoverCall(opts.conductor, "/v1/watch", opts.timeout_s, trio.current_time())
    while True:
        ws = await _dial(run, opts.ca_file)
        if ws is None:
            continue
        first = None
        try:
            with trio.move_on_after(opts.timeout_s):
                first = watch_message(await ws.get_message())
            if first is None:
                run.unreachable(timed_out(run.url, opts.timeout_s))
            elif isinstance(first, protocol.WatchError) and first.code in FOLLOW_CODES:
                run.refused(first.code, first.message, first.leader)
                first = None
        except ConnectionClosed as exc:
            run.unreachable(_unreachable(run.url, f"the stream closed: {exc.close_reason}"))
        except BaseException:
            await _close(ws)
            raise
        if first is not None:
            break
        await _close(ws)
    run.search.served()
    try:
        yield WatchStream(ws, run.url, first=first, conductor=run.base)
    except ConnectionClosed as exc:
        raise _unreachable(run.url, f"the connection closed: {exc.close_reason}") from None
    finally:
        await _close(ws)
