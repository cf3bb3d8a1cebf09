"""Messages between the conductor and a node agent on ``/v1/node``.

Every message is one JSON text ``{"v":1,"type":TYPE,...fields}``. A session:

1. conductor -> node ``challenge`` {nonce, term}: 32 random bytes, hex; ``term``
   is the conductor's leadership term (0 for a lone conductor, else the etcd
   revision at which it became leader). A node remembers the highest term it has
   been welcomed under and closes a session offered under a lower one: a deposed
   leader cannot command it. A follower conductor sends instead ``refused``
   {code: "NOT_LEADER", message, leader: URL or null} and closes.
2. node -> conductor ``hello`` {node_id, key, sig, version, address, cores,
   ram_total_mb, ram_free_mb, cpu_pct, replicas}: ``sig`` signs the challenge
   and the node id (:func:`skr8tr.core.envelope.sign_challenge`) with a key the
   conductor trusts in the ``node`` role; ``replicas`` lists what the agent is
   already running (after a reconnect) as ``replica`` reports.
3. conductor -> node ``welcome`` {node_id, heartbeat_s, term}, or ``refused``
   {code, message} followed by a close.
4. Then, in any order:
   - node -> conductor ``heartbeat`` {cpu_pct, ram_free_mb, ram_total_mb, cores}
     every ``heartbeat_s`` seconds;
   - conductor -> node ``launch`` {replica, app, generation, app_type, exec, args, env,
     workdir, port, host, health, settle_ms, stop_grace_ms, token, slot}: one replica to
     start, defined once as :class:`Launch` (which says where each field comes
     from in the manifest and what the node does with it); ``slot`` (optional) is
     the slot a restarted replica takes over, sent back in its reports;
   - conductor -> node ``stop`` {replica}: SIGTERM to the process group,
     ``stop_grace_ms``, SIGKILL, wait;
   - node -> conductor ``replica`` {replica, app, generation, state, pid, port,
     exit_code, signal, message, ts, token, slot}: every state change of a replica
     (``slot`` only when its launch carried one). States:
     ``running`` (spawned), ``ready`` (health check passing, or alive for
     ``settle_ms`` without one), ``unhealthy`` (``retries`` probes failed after
     it was ready), ``exited`` (with exit_code or signal), ``failed`` (could not
     be launched: missing executable, bad workdir, port in use; ``message``
     carries the OS error and ``reason`` is ``port_in_use`` or ``launch_error``).
     While health probes run, a report may carry ``probe`` {text, status, count}, the
     last probe's outcome, in the replica's current state (a report with a probe and
     no change of state is news about probes only);
   - conductor -> node ``logs`` {req, app, replica, tail} and node -> conductor
     ``logs_reply`` {req, lines:[{replica, ts, stream, text, seq}]}; ``seq`` numbers a
     replica's lines on that node (1, 2, ...). With ``follow`` true the request
     also subscribes: after the reply the node pushes ``logs_push`` {req, lines,
     skipped} as it reads new lines of the app (replicas launched later join),
     ``skipped`` counting lines it dropped after these for a reader that did not keep up,
     until the conductor sends ``logs_unfollow`` {req} or the session ends. A
     resumed follow sends ``after`` {replica: last seq shown} (and ``since``, a
     time): the reply then holds the lines after those instead of a tail;
   - conductor -> node ``app_gone`` {app}: the app was removed (``down``); the node
     deletes its log files (at once for finished replicas, at their exit for the
     others).

Each type of message is a frozen dataclass (a :class:`NodeMessage`: :class:`Challenge`,
:class:`Hello`, :class:`Welcome`, :class:`Refused`, :class:`Heartbeat`, :class:`Launch`,
:class:`Stop`, :class:`ReplicaReport`, :class:`LogsRequest`, :class:`LogsReply`,
:class:`LogsPush`, :class:`LogsUnfollow`, :class:`AppGone`): its
producer builds one and sends :meth:`NodeMessage.encode`. Decoding never raises:
:func:`decode_node_message` returns the typed message or a :class:`NodeDecodeError`
that the receiver logs and answers.

Every field a node sends is bounded (the ``MAX_*`` constants, units in their
names), so that one node key cannot grow the conductor's state, and with it
``status``, ``/api/state`` and ``/v1/watch``, past what their clients accept:
``address`` is a host name or an IP address, ids and app names have the
shapes the conductor gives them, texts and lists have a length, numbers a
range. An error names the field and the limit, and quotes at most
:data:`SHOWN_VALUE_CHARS` characters of the value.

Why one module of ~950 lines: it is the whole node wire, every message and every
field's bound side by side, so that a reviewer checking what a node key holder can
send reads one file; split by message, the shared validators and limits would be
imported back and forth.
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
import reprlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, ClassVar, TypeVar

from skr8tr.core import names

# The model only (not the parser): the node agent imports this module.
from skr8tr.core.manifest_model import MAX_DURATION_MS, MAX_RETRIES, HealthCheck, Manifest
from skr8tr.core.names import APP_NAME_MAX_CHARS, APP_NAME_RE
from skr8tr.core.signatures import is_public_key, is_signature
from skr8tr.core.why import MAX_REASON_CHARS

PROTOCOL_VERSION = 1
MAX_NODE_MESSAGE_BYTES = 1024 * 1024

# Bounds of what a node reports (hello, heartbeat, replica, logs_reply).
MAX_ID_CHARS = names.MAX_ID_CHARS  # node ids, replica ids, logs request ids
MAX_APP_NAME_CHARS = APP_NAME_MAX_CHARS  # as in a manifest
MAX_ADDRESS_CHARS = 253  # a host name (RFC 1123) or an IP address
MAX_VERSION_CHARS = 64
MAX_REPORT_MESSAGE_CHARS = 4096  # a replica report's message (the agent cuts it: ReplicaReport.fit)
MAX_PROBE_TEXT_CHARS = 200  # a replica report's last probe result, "GET /healthz -> 404, want 200"
MAX_PROBE_COUNT = 2**31 - 1  # how many probes in a row had that outcome
MAX_LOG_TEXT_CHARS = 64 * 1024  # one log line (the agent cuts lines at 64 KiB)
MAX_LOG_LINES = 100_000  # lines in one logs_reply: the largest tail a logs request asks for
MAX_LOG_SEQ = 2**53  # a line's number in its replica's output
MAX_FOLLOW_AFTER = 10_000  # replicas named in a resumed follow's ``after``
MAX_SKIPPED = 2**53
MAX_HELLO_REPLICAS = 10_000  # replica reports in one hello
MAX_TERM = 2**63 - 1  # a leadership term: an etcd revision (int64)
MAX_CORES = 65_536
MAX_RAM_MB = 2**30  # 1 PiB
MAX_CPU_PCT = 100.0  # of the whole machine
MAX_PID = 2**22  # Linux's PID_MAX_LIMIT; the BSDs and macOS stay below 100,000
MAX_EXIT_CODE = 255  # a POSIX exit status (a death by signal is reported as the signal)
MAX_SIGNAL_NUMBER = 128
MAX_PORT = 65_535
MAX_GENERATION = 2**53  # the largest integer a JSON double holds exactly
MAX_RESTARTS = 2**31 - 1  # restarts counted in one slot (Launch.slot)
MAX_TS_S = 1e12  # seconds since the epoch
SHOWN_VALUE_CHARS = 40  # of a bad value, quoted in an error message

PLACEMENT_TOKEN_HEX = 32  # skr8tr.core.placement_token.TOKEN_HEX
REPORTED_STATES = ("running", "ready", "unhealthy", "exited", "failed")
# Fields whose values may be secret: an error about them names the field only.
SECRET_FIELDS = frozenset({"env"})

_HEX_RE = re.compile(r"[0-9a-f]+")
_ID_RE = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{MAX_ID_CHARS - 1}}}")
_APP_RE = APP_NAME_RE
_VERSION_RE = re.compile(rf"[\x21-\x7e]{{1,{MAX_VERSION_CHARS}}}")  # printable ASCII, no space
_HOST_LABEL_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_ZONE_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")  # an IPv6 zone: an interface name or index
_ENVELOPE_KEYS = frozenset({"v", "type"})

_SHOWN = reprlib.Repr()
_SHOWN.maxstring = _SHOWN.maxlong = _SHOWN.maxother = SHOWN_VALUE_CHARS
_SHOWN.maxlist = _SHOWN.maxdict = 4
_SHOWN.maxlevel = 2


@dataclass(frozen=True)
class NodeDecodeError:
    """A message that could not be decoded; ``message`` says which field and why."""

    message: str


def is_host_or_ip(value: Any) -> bool:
    """True for a host name (RFC 1123 labels, at most :data:`MAX_ADDRESS_CHARS`
    characters) or an IPv4 or IPv6 address (without brackets; an IPv6 address may
    carry a zone, ``fe80::1%eth0``). A name whose last label is all digits must be
    an IPv4 address (RFC 3696 §2): ``999.1.1.1`` is refused."""
    if not isinstance(value, str) or not 0 < len(value) <= MAX_ADDRESS_CHARS:
        return False
    address, percent, zone = value.partition("%")
    if percent:
        try:
            ipaddress.IPv6Address(address)
        except ValueError:
            return False
        return _ZONE_RE.fullmatch(zone) is not None
    try:
        ipaddress.ip_address(value)
    except ValueError:
        labels = value.split(".")
        return (all(_HOST_LABEL_RE.fullmatch(label) for label in labels)
                and not labels[-1].isdigit())
    return True


Check = Callable[[Any], bool]


@dataclass(frozen=True)
class _Rule:
    """A check that says what it expects (and, for a list, which item is wrong)."""

    test: Check
    expected: str
    explain: Callable[[str, Any], str] | None = None  # (field name, bad value) -> problem

    def __call__(self, v: Any) -> bool:
        return self.test(v)


def _shown(v: Any) -> str:
    """*v* for an error message: at most a few dozen characters, and its size if larger."""
    text = _SHOWN.repr(v)
    if isinstance(v, str) and len(v) > SHOWN_VALUE_CHARS:
        text += f" ({len(v)} characters)"
    elif isinstance(v, list | dict) and len(v) > _SHOWN.maxlist:
        text += f" ({len(v)} items)"
    return text


_str = _Rule(lambda v: isinstance(v, str), "a string")


def _text(max_chars: int) -> _Rule:
    return _Rule(lambda v: isinstance(v, str) and len(v) <= max_chars,
                 f"a string of at most {max_chars} characters")


_ident = _Rule(lambda v: (isinstance(v, str) and len(v) <= MAX_ID_CHARS
                          and _ID_RE.fullmatch(v) is not None),
               f"1 to {MAX_ID_CHARS} characters of A-Z a-z 0-9 . _ - "
               "starting with a letter or digit")
_app_name = _Rule(lambda v: (isinstance(v, str) and len(v) <= MAX_APP_NAME_CHARS
                             and _APP_RE.fullmatch(v) is not None),
                  f"an app name: 1 to {MAX_APP_NAME_CHARS} characters of a-z 0-9 - "
                  "starting with a letter or digit")
# A node stopping a replica it never knew reports it with app "" (its app is unknown).
_reported_app = _Rule(lambda v: v == "" or _app_name(v),
                      f"'' or {_app_name.expected}")
_version = _Rule(lambda v: (isinstance(v, str) and len(v) <= MAX_VERSION_CHARS
                            and _VERSION_RE.fullmatch(v) is not None),
                 f"1 to {MAX_VERSION_CHARS} printable ASCII characters without spaces")
_address = _Rule(is_host_or_ip, f"a host name (RFC 1123, at most {MAX_ADDRESS_CHARS} "
                                "characters) or an IP address")


def _hex(length: int) -> _Rule:
    return _Rule(lambda v: (isinstance(v, str) and len(v) == length
                            and _HEX_RE.fullmatch(v) is not None),
                 f"{length} lowercase hex digits")


_public_key = _Rule(is_public_key, "a public key as in signing.pub ([ALG:]lowercase hex)")
_signature = _Rule(is_signature, "a signature in lowercase hex (Ed25519, ML-DSA-65 or both)")


def _int(lo: int, hi: int) -> _Rule:
    return _Rule(lambda v: isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi,
                 f"an integer from {lo} to {hi}")


def _num(lo: float, hi: float) -> _Rule:
    return _Rule(lambda v: (isinstance(v, int | float) and not isinstance(v, bool)
                            and math.isfinite(v) and lo <= v <= hi),
                 f"a finite number from {lo:g} to {hi:g}")


def _opt(check: Check) -> _Rule:
    test = check.test if isinstance(check, _Rule) else check  # one call less per value
    return _Rule(lambda v: v is None or test(v),
                 f"null or {getattr(check, 'expected', 'another value')}")


def _one_of(*values: str) -> _Rule:
    return _Rule(lambda v: v in values, f"one of {', '.join(map(repr, values))}")


def _list_of(item_problem: Callable[[Any], str | None], max_items: int, what: str) -> _Rule:
    """A list of at most *max_items* items in which *item_problem* finds nothing wrong."""
    def test(v: Any) -> bool:
        return (isinstance(v, list) and len(v) <= max_items
                and all(item_problem(x) is None for x in v))

    def explain(name: str, v: Any) -> str:
        if not isinstance(v, list):
            return (f"bad value for {name!r}: {_shown(v)}; expected a list of at most "
                    f"{max_items} {what}")
        if len(v) > max_items:
            return f"{name!r} has {len(v)} {what}, over the limit of {max_items}"
        for i, x in enumerate(v):
            problem = item_problem(x)
            if problem is not None:
                return f"{name}[{i}]: {problem}"
        return f"bad value for {name!r}"

    return _Rule(test, f"a list of at most {max_items} {what}", explain)


def _str_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _str_dict(v: Any) -> bool:
    return isinstance(v, dict) and all(isinstance(k, str) and isinstance(x, str)
                                       for k, x in v.items())


# A launch carries what a manifest allows, no more and no less: the bounds are the
# manifest's (a duration up to 30 days, at most MAX_RETRIES probes).
_duration_ms = _int(0, MAX_DURATION_MS)
_positive_duration_ms = _int(1, MAX_DURATION_MS)
_HEALTH_FIELDS = ("path", "expect_status", "interval_ms", "timeout_ms", "retries")


def _health(v: Any) -> bool:
    if v is None:
        return True
    return (isinstance(v, dict) and set(v) == set(_HEALTH_FIELDS)
            and _str(v["path"]) and _int(100, 599)(v["expect_status"])
            and _positive_duration_ms(v["interval_ms"])
            and _positive_duration_ms(v["timeout_ms"])
            and _int(1, MAX_RETRIES)(v["retries"]))


_health_rule = _Rule(_health, "null or {path, expect_status 100..599, interval_ms and "
                              f"timeout_ms 1..{MAX_DURATION_MS}, retries 1..{MAX_RETRIES}}}")


_LOG_LINE_FIELDS: dict[str, tuple[Check, bool]] = {
    "replica": (_ident, True),
    "ts": (_num(0, MAX_TS_S), True),
    "stream": (_one_of("stdout", "stderr"), True),
    "text": (_text(MAX_LOG_TEXT_CHARS), True),
    "seq": (_int(1, MAX_LOG_SEQ), False),
}
_log_lines = _list_of(lambda x: _check_fields(x, _LOG_LINE_FIELDS, envelope=False),
                      MAX_LOG_LINES, "lines")


_after_rule = _Rule(
    lambda v: (isinstance(v, dict) and len(v) <= MAX_FOLLOW_AFTER
               and all(_ident(k) and _int(0, MAX_LOG_SEQ)(x) for k, x in v.items())),
    f"an object of at most {MAX_FOLLOW_AFTER} replica ids -> line numbers 0..{MAX_LOG_SEQ}")


_REPLICA_FIELDS: dict[str, tuple[Check, bool]] = {
    "replica": (_ident, True),
    "app": (_reported_app, True),
    "generation": (_int(1, MAX_GENERATION), True),
    "state": (_one_of(*REPORTED_STATES), True),
    "pid": (_opt(_int(1, MAX_PID)), False),
    "port": (_opt(_int(1, MAX_PORT)), False),
    "exit_code": (_opt(_int(0, MAX_EXIT_CODE)), False),
    "signal": (_opt(_int(1, MAX_SIGNAL_NUMBER)), False),
    "message": (_opt(_text(MAX_REPORT_MESSAGE_CHARS)), False),
    # why a launch failed: "port_in_use" (the conductor picks another port) or
    # "launch_error" (missing executable, permission, bad workdir)
    "reason": (_opt(_one_of("port_in_use", "launch_error")), False),
    "ts": (_num(0, MAX_TS_S), True),
    # the placement token its launch carried (skr8tr/core/placement_token.py)
    "token": (_opt(_hex(PLACEMENT_TOKEN_HEX)), False),
}

_PROBE_FIELDS: dict[str, tuple[Check, bool]] = {
    "text": (_text(MAX_PROBE_TEXT_CHARS), True),
    # the HTTP status of a complete response, or null when none came (refused, timeout)
    "status": (_opt(_int(100, 599)), True),
    "count": (_int(1, MAX_PROBE_COUNT), True),
}


def _probe(v: Any) -> bool:
    return v is None or _check_fields(v, _PROBE_FIELDS, envelope=False) is None


_probe_rule = _Rule(_probe, f"null or {{text: at most {MAX_PROBE_TEXT_CHARS} characters, "
                            f"status: null or 100..599, count: 1..{MAX_PROBE_COUNT}}}")

_REPLICA_FIELDS["probe"] = (_probe_rule, False)  # the last health probe (ReplicaReport.probe)

# A replica's slot as the conductor gave it in its launch (Launch.slot), sent back
# unchanged in its reports: the slot's name (the id of the slot's first replica), the
# restarts counted in it, why the replica before this one ended, and the conductor's
# seal over all of it (skr8tr.core.placement_token.make_slot).
_LAST_END_FIELDS: dict[str, tuple[Check, bool]] = {
    "reason": (_text(MAX_REASON_CHARS), True),
    "exit_code": (_opt(_int(0, MAX_EXIT_CODE)), True),
    "signal": (_opt(_int(1, MAX_SIGNAL_NUMBER)), True),
}
_SLOT_FIELDS: dict[str, tuple[Check, bool]] = {
    "name": (_ident, True),
    "restarts": (_int(0, MAX_RESTARTS), True),
    # the restart backoff's count (ReplicaState.restart_count): the next wait goes on
    # from it rather than from 1 s
    "backoff": (_int(0, MAX_RESTARTS), True),
    "last_end": (_Rule(lambda v: v is None or _check_fields(
        v, _LAST_END_FIELDS, envelope=False) is None,
        f"null or {{reason: at most {MAX_REASON_CHARS} characters, exit_code: null or "
        f"0..{MAX_EXIT_CODE}, signal: null or 1..{MAX_SIGNAL_NUMBER}}}"), True),
    "mac": (_hex(PLACEMENT_TOKEN_HEX), True),
}
_slot_rule = _Rule(
    lambda v: v is None or _check_fields(v, _SLOT_FIELDS, envelope=False) is None,
    f"null or {{name: a replica id, restarts and backoff: 0..{MAX_RESTARTS}, last_end, mac: "
    f"{PLACEMENT_TOKEN_HEX} hex digits}}",
    lambda name, v: (f"bad value for {name!r}: "
                     f"{_check_fields(v, _SLOT_FIELDS, envelope=False)}"
                     if isinstance(v, dict) else f"bad value for {name!r} (a "
                     f"{type(v).__name__}); expected null or {{name, restarts, backoff, last_end, "
                     "mac}"))
_REPLICA_FIELDS["slot"] = (_slot_rule, False)


def slot_fits(name: str, *, replica: str, app: str) -> bool:
    """Whether a slot *name* can be the slot of *replica* of *app*: its own id, or an id
    the conductor gives a replica of that app (``APP-...``), never another app's."""
    return name == replica or (name.startswith(f"{app}-") and len(name) > len(app) + 1)


# The first agent version that reads a launch's ``slot``. Both sides refuse unknown
# fields, so the conductor sends it only to agents whose hello says they read it: an
# older agent would fail every relaunch of a crash loop with ``launch_error``.
SLOT_SINCE = (0, 2)


def reads_slots(version: str) -> bool:
    """Whether an agent of *version* (its hello's ``version``, e.g. ``0.2.0``) reads a
    launch's ``slot``. Anything that does not start with numbers (``0.1.0``, ``dev``)
    is taken as an older agent."""
    numbers = []
    for part in version.split(".")[:len(SLOT_SINCE)]:
        digits = part[:next((i for i, c in enumerate(part) if not c.isdigit()), len(part))]
        if not digits or len(digits) > 9:
            return False
        numbers.append(int(digits))
    return len(numbers) == len(SLOT_SINCE) and tuple(numbers) >= SLOT_SINCE

_replica_reports = _list_of(lambda x: _check_fields(x, _REPLICA_FIELDS, envelope=False),
                            MAX_HELLO_REPLICAS, "replica reports")


# type -> {field: (check, required)}
SCHEMAS: dict[str, dict[str, tuple[Check, bool]]] = {
    "challenge": {"nonce": (_hex(64), True), "term": (_int(0, MAX_TERM), False)},
    "hello": {
        "node_id": (_ident, True),
        "key": (_public_key, True),
        "sig": (_signature, True),
        "version": (_version, True),
        "address": (_address, True),
        "cores": (_int(1, MAX_CORES), True),
        "ram_total_mb": (_int(0, MAX_RAM_MB), True),
        "ram_free_mb": (_int(0, MAX_RAM_MB), True),
        "cpu_pct": (_num(0, MAX_CPU_PCT), True),
        "replicas": (_replica_reports, True),
    },
    "welcome": {"node_id": (_ident, True), "heartbeat_s": (_num(0.01, 3600), True),
                "term": (_int(0, MAX_TERM), False)},
    "refused": {"code": (_str, True), "message": (_str, True),
                "leader": (_opt(_str), False)},
    "heartbeat": {
        "cpu_pct": (_num(0, MAX_CPU_PCT), True),
        "ram_free_mb": (_int(0, MAX_RAM_MB), True),
        "ram_total_mb": (_int(0, MAX_RAM_MB), True),
        "cores": (_int(1, MAX_CORES), True),
    },
    "launch": {
        "replica": (_ident, True),
        "app": (_app_name, True),
        "generation": (_int(1, MAX_GENERATION), True),
        "app_type": (_one_of("process", "job"), True),
        "exec": (_str, True),
        "args": (_str_list, True),
        "env": (_str_dict, True),
        "workdir": (_opt(_str), True),
        "port": (_opt(_int(1, MAX_PORT)), True),
        "host": (_str, True),
        "health": (_health_rule, True),
        "settle_ms": (_duration_ms, True),
        "stop_grace_ms": (_duration_ms, True),
        "token": (_opt(_hex(PLACEMENT_TOKEN_HEX)), False),
        "slot": (_slot_rule, False),
    },
    "stop": {"replica": (_ident, True)},
    "replica": _REPLICA_FIELDS,
    "logs": {
        "req": (_ident, True),
        "app": (_str, True),
        "replica": (_opt(_str), True),
        "tail": (_int(0, MAX_LOG_LINES), True),
        "follow": (_opt(_Rule(lambda v: isinstance(v, bool), "true or false")), False),
        "after": (_opt(_after_rule), False),
        "since": (_opt(_num(0, MAX_TS_S)), False),
    },
    "logs_reply": {"req": (_ident, True), "lines": (_log_lines, True)},
    "logs_push": {"req": (_ident, True), "lines": (_log_lines, True),
                  "skipped": (_int(0, MAX_SKIPPED), True)},
    "logs_unfollow": {"req": (_ident, True)},
    "app_gone": {"app": (_app_name, True)},
}


def _check_fields(msg: Any, schema: dict[str, tuple[Check, bool]], *,
                  envelope: bool = True) -> str | None:
    """What is wrong with *msg* (a message, or with ``envelope=False`` an item of a
    list in one), or None. Names the field and the limit; never quotes much."""
    if not isinstance(msg, dict):
        return "expected a JSON object"
    for name, (check, required) in schema.items():
        if name not in msg:
            if required:
                return f"missing field {name!r}"
            continue
        value = msg[name]
        if not check(value):
            if name in SECRET_FIELDS:  # logged by the receiver: never show env values
                return f"bad value for {name!r} (a {type(value).__name__}; not shown)"
            explain = getattr(check, "explain", None)
            if explain is not None:
                return explain(name, value)
            problem = f"bad value for {name!r}: {_shown(value)}"
            expected = getattr(check, "expected", None)
            return problem if expected is None else f"{problem}; expected {expected}"
    extra = msg.keys() - schema.keys()
    if envelope:
        extra -= _ENVELOPE_KEYS
    if extra:
        names = sorted(extra)
        more = f" and {len(names) - 3} more" if len(names) > 3 else ""
        return f"unknown field(s) {', '.join(map(_shown, names[:3]))}{more}"
    return None


def decode_node_message(data: str | bytes) -> NodeMessage | NodeDecodeError:
    """Parse and validate one node-session message: the typed message of its kind
    (a :class:`NodeMessage`), or what is wrong with it. Never raises."""
    size = len(data) if isinstance(data, bytes) else len(data.encode("utf-8", "surrogatepass"))
    if size > MAX_NODE_MESSAGE_BYTES:
        return NodeDecodeError(f"message of {size} bytes is over the "
                               f"{MAX_NODE_MESSAGE_BYTES} byte limit")
    try:
        msg = json.loads(data)
    except (ValueError, RecursionError) as exc:
        return NodeDecodeError(f"not JSON: {exc}"[:300])
    if not isinstance(msg, dict):
        return NodeDecodeError("expected a JSON object")
    if msg.get("v") != PROTOCOL_VERSION or isinstance(msg.get("v"), bool):
        return NodeDecodeError(f"unsupported protocol version {_shown(msg.get('v'))} "
                               f"(this side speaks {PROTOCOL_VERSION})")
    kind = msg.get("type")
    schema = SCHEMAS.get(kind) if isinstance(kind, str) else None
    if schema is None:
        return NodeDecodeError(f"unknown message type {_shown(kind)}")
    problem = _check_fields(msg, schema)
    if problem is not None:
        return NodeDecodeError(f"{kind}: {problem}")
    return _TYPED[kind]._from_checked(msg)


def chunk_lines(lines: list[dict[str, Any]], limit: int) -> list[list[dict[str, Any]]]:
    """*lines* cut into runs whose JSON fits in about *limit* bytes each, in order (a
    log line is at most 64 KiB of text, so every one fits a message)."""
    chunks: list[list[dict[str, Any]]] = []
    current: list[dict[str, Any]] = []
    total = 0
    for line in lines:
        size = len(json.dumps(line, ensure_ascii=False).encode()) + 1
        if current and total + size > limit:
            chunks.append(current)
            current, total = [], 0
        current.append(line)
        total += size
    if current:
        chunks.append(current)
    return chunks


def encode_node_message(kind: str, **fields: Any) -> str:
    """One message as JSON text; validates against the schema (a bug here raises ValueError)."""
    if "v" in fields or "type" in fields:
        raise ValueError("'v' and 'type' are the envelope's; name the field otherwise")
    msg = {"v": PROTOCOL_VERSION, "type": kind, **fields}
    schema = SCHEMAS.get(kind)
    if schema is None:
        raise ValueError(f"unknown node message type {kind!r}")
    problem = _check_fields(msg, schema)
    if problem is not None:
        raise ValueError(f"{kind}: {problem}")
    return json.dumps(msg, ensure_ascii=False)


_M = TypeVar("_M", bound="NodeMessage")


@dataclass(frozen=True)
class NodeMessage:
    """A message of ``/v1/node``, typed: one frozen dataclass per ``type``.

    Its fields are the message's, in the order they go on the wire; :data:`SCHEMAS`
    ``[TYPE]`` bounds them. :meth:`fields` and :meth:`encode` give the JSON the
    producers always sent; :func:`decode_node_message` checks a message and returns
    the object of its type; :meth:`from_fields` does the same for fields at hand.

    ``omit`` names optional fields left out of the message (a value of None is then
    not sent at all): some producers leave a field out rather than send null, and the
    wire keeps doing exactly that. A decoded message omits what the sender omitted.
    It plays no part in equality.

    ``_OMIT_NONE`` names optional fields a message leaves out whenever they are None:
    fields added later, so a message without them is byte for byte what it always was
    (both ends refuse fields they do not know: an older peer keeps reading it).
    """

    TYPE: ClassVar[str]
    _NAMES: ClassVar[tuple[str, ...]]  # the fields on the wire, in order
    _REQUIRED: ClassVar[tuple[str, ...]]
    _OPTIONAL: ClassVar[tuple[str, ...]]
    _OMIT_NONE: ClassVar[frozenset[str]] = frozenset()

    omit: frozenset[str] = field(default=frozenset(), kw_only=True, compare=False,
                                 repr=False)

    def fields(self) -> dict[str, Any]:
        """The message's fields (without ``v`` and ``type``), as JSON values."""
        out = {}
        for name in self._NAMES:
            value = getattr(self, name)
            if name not in self.omit and not (value is None and name in self._OMIT_NONE):
                out[name] = value
        return out

    def encode(self) -> str:
        """The message as JSON text; ValueError if a field is out of bounds (a bug)."""
        return encode_node_message(self.TYPE, **self.fields())

    @classmethod
    def from_fields(cls: type[_M], msg: Mapping[str, Any]) -> _M:
        """The message in *msg* (its fields; ``v`` and ``type`` may be there), checked
        as :func:`decode_node_message` does; ValueError names the first bad field."""
        problem = _check_fields(msg, SCHEMAS[cls.TYPE])
        if problem is not None:
            raise ValueError(f"{cls.TYPE}: {problem}")
        return cls._from_checked(msg)

    @classmethod
    def _from_checked(cls: type[_M], msg: Mapping[str, Any]) -> _M:
        """*msg*, already checked against the schema, as an object."""
        # Every heartbeat and report comes this way: fill the instance's __dict__ at once
        # rather than through the frozen __init__ (an object.__setattr__ per field). The
        # result is the same object (there is no __post_init__); ``omit`` defaults to
        # the class attribute when nothing is absent.
        obj = object.__new__(cls)
        values = obj.__dict__
        for name in cls._NAMES:
            values[name] = msg.get(name)
        if cls._OPTIONAL:
            absent = [name for name in cls._OPTIONAL if name not in msg]
            if absent:
                values["omit"] = frozenset(absent)
        return obj


_TYPED: dict[str, type[NodeMessage]] = {}


def _message(cls: type[_M]) -> type[_M]:
    """Register *cls* as the type of its messages; its fields must be its schema's."""
    schema = SCHEMAS[cls.TYPE]
    names = tuple(f.name for f in fields(cls) if f.name != "omit")
    if set(names) != set(schema):
        raise TypeError(f"{cls.__name__} has fields {names}, its schema {tuple(schema)}")
    cls._NAMES = names
    cls._REQUIRED = tuple(n for n in names if schema[n][1])
    cls._OPTIONAL = tuple(n for n in names if not schema[n][1])
    _TYPED[cls.TYPE] = cls
    return cls


@_message
@dataclass(frozen=True)
class Heartbeat(NodeMessage):
    """node -> conductor, every ``heartbeat_s``: the machine's load."""

    TYPE: ClassVar[str] = "heartbeat"
    cpu_pct: float  # of the whole machine, 0..100
    ram_free_mb: int
    ram_total_mb: int
    cores: int


@_message
@dataclass(frozen=True)
class ReplicaReport(NodeMessage):
    """node -> conductor ``replica``: a replica changed state (see the module's docstring).

    ``app`` is "" and ``generation`` 1 for a replica the node never knew. Every field
    after ``state`` but ``ts`` may be None; ``token`` is the placement token its
    launch carried."""

    TYPE: ClassVar[str] = "replica"
    _OMIT_NONE: ClassVar[frozenset[str]] = frozenset({"probe", "slot"})
    replica: str
    app: str
    generation: int
    state: str
    pid: int | None = None
    port: int | None = None
    exit_code: int | None = None
    signal: int | None = None
    message: str | None = None
    reason: str | None = None  # "port_in_use" or "launch_error", for "failed"
    ts: float = field(kw_only=True)  # seconds since the epoch, on the node
    token: str | None = None
    # The last health-check probe, while probes run: {text, status, count}, e.g.
    # {"text": "GET /healthz -> 404, want 200", "status": 404, "count": 3} (``count``
    # probes in a row had that outcome; ``status`` None: no complete answer). Left out
    # of the message when None: a report without it says nothing new about probes.
    probe: Mapping[str, Any] | None = None
    # The slot its launch carried (Launch.slot), unchanged; left out when None: a
    # report of a replica launched without one is what it always was.
    slot: Mapping[str, Any] | None = None


    def fit(self) -> ReplicaReport:
        """This report with its ``message`` cut to :data:`MAX_REPORT_MESSAGE_CHARS`:
        a node never sends what the conductor refuses."""
        message = self.message
        if message is None or len(message) <= MAX_REPORT_MESSAGE_CHARS:
            return self
        return replace(self, message=message[:MAX_REPORT_MESSAGE_CHARS - 1] + "\u2026")


@_message
@dataclass(frozen=True)
class Hello(NodeMessage):
    """node -> conductor, first: who the node is (``sig`` proves its key), its machine,
    and the replicas it already runs."""

    TYPE: ClassVar[str] = "hello"
    node_id: str
    key: str  # the node's public key, hex
    sig: str  # skr8tr.core.envelope.sign_challenge of the challenge and node_id
    version: str
    address: str
    cpu_pct: float
    ram_free_mb: int
    ram_total_mb: int
    cores: int
    replicas: tuple[ReplicaReport, ...] = ()

    def fields(self) -> dict[str, Any]:
        out = super().fields()
        out["replicas"] = [r.fields() for r in self.replicas]
        return out

    @classmethod
    def _from_checked(cls, msg: Mapping[str, Any]) -> Hello:
        values = {name: msg[name] for name in cls._REQUIRED}
        values["replicas"] = tuple(ReplicaReport._from_checked(r) for r in msg["replicas"])
        return cls(**values)


@_message
@dataclass(frozen=True)
class LogsReply(NodeMessage):
    """node -> conductor: the answer to a ``logs`` request ``req``: log lines, each
    ``{replica, ts, stream, text}``, oldest first."""

    TYPE: ClassVar[str] = "logs_reply"
    req: str
    lines: list[dict[str, Any]]


@_message
@dataclass(frozen=True)
class Challenge(NodeMessage):
    """conductor -> node, first: sign ``nonce`` (64 hex digits). ``term`` is the
    conductor's leadership term (None: not sent; a node takes it as 0)."""

    TYPE: ClassVar[str] = "challenge"
    nonce: str
    term: int | None = None


@_message
@dataclass(frozen=True)
class Welcome(NodeMessage):
    """conductor -> node: the hello is accepted; heartbeat every ``heartbeat_s``.
    ``term`` as in :class:`Challenge`."""

    TYPE: ClassVar[str] = "welcome"
    node_id: str
    heartbeat_s: float
    term: int | None = None


@_message
@dataclass(frozen=True)
class Refused(NodeMessage):
    """conductor -> node, then a close: ``code`` and ``message`` say why. A follower
    conductor (code ``NOT_LEADER``) always sends ``leader``: the leader's URL or null;
    a refused hello leaves it out (``omit``)."""

    TYPE: ClassVar[str] = "refused"
    code: str
    message: str
    leader: str | None = None


@_message
@dataclass(frozen=True)
class Stop(NodeMessage):
    """conductor -> node: stop one replica (SIGTERM to its group, grace, SIGKILL)."""

    TYPE: ClassVar[str] = "stop"
    replica: str


@_message
@dataclass(frozen=True)
class LogsRequest(NodeMessage):
    """conductor -> node ``logs``: the last ``tail`` lines of ``app`` (of one
    ``replica``, or of all with None); answered by a :class:`LogsReply` with ``req``."""

    TYPE: ClassVar[str] = "logs"
    _OMIT_NONE: ClassVar[frozenset[str]] = frozenset({"follow", "after", "since"})
    req: str
    app: str
    replica: str | None
    tail: int
    follow: bool | None = None  # also push new lines (logs_push) until logs_unfollow
    after: dict[str, int] | None = None  # a resumed follow: replica -> last seq shown
    since: float | None = None  # with after: lines of other replicas from this time on


@_message
@dataclass(frozen=True)
class LogsPush(NodeMessage):
    """node -> conductor: new lines for the follow ``req`` (see :class:`LogsRequest`),
    oldest first; ``skipped`` lines were dropped right after them (a slow reader)."""

    TYPE: ClassVar[str] = "logs_push"
    req: str
    lines: list[dict[str, Any]]
    skipped: int = 0


@_message
@dataclass(frozen=True)
class LogsUnfollow(NodeMessage):
    """conductor -> node: stop pushing lines for the follow ``req``."""

    TYPE: ClassVar[str] = "logs_unfollow"
    req: str


@_message
@dataclass(frozen=True)
class AppGone(NodeMessage):
    """conductor -> node: ``app`` was removed; delete its log files."""

    TYPE: ClassVar[str] = "app_gone"
    app: str


@_message
@dataclass(frozen=True)
class Launch(NodeMessage):
    """The ``launch`` message, conductor -> node: one replica to start.

    The one definition of the message. The conductor builds it from the app's
    manifest and its placement (:meth:`for_replica`) and sends :meth:`fields`; the
    node reads it back with :meth:`from_fields`, which checks every field with the
    bounds above, and its supervisor runs it as it is. Field by field:

    - ``replica``, ``app``, ``generation``: who it is; every report names them.
    - ``app_type``: the manifest's ``type`` (``process`` or ``job``).
    - ``exec``, ``workdir``: the manifest's, resolved against its folder
      (``workdir`` None: the node's data dir).
    - ``args``: the manifest's, with ``{host}`` and ``{port}`` already expanded.
    - ``env``: the manifest's ``env`` block; the node adds PORT and HOST (when there
      is a port) and SKR8TR_APP, SKR8TR_REPLICA, SKR8TR_GENERATION.
    - ``port``: the port placement claimed for this replica: the manifest's fixed
      ``port N``, or with ``port auto`` one from the conductor's ``--port-range``;
      None when the manifest has no ``port``. The node checks it is free, passes it
      in PORT, and probes the health check there.
    - ``host``: the node's advertised address (``{host}``, HOST, and where probes go).
    - ``health``: the manifest's ``health`` block, or None.
    - ``settle_ms``: the manifest's ``rollout`` ``settle`` (default and bounds are the
      manifest's): without a health check, a replica alive this long is ``ready``.
    - ``stop_grace_ms``: the manifest's ``stop-grace``: SIGTERM to SIGKILL.
    - ``token``: the placement token (:mod:`skr8tr.core.placement_token`), sent back
      in every report about the replica.
    - ``slot``: None (left out of the message) for a replica that is its slot's first,
      never restarted; else ``{name, restarts, backoff, last_end, mac}``: the slot it
      takes over, the restarts counted in it, the count its restart backoff goes on
      from, why the one before ended (``{reason, exit_code,
      signal}`` or None) and the conductor's seal (``placement_token.make_slot``). The
      node keeps it in the replica's record and sends it back in every report, so that
      a conductor that restarted (or a new leader) shows the same slot and count.
    """

    TYPE: ClassVar[str] = "launch"
    replica: str
    app: str
    generation: int
    app_type: str
    exec: str
    args: tuple[str, ...]
    env: Mapping[str, str]
    workdir: str | None
    port: int | None
    host: str
    health: HealthCheck | None
    settle_ms: int
    stop_grace_ms: int
    token: str | None = None
    slot: Mapping[str, Any] | None = None

    @classmethod
    def for_replica(cls, manifest: Manifest, *, replica: str, generation: int, host: str,
                    port: int | None, token: str | None,
                    slot: Mapping[str, Any] | None = None) -> Launch:
        """The launch of one replica of *manifest*, placed on the node at *host* with
        *port*. Raises ValueError when the args use ``{port}`` and *port* is None."""
        return cls(
            replica=replica, app=manifest.app, generation=generation, app_type=manifest.type,
            exec=manifest.exec_path, args=manifest.expand_args(host, port),
            env=manifest.env_dict(), workdir=manifest.workdir_path, port=port, host=host,
            health=manifest.health, settle_ms=manifest.rollout.settle_ms,
            stop_grace_ms=manifest.stop_grace_ms, token=token, slot=slot,
        )

    def fields(self) -> dict[str, Any]:
        """The message's fields (without ``v`` and ``type``), as JSON values."""
        h = self.health
        return {
            "replica": self.replica, "app": self.app, "generation": self.generation,
            "app_type": self.app_type, "exec": self.exec, "args": list(self.args),
            "env": dict(self.env), "workdir": self.workdir, "port": self.port,
            "host": self.host,
            "health": None if h is None else {name: getattr(h, name) for name in _HEALTH_FIELDS},
            "settle_ms": self.settle_ms, "stop_grace_ms": self.stop_grace_ms,
            "token": self.token,
            # only when there is one: a first launch is what it always was
            **({} if self.slot is None else {"slot": self.slot}),
        }

    @classmethod
    def from_fields(cls, fields: Mapping[str, Any]) -> Launch:
        """The launch in *fields*: a decoded ``launch`` message, or the fields a replica
        record kept. Every field is checked as :func:`decode_node_message` does
        (``v`` and ``type`` may be there); ValueError names the first bad one."""
        problem = _check_fields(fields, SCHEMAS["launch"])
        if problem is not None:
            raise ValueError(f"launch: {problem}")
        return cls._from_checked(fields)

    @classmethod
    def _from_checked(cls, fields: Mapping[str, Any]) -> Launch:
        health = fields["health"]
        return cls(
            replica=fields["replica"], app=fields["app"], generation=fields["generation"],
            app_type=fields["app_type"], exec=fields["exec"], args=tuple(fields["args"]),
            env=dict(fields["env"]), workdir=fields["workdir"], port=fields["port"],
            host=fields["host"], health=None if health is None else HealthCheck(**health),
            settle_ms=fields["settle_ms"], stop_grace_ms=fields["stop_grace_ms"],
            token=fields.get("token"), slot=fields.get("slot"),
        )


def is_ident(value: Any) -> bool:
    """Whether *value* is an id as this protocol accepts one (node, replica, request)."""
    return _ident(value)
