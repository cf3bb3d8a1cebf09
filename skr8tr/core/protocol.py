"""Wire messages: requests and replies on ``/v1/cli``, events on ``/v1/watch`` (DESIGN.md §4-5).

Receiving a request is three steps, in this order; each stops at the first
problem and answers with one error:

1. ``decode_envelope`` -> ``BAD_REQUEST``: the frame. Size (at most
   MAX_MESSAGE_BYTES of UTF-8), UTF-8, one JSON object (no NaN/Infinity, no
   duplicate keys), ``v == 1``, ``id`` and ``cmd``. Until these hold we do not
   know what the message is, whether it needs a signature, or what id to echo.
2. Authentication, for SIGNED_COMMANDS only -> ``UNAUTHORIZED`` / ``EXPIRED`` /
   ``REPLAY``: ``envelope.verify_request`` on the raw dict. It runs before any
   argument is looked at, so an unsigned or forged mutating request is
   UNAUTHORIZED whatever its arguments (§4), and the nonce is spent as soon
   as the signature verifies.
3. ``validate_request`` -> ``BAD_REQUEST``: no unknown top-level fields,
   ``args`` checked against the command's table (unknown keys named, defaults
   filled in), and for read-only commands the signature fields, if present,
   well-formed. For signed commands this step does not judge ``key``/``sig``/
   ``ts``/``nonce`` (step 2 did); they are passed through when well-formed,
   else as None.

``accept_request`` runs all three: it is what the conductor calls.
``decode_request`` runs 1 and 3 only (for tests, tools, unsigned paths).
None of them raises, whatever the input.

Outgoing messages (replies, events, snapshots) are produced by functions
that validate what they are given and raise ValueError on a producer bug;
they are ASCII JSON, so any text (even a lone surrogate) can be sent.
Decoders on the client side (replies, watch messages) ignore unknown fields.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, TypedDict

if TYPE_CHECKING:  # nacl is imported only by what signs or verifies (CLI start-up)
    import nacl.signing

from skr8tr.core import replica_state
from skr8tr.core.envelope import (
    COMMANDS,
    READ_ONLY_COMMANDS,
    SIGNED_COMMANDS,
    AuthError,
    ReplayGuard,
    check_signature,
    is_nonce,
    is_sig_hex,
    new_nonce,
    sign_request,
)
from skr8tr.core.keys import AuthorizedKeys, is_key_hex
from skr8tr.core.names import APP_NAME_RE

__all__ = [
    "MAX_MESSAGE_BYTES",
    "PROTOCOL_VERSION",
    "ERROR_CODES",
    "COMMANDS",
    "SIGNED_COMMANDS",
    "READ_ONLY_COMMANDS",
    "ARG_NAMES",
    "MAX_ID_CHARS",
    "APP_NAME_RE",
    "EVENT_NAME_RE",
    "REPLICA_STATES",
    "ROLLOUT_STATES",
    "LOG_STREAMS",
    "DecodeError",
    "Envelope",
    "Request",
    "Reply",
    "EventMessage",
    "SnapshotMessage",
    "WatchMessage",
    "decode_envelope",
    "validate_request",
    "decode_request",
    "accept_request",
    "check_args",
    "encode_request",
    "ok_reply",
    "error_reply",
    "decode_reply",
    "event_message",
    "snapshot_message",
    "decode_watch_message",
    "ReplicaRow",
    "NodeRow",
    "RolloutStatus",
    "HistoryRow",
    "UpResult",
    "DownResult",
    "PingResult",
    "LogLine",
    "LogsResult",
    "StatusResult",
    "replica_row",
    "node_row",
    "rollout_status",
    "history_row",
    "up_result",
    "down_result",
    "ping_result",
    "log_line",
    "logs_result",
    "status_result",
]

MAX_MESSAGE_BYTES = 1024 * 1024
PROTOCOL_VERSION = 1
ERROR_CODES = (
    "BAD_REQUEST",
    "UNAUTHORIZED",
    "EXPIRED",
    "REPLAY",
    "NOT_FOUND",
    "CONFLICT",
    "NO_CAPACITY",
    "INVALID_MANIFEST",
    "INTERNAL",
)
MAX_ID_CHARS = 128
EVENT_NAME_RE = re.compile(r"[a-z]+(\.[a-z_]+)+")

REPLICA_STATES = replica_state.STATES
ROLLOUT_STATES = ("rolling", "complete", "aborted", "failed", "rolled_back")
LOG_STREAMS = ("stdout", "stderr")

REQUEST_FIELDS = ("v", "id", "cmd", "args", "ts", "nonce", "key", "sig")
MAX_BASE_DIR_CHARS = 4096
MAX_REPLICAS = 1000
MAX_LOG_TAIL = 10000
DEFAULT_LOG_TAIL = 100


@dataclass(frozen=True)
class DecodeError:
    """A message that cannot be accepted, as the error reply to send.

    ``id`` is the request's id when the message carried a valid one, else None.
    ``code`` is BAD_REQUEST from the decoders; ``accept_request`` may also
    give UNAUTHORIZED, EXPIRED or REPLAY. ``message`` names the field and
    what was expected.
    """

    id: str | None
    code: str
    message: str
    # What the refused message claimed, when its frame decoded (for the log and the
    # audit trail; never trusted): its cmd, its key (64 hex characters) and its args.
    cmd: str | None = field(default=None, compare=False)
    key: str | None = field(default=None, compare=False)
    args: Any = field(default=None, compare=False)


@dataclass(frozen=True)
class Envelope:
    """A message with a valid frame: v == 1, a valid id, a known cmd. Nothing else is checked."""

    id: str
    cmd: str
    raw: dict[str, Any]


@dataclass(frozen=True)
class Request:
    """A fully checked request. ``args`` has every argument of the command, defaults filled in.

    ``raw`` is the parsed message as received (what the signature covers).
    ``signer`` is the key's fingerprint when ``accept_request`` verified a signature.
    """

    id: str
    cmd: str
    args: dict[str, Any]
    ts: float | None
    nonce: str | None
    key: str | None
    sig: str | None
    raw: dict[str, Any]
    signer: str | None = None


# --------------------------------------------------------------------------- arguments

_REQUIRED = object()


class _Arg(NamedTuple):
    expected: str
    ok: Callable[[Any], bool]
    default: Any = _REQUIRED


def _is_int(value: Any, lo: int, hi: int | None = None) -> bool:
    return (
        isinstance(value, int)
        and not isinstance(value, bool)
        and value >= lo
        and (hi is None or value <= hi)
    )


def _is_text(value: Any) -> bool:
    """A string that UTF-8 can carry (JSON \\u escapes can smuggle in lone surrogates)."""
    if not isinstance(value, str):
        return False
    if value.isascii():
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _is_app(value: Any) -> bool:
    return isinstance(value, str) and APP_NAME_RE.fullmatch(value) is not None


def _is_replica_id(value: Any) -> bool:
    return _is_text(value) and 0 < len(value) <= MAX_ID_CHARS


def _is_base_dir(value: Any) -> bool:
    return (
        _is_text(value)
        and value.startswith("/")
        and len(value) <= MAX_BASE_DIR_CHARS
        and "\x00" not in value
    )


_APP = _Arg("an app name matching [a-z0-9][a-z0-9-]{0,62}", _is_app)
_MANIFEST = _Arg("the manifest text (a string)", _is_text)
_FORMAT = _Arg('"skr8tr" or "toml"', lambda v: isinstance(v, str) and v in ("skr8tr", "toml"))
_BASE_DIR = _Arg("an absolute folder path (a string starting with /)", _is_base_dir)

ARG_SPECS: dict[str, dict[str, _Arg]] = {
    "ping": {},
    "nodes": {},
    "status": {},
    "up": {"manifest": _MANIFEST, "format": _FORMAT, "base_dir": _BASE_DIR},
    "down": {"app": _APP},
    "scale": {
        "app": _APP,
        "replicas": _Arg(f"an integer 0..{MAX_REPLICAS}", lambda v: _is_int(v, 0, MAX_REPLICAS)),
    },
    "rollout": {
        "manifest": _MANIFEST,
        "format": _FORMAT,
        "base_dir": _BASE_DIR,
        "force": _Arg("true or false", lambda v: isinstance(v, bool), False),
    },
    "rollout-status": {"app": _APP},
    "rollout-abort": {"app": _APP},
    "rollout-undo": {
        "app": _APP,
        "to": _Arg("a generation number >= 1, or null", lambda v: v is None or _is_int(v, 1), None),
    },
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
            f"an integer 1..{MAX_LOG_TAIL}", lambda v: _is_int(v, 1, MAX_LOG_TAIL), DEFAULT_LOG_TAIL
        ),
    },
}
assert set(ARG_SPECS) == COMMANDS

# The argument names of each command, in wire order.
ARG_NAMES: dict[str, tuple[str, ...]] = {cmd: tuple(spec) for cmd, spec in ARG_SPECS.items()}


def _check_args(cmd: str, args: Any) -> dict[str, Any] | str:
    """The normalized args of *cmd*, or a message naming what is wrong."""
    if not isinstance(args, dict):
        return f"args must be an object, got {_json_type(args)}"
    spec = ARG_SPECS[cmd]
    unknown = [k for k in args if k not in spec]
    if unknown:
        names = ", ".join(_show(k) for k in unknown[:5]) + (", ..." if len(unknown) > 5 else "")
        plural = "s" if len(unknown) > 1 else ""
        allowed = ", ".join(spec) if spec else "none"
        return f"unknown argument{plural} {names} for {cmd} (expected: {allowed})"
    out: dict[str, Any] = {}
    for name, arg in spec.items():
        if name not in args:
            if arg.default is _REQUIRED:
                return f"args.{name} is required for {cmd} ({arg.expected})"
            out[name] = arg.default
            continue
        value = args[name]
        if not arg.ok(value):
            return f"args.{name} must be {arg.expected}, got {_show(value)}"
        out[name] = value
    return out


def check_args(cmd: str, args: Any) -> dict[str, Any]:
    """Validate *args* for *cmd* and return them with defaults filled in.

    Raises ValueError naming the argument and what was expected (for
    producers such as the CLI; receivers get the same check from the decoders).
    """
    if cmd not in ARG_SPECS:
        known = ", ".join(sorted(COMMANDS))
        raise ValueError(f"unknown cmd {_show(cmd)} (expected one of: {known})")
    result = _check_args(cmd, args)
    if isinstance(result, str):
        raise ValueError(result)
    return result


# --------------------------------------------------------------------------- JSON helpers


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _show(value: Any, limit: int = 40) -> str:
    """A short JSON-ish rendering of a received value, safe to echo in an error message."""
    if isinstance(value, dict | list):
        return _json_type(value)
    try:
        shown = json.dumps(value, ensure_ascii=True)
    except (TypeError, ValueError):  # NaN and the like
        shown = repr(value)
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Two parsers that pick different duplicates could disagree on what was signed.
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {_show(key)} in a JSON object")
        out[key] = value
    return out


def _parse_object(data: Any, *, max_bytes: int | None, what: str) -> dict[str, Any] | str:
    """Parse one JSON object from text or UTF-8 bytes, or return why not."""
    if isinstance(data, bytes | bytearray | memoryview):
        raw = bytes(data)
        if max_bytes is not None and len(raw) > max_bytes:
            return f"{what} is {len(raw)} bytes, over the {max_bytes}-byte limit"
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            return f"{what} is not valid UTF-8 (byte {exc.start})"
    elif isinstance(data, str):
        text = data
        # A character is at least one UTF-8 byte: skip encoding what is too long anyway.
        if max_bytes is not None and len(text) > max_bytes:
            return f"{what} is over the {max_bytes}-byte limit"
        try:
            size = len(text.encode("utf-8"))
        except UnicodeEncodeError as exc:
            return f"{what} is not valid UTF-8 (lone surrogate at character {exc.start})"
        if max_bytes is not None and size > max_bytes:
            return f"{what} is {size} bytes, over the {max_bytes}-byte limit"
    else:
        return f"{what} must be JSON text, got {type(data).__name__}"
    try:
        obj = json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as exc:
        return f"{what} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
    except ValueError as exc:  # from the hooks, or an integer with too many digits
        return f"{what} is not valid JSON: {exc}"
    except RecursionError:
        return f"{what} is nested too deeply"
    if not isinstance(obj, dict):
        return f"{what} must be a JSON object, got {_json_type(obj)}"
    return obj


def _is_id(value: Any) -> bool:
    return _is_text(value) and 0 < len(value) <= MAX_ID_CHARS


def _is_finite_number(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def _dumps(obj: Any) -> str:
    # ASCII: any str can be sent, whatever the producer put in it. allow_nan=False:
    # NaN is not JSON and browsers reject it; a producer bug raises ValueError here.
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


# --------------------------------------------------------------------------- requests


def decode_envelope(data: str | bytes) -> Envelope | DecodeError:
    """Step 1: check the frame of a request (module docstring). Never raises."""
    obj = _parse_object(data, max_bytes=MAX_MESSAGE_BYTES, what="message")
    if isinstance(obj, str):
        return DecodeError(None, "BAD_REQUEST", obj)
    rid = obj.get("id")
    good_id = rid if _is_id(rid) else None

    def bad(message: str) -> DecodeError:
        return DecodeError(good_id, "BAD_REQUEST", message)

    v = obj.get("v", _REQUIRED)
    if v is _REQUIRED:
        return bad(f"v is required (the protocol version, {PROTOCOL_VERSION})")
    if isinstance(v, bool) or not isinstance(v, int) or v != PROTOCOL_VERSION:
        return bad(f"v must be {PROTOCOL_VERSION} (the protocol version), got {_show(v)}")
    if "id" not in obj:
        return bad("id is required (a string echoed in the reply)")
    if good_id is None:
        return bad(f"id must be a string of 1..{MAX_ID_CHARS} characters, got {_show(rid)}")
    cmd = obj.get("cmd", _REQUIRED)
    if cmd is _REQUIRED:
        return bad("cmd is required")
    if not isinstance(cmd, str) or cmd not in COMMANDS:
        return bad(f"unknown cmd {_show(cmd)} (expected one of: {', '.join(sorted(COMMANDS))})")
    return Envelope(id=good_id, cmd=cmd, raw=obj)


def validate_request(envelope: Envelope) -> Request | DecodeError:
    """Step 3: check fields and args of an envelope (module docstring). Never raises.

    For a SIGNED_COMMANDS request, call this only after ``verify_request``
    accepted ``envelope.raw`` (or ``accept_request`` does both).
    """
    raw = envelope.raw

    def bad(message: str) -> DecodeError:
        return DecodeError(envelope.id, "BAD_REQUEST", message)

    unknown = [k for k in raw if k not in REQUEST_FIELDS]
    if unknown:
        return bad(
            f"unknown field {_show(unknown[0])} in request (expected: {', '.join(REQUEST_FIELDS)})"
        )
    if "args" not in raw:
        return bad("args is required (an object; {} when the command takes none)")
    args = _check_args(envelope.cmd, raw["args"])
    if isinstance(args, str):
        return bad(args)

    ts, nonce, key, sig = (raw.get(name) for name in ("ts", "nonce", "key", "sig"))
    if envelope.cmd in SIGNED_COMMANDS:
        # Authentication has judged these already; keep what is well-formed.
        ts = float(ts) if _is_finite_number(ts) else None
        nonce = nonce if is_nonce(nonce) else None
        key = key if is_key_hex(key) else None
        sig = sig if is_sig_hex(sig) else None
    else:
        if ts is not None and not _is_finite_number(ts):
            return bad(f"ts must be a finite number (seconds since the epoch), got {_show(ts)}")
        if nonce is not None and not is_nonce(nonce):
            return bad(f"nonce must be 16..128 lowercase hex characters, got {_show(nonce)}")
        if key is not None and not is_key_hex(key):
            return bad(f"key must be 64 lowercase hex characters, got {_show(key)}")
        if sig is not None and not is_sig_hex(sig):
            return bad(f"sig must be 128 lowercase hex characters, got {_show(sig)}")
        ts = float(ts) if ts is not None else None
    return Request(
        id=envelope.id,
        cmd=envelope.cmd,
        args=args,
        ts=ts,
        nonce=nonce,
        key=key,
        sig=sig,
        raw=raw,
    )


def decode_request(data: str | bytes) -> Request | DecodeError:
    """Steps 1 and 3 without authentication. Never raises.

    Not enough on its own for a SIGNED_COMMANDS request from the network: it
    would answer BAD_REQUEST to bad arguments before checking the signature.
    The conductor uses ``accept_request``.
    """
    envelope = decode_envelope(data)
    if isinstance(envelope, DecodeError):
        return envelope
    return validate_request(envelope)


def accept_request(
    data: str | bytes,
    *,
    authorized: AuthorizedKeys,
    guard: ReplayGuard,
    now: float,
    insecure: bool = False,
) -> Request | DecodeError:
    """Decode, authenticate and validate one request, in the order of §4. Never raises.

    SIGNED_COMMANDS need a valid admin signature (``verify_request``), unless
    *insecure* (the conductor's ``--insecure``). Read-only commands are not
    verified even when signed: a key that is not authorized may still ``list``.
    On success ``Request.signer`` is the signer's fingerprint (None if unverified).
    """
    return admit_request(authenticate_request(data, authorized=authorized, insecure=insecure),
                         guard=guard, now=now)


@dataclass(frozen=True)
class Authenticated:
    """A decoded envelope whose signature, when its command needs one, is good
    (``signer``, the key's fingerprint; None for read-only commands and ``--insecure``).
    The replay guard has not judged it yet: see :func:`admit_request`."""

    envelope: Envelope
    signer: str | None


def authenticate_request(data: str | bytes, *, authorized: AuthorizedKeys,
                         insecure: bool = False) -> Authenticated | DecodeError:
    """The first half of :func:`accept_request`: the frame and, for SIGNED_COMMANDS, the
    UNAUTHORIZED checks (key, role, signature). Nothing after the frame is parsed or
    looked at before the signature verified. Touches no shared state (a worker thread
    may run it for a large message). Never raises."""
    envelope = decode_envelope(data)
    if isinstance(envelope, DecodeError):
        return envelope
    signer = None
    if envelope.cmd in SIGNED_COMMANDS and not insecure:
        try:
            signer = check_signature(envelope.raw, authorized=authorized)
        except AuthError as exc:
            return _refused(envelope, exc)
    return Authenticated(envelope, signer)


def admit_request(auth: Authenticated | DecodeError, *, guard: ReplayGuard,
                  now: float) -> Request | DecodeError:
    """The second half of :func:`accept_request`: the replay guard (EXPIRED, REPLAY; a
    nonce is spent here) for signed requests, then the fields and args. Never raises."""
    if isinstance(auth, DecodeError):
        return auth
    envelope = auth.envelope
    if auth.signer is not None:
        raw = envelope.raw
        try:
            guard.check(raw["key"], raw["nonce"], raw["ts"], now)
        except AuthError as exc:
            return _refused(envelope, exc)
        guard.spend(raw["key"], raw["nonce"], raw["ts"], now)
    request = validate_request(envelope)
    if isinstance(request, DecodeError):
        return request
    return replace(request, signer=auth.signer)


def _refused(envelope: Envelope, exc: AuthError) -> DecodeError:
    key = envelope.raw.get("key")
    return DecodeError(envelope.id, exc.code, exc.message, cmd=envelope.cmd,
                       key=key if is_key_hex(key) else None, args=envelope.raw.get("args"))


def encode_request(
    *,
    id: str,
    cmd: str,
    args: dict[str, Any],
    signing_key: nacl.signing.SigningKey | None = None,
    ts: float | None = None,
    nonce: str | None = None,
) -> str:
    """The JSON text of a request, signed when *signing_key* is given.

    *args* are validated and sent with defaults filled in. A signed request
    needs *ts* (the caller reads the clock); *nonce* defaults to a fresh one.
    Raises ValueError for a bad id, cmd or args, a missing ts, or a message
    over MAX_MESSAGE_BYTES.
    """
    if not _is_id(id):
        raise ValueError(f"id must be a string of 1..{MAX_ID_CHARS} characters, got {_show(id)}")
    full_args = check_args(cmd, args)
    if signing_key is None:
        message: dict[str, Any] = {"v": PROTOCOL_VERSION, "id": id, "cmd": cmd, "args": full_args}
    else:
        if ts is None or not _is_finite_number(ts):
            raise ValueError(f"a signed request needs ts, a finite number; got {ts!r}")
        message = sign_request(
            signing_key,
            id=id,
            cmd=cmd,
            args=full_args,
            ts=ts,
            nonce=nonce if nonce is not None else new_nonce(),
        )
    text = json.dumps(message, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    size = len(text.encode("utf-8"))
    if size > MAX_MESSAGE_BYTES:
        raise ValueError(f"request is {size} bytes, over the {MAX_MESSAGE_BYTES}-byte limit")
    return text


# --------------------------------------------------------------------------- replies


@dataclass(frozen=True)
class Reply:
    """A decoded reply. ``result`` is set when ``ok``; ``error_code``/``error_message`` when not."""

    id: str | None
    ok: bool
    result: Any = None
    error_code: str | None = None
    error_message: str | None = None


def ok_reply(id: str | None, result: Any) -> str:
    """``{"v":1,"id":ID,"ok":true,"result":RESULT}``. Raises ValueError/TypeError if not JSON."""
    return _dumps({"v": PROTOCOL_VERSION, "id": id, "ok": True, "result": result})


def error_reply(id: str | None, code: str, message: str) -> str:
    """``{"v":1,"id":ID,"ok":false,"error":{"code":CODE,"message":TEXT}}``.

    *id* is None when the request's id could not be read. Raises ValueError for
    a code not in ERROR_CODES.
    """
    if code not in ERROR_CODES:
        raise ValueError(f"error code must be one of {', '.join(ERROR_CODES)}, got {code!r}")
    if not isinstance(message, str):
        raise TypeError(f"error message must be a string, got {type(message).__name__}")
    return _dumps(
        {
            "v": PROTOCOL_VERSION,
            "id": id,
            "ok": False,
            "error": {"code": code, "message": message},
        }
    )


def decode_reply(data: str | bytes) -> Reply | DecodeError:
    """Parse a reply from the conductor. Never raises. Unknown error codes are kept as sent."""
    obj = _parse_object(data, max_bytes=None, what="reply")
    if isinstance(obj, str):
        return DecodeError(None, "BAD_REQUEST", obj)
    rid = obj.get("id")
    good_id = rid if isinstance(rid, str) else None

    def bad(message: str) -> DecodeError:
        return DecodeError(good_id, "BAD_REQUEST", message)

    v = obj.get("v")
    if not _is_int(v, PROTOCOL_VERSION, PROTOCOL_VERSION):
        return bad(f"reply v must be {PROTOCOL_VERSION}, got {_show(v)}")
    if rid is not None and good_id is None:
        return bad(f"reply id must be a string or null, got {_show(rid)}")
    ok = obj.get("ok")
    if not isinstance(ok, bool):
        return bad(f"reply ok must be true or false, got {_show(ok)}")
    if ok:
        if "result" not in obj:
            return bad("reply with ok true has no result")
        return Reply(id=good_id, ok=True, result=obj["result"])
    error = obj.get("error")
    if not isinstance(error, dict):
        return bad(f"reply error must be an object, got {_json_type(error)}")
    code, message = error.get("code"), error.get("message")
    if not isinstance(code, str) or not code:
        return bad(f"reply error.code must be a non-empty string, got {_show(code)}")
    if not isinstance(message, str):
        return bad(f"reply error.message must be a string, got {_show(message)}")
    return Reply(id=good_id, ok=False, error_code=code, error_message=message)


# --------------------------------------------------------------------------- watch stream


@dataclass(frozen=True)
class EventMessage:
    seq: int
    ts: float
    event: str
    data: dict[str, Any]
    type: Literal["event"] = "event"


@dataclass(frozen=True)
class SnapshotMessage:
    seq: int
    ts: float
    state: dict[str, Any]
    type: Literal["snapshot"] = "snapshot"


WatchMessage = EventMessage | SnapshotMessage


def _check_seq_ts(seq: Any, ts: Any) -> None:
    if not _is_int(seq, 0):
        raise ValueError(f"seq must be an integer >= 0, got {seq!r}")
    if not _is_finite_number(ts):
        raise ValueError(f"ts must be a finite number, got {ts!r}")


def event_message(seq: int, ts: float, event: str, data: dict[str, Any]) -> str:
    """``{"v":1,"type":"event","seq","ts","event","data"}``. Raises ValueError on bad values.

    *event* is a dotted name such as ``replica.ready`` or ``rollout.phase``.
    """
    _check_seq_ts(seq, ts)
    if not isinstance(event, str) or EVENT_NAME_RE.fullmatch(event) is None:
        raise ValueError(f"event must be a dotted name like replica.ready, got {event!r}")
    if not isinstance(data, dict):
        raise ValueError(f"event data must be a dict, got {type(data).__name__}")
    return _dumps(
        {"v": PROTOCOL_VERSION, "type": "event", "seq": seq, "ts": ts, "event": event, "data": data}
    )


def snapshot_message(seq: int, ts: float, state: dict[str, Any]) -> str:
    """``{"v":1,"type":"snapshot","seq","ts","state"}``. Raises ValueError on bad values."""
    _check_seq_ts(seq, ts)
    if not isinstance(state, dict):
        raise ValueError(f"snapshot state must be a dict, got {type(state).__name__}")
    return _dumps({"v": PROTOCOL_VERSION, "type": "snapshot", "seq": seq, "ts": ts, "state": state})


def decode_watch_message(data: str | bytes) -> WatchMessage | DecodeError:
    """Parse one message of ``/v1/watch``. Never raises."""
    obj = _parse_object(data, max_bytes=None, what="watch message")
    if isinstance(obj, str):
        return DecodeError(None, "BAD_REQUEST", obj)

    def bad(message: str) -> DecodeError:
        return DecodeError(None, "BAD_REQUEST", message)

    v = obj.get("v")
    if not _is_int(v, PROTOCOL_VERSION, PROTOCOL_VERSION):
        return bad(f"watch message v must be {PROTOCOL_VERSION}, got {_show(v)}")
    seq, ts, kind = obj.get("seq"), obj.get("ts"), obj.get("type")
    if not _is_int(seq, 0):
        return bad(f"watch message seq must be an integer >= 0, got {_show(seq)}")
    if not _is_finite_number(ts):
        return bad(f"watch message ts must be a finite number, got {_show(ts)}")
    if kind == "event":
        event, payload = obj.get("event"), obj.get("data")
        if not isinstance(event, str) or EVENT_NAME_RE.fullmatch(event) is None:
            return bad(f"event must be a dotted name like replica.ready, got {_show(event)}")
        if not isinstance(payload, dict):
            return bad(f"event data must be an object, got {_json_type(payload)}")
        return EventMessage(seq=seq, ts=float(ts), event=event, data=payload)
    if kind == "snapshot":
        state = obj.get("state")
        if not isinstance(state, dict):
            return bad(f"snapshot state must be an object, got {_json_type(state)}")
        return SnapshotMessage(seq=seq, ts=float(ts), state=state)
    return bad(f'watch message type must be "event" or "snapshot", got {_show(kind)}')


# --------------------------------------------------------------------------- result shapes (§5)
#
# Every producer builds results with these functions, so that the conductor,
# /api/state and the CLI's --json agree on exact keys. Each raises ValueError
# naming the field when a value does not fit the contract.


class ReplicaRow(TypedDict):
    app: str
    replica: str
    node: str | None
    pid: int | None
    port: int | None
    generation: int
    state: str


class NodeRow(TypedDict):
    node: str
    address: str
    cpu_pct: float | None
    ram_free_mb: float | None
    ports: list[int]
    replicas: int
    last_seen_s: float


class RolloutStatus(TypedDict):
    app: str
    state: str
    from_generation: int | None
    to_generation: int
    replaced: int
    total: int
    message: str


class HistoryRow(TypedDict):
    generation: int
    state: str
    started: float
    finished: float | None
    manifest_sha256: str


class UpResult(TypedDict):
    app: str
    generation: int
    replicas: list[ReplicaRow]


class DownResult(TypedDict):
    app: str
    stopped: int


class PingResult(TypedDict):
    pong: str
    version: str


class LogLine(TypedDict):
    replica: str
    ts: float
    stream: str
    text: str


class LogsResult(TypedDict):
    lines: list[LogLine]


class StatusResult(TypedDict):
    nodes: list[NodeRow]
    apps: list[dict[str, Any]]
    replicas: list[ReplicaRow]
    rollouts: list[RolloutStatus]


_SHA256_RE = re.compile(r"[0-9a-f]{64}")


def _need(ok: bool, field: str, expected: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"{field} must be {expected}, got {value!r}")


def _is_str(value: Any) -> bool:
    return isinstance(value, str) and value != ""


def _is_number(value: Any, lo: float = 0) -> bool:
    return _is_finite_number(value) and value >= lo


def replica_row(
    *,
    app: str,
    replica: str,
    node: str | None,
    pid: int | None,
    port: int | None,
    generation: int,
    state: str,
) -> ReplicaRow:
    """A row of ``list --json``. *node*, *pid*, *port* are None until known."""
    _need(_is_app(app), "app", "an app name", app)
    _need(_is_str(replica), "replica", "a non-empty string", replica)
    _need(node is None or _is_str(node), "node", "a node id or None", node)
    _need(pid is None or _is_int(pid, 1), "pid", "a positive integer or None", pid)
    _need(port is None or _is_int(port, 1, 65535), "port", "1..65535 or None", port)
    _need(_is_int(generation, 1), "generation", "an integer >= 1", generation)
    _need(state in REPLICA_STATES, "state", f"one of {', '.join(REPLICA_STATES)}", state)
    return {
        "app": app,
        "replica": replica,
        "node": node,
        "pid": pid,
        "port": port,
        "generation": generation,
        "state": state,
    }


def node_row(
    *,
    node: str,
    address: str,
    cpu_pct: float | None,
    ram_free_mb: float | None,
    ports: list[int] | tuple[int, ...] | set[int] | frozenset[int],
    replicas: int,
    last_seen_s: float,
) -> NodeRow:
    """A row of ``nodes --json``; *ports* (the claimed ports) are sorted here."""
    _need(_is_str(node), "node", "a non-empty string", node)
    _need(isinstance(address, str), "address", "a string", address)
    _need(cpu_pct is None or _is_number(cpu_pct), "cpu_pct", "a number >= 0 or None", cpu_pct)
    _need(
        ram_free_mb is None or _is_number(ram_free_mb),
        "ram_free_mb",
        "a number >= 0 or None",
        ram_free_mb,
    )
    port_list = sorted(ports)
    for port in port_list:
        _need(_is_int(port, 1, 65535), "ports", "port numbers 1..65535", ports)
    _need(_is_int(replicas, 0), "replicas", "an integer >= 0 (a count)", replicas)
    _need(_is_number(last_seen_s), "last_seen_s", "a number >= 0", last_seen_s)
    return {
        "node": node,
        "address": address,
        "cpu_pct": cpu_pct,
        "ram_free_mb": ram_free_mb,
        "ports": port_list,
        "replicas": replicas,
        "last_seen_s": last_seen_s,
    }


def rollout_status(
    *,
    app: str,
    state: str,
    from_generation: int | None,
    to_generation: int,
    replaced: int,
    total: int,
    message: str,
) -> RolloutStatus:
    """The result of ``rollout`` and ``rollout status``."""
    _need(_is_app(app), "app", "an app name", app)
    _need(state in ROLLOUT_STATES, "state", f"one of {', '.join(ROLLOUT_STATES)}", state)
    _need(
        from_generation is None or _is_int(from_generation, 1),
        "from_generation",
        "an integer >= 1 or None",
        from_generation,
    )
    _need(_is_int(to_generation, 1), "to_generation", "an integer >= 1", to_generation)
    _need(
        from_generation is None or to_generation > from_generation,
        "to_generation",
        f"greater than from_generation {from_generation}",
        to_generation,
    )
    _need(_is_int(total, 0), "total", "an integer >= 0", total)
    _need(_is_int(replaced, 0, total), "replaced", f"an integer 0..total ({total})", replaced)
    _need(isinstance(message, str), "message", "a string", message)
    return {
        "app": app,
        "state": state,
        "from_generation": from_generation,
        "to_generation": to_generation,
        "replaced": replaced,
        "total": total,
        "message": message,
    }


def history_row(
    *,
    generation: int,
    state: str,
    started: float,
    finished: float | None,
    manifest_sha256: str,
) -> HistoryRow:
    """A row of ``rollout history --json``. *started*/*finished* are Unix seconds."""
    _need(_is_int(generation, 1), "generation", "an integer >= 1", generation)
    _need(state in ROLLOUT_STATES, "state", f"one of {', '.join(ROLLOUT_STATES)}", state)
    _need(_is_number(started), "started", "Unix seconds (a number >= 0)", started)
    _need(
        finished is None or _is_number(finished),
        "finished",
        "Unix seconds or None",
        finished,
    )
    _need(
        isinstance(manifest_sha256, str) and _SHA256_RE.fullmatch(manifest_sha256) is not None,
        "manifest_sha256",
        "64 lowercase hex characters",
        manifest_sha256,
    )
    return {
        "generation": generation,
        "state": state,
        "started": started,
        "finished": finished,
        "manifest_sha256": manifest_sha256,
    }


def up_result(*, app: str, generation: int, replicas: list[ReplicaRow]) -> UpResult:
    """The result of ``up`` and ``scale``."""
    _need(_is_app(app), "app", "an app name", app)
    _need(_is_int(generation, 1), "generation", "an integer >= 1", generation)
    _need(isinstance(replicas, list), "replicas", "a list of replica rows", replicas)
    return {"app": app, "generation": generation, "replicas": list(replicas)}


def down_result(*, app: str, stopped: int) -> DownResult:
    _need(_is_app(app), "app", "an app name", app)
    _need(_is_int(stopped, 0), "stopped", "an integer >= 0", stopped)
    return {"app": app, "stopped": stopped}


def ping_result(*, version: str) -> PingResult:
    _need(_is_str(version), "version", "a non-empty string", version)
    return {"pong": "conductor", "version": version}


def log_line(*, replica: str, ts: float, stream: str, text: str) -> LogLine:
    _need(_is_str(replica), "replica", "a non-empty string", replica)
    _need(_is_number(ts), "ts", "Unix seconds (a number >= 0)", ts)
    _need(stream in LOG_STREAMS, "stream", "stdout or stderr", stream)
    _need(isinstance(text, str), "text", "a string", text)
    return {"replica": replica, "ts": ts, "stream": stream, "text": text}


def logs_result(*, lines: list[LogLine]) -> LogsResult:
    _need(isinstance(lines, list), "lines", "a list of log lines", lines)
    return {"lines": list(lines)}


def status_result(
    *,
    nodes: list[NodeRow],
    apps: list[dict[str, Any]],
    replicas: list[ReplicaRow],
    rollouts: list[RolloutStatus],
) -> StatusResult:
    """The result of ``status`` (and the body of ``/api/state``)."""
    for name, value in (
        ("nodes", nodes),
        ("apps", apps),
        ("replicas", replicas),
        ("rollouts", rollouts),
    ):
        _need(isinstance(value, list), name, "a list", value)
    return {
        "nodes": list(nodes),
        "apps": list(apps),
        "replicas": list(replicas),
        "rollouts": list(rollouts),
    }
