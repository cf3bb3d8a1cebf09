"""Rolling updates: the runner that drives :mod:`skr8tr.core.rollout`.

Each rollout is one task in the manager's nursery, under its own cancel scope
kept in a registry keyed by app. The task is a loop: observe the app's
replicas, ask :func:`skr8tr.core.rollout.decide` for the next step, do that
step's I/O, and ask again. The I/O is all that lives here: place and launch
replicas (ports are claimed at placement), wait for the next change or a
deadline, drain (``draining`` in state and events, wait ``drain``) and stop
replicas and wait for the node to confirm each exit, publish events, write
state. What the steps are — batches of ``surge``, start-first or stop-first,
which old replica goes next, when a batch is ready, when the rollout fails,
rolls back or is complete, how one cut short by a conductor restart ends —
is decided in the core.

A batch judged on its traffic (§11) waits for the next change, the next ingress
report or its deadline; the record (:mod:`skr8tr.conductor.rollout_record`) holds
the live figures. ``promote``, ``pause`` and ``resume`` set a flag on the record and
wake the task, which applies it at its next decision.

An abort cancels the scope. Whatever the ending, the ``finally`` block —
shielded and bounded by :data:`CLEANUP_S` — stops every new-generation
replica that is not part of the outcome, so their ports are released, and
the reconciler (paused for the app while a rollout runs) brings generation N
back to its count.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Mapping
from typing import Any

import trio

from skr8tr.conductor.cluster import Cluster
from skr8tr.conductor.errors import CommandError
from skr8tr.conductor.rollout_controls import RolloutControls, asked, first_of
from skr8tr.conductor.rollout_record import LiveAnalysis, RolloutRecord
from skr8tr.conductor.store import Change
from skr8tr.conductor.tables import AppState, HistoryEntry, Revision, stored_app
from skr8tr.core import placement, revisions
from skr8tr.core import rollout as plan
from skr8tr.core.reconcile import ENDED_STATES

log = logging.getLogger("skr8tr.conductor")

CLEANUP_S = 30.0  # bound on the shielded cleanup of an ended rollout
STOP_CONFIRM_EXTRA_S = 15.0  # beyond stop-grace, how long to wait for a node's exit report
ABORT_WAIT_S = 45.0  # how long `rollout abort` waits for the cleanup before answering


class RolloutManager(RolloutControls):
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
        adopt grace to report what still runs (see :meth:`_start_recovery`).
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
                    phase=s["message"], desired=s.get("desired"),
                    kind=s.get("kind", "rollout"))
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

    async def start(self, revision_manifest, text: str, fmt: str, *, force: bool,
                    desired: int | None = None, kind: str = "rollout") -> dict[str, Any]:
        """Start a rollout of ``revision_manifest``; returns its first status at once.
        ``desired``: the replica count to end with, when not the manifest's own (a
        restart keeps what `scale` set)."""
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
            generation = revisions.next_generation([*app.revisions, app.last_generation])
            revision = cluster.new_revision(generation, revision_manifest, text, fmt)
            return await self._launch_task(app, revision, desired, kind)

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

    async def _launch_task(self, app: AppState, revision: Revision,
                           desired: int | None = None, kind: str = "rollout"
                           ) -> dict[str, Any]:
        cluster = self.cluster
        record = RolloutRecord(app=app.name, from_generation=app.generation,
                               to_generation=revision.generation, total=app.desired,
                               started_wall=cluster.wall(), started_clock=cluster.clock(),
                               phase_since=cluster.clock(), desired=desired, kind=kind,
                               book=cluster.traffic,
                               traffic_start=cluster.traffic.generations(app.name))
        entry = HistoryEntry(revision.generation, "rolling", record.started_wall, None,
                             revision.sha256)
        stored = {**app.revisions, revision.generation: revision}
        history = [*app.history, entry]
        # Retention: the new revision in, the oldest the app no longer needs out.
        kept = revisions.retain(stored, [revisions.HistoryView(h.generation, h.state,
                                                               h.manifest_sha256)
                                         for h in history],
                                current=app.generation,
                                rollout=(record.from_generation, record.to_generation),
                                keep=cluster.keep_revisions)
        stored = {g: r for g, r in stored.items() if g in kept.revisions}
        history = [h for h in history if h.generation in kept.history]
        # Durable first: a restarted conductor must know this rollout was under way, and
        # what it was (its kind, the count it was started for).
        await cluster.commit(Change(
            apps={app.name: stored_app(dataclasses.replace(
                app, revisions=stored, history=history,
                last_generation=revision.generation))},
            rollouts={app.name: record.stored(cluster.clock())}))
        app.revisions = stored
        app.history = history
        app.last_generation = revision.generation
        app.rolling = True
        self.active[app.name] = record
        self.last[app.name] = record
        cluster.events.publish("rollout.started", app=app.name,
                               from_generation=record.from_generation,
                               to_generation=record.to_generation, total=record.total,
                               kind=record.kind)
        log.info("rollout of %s started: generation %d -> %d, %d replica(s)", app.name,
                 record.from_generation, record.to_generation, record.total)
        assert self._nursery is not None, "RolloutManager.run is not running"
        progress = plan.begin(
            app=app.name, from_generation=record.from_generation,
            to_generation=record.to_generation, total=record.total,
            want=revision.manifest.replicas if desired is None else desired,
            forward=revision.manifest.rollout,
            back=app.manifest.rollout, now=record.started_clock,
            forward_health=revision.manifest.health, back_health=app.manifest.health)
        self._nursery.start_soon(self._drive, record, app, progress)
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

    async def undo(self, app_name: str, to: int | None, *, force: bool = False
                   ) -> dict[str, Any]:
        """Roll out an earlier generation's manifest under a new generation. ``force``
        allows a ``--to`` generation that never completed, and aborts a running rollout
        first (as ``rollout FILE --force``)."""
        app = self.cluster.apps.get(app_name)
        if app is None:
            raise CommandError("NOT_FOUND", f"no app named {app_name!r}")
        if to is not None and 1 <= to <= app.last_generation and to not in app.revisions:
            raise CommandError("NOT_FOUND", f"cannot undo {app_name} to generation {to}: "
                               f"{pruned_text(app, to, self.cluster.keep_revisions)}")
        try:
            generation = revisions.undo_target(
                [revisions.HistoryView(h.generation, h.state, h.manifest_sha256)
                 for h in app.history],
                app.generation, to, force=force)
        except revisions.UndoRefused as exc:
            raise CommandError("CONFLICT", f"cannot undo {app_name}: {exc}") from None
        except revisions.UndoError as exc:
            raise CommandError("NOT_FOUND", f"cannot undo {app_name}: {exc}") from None
        old = app.revisions.get(generation)
        if old is None:  # a history entry without its revision (an old state file)
            raise CommandError("NOT_FOUND", f"cannot undo {app_name}: the manifest of "
                               f"generation {generation} is not kept")
        return await self.start(old.manifest, old.text, old.format, force=force, kind="undo")

    async def restart(self, app_name: str, *, force: bool = False) -> dict[str, Any]:
        """A rolling restart: the current generation's manifest rolled out again, under
        the next generation (a rollout attempt like any other: gated on readiness, with
        the manifest's surge, drain and auto-rollback). CONFLICT while a rollout runs,
        unless ``force``, which aborts it first; the restart then replaces what the
        abort left running."""
        app = self.cluster.apps.get(app_name)
        if app is None:
            raise CommandError("NOT_FOUND", f"no app named {app_name!r}")
        if app_name in self.active and not force:
            running = self.active[app_name]
            raise CommandError(
                "CONFLICT",
                f"a rollout of {app_name} ({running.from_generation} -> "
                f"{running.to_generation}) is running; wait for it, abort it with "
                f"`skr8tr rollout abort {app_name}`, or pass --force")
        if app_name in self.active:
            await self.abort(app_name)
            app = self.cluster.apps.get(app_name)
            if app is None:
                raise CommandError("NOT_FOUND", f"app {app_name} was removed")
        current = app.revision
        return await self.start(current.manifest, current.text, current.format, force=force,
                                desired=app.desired, kind="restart")

    # ------------------------------------------------------------------ after a restart

    def _recovery_record(self, app_name: str) -> RolloutRecord | None:
        """At start-up: the record of an interrupted rollout, shown as rolling while the
        nodes report back (the adopt grace)."""
        cluster = self.cluster
        app = cluster.apps.get(app_name)
        generation = None if app is None else plan.interrupted_generation(
            [revisions.HistoryView(h.generation, h.state) for h in app.history], app.revisions)
        if app is None or generation is None:
            if app is not None:
                app.rolling = False
            return None
        entry = next(h for h in app.history if h.generation == generation)
        stored = self.last.get(app_name)
        record = RolloutRecord(
            app=app_name, from_generation=app.generation, to_generation=generation,
            total=app.desired, started_wall=entry.started, started_clock=cluster.clock(),
            phase="interrupted by a conductor restart; waiting for the nodes to report",
            phase_since=cluster.clock(), book=cluster.traffic,
            traffic_start=cluster.traffic.generations(app_name))
        if stored is not None and stored.to_generation == generation:
            record.replaced = stored.replaced
            record.kind, record.desired = stored.kind, stored.desired
        self.active[app_name] = record
        self.last[app_name] = record
        return record

    def _start_recovery(self, app_name: str, record: RolloutRecord) -> None:
        """End an interrupted rollout by the app's policy (see :func:`plan.recover`), from
        what the nodes report now."""
        cluster = self.cluster
        app = cluster.apps[app_name]
        new = app.revisions[record.to_generation]
        record.launched = {r.replica_id for r in cluster.replicas.values()
                           if r.app == app_name and r.generation == new.generation}
        progress = plan.recover(
            app=app_name, from_generation=record.from_generation,
            to_generation=record.to_generation, total=record.total, replaced=record.replaced,
            forward=new.manifest.rollout, back=app.manifest.rollout,
            replicas=_AppReplicas(cluster, app_name, ()), now=cluster.clock(),
            forward_health=new.manifest.health, back_health=app.manifest.health)
        record.replaced = progress.replaced
        record.reason = progress.reason
        cluster.events.publish("rollout.interrupted", app=app_name,
                               from_generation=record.from_generation,
                               to_generation=record.to_generation,
                               observed_new=sorted(record.launched), kind=record.kind)
        log.warning("rollout of %s (%d -> %d) was interrupted by a conductor restart; "
                    "ending it by the app's policy", app_name, record.from_generation,
                    record.to_generation)
        assert self._nursery is not None
        self._nursery.start_soon(self._drive, record, app, progress)

    # ------------------------------------------------------------------ the rollout task

    def _phase(self, record: RolloutRecord, phase: str, **data: Any) -> None:
        record.probe = None  # said again by the next wait for readiness, if any
        if record.state == "rolling":  # a final state keeps its final message
            record.phase = phase
            record.phase_since = self.cluster.clock()
        self.cluster.events.publish("rollout.phase", app=record.app, phase=phase,
                                    replaced=record.replaced, total=record.total,
                                    to_generation=record.to_generation, **data)

    async def _drive(self, record: RolloutRecord, app: AppState, progress: plan.Progress
                     ) -> None:
        """Run a rollout to its end: ask the core for a step, do it, ask again.

        An abort (the record's cancel scope) ends it as ``aborted``. Cancelled from
        outside — the conductor shutting down — it leaves the rollout recorded as
        rolling, and the next start ends it by the app's policy, as after a crash.
        Otherwise, however it ends, its new replicas that are not part of the outcome
        are stopped, under a shielded scope bounded by :data:`CLEANUP_S`.
        """
        cluster = self.cluster
        keep_generation = record.from_generation
        shutting_down = False
        try:
            with record.cancel_scope:
                while True:
                    progress = asked(record, progress)
                    seen = _AppReplicas(cluster, app.name, plan.watching(progress))
                    step = plan.decide(progress, seen, cluster.clock(), cluster.traffic.sum_of)
                    if isinstance(step, plan.Finish):
                        break
                    progress = await self._do(record, app, step)
                if step.state == "complete":
                    new = app.revisions[record.to_generation]
                    keep_generation = new.generation
                    app.revision = new
                    app.desired = (new.manifest.replicas if record.desired is None
                                   else record.desired)
                    app.completed = app.given_up = 0
                record.state, record.phase = step.state, step.message
            if record.cancel_scope.cancelled_caught:
                end = plan.aborted(progress)
                record.state, record.phase = end.state, end.message
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

    async def _do(self, record: RolloutRecord, app: AppState, step: plan.Step
                  ) -> plan.Progress:
        """Do one step's I/O; returns the progress to decide the next step from."""
        cluster = self.cluster
        match step:
            case plan.Launch(generation, count, then):
                ids = self._launch(record, app, app.revisions[generation], count)
                if isinstance(ids, placement.NoCapacity):
                    return plan.refused(then, ids.message)
                return plan.launched(then, ids, cluster.clock())
            case plan.Relaunch(replica_id, generation, then):
                # Something outside skr8tr holds that port: the port is blocked on that
                # host for a while, and a new placement picks another one.
                cluster.forget_replica(replica_id)
                ids = self._launch(record, app, app.revisions[generation], 1)
                if isinstance(ids, placement.NoCapacity):
                    return plan.refused(then, ids.message)
                return plan.relaunched(then, replica_id, ids[0])
            case plan.AwaitReady(waiting, deadline, phase, then, probe):
                if record.phase != phase:
                    self._phase(record, phase, replicas=list(waiting))
                record.probe = probe
                with trio.move_on_at(deadline):
                    await cluster.wait_changed()
                return then
            case plan.AwaitTraffic(waiting, generation, until, since, _, phase, then):
                a = record.analysis
                if a is None or (a.replicas, a.since) != (waiting, since):
                    record.analysis = LiveAnalysis(generation, waiting, since,
                                                   then.work.baseline, then.work.policy.analysis)
                if record.phase != phase:
                    self._phase(record, phase, replicas=list(waiting))
                with trio.move_on_at(until):
                    await first_of(cluster.wait_changed, cluster.traffic.wait_added,
                                    record.poked.wait)
                return then
            case plan.AnalysisDone(verdict, replicas, generation, seen, elapsed_s, then):
                a = record.analysis
                if a is None or a.replicas != replicas:  # judged at its first decision
                    a = record.analysis = LiveAnalysis(
                        generation, replicas, cluster.clock() - elapsed_s, seen,
                        app.revisions[generation].manifest.rollout.analysis)
                a.verdict, a.seen, a.elapsed_s = verdict, seen, elapsed_s
                record.poke()  # a promote waits for this
                cluster.events.publish("rollout.analysis", app=app.name,
                                       to_generation=record.to_generation,
                                       **a.status(cluster.traffic, cluster.clock()))
                return then
            case plan.Hold(phase, then):
                self._phase(record, phase)
                while record.paused:
                    await record.poked.wait()
                return then
            case plan.Retire(replica_ids, then):
                await self._drain_and_stop(record, app, list(replica_ids))
                return then
            case plan.StopNow(replica_ids, phase, then):
                self._phase(record, phase, replicas=list(replica_ids))
                await self._stop_and_wait(list(replica_ids), app, reason="rollout failed")
                return then
            case plan.Announce(phase, then):
                self._phase(record, phase)
                return then
            case plan.BatchDone(replaced, then):
                record.replaced = replaced
                cluster.events.publish("rollout.progress", app=app.name,
                                       replaced=record.replaced, total=record.total,
                                       to_generation=record.to_generation)
                # Durable per batch: a conductor killed now restarts knowing how far
                # this rollout got (rollout status, and the reason it ends with).
                cluster.save_soon(app.name)
                return then
            case plan.Failed(reason, then):
                record.reason = reason
                log.warning("rollout of %s failed: %s", app.name, reason)
                cluster.events.publish("rollout.failed", app=app.name, reason=reason,
                                       to_generation=record.to_generation)
                return then
        raise AssertionError(f"no way to do {step!r}")

    def _finish(self, record: RolloutRecord, app: AppState) -> None:
        if record.state == "rolling":  # ended by something unexpected (a bug, or shutdown)
            record.state = "failed"
            record.phase = "the rollout task ended unexpectedly; see the conductor log"
        record.finished_wall = self.cluster.wall()
        record.freeze_traffic()
        if record.analysis is not None and record.analysis.seen is None:
            a = record.analysis  # cut short (abort): the figures it had
            a.seen, a.elapsed_s = a.figures(record.book, self.cluster.clock())
        for entry in app.history:
            if entry.generation == record.to_generation:
                entry.state = record.state
                entry.finished = record.finished_wall
                entry.message = record.phase
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

    # ------------------------------------------------------------------ the I/O of a step

    def _launch(self, record: RolloutRecord, app: AppState, revision: Revision, count: int
                ) -> list[str] | placement.NoCapacity:
        """Place and launch ``count`` replicas; at the first that finds no room, that
        refusal (the ones launched before it stay, in ``record.launched`` if new)."""
        ids = []
        for _ in range(count):
            result = self.cluster.launch(app, revision)
            if isinstance(result, placement.NoCapacity):
                return result
            ids.append(result.replica_id)
            if revision.generation == record.to_generation:
                record.launched.add(result.replica_id)
        self._phase(record, f"launched {', '.join(ids)}", replicas=ids,
                    generation=revision.generation)
        return ids

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


def pruned_text(app: AppState, generation: int, keep: int) -> str:
    """Why a generation of ``app`` that was taken has no manifest any more."""
    return (f"its manifest was pruned (kept: the current generation's and {keep} others, "
            f"--keep-revisions; kept now: {', '.join(map(str, sorted(app.revisions)))}; "
            f"history keeps the last {revisions.HISTORY_KEPT} rows)")


class _AppReplicas(Mapping[str, plan.ReplicaView]):
    """An app's replicas as :func:`plan.decide` sees them, read from the cluster on
    demand: the rows the cluster holds, and those of the ``watched`` ids it has dropped
    but still remembers (how they ended). A decision reads its batch's few rows after
    every change and all of them only when it picks replicas, so a big app's rollout
    costs no copy of every row per change. Valid until the next checkpoint."""

    def __init__(self, cluster: Cluster, app: str, watched: tuple[str, ...]) -> None:
        self._cluster, self._app, self._watched = cluster, app, watched

    def __getitem__(self, replica_id: str) -> plan.ReplicaView:
        r = self._cluster.replicas.get(replica_id)
        if r is None and replica_id in self._watched:
            r = self._cluster.ended.get(replica_id)
        if r is None or r.app != self._app:
            raise KeyError(replica_id)
        return plan.ReplicaView(r.replica_id, r.generation, r.state, r.seq, r.port_clash,
                                r.exit_code, r.signal, r.message, r.probe_text, r.probe_status,
                                r.probe_count)

    def __iter__(self) -> Iterator[str]:
        held = self._cluster.replicas
        yield from (r.replica_id for r in held.of_app(self._app))
        yield from (rid for rid in self._watched
                    if rid not in held and rid in self._cluster.ended
                    and self._cluster.ended[rid].app == self._app)

    def __len__(self) -> int:
        return sum(1 for _ in self)
