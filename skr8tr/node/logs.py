"""Replica output: files the process writes to directly, and a tail kept in memory.

A replica's stdout and stderr are ``<logs-dir>/<replica>.stdout`` / ``.stderr``,
opened with ``O_APPEND`` and handed to the process itself, never a pipe: the
workload must not depend on the agent staying alive. A tailer reads the new
complete lines of both files every :data:`TAIL_INTERVAL_S` into a bounded
deque, and rotates a file that grew past :data:`ROTATE_BYTES` by copy-truncate
into ``<file>.1`` (``O_APPEND`` makes the writer continue at the new end).

Copy-truncate has the usual window: lines written between the copy and the
truncate are lost, and lines written between the tailer's last read and the
copy are in ``<file>.1`` but not in the in-memory tail.

Every line carries ``seq``: its number in its replica's output as this agent
read it (1, 2, ...; a replica launched again under the same id goes on from
its last number; a restarted agent starts again at 1). A follower of the logs
(:class:`LogSubscription`, ``logs --follow``) gets every line the tailer reads,
in order, pushed into a bounded buffer: when it does not keep up, lines are
counted as skipped instead of kept.

Files are bounded by count: the files of at most ``keep_files_per_app``
(``skr8tr node --keep-logs``, default :data:`KEEP_FILES_PER_APP`) finished replicas
per app stay on disk (older ones are removed as later ones
finish), and :meth:`LogBook.forget_app` removes every file of an app that is
gone (``down``).

A restarted agent that re-adopts a replica starts its tail from the end of
the files already on disk (:meth:`ReplicaLog.resume`); those lines carry the
file's modification time as their ``ts``, the best bound the file gives.

File reads here are plain blocking calls on local files, short and bounded
(at most :data:`MAX_READ_BYTES` per stream and tick), run on the Trio thread.
"""

from __future__ import annotations

import heapq
import logging
import os
import shutil
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from typing import Any

import trio

log = logging.getLogger("skr8tr.node")

STREAMS = ("stdout", "stderr")
TAIL_LINES = 2000
ROTATE_BYTES = 8 * 2**20
TAIL_INTERVAL_S = 0.25
KEEP_FINISHED = 100  # finished replicas whose tails stay in memory (all apps)
# Finished replicas per app whose files stay on disk (a crash loop must not pile up).
KEEP_FILES_PER_APP = 10  # the default of `skr8tr node --keep-logs`
# Lines a follower may have waiting before newer ones are counted as skipped.
FOLLOW_PENDING_LINES = 10_000
FOLLOW_PENDING_CHARS = 4 * 2**20  # ... or characters of text
LINE_OVERHEAD_CHARS = 64  # what a line costs beside its text (its dict, its fields)
MAX_READ_BYTES = 8 * 2**20
# A "line" longer than this is cut into pieces so that a process printing
# without newlines cannot make the agent buffer without bound.
MAX_LINE_BYTES = 64 * 1024
# How much of each file (and of its rotated ``.1``) a re-adopted replica's tail
# starts from; a bounded read, once, when the agent starts.
RESUME_READ_BYTES = 2**20

LogLine = dict[str, Any]  # {"replica", "ts", "stream", "text", "seq"}
START_ERROR_PREFIX = "skr8tr: "


class ReplicaLog:
    """The two log files of one replica and the last ``max_lines`` lines read from them."""

    def __init__(self, replica: str, app: str, logs_dir: str, *, max_lines: int = TAIL_LINES,
                 rotate_bytes: int = ROTATE_BYTES, clock: Callable[[], float] = time.time) -> None:
        self.replica = replica
        self.app = app
        self.paths = {s: os.path.join(logs_dir, f"{replica}.{s}") for s in STREAMS}
        self.lines: deque[LogLine] = deque(maxlen=max_lines)
        self.rotate_bytes = rotate_bytes
        self._clock = clock
        self._offset = dict.fromkeys(STREAMS, 0)
        self._partial = dict.fromkeys(STREAMS, b"")
        self._warned = False
        self.seq = 0  # the number of the last line read
        self.resumed_seq = 0  # the last of the lines read back from the files (resume)
        # LogBook.open sets it: told of every batch of new lines, in order
        self.listener: Callable[[ReplicaLog, list[LogLine]], None] | None = None

    def open_for_child(self) -> dict[str, int]:
        """Open both files for appending (created 0640 if missing); return ``{stream: fd}``.

        The caller hands the fds to the process and closes its copies. What the
        files held before (an earlier replica with the same id) is not read
        into the tail. Raises OSError (no fd is left open).
        """
        fds: dict[str, int] = {}
        try:
            for stream, path in self.paths.items():
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
                fds[stream] = fd
                self._offset[stream] = os.fstat(fd).st_size
        except BaseException:
            for fd in fds.values():
                os.close(fd)
            raise
        return fds

    def resume(self) -> int:
        """Load the last lines already in the files, then follow on from their end.

        For a re-adopted replica (this agent did not start it): up to
        :data:`RESUME_READ_BYTES` from the end of each file, and from its
        rotated ``.1`` when the file holds less than that, go into the tail,
        at most ``max_lines`` in all; return how many. Their ``ts`` is the
        modification time of the file they come from (none was written
        later), capped at now, so they sort before every line read
        afterwards. An unfinished last line waits for its newline as usual.
        Never raises: an unreadable file is logged and contributes nothing.
        """
        loaded: list[LogLine] = []
        now = self._clock()
        for stream in STREAMS:
            try:
                loaded.extend(self._load_stream(stream, now))
            except OSError as exc:
                log.warning("replica %s: cannot read %s: %s", self.replica,
                            self.paths[stream], exc)
        loaded.sort(key=lambda line: line["ts"])  # stable: each stream keeps its order
        kept = loaded[-self.lines.maxlen:] if self.lines.maxlen else loaded
        for line in kept:
            self.seq += 1
            line["seq"] = self.seq
        self.resumed_seq = self.seq
        self.lines.extend(kept)
        return len(kept)

    def _load_stream(self, stream: str, now: float) -> list[LogLine]:
        path = self.paths[stream]
        data, start, mtime = _read_end(path, RESUME_READ_BYTES)
        self._offset[stream] = start + len(data)
        complete = start == 0
        pieces = data.split(b"\n")
        self._partial[stream] = pieces.pop()
        if not complete and pieces:
            pieces.pop(0)  # starts in the middle of a line
        lines = self._to_lines(stream, pieces, min(mtime or now, now))
        if complete and len(data) < RESUME_READ_BYTES:
            older, older_start, older_mtime = _read_end(path + ".1",
                                                        RESUME_READ_BYTES - len(data))
            older_pieces = older.split(b"\n")
            if older_pieces and not older_pieces[-1]:
                older_pieces.pop()
            if older_start > 0 and older_pieces:
                older_pieces.pop(0)
            lines = self._to_lines(stream, older_pieces, min(older_mtime or now, now)) + lines
        return lines

    def _to_lines(self, stream: str, pieces: list[bytes], ts: float) -> list[LogLine]:
        lines = []
        for raw in pieces:
            for start in range(0, max(len(raw), 1), MAX_LINE_BYTES):
                text = raw[start:start + MAX_LINE_BYTES].decode("utf-8", errors="replace")
                lines.append({"replica": self.replica, "ts": ts, "stream": stream,
                              "text": text.rstrip("\r")})
        return lines

    def read_new(self, *, final: bool = False) -> int:
        """Read what was appended since the last call; return how many lines were added.

        Only complete lines are taken, unless *final* (the process has exited),
        which also takes a last line without its newline. Rotates a file over
        ``rotate_bytes``. Never raises: an I/O error is logged once and retried
        on the next call.
        """
        added = 0
        for stream in STREAMS:
            try:
                added += self._read_stream(stream, final)
            except OSError as exc:
                if not self._warned:
                    log.warning("replica %s: cannot read %s: %s", self.replica,
                                self.paths[stream], exc)
                    self._warned = True
        return added

    def _read_stream(self, stream: str, final: bool) -> int:
        path = self.paths[stream]
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return 0
        try:
            size = os.fstat(fd).st_size
            offset = self._offset[stream]
            if size < offset:
                # Truncated behind our back (someone else rotated it): start over.
                offset = 0
            data = b""
            if size > offset:
                data = os.pread(fd, min(size - offset, MAX_READ_BYTES), offset)
                offset += len(data)
            self._offset[stream] = offset
        finally:
            os.close(fd)
        added = self._take_lines(stream, data, final)
        if size > self.rotate_bytes:
            self._rotate(stream)
        return added

    def _take_lines(self, stream: str, data: bytes, final: bool) -> int:
        buf = self._partial[stream] + data
        pieces = buf.split(b"\n")
        rest = pieces.pop()
        if final and rest:
            pieces.append(rest)
            rest = b""
        while len(rest) > MAX_LINE_BYTES:
            pieces.append(rest[:MAX_LINE_BYTES])
            rest = rest[MAX_LINE_BYTES:]
        self._partial[stream] = rest
        if not pieces:
            return 0
        now = self._clock()
        new = []
        for raw in pieces:
            self.seq += 1
            text = raw.decode("utf-8", errors="replace").rstrip("\r")
            new.append({"replica": self.replica, "ts": now, "stream": stream, "text": text,
                        "seq": self.seq})
        self.lines.extend(new)
        if self.listener is not None:
            self.listener(self, new)
        return len(pieces)

    def note_start_error(self, exec_path: str, error: str) -> None:
        """Say in the stderr log why the process could not start (one line, also in the
        tail and pushed to followers): ``skr8tr: cannot start PATH: ERROR``.

        Appended to the file (created if missing) so that it is on disk like the
        process's own output; if even that fails, the line is in the tail only.
        Never raises.
        """
        text = f"{START_ERROR_PREFIX}cannot start {exec_path}: {error}"
        data = text.encode("utf-8", errors="replace")[:MAX_LINE_BYTES - 1] + b"\n"
        try:
            fd = os.open(self.paths["stderr"],
                         os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
            try:
                # Read from here on: what an earlier replica with this id wrote is not ours.
                self._offset["stderr"] = os.fstat(fd).st_size
                self._partial["stderr"] = b""
                os.write(fd, data)
            finally:
                os.close(fd)
            self._read_stream("stderr", final=True)
        except OSError as exc:
            log.warning("replica %s: cannot write its start error to %s: %s", self.replica,
                        self.paths["stderr"], exc)
            self._partial["stderr"] = b""
            self._take_lines("stderr", data, final=True)

    def remove_files(self) -> None:
        """Remove the replica's log files and their rotated ``.1`` (missing ones are
        fine). Never raises: a file that cannot be removed is logged."""
        for path in self.paths.values():
            for name in (path, path + ".1"):
                try:
                    os.remove(name)
                except FileNotFoundError:
                    continue  # already gone: nothing to do
                except OSError as exc:
                    log.warning("replica %s: cannot remove %s: %s", self.replica, name, exc)

    def _rotate(self, stream: str) -> None:
        path = self.paths[stream]
        shutil.copyfile(path, path + ".1")
        os.truncate(path, 0)
        self._offset[stream] = 0
        log.info("replica %s: rotated %s into %s.1", self.replica, path, path)


class LogSubscription:
    """A follower of an app's (or one replica's) new lines: a bounded buffer.

    :meth:`LogBook.subscribe` creates it; the tailer :meth:`offer` s every
    new line of a matching replica, in the order read. When ``max_pending``
    lines, or ``max_pending_chars`` characters of text, wait already, further
    ones are only counted in ``skipped`` (the follower is told how many it
    lost): memory stays bounded whoever reads, or fails to read, the other end.
    """

    def __init__(self, app: str, replica: str | None, *,
                 max_pending: int = FOLLOW_PENDING_LINES,
                 max_pending_chars: int = FOLLOW_PENDING_CHARS) -> None:
        self.app = app
        self.replica = replica
        self.pending: deque[LogLine] = deque()
        self.pending_chars = 0
        self.skipped = 0
        self.max_pending = max_pending
        self.max_pending_chars = max_pending_chars
        self._ready = trio.Event()

    def matches(self, rlog: ReplicaLog) -> bool:
        return rlog.app == self.app and (self.replica is None or rlog.replica == self.replica)

    def offer(self, lines: list[LogLine]) -> None:
        for line in lines:
            size = len(line["text"]) + LINE_OVERHEAD_CHARS
            # Once lines are skipped, all are until the reader has caught up: what it
            # gets is a run of lines, one "N skipped", and the lines after them.
            if (self.skipped or len(self.pending) >= self.max_pending
                    or self.pending_chars + size > self.max_pending_chars):
                self.skipped += 1
                continue
            self.pending.append(line)
            self.pending_chars += size
        self._ready.set()

    async def next_batch(self, max_lines: int) -> tuple[list[LogLine], int]:
        """Wait for new lines (or skipped ones); return up to *max_lines* of them, oldest
        first, and how many lines were skipped right after them (non-zero only once
        the batch empties the buffer; counted once). Cancellable."""
        while not self.pending and not self.skipped:
            self._ready = trio.Event()
            await self._ready.wait()
        count = min(max_lines, len(self.pending))
        batch = [self.pending.popleft() for _ in range(count)]
        self.pending_chars -= sum(len(line["text"]) + LINE_OVERHEAD_CHARS for line in batch)
        skipped = 0
        if not self.pending:
            skipped, self.skipped = self.skipped, 0
        return batch, skipped


class LogBook:
    """The tails of the live replicas and of the last ``keep_finished`` finished ones;
    the log files of the last ``keep_files_per_app`` finished replicas of each app;
    the followers of new lines."""

    def __init__(self, logs_dir: str, *, keep_finished: int = KEEP_FINISHED,
                 keep_files_per_app: int = KEEP_FILES_PER_APP,
                 max_lines: int = TAIL_LINES, rotate_bytes: int = ROTATE_BYTES,
                 clock: Callable[[], float] = time.time) -> None:
        self.logs_dir = logs_dir
        self.keep_finished = keep_finished
        self.keep_files_per_app = keep_files_per_app
        self._max_lines = max_lines
        self._rotate_bytes = rotate_bytes
        self._clock = clock
        self._live: dict[str, ReplicaLog] = {}
        self._finished: OrderedDict[str, ReplicaLog] = OrderedDict()
        # app -> finished replicas whose files are still on disk, oldest first
        self._files: dict[str, OrderedDict[str, ReplicaLog]] = {}
        self._gone: set[str] = set()  # apps forgotten while replicas of theirs still ran
        self.subscriptions: set[LogSubscription] = set()

    def open(self, replica: str, app: str) -> ReplicaLog:
        """A fresh log for a replica that is about to start (replacing any older one).

        A replica id seen before goes on numbering its lines from where it was."""
        earlier = self._finished.pop(replica, None) or self._live.get(replica)
        kept = self._files.get(app)
        if kept is not None:
            kept.pop(replica, None)
        self._gone.discard(app)
        rlog = ReplicaLog(replica, app, self.logs_dir, max_lines=self._max_lines,
                          rotate_bytes=self._rotate_bytes, clock=self._clock)
        if earlier is not None:
            rlog.seq = earlier.seq
        rlog.listener = self._dispatch
        self._live[replica] = rlog
        return rlog

    def finish(self, rlog: ReplicaLog) -> None:
        """The replica is gone: keep its tail among the last ``keep_finished``, and its
        files among the last ``keep_files_per_app`` of its app (none if the app is gone)."""
        if self._live.get(rlog.replica) is rlog:
            del self._live[rlog.replica]
        self._finished[rlog.replica] = rlog
        self._finished.move_to_end(rlog.replica)
        while len(self._finished) > self.keep_finished:
            self._finished.popitem(last=False)
        if rlog.replica in self._live:
            return  # launched again under the same id: the files are the new one's
        if rlog.app in self._gone:
            rlog.remove_files()
            self._drop_gone(rlog.app)
            return
        kept = self._files.setdefault(rlog.app, OrderedDict())
        kept[rlog.replica] = rlog
        kept.move_to_end(rlog.replica)
        while len(kept) > self.keep_files_per_app:
            _, old = kept.popitem(last=False)
            old.remove_files()

    def forget_app(self, app: str) -> int:
        """*app* is gone: remove the files of its finished replicas now, and those of
        its live ones as they finish; drop their tails. Returns how many replicas'
        files were removed now. Never raises."""
        kept = self._files.pop(app, OrderedDict())
        for rlog in kept.values():
            rlog.remove_files()
        for replica in [r for r, rl in self._finished.items() if rl.app == app]:
            del self._finished[replica]
        if any(rl.app == app for rl in self._live.values()):
            self._gone.add(app)
        return len(kept)

    def forgetting(self, app: str) -> bool:
        """Whether *app* is gone but replicas of it still run (their files go when they end)."""
        return app in self._gone

    def _drop_gone(self, app: str) -> None:
        if not any(rl.app == app for rl in self._live.values()):
            self._gone.discard(app)
            for replica in [r for r, rl in self._finished.items() if rl.app == app]:
                del self._finished[replica]

    def sweep_leftovers(self, app_of: Callable[[str], str | None]) -> int:
        """Take in the files left in ``logs_dir`` by replicas this agent does not run
        (an earlier life of the agent): they count, oldest first by modification
        time, towards their app's ``keep_files_per_app`` (*app_of* names a replica's
        app, None: unknown, left alone). Returns how many replicas' files were
        removed. Never raises."""
        try:
            names = os.listdir(self.logs_dir)
        except OSError as exc:
            log.warning("cannot list %s: %s", self.logs_dir, exc)
            return 0
        found: dict[str, float] = {}
        for name in names:
            base = name[:-2] if name.endswith(".1") else name
            replica, dot, stream = base.rpartition(".")
            if not dot or stream not in STREAMS or replica in self._live:
                continue
            try:
                mtime = os.stat(os.path.join(self.logs_dir, name)).st_mtime
            except OSError:
                continue
            found[replica] = max(found.get(replica, 0.0), mtime)
        removed = 0
        for replica, _ in sorted(found.items(), key=lambda item: item[1]):
            app = app_of(replica)
            if app is None:
                continue
            rlog = ReplicaLog(replica, app, self.logs_dir, max_lines=0)
            kept = self._files.setdefault(app, OrderedDict())
            kept[replica] = rlog
            while len(kept) > self.keep_files_per_app:
                _, old = kept.popitem(last=False)
                old.remove_files()
                removed += 1
        return removed

    def files_kept(self, app: str) -> list[str]:
        """The finished replicas of *app* whose files are still on disk, oldest first."""
        return list(self._files.get(app, ()))

    def tail(self, app: str, replica: str | None, count: int) -> list[LogLine]:
        """The last *count* lines of *app*'s replicas (or of one of them), oldest first."""
        if count <= 0:
            return []
        merged = heapq.merge(*(list(rl.lines) for rl in self._chosen(app, replica)),
                             key=lambda line: line["ts"])
        return list(deque(merged, maxlen=count))

    def _chosen(self, app: str, replica: str | None) -> list[ReplicaLog]:
        logs: Iterable[ReplicaLog] = [*self._live.values(), *self._finished.values()]
        return [rl for rl in logs if rl.app == app and (replica is None or rl.replica == replica)]

    def subscribe(self, app: str, replica: str | None, *, tail: int,
                  after: dict[str, int] | None = None, since: float | None = None,
                  max_pending: int = FOLLOW_PENDING_LINES
                  ) -> tuple[list[LogLine], LogSubscription]:
        """Start following *app* (or one *replica*): the lines to show first, and the
        subscription that gets every line read from now on (both at once: no line
        falls between them, none is in both).

        The first lines are the last *tail* ones; or, with *after* (a resumed
        follow: replica -> the last ``seq`` already shown), the lines kept in
        memory after those, and for a replica not in *after* those with ``ts``
        at or after *since*. Line numbers restart with the agent: of a replica
        re-adopted after an agent restart, the lines read back from its files
        are never resent (they may have been shown), so a follow resumed then
        misses what it wrote while no agent ran (``logs`` still has it).
        Call :meth:`unsubscribe` when done.
        """
        if after is None:
            first = self.tail(app, replica, tail)
        else:
            def wanted(rl: ReplicaLog) -> list[LogLine]:
                last = after.get(rl.replica)
                if last is None:
                    return [x for x in rl.lines if since is None or x["ts"] >= since]
                # Numbers start again when the agent restarts: what it read back from
                # the files then may have been shown already, so it is never resent.
                return [x for x in rl.lines if x["seq"] > max(last, rl.resumed_seq)]

            first = list(heapq.merge(*(wanted(rl) for rl in self._chosen(app, replica)),
                                     key=lambda line: line["ts"]))
        sub = LogSubscription(app, replica, max_pending=max_pending)
        self.subscriptions.add(sub)
        return first, sub

    def unsubscribe(self, sub: LogSubscription) -> None:
        self.subscriptions.discard(sub)

    def _dispatch(self, rlog: ReplicaLog, lines: list[LogLine]) -> None:
        for sub in self.subscriptions:
            if sub.matches(rlog):
                sub.offer(lines)


def _read_end(path: str, limit: int) -> tuple[bytes, int, float | None]:
    """The last *limit* bytes of *path*, the offset they start at, and its mtime.

    A missing file is ``(b"", 0, None)``. Raises OSError otherwise.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return b"", 0, None
    try:
        st = os.fstat(fd)
        start = max(0, st.st_size - limit)
        chunks = []
        offset = start
        while offset < st.st_size:
            chunk = os.pread(fd, st.st_size - offset, offset)
            if not chunk:
                break
            chunks.append(chunk)
            offset += len(chunk)
        return b"".join(chunks), start, st.st_mtime
    finally:
        os.close(fd)


async def run_tailer(rlog: ReplicaLog, interval_s: float = TAIL_INTERVAL_S) -> None:
    """Read *rlog*'s new lines every *interval_s* until cancelled. Never returns otherwise."""
    while True:
        rlog.read_new()
        await trio.sleep(interval_s)
