"""Least privilege on the node (--run-as) and key hygiene in the CLI and the agent."""

from __future__ import annotations

import json
import os
import pwd
import stat
from pathlib import Path

import psutil
import pytest
import trio

from skr8tr.core.node_protocol import Launch, ReplicaReport
from skr8tr.node.process import RunAsError, resolve_run_as
from skr8tr.node.supervisor import open_supervisor
from tests.conftest import run_cli

DEADLINE_S = 30
IS_ROOT = os.geteuid() == 0


def launch_spec(replica: str, script: str) -> Launch:
    return Launch(replica=replica, app="least", generation=1, app_type="process",
                  exec="/bin/sh", args=("-c", script), env={"TOKEN": "workload-sees-it"},
                  workdir=None, port=None, host="127.0.0.1", health=None, settle_ms=100,
                  stop_grace_ms=2000)


async def wait_for(reports: list[ReplicaReport], replica: str, state: str) -> ReplicaReport:
    with trio.fail_after(DEADLINE_S):
        while True:
            for r in reports:
                if r.replica == replica and r.state == state:
                    return r
            await trio.sleep(0.02)


async def test_run_as_starts_workloads_as_that_user(tmp_path: Path):
    if not IS_ROOT:
        # Without root the agent cannot switch users, and says so before starting.
        with pytest.raises(RunAsError, match="must run as root"):
            resolve_run_as("nobody")
        return
    nobody = pwd.getpwnam("nobody")
    run_as = resolve_run_as("nobody")
    assert (run_as.uid, run_as.gid) == (nobody.pw_uid, nobody.pw_gid)
    data = tmp_path / "data"
    reports: list[dict] = []
    with trio.fail_after(DEADLINE_S):
        async with open_supervisor(str(data), stop_on_exit=True, run_as=run_as) as sup:
            sup.attach(reports.append)
            sup.launch(launch_spec("r1", 'id -u; id -g; echo "home=$HOME user=$USER"; pwd; '
                                         'test -n "$TOKEN" && echo token-set; '
                                         'touch ./made-by-me; exec sleep 30'))
            running = await wait_for(reports, "r1", "running")
            proc = psutil.Process(running.pid)
            assert proc.uids().real == proc.uids().effective == nobody.pw_uid
            assert proc.gids().real == nobody.pw_gid
            log = data / "logs" / "r1.stdout"
            with trio.fail_after(DEADLINE_S):
                while not (data / "work" / "made-by-me").exists():
                    await trio.sleep(0.05)
            lines = log.read_text().split()
            assert lines[:2] == [str(nobody.pw_uid), str(nobody.pw_gid)]
            assert f"home={nobody.pw_dir}" in lines and "user=nobody" in lines
            assert str(data / "work") in lines and "token-set" in lines
            assert (data / "work" / "made-by-me").stat().st_uid == nobody.pw_uid
            assert log.stat().st_uid == nobody.pw_uid  # its own log files
            # The agent's own records stay private to root.
            assert stat.S_IMODE((data / "replicas").stat().st_mode) == 0o700
            assert (data / "replicas" / "r1.json").stat().st_uid == 0
            sup.stop("r1")
            exited = await wait_for(reports, "r1", "exited")
            assert exited.signal == 15
    assert not psutil.pid_exists(running.pid) or \
        psutil.Process(running.pid).status() == psutil.STATUS_ZOMBIE


def test_run_as_refuses_an_unknown_user(cli_env, tmp_path: Path):
    key_dir = tmp_path / "k"
    assert run_cli("keygen", "--out", str(key_dir), env=cli_env).returncode == 0
    proc = run_cli("node", "--key", str(key_dir / "signing.sec"), "--run-as",
                   "no-such-user-x", "--data-dir", str(tmp_path / "d"), env=cli_env)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: BAD_RUN_AS: ")
    assert "no such user" in proc.stderr


def test_keygen_never_prints_the_secret(cli_env, tmp_path: Path):
    for extra in ([], ["--json"]):
        out = tmp_path / f"keys{len(extra)}"
        proc = run_cli("keygen", "--out", str(out), *extra, env=cli_env)
        assert proc.returncode == 0
        secret = (out / "signing.sec").read_text().strip()
        assert len(secret) == 64
        assert secret not in proc.stdout and secret not in proc.stderr
        assert stat.S_IMODE((out / "signing.sec").stat().st_mode) == 0o600
        public = (out / "signing.pub").read_text().strip()
        if extra:
            assert json.loads(proc.stdout)["public_key"] == public
        else:
            assert proc.stdout.strip() == public


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660])
def test_secret_keys_readable_by_others_are_refused(cli_env, tmp_path: Path, mode: int):
    out = tmp_path / "keys"
    assert run_cli("keygen", "--out", str(out), env=cli_env).returncode == 0
    sec = out / "signing.sec"
    sec.chmod(mode)
    proc = run_cli("down", "web", "--key", str(sec), "--conductor", "ws://127.0.0.1:9",
                   env=cli_env)
    assert proc.returncode == 2
    assert f"chmod 600 {sec}" in proc.stderr
    agent = run_cli("node", "--key", str(sec), "--data-dir", str(tmp_path / "d"),
                    "--conductor", "ws://127.0.0.1:9", env=cli_env)
    assert agent.returncode == 2 and agent.stderr.startswith("error: BAD_KEY: ")
    assert "chmod 600" in agent.stderr
