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
KEEP_FINISHED = 100
MAX_READ_BYTES = 8 * 2**20
# A "line" longer than this is cut into pieces so that a process printing
# without newlines cannot make the agent buffer without bound.
MAX_LINE_BYTES = 64 * 1024
# How much of each file (and of its rotated ``.1``) a re-adopted replica's tail
# starts from; a bounded read, once, when the agent starts.
RESUME_READ_BYTES = 2**20

LogLine = dict[str, Any]  # {"replica", "ts", "stream", "text"}


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
        for raw in pieces:
            text = raw.decode("utf-8", errors="replace").rstrip("\r")
            self.lines.append({"replica": self.replica, "ts": now, "stream": stream, "text": text})
        return len(pieces)

    def _rotate(self, stream: str) -> None:
        path = self.paths[stream]
        shutil.copyfile(path, path + ".1")
        os.truncate(path, 0)
        self._offset[stream] = 0
        log.info("replica %s: rotated %s into %s.1", self.replica, path, path)


class LogBook:
    """The tails of the live replicas and of the last ``keep_finished`` finished ones."""

    def __init__(self, logs_dir: str, *, keep_finished: int = KEEP_FINISHED,
                 max_lines: int = TAIL_LINES, rotate_bytes: int = ROTATE_BYTES,
                 clock: Callable[[], float] = time.time) -> None:
        self.logs_dir = logs_dir
        self.keep_finished = keep_finished
        self._max_lines = max_lines
        self._rotate_bytes = rotate_bytes
        self._clock = clock
        self._live: dict[str, ReplicaLog] = {}
        self._finished: OrderedDict[str, ReplicaLog] = OrderedDict()

    def open(self, replica: str, app: str) -> ReplicaLog:
        """A fresh log for a replica that is about to start (replacing any older one)."""
        self._finished.pop(replica, None)
        rlog = ReplicaLog(replica, app, self.logs_dir, max_lines=self._max_lines,
                          rotate_bytes=self._rotate_bytes, clock=self._clock)
        self._live[replica] = rlog
        return rlog

    def finish(self, rlog: ReplicaLog) -> None:
        """The replica is gone: keep its tail among the last ``keep_finished``."""
        if self._live.get(rlog.replica) is rlog:
            del self._live[rlog.replica]
        self._finished[rlog.replica] = rlog
        self._finished.move_to_end(rlog.replica)
        while len(self._finished) > self.keep_finished:
            self._finished.popitem(last=False)

    def tail(self, app: str, replica: str | None, count: int) -> list[LogLine]:
        """The last *count* lines of *app*'s replicas (or of one of them), oldest first."""
        logs: Iterable[ReplicaLog] = [*self._live.values(), *self._finished.values()]
        chosen = [rl for rl in logs
                  if rl.app == app and (replica is None or rl.replica == replica)]
        merged = heapq.merge(*(list(rl.lines) for rl in chosen), key=lambda line: line["ts"])
        return list(deque(merged, maxlen=max(0, count)))


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
