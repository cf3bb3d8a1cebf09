"""Replica log files: reading complete lines, rotation by copy-truncate, the bounded tails."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest
import trio
import trio.testing

from skr8tr.node.logs import MAX_LINE_BYTES, LogBook, LogSubscription, ReplicaLog


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
    assert set(rlog.lines[0]) == {"replica", "ts", "stream", "text", "seq"}
    assert [line["seq"] for line in rlog.lines] == [1, 2, 3, 4]


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


# --------------------------------------------------------------------------- following


def started(book: LogBook, replica: str, app: str) -> ReplicaLog:
    rlog = book.open(replica, app)
    for fd in rlog.open_for_child().values():
        os.close(fd)
    return rlog


def write(rlog: ReplicaLog, *texts_: str, stream: str = "stdout") -> None:
    append(rlog.paths[stream], "".join(f"{t}\n" for t in texts_).encode())
    rlog.read_new()


def drain(sub: LogSubscription) -> tuple[list[str], int]:
    """What a follower gets at once: its pending texts and the count skipped after them."""
    lines = [line["text"] for line in sub.pending]
    skipped = sub.skipped
    sub.pending.clear()
    sub.pending_chars = 0
    sub.skipped = 0
    return lines, skipped


def test_a_follow_starts_with_the_tail_and_gets_every_later_line_once(tmp_path: Path) -> None:
    book = LogBook(str(tmp_path), clock=ticking_clock())
    a = started(book, "web-a", "web")
    write(a, "1", "2", "3", "4")
    first, sub = book.subscribe("web", None, tail=2)
    assert [x["text"] for x in first] == ["3", "4"]  # the seam: no gap, no repeat
    write(a, "5")
    b = started(book, "web-b", "web")  # a replica launched later joins the follow
    write(b, "b1")
    other = started(book, "other-x", "other")
    write(other, "not mine")
    write(a, "6", stream="stderr")
    assert [(x["replica"], x["text"], x["seq"]) for x in sub.pending] == [
        ("web-a", "5", 5), ("web-b", "b1", 1), ("web-a", "6", 6)]
    book.unsubscribe(sub)
    write(a, "7")
    assert len(sub.pending) == 3  # no longer told
    assert book.subscriptions == set()


def test_tail_zero_follows_only_new_lines(tmp_path: Path) -> None:
    book = LogBook(str(tmp_path), clock=ticking_clock())
    a = started(book, "web-a", "web")
    write(a, "old")
    first, sub = book.subscribe("web", None, tail=0)
    assert first == []
    write(a, "new")
    assert drain(sub) == (["new"], 0)
    assert book.tail("web", None, 0) == []


def test_a_follow_of_one_replica_ignores_the_others(tmp_path: Path) -> None:
    book = LogBook(str(tmp_path), clock=ticking_clock())
    a, b = started(book, "web-a", "web"), started(book, "web-b", "web")
    _, sub = book.subscribe("web", "web-b", tail=0)
    write(a, "a")
    write(b, "b")
    assert drain(sub) == (["b"], 0)


def test_a_slow_follower_gets_a_run_then_the_count_skipped(tmp_path: Path) -> None:
    book = LogBook(str(tmp_path), clock=ticking_clock())
    a = started(book, "web-a", "web")
    _, sub = book.subscribe("web", None, tail=0, max_pending=3)
    write(a, *[str(i) for i in range(1, 11)])
    assert list(sub.pending) and len(sub.pending) == 3
    assert sub.skipped == 7

    async def main() -> None:
        # Taken in two batches: the count comes with the batch that empties the buffer.
        assert [x["text"] for x in (await sub.next_batch(2))[0]] == ["1", "2"]
        write(a, "11")  # still skipped: the reader has not caught up yet
        lines, skipped = await sub.next_batch(2)
        assert ([x["text"] for x in lines], skipped) == (["3"], 8)
        write(a, "12")
        lines, skipped = await sub.next_batch(10)
        assert ([x["text"] for x in lines], skipped) == (["12"], 0)

    trio.run(main)


def test_a_follower_buffer_is_bounded_in_characters_too(tmp_path: Path) -> None:
    book = LogBook(str(tmp_path), clock=ticking_clock())
    a = started(book, "web-a", "web")
    _, sub = LogBook.subscribe(book, "web", None, tail=0)
    sub.max_pending_chars = 1000
    write(a, *["x" * 300] * 5)
    assert len(sub.pending) == 2 and sub.skipped == 3
    assert sub.pending_chars <= 1000


def test_next_batch_waits_for_lines(tmp_path: Path) -> None:
    book = LogBook(str(tmp_path), clock=ticking_clock())
    a = started(book, "web-a", "web")
    _, sub = book.subscribe("web", None, tail=0)
    got = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            async def reader() -> None:
                got.append(await sub.next_batch(10))

            nursery.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            assert got == []
            write(a, "hello")

    trio.run(main)
    assert [x["text"] for x in got[0][0]] == ["hello"]


def test_a_resumed_follow_starts_after_the_lines_shown(tmp_path: Path) -> None:
    book = LogBook(str(tmp_path), clock=ticking_clock())  # ts 1, 2, 3, ...
    a = started(book, "web-a", "web")
    write(a, "a1")
    write(a, "a2")
    write(a, "a3")
    b = started(book, "web-b", "web")
    write(b, "b1")  # ts 4
    write(b, "b2")  # ts 5
    c = started(book, "web-c", "web")
    write(c, "c1")  # ts 6
    first, _ = book.subscribe("web", None, tail=0, after={"web-a": 2}, since=5.0)
    # web-a after line 2; web-b and web-c (not shown yet) from ts 5 on
    assert [x["text"] for x in first] == ["a3", "b2", "c1"]


def test_seq_goes_on_for_a_replica_launched_again_under_its_id(tmp_path: Path) -> None:
    book = LogBook(str(tmp_path), clock=ticking_clock())
    a = started(book, "web-a", "web")
    write(a, "1", "2")
    book.finish(a)
    again = started(book, "web-a", "web")
    write(again, "3")
    assert [x["seq"] for x in again.lines] == [3]


# --------------------------------------------------------------------------- files


def files(tmp_path: Path) -> set[str]:
    return {p.name for p in tmp_path.iterdir()}


def test_files_are_kept_for_the_last_finished_replicas_of_each_app(tmp_path: Path) -> None:
    book = LogBook(str(tmp_path), keep_files_per_app=3, clock=ticking_clock())
    keep = started(book, "other-1", "other")
    book.finish(keep)
    # A crash loop: 10 replicas one after the other, each with a rotated file too.
    for i in range(10):
        rlog = started(book, f"web-{i}", "web")
        write(rlog, "crash")
        open(rlog.paths["stderr"] + ".1", "w").close()
        book.finish(rlog)
    assert files(tmp_path) == {
        "other-1.stdout", "other-1.stderr",
        *(f"web-{i}.{s}" for i in (7, 8, 9) for s in ("stdout", "stderr", "stderr.1"))}
    assert book.files_kept("web") == ["web-7", "web-8", "web-9"]
    # The tails in memory are bounded apart (keep_finished): logs still shows them.
    assert len(book.tail("web", None, 100)) == 10


def test_files_of_a_replica_launched_again_under_its_id_are_not_counted_twice(
        tmp_path: Path) -> None:
    book = LogBook(str(tmp_path), keep_files_per_app=2, clock=ticking_clock())
    for _ in range(5):  # one id, restarted: one set of files (appended to)
        book.finish(started(book, "web-a", "web"))
    book.finish(started(book, "web-b", "web"))
    assert files(tmp_path) == {"web-a.stdout", "web-a.stderr", "web-b.stdout", "web-b.stderr"}


def test_forget_app_removes_its_files_now_and_at_the_exit_of_the_live_ones(
        tmp_path: Path) -> None:
    book = LogBook(str(tmp_path), clock=ticking_clock())
    done = started(book, "web-a", "web")
    write(done, "bye")
    book.finish(done)
    live = started(book, "web-b", "web")
    other = started(book, "other-1", "other")
    book.finish(other)
    assert book.forget_app("web") == 1
    assert files(tmp_path) == {"web-b.stdout", "web-b.stderr",
                               "other-1.stdout", "other-1.stderr"}
    assert book.forgetting("web")
    book.finish(live)  # the stop of `down` completes
    assert files(tmp_path) == {"other-1.stdout", "other-1.stderr"}
    assert not book.forgetting("web")
    assert book.tail("web", None, 10) == []
    # The app deployed again under its name keeps its files as usual.
    again = started(book, "web-c", "web")
    book.finish(again)
    assert "web-c.stdout" in files(tmp_path)


def test_a_new_launch_of_a_forgotten_app_cancels_the_removal(tmp_path: Path) -> None:
    book = LogBook(str(tmp_path), clock=ticking_clock())
    old = started(book, "web-a", "web")
    book.forget_app("web")
    started(book, "web-b", "web")  # `up` again before the old one had stopped
    book.finish(old)
    assert "web-a.stdout" in files(tmp_path)


def test_leftover_files_of_an_earlier_agent_count_towards_the_bound(tmp_path: Path) -> None:
    for i in range(6):
        for stream in ("stdout", "stderr"):
            path = tmp_path / f"web-{i:06x}.{stream}"
            path.write_text("old\n")
            os.utime(path, (1000 + i, 1000 + i))
    (tmp_path / "odd name.stdout").write_text("?\n")  # not a replica id: left alone
    book = LogBook(str(tmp_path), keep_files_per_app=2)
    live = started(book, "web-000005", "web")  # re-adopted: not a leftover
    from skr8tr.node.supervisor import app_of_replica

    assert book.sweep_leftovers(app_of_replica) == 3
    assert files(tmp_path) == {
        "odd name.stdout", *(f"web-{i:06x}.{s}" for i in (3, 4, 5) for s in ("stdout", "stderr"))}
    assert live.replica not in book.files_kept("web")


def test_the_start_error_goes_to_the_stderr_log(tmp_path: Path) -> None:
    book = LogBook(str(tmp_path), clock=ticking_clock())
    rlog = book.open("web-a", "web")
    (tmp_path / "web-a.stderr").write_text("an earlier life\n")
    _, sub = book.subscribe("web", None, tail=0)
    rlog.note_start_error("/srv/app", "[Errno 2] No such file or directory: '/srv/app'")
    why = "skr8tr: cannot start /srv/app: [Errno 2] No such file or directory: '/srv/app'"
    assert (tmp_path / "web-a.stderr").read_text() == f"an earlier life\n{why}\n"
    assert [(x["stream"], x["text"]) for x in book.tail("web", None, 10)] == [("stderr", why)]
    assert drain(sub) == ([why], 0)


def test_the_start_error_is_in_the_tail_when_no_file_can_be_written(tmp_path: Path) -> None:
    book = LogBook(str(tmp_path / "missing"), clock=ticking_clock())
    rlog = book.open("web-a", "web")
    rlog.note_start_error("/srv/app", "cannot open log files")
    assert [x["text"] for x in book.tail("web", None, 10)] == [
        "skr8tr: cannot start /srv/app: cannot open log files"]


@pytest.mark.parametrize("size", [0, 1, 5000])
def test_chunks_of_lines_fit_a_message(size: int) -> None:
    from skr8tr.core.node_protocol import chunk_lines

    lines = [{"replica": "r", "ts": 1.0, "stream": "stdout", "text": "\x01" * 1000, "seq": i}
             for i in range(size)]
    chunks = chunk_lines(lines, 100_000)
    assert [line for chunk in chunks for line in chunk] == lines
    import json

    assert all(len(json.dumps(c, ensure_ascii=False).encode()) <= 100_000 for c in chunks)


def test_a_follow_goes_on_across_rotations(tmp_path: Path) -> None:
    book = LogBook(str(tmp_path), rotate_bytes=100, clock=ticking_clock())
    rlog = started(book, "web-a", "web")
    _, sub = book.subscribe("web", None, tail=0)
    for batch in range(5):  # each batch is over the rotate size: rotated after each read
        write(rlog, *[f"{batch}-{i:03d}" for i in range(20)])
        assert Path(rlog.paths["stdout"]).read_bytes() == b""
    lines, skipped = drain(sub)
    assert lines == [f"{b}-{i:03d}" for b in range(5) for i in range(20)] and skipped == 0
    assert [x["seq"] for x in rlog.lines][-1] == 100
    # The files of a forgotten app go with their rotated copies.
    book.finish(rlog)
    book.forget_app("web")
    assert files(tmp_path) == set()


# --------------------------------------------------------------------------- a session's pusher


class BookSupervisor:
    """What the session's pusher needs of a Supervisor, over a LogBook."""

    def __init__(self, book: LogBook) -> None:
        self.book = book

    def follow_logs(self, app, replica, *, tail, after=None, since=None):
        return self.book.subscribe(app, replica, tail=tail, after=after, since=since)

    def unfollow_logs(self, sub) -> None:
        self.book.unsubscribe(sub)


def drain_outbox(recv) -> list:
    out = []
    while True:
        try:
            out.append(recv.receive_nowait())
        except trio.WouldBlock:
            return out


async def test_the_pusher_sends_a_resume_in_full_then_new_lines_then_stops(tmp_path: Path):
    from skr8tr.core.node_protocol import LogsPush, LogsReply, LogsRequest
    from skr8tr.node import session

    book = LogBook(str(tmp_path), clock=ticking_clock())
    rlog = started(book, "web-a", "web")
    big = "y" * 60_000
    write(rlog, *[f"{i} {big}" for i in range(40)])  # ~2.4 MB: more than one message
    send, recv = trio.open_memory_channel(session.OUTBOX_LIMIT)
    follows: dict = {}
    msg = LogsRequest(req="f1", app="web", replica=None, tail=0, follow=True,
                      after={"web-a": 10}, since=0.0)
    async with trio.open_nursery() as nursery:
        follows["f1"] = await nursery.start(session._push_logs, msg, BookSupervisor(book),
                                            send, follows)
        await trio.testing.wait_all_tasks_blocked()
        write(rlog, "new")
        await trio.testing.wait_all_tasks_blocked()
        sent = drain_outbox(recv)
        assert isinstance(sent[0], LogsReply) and all(isinstance(m, LogsPush) for m in sent[1:])
        assert len(sent) >= 3  # the resume takes two messages, the new line one
        shown = [line["seq"] for m in sent for line in m.lines]
        assert shown == list(range(11, 42))  # after line 10: all of them, then the new one
        assert all(len(m.encode()) < session.MAX_NODE_MESSAGE_BYTES for m in sent)
        follows.pop("f1").cancel()  # logs_unfollow
    assert book.subscriptions == set() and follows == {}


async def test_the_pusher_leaves_room_in_a_full_outbox_and_skips_beyond_its_buffer(
        tmp_path: Path, autojump_clock):
    from skr8tr.core.node_protocol import LogsRequest
    from skr8tr.node import session

    book = LogBook(str(tmp_path), clock=ticking_clock())
    rlog = started(book, "web-a", "web")
    send, recv = trio.open_memory_channel(session.OUTBOX_LIMIT)
    follows: dict = {}
    async with trio.open_nursery() as nursery:
        follows["f1"] = await nursery.start(
            session._push_logs, LogsRequest(req="f1", app="web", replica=None, tail=0,
                                            follow=True), BookSupervisor(book), send, follows)
        [sub] = book.subscriptions
        sub.max_pending = 50
        for i in range(session.OUTBOX_LIMIT):  # the connection is stuck: nothing is sent
            write(rlog, f"line {i}")
            await trio.sleep(0.01)
        used = send.statistics().current_buffer_used
        assert used <= session.OUTBOX_LIMIT // 2 + 1  # half is kept for reports
        assert len(sub.pending) <= 50 and sub.skipped > 0
        nursery.cancel_scope.cancel()
    assert book.subscriptions == set()


def test_a_resumed_follow_never_resends_what_a_restarted_agent_read_back(tmp_path: Path):
    (tmp_path / "web-a.stdout").write_text("".join(f"old {i}\n" for i in range(50)))
    book = LogBook(str(tmp_path), clock=ticking_clock())  # the agent's new life
    rlog = book.open("web-a", "web")
    assert rlog.resume() == 50  # numbered 1..50 again
    write(rlog, "new 1")
    # The follow had shown 20 lines of the earlier life: none of the old ones again.
    first, _ = book.subscribe("web", None, tail=0, after={"web-a": 20}, since=0.0)
    assert [x["text"] for x in first] == ["new 1"]
