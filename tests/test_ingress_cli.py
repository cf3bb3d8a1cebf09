"""`skr8tr ingress` as a process: refusals at start, 503 before the conductor answers,
a clean exit on SIGTERM."""

from __future__ import annotations

import signal
import socket
import subprocess

import pytest

from tests.conftest import free_port, http_get, run_cli, skr8tr_command
from tests.e2e import poll


@pytest.mark.parametrize(("args", "message"), [
    (["--listen", "127.0.0.1:8080", "--route", "api:web"], "must start with /"),
    (["--listen", "127.0.0.1:8080", "--route", "/a:web", "--route", "/a/:other"],
     "already routed to web"),
    (["--listen", "nowhere", "--route", "/:web"], "expected HOST:PORT"),
    (["--listen", "127.0.0.1:8080", "--route", "/:web", "--conductor", "http://x"],
     "must start with ws://"),
    (["--listen", "127.0.0.1:8080", "--route", "/:web", "--ca", "ca.pem"],
     "--ca goes with a wss:// conductor"),
])
def test_bad_flags_exit_2_with_one_line(args, message, cli_env):
    proc = run_cli("ingress", *args, env=cli_env, timeout=20)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: START: ") and message in proc.stderr
    assert proc.stderr.count("\n") == 1


def test_a_busy_port_exits_2(cli_env):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = run_cli("ingress", "--listen", f"127.0.0.1:{port}", "--route", "/:web",
                       env=cli_env, timeout=20)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"error: START: cannot listen on 127.0.0.1:{port}")


def test_help_lists_the_limits(cli_env):
    out = run_cli("ingress", "--help", env=cli_env).stdout
    for flag in ("--max-connections", "--header-timeout", "--idle-timeout", "--body-timeout",
                 "--connect-timeout", "--upstream-timeout", "--retries", "--log-level"):
        assert flag in out
    assert "--ignore-drain" not in out  # a test knob, not for operators


def test_without_a_conductor_it_answers_503_and_stops_cleanly(cli_env):
    port = free_port()
    proc = subprocess.Popen(
        [*skr8tr_command(), "ingress", "--listen", f"127.0.0.1:{port}", "--route", "/:web",
         "--conductor", f"ws://127.0.0.1:{free_port()}"],
        env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        stdin=subprocess.DEVNULL)
    try:
        def answer():
            try:
                return http_get("127.0.0.1", port, "/x")
            except OSError:
                return None if proc.poll() is None else ("exited", {}, "")
        status, headers, body = poll(answer, what="the ingress to answer")
        assert status == 503 and headers["retry-after"] == "1"
        assert "not heard from the conductor" in body
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        out = proc.stdout.read()
        assert "watch stream lost" in out and "served 1 request(s)" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        proc.stdout.close()
