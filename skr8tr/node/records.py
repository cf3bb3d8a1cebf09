"""Replica records: ``<data-dir>/replicas/<replica>.json``, one per running replica.

A record is written when a replica starts, rewritten when its reported state
changes (``state``: running, ready or unhealthy), and removed when it has
exited, so that a restarted agent can find the processes it left running (pid
and start time both have to match before anything is re-adopted, see
:mod:`skr8tr.node.adopt`).

A record holds: ``version`` (1), ``replica``, ``app``, ``generation``,
``pid``, ``create_time`` (the process start time from psutil, None if it was
gone before it could be read), ``port``, ``host``, ``stdout``/``stderr`` (the
log files), ``started`` (when the agent spawned it), ``state`` and
``launch`` (the fields of the ``launch`` message, to resume its health check,
and with its optional ``slot`` the slot and restart count a restarted conductor
takes back; a record from before that field has none and loads as it did).

The supervisor never writes on its event loop: a write is two fsyncs (the
file, then the folder), ~4 ms on a plain disk, and a replica's report to the
conductor must not wait for them. :class:`RecordWriter` takes the records as
they change and writes them in a worker thread, in order, the latest version
of each replica's record winning, with one folder fsync per batch. A report
can therefore reach the conductor a few milliseconds before its record is on
disk; an agent killed in that window leaves the replica unrecorded, exactly as
one killed between the spawn and the first write always did.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from typing import Any

import trio

from skr8tr.atomic import fsync_folder, write_atomically

log = logging.getLogger("skr8tr.node")


def record_path(records_dir: str, replica: str) -> str:
    return os.path.join(records_dir, f"{replica}.json")


def encode_record(record: dict[str, Any]) -> bytes:
    return (json.dumps(record, indent=2, sort_keys=True) + "\n").encode()


def write_record(records_dir: str, replica: str, record: dict[str, Any]) -> None:
    """Write *record* atomically: temporary file, fsync, rename, fsync of the folder.

    A crash leaves either the old record or the new one, never a torn file.
    Raises OSError (the temporary file is removed).
    """
    write_atomically(record_path(records_dir, replica), encode_record(record))


def remove_record(records_dir: str, replica: str) -> None:
    """Remove a replica's record; a missing record is fine. Raises OSError otherwise."""
    try:
        os.unlink(record_path(records_dir, replica))
    except FileNotFoundError:
        return
    fsync_folder(records_dir)


def read_records(records_dir: str) -> list[tuple[str, dict[str, Any] | str]]:
    """Every record in *records_dir*, sorted by replica id: ``(replica, record)``.

    A record that cannot be read or is not a JSON object comes back as
    ``(replica, reason)`` instead. Temporary files left by a crash in the
    middle of :func:`write_record` are removed. Raises OSError only when the
    folder cannot be listed.
    """
    found: list[tuple[str, dict[str, Any] | str]] = []
    for name in sorted(os.listdir(records_dir)):
        path = os.path.join(records_dir, name)
        if name.startswith("."):
            if name.endswith(".tmp"):
                with contextlib.suppress(OSError):
                    os.unlink(path)
            continue
        if not name.endswith(".json"):
            continue
        replica = name[: -len(".json")]
        try:
            with open(path, "rb") as f:
                record = json.loads(f.read())
        except (OSError, ValueError, RecursionError) as exc:
            found.append((replica, f"unreadable record {path}: {exc}"))
            continue
        if not isinstance(record, dict):
            found.append((replica, f"record {path} is not a JSON object"))
            continue
        found.append((replica, record))
    return found


class RecordWriter:
    """Writes and removes replica records in a worker thread, off the event loop.

    :meth:`put` never blocks: it encodes the record at once (so later changes
    to the dict do not leak into this write) and queues it; a later
    :meth:`put` for the same replica replaces a queued one. :meth:`run` (a
    task) writes what is queued, batch by batch, in order of first queueing,
    with one folder fsync per batch. :meth:`flush` waits until everything
    queued before it is on disk. A failed write is logged and the record
    dropped; the writer goes on (as the synchronous writes did before it).
    """

    def __init__(self, records_dir: str) -> None:
        self.records_dir = records_dir
        self._queued: dict[str, bytes | None] = {}  # replica -> record bytes, None = remove
        self._wake = trio.Event()
        self._lock = trio.Lock()  # one batch at a time, so batches land in order

    def put(self, replica: str, record: dict[str, Any] | None) -> None:
        """Queue *record* for *replica*, or its removal when *record* is None."""
        self._queued[replica] = None if record is None else encode_record(record)
        self._wake.set()

    async def run(self) -> None:
        """Write queued records until cancelled (a batch under way is finished first)."""
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            while self._queued:
                await self._write_batch()

    async def flush(self) -> None:
        """Write everything queued now; returns when it is on disk (or failed and logged).

        Safe to call whether or not :meth:`run` is running (after the writer's
        task is gone, the caller's task does the writing).
        """
        await self._write_batch()  # also waits for a batch the writer task has under way
        while self._queued:
            await self._write_batch()

    async def _write_batch(self) -> None:
        async with self._lock:
            batch, self._queued = self._queued, {}
            if batch:
                # Shielded: a batch taken from the queue is written (or its failure
                # logged) even when the writer is being cancelled, never dropped.
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(self._apply, batch)

    def _apply(self, batch: dict[str, bytes | None]) -> None:
        changed = False
        for replica, data in batch.items():
            try:
                if data is None:
                    try:
                        os.unlink(record_path(self.records_dir, replica))
                    except FileNotFoundError:
                        continue
                else:
                    write_atomically(record_path(self.records_dir, replica), data,
                                     sync_folder=False)  # once for the batch, below
                changed = True
            except OSError as exc:
                log.error("replica %s: cannot %s its record in %s: %s", replica,
                          "remove" if data is None else "write", self.records_dir, exc)
        if changed:
            try:
                fsync_folder(self.records_dir)
            except OSError as exc:
                log.error("cannot fsync the replica records folder %s: %s",
                          self.records_dir, exc)

