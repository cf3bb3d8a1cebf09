"""Fuzz the node-message decoder, alone and through a running conductor: 10,000 examples.

Every example goes through ``decode_node_message`` (a message dict of a known
type, or a NodeDecodeError with a short, readable message; never an exception,
and never an environment value in the message). A quarter of the examples are
valid node messages with one field oversized (strings past their limit, huge
numbers, lists past their count or with one bad item deep inside): each must be
refused with an error naming that field. Then, on a real conductor, every
example is sent on a welcomed node session, and every 10th also as the
``hello`` of a fresh session (which must be refused). After each batch the
conductor still answers ``ping``, the welcomed session is still open, and
``status`` is as small as it was: no oversized value got into the state.

Oversized values stay below the 1 MiB message limit (which is tested apart)
and are at most a few hundred KB, so that the 10,000 examples stay quick.
"""

from __future__ import annotations

import json

import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from skr8tr.core import envelope
from skr8tr.core import node_protocol as np
from skr8tr.core.node_protocol import (
    SCHEMAS,
    NodeDecodeError,
    decode_node_message,
    encode_node_message,
)
from skr8tr.ws import trio_client
from tests.security_helpers import FUZZ_LIMITS, open_conductor, ping
from tests.test_node_protocol import BASES, line, message, minimal_reports

EXAMPLES = 10_000
BATCH = 1_000
HELLO_EVERY = 10
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))
SECRET = "env-secret-Zq7"
ERROR_CHARS = 500  # no decode error grows with the input
BIG_CHARS = 200_000  # the largest oversized string: far past every limit, quick to send
SMALL_STATUS_BYTES = 64 * 1024

TRICKY = [None, True, False, 0, -1, 1, 65536, 2**31, 2**64, 1e308, -0.0, 0.5, "", "x",
          "\x00", "é", "a" * 200, "n1", "r-1", "../x", [], {}, [None], {"": None},
          {"K": "v"}, {"K": 1, "J": "w"}, ["a", 1]]
tricky = st.sampled_from(TRICKY)
FIELDS = sorted({name for schema in SCHEMAS.values() for name in schema})
VALUES = {
    "replica": st.sampled_from(["r-1", "web-1-abc", "x" * 129, ""]),
    "app": st.sampled_from(["web", "", "Ü"]),
    "node_id": st.sampled_from(["n1", "fuzz", "-bad", "x" * 129]),
    "state": st.sampled_from(["running", "ready", "unhealthy", "exited", "failed", "odd"]),
    "generation": st.integers(-1, 2**54),
    "pid": st.one_of(st.none(), st.integers(-1, 2**32)),
    "port": st.one_of(st.none(), st.integers(0, 70000)),
    "ts": st.floats(),
    "cpu_pct": st.floats(),
    "env": st.sampled_from([{"K": SECRET}, {"K": 1, "J": SECRET}, [SECRET], SECRET]),
    "lines": st.lists(st.fixed_dictionaries({
        "replica": st.sampled_from(["r-1", 1]), "ts": st.floats(),
        "stream": st.sampled_from(["stdout", "stderr", "x"]), "text": st.text(max_size=8)}),
        max_size=3),
    "replicas": st.lists(st.dictionaries(st.sampled_from(FIELDS), tricky, max_size=4),
                         max_size=2),
}


def _string_past(limit: int) -> st.SearchStrategy[str]:
    """Strings just past *limit* characters, or (one in eight) far past it."""
    just_past = st.integers(1, 64).map(lambda extra: "x" * (limit + extra))
    return st.one_of(*[just_past] * 7, st.just("y" * BIG_CHARS))


HUGE_NUMBERS = st.sampled_from([10**30, -(10**30), 10**300, 2**63, -1, 1e308, -1e308,
                                float("inf"), float("-inf"), 1e13])
# (type, path to the field, oversized values); every path's last part is named in the error
OVERSIZED = [
    ("hello", ("node_id",), _string_past(np.MAX_ID_CHARS)),
    ("hello", ("version",), _string_past(np.MAX_VERSION_CHARS)),
    ("hello", ("address",), _string_past(np.MAX_ADDRESS_CHARS)),
    ("hello", ("cores",), HUGE_NUMBERS),
    ("hello", ("ram_total_mb",), HUGE_NUMBERS),
    ("hello", ("ram_free_mb",), HUGE_NUMBERS),
    ("hello", ("cpu_pct",), HUGE_NUMBERS),
    ("hello", ("replicas",), st.just(minimal_reports(np.MAX_HELLO_REPLICAS + 1))),
    ("hello", ("replicas", 0, "message"), _string_past(np.MAX_REPORT_MESSAGE_CHARS)),
    ("hello", ("replicas", 0, "app"), _string_past(np.MAX_APP_NAME_CHARS)),
    ("hello", ("replicas", 0, "pid"), HUGE_NUMBERS),
    ("heartbeat", ("cpu_pct",), HUGE_NUMBERS),
    ("heartbeat", ("ram_free_mb",), HUGE_NUMBERS),
    ("heartbeat", ("cores",), HUGE_NUMBERS),
    ("replica", ("replica",), _string_past(np.MAX_ID_CHARS)),
    ("replica", ("app",), _string_past(np.MAX_APP_NAME_CHARS)),
    ("replica", ("message",), _string_past(np.MAX_REPORT_MESSAGE_CHARS)),
    ("replica", ("generation",), HUGE_NUMBERS),
    ("replica", ("pid",), HUGE_NUMBERS),
    ("replica", ("port",), HUGE_NUMBERS),
    ("replica", ("exit_code",), HUGE_NUMBERS),
    ("replica", ("signal",), HUGE_NUMBERS),
    ("replica", ("ts",), HUGE_NUMBERS),
    ("logs_reply", ("req",), _string_past(np.MAX_ID_CHARS)),
    ("logs_reply", ("lines", 0, "text"), _string_past(np.MAX_LOG_TEXT_CHARS)),
    ("logs_reply", ("lines", 0, "replica"), _string_past(np.MAX_ID_CHARS)),
    ("logs_reply", ("lines", 0, "ts"), HUGE_NUMBERS),
]


@st.composite
def oversized_messages(draw) -> tuple[str, str]:
    """A valid node message with one field oversized, and what its error must name."""
    kind, path, values = draw(st.sampled_from(OVERSIZED))
    if path[0] in ("replicas", "lines") and len(path) > 1:
        # The bad item anywhere in a long list: the error still says which one.
        count = draw(st.sampled_from([1, 3, 500]))
        good = (minimal_reports(count) if path[0] == "replicas"
                else [line(replica=f"r-{i}") for i in range(count)])
        at = draw(st.sampled_from(sorted({0, count // 2, count - 1})))
        bad = json.loads(message(kind, path, draw(values)))[path[0]][0]
        fields = {**BASES[kind], path[0]: good[:at] + [bad] + good[at + 1:]}
        return json.dumps({"v": 1, "type": kind, **fields}), f"{path[0]}[{at}]"
    return message(kind, path, draw(values)), repr(path[-1])


@st.composite
def node_messages(draw):
    kind = draw(st.sampled_from(["schema", "schema", "schema", "text", "bytes", "mangled"]))
    if kind == "schema":
        msg_type = draw(st.one_of(st.sampled_from(sorted(SCHEMAS)), st.text(max_size=8)))
        schema = SCHEMAS.get(msg_type, {})
        msg = {"v": draw(st.sampled_from([1, 1, 1, 2, "1", None, True])), "type": msg_type}
        for name in schema:
            if draw(st.integers(0, 9)):
                msg[name] = draw(st.one_of(VALUES.get(name, tricky), tricky))
        if not draw(st.integers(0, 7)):
            msg[draw(st.sampled_from([*FIELDS, "extra"]))] = draw(tricky)
        if msg_type == "launch" and "env" not in msg:  # secrets only ever travel in env
            msg["env"] = draw(VALUES["env"])
        return json.dumps(msg, ensure_ascii=draw(st.booleans()))
    if kind == "text":
        return draw(st.text(max_size=300))
    if kind == "bytes":
        return draw(st.binary(max_size=300))
    base = encode_node_message("heartbeat", cpu_pct=1.0, ram_free_mb=1, ram_total_mb=1,
                               cores=1)
    at = draw(st.integers(0, len(base) - 1))
    return base[:at] + draw(st.text(max_size=6)) + base[at + draw(st.integers(0, 3)):]


def run_fuzz() -> list[tuple[str | bytes, str | None]]:
    """(message, the field its error must name for an oversized one, else None)."""
    examples = []
    anything = node_messages().map(lambda raw: (raw, None))

    @FUZZ
    @given(st.one_of(anything, anything, anything, oversized_messages()))
    def fuzz(example):
        raw, oversized = example
        got = decode_node_message(raw)
        if isinstance(got, NodeDecodeError):
            assert isinstance(got.message, str) and got.message
            assert SECRET not in got.message
            assert len(got.message) <= ERROR_CHARS, got.message
        else:
            assert got.TYPE in SCHEMAS
        if oversized is not None:
            assert isinstance(got, NodeDecodeError), raw[:200]
            assert oversized in got.message, (oversized, got.message)
        examples.append(example)

    fuzz()
    return examples


async def join(nursery: trio.Nursery, url: str, signing_key, node_id: str,
               hello: str | bytes | None = None):
    """Open /v1/node and answer the challenge (with *hello* instead, when given)."""
    ws = await trio_client.connect(url + "/v1/node")
    challenge = decode_node_message(await ws.get_message())
    if hello is None:
        sig = envelope.sign_challenge(signing_key, bytes.fromhex(challenge.nonce), node_id)
        hello = encode_node_message(
            "hello", node_id=node_id, key=signing_key.public, sig=sig, version="f",
            address="127.0.0.1", cores=1, ram_total_mb=1, ram_free_mb=1, cpu_pct=0.0,
            replicas=[])
    await ws.send_message(hello)
    return ws, decode_node_message(await ws.get_message())


async def drain(ws: trio_client.ClientConnection) -> None:
    """Read what the conductor sends the node (stops for unknown replicas) until it closes."""
    try:
        while True:
            await ws.get_message()
    except trio_client.ConnectionClosed:
        pass  # the conductor closed the session: the end this loop waits for


async def test_node_message_decoder_and_conductor_never_break(tmp_path):
    async with open_conductor(tmp_path, limits=FUZZ_LIMITS) as c, trio.open_nursery() as nursery:
        examples = await trio.to_thread.run_sync(run_fuzz)
        assert len(examples) >= EXAMPLES
        assert sum(oversized is not None for _, oversized in examples) >= EXAMPLES // 10
        ws, welcome = await join(nursery, c.url, c.node, "fuzz")
        assert welcome.TYPE == "welcome"
        nursery.start_soon(drain, ws)
        status_before = len(await call_text(c.url, "status"))
        refused = 0
        for start in range(0, len(examples), BATCH):
            batch = examples[start:start + BATCH]
            for i, (raw, oversized) in enumerate(batch, start=start):
                await ws.send_message(raw)
                if i % HELLO_EVERY == 0:
                    other, answer = await join(nursery, c.url, c.node, "x", hello=raw)
                    assert answer.TYPE == "refused", (raw[:200], answer)
                    assert answer.code in ("BAD_REQUEST", "UNAUTHORIZED"), answer
                    if oversized is not None:  # refused for the field, before any signature
                        assert answer.code == "BAD_REQUEST", answer
                    refused += 1
                    await other.aclose()
            assert (await ping(c.url))["result"]["pong"] == "conductor"
            assert ws.closed is None, f"the node session was closed: {ws.closed}"
            status = await call_text(c.url, "status")
            assert len(status) <= max(status_before, SMALL_STATUS_BYTES), len(status)
        assert refused == len(range(0, len(examples), HELLO_EVERY))
        # The session is still a live node.
        await ws.send_message(encode_node_message("heartbeat", cpu_pct=1.0, ram_free_mb=1,
                                                  ram_total_mb=1, cores=1))
        reply = await ping_nodes(c.url)
        assert [n["node"] for n in reply] == ["fuzz"]
        await ws.aclose()
        nursery.cancel_scope.cancel()


async def ping_nodes(url: str) -> list:
    return json.loads(await call_text(url, "nodes"))["result"]


async def call_text(url: str, cmd: str) -> str:
    """The reply to an unsigned read-only *cmd*, as the conductor sent it."""
    async with trio_client.open_websocket(url + "/v1/cli") as ws:
        await ws.send_message(json.dumps({"v": 1, "id": "n", "cmd": cmd, "args": {}}))
        return await ws.get_message()
