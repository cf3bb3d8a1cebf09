"""Reconnect delays of the node agent."""

from __future__ import annotations

from skr8tr.node.backoff import Backoff


def delays(backoff: Backoff, n: int) -> list[float]:
    return [backoff.next_delay() for _ in range(n)]


def test_doubles_from_half_a_second_up_to_the_cap() -> None:
    assert delays(Backoff(rand=lambda: 0.5), 8) == [0.5, 1, 2, 4, 8, 10, 10, 10]


def test_jitter_is_a_quarter_either_way_and_never_past_the_cap() -> None:
    assert delays(Backoff(rand=lambda: 0.0), 6) == [0.375, 0.75, 1.5, 3, 6, 7.5]
    assert delays(Backoff(rand=lambda: 1.0), 6) == [0.625, 1.25, 2.5, 5, 10, 10]


def test_reset_starts_over() -> None:
    backoff = Backoff(rand=lambda: 0.5)
    delays(backoff, 5)
    backoff.reset()
    assert delays(backoff, 2) == [0.5, 1]


def test_real_randomness_stays_in_bounds() -> None:
    backoff = Backoff()
    for base, delay in zip([0.5, 1, 2, 4, 8, 10, 10], delays(backoff, 7), strict=True):
        assert 0.75 * base <= delay <= min(10, 1.25 * base)
    assert delays(backoff, 100)  # the exponent is bounded: no overflow
