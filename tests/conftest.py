"""Shared helpers for skr8tr's tests: the real CLI as a subprocess, free ports."""

from __future__ import annotations

import contextlib
import http.client
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# Hypothesis's health checks time input generation by the wall clock; on a loaded
# two-core machine (CI) they fail tests that are correct. Property tests are judged
# by what they assert, never by speed (STYLE.md), so only those checks are off.
settings.register_profile("skr8tr", deadline=None,
                          suppress_health_check=[HealthCheck.too_slow,
                                                 HealthCheck.data_too_large])
settings.load_profile("skr8tr")

REPO = Path(__file__).resolve().parent.parent
MANIFESTS = REPO / "manifests"
HELLO_HTTP = MANIFESTS / "apps" / "hello_http.py"


def skr8tr_command() -> list[str]:
    """The installed console script next to this interpreter (the real CLI)."""
    script = Path(sys.executable).parent / "skr8tr"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "skr8tr"]


def http_get(address: str, port: int, path: str = "/") -> tuple[int, dict[str, str], str]:
    """One plain HTTP GET: (status, headers, body)."""
    conn = http.client.HTTPConnection(address, port, timeout=5)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read().decode()
    finally:
        conn.close()


def free_port() -> int:
    """A loopback port that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def cli_env(tmp_path: Path) -> dict[str, str]:
    """An environment with a private HOME, so no test reads the user's keys."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKR8TR_")}
    env["HOME"] = str(tmp_path / "home")
    return env


def run_cli(
    *args: str, env: dict[str, str], timeout: float = 30, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*skr8tr_command(), *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture
def pki(tmp_path: Path):
    """A throwaway CA and a conductor certificate for 127.0.0.1 (tests/security_helpers)."""
    from tests.security_helpers import make_pki

    return make_pki(tmp_path / "pki")


@pytest.fixture
def other_pki(tmp_path: Path):
    """A second, unrelated CA: what a client must not trust."""
    from tests.security_helpers import make_pki

    return make_pki(tmp_path / "other-pki", label="someone else")


async def read_until_closed(stream) -> bytes:
    """Everything a trio stream receives until the peer closes it.

    A reset (BrokenResourceError) is a way of closing too: the servers under
    test may close hard after their answer, and the answer is what counts.
    """
    import trio

    data = b""
    with contextlib.suppress(trio.BrokenResourceError):
        while chunk := await stream.receive_some(65536):
            data += chunk
    return data
