"""``--state FILE``: the :class:`~skr8tr.conductor.store.Store` kept in one TOML file.

Each write replaces the whole file atomically (a temporary file in the same
folder, fsync, rename, fsync of the folder: :mod:`skr8tr.conductor.state_file`)
in a worker thread, so that the event loop — node heartbeats, reads, the
status page — goes on while the disk works.

Group commit: the first :meth:`FileStore.apply` that finds no write under way
writes every change queued so far in one go; changes that arrive meanwhile
wait for that write to end and are then written together by one of them. One
client pays one write per change; many clients share writes. A write that
fails fails every change it carried (:class:`~skr8tr.conductor.store.StoreError`)
and leaves the file, and the state the next write starts from, as they were.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import trio

from skr8tr.conductor import state_file
from skr8tr.conductor.state_file import StoredState
from skr8tr.conductor.store import EMPTY, Change, StoreError, Watchers, merged

log = logging.getLogger("skr8tr.conductor")


@dataclass(eq=False)
class _Pending:
    change: Change
    done: bool = False
    error: StoreError | None = None


class FileStore:
    def __init__(self, path: str) -> None:
        self.path = path
        self.writes = 0  # files written (each carries one or more changes)
        self.changes = 0  # changes made durable
        self._durable: StoredState = EMPTY
        self._loaded = False
        self._queue: list[_Pending] = []
        self._writing: trio.Event | None = None
        self._watchers = Watchers()

    async def load(self) -> StoredState | None:
        """Read and check the file (StateFileError names file:line:column); None if absent."""
        stored = await trio.to_thread.run_sync(state_file.load, self.path)
        self._durable = EMPTY if stored is None else stored
        self._loaded = True
        return stored

    async def apply(self, change: Change) -> None:
        if not self._loaded:  # a write starts from what the file holds, never from nothing
            await self.load()
        pending = _Pending(change)
        self._queue.append(pending)
        while not pending.done:
            if self._writing is None:
                await self._write_queued()
            else:
                await self._writing.wait()
        if pending.error is not None:
            raise pending.error

    def watch(self) -> AsyncIterator[StoredState]:
        return self._watchers.watch()

    async def _write_queued(self) -> None:
        batch, self._queue = self._queue, []
        self._writing = written = trio.Event()
        try:
            state = self._durable
            for pending in batch:
                state = merged(state, pending.change)
            error = None
            try:
                # Not cancellable once started: the thread finishes the write either way,
                # and its outcome is recorded before anything else runs.
                await trio.to_thread.run_sync(state_file.save, self.path, state)
            except state_file.StateWriteError as exc:
                error = StoreError(str(exc))
                log.error("%s", exc)
            else:
                self._durable = state
                self.writes += 1
                self.changes += len(batch)
            for pending in batch:
                pending.done, pending.error = True, error
            if error is None:
                self._watchers.publish(state)
        finally:
            # Cancelled before the write began: its changes wait for the next writer.
            self._queue[:0] = [pending for pending in batch if not pending.done]
            self._writing = None
            written.set()
