"""The client's half of the wire contract, without I/O: requests, replies, exit codes.

What both clients share, the blocking one the CLI uses
(:mod:`skr8tr.blocking_client`) and the trio one the ingress and the
benchmarks use (:mod:`skr8tr.client`): the conductor URL, the request, the
reply check, and :class:`ClientError` with the CLI's exit statuses. Nothing
here imports trio or opens a socket, so the CLI can import it at no cost.
"""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from skr8tr import DEFAULT_CONDUCTOR_URL
from skr8tr.core import protocol

if TYPE_CHECKING:
    import ssl

__all__ = [
    "DEFAULT_CONDUCTOR_URL",
    "DEFAULT_TIMEOUT_S",
    "EXIT_OK",
    "EXIT_REMOTE_ERROR",
    "EXIT_USAGE",
    "EXIT_UNREACHABLE",
    "CLIENT_MAX_MESSAGE_BYTES",
    "ClientError",
    "CallOptions",
    "endpoint_url",
    "unreachable",
    "ssl_context_for",
    "timed_out",
    "build_request",
    "match_reply",
    "result_of",
    "watch_message",
]

# Where every client looks for the conductor without --conductor: the CLI, the node
# agent and the ingress.
DEFAULT_TIMEOUT_S = 10.0

EXIT_OK = 0
EXIT_REMOTE_ERROR = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3

# Replies (a `status` of a big cluster) may be larger than what the conductor
# accepts from a client (protocol.MAX_MESSAGE_BYTES).
CLIENT_MAX_MESSAGE_BYTES = protocol.MAX_MESSAGE_BYTES * 4


class ClientError(Exception):
    """A failure the CLI reports as ``error: CODE: message`` and exit status ``exit``."""

    def __init__(self, code: str, message: str, exit: int) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.exit = exit


@dataclass(frozen=True)
class CallOptions:
    conductor: str
    timeout_s: float
    signing_key: Any | None  # nacl.signing.SigningKey, or None for unsigned read-only calls
    ca_file: str | None = None  # for wss://: the CA to verify the conductor with


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


def unreachable(url: str, why: str) -> ClientError:
    """Exit 3: the conductor at *url* could not be reached, or the connection broke."""
    return ClientError(
        "UNREACHABLE",
        f"cannot reach the conductor at {url} ({why}); is `skr8tr conductor` running? "
        "Pass --conductor URL or set SKR8TR_CONDUCTOR",
        EXIT_UNREACHABLE,
    )


def ssl_context_for(url: str, ca_file: str | None) -> ssl.SSLContext | None:
    """The TLS context for a ``wss://`` *url*, None for ``ws://``.

    It verifies the conductor against *ca_file* (PEM), or the system's trust
    store without one (:mod:`skr8tr.tls`, imported only for ``wss://``).
    Raises ClientError USAGE (exit 2) for a *ca_file* that cannot be used, or
    one given with a ``ws://`` URL (it would protect nothing).
    """
    if not url.startswith("wss://"):
        if ca_file is not None:
            raise ClientError(
                "USAGE",
                f"--ca goes with a wss:// conductor URL; {url} is not encrypted",
                EXIT_USAGE,
            )
        return None
    from skr8tr import tls

    try:
        return tls.client_context(ca_file)
    except tls.TlsError as exc:
        raise ClientError("USAGE", str(exc), EXIT_USAGE) from None


def timed_out(url: str, timeout_s: float) -> ClientError:
    """Exit 3: connected, but no reply within *timeout_s*."""
    return ClientError(
        "TIMEOUT",
        f"no reply from {url} within {timeout_s:g} s (raise --timeout)",
        EXIT_UNREACHABLE,
    )


_ids = itertools.count(1)


def build_request(cmd: str, args: dict, signing_key: Any | None) -> dict:
    """A request for ``cmd`` with a fresh id (:func:`protocol.request_message`): signed
    with the clock's reading and a fresh nonce when a key is given."""
    return protocol.request_message(
        id=f"{os.getpid()}-{next(_ids)}", cmd=cmd, args=args, signing_key=signing_key,
        ts=None if signing_key is None else time.time())


def match_reply(raw: str | bytes, request_id: str) -> protocol.Reply | None:
    """The reply in *raw* if it answers *request_id*, None if it answers another request.

    Raises ClientError BAD_REPLY (exit 1) when *raw* is not a reply at all.
    """
    reply = protocol.decode_reply(raw)
    if isinstance(reply, protocol.DecodeError):
        raise ClientError(
            "BAD_REPLY",
            f"the conductor sent a reply we cannot read: {reply.message}",
            EXIT_REMOTE_ERROR,
        )
    return reply if reply.id == request_id else None


def result_of(reply: protocol.Reply) -> Any:
    """The reply's ``result``; ClientError with the conductor's code (exit 1) if it failed."""
    if not reply.ok:
        raise ClientError(reply.error_code, reply.error_message, EXIT_REMOTE_ERROR)
    return reply.result


def watch_message(raw: str | bytes) -> protocol.WatchMessage:
    """One ``/v1/watch`` message; ClientError BAD_REPLY (exit 1) if it cannot be read."""
    msg = protocol.decode_watch_message(raw)
    if isinstance(msg, protocol.DecodeError):
        raise ClientError(
            "BAD_REPLY",
            f"the conductor sent an event we cannot read: {msg.message}",
            EXIT_REMOTE_ERROR,
        )
    return msg
