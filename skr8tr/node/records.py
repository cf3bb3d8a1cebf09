"""Replica records: ``<data-dir>/replicas/<replica>.json``, one per running replica.

A record is written when a replica starts, rewritten when its reported state
changes (``state``: running, ready or unhealthy), and removed when it has
exited, so that a restarted agent can find the processes it left running (pid
and start time both have to match before anything is re-adopted, see
:mod:`skr8tr.node.adopt`).

A record holds: ``version`` (1), ``replica``, ``app``, ``generation``,
``pid``, ``create_time`` (the process start time from psutil, None if it was
gone before it could be read), ``port``, ``host``, ``stdout``/``stderr`` (the
log files), ``started`` (when the agent spawned it), ``state`` and
``launch`` (the fields of the ``launch`` message, to resume its health check).
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any


def record_path(records_dir: str, replica: str) -> str:
    return os.path.join(records_dir, f"{replica}.json")


def write_record(records_dir: str, replica: str, record: dict[str, Any]) -> None:
    """Write *record* atomically: temporary file, fsync, rename, fsync of the folder.

    A crash leaves either the old record or the new one, never a torn file.
    Raises OSError (the temporary file is removed).
    """
    path = record_path(records_dir, replica)
    tmp = os.path.join(records_dir, f".{replica}.json.{os.urandom(4).hex()}.tmp")
    data = (json.dumps(record, indent=2, sort_keys=True) + "\n").encode()
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(records_dir)


def remove_record(records_dir: str, replica: str) -> None:
    """Remove a replica's record; a missing record is fine. Raises OSError otherwise."""
    try:
        os.unlink(record_path(records_dir, replica))
    except FileNotFoundError:
        return
    _fsync_dir(records_dir)


def read_records(records_dir: str) -> list[tuple[str, dict[str, Any] | str]]:
    """Every record in *records_dir*, sorted by replica id: ``(replica, record)``.

    A record that cannot be read or is not a JSON object comes back as
    ``(replica, reason)`` instead. Temporary files left by a crash in the
    middle of :func:`write_record` are removed. Raises OSError only when the
    folder cannot be listed.
    """
    found: list[tuple[str, dict[str, Any] | str]] = []
    for name in sorted(os.listdir(records_dir)):
        path = os.path.join(records_dir, name)
        if name.startswith("."):
            if name.endswith(".tmp"):
                with contextlib.suppress(OSError):
                    os.unlink(path)
            continue
        if not name.endswith(".json"):
            continue
        replica = name[: -len(".json")]
        try:
            with open(path, "rb") as f:
                record = json.loads(f.read())
        except (OSError, ValueError, RecursionError) as exc:
            found.append((replica, f"unreadable record {path}: {exc}"))
            continue
        if not isinstance(record, dict):
            found.append((replica, f"record {path} is not a JSON object"))
            continue
        found.append((replica, record))
    return found


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
