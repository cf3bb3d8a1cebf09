"""The event bus behind ``/v1/watch``: numbered events, a ring of recent ones, subscribers.

Publishing never blocks and never fails: each subscriber has a bounded memory
channel, and one that falls :data:`SUBSCRIBER_BUFFER` events behind is cut
off (its stream ends; a watcher reconnects and gets a fresh snapshot) rather
than slowing the conductor down.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import trio

log = logging.getLogger("skr8tr.conductor")

RECENT_EVENTS = 200
# Room for the burst of a large fleet: 100 nodes lost at once with 10 replicas each
# publish ~4,000 events in one go (lost, failed, placed, running, ready). An event is
# shared by every subscriber, so a slot costs one reference.
SUBSCRIBER_BUFFER = 16384


@dataclass(frozen=True)
class Event:
    seq: int
    ts: float  # wall-clock seconds since the epoch
    event: str  # dotted name, e.g. "replica.ready"
    data: dict[str, Any]


class EventBus:
    def __init__(self, wall_clock=time.time) -> None:
        self._wall = wall_clock
        self._seq = 0
        self.recent: collections.deque[Event] = collections.deque(maxlen=RECENT_EVENTS)
        self._subscribers: set[trio.MemorySendChannel[Event]] = set()

    @property
    def seq(self) -> int:
        return self._seq

    def publish(self, event: str, **data: Any) -> Event:
        self._seq += 1
        ev = Event(self._seq, self._wall(), event, data)
        self.recent.append(ev)
        log.debug("event #%d %s %s", ev.seq, event, data)
        for chan in list(self._subscribers):
            try:
                chan.send_nowait(ev)
            except trio.WouldBlock:
                log.warning("a watcher fell %d events behind; closing its stream",
                            SUBSCRIBER_BUFFER)
                self._subscribers.discard(chan)
                chan.close()
            except trio.ClosedResourceError:
                self._subscribers.discard(chan)
        return ev

    @contextmanager
    def subscribe(self) -> Iterator[trio.MemoryReceiveChannel[Event]]:
        """A channel of every event published from now on, until the block ends."""
        send, recv = trio.open_memory_channel[Event](SUBSCRIBER_BUFFER)
        self._subscribers.add(send)
        try:
            yield recv
        finally:
            self._subscribers.discard(send)
            send.close()
            recv.close()
