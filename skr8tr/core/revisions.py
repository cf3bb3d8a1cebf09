"""Which revisions an app keeps and which one ``undo`` returns to. Pure.

- Generations are never reused (:func:`next_generation`).
- ``rollout undo`` returns to the newest ``complete`` generation with another manifest,
  or to ``--to GEN``; one whose rollout never served (aborted, failed, rolled back) only
  with ``--force`` (:func:`undo_target`).
- An app keeps the manifests of its current generation and of ``--keep-revisions``
  others, never one a running rollout or a plain undo needs, and its newest history rows
  (:func:`retain`; Kubernetes' revisionHistoryLimit).
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "DEFAULT_KEEP_REVISIONS",
    "HISTORY_KEPT",
    "MAX_KEEP_REVISIONS",
    "MIN_KEEP_REVISIONS",
    "UNPROVEN_STATES",
    "HistoryView",
    "Retention",
    "UndoError",
    "UndoRefused",
    "next_generation",
    "retain",
    "undo_target",
]

# Revision retention (Kubernetes' revisionHistoryLimit): the manifests of the current
# generation and of this many others are kept; history rows (small) this many.
DEFAULT_KEEP_REVISIONS = 10
MIN_KEEP_REVISIONS = 2  # what a running rollout and a plain undo need always fits
MAX_KEEP_REVISIONS = 1000
HISTORY_KEPT = 100


def next_generation(used: Iterable[int]) -> int:
    """Generations are never reused: one more than any generation ever recorded."""
    return max(used, default=0) + 1


@dataclass(frozen=True)
class HistoryView:
    """One entry of an app's rollout history: a generation and how its rollout ended."""

    generation: int
    state: str
    manifest_sha256: str = ""  # "" when unknown: then never taken for the current manifest


class UndoError(Exception):
    """``rollout undo`` has nothing to return to; the message says why."""


class UndoRefused(UndoError):
    """``rollout undo --to GEN`` names a generation that never ran to completion; allowed
    with ``force``."""


# A generation whose rollout ended so never served as the app's generation: returning to
# it is more likely a slip than a wish (it was aborted, or it failed its checks).
UNPROVEN_STATES = frozenset({"aborted", "failed", "rolled_back"})


def undo_target(history: Sequence[HistoryView], current: int, to: int | None, *,
                force: bool = False) -> int:
    """The generation ``rollout undo`` rolls out again.

    Without ``to``: the newest ``complete`` generation older than ``current`` whose
    manifest differs from the current one's (a ``restart`` records the same manifest
    under a new generation; going back to it would change nothing).
    With ``to``: that generation, which must exist and not be ``current``; one whose
    rollout ended ``aborted``, ``failed`` or ``rolled_back`` raises
    :class:`UndoRefused` unless ``force``.
    """
    known = {h.generation: h for h in history}
    if to is not None:
        if to not in known:
            listed = sorted(known)
            shown = ", ".join(map(str, listed[-20:])) or "none"
            raise UndoError(f"generation {to} does not exist (known: "
                            f"{'..., ' if len(listed) > 20 else ''}{shown})")
        if to == current:
            raise UndoError(f"generation {to} is the current one; nothing to undo")
        state = known[to].state
        if state in UNPROVEN_STATES and not force:
            raise UndoRefused(f"generation {to}'s rollout ended {state}: it never served as "
                              f"the app's generation; pass --force to roll it out anyway")
        return to
    now_sha = known[current].manifest_sha256 if current in known else ""
    older = [h.generation for h in history if h.state == "complete" and h.generation < current
             and not (now_sha and h.manifest_sha256 == now_sha)]
    if not older:
        raise UndoError(f"no complete generation before {current} with another manifest "
                        "to return to")
    return max(older)


@dataclass(frozen=True)
class Retention:
    """The generations whose manifest (``revisions``) and history row (``history``) an
    app keeps; the others are pruned."""

    revisions: frozenset[int]
    history: frozenset[int]


def retain(revisions: Collection[int], history: Sequence[HistoryView], *, current: int,
           rollout: Collection[int] = (), keep: int = DEFAULT_KEEP_REVISIONS,
           keep_history: int = HISTORY_KEPT) -> Retention:
    """What an app keeps of its ``revisions`` (generations with a stored manifest) and its
    ``history`` (oldest first).

    Manifests: those a rollout or a plain ``undo`` needs — ``current``, the generations of
    the last rollout (``rollout``: its from and to, running or ended) and the plain-undo
    target (:func:`undo_target` without ``to``) — then the newest others, up to ``keep``
    besides the current one: at most ``max(keep + 1, needed)`` in all (``needed`` <= 3).
    History rows: the newest ``keep_history``, and the row of every kept manifest (so that
    ``undo`` still finds its target). Pruning the older ones changes no later decision:
    the plain-undo target is the newest row of its kind, and rows older than it are not
    looked at.
    """
    stored = set(revisions)
    needed = {current, *rollout}
    with contextlib.suppress(UndoError):
        needed.add(undo_target(history, current, None))
    needed &= stored
    others = sorted(stored - needed, reverse=True)
    kept = needed | set(others[:max(0, keep + 1 - len(needed))])
    rows = sorted(h.generation for h in history)
    newest = set(rows[-keep_history:]) if keep_history > 0 else set()
    return Retention(frozenset(kept), frozenset(newest | (kept & set(rows))))
