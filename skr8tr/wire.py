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
from skr8tr.failover import Attempt, LeaderSearch, conductor_urls

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
    "FOLLOW_CODES",
    "RECONNECT_BUDGET_S",
    "FailoverCall",
]

# Where every client looks for the conductor without --conductor: the CLI, the node
# agent and the ingress.
DEFAULT_TIMEOUT_S = 10.0

EXIT_OK = 0
EXIT_REMOTE_ERROR = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3

# The error codes that send a client to another conductor: a follower (NOT_LEADER),
# a conductor that lost etcd (UNAVAILABLE).
FOLLOW_CODES = ("NOT_LEADER", "UNAVAILABLE")
# How long a stream (`watch`, `rollout --watch`, `logs --follow`) looks for a leader
# after its connection dropped: a failover takes a few seconds (etcd lease 5 s).
RECONNECT_BUDGET_S = 30.0

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
    signing_key: Any | None  # core.signatures.Signer, or None for unsigned read-only calls
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


class FailoverCall:
    """One request, or the opening of one stream, across the ``--conductor`` list (no I/O).

    The caller dials what :meth:`next` returns and reports the outcome; this
    object decides where to go next (:class:`skr8tr.failover.LeaderSearch`)
    and when to give up with which error:

    - the first pass tries every listed conductor once, each connection
      bounded by ``timeout_s / len(urls)`` (one URL: ``timeout_s``, as before
      lists existed); leader hints and later passes only until the deadline;
    - a whole pass in which no conductor answered, while none ever did, ends
      it at once with the last connection failure (exit 3), as one
      unreachable conductor always has (unless *patient_s* is given);
    - otherwise it keeps cycling (0.2 s doubling to 1 s between passes) until
      ``timeout_s`` (or *patient_s*) is spent, then reports the last
      ``NOT_LEADER``/``UNAVAILABLE`` answer (exit 1) or, if no conductor ever
      answered, the last connection failure (exit 3).

    *first* is a base URL to try before the list (the conductor that served
    the previous request). Raises ClientError BAD_URL (exit 2) for a list with
    a URL that is not ws:// or wss://.
    """

    def __init__(self, conductor: str, path: str, timeout_s: float, now: float, *,
                 patient_s: float | None = None, first: str | None = None) -> None:
        try:
            self.urls = conductor_urls(conductor)
        except ValueError as exc:
            raise ClientError("BAD_URL", str(exc), EXIT_USAGE) from None
        for url in self.urls:
            endpoint_url(url, path)  # a bad URL is bad usage before anything is sent
        self.path = path
        self.patient = patient_s is not None
        self.budget_s = patient_s if patient_s is not None else timeout_s
        self.deadline = now + self.budget_s
        self.connect_timeout_s = timeout_s / len(self.urls)
        self.search = LeaderSearch(self.urls, first=first)
        self.base = ""  # the conductor of the current attempt, as listed or named
        self.url = ""  # ... and the endpoint dialled (base + path)
        self.refusal: ClientError | None = None  # the last NOT_LEADER / UNAVAILABLE
        self.failure: ClientError | None = None  # the last connection failure
        self.dropped = False  # a request went out on a connection that then dropped

    def next(self, now: float) -> Attempt:
        """The next conductor to dial (``self.url``), after ``wait_s``; raises the
        ClientError to report when it is time to give up."""
        attempt = self.search.next()
        later = attempt.followed or attempt.pass_no > 1
        if attempt.starts_pass and later and self.refusal is None and not self.patient:
            raise self._give_up()
        if later and now + attempt.wait_s >= self.deadline:
            raise self._give_up()
        self.base = attempt.url
        self.url = endpoint_url(attempt.url, self.path)
        return attempt

    def unreachable(self, error: ClientError) -> None:
        """The connection to ``self.url`` failed, or closed before it answered."""
        self.failure = error
        self.search.failed()

    def dropped_after_send(self, error: ClientError) -> None:
        """The connection closed after the request went out: it may have been
        accepted; the same envelope goes to the next conductor."""
        self.dropped = True
        self.unreachable(error)

    def refused(self, code: str, message: str, leader: str | None) -> None:
        """``self.url`` answered NOT_LEADER (naming *leader*, or None) or UNAVAILABLE."""
        self.refusal = ClientError(code, message, EXIT_REMOTE_ERROR)
        if code == "NOT_LEADER":
            self.search.not_leader(leader)
        else:
            self.search.failed()

    def settles(self, reply: protocol.Reply) -> bool:
        """True when *reply* is the answer to report; False when it sends the request
        on to another conductor (NOT_LEADER, UNAVAILABLE)."""
        if not reply.ok and reply.error_code in FOLLOW_CODES:
            self.refused(reply.error_code, reply.error_message or "", reply.error_leader)
            return False
        self.search.served()
        return True

    def result(self, reply: protocol.Reply) -> Any:
        """The result of a settling *reply*, or its ClientError (exit 1).

        ``REPLAY`` after a dropped connection means a conductor accepted this
        very envelope before the drop (the nonce guard is shared through etcd):
        it is reported as such, not as an attack.
        """
        if not reply.ok and reply.error_code == "REPLAY" and self.dropped:
            raise ClientError(
                "REPLAY",
                "the conductor accepted this request before the connection dropped; "
                "check with `skr8tr status`",
                EXIT_REMOTE_ERROR,
            )
        return result_of(reply)

    def _give_up(self) -> ClientError:
        listed = ", ".join(self.urls)
        if self.refusal is not None:
            return ClientError(
                self.refusal.code,
                f"{self.refusal.message} (no conductor of {listed} served within "
                f"{self.budget_s:g} s)",
                EXIT_REMOTE_ERROR,
            )
        if self.failure is None:  # cannot happen: a later pass follows a failed attempt
            return unreachable(listed, "no conductor answered")
        if self.patient:
            return ClientError(self.failure.code, f"{self.failure.message} (no conductor of "
                               f"{listed} answered for {self.budget_s:g} s)", self.failure.exit)
        return self.failure
