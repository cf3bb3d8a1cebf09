"""The conductor's desired state made durable: part of the
:class:`~skr8tr.conductor.cluster.Cluster` state machine (a mixin of it).

A command's change is stored before it takes effect in memory (:meth:`commit`, under
the app's lock, :meth:`changing`); what changes other than by a command (a rollout's
progress and end) is stored soon after (:meth:`save_soon`, written by the store loop
with :meth:`saved_form`). At start the state is loaded from the store
(:meth:`open_store`), and the nodes get ``adopt_grace_s`` to report what still runs
before anything new is placed. The store itself is :mod:`~skr8tr.conductor.store`
(the ``--state`` file, or etcd).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import trio

from skr8tr.conductor import state_file
from skr8tr.conductor.errors import CommandError
from skr8tr.conductor.store import (
    Change,
    FenceLost,
    StoreError,
    StoreOutcomeUnknown,
    StoreUnavailable,
)
from skr8tr.conductor.tables import app_from_stored, stored_app

if TYPE_CHECKING:
    from skr8tr.conductor.cluster import Cluster

log = logging.getLogger("skr8tr.conductor")


class DurableState:
    """The store-facing half of :class:`~skr8tr.conductor.cluster.Cluster`."""

    @contextlib.asynccontextmanager
    async def changing(self: Cluster, app: str) -> AsyncIterator[None]:
        """Hold while changing ``app``'s desired state: compute, ``commit``, apply. Changes
        of one app are made one after the other, so that each starts from the one before
        it and the store ends as memory does; changes of different apps overlap (and
        share the store's writes)."""
        lock = self._app_locks.get(app)
        if lock is None:
            lock = self._app_locks[app] = trio.Lock()
        if lock.locked():
            await lock.acquire()
        else:
            lock.acquire_nowait()  # uncontended: no scheduling round on a command's path
        try:
            yield
        finally:
            lock.release()
            if not lock.locked() and not lock.statistics().tasks_waiting:
                self._app_locks.pop(app, None)

    async def commit(self: Cluster, change: Change) -> None:
        """Make a command's change durable before it takes effect here (hold ``changing``).

        Raises CommandError INTERNAL when the store cannot; it kept nothing of it."""
        try:
            await self.store.apply(change)
        except StoreOutcomeUnknown as exc:
            # Memory no longer knows what the store holds: end this term, so that the
            # next one (this conductor or another) loads the truth from the store.
            self.deposed(f"a write's outcome is unknown: {exc}")
            raise CommandError("UNAVAILABLE", f"{exc}; it may have been applied: check "
                               "with `skr8tr status`") from None
        except StoreUnavailable as exc:
            raise CommandError("UNAVAILABLE", f"{exc}; nothing was changed") from None
        except FenceLost as exc:
            self.deposed(str(exc))
            raise CommandError("NOT_LEADER", f"{exc}; nothing was changed") from None
        except StoreError as exc:
            raise CommandError("INTERNAL", f"{exc}; nothing was changed") from None

    def save_soon(self: Cluster, app: str) -> None:
        """``app`` changed other than by a command (a rollout went a batch further, or
        ended): store it as it is then, and its last rollout; retried until stored."""
        self.unsaved.add(app)
        self.unsaved_event.set()

    def saved_form(self: Cluster, app: str) -> Change:
        """The change that stores ``app`` (and its last rollout) as it is now, or removes
        it when it is gone."""
        current = self.apps.get(app)
        if current is None:
            return Change(apps={app: None}, rollouts={app: None})
        rollout = self.rollouts.get(app)
        return Change(apps={app: stored_app(current)},
                      rollouts={} if rollout is None else {app: rollout.stored(self.clock())})

    def rollout_statuses(self: Cluster) -> list[dict[str, Any]]:
        """The last rollout of each app, as ``rollout status --json`` shows it."""
        now = self.clock()
        return [r.status(now) for _, r in sorted(self.rollouts.items())]

    async def open_store(self: Cluster, where: str
                         ) -> tuple[state_file.StoredState | None, list[str]]:
        """At start: load the desired state from the store (``where`` names it in errors)
        and keep this conductor's placement secret in it. Returns what was stored and the
        apps whose rollout a restart interrupted. Raises StateFileError when a stored
        manifest no longer parses, StoreError when the secret cannot be stored."""
        stored = await self.store.load()
        interrupted = [] if stored is None else self.load_state(stored, where)
        if stored is None or stored.placement_key is None:
            # Kept from the first start on: tokens given before a restart still prove.
            await self.store.apply(Change(placement_key=self.placement_secret.hex()))
        return stored, interrupted

    def load_state(self: Cluster, stored: state_file.StoredState, where: str) -> list[str]:
        """Rebuild apps from the store (``where`` names it in errors); returns the apps whose
        rollout was interrupted. Raises StateFileError when a stored manifest no longer
        parses."""
        interrupted = []
        if stored.placement_key is not None:
            self.placement_secret = bytes.fromhex(stored.placement_key)
        for s in stored.apps:
            app = app_from_stored(s, where)
            if any(h.state == "rolling" for h in app.history):
                app.rolling = True  # the rollout manager ends it once nodes have reported
                interrupted.append(app.name)
            self.apps[app.name] = app
            self.loaded_apps.add(app.name)
        log.info("loaded %d app(s) from %s%s", len(stored.apps), where,
                 f"; interrupted rollouts: {', '.join(interrupted)}" if interrupted else "")
        return interrupted

    def start_adopt_grace(self: Cluster) -> None:
        self.adopt_until = self.clock() + self.adopt_grace_s
