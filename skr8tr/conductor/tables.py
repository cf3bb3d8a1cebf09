"""The conductor's state tables: nodes, replicas (indexed by node and app), apps and revisions.

Plain records, changed only by :class:`~skr8tr.conductor.cluster.Cluster`;
:class:`ReplicaTable` keeps its indexes and per-node counts up to date on every
insert, delete and end, so that nothing per message scans every replica.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from skr8tr.conductor import state_file
from skr8tr.core import manifest as manifest_mod
from skr8tr.core import reconcile
from skr8tr.core.manifest import Manifest
from skr8tr.core.rollout_failures import probe_line


@dataclass
class NodeState:
    node_id: str
    key: str
    address: str
    cores: int
    ram_total_mb: int
    ram_free_mb: int
    cpu_pct: float
    last_seen: float
    session: int
    outbox: trio.MemorySendChannel[str] | None
    expired: bool = False
    # replicas placed since the last heartbeat reserve their ram/cpu hints
    reserved_ram_mb: int = 0
    reserved_cpu: float = 0.0
    reads_slots: bool = True  # its agent reads a launch's `slot` (node_protocol.reads_slots)

    @property
    def connected(self) -> bool:
        return self.outbox is not None


@dataclass
class ReplicaState:
    replica_id: str
    app: str
    generation: int
    node_id: str
    address: str
    port: int | None
    seq: int
    launched_at: float
    state: str = "pending"
    pid: int | None = None
    restart_count: int = 0
    restart_at: float | None = None
    exit_code: int | None = None
    signal: int | None = None
    message: str | None = None
    stop_requested: bool = False
    port_clash: bool = False  # its launch failed because the port was taken on the host
    drain_s: float = 0.0  # the manifest's `drain`: from leaving the ingress to SIGTERM
    drain_until: float | None = None  # retiring: stopped by the reconciler at this time
    retire_reason: str = ""
    drained_from: str | None = None  # draining: the state an undrain puts back
    lost_with_node: bool = False  # ended only because its node fell silent
    # Its node's last health probe (ReplicaReport.probe): what it got, the HTTP status
    # of a complete answer (None: refused, timeout), and how many probes in a row.
    probe_text: str | None = None
    probe_status: int | None = None
    probe_count: int = 0
    # Its slot: a restarted replica takes a new id (the node's records, logs and port
    # claims are per launch) but keeps the slot of the one it replaces, the count of
    # restarts in that slot (never reset, unlike restart_count, the backoff's) and why
    # the one before it ended (core/why.py).
    slot: str = ""
    restarts: int = 0
    last_end: tuple[str, int | None, int | None] | None = None  # (reason, exit code, signal)
    ended_reason: str | None = None  # why it ended itself (set by Cluster._replica_ended)
    vacating: str | None = None  # retired as unhealthy: why, until a successor takes its slot

    def __post_init__(self) -> None:
        if not self.slot:
            self.slot = self.replica_id

    def row(self, now: float | None = None) -> dict[str, Any]:
        """The replica as ``list --json`` shows it. ``reason``, ``exit_code`` and ``signal``
        tell the last end in its slot: its own once it has ended, else the one before it
        (null when the slot never ended); ``next_restart`` is the seconds from *now*
        until its successor is launched (null when none is due)."""
        if self.ended_reason is not None:
            why, code, sig = self.ended_reason, self.exit_code, self.signal
        elif self.last_end is not None:
            why, code, sig = self.last_end
        else:
            why = code = sig = None
        next_restart = None
        if self.restart_at is not None and now is not None:
            next_restart = round(max(0.0, self.restart_at - now), 1)
        return {"app": self.app, "replica": self.replica_id, "node": self.node_id,
                "pid": self.pid, "port": self.port, "generation": self.generation,
                "state": self.state, "probe": self.probe(), "slot": self.slot,
                "restarts": self.restarts, "reason": why, "exit_code": code, "signal": sig,
                "next_restart": next_restart}

    def probe(self) -> str | None:
        """The last probe in one line: ``GET /healthz -> 404, want 200 (3 in a row)``."""
        return probe_line(self.probe_text, self.probe_count)


#: Replica ids remembered per app with the node that ran them (:class:`RanLog`): a crash
#: loop of a few minutes, or every replica of a large app through a rollout or two.
RAN_KEPT_PER_APP = 1000


class RanLog:
    """Which node ran each replica this conductor placed or adopted: the last
    :data:`RAN_KEPT_PER_APP` ids of each app, kept after the replica's row is gone.

    A node's log lines of a replica that has ended are taken only from the node that
    ran it (:func:`skr8tr.conductor.logs.own_lines`); an id not here was never
    placed by this conductor (invented, or of a replica that ended before a restart).
    """

    def __init__(self, per_app: int = RAN_KEPT_PER_APP) -> None:
        self.per_app = per_app
        self.by_app: dict[str, OrderedDict[str, str]] = {}

    def note(self, app: str, replica_id: str, node_id: str) -> None:
        ran = self.by_app.setdefault(app, OrderedDict())
        ran[replica_id] = node_id
        ran.move_to_end(replica_id)
        while len(ran) > self.per_app:
            ran.popitem(last=False)

    def node_of(self, app: str, replica_id: str) -> str | None:
        """The node that ran *replica_id* of *app*, if remembered."""
        ran = self.by_app.get(app)
        return None if ran is None else ran.get(replica_id)

    def forget_app(self, app: str) -> None:
        self.by_app.pop(app, None)


class ReplicaTable(dict[str, ReplicaState]):
    """``Cluster.replicas``: replicas by id, also indexed by node and by app.

    Kept up to date on every insert and delete, and told by :meth:`ending`
    when a replica moves to an ended state, so that it can count each node's
    replicas that have not ended (what placement balances) without a scan.
    ``on_fewer(node_id)`` is called when that count goes down.
    """

    def __init__(self, on_fewer: Callable[[str], None] = lambda node_id: None) -> None:
        super().__init__()
        self.by_node: dict[str, dict[str, ReplicaState]] = {}
        self.by_app: dict[str, dict[str, ReplicaState]] = {}
        self.live_on_node: dict[str, int] = {}
        self._on_fewer = on_fewer
        #: Every replica ever inserted (placed, or adopted from a node with its
        #: placement token), with its node: kept after its row is deleted.
        self.ran = RanLog()

    def __setitem__(self, replica_id: str, r: ReplicaState) -> None:
        if replica_id in self:
            del self[replica_id]
        super().__setitem__(replica_id, r)
        self.ran.note(r.app, replica_id, r.node_id)
        self.by_node.setdefault(r.node_id, {})[replica_id] = r
        self.by_app.setdefault(r.app, {})[replica_id] = r
        if r.state not in reconcile.ENDED_STATES:
            self.live_on_node[r.node_id] = self.live_on_node.get(r.node_id, 0) + 1

    def __delitem__(self, replica_id: str) -> None:
        r = self[replica_id]
        super().__delitem__(replica_id)
        for index, key in ((self.by_node, r.node_id), (self.by_app, r.app)):
            group = index[key]
            del group[replica_id]
            if not group:
                del index[key]
        if r.state not in reconcile.ENDED_STATES:
            self._fewer(r.node_id)

    def pop(self, replica_id: str, *default: Any) -> Any:
        if replica_id not in self:
            if default:
                return default[0]
            raise KeyError(replica_id)
        r = self[replica_id]
        del self[replica_id]
        return r

    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("ReplicaTable: insert with [] and remove with del or pop")

    popitem = clear = update = setdefault = _refuse  # type: ignore[assignment]

    def ending(self, r: ReplicaState) -> None:
        """``r`` is about to take an ended state (call before setting it)."""
        if r.state not in reconcile.ENDED_STATES and self.get(r.replica_id) is r:
            self._fewer(r.node_id)

    def reviving(self, r: ReplicaState) -> None:
        """``r`` is about to leave an ended state (a re-adoption; call before setting it)."""
        if r.state in reconcile.ENDED_STATES and self.get(r.replica_id) is r:
            self.live_on_node[r.node_id] = self.live_on_node.get(r.node_id, 0) + 1

    def _fewer(self, node_id: str) -> None:
        left = self.live_on_node[node_id] - 1
        if left:
            self.live_on_node[node_id] = left
        else:
            del self.live_on_node[node_id]
        self._on_fewer(node_id)

    def on_node(self, node_id: str) -> list[ReplicaState]:
        return list(self.by_node.get(node_id, {}).values())

    def of_app(self, app: str) -> list[ReplicaState]:
        return list(self.by_app.get(app, {}).values())



@dataclass(frozen=True)
class Revision:
    generation: int
    manifest: Manifest
    text: str
    format: str
    sha256: str


@dataclass
class HistoryEntry:
    generation: int
    state: str
    started: float
    finished: float | None
    manifest_sha256: str
    message: str | None = None  # how its rollout ended (kept in memory only)

    def row(self) -> dict[str, Any]:
        return {"generation": self.generation, "state": self.state, "started": self.started,
                "finished": self.finished, "manifest_sha256": self.manifest_sha256}


@dataclass
class AppState:
    name: str
    revision: Revision
    desired: int
    completed: int = 0
    given_up: int = 0
    rolling: bool = False  # a rollout owns the replicas; the reconciler waits
    placement_error: str | None = None
    # The kept revisions and history rows (core/revisions.py retain prunes the others).
    revisions: dict[int, Revision] = field(default_factory=dict)
    history: list[HistoryEntry] = field(default_factory=list)
    # The highest generation ever taken: the next one is above it, whatever was pruned.
    last_generation: int = 0

    @property
    def manifest(self) -> Manifest:
        return self.revision.manifest

    @property
    def generation(self) -> int:
        return self.revision.generation


def manifest_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()



# ---------------------------------------------------------------------- stored records

def stored_app(app: AppState) -> state_file.StoredApp:
    """What the store keeps of ``app``: its desired state, never its replicas."""
    return state_file.StoredApp(
        name=app.name, generation=app.generation, desired=app.desired,
        completed=app.completed, given_up=app.given_up,
        revisions=tuple(
            state_file.StoredRevision(r.generation, r.format, r.manifest.base_dir,
                                      r.sha256, r.text)
            for _, r in sorted(app.revisions.items())),
        # A row whose revision was pruned keeps its manifest's hash itself.
        history=tuple(state_file.StoredHistory(
            h.generation, h.state, h.started, h.finished,
            None if h.generation in app.revisions or not h.manifest_sha256
            else h.manifest_sha256) for h in app.history),
        last_generation=max(app.last_generation, max(app.revisions, default=0)),
    )


def app_from_stored(s: state_file.StoredApp, where: str) -> AppState:
    """The app a stored record describes. Raises StateFileError (naming ``where``, the
    store) when a stored manifest no longer parses."""
    revisions = {}
    for r in s.revisions:
        try:
            m = manifest_mod.parse_manifest(
                r.manifest, filename=f"{s.name} generation {r.generation}",
                base_dir=r.base_dir, format=r.format)
        except manifest_mod.ManifestError as exc:
            raise state_file.StateFileError(
                f"{where}: app {s.name} generation {r.generation}: the stored manifest no "
                f"longer parses: {exc}") from None
        revisions[r.generation] = Revision(r.generation, m, r.manifest, r.format, r.sha256)
    # A file from before pruning has no last_generation: every generation ever taken
    # then has its revision (the state file's rules), so the newest of them is the last.
    last = s.last_generation
    if last is None:
        last = max([*revisions, *(h.generation for h in s.history)])
    return AppState(
        name=s.name, revision=revisions[s.generation], desired=s.desired,
        completed=s.completed, given_up=s.given_up, revisions=revisions,
        history=[HistoryEntry(h.generation, h.state, h.started, h.finished,
                              revisions[h.generation].sha256 if h.generation in revisions
                              else h.sha256 or "")
                 for h in s.history],
        last_generation=last)
