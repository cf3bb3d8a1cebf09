"""Which app a request goes to, and which replica of it (pure: no trio, no sockets).

Two tables, both plain synchronous objects:

- :class:`RouteTable` maps a request path to an app by the longest matching
  prefix. A prefix matches whole path segments: ``/api`` matches ``/api``,
  ``/api/`` and ``/api/users`` but not ``/apis``; ``/`` matches everything.
  The path is forwarded unchanged (no prefix stripping).
- :class:`BackendTable` is the ingress's view of the cluster, built from the
  conductor's ``/v1/watch`` stream: a snapshot replaces it, each event updates
  it. A replica is routable only while its last known state is ``ready`` and
  its node's address is known; any other state (``draining`` first of all)
  takes it out of rotation the moment the event is applied. Picking is round
  robin over an app's routable replicas, skipping the ones a retry excludes.

Every update returns the backends that just stopped being routable, so the
shell can close its idle pooled connections to them.

A snapshot from a conductor that does not know a node yet (a new leader in its
adopt grace, a restarted conductor before the node reconnected) says nothing
about that node's replicas: they are kept in rotation, *carried over*, until
the conductor reports them (any event for them makes them ordinary rows
again), or REJOIN_S after their node joined without reporting them, or
CARRY_S at most. Dropping them would answer 503 for a failover's few seconds
while the replicas serve as before.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from typing import Any

from skr8tr.core.names import APP_NAME_PATTERN, APP_NAME_RE

__all__ = [
    "Backend",
    "BackendTable",
    "Route",
    "RouteError",
    "RouteTable",
    "parse_route",
]

_APP = APP_NAME_RE
# Path characters of RFC 3986 (pchar and "/"); no query, fragment or spaces.
_PREFIX = re.compile(r"/[A-Za-z0-9._~!$&'()*+,;=:@%/-]*")

# Replica states that keep a replica in rotation. Only one: everything else
# (pending, running, draining, stopping, exited, failed, unhealthy, or a state
# a later conductor invents) is not routable.
ROUTABLE_STATES = frozenset({"ready"})


class RouteError(ValueError):
    """A ``--route`` argument that cannot be used; the message says what was expected."""


@dataclass(frozen=True)
class Route:
    prefix: str
    app: str

    def matches(self, path: str) -> bool:
        if self.prefix == "/" or path == self.prefix:
            return True
        stem = self.prefix if self.prefix.endswith("/") else self.prefix + "/"
        return path.startswith(stem)


def parse_route(text: str) -> Route:
    """``/PREFIX:APP`` -> Route. Raises RouteError naming the problem."""
    prefix, sep, app = text.rpartition(":")
    if not sep or not prefix:
        raise RouteError(f"--route {text!r}: expected /PREFIX:APP, e.g. /api:web or /:web")
    if _PREFIX.fullmatch(prefix) is None:
        raise RouteError(f"--route {text!r}: the prefix {prefix!r} must start with / and "
                         "hold only path characters (no spaces, ? or #)")
    if _APP.fullmatch(app) is None:
        raise RouteError(f"--route {text!r}: {app!r} is not an app name "
                         f"({APP_NAME_PATTERN})")
    if len(prefix) > 1:
        prefix = prefix.rstrip("/") or "/"
    return Route(prefix, app)


class RouteTable:
    """Longest-prefix routing over a fixed set of routes."""

    def __init__(self, routes: Iterable[Route]) -> None:
        self.routes = sorted(routes, key=lambda r: len(r.prefix), reverse=True)
        seen: dict[str, str] = {}
        for r in self.routes:
            if r.prefix in seen:
                raise RouteError(f"--route {r.prefix}:{r.app}: the prefix {r.prefix} is "
                                 f"already routed to {seen[r.prefix]}")
            seen[r.prefix] = r.app

    @property
    def apps(self) -> set[str]:
        return {r.app for r in self.routes}

    def match(self, target: str) -> Route | None:
        """The route of a request target (its path; the query is ignored), or None.

        ``target`` is in origin form (``/path?query``); anything else (``*``, or an
        absolute URL, which the proxy turns into origin form first) matches nothing."""
        path = target.split("?", 1)[0].split("#", 1)[0]
        if not path.startswith("/"):
            return None
        for route in self.routes:
            if route.matches(path):
                return route
        return None


@dataclass(frozen=True)
class Backend:
    """One routable replica: where to connect, and who it is."""

    replica: str
    app: str
    address: str
    port: int
    generation: int
    pid: int | None = None

    @property
    def key(self) -> tuple[str, str, int]:
        """Identity for connection pooling (a port may later belong to another replica)."""
        return (self.replica, self.address, self.port)

    def __str__(self) -> str:
        return f"{self.replica} ({self.address}:{self.port})"


@dataclass
class _Replica:
    app: str
    node: str
    state: str
    port: int | None = None
    generation: int = 0
    pid: int | None = None


CARRY_S = 30.0  # the longest a replica unknown to a new snapshot's conductor stays routed
REJOIN_S = 2.0  # after its node joined: its replica reports come with the node's hello


@dataclass
class BackendTable:
    """The routable replicas of every app, kept from ``/v1/watch`` messages.

    ``ignore_drain`` keeps ``draining`` and ``stopping`` replicas in rotation
    until they exit: what an ingress unaware of draining does. It exists only to
    show, in tests, what draining prevents; never use it in production.
    """

    ignore_drain: bool = False
    nodes: dict[str, str] = field(default_factory=dict)  # node id -> address
    replicas: dict[str, _Replica] = field(default_factory=dict)
    synced: bool = False  # a snapshot has been applied
    clock: Callable[[], float] = time.monotonic
    _carried: dict[str, float] = field(default_factory=dict)  # replica id -> routed until
    _cursor: dict[str, int] = field(default_factory=dict)
    _cache: dict[str, list[Backend]] = field(default_factory=dict)  # cleared on every update

    # ------------------------------------------------------------------ reading

    def _routable(self, r: _Replica) -> bool:
        return self._routable_in(r, self.nodes)

    def backends(self, app: str) -> list[Backend]:
        """The app's routable replicas, in a stable order (by replica id)."""
        cached = self._cache.get(app)
        if cached is None:
            cached = self._cache[app] = [
                Backend(rid, r.app, self.nodes[r.node], r.port, r.generation, r.pid)
                for rid, r in sorted(self.replicas.items())
                if r.app == app and self._routable(r)]  # type: ignore[arg-type]
        return cached

    def all_backends(self) -> set[Backend]:
        return {b for app in {r.app for r in self.replicas.values()} for b in self.backends(app)}

    def is_routable(self, key: tuple[str, str, int]) -> bool:
        replica, address, port = key
        r = self.replicas.get(replica)
        return (r is not None and self._routable(r) and r.port == port
                and self.nodes.get(r.node) == address)

    def pick(self, app: str, exclude: Collection[str] = ()) -> Backend | None:
        """The next routable replica of ``app`` in round-robin order, skipping the
        replica ids in ``exclude``; None when there is none."""
        if self._carried and self.clock() >= min(self._carried.values()):
            self._drop_expired()
        candidates = [b for b in self.backends(app) if b.replica not in exclude]
        if not candidates:
            return None
        n = self._cursor.get(app, 0)
        self._cursor[app] = n + 1
        return candidates[n % len(candidates)]

    # ------------------------------------------------------------------ updating

    def apply_snapshot(self, state: dict[str, Any]) -> set[Backend]:
        """Replace everything by a ``status`` document; returns backends no longer routable."""
        before = self.all_backends()
        old_nodes, old_replicas = self.nodes, self.replicas
        self._cache.clear()
        self.nodes = {row["node"]: row["address"] for row in state.get("nodes", [])
                      if isinstance(row, dict) and isinstance(row.get("node"), str)
                      and isinstance(row.get("address"), str)}
        self.replicas = {}
        # Replicas on nodes this conductor has not heard from yet: carried over.
        until = self.clock() + CARRY_S
        carried = {rid: r for rid, r in old_replicas.items()
                   if r.node not in self.nodes and r.node in old_nodes
                   and self._routable_in(r, old_nodes)}
        self._carried = {rid: self._carried.get(rid, until) for rid in carried}
        for r in carried.values():
            self.nodes.setdefault(r.node, old_nodes[r.node])
        self.replicas.update(carried)
        for row in state.get("replicas", []):
            if not isinstance(row, dict) or not isinstance(row.get("replica"), str):
                continue
            self.replicas[row["replica"]] = _Replica(
                app=str(row.get("app")), node=str(row.get("node")), state=str(row.get("state")),
                port=_int_or_none(row.get("port")), generation=_int_or_none(
                    row.get("generation")) or 0, pid=_int_or_none(row.get("pid")))
            self._carried.pop(row["replica"], None)
        self.synced = True
        return self._gone(before)

    def apply_event(self, event: str, data: dict[str, Any]) -> set[Backend]:
        """Apply one event; returns the backends that just stopped being routable."""
        before = self.all_backends()
        self._cache.clear()
        kind, _, what = event.partition(".")
        if kind == "replica" and isinstance(data.get("replica"), str):
            self._carried.pop(data["replica"], None)  # the conductor knows it: a row again
            self._replica_event(what, data)
        elif event == "node.joined" and isinstance(data.get("node"), str):
            if isinstance(data.get("address"), str):
                self.nodes[data["node"]] = data["address"]
            soon = self.clock() + REJOIN_S
            for rid in self._carried:
                if self.replicas[rid].node == data["node"]:
                    self._carried[rid] = min(self._carried[rid], soon)
        elif event == "node.lost" and isinstance(data.get("node"), str):
            self.nodes.pop(data["node"], None)
            for rid in [rid for rid, r in self.replicas.items() if r.node == data["node"]]:
                del self.replicas[rid]
                self._carried.pop(rid, None)
        elif event == "app.removed" and isinstance(data.get("app"), str):
            for rid in [rid for rid, r in self.replicas.items() if r.app == data["app"]]:
                self.replicas[rid].state = "stopping"
        if self._carried:
            self._drop_expired()
        return self._gone(before)

    def _drop_expired(self) -> None:
        now = self.clock()
        for rid in [rid for rid, until in self._carried.items() if now >= until]:
            del self._carried[rid]
            self.replicas.pop(rid, None)
        self._cache.clear()

    def _routable_in(self, r: _Replica, nodes: dict[str, str]) -> bool:
        ok = r.state in ROUTABLE_STATES or (
            self.ignore_drain and r.state in ("draining", "stopping"))
        return ok and r.port is not None and r.node in nodes

    def _gone(self, before: set[Backend]) -> set[Backend]:
        still = {b.key for b in self.all_backends()}
        return {b for b in before if b.key not in still}

    def _replica_event(self, what: str, data: dict[str, Any]) -> None:
        rid = data["replica"]
        state = data.get("state") if isinstance(data.get("state"), str) else what
        if state in ("exited", "failed"):
            self.replicas.pop(rid, None)
            return
        r = self.replicas.get(rid)
        if r is None:
            r = self.replicas[rid] = _Replica(app=str(data.get("app")),
                                              node=str(data.get("node")), state=state)
        r.state = state
        if isinstance(data.get("node"), str):
            r.node = data["node"]
        for name in ("port", "generation", "pid"):
            value = _int_or_none(data.get(name))
            if value is not None:
                setattr(r, name, value)


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
