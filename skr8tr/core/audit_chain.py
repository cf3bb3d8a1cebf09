"""The audit log's hash chain: one JSON object per line, each bound to the one before.

Every line is a JSON object with the entry's own fields plus ``seq`` (1, 2,
...), ``prev`` (the ``hash`` of the line before; 64 zeros for the first) and
``hash``: the SHA-256 of the canonical JSON of every other field of the line
(sorted keys, no spaces, ASCII). Changing, inserting, removing or reordering
a line breaks the chain at that line, and :func:`verify` names it.

What a chain cannot show on its own: that lines were cut off the *end*, or
that the whole file was rewritten with a fresh chain (there is no secret in
it). Both are caught only against a head remembered outside the file: the
``HEAD`` file next to it (:func:`head_line`), the head printed by ``skr8tr
audit verify`` and given back as ``--expect-head``, or a copy shipped off the
machine. See SECURITY.md.

Pure: no file I/O, no clock.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

__all__ = ["GENESIS", "ChainError", "Head", "Verified", "Verifier", "seal", "verify",
           "head_line", "parse_head"]

GENESIS = "0" * 64
_HASH_RE = re.compile(r"[0-9a-f]{64}")
RESERVED = ("seq", "prev", "hash")


class ChainError(Exception):
    """The log is not intact. ``line`` is the first bad line (1-based)."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(f"line {line}: {message}")
        self.line = line
        self.message = message


@dataclass(frozen=True)
class Head:
    """Where a chain ends: how many entries, and the last one's hash."""

    entries: int
    hash: str


@dataclass(frozen=True)
class Verified:
    """An intact chain: its head, and the line of the expected head (if one was given)."""

    head: Head
    expected_at: int | None = None


def _canonical(fields: dict[str, Any]) -> bytes:
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode("ascii")


def seal(entry: dict[str, Any], head: Head) -> tuple[str, Head]:
    """The line (with its newline) that appends *entry* after *head*, and the new head.

    Raises ValueError if *entry* uses a reserved field name or cannot be JSON.
    """
    clash = [k for k in RESERVED if k in entry]
    if clash:
        raise ValueError(f"audit entries may not set {clash}")
    fields = {**entry, "seq": head.entries + 1, "prev": head.hash}
    digest = hashlib.sha256(_canonical(fields)).hexdigest()
    line = _canonical({**fields, "hash": digest}).decode("ascii") + "\n"
    return line, Head(head.entries + 1, digest)


def verify(data: bytes, *, expect_head: str | None = None,
           recorded: Head | None = None) -> Verified:
    """Check every line of *data* (a whole log file); return its head.

    Raises ChainError naming the first line that is not what the chain
    promises: not one JSON object, a missing or wrong ``seq``/``prev``/``hash``,
    or a last line without its newline (a torn write). With *expect_head*
    (a head printed earlier), that hash must be in the chain: later entries
    are fine (the log grew), its absence means lines were cut off the end or
    the log was rewritten. With *recorded* (the ``HEAD``
    file), its entry must be in the chain, and at most one entry may follow
    it (the conductor writes the log line, then the ``HEAD`` file: a crash
    between the two leaves one). A log too big to hold in memory is checked
    line by line with :class:`Verifier` instead, with the same result.
    """
    verifier = Verifier(expect_head=expect_head, recorded=recorded)
    if data:
        lines = data.split(b"\n")
        for raw in lines[:-1]:
            verifier.line(raw + b"\n")
        if lines[-1] != b"":
            verifier.line(lines[-1])
    return verifier.finish()


class Verifier:
    """:func:`verify`, a line at a time: feed each line as read (with its newline; the
    last one of a torn write without), then :meth:`finish`. Holds one line at a time,
    so a log of any size costs only the time to read it."""

    def __init__(self, *, expect_head: str | None = None,
                 recorded: Head | None = None) -> None:
        self.head = Head(0, GENESIS)
        self.expect_head = expect_head
        self.recorded = recorded
        self._expect_seen: int | None = None
        self._recorded_ok = recorded is None or recorded.entries == 0 and recorded.hash == GENESIS

    def line(self, raw: bytes) -> None:
        """Check the next line; ChainError if it breaks the chain."""
        number = self.head.entries + 1
        if not raw.endswith(b"\n"):
            raise ChainError(number, "the last line is incomplete (no newline): a torn "
                             "write or an edit")
        self.head = _check_line(number, raw[:-1], self.head)
        if self.head.hash == self.expect_head:
            self._expect_seen = number
        recorded = self.recorded
        if recorded is not None and number == recorded.entries:
            if self.head.hash != recorded.hash:
                raise ChainError(number, "this line's hash is not the one the HEAD file "
                                 "recorded for it: the log was rewritten")
            self._recorded_ok = True

    def finish(self) -> Verified:
        """The head of the whole chain; ChainError if the end is not what the HEAD file
        or the expected head promise."""
        head, recorded, expect_head = self.head, self.recorded, self.expect_head
        if recorded is not None:
            if not self._recorded_ok:
                raise ChainError(head.entries + 1, f"the HEAD file records {recorded.entries} "
                                 f"entries but the log has {head.entries}: lines were cut off "
                                 "the end")
            if head.entries > recorded.entries + 1:
                raise ChainError(recorded.entries + 2, f"{head.entries - recorded.entries} "
                                 "entries follow the head the HEAD file records (at most one "
                                 "may, after a crash): the HEAD file is stale or was replaced")
        if expect_head is not None and self._expect_seen is None:
            raise ChainError(head.entries + 1, f"the expected head {expect_head[:16]}... is "
                             f"not in the chain (which ends at {head.hash[:16]}..., line "
                             f"{head.entries}): lines were cut off the end, or the log was "
                             "rewritten")
        return Verified(head, self._expect_seen)


def _check_line(number: int, raw: bytes, head: Head) -> Head:
    try:
        fields = json.loads(raw)
    except (ValueError, RecursionError):
        raise ChainError(number, "not a JSON line") from None
    if not isinstance(fields, dict):
        raise ChainError(number, "not a JSON object")
    digest, prev, seq = fields.get("hash"), fields.get("prev"), fields.get("seq")
    if not (isinstance(digest, str) and _HASH_RE.fullmatch(digest)):
        raise ChainError(number, "no valid 'hash' field")
    if seq != head.entries + 1 or isinstance(seq, bool):
        raise ChainError(number, f"seq is {seq!r}, expected {head.entries + 1} "
                         "(a line was removed, inserted or moved)")
    if prev != head.hash:
        raise ChainError(number, "'prev' does not match the hash of the line before "
                         "(a line was removed, inserted or edited)")
    body = {k: v for k, v in fields.items() if k != "hash"}
    try:
        canonical = _canonical(fields) == raw
        expected = hashlib.sha256(_canonical(body)).hexdigest()
    except ValueError:
        canonical = False
    if not canonical:
        raise ChainError(number, "the line is not in the form the conductor writes (sorted "
                         "keys, no spaces, ASCII): it was edited")
    if expected != digest:
        raise ChainError(number, "the line was edited: its hash does not match its content")
    return Head(head.entries + 1, digest)


def head_line(head: Head) -> str:
    """The content of the ``HEAD`` file kept next to a log: ``ENTRIES HASH\\n``."""
    return f"{head.entries} {head.hash}\n"


def parse_head(text: str) -> Head:
    """Read a ``HEAD`` file's content; ValueError if it is not ``ENTRIES HASH``."""
    words = text.split()
    if (len(words) != 2 or not words[0].isdigit() or _HASH_RE.fullmatch(words[1]) is None):
        raise ValueError("expected one line `ENTRIES HASH` (a count and 64 hex characters)")
    return Head(int(words[0]), words[1])
