"""Fuzz the request decoder, alone and through a running conductor: 10,000 examples.

Every example is decoded as the conductor decodes it (``accept_request`` in
tests/wire_helpers.py: authenticate, then admit; it must return a Request
or a DecodeError with a clear code and message, never raise) and is also
sent to a real conductor on one ``/v1/cli`` connection, whose reply must be a
well-formed reply: ``ok``, or an error code of the protocol
other than ``INTERNAL``. Some examples are validly signed by the admin key,
so that the commands behind the decoder get hostile arguments too. After
every batch of examples a fresh connection must still get ``pong``.
"""

from __future__ import annotations

import json
import os
import time

import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from skr8tr.core import envelope, keys, protocol
from skr8tr.ws import trio_client
from tests.security_helpers import FUZZ_LIMITS, open_conductor, ping, ping_text
from tests.wire_helpers import accept_request

EXAMPLES = 10_000
BATCH = 1_000
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))

# Cheap to draw and nasty to receive: Hypothesis spends most of its time on deep
# recursive strategies, and 10,000 examples must stay quick.
TRICKY = [None, True, False, 0, -1, 1, 2**53 + 1, 2**64, -(2**70), 1e308, -0.0, 0.5, 1e-300,
          "", " ", "x", "web", "1", "null", "\x00", "é", "雪", "a" * 300, "/", "../..",
          "{port}", [], {}, [None], {"": None}, {"v": 1}, [[[[]]]], {"a": {"b": {"c": []}}}]
tricky = st.sampled_from(TRICKY)
json_values = st.one_of(
    st.sampled_from(TRICKY), st.text(max_size=12), st.integers(), st.floats(),
    st.lists(st.sampled_from(TRICKY), max_size=3),
    st.dictionaries(st.sampled_from(["v", "id", "cmd", "args", "app", "", "é"]),
                    st.sampled_from(TRICKY), max_size=3))
apps = st.one_of(st.sampled_from(["web", "a", "x-1", "fuzz", "sleeper"]), st.text(max_size=70))
manifests = st.one_of(
    st.text(max_size=300),
    st.builds(lambda app, exe, n, extra: f"app {app}\n  exec {exe}\n  replicas {n}\n{extra}",
              st.sampled_from(["fz", "web", "a-b", "Bad", ""]),
              st.sampled_from(["/bin/true", "./x", "", "/bin/sleep"]),
              st.sampled_from(["0", "1", "1001", "-1", "x"]),
              st.sampled_from(["", "  port auto\n", "  env\n    K v\n", "  rollout\n    surge 0\n",
                               "  health\n    check GET / 200\n", "  }\n", "\t\n"])))
ARG_VALUES = {
    "app": st.one_of(st.sampled_from(["web", "a", "x-1", "fuzz", "fz"]), apps),
    "manifest": manifests,
    "format": st.sampled_from(["skr8tr", "skr8tr", "toml", "yaml"]),
    "base_dir": st.sampled_from(["/tmp", "/", "rel"]),
    "replicas": st.integers(-1, 1001),
    "force": st.booleans(),
    "to": st.one_of(st.none(), st.integers(0, 4)),
    "generation": st.one_of(st.integers(-1, 4), st.sampled_from([2**53, 2**53 + 1, 10**40])),
    "replica": st.one_of(st.none(), st.text(max_size=10)),
    "tail": st.integers(0, 10001),
    "follow": st.booleans(),
    "after": st.one_of(st.none(), st.dictionaries(st.text(max_size=10),
                                                  st.integers(-1, 2**53 + 1), max_size=3)),
    "since": st.one_of(st.none(), st.floats(), st.integers(-1, 10**13)),
}
plausible_args = st.dictionaries(
    st.sampled_from(["app", "manifest", "format", "base_dir", "replicas", "force", "to",
                     "replica", "tail", "junk"]),
    st.one_of(st.sampled_from(["web", "skr8tr", "/tmp", "rel"]), st.integers(-5, 1005),
              st.booleans(), tricky, manifests),
    max_size=4)
commands = st.one_of(st.sampled_from(sorted(envelope.COMMANDS)), st.text(max_size=12))
tricky = st.sampled_from(TRICKY)
hex_text = st.sampled_from(["0123456789abcdef" * 8, "ABCDEF" * 11, "00" * 64, "zz" * 32])
request_dicts = st.fixed_dictionaries({}, optional={
    "v": st.one_of(st.just(1), tricky),
    "id": st.one_of(st.text(min_size=1, max_size=20), tricky),
    "cmd": commands,
    "args": st.one_of(plausible_args, json_values),
    "ts": st.one_of(st.floats(), tricky),
    "nonce": st.one_of(hex_text.map(lambda h: h[:32]), tricky),
    "key": st.one_of(hex_text.map(lambda h: h[:64]), tricky),
    "sig": st.one_of(hex_text, tricky),
    "extra": tricky,
})


@st.composite
def messages(draw):
    """(kind, payload): raw text or bytes, or a request to sign at send time."""
    kind = draw(st.sampled_from(["dict", "dict", "signed", "signed", "text", "bytes", "mangled"]))
    if kind == "dict":
        return kind, json.dumps(draw(request_dicts), ensure_ascii=draw(st.booleans()))
    if kind == "signed":
        cmd = draw(st.sampled_from(sorted(envelope.COMMANDS)))
        names = tuple(protocol.ARG_SPECS[cmd])
        args = {name: draw(ARG_VALUES[name]) for name in names if draw(st.integers(0, 9))}
        if not draw(st.integers(0, 4)):
            args = draw(st.one_of(plausible_args, json_values))
        return kind, (cmd, args)
    if kind == "text":
        return kind, draw(st.text(max_size=400))
    if kind == "bytes":
        return kind, draw(st.binary(max_size=400))
    base = json.dumps({"v": 1, "id": "m", "cmd": draw(commands), "args": {}})
    at = draw(st.integers(0, len(base) - 1))
    return kind, base[:at] + draw(st.text(max_size=6)) + base[at + draw(st.integers(0, 3)):]


def render(kind: str, payload, admin) -> str | bytes:
    if kind != "signed":
        return payload
    cmd, args = payload
    req = envelope.sign_request(admin, id=f"s-{os.urandom(4).hex()}", cmd=cmd, args=args,
                                ts=time.time(), nonce=envelope.new_nonce())
    return json.dumps(req)


def check_decoded(raw: str | bytes, admin_keys, guard) -> None:
    got = accept_request(raw, authorized=admin_keys, guard=guard, now=time.time())
    if isinstance(got, protocol.DecodeError):
        assert got.code in ("BAD_REQUEST", "UNAUTHORIZED", "EXPIRED", "REPLAY")
        assert isinstance(got.message, str) and got.message
        json.loads(protocol.error_reply(got.id, got.code, got.message))
    else:
        assert got.cmd in envelope.COMMANDS and isinstance(got.args, dict)


async def roundtrip(ws: trio_client.ClientConnection, raw: str | bytes) -> dict:
    await ws.send_message(raw)
    return json.loads(await ws.get_message())


def run_fuzz(admin) -> list:
    """The Hypothesis part (pure, in a worker thread): every example through the decoder.
    Returns the examples, for the conductor."""
    admin_keys = keys.parse_authorized_keys(f"admin {admin.public}\n")
    guard = envelope.ReplayGuard()
    examples = []

    @FUZZ
    @given(messages())
    def fuzz(message):
        check_decoded(render(*message, admin), admin_keys, guard)
        examples.append(message)

    fuzz()
    return examples


async def test_request_decoder_and_conductor_never_break(tmp_path):
    async with open_conductor(tmp_path, limits=FUZZ_LIMITS) as c, trio.open_nursery() as nursery:
        examples = await trio.to_thread.run_sync(run_fuzz, c.admin)
        assert len(examples) >= EXAMPLES
        ws = await trio_client.connect(c.url + "/v1/cli")
        codes: dict[str, int] = {}
        for start in range(0, len(examples), BATCH):
            for message in examples[start:start + BATCH]:
                raw = render(*message, c.admin)  # signed now: ts is fresh
                reply = protocol.decode_reply(json.dumps(await roundtrip(ws, raw)))
                assert not isinstance(reply, protocol.DecodeError), (raw, reply)
                if not reply.ok:
                    assert reply.error_code in protocol.ERROR_CODES, (raw, reply)
                    assert reply.error_code != "INTERNAL", (raw, reply)
                    assert reply.error_message, raw
                code = "ok" if reply.ok else reply.error_code
                codes[code] = codes.get(code, 0) + 1
            # After each batch, a newcomer is still served.
            assert (await ping(c.url))["result"]["pong"] == "conductor"
        assert (await roundtrip(ws, ping_text()))["ok"], "the same connection still answers"
        await ws.aclose()
        nursery.cancel_scope.cancel()
    # The fuzzer reached past the decoder: signed commands ran and answered.
    assert codes.get("ok", 0) > 50 and codes.get("BAD_REQUEST", 0) > 1000, codes
    assert codes.get("UNAUTHORIZED", 0) > 50, codes
