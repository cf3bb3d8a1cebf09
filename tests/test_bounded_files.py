"""Issue #17, attacked: files an operator names (by flag, config file or environment)
are read bounded and only when regular. ``--authorized-keys /dev/zero``, a FIFO, a
folder or a huge file is one line and exit 2 from the real daemon, never a hang or
all the memory; the same for ``--state``, ``--tls-cert`` and ``signing.sec``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from skr8tr import audit_head, bounded_files, keyfiles
from skr8tr.conductor import state_file
from skr8tr.core import audit_chain
from skr8tr.core.audit_chain import ChainError
from skr8tr.core.keys import AuthorizedKeysError
from tests.conftest import run_cli
from tests.test_audit import chain


def test_read_regular_reads_at_most_the_bound(tmp_path):
    f = tmp_path / "f"
    f.write_bytes(b"x" * 100)
    assert bounded_files.read_regular(f, 100) == b"x" * 100
    with pytest.raises(bounded_files.FileRefused) as info:
        bounded_files.read_regular(f, 99)
    assert info.value.too_big and str(info.value) == f"{f}: over 99 bytes"


@pytest.mark.parametrize(("path", "what"), [("/dev/zero", "a device"), ("/", "a folder")])
def test_read_regular_refuses_what_is_not_a_file(path, what):
    with pytest.raises(bounded_files.FileRefused) as info:
        bounded_files.read_regular(path, 1 << 30)  # /dev/zero would never end
    assert info.value.reason == what and not info.value.too_big


def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(bounded_files.FileRefused, match="a FIFO"):
        bounded_files.read_regular(fifo, 10)
    with pytest.raises(keyfiles.KeyFileError, match="not a regular file .a FIFO."):
        keyfiles.load_signing_key(fifo)
    with pytest.raises(state_file.StateFileError, match="a FIFO: not a state file"):
        state_file.load(str(fifo))


def test_a_huge_authorized_keys_file_is_refused_unread(tmp_path):
    big = tmp_path / "authorized_keys"
    with open(big, "wb") as f:  # sparse: 10 GB that take no disk
        f.truncate(10 * 1024**3)
    with pytest.raises(AuthorizedKeysError, match="over 67108864 bytes"):
        keyfiles.load_authorized_keys(big)


def _keys(tmp_path: Path, cli_env) -> Path:
    pub = run_cli("keygen", "--out", str(tmp_path / "k"), env=cli_env).stdout.strip()
    ak = tmp_path / "authorized_keys"
    ak.write_text(f"admin {pub}\n")
    return ak


def _conductor(*args: str, env, tmp_path: Path):
    return run_cli(
        "conductor", "--listen", "127.0.0.1:0", "--http", "127.0.0.1:0", *args, env=env, timeout=20
    )


@pytest.mark.parametrize("source", ["flag", "env", "config"])
@pytest.mark.parametrize("target", ["/dev/zero", "fifo", "folder"])
def test_the_conductor_refuses_such_authorized_keys_in_one_line(tmp_path, cli_env, source, target):
    path = {"/dev/zero": "/dev/zero", "fifo": str(tmp_path / "fifo"), "folder": str(tmp_path)}[
        target
    ]
    if target == "fifo":
        os.mkfifo(path)
    env, args = dict(cli_env), []
    if source == "flag":
        args = ["--authorized-keys", path]
    elif source == "env":
        env["SKR8TR_CONDUCTOR_AUTHORIZED_KEYS"] = path
    else:
        cfg = tmp_path / "conductor.toml"
        cfg.write_text(f'authorized-keys = "{path}"\n')
        args = ["--config", str(cfg)]
    proc = _conductor(*args, env=env, tmp_path=tmp_path)
    what = {"/dev/zero": "a device", "fifo": "a FIFO", "folder": "a folder"}[target]
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == (
        f"error: START: {path}: {what}: not an authorized-keys file "
        "(a regular text file, one key a line)\n"
    )


@pytest.mark.parametrize("target", ["/dev/zero", "fifo"])
def test_the_conductor_refuses_such_a_state_file_in_one_line(tmp_path, cli_env, target):
    path = "/dev/zero" if target == "/dev/zero" else str(tmp_path / "fifo")
    if target == "fifo":
        os.mkfifo(path)
    ak = _keys(tmp_path, cli_env)
    proc = _conductor("--authorized-keys", str(ak), "--state", path, env=cli_env, tmp_path=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith(f"error: START: {path}: a ")
    assert "not a state file" in proc.stderr


def test_the_conductor_refuses_a_fifo_as_tls_cert(tmp_path, cli_env):
    fifo = tmp_path / "cert.pem"
    os.mkfifo(fifo)
    ak = _keys(tmp_path, cli_env)
    proc = _conductor(
        "--authorized-keys",
        str(ak),
        "--tls-cert",
        str(fifo),
        "--tls-key",
        str(fifo),
        env=cli_env,
        tmp_path=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == f"error: START: --tls-cert {fifo}: not a regular file\n"


@pytest.mark.parametrize("verb", [["scale", "web", "2"], ["node", "--node-id", "n1"]])
def test_a_fifo_as_signing_key_is_one_line(tmp_path, cli_env, verb):
    fifo = tmp_path / "signing.sec"
    os.mkfifo(fifo)
    proc = run_cli(
        *verb, "--conductor", "ws://127.0.0.1:9", "--key", str(fifo), env=cli_env, timeout=20
    )
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and "a FIFO" in proc.stderr, proc.stderr


# ---------------------------------------------------------------------- audit logs, streamed


def _pieces(data: bytes, sizes: list[int]):
    """A read(n) that hands out *data* in pieces of the given sizes (at most n)."""
    pos = 0
    it = iter(sizes)

    def read(n: int) -> bytes:
        nonlocal pos
        take = min(n, next(it, n))
        chunk = data[pos : pos + take]
        pos += len(chunk)
        return chunk

    return read


@given(
    st.integers(0, 6),
    st.lists(st.integers(1, 400), max_size=50),
    st.sampled_from(["intact", "torn", "edited"]),
)
def test_a_streamed_check_finds_what_the_whole_file_check_finds(n, sizes, how):
    data, head = chain(n)
    if how == "torn" and data:
        data = data[:-7]
    elif how == "edited" and data:
        data = data.replace(b'"app":"a0"', b'"app":"b0"')
    try:
        whole = audit_chain.verify(data, recorded=head)
    except ChainError as exc:
        with pytest.raises(ChainError) as streamed:
            audit_head.verify_stream(_pieces(data, sizes), recorded=head)
        assert (streamed.value.line, streamed.value.message) == (exc.line, exc.message)
    else:
        assert audit_head.verify_stream(_pieces(data, sizes), recorded=head) == whole


def test_a_line_past_the_bound_is_refused_before_it_is_held(tmp_path):
    read_sizes: list[int] = []
    zeros = _pieces(b"\0" * (8 * audit_head.MAX_LINE_BYTES), [])

    def read(n: int) -> bytes:
        chunk = zeros(n)
        read_sizes.append(len(chunk))
        return chunk

    with pytest.raises(ChainError, match="over 1048576 bytes") as info:
        audit_head.verify_stream(read)
    assert info.value.line == 1
    assert sum(read_sizes) <= audit_head.MAX_LINE_BYTES + audit_head.READ_CHUNK_BYTES


def test_audit_verify_of_a_device_a_fifo_or_a_huge_file(tmp_path, cli_env):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path, what in (("/dev/zero", "a device"), (str(fifo), "a FIFO")):
        proc = run_cli("audit", "verify", path, env=cli_env, timeout=20)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr == f"error: AUDIT: {path}: {what}; an audit log is a regular file\n"
    huge = tmp_path / "audit.jsonl"
    data, _ = chain(3)
    with open(huge, "wb") as f:  # three good entries, then 10 GB (sparse) of no newline
        f.write(data)
        f.truncate(10 * 1024**3)
    proc = run_cli("audit", "verify", str(huge), env=cli_env, timeout=20)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr == (
        f"error: AUDIT: {huge}:4: a line over 1048576 bytes: not an audit log entry\n"
    )


def test_a_big_intact_audit_log_verifies_streamed(tmp_path, cli_env):
    log = tmp_path / "audit.jsonl"
    data, head = chain(20_000)  # ~3 MB: several read chunks, lines across their edges
    log.write_bytes(data)
    proc = run_cli("audit", "verify", str(log), "--json", env=cli_env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert (doc["entries"], doc["head"]) == (20_000, head.hash)


def test_the_conductor_refuses_such_an_audit_log_in_one_line(tmp_path, cli_env):
    ak = _keys(tmp_path, cli_env)
    proc = _conductor(
        "--authorized-keys", str(ak), "--audit-log", "/dev/zero", env=cli_env, tmp_path=tmp_path
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == (
        "error: START: --audit-log /dev/zero: a device; an audit log is a regular file\n"
    )


def test_a_fifo_as_the_nonces_file_refuses_the_first_window_instead_of_hanging(tmp_path, caplog):
    import logging

    from skr8tr.conductor import replay_store
    from tests.test_replay_restart import NOW, admit, request

    fifo = tmp_path / "nonces"
    os.mkfifo(fifo)  # no writer: a plain open() would wait forever
    with caplog.at_level(logging.WARNING, logger="skr8tr.conductor"):
        guard = replay_store.DurableReplayGuard(str(fifo), started_at=NOW)
    assert f"{fifo}: a FIFO: not a nonces file" in caplog.text
    assert admit(guard, request(NOW + 20), NOW + 1) == "EXPIRED"


def test_audit_verify_with_a_fifo_as_its_head_file(tmp_path, cli_env):
    log = tmp_path / "audit.jsonl"
    log.write_bytes(chain(2)[0])
    os.mkfifo(tmp_path / "audit.jsonl.head")
    proc = run_cli("audit", "verify", str(log), env=cli_env, timeout=20)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr == f"error: AUDIT: {log}.head: a FIFO: not a head file\n"
