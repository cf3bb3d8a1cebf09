"""Descriptor and memory exhaustion against a real conductor process (issue #13, part 5).

(a) Under a small open-file limit (``prlimit --nofile=256:256``) a flood of
``/v1/watch`` connections from one loopback address stops at the per-address
cap, a flood from two addresses at the total cap, both below the limit: the
CLI keeps being answered (from its own address; once the flood lets go when
the total cap was reached), and the log has no ``EMFILE`` and no traceback.

(b) Watchers that do the handshake and never read, while events are published
through the real process (signed ``scale`` commands), are closed with 1008
``too slow`` once their queue passes ``--watch-queue-bytes``; the conductor's
RSS stays within a generous bound of where it started.

The flood comes from 127.0.0.2/.3/.4 (all loopback) because the per-address cap
applies to the CLI's own address too: what is shown is that one address
cannot lock the others out. Every loop is bounded in count and time; waits
poll with a deadline.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from skr8tr import blocking_client, keyfiles
from skr8tr.ws import frames as wsclient
from tests.conftest import HELLO_HTTP, free_port, http_get, skr8tr_command
from tests.e2e import Cluster, Daemon, poll
from tests.wire_helpers import encode_request

pytestmark = pytest.mark.e2e

NOFILE = 256
FLOOD = 300  # more watchers than the open-file limit, from one address
READ_TIMEOUT_S = 10.0


@contextmanager
def conductor(root: Path, *flags: str, nofile: int | None = None) -> Iterator[Cluster]:
    """Keys and a conductor started like the e2e harness does, under ``prlimit`` when
    *nofile* is given; shut down (and checked for leftovers) after."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKR8TR_")}
    env["HOME"] = str(root / "home")
    cluster = Cluster(root=root, env=env)
    cluster.make_keys()
    cluster.ws_port, cluster.http_port = free_port(), free_port()
    wrapper = ["prlimit", f"--nofile={nofile}:{nofile}", "--"] if nofile else []
    log_path = root / "conductor.log"
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(
            [*wrapper, *skr8tr_command(), "conductor", "--listen",
             f"127.0.0.1:{cluster.ws_port}", "--http", f"127.0.0.1:{cluster.http_port}",
             "--authorized-keys", str(cluster.authorized_keys), "--log-level", "debug",
             *flags],
            env=env, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)
    cluster.conductor = Daemon("conductor", proc, log_path)
    try:
        poll(lambda: cluster.cli("ping").returncode == 0 or proc.poll() is not None,
             what="the conductor to answer ping")
        assert proc.poll() is None, cluster.conductor.log()[-3000:]
        yield cluster
    finally:
        cluster.shutdown()


def handshake(port: int, path: str = "/v1/watch") -> bytes:
    return (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n").encode()


def open_watcher(port: int, source: str, *, rcvbuf: int | None = None) -> socket.socket:
    """A TCP connection from *source* that sent a /v1/watch upgrade and reads nothing."""
    sock = socket.socket()
    if rcvbuf is not None:  # a small window: the conductor's writes block sooner
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(READ_TIMEOUT_S)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    with contextlib.suppress(OSError):  # refused at once: the answer below says so
        sock.sendall(handshake(port))
    return sock


def was_accepted(sock: socket.socket) -> bool:
    """True if the conductor answered 101; False if it closed the connection unanswered."""
    try:
        data = sock.recv(12)
    except ConnectionResetError:
        return False
    return data.startswith(b"HTTP/1.1 101")


def metrics(cluster: Cluster) -> dict[tuple[str, tuple], float]:
    status, _, body = http_get("127.0.0.1", cluster.http_port, "/metrics")
    assert status == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body) for s in family.samples}


def closed(cluster: Cluster, reason: str) -> float:
    return metrics(cluster).get(("skr8tr_connections_closed_total", (("reason", reason),)), 0)


def assert_no_traceback(cluster: Cluster) -> None:
    text = cluster.conductor.log()
    assert "Traceback" not in text, text[-5000:]
    assert "EMFILE" not in text and "Too many open files" not in text, text[-5000:]


def close_all(socks: list[socket.socket]) -> None:
    for sock in socks:
        sock.close()


# ---------------------------------------------------------------------- (a) descriptors


def test_a_watcher_flood_under_a_small_fd_limit_leaves_the_cli_answered(tmp_path: Path):
    # Watch streams are capped per address too (64): lifted here, where the
    # descriptors are what is measured.
    with conductor(tmp_path, "--max-watchers-per-address", "100000",
                   nofile=NOFILE) as cluster:
        proc = psutil.Process(cluster.conductor.proc.pid)
        assert proc.rlimit(psutil.RLIMIT_NOFILE) == (NOFILE, NOFILE)
        text = cluster.conductor.log()
        lowered = re.search(r"--max-connections-per-address lowered from 2048 to (\d+)", text)
        assert lowered, text[-3000:]
        per_address = int(lowered.group(1))
        cap = int(metrics(cluster)[("skr8tr_connections_max", ())])
        assert per_address <= cap // 2 and cap < NOFILE

        # One address, more watchers than there are descriptors: stopped at its cap.
        first = [open_watcher(cluster.ws_port, "127.0.0.2") for _ in range(FLOOD)]
        accepted = [s for s in first if was_accepted(s)]
        assert len(accepted) == per_address
        assert cluster.cli("ping").returncode == 0
        status = json.loads(cluster.cli_ok("status", "--json"))
        assert set(status) == {"nodes", "apps", "replicas", "rollouts", "history", "leader",
                               "conductors", "ingresses"}
        assert closed(cluster, "too_many_connections") == FLOOD - per_address
        assert proc.num_fds() < NOFILE

        # Two more addresses fill the total cap (the CLI and /metrics too are shut
        # out while it is full), still below the open-file limit.
        second = [open_watcher(cluster.ws_port, source) for source in ("127.0.0.3", "127.0.0.4")
                  for _ in range(per_address)]
        held = [s for s in second if was_accepted(s)]
        # A connection of the CLI or of /metrics above may still have been closing.
        assert cap - 2 <= len(accepted) + len(held) <= cap
        assert proc.num_fds() < NOFILE
        close_all(second)
        poll(lambda: cluster.cli("ping").returncode == 0, what="ping once the flood let go")
        assert closed(cluster, "max_connections") >= 2 * per_address - len(held)
        close_all(first)
        poll(lambda: metrics(cluster)[("skr8tr_connections_open", ())] <= 1,
             what="the flood's connections to be gone")
        assert cluster.conductor.proc.poll() is None
        assert_no_traceback(cluster)


# ---------------------------------------------------------------------- (b) memory

QUEUE_BYTES = 64 * 1024
SLOW = 100
AFTER_CUT = 5000  # events published once every slow watcher is gone
MAX_COMMANDS = 30_000
EVENTS_DEADLINE_S = 120.0
APP = "slow-watchers-" + "x" * 40  # a long name: bigger events, fewer commands


def scale_until(cluster: Cluster, done, *, limit: int = MAX_COMMANDS,
                deadline_s: float = EVENTS_DEADLINE_S) -> int:
    """Signed ``scale`` commands over one /v1/cli connection (each publishes an event)
    until ``done()``, *limit* commands or the deadline; how many were sent."""
    key = keyfiles.load_signing_key(cluster.admin_key)
    end = time.monotonic() + deadline_s
    sent = 0
    with blocking_client.connect(cluster.url + "/v1/cli", 10.0) as conn:
        while sent < limit and time.monotonic() < end:
            for _ in range(200):
                sent += 1
                conn.send_text(encode_request(
                    id=str(sent), cmd="scale", args={"app": APP, "replicas": 0},
                    signing_key=key, ts=time.time()))
                reply = json.loads(conn.receive_message(time.monotonic() + 10))
                assert reply["ok"], reply
            if done():
                break
    return sent


def read_close(sock: socket.socket) -> wsclient.Close | None:
    """Read a raw watcher to its end: the close frame, or None if the stream ended
    without one."""
    proto = wsclient.ClientProtocol(f"127.0.0.1:{sock.getpeername()[1]}", "/v1/watch",
                                    key="dGhlIHNhbXBsZSBub25jZQ==")
    proto.handshake_request()
    rest = None
    while rest is None:
        data = sock.recv(65536)
        if not data:
            return None
        rest = proto.receive_handshake(data)
    data = rest
    while True:
        for event in proto.receive(data):
            if isinstance(event, wsclient.Close):
                return event
        data = sock.recv(1 << 20)
        if not data:
            return None


def test_watchers_that_never_read_are_closed_and_memory_stays_bounded(tmp_path: Path):
    manifest = tmp_path / "app.skr8tr"
    manifest.write_text(f"app {APP}\n  exec {HELLO_HTTP}\n  replicas 0\n")
    # A long keep-alive: the watchers are read only at the end, all the same.
    with conductor(tmp_path, "--watch-queue-bytes", str(QUEUE_BYTES),
                   "--watch-idle-timeout", "300",
                   "--max-watchers-per-address", "100000") as cluster:
        cluster.cli_ok("up", str(manifest))
        proc = psutil.Process(cluster.conductor.proc.pid)
        rss_start = proc.memory_info().rss
        slow = [open_watcher(cluster.ws_port, "127.0.0.2", rcvbuf=4096) for _ in range(SLOW)]
        poll(lambda: metrics(cluster)[("skr8tr_connections_open", ())] >= SLOW,
             what="the watchers to be served")

        def all_cut() -> bool:
            return closed(cluster, "watch_too_slow") >= SLOW

        sent = scale_until(cluster, all_cut)
        poll(all_cut, what=f"{SLOW} slow watchers to be cut off after {sent} events")
        # Many more events: no queue keeps them.
        scale_until(cluster, lambda: False, limit=AFTER_CUT)
        rss_end = proc.memory_info().rss
        assert rss_end - rss_start < 64 * 2**20, (rss_start, rss_end)

        # Each learns why, once it reads: what was on its way, then 1008.
        for sock in slow:
            close = read_close(sock)
            assert close is not None and close.code == 1008, close
            assert close.reason.startswith("too slow: ") and "bytes queued" in close.reason
        close_all(slow)
        assert closed(cluster, "watch_too_slow") == SLOW

        # Everyone else is served as before: a reading watcher gets its snapshot.
        with blocking_client.connect(cluster.url + "/v1/watch", 10.0) as conn:
            first = json.loads(conn.receive_message(time.monotonic() + 10))
            assert first["type"] == "snapshot"
            assert APP in {a["app"] for a in first["state"]["apps"]}
        assert cluster.cli("ping").returncode == 0
        assert_no_traceback(cluster)


def test_watch_streams_from_one_address_are_capped(tmp_path: Path):
    # Every event is written to every watcher: a crowd of watchers from one address
    # costs the event loop per event, so they are capped apart from connections.
    with conductor(tmp_path, "--max-watchers-per-address", "8") as cluster:
        crowd = [open_watcher(cluster.ws_port, "127.0.0.2") for _ in range(12)]
        try:
            answers = []
            for sock in crowd:
                head = b""
                with contextlib.suppress(OSError):
                    while b"\r\n\r\n" not in head:
                        chunk = sock.recv(4096)
                        if not chunk:
                            break
                        head += chunk
                answers.append(head[:12])
            assert answers.count(b"HTTP/1.1 101") == 8
            assert answers.count(b"HTTP/1.1 429") == 4
            assert closed(cluster, "too_many_watchers") == 4
            other = open_watcher(cluster.ws_port, "127.0.0.3")
            assert was_accepted(other), "another address still gets its stream"
            other.close()
            # A stream that ends gives its place back.
            crowd[0].close()
            poll(lambda: (s := open_watcher(cluster.ws_port, "127.0.0.2"))
                 and (was_accepted(s) or s.close()),
                 what="a freed place to be taken again")
            assert cluster.cli("ping").returncode == 0
            assert_no_traceback(cluster)
        finally:
            close_all(crowd)
