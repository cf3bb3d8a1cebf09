"""The example HTTP service of manifests/apps: a real process answering real HTTP."""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.conftest import HELLO_HTTP, free_port, http_get


def get(port: int, path: str) -> tuple[int, dict[str, str], str]:
    return http_get("127.0.0.1", port, path)


def wait_until_serving(port: int, proc: subprocess.Popen, deadline_s: float = 15) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        try:
            get(port, "/healthz")
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"hello_http did not serve on port {port} within {deadline_s} s")


@pytest.fixture
def start_app():
    procs: list[subprocess.Popen] = []

    def start(*args: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, int]:
        port = free_port()
        base = {k: v for k, v in os.environ.items() if k != "SKR8TR_VERSION"}
        proc = subprocess.Popen(
            [str(HELLO_HTTP), "--port", str(port), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**base, **(env or {})},
        )
        procs.append(proc)
        wait_until_serving(port, proc)
        return proc, port

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        if proc.stdout:
            proc.stdout.close()


def test_serves_root_and_healthz_with_version(start_app):
    proc, port = start_app("--version", "v7")
    status, headers, body = get(port, "/")
    assert status == 200
    assert body == f"hello from v7 (pid {proc.pid}, port {port})\n"
    assert headers["X-Version"] == "v7"
    assert headers["x-skr8tr-version"] == "v7"
    assert headers["X-Pid"] == str(proc.pid)
    assert get(port, "/healthz")[0] == 200
    assert get(port, "/nope")[0] == 404


def test_sigterm_exits_cleanly(start_app):
    proc, port = start_app()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0
    assert "stopped cleanly" in proc.stdout.read()


def test_fail_health_answers_503(start_app):
    _, port = start_app("--fail-health")
    assert get(port, "/healthz")[0] == 503
    assert get(port, "/")[0] == 200


def test_crash_after_exits_with_status_3(start_app):
    proc, _ = start_app("--crash-after", "0.2")
    assert proc.wait(timeout=10) == 3


def test_version_comes_from_the_flag_else_the_environment_else_1(start_app):
    _, port = start_app(env={"SKR8TR_VERSION": "v9"})
    status, headers, body = get(port, "/")
    assert (status, headers["x-skr8tr-version"], headers["X-Version"]) == (200, "v9", "v9")
    assert body.startswith("hello from v9 ")
    _, port = start_app("--version", "v3", env={"SKR8TR_VERSION": "v9"})
    assert get(port, "/")[1]["x-skr8tr-version"] == "v3"
    _, port = start_app()
    status, headers, body = get(port, "/healthz")
    assert (status, headers["x-skr8tr-version"]) == (200, "1")  # on every answer


def test_fail_rate_fails_exactly_every_nth_request_and_never_healthz(start_app):
    _, port = start_app("--fail-rate", "0.2", "--version", "bad")
    statuses = []
    for _ in range(20):
        assert get(port, "/healthz")[0] == 200  # not counted, never failed
        status, headers, body = get(port, "/")
        statuses.append(status)
        assert headers["x-skr8tr-version"] == "bad"
        if status == 500:
            assert body == "failing on purpose: bad (--fail-rate 0.2)\n"
    assert [i + 1 for i, s in enumerate(statuses) if s == 500] == [5, 10, 15, 20]
    assert statuses.count(200) == 16


@pytest.mark.parametrize(("rate", "failed"), [("0", 0), ("1", 6), ("0.5", 3), ("0.3", 2)])
def test_fail_rate_counts_every_path_but_healthz(start_app, rate, failed):
    _, port = start_app("--fail-rate", rate)
    statuses = [get(port, path)[0] for path in ("/", "/nope", "/?a=1", "/", "/x", "/")]
    assert statuses.count(500) == failed  # round(1/0.3) = 3: every third
    assert all(s in (200, 404, 500) for s in statuses)


@pytest.mark.parametrize("bad", ["1.5", "-0.1", "nan", "x"])
def test_fail_rate_out_of_range_is_refused(bad):
    proc = subprocess.run([sys.executable, str(HELLO_HTTP), "--port", "1", "--fail-rate", bad],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert "--fail-rate" in proc.stderr


def test_delay_ms_delays_answers_without_holding_up_other_requests(start_app):
    _, port = start_app("--delay-ms", "1500")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as slow:
        started = time.monotonic()
        slow.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        # sent before the health check connects: a server answering one request at a time
        # would answer it first; this one answers /healthz (never delayed) meanwhile
        assert get(port, "/healthz")[0] == 200
        assert select.select([slow], [], [], 0)[0] == [], "the delayed request came first"
        reply = b""
        while chunk := slow.recv(4096):
            reply += chunk
        took = time.monotonic() - started
    assert reply.startswith(b"HTTP/1.1 200 ") and took >= 1.5
