"""Why a replica ended, as one short line a person reads in ``list``, ``status`` and the page.

The text is built here from what the node reported (exit code, signal, its
message). A node's message is the node's word, not the conductor's: a node
key holder could send anything up to the protocol's 4,096 characters, so the
shown reason is cut to :data:`MAX_REASON_CHARS` and stripped of control and
format characters (no terminal escapes, no line breaks, no bidi overrides in a
table). It costs one pass over at most a few thousand characters, once per
replica end.

Never the workload's own output: like
:func:`skr8tr.core.rollout_failures.describe_failure`, this text reaches every
surface anyone can read without a key.

Pure: no trio, no clock.
"""

from __future__ import annotations

import unicodedata

__all__ = ["MAX_REASON_CHARS", "clean", "reason"]

MAX_REASON_CHARS = 200
_ELLIPSIS = "…"


def clean(text: str, limit: int = MAX_REASON_CHARS) -> str:
    """*text* on one line: control, format and separator characters become one space,
    runs of white space one space, cut to *limit* characters (ending in an ellipsis)."""
    # Look at no more than needed: a cut text never needs more than this.
    text = text.lstrip()
    head = text[: limit * 4]
    out = []
    space = False
    for ch in head:
        if ch.isspace() or unicodedata.category(ch)[0] in "CZ":
            if not space and out:
                out.append(" ")
            space = True
            continue
        out.append(ch)
        space = False
    shown = "".join(out).rstrip()
    if len(shown) > limit or len(head) < len(text):
        shown = shown[: limit - 1].rstrip() + _ELLIPSIS
    return shown


def reason(*, exit_code: int | None, signal: int | None, message: str | None,
           launch_failed: bool = False) -> str:
    """Why a replica ended: the node's message when it sent one (``exited with code 1``,
    ``killed by signal 9 (SIGKILL)``, the OS error of a launch), else what the exit code
    or signal says. A launch that failed reads ``cannot start: <OS error>``."""
    said = clean(message) if message else ""
    if launch_failed:
        return clean(f"cannot start: {said or 'the node gave no reason'}")
    if said:
        return said
    if signal is not None:
        return f"killed by signal {signal}"
    if exit_code is not None:
        return f"exited with code {exit_code}"
    return "ended; the node gave no reason"
