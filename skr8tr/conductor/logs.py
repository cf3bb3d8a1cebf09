"""The ``logs`` command's machinery: asking nodes for lines, and following them.

:class:`LogRequests` sends ``logs`` to nodes and matches their ``logs_reply``; a
``logs --follow`` is a :class:`LogFollow`: every connected node subscribes, pushes
(``logs_push``) what its tailer reads, and the client's connection (api.py) relays it
from a bounded buffer. A node's lines count only for its own replicas of the app asked
(:func:`own_lines`). The handler itself is ``commands.make_logs_handler``.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections import deque
from collections.abc import Container

import trio

from skr8tr.conductor.cluster import Cluster
from skr8tr.conductor.errors import CommandError
from skr8tr.core.node_protocol import (
    LogsPush,
    LogsReply,
    LogsRequest,
    LogsUnfollow,
    is_ident,
)

log = logging.getLogger("skr8tr.conductor")

LOGS_TIMEOUT_S = 5.0
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
