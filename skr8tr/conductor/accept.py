"""Accepting connections within the descriptor budget, for both of the conductor's listeners.

:func:`raise_fd_limit` lifts the soft ``RLIMIT_NOFILE`` to the hard one at
start; :func:`~skr8tr.conductor.limits.fit_to_descriptors` then keeps the
connection caps below it. :func:`serve_accepting` is the accept loop (in place
of ``trio.serve_listeners``):

- a connection over a cap (:class:`~skr8tr.conductor.limits.ConnectionGate`:
  all listeners together, and per client address on this listener) is closed
  at once, in the accept loop itself, so that refusing a flood holds one
  descriptor at a time; it is counted by reason and logged at most once per
  ``LOG_EVERY_S`` with the number refused meanwhile;
- ``accept`` failing for want of descriptors or memory (``EMFILE``,
  ``ENFILE``, ``ENOMEM``, ``ENOBUFS``: something else used the reserve) backs
  off for :data:`ACCEPT_BACKOFF_S` (doubling up to :data:`ACCEPT_BACKOFF_MAX_S`
  while it lasts) and goes on; one line without a traceback per
  ``LOG_EVERY_S``, counted in ``accept_errors``;
- a handler that fails is logged and closes only its own connection.
"""

from __future__ import annotations

import errno
import logging
import os
import resource
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from skr8tr.conductor.limits import (
    AddressSlots,
    ClosedCounter,
    ConnectionGate,
    Limits,
    LogThrottle,
    fit_to_descriptors,
)

log = logging.getLogger("skr8tr.conductor")

ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
ACCEPT_BACKOFF_S = 0.05
ACCEPT_BACKOFF_MAX_S = 1.0

Handler = Callable[[trio.SocketStream, str], Awaitable[None]]


def raise_fd_limit() -> int | None:
    """Raise the soft ``RLIMIT_NOFILE`` as far as the hard limit allows; the soft limit
    in force afterwards (None: unlimited). Never raises: a refusal keeps the old one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard and (hard == resource.RLIM_INFINITY or soft < hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (OSError, ValueError) as exc:  # e.g. macOS refuses RLIM_INFINITY
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, hard, exc)
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return None if soft == resource.RLIM_INFINITY else soft


def fit_limits_to_descriptors(limits: Limits, closed: ClosedCounter
                              ) -> tuple[Limits, Admission]:
    """Raise the open-file limit, fit the connection caps of *limits* under it (each
    value lowered is logged), and the admission both listeners share."""
    soft = raise_fd_limit()
    fitted, notes = fit_to_descriptors(limits, soft)
    for note in notes:
        log.warning("%s", note)
    assert fitted.max_connections is not None
    log.info("open-file limit %s: at most %d connections at once, %d per client address",
             "unlimited" if soft is None else soft, fitted.max_connections,
             fitted.max_connections_per_address)
    return fitted, Admission(ConnectionGate(fitted.max_connections), closed)


@dataclass
class Admission:
    """What both listeners share: the gate, the closed counter, the quiet refusal log and
    the count of failed ``accept`` calls (exported by ``/metrics``)."""

    gate: ConnectionGate
    closed: ClosedCounter
    throttle: LogThrottle = field(default_factory=LogThrottle)
    accept_errors: int = 0

    def refused(self, reason: str, address: str, what: str, limit: int) -> None:
        """Count a connection closed by a cap, and log it when a line is due."""
        self.closed.count(reason)
        n = self.throttle.note(f"{what}:{reason}", trio.current_time())
        if not n:
            return
        why = (f"{address} already holds {limit} (--max-connections-per-address)"
               if reason == "too_many_connections"
               else f"{limit} are open on both listeners together (--max-connections)")
        log.warning("closed %d %s connection(s) at once, the last from %s: %s; "
                    "counted in skr8tr_connections_closed_total{reason=\"%s\"}",
                    n, what, address, why, reason)


async def serve_accepting(listener: trio.SocketListener, handler: Handler,
                          admission: Admission, slots: AddressSlots, what: str) -> None:
    """Accept on *listener* until cancelled; each admitted connection runs
    ``handler(stream, address)`` in a task of its own (module docstring).

    *what* names the listener in the log ("API", "HTTP"). Raises only what
    ``accept`` raises that is not a shortage (the listener was closed).
    """
    backoff = ACCEPT_BACKOFF_S
    async with trio.open_nursery() as nursery, listener:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno not in ACCEPT_CAPACITY_ERRNOS:
                    raise
                admission.accept_errors += 1
                n = admission.throttle.note(f"{what}:accept", trio.current_time())
                if n:
                    log.error("%s listener: accept failed %d time(s): %s (%s); retrying "
                              "every %g s up to %g s while it lasts", what, n,
                              errno.errorcode.get(exc.errno, exc.errno), os.strerror(exc.errno),
                              ACCEPT_BACKOFF_S, ACCEPT_BACKOFF_MAX_S)
                await trio.sleep(backoff)
                backoff = min(ACCEPT_BACKOFF_MAX_S, backoff * 2)
                continue
            backoff = ACCEPT_BACKOFF_S
            try:
                address = str(stream.socket.getpeername()[0])
            except OSError:  # already gone
                stream.socket.close()
                continue
            reason = admission.gate.admit(slots, address)
            if reason is not None:
                # Closed here, before the next accept: a flood costs one descriptor.
                stream.socket.close()
                admission.refused(reason, address, what,
                                  slots.limit if reason == "too_many_connections"
                                  else admission.gate.limit)
                continue
            nursery.start_soon(_serve_one, stream, address, handler, admission, slots, what)


async def _serve_one(stream: trio.SocketStream, address: str, handler: Handler,
                     admission: Admission, slots: AddressSlots, what: str) -> None:
    try:
        await handler(stream, address)
    except Exception:
        # A bug in serving one connection must not take the conductor down.
        log.exception("the %s connection from %s failed; it is closed, the others go on",
                      what, address)
    finally:
        admission.gate.release(slots, address)
        await trio.aclose_forcefully(stream)
