"""``--audit-log FILE``: every signed command, appended as a chained JSON line and fsynced.

One line per request for a command that needs an admin signature (``up``,
``down``, ``scale``, ``rollout``, ``rollout-abort``, ``rollout-undo`` and
``logs``), accepted or refused::

    {"alg":"ed25519+ml-dsa-65","args":{...},"cmd":"up","hash":"...","key":"sha256:...",
     "peer":"127.0.0.1","prev":"...","result":{"ok":true,"app":"web","generation":1},
     "seq":7,"time":1767225600.123,"utc":"2026-01-01T00:00:00.123Z","verified":true}

``key`` is the fingerprint of the key the request carries and ``alg`` its
algorithm (``ed25519``, ``ml-dsa-65`` or ``ed25519+ml-dsa-65``; both null when
the request carried no well-formed key); ``verified`` says whether its
signature was checked and good. Arguments are recorded without
secrets: a manifest becomes its SHA-256 (the one ``rollout history`` shows),
its size, its app name and the *names* of its environment variables, never
their values. The chain (:mod:`skr8tr.core.audit_chain`) is checked with
``skr8tr audit verify FILE``.

Next to the log, ``FILE.head`` holds the current head (``ENTRIES HASH``,
:mod:`skr8tr.audit_head`), replaced atomically after each line, so that cutting lines off the end is
noticed by ``audit verify`` and by the conductor's next start. On start the
conductor verifies the whole log and refuses to start (exit 2) if it is not
intact: a broken log is moved aside by a person, never repaired by us.

Writes leave the event loop: :meth:`AuditLog.append` stamps an entry and queues
it; the writer task (:meth:`AuditLog.serve`) seals every queued entry into the
chain, appends them in one write, fsyncs, and replaces the ``.head`` file, in
a worker thread, then wakes who waits (:meth:`AuditLog.written`). A command's
reply waits for its entry, so no acknowledged command is missing from a log
that survived; many clients share one fsync. A failed write is logged at
ERROR and counted (its entries are lost, the chain stays intact: the head moves
only on success); the command itself has already run. Without a running writer
(tests, tools) :meth:`written` writes at once, on the caller's thread.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
from collections.abc import Callable
from typing import Any

import trio

from skr8tr.audit_head import head_path, read_head_file, verify_stream, write_head_file
from skr8tr.bounded_files import FileRefused, open_regular
from skr8tr.core import audit_chain, manifest
from skr8tr.core.signatures import fingerprint, key_algorithm

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
        self._queue: list[dict[str, Any]] = []
        self._queued = 0  # entries ever queued
        self._done = 0  # of those, written or failed
        self._serving = False
        self._wake = trio.Event()
        self._batch_done = trio.Event()

    @classmethod
    def open(cls, path: str, *, quiet: bool = False) -> AuditLog:
        """Open (create, mode 0600) and verify *path* against its ``.head`` file.

        Raises AuditError when the folder cannot be made, the file cannot be
        read or written, or the chain is broken.
        """
        path = os.path.abspath(path)
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd = open_regular(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        except FileRefused as exc:
            raise AuditError(f"--audit-log {exc}; an audit log is a regular file") from None
        except OSError as exc:
            raise AuditError(f"cannot open --audit-log {path}: {exc.strerror or exc}") from None
        try:
            recorded = read_head_file(path)
            head = verify_stream(_reader(fd), recorded=recorded).head
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
            self._write_batch()
            os.close(self._fd)
            self._fd = -1

    def append(self, entry: dict[str, Any], now: float) -> int:
        """Queue *entry* (plus ``time``/``utc``); returns its number for :meth:`written`."""
        stamp = datetime.datetime.fromtimestamp(now, tz=datetime.UTC)
        self._queue.append({
            "time": round(now, 3),
            "utc": stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            **entry})
        self._queued += 1
        self._wake.set()
        return self._queued

    async def written(self, number: int) -> None:
        """Return once entry *number* was written (or its write failed and was logged)."""
        while self._done < number:
            if self._serving:
                await self._batch_done.wait()
            else:
                self._write_batch()

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Write queued entries, a batch at a time, until cancelled; then the rest."""
        self._serving = True
        task_status.started()
        try:
            while True:
                await self._wake.wait()
                self._wake = trio.Event()
                if self._queue:
                    batch, self._queue = self._queue, []  # taken here, on the loop
                    await trio.to_thread.run_sync(self._write_entries, batch)
                    self._batch_done.set()
                    self._batch_done = trio.Event()
        finally:
            self._serving = False
            self._write_batch()  # at shutdown: nothing queued goes unwritten
            self._batch_done.set()

    def _write_batch(self) -> None:
        batch, self._queue = self._queue, []
        if batch:
            self._write_entries(batch)

    def _write_entries(self, batch: list[dict[str, Any]]) -> None:
        """Seal, append and fsync *batch*, then replace the head file (in any thread: only
        the writer touches the file and the head)."""
        head, lines = self.head, []
        try:
            for entry in batch:
                line, head = audit_chain.seal(entry, head)
                lines.append(line)
            data = "".join(lines).encode("ascii")
            written = os.write(self._fd, data)
            if written != len(data):
                raise OSError(f"short write ({written} of {len(data)} bytes)")
            os.fsync(self._fd)
        except (OSError, ValueError) as exc:
            self.write_errors += len(batch)
            log.error("audit log %s: cannot append %d entry(ies) (the first for %s): %s",
                      self.path, len(batch), batch[0].get("cmd"), exc)
        else:
            self.head = head
            try:
                write_head_file(self.path, head)
            except OSError as exc:
                self.write_errors += 1
                log.error("audit log %s: cannot update %s: %s", self.path,
                          head_path(self.path), exc)
        finally:
            self._done += len(batch)


def _reader(fd: int) -> Callable[[int], bytes]:
    """``read(n)`` of *fd* from its start, with pread: the descriptor's offset is left
    alone (its writes append anyway)."""
    offset = 0

    def read(n: int) -> bytes:
        nonlocal offset
        chunk = os.pread(fd, n, offset)
        offset += len(chunk)
        return chunk

    return read


def signer_fields(key: object) -> dict[str, str | None]:
    """``key`` (fingerprint) and ``alg`` of an entry, for the key a request carried."""
    algorithm = key_algorithm(key)
    if algorithm is None:
        return {"key": None, "alg": None}
    assert isinstance(key, str)
    return {"key": fingerprint(key), "alg": algorithm.name}


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
