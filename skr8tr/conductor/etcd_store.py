"""``--store etcd://...``: the :class:`~skr8tr.conductor.store.Store` kept in etcd.

Layout under the prefix (default ``/skr8tr``, so that clusters can share one etcd):

- ``PREFIX/apps/NAME``: one app as JSON, with the fields the state file keeps
  for it (generation, desired, completed, given_up, revisions, history);
- ``PREFIX/rollouts/NAME``: that app's last rollout status as JSON (the fields
  of ``rollout status --json``);
- ``PREFIX/placement_key``: the secret of the placement tokens (64 hex digits).

Other keys under the prefix (the leader key, nonces) are not the store's.

:meth:`EtcdStore.apply` writes a whole :class:`~skr8tr.conductor.store.Change` as
one etcd transaction, so that it is all there or none of it is. It may carry a
*fence*: compares that must hold for the transaction to run, such as "the leader
key still holds my URL and was created at my term". When the fence no longer
holds nothing is written and :class:`FenceLost` is raised: the writer is no
longer the leader and must step down.

Reading trusts nothing, as for the state file: every value is checked by the
same rules (:mod:`skr8tr.conductor.state_file`), and a value that breaks one
raises :class:`StoredValueError` naming its key and what was expected.
"""

from __future__ import annotations

import collections
import json
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import trio

from skr8tr.conductor import state_file
from skr8tr.conductor.etcd_client import Compare, Delete, EtcdClient, EtcdError, Get, KeyValue, Put
from skr8tr.conductor.state_file import StateFileError, StoredApp, StoredState
from skr8tr.conductor.store import (
    EMPTY,
    Change,
    FenceLost,
    StoreError,
    StoreOutcomeUnknown,
    StoreUnavailable,
)

__all__ = ["EtcdStore", "FenceLost", "StoredValueError"]

log = logging.getLogger("skr8tr.conductor")


MAX_BATCH_OPS = 120  # etcd's default --max-txn-ops is 128; the fence takes 2


class _Pending:
    """One change waiting in the group commit, and how it ended."""

    def __init__(self, change: Change, fence: tuple[Compare, ...]) -> None:
        self.change = change
        self.fence = fence
        self.size = 2 * len(change.apps) + len(change.rollouts) + 1
        self.woken = trio.Event()  # its batch was written, or it is its turn to write
        self.finished = False
        self.error: StoreError | None = None

    def finish(self, error: StoreError | None) -> None:
        self.finished, self.error = True, error
        self.woken.set()

    def finish_if_unfinished(self, error: StoreError) -> None:
        if not self.finished:
            self.finish(error)


class StoredValueError(StoreError, StateFileError):
    """A value in etcd breaks the state's rules; the message names the key."""


class EtcdStore:
    def __init__(self, client: EtcdClient, prefix: str = "/skr8tr", *,
                 fence: Callable[[], Sequence[Compare]] | None = None) -> None:
        prefix = prefix.rstrip("/")
        if not prefix.startswith("/"):
            raise ValueError(f"store prefix {prefix!r} must start with /")
        self.client = client
        self.prefix = prefix
        self.fence = fence  # the compares every apply carries (a leader's: its leadership)
        self._queue: collections.deque[_Pending] = collections.deque()
        self._writing = False  # a waiter is writing a batch; the next one waits its turn
        self.revision = 0  # the etcd revision of the last state this store read or wrote

    # ------------------------------------------------------------ keys

    def app_key(self, name: str) -> str:
        return f"{self.prefix}/apps/{name}"

    def rollout_key(self, name: str) -> str:
        return f"{self.prefix}/rollouts/{name}"

    @property
    def placement_key_key(self) -> str:
        return f"{self.prefix}/placement_key"

    # ------------------------------------------------------------ the Store interface

    async def load(self) -> StoredState | None:
        """The stored state (None when no key of it exists), read at one etcd revision.

        Raises StoredValueError naming the first key that breaks a rule, StoreError when
        etcd cannot be read.
        """
        state, _raw = await self._read()
        return state

    async def apply(self, change: Change, fence: Sequence[Compare] = ()) -> None:
        """Write ``change`` in one transaction that runs only while ``fence`` holds (by
        default the store's ``fence()``).

        Returns once etcd has committed it. Raises FenceLost when the fence does not hold,
        StoreUnavailable when etcd cannot be reached, StoreError when it refuses
        (a rollout status for an app neither stored nor written by the change); nothing
        of the change is kept in any of these cases. StoreOutcomeUnknown when etcd did
        not answer after the request was sent: it may have been kept.

        Group commit: changes that arrive while a transaction is under way are written
        together by the next one (at most MAX_BATCH_OPS operations), so that N commands
        in flight cost about two etcd commits, not N. A batch that etcd refuses for one
        change's compare is written again change by change, so that the others are kept.
        """
        # A cancelled caller (a deposed term's shutdown flush past its bound) queues
        # nothing: the write below is shielded once it has begun.
        await trio.lowlevel.checkpoint_if_cancelled()
        pending = _Pending(change, tuple(fence))
        self._queue.append(pending)
        try:
            while not pending.finished:
                if not self._writing:
                    await self._write_next_batch()
                else:
                    await pending.woken.wait()
                    pending.woken = trio.Event()
        finally:
            if not pending.finished and pending in self._queue:
                self._queue.remove(pending)  # cancelled while waiting: never sent
                if self._queue and not self._writing:
                    self._queue[0].woken.set()  # it may have been woken to write: pass it on
        if pending.error is not None:
            raise pending.error

    async def _write_next_batch(self) -> None:
        """Take the queue's head (what fits in one transaction) and write it; then wake the
        next waiter, which writes the rest."""
        self._writing = True
        batch: list[_Pending] = []
        try:
            ops = 0
            while self._queue and (not batch or ops + self._queue[0].size <= MAX_BATCH_OPS):
                head = self._queue[0]
                if batch and head.fence != batch[0].fence:
                    break  # another fence (a test's explicit one): a batch of its own
                batch.append(self._queue.popleft())
                ops += head.size
            # Shielded: a cancelled writer would leave the others of its batch not knowing
            # whether they were written; etcd's answer is bounded by the client's timeout.
            with trio.CancelScope(shield=True):
                await self._write_batch(batch)
        finally:
            self._writing = False
            for p in batch:
                p.finish_if_unfinished(StoreUnavailable("not written: the write was cut "
                                                        "short"))
            if self._queue:
                self._queue[0].woken.set()

    async def _write_batch(self, batch: list[_Pending]) -> None:
        fence = list(batch[0].fence) or (list(self.fence()) if self.fence is not None else [])
        compare = list(fence)
        ops: dict[str, Put | Delete] = {}
        for p in batch:
            p_compare, p_ops = self._operations(p.change)
            compare += p_compare
            ops.update(p_ops)  # a later change of the same key wins: it is newer
        try:
            result = await self.client.txn(compare, list(ops.values()))
            if result.succeeded:
                self.revision = max(self.revision, result.revision)
                for p in batch:
                    p.finish(None)
                return
            held = await self.client.txn(fence, []) if fence else None
        except EtcdError as exc:
            for p in batch:
                p.finish(StoreOutcomeUnknown(f"etcd may or may not have written it: {exc}")
                         if exc.sent else StoreUnavailable(f"not written to etcd: {exc}"))
            return
        if held is not None and not held.succeeded:
            for p in batch:
                p.finish(FenceLost(f"not written: this conductor no longer leads (the "
                                   f"leadership fence under {self.prefix} failed)"))
            return
        if len(batch) == 1:
            missing = sorted(n for n in batch[0].change.rollouts
                             if n not in batch[0].change.apps)
            batch[0].finish(StoreError(f"not written: a rollout status for app(s) "
                                       f"{', '.join(missing)} that are not stored"))
            return
        for p in batch:  # one change's compare failed: find it, keep the others
            await self._write_batch([p])

    def _operations(self, change: Change) -> tuple[list[Compare], dict[str, Put | Delete]]:
        """The compares (beyond the fence) and operations that write ``change``."""
        ops: dict[str, Put | Delete] = {}
        compare: list[Compare] = []
        for name, app in change.apps.items():
            if app is None:
                ops[self.app_key(name)] = Delete(self.app_key(name))
                ops[self.rollout_key(name)] = Delete(self.rollout_key(name))
            else:
                ops[self.app_key(name)] = Put(self.app_key(name), encode_app(app))
        for name, status in change.rollouts.items():
            if change.apps.get(name, False) is None:
                continue  # a removed app's last rollout goes with it
            if status is None:
                ops[self.rollout_key(name)] = Delete(self.rollout_key(name))
                continue
            if name not in change.apps:  # as merged(): no rollout without its app
                compare.append(Compare.exists(self.app_key(name)))
            ops[self.rollout_key(name)] = Put(self.rollout_key(name),
                                              json.dumps(status).encode())
        if change.placement_key is not None:
            ops[self.placement_key_key] = Put(self.placement_key_key,
                                              change.placement_key.encode())
        return compare, ops

    def watch(self) -> AsyncIterator[StoredState]:
        """The whole state after each change to it committed after the last revision this
        store read or wrote (or, when it has done neither, after the first ``anext``): one
        state per transaction, in order. A follower's view of the leader's writes.

        Raises StoredValueError for a value that breaks a rule, StoreError when etcd
        goes away (watch again to go on).
        """
        return self._follow(self.revision)

    # ------------------------------------------------------------ reading

    async def _read(self, revision: int | None = None
                    ) -> tuple[StoredState | None, dict[str, bytes]]:
        try:
            if revision is None:
                result = await self.client.txn([], [
                    Get(self.prefix + "/apps/", prefix=True),
                    Get(self.prefix + "/rollouts/", prefix=True),
                    Get(self.placement_key_key)])
                kvs: list[KeyValue] = [kv for found in result.ranges for kv in found]
                read_at = result.revision
            else:
                kvs, read_at = await self.client.get(self.prefix + "/", prefix=True,
                                                     revision=revision)
                read_at = revision
        except EtcdError as exc:
            raise StoreUnavailable(f"cannot read the state from etcd: {exc}") from None
        raw = {kv.key: kv.value for kv in kvs if self._is_state_key(kv.key)}
        self.revision = max(self.revision, read_at)
        return self.decode(raw), raw

    def _is_state_key(self, key: str) -> bool:
        return (key.startswith((self.prefix + "/apps/", self.prefix + "/rollouts/"))
                or key == self.placement_key_key)

    async def _follow(self, after: int) -> AsyncIterator[StoredState]:
        if after == 0:
            _state, raw = await self._read()
            after = self.revision
        else:
            _state, raw = await self._read(after)
        try:
            async with self.client.watch(self.prefix + "/", prefix=True,
                                         start_revision=after + 1) as batches:
                async for events in batches:
                    touched = False
                    for event in events:
                        if not self._is_state_key(event.kv.key):
                            continue
                        touched = True
                        if event.kind == "DELETE":
                            raw.pop(event.kv.key, None)
                        else:
                            raw[event.kv.key] = event.kv.value
                    if touched:
                        yield self.decode(raw) or EMPTY
        except EtcdError as exc:
            raise StoreError(f"lost the watch of the state in etcd: {exc}") from None

    def decode(self, raw: dict[str, bytes]) -> StoredState | None:
        """The state held by the raw values of its keys (None when there is none).
        Raises StoredValueError naming the first key that breaks a rule."""
        if not raw:
            return None
        apps: dict[str, Any] = {}
        rollouts: list[Any] = []
        rollout_keys: list[str] = []
        doc: dict[str, Any] = {"version": state_file.STATE_VERSION, "apps": apps,
                               "rollouts": rollouts}
        for key in sorted(raw):
            if key == self.placement_key_key:
                try:
                    doc["placement_key"] = raw[key].decode("ascii")
                except UnicodeDecodeError:
                    raise StoredValueError(f"etcd key {key}: not 64 lowercase hex digits "
                                           "(the secret of the placement tokens)") from None
                continue
            value = _json(key, raw[key])
            if key.startswith(self.prefix + "/apps/"):
                apps[key.removeprefix(self.prefix + "/apps/")] = value
                continue
            name = key.removeprefix(self.prefix + "/rollouts/")
            if not isinstance(value, dict) or value.get("app") != name:
                raise StoredValueError(f"etcd key {key}: expected a rollout status object "
                                       f"whose app is {name!r}")
            rollouts.append(value)
            rollout_keys.append(key)
        return _Checker(self, rollout_keys).state(doc)


def encode_app(app: StoredApp) -> bytes:
    """One app's value: the fields the state file keeps for it, as JSON."""
    doc = state_file.to_document(StoredState(apps=(app,), rollouts=()))
    return json.dumps(doc["apps"][app.name], separators=(",", ":")).encode()


def _json(key: str, value: bytes) -> Any:
    def no_constant(name: str) -> Any:
        raise ValueError(f"{name} is not a number")

    try:
        return json.loads(value.decode("utf-8"), parse_constant=no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise StoredValueError(f"etcd key {key}: not JSON ({exc})") from None


class _Checker(state_file._Checker):
    """The state file's rules, with each error placed at the etcd key that broke it (and
    the field inside its JSON value) instead of a line and column."""

    def __init__(self, store: EtcdStore, rollout_keys: list[str]) -> None:
        super().__init__(store.prefix, "")
        self.store = store
        self.rollout_keys = rollout_keys

    def fail(self, where: state_file.Path, message: str, *, at_key: bool = False
             ) -> StateFileError:
        if where[:1] == ("apps",) and len(where) >= 2:
            key, inside = self.store.app_key(str(where[1])), where[2:]
        elif where[:1] == ("rollouts",) and len(where) >= 2 and isinstance(where[1], int):
            key, inside = self.rollout_keys[where[1]], where[2:]
        elif where[:1] == ("placement_key",):
            key, inside = self.store.placement_key_key, ()
        else:
            key, inside = self.store.prefix, where
        field = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in inside)
        return StoredValueError(f"etcd key {key}{' field ' + field.lstrip('.') if field else ''}"
                                f": {message}")
