"""Percentages as manifests write them (``1%``, ``0.5%``, ``12.5%``), as exact fractions.

A manifest's ``max-error-rate`` is written in percent with at most three decimals, so
every value is a whole number of thousandths of a percent (1/100000): it is parsed
through that integer, never through float text, and formatted back from it, so
``parse_percent(format_percent(rate)) == rate`` for every rate parsed.

Pure: no I/O.
"""

from __future__ import annotations

import re

__all__ = ["PERCENT_DECIMALS", "PERCENT_EXAMPLES", "PercentError", "format_percent",
           "parse_percent"]

PERCENT_DECIMALS = 3
PERCENT_EXAMPLES = "a percent 0%..100% like 1%, 0.5% or 12.5%"
_STEPS = 100 * 10**PERCENT_DECIMALS  # thousandths of a percent in a whole (100%)
_PERCENT = re.compile(r"([0-9]+)(?:\.([0-9]+))?%")
_NUMBER = re.compile(r"[0-9]+(?:\.[0-9]+)?")


class PercentError(ValueError):
    """A text that is not a percent; ``reason`` is None when it is simply not one."""

    def __init__(self, text: str, reason: str | None = None) -> None:
        super().__init__(f"bad percent {text!r}" + (f" ({reason})" if reason else ""))
        self.text = text
        self.reason = reason


def parse_percent(text: str) -> float:
    """``"12.5%"`` -> ``0.125``: a fraction 0..1 of a percent 0%..100% with at most three
    decimals. Raises PercentError for a missing ``%`` (``1`` could mean 1% or 100%), a
    negative value, more than 100% or more than three decimals."""
    match = _PERCENT.fullmatch(text)
    if match is None:
        if text.startswith("-"):
            raise PercentError(text, "negative")
        if _NUMBER.fullmatch(text):
            raise PercentError(text, "no '%'")
        raise PercentError(text)
    whole, decimals = match[1].lstrip("0") or "0", (match[2] or "").rstrip("0")
    if len(whole) > 3:  # also keeps int() away from its digit limit
        raise PercentError(text, "more than 100%")
    if len(decimals) > PERCENT_DECIMALS:
        raise PercentError(text, f"more than {PERCENT_DECIMALS} decimals")
    steps = int(whole) * 10**PERCENT_DECIMALS + int(decimals.ljust(PERCENT_DECIMALS, "0"))
    if steps > _STEPS:
        raise PercentError(text, "more than 100%")
    return steps / _STEPS


def format_percent(rate: float) -> str:
    """``0.125`` -> ``"12.5%"``, ``0.01`` -> ``"1%"``: the shortest text that
    :func:`parse_percent` reads back as *rate* (a rate it gave, or the nearest one)."""
    steps = round(rate * _STEPS)
    whole, rest = divmod(steps, 10**PERCENT_DECIMALS)
    decimals = f"{rest:0{PERCENT_DECIMALS}d}".rstrip("0")
    return f"{whole}.{decimals}%" if decimals else f"{whole}%"
