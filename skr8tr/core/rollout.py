"""Rollout decisions that need no I/O (DESIGN.md §6).

The runner in :mod:`skr8tr.conductor.rollout` does the waiting; what it
decides comes from here: how a rollout is cut into batches, which generation
number comes next, which revision ``undo`` returns to, and how a failure is
told to a person.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "FINAL_STATES",
    "HistoryView",
    "UndoError",
    "batches",
    "describe_failure",
    "next_generation",
    "undo_target",
]

FINAL_STATES = frozenset({"complete", "aborted", "failed", "rolled_back"})


def batches(total: int, surge: int) -> list[int]:
    """Sizes of the replacement batches: ``surge`` at a time, the rest last.

    >>> batches(5, 2)
    [2, 2, 1]
    """
    if surge < 1:
        raise ValueError(f"surge must be >= 1, got {surge}")
    full, rest = divmod(max(total, 0), surge)
    return [surge] * full + ([rest] if rest else [])


def next_generation(used: Iterable[int]) -> int:
    """Generations are never reused: one more than any generation ever recorded."""
    return max(used, default=0) + 1


@dataclass(frozen=True)
class HistoryView:
    generation: int
    state: str


class UndoError(Exception):
    """``rollout undo`` has nothing to return to; the message says why."""


def undo_target(history: Sequence[HistoryView], current: int, to: int | None) -> int:
    """The generation ``rollout undo`` rolls out again.

    Without ``to``: the newest ``complete`` generation older than ``current``.
    With ``to``: that generation, which must exist and not be ``current``.
    """
    known = {h.generation: h.state for h in history}
    if to is not None:
        if to not in known:
            raise UndoError(f"generation {to} does not exist (known: "
                            f"{', '.join(map(str, sorted(known))) or 'none'})")
        if to == current:
            raise UndoError(f"generation {to} is the current one; nothing to undo")
        return to
    older = [h.generation for h in history if h.state == "complete" and h.generation < current]
    if not older:
        raise UndoError(f"no complete generation before {current} to return to")
    return max(older)


def describe_failure(replica: str, *, app: str, why: str, exit_code: int | None = None,
                     signal: int | None = None, message: str | None = None) -> str:
    """One paragraph a person can act on: which replica, what happened, where to look.

    Never the workload's own output: this text reaches every surface anyone can
    read without a key (``rollout status``, ``/api/state``, ``/v1/watch``), and
    a process may print a secret. Its lines are one signed ``logs`` away.
    """
    parts = [f"replica {replica} {why}"]
    if exit_code is not None:
        parts.append(f"exit code {exit_code}")
    if signal is not None:
        parts.append(f"killed by signal {signal}")
    if message:
        parts.append(message)
    return ", ".join(parts) + f" (its output: skr8tr logs {app} --replica {replica})"
