"""The CLI's side of the wire: one signed request, one reply; or a watch stream.

Everything here talks to the conductor only through the WebSocket paths of
DESIGN.md §1 (``/v1/cli`` and ``/v1/watch``). Failures come out as
:class:`ClientError` with a code and an exit status, so the CLI can print one
line and exit without a traceback.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import trio
import trio_websocket

from skr8tr.core import envelope, protocol

DEFAULT_CONDUCTOR_URL = "ws://127.0.0.1:7771"
DEFAULT_TIMEOUT_S = 10.0

EXIT_OK = 0
EXIT_REMOTE_ERROR = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3


class ClientError(Exception):
    """A failure the CLI reports as ``error: CODE: message`` and exit status ``exit``."""

    def __init__(self, code: str, message: str, exit: int) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.exit = exit


def endpoint_url(base: str, path: str) -> str:
    """``ws://host:port`` (with or without a trailing slash or a ``/v1/...`` path) + path."""
    base = base.rstrip("/")
    for known in ("/v1/cli", "/v1/watch", "/v1/node"):
        if base.endswith(known):
            base = base[: -len(known)]
    if not base.startswith(("ws://", "wss://")):
        raise ClientError(
            "BAD_URL",
            f"conductor URL {base!r} must start with ws:// or wss:// "
            f"(for example {DEFAULT_CONDUCTOR_URL})",
            EXIT_USAGE,
        )
    return base + path


def _unreachable(url: str, why: str) -> ClientError:
    return ClientError(
        "UNREACHABLE",
        f"cannot reach the conductor at {url} ({why}); is `skr8tr conductor` running? "
        "Pass --conductor URL or set SKR8TR_CONDUCTOR",
        EXIT_UNREACHABLE,
    )


@asynccontextmanager
async def open_conductor(base_url: str, path: str, timeout_s: float, *,
                         ca_file: str | None = None) -> AsyncIterator[
    trio_websocket.WebSocketConnection
]:
    """Connect to the conductor's ``path``; connection failures become ClientError (exit 3).

    A ``wss://`` conductor's certificate is verified against *ca_file* (PEM), or
    the system's trust store without one (:mod:`skr8tr.tls`); a failed check is
    exit 3 too. *ca_file* with a ``ws://`` URL is a usage error (exit 2).
    """
    url = endpoint_url(base_url, path)
    ssl_context = _ssl_context(url, ca_file)
    if ssl_context is not None:
        await _check_tls(url, ssl_context, timeout_s)
    try:
        async with trio_websocket.open_websocket_url(
            url,
            ssl_context=ssl_context,
            connect_timeout=timeout_s,
            disconnect_timeout=2,
            max_message_size=protocol.MAX_MESSAGE_BYTES * 4,
        ) as ws:
            yield ws
    except trio_websocket.ConnectionTimeout:
        raise _unreachable(url, f"no answer within {timeout_s:g} s") from None
    except trio_websocket.ConnectionRejected as exc:
        raise _unreachable(url, f"the handshake was refused with HTTP {exc.status_code}") from None
    except trio_websocket.HandshakeError as exc:
        cause = exc.__cause__
        why = os.strerror(cause.errno) if isinstance(cause, OSError) and cause.errno else str(
            cause or exc
        )
        raise _unreachable(url, why.lower() or "handshake failed") from None
    except trio_websocket.ConnectionClosed as exc:
        raise _unreachable(url, f"the connection closed: {exc.reason}") from None


def _ssl_context(url: str, ca_file: str | None):
    from skr8tr import tls

    if not url.startswith("wss://"):
        if ca_file is not None:
            raise ClientError("USAGE", f"--ca goes with a wss:// conductor URL; {url} is not "
                              "encrypted", EXIT_USAGE)
        return None
    try:
        return tls.client_context(ca_file)
    except tls.TlsError as exc:
        raise ClientError("USAGE", str(exc), EXIT_USAGE) from None


async def _check_tls(url: str, ssl_context, timeout_s: float) -> None:
    from skr8tr import tls

    try:
        await tls.check_handshake(url, ssl_context, timeout_s)
    except tls.TlsError as exc:
        raise _unreachable(url, str(exc)) from None


_ids = itertools.count(1)


@dataclass(frozen=True)
class CallOptions:
    conductor: str
    timeout_s: float
    signing_key: Any | None  # nacl.signing.SigningKey, or None for unsigned read-only calls
    ca_file: str | None = None  # for wss://: the CA to verify the conductor with


def build_request(cmd: str, args: dict, signing_key: Any | None) -> dict:
    """A request dict for ``cmd``; signed when a key is given (DESIGN.md §4)."""
    req_id = f"{os.getpid()}-{next(_ids)}"
    if signing_key is None:
        return {"v": protocol.PROTOCOL_VERSION, "id": req_id, "cmd": cmd, "args": args}
    return envelope.sign_request(
        signing_key, id=req_id, cmd=cmd, args=args, ts=time.time(), nonce=envelope.new_nonce()
    )


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
            while True:
                raw = await ws.get_message()
                reply = protocol.decode_reply(raw)
                if isinstance(reply, protocol.DecodeError):
                    raise ClientError(
                        "BAD_REPLY", f"the conductor sent a reply we cannot read: {reply.message}",
                        EXIT_REMOTE_ERROR,
                    )
                if reply.id == request["id"]:
                    break
        except trio_websocket.ConnectionClosed as exc:
            raise _unreachable(url, f"the connection closed: {exc.reason}") from None
    if scope.cancelled_caught:
        raise ClientError(
            "TIMEOUT", f"no reply from {url} within {opts.timeout_s:g} s (raise --timeout)",
            EXIT_UNREACHABLE,
        )
    if not reply.ok:
        raise ClientError(reply.error_code, reply.error_message, EXIT_REMOTE_ERROR)
    return reply.result


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
        msg = protocol.decode_watch_message(raw)
        if isinstance(msg, protocol.DecodeError):
            raise ClientError(
                "BAD_REPLY", f"the conductor sent an event we cannot read: {msg.message}",
                EXIT_REMOTE_ERROR,
            )
        return msg


@asynccontextmanager
async def open_watch(opts: CallOptions) -> AsyncIterator[WatchStream]:
    """Open ``/v1/watch``; iterate the yielded stream until the conductor closes it."""
    async with open_conductor(opts.conductor, "/v1/watch", opts.timeout_s,
                              ca_file=opts.ca_file) as ws:
        yield WatchStream(ws, endpoint_url(opts.conductor, "/v1/watch"))
