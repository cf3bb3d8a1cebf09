"""The arguments of each ``/v1/cli`` command: their names, what each accepts, defaults.

:func:`check_args` is step 3 of receiving a request (:mod:`skr8tr.core.protocol`):
it names the first unknown or bad argument, and fills in the defaults.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from skr8tr.core.envelope import COMMANDS
from skr8tr.core.names import APP_NAME_RE, MAX_ID_CHARS
from skr8tr.core.wire_json import is_finite_number, is_int, is_text, json_type, show

__all__ = ["ARG_SPECS", "DEFAULT_LOG_TAIL", "MAX_BASE_DIR_CHARS", "MAX_GENERATION", "MAX_LOG_TAIL",
           "MAX_REPLICAS", "check_args"]

MAX_BASE_DIR_CHARS = 4096
MAX_REPLICAS = 1000
MAX_LOG_TAIL = 10000
DEFAULT_LOG_TAIL = 100
# Generations count rollout attempts: far below this, which keeps a hostile number
# (JSON allows any length) to one comparison and out of every message that quotes it.
MAX_GENERATION = 2**53
MAX_FOLLOW_AFTER = 10_000  # replicas named in a resumed follow's `after`
MAX_LOG_SEQ = 2**53
MAX_TS_S = 1e12

_REQUIRED = object()
_OMITTED = object()  # an optional argument left out stays out (the handler has the default)


class _Arg(NamedTuple):
    expected: str
    ok: Callable[[Any], bool]
    default: Any = _REQUIRED


def _is_app(value: Any) -> bool:
    return isinstance(value, str) and APP_NAME_RE.fullmatch(value) is not None


def _is_replica_id(value: Any) -> bool:
    return is_text(value) and 0 < len(value) <= MAX_ID_CHARS


def _is_after(value: Any) -> bool:
    return (isinstance(value, dict) and len(value) <= MAX_FOLLOW_AFTER
            and all(_is_replica_id(k) and is_int(v, 0, MAX_LOG_SEQ) for k, v in value.items()))


def _is_base_dir(value: Any) -> bool:
    return (
        is_text(value)
        and value.startswith("/")
        and len(value) <= MAX_BASE_DIR_CHARS
        and "\x00" not in value
    )


_APP = _Arg("an app name matching [a-z0-9][a-z0-9-]{0,62}", _is_app)
_MANIFEST = _Arg("the manifest text (a string)", is_text)
_FORMAT = _Arg('"skr8tr" or "toml"', lambda v: isinstance(v, str) and v in ("skr8tr", "toml"))
_BASE_DIR = _Arg("an absolute folder path (a string starting with /)", _is_base_dir)
_FORCE = _Arg("true or false", lambda v: isinstance(v, bool), False)
_GENERATION = _Arg(f"a generation number 1..{MAX_GENERATION}",
                   lambda v: is_int(v, 1, MAX_GENERATION))

ARG_SPECS: dict[str, dict[str, _Arg]] = {
    "ping": {},
    "nodes": {},
    "status": {},
    "up": {"manifest": _MANIFEST, "format": _FORMAT, "base_dir": _BASE_DIR},
    "down": {"app": _APP},
    "scale": {
        "app": _APP,
        "replicas": _Arg(f"an integer 0..{MAX_REPLICAS}", lambda v: is_int(v, 0, MAX_REPLICAS)),
    },
    "rollout": {
        "manifest": _MANIFEST,
        "format": _FORMAT,
        "base_dir": _BASE_DIR,
        "force": _FORCE,
    },
    "rollout-status": {"app": _APP},
    "rollout-abort": {"app": _APP},
    "rollout-promote": {"app": _APP},
    "rollout-pause": {"app": _APP},
    "rollout-resume": {"app": _APP},
    "rollout-undo": {
        "app": _APP,
        "to": _Arg("a generation number >= 1, or null",
                   lambda v: v is None or is_int(v, 1, MAX_GENERATION), None),
        "force": _FORCE,
    },
    "restart": {"app": _APP, "force": _FORCE},
    "describe": {"app": _APP},
    "revision": {"app": _APP, "generation": _GENERATION},
    "history": {"app": _APP},
    "list": {"app": _Arg(f"null or {_APP.expected}", lambda v: v is None or _is_app(v), None)},
    "logs": {
        "app": _APP,
        "replica": _Arg(
            f"null or a replica id (1..{MAX_ID_CHARS} characters)",
            lambda v: v is None or _is_replica_id(v),
            None,
        ),
        "tail": _Arg(
            f"an integer 0..{MAX_LOG_TAIL}", lambda v: is_int(v, 0, MAX_LOG_TAIL), DEFAULT_LOG_TAIL
        ),
        # Keep the connection open and send every new line as it is read (more replies
        # with the request's id), until the client closes it or sends anything else.
        "follow": _Arg("true or false", lambda v: isinstance(v, bool), _OMITTED),
        # A follow resumed after a reconnection: replica -> the last line number (seq)
        # already shown; lines of other replicas are sent from `since` (a time) on.
        "after": _Arg(
            f"null or an object of at most {MAX_FOLLOW_AFTER} replica ids -> integers >= 0",
            lambda v: v is None or _is_after(v),
            _OMITTED,
        ),
        "since": _Arg(
            "null or a time in seconds since the epoch",
            lambda v: v is None or (is_finite_number(v) and 0 <= v <= MAX_TS_S),
            _OMITTED,
        ),
    },
}
assert set(ARG_SPECS) == COMMANDS


def check_args(cmd: str, args: Any) -> dict[str, Any] | str:
    """The args of *cmd* with defaults filled in, or a message naming what is wrong
    (the first unknown argument, or the first missing or bad one). Never raises."""
    if not isinstance(args, dict):
        return f"args must be an object, got {json_type(args)}"
    spec = ARG_SPECS[cmd]
    unknown = [k for k in args if k not in spec]
    if unknown:
        names = ", ".join(show(k) for k in unknown[:5]) + (", ..." if len(unknown) > 5 else "")
        plural = "s" if len(unknown) > 1 else ""
        allowed = ", ".join(spec) if spec else "none"
        return f"unknown argument{plural} {names} for {cmd} (expected: {allowed})"
    out: dict[str, Any] = {}
    for name, arg in spec.items():
        if name not in args:
            if arg.default is _REQUIRED:
                return f"args.{name} is required for {cmd} ({arg.expected})"
            if arg.default is not _OMITTED:
                out[name] = arg.default
            continue
        value = args[name]
        if not arg.ok(value):
            return f"args.{name} must be {arg.expected}, got {show(value)}"
        out[name] = value
    return out
