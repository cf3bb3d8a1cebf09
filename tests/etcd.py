"""A real etcd for tests: Debian's ``etcd`` on free loopback ports, its data in a tmp folder.

``Etcd(folder).start()`` runs one single-member cluster and returns once its
client URL answers ``/health``; ``stop()`` ends it (SIGTERM to its process
group, then SIGKILL after a grace, always waiting for the exit), and a later
``start()`` brings it back on the same ports with the same data — "etcd went
away and came back". The ``etcd`` fixture (import ``etcd_fixture``) gives a started one and stops it
after the test whatever happened.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import free_port

START_DEADLINE_S = 20.0
STOP_GRACE_S = 10.0


class Etcd:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.client_port = free_port()
        self.peer_port = free_port()
        self.url = f"http://127.0.0.1:{self.client_port}"
        self.process: subprocess.Popen[bytes] | None = None
        self.extra_listen: list[str] = []  # more client URLs (an address a netns reaches)
        self.start_s: list[float] = []  # how long each start took to answer
        self.stop_s: list[float] = []

    @property
    def store_url(self) -> str:
        return f"etcd://127.0.0.1:{self.client_port}"

    def start(self) -> Etcd:
        """Run etcd and wait until it answers; raises (with its log's tail) if it does not
        within START_DEADLINE_S."""
        assert self.process is None, "already running"
        binary = shutil.which("etcd")
        if binary is None:
            pytest.fail("etcd is not installed (./tools/test installs Debian's etcd-server)")
        peer = f"http://127.0.0.1:{self.peer_port}"
        self.folder.mkdir(parents=True, exist_ok=True)
        log = open(self.folder / "etcd.log", "ab")  # noqa: SIM115 - the child holds it
        began = time.monotonic()
        with log:
            self.process = subprocess.Popen(
                [binary, "--name", "test", "--data-dir", str(self.folder / "data"),
                 "--listen-client-urls", ",".join([self.url, *self.extra_listen]),
                 "--advertise-client-urls", self.url,
                 "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                 "--initial-cluster", f"test={peer}", "--log-level", "warn"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        deadline = began + START_DEADLINE_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            if self._healthy():
                self.start_s.append(time.monotonic() - began)
                return self
            time.sleep(0.05)
        tail = self.log_tail()
        self.stop()
        pytest.fail(f"etcd did not answer at {self.url} within {START_DEADLINE_S} s:\n{tail}")

    def stop(self) -> None:
        """End etcd (SIGTERM to its group, SIGKILL after STOP_GRACE_S) and wait for it."""
        process, self.process = self.process, None
        if process is None:
            return
        began = time.monotonic()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        self.stop_s.append(time.monotonic() - began)

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = (self.folder / "etcd.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=1) as response:
                return json.loads(response.read()).get("health") == "true"
        except (OSError, ValueError):
            return False


@pytest.fixture(name="etcd")
def etcd_fixture(tmp_path: Path) -> Iterator[Etcd]:
    """A started etcd of its own for one test; stopped (and waited for) afterwards."""
    server = Etcd(tmp_path / "etcd")
    try:
        yield server.start()
    finally:
        server.stop()
