"""Issue #17, attacked: what a daemon's ``--config FILE`` and SKR8TR_<VERB>_* can be
made to do. Refused with one line and exit 2, never a hang or a traceback; and
``insecure`` from the file or the environment is said as loudly as the flag."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from skr8tr import daemon_config
from tests.conftest import free_port, run_cli
from tests.e2e import poll
from tests.test_daemon_config import _serves, _start, _stop, resolve


def test_a_fifo_is_refused_at_once_not_waited_on(tmp_path, cli_env):
    fifo = tmp_path / "conductor.toml"
    os.mkfifo(fifo)
    # No writer ever opens it: an open() without O_NONBLOCK would wait forever.
    proc = run_cli("conductor", "--config", str(fifo), env=cli_env, timeout=20)
    assert proc.returncode == 2
    assert proc.stderr == (f"error: CONFIG: {fifo}: a FIFO; a config file is a regular TOML file\n")


@pytest.mark.parametrize(("path", "what"), [("/dev/zero", "a device"), ("/", "a folder")])
def test_what_is_not_a_regular_file_is_refused(path, what):
    with pytest.raises(daemon_config.ConfigError) as info:
        resolve(["node", "--config", path])
    assert str(info.value) == f"{path}: {what}; a config file is a regular TOML file"


@pytest.mark.parametrize(
    "value", ["[" * 100_000 + "]" * 100_000, "{a = " * 50_000 + "1" + "}" * 50_000]
)
def test_deep_nesting_is_one_line_not_a_traceback(tmp_path, cli_env, value):
    cfg = tmp_path / "deep.toml"
    cfg.write_text(f"listen = {value}\n")
    proc = run_cli("conductor", "--config", str(cfg), env=cli_env, timeout=30)
    assert proc.returncode == 2
    assert proc.stderr == (
        f"error: CONFIG: {cfg}: arrays or tables nested too deeply: not a config file\n"
    )


def test_a_symlink_to_a_config_file_is_followed(tmp_path):
    real = tmp_path / "real.toml"
    real.write_text("node-timeout = 7\n")
    link = tmp_path / "link.toml"
    link.symlink_to(real)
    assert resolve(["conductor", "--config", str(link)]).node_timeout == 7.0


@pytest.mark.e2e
@pytest.mark.parametrize("source", ["file", "env"])
def test_insecure_from_file_or_env_is_said_on_start(tmp_path: Path, cli_env, source):
    ws_port, http_port = free_port(), free_port()
    cfg = tmp_path / "conductor.toml"
    cfg.write_text(
        f'listen = "127.0.0.1:{ws_port}"\nhttp = "127.0.0.1:{http_port}"\n'
        f'state = "{tmp_path / "state.toml"}"\n' + ("insecure = true\n" if source == "file" else "")
    )
    env = {**cli_env, **({"SKR8TR_CONDUCTOR_INSECURE": "yes"} if source == "env" else {})}
    log = tmp_path / "conductor.log"
    proc = _start(["conductor", "--config", str(cfg)], env, log)
    try:
        poll(
            lambda: _serves(ws_port, cli_env) or proc.poll() is not None,
            what="the conductor to serve",
        )
        assert proc.poll() is None, log.read_text()
        assert "INSECURE MODE: no key is checked" in log.read_text()
    finally:
        assert _stop(proc) == 0
    # Without it, no authorized keys: the conductor refuses to start.
    cfg.write_text(cfg.read_text().replace("insecure = true\n", ""))
    proc = run_cli("conductor", "--config", str(cfg), env=cli_env, timeout=30)
    assert proc.returncode == 2 and "--insecure" in proc.stderr
