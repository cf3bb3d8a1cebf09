"""Messages between the conductor and a node agent on ``/v1/node``.

Every message is one JSON text ``{"v":1,"type":TYPE,...fields}``. A session:

1. conductor -> node ``challenge`` {nonce}: 32 random bytes, hex.
2. node -> conductor ``hello`` {node_id, key, sig, version, address, cores,
   ram_total_mb, ram_free_mb, cpu_pct, replicas}: ``sig`` signs the challenge
   and the node id (:func:`skr8tr.core.envelope.sign_challenge`) with a key the
   conductor trusts in the ``node`` role; ``replicas`` lists what the agent is
   already running (after a reconnect) as ``replica`` reports.
3. conductor -> node ``welcome`` {node_id, heartbeat_s}, or ``refused``
   {code, message} followed by a close.
4. Then, in any order:
   - node -> conductor ``heartbeat`` {cpu_pct, ram_free_mb, ram_total_mb, cores}
     every ``heartbeat_s`` seconds;
   - conductor -> node ``launch`` {replica, app, generation, app_type, exec, args, env,
     workdir, port, host, health, settle_ms, stop_grace_ms}: ``args`` are already
     expanded, ``env`` is the manifest's (the node adds PORT, HOST,
     SKR8TR_APP, SKR8TR_REPLICA, SKR8TR_GENERATION);
   - conductor -> node ``stop`` {replica}: SIGTERM to the process group,
     ``stop_grace_ms``, SIGKILL, wait;
   - node -> conductor ``replica`` {replica, app, generation, state, pid, port,
     exit_code, signal, message, ts}: every state change of a replica. States:
     ``running`` (spawned), ``ready`` (health check passing, or alive for
     ``settle_ms`` without one), ``unhealthy`` (``retries`` probes failed after
     it was ready), ``exited`` (with exit_code or signal), ``failed`` (could not
     be launched: missing executable, bad workdir, port in use; ``message``
     carries the OS error and ``reason`` is ``port_in_use`` or ``launch_error``);
   - conductor -> node ``logs`` {req, app, replica, tail} and node -> conductor
     ``logs_reply`` {req, lines:[{replica, ts, stream, text}]}.

Decoding never raises: :func:`decode_node_message` returns a message dict or a
:class:`NodeDecodeError` that the receiver logs and answers.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

PROTOCOL_VERSION = 1
MAX_NODE_MESSAGE_BYTES = 1024 * 1024

REPORTED_STATES = ("running", "ready", "unhealthy", "exited", "failed")
# Fields whose values may be secret: an error about them names the field only.
SECRET_FIELDS = frozenset({"env"})

_HEX_RE = re.compile(r"[0-9a-f]+")
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclass(frozen=True)
class NodeDecodeError:
    """A message that could not be decoded; ``message`` says which field and why."""

    message: str


Check = Callable[[Any], bool]


def _str(v: Any) -> bool:
    return isinstance(v, str)


def _ident(v: Any) -> bool:
    return isinstance(v, str) and _ID_RE.fullmatch(v) is not None


def _hex(length: int) -> Check:
    return lambda v: isinstance(v, str) and len(v) == length and _HEX_RE.fullmatch(v) is not None


def _int(lo: int, hi: int) -> Check:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _num(lo: float, hi: float) -> Check:
    return lambda v: (isinstance(v, int | float) and not isinstance(v, bool)
                      and math.isfinite(v) and lo <= v <= hi)


def _opt(check: Check) -> Check:
    return lambda v: v is None or check(v)


def _one_of(*values: str) -> Check:
    return lambda v: v in values


def _str_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _str_dict(v: Any) -> bool:
    return isinstance(v, dict) and all(isinstance(k, str) and isinstance(x, str)
                                       for k, x in v.items())


def _health(v: Any) -> bool:
    if v is None:
        return True
    return (isinstance(v, dict) and set(v) == {"path", "expect_status", "interval_ms",
                                              "timeout_ms", "retries"}
            and _str(v["path"]) and _int(100, 599)(v["expect_status"])
            and _int(1, 10**9)(v["interval_ms"]) and _int(1, 10**9)(v["timeout_ms"])
            and _int(1, 1000)(v["retries"]))


def _log_lines(v: Any) -> bool:
    return isinstance(v, list) and all(
        isinstance(x, dict) and set(x) == {"replica", "ts", "stream", "text"}
        and _str(x["replica"]) and _num(0, 1e12)(x["ts"])
        and x["stream"] in ("stdout", "stderr") and _str(x["text"]) for x in v)


_REPLICA_FIELDS: dict[str, tuple[Check, bool]] = {
    "replica": (_ident, True),
    "app": (_str, True),
    "generation": (_int(1, 2**53), True),
    "state": (_one_of(*REPORTED_STATES), True),
    "pid": (_opt(_int(1, 2**31)), False),
    "port": (_opt(_int(1, 65535)), False),
    "exit_code": (_opt(_int(-(2**31), 2**31)), False),
    "signal": (_opt(_int(1, 128)), False),
    "message": (_opt(_str), False),
    # why a launch failed: "port_in_use" (the conductor picks another port) or
    # "launch_error" (missing executable, permission, bad workdir)
    "reason": (_opt(_one_of("port_in_use", "launch_error")), False),
    "ts": (_num(0, 1e12), True),
}


def _replica_reports(v: Any) -> bool:
    return isinstance(v, list) and all(
        _check_fields(x, _REPLICA_FIELDS) is None for x in v)


# type -> {field: (check, required)}
SCHEMAS: dict[str, dict[str, tuple[Check, bool]]] = {
    "challenge": {"nonce": (_hex(64), True)},
    "hello": {
        "node_id": (_ident, True),
        "key": (_hex(64), True),
        "sig": (_hex(128), True),
        "version": (_str, True),
        "address": (_str, True),
        "cores": (_int(1, 100000), True),
        "ram_total_mb": (_int(0, 2**40), True),
        "ram_free_mb": (_int(0, 2**40), True),
        "cpu_pct": (_num(0, 100), True),
        "replicas": (_replica_reports, True),
    },
    "welcome": {"node_id": (_ident, True), "heartbeat_s": (_num(0.01, 3600), True)},
    "refused": {"code": (_str, True), "message": (_str, True)},
    "heartbeat": {
        "cpu_pct": (_num(0, 100), True),
        "ram_free_mb": (_int(0, 2**40), True),
        "ram_total_mb": (_int(0, 2**40), True),
        "cores": (_int(1, 100000), True),
    },
    "launch": {
        "replica": (_ident, True),
        "app": (_str, True),
        "generation": (_int(1, 2**53), True),
        "app_type": (_one_of("process", "job"), True),
        "exec": (_str, True),
        "args": (_str_list, True),
        "env": (_str_dict, True),
        "workdir": (_opt(_str), True),
        "port": (_opt(_int(1, 65535)), True),
        "host": (_str, True),
        "health": (_health, True),
        "settle_ms": (_int(0, 10**9), True),
        "stop_grace_ms": (_int(0, 10**9), True),
    },
    "stop": {"replica": (_ident, True)},
    "replica": _REPLICA_FIELDS,
    "logs": {
        "req": (_str, True),
        "app": (_str, True),
        "replica": (_opt(_str), True),
        "tail": (_int(1, 100000), True),
    },
    "logs_reply": {"req": (_str, True), "lines": (_log_lines, True)},
}


def _check_fields(msg: Any, schema: dict[str, tuple[Check, bool]]) -> str | None:
    if not isinstance(msg, dict):
        return "expected a JSON object"
    for name, (check, required) in schema.items():
        if name not in msg:
            if required:
                return f"missing field {name!r}"
            continue
        if not check(msg[name]):
            if name in SECRET_FIELDS:  # logged by the receiver: never show env values
                return f"bad value for {name!r} (a {type(msg[name]).__name__}; not shown)"
            return f"bad value for {name!r}: {msg[name]!r}"[:300]
    extra = sorted(set(msg) - set(schema) - {"v", "type"})
    if extra:
        return f"unknown field(s) {', '.join(map(repr, extra))}"
    return None


def decode_node_message(data: str | bytes) -> dict | NodeDecodeError:
    """Parse and validate one node-session message. Never raises."""
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
        return NodeDecodeError(f"unsupported protocol version {msg.get('v')!r} "
                               f"(this side speaks {PROTOCOL_VERSION})")
    kind = msg.get("type")
    schema = SCHEMAS.get(kind) if isinstance(kind, str) else None
    if schema is None:
        return NodeDecodeError(f"unknown message type {kind!r}"[:300])
    problem = _check_fields(msg, schema)
    if problem is not None:
        return NodeDecodeError(f"{kind}: {problem}")
    return msg


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
