"""``--audit-log FILE``: every signed command, appended as a chained JSON line and fsynced.

One line per request for a command that needs an admin signature (``up``,
``down``, ``scale``, ``rollout``, ``rollout-abort``, ``rollout-undo`` and
``logs``), accepted or refused::

    {"args":{...},"cmd":"up","hash":"...","key":"sha256:...","peer":"127.0.0.1",
     "prev":"...","result":{"ok":true,"app":"web","generation":1},"seq":7,
     "time":1767225600.123,"utc":"2026-01-01T00:00:00.123Z","verified":true}

``key`` is the fingerprint of the key the request carries; ``verified`` says
whether its signature was checked and good. Arguments are recorded without
secrets: a manifest becomes its SHA-256 (the one ``rollout history`` shows),
its size, its app name and the *names* of its environment variables, never
their values. The chain (:mod:`skr8tr.core.audit_chain`) is checked with
``skr8tr audit verify FILE``.

Next to the log, ``FILE.head`` holds the current head (``ENTRIES HASH``,
:mod:`skr8tr.audit_head`), replaced atomically after each line, so that cutting lines off the end is
noticed by ``audit verify`` and by the conductor's next start. On start the
conductor verifies the whole log and refuses to start (exit 2) if it is not
intact: a broken log is moved aside by a person, never repaired by us.

Writes are small synchronous appends plus ``fsync`` on the Trio thread, like
the state file: only signed commands pay for them. A failed write is logged
at ERROR and counted; the command itself has already run.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
from typing import Any

from skr8tr.audit_head import head_path, read_head_file, write_head_file
from skr8tr.core import audit_chain, manifest

log = logging.getLogger("skr8tr.conductor")

MAX_SHOWN_CHARS = 256
MAX_SHOWN_ARGS = 16  # arguments recorded per request (a command has at most 4)


class AuditError(Exception):
    """The audit log cannot be opened or is not intact; one line for the operator."""


class AuditLog:
    """An open, verified audit log. Create with :meth:`open`."""

    def __init__(self, path: str, fd: int, head: audit_chain.Head) -> None:
        self.path = path
        self.head = head
        self.write_errors = 0
        self._fd = fd

    @classmethod
    def open(cls, path: str, *, quiet: bool = False) -> AuditLog:
        """Open (create, mode 0600) and verify *path* against its ``.head`` file.

        Raises AuditError when the folder cannot be made, the file cannot be
        read or written, or the chain is broken.
        """
        path = os.path.abspath(path)
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise AuditError(f"cannot open --audit-log {path}: {exc.strerror or exc}") from None
        try:
            data = _read_all(fd)
            recorded = read_head_file(path)
            head = audit_chain.verify(data, recorded=recorded).head
        except audit_chain.ChainError as exc:
            os.close(fd)
            raise AuditError(f"--audit-log {path}:{exc.line}: {exc.message}; check it with "
                             "`skr8tr audit verify`, keep it as evidence and start a new "
                             "log under another name") from None
        except (OSError, ValueError) as exc:
            os.close(fd)
            raise AuditError(f"--audit-log {path}: {exc}") from None
        if not quiet:
            log.info("audit log %s: %d entries, head %s", path, head.entries, head.hash)
        return cls(path, fd, head)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def append(self, entry: dict[str, Any], now: float) -> str | None:
        """Seal *entry* (plus ``time``/``utc``) into the chain, write and fsync it,
        then update the ``.head`` file; return the new head hash (None if the write failed)."""
        stamp = datetime.datetime.fromtimestamp(now, tz=datetime.UTC)
        entry = {"time": round(now, 3),
                 "utc": stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                 **entry}
        try:
            line, head = audit_chain.seal(entry, self.head)
            data = line.encode("ascii")
            written = os.write(self._fd, data)
            if written != len(data):
                raise OSError(f"short write ({written} of {len(data)} bytes)")
            os.fsync(self._fd)
        except (OSError, ValueError) as exc:
            self.write_errors += 1
            log.error("audit log %s: cannot append an entry for %s: %s", self.path,
                      entry.get("cmd"), exc)
            return None
        self.head = head
        try:
            write_head_file(self.path, head)
        except OSError as exc:
            self.write_errors += 1
            log.error("audit log %s: cannot update %s: %s", self.path, head_path(self.path),
                      exc)
        return head.hash


def _read_all(fd: int) -> bytes:
    chunks = []
    offset = 0
    while True:
        chunk = os.pread(fd, 1 << 20, offset)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        offset += len(chunk)


# --------------------------------------------------------------------------- redaction


def redact_args(cmd: str, args: Any, parsed: manifest.Manifest | None = None) -> Any:
    """The arguments of a request as the audit log keeps them: no manifest text, no env values.

    A manifest becomes ``manifest_sha256`` / ``manifest_bytes``, plus ``app`` and
    ``env_keys`` when the caller passes it *parsed* (an accepted command's). The
    text itself is never parsed here: a refused request's arguments are an
    attacker's, and parsing them would let the refusal cost what the parse costs.
    Any other string is cut to MAX_SHOWN_CHARS.
    """
    if not isinstance(args, dict):
        return {"unreadable": _short(repr(args)[:4 * MAX_SHOWN_CHARS])}
    shown: dict[str, Any] = {}
    for name, value in list(args.items())[:MAX_SHOWN_ARGS]:
        if name == "manifest":
            shown.update(_manifest_summary(value, parsed))
        elif isinstance(value, str):
            shown[str(name)[:MAX_SHOWN_CHARS]] = _short(value)
        elif value is None or isinstance(value, bool | int | float):
            shown[str(name)[:MAX_SHOWN_CHARS]] = value
        else:
            shown[str(name)[:MAX_SHOWN_CHARS]] = "(not shown: not a string or number)"
    return shown


def _manifest_summary(text: Any, parsed: manifest.Manifest | None) -> dict[str, Any]:
    if not isinstance(text, str):
        return {"manifest": "(not text)"}
    raw = text.encode("utf-8", "surrogatepass")
    summary: dict[str, Any] = {"manifest_sha256": hashlib.sha256(raw).hexdigest(),
                               "manifest_bytes": len(raw)}
    if parsed is not None:
        summary["app"] = parsed.app
        summary["env_keys"] = [k for k, _ in parsed.env]
    return summary


def result_summary(cmd: str, result: Any) -> dict[str, Any]:
    """What an accepted command did, in a few fields (no replica listings, no log lines)."""
    out: dict[str, Any] = {"ok": True}
    if not isinstance(result, dict):
        return out
    for name in ("app", "generation", "stopped", "state", "from_generation", "to_generation"):
        if name in result:
            out[name] = result[name]
    if cmd == "logs" and isinstance(result.get("lines"), list):
        out["lines"] = len(result["lines"])
    if isinstance(result.get("replicas"), list):
        out["replicas"] = len(result["replicas"])
    return out


def _short(text: str) -> str:
    return text if len(text) <= MAX_SHOWN_CHARS else text[:MAX_SHOWN_CHARS] + "..."
