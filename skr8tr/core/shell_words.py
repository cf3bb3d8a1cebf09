"""Shell-style words (``--name 'my app' "x y"``) split exactly as ``shlex.split`` does,
in time linear in the text's length: a manifest's ``args`` and quoted values.

Pure: no I/O.
"""

from __future__ import annotations

import re

__all__ = ["shell_words"]

# One piece of a shell word (POSIX rules, as shlex.split): a bare run, a '...' string, a
# "..." string (backslash escapes only " and itself there), or a backslash and what it escapes.
_SHELL_PIECE = re.compile(r"""[^ \t\r\n'"\\]+|'([^']*)'|"((?:[^"\\]|\\.)*)"|\\(.)""", re.S)
_SHELL_SPACE = re.compile(r"[ \t\r\n]*")
_DQ_ESCAPE = re.compile(r'\\([\\"])')


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
