"""Health checks: one HTTP/1.1 probe, and the ready/unhealthy state machine.

The probe is done locally by the node (``h11`` over ``trio.open_tcp_stream``;
h11 is imported at the first probe, so an agent with no health-checked
replica does not carry it, see the footprint figures in BENCHMARKS.md).
:class:`HealthTracker` is pure: it turns a sequence of pass/fail results into
the state changes to report.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import trio

PROBE_MAX_RESPONSE_BYTES = 64 * 1024
# Until a replica first passes, it is probed sooner than every `interval`: after
# STARTUP_PROBE_MIN_S, then at 1/STARTUP_PROBE_SLACK of the time it has been
# starting, so readiness is found at most ~12 % (and 10 ms) after it happens
# instead of up to a whole interval later. A service that takes 55 ms to start
# is probed ~8 times; one that takes 10 s, ~45 times.
STARTUP_PROBE_MIN_S = 0.010
STARTUP_PROBE_SLACK = 8


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
            return ProbeResult(None, f"bad HTTP response: {exc}")
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
