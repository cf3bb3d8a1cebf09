"""``/v1/watch``: a snapshot, then every event; what one watcher may cost the conductor.

A watcher gets the cluster's state (``type: snapshot``) and then each event
as it is published, a burst in one write. What it sends is read and dropped
(its rate and size limits apply: 1008, 1009). Three bounds keep watchers that
do not read, or are gone without a word, from holding memory and descriptors:

- **Queue in bytes** (``Limits.watch_queue_bytes``, ``--watch-queue-bytes``):
  the frames of the events published since the watcher subscribed and not
  yet written to its socket, those of a write under way included. An event
  that takes that over the bound cuts the watcher off: nothing more is taken
  for it, the write under way gets up to ``watch_idle_timeout_s`` to finish,
  then the watcher is closed with **1008** ``too slow: N bytes queued, over
  B`` (``watch_too_slow``). The events themselves stay in the bus's one
  shared log (:mod:`skr8tr.conductor.events`), and their frames are encoded
  once for all (:attr:`~skr8tr.conductor.events.Event.frame`): a watcher
  that is behind holds its place in the log and, while a write is stuck,
  at most :data:`~skr8tr.ws.server.WRITE_CHUNK_BYTES` of frames
  joined into bytes of its own. (Measured: 4,000 watchers that never read,
  30,000 events: see the CHANGELOG.)
- **Keep-alive** (``Limits.watch_idle_timeout_s``, ``--watch-idle-timeout``):
  the conductor pings every watcher each half of that time; one from which
  nothing (a pong included) came for that long is closed with **1011**
  ``no pong within S s`` (``ping_timeout``). Browsers, ``skr8tr watch``,
  ``rollout --watch`` and the ingress answer pings by themselves.
- **Snapshot**: one encoded snapshot serves every watcher that arrives within
  :data:`SNAPSHOT_REUSE_S` of it (events published since it follow it, from
  the bus's recent ring), so that a reconnecting crowd costs one
  ``status()`` and one encoding a second, not one each (a fleet of 1,000
  nodes and 10,000 replicas: 1.3 MB and ~23 ms to encode). Its frame is not
  counted in the queue: every watcher shares it.

Closes for these limits are counted in ``skr8tr_connections_closed_total``
and logged at most once per ``LOG_EVERY_S`` with the number since.
"""

from __future__ import annotations

import itertools
import logging
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from skr8tr.conductor import views
from skr8tr.conductor.cluster import Cluster
from skr8tr.conductor.events import EventBus
from skr8tr.conductor.limits import ClosedCounter, Limits, LogThrottle, TokenBucket
from skr8tr.core import protocol
from skr8tr.ws.server import ConnectionClosed, ServerConnection, frame_text

log = logging.getLogger("skr8tr.conductor")

SNAPSHOT_REUSE_S = 1.0
CLOSE_TIMEOUT_S = 2.0
MAX_MESSAGE_BYTES = protocol.MAX_MESSAGE_BYTES

_throttle = LogThrottle()


@dataclass
class SnapshotCache:
    """The last snapshot frame taken, at which event and when (``trio.current_time``)."""

    frame: bytes = b""
    seq: int = -1
    taken: float = float("-inf")

    def start_frames(self, cluster: Cluster) -> list[bytes]:
        """What a watcher subscribed just now starts with: a snapshot at the current
        event, or the shared one of the last :data:`SNAPSHOT_REUSE_S` followed by the
        events published since (when the bus's recent ring still holds them all)."""
        bus = cluster.events
        now = trio.current_time()
        if self.frame and now - self.taken < SNAPSHOT_REUSE_S:
            since = [ev for ev in bus.recent if ev.seq > self.seq]
            if len(since) == bus.seq - self.seq:
                return [self.frame, *(ev.frame for ev in since if ev.frame)]
        self.frame = frame_text(protocol.snapshot_message(bus.seq, cluster.wall(),
                                                          views.status(cluster)))
        self.seq, self.taken = bus.seq, now
        return [self.frame]


_snapshots: weakref.WeakKeyDictionary[EventBus, SnapshotCache] = weakref.WeakKeyDictionary()


def snapshot_cache(cluster: Cluster) -> SnapshotCache:
    """The snapshot cache shared by the watchers of *cluster*."""
    cache = _snapshots.get(cluster.events)
    if cache is None:
        cache = _snapshots[cluster.events] = SnapshotCache()
    return cache


def _count_close(closed: ClosedCounter | None, reason: str, peer: str, why: str) -> None:
    if closed is not None:
        closed.count(reason)
    n = _throttle.note(reason, trio.current_time())
    if n:
        log.warning("closed %d watcher(s) for %s, the last from %s: %s", n, reason, peer, why)


async def serve_watch(cluster: Cluster, accept: Callable[[], Awaitable[ServerConnection]], *,
                      limits: Limits | None = None, closed: ClosedCounter | None = None) -> None:
    """Serve one watcher until it leaves or breaks a limit (module docstring).

    ``accept`` completes the WebSocket handshake. The watcher is subscribed and
    its snapshot taken *before* that: a client that has its handshake answer
    and then sends a command sees every event the command publishes.

    Never raises ConnectionClosed; returns with the connection closed, or
    broken for the caller to close.
    """
    limits = limits or Limits()
    idle_s = limits.watch_idle_timeout_s
    ending: tuple[str, int, str] | None = None  # (reason, close code, why) of a limit
    counted = False

    with cluster.events.subscribe(max_bytes=limits.watch_queue_bytes) as events:
        start = snapshot_cache(cluster).start_frames(cluster)
        ws = await accept()
        peer = ws.peer
        async with trio.open_nursery() as nursery:
            sending = trio.CancelScope()

            def on_cut_off() -> None:
                # From inside publish: nothing more is taken; the write under way may
                # finish, within the grace.
                nonlocal ending, counted
                ending = ("watch_too_slow", 1008, f"too slow: {events.cut_off}")
                _count_close(closed, ending[0], peer, ending[2])  # now: the close may wait
                counted = True
                sending.deadline = min(sending.deadline, trio.current_time() + idle_s)

            events.on_cut_off = on_cut_off

            async def read_client() -> None:
                # Watchers only listen; read so that pongs and a close from their side arrive.
                nonlocal ending
                bucket = TokenBucket(limits.messages_per_s, limits.message_burst,
                                     trio.current_time())
                try:
                    while True:
                        await ws.get_message()
                        if not bucket.take(trio.current_time()):
                            ending = ("rate_limit", 1008,
                                      f"more than {limits.messages_per_s:g} messages/s")
                            break
                except ConnectionClosed as exc:
                    if exc.code == 1009:
                        _count_close(closed, "message_too_big", peer,
                                    f"a message over {MAX_MESSAGE_BYTES} bytes")
                nursery.cancel_scope.cancel()

            async def ping() -> None:
                # May wait behind a write to a peer that does not read: the watchdog
                # below never waits on the peer.
                for n in itertools.count(1):
                    await trio.sleep(idle_s / 2)
                    try:
                        await ws.send_ping(n.to_bytes(8, "big"))
                    except ConnectionClosed:
                        return

            async def watchdog() -> None:
                nonlocal ending
                while trio.current_time() < ws.last_received + idle_s:
                    await trio.sleep_until(ws.last_received + idle_s)
                if ending is None:
                    ending = ("ping_timeout", 1011, f"no pong within {idle_s:g} s")
                nursery.cancel_scope.cancel()

            nursery.start_soon(read_client)
            nursery.start_soon(ping)
            nursery.start_soon(watchdog)
            with sending:
                try:
                    await ws.send_frames(start)
                    while True:
                        await events.wait()
                        # One scheduling round first: the command that published this
                        # event finishes publishing, and what it queued for the nodes
                        # (a launch) and its reply leave before the watchers' copy.
                        # Then the whole burst goes out, in as few writes as may be.
                        await trio.sleep(0)
                        try:
                            burst, nbytes = events.take_all()
                        except trio.WouldBlock:
                            continue
                        await ws.send_frames([e.frame for e in burst if e.frame])
                        events.written(nbytes)
                except (ConnectionClosed, trio.EndOfChannel):
                    pass  # the watcher left, or a limit ends it
            nursery.cancel_scope.cancel()

    if ending is None:
        return
    reason, code, why = ending
    if not counted:
        _count_close(closed, reason, peer, why)
    with trio.move_on_after(CLOSE_TIMEOUT_S):
        await ws.aclose(code, why[:120])
