"""The tree both manifest formats are read into, and errors that know where they are.

Internal to :mod:`skr8tr.core.manifest`: the ``.skr8tr`` reader
(:mod:`~skr8tr.core.manifest_syntax`) and the TOML reader
(:mod:`~skr8tr.core.manifest_toml`) both produce one :class:`Entry` per key,
with the line and columns it was written at; the validator
(:mod:`~skr8tr.core.manifest_schema`) turns that tree into a ``Manifest``.
Any of them raises :class:`Problem` through :func:`fail`, and ``parse_manifest``
adds the file name to make it a ``ManifestError``.

Pure: no I/O.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from typing import Any, NoReturn

from skr8tr.core.manifest_model import MAX_ERRORS

APP_NAME_EXPECTED = "a name of 1 to 63 characters a-z, 0-9 and '-', not starting with '-'"
WORD = re.compile(r"[^ \t]+")
# C0 controls but tab, DEL, and lone surrogates (not text; cannot be written back). In a source
# newlines are fine and CR is too as part of CRLF; in a value (from TOML) neither is. C1
# controls but NEL (U+009B is a terminal's CSI, U+009D its OSC) and the bidirectional
# overrides and isolates (text shown in another order than it is read: "Trojan Source",
# CVE-2021-42574) are refused too: `fmt`, `describe` and `rollout history` print a
# manifest back to a terminal.
_UNSHOWABLE = r"\x7f-\x84\x86-\x9f\u202a-\u202e\u2066-\u2069\ud800-\udfff"
_BAD_SOURCE_CHAR = re.compile(rf"\r(?!\n)|[\x00-\x08\x0b\x0c\x0e-\x1f{_UNSHOWABLE}]")
BAD_VALUE_CHAR = re.compile(rf"[\x00-\x08\x0a-\x1f{_UNSHOWABLE}]")


# --- Errors ---------------------------------------------------------------------------------


class Problem(Exception):
    """A ManifestError before it knows its file name."""

    def __init__(self, line: int, column: int, message: str, text: str, expected: str) -> None:
        super().__init__(message)
        self.line, self.column, self.message = line, column, message
        self.text, self.expected = text, expected


class Problems(Exception):
    """Every Problem found in a manifest, in line order (at least one); ``stopped`` when the
    checks stopped at MAX_ERRORS (any text costs a bounded number of messages)."""

    def __init__(self, problems: list[Problem], *, stopped: bool = False) -> None:
        unique = {(p.line, p.column, p.message): p for p in problems}
        self.problems = sorted(unique.values(), key=lambda p: (p.line, p.column))
        self.stopped = stopped
        super().__init__(self.problems[0].message)


class Collector:
    """Runs checks one after another, keeping the Problem each raises instead of stopping at
    the first, so that a manifest's errors are all reported at once; at MAX_ERRORS it
    stops (raises Problems) rather than spend more on a text that is all errors."""

    def __init__(self) -> None:
        self.problems: list[Problem] = []

    def run(self, check: Any, *args: Any, **kw: Any) -> Any:
        """``check(*args, **kw)``, or FAILED if it raised a Problem (kept)."""
        stopped = False
        try:
            return check(*args, **kw)
        except Problems as found:
            self.problems.extend(found.problems)
            stopped = found.stopped
        except Problem as problem:
            self.problems.append(problem)
        if stopped or len(self.problems) >= MAX_ERRORS:
            raise Problems(self.problems, stopped=True)
        return FAILED

    def raise_any(self) -> None:
        if self.problems:
            raise Problems(self.problems)


FAILED: Any = type("Failed", (), {"__repr__": lambda self: "<failed check>"})()


def fail(
    line: int,
    column: int,
    problem: str,
    text: str,
    expected: str,
    *,
    advice: str | None = None,
    hint: str | None = None,
) -> NoReturn:
    """Raise "PROBLEM: [HINT ]ADVICE", where ADVICE defaults to "expected EXPECTED"."""
    advice = advice or f"expected {expected}"
    message = f"{problem}: {hint} {advice}" if hint else f"{problem}: {advice}"
    raise Problem(line, column, message, text, expected)


def quote(text: str) -> str:
    """Quote offending text for a message, shortened so one line stays one line."""
    return repr(text if len(text) <= 60 else text[:59] + "…")


def did_you_mean(word: str, options: list[str] | tuple[str, ...]) -> str | None:
    close = difflib.get_close_matches(word, options, n=1)
    return f"did you mean {close[0]!r}?" if close else None


# --- Source text ----------------------------------------------------------------------------


def decode_source(source: str | bytes) -> str:
    """Text without BOM, with every character checked; CRLF is kept (readers drop the CR)."""
    if isinstance(source, bytes):
        try:
            source = source.decode("utf-8")
        except UnicodeDecodeError as exc:
            good = exc.object[: exc.start]
            line_start = good.rfind(b"\n") + 1
            bad = exc.object[exc.start : exc.end]
            fail(
                good.count(b"\n") + 1,
                len(good[line_start:].decode("utf-8")) + 1,
                f"bad byte {bad!r} (not UTF-8)",
                bad.hex(" "),
                "UTF-8 text",
            )
    text = source.removeprefix("\ufeff")
    match = _BAD_SOURCE_CHAR.search(text)
    if match:
        line_start = text.rfind("\n", 0, match.start()) + 1
        fail(
            text.count("\n", 0, match.start()) + 1,
            match.start() - line_start + 1,
            f"control character {match[0]!r} (U+{ord(match[0]):04X})",
            match[0],
            "printable text",
        )
    return text


# --- The tree both formats are read into ------------------------------------------------------


@dataclass(eq=False)
class Entry:
    """One ``key value`` line (or TOML key), with where it was written and what it holds."""

    key: str
    value: Any  # None: no value. From .skr8tr, the text as written; from TOML, the decoded value.
    line: int
    key_col: int
    value_col: int
    literal: bool = True  # the value is manifest text whose quotes are still to be read
    text_col: int | None = None  # value[i] was written at column text_col + i (None: unknown)
    block: bool = False  # has a block: indented lines, braces or a TOML table
    block_line: int = 0  # where that block starts: its '{', first line or [table] header
    block_col: int = 0
    children: list[Entry] = field(default_factory=list)
    where: str = ""  # how messages name this block, when not "in KEY block"

    def at(self, offset: int | None = None) -> tuple[int, int]:
        """Line and column of the value, or of its character at `offset` where that is known."""
        if offset is None or self.text_col is None:
            return self.line, self.value_col
        return self.line, self.text_col + offset



def kind_of(value: Any) -> str:
    """How a message names the type of a TOML value."""
    names = {bool: "a boolean", int: "an integer", float: "a float", str: "a string"}
    names |= {list: "an array", dict: "a table"}
    return names.get(type(value), f"a {type(value).__name__}")
