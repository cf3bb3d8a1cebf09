"""In-memory fake node agents for deterministic simulation tests of the conductor.

A :class:`FakeNode` attaches to a real :class:`~skr8tr.conductor.cluster.Cluster`
the way a node session does (``attach_node`` with an outbox channel), reads the
conductor's messages from that outbox and answers like an agent would, with
hooks to make replicas crash, never become ready, or the node go silent. No
sockets and no processes: run under ``MockClock(autojump_threshold=0)`` and
every time is exact.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from skr8tr import __version__
from skr8tr.conductor.cluster import Cluster
from skr8tr.core.node_protocol import Heartbeat, Hello, ReplicaReport

_pids = itertools.count(1000)
FAKE_KEY = "ab" * 32


@dataclass
class FakeReplica:
    replica: str
    app: str
    generation: int
    port: int | None
    pid: int
    launched_at: float
    alive: bool = True
    state: str = "running"
    token: str | None = None  # the launch's placement token, sent back as an agent does
    slot: dict | None = None  # the launch's slot, sent back as an agent does


@dataclass
class FakeNode:
    cluster: Cluster
    node_id: str
    address: str = "127.0.0.1"
    cores: int = 4
    ram_free_mb: int = 8000
    heartbeat_s: float = 1.0
    # From launch to "ready"; None: like a real agent, `settle_ms` without a health
    # check, `probe_ready_after_s` with one. math.inf: never ready.
    ready_after_s: float | None = 0.0
    probe_ready_after_s: float = 0.3
    crash_after_s: float | None = None  # exit with `exit_code` this long after launch
    exit_code: int = 1
    # Per-launch overrides: launch message -> {"ready_after_s"|"crash_after_s"|"exit_code"|
    # "probes": ...}; "probes" is [(seconds after launch, a report's probe field), ...],
    # each sent as a report in the replica's current state, as an agent's probes are.
    launch_hook: Callable[[dict], dict] | None = None
    launches: list[tuple[float, dict]] = field(default_factory=list)
    stops: list[tuple[float, str]] = field(default_factory=list)
    running: dict[str, FakeReplica] = field(default_factory=dict)
    silent: bool = False  # stop heartbeating (the node "dies")
    key: str = FAKE_KEY
    version: str = __version__  # the agent's hello `version`

    def hello(self) -> Hello:
        """What a (re)connecting agent says: who it is and what it still runs."""
        return Hello(
            node_id=self.node_id, key=self.key, sig="00" * 64, version=self.version,
            address=self.address, cpu_pct=0.0, ram_free_mb=self.ram_free_mb,
            ram_total_mb=16000, cores=self.cores, replicas=tuple(
                ReplicaReport(replica=r.replica, app=r.app, generation=r.generation,
                              state=r.state, pid=r.pid, port=r.port, ts=0.0, token=r.token,
                              slot=r.slot)
                for r in self.running.values()))

    def _report(self, r: FakeReplica, state: str, **extra) -> None:
        r.state = state
        if self.silent:
            return
        msg = ReplicaReport(replica=r.replica, app=r.app, generation=r.generation,
                            state=state, pid=r.pid, port=r.port, ts=0.0, token=r.token,
                            slot=r.slot, **extra)
        self.cluster.replica_report(self.node_id, msg)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Attach (or re-attach, to ``self.cluster``), then serve the outbox and heartbeat
        until cancelled. Replicas outlive a run: call ``run`` again to reconnect."""
        send, recv = trio.open_memory_channel[str](1000)
        self.silent = False
        self.session = self.cluster.attach_node(self.hello(), send)
        task_status.started()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._heartbeat)
            async for text in recv:
                msg = json.loads(text)
                if msg["type"] == "launch":
                    nursery.start_soon(self._launch, msg)
                elif msg["type"] == "stop":
                    nursery.start_soon(self._stop, msg["replica"])
            nursery.cancel_scope.cancel()

    async def _heartbeat(self) -> None:
        while True:
            await trio.sleep(self.heartbeat_s)
            if self.silent:
                continue
            if self.node_id in self.cluster.nodes:
                self.cluster.node_heartbeat(self.node_id, Heartbeat(
                    cpu_pct=0.0, ram_free_mb=self.ram_free_mb, ram_total_mb=16000,
                    cores=self.cores))

    async def _launch(self, msg: dict) -> None:
        now = trio.current_time()
        self.launches.append((now, msg))
        r = FakeReplica(msg["replica"], msg["app"], msg["generation"], msg["port"],
                        next(_pids), now, token=msg.get("token"), slot=msg.get("slot"))
        behaviour = {"ready_after_s": self.ready_after_s, "crash_after_s": self.crash_after_s,
                     "exit_code": self.exit_code, "port_in_use": False, "probes": ()}
        if self.launch_hook is not None:
            behaviour.update(self.launch_hook(msg))
        if behaviour["port_in_use"]:
            self.cluster.replica_report(self.node_id, ReplicaReport(
                replica=r.replica, app=r.app, generation=r.generation, state="failed",
                pid=None, port=r.port, reason="port_in_use", ts=0.0,
                message=f"port {r.port} is already in use on {self.address}"))
            return
        self.running[r.replica] = r
        self._report(r, "running")
        ready_after = behaviour["ready_after_s"]
        if ready_after is None:
            ready_after = (msg["settle_ms"] / 1000 if msg["health"] is None
                           else self.probe_ready_after_s)
        events = []
        if behaviour["crash_after_s"] is not None:
            events.append((behaviour["crash_after_s"], "crash"))
        if ready_after != math.inf:
            events.append((ready_after, "ready"))
        events.extend((delay, ("probe", probe)) for delay, probe in behaviour["probes"])
        events.sort(key=lambda e: e[0])
        start = now
        for delay, what in events:
            await trio.sleep_until(start + delay)
            if not r.alive:
                return
            if isinstance(what, tuple):
                self._report(r, r.state, probe=what[1])
                continue
            if what == "crash":
                r.alive = False
                del self.running[r.replica]
                self._report(r, "exited", exit_code=behaviour["exit_code"])
                return
            self._report(r, "ready")

    async def _stop(self, replica: str) -> None:
        self.stops.append((trio.current_time(), replica))
        r = self.running.pop(replica, None)
        if r is None:
            return
        r.alive = False
        self._report(r, "exited", exit_code=0)


async def wait_for(predicate, *, timeout_s: float = 600.0, step_s: float = 0.01) -> None:
    """Poll ``predicate`` on the (mock) clock until it holds; fail after ``timeout_s``."""
    with trio.fail_after(timeout_s):
        while not predicate():
            await trio.sleep(step_s)
