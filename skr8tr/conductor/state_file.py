"""The conductor's desired state on disk (``--state FILE``, TOML): its format and its checks.

What is stored: every app with its current generation, the last generation it
ever took (``last_generation``: the counter, which pruning never takes back),
its desired count, its kept revisions (manifest text, format, base folder,
hash; older ones are pruned, see :func:`skr8tr.core.revisions.retain`), its
rollout history (a pruned revision's row carries its manifest's ``sha256``)
and the last rollout status (with what a restart needs to end it: its
``kind`` and the ``desired`` count it was started for). What is not: running
replicas — after a restart they come from what the nodes report when they
reconnect.

Writes are atomic: a temporary file in the same folder, fsync, rename over the
old file, fsync of the folder. A write that fails raises :class:`StateWriteError`
and leaves the previous file as it was; the caller keeps its previous state in
memory too.

Reading trusts nothing: a file that cannot be read, or that parses but breaks
a rule, raises :class:`StateFileError` naming the file, the line and column of
the offending key or value, and what was expected. The rules are those the
conductor keeps while it runs: names and counts as in a manifest (``desired``
0..1000 like ``replicas``), generations >= 1, never repeated and not past
``last_generation``, the current generation and every rollout generation among
the stored revisions, every history row either with its stored revision or
carrying its manifest's SHA-256, the rollout states (rolling, complete, failed, rolled_back,
aborted), times that are Unix seconds with ``finished`` not before
``started``, each revision's SHA-256 equal to the
SHA-256 of its manifest text, which parses and names its app, and no key the
conductor does not write. Nothing is dropped or repaired: a file that breaks
a rule (edited by hand, damaged, tampered with) is refused whole and left as
it is.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import tomllib
from dataclasses import dataclass
from typing import Any

import tomli_w

from skr8tr.atomic import write_atomically
from skr8tr.bounded_files import FileRefused, read_regular
from skr8tr.core import manifest as manifest_mod
from skr8tr.core import toml_positions
from skr8tr.core.protocol import APP_NAME_RE, ROLLOUT_STATES
from skr8tr.core.toml_positions import Path

STATE_VERSION = 1
# 1,000 apps with 10 revisions and 50 history rows each come to ~10 MB (small manifests):
# a file past this bound is not one the conductor wrote (/dev/zero, a log named by mistake).
MAX_STATE_BYTES = 256 * 1024 * 1024


class StateFileError(Exception):
    """The state file exists but cannot be used; the message (one line) names the file, the
    line and column, and what was expected there."""


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
    # The manifest's SHA-256 when its revision was pruned (None: the revision is stored).
    sha256: str | None = None


@dataclass(frozen=True)
class StoredApp:
    name: str
    generation: int
    desired: int
    completed: int
    given_up: int
    revisions: tuple[StoredRevision, ...]
    history: tuple[StoredHistory, ...]
    # The highest generation the app ever took; None in a file written before revisions
    # were pruned (then the highest stored one, which was every one ever taken).
    last_generation: int | None = None


@dataclass(frozen=True)
class StoredState:
    apps: tuple[StoredApp, ...]
    rollouts: tuple[dict[str, Any], ...]  # last rollout status per app, as `rollout status --json`
    # The secret of the placement tokens (skr8tr/core/placement_token.py), 64 hex digits;
    # None in a file written before there were tokens.
    placement_key: str | None = None


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
            # A wall clock that stepped back during a rollout would end it before it
            # started: written as ending when it started, never as a file load refuses.
            "history": [
                {"generation": h.generation, "state": h.state, "started": h.started,
                 **({} if h.finished is None else {"finished": max(h.finished, h.started)}),
                 **({} if h.sha256 is None else {"sha256": h.sha256})}
                for h in app.history],
        }
        if app.last_generation is not None:
            apps[app.name]["last_generation"] = app.last_generation
    doc = {"version": STATE_VERSION, "apps": apps, "rollouts": list(state.rollouts)}
    if state.placement_key is not None:
        doc["placement_key"] = state.placement_key
    return doc


def save(path: str, state: StoredState) -> None:
    """Write ``state`` to ``path`` atomically. Raises StateWriteError; never half-writes."""
    try:
        write_atomically(path, tomli_w.dumps(to_document(state)))
    except OSError as exc:
        raise StateWriteError(f"cannot write the state file {path}: "
                              f"{exc.strerror or exc}") from None


_PLACEMENT_KEY = re.compile(r"[0-9a-f]{64}")
_AT_LINE = re.compile(r"\(at line (\d+), column (\d+)\)")


def load(path: str) -> StoredState | None:
    """Read and check the state file; None when it does not exist yet.

    Raises StateFileError (file, line, column, what was expected) for a file that
    cannot be read, is not TOML, or breaks any rule of the module docstring.
    """
    try:
        raw = read_regular(path, MAX_STATE_BYTES)
    except FileNotFoundError:
        return None
    except FileRefused as exc:
        raise StateFileError(f"{exc}: not a state file") from None
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
    except (ValueError, RecursionError):  # an integer past int()'s digit limit; deep nesting
        raise StateFileError(f"{path}: line 1, column 1: too large or too deeply nested "
                             "to be a state file") from None
    return _Checker(path, text).state(doc)


# --------------------------------------------------------------------------- the rules


_APP_KEYS = ("generation", "desired", "completed", "given_up", "revisions", "history")
_REVISION_KEYS = ("generation", "format", "base_dir", "sha256", "manifest")
_HISTORY_KEYS = ("generation", "state", "started")
_ROLLOUT_KEYS = ("app", "state", "from_generation", "to_generation", "replaced", "total",
                 "message")
# What a rollout's kind may be (conductor/rollout.py RolloutRecord.kind).
ROLLOUT_KINDS = ("rollout", "undo", "restart")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class _Checker:
    """Turns a parsed state document into a StoredState, or raises StateFileError at the
    first rule it breaks, located in the text."""

    def __init__(self, path: str, text: str) -> None:
        self.path = path
        self.text = text
        self._spots: dict[Path, tuple[int, int]] | None = None

    # ------------------------------------------------------------ where and why

    def fail(self, where: Path, message: str, *, at_key: bool = False) -> StateFileError:
        """An error at the value of ``where`` (at its key with ``at_key``); a path that is not
        written (a missing key) is reported at the closest table or key that is."""
        if self._spots is None:
            self._spots = toml_positions.positions(self.text)
        index = 0
        for depth in range(len(where), 0, -1):
            spot = self._spots.get(where[:depth])
            if spot is not None:
                index = spot[1] if depth == len(where) and not at_key else spot[0]
                break
        line = self.text.count("\n", 0, index) + 1
        column = index - (self.text.rfind("\n", 0, index) + 1) + 1
        return StateFileError(f"{self.path}: line {line}, column {column}: {message}")

    def table(self, where: Path, value: Any, what: str, required: tuple[str, ...],
              optional: tuple[str, ...] = ()) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(where, f"{what} is {_kind(value)}; expected a table")
        for key in value:
            if key not in required and key not in optional:
                raise self.fail((*where, key), f"{what}: unknown key {_show(key)} (expected "
                                f"{', '.join(required + optional)})", at_key=True)
        for key in required:
            if key not in value:
                raise self.fail(where, f"{what}: {key} is missing")
        return value

    def array(self, where: Path, value: Any, what: str) -> list[Any]:
        if not isinstance(value, list):
            raise self.fail(where, f"{what} is {_kind(value)}; expected an array of tables")
        return value

    def integer(self, where: Path, value: Any, what: str, lo: int, hi: int | None = None,
                expected: str | None = None) -> int:
        if (isinstance(value, int) and not isinstance(value, bool) and value >= lo
                and (hi is None or value <= hi)):
            return value
        if expected is None:
            expected = (f"a whole number >= {lo}" if hi is None
                        else f"a whole number {lo}..{hi}")
        raise self.fail(where, f"{what} is {_show(value)}; expected {expected}")

    def seconds(self, where: Path, value: Any, what: str, lo: float = 0.0,
                expected: str = "Unix seconds (a number >= 0)") -> float:
        if (isinstance(value, int | float) and not isinstance(value, bool)
                and math.isfinite(value) and value >= lo):
            return float(value)
        raise self.fail(where, f"{what} is {_show(value)}; expected {expected}")

    def string(self, where: Path, value: Any, what: str) -> str:
        if not isinstance(value, str):
            raise self.fail(where, f"{what} is {_kind(value)}; expected a string")
        return value

    def choice(self, where: Path, value: Any, what: str, options: tuple[str, ...]) -> str:
        if isinstance(value, str) and value in options:
            return value
        raise self.fail(where, f"{what} is {_show(value)}; expected one of "
                        f"{', '.join(options)}")

    # ------------------------------------------------------------ the document

    def state(self, doc: dict[str, Any]) -> StoredState:
        version = doc.get("version")
        if type(version) is not int or version != STATE_VERSION:
            raise self.fail(("version",), f"unsupported state version {_show(version)} (this "
                            f"conductor reads version {STATE_VERSION})")
        self.table((), doc, "the state file", ("version",),
                   ("apps", "rollouts", "placement_key"))
        placement_key = doc.get("placement_key")
        if placement_key is not None and (not isinstance(placement_key, str)
                                          or _PLACEMENT_KEY.fullmatch(placement_key) is None):
            raise self.fail(("placement_key",), "placement_key is not 64 lowercase hex "
                            "digits (the secret of the placement tokens)")
        apps_doc = doc.get("apps", {})
        if not isinstance(apps_doc, dict):
            raise self.fail(("apps",), f"apps is {_kind(apps_doc)}; expected a table of apps "
                            "([apps.NAME])")
        apps = tuple(self.app(name, a) for name, a in apps_doc.items())
        by_name = {app.name: app for app in apps}
        rollouts: list[dict[str, Any]] = []
        for i, r in enumerate(self.array(("rollouts",), doc.get("rollouts", []), "rollouts")):
            status = self.rollout(("rollouts", i), r, i, by_name)
            if any(seen["app"] == status["app"] for seen in rollouts):
                raise self.fail(("rollouts", i, "app"), f"rollout entry #{i + 1}: a second "
                                f"entry for app {status['app']}; expected one per app")
            rollouts.append(status)
        return StoredState(apps, tuple(rollouts), placement_key)

    def app(self, name: str, a: Any) -> StoredApp:
        where: Path = ("apps", name)
        if APP_NAME_RE.fullmatch(name) is None:
            raise self.fail(where, f"app name {_show(name)} is not valid; expected "
                            "[a-z0-9][a-z0-9-]{0,62}, as in a manifest", at_key=True)
        what = f"app {name}"
        self.table(where, a, what, _APP_KEYS, ("last_generation",))
        revisions: list[StoredRevision] = []
        for i, r in enumerate(self.array((*where, "revisions"), a["revisions"],
                                         f"{what}: revisions")):
            revision = self.revision((*where, "revisions", i), r, name, i)
            if any(seen.generation == revision.generation for seen in revisions):
                raise self.fail((*where, "revisions", i, "generation"),
                                f"{what}: a second revision of generation "
                                f"{revision.generation}; generations are never reused")
            revisions.append(revision)
        if not revisions:
            raise self.fail((*where, "revisions"), f"{what} has no revision; expected at "
                            "least the one of its current generation")
        stored = {r.generation for r in revisions}
        last_generation = None
        if "last_generation" in a:
            last_generation = self.integer(
                (*where, "last_generation"), a["last_generation"], f"{what}: last_generation",
                max(stored), None, f"a whole number >= {max(stored)} (its newest stored "
                "revision): generations are never reused")
        generation = self.integer((*where, "generation"), a["generation"],
                                  f"{what}: generation", 1)
        if generation not in stored:
            raise self.fail((*where, "generation"), f"{what} is at generation {generation}, "
                            f"which has no stored revision (stored: {_list(stored)})")
        desired = self.integer((*where, "desired"), a["desired"], f"{what}: desired", 0,
                               manifest_mod.MAX_REPLICAS,
                               f"a whole number 0..{manifest_mod.MAX_REPLICAS}, as a "
                               "manifest's replicas")
        completed = self.integer((*where, "completed"), a["completed"],
                                 f"{what}: completed", 0)
        given_up = self.integer((*where, "given_up"), a["given_up"], f"{what}: given_up", 0)
        history: list[StoredHistory] = []
        for i, h in enumerate(self.array((*where, "history"), a["history"],
                                         f"{what}: history")):
            entry = self.history((*where, "history", i), h, name, i, revisions,
                                 last_generation)
            if any(seen.generation == entry.generation for seen in history):
                raise self.fail((*where, "history", i, "generation"),
                                f"{what}: a second history entry for generation "
                                f"{entry.generation}; generations are never reused")
            history.append(entry)
        return StoredApp(name, generation, desired, completed, given_up, tuple(revisions),
                         tuple(history), last_generation)

    def revision(self, where: Path, r: Any, app: str, i: int) -> StoredRevision:
        what = f"app {app}, revision #{i + 1}"
        self.table(where, r, what, _REVISION_KEYS)
        generation = self.integer((*where, "generation"), r["generation"],
                                  f"{what}: generation", 1)
        what = f"app {app}, revision of generation {generation}"
        fmt = self.choice((*where, "format"), r["format"], f"{what}: format",
                          manifest_mod.FORMATS)
        base_dir = self.string((*where, "base_dir"), r["base_dir"], f"{what}: base_dir")
        if not os.path.isabs(base_dir) or "\x00" in base_dir:
            raise self.fail((*where, "base_dir"), f"{what}: base_dir is {_show(base_dir)}; "
                            "expected an absolute path")
        # The manifest holds environment values: no message ever quotes it.
        text = self.string((*where, "manifest"), r["manifest"], f"{what}: manifest")
        sha256 = r["sha256"]
        if not (isinstance(sha256, str) and _SHA256.fullmatch(sha256)):
            raise self.fail((*where, "sha256"), f"{what}: sha256 is {_show(sha256)}; "
                            "expected 64 lowercase hex characters")
        if hashlib.sha256(text.encode("utf-8")).hexdigest() != sha256:
            raise self.fail((*where, "sha256"), f"{what}: sha256 does not match the stored "
                            "manifest text, so one of them was edited or damaged; expected "
                            "the SHA-256 of the manifest")
        try:
            parsed = manifest_mod.parse_manifest(text, filename="manifest", base_dir=base_dir,
                                                 format=fmt)
        except manifest_mod.ManifestError as exc:
            raise self.fail((*where, "manifest"), f"{what}: the stored manifest does not "
                            f"parse (at its line {exc.line}, column {exc.column}: expected "
                            f"{exc.expected})") from None
        if parsed.app != app:
            raise self.fail((*where, "manifest"), f"{what}: the stored manifest is one of "
                            f"app {parsed.app}; expected app {app}")
        return StoredRevision(generation, fmt, base_dir, sha256, text)

    def history(self, where: Path, h: Any, app: str, i: int,
                revisions: list[StoredRevision], last_generation: int | None
                ) -> StoredHistory:
        what = f"app {app}, history entry #{i + 1}"
        self.table(where, h, what, _HISTORY_KEYS, ("finished", "sha256"))
        generation = self.integer((*where, "generation"), h["generation"],
                                  f"{what}: generation", 1)
        what = f"app {app}, history of generation {generation}"
        stored = {r.generation: r for r in revisions}
        sha256 = h.get("sha256")
        if sha256 is not None and not (isinstance(sha256, str) and _SHA256.fullmatch(sha256)):
            raise self.fail((*where, "sha256"), f"{what}: sha256 is {_show(sha256)}; "
                            "expected 64 lowercase hex characters")
        if generation in stored:
            if sha256 is not None and sha256 != stored[generation].sha256:
                raise self.fail((*where, "sha256"), f"{what}: sha256 differs from its stored "
                                "revision's; expected the same SHA-256 or none")
        elif last_generation is None or generation > last_generation:
            # (without last_generation, a file from before pruning: every row had one)
            past = ("" if last_generation is None
                    else f" and is past last_generation {last_generation}")
            raise self.fail((*where, "generation"), f"{what}: generation {generation} has no "
                            f"stored revision (stored: {_list(set(stored))}){past}")
        elif sha256 is None:
            raise self.fail(where, f"{what}: its revision was pruned, so its sha256 is "
                            "expected (the SHA-256 of its manifest)")
        state = self.choice((*where, "state"), h["state"], f"{what}: state", ROLLOUT_STATES)
        started = self.seconds((*where, "started"), h["started"], f"{what}: started")
        if "finished" not in h:
            if state != "rolling":
                raise self.fail(where, f"{what}: finished is missing; a rollout that is "
                                f"{state} has ended")
            return StoredHistory(generation, state, started, None, sha256)
        if state == "rolling":
            raise self.fail((*where, "finished"), f"{what}: finished is set, but a rolling "
                            "rollout has not ended; expected no finished time", at_key=True)
        finished = self.seconds((*where, "finished"), h["finished"], f"{what}: finished",
                                started, f"Unix seconds not before started ({started!r})")
        return StoredHistory(generation, state, started, finished, sha256)

    def rollout(self, where: Path, r: Any, i: int, apps: dict[str, StoredApp]
                ) -> dict[str, Any]:
        what = f"rollout entry #{i + 1}"
        self.table(where, r, what, _ROLLOUT_KEYS, ("kind", "desired"))
        name = self.string((*where, "app"), r["app"], f"{what}: app")
        app = apps.get(name)
        if app is None:
            raise self.fail((*where, "app"), f"{what}: app is {_show(name)}, which is not "
                            f"in the state file (apps: {', '.join(apps) or 'none'})")
        what = f"rollout of app {name}"
        stored = {rev.generation for rev in app.revisions}
        generations: dict[str, int] = {}
        for key in ("from_generation", "to_generation"):
            generations[key] = self.integer((*where, key), r[key], f"{what}: {key}", 1)
            if generations[key] not in stored:
                raise self.fail((*where, key), f"{what}: {key} {generations[key]} has no "
                                f"stored revision (stored: {_list(stored)})")
        state = self.choice((*where, "state"), r["state"], f"{what}: state", ROLLOUT_STATES)
        to_generation = generations["to_generation"]
        if state == "rolling" and not any(h.generation == to_generation
                                          and h.state == "rolling" for h in app.history):
            raise self.fail((*where, "state"), f"{what}: state is rolling, but the history "
                            f"of generation {to_generation} is not; expected its final state")
        total = self.integer((*where, "total"), r["total"], f"{what}: total", 0,
                             manifest_mod.MAX_REPLICAS)
        replaced = self.integer((*where, "replaced"), r["replaced"], f"{what}: replaced", 0,
                                total, f"a whole number 0..total ({total})")
        message = self.string((*where, "message"), r["message"], f"{what}: message")
        extra: dict[str, Any] = {}  # absent in a file written before restarts kept them
        if "kind" in r:
            extra["kind"] = self.choice((*where, "kind"), r["kind"], f"{what}: kind",
                                        ROLLOUT_KINDS)
        if "desired" in r:
            extra["desired"] = self.integer((*where, "desired"), r["desired"],
                                            f"{what}: desired", 0, manifest_mod.MAX_REPLICAS)
        return {"app": name, "state": state, **generations, "replaced": replaced,
                "total": total, "message": message, **extra}


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return "a date or time"


def _show(value: Any) -> str:
    """A short rendering of a value for a one-line message."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float | str):
        shown = repr(value)
        return shown if len(shown) <= 40 else shown[:36] + "...'"
    return _kind(value)


def _list(generations: set[int]) -> str:
    return ", ".join(map(str, sorted(generations)))
