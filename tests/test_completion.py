"""``skr8tr completion bash|zsh``: scripts generated from the argument tree, run in the
real shells.

bash: the script is sourced and its completion function called with COMP_WORDS /
COMP_CWORD set, as bash does on TAB. zsh: an interactive ``zsh -f`` on a
pseudo-terminal loads the script through compinit and a TAB is typed; what zsh
writes back on the line is the completion (Debian's zsh, installed by
./tools/test).
"""

from __future__ import annotations

import os
import pty
import select
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from skr8tr.cli_args import build_parser
from tests.conftest import run_cli

ZSH = "/usr/bin/zsh"


@pytest.fixture(scope="module")
def bash_script(tmp_path_factory) -> Path:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKR8TR_")}
    proc = run_cli("completion", "bash", env=env)
    assert proc.returncode == 0, proc.stderr
    path = tmp_path_factory.mktemp("bash") / "skr8tr.bash"
    path.write_text(proc.stdout)
    return path


def bash_complete(script: Path, *words: str, cwd: Path | None = None) -> list[str]:
    """What bash offers for the last of *words* (``skr8tr`` first), sorted."""
    quoted = " ".join("'" + w.replace("'", "'\\''") + "'" for w in words)
    program = (f"source {script}\nCOMP_WORDS=({quoted})\n"
               "COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 ))\n"
               'COMP_LINE="${COMP_WORDS[*]}"\nCOMP_POINT=${#COMP_LINE}\n'
               "_shtab_skr8tr\nprintf '%s\\n' \"${COMPREPLY[@]}\"\n")
    proc = subprocess.run(["bash", "--norc", "--noprofile", "-c", program], cwd=cwd,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return sorted(w for w in proc.stdout.splitlines() if w)


def test_bash_completes_verbs(bash_script):
    verbs = bash_complete(bash_script, "skr8tr", "")
    assert {"rollout", "logs", "up", "down", "conductor", "completion"} <= set(verbs)
    # every verb of the parser, those added later included: generated, not listed
    assert set(build_parser().verb_parsers) <= set(verbs)
    assert bash_complete(bash_script, "skr8tr", "rol") == ["rollout"]
    assert bash_complete(bash_script, "skr8tr", "lo") == ["logs"]


def test_bash_completes_sub_verbs_and_files(bash_script, tmp_path):
    (tmp_path / "web.skr8tr").write_text("app web\n")
    assert bash_complete(bash_script, "skr8tr", "rollout", "un") == ["undo"]
    assert bash_complete(bash_script, "skr8tr", "rollout", "", cwd=tmp_path) == [
        "abort", "history", "pause", "promote", "resume", "status", "undo", "web.skr8tr"]
    assert bash_complete(bash_script, "skr8tr", "rollout", "pr") == ["promote"]
    assert bash_complete(bash_script, "skr8tr", "up", "we", cwd=tmp_path) == ["web.skr8tr"]
    assert bash_complete(bash_script, "skr8tr", "completion", "") == ["bash", "zsh"]


def test_bash_completes_flags(bash_script):
    assert bash_complete(bash_script, "skr8tr", "logs", "web", "--fol") == ["--follow"]
    assert {"--to", "--watch", "--json"} <= set(
        bash_complete(bash_script, "skr8tr", "rollout", "undo", "web", "--"))
    node = bash_complete(bash_script, "skr8tr", "node", "--")
    assert {"--config", "--data-dir", "--conductor", "--key"} <= set(node)
    assert "--json" not in node  # a daemon completes only its own flags
    assert bash_complete(bash_script, "skr8tr", "conductor", "--log-level", "") == [
        "debug", "error", "info", "warning"]


# --------------------------------------------------------------------------- zsh


def zsh_complete(fpath: Path, line: str, home: Path) -> str:
    """The terminal output of an interactive zsh after typing *line* and a TAB."""
    master, slave = pty.openpty()
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home),
           "TERM": "dumb"}
    proc = subprocess.Popen([ZSH, "-f", "-i"], stdin=slave, stdout=slave, stderr=slave,
                            env=env, cwd=home, start_new_session=True)
    os.close(slave)
    out = bytearray()

    def pump(until: bytes, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.05)
            if ready:
                try:
                    out.extend(os.read(master, 65536))
                except OSError:
                    return False
            if until and until in out:
                return True
        return False

    try:
        os.write(master, f"fpath=({fpath} $fpath); autoload -Uz compinit; "
                         "compinit -u -D; echo READY-$((6*7))\n".encode())
        assert pump(b"READY-42", 20), out.decode(errors="replace")
        del out[:]
        os.write(master, (line + "\t").encode())
        # the line echoes back, then zsh rewrites it with the completion: wait until
        # something follows the echo and the terminal has been quiet for a moment
        pump(line.encode(), 10)
        seen = -1
        while seen != len(out):
            seen = len(out)
            pump(b"", 0.5)
        return out.decode(errors="replace")
    finally:
        os.write(master, b"\x15exit\n")
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        os.close(master)


@pytest.fixture(scope="module")
def zsh_fpath(tmp_path_factory) -> Path:
    if not os.path.exists(ZSH):
        pytest.fail(f"{ZSH} is missing: run ./tools/test, which installs Debian's zsh "
                    "(apt-get install -y zsh)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKR8TR_")}
    proc = run_cli("completion", "zsh", env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("#compdef skr8tr")
    fpath = tmp_path_factory.mktemp("zsh")
    (fpath / "_skr8tr").write_text(proc.stdout)
    return fpath


@pytest.mark.parametrize(("line", "completed"), [
    ("skr8tr rol", "skr8tr rollout "),
    ("skr8tr rollout un", "skr8tr rollout undo "),
    ("skr8tr logs web --fol", "skr8tr logs web --follow "),
    ("skr8tr conductor --authorized-k", "skr8tr conductor --authorized-keys "),
    ("skr8tr completion z", "skr8tr completion zsh "),
])
def test_zsh_completes(zsh_fpath, tmp_path, line, completed):
    home = tmp_path / "home"
    home.mkdir()
    out = zsh_complete(zsh_fpath, line, home)
    assert completed in out, repr(out)


def test_zsh_completes_manifest_files(zsh_fpath, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "web-v2.skr8tr").write_text("app web\n")
    assert "skr8tr up web-v2.skr8tr" in zsh_complete(zsh_fpath, "skr8tr up web-", home)
    assert "skr8tr rollout web-v2.skr8tr" in zsh_complete(zsh_fpath, "skr8tr rollout web-",
                                                          home)


def test_completion_needs_a_known_shell(cli_env):
    proc = run_cli("completion", "fish", env=cli_env)
    assert proc.returncode == 2
    assert "error: USAGE: argument shell: invalid choice: 'fish'" in proc.stderr


def test_zsh_is_installed_by_tools_test():
    text = (Path(__file__).resolve().parent.parent / "tools" / "test").read_text()
    assert "apt-get install -y zsh" in text
    assert shutil.which("bash") is not None
