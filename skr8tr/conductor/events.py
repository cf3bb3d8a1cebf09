"""The event bus behind ``/v1/watch``: numbered events, a ring of recent ones, subscribers.

Publishing never blocks and never fails. Subscribers read one shared log of
the events published since the slowest of them subscribed or last took one:
each holds only its place in that log, so a subscriber costs the same however
far behind it is. One that falls too far behind is cut off (its stream ends:
a watcher is told why, reconnects and gets a fresh snapshot) rather than
slowing the conductor down or holding memory. Too far is either a count of
events (:data:`SUBSCRIBER_BUFFER`) or, for watchers, bytes: the size of the
events' WebSocket frames that the subscriber has not yet written out
(:meth:`Subscription.written`). The log holds no more than what the slowest
subscriber may lag.

An event's frame (:attr:`Event.frame`) is encoded once, on first use, and
shared by every watcher.
"""

from __future__ import annotations

import collections
import functools
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import trio

from skr8tr.core import protocol
from skr8tr.ws.server import frame_text

log = logging.getLogger("skr8tr.conductor")

RECENT_EVENTS = 200
# Per app, its own last events (`describe`): a busy cluster's shared ring of 200 would
# hold few of a quiet app's. Apps beyond the bound are forgotten, least recent first.
APP_RECENT_EVENTS = 20
APPS_WITH_RECENT = 4096
# Room for the burst of a large fleet: 100 nodes lost at once with 10 replicas each
# publish ~4,000 events in one go (lost, failed, placed, running, ready).
SUBSCRIBER_BUFFER = 16384


@dataclass(frozen=True)
class Event:
    seq: int
    ts: float  # wall-clock seconds since the epoch
    event: str  # dotted name, e.g. "replica.ready"
    data: dict[str, Any]

    @functools.cached_property
    def frame(self) -> bytes:
        """This event as a ``/v1/watch`` WebSocket frame, encoded once; ``b""`` (skipped
        by watchers, and logged) when a producer put in something that is not JSON."""
        try:
            return frame_text(protocol.event_message(self.seq, self.ts, self.event, self.data))
        except (TypeError, ValueError) as exc:
            log.error("event #%d %s cannot be sent on /v1/watch, watchers skip it: %s",
                      self.seq, self.event, exc)
            return b""


class Subscription:
    """One subscriber's place in the bus's log: ``async for ev in sub``, ``receive_nowait``,
    or, a burst at a time, :meth:`wait` and :meth:`take_all`.

    Bounded by ``max_events`` not taken, or, with ``max_bytes``, by the size of
    the frames of the events published since it subscribed and not yet
    reported :meth:`written` (taken or not). Once cut off, :attr:`cut_off` says
    why, ``on_cut_off`` (if set) is called at once, from inside
    :meth:`EventBus.publish`, and the stream ends (what was not taken is
    dropped).
    """

    def __init__(self, bus: EventBus, max_events: int | None, max_bytes: int | None) -> None:
        self._bus = bus
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.cut_off: str | None = None
        self.on_cut_off: Callable[[], None] | None = None
        self.taken_seq = bus.seq  # the last event taken
        self.taken_bytes = bus.head_bytes  # the log's byte offset after it
        self.sent_bytes = bus.head_bytes  # ... and after the last one written out
        self.closed = False

    @property
    def pending_bytes(self) -> int:
        """Bytes of frames published to this subscriber and not yet written out."""
        return self._bus.head_bytes - self.sent_bytes

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Event:
        try:
            await self.wait()
            return self.receive_nowait()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None

    async def wait(self) -> None:
        """Until an event can be taken; raises trio.EndOfChannel once cut off or closed."""
        while True:
            if self.cut_off is not None or self.closed:
                raise trio.EndOfChannel
            if self._bus.seq > self.taken_seq:
                await trio.lowlevel.checkpoint()
                return
            await self._bus._published.wait()

    def receive_nowait(self) -> Event:
        """The next event; raises trio.WouldBlock, or trio.EndOfChannel once cut off."""
        events, _ = self._take(1)
        return events[0]

    def take_all(self) -> tuple[list[Event], int]:
        """Every event not taken yet, and the size of their frames (what to report to
        :meth:`written` once they are out). Raises like :meth:`receive_nowait`."""
        return self._take(None)

    def written(self, nbytes: int) -> None:
        """*nbytes* of the frames taken from this subscription reached the socket."""
        self.sent_bytes = min(self.taken_bytes, self.sent_bytes + nbytes)

    def _take(self, limit: int | None) -> tuple[list[Event], int]:
        if self.cut_off is not None or self.closed:
            raise trio.EndOfChannel
        events, end = self._bus._since(self.taken_seq, limit)
        if not events:
            raise trio.WouldBlock
        nbytes = end - self.taken_bytes
        self.taken_seq, self.taken_bytes = events[-1].seq, end
        return events, nbytes

    def _over(self, seq: int, head_bytes: int) -> str | None:
        """Why this subscriber is too far behind now, if it is."""
        if self.max_bytes is not None and head_bytes - self.sent_bytes > self.max_bytes:
            return f"{head_bytes - self.sent_bytes} bytes queued, over {self.max_bytes}"
        if self.max_events is not None and seq - self.taken_seq > self.max_events:
            return f"{seq - self.taken_seq} events queued, over {self.max_events}"
        return None


class EventBus:
    def __init__(self, wall_clock=time.time) -> None:
        self._wall = wall_clock
        self._seq = 0
        self.recent: collections.deque[Event] = collections.deque(maxlen=RECENT_EVENTS)
        self._by_app: collections.OrderedDict[str, collections.deque[Event]] = (
            collections.OrderedDict())
        self._subscribers: set[Subscription] = set()
        self._sized = 0  # subscribers bounded in bytes: frames are measured while > 0
        # The shared log: events after the slowest subscriber's place, and the byte
        # offset of the end of each one's frame.
        self._log: list[Event] = []
        self._ends: list[int] = []
        self._head_bytes = 0
        self._published = trio.Event()

    def recent_of(self, app: str) -> list[Event]:
        """*app*'s last :data:`APP_RECENT_EVENTS` events, oldest first."""
        return list(self._by_app.get(app, ()))

    @property
    def seq(self) -> int:
        return self._seq

    @property
    def head_bytes(self) -> int:
        """Bytes of frames published since the first subscriber bounded in bytes."""
        return self._head_bytes

    def publish(self, event: str, **data: Any) -> Event:
        self._seq += 1
        ev = Event(self._seq, self._wall(), event, data)
        self.recent.append(ev)
        app = data.get("app")
        if isinstance(app, str):
            mine = self._by_app.pop(app, None)
            if mine is None:
                mine = collections.deque(maxlen=APP_RECENT_EVENTS)
                if len(self._by_app) >= APPS_WITH_RECENT:
                    self._by_app.popitem(last=False)
            mine.append(ev)
            self._by_app[app] = mine  # the most recent app last
        log.debug("event #%d %s %s", ev.seq, event, data)
        if not self._subscribers:
            return ev
        if self._sized:
            self._head_bytes += len(ev.frame)
        self._log.append(ev)
        self._ends.append(self._head_bytes)
        slowest = self._seq
        for sub in list(self._subscribers):
            why = sub._over(self._seq, self._head_bytes)
            if why is None:
                slowest = min(slowest, sub.taken_seq)
                continue
            self._drop(sub)
            sub.cut_off = why
            if sub.on_cut_off is not None:
                sub.on_cut_off()
            else:  # a watcher says so itself, with its address
                log.warning("a subscriber fell behind (%s); closing its stream", why)
        self._trim(slowest)
        self._published.set()
        self._published = trio.Event()
        return ev

    @contextmanager
    def subscribe(self, *, max_bytes: int | None = None) -> Iterator[Subscription]:
        """Every event published from now on, until the block ends; bounded by
        :data:`SUBSCRIBER_BUFFER` events, or by *max_bytes* of frames not yet written."""
        sub = Subscription(self, SUBSCRIBER_BUFFER if max_bytes is None else None, max_bytes)
        self._subscribers.add(sub)
        if max_bytes is not None:
            self._sized += 1
        try:
            yield sub
        finally:
            if sub in self._subscribers:
                self._drop(sub)
            sub.closed = True
            if not self._subscribers:
                self._log.clear()
                self._ends.clear()

    def _drop(self, sub: Subscription) -> None:
        self._subscribers.discard(sub)
        if sub.max_bytes is not None:
            self._sized -= 1

    def _since(self, seq: int, limit: int | None) -> tuple[list[Event], int]:
        """The events after *seq* in the log (at most *limit*), and the byte offset after
        the last of them."""
        if not self._log or seq >= self._seq:
            return [], 0
        start = seq + 1 - self._log[0].seq
        stop = len(self._log) if limit is None else min(len(self._log), start + limit)
        return self._log[start:stop], self._ends[stop - 1]

    def _trim(self, slowest: int) -> None:
        """Forget the events every subscriber has taken (in large steps: a list's head
        is costly to cut)."""
        done = slowest + 1 - self._log[0].seq if self._log else 0
        if done > 0 and done * 2 >= len(self._log):
            del self._log[:done]
            del self._ends[:done]
