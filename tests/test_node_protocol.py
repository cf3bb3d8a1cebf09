"""The bounds of what a node sends (skr8tr.core.node_protocol), field by field.

Each node-to-conductor field is refused one past its limit with an error that
names the field and the limit and quotes only a few dozen characters of the
value; the limit itself is accepted. The agent's own values (log lines, report
messages, --advertise) stay inside the same bounds.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from skr8tr.core import node_protocol as np
from skr8tr.core.node_protocol import (
    NodeDecodeError,
    ReplicaReport,
    decode_node_message,
    encode_node_message,
)
from skr8tr.node import logs

HUGE_CHARS = 200_000  # far past every limit, well under the 1 MiB message limit
ERROR_CHARS = 400  # an error message never grows with the value it is about


def report(**over: Any) -> dict[str, Any]:
    fields = {"replica": "web-1-abc", "app": "web", "generation": 1, "state": "running",
              "pid": 4242, "port": 8080, "exit_code": None, "signal": None, "message": None,
              "reason": None, "ts": 1_700_000_000.0}
    return {**fields, **over}


def minimal_reports(count: int) -> list[dict[str, Any]]:
    """*count* reports with only the required fields: as many as fit in one message."""
    return [{"replica": f"r-{i}", "app": "a", "generation": 1, "state": "ready", "ts": 0}
            for i in range(count)]


def line(**over: Any) -> dict[str, Any]:
    return {"replica": "web-1-abc", "ts": 1_700_000_000.0, "stream": "stdout", "text": "hi",
            **over}


BASES: dict[str, dict[str, Any]] = {
    "hello": {"node_id": "n1", "key": "ab" * 32, "sig": "cd" * 64, "version": "0.1.0",
              "address": "10.0.0.5", "cores": 8, "ram_total_mb": 16_000, "ram_free_mb": 8000,
              "cpu_pct": 12.5, "replicas": [report()]},
    "heartbeat": {"cpu_pct": 12.5, "ram_free_mb": 8000, "ram_total_mb": 16_000, "cores": 8},
    "replica": report(),
    "logs_reply": {"req": "0123456789abcdef", "lines": [line()]},
}


def message(kind: str, path: tuple, value: Any) -> str:
    """The base message of *kind* with the field at *path* set to *value*, as JSON text."""
    msg = json.loads(json.dumps(BASES[kind]))
    target = msg
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return json.dumps({"v": 1, "type": kind, **msg})


@pytest.mark.parametrize("kind", sorted(BASES))
def test_the_bases_are_valid(kind):
    got = decode_node_message(message(kind, ("v",), 1))
    assert not isinstance(got, NodeDecodeError), got
    assert kind == got.TYPE


LONG_NAME = ".".join(["a" * 63] * 3 + ["b" * 61])  # 253 characters of valid labels

# (type, path to the field, a value one past (or far past) the limit, what the error names)
REFUSED = [
    ("hello", ("node_id",), "n" * (np.MAX_ID_CHARS + 1), "128"),
    ("hello", ("node_id",), "n" * HUGE_CHARS, "128"),
    ("hello", ("version",), "v" * (np.MAX_VERSION_CHARS + 1), "64"),
    ("hello", ("version",), "0.1 beta", "without spaces"),
    ("hello", ("address",), LONG_NAME + "c", "253"),
    ("hello", ("address",), "a" * HUGE_CHARS, "253"),
    ("hello", ("address",), "a" * 64 + ".example", "253"),
    ("hello", ("address",), "not a host", "host name"),
    ("hello", ("address",), "999.1.1.1", "IP address"),
    ("hello", ("address",), "[::1]", "IP address"),
    ("hello", ("address",), "<script>", "host name"),
    ("hello", ("address",), "", "host name"),
    ("hello", ("cores",), np.MAX_CORES + 1, "65536"),
    ("hello", ("cores",), 0, "65536"),
    ("hello", ("cores",), 10**300, "65536"),
    ("hello", ("ram_total_mb",), np.MAX_RAM_MB + 1, str(np.MAX_RAM_MB)),
    ("hello", ("ram_free_mb",), -1, str(np.MAX_RAM_MB)),
    ("hello", ("cpu_pct",), 100.5, "100"),
    ("hello", ("cpu_pct",), 1e308, "100"),
    ("hello", ("replicas",), "x" * HUGE_CHARS, "10000"),
    ("hello", ("replicas", 0, "message"), "m" * (np.MAX_REPORT_MESSAGE_CHARS + 1), "4096"),
    ("hello", ("replicas", 0, "app"), "a" * (np.MAX_APP_NAME_CHARS + 1), "63"),
    ("hello", ("replicas", 0, "pid"), np.MAX_PID + 1, str(np.MAX_PID)),
    ("hello", ("replicas", 0, "v"), 1, "unknown field"),
    ("heartbeat", ("cpu_pct",), -0.5, "100"),
    ("heartbeat", ("ram_free_mb",), 2**63, str(np.MAX_RAM_MB)),
    ("heartbeat", ("cores",), np.MAX_CORES + 1, "65536"),
    ("replica", ("replica",), "r" * (np.MAX_ID_CHARS + 1), "128"),
    ("replica", ("app",), "A", "a-z"),
    ("replica", ("app",), "a" * HUGE_CHARS, "63"),
    ("replica", ("generation",), np.MAX_GENERATION + 1, str(np.MAX_GENERATION)),
    ("replica", ("pid",), 0, str(np.MAX_PID)),
    ("replica", ("pid",), 2**63, str(np.MAX_PID)),
    ("replica", ("port",), np.MAX_PORT + 1, "65535"),
    ("replica", ("exit_code",), np.MAX_EXIT_CODE + 1, "255"),
    ("replica", ("exit_code",), -1, "255"),
    ("replica", ("signal",), np.MAX_SIGNAL_NUMBER + 1, "128"),
    ("replica", ("message",), "m" * (np.MAX_REPORT_MESSAGE_CHARS + 1), "4096"),
    ("replica", ("message",), "m" * HUGE_CHARS, "4096"),
    ("replica", ("ts",), 1e13, "1e+12"),
    ("replica", ("probe",), {"text": "t" * (np.MAX_PROBE_TEXT_CHARS + 1), "status": None,
                             "count": 1}, "200"),
    ("replica", ("probe",), {"text": "t" * HUGE_CHARS, "status": 404, "count": 1}, "200"),
    ("replica", ("probe",), {"text": "t", "status": 99, "count": 1}, "100..599"),
    ("replica", ("probe",), {"text": "t", "status": 404, "count": 0}, str(np.MAX_PROBE_COUNT)),
    ("replica", ("probe",), {"text": "t", "status": 404, "count": 2**63},
     str(np.MAX_PROBE_COUNT)),
    ("replica", ("probe",), {"text": "t", "status": 404, "count": True},
     str(np.MAX_PROBE_COUNT)),
    ("replica", ("probe",), {"text": "t", "status": 404}, "count"),
    ("replica", ("probe",), {"text": "t", "status": 404, "count": 1, "x": 1}, "count"),
    ("replica", ("probe",), "GET / -> 404", "text"),
    ("hello", ("replicas", 0, "probe"), {"text": "t", "status": 404, "count": -1},
     str(np.MAX_PROBE_COUNT)),
    ("logs_reply", ("req",), "q" * HUGE_CHARS, "128"),
    ("logs_reply", ("lines", 0, "text"), "t" * (np.MAX_LOG_TEXT_CHARS + 1), "65536"),
    ("logs_reply", ("lines", 0, "replica"), "r" * HUGE_CHARS, "128"),
    ("logs_reply", ("lines", 0, "ts"), float("inf"), "1e+12"),
]


@pytest.mark.parametrize(("kind", "path", "value", "limit"), REFUSED,
                         ids=[f"{k}.{'.'.join(map(str, p))}-{i}"
                              for i, (k, p, _, _) in enumerate(REFUSED)])
def test_a_field_past_its_limit_is_refused_naming_field_and_limit(kind, path, value, limit):
    got = decode_node_message(message(kind, path, value))
    assert isinstance(got, NodeDecodeError), got
    text = got.message
    assert text.startswith(f"{kind}: ")
    assert str(path[-1]) in text and limit in text, text
    assert len(text) <= ERROR_CHARS, text
    if len(path) > 2:  # an item of a list says which one
        assert f"{path[0]}[{path[1]}]" in text, text


@pytest.mark.parametrize(("kind", "path", "value"), [
    ("hello", ("node_id",), "n" * np.MAX_ID_CHARS),
    ("hello", ("version",), "v" * np.MAX_VERSION_CHARS),
    ("hello", ("address",), LONG_NAME),
    ("hello", ("address",), "localhost"),
    ("hello", ("address",), "node-1.example.com"),
    ("hello", ("address",), "xn--bcher-kva.example"),
    ("hello", ("address",), "::1"),
    ("hello", ("address",), "fd00::5"),
    ("hello", ("address",), "fe80::1%eth0"),
    ("hello", ("address",), "192.168.1.20"),
    ("hello", ("cores",), np.MAX_CORES),
    ("hello", ("ram_total_mb",), np.MAX_RAM_MB),
    ("hello", ("cpu_pct",), 100),
    ("hello", ("replicas",), minimal_reports(np.MAX_HELLO_REPLICAS)),
    ("replica", ("pid",), np.MAX_PID),
    ("replica", ("exit_code",), np.MAX_EXIT_CODE),
    ("replica", ("exit_code",), 0),
    ("replica", ("signal",), np.MAX_SIGNAL_NUMBER),
    ("replica", ("port",), np.MAX_PORT),
    ("replica", ("app",), "a" * np.MAX_APP_NAME_CHARS),
    ("replica", ("app",), ""),  # a stop of a replica the node never knew
    ("replica", ("message",), "m" * np.MAX_REPORT_MESSAGE_CHARS),
    ("replica", ("probe",), {"text": "t" * np.MAX_PROBE_TEXT_CHARS, "status": 599,
                             "count": np.MAX_PROBE_COUNT}),
    ("replica", ("probe",), {"text": "GET /healthz -> connection refused", "status": None,
                             "count": 1}),
    ("replica", ("probe",), None),
    ("logs_reply", ("lines", 0, "text"), "t" * np.MAX_LOG_TEXT_CHARS),
], ids=lambda v: v if isinstance(v, str) and len(v) < 30 else None)
def test_a_field_at_its_limit_is_accepted(kind, path, value):
    got = decode_node_message(message(kind, path, value))
    assert not isinstance(got, NodeDecodeError), got


def test_a_hello_with_too_many_replicas_is_refused_by_count():
    got = decode_node_message(message("hello", ("replicas",),
                                      minimal_reports(np.MAX_HELLO_REPLICAS + 1)))
    assert isinstance(got, NodeDecodeError)
    assert got.message == ("hello: 'replicas' has 10001 replica reports, over the limit of "
                           "10000")


def test_a_logs_reply_with_too_many_lines_is_refused_by_count():
    # Over the wire the 1 MiB message limit comes first; the count holds all the same.
    with pytest.raises(ValueError, match="'lines' has 100001 lines, over the limit of 100000"):
        encode_node_message("logs_reply", req="q1", lines=[line()] * (np.MAX_LOG_LINES + 1))


def test_errors_quote_little_of_envelope_and_unknown_fields():
    for raw in (json.dumps({"v": "1" * HUGE_CHARS, "type": "heartbeat"}),
                json.dumps({"v": 1, "type": "t" * HUGE_CHARS}),
                json.dumps({"v": 1, "type": "heartbeat", **BASES["heartbeat"],
                            "k" * HUGE_CHARS: 1}),
                json.dumps({"v": 1, "type": "heartbeat", **BASES["heartbeat"],
                            **{f"extra{i}": i for i in range(5000)}})):
        got = decode_node_message(raw)
        assert isinstance(got, NodeDecodeError)
        assert len(got.message) <= ERROR_CHARS, got.message


def test_env_values_are_never_quoted():
    launch = {"replica": "r-1", "app": "web", "generation": 1, "app_type": "process",
              "exec": "/bin/true", "args": [], "env": {"TOKEN": 5}, "workdir": None,
              "port": None, "host": "127.0.0.1", "health": None, "settle_ms": 0,
              "stop_grace_ms": 0}
    got = decode_node_message(json.dumps({"v": 1, "type": "launch", **launch}))
    assert isinstance(got, NodeDecodeError) and "TOKEN" not in got.message


@pytest.mark.parametrize("value", ["10.0.0.5", "::1", "fe80::1%eth0", "fe80::1%3", "localhost",
                                   "a.b-c.d", "1.example", "example.com1", LONG_NAME])
def test_host_or_ip_accepts(value):
    assert np.is_host_or_ip(value)


@pytest.mark.parametrize("value", ["", " ", "a b", LONG_NAME + "c", "-a.com", "a-.com", "a..b",
                                   ".a", "a.", "a" * 64, "999.1.1.1", "1.2.3", "010.0.0.1",
                                   "[::1]", "::1%", "fe80::1%e th0", "10.0.0.5%eth0",
                                   "http://x", "a_b.com", "é.com", "10.0.0.5:80", "a\nb",
                                   None, 5, ["10.0.0.5"]])
def test_host_or_ip_refuses(value):
    assert not np.is_host_or_ip(value)


def test_the_agent_cuts_its_report_messages_to_the_limit():
    long = report(state="failed", message="x" * HUGE_CHARS, reason="launch_error")
    fitted = np.ReplicaReport(**long).fit()
    assert len(fitted.message) == np.MAX_REPORT_MESSAGE_CHARS
    fitted.encode()  # raises if the conductor would refuse it
    short = np.ReplicaReport(**report(message="exited with code 1"))
    assert short.fit() is short


def test_the_agents_log_lines_fit_the_limit():
    # A line is cut at MAX_LINE_BYTES bytes, and a byte decodes to at most one character.
    assert logs.MAX_LINE_BYTES <= np.MAX_LOG_TEXT_CHARS


# The wire does not change with the typed messages: what is decoded encodes back to
# the same JSON object, optional fields left out stay out, and null stays null.
ROUND_TRIPS = [
    *({"type": kind, **base} for kind, base in BASES.items()),
    {"type": "hello", **{**BASES["hello"], "replicas": minimal_reports(2)}},
    {"type": "replica", **{**report(), "token": "0f" * 16}},
    {"type": "challenge", "nonce": "ab" * 32},
    {"type": "challenge", "nonce": "ab" * 32, "term": 7},
    {"type": "welcome", "node_id": "n1", "heartbeat_s": 1.0},
    {"type": "welcome", "node_id": "n1", "heartbeat_s": 1.0, "term": 0},
    {"type": "refused", "code": "UNAUTHORIZED", "message": "no"},
    {"type": "refused", "code": "NOT_LEADER", "message": "follower", "leader": None},
    {"type": "refused", "code": "NOT_LEADER", "message": "follower", "leader": "http://a:1"},
    {"type": "stop", "replica": "web-1-abc"},
    {"type": "logs", "req": "q1", "app": "web", "replica": None, "tail": 10},
]


@pytest.mark.parametrize("fields", ROUND_TRIPS, ids=lambda f: f["type"])
def test_a_decoded_message_encodes_to_the_same_json(fields):
    raw = json.dumps({"v": 1, **fields})
    got = decode_node_message(raw)
    assert not isinstance(got, NodeDecodeError), got
    assert type(got).from_fields(json.loads(raw)) == got
    assert json.loads(got.encode()) == json.loads(raw)


def test_the_agent_sends_its_fields_in_the_order_it_always_did():
    beat = np.Heartbeat(cpu_pct=1.0, ram_free_mb=2, ram_total_mb=3, cores=4)
    assert list(json.loads(beat.encode())) == ["v", "type", "cpu_pct", "ram_free_mb",
                                               "ram_total_mb", "cores"]
    rep = np.ReplicaReport(replica="r1", app="a", generation=1, state="ready", ts=0.0)
    assert list(json.loads(rep.encode()))[2:] == [
        "replica", "app", "generation", "state", "pid", "port", "exit_code", "signal",
        "message", "reason", "ts", "token"]
    hello = np.Hello(node_id="n1", key="ab" * 32, sig="cd" * 64, version="1", address="h",
                     cpu_pct=0.0, ram_free_mb=1, ram_total_mb=1, cores=1, replicas=(rep,))
    assert list(json.loads(hello.encode()))[2:] == [
        "node_id", "key", "sig", "version", "address", "cpu_pct", "ram_free_mb",
        "ram_total_mb", "cores", "replicas"]
    unknown = np.ReplicaReport(replica="r1", app="", generation=1, state="exited", ts=0.0,
                               omit=frozenset({"token"}))
    assert "token" not in json.loads(unknown.encode())


def test_a_report_without_a_probe_leaves_the_field_out():
    # what an older conductor accepts: a report says nothing of probes unless it has one
    plain = ReplicaReport(replica="r1", app="web", generation=1, state="running", ts=0.0)
    assert "probe" not in json.loads(plain.encode())
    probe = {"text": "GET /healthz -> 404, want 200", "status": 404, "count": 3}
    sent = dataclasses.replace(plain, probe=probe)
    assert decode_node_message(sent.encode()) == sent


# A replica's slot (Launch.slot, sent back in its reports): bounded, and left out when
# its launch had none.
SLOT = {"name": "web-1-abc", "restarts": 5, "backoff": 5,
        "last_end": {"reason": "exited with code 1", "exit_code": 1, "signal": None},
        "mac": "ab" * 16}


def with_slot(**over: Any) -> dict[str, Any]:
    return {**SLOT, **over}


@pytest.mark.parametrize(("slot", "names"), [
    (with_slot(restarts=np.MAX_RESTARTS + 1), str(np.MAX_RESTARTS)),
    (with_slot(restarts=-1), str(np.MAX_RESTARTS)),
    (with_slot(restarts=True), str(np.MAX_RESTARTS)),
    (with_slot(restarts=2**63), str(np.MAX_RESTARTS)),
    (with_slot(backoff=np.MAX_RESTARTS + 1), str(np.MAX_RESTARTS)),
    (with_slot(backoff=None), str(np.MAX_RESTARTS)),
    ({k: v for k, v in SLOT.items() if k != "backoff"}, "backoff"),
    (with_slot(name="n" * (np.MAX_ID_CHARS + 1)), "128"),
    (with_slot(name="n" * HUGE_CHARS), "128"),
    (with_slot(name="web 1"), "A-Z"),
    (with_slot(last_end={"reason": "r" * 201, "exit_code": 1, "signal": None}), "200"),
    (with_slot(last_end={"reason": "r" * HUGE_CHARS, "exit_code": 1, "signal": None}),
     "200"),
    (with_slot(last_end={"reason": "r", "exit_code": 256, "signal": None}), "255"),
    (with_slot(last_end={"reason": "r", "exit_code": None, "signal": 129}), "128"),
    (with_slot(last_end={"reason": "r", "exit_code": None}), "signal"),
    (with_slot(last_end="exited"), "reason"),
    (with_slot(mac="ab" * 17), "mac"),
    (with_slot(mac="AB" * 16), "mac"),
    ({k: v for k, v in SLOT.items() if k != "mac"}, "mac"),
    (with_slot(extra=1), "extra"),
    ("web-1-abc", "slot"),
    ([SLOT] * 1000, "slot"),
])
def test_a_slot_past_its_bounds_is_refused(slot, names):
    for kind, path in (("replica", ("slot",)), ("hello", ("replicas", 0, "slot"))):
        got = decode_node_message(message(kind, path, slot))
        assert isinstance(got, NodeDecodeError), got
        assert "slot" in got.message and names in got.message, got.message
        assert len(got.message) <= ERROR_CHARS, got.message
    fields = {**np.Launch(replica="web-1-abc", app="web", generation=1, app_type="process",
                          exec="/bin/true", args=(), env={}, workdir=None, port=None,
                          host="h", health=None, settle_ms=0, stop_grace_ms=0).fields(),
              "slot": slot}
    with pytest.raises(ValueError, match="slot"):
        np.Launch.from_fields(fields)


@pytest.mark.parametrize("slot", [
    SLOT, with_slot(last_end=None), with_slot(restarts=np.MAX_RESTARTS),
    with_slot(last_end={"reason": "r" * 200, "exit_code": None, "signal": 128}),
])
def test_a_slot_at_its_bounds_round_trips(slot):
    got = decode_node_message(message("replica", ("slot",), slot))
    assert isinstance(got, ReplicaReport) and got.slot == slot
    assert json.loads(got.encode())["slot"] == slot
    launch = np.Launch(replica="web-1-abc", app="web", generation=1, app_type="process",
                       exec="/bin/true", args=(), env={}, workdir=None, port=None, host="h",
                       health=None, settle_ms=0, stop_grace_ms=0, slot=slot)
    again = np.Launch.from_fields(json.loads(launch.encode()))
    assert again == launch and again.slot == slot


def test_without_a_slot_launch_and_report_are_what_they_always_were():
    launch = np.Launch(replica="web-1-abc", app="web", generation=1, app_type="process",
                       exec="/bin/true", args=(), env={}, workdir=None, port=None, host="h",
                       health=None, settle_ms=0, stop_grace_ms=0, token="ab" * 16)
    assert list(json.loads(launch.encode()))[2:] == [
        "replica", "app", "generation", "app_type", "exec", "args", "env", "workdir", "port",
        "host", "health", "settle_ms", "stop_grace_ms", "token"]
    plain = ReplicaReport(replica="r1", app="web", generation=1, state="running", ts=0.0)
    assert "slot" not in json.loads(plain.encode())
    assert decode_node_message(plain.encode()).slot is None


def test_a_slot_fits_only_its_own_app():
    assert np.slot_fits("web-abc123", replica="web-def456", app="web")
    assert np.slot_fits("web-def456", replica="web-def456", app="web")
    assert not np.slot_fits("api-abc123", replica="web-def456", app="web")
    assert not np.slot_fits("web", replica="web-def456", app="web")
    assert not np.slot_fits("web-", replica="web-def456", app="web")
    assert not np.slot_fits("webx-abc123", replica="web-def456", app="web")
