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
"""

from __future__ import annotations

import logging
import random

import trio

from skr8tr import client
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


async def run_upstreams(conductor_url: str, table: BackendTable, pool: Pool, *,
                        synced: trio.Event | None = None, ca_file: str | None = None,
                        task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Follow ``/v1/watch`` into ``table`` until cancelled, reconnecting as needed.

    ``task_status.started()`` is called at once (the ingress serves, with 503s,
    before the conductor answers); ``synced`` is set after the first snapshot.
    ``ca_file`` verifies a ``wss://`` conductor. Never raises but for cancellation.
    """
    task_status.started()
    opts = client.CallOptions(conductor=conductor_url, timeout_s=WATCH_CONNECT_TIMEOUT_S,
                              signing_key=None, ca_file=ca_file)
    delays = backoff_delays()
    failures = 0
    while True:
        got_snapshot = False
        try:
            async with client.open_watch(opts) as stream:
                async for msg in stream:
                    if msg.type == "snapshot":
                        gone = table.apply_snapshot(msg.state)
                        if not got_snapshot:
                            got_snapshot = True
                            delays = backoff_delays()
                            log.info("watching %s: %d node(s), %d replica(s) in the snapshot",
                                     conductor_url, len(table.nodes), len(table.replicas))
                            if failures:
                                log.info("reconnected to the conductor after %d failed "
                                         "attempt(s)", failures)
                            failures = 0
                        if synced is not None:
                            synced.set()
                    else:
                        gone = table.apply_event(msg.event, msg.data)
                        if msg.event.startswith("replica.") and log.isEnabledFor(logging.DEBUG):
                            log.debug("%s %s", msg.event, msg.data)
                    if gone:
                        log.info("out of rotation: %s", ", ".join(sorted(map(str, gone))))
                        pool.retire(gone)
            why = "the conductor closed the stream"
        except client.ClientError as exc:
            why = exc.message
        except OSError as exc:
            why = exc.strerror or str(exc)
        except Exception as exc:  # a bug or an unexpected library error: log it, go on
            log.exception("the watch stream failed")
            why = f"{type(exc).__name__}: {exc}"
        failures += 1
        delay = next(delays)
        log_fn = log.warning if failures == 1 or failures % 20 == 0 else log.debug
        log_fn("watch stream lost (%s); keeping the last known replicas and reconnecting in "
               "%.1f s", why, delay)
        await trio.sleep(delay)
