"""What the conductor shows: rows of nodes, apps and replicas for the wire and the page.

Read-only functions of the :class:`~skr8tr.conductor.cluster.Cluster`; the
shapes are those of ``skr8tr list/nodes/status --json``, ``/api/state`` and
the ``/v1/watch`` snapshot (each key is part of the outside contract).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from skr8tr import __version__
from skr8tr.core import replica_state, why

if TYPE_CHECKING:
    from skr8tr.conductor.cluster import Cluster
    from skr8tr.conductor.tables import AppState


def replica_rows(cluster: Cluster, app: str | None = None) -> list[dict[str, Any]]:
    """Every replica (of ``app``), ordered by app, generation and placement order."""
    rows = (list(cluster.replicas.values()) if app is None
            else cluster.replicas.of_app(app))
    rows.sort(key=lambda r: (r.app, r.generation, r.seq))
    now = cluster.clock()
    return [r.row(now) for r in rows]


def node_rows(cluster: Cluster) -> list[dict[str, Any]]:
    now = cluster.clock()
    rows = []
    for n in sorted(cluster.nodes.values(), key=lambda n: n.node_id):
        mine = [r for r in cluster.replicas.on_node(n.node_id)
                if r.state not in replica_state.ENDED]
        rows.append({
            "node": n.node_id, "address": n.address, "cpu_pct": round(n.cpu_pct, 1),
            "ram_free_mb": n.ram_free_mb,
            "ports": sorted(r.port for r in mine if r.port is not None),
            "replicas": len(mine), "last_seen_s": round(max(0.0, now - n.last_seen), 3),
        })
    return rows


def app_rows(cluster: Cluster) -> list[dict[str, Any]]:
    rows = []
    for app in sorted(cluster.apps.values(), key=lambda a: a.name):
        current = [r for r in cluster.replicas.of_app(app.name)
                   if r.generation == app.generation]
        rows.append({
            "app": app.name, "type": app.manifest.type, "generation": app.generation,
            "desired": app.desired,
            "running": sum(r.state in replica_state.LIVE for r in current),
            "ready": sum(r.state == "ready" for r in current),
            "completed": app.completed,
            "message": app.placement_error,
        })
    return rows


HISTORY_SHOWN = 10  # generations per app in `status` (all of them: `rollout history APP`)
HISTORY_MESSAGE_CHARS = 300


def history_rows(cluster: Cluster) -> dict[str, list[dict[str, Any]]]:
    """App -> its last :data:`HISTORY_SHOWN` generations, oldest first, as ``rollout history``
    shows them, each with ``message``: how its rollout ended (null for ``up``'s, and for
    the ones that ended before this conductor started)."""
    return {
        name: [{**h.row(), "message": None if h.message is None
                else why.clean(h.message, HISTORY_MESSAGE_CHARS)}
               for h in app.history[-HISTORY_SHOWN:]]
        for name, app in sorted(cluster.apps.items())
    }


def status(cluster: Cluster) -> dict[str, Any]:
    """``skr8tr status --json``: nodes, apps, replicas, the last rollout of each app and
    each app's recent history."""
    return {"nodes": node_rows(cluster), "apps": app_rows(cluster),
            "replicas": replica_rows(cluster), "rollouts": cluster.rollout_statuses(),
            "history": history_rows(cluster),
            "leader": cluster.seat.leader, "conductors": cluster.seat.conductors()}


def up_result(cluster: Cluster, app: AppState) -> dict[str, Any]:
    return {"app": app.name, "generation": app.generation,
            "replicas": replica_rows(cluster, app.name)}


def ping(cluster: Cluster) -> dict[str, Any]:
    """``{"pong":"conductor","version","role","leader"}``: a follower answers it too."""
    return cluster.seat.ping(__version__)
