"""Health probes (h11 over trio) and the ready/unhealthy state machine."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest
import trio

from skr8tr.node.health import HealthTracker, probe_http
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
