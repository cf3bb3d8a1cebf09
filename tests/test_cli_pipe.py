"""The real CLI printing into a pipe whose reader is gone (``skr8tr list | head -1``):
it stops quietly with 141 (128 + SIGPIPE), as Unix tools do, never a traceback."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import trio

from tests.conftest import skr8tr_command
from tests.security_helpers import open_conductor

MANIFEST = Path(__file__).resolve().parent.parent / "manifests" / "web.skr8tr"


def run_into_closed_pipe(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """*args* with stdout a pipe whose read end was closed before the CLI started: its
    first write fails, whatever the timing."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run(
            [*skr8tr_command(), *args],
            stdout=write_end,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            env=env,
            text=True,
            timeout=60,
        )
    finally:
        os.close(write_end)


@pytest.mark.parametrize(
    "args",
    [
        ("completion", "bash"),  # 14 kB: more than one write
        ("fmt", str(MANIFEST)),
        ("version", "--conductor", "ws://127.0.0.1:1"),
    ],
)
def test_output_into_a_closed_pipe_ends_quietly(args, cli_env):
    proc = run_into_closed_pipe(*args, env=cli_env)
    assert (proc.returncode, proc.stderr) == (141, "")


async def test_list_from_a_real_conductor_into_a_closed_pipe(tmp_path, cli_env):
    async with open_conductor(tmp_path) as conductor:
        for extra in ((), ("--json",)):
            proc = await trio.to_thread.run_sync(
                lambda extra=extra: run_into_closed_pipe(
                    "list", *extra, "--conductor", conductor.url, env=cli_env
                )
            )
            assert (proc.returncode, proc.stderr) == (141, "")
