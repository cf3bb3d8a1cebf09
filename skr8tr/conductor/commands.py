"""The commands of ``/v1/cli``, applied to the :class:`Cluster`.

Each handler takes arguments the protocol layer has already validated and
returns exactly the ``result`` the CLI's ``--json`` prints, or raises
:class:`CommandError` with a wire error code. Authentication happened before
any of this runs.

A command that changes desired state holds ``cluster.changing(app)``,
computes the change, makes it durable (``cluster.commit``: refused with
INTERNAL, and nothing changed, when the store cannot) and only then applies
it in memory.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from skr8tr.conductor import views
from skr8tr.conductor.cluster import Cluster
from skr8tr.conductor.errors import CommandError
from skr8tr.conductor.logs import FOLLOW_KEY, LogFollow, LogRequests, fit_after
from skr8tr.conductor.rollout import RolloutManager, pruned_text
from skr8tr.conductor.store import Change
from skr8tr.conductor.tables import AppState, HistoryEntry, stored_app
from skr8tr.core import manifest as manifest_mod
from skr8tr.core.node_protocol import (
    AppGone,
    is_ident,
)

log = logging.getLogger("skr8tr.conductor")

DESCRIBE_EVENTS = 20  # the app's most recent events `describe` shows
DESCRIBE_HISTORY = 10  # and its most recent rollouts

Handler = Callable[[Cluster, dict], Awaitable[Any]]


LARGE_MANIFEST_CHARS = 16 * 1024  # parsed in a worker thread above this


def _parse_now(args: dict) -> manifest_mod.Manifest:
    fmt = args["format"]
    try:
        return manifest_mod.parse_manifest(args["manifest"], filename=f"manifest.{fmt}",
                                           base_dir=args["base_dir"], format=fmt)
    except manifest_mod.ManifestError as exc:
        raise CommandError("INVALID_MANIFEST", str(exc)) from None


async def parse_manifest_arg(args: dict,
                             limiter: trio.CapacityLimiter | None = None) -> manifest_mod.Manifest:
    """The manifest of an ``up``/``rollout`` request, parsed; raises CommandError
    INVALID_MANIFEST. A large one is parsed in a worker thread (under *limiter*) so
    that the event loop goes on serving nodes and clients meanwhile."""
    if len(args["manifest"]) <= LARGE_MANIFEST_CHARS:
        return _parse_now(args)
    return await trio.to_thread.run_sync(_parse_now, args, limiter=limiter)


async def _parse(args: dict) -> tuple[manifest_mod.Manifest, str, str]:
    """Manifest, text and format of a request; ``parsed`` when the caller parsed it."""
    m = args.get("parsed")
    if m is None:
        m = await parse_manifest_arg(args)
    return m, args["manifest"], args["format"]


def _app(cluster: Cluster, name: str):
    app = cluster.apps.get(name)
    if app is None:
        known = ", ".join(sorted(cluster.apps)) or "none"
        raise CommandError("NOT_FOUND", f"no app named {name!r} (apps: {known})")
    return app


async def cmd_ping(cluster: Cluster, args: dict) -> Any:
    return views.ping(cluster)


async def cmd_up(cluster: Cluster, args: dict) -> Any:
    m, text, fmt = await _parse(args)
    async with cluster.changing(m.app):
        app = cluster.apps.get(m.app)
        if app is not None:
            if app.manifest == m:
                return views.up_result(cluster, app)  # the same manifest changes nothing
            raise CommandError(
                "CONFLICT",
                f"app {m.app} already runs generation {app.generation} with a different "
                f"manifest; use `skr8tr rollout FILE` to change it",
            )
        app = cluster.new_app(m, text, fmt)
        await cluster.commit(Change(apps={app.name: stored_app(app)}))
        cluster.add_app(app)
        cluster.reconcile_app(app)
    if app.placement_error is not None:
        placed = views.live_count(cluster, app)
        raise CommandError(
            "NO_CAPACITY",
            f"placed {placed} of {app.desired} replica(s) of {app.name}; "
            f"{app.placement_error}. The app is kept and the rest will be placed when "
            f"capacity appears",
        )
    return views.up_result(cluster, app)


def make_down_handler(rollouts: RolloutManager) -> Handler:
    async def cmd_down(cluster: Cluster, args: dict) -> Any:
        name = args["app"]
        _app(cluster, name)
        if name in rollouts.active:
            await rollouts.abort(name)  # its cleanup first, then everything goes
        async with cluster.changing(name):
            _app(cluster, name)  # (removed meanwhile by another `down`)
            # Its last rollout goes with it: an app deployed again under the name starts
            # at generation 1, and the store must not pair it with the old generations.
            await cluster.commit(Change(apps={name: None}, rollouts={name: None}))
            stopped = cluster.remove_app(name)
            rollouts.last.pop(name, None)
        # Every node deletes the app's log files (those still stopping: at their exit).
        # A node away now keeps them, bounded per app (skr8tr/node/logs.py).
        for node in list(cluster.nodes.values()):
            if node.connected:
                cluster.send(node.node_id, AppGone(app=name))
        return {"app": name, "stopped": stopped}

    return cmd_down


async def cmd_scale(cluster: Cluster, args: dict) -> Any:
    name = args["app"]
    async with cluster.changing(name):
        current = _app(cluster, name)
        if current.rolling:
            raise CommandError("CONFLICT", f"a rollout of {name} is running; scale after "
                               "it ends, or put the new count in the manifest you roll out")
        previous = current.desired
        await cluster.commit(Change(apps={name: stored_app(dataclasses.replace(
            current, desired=args["replicas"], completed=0, given_up=0))}))
        app = cluster.scale_app(name, args["replicas"])
        cluster.reconcile_app(app)
    if app.placement_error is not None:
        placed = views.live_count(cluster, app)
        raise CommandError(
            "NO_CAPACITY",
            f"{app.name} is scaled to {app.desired} but only {placed} replica(s) could be "
            f"placed: {app.placement_error}",
        )
    return views.up_result(cluster, app, previous=previous)


async def cmd_list(cluster: Cluster, args: dict) -> Any:
    name = args.get("app")
    if name is not None and name not in cluster.apps and not views.replica_rows(cluster, name):
        _app(cluster, name)
    return views.replica_rows(cluster, name)


async def cmd_nodes(cluster: Cluster, args: dict) -> Any:
    return views.node_rows(cluster)


async def cmd_status(cluster: Cluster, args: dict) -> Any:
    return views.status(cluster)


async def cmd_history(cluster: Cluster, args: dict) -> Any:
    app = _app(cluster, args["app"])
    return [history_row(app, h) for h in app.history]


def history_row(app: AppState, entry: HistoryEntry) -> dict[str, Any]:
    """A ``rollout history`` row, and whether its manifest is still kept (retention)."""
    return {**entry.row(), "manifest_kept": entry.generation in app.revisions}


def pruned_message(cluster: Cluster, app: AppState, generation: int) -> str | None:
    """Why ``generation`` of ``app`` has no manifest any more, when it was pruned; None
    when it never existed or is kept."""
    if not 1 <= generation <= app.last_generation or generation in app.revisions:
        return None
    return (f"{app.name} generation {generation}: "
            f"{pruned_text(app, generation, cluster.keep_revisions)}")


async def cmd_revision(cluster: Cluster, args: dict) -> Any:
    """``rollout history APP --generation N``: one revision, its manifest text included
    (signed: the text holds the env values)."""
    name, generation = args["app"], args["generation"]
    app = _app(cluster, name)
    revision = app.revisions.get(generation)
    pruned = pruned_message(cluster, app, generation)
    if pruned is not None:
        raise CommandError("NOT_FOUND", pruned)
    if revision is None:
        known = sorted(app.revisions)
        shown = ", ".join(map(str, known[-20:]))
        raise CommandError("NOT_FOUND", f"{name} has no generation {generation} (known: "
                           f"{'..., ' if len(known) > 20 else ''}{shown})")
    entry = next((h for h in app.history if h.generation == generation), None)
    return {"app": name, "generation": generation,
            "state": None if entry is None else entry.state,
            "started": None if entry is None else entry.started,
            "finished": None if entry is None else entry.finished,
            "manifest_sha256": revision.sha256, "format": revision.format,
            "base_dir": revision.manifest.base_dir, "current": generation == app.generation,
            "manifest": revision.text}


def make_describe_handler(rollouts: RolloutManager) -> Handler:
    async def cmd_describe(cluster: Cluster, args: dict) -> Any:
        """``describe APP``: the app's manifest, counts, replicas (the rows of ``list``,
        with whatever fields they carry), last rollout, recent rollouts and events."""
        name = args["app"]
        app = _app(cluster, name)
        revision = app.revision
        counts = next((row for row in views.app_rows(cluster) if row["app"] == name), None)
        # The app's own ring (events.APP_RECENT_EVENTS). An event that cannot be sent as
        # JSON (its frame is empty, and logged) is left out, as watchers leave it out,
        # rather than failing the reply.
        mine = cluster.events.recent_of(name)
        events = [{"seq": e.seq, "ts": e.ts, "event": e.event, "data": e.data}
                  for e in mine[-DESCRIBE_EVENTS:] if e.frame]
        record = rollouts.last.get(name)
        return {
            "app": name, "type": revision.manifest.type, "generation": app.generation,
            "desired": app.desired, "counts": counts,
            "manifest_sha256": revision.sha256, "format": revision.format,
            "base_dir": revision.manifest.base_dir, "manifest": revision.text,
            "replicas": views.replica_rows(cluster, name),
            "rollout": None if record is None else record.status(cluster.clock()),
            "history": [history_row(app, h) for h in app.history[-DESCRIBE_HISTORY:]],
            "events": events,
        }

    return cmd_describe


def make_logs_handler(requests: LogRequests) -> Handler:
    async def cmd_logs(cluster: Cluster, args: dict) -> Any:
        name, replica = args["app"], args.get("replica")
        if name not in cluster.apps and not views.replica_rows(cluster, name):
            _app(cluster, name)
        if replica is not None:
            r = cluster.replicas.get(replica)
            if r is not None and r.app != name:
                raise CommandError("NOT_FOUND", f"replica {replica} belongs to {r.app}, "
                                   f"not {name}")
            node_ids = [r.node_id] if r is not None else sorted(cluster.nodes)
        else:
            # Ask every connected node: finished replicas (a completed job) have no
            # row any more, but their node still has their lines.
            node_ids = sorted(n.node_id for n in cluster.nodes.values() if n.connected)
        tail = args.get("tail", 100)
        if not args.get("follow"):
            if tail == 0:
                return {"lines": []}
            return {"lines": await requests.gather(cluster, node_ids, name, replica, tail)}
        # A follow: every connected node subscribes (a replica of the app may start on
        # any of them), and the connection then relays what they push (api.py).
        after = args.get("after")
        if after is not None:
            after = fit_after({r: seq for r, seq in after.items() if is_ident(r)})
        since = args.get("since")
        follow = LogFollow(name, replica, after=after,
                           since=since if since is not None else cluster.wall())
        requests.open_follow(follow)
        try:
            node_ids = sorted(n.node_id for n in cluster.nodes.values() if n.connected)
            lines = await requests.gather(cluster, node_ids, name, replica, tail,
                                          follow=follow, after=after)
        except BaseException:
            requests.close_follow(cluster, follow)
            raise
        return {"lines": lines, "follow": True, FOLLOW_KEY: follow}

    return cmd_logs


def make_rollout_handlers(rollouts: RolloutManager) -> dict[str, Handler]:
    async def cmd_rollout(cluster: Cluster, args: dict) -> Any:
        m, text, fmt = await _parse(args)
        return await rollouts.start(m, text, fmt, force=args.get("force", False))

    async def cmd_rollout_status(cluster: Cluster, args: dict) -> Any:
        return rollouts.status(args["app"])

    async def cmd_rollout_abort(cluster: Cluster, args: dict) -> Any:
        return await rollouts.abort(args["app"])

    async def cmd_rollout_undo(cluster: Cluster, args: dict) -> Any:
        return await rollouts.undo(args["app"], args.get("to"), force=args.get("force", False))

    async def cmd_restart(cluster: Cluster, args: dict) -> Any:
        return await rollouts.restart(args["app"], force=args.get("force", False))

    async def cmd_rollout_promote(cluster: Cluster, args: dict) -> Any:
        return await rollouts.promote(args["app"])

    async def cmd_rollout_pause(cluster: Cluster, args: dict) -> Any:
        return await rollouts.pause(args["app"], True)

    async def cmd_rollout_resume(cluster: Cluster, args: dict) -> Any:
        return await rollouts.pause(args["app"], False)

    return {"rollout-promote": cmd_rollout_promote, "rollout-pause": cmd_rollout_pause,
            "rollout-resume": cmd_rollout_resume,
            "rollout": cmd_rollout, "rollout-status": cmd_rollout_status,
            "rollout-abort": cmd_rollout_abort, "rollout-undo": cmd_rollout_undo,
            "restart": cmd_restart}


def handlers(log_requests: LogRequests, rollouts: RolloutManager) -> dict[str, Handler]:
    return {
        **make_rollout_handlers(rollouts),
        "ping": cmd_ping,
        "up": cmd_up,
        "down": make_down_handler(rollouts),
        "scale": cmd_scale,
        "list": cmd_list,
        "nodes": cmd_nodes,
        "status": cmd_status,
        "history": cmd_history,
        "revision": cmd_revision,
        "describe": make_describe_handler(rollouts),
        "logs": make_logs_handler(log_requests),
    }
