"""The real ``skr8tr`` CLI as a subprocess: verbs, flags, exit codes, keys, fmt."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from skr8tr.core import manifest
from skr8tr.manifest_files import load_manifest
from tests.conftest import MANIFESTS, free_port, run_cli

ALL_VERBS = [
    "keygen",
    "conductor",
    "node",
    "ingress",
    "up",
    "down",
    "rollout",
    "scale",
    "list",
    "nodes",
    "status",
    "ping",
    "logs",
    "watch",
    "fmt",
]


def test_top_level_help_lists_every_verb(cli_env):
    proc = run_cli("--help", env=cli_env)
    assert proc.returncode == 0
    for verb in ALL_VERBS:
        assert verb in proc.stdout


@pytest.mark.parametrize("verb", ALL_VERBS)
def test_every_verb_has_help(verb, cli_env):
    proc = run_cli(verb, "--help", env=cli_env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: skr8tr ")
    # the client flags are accepted after the verb too (a daemon lists only its own)
    if verb != "conductor":
        assert "--conductor URL" in proc.stdout


@pytest.mark.parametrize(("verb", "shown", "hidden"), [
    ("conductor", ["--listen", "--config FILE", "SKR8TR_CONDUCTOR_LOG_LEVEL"],
     ["--conductor", "--key", "--ca", "--json", "--timeout"]),
    ("node", ["--conductor", "--key FILE", "--ca FILE", "--config FILE", "--data-dir"],
     ["--json", "--timeout"]),
    ("ingress", ["--conductor", "--ca FILE", "--key FILE", "--name NAME", "--route",
                 "--config FILE"],
     ["--json", "--timeout"]),
])
def test_daemon_help_lists_only_its_own_flags(cli_env, verb, shown, hidden):
    out = run_cli(verb, "--help", env=cli_env).stdout
    for flag in shown:
        assert flag in out, flag
    for flag in hidden:
        assert flag + " " not in out and flag + "\n" not in out, flag
    # still accepted, as before, for scripts that pass them
    proc = run_cli(verb, "--json", "--timeout", "3", "--help", env=cli_env)
    assert proc.returncode == 0


def test_unknown_verb_is_usage_error(cli_env):
    proc = run_cli("deploy", env=cli_env)
    assert proc.returncode == 2
    assert "error: USAGE:" in proc.stderr


def test_bad_flag_value_is_usage_error(cli_env):
    proc = run_cli("scale", "web", "many", env=cli_env)
    assert proc.returncode == 2
    assert "expected a whole number" in proc.stderr


# ------------------------------------------------------------------ keygen


def test_keygen_writes_private_key_and_prints_public(cli_env, tmp_path):
    out = tmp_path / "keys"
    proc = run_cli("keygen", "--out", str(out), env=cli_env)
    assert proc.returncode == 0, proc.stderr
    pub = proc.stdout.strip()
    assert len(pub) == 64 and int(pub, 16) >= 0
    sec = out / "signing.sec"
    assert stat.S_IMODE(sec.stat().st_mode) == 0o600
    assert (out / "signing.pub").read_text().strip() == pub
    seed = sec.read_text().strip()
    assert len(seed) == 64 and seed not in proc.stdout and seed not in proc.stderr


def test_keygen_refuses_to_overwrite_without_force(cli_env, tmp_path):
    out = tmp_path / "keys"
    first = run_cli("keygen", "--out", str(out), env=cli_env)
    second = run_cli("keygen", "--out", str(out), env=cli_env)
    assert second.returncode == 2
    assert "--force" in second.stderr
    assert (out / "signing.pub").read_text().strip() == first.stdout.strip()
    forced = run_cli("keygen", "--out", str(out), "--force", env=cli_env)
    assert forced.returncode == 0
    assert forced.stdout.strip() != first.stdout.strip()
    assert (out / "signing.pub").read_text().strip() == forced.stdout.strip()


def test_keygen_default_folder_is_home_dot_skr8tr(cli_env):
    proc = run_cli("keygen", "--json", env=cli_env)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["secret_key_file"] == os.path.join(cli_env["HOME"], ".skr8tr", "signing.sec")
    assert Path(doc["secret_key_file"]).exists()


# ------------------------------------------------------------------ fmt


@pytest.mark.parametrize(
    "path",
    sorted(MANIFESTS.glob("*.skr8tr")) + sorted(MANIFESTS.glob("*.toml")),
    ids=lambda p: p.name,
)
def test_fmt_prints_a_manifest_that_parses_back_equal(path, cli_env):
    original = load_manifest(str(path))
    proc = run_cli("fmt", str(path), env=cli_env)
    assert proc.returncode == 0, proc.stderr
    again = manifest.parse_manifest(
        proc.stdout, filename="stdout", base_dir=original.base_dir, format="skr8tr"
    )
    assert again == original
    proc = run_cli("fmt", "--toml", str(path), env=cli_env)
    assert proc.returncode == 0, proc.stderr
    again = manifest.parse_manifest(
        proc.stdout, filename="stdout", base_dir=original.base_dir, format="toml"
    )
    assert again == original


def test_fmt_of_bad_manifest_names_file_line_and_column(cli_env, tmp_path):
    bad = tmp_path / "bad.skr8tr"
    bad.write_text("app web\n  exec /bin/true\n  replicas lots\n")
    proc = run_cli("fmt", str(bad), env=cli_env)
    assert proc.returncode == 2
    assert proc.stdout == ""
    line = proc.stderr.strip()
    assert line.startswith(f"error: INVALID_MANIFEST: {bad}:3:12: ")
    assert "'lots'" in line


def test_fmt_json_failure_is_printed_on_stdout_too(cli_env, tmp_path):
    bad = tmp_path / "bad.skr8tr"
    bad.write_text("app Web\n  exec /bin/true\n")
    proc = run_cli("fmt", "--json", str(bad), env=cli_env)
    assert proc.returncode == 2
    doc = json.loads(proc.stdout)
    assert doc["error"]["code"] == "INVALID_MANIFEST"
    assert ":1:5:" in doc["error"]["message"]


# ------------------------------------------------------------------ talking to a conductor


def test_ping_without_conductor_exits_3(cli_env):
    url = f"ws://127.0.0.1:{free_port()}"
    proc = run_cli("ping", "--conductor", url, env=cli_env)
    assert proc.returncode == 3
    assert proc.stderr.startswith(f"error: UNREACHABLE: cannot reach the conductor at {url}/v1/cli")
    assert len(proc.stderr.strip().splitlines()) == 1


def test_client_flags_before_the_verb_and_env(cli_env):
    url = f"ws://127.0.0.1:{free_port()}"
    before = run_cli("--conductor", url, "--json", "list", env=cli_env)
    assert before.returncode == 3
    assert json.loads(before.stdout)["error"]["code"] == "UNREACHABLE"
    assert url in before.stderr
    env = dict(cli_env, SKR8TR_CONDUCTOR=url)
    from_env = run_cli("nodes", env=env)
    assert from_env.returncode == 3
    assert url in from_env.stderr
    # a flag beats the environment
    other = f"ws://127.0.0.1:{free_port()}"
    flag = run_cli("status", "--conductor", other, env=env)
    assert other in flag.stderr and url not in flag.stderr


@pytest.mark.parametrize(
    "argv",
    [
        ["up", str(MANIFESTS / "web.skr8tr")],
        ["down", "web"],
        ["scale", "web", "2"],
        ["rollout", str(MANIFESTS / "web.skr8tr")],
        ["rollout", "abort", "web"],
        ["rollout", "undo", "web", "--to", "1"],
        ["logs", "web"],
    ],
)
def test_signed_verbs_without_a_key_exit_2_and_say_how(argv, cli_env):
    url = f"ws://127.0.0.1:{free_port()}"
    proc = run_cli(*argv, "--conductor", url, env=cli_env)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: NO_KEY: ")
    assert "skr8tr keygen" in proc.stderr and "--key" in proc.stderr
    assert proc.stderr.count("skr8tr keygen") == 1  # the hint is said once


@pytest.mark.parametrize(
    "argv",
    [
        ["list"],
        ["list", "web"],
        ["nodes"],
        ["status"],
        ["ping"],
        ["rollout", "status", "web"],
        ["rollout", "history", "web"],
        ["watch"],
    ],
)
def test_read_only_verbs_go_unsigned_without_a_key(argv, cli_env):
    url = f"ws://127.0.0.1:{free_port()}"
    proc = run_cli(*argv, "--conductor", url, env=cli_env)
    assert proc.returncode == 3, proc.stderr
    assert "UNREACHABLE" in proc.stderr


def test_key_readable_by_others_is_refused_with_the_fix(cli_env, tmp_path):
    out = tmp_path / "keys"
    assert run_cli("keygen", "--out", str(out), env=cli_env).returncode == 0
    sec = out / "signing.sec"
    sec.chmod(0o644)
    proc = run_cli(
        "down",
        "web",
        "--key",
        str(sec),
        "--conductor",
        f"ws://127.0.0.1:{free_port()}",
        env=cli_env,
    )
    assert proc.returncode == 2
    assert f"chmod 600 {sec}" in proc.stderr


def test_key_from_env_is_used(cli_env, tmp_path):
    out = tmp_path / "keys"
    assert run_cli("keygen", "--out", str(out), env=cli_env).returncode == 0
    env = dict(cli_env, SKR8TR_KEY=str(out / "signing.sec"))
    proc = run_cli("down", "web", "--conductor", f"ws://127.0.0.1:{free_port()}", env=env)
    assert proc.returncode == 3  # the key was found; only the conductor is missing


def test_invalid_manifest_is_caught_before_sending(cli_env, tmp_path):
    out = tmp_path / "keys"
    assert run_cli("keygen", "--out", str(out), env=cli_env).returncode == 0
    bad = tmp_path / "bad.skr8tr"
    bad.write_text("app web\n  exec /bin/true\n  port 70000\n")
    proc = run_cli(
        "up",
        str(bad),
        "--key",
        str(out / "signing.sec"),
        "--conductor",
        f"ws://127.0.0.1:{free_port()}",
        env=cli_env,
    )
    assert proc.returncode == 2
    assert f"{bad}:3:8:" in proc.stderr


@pytest.mark.parametrize(
    "argv, message",
    [
        (["rollout", "status"], "usage: skr8tr rollout status APP"),
        (["rollout", "abort", "web", "--watch"], "--watch goes with `rollout FILE`, "
         "`rollout status APP` or `rollout undo APP`, not `rollout abort`"),
        (["rollout", "history", "web", "--watch"], "not `rollout history`"),
        (["rollout", "status", "web", "--force"], "--force goes with `rollout FILE` or "
         "`rollout undo APP`, not `rollout status`"),
        (["rollout", "abort", "web", "--to", "2"], "--to goes with"),
        (["rollout", "status", "web", "--generation", "2"], "--generation goes with "
         "`rollout history APP`"),
        (["rollout", "history", "web", "--generation", "0"], "expected a number >= 1"),
        (["rollout", "history", "web", "--generation", "x"], "expected a whole number"),
        (["rollout", "a.skr8tr", "b.skr8tr"], "usage: skr8tr rollout FILE"),
    ],
)
def test_rollout_subverb_misuse(argv, message, cli_env):
    proc = run_cli(*argv, env=cli_env)
    assert proc.returncode == 2
    assert message in proc.stderr


def test_bad_conductor_url_is_usage_error(cli_env):
    proc = run_cli("ping", "--conductor", "http://127.0.0.1:7771", env=cli_env)
    assert proc.returncode == 2
    assert "must start with ws:// or wss://" in proc.stderr
