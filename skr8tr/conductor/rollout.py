"""Rolling updates: readiness-gated, abortable, self-reverting (DESIGN.md §6).

Each rollout is one task in the manager's nursery, under its own cancel scope
kept in a registry keyed by app. The task, top to bottom:

1. for each batch of ``surge``: place and launch new replicas (ports are
   claimed at placement), wait until each is ready (the node reports its
   health check passing, or that it stayed alive for ``settle``), then drain
   (``draining`` in state and events, wait ``drain``) and stop as many old
   replicas, waiting for the node to confirm each exit; ``order stop-first``
   stops first and launches second;
2. apply a changed ``replicas`` count of the new manifest;
3. make the new revision current: ``complete``.

A new replica that exits or is not ready within ``ready-timeout`` fails the
rollout. With ``auto-rollback yes`` the same batch machinery then replaces
the new replicas that did become ready by replicas of the previous revision
(generation N again), and the state is ``rolled_back``; otherwise ``failed``.
An abort cancels the scope. Whatever the ending, the ``finally`` block —
shielded and bounded by :data:`CLEANUP_S` — stops every new-generation
replica that is not part of the outcome, so their ports are released, and
the reconciler (paused for the app while a rollout runs) brings generation N
back to its count.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

import trio

from skr8tr.conductor.cluster import Cluster
from skr8tr.conductor.errors import CommandError
from skr8tr.conductor.store import Change
from skr8tr.conductor.tables import AppState, HistoryEntry, Revision, stored_app
from skr8tr.core import placement
from skr8tr.core import rollout as plan
from skr8tr.core.reconcile import ENDED_STATES, LIVE_STATES

log = logging.getLogger("skr8tr.conductor")

CLEANUP_S = 30.0  # bound on the shielded cleanup of an ended rollout
STOP_CONFIRM_EXTRA_S = 15.0  # beyond stop-grace, how long to wait for a node's exit report
ABORT_WAIT_S = 45.0  # how long `rollout abort` waits for the cleanup before answering
PORT_CLASH_RETRIES = 5  # per batch: a port found taken on the host is replaced by another


class RolloutFailed(Exception):
    """A rollout cannot go on; ``str()`` is the reason shown to people."""


@dataclass
class RolloutRecord:
    app: str
    from_generation: int
    to_generation: int
    total: int
    started_wall: float
    started_clock: float
    state: str = "rolling"
    replaced: int = 0
    phase: str = "starting"
    phase_since: float = 0.0
    reason: str = ""  # why it failed, kept after the final message is set
    finished_wall: float | None = None
    launched: set[str] = field(default_factory=set)
    draining: set[str] = field(default_factory=set)  # drained, not yet told to stop
    done: trio.Event = field(default_factory=trio.Event)
    cancel_scope: trio.CancelScope = field(default_factory=trio.CancelScope)

    def status(self, now: float) -> dict[str, Any]:
        """The ``rollout status`` result of DESIGN.md §5."""
        if self.state == "rolling":
            message = f"{self.phase} · {now - self.phase_since:.1f} s"
        else:
            message = self.phase
        return {"app": self.app, "state": self.state, "from_generation": self.from_generation,
                "to_generation": self.to_generation, "replaced": self.replaced,
                "total": self.total, "message": message}


class RolloutManager:
    """The registry of rollouts by app and the nursery their tasks live in."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.active: dict[str, RolloutRecord] = {}
        # The cluster's table of last rollouts (status, store); this manager fills it.
        self.last: dict[str, RolloutRecord] = cluster.rollouts  # type: ignore[assignment]
        self.interrupted: list[str] = []  # apps whose rollout a conductor restart cut short
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Own the rollout tasks until cancelled (the conductor's shutdown).

        Rollouts interrupted by a restart are ended once the nodes have had the
        adopt grace to report what still runs (see :meth:`_recover`).
        """
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            if self.interrupted:
                pending = [(name, record) for name in self.interrupted
                           if (record := self._recovery_record(name)) is not None]
                self.interrupted = []
                await trio.sleep_until(self.cluster.adopt_until)
                for name, record in pending:
                    self._start_recovery(name, record)
            await trio.sleep_forever()

    def restore(self, statuses: tuple[dict[str, Any], ...]) -> None:
        """Last rollout statuses from the state file, so `rollout status` survives restarts."""
        for s in statuses:
            try:
                record = RolloutRecord(
                    app=s["app"], from_generation=s["from_generation"],
                    to_generation=s["to_generation"], total=s["total"], started_wall=0.0,
                    started_clock=0.0, state=s["state"], replaced=s["replaced"],
                    phase=s["message"])
            except (KeyError, TypeError):
                log.warning("ignoring a malformed stored rollout status: %r", s)
                continue
            record.done.set()
            self.last[record.app] = record

    def statuses(self) -> list[dict[str, Any]]:
        now = self.cluster.clock()
        return [r.status(now) for _, r in sorted(self.last.items())]

    def status(self, app_name: str) -> dict[str, Any]:
        record = self.last.get(app_name)
        if record is None:
            if app_name in self.cluster.apps:
                raise CommandError("NOT_FOUND", f"{app_name} has had no rollout yet "
                                   f"(it runs generation {self.cluster.apps[app_name].generation}"
                                   " from `up`)")
            raise CommandError("NOT_FOUND", f"no app named {app_name!r}")
        return record.status(self.cluster.clock())

    # ------------------------------------------------------------------ commands

    async def start(self, revision_manifest, text: str, fmt: str, *, force: bool
                    ) -> dict[str, Any]:
        """Start a rollout of ``revision_manifest``; returns its first status at once."""
        cluster = self.cluster
        app = cluster.apps.get(revision_manifest.app)
        if app is None:
            raise CommandError("NOT_FOUND", f"no app named {revision_manifest.app!r}; "
                               "deploy it first with `skr8tr up FILE`")
        if app.name in self.active:
            if not force:
                running = self.active[app.name]
                raise CommandError(
                    "CONFLICT",
                    f"a rollout of {app.name} ({running.from_generation} -> "
                    f"{running.to_generation}) is running; wait for it, abort it with "
                    f"`skr8tr rollout abort {app.name}`, or pass --force")
            await self.abort(app.name)
            app = cluster.apps.get(revision_manifest.app)
            if app is None:
                raise CommandError("NOT_FOUND", f"app {revision_manifest.app} was removed")
        async with cluster.changing(app.name):
            if cluster.apps.get(app.name) is not app or app.name in self.active:
                raise CommandError("CONFLICT", f"{app.name} changed while this rollout "
                                   "was starting; try again")
            self._check_first_batch(app, revision_manifest)
            generation = plan.next_generation(app.revisions)
            revision = cluster.new_revision(generation, revision_manifest, text, fmt)
            return await self._launch_task(app, revision)

    def _check_first_batch(self, app: AppState, m) -> None:
        """Fail at once, before taking a generation, when the first batch cannot be placed."""
        if m.rollout.order == "stop-first" or m.port is None:
            return
        request = placement.PlacementRequest(
            app=app.name, port=m.port,
            ram_mb=None if m.ram_bytes is None else -(-m.ram_bytes // 2**20), cpu=m.cpu)
        count = min(m.rollout.surge, max(app.desired, 1))
        _, short = placement.place_many(request, count, self.cluster.node_views(),
                                        self.cluster.taken_ports(), self.cluster.port_range)
        if short is not None:
            raise CommandError("NO_CAPACITY", f"cannot start the rollout of {app.name}: "
                               f"{short.message}")

    async def _launch_task(self, app: AppState, revision: Revision) -> dict[str, Any]:
        cluster = self.cluster
        record = RolloutRecord(app=app.name, from_generation=app.generation,
                               to_generation=revision.generation, total=app.desired,
                               started_wall=cluster.wall(), started_clock=cluster.clock(),
                               phase_since=cluster.clock())
        entry = HistoryEntry(revision.generation, "rolling", record.started_wall, None,
                             revision.sha256)
        # Durable first: a restarted conductor must know this rollout was under way.
        await cluster.commit(Change(apps={app.name: stored_app(dataclasses.replace(
            app, revisions={**app.revisions, revision.generation: revision},
            history=[*app.history, entry]))}))
        app.revisions[revision.generation] = revision
        app.history.append(entry)
        app.rolling = True
        self.active[app.name] = record
        self.last[app.name] = record
        cluster.events.publish("rollout.started", app=app.name,
                               from_generation=record.from_generation,
                               to_generation=record.to_generation, total=record.total)
        log.info("rollout of %s started: generation %d -> %d, %d replica(s)", app.name,
                 record.from_generation, record.to_generation, record.total)
        assert self._nursery is not None, "RolloutManager.run is not running"
        self._nursery.start_soon(self._run, record, app, app.revision, revision)
        return record.status(cluster.clock())

    async def abort(self, app_name: str) -> dict[str, Any]:
        record = self.active.get(app_name)
        if record is None:
            if app_name in self.last:
                raise CommandError("CONFLICT", f"no rollout of {app_name} is running (the last "
                                   f"one ended {self.last[app_name].state})")
            raise CommandError("NOT_FOUND", f"no rollout of {app_name!r} is running")
        log.info("aborting the rollout of %s", app_name)
        record.cancel_scope.cancel()
        with trio.move_on_after(ABORT_WAIT_S):
            await record.done.wait()
        return record.status(self.cluster.clock())

    async def undo(self, app_name: str, to: int | None) -> dict[str, Any]:
        app = self.cluster.apps.get(app_name)
        if app is None:
            raise CommandError("NOT_FOUND", f"no app named {app_name!r}")
        try:
            generation = plan.undo_target(
                [plan.HistoryView(h.generation, h.state) for h in app.history],
                app.generation, to)
        except plan.UndoError as exc:
            raise CommandError("NOT_FOUND", f"cannot undo {app_name}: {exc}") from None
        old = app.revisions[generation]
        return await self.start(old.manifest, old.text, old.format, force=False)

    # ------------------------------------------------------------------ after a restart

    def _recovery_record(self, app_name: str) -> RolloutRecord | None:
        """At start-up: the record of an interrupted rollout, shown as rolling while the
        nodes report back (the adopt grace)."""
        cluster = self.cluster
        app = cluster.apps.get(app_name)
        entry = None if app is None else next(
            (h for h in app.history if h.state == "rolling"), None)
        if app is None or entry is None or entry.generation not in app.revisions:
            if app is not None:
                app.rolling = False
            return None
        stored = self.last.get(app_name)
        record = RolloutRecord(
            app=app_name, from_generation=app.generation, to_generation=entry.generation,
            total=app.desired, started_wall=entry.started, started_clock=cluster.clock(),
            phase="interrupted by a conductor restart; waiting for the nodes to report",
            phase_since=cluster.clock(),
            replaced=stored.replaced if stored and stored.to_generation == entry.generation
            else 0)
        self.active[app_name] = record
        self.last[app_name] = record
        return record

    def _start_recovery(self, app_name: str, record: RolloutRecord) -> None:
        """End an interrupted rollout by the app's policy: roll back (auto-rollback) or
        fail. Either way the new generation's replicas are stopped and the previous
        generation is brought back to its count; the rollout is never left half-done."""
        cluster = self.cluster
        app = cluster.apps[app_name]
        new = app.revisions[record.to_generation]
        record.launched = {r.replica_id for r in cluster.replicas.values()
                           if r.app == app_name and r.generation == new.generation}
        # What the nodes report is the truth: new replicas serving are replaced ones,
        # even those whose batch ended after the last state write.
        serving_new = sum(1 for rid in record.launched
                          if cluster.replicas[rid].state == "ready")
        record.replaced = min(record.total, max(record.replaced, serving_new))
        cluster.events.publish("rollout.interrupted", app=app_name,
                               from_generation=record.from_generation,
                               to_generation=record.to_generation,
                               observed_new=sorted(record.launched))
        log.warning("rollout of %s (%d -> %d) was interrupted by a conductor restart; "
                    "ending it by the app's policy", app_name, record.from_generation,
                    record.to_generation)
        assert self._nursery is not None
        self._nursery.start_soon(self._recover, record, app, app.revision, new)

    async def _recover(self, record: RolloutRecord, app: AppState, old: Revision,
                       new: Revision) -> None:
        why = (f"interrupted by a conductor restart after {record.replaced}/{record.total} "
               "replaced")
        record.reason = why
        shutting_down = False
        try:
            with record.cancel_scope:
                if new.manifest.rollout.auto_rollback:
                    try:
                        await self._roll_back(record, app, old, new)
                    except RolloutFailed as exc:
                        record.state, record.phase = "failed", f"failed: {exc}"
                    else:
                        record.state = "rolled_back"
                        record.phase = f"rolled back to generation {old.generation}: {why}"
                else:
                    record.state, record.phase = "failed", f"failed: {why}"
            if record.cancel_scope.cancelled_caught:
                record.state, record.phase = "aborted", f"aborted while recovering: {why}"
        except trio.Cancelled:
            shutting_down = True  # as in _run: the next start tries again
            raise
        finally:
            if not shutting_down:
                with trio.CancelScope(shield=True), trio.move_on_after(CLEANUP_S):
                    await self._clean_up(record, app, old.generation)
                self._finish(record, app)

    # ------------------------------------------------------------------ the rollout task

    def _phase(self, record: RolloutRecord, phase: str, **data: Any) -> None:
        if record.state == "rolling":  # a final state keeps its final message
            record.phase = phase
            record.phase_since = self.cluster.clock()
        self.cluster.events.publish("rollout.phase", app=record.app, phase=phase,
                                    replaced=record.replaced, total=record.total,
                                    to_generation=record.to_generation, **data)

    async def _run(self, record: RolloutRecord, app: AppState, old: Revision,
                   new: Revision) -> None:
        cluster = self.cluster
        keep_generation = old.generation
        shutting_down = False
        try:
            with record.cancel_scope:
                try:
                    await self._replace(record, app, new, old.generation, new.manifest.rollout,
                                        forward=True)
                    await self._apply_count(record, app, new)
                except RolloutFailed as exc:
                    record.reason = str(exc)
                    log.warning("rollout of %s failed: %s", app.name, exc)
                    cluster.events.publish("rollout.failed", app=app.name, reason=str(exc),
                                           to_generation=new.generation)
                    if not new.manifest.rollout.auto_rollback:
                        record.state = "failed"
                        record.phase = f"failed: {exc}"
                    else:
                        try:
                            await self._roll_back(record, app, old, new)
                        except RolloutFailed as worse:
                            record.state = "failed"
                            record.phase = f"failed: {worse}"
                        else:
                            record.state = "rolled_back"
                            record.phase = f"rolled back to generation {old.generation}: {exc}"
                else:
                    keep_generation = new.generation
                    app.revision = new
                    app.desired = new.manifest.replicas
                    app.completed = app.given_up = 0
                    record.state = "complete"
                    record.phase = (f"{record.replaced}/{record.total} replaced in "
                                    f"{cluster.clock() - record.started_clock:.1f} s")
            if record.cancel_scope.cancelled_caught:
                record.state = "aborted"
                record.phase = (f"aborted after {record.replaced}/{record.total} replaced; "
                                f"generation {old.generation} keeps serving")
        except trio.Cancelled:
            # Not an abort (the rollout's own scope absorbs those): the conductor is
            # shutting down. The rollout stays recorded as rolling and the next start
            # ends it by the app's policy, exactly as after a crash.
            shutting_down = True
            log.warning("shutting down during the rollout of %s; the next start ends it",
                        app.name)
            raise
        finally:
            if not shutting_down:
                with trio.CancelScope(shield=True), trio.move_on_after(CLEANUP_S):
                    await self._clean_up(record, app, keep_generation)
                self._finish(record, app)

    def _finish(self, record: RolloutRecord, app: AppState) -> None:
        if record.state == "rolling":  # ended by something unexpected (a bug, or shutdown)
            record.state = "failed"
            record.phase = "the rollout task ended unexpectedly; see the conductor log"
        record.finished_wall = self.cluster.wall()
        for entry in app.history:
            if entry.generation == record.to_generation:
                entry.state = record.state
                entry.finished = record.finished_wall
        app.rolling = False
        self.active.pop(app.name, None)
        self.cluster.events.publish(
            "rollout.finished", app=app.name, state=record.state,
            from_generation=record.from_generation, to_generation=record.to_generation,
            replaced=record.replaced, total=record.total, message=record.phase)
        log.info("rollout of %s %s: %s", app.name, record.state, record.phase)
        if app.name in self.cluster.apps:
            self.cluster.save_soon(app.name)
        self.cluster.mark_dirty()
        record.done.set()

    async def _clean_up(self, record: RolloutRecord, app: AppState, keep_generation: int
                        ) -> None:
        """Stop every replica this rollout launched that is not of ``keep_generation``,
        and put back in service the ones it drained but did not get to stop."""
        for rid in sorted(record.draining):
            self.cluster.undrain_replica(rid)
        record.draining.clear()
        strays = [rid for rid in record.launched
                  if (r := self.cluster.replicas.get(rid)) is not None
                  and r.generation != keep_generation]
        if strays:
            self._phase(record, f"stopping {len(strays)} new replica(s)", replicas=strays)
            await self._stop_and_wait(strays, app, reason="rollout ended")

    # ------------------------------------------------------------------ the machinery

    def _live(self, app: AppState, generation: int, *, ready_only: bool = False
              ) -> list[str]:
        rows = [r for r in self.cluster.replicas.values()
                if r.app == app.name and r.generation == generation
                and r.state in LIVE_STATES and (not ready_only or r.state == "ready")]
        # Replace what is not serving first, then the oldest.
        rows.sort(key=lambda r: (r.state == "ready", r.seq))
        return [r.replica_id for r in rows]

    async def _replace(self, record: RolloutRecord, app: AppState, to: Revision,
                       from_generation: int, policy, *, forward: bool,
                       total: int | None = None) -> None:
        """Replace ``total`` replicas of ``from_generation`` by ``to``, batch by batch."""
        total = record.total if total is None else total
        for size in plan.batches(total, policy.surge):
            if policy.order == "stop-first":
                await self._drain_and_stop(record, app, self._live(app, from_generation)[:size])
                new_ids = self._launch(record, app, to, size)
                await self._wait_ready(record, app, new_ids, to)
            else:
                new_ids = self._launch(record, app, to, size)
                await self._wait_ready(record, app, new_ids, to)
                await self._drain_and_stop(record, app, self._live(app, from_generation)[:size])
            if forward:
                record.replaced += size
                self.cluster.events.publish("rollout.progress", app=app.name,
                                            replaced=record.replaced, total=record.total,
                                            to_generation=record.to_generation)
                # Durable per batch: a conductor killed now restarts knowing how far
                # this rollout got (rollout status, and the reason it ends with).
                self.cluster.save_soon(app.name)

    def _launch(self, record: RolloutRecord, app: AppState, revision: Revision, count: int
                ) -> list[str]:
        ids = []
        for _ in range(count):
            result = self.cluster.launch(app, revision)
            if isinstance(result, placement.NoCapacity):
                raise RolloutFailed(f"NO_CAPACITY: {result.message}")
            ids.append(result.replica_id)
            if revision.generation == record.to_generation:
                record.launched.add(result.replica_id)
        self._phase(record, f"launched {', '.join(ids)}", replicas=ids,
                    generation=revision.generation)
        return ids

    async def _wait_ready(self, record: RolloutRecord, app: AppState, ids: list[str],
                          revision: Revision) -> None:
        timeout_s = revision.manifest.rollout.ready_timeout_s
        deadline = self.cluster.clock() + timeout_s
        ids = list(ids)
        clashes = 0
        while True:
            waiting = []
            for i, rid in enumerate(ids):
                r = self.cluster.replicas.get(rid) or self.cluster.ended.get(rid)
                if (r is not None and r.port_clash and r.state in ENDED_STATES
                        and clashes < PORT_CLASH_RETRIES):
                    # Something outside skr8tr holds that port: the port is blocked on
                    # that host for a while, and a new placement picks another one.
                    clashes += 1
                    self.cluster.forget_replica(rid)
                    rid = ids[i] = self._launch(record, app, revision, 1)[0]
                    r = self.cluster.replicas.get(rid)
                if r is None or r.state in ENDED_STATES or r.state in ("draining", "stopping"):
                    raise RolloutFailed(self._failure(app, rid, "exited before it was "
                                                            "ready"))
                if r.state != "ready":
                    waiting.append(rid)
            if not waiting:
                return
            what = (f"waiting for {waiting[0]} to become ready" if len(waiting) == 1
                    else f"waiting for {len(waiting)} replicas to become ready")
            if record.phase != what:
                self._phase(record, what, replicas=waiting)
            with trio.move_on_at(deadline) as scope:
                await self.cluster.wait_changed()
            if scope.cancelled_caught:
                raise RolloutFailed(self._failure(
                    app, waiting[0], f"was not ready within {timeout_s:g} s (ready-timeout)"))

    def _failure(self, app: AppState, rid: str, why: str) -> str:
        r = self.cluster.replicas.get(rid) or self.cluster.ended.get(rid)
        return plan.describe_failure(
            rid, app=app.name, why=why, exit_code=None if r is None else r.exit_code,
            signal=None if r is None else r.signal, message=None if r is None else r.message)

    async def _drain_and_stop(self, record: RolloutRecord, app: AppState, ids: list[str]
                              ) -> None:
        if not ids:
            return
        drain_s = app.revisions[self.cluster.replicas[ids[0]].generation].manifest.rollout.drain_s
        for rid in ids:
            self.cluster.drain_replica(rid)
            record.draining.add(rid)
        self._phase(record, f"draining {', '.join(ids)}", replicas=ids)
        await trio.sleep(drain_s)
        self._phase(record, f"stopping {', '.join(ids)}", replicas=ids)
        record.draining.difference_update(ids)
        await self._stop_and_wait(ids, app, reason="replaced by rollout")

    async def _stop_and_wait(self, ids: list[str], app: AppState, *, reason: str) -> None:
        grace_s = max((app.revisions[r.generation].manifest.stop_grace_s
                       for rid in ids if (r := self.cluster.replicas.get(rid)) is not None
                       and r.generation in app.revisions), default=5.0)
        for rid in ids:
            r = self.cluster.replicas.get(rid)
            if r is not None and r.state not in ENDED_STATES and r.state != "stopping":
                self.cluster.stop_replica(rid, reason)
            elif r is not None and r.state in ENDED_STATES:
                self.cluster.forget_replica(rid)
        with trio.move_on_after(grace_s + STOP_CONFIRM_EXTRA_S):
            while any(rid in self.cluster.replicas for rid in ids):
                await self.cluster.wait_changed()
        left = [rid for rid in ids if rid in self.cluster.replicas]
        if left:
            log.warning("no exit confirmed for %s within %.0f s; going on (their ports stay "
                        "claimed until the node reports or expires)", ", ".join(left),
                        grace_s + STOP_CONFIRM_EXTRA_S)

    async def _apply_count(self, record: RolloutRecord, app: AppState, new: Revision) -> None:
        """After the replacement, grow or shrink to the new manifest's ``replicas``."""
        want, have = new.manifest.replicas, record.total
        if want > have:
            self._phase(record, f"scaling {have} -> {want}")
            # Replacing "generation 0" (which never exists) only launches and waits.
            await self._replace(record, app, new, 0, new.manifest.rollout, forward=False,
                                total=want - have)
        elif want < have:
            surplus = self._live(app, new.generation)[: have - want]
            await self._drain_and_stop(record, app, surplus)

    async def _roll_back(self, record: RolloutRecord, app: AppState, old: Revision,
                         new: Revision) -> None:
        """Put generation ``old`` back: never-ready new replicas go at once, ready ones
        are replaced batch by batch like any rollout."""
        not_ready = [rid for rid in record.launched
                     if (r := self.cluster.replicas.get(rid)) is not None and r.state != "ready"]
        if not_ready:
            self._phase(record, f"rolling back: stopping {', '.join(not_ready)}",
                        replicas=not_ready)
            await self._stop_and_wait(not_ready, app, reason="rollout failed")
        serving_new = self._live(app, new.generation, ready_only=True)
        if serving_new:
            self._phase(record, f"rolling back {len(serving_new)} replica(s) to generation "
                        f"{old.generation}")
            try:
                await self._replace(record, app, old, new.generation, old.manifest.rollout,
                                    forward=False, total=len(serving_new))
            except RolloutFailed as exc:
                raise RolloutFailed(f"{record.reason}; the rollback failed too: {exc}") from None
