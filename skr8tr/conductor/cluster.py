"""The conductor's state machine: nodes, apps, replicas and port claims.

Everything that changes the cluster's state lives here and runs
synchronously, so no change is ever half-applied while another task looks
(the house rule of h11's ``_state.py``). I/O stays outside: messages to a
node go into that node's outbox channel, sent by its session task; events go
to the :class:`~skr8tr.conductor.events.EventBus`. Decisions come from the
pure core (:mod:`skr8tr.core.placement`, :mod:`skr8tr.core.reconcile`).

Time: ``clock()`` (trio's clock, so tests can run under ``MockClock``) for
every deadline; ``wall()`` only for timestamps shown to people.

Cost (BENCHMARKS.md, "Scale"): nothing that runs per message scans every
replica or every node. Replicas are indexed by node and by app
(:class:`ReplicaTable`); placement takes the least-loaded node from a heap
(:class:`~skr8tr.core.placement.LoadOrder`), O(log nodes); a reconcile pass
looks only at the apps that changed, are due, or wait for capacity; a
heartbeat is O(1).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable, Mapping, Set
from typing import Any, Protocol

import trio

from skr8tr.conductor import state_file
from skr8tr.conductor.errors import CommandError
from skr8tr.conductor.events import EventBus
from skr8tr.conductor.ports import PortClaims
from skr8tr.conductor.store import Change, MemoryStore, Store, StoreError
from skr8tr.conductor.tables import (
    AppState,
    HistoryEntry,
    NodeState,
    ReplicaState,
    ReplicaTable,
    Revision,
    app_from_stored,
    manifest_sha256,
    stored_app,
)
from skr8tr.core import node_protocol, placement, placement_token, reconcile, replica_state
from skr8tr.core.manifest import Manifest

log = logging.getLogger("skr8tr.conductor")

UNPLACED_RETRY_S = 2.0  # look again at apps short of replicas this often
NODE_OUTBOX = 1000  # messages queued for one node before its session is cut
FORGET_EXPIRED_NODE_S = 600.0  # an expired node stays in `nodes` this long
DEFAULT_HEARTBEAT_S = 2.0
ENDED_KEPT = 1000  # ended replicas remembered for failure reports
# The expiry watchdog waking this much later than it asked means the conductor itself
# did not run (SIGSTOP, a suspended VM, a blocked event loop): see excuse_stall.
STALL_TOLERANCE_S = 0.5



class RolloutView(Protocol):
    """What the cluster needs of a rollout record (skr8tr/conductor/rollout.py)."""

    def status(self, now: float) -> dict[str, Any]: ...


class Cluster:
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
    ) -> None:
        self.node_timeout_s = node_timeout_s
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

    # ------------------------------------------------------------------ nodes

    def attach_node(self, hello: dict, outbox: trio.MemorySendChannel[str]) -> int:
        """A node proved its key and said hello; returns the session number.

        Raises CommandError("UNAUTHORIZED") when the node id is held by a
        different key (a node may not impersonate another).
        """
        node_id = hello["node_id"]
        now = self.clock()
        old = self.nodes.get(node_id)
        if old is not None and old.key != hello["key"] and not old.expired:
            raise CommandError(
                "UNAUTHORIZED",
                f"node id {node_id!r} is held by another key; give this node its own --node-id",
            )
        self._session += 1
        if old is not None and old.outbox is not None:
            log.info("node %s reconnected; replacing its previous session", node_id)
            old.outbox.close()
        node = NodeState(
            node_id=node_id, key=hello["key"], address=hello["address"],
            cores=hello["cores"], ram_total_mb=hello["ram_total_mb"],
            ram_free_mb=hello["ram_free_mb"], cpu_pct=float(hello["cpu_pct"]),
            last_seen=now, session=self._session, outbox=outbox,
        )
        self.nodes[node_id] = node
        self._offer_node(node_id)
        if old is not None and old.address != node.address:
            # Its replicas' ports were claimed on the old address.
            for r in self._replicas_on(node_id):
                self.ports.release(r)
                r.address = node.address
                self.ports.claim(r)
        self.events.publish("node.joined", node=node_id, address=node.address,
                            cores=node.cores, ram_total_mb=node.ram_total_mb)
        log.info("node %s joined from %s (%d cores, %d MB RAM)", node_id, node.address,
                 node.cores, node.ram_total_mb)
        self._sync_reported_replicas(node, hello["replicas"])
        self._node_joined.set()
        self._node_joined = trio.Event()
        self.mark_dirty()
        return node.session

    def _sync_reported_replicas(self, node: NodeState, reports: list[dict]) -> None:
        reported = {r["replica"]: r for r in reports}
        for r in list(self._replicas_on(node.node_id)):
            if r.replica_id in reported:
                report = reported.pop(r.replica_id)
                self.replica_report(node.node_id, report)
                if r.stop_requested and report["state"] not in ("exited", "failed"):
                    self.send(node.node_id, "stop", replica=r.replica_id)  # asked while away
            elif r.state not in reconcile.ENDED_STATES:
                # The node no longer has it (the agent restarted without it).
                self._replica_ended(r, exit_code=None, signal=None, launch_failed=False,
                                    node_lost=True, message=f"node {node.node_id} lost it")
        for report in reported.values():
            owner = self.replicas.get(report["replica"])
            if owner is not None:  # placed on another node: not this node's to claim
                self._refuse_claim(node.node_id, owner)
                continue
            if report["state"] in ("exited", "failed"):
                continue
            self._adopt(node, report)

    def _adopt(self, node: NodeState, report: dict) -> None:
        """A node reports a replica this conductor does not know (it restarted, or the node
        was lost and came back). A replica of a known revision of an app is adopted, with
        its pid and port, and the reconciler then trims any surplus; anything else is
        stopped. Its port is claimed until it exits, unless another replica holds it.

        Only with the placement token its launch carried, for this very node id: a node
        cannot pass off a replica of another node, or one it made up, as its own.
        """
        if not placement_token.check(
                self.placement_secret, report.get("token"), node_id=node.node_id,
                replica=report["replica"], app=report["app"],
                generation=report["generation"], port=report.get("port")):
            log.warning("node %s reports replica %s (app %s, pid %s) without a placement "
                        "token for this node; refused, and told to stop it", node.node_id,
                        report["replica"], report["app"], report.get("pid"))
            self.events.publish("node.claim_refused", node=node.node_id,
                                replica=report["replica"], owner=None)
            self.send(node.node_id, "stop", replica=report["replica"])
            return
        app = self.apps.get(report["app"])
        revision = None if app is None else app.revisions.get(report["generation"])
        r = ReplicaState(
            replica_id=report["replica"], app=report["app"], generation=report["generation"],
            node_id=node.node_id, address=node.address, port=report.get("port"),
            seq=self._next_seq(), launched_at=self.clock(),
            state=report["state"] if report["state"] != "unhealthy" else "running",
            pid=report.get("pid"),
            drain_s=0.0 if revision is None else revision.manifest.rollout.drain_s,
        )
        holder = self.ports.holder(r.address, r.port)
        self.replicas[r.replica_id] = r
        if holder is None:
            self.ports.claim(r)
        if revision is None or holder is not None:
            why = ("no app claims it" if revision is None
                   else f"port {r.port} on {r.address} is held by {holder}")
            log.warning("node %s runs %s (pid %s): %s; stopping it", node.node_id,
                        r.replica_id, r.pid, why)
            self.stop_replica(r.replica_id, why)
            return
        log.info("adopted %s (pid %s, port %s, generation %d) on %s", r.replica_id, r.pid,
                 r.port, r.generation, node.node_id)
        self.events.publish("replica.adopted", app=r.app, replica=r.replica_id,
                            node=node.node_id, pid=r.pid, port=r.port, generation=r.generation,
                            state=r.state)
        self.mark_dirty(r.app)

    def detach_node(self, node_id: str, session: int) -> None:
        """A node's session ended. It is lost only when its heartbeats stay away too long."""
        node = self.nodes.get(node_id)
        if node is None or node.session != session:
            return  # replaced by a newer session already
        node.outbox = None
        self.events.publish("node.disconnected", node=node_id)
        log.info("node %s disconnected; it expires in %.1f s unless it comes back",
                 node_id, node.last_seen + self.node_timeout_s - self.clock())
        self.mark_dirty()

    def node_heartbeat(self, node_id: str, msg: dict) -> None:
        node = self.nodes[node_id]
        node.last_seen = self.clock()
        cpu_pct = float(msg["cpu_pct"])
        lower = cpu_pct < node.cpu_pct
        node.cpu_pct = cpu_pct
        node.ram_free_mb = msg["ram_free_mb"]
        node.ram_total_mb = msg["ram_total_mb"]
        node.cores = msg["cores"]
        node.reserved_ram_mb = 0
        node.reserved_cpu = 0.0
        if lower:
            self._offer_node(node_id)

    def next_expiry(self) -> float | None:
        deadlines = [n.last_seen + self.node_timeout_s for n in self.nodes.values()
                     if not n.expired]
        return min(deadlines) if deadlines else None

    async def wait_node_joined(self) -> None:
        await self._node_joined.wait()

    def expire_nodes(self) -> list[str]:
        """Expire every node whose last heartbeat is ``node_timeout_s`` old or older."""
        now = self.clock()
        expired = []
        for node in self.nodes.values():
            if node.expired or now < node.last_seen + self.node_timeout_s:
                continue
            node.expired = True
            if node.outbox is not None:
                node.outbox.close()
                node.outbox = None
            expired.append(node.node_id)
            log.warning("node %s lost: no heartbeat for %.1f s; re-placing its replicas",
                        node.node_id, now - node.last_seen)
            self.events.publish("node.lost", node=node.node_id,
                                silent_s=round(now - node.last_seen, 3))
            for r in list(self._replicas_on(node.node_id)):
                if r.state in reconcile.ENDED_STATES:
                    self.ports.release(r)
                    continue
                self._replica_ended(r, exit_code=None, signal=None, launch_failed=False,
                                    node_lost=True, message=f"node {node.node_id} lost")
        for node_id in [n.node_id for n in self.nodes.values()
                        if n.expired and now - n.last_seen > FORGET_EXPIRED_NODE_S]:
            del self.nodes[node_id]
        if expired:
            self.mark_dirty()
        return expired

    def _replicas_on(self, node_id: str) -> list[ReplicaState]:
        return self.replicas.on_node(node_id)

    def send(self, node_id: str, kind: str, **fields: Any) -> bool:
        """Queue a message for a node; False when it is not connected (or too far behind)."""
        node = self.nodes.get(node_id)
        if node is None or node.outbox is None:
            return False
        text = node_protocol.encode_node_message(kind, **fields)
        try:
            node.outbox.send_nowait(text)
            self.node_messages_queued += 1
        except (trio.WouldBlock, trio.ClosedResourceError):
            log.warning("node %s is %d messages behind; closing its session", node_id,
                        NODE_OUTBOX)
            node.outbox.close()
            node.outbox = None
            return False
        return True

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
               avoid: frozenset[str] = frozenset()) -> ReplicaState | placement.NoCapacity:
        """Place one replica of ``revision``, claim its port and tell the node to start it."""
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
        )
        sent = self.send(where.node_id, "launch", **launch.fields())
        self.events.publish("replica.placed", app=app.name, replica=r.replica_id,
                            node=r.node_id, port=r.port, generation=r.generation)
        log.info("placed %s (generation %d) on %s port %s", r.replica_id, r.generation,
                 r.node_id, r.port)
        if not sent:
            self._replica_ended(r, exit_code=None, signal=None, launch_failed=False,
                                node_lost=True, message=f"node {r.node_id} went away")
        return r

    def replica_report(self, node_id: str, msg: dict) -> None:
        """Apply a ``replica`` report from a node (idempotent).

        A node speaks only for the replicas placed on it: a report about a replica
        that the conductor placed on another node is refused, logged, and changes
        nothing (issue #13.2). A report that an ended replica runs re-adopts it or
        stops it, never leaves it running untracked (#13.3).
        """
        r = self.replicas.get(msg["replica"])
        if r is None or r.node_id != node_id:
            if r is not None:
                self._refuse_claim(node_id, r)
            elif msg["state"] not in ("exited", "failed"):
                log.warning("node %s reports unknown replica %s; stopping it", node_id,
                            msg["replica"])
                self.send(node_id, "stop", replica=msg["replica"])
            return
        state = msg["state"]
        if r.state in reconcile.ENDED_STATES:
            self._report_on_ended(r, msg)
            return
        if msg.get("pid") is not None:
            r.pid = msg["pid"]
        if state in ("exited", "failed"):
            port_clash = (state == "failed" and msg.get("reason") == "port_in_use")
            r.port_clash = port_clash
            if port_clash and r.port is not None:
                self.ports.block(r.address, r.port, self.clock())
            self._replica_ended(
                r, exit_code=msg.get("exit_code"), signal=msg.get("signal"),
                launch_failed=state == "failed", node_lost=port_clash,
                message=msg.get("message"),
            )
            return
        if r.state == "draining":
            if state in ("running", "ready"):
                r.drained_from = state  # what an undrain puts back
            return
        if r.state == "stopping":
            return  # a late report about a replica that is already on its way out
        if state == "unhealthy":
            self.events.publish("replica.unhealthy", app=r.app, replica=r.replica_id,
                                node=node_id, message=msg.get("message"))
            log.warning("replica %s is unhealthy; replacing it", r.replica_id)
            self.retire_replica(r.replica_id, "unhealthy")
            return
        if state != r.state:
            r.state = replica_state.transition(r.replica_id, r.state, state)
            self.events.publish(f"replica.{state}", app=r.app, replica=r.replica_id,
                                node=node_id, pid=r.pid, port=r.port, generation=r.generation)
            self.mark_dirty(r.app)

    def _refuse_claim(self, node_id: str, owner: ReplicaState) -> None:
        log.warning("node %s claims replica %s, which was placed on node %s; refused (the "
                    "rightful row is left as it is)", node_id, owner.replica_id, owner.node_id)
        self.events.publish("node.claim_refused", node=node_id, replica=owner.replica_id,
                            owner=owner.node_id)

    def _report_on_ended(self, r: ReplicaState, msg: dict) -> None:
        """Its node says a replica that ended here is alive (or confirms it has ended).

        A replica declared ended only because its node fell silent (a conductor
        paused past --node-timeout, a network partition) is re-adopted with its
        pid when its app still has its revision and its port is free; the
        reconciler then trims any surplus. Any other is stopped.
        """
        state = msg["state"]
        if state in ("exited", "failed"):
            return  # the end we had assumed, now confirmed
        app = self.apps.get(r.app)
        holder = self.ports.holder(r.address, r.port)
        if (not r.lost_with_node or r.stop_requested or app is None
                or r.generation not in app.revisions or holder not in (None, r.replica_id)):
            why = ("it had ended" if not r.lost_with_node else
                   "its app is gone" if app is None or r.generation not in app.revisions else
                   f"port {r.port} on {r.address} is held by {holder}" if holder else
                   "it was being stopped")
            log.warning("node %s reports %s (pid %s) alive, but %s; stopping it", r.node_id,
                        r.replica_id, msg.get("pid"), why)
            self.send(r.node_id, "stop", replica=r.replica_id)
            return
        back = replica_state.readopt(r.replica_id, r.state,
                                     "ready" if state == "ready" else "running",
                                     lost_with_node=r.lost_with_node)
        self.replicas.reviving(r)
        r.state, r.lost_with_node = back, False
        r.restart_at = r.exit_code = r.signal = r.message = None
        if msg.get("pid") is not None:
            r.pid = msg["pid"]
        self.ended.pop(r.replica_id, None)
        self.ports.claim(r)
        log.info("re-adopted %s (pid %s, port %s) on %s: its node is back", r.replica_id,
                 r.pid, r.port, r.node_id)
        self.events.publish("replica.adopted", app=r.app, replica=r.replica_id,
                            node=r.node_id, pid=r.pid, port=r.port, generation=r.generation,
                            state=r.state)
        self.mark_dirty(r.app)
        if state == "unhealthy":
            self.retire_replica(r.replica_id, "unhealthy")

    def _replica_ended(self, r: ReplicaState, *, exit_code: int | None, signal: int | None,
                       launch_failed: bool, node_lost: bool, message: str | None) -> None:
        if r.state in replica_state.ENDED:  # a bug in the caller: it can end only once
            raise replica_state.IllegalTransition(r.replica_id, r.state, "exited or failed")
        self.ports.release(r)
        self.replicas.ending(r)
        r.exit_code, r.signal, r.message = exit_code, signal, message
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
        self.send(r.node_id, "stop", replica=r.replica_id)

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
        for action in plan.actions:
            if isinstance(action, reconcile.Forget):
                r = self.replicas.pop(action.replica_id, None)
                if r is not None:
                    self.ports.release(r)
            elif isinstance(action, reconcile.Stop):
                self.retire_replica(action.replica_id, action.reason)
            elif short is None:
                result = self.launch(app, app.revision, restart_count=action.restart_count)
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

    def excuse_stall(self, stalled_s: float) -> None:
        """The conductor did not run for about *stalled_s* (it was paused, its machine
        suspended, or its loop blocked): no node could be heard meanwhile, so each gets
        that time back before it can be declared lost. Their heartbeats, held in the
        sockets, arrive next; a node that really died expires that much later (#13.3)."""
        now = self.clock()
        excused = 0
        for node in self.nodes.values():
            if not node.expired:
                node.last_seen = min(now, node.last_seen + stalled_s)
                excused += 1
        log.warning("the conductor did not run for %.1f s (paused, suspended, or its event "
                    "loop blocked); %d node(s) get that time back before they can be lost",
                    stalled_s, excused)
        self.events.publish("conductor.stalled", stalled_s=round(stalled_s, 3), nodes=excused)

    # ------------------------------------------------------------------ apps

    def new_revision(self, generation: int, manifest: Manifest, text: str,
                     fmt: str) -> Revision:
        return Revision(generation, manifest, text, fmt, manifest_sha256(text))

    # ------------------------------------------------------------------ durable state

    @contextlib.asynccontextmanager
    async def changing(self, app: str) -> AsyncIterator[None]:
        """Hold while changing ``app``'s desired state: compute, ``commit``, apply. Changes
        of one app are made one after the other, so that each starts from the one before
        it and the store ends as memory does; changes of different apps overlap (and
        share the store's writes)."""
        lock = self._app_locks.get(app)
        if lock is None:
            lock = self._app_locks[app] = trio.Lock()
        try:
            async with lock:
                yield
        finally:
            if not lock.locked() and not lock.statistics().tasks_waiting:
                self._app_locks.pop(app, None)

    async def commit(self, change: Change) -> None:
        """Make a command's change durable before it takes effect here (hold ``changing``).

        Raises CommandError INTERNAL when the store cannot; it kept nothing of it."""
        try:
            await self.store.apply(change)
        except StoreError as exc:
            raise CommandError("INTERNAL", f"{exc}; nothing was changed") from None

    def save_soon(self, app: str) -> None:
        """``app`` changed other than by a command (a rollout went a batch further, or
        ended): store it as it is then, and its last rollout; retried until stored."""
        self.unsaved.add(app)
        self.unsaved_event.set()

    def saved_form(self, app: str) -> Change:
        """The change that stores ``app`` (and its last rollout) as it is now, or removes
        it when it is gone."""
        current = self.apps.get(app)
        if current is None:
            return Change(apps={app: None}, rollouts={app: None})
        rollout = self.rollouts.get(app)
        return Change(apps={app: stored_app(current)},
                      rollouts={} if rollout is None else {app: rollout.status(self.clock())})

    def rollout_statuses(self) -> list[dict[str, Any]]:
        """The last rollout of each app, as ``rollout status --json`` shows it."""
        now = self.clock()
        return [r.status(now) for _, r in sorted(self.rollouts.items())]

    async def open_store(self, where: str) -> tuple[state_file.StoredState | None, list[str]]:
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

    def load_state(self, stored: state_file.StoredState, where: str) -> list[str]:
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

    def start_adopt_grace(self) -> None:
        self.adopt_until = self.clock() + self.adopt_grace_s

    # ------------------------------------------------------------------ apps

    def new_app(self, manifest: Manifest, text: str, fmt: str) -> AppState:
        """An app at generation 1, not yet registered (persist first, then add_app)."""
        revision = self.new_revision(1, manifest, text, fmt)
        app = AppState(name=manifest.app, revision=revision, desired=manifest.replicas)
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
