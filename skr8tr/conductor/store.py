"""Where the conductor keeps its desired state: the :class:`Store` interface.

What is stored (:class:`~skr8tr.conductor.state_file.StoredState`): every app
with its generation, desired count, revisions and rollout history; the last
rollout status of each app; the secret of the placement tokens. Running
replicas are not stored: after a restart they come from the nodes' reports.

A conductor uses its store in three ways:

- ``await store.load()`` once at start: the state, or None when there is none yet;
- ``await store.apply(change)`` *before* a command's change takes effect in
  memory: it returns once the change is durable, or raises :class:`StoreError`
  and keeps nothing of it (the command is then refused and memory is left as it
  was). Changes submitted while a write is under way are written together by
  the next one (a group commit), so that many clients cost one write;
- ``store.watch()``: the whole state after each change the store applied (every
  writer's, this conductor's included), for what follows the store rather
  than writes it.

Implementations: :class:`MemoryStore` (no ``--state``: nothing outlives the
process) and :class:`~skr8tr.conductor.file_store.FileStore` (``--state FILE``,
TOML, written off the event loop). Both keep the same order: a change that
returned is in every state :meth:`load` or :meth:`watch` gives afterwards.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from skr8tr.conductor.state_file import StoredApp, StoredState

__all__ = ["Change", "MemoryStore", "Store", "StoreError", "merged", "Watchers"]

EMPTY = StoredState(apps=(), rollouts=())


class StoreError(Exception):
    """A change could not be made durable; nothing of it was kept. One line for people."""


class StoreUnavailable(StoreError):
    """The store did not answer (etcd unreachable); nothing was kept. The command is
    refused with ``UNAVAILABLE``: it may be sent again."""


class StoreOutcomeUnknown(StoreUnavailable):
    """The store did not answer after the change was sent: it may or may not have been
    kept. Memory can no longer be trusted to match the store."""


class FenceLost(StoreError):
    """The change's fence did not hold (this conductor no longer leads); nothing was kept."""


@dataclass(frozen=True)
class Change:
    """One atomic change: each named app (and its last rollout status) written whole, or
    removed (None); the placement secret set when given."""

    apps: Mapping[str, StoredApp | None] = field(default_factory=dict)
    rollouts: Mapping[str, dict[str, Any] | None] = field(default_factory=dict)
    placement_key: str | None = None


def merged(state: StoredState, change: Change) -> StoredState:
    """``state`` with ``change`` applied (pure)."""
    apps = {a.name: a for a in state.apps}
    for name, app in change.apps.items():
        if app is None:
            apps.pop(name, None)
        else:
            apps[name] = app
    rollouts = {r["app"]: r for r in state.rollouts}
    for name, status in change.rollouts.items():
        if status is None:
            rollouts.pop(name, None)
        else:
            rollouts[name] = status
    for name in [name for name in rollouts if name not in apps]:
        del rollouts[name]  # a removed app's last rollout goes with it
    return StoredState(
        apps=tuple(apps[name] for name in sorted(apps)),
        rollouts=tuple(rollouts[name] for name in sorted(rollouts)),
        placement_key=(state.placement_key if change.placement_key is None
                       else change.placement_key))


class Store(Protocol):
    async def load(self) -> StoredState | None: ...

    async def apply(self, change: Change) -> None: ...

    def watch(self) -> AsyncIterator[StoredState]: ...


class Watchers:
    """The states a store applied, handed to each :meth:`watch` iterator (latest wins: a
    watcher that is behind gets the newest state, never a queue of old ones)."""

    def __init__(self) -> None:
        self._version = 0
        self._state: StoredState | None = None
        self._changed = trio.Event()

    def publish(self, state: StoredState) -> None:
        self._version += 1
        self._state = state
        self._changed.set()
        self._changed = trio.Event()

    def watch(self) -> AsyncIterator[StoredState]:
        """The states published after this call (not after the first ``anext``)."""
        return self._follow(self._version)

    async def _follow(self, seen: int) -> AsyncIterator[StoredState]:
        while True:
            if self._version == seen:
                await self._changed.wait()
            seen = self._version
            assert self._state is not None
            yield self._state


class MemoryStore:
    """No ``--state``: the state lives as long as the process. Applying never fails."""

    def __init__(self) -> None:
        self.state = EMPTY
        self.watchers = Watchers()

    async def load(self) -> StoredState | None:
        return None if self.state is EMPTY else self.state

    async def apply(self, change: Change) -> None:
        self.state = merged(self.state, change)
        self.watchers.publish(self.state)

    def watch(self) -> AsyncIterator[StoredState]:
        return self.watchers.watch()
