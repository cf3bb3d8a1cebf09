"""What the conductor shows: rows of nodes, apps and replicas for the wire and the page.

Read-only functions of the :class:`~skr8tr.conductor.cluster.Cluster`; the
shapes are those of ``skr8tr list/nodes/status --json``, ``/api/state`` and
the ``/v1/watch`` snapshot (each key is part of the outside contract).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
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
    """One row per app. The counts are of every generation, as the replicas are now:
    during a rollout the new replicas that are ready serve as much as the old ones.

    ``ready``: serving (state ``ready``); ``running``: live (pending, running or ready);
    ``starting``: live, not ready yet; ``draining``, ``stopping``: on their way out.
    """
    rows = []
    for app in sorted(cluster.apps.values(), key=lambda a: a.name):
        counts = replica_counts(r.state for r in cluster.replicas.of_app(app.name))
        rows.append({
            "app": app.name, "type": app.manifest.type, "generation": app.generation,
            "desired": app.desired,
            "running": counts["running"],
            "ready": counts["ready"],
            "starting": counts["starting"],
            "draining": counts["draining"],
            "stopping": counts["stopping"],
            "completed": app.completed,
            "message": app.placement_error,
        })
    return rows


def live_count(cluster: Cluster, app: AppState) -> int:
    """The app's replicas of its generation that are placed and not on their way out
    (what ``placed N of M`` counts: not the draining, stopping or ended ones)."""
    return sum(r.generation == app.generation and r.state in replica_state.LIVE
               for r in cluster.replicas.of_app(app.name))


def replica_counts(states: Iterable[str]) -> dict[str, int]:
    """How many replicas are ``ready`` (serving), ``starting`` (pending or running),
    ``running`` (live: both of those), ``draining`` and ``stopping``."""
    by_state = Counter(states)
    starting = by_state["pending"] + by_state["running"]
    return {"ready": by_state["ready"], "starting": starting,
            "running": starting + by_state["ready"], "draining": by_state["draining"],
            "stopping": by_state["stopping"]}


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
    """``skr8tr status --json``: nodes, apps, replicas, the last rollout of each app,
    each app's recent history and the ingresses reporting traffic."""
    return {"nodes": node_rows(cluster), "apps": app_rows(cluster),
            "replicas": replica_rows(cluster), "rollouts": cluster.rollout_statuses(),
            "history": history_rows(cluster),
            "leader": cluster.seat.leader, "conductors": cluster.seat.conductors(),
            "ingresses": cluster.ingresses.rows(cluster.clock())}


def up_result(cluster: Cluster, app: AppState, *, previous: int | None = None
              ) -> dict[str, Any]:
    """``up`` and ``scale``: the app, its generation and replicas, and the count it
    keeps (``desired``); ``scale`` adds the count before (``previous``)."""
    result = {"app": app.name, "generation": app.generation,
              "replicas": replica_rows(cluster, app.name), "desired": app.desired}
    if previous is not None:
        result["previous"] = previous
    return result


def ping(cluster: Cluster) -> dict[str, Any]:
    """``{"pong":"conductor","version","role","leader"}``: a follower answers it too."""
    return cluster.seat.ping(__version__)
