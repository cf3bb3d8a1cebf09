"""Health probes (h11 over trio) and the ready/unhealthy state machine."""

from __future__ import annotations

import math
import socket
import subprocess
import sys
import time

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from skr8tr.core import node_protocol
from skr8tr.node.health import (
    PROBE_REPORT_EVERY_S,
    PROBE_TEXT_MAX_CHARS,
    STARTUP_PROBE_MIN_S,
    STARTUP_PROBE_SLACK,
    HealthTracker,
    ProbeNotes,
    ProbeResult,
    next_probe_delay,
    probe_http,
    probe_text,
)
from tests.conftest import HELLO_HTTP, free_port


@pytest.mark.parametrize(("retries", "results", "expected"), [
    (3, "FFF", [None, None, None]),                         # never ready: nothing to say
    (3, "FFP", [None, None, "ready"]),
    (3, "PPP", ["ready", None, None]),
    (3, "PFFF", ["ready", None, None, "unhealthy"]),
    (3, "PFFPFF", ["ready", None, None, None, None, None]),  # a pass resets the count
    (1, "PFFP", ["ready", "unhealthy", None, "ready"]),     # unhealthy once, then ready
    (2, "PFFFFPFF", ["ready", None, "unhealthy", None, None, "ready", None, "unhealthy"]),
])
def test_health_tracker(retries: int, results: str, expected: list[str | None]) -> None:
    tracker = HealthTracker(retries)
    assert [tracker.observe(r == "P") for r in results] == expected


def test_health_tracker_needs_a_retry() -> None:
    with pytest.raises(ValueError, match="retries"):
        HealthTracker(0)


@pytest.fixture
def hello_port():
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(HELLO_HTTP), "--port", str(port),
                             "--fail-health"], stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "hello_http did not start"
                assert proc.poll() is None
                time.sleep(0.05)
        yield port
    finally:
        proc.kill()
        proc.wait(timeout=10)


async def test_probe_reads_the_status(hello_port: int) -> None:
    with trio.fail_after(10):
        assert (await probe_http("127.0.0.1", hello_port, "/", 2)).status == 200
        result = await probe_http("127.0.0.1", hello_port, "/healthz", 2)
        assert (result.status, result.describe()) == (503, "HTTP 503")
        assert (await probe_http("127.0.0.1", hello_port, "/nope", 2)).status == 404


async def test_probe_of_a_closed_port() -> None:
    with trio.fail_after(10):
        result = await probe_http("127.0.0.1", free_port(), "/healthz", 2)
    assert result.status is None
    assert "refused" in result.error


async def test_probe_of_a_silent_server_times_out() -> None:
    with socket.socket() as listener, trio.fail_after(10):
        listener.bind(("127.0.0.1", 0))
        listener.listen()  # connections complete in the backlog, nobody answers
        result = await probe_http("127.0.0.1", listener.getsockname()[1], "/healthz", 0.2)
    assert result.status is None
    assert result.error == "no answer within 0.2 s"


async def test_probe_of_a_server_speaking_nonsense() -> None:
    async def nonsense(stream: trio.SocketStream) -> None:
        await stream.receive_some(4096)
        await stream.send_all(b"SSH-2.0-OpenSSH\r\n\r\n")

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(trio.serve_tcp, nonsense, 0)
            port = listeners[0].socket.getsockname()[1]
            result = await probe_http("127.0.0.1", port, "/", 2)
            nursery.cancel_scope.cancel()
    assert result.status is None
    assert result.error.startswith("bad HTTP response")
    assert "OpenSSH" in result.error  # the agent's own log may say what came
    assert probe_text("/", result, 200) == "GET / -> bad HTTP response"  # the conductor not


# ---------------------------------------------------------------- probe schedule


def test_probe_delay_keeps_the_interval_once_passed_or_for_a_replica_that_was_ready() -> None:
    assert next_probe_delay(0.5, None) == 0.5
    assert next_probe_delay(0.002, None) == 0.002


def test_probe_delay_while_starting_grows_with_the_time_spent_starting() -> None:
    assert next_probe_delay(0.5, 0.0) == STARTUP_PROBE_MIN_S
    assert next_probe_delay(0.5, 0.4) == pytest.approx(0.4 / STARTUP_PROBE_SLACK)
    assert next_probe_delay(0.5, 60.0) == 0.5  # capped by the interval
    assert next_probe_delay(0.004, 0.0) == 0.004  # an interval shorter than the floor wins


@given(interval_s=st.floats(0.001, 600), ready_after_s=st.floats(0, 120))
def test_a_starting_replica_is_found_ready_soon_after_it_is(interval_s: float,
                                                            ready_after_s: float) -> None:
    """Walk the schedule: the first probe at or after readiness comes within
    max(10 ms, 1/8 of the time spent) of it, never later than one interval, and
    the probes up to then are few (logarithmic in the start time)."""
    t, probes = 0.0, 1
    while t < ready_after_s:
        t += next_probe_delay(interval_s, t)
        probes += 1
    late = t - ready_after_s
    bound = min(interval_s, max(STARTUP_PROBE_MIN_S, ready_after_s / STARTUP_PROBE_SLACK))
    assert late <= bound + 1e-9
    # never faster than the floor (or than the interval, when that is shorter): whole
    # steps, so a quotient a rounding below a whole number still needs that number
    # (2.0 / 0.0010000000000000002 = 1999.9999999999995 steps of the walk's sum: 2000)
    assert probes <= 2 + math.ceil(ready_after_s / min(interval_s, STARTUP_PROBE_MIN_S))
    if interval_s >= 1 and ready_after_s >= 1:
        assert probes <= 2 + STARTUP_PROBE_SLACK * (1 + math.log(
            ready_after_s / STARTUP_PROBE_MIN_S)) + ready_after_s / interval_s


@pytest.mark.parametrize(("result", "text"), [
    (ProbeResult(404), "GET /healthz -> 404, want 200"),
    (ProbeResult(200), "GET /healthz -> 200"),
    (ProbeResult(None, "connection refused"), "GET /healthz -> connection refused"),
    (ProbeResult(None, "no answer within 1 s"), "GET /healthz -> no answer within 1 s"),
    (ProbeResult(None), "GET /healthz -> no answer"),
    # h11 quotes the bytes that came; they stay out of a text anyone can read
    (ProbeResult(None, "bad HTTP response: illegal status line: bytearray(b'SECRET')"),
     "GET /healthz -> bad HTTP response"),
])
def test_probe_text_says_what_came_and_what_was_wanted(result, text):
    assert probe_text("/healthz", result, 200) == text


def test_probe_text_is_cut_to_what_the_conductor_accepts():
    text = probe_text("/" + "p" * 10_000, ProbeResult(404), 200)
    assert len(text) == PROBE_TEXT_MAX_CHARS == node_protocol.MAX_PROBE_TEXT_CHARS
    assert text.endswith("\u2026")


def test_probe_notes_tell_new_outcomes_at_once_and_repeats_sparingly():
    notes = ProbeNotes(3)
    refused = "GET / -> connection refused"
    told = [notes.observe(refused, None, False, t / 100) for t in range(10)]  # 0..90 ms
    assert told[0] == {"text": refused, "status": None, "count": 1}
    assert told[1:] == [None] * 9  # the same outcome within PROBE_REPORT_EVERY_S
    later = notes.observe(refused, None, False, PROBE_REPORT_EVERY_S)
    assert later == {"text": refused, "status": None, "count": 11}
    wrong = "GET / -> 404, want 200"
    assert notes.observe(wrong, 404, False, 2.1) == {"text": wrong, "status": 404, "count": 1}
    assert notes.observe(wrong, 404, False, 2.2) is None
    # the retries-th wrong answer in a row is told at once: the conductor fails on it
    assert notes.observe(wrong, 404, False, 2.3) == {"text": wrong, "status": 404, "count": 3}
    assert notes.observe("GET / -> 500, want 200", 500, False, 2.4)["count"] == 4
    ok = "GET / -> 200"
    assert notes.observe(ok, 200, True, 2.5) == {"text": ok, "status": 200, "count": 1}
    assert [notes.observe(ok, 200, True, 2.5 + i) for i in range(1, 20)] == [None] * 19
