"""The example HTTP service of manifests/apps: a real process answering real HTTP."""

from __future__ import annotations

import signal
import subprocess
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

    def start(*args: str) -> tuple[subprocess.Popen, int]:
        port = free_port()
        proc = subprocess.Popen(
            [str(HELLO_HTTP), "--port", str(port), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
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
