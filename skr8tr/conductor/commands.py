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
from collections import deque
from collections.abc import Awaitable, Callable, Container
from typing import Any

import trio

from skr8tr.conductor import views
from skr8tr.conductor.cluster import Cluster
from skr8tr.conductor.errors import CommandError
from skr8tr.conductor.rollout import RolloutManager, pruned_text
from skr8tr.conductor.store import Change
from skr8tr.conductor.tables import AppState, HistoryEntry, stored_app
from skr8tr.core import manifest as manifest_mod
from skr8tr.core.node_protocol import (
    AppGone,
    LogsPush,
    LogsReply,
    LogsRequest,
    LogsUnfollow,
    is_ident,
)

log = logging.getLogger("skr8tr.conductor")

LOGS_TIMEOUT_S = 5.0
DESCRIBE_EVENTS = 20  # the app's most recent events `describe` shows
DESCRIBE_HISTORY = 10  # and its most recent rollouts
MAX_FOLLOWS = 64  # log follows this conductor serves at once (each holds a connection)
FOLLOW_PENDING_LINES = 10_000  # lines waiting for one follow's client ...
FOLLOW_PENDING_CHARS = 4 * 2**20  # ... or characters of text, before lines are skipped
LINE_OVERHEAD_CHARS = 64
MAX_FOLLOW_AFTER = 10_000  # replicas whose last line number a follow remembers
# ... and the characters of them one node request's `after` holds: a node reads messages
# of up to 1 MiB and closes its session on a larger one (10,000 ids of 128 characters
# would be 1.5 MB: the node would leave, come back, be asked again, forever).
MAX_AFTER_CHARS = 768 * 1024
# The result of a follow carries its LogFollow under this key to the connection
# (api.py), which takes it out before the reply is sent.
FOLLOW_KEY = "\x00follow"

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
        # The recent-events ring is bounded (events.RECENT_EVENTS): so is this scan. An
        # event that cannot be sent as JSON (its frame is empty, and logged) is left out,
        # as watchers leave it out, rather than failing the reply.
        mine = [e for e in cluster.events.recent if e.data.get("app") == name]
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


class LogFollow:
    """One client's ``logs --follow``: the nodes it is subscribed on and the lines on
    their way to the client, in a bounded buffer.

    Nodes push lines (``logs_push``) into :meth:`offer`; the client's connection
    takes them with :meth:`next_batch`. Beyond ``FOLLOW_PENDING_LINES`` lines or
    ``FOLLOW_PENDING_CHARS`` characters waiting, lines are only counted as skipped
    until the client has caught up, and it is told how many. ``last_seq`` keeps,
    per replica, the number of the last line handed to the client: a node that
    joins or comes back is asked for the lines after those (``after``), and lines
    of replicas not seen yet from ``since`` on.
    """

    def __init__(self, app: str, replica: str | None, *, since: float,
                 after: dict[str, int] | None = None) -> None:
        self.app = app
        self.replica = replica
        self.since = since
        self.last_seq: dict[str, int] = dict(after or {})
        self.nodes: dict[str, tuple[int, str]] = {}  # node id -> (session, req)
        self.pending: deque[dict] = deque()
        self.pending_chars = 0
        self.skipped = 0
        self.closed = False
        self._ready = trio.Event()

    def offer(self, lines: list[dict], skipped: int = 0) -> None:
        """Lines from a node (in its order), then *skipped* it had to drop after them."""
        for line in lines:
            size = len(line["text"]) + LINE_OVERHEAD_CHARS
            if (self.skipped or len(self.pending) >= FOLLOW_PENDING_LINES
                    or self.pending_chars + size > FOLLOW_PENDING_CHARS):
                self.skipped += 1
                continue
            self.pending.append(line)
            self.pending_chars += size
        if skipped:
            if self.skipped or len(self.pending) >= FOLLOW_PENDING_LINES:
                # Full: told with the client's own count once it catches up. (A node that
                # pushes only counts must not grow the buffer a marker each.)
                self.skipped += skipped
            elif self.pending and "skipped" in self.pending[-1]:
                self.pending[-1]["skipped"] += skipped  # one marker between two lines
            else:
                # Told after the lines before it: a marker of its own in the stream.
                self.pending.append({"skipped": skipped})
        self._ready.set()

    async def next_batch(self, max_lines: int) -> tuple[list[dict], int]:
        """The next lines for the client (up to *max_lines*, oldest first) and how many
        were skipped right after them. Waits for some; cancellable."""
        while not self.pending and not self.skipped:
            self._ready = trio.Event()
            await self._ready.wait()
        batch: list[dict] = []
        skipped = 0
        while self.pending and len(batch) < max_lines:
            line = self.pending.popleft()
            if "skipped" in line:  # a node's own count: the batch ends there
                skipped = line["skipped"]
                break
            self.pending_chars -= len(line["text"]) + LINE_OVERHEAD_CHARS
            batch.append(line)
        if not self.pending:
            skipped, self.skipped = skipped + self.skipped, 0
        for line in batch:
            seq = line.get("seq")
            if isinstance(seq, int):
                self.last_seq.pop(line["replica"], None)  # most recent last
                self.last_seq[line["replica"]] = seq
        while len(self.last_seq) > MAX_FOLLOW_AFTER:
            del self.last_seq[next(iter(self.last_seq))]
        return batch, skipped

    def resume_point(self) -> dict[str, int]:
        """``after`` for a node asked anew: the replicas whose lines were shown (the most
        recent, within MAX_AFTER_CHARS)."""
        return fit_after({r: seq for r, seq in self.last_seq.items() if is_ident(r)})


def fit_after(after: dict[str, int]) -> dict[str, int]:
    """The last (most recent) entries of *after* whose JSON fits MAX_AFTER_CHARS."""
    size = 0
    kept: list[tuple[str, int]] = []
    for replica, seq in reversed(after.items()):
        size += len(replica) + len(str(seq)) + 4  # "id":seq, (ids are ASCII)
        if size > MAX_AFTER_CHARS:
            break
        kept.append((replica, seq))
    if len(kept) == len(after):
        return after
    return dict(reversed(kept))


def is_replica_of(replica: str, app: str, apps: Container[str] = ()) -> bool:
    """Whether *replica*, an id the conductor does not know (any more), can be one of
    *app*'s: the conductor names them ``APP-...`` (Cluster._new_replica_id). An id that
    starts with the name of a longer app of *apps* (``web-api-1a2b3c`` for ``web`` when
    ``web-api`` exists) is that app's."""
    if not replica.startswith(app) or replica[len(app):len(app) + 1] != "-":
        return False
    dash = replica.find("-", len(app) + 1)
    while dash != -1:  # at most MAX_ID_CHARS look-ups
        if replica[:dash] in apps:
            return False
        dash = replica.find("-", dash + 1)
    return len(replica) > len(app) + 1


def own_lines(lines: list[dict], node_id: str, app: str, replica: str | None,
              cluster: Cluster | None) -> list[dict]:
    """The *lines* a node *node_id* may tell about *app* (or its one *replica*): those of
    the app's replicas that *cluster* has on that node, and of ended ones that *cluster*
    remembers that node ran (``cluster.replicas.ran``, the last
    :data:`~skr8tr.conductor.tables.RAN_KEPT_PER_APP` of each app). A node key speaks
    only for its own replicas: any other line is dropped, so that no node puts words
    in another node's replica or another app's, nor invents a replica. An id this
    conductor never placed is dropped too: after a conductor restart that is a replica
    that ended before it (its files stay on the node); a live replica is re-adopted
    from the node's hello, with its placement token, and shows. Without *cluster*
    (tests), ids that can be the app's (:func:`is_replica_of`)."""
    if cluster is None:
        def mine(line: dict) -> bool:
            rid = line["replica"]
            return (replica is None or rid == replica) and is_replica_of(rid, app, ())
    else:
        replicas = cluster.replicas

        def mine(line: dict) -> bool:
            rid = line["replica"]
            if replica is not None and rid != replica:
                return False
            known = replicas.get(rid)
            if known is not None:
                return known.app == app and known.node_id == node_id
            return replicas.ran.node_of(app, rid) == node_id
    if all(mine(line) for line in lines):
        return lines
    return [line for line in lines if mine(line)]


class LogRequests:
    """Pending ``logs`` requests to nodes, matched with their ``logs_reply``; and the
    log follows, matched with their nodes' ``logs_push``. A node's answer keeps only
    the lines of its own replicas of the app asked for (:func:`own_lines`)."""

    def __init__(self, max_follows: int = MAX_FOLLOWS) -> None:
        # req -> (the asker's channel, node id, app, replica)
        self._pending: dict[str, tuple[trio.MemorySendChannel, str, str, str | None]] = {}
        self._follow_reqs: dict[str, tuple[LogFollow, str]] = {}  # req -> (follow, node id)
        self.follows: set[LogFollow] = set()
        self.max_follows = max_follows

    def reply(self, node_id: str, msg: LogsReply, cluster: Cluster | None = None) -> None:
        """A node's ``logs_reply``; *cluster* to check whose lines it sends."""
        slot = self._pending.get(msg.req)
        if slot is not None and slot[1] == node_id:
            lines = own_lines(msg.lines, node_id, slot[2], slot[3], cluster)
            # The asker may have given up (closed) or have its answer already.
            with contextlib.suppress(trio.WouldBlock, trio.BrokenResourceError,
                                     trio.ClosedResourceError):
                slot[0].send_nowait(lines)
            return
        follow = self._follow_reqs.get(msg.req)
        if follow is not None and follow[1] == node_id:
            # A node asked again (it joined or came back): its lines since then.
            f = follow[0]
            lines = own_lines(msg.lines, node_id, f.app, f.replica, cluster)
            f.offer(sorted(lines, key=lambda line: line["ts"]))

    def push(self, node_id: str, msg: LogsPush, cluster: Cluster | None = None) -> None:
        """A node's ``logs_push``: only into the follow that asked that node, only
        lines of its own replicas of the app (:func:`own_lines`, checked with *cluster*)."""
        follow = self._follow_reqs.get(msg.req)
        if follow is not None and follow[1] == node_id and not follow[0].closed:
            f = follow[0]
            f.offer(own_lines(msg.lines, node_id, f.app, f.replica, cluster), msg.skipped)

    async def gather(self, cluster: Cluster, node_ids: list[str], app: str,
                     replica: str | None, tail: int, *, follow: LogFollow | None = None,
                     after: dict[str, int] | None = None) -> list[dict]:
        """The last *tail* lines of *app* on *node_ids* (with *after*: the lines after
        those numbers), oldest first; with *follow*, each node also subscribes it."""
        send, recv = trio.open_memory_channel[list](len(node_ids) or 1)
        asked = 0
        reqs = []
        for node_id in node_ids:
            req = secrets.token_hex(8)
            self._pending[req] = (send, node_id, app, replica)
            reqs.append(req)
            msg = LogsRequest(req=req, app=app, replica=replica, tail=tail)
            if follow is not None:
                msg = LogsRequest(req=req, app=app, replica=replica, tail=tail, follow=True,
                                  after=after, since=follow.since if after is not None else None)
            if cluster.send(node_id, msg):
                asked += 1
                if follow is not None:
                    self._subscribed(cluster, follow, node_id, req)
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
        if after is not None:
            return lines
        return lines[-tail:] if tail else []

    def open_follow(self, follow: LogFollow) -> None:
        """Count *follow* among those served; CommandError CONFLICT over the cap."""
        if len(self.follows) >= self.max_follows:
            raise CommandError("CONFLICT", f"{len(self.follows)} log follows are open on "
                               "this conductor, the most it serves; end one (or run logs "
                               "without --follow)")
        self.follows.add(follow)

    def _subscribed(self, cluster: Cluster, follow: LogFollow, node_id: str, req: str) -> None:
        old = follow.nodes.get(node_id)
        if old is not None:
            self._follow_reqs.pop(old[1], None)
        node = cluster.nodes.get(node_id)
        follow.nodes[node_id] = (node.session if node is not None else -1, req)
        self._follow_reqs[req] = (follow, node_id)

    def rescan(self, cluster: Cluster, follow: LogFollow) -> int:
        """Subscribe *follow* on the connected nodes it is not subscribed on in their
        current session (joined, or came back); returns how many were asked. Their
        first lines are those after ``follow.last_seq`` (and from ``since``)."""
        asked = 0
        for node in list(cluster.nodes.values()):
            if not node.connected:
                continue
            known = follow.nodes.get(node.node_id)
            if known is not None and known[0] == node.session:
                continue
            req = secrets.token_hex(8)
            msg = LogsRequest(req=req, app=follow.app, replica=follow.replica, tail=0,
                              follow=True, after=follow.resume_point(), since=follow.since)
            if cluster.send(node.node_id, msg):
                self._subscribed(cluster, follow, node.node_id, req)
                asked += 1
        return asked

    def close_follow(self, cluster: Cluster, follow: LogFollow) -> None:
        """The client is gone: the nodes stop pushing for it (``logs_unfollow``)."""
        follow.closed = True
        self.follows.discard(follow)
        for node_id, (session, req) in follow.nodes.items():
            self._follow_reqs.pop(req, None)
            node = cluster.nodes.get(node_id)
            if node is not None and node.connected and node.session == session:
                cluster.send(node_id, LogsUnfollow(req=req))
        follow.nodes.clear()


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

    return {"rollout": cmd_rollout, "rollout-status": cmd_rollout_status,
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
