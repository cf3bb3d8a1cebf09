"""The conductor's state machine: nodes, apps, replicas and port claims.

Everything that changes the cluster's state is a method of :class:`Cluster`
and runs synchronously, so no change is ever half-applied while another task
looks (the house rule of h11's ``_state.py``). The transitions are in three
files by who drives them: here commands, rollouts and the reconciler
(launch, drain, stop, apps, the reconcile pass); in
:mod:`~skr8tr.conductor.node_reports` what nodes report (hello, heartbeats,
replica states, silence); in :mod:`~skr8tr.conductor.durable` the store (a
command's change committed, a rollout's progress saved, the state loaded at
start). The records and indexes are in
:mod:`~skr8tr.conductor.tables`, port claims in :mod:`~skr8tr.conductor.ports`,
the rows shown to people in :mod:`~skr8tr.conductor.views`, the long-running
tasks in :mod:`~skr8tr.conductor.loops`. I/O stays outside: messages to a
node go into that node's outbox channel, sent by its session task; events go
to the :class:`~skr8tr.conductor.events.EventBus`. Decisions come from the
pure core (:mod:`skr8tr.core.placement`, :mod:`skr8tr.core.reconcile`).

Time: ``clock()`` (trio's clock, so tests can run under ``MockClock``) for
every deadline; ``wall()`` only for timestamps shown to people.

Cost (measured in BENCHMARKS.md, "Scale"): nothing that runs per message scans every
replica or every node. Replicas are indexed by node and by app
(:class:`ReplicaTable`); placement takes the least-loaded node from a heap
(:class:`~skr8tr.core.placement.LoadOrder`), O(log nodes); a reconcile pass
looks only at the apps that changed, are due, or wait for capacity; a
heartbeat is O(1).
"""

from __future__ import annotations

import collections
import logging
import secrets
import time
from collections.abc import Callable, Mapping, Set
from typing import Any, Protocol

import trio

from skr8tr.conductor.durable import DurableState
from skr8tr.conductor.events import EventBus
from skr8tr.conductor.ingress_sessions import IngressDesk
from skr8tr.conductor.node_reports import NodeReports
from skr8tr.conductor.ports import PortClaims
from skr8tr.conductor.seat import Seat
from skr8tr.conductor.store import (
    MemoryStore,
    Store,
)
from skr8tr.conductor.tables import (
    AppState,
    HistoryEntry,
    NodeState,
    ReplicaState,
    ReplicaTable,
    Revision,
    manifest_sha256,
)
from skr8tr.conductor.traffic import TrafficBook
from skr8tr.core import (
    node_protocol,
    placement,
    placement_token,
    reconcile,
    replica_state,
    revisions,
    why,
)
from skr8tr.core.manifest import Manifest

log = logging.getLogger("skr8tr.conductor")

UNPLACED_RETRY_S = 2.0  # look again at apps short of replicas this often
DEFAULT_HEARTBEAT_S = 2.0
ENDED_KEPT = 1000  # ended replicas remembered for failure reports
# The expiry watchdog waking this much later than it asked means the conductor itself
# did not run (SIGSTOP, a suspended VM, a blocked event loop): see excuse_stall.
STALL_TOLERANCE_S = 0.5



class RolloutView(Protocol):
    """What the cluster needs of a rollout record (skr8tr/conductor/rollout.py)."""

    def status(self, now: float) -> dict[str, Any]: ...

    def stored(self, now: float) -> dict[str, Any]: ...


class Cluster(NodeReports, DurableState):
    """Desired and observed state of the whole cluster, and every change to it."""

    def __init__(
        self,
        *,
        node_timeout_s: float = 15.0,
        port_range: tuple[int, int] = placement.DEFAULT_PORT_RANGE,
        heartbeat_s: float | None = None,
        store: Store | None = None,
        adopt_grace_s: float | None = None,
        clock: Callable[[], float] = trio.current_time,
        wall: Callable[[], float] = time.time,
        seat: Seat | None = None,
        keep_revisions: int = revisions.DEFAULT_KEEP_REVISIONS,
    ) -> None:
        # Leader or follower, the term, the leader's URL (a lone conductor: leader, term 0).
        self.seat = Seat(url="") if seat is None else seat
        # Called with the reason when a write finds that another conductor leads now.
        self.deposed: Callable[[str], None] = lambda reason: None
        self.node_timeout_s = node_timeout_s
        # --keep-revisions: manifests kept per app besides the current one (core/revisions.py
        # retain); older ones are pruned when a rollout starts.
        self.keep_revisions = keep_revisions
        self.port_range = port_range
        self.heartbeat_s = heartbeat_s or min(DEFAULT_HEARTBEAT_S, node_timeout_s / 3)
        self.store: Store = MemoryStore() if store is None else store
        self.adopt_grace_s = 2 * self.heartbeat_s if adopt_grace_s is None else adopt_grace_s
        # Apps loaded from the state file wait until then for their nodes to report
        # what is still running before anything new is placed (set by start_adopt_grace).
        self.adopt_until = float("-inf")
        self.loaded_apps: set[str] = set()
        # Apps whose desired state changed other than by a command (a rollout's progress
        # and end): serve_store_writes writes them as they are then (save_soon).
        self.unsaved: set[str] = set()
        self.unsaved_event = trio.Event()
        self._app_locks: dict[str, trio.Lock] = {}
        # Signs every placement (core/placement_token.py); load_state puts back the one
        # the state file keeps, so that tokens given before a restart still prove.
        self.placement_secret = placement_token.new_secret()
        self.clock = clock
        self.wall = wall
        self.events = EventBus(wall)
        self.nodes: dict[str, NodeState] = {}
        self.node_messages_queued = 0  # ever; lets a command's caller see it sent some
        self.apps: dict[str, AppState] = {}
        self.replicas = ReplicaTable(on_fewer=self._offer_node)
        self.ports = PortClaims()
        self._seq = 0
        self._session = 0
        self._dirty = trio.Event()
        self._changed = trio.Event()
        self._node_joined = trio.Event()
        # What the next reconcile pass looks at: every app, or these.
        self._all_dirty = True
        self._dirty_apps: set[str] = set()
        self._app_wake: dict[str, float] = {}  # app -> when its last pass asked to look again
        self._retiring: set[str] = set()  # replicas given a drain_until by retire_replica
        self._load = placement.LoadOrder()  # live nodes by load, for launch()
        # The last replicas that ended, with their exit details, for rollout failure reports.
        self.ended: collections.OrderedDict[str, ReplicaState] = collections.OrderedDict()
        # App -> its last rollout, running or ended (the rollout manager's records).
        self.rollouts: dict[str, RolloutView] = {}
        # What the ingresses counted per replica and generation (/v1/ingress).
        self.traffic = TrafficBook(self._replica_owner)
        # The ingress sessions reporting it: the daemon's own desk (it outlives a term).
        self.ingresses = IngressDesk()

    # ------------------------------------------------------------------ signals to loops

    def mark_dirty(self, app: str | None = None) -> None:
        """Wake the reconciler and every waiter: desired or observed state changed
        (of ``app`` only, when given: the next pass need not look at the others)."""
        if app is None:
            self._all_dirty = True
        else:
            self._dirty_apps.add(app)
        self._dirty.set()
        self._changed.set()
        self._changed = trio.Event()

    async def wait_changed(self) -> None:
        """Return at the next change of state (callers re-check what they wait for)."""
        await self._changed.wait()

    # ------------------------------------------------------------------ ports

    def taken_ports(self) -> Mapping[str, Set[int]]:
        """Address -> ports held or blocked there: a live view, valid until the next claim."""
        return self.ports.taken(self.clock())

    # ------------------------------------------------------------------ replicas

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _new_replica_id(self, app: str) -> str:
        while True:
            rid = f"{app}-{secrets.token_hex(3)}"
            if rid not in self.replicas:
                return rid

    def node_view(self, node_id: str) -> placement.NodeView | None:
        n = self.nodes.get(node_id)
        if n is None:
            return None
        return placement.NodeView(
            node_id=n.node_id, address=n.address, live=n.connected and not n.expired,
            cpu_pct=n.cpu_pct, cores=n.cores, ram_free_mb=n.ram_free_mb,
            replicas=self.replicas.live_on_node.get(n.node_id, 0),
            reserved_ram_mb=n.reserved_ram_mb, reserved_cpu=n.reserved_cpu,
        )

    def node_views(self) -> list[placement.NodeView]:
        return [self.node_view(node_id) for node_id in sorted(self.nodes)]  # type: ignore[misc]

    def _offer_node(self, node_id: str) -> None:
        """A node's load may have gone down (or it joined): tell the placement heap."""
        view = self.node_view(node_id)
        if view is not None and view.live:
            self._load.offer(view)
        if len(self._load) > 4 * len(self.nodes) + 64:
            self._load.rebuild(self.node_views())

    def launch(self, app: AppState, revision: Revision, *, restart_count: int = 0,
               avoid: frozenset[str] = frozenset(), replaces: ReplicaState | None = None,
               ) -> ReplicaState | placement.NoCapacity:
        """Place one replica of ``revision``, claim its port and tell the node to start it.
        With ``replaces`` (an ended replica), the new one takes over its slot: the same
        slot name, one more restart, and why that one ended."""
        m = revision.manifest
        request = placement.PlacementRequest(
            app=app.name, port=m.port, avoid_nodes=avoid,
            ram_mb=None if m.ram_bytes is None else -(-m.ram_bytes // 2**20),
            cpu=m.cpu,
        )
        taken = self.taken_ports()
        where = self._load.place(request, self.node_view, taken, self.port_range)
        if where is None:  # nothing fits: the full scan says why, node by node
            where = placement.place(request, self.node_views(), taken, self.port_range)
        if isinstance(where, placement.NoCapacity):
            return where
        r = ReplicaState(
            replica_id=self._new_replica_id(app.name), app=app.name,
            generation=revision.generation, node_id=where.node_id, address=where.address,
            port=where.port, seq=self._next_seq(), launched_at=self.clock(),
            restart_count=restart_count, drain_s=m.rollout.drain_s,
        )
        if replaces is not None:
            r.slot, r.restarts = replaces.slot, replaces.restarts + 1
            if replaces.ended_reason is not None:
                r.last_end = (replaces.ended_reason, replaces.exit_code, replaces.signal)
            elif replaces.vacating is not None:
                r.last_end = (replaces.vacating, None, None)
            replaces.vacating = None
        self.replicas[r.replica_id] = r
        self.ports.claim(r)
        node = self.nodes[where.node_id]
        node.reserved_ram_mb += request.ram_mb or 0
        node.reserved_cpu += request.cpu or 0.0
        launch = node_protocol.Launch.for_replica(
            m, replica=r.replica_id, generation=revision.generation, host=where.address,
            port=where.port,
            token=placement_token.make(self.placement_secret, node_id=where.node_id,
                                       replica=r.replica_id, app=app.name,
                                       generation=revision.generation, port=where.port),
            slot=self._sealed_slot(r) if node.reads_slots else None,
        )
        sent = self.send(where.node_id, launch)
        self.events.publish("replica.placed", app=app.name, replica=r.replica_id,
                            node=r.node_id, port=r.port, generation=r.generation,
                            **({"slot": r.slot, "restarts": r.restarts} if r.restarts else {}))
        log.info("placed %s (generation %d) on %s port %s", r.replica_id, r.generation,
                 r.node_id, r.port)
        if not sent:
            self._replica_ended(r, exit_code=None, signal=None, launch_failed=False,
                                node_lost=True, message=f"node {r.node_id} went away")
        return r

    def _sealed_slot(self, r: ReplicaState) -> dict[str, Any] | None:
        """The ``slot`` of *r*'s launch: None for a slot's first replica (its launch is
        what it always was), else its slot, restarts and last end, sealed for its node:
        the node keeps it and reports it back, so that this conductor's successor (a
        restart, a new leader) shows the same slot and count (issue #17)."""
        if (r.slot == r.replica_id and not r.restarts and not r.restart_count
                and r.last_end is None):
            return None
        last_end = None if r.last_end is None else (
            why.clean(r.last_end[0]), r.last_end[1], r.last_end[2])
        return {
            "name": r.slot, "restarts": r.restarts, "backoff": r.restart_count,
            "last_end": None if last_end is None else {
                "reason": last_end[0], "exit_code": last_end[1], "signal": last_end[2]},
            "mac": placement_token.make_slot(
                self.placement_secret, node_id=r.node_id, replica=r.replica_id, app=r.app,
                name=r.slot, restarts=r.restarts, backoff=r.restart_count,
                last_end=last_end),
        }

    def _replica_ended(self, r: ReplicaState, *, exit_code: int | None, signal: int | None,
                       launch_failed: bool, node_lost: bool, message: str | None) -> None:
        if r.state in replica_state.ENDED:  # a bug in the caller: it can end only once
            raise replica_state.IllegalTransition(r.replica_id, r.state, "exited or failed")
        self.ports.release(r)
        self.replicas.ending(r)
        r.exit_code, r.signal, r.message = exit_code, signal, message
        r.ended_reason = why.reason(exit_code=exit_code, signal=signal, message=message,
                                    launch_failed=launch_failed)
        r.lost_with_node = node_lost and not r.port_clash
        self.ended[r.replica_id] = r
        while len(self.ended) > ENDED_KEPT:
            self.ended.popitem(last=False)
        app = self.apps.get(r.app)
        if r.stop_requested or app is None or r.generation != app.generation:
            r.state = replica_state.transition(r.replica_id, r.state,
                                               "exited" if exit_code == 0 else "failed")
            self.events.publish("replica.exited", app=r.app, replica=r.replica_id,
                                node=r.node_id, exit_code=exit_code, signal=signal,
                                requested=r.stop_requested, message=message)
            del self.replicas[r.replica_id]
            self.mark_dirty(r.app)
            return
        outcome = reconcile.on_exit(
            app_type=app.manifest.type, restart=app.manifest.restart, exit_code=exit_code,
            signal=signal, launch_failed=launch_failed, ran_for_s=self.clock() - r.launched_at,
            restart_count=r.restart_count, node_lost=node_lost, now=self.clock(),
        )
        r.state = replica_state.transition(r.replica_id, r.state, outcome.state)
        r.restart_at = outcome.restart_at
        r.restart_count = outcome.restart_count
        app.completed += outcome.completed
        app.given_up += outcome.given_up
        self.events.publish(
            f"replica.{outcome.state}", app=r.app, replica=r.replica_id, node=r.node_id,
            exit_code=exit_code, signal=signal, message=message,
            restart_in_s=None if outcome.restart_at is None
            else round(max(0.0, outcome.restart_at - self.clock()), 3),
        )
        log.info("replica %s %s (exit code %s, signal %s%s)%s", r.replica_id, outcome.state,
                 exit_code, signal, f", {message}" if message else "",
                 "" if outcome.restart_at is None  # (a lost node's replicas: due now)
                 else f"; restarting in {max(0.0, outcome.restart_at - self.clock()):.1f} s")
        self.mark_dirty(r.app)

    def drain_replica(self, replica_id: str) -> None:
        """Mark a replica ``draining``: it leaves the ingress before it is stopped."""
        r = self.replicas[replica_id]
        if r.state in ("running", "ready"):  # a pending one is not in the ingress yet
            r.drained_from = r.state
            r.state = replica_state.transition(r.replica_id, r.state, "draining")
            self.events.publish("replica.draining", app=r.app, replica=r.replica_id,
                                node=r.node_id, port=r.port, generation=r.generation)
            self.mark_dirty(r.app)

    def undrain_replica(self, replica_id: str) -> None:
        """Put a drained replica that was not stopped back as it was (an aborted rollout):
        ``ready`` only if it was ready (or became ready while draining)."""
        r = self.replicas.get(replica_id)
        if r is not None and r.state == "draining":
            back = replica_state.undrain_target(r.replica_id, r.drained_from)
            r.state = replica_state.transition(r.replica_id, r.state, back)
            r.drained_from = None
            self.events.publish(f"replica.{back}", app=r.app, replica=r.replica_id,
                                node=r.node_id, pid=r.pid, port=r.port, generation=r.generation,
                                undrained=True)
            self.mark_dirty(r.app)

    def _replica_owner(self, replica_id: str) -> tuple[str, int] | None:
        """The app and generation of a replica held or recently ended (traffic reports
        may arrive just after an end)."""
        r = self.replicas.get(replica_id) or self.ended.get(replica_id)
        return None if r is None else (r.app, r.generation)

    def forget_replica(self, replica_id: str) -> None:
        """Drop the row of an ended replica."""
        r = self.replicas.pop(replica_id, None)
        if r is not None:
            self.ports.release(r)
            self.mark_dirty(r.app)

    def retire_replica(self, replica_id: str, reason: str) -> None:
        """Take a replica out of service: drain it for its manifest's ``drain``, then stop it.

        The ingress stops routing to it at the ``draining`` event; the reconciler
        sends the stop when the drain time is up (at once when it is 0).
        """
        r = self.replicas[replica_id]
        if r.drain_s <= 0 or r.state not in reconcile.LIVE_STATES or r.state == "pending":
            self.stop_replica(replica_id, reason)
            return
        self.drain_replica(replica_id)
        r.drain_until = self.clock() + r.drain_s
        r.retire_reason = reason
        self._retiring.add(replica_id)
        self.mark_dirty(r.app)

    def _stop_drained(self, now: float) -> float | None:
        """Stop retiring replicas whose drain time is up; returns the next such time."""
        next_at = None
        for replica_id in list(self._retiring):
            r = self.replicas.get(replica_id)
            if r is None or r.drain_until is None:
                self._retiring.discard(replica_id)
                continue
            if r.state != "draining":
                continue
            if r.drain_until <= now:
                r.drain_until = None
                self.stop_replica(r.replica_id, r.retire_reason)
            elif next_at is None or r.drain_until < next_at:
                next_at = r.drain_until
        return next_at

    def stop_replica(self, replica_id: str, reason: str) -> None:
        """Ask the node to stop a replica; its row stays until the node confirms the exit."""
        r = self.replicas[replica_id]
        if r.state in reconcile.ENDED_STATES:
            self.ports.release(r)
            del self.replicas[replica_id]
            return
        r.state = replica_state.transition(r.replica_id, r.state, "stopping")
        r.stop_requested = True
        self.events.publish("replica.stopping", app=r.app, replica=r.replica_id,
                            node=r.node_id, reason=reason)
        node = self.nodes.get(r.node_id)
        if node is None or node.expired:
            self._replica_ended(r, exit_code=None, signal=None, launch_failed=False,
                                node_lost=True, message="its node is gone")
            return
        # If the node is disconnected the stop is repeated when it says hello again
        # (its report of a running replica in `stopping` state is answered with a stop).
        self.send(r.node_id, node_protocol.Stop(replica=r.replica_id))

    # ------------------------------------------------------------------ reconciliation

    def reconcile(self) -> float | None:
        """Converge every app once; returns when to look again (None: only on change).

        Apps nothing happened to since the last pass are left out, unless their
        last pass asked to be looked at by now or they are short of capacity (a
        change elsewhere may have freed some): the outcome is that of a pass over
        every app, at the cost of the ones that changed.
        """
        now = self.clock()
        wake_at: float | None = self._stop_drained(now)
        everything, dirty = self._all_dirty, self._dirty_apps
        self._all_dirty, self._dirty_apps = False, set()
        for app in list(self.apps.values()):
            due = self._app_wake.get(app.name)
            if not (everything or app.name in dirty or app.placement_error is not None
                    or (due is not None and due <= now)):
                continue
            app_wake = self.reconcile_app(app, now)
            if app_wake is None:
                self._app_wake.pop(app.name, None)
            else:
                self._app_wake[app.name] = app_wake
        for name in [name for name in self._app_wake if name not in self.apps]:
            del self._app_wake[name]
        for app_wake in self._app_wake.values():
            if wake_at is None or app_wake < wake_at:
                wake_at = app_wake
        return wake_at

    def reconcile_app(self, app: AppState, now: float | None = None) -> float | None:
        now = self.clock() if now is None else now
        if app.name in self.loaded_apps and now < self.adopt_until:
            return self.adopt_until  # nodes are still reporting what survived the restart
        views = [
            reconcile.ReplicaView(r.replica_id, r.generation, r.state, r.seq, r.restart_at,
                                  r.restart_count)
            for r in self.replicas.of_app(app.name)
        ]
        plan = reconcile.reconcile_app(
            reconcile.AppView(app.name, app.generation, app.desired, app.completed,
                              app.given_up, app.rolling),
            views, now,
        )
        short: placement.NoCapacity | None = None
        # Replicas retired as unhealthy: a new launch takes over their slots.
        vacated = [r for r in self.replicas.of_app(app.name)
                   if r.vacating is not None and r.generation == app.generation]
        for action in plan.actions:
            if isinstance(action, reconcile.Forget):
                r = self.replicas.pop(action.replica_id, None)
                if r is not None:
                    self.ports.release(r)
            elif isinstance(action, reconcile.Stop):
                self.retire_replica(action.replica_id, action.reason)
            elif short is None:
                if action.replaces is not None:
                    replaces = self.replicas.get(action.replaces)
                else:
                    replaces = vacated.pop() if vacated else None
                result = self.launch(app, app.revision, restart_count=action.restart_count,
                                     replaces=replaces)
                if isinstance(result, placement.NoCapacity):
                    short = result
                elif action.replaces is not None:
                    old = self.replicas.pop(action.replaces, None)
                    if old is not None:
                        self.ports.release(old)
        message = None if short is None else short.message
        if message != app.placement_error:
            app.placement_error = message
            if message is not None:
                log.warning("app %s is short of replicas: %s", app.name, message)
                self.events.publish("app.unplaced", app=app.name, message=message)
        if short is not None:
            retry = now + UNPLACED_RETRY_S
            return retry if plan.wake_at is None else min(plan.wake_at, retry)
        return plan.wake_at

    def take_dirty(self) -> trio.Event:
        """For the reconciler, before a pass: the event the next change sets."""
        self._dirty = trio.Event()
        return self._dirty

    # ------------------------------------------------------------------ apps

    def new_revision(self, generation: int, manifest: Manifest, text: str,
                     fmt: str) -> Revision:
        return Revision(generation, manifest, text, fmt, manifest_sha256(text))

    # ------------------------------------------------------------------ apps

    def new_app(self, manifest: Manifest, text: str, fmt: str) -> AppState:
        """An app at generation 1, not yet registered (persist first, then add_app)."""
        revision = self.new_revision(1, manifest, text, fmt)
        app = AppState(name=manifest.app, revision=revision, desired=manifest.replicas,
                       last_generation=1)
        app.revisions[1] = revision
        now = self.wall()
        app.history.append(HistoryEntry(1, "complete", now, now, revision.sha256))
        return app

    def add_app(self, app: AppState) -> AppState:
        manifest = app.manifest
        self.apps[app.name] = app
        self.events.publish("app.created", app=app.name, generation=1,
                            replicas=manifest.replicas)
        log.info("app %s created: generation 1, %d replica(s)", app.name, manifest.replicas)
        return app

    def remove_app(self, name: str) -> int:
        """Forget an app and stop all its replicas; returns how many are being stopped."""
        self.apps.pop(name)
        self.loaded_apps.discard(name)
        self.replicas.ran.forget_app(name)  # its logs are no longer asked for
        self.traffic.forget_app(name)
        stopping = 0
        for r in self.replicas.of_app(name):
            if r.state in reconcile.ENDED_STATES:
                self.ports.release(r)
                del self.replicas[r.replica_id]
            elif r.state not in reconcile.LEAVING_STATES:
                self.retire_replica(r.replica_id, "app removed")
                stopping += 1
            else:
                stopping += 1
        self.events.publish("app.removed", app=name, stopping=stopping)
        log.info("app %s removed; stopping %d replica(s)", name, stopping)
        self.mark_dirty(name)
        return stopping

    def scale_app(self, name: str, replicas: int) -> AppState:
        app = self.apps[name]
        before = app.desired
        app.desired = replicas
        app.given_up = 0
        app.completed = 0
        self.events.publish("app.scaled", app=name, replicas_from=before, replicas_to=replicas)
        log.info("app %s scaled %d -> %d", name, before, replicas)
        self.mark_dirty(name)
        return app
