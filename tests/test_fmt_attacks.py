"""Issue #17, attacked: ``skr8tr fmt`` prints a manifest's comments back to a terminal.
What a terminal would act on (escape sequences, C1 controls) or show in another order
than it is read (bidirectional overrides) is refused with the place, and a huge
comment costs a bounded parse; the real CLI."""

from __future__ import annotations

import pytest

from tests.conftest import run_cli

BAD = [
    ("\x1b]0;pwned\x07", "\\x1b", "001B"),  # OSC: sets the terminal's title
    ("\x1b[2J", "\\x1b", "001B"),
    ("\x9b31m", "\\x9b", "009B"),  # the 8-bit CSI
    ("\x9d0;t\x9c", "\\x9d", "009D"),
    ("\u202e evil", "\\u202e", "202E"),  # right-to-left override
    ("\u2066", "\\u2066", "2066"),
    ("a\rb", "\\r", "000D"),  # a CR alone: overwrites the line on a terminal
]


@pytest.mark.parametrize(("chars", "shown", "code"), BAD)
@pytest.mark.parametrize("fmt", ["skr8tr", "toml"])
def test_comments_a_terminal_would_act_on_are_refused(tmp_path, cli_env, chars, shown, code, fmt):
    path = tmp_path / f"m.{fmt}"
    if fmt == "skr8tr":
        path.write_text(f"app web\n  exec /bin/sleep  # {chars}\n", newline="")
        column = 22
    else:
        path.write_text(f'app = "web"\nexec = "/bin/sleep"  # {chars}\n', newline="")
        column = 24
    where = f"2:{column + chars.index(chars.lstrip('a'))}"
    proc = run_cli("fmt", str(path), env=cli_env)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == (
        f"error: INVALID_MANIFEST: {path}:{where}: control character "
        f"'{shown}' (U+{code}): expected printable text\n"
    )
    assert "\x1b" not in proc.stderr and "\x9b" not in proc.stderr


@pytest.mark.parametrize(
    ("value", "ok"),
    [("caf\u00e9 \u96ea \u05e9\u05dc\u05d5\u05dd", True), ("x\x85y", True), ("\u202d", False)],
)
def test_plain_text_of_any_script_stays(tmp_path, cli_env, value, ok):
    path = tmp_path / "m.skr8tr"
    path.write_text(f"app web\n  exec /bin/sleep\n  env\n    NOTE {value}\n  # {value}\n")
    proc = run_cli("fmt", str(path), env=cli_env)
    assert (proc.returncode == 0) is ok, proc.stderr
    if ok:
        assert proc.stdout.count(value) == 2


def test_a_megabyte_of_hashes_costs_a_bounded_parse(tmp_path, cli_env):
    path = tmp_path / "m.skr8tr"
    path.write_text("app web\n  exec /bin/sleep\n" + "#" * (2**20 - 100) + "\n")
    proc = run_cli("fmt", str(path), env=cli_env)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "line is 1048476 characters long" in proc.stderr


@pytest.mark.parametrize("verb", ["fmt", "up"])
def test_a_manifest_that_never_ends_costs_a_bounded_read(cli_env, verb):
    # /dev/zero: read whole, it took all the memory there is (MemoryError or the OOM
    # killer). The conductor takes 1 MiB per request: reading stops there.
    proc = run_cli(verb, "/dev/zero", "--conductor", "ws://127.0.0.1:1", env=cli_env, timeout=30)
    assert proc.returncode == 2
    assert proc.stderr == "error: INVALID_MANIFEST: /dev/zero:1:1: manifest over 1048576 bytes\n"


def test_a_manifest_from_a_pipe_is_read(tmp_path, cli_env):
    # `skr8tr fmt <(generate)`: a FIFO is still a manifest file.
    import os
    import threading

    fifo = tmp_path / "m.skr8tr"
    os.mkfifo(fifo)
    writer = threading.Thread(target=fifo.write_text, args=("app web\n  exec /bin/sleep\n",))
    writer.start()
    try:
        proc = run_cli("fmt", str(fifo), env=cli_env)
    finally:
        writer.join(timeout=10)
    assert proc.returncode == 0 and proc.stdout.startswith("app web\n")
