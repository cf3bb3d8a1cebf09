"""The audit log's head file ``FILE.head``: read by ``audit verify``, written by the conductor.

It holds one line, ``ENTRIES HASH`` (:func:`skr8tr.core.audit_chain.head_line`),
the head of the chain after the last entry the conductor wrote. Comparing the
log with it shows lines cut off the end, which the chain alone cannot.

Here, outside both the CLI and the conductor, so that the CLI never imports
the conductor package; the parsing itself is pure and lives in
:mod:`skr8tr.core.audit_chain`.
"""

from __future__ import annotations

from collections.abc import Callable

from skr8tr.atomic import write_atomically
from skr8tr.bounded_files import FileRefused, read_regular
from skr8tr.core import audit_chain

__all__ = ["head_path", "read_head_file", "write_head_file", "verify_stream"]

MAX_HEAD_FILE_CHARS = 200  # "ENTRIES HASH\n" is under 90
# An entry is a few KiB at most (its arguments are cut: conductor/audit.py MAX_SHOWN_*);
# a longer line is not one the conductor wrote, and is refused before it is held whole.
MAX_LINE_BYTES = 1024 * 1024
READ_CHUNK_BYTES = 1024 * 1024


def verify_stream(read: Callable[[int], bytes], *, expect_head: str | None = None,
                  recorded: audit_chain.Head | None = None) -> audit_chain.Verified:
    """:func:`skr8tr.core.audit_chain.verify` of the log that *read* (``read(n)``: at
    most n more bytes, b"" at the end) yields, a chunk at a time: a log of any size
    costs the time to read it and memory for one chunk and one line. Raises ChainError,
    also for a line over :data:`MAX_LINE_BYTES`; OSError from *read*."""
    verifier = audit_chain.Verifier(expect_head=expect_head, recorded=recorded)
    pending = b""
    while True:
        chunk = read(READ_CHUNK_BYTES)
        if not chunk:
            break
        pending += chunk
        start = 0
        while (end := pending.find(b"\n", start)) >= 0:
            verifier.line(pending[start:end + 1])
            start = end + 1
        pending = pending[start:]
        if len(pending) > MAX_LINE_BYTES:
            raise audit_chain.ChainError(verifier.head.entries + 1, f"a line over "
                                         f"{MAX_LINE_BYTES} bytes: not an audit log entry")
    if pending:
        verifier.line(pending)  # a torn last line: the verifier says so
    return verifier.finish()


def head_path(path: str) -> str:
    """The head file kept next to the audit log at *path*."""
    return path + ".head"


def read_head_file(path: str) -> audit_chain.Head | None:
    """The head recorded next to the log at *path*, or None when there is no ``.head`` file.

    Raises ValueError, naming the head file, when it is there but cannot be
    read or is not ``ENTRIES HASH``.
    """
    try:
        text = read_regular(head_path(path), MAX_HEAD_FILE_CHARS).decode("ascii")
    except FileNotFoundError:
        return None
    except FileRefused as exc:  # a FIFO would hang, a device be read to the bound
        raise ValueError(f"{exc}: not a head file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read {head_path(path)}: {exc}") from None
    try:
        return audit_chain.parse_head(text)
    except ValueError as exc:
        raise ValueError(f"{head_path(path)}: {exc}") from None


def write_head_file(path: str, head: audit_chain.Head) -> None:
    """Replace the head file of the log at *path* atomically (mode 0600). Raises OSError."""
    write_atomically(head_path(path), audit_chain.head_line(head))
