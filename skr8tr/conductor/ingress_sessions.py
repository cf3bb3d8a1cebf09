"""``/v1/ingress``: what the ingresses saw of each replica, into ``cluster.traffic``.

An ingress proves its key as a node does (it signs the conductor's random
challenge together with its name, in the ``ingress`` role's domain:
:func:`skr8tr.core.envelope.verify_challenge`), is welcomed with the interval
at which to report, then sends one report per interval
(:mod:`skr8tr.core.ingress_protocol`). Each report is checked
(:func:`skr8tr.core.traffic.decode_report`) and added to the traffic book,
which sums every ingress (:class:`skr8tr.conductor.traffic.TrafficBook`).

What one ingress may cost (:mod:`skr8tr.conductor.limits`): messages of at most
256 KiB (close 1009); ``ingress_bytes_per_s`` (over it, reading pauses, as for a
node); ``ingress_reports_per_s`` reports a second with a burst of
``ingress_report_burst`` (a report over it is dropped unread); a report over
:data:`LARGE_REPORT_CHARS` is decoded in a worker thread; a refused report
is answered BAD_REQUEST and the session goes on; a dropped or refused report
is a strike, and a session out of strikes (:data:`INGRESS_STRIKE_BURST`, one
back a second) is closed (1008). At most ``max_ingresses`` sessions at once
(``--max-ingresses``); a session silent for ``ingress_idle_timeout_s`` is
closed. A new session of the same name and key replaces the old one (an
ingress that reconnected before its old connection timed out). A key that
loses the ``ingress`` role on SIGHUP loses its sessions at once
(:meth:`IngressDesk.revoke`).

The :class:`IngressDesk` lives as long as the daemon (its counts are
``/metrics`` counters); the sessions run inside a leadership term (a follower
refuses them with NOT_LEADER, in ``daemon.py``).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from skr8tr.conductor.limits import (
    INGRESS_STRIKE_BURST,
    INGRESS_STRIKES_PER_S,
    Limits,
    LogThrottle,
    TokenBucket,
)
from skr8tr.core import envelope, ingress_protocol
from skr8tr.core.keys import AuthorizedKeys, parse_authorized_keys
from skr8tr.core.signatures import fingerprint, is_public_key
from skr8tr.core.traffic import Report, ReportError, decode_report
from skr8tr.ws.server import ConnectionClosed, ServerConnection

if TYPE_CHECKING:
    from skr8tr.conductor.authority import Authority
    from skr8tr.conductor.cluster import Cluster
    from skr8tr.conductor.policing import Policing

log = logging.getLogger("skr8tr.conductor")

# Above this, a report is decoded in a worker thread (one for every session: the desk's
# limiter), as /v1/cli does with large requests: a 256 KiB report takes 10 to 20 ms, and
# sixteen of them back to back on the event loop held every other client up for most of
# a second (bench/ingress_intake.py).
LARGE_REPORT_CHARS = 64 * 1024

# Why sessions were refused or closed, and reports refused or dropped
# (skr8tr_ingress_refused_total{reason}).
REFUSED_REASONS = (
    "unauthorized",  # unknown key, no ingress role, bad signature
    "bad_hello",  # not a hello, or a field out of bounds
    "hello_timeout",  # no hello within --handshake-timeout
    "not_leader",  # a follower's answer
    "too_many_ingresses",  # --max-ingresses sessions open already
    "bad_report",  # a report decode_report refused (answered BAD_REQUEST)
    "report_rate",  # a report over the rate, dropped unread
    "message_too_big",  # a message over 256 KiB (close 1009)
    "idle_timeout",  # no message for 3 x interval + 5 s
    "strikes",  # closed after too many dropped or refused reports
    "revoked",  # its key lost the ingress role (SIGHUP)
    "replaced",  # a newer session of the same name and key
)


@dataclass(eq=False)
class IngressSession:
    """A welcomed ingress session (a row of ``status``'s ``ingresses``)."""

    name: str
    key: str
    address: str
    scope: trio.CancelScope
    started: float
    reports: int = 0
    last_report: float | None = None
    ended_by: str | None = None  # "revoked" or "replaced": set by whoever cancels it

    def row(self, now: float) -> dict[str, Any]:
        return {"ingress": self.name, "key": fingerprint(self.key), "address": self.address,
                "reports": self.reports,
                "last_report_s": None if self.last_report is None
                else round(max(0.0, now - self.last_report), 3)}


@dataclass
class IngressDesk:
    """The conductor's ingress sessions and the counts of what they sent or were refused."""

    limits: Limits = field(default_factory=Limits)
    sessions: list[IngressSession] = field(default_factory=list)
    reports: int = 0  # reports accepted, ever (skr8tr_ingress_reports_total)
    paused: int = 0  # pauses in reading a session over its byte rate
    _cpu: trio.CapacityLimiter | None = None
    refused: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REFUSED_REASONS, 0))
    _log: LogThrottle = field(default_factory=LogThrottle)

    def rows(self, now: float) -> list[dict[str, Any]]:
        """``status``'s ``ingresses``, by name."""
        return [s.row(now) for s in sorted(self.sessions, key=lambda s: (s.name, s.started))]

    def note(self, reason: str, peer: str, why: str) -> None:
        """Count one refusal and log it (one line per reason every few seconds)."""
        self.refused[reason] = self.refused.get(reason, 0) + 1
        n = self._log.note(reason, trio.current_time())
        if n:
            log.warning("ingress: %d refusal(s) for %s, the last from %s: %s", n, reason,
                        peer, why)

    async def decode(self, raw: str | bytes) -> Report | str:
        """A report, or why it is refused; a large one in the worker thread."""
        if len(raw) <= LARGE_REPORT_CHARS:
            return _decode(raw)
        if self._cpu is None:
            self._cpu = trio.CapacityLimiter(1)
        return await trio.to_thread.run_sync(_decode, raw, limiter=self._cpu)

    def revoke(self, authorized: AuthorizedKeys) -> int:
        """End the sessions whose key is no longer authorized as ingress (SIGHUP)."""
        gone = [s for s in self.sessions if not authorized.has_role(s.key, "ingress")]
        for s in gone:
            s.ended_by = "revoked"
            s.scope.cancel()
        return len(gone)

    def admit(self, session: IngressSession) -> str | None:
        """Add *session*, replacing one of the same name and key; or say why not."""
        for old in self.sessions:
            if old.name == session.name and old.key == session.key:
                old.ended_by = "replaced"
                old.scope.cancel()
                self.sessions.remove(old)
                break
        else:
            if len(self.sessions) >= self.limits.max_ingresses:
                return (f"{self.limits.max_ingresses} ingress sessions are open already "
                        "(--max-ingresses)")
        self.sessions.append(session)
        return None


def _decode(raw: str | bytes) -> Report | str:
    msg = ingress_protocol.parse(raw)
    if isinstance(msg, str):
        return msg
    try:
        return decode_report(msg)
    except ReportError as exc:
        return str(exc)


async def _refuse(ws: ServerConnection, code: str, message: str) -> None:
    with contextlib.suppress(ConnectionClosed), trio.move_on_after(2):
        await ws.send_message(ingress_protocol.error(code, message))
        await ws.aclose(code=1008, reason=message[:120])


async def _hello(authority: Authority, desk: IngressDesk, policing: Policing,
                 ws: ServerConnection, challenge: bytes
                 ) -> ingress_protocol.IngressHello | None:
    """The verified hello, or None once the session was refused (counted, answered)."""
    peer = ws.peer
    timeout_s = policing.limits.handshake_timeout_s
    raw: str | bytes | None = None
    try:
        await ws.send_message(ingress_protocol.challenge(challenge))
        with trio.move_on_after(timeout_s):
            raw = await ws.get_message()
    except ConnectionClosed as exc:
        _count_close(desk, policing, exc, peer)
        return None
    if raw is None:
        policing.closed.count("handshake_timeout")
        desk.note("hello_timeout", peer, f"no hello within {timeout_s:g} s")
        await _refuse(ws, "BAD_REQUEST", f"no hello within {timeout_s:g} s")
        return None
    msg = ingress_protocol.parse(raw)
    hello = ingress_protocol.decode_hello(msg) if isinstance(msg, dict) else msg
    if isinstance(hello, str):
        policing.refusals.count("BAD_REQUEST")
        desk.note("bad_hello", peer, hello)
        await _refuse(ws, "BAD_REQUEST", hello)
        return None
    authorized = authority.authorized
    try:
        if authority.insecure and is_public_key(hello.key):
            authorized = parse_authorized_keys(f"ingress {hello.key}\n", filename="--insecure")
        envelope.verify_challenge(key=hello.key, sig=hello.sig, challenge=challenge,
                                  node_id=hello.name, authorized=authorized, role="ingress")
    except envelope.AuthError as exc:
        why, code = exc.message, exc.code
    else:
        return hello
    policing.refusals.count(code)
    desk.note("unauthorized", peer, f"ingress {hello.name}: {why}")
    await _refuse(ws, code, why)
    return None


def _count_close(desk: IngressDesk, policing: Policing, exc: ConnectionClosed,
                 peer: str) -> None:
    if exc.code == 1009:
        policing.closed.count("message_too_big")
        desk.note("message_too_big", peer,
                  f"a message over {ingress_protocol.MAX_MESSAGE_BYTES} bytes")


async def serve_ingress(cluster: Cluster, authority: Authority, desk: IngressDesk,
                        policing: Policing, ws: ServerConnection) -> None:
    """One ingress connection, from the challenge to its close; returns when it ends.
    Never raises for what the ingress sends."""
    challenge = envelope.new_challenge()
    hello = await _hello(authority, desk, policing, ws, challenge)
    if hello is None:
        return
    session = IngressSession(hello.name, hello.key, ws.peer, trio.CancelScope(),
                             trio.current_time())
    why = desk.admit(session)
    if why is not None:
        desk.note("too_many_ingresses", ws.peer, why)
        await _refuse(ws, "NO_CAPACITY", why)
        return
    log.info("ingress %s (version %s) joined from %s (key %s)", hello.name, hello.version,
             ws.peer, fingerprint(hello.key))
    try:
        with session.scope, contextlib.suppress(ConnectionClosed):
            await ws.send_message(ingress_protocol.welcome(desk.limits.ingress_interval_s))
            await _receive(cluster, desk, policing, ws, session)
    finally:
        if session in desk.sessions:
            desk.sessions.remove(session)
        with trio.CancelScope(shield=True), trio.move_on_after(2):
            if session.ended_by == "revoked":
                desk.note("revoked", ws.peer, f"ingress {session.name}: key revoked")
                policing.closed.count("revoked")
                await _refuse(ws, "UNAUTHORIZED", "this ingress's key was revoked")
            elif session.ended_by == "replaced":
                desk.note("replaced", ws.peer, f"ingress {session.name} connected again")
                await ws.aclose(code=1000, reason="replaced by a newer session")
            else:
                await ws.aclose()
        log.info("ingress %s from %s left after %d report(s)", session.name, ws.peer,
                 session.reports)


async def _receive(cluster: Cluster, desk: IngressDesk, policing: Policing,
                   ws: ServerConnection, session: IngressSession) -> None:
    """Read reports until the ingress leaves or breaks a limit."""
    limits = desk.limits
    peer = f"ingress {session.name} ({ws.peer})"
    now = trio.current_time()
    reports = TokenBucket(limits.ingress_reports_per_s, limits.ingress_report_burst, now)
    byte_rate = limits.ingress_bytes_per_s
    byte_budget = TokenBucket(byte_rate, 2 * byte_rate, now)
    strikes = TokenBucket(INGRESS_STRIKES_PER_S, INGRESS_STRIKE_BURST, now)
    idle_s = limits.ingress_idle_timeout_s
    while True:
        raw = None
        with trio.move_on_after(idle_s):
            try:
                raw = await ws.get_message()
            except ConnectionClosed as exc:
                _count_close(desk, policing, exc, peer)
                return
        if raw is None:
            desk.note("idle_timeout", peer, f"no report for {idle_s:g} s")
            await policing.close_for(ws, peer, "idle_timeout", 1000,
                                     f"no report for {idle_s:g} s")
            return
        wait_s = byte_budget.charge(trio.current_time(), len(raw))
        if wait_s > 0:
            # Not read on meanwhile: TCP holds the ingress back (at most one message's
            # worth, 1 s at the default rate). Decoding is what costs; it waits too.
            desk.paused += 1
            await trio.sleep(wait_s)
        now = trio.current_time()
        if not reports.take(now):
            desk.note("report_rate", peer,
                      f"more than {limits.ingress_reports_per_s:g} reports/s")
            if not strikes.take(now):
                desk.note("strikes", peer, "too many reports over the rate")
                await policing.close_for(ws, peer, "rate_limit", 1008,
                                         "too many reports over the rate")
                return
            continue
        report = await desk.decode(raw)
        if isinstance(report, str):
            desk.note("bad_report", peer, report)
            with trio.move_on_after(idle_s) as sending:  # an ingress that does not read
                await ws.send_message(ingress_protocol.error("BAD_REQUEST", report))
            if sending.cancelled_caught or not strikes.take(now):
                desk.note("strikes", peer, "too many bad reports")
                await policing.close_for(ws, peer, "rate_limit", 1008,
                                         "too many bad reports")
                return
            continue
        cluster.traffic.add(report)
        session.reports += 1
        session.last_report = now
        desk.reports += 1
