"""The audit log's head file ``FILE.head``: read by ``audit verify``, written by the conductor.

It holds one line, ``ENTRIES HASH`` (:func:`skr8tr.core.audit_chain.head_line`),
the head of the chain after the last entry the conductor wrote. Comparing the
log with it shows lines cut off the end, which the chain alone cannot.

Here, outside both the CLI and the conductor, so that the CLI never imports
the conductor package; the parsing itself is pure and lives in
:mod:`skr8tr.core.audit_chain`.
"""

from __future__ import annotations

from skr8tr.atomic import write_atomically
from skr8tr.core import audit_chain

__all__ = ["head_path", "read_head_file", "write_head_file"]

MAX_HEAD_FILE_CHARS = 200  # "ENTRIES HASH\n" is under 90


def head_path(path: str) -> str:
    """The head file kept next to the audit log at *path*."""
    return path + ".head"


def read_head_file(path: str) -> audit_chain.Head | None:
    """The head recorded next to the log at *path*, or None when there is no ``.head`` file.

    Raises ValueError, naming the head file, when it is there but cannot be
    read or is not ``ENTRIES HASH``.
    """
    try:
        with open(head_path(path), encoding="ascii") as f:
            text = f.read(MAX_HEAD_FILE_CHARS)
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read {head_path(path)}: {exc}") from None
    try:
        return audit_chain.parse_head(text)
    except ValueError as exc:
        raise ValueError(f"{head_path(path)}: {exc}") from None


def write_head_file(path: str, head: audit_chain.Head) -> None:
    """Replace the head file of the log at *path* atomically (mode 0600). Raises OSError."""
    write_atomically(head_path(path), audit_chain.head_line(head))
