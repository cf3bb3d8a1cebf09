"""Wire messages: requests and replies on ``/v1/cli``, events on ``/v1/watch``.

Receiving a request is three steps, in this order; each stops at the first
problem and answers with one error:

1. ``decode_envelope`` -> ``BAD_REQUEST``: the frame. Size (at most
   MAX_MESSAGE_BYTES of UTF-8), UTF-8, one JSON object (no NaN/Infinity, no
   duplicate keys), ``v == 1``, ``id`` and ``cmd``. Until these hold we do not
   know what the message is, whether it needs a signature, or what id to echo.
2. Authentication, for SIGNED_COMMANDS only -> ``UNAUTHORIZED`` / ``EXPIRED`` /
   ``REPLAY``: the key, its role and the signature (``authenticate_request``),
   then the clock and the nonce (``admit_request``). It runs before any
   argument is looked at, so an unsigned or forged mutating request is
   UNAUTHORIZED whatever its arguments, and the nonce is spent as soon as the
   signature verifies, whatever the command's outcome.
3. ``validate_request`` -> ``BAD_REQUEST``: no unknown top-level fields,
   ``args`` checked against the command's table (unknown keys named, defaults
   filled in), and for read-only commands the signature fields, if present,
   well-formed. For signed commands this step does not judge ``key``/``sig``/
   ``ts``/``nonce`` (step 2 did); they are passed through when well-formed,
   else as None.

The conductor calls ``authenticate_request`` (which touches no shared state, so
a worker thread may run it) and then ``admit_request``, which runs the rest.
None of them raises, whatever the input. A client builds what it sends with
``request_message``.

Outgoing messages (replies, events, snapshots) are produced by functions
that validate what they are given and raise ValueError on a producer bug;
they are ASCII JSON, so any text (even a lone surrogate) can be sent.
Decoders on the client side (replies, watch messages) ignore unknown fields.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from skr8tr.core.signatures import Signer

from skr8tr.core.command_args import ARG_SPECS, check_args
from skr8tr.core.envelope import (
    COMMANDS,
    READ_ONLY_COMMANDS,
    SIGNED_COMMANDS,
    AuthError,
    ReplayGuard,
    check_signature,
    is_nonce,
    new_nonce,
    sign_request,
)
from skr8tr.core.keys import AuthorizedKeys
from skr8tr.core.names import APP_NAME_RE, MAX_ID_CHARS
from skr8tr.core.signatures import is_public_key, is_signature
from skr8tr.core.wire_json import (
    dumps,
    is_finite_number,
    is_int,
    is_text,
    json_type,
    parse_object,
    show,
)

__all__ = [
    "MAX_MESSAGE_BYTES",
    "PROTOCOL_VERSION",
    "ERROR_CODES",
    "COMMANDS",
    "SIGNED_COMMANDS",
    "READ_ONLY_COMMANDS",
    "ARG_SPECS",
    "MAX_ID_CHARS",
    "APP_NAME_RE",
    "EVENT_NAME_RE",
    "ROLLOUT_FINAL_STATES",
    "ROLLOUT_STATES",
    "DecodeError",
    "Envelope",
    "Request",
    "Authenticated",
    "Reply",
    "EventMessage",
    "SnapshotMessage",
    "WatchMessage",
    "decode_envelope",
    "validate_request",
    "authenticate_request",
    "admit_request",
    "request_message",
    "ok_reply",
    "error_reply",
    "decode_reply",
    "event_message",
    "snapshot_message",
    "decode_watch_message",
    "not_leader_watch_message",
    "WatchError",
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
    "NOT_LEADER",  # a follower conductor: the error object also has "leader": URL or null
    "UNAVAILABLE",  # the conductor cannot reach its store (etcd) to keep its leadership
)
EVENT_NAME_RE = re.compile(r"[a-z]+(\.[a-z_]+)+")

ROLLOUT_STATES = ("rolling", "complete", "aborted", "failed", "rolled_back")
ROLLOUT_FINAL_STATES = ROLLOUT_STATES[1:]  # a rollout in one of these has ended

REQUEST_FIELDS = ("v", "id", "cmd", "args", "ts", "nonce", "key", "sig")
_MISSING = object()


@dataclass(frozen=True)
class DecodeError:
    """A message that cannot be accepted, as the error reply to send.

    ``id`` is the request's id when the message carried a valid one, else None.
    ``code`` is BAD_REQUEST from the decoders; authentication may also
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
    ``signer`` is the key's fingerprint when ``authenticate_request`` verified a signature.
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


# --------------------------------------------------------------------------- requests


def _is_id(value: Any) -> bool:
    return is_text(value) and 0 < len(value) <= MAX_ID_CHARS



def decode_envelope(data: str | bytes) -> Envelope | DecodeError:
    """Step 1: check the frame of a request (module docstring). Never raises."""
    obj = parse_object(data, max_bytes=MAX_MESSAGE_BYTES, what="message")
    if isinstance(obj, str):
        return DecodeError(None, "BAD_REQUEST", obj)
    rid = obj.get("id")
    good_id = rid if _is_id(rid) else None

    def bad(message: str) -> DecodeError:
        return DecodeError(good_id, "BAD_REQUEST", message)

    v = obj.get("v", _MISSING)
    if v is _MISSING:
        return bad(f"v is required (the protocol version, {PROTOCOL_VERSION})")
    if isinstance(v, bool) or not isinstance(v, int) or v != PROTOCOL_VERSION:
        return bad(f"v must be {PROTOCOL_VERSION} (the protocol version), got {show(v)}")
    if "id" not in obj:
        return bad("id is required (a string echoed in the reply)")
    if good_id is None:
        return bad(f"id must be a string of 1..{MAX_ID_CHARS} characters, got {show(rid)}")
    cmd = obj.get("cmd", _MISSING)
    if cmd is _MISSING:
        return bad("cmd is required")
    if not isinstance(cmd, str) or cmd not in COMMANDS:
        return bad(f"unknown cmd {show(cmd)} (expected one of: {', '.join(sorted(COMMANDS))})")
    return Envelope(id=good_id, cmd=cmd, raw=obj)


def validate_request(envelope: Envelope, authenticated: bool = False) -> Request | DecodeError:
    """Step 3: check fields and args of an envelope (module docstring). Never raises.

    For a SIGNED_COMMANDS request, call this only after ``verify_request``
    accepted ``envelope.raw`` (``admit_request`` does both).
    """
    raw = envelope.raw

    def bad(message: str) -> DecodeError:
        return DecodeError(envelope.id, "BAD_REQUEST", message)

    unknown = [k for k in raw if k not in REQUEST_FIELDS]
    if unknown:
        return bad(
            f"unknown field {show(unknown[0])} in request (expected: {', '.join(REQUEST_FIELDS)})"
        )
    if "args" not in raw:
        return bad("args is required (an object; {} when the command takes none)")
    args = check_args(envelope.cmd, raw["args"])
    if isinstance(args, str):
        return bad(args)

    ts, nonce, key, sig = (raw.get(name) for name in ("ts", "nonce", "key", "sig"))
    if envelope.cmd in SIGNED_COMMANDS:
        # Authentication has judged these already; keep what is well-formed.
        ts = float(ts) if is_finite_number(ts) else None
        nonce = nonce if is_nonce(nonce) else None
        if not authenticated:
            key = key if is_public_key(key) else None
            sig = sig if is_signature(sig) else None
    else:
        if ts is not None and not is_finite_number(ts):
            return bad(f"ts must be a finite number (seconds since the epoch), got {show(ts)}")
        if nonce is not None and not is_nonce(nonce):
            return bad(f"nonce must be 16..128 lowercase hex characters, got {show(nonce)}")
        if key is not None and not is_public_key(key):
            return bad(f"key must be a public key as in signing.pub ([ALG:]lowercase hex), "
                       f"got {show(key)}")
        if sig is not None and not is_signature(sig):
            return bad(f"sig must be a signature in lowercase hex, got {show(sig)}")
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


@dataclass(frozen=True)
class Authenticated:
    """A decoded envelope whose signature, when its command needs one, is good
    (``signer``, the key's fingerprint; None for read-only commands and ``--insecure``).
    The replay guard has not judged it yet: see :func:`admit_request`."""

    envelope: Envelope
    signer: str | None
    #: The signer's key text as the authorized keys hold it: one shared string, so that
    #: the replay guard keeps one copy of a 4 KB post-quantum key, not one per nonce.
    key: str | None = None


def authenticate_request(data: str | bytes, *, authorized: AuthorizedKeys,
                         insecure: bool = False) -> Authenticated | DecodeError:
    """The first half of accepting a request: the frame and, for SIGNED_COMMANDS, the
    UNAUTHORIZED checks (key, role, signature). Nothing after the frame is parsed or
    looked at before the signature verified. Touches no shared state (a worker thread
    may run it for a large message). Never raises."""
    envelope = decode_envelope(data)
    if isinstance(envelope, DecodeError):
        return envelope
    signer = key = None
    if envelope.cmd in SIGNED_COMMANDS and not insecure:
        try:
            signer = check_signature(envelope.raw, authorized=authorized)
        except AuthError as exc:
            return _refused(envelope, exc)
        entry = authorized.entry(envelope.raw["key"])
        assert entry is not None  # check_signature found it
        key = entry.pub_hex
    return Authenticated(envelope, signer, key)


def admit_request(auth: Authenticated | DecodeError, *, guard: ReplayGuard,
                  now: float) -> Request | DecodeError:
    """The second half of accepting a request: the replay guard (EXPIRED, REPLAY; a
    nonce is spent here) for signed requests, then the fields and args. Never raises."""
    if isinstance(auth, DecodeError):
        return auth
    envelope = auth.envelope
    if auth.signer is not None:
        raw = envelope.raw
        key = auth.key if auth.key is not None else raw["key"]
        try:
            guard.check(key, raw["nonce"], raw["ts"], now)
        except AuthError as exc:
            return _refused(envelope, exc)
        guard.spend(key, raw["nonce"], raw["ts"], now)
    request = validate_request(envelope, authenticated=auth.signer is not None)
    if isinstance(request, DecodeError):
        return request
    return replace(request, signer=auth.signer)


def _refused(envelope: Envelope, exc: AuthError) -> DecodeError:
    key = envelope.raw.get("key")
    return DecodeError(envelope.id, exc.code, exc.message, cmd=envelope.cmd,
                       key=key if is_public_key(key) else None, args=envelope.raw.get("args"))


def request_message(
    *,
    id: str,
    cmd: str,
    args: dict[str, Any],
    signing_key: Signer | None = None,
    ts: float | None = None,
    nonce: str | None = None,
) -> dict[str, Any]:
    """A request as the dict to send as JSON: ``{"v":1,"id","cmd","args"}``, and with a
    *signing_key* also ``ts``, ``nonce``, ``key`` and ``sig`` (:func:`envelope.sign_request`).

    A signed request needs *ts*, the caller's reading of the clock (ValueError without a
    finite one); *nonce* defaults to a fresh one. *args* go as given: the conductor judges
    them and answers BAD_REQUEST, so a client never refuses what only the conductor decides.
    """
    if signing_key is None:
        return {"v": PROTOCOL_VERSION, "id": id, "cmd": cmd, "args": args}
    if ts is None or not is_finite_number(ts):
        raise ValueError(f"a signed request needs ts, a finite number; got {ts!r}")
    return sign_request(signing_key, id=id, cmd=cmd, args=args, ts=ts,
                        nonce=nonce if nonce is not None else new_nonce())


# --------------------------------------------------------------------------- replies


@dataclass(frozen=True)
class Reply:
    """A decoded reply. ``result`` is set when ``ok``; ``error_code``/``error_message`` when not."""

    id: str | None
    ok: bool
    result: Any = None
    error_code: str | None = None
    error_message: str | None = None
    error_leader: str | None = None  # NOT_LEADER: the leader's URL when the follower knows it


def ok_reply(id: str | None, result: Any) -> str:
    """``{"v":1,"id":ID,"ok":true,"result":RESULT}``. Raises ValueError/TypeError if not JSON."""
    return dumps({"v": PROTOCOL_VERSION, "id": id, "ok": True, "result": result})


def error_reply(id: str | None, code: str, message: str, *,
                leader: str | None = None) -> str:
    """``{"v":1,"id":ID,"ok":false,"error":{"code":CODE,"message":TEXT}}``.

    *id* is None when the request's id could not be read. A ``NOT_LEADER`` error
    also carries ``"leader"``: the leader's URL, or null while none is known.
    Raises ValueError for a code not in ERROR_CODES.
    """
    if code not in ERROR_CODES:
        raise ValueError(f"error code must be one of {', '.join(ERROR_CODES)}, got {code!r}")
    if not isinstance(message, str):
        raise TypeError(f"error message must be a string, got {type(message).__name__}")
    error: dict[str, Any] = {"code": code, "message": message}
    if code == "NOT_LEADER":
        error["leader"] = leader
    return dumps({"v": PROTOCOL_VERSION, "id": id, "ok": False, "error": error})


def not_leader_watch_message(message: str, leader: str | None) -> str:
    """The one message a follower sends on ``/v1/watch`` before it closes:
    ``{"v":1,"type":"error","error":{"code":"NOT_LEADER","message","leader"}}``."""
    return dumps({"v": PROTOCOL_VERSION, "type": "error",
                  "error": {"code": "NOT_LEADER", "message": message, "leader": leader}})


def decode_reply(data: str | bytes) -> Reply | DecodeError:
    """Parse a reply from the conductor. Never raises. Unknown error codes are kept as sent."""
    obj = parse_object(data, max_bytes=None, what="reply")
    if isinstance(obj, str):
        return DecodeError(None, "BAD_REQUEST", obj)
    rid = obj.get("id")
    good_id = rid if isinstance(rid, str) else None

    def bad(message: str) -> DecodeError:
        return DecodeError(good_id, "BAD_REQUEST", message)

    v = obj.get("v")
    if not is_int(v, PROTOCOL_VERSION, PROTOCOL_VERSION):
        return bad(f"reply v must be {PROTOCOL_VERSION}, got {show(v)}")
    if rid is not None and good_id is None:
        return bad(f"reply id must be a string or null, got {show(rid)}")
    ok = obj.get("ok")
    if not isinstance(ok, bool):
        return bad(f"reply ok must be true or false, got {show(ok)}")
    if ok:
        if "result" not in obj:
            return bad("reply with ok true has no result")
        return Reply(id=good_id, ok=True, result=obj["result"])
    error = obj.get("error")
    if not isinstance(error, dict):
        return bad(f"reply error must be an object, got {json_type(error)}")
    code, message = error.get("code"), error.get("message")
    if not isinstance(code, str) or not code:
        return bad(f"reply error.code must be a non-empty string, got {show(code)}")
    if not isinstance(message, str):
        return bad(f"reply error.message must be a string, got {show(message)}")
    leader = error.get("leader")
    if leader is not None and not isinstance(leader, str):
        return bad(f"reply error.leader must be a string or null, got {show(leader)}")
    return Reply(id=good_id, ok=False, error_code=code, error_message=message,
                 error_leader=leader)


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


@dataclass(frozen=True)
class WatchError:
    """A conductor that cannot serve the stream (a follower: ``NOT_LEADER``) says so in
    its first message and closes; ``leader`` is where to go, None while unknown."""

    code: str
    message: str
    leader: str | None
    type: Literal["error"] = "error"


WatchMessage = EventMessage | SnapshotMessage | WatchError


def _check_seq_ts(seq: Any, ts: Any) -> None:
    if not is_int(seq, 0):
        raise ValueError(f"seq must be an integer >= 0, got {seq!r}")
    if not is_finite_number(ts):
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
    return dumps(
        {"v": PROTOCOL_VERSION, "type": "event", "seq": seq, "ts": ts, "event": event, "data": data}
    )


def snapshot_message(seq: int, ts: float, state: dict[str, Any]) -> str:
    """``{"v":1,"type":"snapshot","seq","ts","state"}``. Raises ValueError on bad values."""
    _check_seq_ts(seq, ts)
    if not isinstance(state, dict):
        raise ValueError(f"snapshot state must be a dict, got {type(state).__name__}")
    return dumps({"v": PROTOCOL_VERSION, "type": "snapshot", "seq": seq, "ts": ts, "state": state})


def decode_watch_message(data: str | bytes) -> WatchMessage | DecodeError:
    """Parse one message of ``/v1/watch``. Never raises."""
    obj = parse_object(data, max_bytes=None, what="watch message")
    if isinstance(obj, str):
        return DecodeError(None, "BAD_REQUEST", obj)

    def bad(message: str) -> DecodeError:
        return DecodeError(None, "BAD_REQUEST", message)

    v = obj.get("v")
    if not is_int(v, PROTOCOL_VERSION, PROTOCOL_VERSION):
        return bad(f"watch message v must be {PROTOCOL_VERSION}, got {show(v)}")
    if obj.get("type") == "error":
        error = obj.get("error")
        if not isinstance(error, dict):
            return bad(f"watch error must be an object, got {json_type(error)}")
        code, message, leader = error.get("code"), error.get("message"), error.get("leader")
        if not isinstance(code, str) or not code or not isinstance(message, str):
            return bad("watch error needs a non-empty code and a message")
        if leader is not None and not isinstance(leader, str):
            return bad(f"watch error leader must be a string or null, got {show(leader)}")
        return WatchError(code=code, message=message, leader=leader)
    seq, ts, kind = obj.get("seq"), obj.get("ts"), obj.get("type")
    if not is_int(seq, 0):
        return bad(f"watch message seq must be an integer >= 0, got {show(seq)}")
    if not is_finite_number(ts):
        return bad(f"watch message ts must be a finite number, got {show(ts)}")
    if kind == "event":
        event, payload = obj.get("event"), obj.get("data")
        if not isinstance(event, str) or EVENT_NAME_RE.fullmatch(event) is None:
            return bad(f"event must be a dotted name like replica.ready, got {show(event)}")
        if not isinstance(payload, dict):
            return bad(f"event data must be an object, got {json_type(payload)}")
        return EventMessage(seq=seq, ts=float(ts), event=event, data=payload)
    if kind == "snapshot":
        state = obj.get("state")
        if not isinstance(state, dict):
            return bad(f"snapshot state must be an object, got {json_type(state)}")
        return SnapshotMessage(seq=seq, ts=float(ts), state=state)
    return bad(f'watch message type must be "event", "snapshot" or "error", got {show(kind)}')
