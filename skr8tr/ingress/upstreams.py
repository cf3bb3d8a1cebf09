"""The live replica table: fed by the conductor's ``/v1/watch`` stream, never by polling.

:func:`run_upstreams` holds one watch connection at a time. Every message is
applied to the :class:`~skr8tr.ingress.routes.BackendTable` the moment it
arrives (a ``replica.draining`` event takes the replica out of rotation
before the next request is routed), and the idle pooled connections of the
replicas that left rotation are closed. When the stream ends or the conductor
cannot be reached it reconnects after a jittered exponential backoff (0.2 s
doubling to 5 s, starting over after a stream that delivered its snapshot);
each new stream begins with a fresh snapshot that replaces the whole table.
Between streams the last known table keeps serving: replicas run on without
the conductor, and a replica that went away in the meantime fails to connect
and the request moves on to another one.

``--conductor`` may list several conductors (DESIGN.md §9): they are tried in
order (:class:`skr8tr.failover.LeaderSearch`; the backoff comes between
passes over the list, the conductor that served last first), and a follower's
``NOT_LEADER`` sends the ingress straight to the leader it names. A failover
is one more "stream lost": the table keeps routing until the new leader's
snapshot replaces it.
"""

from __future__ import annotations

import logging
import random

import trio

from skr8tr import client
from skr8tr.core import protocol
from skr8tr.failover import LeaderSearch, conductor_urls
from skr8tr.ingress.pool import Pool
from skr8tr.ingress.routes import BackendTable

log = logging.getLogger("skr8tr.ingress")

BACKOFF_INITIAL_S = 0.2
BACKOFF_MAX_S = 5.0
WATCH_CONNECT_TIMEOUT_S = 5.0


def backoff_delays(rand=random.random):
    """Yield 0.2, 0.4, 0.8, ... up to 5 s, each jittered by ±25 %."""
    delay = BACKOFF_INITIAL_S
    while True:
        yield min(BACKOFF_MAX_S, delay * (0.75 + 0.5 * rand()))
        delay = min(BACKOFF_MAX_S, delay * 2)


class JitteredBackoff:
    """:func:`backoff_delays` as the backoff of a LeaderSearch."""

    def __init__(self) -> None:
        self.reset()

    def next_delay(self) -> float:
        return next(self._delays)

    def reset(self) -> None:
        self._delays = backoff_delays()


async def run_upstreams(conductor_url: str, table: BackendTable, pool: Pool, *,
                        synced: trio.Event | None = None, ca_file: str | None = None,
                        task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Follow ``/v1/watch`` of the leading conductor into ``table`` until cancelled,
    reconnecting as needed.

    *conductor_url* is ``URL[,URL...]``. ``task_status.started()`` is called at
    once (the ingress serves, with 503s, before the conductor answers);
    ``synced`` is set after the first snapshot. ``ca_file`` verifies a
    ``wss://`` conductor. Never raises but for cancellation.
    """
    task_status.started()
    search = LeaderSearch(conductor_urls(conductor_url), backoff=JitteredBackoff())
    failures = 0
    why: str | None = None
    while True:
        attempt = search.next()
        if why is not None:
            log_fn = log.warning if failures == 1 or failures % 20 == 0 else log.debug
            log_fn("watch stream lost (%s); keeping the last known replicas and trying %s "
                   "in %.1f s", why, attempt.url, attempt.wait_s)
        await trio.sleep(attempt.wait_s)
        stream = _Stream(attempt.url, failures)
        try:
            why = await stream.follow(table, pool, search, synced, ca_file)
        except client.ClientError as exc:
            why = exc.message
        except OSError as exc:
            why = exc.strerror or str(exc)
        except Exception as exc:  # a bug or an unexpected library error: log it, go on
            log.exception("the watch stream failed")
            why = f"{type(exc).__name__}: {exc}"
        if stream.got_snapshot:
            failures = 0
        if why is not None:  # None: a follower named the leader, dialled next
            failures += 1
            search.failed()


class _Stream:
    """One ``/v1/watch`` connection of :func:`run_upstreams`."""

    def __init__(self, url: str, failures: int) -> None:
        self.url = url
        self.failures = failures  # failed attempts before this one
        self.got_snapshot = False

    async def follow(self, table: BackendTable, pool: Pool, search: LeaderSearch,
                     synced: trio.Event | None, ca_file: str | None) -> str | None:
        """Apply the stream to *table* until it ends; say why it ended (None when a
        follower named the leader, which *search* dials next). Raises ClientError when
        the conductor cannot be reached or the stream closes."""
        url = self.url
        async with client.open_conductor(url, "/v1/watch", WATCH_CONNECT_TIMEOUT_S,
                                         ca_file=ca_file if url.startswith("wss://")
                                         else None) as ws:
            stream = client.WatchStream(ws, client.endpoint_url(url, "/v1/watch"),
                                        conductor=url)
            async for msg in stream:
                if isinstance(msg, protocol.WatchError):
                    leader = (search.not_leader(msg.leader) if msg.code == "NOT_LEADER"
                              else None)
                    if leader is not None:
                        log.info("%s is not the leader; following %s", url, leader)
                        return None
                    return f"{url} answered {msg.code}: {msg.message}"
                if msg.type == "snapshot":
                    # A new leader's snapshot replaces the whole table, like any other.
                    gone = table.apply_snapshot(msg.state)
                    if not self.got_snapshot:
                        self.got_snapshot = True
                        search.served()
                        log.info("watching %s: %d node(s), %d replica(s) in the snapshot",
                                 url, len(table.nodes), len(table.replicas))
                        if self.failures:
                            log.info("reconnected to the conductor after %d failed "
                                     "attempt(s)", self.failures)
                    if synced is not None:
                        synced.set()
                else:
                    gone = table.apply_event(msg.event, msg.data)
                    if msg.event.startswith("replica.") and log.isEnabledFor(logging.DEBUG):
                        log.debug("%s %s", msg.event, msg.data)
                if gone:
                    log.info("out of rotation: %s", ", ".join(sorted(map(str, gone))))
                    pool.retire(gone)
        return "the conductor closed the stream"
