"""The CLI's client verbs start without trio: what they import, and Ctrl-C.

Speed itself is measured in bench/deploy.py (`skr8tr ping` as a whole
process); here we check the cause: a client verb imports no trio and no h11
(it frames with wsproto, but not wsproto's handshake, which needs h11), and
``ssl`` only for ``wss://``.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from skr8tr import keyfiles
from tests.security_helpers import make_pki, open_conductor

DEADLINE_S = 30
DAEMON_ONLY = {"trio", "h11", "outcome", "sniffio"}


def cli_env(home: Path) -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("SKR8TR_")}
    env["HOME"] = str(home)
    return env


async def run_importtime(*argv: str, home: Path) -> tuple[int, set[str], str]:
    """``python -X importtime -m skr8tr ARGV``: (exit status, top-level modules, stderr)."""
    proc = await trio.run_process(
        [sys.executable, "-X", "importtime", "-m", "skr8tr", *argv],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        env=cli_env(home),
        stdin=b"",
    )
    stderr = proc.stderr.decode()
    modules = {
        line.rsplit("|", 1)[1].strip().split(".")[0]
        for line in stderr.splitlines()
        if line.startswith("import time:")
    }
    assert "skr8tr" in modules, stderr[-2000:]
    rest = "\n".join(line for line in stderr.splitlines() if not line.startswith("import time:"))
    return proc.returncode, modules, rest


@pytest.mark.parametrize(
    "argv, code",
    [
        (["ping"], 0),
        (["--json", "list"], 0),
        (["nodes"], 0),
        (["status"], 0),
        (["rollout", "status", "web"], 1),
        (["down", "web"], 2),  # signed verb, no key file: refused before connecting
    ],
)
async def test_client_verbs_import_no_trio(tmp_path, argv, code):
    with trio.fail_after(DEADLINE_S):
        async with open_conductor(tmp_path) as c:
            status, modules, stderr = await run_importtime(
                *argv, "--conductor", c.url, home=tmp_path / "home"
            )
    assert status == code, stderr
    assert not modules & DAEMON_ONLY, sorted(modules & DAEMON_ONLY)
    assert "ssl" not in modules  # ws:// needs no TLS
    assert "nacl" not in modules  # no key file: nothing to sign with
    assert "cryptography" not in modules  # ML-DSA-65 only where a post-quantum key is used


async def test_a_signed_verb_with_a_key_still_imports_no_trio(tmp_path):
    keyfiles.write_keypair(str(tmp_path / "keys"))
    with trio.fail_after(DEADLINE_S):
        async with open_conductor(tmp_path) as c:
            status, modules, stderr = await run_importtime(
                "down",
                "web",
                "--conductor",
                c.url,
                "--key",
                str(tmp_path / "keys" / "signing.sec"),
                home=tmp_path / "home",
            )
    assert status == 1 and "UNAUTHORIZED" in stderr  # not an admin key of this conductor
    assert not modules & DAEMON_ONLY
    assert "nacl" in modules  # it signed


async def test_wss_imports_ssl_but_no_trio(tmp_path):
    pki = make_pki(tmp_path / "pki")
    with trio.fail_after(DEADLINE_S):
        async with open_conductor(tmp_path, tls_cert=str(pki.cert), tls_key=str(pki.key)) as c:
            status, modules, stderr = await run_importtime(
                "ping", "--conductor", c.url, "--ca", str(pki.ca), home=tmp_path / "home"
            )
    assert status == 0, stderr
    assert "ssl" in modules and not modules & DAEMON_ONLY


@pytest.mark.parametrize("flags", [[], ["--json"]])
async def test_watch_exits_130_on_ctrl_c_without_a_traceback(tmp_path, flags):
    with trio.fail_after(DEADLINE_S):
        async with open_conductor(tmp_path) as c:
            proc = await trio.lowlevel.open_process(
                [sys.executable, "-m", "skr8tr", "watch", *flags, "--conductor", c.url],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                stdin=subprocess.DEVNULL,
                env=cli_env(tmp_path / "home"),
            )
            try:
                first = b""
                while b"\n" not in first:  # the snapshot, flushed at once
                    chunk = await proc.stdout.receive_some(4096)
                    assert chunk, "watch ended before printing its snapshot"
                    first += chunk
                proc.send_signal(signal.SIGINT)
                status = await proc.wait()
                stderr = await proc.stderr.receive_some(65536)
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
                await proc.stdout.aclose()
                await proc.stderr.aclose()
    assert status == 130
    assert stderr == b""
    assert first.startswith(b'{"seq": 0' if flags else b"snapshot #0: 0 node(s)")
