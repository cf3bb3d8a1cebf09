"""Pure rollout decisions: batches, generation numbers, undo targets, failure text."""

from __future__ import annotations

import pytest

from skr8tr.core.rollout import (
    HistoryView,
    UndoError,
    batches,
    describe_failure,
    next_generation,
    undo_target,
)


@pytest.mark.parametrize("total, surge, expected", [
    (3, 1, [1, 1, 1]), (3, 3, [3]), (5, 2, [2, 2, 1]), (2, 5, [2]), (0, 1, []), (10, 3,
                                                                                 [3, 3, 3, 1]),
])
def test_batches(total, surge, expected):
    assert batches(total, surge) == expected


def test_batches_refuses_a_zero_surge():
    with pytest.raises(ValueError):
        batches(3, 0)


@pytest.mark.parametrize("used, expected", [([], 1), ([1], 2), ([1, 2, 5], 6), ({3: 0}, 4)])
def test_generations_are_never_reused(used, expected):
    assert next_generation(used) == expected


H = [HistoryView(1, "complete"), HistoryView(2, "complete"), HistoryView(3, "rolled_back"),
     HistoryView(4, "aborted")]


@pytest.mark.parametrize("history, current, to, expected", [
    (H, 2, None, 1),  # the newest complete generation older than the current one
    (H, 2, 1, 1),
    (H, 2, 3, 3),  # --to may name any stored revision
    ([HistoryView(1, "complete"), HistoryView(2, "failed"), HistoryView(3, "complete")], 3,
     None, 1),
])
def test_undo_target(history, current, to, expected):
    assert undo_target(history, current, to) == expected


@pytest.mark.parametrize("history, current, to, message", [
    ([HistoryView(1, "complete")], 1, None, "no complete generation before 1"),
    (H, 2, 9, "generation 9 does not exist (known: 1, 2, 3, 4)"),
    (H, 2, 2, "generation 2 is the current one"),
])
def test_undo_refusals(history, current, to, message):
    with pytest.raises(UndoError, match=message.replace("(", r"\(").replace(")", r"\)")):
        undo_target(history, current, to)


def test_describe_failure_names_replica_cause_and_where_its_output_is():
    text = describe_failure("web-1a2b", app="web", why="exited before it was ready",
                            exit_code=3, message="boom")
    assert text == ("replica web-1a2b exited before it was ready, exit code 3, boom "
                    "(its output: skr8tr logs web --replica web-1a2b)")
    assert describe_failure("w", app="a", why="was not ready", signal=9) == (
        "replica w was not ready, killed by signal 9 (its output: skr8tr logs a --replica w)")
