"""A manifest's comments, kept by ``skr8tr fmt``: each tied to the key it belongs to.

A full-line comment belongs to the key written after it (``before``), a comment at
the end of a key's line to that key (``after``), and the comments after the last
key to the end of the file (``end``). Keys are paths: ``("app",)`` for the app
line, ``("exec",)``, ``("env", "GREETING")``, ``("health",)`` for the block
header, ``("health", "check")``, ``("rollout", "analysis", "window")``: the same
in ``.skr8tr`` and TOML, so a comment survives a conversion too. The formatter
writes them back beside the same keys; those of a key it leaves out (a default
value) move to the next key it writes.

Internal to :mod:`skr8tr.core.manifest`. Pure: no I/O. Reads only text that
parsed as a manifest (``fmt`` parses first).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from skr8tr.core.manifest_syntax import read_skr8tr, scan_line
from skr8tr.core.manifest_toml import toml_key_lines
from skr8tr.core.manifest_tree import Entry

Path = tuple[str, ...]


@dataclass
class Comments:
    """The comments of one manifest, by the key they belong to (text from '#' on)."""

    before: dict[Path, list[str]] = field(default_factory=dict)
    after: dict[Path, str] = field(default_factory=dict)
    end: list[str] = field(default_factory=list)
    order: list[Path] = field(default_factory=list)  # every key, in source order

    def placed(self, written: list[Path]) -> Comments:
        """These comments for output that writes only the keys *written*: the comments of
        a key left out go before the next written key after it in the source (or to the
        end), a trailing one becoming a line of its own."""
        keep = set(written)
        out = Comments(end=[], order=list(written))
        carried: list[str] = []
        for path in self.order:
            lines = [*carried, *self.before.get(path, [])]
            if path in keep:
                if lines:
                    out.before[path] = lines
                if path in self.after:
                    out.after[path] = self.after[path]
                carried = []
            else:
                carried = lines + ([self.after[path]] if path in self.after else [])
        out.end = [*carried, *self.end]
        return out


def read_comments(text: str, format: str) -> Comments:
    """The comments of manifest *text* (``format`` "skr8tr" or "toml"), by key."""
    if format == "toml":
        keys, in_strings = toml_key_lines(text)
        found = [(number, ("", True) if number in in_strings else _toml_comment(line))
                 for number, line in enumerate(text.split("\n"), start=1)]
    else:
        keys = _skr8tr_key_lines(read_skr8tr(text))
        found = []
        for number, raw in enumerate(text.split("\n"), start=1):
            line = raw.removesuffix("\r")
            end, _, _ = scan_line(line)
            comment = line[end:].rstrip(" \t\r")
            found.append((number, (comment, bool(line[:end].strip(" \t")))))
    comments = Comments()
    pending: list[str] = []
    for number, (comment, on_key_line) in found:
        path = keys.get(number)
        if path is not None:
            comments.order.append(path)
            if pending:
                comments.before.setdefault(path, []).extend(pending)
                pending = []
        if not comment:
            continue
        if path is not None and on_key_line:
            comments.after[path] = comment
        else:  # a line of its own, or after a '}' or inside a multi-line TOML value
            pending.append(comment)
    comments.end = pending
    return comments


def _skr8tr_key_lines(app: Entry) -> dict[int, Path]:
    keys = {app.line: ("app",)}

    def add(path: Path, entries: list[Entry]) -> None:
        for entry in entries:
            keys.setdefault(entry.line, (*path, entry.key))
            add((*path, entry.key), entry.children)

    add((), app.children)
    return keys


def _toml_comment(line: str) -> tuple[str, bool]:
    """The comment on a TOML line ('' if none) and whether anything is written before it."""
    quote = None
    i = 0
    while i < len(line):
        char = line[i]
        if quote is None:
            if char == "#":
                return line[i:].rstrip(" \t\r"), bool(line[:i].strip(" \t"))
            if char in "'\"":
                quote = char
        elif char == "\\" and quote == '"':
            i += 1
        elif char == quote:
            quote = None
        i += 1
    return "", bool(line.strip(" \t\r"))
