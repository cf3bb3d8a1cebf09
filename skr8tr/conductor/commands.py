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

import contextlib
import dataclasses
import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from skr8tr.conductor import views
from skr8tr.conductor.cluster import Cluster
from skr8tr.conductor.errors import CommandError
from skr8tr.conductor.rollout import RolloutManager
from skr8tr.conductor.store import Change
from skr8tr.conductor.tables import stored_app
from skr8tr.core import manifest as manifest_mod
from skr8tr.core.node_protocol import LogsReply, LogsRequest

log = logging.getLogger("skr8tr.conductor")

LOGS_TIMEOUT_S = 5.0

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
    return [h.row() for h in _app(cluster, args["app"]).history]


class LogRequests:
    """Pending ``logs`` requests to nodes, matched with their ``logs_reply``."""

    def __init__(self) -> None:
        self._pending: dict[str, tuple[trio.MemorySendChannel, str]] = {}

    def reply(self, node_id: str, msg: LogsReply) -> None:
        slot = self._pending.get(msg.req)
        if slot is not None and slot[1] == node_id:
            # The asker may have given up (closed) or have its answer already.
            with contextlib.suppress(trio.WouldBlock, trio.BrokenResourceError,
                                     trio.ClosedResourceError):
                slot[0].send_nowait(msg.lines)

    async def gather(self, cluster: Cluster, node_ids: list[str], app: str,
                     replica: str | None, tail: int) -> list[dict]:
        send, recv = trio.open_memory_channel[list](len(node_ids) or 1)
        asked = 0
        reqs = []
        for node_id in node_ids:
            req = secrets.token_hex(8)
            self._pending[req] = (send, node_id)
            reqs.append(req)
            if cluster.send(node_id, LogsRequest(req=req, app=app, replica=replica, tail=tail)):
                asked += 1
        lines: list[dict] = []
        try:
            with trio.move_on_after(LOGS_TIMEOUT_S):
                for _ in range(asked):
                    lines.extend(await recv.receive())
        finally:
            for req in reqs:
                self._pending.pop(req, None)
            send.close()
            recv.close()
        lines.sort(key=lambda line: line["ts"])
        return lines[-tail:]


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
        lines = await requests.gather(cluster, node_ids, name, replica, args.get("tail", 100))
        return {"lines": lines}

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
        return await rollouts.undo(args["app"], args.get("to"))

    return {"rollout": cmd_rollout, "rollout-status": cmd_rollout_status,
            "rollout-abort": cmd_rollout_abort, "rollout-undo": cmd_rollout_undo}


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
        "logs": make_logs_handler(log_requests),
    }
