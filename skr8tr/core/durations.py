"""Durations as manifests write them (``500ms``, ``8s``, ``1m30s``), in integer milliseconds."""

import re
from fractions import Fraction

from skr8tr.core.manifest_model import MAX_DURATION_MS

__all__ = ["MAX_DURATION_MS", "DURATION_EXAMPLES", "format_duration_ms", "parse_duration_ms"]
DURATION_EXAMPLES = "a duration like 500ms, 8s or 2m"

# Largest first: the formatter picks the largest unit that divides exactly.
_UNIT_MS = {"h": 3_600_000, "m": 60_000, "s": 1000, "ms": 1}
_PART = re.compile(r"([0-9]+)(?:\.([0-9]+))?(ms|s|m|h)")
_NUMBER = re.compile(r"[0-9]+(?:\.[0-9]+)?")
# A part's integer digits beyond this already exceed MAX_DURATION_MS in any unit; the check also
# keeps int() away from its 4300-digit limit.
_MAX_DIGITS = 15
# 3 600 000 ms = 2**7 * 3**2 * 5**5: a fraction with more significant decimals than 7 can never
# come to a whole number of milliseconds.
_MAX_FRACTION_DIGITS = 7


class DurationError(ValueError):
    """A text that is not a duration; ``reason`` is None when it is simply not one."""

    def __init__(self, text: str, reason: str | None = None) -> None:
        super().__init__(f"bad duration {text!r}" + (f" ({reason})" if reason else ""))
        self.text = text
        self.reason = reason


def parse_duration_ms(text: str) -> int:
    """Parse ``500ms``, ``8s``, ``1.5m``, ``1m30s``... into whole milliseconds.

    Units are ms, s, m and h; parts may repeat in any order and are added up. Raises
    DurationError for a missing unit, a negative value, a fraction of a millisecond or more than
    30 days.
    """
    parts = _parts(text)
    if parts is None:
        if text.startswith("-"):
            raise DurationError(text, "negative")
        if _NUMBER.fullmatch(text):
            raise DurationError(text, "no unit")
        raise DurationError(text)
    total = Fraction(0)
    for whole, fraction, unit in parts:
        whole, fraction = whole.lstrip("0") or "0", fraction.rstrip("0")
        if len(whole) > _MAX_DIGITS:
            raise DurationError(text, "more than 30 days")
        if len(fraction) > _MAX_FRACTION_DIGITS:
            raise DurationError(text, "not a whole number of milliseconds")
        total += Fraction(f"{whole}.{fraction or 0}") * _UNIT_MS[unit]
    if total.denominator != 1:
        raise DurationError(text, "not a whole number of milliseconds")
    if total > MAX_DURATION_MS:
        raise DurationError(text, "more than 30 days")
    return int(total)


def format_duration_ms(ms: int) -> str:
    """The shortest spelling: the largest unit that divides exactly (``0s`` for zero)."""
    if ms == 0:
        return "0s"
    for unit, size in _UNIT_MS.items():
        if ms % size == 0:
            return f"{ms // size}{unit}"
    raise AssertionError("unreachable: every integer is a whole number of ms")


def _parts(text: str) -> list[tuple[str, str, str]] | None:
    parts = []
    at = 0
    while at < len(text):
        match = _PART.match(text, at)
        if match is None:
            return None
        parts.append((match[1], match[2] or "", match[3]))
        at = match.end()
    return parts or None
