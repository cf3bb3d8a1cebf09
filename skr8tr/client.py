"""The trio client of the conductor: one signed request, one reply; or a watch stream.

Everything here talks to the conductor only through the WebSocket paths of
DESIGN.md §1 (``/v1/cli`` and ``/v1/watch``). Failures come out as
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
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, NoReturn
from urllib.parse import urlsplit

import trio
import trio_websocket

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

DISCONNECT_TIMEOUT_S = 2.0


@asynccontextmanager
async def open_conductor(base_url: str, path: str, timeout_s: float, *,
                         ca_file: str | None = None) -> AsyncIterator[
    trio_websocket.WebSocketConnection
]:
    """Connect to the conductor's ``path``; connection failures become ClientError (exit 3).

    A ``wss://`` conductor's certificate is verified against *ca_file* (PEM), or
    the system's trust store without one (:mod:`skr8tr.tls`); a failed check is
    exit 3 too, with the reason. *ca_file* with a ``ws://`` URL is a usage error
    (exit 2).
    """
    url = endpoint_url(base_url, path)
    ssl_context = _ssl_context(url, ca_file)
    try:
        async with _open_websocket(url, ssl_context, timeout_s) as ws:
            yield ws
    except trio_websocket.ConnectionRejected as exc:
        raise _unreachable(url, f"the handshake was refused with HTTP {exc.status_code}") from None
    except trio_websocket.ConnectionClosed as exc:
        raise _unreachable(url, f"the connection closed: {exc.reason}") from None


@asynccontextmanager
async def _open_websocket(url: str, ssl_context: ssl.SSLContext | None,
                          timeout_s: float) -> AsyncIterator[trio_websocket.WebSocketConnection]:
    """trio-websocket's ``open_websocket_url``, but with the TLS handshake done first.

    trio-websocket starts the TLS handshake with its first write, from its
    reader task, and reports a failure only as a WebSocket handshake that never
    finishes (the connect timeout). Here the handshake is done on the stream
    before trio-websocket gets it, so a certificate that does not verify is
    ClientError at once, saying why, and no second connection is needed to
    find out. Connection failures and the timeout are ClientError (exit 3);
    the reader task's errors (ConnectionRejected) and the body's come out
    unwrapped from the nursery's exception group.
    """
    host, port, host_header, resource = _split_url(url, ssl_context is not None)
    try:
        async with trio.open_nursery() as nursery:  # for trio-websocket's reader task
            ws = None
            with trio.move_on_after(timeout_s):
                stream = await _open_stream(url, host, port, ssl_context)
                try:
                    ws = await trio_websocket.wrap_client_stream(
                        nursery, stream, host_header, resource,
                        max_message_size=CLIENT_MAX_MESSAGE_BYTES)
                finally:
                    if ws is None:
                        await trio.aclose_forcefully(stream)
            if ws is None:
                raise _unreachable(url, f"no answer within {timeout_s:g} s")
            try:
                yield ws
            finally:
                with trio.move_on_after(DISCONNECT_TIMEOUT_S):
                    await ws.aclose()
                nursery.cancel_scope.cancel()  # the reader task, if the close left it running
    except BaseExceptionGroup as group:
        _raise_unwrapped(group)


def _split_url(url: str, tls: bool) -> tuple[str, int, str, str]:
    """``(host, port, Host header, resource)`` of a ws:// or wss:// *url*."""
    parts = urlsplit(url)
    try:
        port = parts.port or (443 if tls else 80)
    except ValueError:
        raise ClientError("BAD_URL", f"conductor URL {url!r} has a bad port", EXIT_USAGE) from None
    host = parts.hostname or ""
    shown = f"[{host}]" if ":" in host else host
    host_header = shown if port == (443 if tls else 80) else f"{shown}:{port}"
    resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return host, port, host_header, resource


async def _open_stream(url: str, host: str, port: int,
                       ssl_context: ssl.SSLContext | None) -> trio.abc.Stream:
    """TCP to *host*:*port*, with the TLS handshake done when *ssl_context* is given."""
    try:
        if ssl_context is None:
            return await trio.open_tcp_stream(host, port)
        stream = await trio.open_ssl_over_tcp_stream(host, port, ssl_context=ssl_context,
                                                     https_compatible=True)
    except OSError as exc:
        why = os.strerror(exc.errno) if exc.errno else str(exc)
        raise _unreachable(url, why.lower() or "cannot connect") from None
    try:
        await stream.do_handshake()
    except trio.BrokenResourceError as exc:
        from skr8tr import tls

        await trio.aclose_forcefully(stream)
        why = tls.describe_failure(exc) or f"TLS handshake with {host}:{port} failed"
        raise _unreachable(url, why) from None
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return stream


def _raise_unwrapped(group: BaseExceptionGroup) -> NoReturn:
    """Raise the one exception of *group* that is not Cancelled (only Cancelled: the
    first), with its own traceback and context; the group itself when there are more."""
    real = [exc for exc in group.exceptions if not isinstance(exc, trio.Cancelled)]
    exc = real[0] if len(real) == 1 else group.exceptions[0] if not real else group
    context = exc.__context__
    try:
        raise exc
    finally:
        exc.__context__ = context  # not the group being handled here
        del exc, context


async def call(opts: CallOptions, cmd: str, args: dict) -> Any:
    """Send one request and return the reply's ``result``.

    Raises ClientError: exit 3 when the conductor cannot be reached or does not
    answer within the timeout, exit 1 when it answers with an error.
    """
    async with open_conductor(opts.conductor, "/v1/cli", opts.timeout_s,
                              ca_file=opts.ca_file) as ws:
        return await call_on(ws, opts, cmd, args)


async def call_on(ws: trio_websocket.WebSocketConnection, opts: CallOptions, cmd: str,
                  args: dict) -> Any:
    """Like :func:`call`, on a connection that is already open (for polling loops)."""
    request = build_request(cmd, args, opts.signing_key)
    url = endpoint_url(opts.conductor, "/v1/cli")
    with trio.move_on_after(opts.timeout_s) as scope:
        try:
            await ws.send_message(json.dumps(request))
            reply = None
            while reply is None:  # replies to other requests are skipped
                reply = match_reply(await ws.get_message(), request["id"])
        except trio_websocket.ConnectionClosed as exc:
            raise _unreachable(url, f"the connection closed: {exc.reason}") from None
    if scope.cancelled_caught:
        raise timed_out(url, opts.timeout_s)
    return result_of(reply)


class WatchStream:
    """Async iterator over the messages of an open ``/v1/watch`` connection."""

    def __init__(self, ws: trio_websocket.WebSocketConnection, url: str) -> None:
        self._ws = ws
        self._url = url

    def __aiter__(self) -> WatchStream:
        return self

    async def __anext__(self) -> protocol.WatchMessage:
        try:
            raw = await self._ws.get_message()
        except trio_websocket.ConnectionClosed as exc:
            raise _unreachable(self._url, f"the stream closed: {exc.reason}") from None
        return watch_message(raw)


@asynccontextmanager
async def open_watch(opts: CallOptions) -> AsyncIterator[WatchStream]:
    """Open ``/v1/watch``; iterate the yielded stream until the conductor closes it."""
    async with open_conductor(opts.conductor, "/v1/watch", opts.timeout_s,
                              ca_file=opts.ca_file) as ws:
        yield WatchStream(ws, endpoint_url(opts.conductor, "/v1/watch"))
