"""The JSON of the wire, read strictly and written safely: what every decoder and
encoder of :mod:`skr8tr.core.protocol` and :mod:`skr8tr.core.command_args` shares.

A received message is one JSON object, from text or UTF-8 bytes, under a size
limit, without NaN or Infinity and without duplicate keys (two parsers that
keep different duplicates could disagree on what was signed). A value quoted
back in an error is cut short (:func:`show`). What we send is ASCII JSON
(:func:`dumps`), so any text, even a lone surrogate, can be sent.
"""

from __future__ import annotations

import json
import math
from typing import Any

__all__ = ["dumps", "is_finite_number", "is_int", "is_text", "json_type", "parse_object", "show"]


def is_int(value: Any, lo: int, hi: int | None = None) -> bool:
    return (
        isinstance(value, int)
        and not isinstance(value, bool)
        and value >= lo
        and (hi is None or value <= hi)
    )


def is_text(value: Any) -> bool:
    """A string that UTF-8 can carry (JSON \\u escapes can smuggle in lone surrogates)."""
    if not isinstance(value, str):
        return False
    if value.isascii():
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def show(value: Any, limit: int = 40) -> str:
    """A short JSON-ish rendering of a received value, safe to echo in an error message."""
    if isinstance(value, dict | list):
        return json_type(value)
    try:
        shown = json.dumps(value, ensure_ascii=True)
    except (TypeError, ValueError):  # NaN and the like
        shown = repr(value)
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Two parsers that pick different duplicates could disagree on what was signed.
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {show(key)} in a JSON object")
        out[key] = value
    return out


def parse_object(data: Any, *, max_bytes: int | None, what: str) -> dict[str, Any] | str:
    """Parse one JSON object from text or UTF-8 bytes, or return why not."""
    if isinstance(data, bytes | bytearray | memoryview):
        raw = bytes(data)
        if max_bytes is not None and len(raw) > max_bytes:
            return f"{what} is {len(raw)} bytes, over the {max_bytes}-byte limit"
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            return f"{what} is not valid UTF-8 (byte {exc.start})"
    elif isinstance(data, str):
        text = data
        # A character is at least one UTF-8 byte: skip encoding what is too long anyway.
        if max_bytes is not None and len(text) > max_bytes:
            return f"{what} is over the {max_bytes}-byte limit"
        try:
            size = len(text.encode("utf-8"))
        except UnicodeEncodeError as exc:
            return f"{what} is not valid UTF-8 (lone surrogate at character {exc.start})"
        if max_bytes is not None and size > max_bytes:
            return f"{what} is {size} bytes, over the {max_bytes}-byte limit"
    else:
        return f"{what} must be JSON text, got {type(data).__name__}"
    try:
        obj = json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as exc:
        return f"{what} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
    except ValueError as exc:  # from the hooks, or an integer with too many digits
        return f"{what} is not valid JSON: {exc}"
    except RecursionError:
        return f"{what} is nested too deeply"
    if not isinstance(obj, dict):
        return f"{what} must be a JSON object, got {json_type(obj)}"
    return obj


def is_finite_number(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def dumps(obj: Any) -> str:
    # ASCII: any str can be sent, whatever the producer put in it. allow_nan=False:
    # NaN is not JSON and browsers reject it; a producer bug raises ValueError here.
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
