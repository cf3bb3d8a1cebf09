"""Slowloris against a real ``skr8tr ingress`` process, and the file-descriptor budget.

Real processes on loopback: a conductor, one node agent, one hello_http
replica of app ``web``, and one ingress per test. Silent (or trickling) client
sockets come from 127.0.0.1; the real client binds 127.0.0.2, another address
as far as the ingress can tell. Every wait polls under a deadline; no test
asserts how fast anything is.

- One address may not take every slot: with ``--max-connections 30`` and
  ``--max-connections-per-address 20``, 40 silent sockets from 127.0.0.1 hold
  20 slots, the other 20 get a 503 at once, and the client from 127.0.0.2 is
  answered by the replica while the 20 hold. (Without the per-address cap the
  40 silent sockets would take all 30 slots and the client would get a 503.)
- ``--header-timeout`` counts from connect for the first request, whether
  nothing comes or bytes trickle, and is distinct from the keep-alive idle
  timeout: with ``--header-timeout 1 --idle-timeout 60`` silent and trickling
  sockets are closed while a kept-alive connection idle as long is served.
- Under a low open-file limit the ingress raises its soft limit to the hard
  one, lowers its connection cap to fit, and refuses what is over it with a
  503: no ``EMFILE`` from ``accept``, no traceback in its log.
"""

from __future__ import annotations

import http.client
import random
import signal
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.conftest import HELLO_HTTP, free_port, run_cli, skr8tr_command
from tests.e2e import Cluster, Daemon, poll, running_cluster

pytestmark = pytest.mark.e2e

ATTACKER = "127.0.0.1"
CLIENT = "127.0.0.2"  # Linux routes all of 127/8 to loopback
CLIENT_TIMEOUT_S = 10.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("limits")
    low = random.randrange(10_000, 19_800, 200)
    with running_cluster(root, "--port-range", f"{low}-{low + 199}") as c:
        c.start_node("n1")
        manifest = root / "web.skr8tr"
        manifest.write_text("\n".join([
            "app web",
            f"  exec {HELLO_HTTP}",
            "  args --host {host} --port {port} --version v1",
            "  port auto",
            "  replicas 1",
            "  health",
            "    check GET /healthz 200",
            "    interval 200ms",
        ]) + "\n")
        c.cli_ok("up", str(manifest))
        c.wait_ready("web", 1)
        yield c


# ---------------------------------------------------------------------------- helpers


@dataclass
class Peer:
    """A raw client socket and what it received; ``closed`` once the ingress hung up."""

    sock: socket.socket
    received: bytes = b""
    closed: bool = False

    def check(self) -> bool:
        """Read what has arrived without waiting; True once the other side closed."""
        if self.closed:
            return True
        self.sock.setblocking(False)
        try:
            while chunk := self.sock.recv(65536):
                self.received += chunk
            self.closed = True
        except BlockingIOError:
            pass  # nothing more has arrived yet: still open
        except OSError:  # a reset is a way of closing too
            self.closed = True
        return self.closed

    def trickle(self, data: bytes) -> None:
        """Send ``data`` unless the ingress already closed us."""
        if not self.check():
            self.sock.setblocking(True)
            try:
                self.sock.sendall(data)
            except OSError:
                self.closed = True


def connect(port: int, source: str) -> Peer:
    sock = socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT_S,
                                    source_address=(source, 0))
    return Peer(sock)


def get(port: int, source: str = CLIENT) -> tuple[int, str]:
    """One GET / from ``source``: (status, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=CLIENT_TIMEOUT_S,
                                      source_address=(source, 0))
    try:
        conn.request("GET", "/")
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


def request_on(peer: Peer) -> tuple[int, str]:
    """GET / on an open keep-alive socket; the socket stays open for the next one."""
    peer.sock.setblocking(True)
    peer.sock.sendall(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n")
    resp = http.client.HTTPResponse(peer.sock)
    resp.begin()
    return resp.status, resp.read().decode()


def start_ingress(cluster: Cluster, name: str, *flags: str,
                  nofile: tuple[int, int] | None = None) -> tuple[Daemon, int]:
    """``skr8tr ingress`` routing / to web, on a free port, serving the replica; with
    ``nofile`` it starts under that (soft, hard) RLIMIT_NOFILE."""
    port = free_port()
    argv = [*skr8tr_command(), "ingress", "--listen", f"127.0.0.1:{port}", "--route", "/:web",
            "--conductor", cluster.url, *flags]
    if nofile is not None:
        argv = [sys.executable, "-c",
                "import os, resource, sys; "
                f"resource.setrlimit(resource.RLIMIT_NOFILE, {nofile!r}); "
                "os.execv(sys.argv[1], sys.argv[1:])", *argv]
    daemon = cluster.start_process(name, argv)

    def serving() -> bool:
        assert daemon.proc.poll() is None, f"{name} exited:\n{daemon.log()[-3000:]}"
        try:
            return get(port)[0] == 200
        except OSError:
            return False

    poll(serving, what=f"{name} to serve the replica")
    return daemon, port


def stop(daemon: Daemon) -> str:
    """SIGTERM, a clean exit, and the log."""
    assert daemon.stop(signal.SIGTERM) == 0, daemon.log()[-3000:]
    return daemon.log()


def closed_ones(peers: list[Peer], at_least: int) -> list[Peer] | None:
    """The peers the ingress has closed, once there are ``at_least`` of them."""
    closed = [p for p in peers if p.check()]
    return closed if len(closed) >= at_least else None


def close_all(peers: list[Peer]) -> None:
    for p in peers:
        p.sock.close()


# ---------------------------------------------------------------------------- tests


def test_silent_connections_from_one_address_do_not_lock_out_another(cluster):
    daemon, port = start_ingress(
        cluster, "ingress-cap", "--max-connections", "30",
        "--max-connections-per-address", "20", "--header-timeout", "60",
        "--idle-timeout", "60")
    silent: list[Peer] = []
    try:
        silent = [connect(port, ATTACKER) for _ in range(40)]
        # The client connects after all 40: the ingress has taken them by the time it
        # takes this one, and none of the held ones times out for 60 s.
        status, body = get(port, CLIENT)
        assert status == 200 and "v1" in body, body
        refused = poll(lambda: closed_ones(silent, 20),
                       what="20 connections over the per-address cap to be refused")
        assert len(refused) == 20, [p.received for p in refused]
        for p in refused:
            assert p.received.startswith(b"HTTP/1.1 503 "), p.received
            assert b"too many connections from your address" in p.received
            assert b"connection: close" in p.received.lower()
        assert sum(not p.check() for p in silent) == 20  # held throughout
        assert get(port, CLIENT)[0] == 200  # and again
        poll(lambda: "over --max-connections-per-address 20" in daemon.log(),
             what="the refusals to be logged")
    finally:
        close_all(silent)
        log = stop(daemon)
    assert "20 over the per-address limit" in log  # the summary at exit
    lines = [line for line in log.splitlines() if "--max-connections-per-address" in line]
    assert 1 <= len(lines) < 20, lines  # a line per 10 s at most, not one per refusal
    assert "Traceback" not in log


def test_the_first_head_is_due_at_the_header_timeout_unlike_keep_alive(cluster):
    daemon, port = start_ingress(cluster, "ingress-head", "--header-timeout", "1",
                                 "--idle-timeout", "60")
    peers: list[Peer] = []
    try:
        kept = connect(port, CLIENT)
        peers.append(kept)
        assert request_on(kept)[0] == 200
        silent = [connect(port, ATTACKER) for _ in range(10)]
        trickler = connect(port, ATTACKER)
        peers += [*silent, trickler]
        trickler.trickle(b"GET / HTTP/1.1\r\n")

        def all_closed() -> bool:
            trickler.trickle(b"X-Slow: yes\r\n")  # a header line at every look, for ever
            return all(p.check() for p in [*silent, trickler])

        # Far below the 60 s idle timeout: only the header timeout can close them.
        poll(all_closed, timeout_s=20.0, step_s=0.2,
             what="silent and trickling connections to be closed by --header-timeout 1")
        assert all(p.received == b"" for p in silent)
        assert trickler.received == b"" or trickler.received.startswith(b"HTTP/1.1 408 ")
        # The kept-alive connection has been idle longer than the header timeout (the
        # silent ones were opened after its request, and their second is up): served.
        assert not kept.check()
        assert request_on(kept)[0] == 200
        poll(lambda: "no whole request head within --header-timeout 1 s" in daemon.log(),
             what="the timeouts to be logged")
    finally:
        close_all(peers)
        log = stop(daemon)
    assert "11 closed waiting for a first request head" in log
    assert "Traceback" not in log


def test_a_low_open_file_limit_lowers_the_cap_instead_of_failing_accept(cluster):
    # soft 100 is raised to the hard 256; then (256 - 64) // 3 = 64 client connections.
    daemon, port = start_ingress(
        cluster, "ingress-fds", "--max-connections-per-address", "1000",
        "--header-timeout", "60", nofile=(100, 256))
    silent: list[Peer] = []
    try:
        started = daemon.log()
        assert "open-file limit raised from 100 to 256" in started
        assert "--max-connections 1024 lowered to 64: the open-file limit is 256" in started
        assert "limits: 64 client connection(s), 1000 per address" in started
        silent = [connect(port, ATTACKER) for _ in range(100)]
        refused = poll(lambda: closed_ones(silent, 100 - 64),
                       what="the connections over the cap to be refused")
        assert len(refused) == 100 - 64
        assert all(p.received.startswith(b"HTTP/1.1 503 ") for p in refused)
        # Another address is refused too (the cap is for everyone), cleanly. It sends
        # nothing, so that its 503 is not lost to a reset of an unread request.
        probe = connect(port, CLIENT)
        silent.append(probe)
        poll(probe.check, what="the probe to be refused")
        assert probe.received.startswith(b"HTTP/1.1 503 "), probe.received
        assert b"connection limit" in probe.received
        for p in [p for p in silent if not p.closed][:10]:
            p.sock.close()
            p.closed = True
        poll(lambda: get(port, CLIENT)[0] == 200, what="a freed slot to serve the client")
    finally:
        close_all(silent)
        log = stop(daemon)
    assert "Traceback" not in log and "Too many open files" not in log, log[-3000:]
    assert "refused" in log and "over --max-connections 64" in log


def test_the_limits_are_on_the_help_page(cli_env):
    out = " ".join(run_cli("ingress", "--help", env=cli_env).stdout.split())
    assert "--max-connections-per-address" in out and "(default 256)" in out
    assert "of connecting" in out  # --header-timeout counts from connect
