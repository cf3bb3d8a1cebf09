"""Where each key of a TOML text was written (tomllib gives values without positions).

:func:`positions` maps every table, key and array element (a :data:`Path` of keys and
indexes from the top) to the line and column of its key and of its value, so that a
checker of an already parsed document can name FILE:LINE:COL for what it refuses. Used
by the state file's checks (:mod:`skr8tr.conductor.state_file`); manifests have their
own line locator (:mod:`skr8tr.core.manifest_toml`), which also keeps comments. Pure.
"""

from __future__ import annotations

import contextlib
import re
import tomllib

Path = tuple[str | int, ...]  # keys and array indexes from the top of the document

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def positions(text: str) -> dict[Path, tuple[int, int]]:
    """Where each table, key and array element of a TOML text was written: for every path,
    the index of its key (or table header, or element) and the index of its value.

    tomllib gives no positions. The text has parsed, so this scan can assume valid
    TOML; should it stumble anyway, what it found so far is returned (an error is then
    placed at the closest enclosing table or key, at worst at line 1, column 1).
    """
    scanner = _Scanner(text)
    with contextlib.suppress(IndexError, ValueError, tomllib.TOMLDecodeError):
        scanner.document()
    return scanner.spots


class _Scanner:
    def __init__(self, text: str) -> None:
        self.text = text
        self.i = 0
        self.spots: dict[Path, tuple[int, int]] = {}

    def document(self) -> None:
        text = self.text
        table: Path = ()
        arrays: dict[Path, int] = {}  # each array of tables -> how many elements so far
        while True:
            self.skip(lines=True)
            if self.i >= len(text):
                return
            start = self.i
            if text[start] != "[":
                self.pair(table)
                continue
            double = text.startswith("[[", start)
            self.i += 2 if double else 1
            parts = self.key()
            self.skip()
            self.i += 2 if double else 1
            path: Path = ()
            for key, at in parts[:-1]:
                path = (*path, key)
                self.spots.setdefault(path, (at, at))
                if path in arrays:  # [[a]] then [a.b] or [[a.b]]: inside the last a
                    path = (*path, arrays[path] - 1)
            key, at = parts[-1]  # a table is placed at its name in the header
            path = (*path, key)
            if double:
                self.spots.setdefault(path, (at, at))
                index = arrays.get(path, 0)
                arrays[path] = index + 1
                path = (*path, index)
            self.spots[path] = (at, at)
            table = path

    def pair(self, table: Path) -> None:
        parts = self.key()
        path = table
        for key, at in parts:
            path = (*path, key)
            self.spots.setdefault(path, (at, at))
        self.skip()
        if self.text[self.i] != "=":
            raise ValueError(f"expected '=' at index {self.i}")
        self.i += 1
        self.skip()
        self.spots[path] = (parts[-1][1], self.i)
        self.value(path)

    def key(self) -> list[tuple[str, int]]:
        """A dotted key: each part and the index it starts at."""
        text = self.text
        parts = []
        while True:
            self.skip()
            start = self.i
            if text[start] == '"':
                self.basic_string()
                key = tomllib.loads("k = " + text[start:self.i])["k"]
            elif text[start] == "'":
                self.i = text.index("'", start + 1) + 1
                key = text[start + 1:self.i - 1]
            else:
                match = _BARE_KEY.match(text, start)
                if match is None:
                    raise ValueError(f"expected a key at index {start}")
                key, self.i = match[0], match.end()
            parts.append((key, start))
            self.skip()
            if text[self.i:self.i + 1] != ".":
                return parts
            self.i += 1

    def value(self, path: Path) -> None:
        text, start = self.text, self.i
        if text.startswith(('"""', "'''"), start):
            quote = text[start]
            self.i += 3
            while not text.startswith(quote * 3, self.i):
                self.i += 2 if quote == '"' and text[self.i] == "\\" else 1
            run = 3  # up to two more quotes are part of the string
            while run < 5 and text[self.i + run:self.i + run + 1] == quote:
                run += 1
            self.i += run
        elif text[start] == '"':
            self.basic_string()
        elif text[start] == "'":
            self.i = text.index("'", start + 1) + 1
        elif text[start] in "[{":
            close = "]" if text[start] == "[" else "}"
            self.i += 1
            index = 0
            while True:
                self.skip(lines=True)
                if text[self.i] == close:
                    self.i += 1
                    return
                if text[self.i] == ",":
                    self.i += 1
                elif close == "}":
                    self.pair(path)
                else:
                    self.spots[(*path, index)] = (self.i, self.i)
                    self.value((*path, index))
                    index += 1
        else:  # a number, boolean, date or time: up to what ends a value
            while self.i < len(text) and text[self.i] not in ",]}#\n":
                self.i += 1

    def basic_string(self) -> None:
        text = self.text
        self.i += 1
        while text[self.i] != '"':
            self.i += 2 if text[self.i] == "\\" else 1
        self.i += 1

    def skip(self, *, lines: bool = False) -> None:
        """Past blanks; with ``lines``, past line ends and comments too."""
        text = self.text
        while self.i < len(text):
            c = text[self.i]
            if c in " \t" or (lines and c in "\r\n"):
                self.i += 1
            elif lines and c == "#":
                end = text.find("\n", self.i)
                self.i = len(text) if end < 0 else end
            else:
                return
