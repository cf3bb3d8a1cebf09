"""The limits every connection is held to, and the counts of what they refused or closed.

Shared by ``/v1/cli`` (:mod:`skr8tr.conductor.api`) and ``/v1/node``
(:mod:`skr8tr.conductor.node_sessions`): a connection that breaks a limit is
closed with a WebSocket close code and a reason, counted by reason for
``/metrics``, and logged at most once per reason every few seconds with the
number closed since (:class:`~skr8tr.conductor.limits.LogThrottle`).
"""

from __future__ import annotations

import logging

import trio

from skr8tr.conductor.limits import ClosedCounter, Limits, LogThrottle
from skr8tr.conductor.refusals import RefusalReporter
from skr8tr.core import protocol
from skr8tr.ws.server import ConnectionClosed, ServerConnection

log = logging.getLogger("skr8tr.conductor")


class Policing:
    def __init__(self, limits: Limits, closed: ClosedCounter,
                 refusals: RefusalReporter) -> None:
        self.limits = limits
        self.closed = closed
        self.refusals = refusals
        self._close_log = LogThrottle()
        #: Pauses in reading a node session over its byte rate (``/metrics``).
        self.slowed = 0

    def count_close(self, exc: ConnectionClosed, peer: str) -> None:
        """Count a close that the connection did for a limit (1009: message too big)."""
        if exc.code == 1009:
            self.closed.count("message_too_big")
            log.warning("closed a connection from %s: a message over %d bytes", peer,
                        protocol.MAX_MESSAGE_BYTES)

    def note_slowed(self, peer: str, bytes_per_s: int) -> None:
        """Count a pause in reading *peer* for being over its byte rate, and log it (at most
        one line every few seconds, with the count since the last)."""
        self.slowed += 1
        n = self._close_log.note("slowed", trio.current_time())
        if n:
            log.warning("paused reading %d time(s) for sending more than %d bytes/s, the "
                        "last %s", n, bytes_per_s, peer)

    async def close_for(self, ws: ServerConnection, peer: str, reason: str,
                        code: int, why: str) -> None:
        """Close *ws* because it broke a limit; count it, and log it (at most one line
        per reason every few seconds, with the count since the last)."""
        self.closed.count(reason)
        n = self._close_log.note(reason, trio.current_time())
        if n:
            log.warning("closed %d connection(s) for %s, the last from %s: %s", n, reason,
                        peer, why)
        with trio.move_on_after(2):
            await ws.aclose(code=code, reason=why[:120])
