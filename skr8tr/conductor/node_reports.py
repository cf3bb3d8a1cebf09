"""What nodes tell the conductor: hello, heartbeats, replica reports, silence.

Part of the :class:`~skr8tr.conductor.cluster.Cluster` state machine (a mixin of
it): the transitions that a node's session and the expiry watchdog drive. A
node's hello re-syncs its replicas (re-adopting with a placement token, stopping
what it may not run), a heartbeat refreshes its load, a report moves a replica
through its states, and a node silent past ``node_timeout_s`` is lost with its
replicas. The transitions that commands, rollouts and the reconciler drive are
in cluster.py; both work on the same tables, synchronously.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio

from skr8tr.conductor.errors import CommandError
from skr8tr.conductor.tables import NodeState, ReplicaState
from skr8tr.core import node_protocol, placement_token, reconcile, replica_state, why
from skr8tr.core.node_protocol import (
    AppGone,
    Heartbeat,
    Hello,
    NodeMessage,
    ReplicaReport,
    Stop,
)
from skr8tr.core.signatures import fingerprint, key_algorithm

if TYPE_CHECKING:
    from skr8tr.conductor.cluster import Cluster

log = logging.getLogger("skr8tr.conductor")

NODE_OUTBOX = 1000  # messages queued for one node before its session is cut
FORGET_EXPIRED_NODE_S = 600.0  # an expired node stays in `nodes` this long


class NodeReports:
    """The node-driven transitions of :class:`~skr8tr.conductor.cluster.Cluster`."""


    def attach_node(self: Cluster, hello: Hello, outbox: trio.MemorySendChannel[str]) -> int:
        """A node proved its key and said hello; returns the session number.

        Raises CommandError("UNAUTHORIZED") when the node id is held by a
        different key (a node may not impersonate another).
        """
        node_id = hello.node_id
        now = self.clock()
        old = self.nodes.get(node_id)
        if old is not None and old.key != hello.key and not old.expired:
            raise CommandError(
                "UNAUTHORIZED",
                f"node id {node_id!r} is held by another key; give this node its own --node-id",
            )
        self._session += 1
        if old is not None and old.outbox is not None:
            log.info("node %s reconnected; replacing its previous session", node_id)
            old.outbox.close()
        node = NodeState(
            node_id=node_id, key=hello.key, address=hello.address,
            cores=hello.cores, ram_total_mb=hello.ram_total_mb,
            ram_free_mb=hello.ram_free_mb, cpu_pct=float(hello.cpu_pct),
            last_seen=now, session=self._session, outbox=outbox,
            reads_slots=node_protocol.reads_slots(hello.version),
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
        algorithm = key_algorithm(hello.key)
        log.info("node %s joined from %s (%d cores, %d MB RAM; key %s, %s)", node_id,
                 node.address, node.cores, node.ram_total_mb, fingerprint(hello.key),
                 algorithm.name if algorithm is not None else "?")
        self._sync_reported_replicas(node, hello.replicas)
        self._node_joined.set()
        self._node_joined = trio.Event()
        self.mark_dirty()
        return node.session

    def _sync_reported_replicas(self: Cluster, node: NodeState,
                                reports: tuple[ReplicaReport, ...]) -> None:
        reported = {r.replica: r for r in reports}
        for r in list(self._replicas_on(node.node_id)):
            if r.replica_id in reported:
                report = reported.pop(r.replica_id)
                self.replica_report(node.node_id, report)
                if r.stop_requested and report.state not in ("exited", "failed"):
                    self.send(node.node_id, Stop(replica=r.replica_id))  # asked while away
            elif r.state not in reconcile.ENDED_STATES:
                # The node no longer has it (the agent restarted without it).
                self._replica_ended(r, exit_code=None, signal=None, launch_failed=False,
                                    node_lost=True, message=f"node {node.node_id} lost it")
        for report in reported.values():
            owner = self.replicas.get(report.replica)
            if owner is not None:  # placed on another node: not this node's to claim
                self._refuse_claim(node.node_id, owner)
                continue
            if report.state in ("exited", "failed"):
                continue
            self._adopt(node, report)

    def _adopt(self: Cluster, node: NodeState, report: ReplicaReport) -> None:
        """A node reports a replica this conductor does not know (it restarted, or the node
        was lost and came back). A replica of a known revision of an app is adopted, with
        its pid and port, and the reconciler then trims any surplus; anything else is
        stopped. Its port is claimed until it exits, unless another replica holds it.

        Only with the placement token its launch carried, for this very node id: a node
        cannot pass off a replica of another node, or one it made up, as its own.
        """
        if not placement_token.check(
                self.placement_secret, report.token, node_id=node.node_id,
                replica=report.replica, app=report.app,
                generation=report.generation, port=report.port):
            log.warning("node %s reports replica %s (app %s, pid %s) without a placement "
                        "token for this node; refused, and told to stop it", node.node_id,
                        report.replica, report.app, report.pid)
            self.events.publish("node.claim_refused", node=node.node_id,
                                replica=report.replica, owner=None)
            self.send(node.node_id, Stop(replica=report.replica))
            return
        app = self.apps.get(report.app)
        revision = None if app is None else app.revisions.get(report.generation)
        r = ReplicaState(
            replica_id=report.replica, app=report.app, generation=report.generation,
            node_id=node.node_id, address=node.address, port=report.port,
            seq=self._next_seq(), launched_at=self.clock(),
            state=report.state if report.state != "unhealthy" else "running",
            pid=report.pid,
            drain_s=0.0 if revision is None else revision.manifest.rollout.drain_s,
        )
        self._restore_slot(node, r, report)
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
            if app is None and report.app:  # its files go too, once it has stopped
                self.send(node.node_id, AppGone(app=report.app))
            return
        log.info("adopted %s (pid %s, port %s, generation %d, slot %s, %d restart(s)) on %s",
                 r.replica_id, r.pid, r.port, r.generation, r.slot, r.restarts, node.node_id)
        self.events.publish("replica.adopted", app=r.app, replica=r.replica_id,
                            node=node.node_id, pid=r.pid, port=r.port, generation=r.generation,
                            state=r.state,
                            **({"slot": r.slot, "restarts": r.restarts} if r.restarts else {}))
        self.mark_dirty(r.app)

    def _restore_slot(self: Cluster, node: NodeState, r: ReplicaState,
                      report: ReplicaReport) -> None:
        """Give an adopted replica back the slot, restart count and last end its launch
        carried (``Launch.slot``), as the node reports them, and the count its backoff goes
        on from. Only with the seal this
        conductor (or a predecessor sharing its secret) made for that very replica on that
        node, and a slot name of the replica's own app: a node key holder cannot set
        another's count, make one up, nor name another app's replica. Anything else is
        logged and the replica keeps its own id as slot, 0 restarts (as before #17).

        What is restored is what a *running* replica's launch carried. A slot whose
        replica has ended and waits out its restart backoff (``next_restart``) when the
        conductor restarts or fails over has no process and no record on any node, and
        the store keeps no replicas (DESIGN §7): the new conductor launches a replica for
        it once its adoption grace is over, at once (the rest of the wait is not kept),
        as a new slot with 0 restarts (tests/test_restart_sim.py pins this)."""
        slot = report.slot
        if slot is None:
            return
        raw = slot["last_end"]
        last_end = None if raw is None else (raw["reason"], raw["exit_code"], raw["signal"])
        if not (node_protocol.slot_fits(slot["name"], replica=r.replica_id, app=r.app)
                and placement_token.check_slot(
                    self.placement_secret, slot["mac"], node_id=node.node_id,
                    replica=r.replica_id, app=r.app, name=slot["name"],
                    restarts=slot["restarts"], backoff=slot["backoff"], last_end=last_end)):
            log.warning("node %s reports replica %s with slot %r (%d restarts) not sealed "
                        "for it; its slot is not restored", node.node_id, r.replica_id,
                        slot["name"], slot["restarts"])
            return
        r.slot, r.restarts, r.restart_count = slot["name"], slot["restarts"], slot["backoff"]
        if last_end is not None:
            r.last_end = (why.clean(last_end[0]), last_end[1], last_end[2])

    def detach_node(self: Cluster, node_id: str, session: int) -> None:
        """A node's session ended. It is lost only when its heartbeats stay away too long."""
        node = self.nodes.get(node_id)
        if node is None or node.session != session:
            return  # replaced by a newer session already
        node.outbox = None
        self.events.publish("node.disconnected", node=node_id)
        log.info("node %s disconnected; it expires in %.1f s unless it comes back",
                 node_id, node.last_seen + self.node_timeout_s - self.clock())
        self.mark_dirty()

    def node_heartbeat(self: Cluster, node_id: str, msg: Heartbeat) -> None:
        node = self.nodes[node_id]
        node.last_seen = self.clock()
        cpu_pct = float(msg.cpu_pct)
        lower = cpu_pct < node.cpu_pct
        node.cpu_pct = cpu_pct
        node.ram_free_mb = msg.ram_free_mb
        node.ram_total_mb = msg.ram_total_mb
        node.cores = msg.cores
        node.reserved_ram_mb = 0
        node.reserved_cpu = 0.0
        if lower:
            self._offer_node(node_id)

    def next_expiry(self: Cluster) -> float | None:
        deadlines = [n.last_seen + self.node_timeout_s for n in self.nodes.values()
                     if not n.expired]
        return min(deadlines) if deadlines else None

    async def wait_node_joined(self: Cluster) -> None:
        await self._node_joined.wait()

    def expire_nodes(self: Cluster) -> list[str]:
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

    def _replicas_on(self: Cluster, node_id: str) -> list[ReplicaState]:
        return self.replicas.on_node(node_id)

    def send(self: Cluster, node_id: str, msg: NodeMessage) -> bool:
        """Queue a message for a node; False when it is not connected (or too far behind)."""
        node = self.nodes.get(node_id)
        if node is None or node.outbox is None:
            return False
        text = msg.encode()
        try:
            node.outbox.send_nowait(text)
            self.node_messages_queued += 1
        except trio.BrokenResourceError:
            # Its session is over (closed, or cancelled by a step-down) and has not
            # detached yet: as not connected.
            node.outbox = None
            return False
        except (trio.WouldBlock, trio.ClosedResourceError):
            log.warning("node %s is %d messages behind; closing its session", node_id,
                        NODE_OUTBOX)
            node.outbox.close()
            node.outbox = None
            return False
        return True


    def replica_report(self: Cluster, node_id: str, msg: ReplicaReport) -> None:
        """Apply a ``replica`` report from a node (idempotent).

        A node speaks only for the replicas placed on it: a report about a replica
        that the conductor placed on another node is refused, logged, and changes
        nothing (issue #13.2). A report that an ended replica runs re-adopts it or
        stops it, never leaves it running untracked (#13.3).
        """
        r = self.replicas.get(msg.replica)
        if r is None or r.node_id != node_id:
            if r is not None:
                self._refuse_claim(node_id, r)
            elif msg.state not in ("exited", "failed"):
                log.warning("node %s reports unknown replica %s; stopping it", node_id,
                            msg.replica)
                self.send(node_id, Stop(replica=msg.replica))
            return
        state = msg.state
        if r.state in reconcile.ENDED_STATES:
            self._report_on_ended(r, msg)
            return
        if msg.pid is not None:
            r.pid = msg.pid
        probe = msg.probe
        if probe is not None and (probe["text"], probe["status"], probe["count"]) != (
                r.probe_text, r.probe_status, r.probe_count):
            # Checked and bounded by the protocol; it can only be about a replica of this
            # node (above). The rollout waiting for it decides again (core/rollout.py).
            told = r.probe_text != probe["text"]
            r.probe_text, r.probe_status, r.probe_count = (
                probe["text"], probe["status"], probe["count"])
            if told and state != "ready":  # a new outcome, not a longer run nor the pass
                # that `replica.ready` tells: worth an event (the page re-reads the state;
                # not "replica.*", which the ingress reads as a state change)
                self.events.publish("health.probe", app=r.app, replica=r.replica_id,
                                    node=node_id, probe=r.probe_text)
            self.mark_dirty(r.app)
        if state in ("exited", "failed"):
            port_clash = (state == "failed" and msg.reason == "port_in_use")
            r.port_clash = port_clash
            if port_clash and r.port is not None:
                self.ports.block(r.address, r.port, self.clock())
            self._replica_ended(
                r, exit_code=msg.exit_code, signal=msg.signal,
                launch_failed=state == "failed", node_lost=port_clash,
                message=msg.message,
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
                                node=node_id, message=msg.message)
            log.warning("replica %s is unhealthy; replacing it", r.replica_id)
            # Its successor takes over its slot, and says why (core/why.py bounds it).
            r.vacating = why.clean(f"unhealthy: {msg.message}" if msg.message else "unhealthy")
            self.retire_replica(r.replica_id, "unhealthy")
            app = self.apps.get(r.app)
            if app is not None:
                # The successor now (the reconciler would a moment later), while the row
                # that hands over the slot is sure to be there: a quick stop removes it.
                self.reconcile_app(app)
            return
        if state != r.state:
            r.state = replica_state.transition(r.replica_id, r.state, state)
            self.events.publish(f"replica.{state}", app=r.app, replica=r.replica_id,
                                node=node_id, pid=r.pid, port=r.port, generation=r.generation)
            self.mark_dirty(r.app)

    def _refuse_claim(self: Cluster, node_id: str, owner: ReplicaState) -> None:
        log.warning("node %s claims replica %s, which was placed on node %s; refused (the "
                    "rightful row is left as it is)", node_id, owner.replica_id, owner.node_id)
        self.events.publish("node.claim_refused", node=node_id, replica=owner.replica_id,
                            owner=owner.node_id)

    def _report_on_ended(self: Cluster, r: ReplicaState, msg: ReplicaReport) -> None:
        """Its node says a replica that ended here is alive (or confirms it has ended).

        A replica declared ended only because its node fell silent (a conductor
        paused past --node-timeout, a network partition) is re-adopted with its
        pid when its app still has its revision and its port is free; the
        reconciler then trims any surplus. Any other is stopped.
        """
        state = msg.state
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
                        r.replica_id, msg.pid, why)
            self.send(r.node_id, Stop(replica=r.replica_id))
            return
        back = replica_state.readopt(r.replica_id, r.state,
                                     "ready" if state == "ready" else "running",
                                     lost_with_node=r.lost_with_node)
        self.replicas.reviving(r)
        r.state, r.lost_with_node = back, False
        r.restart_at = r.exit_code = r.signal = r.message = r.ended_reason = None
        if msg.pid is not None:
            r.pid = msg.pid
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


    def excuse_stall(self: Cluster, stalled_s: float) -> None:
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

