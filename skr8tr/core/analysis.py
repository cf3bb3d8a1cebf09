"""A batch judged by its traffic (DESIGN.md §11): the window arithmetic and the verdict
texts. Pure: time and counts come in as arguments.

Once every new replica of a batch is ready, the analysis starts (``since``) and the
rollout takes the running sum of what the ingresses counted for those replicas (the
baseline). Each decision judges ``seen`` = the sum now minus the baseline
(:func:`judge`):

- an error rate so far over ``max-error-rate`` that the rest of the window cannot
  bring it back (:func:`surely_over`: at least ``min-requests`` and
  :data:`EARLY_MIN_BAD` bad answers, and the rate's lower 99.95 % confidence bound over
  the limit): fail at once, before the window ends, so that a broken release stops
  serving after a few dozen requests instead of a whole window's share;
- ``elapsed < window``: wait until ``since + window`` (or the next change);
- fewer than ``min-requests``: keep watching, up to ``since + max(window,
  ready-timeout)``; then fail "not enough traffic to judge";
- an error rate over ``max-error-rate``, or a p99 over ``max-p99``: fail with the
  figures;
- otherwise pass.

The judgement uses everything seen since ``since``, past the window when it was
extended for want of traffic.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from skr8tr.core.manifest_model import Analysis
from skr8tr.core.traffic import Counts, format_ms, format_rate

__all__ = ["EARLY_MIN_BAD", "EARLY_Z", "Wait", "Pass", "Fail", "Judgement", "judge",
           "format_s", "phase", "surely_over", "watch_until"]

# Failing before the window ends: the error rate's Wilson lower bound at this z (one-sided
# 99.95 %) must be over the limit, with at least this many bad answers (no single fluke
# ends a rollout, whatever min-requests says).
EARLY_Z = 3.29
EARLY_MIN_BAD = 5


@dataclass(frozen=True)
class Wait:
    """Not yet decided: decide again at ``until`` or at the next change (new traffic
    may pass a batch that waits for ``min-requests`` at once)."""

    until: float
    enough: bool  # min-requests reached (waiting for the window's end only)


@dataclass(frozen=True)
class Pass:
    """The batch served its users well enough: go on."""


@dataclass(frozen=True)
class Fail:
    """The batch fails the rollout for ``reason`` (the figures included)."""

    reason: str


Judgement = Wait | Pass | Fail


def format_s(seconds: float) -> str:
    """An elapsed time as the verdicts say it: ``30s``, ``12.5s``."""
    return f"{seconds:.1f}".rstrip("0").rstrip(".") + "s"


def surely_over(bad: int, requests: int, limit: float) -> bool:
    """Is a rate of ``bad`` in ``requests`` over ``limit`` beyond reasonable doubt: the
    Wilson score interval's lower bound at :data:`EARLY_Z` over it, with at least
    :data:`EARLY_MIN_BAD` bad? E.g. 5 of 25 (20 %) is surely over 1 %; 2 of 100 is not."""
    if bad < EARLY_MIN_BAD or requests <= 0:
        return False
    n, z2 = requests, EARLY_Z * EARLY_Z
    p = bad / n
    margin = EARLY_Z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return (p + z2 / (2 * n) - margin) / (1 + z2 / n) > limit


def watch_until(a: Analysis, ready_timeout_s: float, since: float) -> float:
    """When an analysis without enough traffic gives up: ``since + max(window,
    ready-timeout)``."""
    return since + max(a.window_s, ready_timeout_s)


def judge(a: Analysis, *, ready_timeout_s: float, since: float, now: float, seen: Counts,
          generation: int, replicas: Sequence[str]) -> Judgement:
    """The verdict on a batch of ``replicas`` (of ``generation``) whose analysis started
    at ``since``, given what users ``seen`` of them since then. Total: never raises."""
    elapsed = max(0.0, now - since)
    took = format_s(elapsed)
    which = f"generation {generation}, replicas {', '.join(replicas)}"
    rate = seen.error_rate or 0.0
    error_rate = (f"error rate {format_rate(rate)} ({seen.bad}/{seen.requests}) in {took} "
                  f"> {format_rate(a.max_error_rate)} ({which})")
    # `now` against the very sum waited for: `now - since < window` may hold at the
    # instant `since + window` (floats), and the rollout would wait for it forever.
    if now < since + a.window_s:
        if (seen.requests >= a.min_requests
                and surely_over(seen.bad, seen.requests, a.max_error_rate)):
            return Fail(error_rate)
        return Wait(since + a.window_s, seen.requests >= a.min_requests)
    if seen.requests < a.min_requests:
        give_up = watch_until(a, ready_timeout_s, since)
        if now < give_up:
            return Wait(give_up, False)
        return Fail(f"not enough traffic to judge: {seen.requests} requests in {took} "
                    f"(min-requests {a.min_requests})")
    if rate > a.max_error_rate:
        return Fail(error_rate)
    p99 = seen.p99_ms
    if a.max_p99_ms is not None and p99 is not None and p99 > a.max_p99_ms:
        return Fail(f"p99 {format_ms(p99)} in {took} > {format_ms(a.max_p99_ms)} ({which})")
    return Pass()


def phase(a: Analysis, waiting: Wait, replicas: Sequence[str]) -> str:
    """What a rollout waiting on a batch's traffic says it does."""
    ids = ", ".join(replicas)
    if waiting.enough:
        return f"judging {ids} on traffic ({format_s(a.window_s)} window)"
    return (f"judging {ids} on traffic (window {format_s(a.window_s)}, "
            f"min-requests {a.min_requests})")
