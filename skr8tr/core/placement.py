"""Placement: which node runs a new replica, and on which port (pure).

Rules (DESIGN.md §6.3, issue "Conductor and node agents"):

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
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass, replace

__all__ = ["NodeView", "PlacementRequest", "Placement", "NoCapacity", "place", "place_many"]

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
    fits: list[tuple[tuple, NodeView, int | None]] = []
    for node in nodes:
        if not node.live:
            why.append(f"{node.node_id} is not connected")
            continue
        if node.node_id in request.avoid_nodes:
            why.append(f"{node.node_id} failed the last launch")
            continue
        taken = ports.get(node.address, frozenset())
        port: int | None = None
        if isinstance(request.port, int):
            if request.port in taken:
                why.append(f"port {request.port} is taken on {node.address} ({node.node_id})")
                continue
            port = request.port
        elif request.port == "auto":
            port = _auto_port(taken, port_range)
            if port is None:
                why.append(f"no free port in {port_range[0]}-{port_range[1]} on {node.address}")
                continue
        if request.ram_mb is not None:
            free = node.ram_free_mb - node.reserved_ram_mb
            if free < request.ram_mb:
                why.append(f"{node.node_id} has {free} MB RAM free, needs {request.ram_mb} MB")
                continue
        if request.cpu is not None:
            free_cpu = _free_cores(node)
            if free_cpu < request.cpu:
                why.append(f"{node.node_id} has {max(free_cpu, 0):.2f} cores free, "
                           f"needs {request.cpu:g}")
                continue
        fits.append(((node.replicas, node.cpu_pct, node.node_id), node, port))
    if not fits:
        if not nodes:
            return NoCapacity(f"no node can run a replica of {request.app}: no node is connected")
        hint = ""
        if isinstance(request.port, int):
            hint = ("; hint: use `port auto`, add a node with another address, or set "
                    "`order stop-first` in the rollout block")
        return NoCapacity(f"no node can run a replica of {request.app}: "
                          + "; ".join(why) + hint)
    _, node, port = min(fits, key=lambda f: f[0])
    return Placement(node.node_id, node.address, port)


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
