"""skr8tr.atomic: a file is replaced whole or not at all, and the rename reaches the disk."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from skr8tr import atomic
from skr8tr.atomic import fsync_folder, write_atomically


def test_writes_bytes_and_text_with_exactly_the_mode(tmp_path: Path) -> None:
    target = tmp_path / "f"
    old_umask = os.umask(0o077)
    try:
        write_atomically(target, b"one\n", 0o644)
    finally:
        os.umask(old_umask)
    assert target.read_bytes() == b"one\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    write_atomically(str(target), "zwei ü\n")
    assert target.read_text(encoding="utf-8") == "zwei ü\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


@pytest.mark.parametrize("failing", ["write", "fsync", "replace"])
def test_a_failed_write_leaves_the_previous_file_intact(tmp_path: Path, monkeypatch,
                                                         failing: str) -> None:
    target = tmp_path / "state"
    write_atomically(target, b"previous\n")

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, failing, broken)
    with pytest.raises(OSError, match="No space left"):
        write_atomically(target, b"next, and much longer than the previous one\n")
    monkeypatch.undo()
    assert target.read_bytes() == b"previous\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state"]  # no temporary file left


def test_an_interrupted_write_leaves_no_temporary_file(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "state"
    write_atomically(target, b"previous\n")

    def interrupted(fd: int) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic.os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_atomically(target, b"next\n")
    monkeypatch.undo()
    assert target.read_bytes() == b"previous\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state"]


def _record_fsyncs(monkeypatch, target: Path | None = None) -> list[tuple[str, bool]]:
    """Record each fsync as (what the fd is, "file" or "folder"; whether *target* exists)."""
    synced: list[tuple[str, bool]] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        kind = "folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"
        synced.append((kind, target is not None and target.exists()))
        real_fsync(fd)

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    return synced


def test_the_file_then_its_folder_are_fsynced_around_the_rename(tmp_path: Path,
                                                                  monkeypatch) -> None:
    target = tmp_path / "f"
    synced = _record_fsyncs(monkeypatch, target)
    write_atomically(target, b"data")
    # The temporary file before the rename (no target yet), then the folder after it.
    assert synced == [("file", False), ("folder", True)]


def test_sync_folder_false_leaves_the_folder_to_the_caller(tmp_path: Path,
                                                           monkeypatch) -> None:
    synced = _record_fsyncs(monkeypatch)
    write_atomically(tmp_path / "a", b"1", sync_folder=False)
    write_atomically(tmp_path / "b", b"2", sync_folder=False)
    fsync_folder(tmp_path)
    assert [kind for kind, _ in synced] == ["file", "file", "folder"]
