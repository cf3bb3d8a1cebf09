"""The life of one replica as the conductor sees it: its states and the legal changes.

Every change of a replica's state in the conductor goes through
:func:`transition`, which raises :class:`IllegalTransition` for a change the
table does not allow (the house rule of h11's ``_state.py``: one module owns
the state machine). The states (the ``state`` of each replica in ``list`` and ``status``)::

    pending ──> running ──> ready
       │  ╲        │  ╲  ↗   │
       │   ╲       │   ╲     │            (ready -> running: its node restarted and
       │    ╲      v    v    v             re-adopted it; readiness is judged anew)
       │     ╲──> draining ──> stopping ──> exited | failed
       └───────────────────────────────────────────^

- ``draining`` is entered only from ``running`` or ``ready`` (a ``pending``
  replica is not in the ingress: it is stopped at once), and left back only
  to the state it was drained from (:func:`undrain_target`): an aborted
  rollout must never put a replica that did not pass its health check into
  service.
- ``exited`` and ``failed`` end a replica. The one way back is
  :func:`readopt`: a replica that was declared ended only because its node
  fell silent, and that its node then reports alive, becomes ``running`` or
  ``ready`` again instead of running twice (issue #13.3).

Pure: no trio, no clock.
"""

from __future__ import annotations

__all__ = ["STATES", "LIVE", "LEAVING", "ENDED", "ALLOWED", "IllegalTransition",
           "transition", "undrain_target", "readopt"]

STATES = ("pending", "running", "ready", "draining", "stopping", "exited", "failed")
LIVE = frozenset({"pending", "running", "ready"})
LEAVING = frozenset({"draining", "stopping"})
ENDED = frozenset({"exited", "failed"})

ALLOWED: dict[str, frozenset[str]] = {
    "pending": frozenset({"running", "ready", "stopping", "exited", "failed"}),
    "running": frozenset({"ready", "draining", "stopping", "exited", "failed"}),
    "ready": frozenset({"running", "draining", "stopping", "exited", "failed"}),
    "draining": frozenset({"running", "ready", "stopping", "exited", "failed"}),
    "stopping": frozenset({"exited", "failed"}),
    "exited": frozenset(),
    "failed": frozenset(),
}


class IllegalTransition(Exception):
    """A state change the table does not allow: a bug in the caller, never bad input."""

    def __init__(self, replica: str, old: str, new: str) -> None:
        allowed = ", ".join(sorted(ALLOWED.get(old, ()))) or "nothing (it has ended)"
        super().__init__(f"replica {replica}: {old} -> {new} is not a legal change "
                         f"(from {old}: {allowed})")
        self.replica, self.old, self.new = replica, old, new


def transition(replica: str, old: str, new: str) -> str:
    """*new*, if a replica may go from *old* to it; raises IllegalTransition otherwise.
    Staying in the same state is always allowed."""
    if new == old and old in ALLOWED:
        return new
    if new not in ALLOWED.get(old, ()):
        raise IllegalTransition(replica, old, new)
    return new


def undrain_target(replica: str, drained_from: str | None) -> str:
    """The state a drained replica goes back to when it is put back in service: the one
    it was drained from (only ``running`` or ``ready``)."""
    if drained_from not in ("running", "ready"):
        raise IllegalTransition(replica, "draining", str(drained_from))
    return drained_from


def readopt(replica: str, old: str, reported: str, *, lost_with_node: bool) -> str:
    """The state of an ended replica that its node reports alive (*reported*: running
    or ready). Legal only when it ended because its node was lost, not by its own exit."""
    if old not in ENDED or not lost_with_node or reported not in ("running", "ready"):
        raise IllegalTransition(replica, old, reported)
    return reported
