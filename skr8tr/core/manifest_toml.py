"""TOML manifests: read with tomllib, then each key placed at the line and column it was written.

tomllib gives values without positions, so a line scan (:class:`_TomlLocator`)
finds where each key was written; errors then name a line and column in TOML
as they do in ``.skr8tr``. The result is the same tree
(:mod:`skr8tr.core.manifest_tree`) the ``.skr8tr`` reader produces.

Internal to :mod:`skr8tr.core.manifest`. Pure: no I/O.
"""

from __future__ import annotations

import json
import re
import tomllib
from typing import Any, NoReturn

from skr8tr.core.manifest_tree import (
    APP_NAME_EXPECTED,
    BAD_VALUE_CHAR,
    WORD,
    Entry,
    fail,
    kind_of,
    quote,
)

# --- TOML ---------------------------------------------------------------------------------


_TOML_KEY = re.compile(r"""[A-Za-z0-9_-]+|"(?:[^"\\]|\\.)*"|'[^']*'""")
_TOML_POSITION = re.compile(r" \(at line (\d+), column (\d+)\)$")


def read_toml(text: str) -> Entry:
    """Read a TOML manifest into the same tree as the .skr8tr reader: one app entry."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        _toml_syntax_error(text, str(exc))
    except (ValueError, RecursionError):  # an integer past int()'s digit limit; deep nesting
        fail(1, 1, "TOML too large to read", "", "a manifest of ordinary size and nesting")
    locator = _TomlLocator(text)
    if "app" not in data:
        fail(1, 1, "no app in this manifest", "", 'app = "NAME" at the top')
    line, key_col, value_col = locator.find(("app",))
    name = data["app"]
    if not isinstance(name, str):
        fail(line, value_col, f"'app' is {kind_of(name)}", "app",
             f'app = "NAME": {APP_NAME_EXPECTED}')
    app = _toml_entry(locator, (), "app", name)
    app.where, app.block, app.block_line, app.block_col = "at the top level", True, line, key_col
    app.children = [_toml_entry(locator, (), k, v) for k, v in data.items() if k != "app"]
    return app


def _toml_entry(locator: _TomlLocator, table: tuple[str, ...], key: str, value: Any) -> Entry:
    path = (*table, key)
    line, key_col, value_col = locator.find(path)
    entry = Entry(key, value, line, key_col, value_col, literal=False)
    if isinstance(value, dict):
        entry.value, entry.block, entry.block_line, entry.block_col = None, True, line, key_col
        if len(path) < 3:  # deeper tables are an error the validator finds without looking in
            entry.children = [_toml_entry(locator, path, k, v) for k, v in value.items()]
        return entry
    entry.text_col = _string_start(locator.lines, line, value_col, value)
    for item in value if isinstance(value, list) else [value]:
        bad = BAD_VALUE_CHAR.search(item) if isinstance(item, str) else None
        if bad:
            char = bad[0]
            fail(
                *entry.at(bad.start()),
                f"control character {char!r} in {key!r}",
                char,
                "printable text on one line",
            )
    return entry


def _string_start(lines: list[str], line: int, col: int, value: Any) -> int | None:
    """The column of a string value's first character, if it is written as is (no escapes) in
    quotes at line:col; errors can then point inside it."""
    if not isinstance(value, str) or "\\" in value or line > len(lines):
        return None
    written = lines[line - 1][col - 1 :]
    for mark in ("'", '"'):
        if mark not in value and written.startswith(mark + value + mark):
            return col + 1
    return None


def _toml_syntax_error(text: str, message: str) -> NoReturn:
    position = _TOML_POSITION.search(message)
    lines = text.split("\n")
    if position:
        line, col = int(position[1]), int(position[2])
        reason = message[: position.start()]
    elif message.endswith(" (at end of document)"):
        line, col = len(lines), len(lines[-1]) + 1
        reason = message.removesuffix(" (at end of document)")
    else:
        line, col, reason = 1, 1, message
    offending = WORD.match(lines[line - 1], col - 1) if line <= len(lines) else None
    token = offending[0].removesuffix("\r")[:20] if offending else ""
    where = f"at {quote(token)}" if token else "at the end of the line"
    fail(
        line,
        col,
        f"invalid TOML {where} ({reason[:1].lower()}{reason[1:]})",
        token,
        "valid TOML syntax",
    )


class _TomlLocator:
    """Where each key of a TOML document was written: a line scan, good enough for messages.

    Knows ``[table]`` headers and ``key = value`` lines (bare, quoted and dotted keys); `find`
    falls back to the nearest enclosing key or table, then to 1:1.
    """

    def __init__(self, text: str) -> None:
        self.lines = text.split("\n")
        self._spots: dict[tuple[str, ...], tuple[int, int, int]] = {}
        self.in_strings: set[int] = set()  # lines inside a multi-line string, after its first
        table: tuple[str, ...] = ()
        open_string = None
        for lineno, line in enumerate(self.lines, start=1):
            if open_string:
                self.in_strings.add(lineno)
                if open_string in line:
                    open_string = None
                continue
            if line.lstrip(" \t").startswith("["):
                start = line.index("[") + (2 if line.lstrip(" \t").startswith("[[") else 1)
                parts, end = _toml_key_path(line, start)
                if parts and line[end:].lstrip(" \t").startswith("]"):
                    table = tuple(part for part, _ in parts)
                    for depth, (_, col) in enumerate(parts, start=1):
                        self._spots.setdefault(table[:depth], (lineno, col, col))
                continue
            parts, end = _toml_key_path(line, 0)
            after = line[end:].lstrip(" \t")
            if not parts or not after.startswith("="):
                continue
            value = after[1:].lstrip(" \t")
            value_col = len(line) - len(value) + 1
            path = table
            for part, col in parts:
                path = (*path, part)
                self._spots.setdefault(path, (lineno, col, value_col))
            for quotes in ('"""', "'''"):
                if value.startswith(quotes) and quotes not in value[3:]:
                    open_string = quotes

    def find(self, path: tuple[str, ...]) -> tuple[int, int, int]:
        """Line, key column and value column of `path`, or of the closest thing written."""
        while path:
            if path in self._spots:
                return self._spots[path]
            path = path[:-1]
        return 1, 1, 1


def toml_key_lines(text: str) -> tuple[dict[int, tuple[str, ...]], set[int]]:
    """The key written on each line of TOML *text* (the longest path, for a dotted key; a
    ``[table]`` header's is the table), and the lines inside multi-line strings."""
    locator = _TomlLocator(text)
    keys: dict[int, tuple[str, ...]] = {}
    for path, (line, _, _) in locator._spots.items():
        if len(path) > len(keys.get(line, ())):
            keys[line] = path
    return keys, locator.in_strings


def _toml_key_path(text: str, at: int) -> tuple[list[tuple[str, int]], int]:
    """Parse a dotted TOML key starting at `at`: each part with its column, and where it ends."""
    parts = []
    while True:
        while text[at : at + 1] in (" ", "\t"):
            at += 1
        match = _TOML_KEY.match(text, at)
        if match is None:
            return [], at
        part = match[0]
        if part[0] == '"':
            try:
                part = json.loads(part)
            except ValueError:
                part = part[1:-1]
        elif part[0] == "'":
            part = part[1:-1]
        parts.append((part, at + 1))
        at = match.end()
        while text[at : at + 1] in (" ", "\t"):
            at += 1
        if text[at : at + 1] != ".":
            return parts, at
        at += 1


