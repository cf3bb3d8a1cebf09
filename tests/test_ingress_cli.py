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
    (["--listen", "127.0.0.1:8080", "--route", "/:web", "--key", "nowhere/signing.sec"],
     "--key: no key file at nowhere/signing.sec"),
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


def test_a_bad_name_is_a_usage_error(cli_env):
    proc = run_cli("ingress", "--listen", "127.0.0.1:8080", "--route", "/:web", "--name",
                   "edge 1", env=cli_env)
    assert proc.returncode == 2
    assert "error: USAGE: argument --name: expected 1..64 of A-Z a-z 0-9 . _ -" in proc.stderr


def test_with_a_key_it_reports_and_says_so_on_exit(cli_env, tmp_path):
    run_cli("keygen", "--out", str(tmp_path / "k"), env=cli_env)
    port = free_port()
    proc = subprocess.Popen(
        [*skr8tr_command(), "ingress", "--listen", f"127.0.0.1:{port}", "--route", "/:web",
         "--conductor", f"ws://127.0.0.1:{free_port()}", "--key",
         str(tmp_path / "k" / "signing.sec"), "--name", "edge-7"],
        env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        stdin=subprocess.DEVNULL)
    try:
        poll(lambda: _answers(port, proc), what="the ingress to answer")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        out = proc.stdout.read()
        assert "reporting traffic as ingress edge-7 with key sha256:" in out
        assert "sent 0 traffic report(s) in 0 session(s)" in out
        assert "no --key" not in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        proc.stdout.close()


def _answers(port: int, proc: subprocess.Popen) -> bool | None:
    try:
        return http_get("127.0.0.1", port, "/x")[0] == 503 or None
    except OSError:
        assert proc.poll() is None, "the ingress exited"
        return None
