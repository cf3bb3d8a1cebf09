"""What people may ask of a running rollout besides an abort: ``rollout promote``
(pass the batch under analysis now), ``rollout pause`` and ``rollout resume`` (hold
before the next batch, go on). A mixin of :class:`~skr8tr.conductor.rollout.RolloutManager`:
a command sets a flag on the rollout's record and wakes its task, which applies it at
its next decision (:func:`asked`, with :func:`skr8tr.core.rollout.promote` and
:func:`~skr8tr.core.rollout.pause`). Neither is durable: a rollout a conductor restart
cuts short ends by its policy, as always.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio

from skr8tr.conductor.errors import CommandError
from skr8tr.conductor.rollout_record import RolloutRecord
from skr8tr.core import rollout as plan

if TYPE_CHECKING:
    from skr8tr.conductor.cluster import Cluster

log = logging.getLogger("skr8tr.conductor")

PROMOTE_WAIT_S = 5.0  # how long `rollout promote` waits for the runner to apply it


class RolloutControls:
    cluster: Cluster
    active: dict[str, RolloutRecord]
    last: dict[str, RolloutRecord]

    def _running(self, app_name: str, verb: str) -> RolloutRecord:
        record = self.active.get(app_name)
        if record is not None:
            return record
        if app_name not in self.cluster.apps:
            raise CommandError("NOT_FOUND", f"no app named {app_name!r}")
        last = self.last.get(app_name)
        ended = "" if last is None else f" (the last one ended {last.state})"
        raise CommandError("CONFLICT", f"cannot {verb}: no rollout of {app_name} is "
                           f"running{ended}")

    async def promote(self, app_name: str) -> dict[str, Any]:
        """Pass the batch under analysis at once (a later batch is judged again).
        CONFLICT unless an analysis is under way."""
        record = self._running(app_name, "promote")
        if record.analysis is None or record.analysis.verdict != "watching":
            raise CommandError("CONFLICT", f"cannot promote: the rollout of {app_name} is "
                               "not judging a batch on its traffic now")
        record.promote_asked = True
        record.poke()
        judged = record.analysis
        with trio.move_on_after(PROMOTE_WAIT_S):
            while judged.verdict == "watching" and not record.done.is_set():
                await first_of(record.poked.wait, record.done.wait)
        return record.status(self.cluster.clock())

    async def pause(self, app_name: str, paused: bool) -> dict[str, Any]:
        """Hold the rollout before its next batch (True), or let it go on (False).
        CONFLICT when it is already so. Not durable: a restart ends it by its policy."""
        verb = "pause" if paused else "resume"
        record = self._running(app_name, verb)
        if record.paused == paused:
            raise CommandError("CONFLICT", f"cannot {verb}: the rollout of {app_name} is "
                               f"{'already' if paused else 'not'} paused")
        record.paused = paused
        record.poke()
        self.cluster.events.publish("rollout.paused" if paused else "rollout.resumed",
                                    app=app_name, to_generation=record.to_generation)
        log.info("rollout of %s %s", app_name, "paused" if paused else "resumed")
        self.cluster.mark_dirty()
        return record.status(self.cluster.clock())


def asked(record: RolloutRecord, progress: plan.Progress) -> plan.Progress:
    """What commands asked since the last decision, applied (pause, resume, promote)."""
    if record.promote_asked:
        record.promote_asked = False
        progress = plan.promote(progress) or progress
    if progress.paused != record.paused:
        progress = plan.pause(progress, record.paused)
    return progress


async def first_of(*waits: Callable[[], Awaitable[None]]) -> None:
    """Return when the first of ``waits`` returns (the others are cancelled)."""
    async with trio.open_nursery() as nursery:
        async def one(wait: Callable[[], Awaitable[None]]) -> None:
            await wait()
            nursery.cancel_scope.cancel()
        for wait in waits:
            nursery.start_soon(one, wait)
