"""Health checks: one HTTP/1.1 probe, and the ready/unhealthy state machine.

The probe is done locally by the node (``h11`` over ``trio.open_tcp_stream``;
h11 is imported at the first probe, so an agent with no health-checked
replica does not carry it, see the footprint figures in BENCHMARKS.md).
:class:`HealthTracker` is pure: it turns a sequence of pass/fail results into
the state changes to report.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import trio

PROBE_MAX_RESPONSE_BYTES = 64 * 1024
# Until a replica first passes, it is probed sooner than every `interval`: after
# STARTUP_PROBE_MIN_S, then at 1/STARTUP_PROBE_SLACK of the time it has been
# starting, so readiness is found at most ~12 % (and 10 ms) after it happens
# instead of up to a whole interval later. A service that takes 55 ms to start
# is probed ~8 times; one that takes 10 s, ~45 times.
STARTUP_PROBE_MIN_S = 0.010
STARTUP_PROBE_SLACK = 8
# While an outcome repeats, its count is told to the conductor at most this often (a
# new outcome, and the `retries`-th wrong answer in a row, are told at once).
PROBE_REPORT_EVERY_S = 2.0
PROBE_TEXT_MAX_CHARS = 200  # node_protocol.MAX_PROBE_TEXT_CHARS
BAD_RESPONSE = "bad HTTP response"


@dataclass(frozen=True)
class ProbeResult:
    """``status`` is the HTTP status code, or None when no response came (see ``error``)."""

    status: int | None
    error: str | None = None

    def describe(self) -> str:
        return f"HTTP {self.status}" if self.status is not None else (self.error or "no answer")


async def probe_http(host: str, port: int, path: str, timeout_s: float) -> ProbeResult:
    """``GET http://host:port{path}`` with ``Connection: close``; the status line is enough.

    The whole probe (connect, send, first response head) runs under
    ``move_on_after(timeout_s)``. Never raises for network or protocol
    trouble: that is a failed probe, described in ``error``. Cancellation
    from outside propagates as usual.
    """
    import h11

    with trio.move_on_after(timeout_s):
        try:
            return await _probe(host, port, path)
        except OSError as exc:
            return ProbeResult(None, os_error_text(exc))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return ProbeResult(None, "connection reset")
        except h11.ProtocolError as exc:
            return ProbeResult(None, f"{BAD_RESPONSE}: {exc}")
    return ProbeResult(None, f"no answer within {timeout_s:g} s")


async def _probe(host: str, port: int, path: str) -> ProbeResult:
    import h11

    host_header = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    conn = h11.Connection(our_role=h11.CLIENT, max_incomplete_event_size=PROBE_MAX_RESPONSE_BYTES)
    request = conn.send(h11.Request(method="GET", target=path or "/", headers=[
        ("Host", host_header), ("Connection", "close"), ("User-Agent", "skr8tr-node"),
    ]))
    end = conn.send(h11.EndOfMessage())
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        await stream.send_all((request or b"") + (end or b""))
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(16384))
                continue
            if isinstance(event, h11.Response):
                return ProbeResult(event.status_code)
            if isinstance(event, h11.ConnectionClosed):
                return ProbeResult(None, "connection closed before a response")
            # h11.InformationalResponse (1xx): keep reading for the final response.


def probe_text(path: str, result: ProbeResult, expect_status: int) -> str:
    """One line saying what a probe got: ``GET /healthz -> 404, want 200``,
    ``GET /healthz -> 200``, ``GET /healthz -> connection refused``; at most
    :data:`PROBE_TEXT_MAX_CHARS` characters. It reaches readers without a key
    (``rollout status``, ``/api/state``): never what the workload sent."""
    if result.status is None:
        got = result.error or "no answer"
        if got.startswith(BAD_RESPONSE):
            # h11 quotes what came: the workload's bytes, never for a text anyone can read
            got = BAD_RESPONSE

    elif result.status == expect_status:
        got = str(result.status)
    else:
        got = f"{result.status}, want {expect_status}"
    text = f"GET {path} -> {got}"
    if len(text) > PROBE_TEXT_MAX_CHARS:
        text = text[:PROBE_TEXT_MAX_CHARS - 1] + "\u2026"
    return text


class ProbeNotes:
    """Which probe results a replica's reports carry to the conductor (pure).

    Counts the probes in a row with the same kind of outcome (passed, a wrong HTTP
    status, no complete answer) and says when to tell: a new text at once, the
    ``retries``-th wrong answer in a row at once (the conductor fails a rollout on
    it), a growing count at most every :data:`PROBE_REPORT_EVERY_S`; a run of passes
    once. What it returns is a report's ``probe`` field.
    """

    def __init__(self, retries: int, *, every_s: float = PROBE_REPORT_EVERY_S) -> None:
        self.retries = retries
        self.every_s = every_s
        self.kind: str | None = None
        self.count = 0
        self._told: tuple[str, int] | None = None  # (text, count) last told
        self._told_at = -math.inf

    def observe(self, text: str, status: int | None, passed: bool, now: float
                ) -> dict[str, Any] | None:
        """Feed one probe's outcome at *now*; the ``probe`` field to report, or None."""
        kind = "pass" if passed else "none" if status is None else "wrong"
        self.count = self.count + 1 if kind == self.kind else 1
        self.kind = kind
        told = self._told
        due = (told is None or told[0] != text
               or (kind == "wrong" and self.count == self.retries)
               or (kind != "pass" and now - self._told_at >= self.every_s))
        if not due:
            return None
        self._told, self._told_at = (text, self.count), now
        return {"text": text, "status": status, "count": self.count}


def next_probe_delay(interval_s: float, starting_for_s: float | None) -> float:
    """How long to wait before the next probe.

    *starting_for_s* is how long the replica has been starting (never passed
    a probe yet), or None once it has passed one, or when it is a re-adopted
    replica that had been ready (its failures count, so it keeps the pace of
    *interval_s*). Never more than *interval_s*.
    """
    if starting_for_s is None:
        return interval_s
    return min(interval_s, max(STARTUP_PROBE_MIN_S, starting_for_s / STARTUP_PROBE_SLACK))


def os_error_text(exc: BaseException) -> str:
    """What a connection error was, in a few words (``connection refused``)."""
    # trio.open_tcp_stream raises a bare OSError whose cause is a group of the
    # errors of every attempt; the last one says most.
    if isinstance(exc, OSError) and exc.errno is not None:
        return os.strerror(exc.errno).lower()
    cause = exc.__cause__
    if isinstance(cause, BaseExceptionGroup) and cause.exceptions:
        return os_error_text(cause.exceptions[-1])
    return str(exc) or type(exc).__name__


class HealthTracker:
    """Turns probe results into the states to report.

    Until the first pass nothing is reported (a starting process may not
    listen yet). The first pass reports ``ready``. After that, ``retries``
    consecutive failures report ``unhealthy`` once; a later pass reports
    ``ready`` again. Any pass resets the failure count.

    *was_ready* is for a re-adopted replica that had been ready before the
    agent restarted: its first pass still reports ``ready``, but ``retries``
    failures before that report ``unhealthy`` instead of nothing.
    """

    def __init__(self, retries: int, *, was_ready: bool = False) -> None:
        if retries < 1:
            raise ValueError(f"retries must be >= 1, got {retries}")
        self.retries = retries
        self.was_ready = was_ready
        self.ready = False
        self.unhealthy = False
        self.failures = 0

    def observe(self, passed: bool) -> str | None:
        """Feed one probe result; return ``"ready"``, ``"unhealthy"`` or None (no change)."""
        if passed:
            self.failures = 0
            if not self.ready or self.unhealthy:
                self.ready, self.unhealthy = True, False
                return "ready"
            return None
        if not (self.ready or self.was_ready):
            return None
        self.failures += 1
        if self.failures >= self.retries and not self.unhealthy:
            self.unhealthy = True
            return "unhealthy"
        return None
