"""Placement: which node runs a new replica, and on which port (pure).

Rules:

- only live nodes are candidates;
- a port belongs to a host, not to an agent: nodes that advertise the same
  address share one port space, so a port held by any replica on that address
  (or blocked there after a clash) is not free on any of those nodes;
- a fixed port must be free on the node's address; ``port auto`` takes the
  lowest port of the range that nothing on that address holds;
- ``ram`` and ``cpu`` hints must fit what the node reported free, less what
  replicas placed there since its last heartbeat have reserved;
- among the nodes that fit, the least loaded wins: fewest replicas, then lowest
  CPU%, then node id (so the choice is deterministic).

When nothing fits, :class:`NoCapacity` says, node by node, what did not fit.

Cost: :func:`place` looks at every node once, O(1) each (the lowest free
port is searched on the chosen node's address only). :class:`LoadOrder` gives
the same answer in O(log n) for the usual case where the least-loaded nodes
fit, for callers that keep it informed of their nodes (the conductor).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Mapping, Sequence, Set
from dataclasses import dataclass, replace

__all__ = ["NodeView", "PlacementRequest", "Placement", "NoCapacity", "LoadOrder", "place",
           "place_many"]

DEFAULT_PORT_RANGE = (20000, 32000)


@dataclass(frozen=True)
class NodeView:
    """What placement needs to know about one node."""

    node_id: str
    address: str
    live: bool = True
    cpu_pct: float = 0.0
    cores: int = 1
    ram_free_mb: int = 0
    replicas: int = 0  # replicas assigned to it (pending ones included)
    reserved_ram_mb: int = 0  # ram hints of replicas placed since its last heartbeat
    reserved_cpu: float = 0.0  # cpu hints of the same


@dataclass(frozen=True)
class PlacementRequest:
    app: str
    port: int | str | None = None  # fixed port, "auto" or None
    ram_mb: int | None = None
    cpu: float | None = None
    avoid_nodes: frozenset[str] = frozenset()  # e.g. nodes where the last launch failed


@dataclass(frozen=True)
class Placement:
    node_id: str
    address: str
    port: int | None


@dataclass(frozen=True)
class NoCapacity:
    message: str


def _free_cores(node: NodeView) -> float:
    return node.cores * (1.0 - node.cpu_pct / 100.0) - node.reserved_cpu


def _auto_port(taken: Set[int], port_range: tuple[int, int]) -> int | None:
    lo, hi = port_range
    for port in range(lo, hi + 1):
        if port not in taken:
            return port
    return None


def _has_free_port(taken: Set[int], port_range: tuple[int, int]) -> bool:
    lo, hi = port_range
    # Fewer ports held than the range has: one of the range is free, whatever they are.
    return len(taken) <= hi - lo or _auto_port(taken, port_range) is not None


def _misfit(request: PlacementRequest, node: NodeView, taken: Set[int],
            port_range: tuple[int, int]) -> str | None:
    """Why ``node`` cannot take a replica of ``request`` (None: it can)."""
    if not node.live:
        return f"{node.node_id} is not connected"
    if node.node_id in request.avoid_nodes:
        return f"{node.node_id} failed the last launch"
    if isinstance(request.port, int):
        if request.port in taken:
            return f"port {request.port} is taken on {node.address} ({node.node_id})"
    elif request.port == "auto" and not _has_free_port(taken, port_range):
        return f"no free port in {port_range[0]}-{port_range[1]} on {node.address}"
    if request.ram_mb is not None:
        free = node.ram_free_mb - node.reserved_ram_mb
        if free < request.ram_mb:
            return f"{node.node_id} has {free} MB RAM free, needs {request.ram_mb} MB"
    if request.cpu is not None:
        free_cpu = _free_cores(node)
        if free_cpu < request.cpu:
            return f"{node.node_id} has {max(free_cpu, 0):.2f} cores free, needs {request.cpu:g}"
    return None


def _placement(request: PlacementRequest, node: NodeView, taken: Set[int],
               port_range: tuple[int, int]) -> Placement:
    port: int | None = None
    if isinstance(request.port, int):
        port = request.port
    elif request.port == "auto":
        port = _auto_port(taken, port_range)
    return Placement(node.node_id, node.address, port)


def _load_key(node: NodeView) -> tuple[int, float, str]:
    return (node.replicas, node.cpu_pct, node.node_id)


def place(
    request: PlacementRequest,
    nodes: Sequence[NodeView],
    ports: Mapping[str, Set[int]],
    port_range: tuple[int, int] = DEFAULT_PORT_RANGE,
) -> Placement | NoCapacity:
    """Choose a node (and port) for one replica of ``request.app``.

    ``ports`` maps an address to the ports held or blocked on it. Never raises;
    returns :class:`NoCapacity` naming, per node, why it did not fit.
    """
    why: list[str] = []
    best: NodeView | None = None
    for node in nodes:
        problem = _misfit(request, node, ports.get(node.address, frozenset()), port_range)
        if problem is not None:
            why.append(problem)
        elif best is None or _load_key(node) < _load_key(best):
            best = node
    if best is None:
        if not nodes:
            return NoCapacity(f"no node can run a replica of {request.app}: no node is connected")
        hint = ""
        if isinstance(request.port, int):
            hint = ("; hint: use `port auto`, add a node with another address, or set "
                    "`order stop-first` in the rollout block")
        return NoCapacity(f"no node can run a replica of {request.app}: "
                          + "; ".join(why) + hint)
    return _placement(request, best, ports.get(best.address, frozenset()), port_range)


class LoadOrder:
    """Nodes by load (fewest replicas, lowest CPU%, node id), to place without a full scan.

    A heap of load keys, each a *lower bound* of its node's current key. The
    owner keeps that true by calling :meth:`offer` whenever a node's key may
    have gone down (it joined, a replica of its ended or left, it reported a
    lower CPU%); a key that went up needs nothing: it is corrected when it
    reaches the top. Then the first node at the top whose key is current and
    that fits is the one :func:`place` would choose. Duplicate and stale keys
    are dropped by :meth:`rebuild`, which the owner calls when ``len()`` grows
    past a few times its number of nodes.
    """

    def __init__(self) -> None:
        self._heap: list[tuple[int, float, str]] = []

    def __len__(self) -> int:
        return len(self._heap)

    def offer(self, node: NodeView) -> None:
        heapq.heappush(self._heap, _load_key(node))

    def rebuild(self, nodes: Sequence[NodeView]) -> None:
        self._heap = [_load_key(n) for n in nodes if n.live]
        heapq.heapify(self._heap)

    def place(
        self,
        request: PlacementRequest,
        view_of: Callable[[str], NodeView | None],
        ports: Mapping[str, Set[int]],
        port_range: tuple[int, int] = DEFAULT_PORT_RANGE,
    ) -> Placement | None:
        """What :func:`place` would choose among the nodes ``view_of`` knows, or None
        when none fits (then :func:`place` says why). O(log n) per node looked at."""
        heap = self._heap
        unfit: list[tuple[int, float, str]] = []
        chosen = None
        while heap:
            key = heap[0]
            node = view_of(key[2])
            if node is None or not node.live:
                heapq.heappop(heap)  # offered again when it joins again
                continue
            current = _load_key(node)
            if key != current:
                heapq.heapreplace(heap, current)
                continue
            taken = ports.get(node.address, frozenset())
            if _misfit(request, node, taken, port_range) is None:
                chosen = _placement(request, node, taken, port_range)
                break
            unfit.append(heapq.heappop(heap))
        for key in unfit:
            heapq.heappush(heap, key)
        return chosen


def place_many(
    request: PlacementRequest,
    count: int,
    nodes: Sequence[NodeView],
    ports: Mapping[str, Set[int]],
    port_range: tuple[int, int] = DEFAULT_PORT_RANGE,
) -> tuple[list[Placement], NoCapacity | None]:
    """Place up to ``count`` replicas one after the other, each seeing the previous claims.

    Returns the placements that fit and, if fewer than ``count`` did, the
    :class:`NoCapacity` that stopped the rest.
    """
    views = {n.node_id: n for n in nodes}
    held = {addr: set(p) for addr, p in ports.items()}
    done: list[Placement] = []
    for _ in range(count):
        result = place(request, list(views.values()), held, port_range)
        if isinstance(result, NoCapacity):
            return done, result
        done.append(result)
        node = views[result.node_id]
        views[result.node_id] = replace(
            node,
            replicas=node.replicas + 1,
            reserved_ram_mb=node.reserved_ram_mb + (request.ram_mb or 0),
            reserved_cpu=node.reserved_cpu + (request.cpu or 0.0),
        )
        if result.port is not None:
            held.setdefault(result.address, set()).add(result.port)
    return done, None
