"""The ``.skr8tr`` language: lines, two-space indentation or braces, shell-style quoting.

Reads a manifest's text into the tree of :mod:`skr8tr.core.manifest_tree`
(one ``app`` entry, its keys nested by indentation or ``{ ... }`` blocks,
``#`` comments dropped) without judging any value: that is the validator's
job, the same for both formats. Also the quoting scan the formatter uses to
check that a value reads back as itself.

Internal to :mod:`skr8tr.core.manifest`. Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

from skr8tr.core.manifest_model import MAX_LINE_CHARS
from skr8tr.core.manifest_tree import WORD, Collector, Entry, fail, quote

# --- The .skr8tr language -------------------------------------------------------------------


@dataclass(eq=False)
class _Block:
    children: list[Entry]
    indent: int | None  # None until the first line inside a brace block fixes it
    brace: tuple[int, int] | None = None  # line and column of the '{' that opened it


def read_skr8tr(text: str) -> Entry:
    """Read the lines into entries nested by indentation or braces; return the one app entry."""
    root = _Block([], 0)
    stack = [root]
    checks = Collector()  # a line in error is reported and skipped; the next ones still read
    for lineno, raw in enumerate(text.split("\n"), start=1):
        checks.run(_read_line, stack, lineno, raw.removesuffix("\r"))
    for block in reversed(stack):
        if block.brace:
            line, col = block.brace
            checks.run(
                fail,
                line,
                col,
                f"missing '}}' for block opened at line {line}",
                "{",
                "'}' on a line of its own",
                advice="expected '}' before the end of the file",
            )
    if checks.problems and not root.children:
        checks.raise_any()  # "no app" would only repeat that its line was wrong
    app = checks.run(_the_app, root.children)
    checks.raise_any()
    return app


def _read_line(stack: list[_Block], lineno: int, line: str) -> None:
    """Add one line's entry to the block it belongs to (opening or closing blocks)."""
    if len(line) > MAX_LINE_CHARS:
        fail(
            lineno,
            MAX_LINE_CHARS + 1,
            f"line is {len(line)} characters long",
            line[:60],
            f"lines of at most {MAX_LINE_CHARS} characters",
        )
    end, bare, _ = scan_line(line)
    content = line[:end].rstrip(" \t")
    body = content.lstrip(" \t")
    if not body:
        return
    indent = len(content) - len(body)
    if "\t" in content[:indent]:
        fail(
            lineno,
            content.index("\t") + 1,
            "tab in indentation",
            "\t",
            "spaces",
            advice="use two spaces per level",
        )
    if body == "}":
        _close_brace(stack, lineno, indent + 1)
        return
    block = _block_for(stack, indent, lineno)
    entry = _line_entry(body, bare[indent:], lineno, indent + 1)
    block.children.append(entry)
    if entry.block:
        stack.append(_Block(entry.children, None, (entry.block_line, entry.block_col)))


def scan_line(line: str) -> tuple[int, list[bool], int | None]:
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


def opens_brace(body: str, bare: list[bool]) -> bool:
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
    fail(
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
            fail(
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
        fail(
            lineno,
            indent + 1,
            f"bad indentation ({indent} spaces)",
            " " * indent,
            f"{expected} spaces",
        )


def _line_entry(body: str, bare: list[bool], lineno: int, col: int) -> Entry:
    key = WORD.match(body)[0]
    if key == "{":
        fail(
            lineno,
            col,
            "'{' on a line of its own",
            "{",
            "'{' at the end of a header line",
            advice="put '{' at the end of the line that names the block, like 'env {'",
        )
    rest = body[len(key) :].lstrip(" \t")
    value_col = col + len(body) - len(rest)
    entry = Entry(key, None, lineno, col, value_col, text_col=value_col)
    if opens_brace(body, bare):
        entry.block, entry.block_line, entry.block_col = True, lineno, col + len(body) - 1
        rest = rest[:-1].rstrip(" \t")
    entry.value = rest or None
    return entry


def _the_app(top: list[Entry]) -> Entry:
    if not top:
        fail(1, 1, "no app in this manifest", "", "'app NAME'")
    first = top[0]
    if first.key != "app":
        fail(
            first.line,
            first.key_col,
            f"unexpected {quote(first.key)} at top level",
            first.key,
            "'app NAME' first",
        )
    checks = Collector()
    for entry in top[1:]:
        if entry.key == "app":
            checks.run(
                fail,
                entry.line,
                entry.key_col,
                "second 'app' in one manifest",
                entry.key,
                f"one app per file (the first is at line {first.line})",
            )
            continue
        checks.run(
            fail,
            entry.line,
            entry.key_col,
            f"unexpected {quote(entry.key)} at top level",
            entry.key,
            f"it inside the app, indented two spaces under line {first.line}",
        )
    checks.raise_any()
    return first


