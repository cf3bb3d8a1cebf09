"""The ingress's traffic reports to the conductor, on ``/v1/ingress`` (DESIGN.md §11).

:class:`Reporter` holds one connection at a time to the leading conductor:

1. the conductor sends ``{"type":"challenge","nonce":HEX64}``;
2. the ingress answers ``{"type":"hello","ingress":NAME,"key":PUB,"sig":HEX,
   "version":V}``, ``sig`` being :func:`skr8tr.core.envelope.sign_challenge`
   of the nonce and NAME with role ``ingress`` (a key the conductor lists as
   ``ingress KEY`` in its authorized keys);
3. the conductor welcomes it (``{"type":"welcome","interval_s":S}``) or
   refuses it (``{"type":"error","code":...,"message":...}``, with
   ``"leader":URL`` for ``NOT_LEADER``, at any step);
4. every ``interval_s`` the ingress takes the interval's counts from its
   :class:`~skr8tr.ingress.traffic.TrafficCounter` and sends them as
   :class:`skr8tr.core.traffic.Report` messages (``seq`` from 1 on each
   connection; an interval without requests is a report with no replicas, the
   heartbeat). A ``BAD_REQUEST`` answer to a report is logged and the session
   goes on.

Counts are per interval and never resent: what was counted while no session
was up (connecting, refused, between conductors) is dropped when the next
attempt begins, and so is an interval whose report could not be sent; both
are said in a debug line and tallied in :class:`ReporterStats`. So the counter
holds at most one interval plus a connection attempt's worth of counts. On a
graceful shutdown :meth:`Reporter.finish` sends the interval under way at once.

Bounds, both ways: a message from the conductor over
:data:`MAX_CONDUCTOR_MESSAGE_BYTES` closes the connection (1009); each
handshake step is due within :data:`HANDSHAKE_TIMEOUT_S`; the conductor's
interval is held to :data:`MIN_INTERVAL_S` .. :data:`MAX_INTERVAL_S`. Towards
the conductor a report stays under :data:`MAX_REPORT_BYTES` (its limit is
256 KiB): a large interval is split into several reports, at most
:data:`MAX_REPORTS_PER_INTERVAL` and :data:`MAX_REPORTS_PER_S` a second (the
conductor takes 4 a second), and what does not fit
is dropped and tallied. The conductor is pinged every interval; one silent for
``3 x interval + 5 s`` (a frozen process keeps its TCP connection open) is left
for the others in the list.

Several conductors (``--conductor URL,URL``) are gone round as the watch
stream does (:class:`skr8tr.failover.LeaderSearch`, the jittered backoff of
:mod:`skr8tr.ingress.upstreams`); ``NOT_LEADER`` sends the reporter straight
to the leader it names. ``UNAUTHORIZED`` is logged as an error with the
conductor's message (which says what line to add to the authorized keys) and
tried again after the backoff's longest delay: the key may be authorized later.
"""

from __future__ import annotations

import json
import logging
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import trio

from skr8tr import __version__, client
from skr8tr.core import envelope, wire_json
from skr8tr.core.signatures import Signer, fingerprint
from skr8tr.core.traffic import Counts, Report
from skr8tr.failover import LeaderSearch, conductor_urls
from skr8tr.ingress import upstreams
from skr8tr.ingress.traffic import TrafficCounter
from skr8tr.ws.trio_client import ClientConnection, ConnectionClosed

log = logging.getLogger("skr8tr.ingress")

__all__ = [
    "MAX_REPORT_BYTES",
    "MAX_REPORTS_PER_INTERVAL",
    "NAME_RE",
    "Reporter",
    "ReporterStats",
    "default_name",
    "encode_reports",
]

PATH = "/v1/ingress"
CONNECT_TIMEOUT_S = 5.0
HANDSHAKE_TIMEOUT_S = 10.0
MIN_INTERVAL_S = 0.25
MAX_INTERVAL_S = 60.0
MAX_CONDUCTOR_MESSAGE_BYTES = 64 * 1024  # a challenge, a welcome, an error: all small
MAX_REPORT_BYTES = 200 * 1024  # the conductor refuses a message over 256 KiB
MAX_REPORTS_PER_INTERVAL = 3  # the conductor takes 4 a second, a burst of 8 ...
MAX_REPORTS_PER_S = 3  # ... so a short interval gets fewer: 1 every 0.25 s
FINISH_TIMEOUT_S = 2.0  # a graceful shutdown waits this long for the last report
SILENCE_EXTRA_S = 5.0  # silence limit: 3 intervals and this (the conductor's own rule)
LOG_EVERY = 20  # a repeated failure is logged at its level once in this many times
NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_REPORT_OVERHEAD_BYTES = 64  # {"type":"report","seq":N,"replicas":[]} and commas


def default_name() -> str:
    """The host name, as an ingress name (``[A-Za-z0-9._-]``, 64 characters at most)."""
    name = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:64]
    return name or "ingress"


@dataclass
class ReporterStats:
    sessions: int = 0  # conductors that welcomed this ingress
    reports: int = 0  # report messages sent
    dropped_intervals: int = 0  # intervals (or parts) whose counts could not be sent
    dropped_requests: int = 0  # the requests counted in them
    refused_reports: int = 0  # reports the conductor answered BAD_REQUEST

    def summary(self) -> str:
        return (f"{self.reports} traffic report(s) in {self.sessions} session(s); "
                f"{self.dropped_requests} counted request(s) in {self.dropped_intervals} "
                f"interval(s) dropped unsent; {self.refused_reports} report(s) refused")


def encode_reports(first_seq: int, counts: Mapping[str, Counts], *,
                   max_bytes: int = MAX_REPORT_BYTES,
                   max_reports: int = MAX_REPORTS_PER_INTERVAL
                   ) -> tuple[list[tuple[str, dict[str, Counts]]], dict[str, Counts]]:
    """The report messages of one interval's *counts*, numbered from *first_seq*.

    One message when it fits in *max_bytes* (also when *counts* is empty: the
    heartbeat), else several, each under *max_bytes*, at most *max_reports*.
    Returns each message with the counts it carries, and the counts that did not
    fit (dropped by the caller).
    """
    chunks: list[dict[str, Counts]] = [{}]
    size = _REPORT_OVERHEAD_BYTES
    left: dict[str, Counts] = {}
    for rid, one in sorted(counts.items()):
        row = len(json.dumps({"replica": rid, **one.fields()}, separators=(",", ":"))) + 1
        if size + row > max_bytes:
            if len(chunks) >= max_reports or row + _REPORT_OVERHEAD_BYTES > max_bytes:
                left[rid] = one
                continue
            chunks.append({})
            size = _REPORT_OVERHEAD_BYTES
        chunks[-1][rid] = one
        size += row
    messages = [(json.dumps(Report(first_seq + i, chunk).fields(), separators=(",", ":")), chunk)
                for i, chunk in enumerate(chunks)]
    return messages, left


class _Refused(Exception):
    """The conductor answered with an error message instead of the next step."""

    def __init__(self, code: str, message: str, leader: Any = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.leader = leader


class _ProtocolError(Exception):
    """The conductor sent something the protocol does not allow here."""


def _parse(raw: str | bytes) -> dict[str, Any]:
    """A message from the conductor as a JSON object with a string ``type``; _Refused for
    an error message, _ProtocolError for anything malformed."""
    msg = wire_json.parse_object(raw, max_bytes=MAX_CONDUCTOR_MESSAGE_BYTES,
                                 what="the conductor's message")
    if isinstance(msg, str):
        raise _ProtocolError(msg)
    kind = msg.get("type")
    if not isinstance(kind, str):
        raise _ProtocolError("a message without a type")
    if kind == "error":
        code, message = msg.get("code"), msg.get("message")
        if not isinstance(code, str) or not isinstance(message, str):
            raise _ProtocolError("an error message without a code and a message")
        raise _Refused(code[:40], message[:2000], msg.get("leader"))
    return msg


class Reporter:
    """Sends *counter*'s counts to the leading conductor of *conductor_url* as ingress
    *name*, signed by *signer*; see the module docstring. :meth:`run` until cancelled."""

    def __init__(self, conductor_url: str, counter: TrafficCounter, signer: Signer,
                 name: str, *, ca_file: str | None = None) -> None:
        if NAME_RE.fullmatch(name) is None:
            raise ValueError(f"ingress name {name!r}: 1..64 of A-Z a-z 0-9 . _ -")
        self.urls = conductor_urls(conductor_url)
        self.counter = counter
        self.signer = signer
        self.name = name
        self.ca_file = ca_file
        self.stats = ReporterStats()
        self.connected_to: str | None = None  # the conductor of the session, while up
        self.interval_s: float | None = None  # the session's, while up
        self._closing = trio.Event()
        self._finished = trio.Event()

    async def finish(self, timeout_s: float = FINISH_TIMEOUT_S) -> None:
        """Send the counts of the interval under way now, without waiting for its end,
        if a session is up, and report no more; wait at most *timeout_s* for that. For
        a graceful shutdown, once the requests in flight are done: their counts reach
        the conductor instead of being dropped. Then cancel :meth:`run`."""
        self._closing.set()
        if self.connected_to is not None:
            with trio.move_on_after(timeout_s):
                await self._finished.wait()

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Report until cancelled, reconnecting as needed; started at once. Never raises
        but for cancellation."""
        task_status.started()
        log.info("reporting traffic as ingress %s with key %s to %s", self.name,
                 fingerprint(self.signer.public), ", ".join(self.urls))
        search = LeaderSearch(self.urls, backoff=upstreams.JitteredBackoff())
        failures = 0
        hold_s = 0.0  # after UNAUTHORIZED: the backoff's longest delay
        why: str | None = None
        while True:
            attempt = search.next()
            wait_s = max(attempt.wait_s, hold_s)
            if why is not None:
                log_fn = log.warning if failures == 1 or failures % LOG_EVERY == 0 else log.debug
                log_fn("traffic reports: %s; trying %s in %.1f s", why, attempt.url, wait_s)
            await trio.sleep(wait_s)
            self._drop(self.counter.take(), "no session with a conductor")
            hold_s = 0.0
            session = _Session(self, attempt.url)
            try:
                why = await session.run(search)
            except _Refused as exc:
                why = f"{attempt.url} refused the ingress: {exc}"
                if exc.code == "NOT_LEADER":
                    leader = search.not_leader(exc.leader)
                    if leader is not None:
                        log.info("%s is not the leader; reporting to %s", attempt.url, leader)
                        why = None
                        continue
                elif exc.code == "UNAUTHORIZED":
                    hold_s = upstreams.BACKOFF_MAX_S
                    if failures % LOG_EVERY == 0:
                        log.error("the conductor %s refused this ingress's key %s: %s "
                                  "(trying again every %g s)", attempt.url,
                                  fingerprint(self.signer.public), exc.message, hold_s)
            except _ProtocolError as exc:
                why = f"{attempt.url} broke the protocol: {exc}"
            except client.ClientError as exc:
                why = exc.message
            except ConnectionClosed as exc:
                why = f"{attempt.url} closed the connection: {exc}"
            except OSError as exc:
                why = exc.strerror or str(exc)
            except Exception as exc:  # a bug or an unexpected library error: log it, go on
                log.exception("the traffic reports to %s failed", attempt.url)
                why = f"{type(exc).__name__}: {exc}"
            finally:
                self.connected_to = self.interval_s = None
            if session.welcomed:
                failures = 0
            if session.followed:  # a leader no more, naming the new one: dialled next
                log.info("%s", why)
                why = None
                continue
            if session.silent:
                search.went_silent()
            failures += 1
            search.failed()

    def _drop(self, counts: Mapping[str, Counts], why: str) -> None:
        requests = sum(c.requests for c in counts.values())
        if not requests:
            return
        self.stats.dropped_intervals += 1
        self.stats.dropped_requests += requests
        log.debug("traffic counts of %d request(s) on %d replica(s) dropped: %s", requests,
                  len(counts), why)


class _Session:
    """One connection of :class:`Reporter` to *url*."""

    def __init__(self, reporter: Reporter, url: str) -> None:
        self.reporter = reporter
        self.url = url
        self.welcomed = False
        self.silent = False  # ended because the conductor went silent
        self.followed = False  # ended by NOT_LEADER naming the leader (search's next)

    async def run(self, search: LeaderSearch) -> str:
        """Join and report until the session ends; return why it ended. Raises _Refused,
        _ProtocolError, ClientError (unreachable, dropped during the handshake)."""
        r = self.reporter
        async with client.open_conductor(
                self.url, PATH, CONNECT_TIMEOUT_S, max_message_bytes=MAX_CONDUCTOR_MESSAGE_BYTES,
                ca_file=r.ca_file if self.url.startswith("wss://") else None) as ws:
            challenge = await self._next(ws, "challenge")
            nonce = challenge.get("nonce")
            if not isinstance(nonce, str) or re.fullmatch(r"[0-9a-f]{64}", nonce) is None:
                raise _ProtocolError("the challenge's nonce is not 64 lowercase hex digits")
            sig = envelope.sign_challenge(r.signer, bytes.fromhex(nonce), r.name,
                                          role="ingress")
            await ws.send_message(json.dumps({"type": "hello", "ingress": r.name,
                                              "key": r.signer.public, "sig": sig,
                                              "version": __version__}))
            welcome = await self._next(ws, "welcome")
            interval_s = _interval(welcome.get("interval_s"))
            search.served()
            self.welcomed = True
            r.stats.sessions += 1
            r.connected_to, r.interval_s = self.url, interval_s
            r._drop(r.counter.take(), "counted before the session began")
            log.info("traffic reports to %s every %g s", self.url, interval_s)
            return await self._serve(ws, interval_s, search)

    async def _next(self, ws: ClientConnection, wanted: str) -> dict[str, Any]:
        with trio.move_on_after(HANDSHAKE_TIMEOUT_S):
            msg = _parse(await ws.get_message())
            if msg["type"] != wanted:
                raise _ProtocolError(f"expected {wanted}, got {wire_json.show(msg['type'])}")
            return msg
        raise _ProtocolError(f"no {wanted} within {HANDSHAKE_TIMEOUT_S:g} s")

    async def _serve(self, ws: ClientConnection, interval_s: float,
                     search: LeaderSearch) -> str:
        ended: list[str] = []

        async with trio.open_nursery() as nursery:
            def end(why: str) -> None:
                ended.append(why)
                nursery.cancel_scope.cancel()

            async def read() -> None:
                try:
                    while True:
                        self._answer(await ws.get_message())
                except _Refused as exc:
                    if exc.code == "NOT_LEADER" and search.not_leader(exc.leader):
                        self.followed = True
                        end(f"{self.url} is no longer the leader; following "
                                  f"{exc.leader}")
                    else:
                        end(f"{self.url} ended the session: {exc}")
                except _ProtocolError as exc:
                    end(f"{self.url} broke the protocol: {exc}")
                except ConnectionClosed as exc:
                    end(f"{self.url} closed the connection: {exc}")

            async def report() -> None:
                try:
                    await self._report(ws, interval_s)
                except ConnectionClosed as exc:
                    end(f"the connection to {self.url} closed: {exc}")
                except _Silent as exc:
                    self.silent = True
                    end(str(exc))

            nursery.start_soon(read)
            nursery.start_soon(report)
        return ended[0] if ended else "the session ended"

    def _answer(self, raw: str | bytes) -> None:
        """A message from the conductor during the session: an error about a report is
        logged (the session goes on); _Refused for another error."""
        r = self.reporter
        try:
            msg = _parse(raw)
        except _Refused as exc:
            if exc.code != "BAD_REQUEST":
                raise
            r.stats.refused_reports += 1
            n = r.stats.refused_reports
            (log.warning if n == 1 or n % LOG_EVERY == 0 else log.debug)(
                "the conductor %s refused a traffic report (%d so far): %s", self.url, n,
                exc.message)
            return
        log.debug("ignoring a %s message from %s", wire_json.show(msg["type"]), self.url)

    async def _report(self, ws: ClientConnection, interval_s: float) -> None:
        r = self.reporter
        silence_s = 3 * interval_s + SILENCE_EXTRA_S
        most = max(1, min(MAX_REPORTS_PER_INTERVAL, int(MAX_REPORTS_PER_S * interval_s)))
        seq = 1
        next_at = trio.current_time() + interval_s
        while True:
            with trio.move_on_at(next_at):
                await r._closing.wait()
            closing = r._closing.is_set()
            now = trio.current_time()
            next_at = max(next_at + interval_s, now)  # behind by more: no burst to catch up
            messages, left = encode_reports(seq, r.counter.take(), max_reports=most)
            r._drop(left, "over what the reports of one interval may carry")
            sent = 0
            try:
                with trio.move_on_after(silence_s):
                    for text, _ in messages:
                        await ws.send_message(text)
                        sent += 1
                    await ws.send_ping()
            finally:
                seq += len(messages)
                r.stats.reports += sent
                for _, chunk in messages[sent:]:
                    r._drop(chunk, f"the report could not be sent to {self.url}")
            if sent < len(messages):
                raise _Silent(f"{self.url} took no report for {silence_s:g} s")
            if closing:
                log.info("last traffic report sent to %s", self.url)
                r._finished.set()
                await trio.sleep_forever()
            silent_s = trio.current_time() - ws.last_received
            if silent_s >= silence_s:
                raise _Silent(f"nothing from {self.url} for {silent_s:.1f} s (not even a "
                              "pong); it is frozen or cut off")


class _Silent(Exception):
    """The conductor answers nothing, not even pings."""


def _interval(value: Any) -> float:
    """The welcome's ``interval_s``, within MIN_INTERVAL_S..MAX_INTERVAL_S."""
    if not wire_json.is_finite_number(value) or isinstance(value, bool) or value <= 0:
        raise _ProtocolError(f"the welcome's interval_s is {wire_json.show(value)}, not a "
                             "positive number of seconds")
    clamped = min(MAX_INTERVAL_S, max(MIN_INTERVAL_S, float(value)))
    if clamped != value:
        log.warning("the conductor asks for a report every %g s; sending one every %g s",
                    value, clamped)
    return clamped
