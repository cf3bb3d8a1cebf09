"""The replica state machine (skr8tr/core/replica_state.py), table by table."""

from __future__ import annotations

import itertools

import pytest

from skr8tr.core import reconcile
from skr8tr.core.replica_state import (
    ALLOWED,
    ENDED,
    LEAVING,
    LIVE,
    STATES,
    IllegalTransition,
    readopt,
    transition,
    undrain_target,
)

LEGAL = {
    ("pending", "running"), ("pending", "ready"), ("pending", "stopping"),
    ("pending", "exited"), ("pending", "failed"),
    ("running", "ready"), ("running", "draining"), ("running", "stopping"),
    ("running", "exited"), ("running", "failed"),
    ("ready", "running"), ("ready", "draining"), ("ready", "stopping"),
    ("ready", "exited"), ("ready", "failed"),
    ("draining", "running"), ("draining", "ready"), ("draining", "stopping"),
    ("draining", "exited"), ("draining", "failed"),
    ("stopping", "exited"), ("stopping", "failed"),
}


def test_the_states_are_the_wire_contracts():
    # `list --json`'s state is one of these (DESIGN.md §5), in this order.
    assert STATES == ("pending", "running", "ready", "draining", "stopping", "exited",
                      "failed")
    assert (LIVE, LEAVING, ENDED) == (reconcile.LIVE_STATES, reconcile.LEAVING_STATES,
                                      reconcile.ENDED_STATES)
    assert set(STATES) == LIVE | LEAVING | ENDED and set(ALLOWED) == set(STATES)


@pytest.mark.parametrize(("old", "new"), list(itertools.product(STATES, STATES)))
def test_every_pair_is_legal_exactly_when_the_table_says(old, new):
    if old == new or (old, new) in LEGAL:
        assert transition("r1", old, new) == new
    else:
        with pytest.raises(IllegalTransition, match=f"r1: {old} -> {new}"):
            transition("r1", old, new)


@pytest.mark.parametrize(("drained_from", "back"), [("ready", "ready"), ("running", "running")])
def test_an_undrain_restores_what_was_drained(drained_from, back):
    assert undrain_target("r1", drained_from) == back


@pytest.mark.parametrize("drained_from", [None, "pending", "stopping", "failed"])
def test_an_undrain_never_invents_readiness(drained_from):
    with pytest.raises(IllegalTransition):
        undrain_target("r1", drained_from)


@pytest.mark.parametrize(("old", "reported", "lost", "ok"), [
    ("failed", "running", True, True),
    ("failed", "ready", True, True),
    ("exited", "ready", True, True),
    ("failed", "running", False, False),  # it exited by itself: never back
    ("running", "running", True, False),  # not ended: not a re-adoption
    ("failed", "pending", True, False),
])
def test_only_a_replica_lost_with_its_node_is_readopted(old, reported, lost, ok):
    if ok:
        assert readopt("r1", old, reported, lost_with_node=lost) == reported
    else:
        with pytest.raises(IllegalTransition):
            readopt("r1", old, reported, lost_with_node=lost)
