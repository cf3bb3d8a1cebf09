"""The conductor's desired state on disk (``--state FILE``, TOML; DESIGN.md §7).

What is stored: every app with its current generation, desired count, every
revision (manifest text, format, base folder, hash), the rollout history and
the last rollout status. What is not: running replicas — after a restart they
come from what the nodes report when they reconnect.

Writes are atomic: a temporary file in the same folder, fsync, rename over the
old file, fsync of the folder. A write that fails raises :class:`StateWriteError`
and leaves the previous file as it was; the caller keeps its previous state in
memory too. A file that cannot be read raises :class:`StateFileError` naming
the file and the line.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import tomllib
from dataclasses import dataclass
from typing import Any

import tomli_w

STATE_VERSION = 1


class StateFileError(Exception):
    """The state file exists but cannot be used; the message names file and line."""


class StateWriteError(Exception):
    """The state could not be written; the previous file is unchanged."""


@dataclass(frozen=True)
class StoredRevision:
    generation: int
    format: str
    base_dir: str
    sha256: str
    manifest: str


@dataclass(frozen=True)
class StoredHistory:
    generation: int
    state: str
    started: float
    finished: float | None


@dataclass(frozen=True)
class StoredApp:
    name: str
    generation: int
    desired: int
    completed: int
    given_up: int
    revisions: tuple[StoredRevision, ...]
    history: tuple[StoredHistory, ...]


@dataclass(frozen=True)
class StoredState:
    apps: tuple[StoredApp, ...]
    rollouts: tuple[dict[str, Any], ...]  # last rollout status per app (DESIGN.md §5 shape)


def to_document(state: StoredState) -> dict[str, Any]:
    apps: dict[str, Any] = {}
    for app in state.apps:
        apps[app.name] = {
            "generation": app.generation,
            "desired": app.desired,
            "completed": app.completed,
            "given_up": app.given_up,
            "revisions": [
                {"generation": r.generation, "format": r.format, "base_dir": r.base_dir,
                 "sha256": r.sha256, "manifest": r.manifest} for r in app.revisions],
            "history": [
                {"generation": h.generation, "state": h.state, "started": h.started,
                 **({} if h.finished is None else {"finished": h.finished})}
                for h in app.history],
        }
    return {"version": STATE_VERSION, "apps": apps, "rollouts": list(state.rollouts)}


def save(path: str, state: StoredState) -> None:
    """Write ``state`` to ``path`` atomically. Raises StateWriteError; never half-writes."""
    text = tomli_w.dumps(to_document(state))
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=".state-", suffix=".tmp", dir=folder)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        raise StateWriteError(f"cannot write the state file {path}: "
                              f"{exc.strerror or exc}") from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):  # best effort: it may not exist
                os.unlink(tmp)


_AT_LINE = re.compile(r"\(at line (\d+), column (\d+)\)")


def _line_of(text: str, needle: str) -> int | None:
    for number, line in enumerate(text.splitlines(), start=1):
        if needle in line:
            return number
    return None


def load(path: str) -> StoredState | None:
    """Read the state file; None when it does not exist yet.

    Raises StateFileError (with file and line) for anything unreadable.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateFileError(f"cannot read the state file {path}: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise StateFileError(f"{path}: line {line}: not UTF-8 text") from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        match = _AT_LINE.search(str(exc))
        where = f"line {match.group(1)}, column {match.group(2)}" if match else "line ?"
        reason = _AT_LINE.sub("", str(exc)).strip()
        raise StateFileError(f"{path}: {where}: {reason}") from None
    return _from_document(doc, path, text)


def _from_document(doc: dict[str, Any], path: str, text: str) -> StoredState:
    def fail(message: str, needle: str | None = None) -> StateFileError:
        line = _line_of(text, needle) if needle else None
        return StateFileError(f"{path}: line {line or 1}: {message}")

    if doc.get("version") != STATE_VERSION:
        raise fail(f"unsupported state version {doc.get('version')!r} (this conductor reads "
                   f"version {STATE_VERSION})", "version")
    apps_doc = doc.get("apps", {})
    if not isinstance(apps_doc, dict):
        raise fail("'apps' must be a table", "apps")
    apps = []
    for name, a in apps_doc.items():
        needle = f"[apps.{name}]"
        try:
            revisions = tuple(
                StoredRevision(_int(r["generation"]), _str(r["format"]), _str(r["base_dir"]),
                               _str(r["sha256"]), _str(r["manifest"]))
                for r in a["revisions"])
            history = tuple(
                StoredHistory(_int(h["generation"]), _str(h["state"]), _num(h["started"]),
                              None if "finished" not in h else _num(h["finished"]))
                for h in a["history"])
            app = StoredApp(name, _int(a["generation"]), _int(a["desired"]),
                            _int(a["completed"]), _int(a["given_up"]), revisions, history)
        except (KeyError, TypeError, ValueError) as exc:
            raise fail(f"app {name!r} is incomplete or malformed ({exc!s})", needle) from None
        if app.generation not in {r.generation for r in revisions}:
            raise fail(f"app {name!r} is at generation {app.generation}, which has no stored "
                       "revision", needle)
        apps.append(app)
    rollouts = doc.get("rollouts", [])
    if not isinstance(rollouts, list) or not all(isinstance(r, dict) for r in rollouts):
        raise fail("'rollouts' must be an array of tables", "rollouts")
    return StoredState(tuple(apps), tuple(rollouts))


def _int(v: Any) -> int:
    if not isinstance(v, int) or isinstance(v, bool):
        raise TypeError(f"expected an integer, got {v!r}")
    return v


def _num(v: Any) -> float:
    if not isinstance(v, int | float) or isinstance(v, bool):
        raise TypeError(f"expected a number, got {v!r}")
    return float(v)


def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise TypeError(f"expected a string, got {v!r}")
    return v
