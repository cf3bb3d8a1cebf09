"""Manifests: the ``.skr8tr`` language and its TOML twin, read into a frozen `Manifest`.

Both formats are first read into the same small tree of `_Entry` (key, value, line, columns,
children); one validator that knows the schema then turns that tree into a `Manifest`. So every
rule, default and error message exists once, whatever the format. The formatters go the other
way through one sparse dict (`_to_dict`), so ``.skr8tr`` and TOML output agree too.

Pure code: no trio, no clock, no processes, no files (:mod:`skr8tr.manifest_files` reads
them).
"""

from __future__ import annotations

import difflib
import json
import os
import re
import shlex
import tomllib
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, NoReturn

import tomli_w

from skr8tr.core.durations import (
    DURATION_EXAMPLES,
    DurationError,
    format_duration_ms,
    parse_duration_ms,
)
from skr8tr.core.names import APP_NAME_RE

FORMATS = ("skr8tr", "toml")
TYPES = ("process", "job")
RESTARTS = ("always", "on-failure", "never")
ORDERS = ("start-first", "stop-first")
PLACEHOLDERS = ("host", "port")
MAX_REPLICAS = 1000
MAX_SURGE = 1000
MAX_RETRIES = 100
MAX_CPU = 1024
RAM_UNITS = {"T": 2**40, "G": 2**30, "M": 2**20, "K": 2**10, "B": 1}  # largest first
MAX_RAM_BYTES = 1024 * RAM_UNITS["T"]
# Bounds that keep the parser's cost linear and small for any text it is given: a line of
# the .skr8tr language, and any one string value (a TOML string, one word of `args`).
MAX_LINE_CHARS = 16 * 1024
MAX_VALUE_CHARS = 16 * 1024

_NAME = APP_NAME_RE
_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_KNOWN_PLACEHOLDER = re.compile(r"\{(host|port)\}")
_DIGITS = re.compile(r"[0-9]+")
_DECIMAL = re.compile(r"[0-9]+(?:\.[0-9]+)?")
_RAM = re.compile(r"([0-9]+)([KMGT]?)(B|iB)?")
_WORD = re.compile(r"[^ \t]+")
# One piece of a shell word (POSIX rules, as shlex.split): a bare run, a '...' string, a
# "..." string (backslash escapes only " and itself there), or a backslash and what it escapes.
_SHELL_PIECE = re.compile(r"""[^ \t\r\n'"\\]+|'([^']*)'|"((?:[^"\\]|\\.)*)"|\\(.)""", re.S)
_SHELL_SPACE = re.compile(r"[ \t\r\n]*")
_DQ_ESCAPE = re.compile(r'\\([\\"])')
# shlex.quote's safe characters plus braces, so that `--port {port}` stays readable.
_SAFE_WORD = re.compile(r"[\w@%+=:,./{}-]+", re.ASCII)
# C0 controls but tab, DEL, and lone surrogates (not text; cannot be written back). In a source
# newlines are fine and CR is too as part of CRLF; in a value (from TOML) neither is.
_BAD_SOURCE_CHAR = re.compile(r"\r(?!\n)|[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff]")
_BAD_VALUE_CHAR = re.compile(r"[\x00-\x08\x0a-\x1f\x7f\ud800-\udfff]")

_EXPECT = {
    "app": "a name of 1 to 63 characters a-z, 0-9 and '-', not starting with '-'",
    "type": "process or job",
    "exec": "the path of an executable, like ./server.py, /usr/bin/env or python3",
    "args": "shell-style words, like --port {port} --name 'my app'",
    "workdir": "a directory",
    "port": "a port number 1..65535 or auto",
    "replicas": f"a whole number 0..{MAX_REPLICAS}",
    "ram": "a size like 512M, 2G or 1024K",
    "cpu": f"a number of cores more than 0 and at most {MAX_CPU}, like 0.5 or 2",
    "restart": "always, on-failure or never",
    "check": "GET /PATH [CODE], like GET /healthz 200",
    "retries": f"a whole number 1..{MAX_RETRIES}",
    "surge": f"a whole number 1..{MAX_SURGE}",
    "auto-rollback": "yes or no",
    "order": "start-first or stop-first",
}
_DURATION_KEYS = ("stop-grace", "interval", "timeout", "settle", "ready-timeout", "drain")
_POSITIVE_DURATIONS = ("interval", "timeout", "ready-timeout")

# Keys of each block in canonical order; True marks a key that takes a block, not a value.
_APP_KEYS = {
    "type": False,
    "exec": False,
    "args": False,
    "workdir": False,
    "port": False,
    "replicas": False,
    "ram": False,
    "cpu": False,
    "stop-grace": False,
    "restart": False,
    "env": True,
    "health": True,
    "rollout": True,
}
_HEALTH_KEYS = {"check": False, "interval": False, "timeout": False, "retries": False}
_ROLLOUT_KEYS = {
    "settle": False,
    "surge": False,
    "ready-timeout": False,
    "drain": False,
    "auto-rollback": False,
    "order": False,
}


class ManifestError(ValueError):
    """A manifest that cannot be used, with where and why: ``FILE:LINE:COLUMN: message``.

    ``line`` and ``column`` are 1-based (columns count characters); ``text`` is the offending
    text and ``expected`` what would have been accepted there.
    """

    def __init__(
        self, message: str, *, filename: str, line: int, column: int, text: str, expected: str
    ) -> None:
        super().__init__(f"{filename}:{line}:{column}: {message}")
        self.message = message
        self.filename = filename
        self.line = line
        self.column = column
        self.text = text
        self.expected = expected


@dataclass(frozen=True)
class HealthCheck:
    path: str
    method: str = "GET"
    expect_status: int = 200
    interval_ms: int = 1000
    timeout_ms: int = 1000
    retries: int = 3

    @property
    def interval_s(self) -> float:
        return self.interval_ms / 1000

    @property
    def timeout_s(self) -> float:
        return self.timeout_ms / 1000


@dataclass(frozen=True)
class RolloutPolicy:
    settle_ms: int = 8000
    surge: int = 1
    ready_timeout_ms: int = 60000
    drain_ms: int = 0
    auto_rollback: bool = True
    order: str = "start-first"

    @property
    def settle_s(self) -> float:
        return self.settle_ms / 1000

    @property
    def ready_timeout_s(self) -> float:
        return self.ready_timeout_ms / 1000

    @property
    def drain_s(self) -> float:
        return self.drain_ms / 1000


@dataclass(frozen=True)
class Manifest:
    app: str
    exec: str
    base_dir: str
    type: str = "process"
    args: tuple[str, ...] = ()
    workdir: str | None = None
    port: int | str | None = None
    replicas: int = 1
    ram_bytes: int | None = None
    cpu: float | None = None
    env: tuple[tuple[str, str], ...] = ()
    health: HealthCheck | None = None
    rollout: RolloutPolicy = RolloutPolicy()
    stop_grace_ms: int = 5000
    restart: str = "always"

    @property
    def exec_path(self) -> str:
        """`exec` resolved against `base_dir`; a bare name like ``python3`` is left to PATH."""
        if "/" not in self.exec or os.path.isabs(self.exec):
            return self.exec
        return os.path.normpath(os.path.join(self.base_dir, self.exec))

    @property
    def workdir_path(self) -> str | None:
        """`workdir` resolved against `base_dir` (None: the node picks one)."""
        if self.workdir is None or os.path.isabs(self.workdir):
            return self.workdir
        return os.path.normpath(os.path.join(self.base_dir, self.workdir))

    @property
    def stop_grace_s(self) -> float:
        return self.stop_grace_ms / 1000

    def env_dict(self) -> dict[str, str]:
        return dict(self.env)

    def expand_args(self, host: str, port: int | None) -> tuple[str, ...]:
        """`args` with ``{host}`` and ``{port}`` replaced; ValueError if ``{port}`` lacks one."""

        def value(match: re.Match[str]) -> str:
            if match[1] == "host":
                return host
            if port is None:
                raise ValueError(f"app {self.app!r} uses {{port}} in args but got no port")
            return str(port)

        return tuple(_KNOWN_PLACEHOLDER.sub(value, arg) for arg in self.args)


def parse_manifest(
    source: str | bytes, *, filename: str, base_dir: str, format: str | None = None
) -> Manifest:
    """Parse a manifest written in ``format`` ("skr8tr" or "toml"; None: ``.toml`` files are TOML).

    Raises ManifestError, and nothing else, for any text or bytes that is not a valid manifest.
    Raises ValueError (a bug in the caller, not in the manifest) if `base_dir` is not absolute or
    `format` unknown.
    """
    if not os.path.isabs(base_dir):
        raise ValueError(f"base_dir must be an absolute path, got {base_dir!r}")
    if format is None:
        format = "toml" if filename.endswith(".toml") else "skr8tr"
    if format not in FORMATS:
        raise ValueError(f"unknown manifest format {format!r}: expected one of {FORMATS}")
    try:
        text = _decode(source)
        app = _read_toml(text) if format == "toml" else _read_skr8tr(text)
        return _build(app, base_dir)
    except _Problem as problem:
        raise ManifestError(
            problem.message,
            filename=filename,
            line=problem.line,
            column=problem.column,
            text=problem.text,
            expected=problem.expected,
        ) from None


def format_skr8tr(m: Manifest) -> str:
    """The normalised ``.skr8tr`` text of `m`: canonical key order, defaults left out."""
    fields = _to_dict(m, full=False)
    lines = [f"app {fields.pop('app')}"]
    for key, value in fields.items():
        if isinstance(value, dict):  # env, health, rollout
            lines.append(f"  {key}")
            for sub_key, sub_value in value.items():
                lines.append(f"    {sub_key} {_render(sub_value, literal=key == 'env')}")
        else:
            lines.append(f"  {key} {_render(value, literal=key in ('exec', 'workdir'))}")
    return "\n".join(lines) + "\n"


def format_toml(m: Manifest) -> str:
    """The TOML text of `m`, with the same keys and defaults left out as `format_skr8tr`."""
    return tomli_w.dumps(_to_dict(m, full=False))


def manifest_to_dict(m: Manifest) -> dict[str, Any]:
    """Every key of `m` as the manifest language spells it (durations "8s", ram "512M", unset
    keys None), plus ``base_dir``; JSON-able."""
    fields = _to_dict(m, full=True)
    fields["base_dir"] = m.base_dir
    return fields


# --- Errors ---------------------------------------------------------------------------------


class _Problem(Exception):
    """A ManifestError before it knows its file name."""

    def __init__(self, line: int, column: int, message: str, text: str, expected: str) -> None:
        super().__init__(message)
        self.line, self.column, self.message = line, column, message
        self.text, self.expected = text, expected


def _fail(
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
    raise _Problem(line, column, message, text, expected)


def _q(text: str) -> str:
    """Quote offending text for a message, shortened so one line stays one line."""
    return repr(text if len(text) <= 60 else text[:59] + "…")


def _did_you_mean(word: str, options: list[str] | tuple[str, ...]) -> str | None:
    close = difflib.get_close_matches(word, options, n=1)
    return f"did you mean {close[0]!r}?" if close else None


# --- Source text ----------------------------------------------------------------------------


def _decode(source: str | bytes) -> str:
    """Text without BOM, with every character checked; CRLF is kept (readers drop the CR)."""
    if isinstance(source, bytes):
        try:
            source = source.decode("utf-8")
        except UnicodeDecodeError as exc:
            good = exc.object[: exc.start]
            line_start = good.rfind(b"\n") + 1
            bad = exc.object[exc.start : exc.end]
            _fail(
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
        _fail(
            text.count("\n", 0, match.start()) + 1,
            match.start() - line_start + 1,
            f"control character {match[0]!r} (U+{ord(match[0]):04X})",
            match[0],
            "printable text",
        )
    return text


# --- The tree both formats are read into ------------------------------------------------------


@dataclass(eq=False)
class _Entry:
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
    children: list[_Entry] = field(default_factory=list)
    where: str = ""  # how messages name this block, when not "in KEY block"

    def at(self, offset: int | None = None) -> tuple[int, int]:
        """Line and column of the value, or of its character at `offset` where that is known."""
        if offset is None or self.text_col is None:
            return self.line, self.value_col
        return self.line, self.text_col + offset


# --- The .skr8tr language -------------------------------------------------------------------


@dataclass(eq=False)
class _Block:
    children: list[_Entry]
    indent: int | None  # None until the first line inside a brace block fixes it
    brace: tuple[int, int] | None = None  # line and column of the '{' that opened it


def _read_skr8tr(text: str) -> _Entry:
    """Read the lines into entries nested by indentation or braces; return the one app entry."""
    root = _Block([], 0)
    stack = [root]
    for lineno, raw in enumerate(text.split("\n"), start=1):
        line = raw.removesuffix("\r")
        if len(line) > MAX_LINE_CHARS:
            _fail(
                lineno,
                MAX_LINE_CHARS + 1,
                f"line is {len(line)} characters long",
                line[:60],
                f"lines of at most {MAX_LINE_CHARS} characters",
            )
        end, bare, _ = _scan(line)
        content = line[:end].rstrip(" \t")
        body = content.lstrip(" \t")
        if not body:
            continue
        indent = len(content) - len(body)
        if "\t" in content[:indent]:
            _fail(
                lineno,
                content.index("\t") + 1,
                "tab in indentation",
                "\t",
                "spaces",
                advice="use two spaces per level",
            )
        if body == "}":
            _close_brace(stack, lineno, indent + 1)
            continue
        block = _block_for(stack, indent, lineno)
        entry = _line_entry(body, bare[indent:], lineno, indent + 1)
        block.children.append(entry)
        if entry.block:
            stack.append(_Block(entry.children, None, (entry.block_line, entry.block_col)))
    for block in reversed(stack):
        if block.brace:
            line, col = block.brace
            _fail(
                line,
                col,
                f"missing '}}' for block opened at line {line}",
                "{",
                "'}' on a line of its own",
                advice="expected '}' before the end of the file",
            )
    return _the_app(root.children)


def _scan(line: str) -> tuple[int, list[bool], int | None]:
    """Shell-like quoting in one pass over a line.

    Returns where a comment starts (len(line) if none: a '#' at the start or after bare
    whitespace), which characters are bare (outside quotes and not escaped by a backslash) and
    where a quote left open at the end was opened (None if none).
    """
    bare = [False] * len(line)
    quote = None
    opened = None
    i = 0
    while i < len(line):
        char = line[i]
        if quote is None:
            if char == "#" and (i == 0 or (line[i - 1] in " \t" and bare[i - 1])):
                return i, bare, None
            if char == "\\":
                i += 2
                continue
            if char in "'\"":
                quote, opened = char, i
            else:
                bare[i] = True
        elif char == quote:
            quote = None
        elif char == "\\" and quote == '"':
            i += 1
        i += 1
    return len(line), bare, (opened if quote else None)


def _opens_brace(body: str, bare: list[bool]) -> bool:
    """Is the last bare token of the line a '{'?"""
    last = len(body) - 1
    return (
        last > 0 and body[last] == "{" and bare[last] and body[last - 1] in " \t" and bare[last - 1]
    )


def _close_brace(stack: list[_Block], lineno: int, col: int) -> None:
    for depth in range(len(stack) - 1, 0, -1):
        if stack[depth].brace:
            del stack[depth:]
            return
    _fail(
        lineno,
        col,
        "unexpected '}'",
        "}",
        "'}' only to close a block opened with '{'",
        advice="no block opened with '{' is open here",
    )


def _block_for(stack: list[_Block], indent: int, lineno: int) -> _Block:
    """The block a line with this indentation belongs to; opens or closes indented blocks."""
    while True:
        top = stack[-1]
        if top.indent is None:
            top.indent = indent
            return top
        if indent == top.indent:
            return top
        if indent < top.indent:
            if top.brace is None:
                stack.pop()
                continue
            _fail(
                lineno,
                indent + 1,
                f"bad indentation ({indent} spaces)",
                " " * indent,
                f"{top.indent} spaces or a '}}' closing the block opened at line {top.brace[0]}",
            )
        parent = top.children[-1] if top.children else None
        can_nest = parent is not None and not parent.block
        if can_nest and indent == top.indent + 2:
            parent.block, parent.block_line, parent.block_col = True, lineno, indent + 1
            stack.append(_Block(parent.children, indent))
            return stack[-1]
        expected = top.indent + 2 if can_nest else top.indent
        _fail(
            lineno,
            indent + 1,
            f"bad indentation ({indent} spaces)",
            " " * indent,
            f"{expected} spaces",
        )


def _line_entry(body: str, bare: list[bool], lineno: int, col: int) -> _Entry:
    key = _WORD.match(body)[0]
    if key == "{":
        _fail(
            lineno,
            col,
            "'{' on a line of its own",
            "{",
            "'{' at the end of a header line",
            advice="put '{' at the end of the line that names the block, like 'env {'",
        )
    rest = body[len(key) :].lstrip(" \t")
    value_col = col + len(body) - len(rest)
    entry = _Entry(key, None, lineno, col, value_col, text_col=value_col)
    if _opens_brace(body, bare):
        entry.block, entry.block_line, entry.block_col = True, lineno, col + len(body) - 1
        rest = rest[:-1].rstrip(" \t")
    entry.value = rest or None
    return entry


def _the_app(top: list[_Entry]) -> _Entry:
    if not top:
        _fail(1, 1, "no app in this manifest", "", "'app NAME'")
    first = top[0]
    if first.key != "app":
        _fail(
            first.line,
            first.key_col,
            f"unexpected {_q(first.key)} at top level",
            first.key,
            "'app NAME' first",
        )
    for entry in top[1:]:
        if entry.key == "app":
            _fail(
                entry.line,
                entry.key_col,
                "second 'app' in one manifest",
                entry.key,
                f"one app per file (the first is at line {first.line})",
            )
        _fail(
            entry.line,
            entry.key_col,
            f"unexpected {_q(entry.key)} at top level",
            entry.key,
            f"it inside the app, indented two spaces under line {first.line}",
        )
    return first


# --- TOML ---------------------------------------------------------------------------------


_TOML_KEY = re.compile(r"""[A-Za-z0-9_-]+|"(?:[^"\\]|\\.)*"|'[^']*'""")
_TOML_POSITION = re.compile(r" \(at line (\d+), column (\d+)\)$")


def _read_toml(text: str) -> _Entry:
    """Read a TOML manifest into the same tree as the .skr8tr reader: one app entry."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        _toml_syntax_error(text, str(exc))
    except (ValueError, RecursionError):  # an integer past int()'s digit limit; deep nesting
        _fail(1, 1, "TOML too large to read", "", "a manifest of ordinary size and nesting")
    locator = _TomlLocator(text)
    if "app" not in data:
        _fail(1, 1, "no app in this manifest", "", 'app = "NAME" at the top')
    line, key_col, value_col = locator.find(("app",))
    name = data["app"]
    if not isinstance(name, str):
        _fail(line, value_col, f"'app' is {_kind(name)}", "app", f'app = "NAME": {_EXPECT["app"]}')
    app = _toml_entry(locator, (), "app", name)
    app.where, app.block, app.block_line, app.block_col = "at the top level", True, line, key_col
    app.children = [_toml_entry(locator, (), k, v) for k, v in data.items() if k != "app"]
    return app


def _toml_entry(locator: _TomlLocator, table: tuple[str, ...], key: str, value: Any) -> _Entry:
    path = (*table, key)
    line, key_col, value_col = locator.find(path)
    entry = _Entry(key, value, line, key_col, value_col, literal=False)
    if isinstance(value, dict):
        entry.value, entry.block, entry.block_line, entry.block_col = None, True, line, key_col
        if len(path) < 3:  # deeper tables are an error the validator finds without looking in
            entry.children = [_toml_entry(locator, path, k, v) for k, v in value.items()]
        return entry
    entry.text_col = _string_start(locator.lines, line, value_col, value)
    for item in value if isinstance(value, list) else [value]:
        bad = _BAD_VALUE_CHAR.search(item) if isinstance(item, str) else None
        if bad:
            char = bad[0]
            _fail(
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
    for quote in ("'", '"'):
        if quote not in value and written.startswith(quote + value + quote):
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
    offending = _WORD.match(lines[line - 1], col - 1) if line <= len(lines) else None
    token = offending[0].removesuffix("\r")[:20] if offending else ""
    where = f"at {_q(token)}" if token else "at the end of the line"
    _fail(
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
        table: tuple[str, ...] = ()
        open_string = None
        for lineno, line in enumerate(self.lines, start=1):
            if open_string:
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


# --- Validation: the tree to a Manifest -----------------------------------------------------


def _build(app: _Entry, base_dir: str) -> Manifest:
    name = _app_name(app)
    keys = _keys(app, _APP_KEYS)
    if "exec" not in keys:
        _fail(
            app.line,
            app.key_col,
            f"app {name!r} has no 'exec'",
            "app",
            f"an 'exec' key: {_EXPECT['exec']}",
        )
    kind = _choice(keys["type"], TYPES) if "type" in keys else "process"
    port = _port(keys["port"]) if "port" in keys else None
    fields: dict[str, Any] = {"type": kind, "port": port}
    fields["exec"] = _path(keys["exec"])
    if "args" in keys:
        fields["args"] = _args(keys["args"], has_port=port is not None)
    if "workdir" in keys:
        fields["workdir"] = _path(keys["workdir"])
    if "replicas" in keys:
        fields["replicas"] = _int(keys["replicas"], 0, MAX_REPLICAS)
    if "ram" in keys:
        fields["ram_bytes"] = _ram(keys["ram"])
    if "cpu" in keys:
        fields["cpu"] = _cpu(keys["cpu"])
    if "stop-grace" in keys:
        fields["stop_grace_ms"] = _duration(keys["stop-grace"])
    fields["restart"] = _default_restart(kind)
    if "restart" in keys:
        fields["restart"] = _choice(keys["restart"], RESTARTS)
    if "env" in keys:
        fields["env"] = _env(keys["env"], has_port=port is not None)
    if "health" in keys:
        health = keys["health"]
        if kind == "job":
            _fail(
                health.line,
                health.key_col,
                "'health' on a job",
                "health",
                "no health block with type job",
                advice="a job runs to completion and is not probed: remove the health block",
            )
        fields["health"] = _health(health)
    if "rollout" in keys:
        fields["rollout"] = _rollout(keys["rollout"])
    return Manifest(app=name, base_dir=base_dir, **fields)


def _default_restart(kind: str) -> str:
    return "on-failure" if kind == "job" else "always"


def _keys(block: _Entry, schema: dict[str, bool]) -> dict[str, _Entry]:
    """The block's entries by key, each checked: known, given once, value or block as it needs."""
    where = block.where or f"in {block.key} block"
    found: dict[str, _Entry] = {}
    for entry in block.children:
        if entry.key not in schema:
            known = sorted(schema)
            _fail(
                entry.line,
                entry.key_col,
                f"unknown key {_q(entry.key)} {where}",
                entry.key,
                "one of " + ", ".join(known),
                hint=_did_you_mean(entry.key, known),
            )
        if entry.key in found:
            _fail(
                entry.line,
                entry.key_col,
                f"duplicate key {entry.key!r} {where}",
                entry.key,
                "each key at most once",
                advice=f"it was already given at line {found[entry.key].line}",
            )
        _check_shape(entry, schema[entry.key])
        found[entry.key] = entry
    return found


def _check_shape(entry: _Entry, takes_block: bool) -> None:
    key = entry.key
    if takes_block:
        if entry.value is not None:
            expected = (
                f"'{key}' alone on its line, with its entries below it indented two more spaces"
                if entry.literal
                else f"a [{key}] table"
            )
            _fail(*entry.at(), f"{key!r} takes a block, not a value", _text(entry.value), expected)
        return
    if entry.block:
        expected = f"'{key} VALUE' on one line" if entry.literal else f"{key} = VALUE"
        _fail(
            entry.block_line, entry.block_col, f"{key!r} takes a value, not a block", key, expected
        )
    if entry.value is None:
        _fail(entry.line, entry.key_col, f"{key!r} needs a value", key, _expect(key))


def _expect(key: str) -> str:
    if key in _DURATION_KEYS:
        more = "more than 0" if key in _POSITIVE_DURATIONS else "0 or more"
        return f"{DURATION_EXAMPLES} ({more})"
    return _EXPECT.get(key, "a value (write '' for an empty one)")


def _text(value: Any) -> str:
    return value if isinstance(value, str) else repr(value)


def _kind(value: Any) -> str:
    """How a message names the type of a TOML value."""
    names = {bool: "a boolean", int: "an integer", float: "a float", str: "a string"}
    names |= {list: "an array", dict: "a table"}
    return names.get(type(value), f"a {type(value).__name__}")


def _wrong_type(entry: _Entry, expected: str) -> NoReturn:
    _fail(*entry.at(), f"{entry.key!r} is {_kind(entry.value)}", _text(entry.value), expected)


def _string(entry: _Entry) -> str:
    if not isinstance(entry.value, str):
        _wrong_type(entry, f"a string: {_expect(entry.key)}")
    _check_length(entry, entry.value)
    return entry.value


def _check_length(entry: _Entry, value: str) -> None:
    if len(value) > MAX_VALUE_CHARS:
        _fail(*entry.at(), f"{entry.key} value is {len(value)} characters long", value[:60],
              f"at most {MAX_VALUE_CHARS} characters")


def _bad_value(entry: _Entry, text: str, offset: int | None = None, why: str = "") -> NoReturn:
    problem = f"bad {entry.key} {_q(text)}" + (f" ({why})" if why else "")
    _fail(*entry.at(offset), problem, text, _expect(entry.key))


def _app_name(app: _Entry) -> str:
    if app.value is None:
        _fail(app.line, app.key_col, "'app' needs a name", "app", _EXPECT["app"])
    name = _string(app)
    if not _NAME.fullmatch(name):
        _fail(*app.at(), f"bad app name {_q(name)}", name, _EXPECT["app"])
    return name


def _choice(entry: _Entry, choices: tuple[str, ...]) -> str:
    value = _string(entry)
    if value not in choices:
        problem = f"bad {entry.key} {_q(value)}"
        _fail(*entry.at(), problem, value, _expect(entry.key), hint=_did_you_mean(value, choices))
    return value


def _int(entry: _Entry, low: int, high: int) -> int:
    """A whole number from text or a TOML integer (never a boolean, although bool is an int)."""
    value = entry.value
    if isinstance(value, bool) or not isinstance(value, int | str):
        _wrong_type(entry, _expect(entry.key))
    if isinstance(value, int):
        number = value
    elif _DIGITS.fullmatch(value):
        number = int(value) if len(value) <= 18 else high + 1
    else:
        _bad_value(entry, value)
    if not low <= number <= high:
        _bad_value(entry, _text(value), why="out of range")
    return number


def _port(entry: _Entry) -> int | str:
    if entry.value == "auto":
        return "auto"
    return _int(entry, 1, 65535)


def _ram(entry: _Entry) -> int:
    text = _string(entry)
    match = _RAM.fullmatch(text)
    if not match or not (match[2] or match[3] == "B"):
        why = "no unit" if _DIGITS.fullmatch(text) else ""
        _bad_value(entry, text, why=why)
    digits = match[1].lstrip("0") or "0"
    size = int(digits) * RAM_UNITS[match[2] or "B"] if len(digits) <= 18 else MAX_RAM_BYTES + 1
    if size == 0:
        _bad_value(entry, text, why="must be more than 0")
    if size > MAX_RAM_BYTES:
        _bad_value(entry, text, why="more than 1024T")
    return size


def _cpu(entry: _Entry) -> float:
    value = entry.value
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        _wrong_type(entry, _expect(entry.key))
    if isinstance(value, str):
        if not _DECIMAL.fullmatch(value):
            _bad_value(entry, value)
        number: float = float(value)
    else:
        number = value
    if not 0 < number <= MAX_CPU:  # also refuses TOML's nan
        _bad_value(entry, _text(value), why="out of range")
    return float(number)


def _duration(entry: _Entry) -> int:
    text = _string(entry)
    try:
        ms = parse_duration_ms(text)
    except DurationError as exc:
        why = f" ({exc.reason})" if exc.reason else ""
        _fail(*entry.at(), f"bad duration {_q(text)}{why}", text, _expect(entry.key))
    if ms == 0 and entry.key in _POSITIVE_DURATIONS:
        _bad_value(entry, text, why="must be more than 0")
    return ms


def _yes_no(entry: _Entry) -> bool:
    if isinstance(entry.value, bool):
        return entry.value
    return _choice(entry, ("yes", "no")) == "yes"


def shell_words(text: str) -> list[str]:
    """The words of *text* exactly as ``shlex.split`` gives them, in time linear in its
    length (shlex builds each word a character at a time: quadratic on long words).

    Raises ValueError for an unclosed quote or a trailing lone backslash.
    """
    words: list[str] = []
    pos = _SHELL_SPACE.match(text).end()  # type: ignore[union-attr]
    end = len(text)
    while pos < end:
        pieces: list[str] = []
        while pos < end and text[pos] not in " \t\r\n":
            match = _SHELL_PIECE.match(text, pos)
            if match is None:
                raise ValueError("No closing quotation" if text[pos] in "'\""
                                 else "No escaped character")
            single, double, escaped = match.groups()
            if single is not None:
                pieces.append(single)
            elif double is not None:
                pieces.append(_DQ_ESCAPE.sub(r"\1", double) if "\\" in double else double)
            elif escaped is not None:
                pieces.append(escaped)
            else:
                pieces.append(match[0])
            pos = match.end()
        words.append("".join(pieces))
        pos = _SHELL_SPACE.match(text, pos).end()  # type: ignore[union-attr]
    return words


def _words(entry: _Entry, text: str) -> list[str]:
    """Shell words, with an unclosed quote or a trailing backslash reported where it is."""
    try:
        return shell_words(text)
    except ValueError:
        opened = _scan(text)[2]
        if opened is None:
            _bad_value(entry, text, len(text) - 1, why="it ends with a lone backslash")
        _bad_value(entry, text, opened, why=f"the quote at {text[opened]!r} is never closed")


def _path(entry: _Entry) -> str:
    """exec, workdir and env values: the text as written or, when it starts with a quote, one
    shell word (so it may hold ' #', outer spaces, or be empty)."""
    text = _string(entry)
    if entry.literal and text[:1] in ("'", '"'):
        words = _words(entry, text)
        if len(words) != 1:
            _bad_value(entry, text, why="more than one word: quote the whole value")
        text = words[0]
    if not text and entry.key in ("exec", "workdir"):
        _bad_value(entry, text, why="empty")
    return text


def _args(entry: _Entry, *, has_port: bool) -> tuple[str, ...]:
    value = entry.value
    if isinstance(value, list):
        for item in value:
            if not isinstance(item, str):
                _fail(
                    *entry.at(), f"'args' holds {_kind(item)}", _text(item), "an array of strings"
                )
            _check_length(entry, item)
        words = value
    else:
        words = _words(entry, _string(entry))
    source = value if isinstance(value, str) else ""
    for word in words:
        for match in _PLACEHOLDER.finditer(word):
            found = source.find(match[0])
            offset = found if found >= 0 else None
            if match[1] not in PLACEHOLDERS:
                _fail(
                    *entry.at(offset),
                    f"unknown placeholder {match[0]!r} in args",
                    match[0],
                    "{port} or {host}",
                    advice="expected {port} or {host} (other braces are kept as written)",
                )
            if match[1] == "port" and not has_port:
                _fail(
                    *entry.at(offset),
                    "'{port}' in args but the app has no 'port'",
                    match[0],
                    "a 'port N' or 'port auto' key",
                )
    return tuple(words)


def _env(block: _Entry, *, has_port: bool) -> tuple[tuple[str, str], ...]:
    env: dict[str, str] = {}
    lines: dict[str, int] = {}
    for entry in block.children:
        key = entry.key
        if not _ENV_KEY.fullmatch(key):
            _fail(
                entry.line,
                entry.key_col,
                f"bad env key {_q(key)}",
                key,
                "a name of letters, digits and '_', not starting with a digit",
            )
        if key in lines:
            _fail(
                entry.line,
                entry.key_col,
                f"duplicate env key {key!r}",
                key,
                "each key at most once",
                advice=f"it was already given at line {lines[key]}",
            )
        if has_port and key in ("PORT", "HOST"):
            _fail(
                entry.line,
                entry.key_col,
                f"env {key!r} clashes with 'port'",
                key,
                "no PORT or HOST in env when 'port' is given",
                advice="skr8tr sets PORT and HOST for the process itself: remove it",
            )
        _check_shape(entry, False)
        env[key] = _path(entry)
        lines[key] = entry.line
    return tuple(sorted(env.items()))


def _health(block: _Entry) -> HealthCheck:
    keys = _keys(block, _HEALTH_KEYS)
    if "check" not in keys:
        _fail(
            block.line,
            block.key_col,
            "health block has no 'check'",
            "health",
            f"a 'check' line: {_EXPECT['check']}",
        )
    path, status = _check(keys["check"])
    fields = {"path": path, "expect_status": status}
    if "interval" in keys:
        fields["interval_ms"] = _duration(keys["interval"])
    if "timeout" in keys:
        fields["timeout_ms"] = _duration(keys["timeout"])
    if "retries" in keys:
        fields["retries"] = _int(keys["retries"], 1, MAX_RETRIES)
    return HealthCheck(**fields)


def _check(entry: _Entry) -> tuple[str, int]:
    text = _string(entry)
    words = [(match[0], match.start()) for match in _WORD.finditer(text)]
    if not 2 <= len(words) <= 3:
        _bad_value(entry, text)
    method, at = words[0]
    if method != "GET":
        _fail(*entry.at(at), f"unsupported method {_q(method)} in check", method, "GET")
    path, at = words[1]
    if not path.startswith("/") or any(char.isspace() for char in path):
        _fail(
            *entry.at(at),
            f"bad health path {_q(path)}",
            path,
            "a path that starts with '/' and has no spaces, like /healthz",
        )
    if len(words) == 2:
        return path, 200
    code, at = words[2]
    if not (len(code) == 3 and code.isascii() and code.isdigit() and 100 <= int(code) <= 599):
        _fail(
            *entry.at(at),
            f"bad status code {_q(code)} in check",
            code,
            "an HTTP status code 100..599",
        )
    return path, int(code)


def _rollout(block: _Entry) -> RolloutPolicy:
    keys = _keys(block, _ROLLOUT_KEYS)
    fields: dict[str, Any] = {}
    for key, name in (
        ("settle", "settle_ms"),
        ("ready-timeout", "ready_timeout_ms"),
        ("drain", "drain_ms"),
    ):
        if key in keys:
            fields[name] = _duration(keys[key])
    if "surge" in keys:
        fields["surge"] = _int(keys["surge"], 1, MAX_SURGE)
    if "auto-rollback" in keys:
        fields["auto_rollback"] = _yes_no(keys["auto-rollback"])
    if "order" in keys:
        fields["order"] = _choice(keys["order"], ORDERS)
    return RolloutPolicy(**fields)


# --- Formatting ---------------------------------------------------------------------------


def _to_dict(m: Manifest, *, full: bool) -> dict[str, Any]:
    """Keys as the manifest language spells them, in canonical order; with full=False only
    those that differ from their default (the health block is always complete)."""
    health = m.health
    rollout = m.rollout
    fields: dict[str, Any] = {
        "app": m.app,
        "type": m.type,
        "exec": m.exec,
        "args": list(m.args),
        "workdir": m.workdir,
        "port": m.port,
        "replicas": m.replicas,
        "ram": None if m.ram_bytes is None else _format_ram(m.ram_bytes),
        "cpu": m.cpu,
        "stop-grace": format_duration_ms(m.stop_grace_ms),
        "restart": m.restart,
        "env": dict(m.env),
        "health": None
        if health is None
        else {
            "check": f"{health.method} {health.path} {health.expect_status}",
            "interval": format_duration_ms(health.interval_ms),
            "timeout": format_duration_ms(health.timeout_ms),
            "retries": health.retries,
        },
        "rollout": {
            "settle": format_duration_ms(rollout.settle_ms),
            "surge": rollout.surge,
            "ready-timeout": format_duration_ms(rollout.ready_timeout_ms),
            "drain": format_duration_ms(rollout.drain_ms),
            "auto-rollback": rollout.auto_rollback,
            "order": rollout.order,
        },
    }
    if full:
        return fields
    # The same dict for a manifest with every default says what to leave out.
    defaults = _to_dict(Manifest(m.app, m.exec, m.base_dir), full=True)
    defaults["restart"] = _default_restart(m.type)
    fields["rollout"] = {
        key: value for key, value in fields["rollout"].items() if value != defaults["rollout"][key]
    }
    defaults["rollout"] = {}
    return {
        key: value
        for key, value in fields.items()
        if key in ("app", "exec") or value != defaults[key]
    }


def _format_ram(size: int) -> str:
    for unit, factor in RAM_UNITS.items():
        if size % factor == 0:
            return f"{size // factor}{unit}"
    raise AssertionError("unreachable: the B unit divides everything")


def _format_cpu(cpu: float) -> str:
    text = format(Decimal(repr(cpu)), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def _render(value: Any, *, literal: bool) -> str:
    """A value as .skr8tr text that reads back as the same value."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return _format_cpu(value)
    if isinstance(value, list):
        return " ".join(_quote_word(word) for word in value)
    if isinstance(value, str) and literal and _needs_quotes(value):
        return shlex.quote(value)
    return str(value)


def _quote_word(word: str) -> str:
    if word != "{" and _SAFE_WORD.fullmatch(word):
        return word
    return shlex.quote(word)


def _needs_quotes(value: str) -> bool:
    """Would `value`, written as is after a key, read back as something else?"""
    if not value or value[0] in "'\"" or value != value.strip(" \t"):
        return True
    line = "k " + value
    end, bare, _ = _scan(line)
    return end != len(line) or _opens_brace(line, bare)
