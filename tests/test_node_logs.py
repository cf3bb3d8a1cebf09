"""Replica log files: reading complete lines, rotation by copy-truncate, the bounded tails."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

from skr8tr.node.logs import MAX_LINE_BYTES, LogBook, ReplicaLog


def ticking_clock():
    counter = itertools.count(1)
    return lambda: float(next(counter))


def append(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def texts(rlog: ReplicaLog) -> list[str]:
    return [line["text"] for line in rlog.lines]


def opened(tmp_path: Path, **kw) -> ReplicaLog:
    rlog = ReplicaLog("r1", "demo", str(tmp_path), clock=ticking_clock(), **kw)
    for fd in rlog.open_for_child().values():
        os.close(fd)
    return rlog


def test_only_complete_lines_until_the_final_read(tmp_path: Path) -> None:
    rlog = opened(tmp_path)
    append(rlog.paths["stdout"], b"one\r\ntw")
    assert rlog.read_new() == 1
    append(rlog.paths["stdout"], b"o\nthree")
    append(rlog.paths["stderr"], b"oops \xff\n")
    assert rlog.read_new() == 2
    assert texts(rlog) == ["one", "two", "oops \ufffd"]
    assert rlog.read_new(final=True) == 1
    assert texts(rlog)[-1] == "three"
    assert [line["stream"] for line in rlog.lines] == ["stdout", "stdout", "stderr", "stdout"]
    assert set(rlog.lines[0]) == {"replica", "ts", "stream", "text"}


def test_older_content_of_the_files_is_not_read(tmp_path: Path) -> None:
    (tmp_path / "r1.stdout").write_text("from an earlier run\n")
    rlog = opened(tmp_path)
    append(rlog.paths["stdout"], b"new\n")
    rlog.read_new()
    assert texts(rlog) == ["new"]


def test_an_endless_line_is_cut(tmp_path: Path) -> None:
    rlog = opened(tmp_path)
    append(rlog.paths["stdout"], b"x" * (MAX_LINE_BYTES * 2 + 10))
    assert rlog.read_new() == 2
    assert [len(t) for t in texts(rlog)] == [MAX_LINE_BYTES, MAX_LINE_BYTES]


def test_the_tail_is_bounded(tmp_path: Path) -> None:
    rlog = opened(tmp_path, max_lines=5)
    append(rlog.paths["stdout"], b"".join(b"%d\n" % i for i in range(20)))
    rlog.read_new()
    assert texts(rlog) == ["15", "16", "17", "18", "19"]


def test_rotation_by_copy_truncate_keeps_one_old_file(tmp_path: Path) -> None:
    rlog = opened(tmp_path, rotate_bytes=100)
    path = rlog.paths["stdout"]
    first = b"".join(b"first %02d\n" % i for i in range(20))  # 180 bytes
    append(path, first)
    rlog.read_new()
    assert Path(path + ".1").read_bytes() == first
    assert Path(path).read_bytes() == b""
    second = b"".join(b"second %02d\n" % i for i in range(20))
    append(path, second)
    rlog.read_new()
    assert Path(path + ".1").read_bytes() == second  # only one old file is kept
    append(path, b"third\n")
    rlog.read_new()
    assert Path(path).read_bytes() == b"third\n"
    assert len(texts(rlog)) == 41
    assert texts(rlog)[-1] == "third"


def test_truncation_by_someone_else_starts_over(tmp_path: Path) -> None:
    rlog = opened(tmp_path)
    append(rlog.paths["stdout"], b"a long first line\n")
    rlog.read_new()
    os.truncate(rlog.paths["stdout"], 0)
    append(rlog.paths["stdout"], b"after\n")
    rlog.read_new()
    assert texts(rlog) == ["a long first line", "after"]


def test_logbook_merges_in_time_order_and_keeps_finished_tails(tmp_path: Path) -> None:
    book = LogBook(str(tmp_path), keep_finished=2, clock=ticking_clock())
    logs = {}
    for name, app in (("a", "web"), ("b", "web"), ("c", "other")):
        logs[name] = book.open(name, app)
        for fd in logs[name].open_for_child().values():
            os.close(fd)
    for name in ("a", "b", "a", "c", "b"):
        append(logs[name].paths["stdout"], f"{name} line\n".encode())
        logs[name].read_new()
    assert [(x["replica"], x["ts"]) for x in book.tail("web", None, 10)] == [
        ("a", 1.0), ("b", 2.0), ("a", 3.0), ("b", 5.0)]
    assert [x["ts"] for x in book.tail("web", None, 2)] == [3.0, 5.0]
    assert [x["ts"] for x in book.tail("web", "b", 10)] == [2.0, 5.0]
    assert book.tail("web", "c", 10) == []
    assert book.tail("nope", None, 10) == []

    for name in ("a", "b", "c"):
        book.finish(logs[name])
    # Only the last two finished replicas keep their tails.
    assert [x["replica"] for x in book.tail("web", None, 10)] == ["b", "b"]
    assert len(book.tail("other", None, 10)) == 1
