"""Wire messages: requests, replies and watch events on /v1/cli and /v1/watch."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from skr8tr.core.command_args import check_args
from skr8tr.core.envelope import ReplayGuard, sign_request
from skr8tr.core.keys import AuthorizedKeys, fingerprint, parse_authorized_keys
from skr8tr.core.protocol import (
    COMMANDS,
    ERROR_CODES,
    MAX_MESSAGE_BYTES,
    READ_ONLY_COMMANDS,
    SIGNED_COMMANDS,
    DecodeError,
    Envelope,
    EventMessage,
    Reply,
    Request,
    SnapshotMessage,
    decode_envelope,
    decode_reply,
    decode_watch_message,
    error_reply,
    event_message,
    ok_reply,
    request_message,
    snapshot_message,
)
from skr8tr.core.signatures import ED25519, Signer
from tests.wire_helpers import accept_request, decode_request, encode_request

NOW = 1_700_000_000.0
ADMIN = Signer(ED25519, bytes(range(32)))
OTHER = Signer(ED25519, bytes(range(3, 35)))
AUTHORIZED = parse_authorized_keys(f"admin {ADMIN.public}\n", filename="ak")
KEY = "ab" * 32
SIG = "cd" * 64
NONCE = "ef" * 16
MANIFEST = {"manifest": "app web\n  exec ./x\n", "format": "skr8tr", "base_dir": "/srv/web"}


def message(cmd: str, args, **extra) -> str:
    return json.dumps({"v": 1, "id": "r1", "cmd": cmd, "args": args, **extra}, ensure_ascii=False)


def decoded(cmd: str, args, **extra) -> Request:
    result = decode_request(message(cmd, args, **extra))
    assert isinstance(result, Request), result
    return result


def refused(data, **kw) -> DecodeError:
    result = decode_request(data, **kw)
    assert isinstance(result, DecodeError), result
    assert result.code == "BAD_REQUEST"
    return result


def test_constants():
    assert MAX_MESSAGE_BYTES == 1024 * 1024
    assert ERROR_CODES == (
        "BAD_REQUEST",
        "UNAUTHORIZED",
        "EXPIRED",
        "REPLAY",
        "NOT_FOUND",
        "CONFLICT",
        "NO_CAPACITY",
        "INVALID_MANIFEST",
        "INTERNAL",
        "NOT_LEADER",
        "UNAVAILABLE",
    )
    assert COMMANDS == SIGNED_COMMANDS | READ_ONLY_COMMANDS
    assert len(COMMANDS) == 19


# --------------------------------------------------------------------------- args per command

GOOD_ARGS = [
    ("ping", {}, {}),
    ("nodes", {}, {}),
    ("status", {}, {}),
    ("up", MANIFEST, MANIFEST),
    ("up", dict(MANIFEST, format="toml"), dict(MANIFEST, format="toml")),
    ("down", {"app": "web"}, {"app": "web"}),
    ("scale", {"app": "web", "replicas": 0}, {"app": "web", "replicas": 0}),
    ("scale", {"app": "w-1", "replicas": 1000}, {"app": "w-1", "replicas": 1000}),
    ("rollout", MANIFEST, dict(MANIFEST, force=False)),
    ("rollout", dict(MANIFEST, force=True), dict(MANIFEST, force=True)),
    ("rollout-status", {"app": "web"}, {"app": "web"}),
    ("rollout-abort", {"app": "web"}, {"app": "web"}),
    ("rollout-promote", {"app": "web"}, {"app": "web"}),
    ("rollout-pause", {"app": "web"}, {"app": "web"}),
    ("rollout-resume", {"app": "web"}, {"app": "web"}),
    ("rollout-undo", {"app": "web", "to": 3}, {"app": "web", "to": 3, "force": False}),
    ("rollout-undo", {"app": "web"}, {"app": "web", "to": None, "force": False}),
    ("rollout-undo", {"app": "web", "to": None}, {"app": "web", "to": None, "force": False}),
    ("rollout-undo", {"app": "web", "to": 2**53, "force": True},
     {"app": "web", "to": 2**53, "force": True}),
    ("restart", {"app": "web"}, {"app": "web", "force": False}),
    ("restart", {"app": "web", "force": True}, {"app": "web", "force": True}),
    ("describe", {"app": "web"}, {"app": "web"}),
    ("revision", {"app": "web", "generation": 1}, {"app": "web", "generation": 1}),
    ("revision", {"app": "web", "generation": 2**53}, {"app": "web", "generation": 2**53}),
    ("history", {"app": "web"}, {"app": "web"}),
    ("list", {}, {"app": None}),
    ("list", {"app": None}, {"app": None}),
    ("list", {"app": "web"}, {"app": "web"}),
    ("logs", {"app": "web"}, {"app": "web", "replica": None, "tail": 100}),
    (
        "logs",
        {"app": "web", "replica": "web-3-a1", "tail": 10000},
        {"app": "web", "replica": "web-3-a1", "tail": 10000},
    ),
    (
        "logs",
        {"app": "web", "replica": None, "tail": 1},
        {"app": "web", "replica": None, "tail": 1},
    ),
    ("logs", {"app": "web", "tail": 0}, {"app": "web", "replica": None, "tail": 0}),
    (
        "logs",
        {"app": "web", "tail": 0, "follow": True, "after": {"web-a1": 7}, "since": 1.5},
        {"app": "web", "replica": None, "tail": 0, "follow": True, "after": {"web-a1": 7},
         "since": 1.5},
    ),
]


@pytest.mark.parametrize(("cmd", "args", "normalized"), GOOD_ARGS)
def test_good_args(cmd, args, normalized):
    req = decoded(cmd, args)
    assert req.cmd == cmd
    assert req.id == "r1"
    assert req.args == normalized
    assert check_args(cmd, args) == normalized


BAD_ARGS = [
    # (cmd, args, words the message must contain)
    ("ping", {"x": 1}, 'unknown argument "x" for ping (expected: none)'),
    ("nodes", [], "args must be an object, got an array"),
    ("status", None, "args must be an object, got null"),
    ("up", {"format": "skr8tr", "base_dir": "/a"}, "args.manifest is required for up"),
    ("up", dict(MANIFEST, manifest=5), "args.manifest must be the manifest text (a string), got 5"),
    ("up", dict(MANIFEST, format="yaml"), 'args.format must be "skr8tr" or "toml", got "yaml"'),
    ("up", dict(MANIFEST, format=["toml"]), "args.format must be"),
    ("up", {"manifest": "x", "base_dir": "/a"}, "args.format is required"),
    ("up", dict(MANIFEST, base_dir="srv/web"), "args.base_dir must be an absolute folder path"),
    ("up", dict(MANIFEST, base_dir="/a\x00b"), "args.base_dir must be"),
    ("up", dict(MANIFEST, base_dir=None), "args.base_dir must be"),
    ("up", {k: v for k, v in MANIFEST.items() if k != "base_dir"}, "args.base_dir is required"),
    ("up", dict(MANIFEST, force=True), 'unknown argument "force" for up'),
    ("down", {}, "args.app is required for down (an app name matching"),
    (
        "down",
        {"app": "Web"},
        'args.app must be an app name matching [a-z0-9][a-z0-9-]{0,62}, got "Web"',
    ),
    ("down", {"app": "-web"}, "args.app must be"),
    ("down", {"app": "a" * 64}, "args.app must be"),
    ("down", {"app": "web", "force": True, "zz": 1}, 'unknown arguments "force", "zz" for down'),
    ("scale", {"app": "web"}, "args.replicas is required"),
    ("scale", {"app": "web", "replicas": -1}, "args.replicas must be an integer 0..1000, got -1"),
    ("scale", {"app": "web", "replicas": 1001}, "got 1001"),
    ("scale", {"app": "web", "replicas": True}, "got true"),
    ("scale", {"app": "web", "replicas": 3.0}, "got 3.0"),
    ("scale", {"app": "web", "replicas": "3"}, 'got "3"'),
    ("rollout", dict(MANIFEST, force="yes"), 'args.force must be true or false, got "yes"'),
    ("rollout", dict(MANIFEST, force=1), "args.force must be true or false, got 1"),
    ("rollout", {"app": "web"}, 'unknown argument "app" for rollout'),
    ("rollout-status", {}, "args.app is required"),
    ("rollout-abort", {"app": 3}, "args.app must be"),
    ("rollout-promote", {}, "args.app is required"),
    ("rollout-pause", {"app": "web", "force": True}, 'unknown argument "force"'),
    ("rollout-resume", {"app": "Bad App"}, "args.app must be"),
    ("rollout-undo", {"app": "web", "to": 0}, "args.to must be a generation number >= 1, or null"),
    ("rollout-undo", {"app": "web", "to": "2"}, "args.to must be"),
    ("rollout-undo", {"app": "web", "to": False}, "args.to must be"),
    ("rollout-undo", {"app": "web", "to": 2**53 + 1}, "args.to must be"),
    ("rollout-undo", {"app": "web", "to": 10**4000}, "args.to must be"),
    ("rollout-undo", {"app": "web", "to": 1.5}, "args.to must be"),
    ("rollout-undo", {"app": "web", "force": "yes"}, 'args.force must be true or false, got "yes"'),
    ("rollout-undo", {"app": "web", "force": 0}, "args.force must be true or false, got 0"),
    ("restart", {}, "args.app is required for restart"),
    ("restart", {"app": "web", "force": None}, "args.force must be true or false, got null"),
    ("restart", {"app": "web", "watch": True}, 'unknown argument "watch" for restart'),
    ("describe", {"app": "../etc"}, "args.app must be an app name"),
    ("describe", {"app": "web", "tail": 5}, 'unknown argument "tail" for describe'),
    ("revision", {"app": "web"}, "args.generation is required for revision"),
    ("revision", {"app": "web", "generation": 0}, "args.generation must be a generation number "
     "1..9007199254740992, got 0"),
    ("revision", {"app": "web", "generation": 2**53 + 1}, "got 9007199254740993"),
    ("revision", {"app": "web", "generation": -1}, "got -1"),
    ("revision", {"app": "web", "generation": "2"}, 'got "2"'),
    ("revision", {"app": "web", "generation": True}, "got true"),
    ("revision", {"app": "web", "generation": 2.0}, "got 2.0"),
    ("revision", {"app": "web", "generation": None}, "got null"),
    ("revision", {"app": "web", "generation": [1]}, "got an array"),
    ("history", {"app": None}, "args.app must be"),
    ("list", {"app": ""}, "args.app must be null or an app name"),
    ("list", {"apps": "web"}, 'unknown argument "apps" for list (expected: app)'),
    ("logs", {"app": "web", "tail": -1}, "args.tail must be an integer 0..10000, got -1"),
    ("logs", {"app": "web", "tail": 10001}, "got 10001"),
    ("logs", {"app": "web", "tail": None}, "got null"),
    ("logs", {"app": "web", "replica": ""}, "args.replica must be null or a replica id"),
    ("logs", {"app": "web", "replica": "r" * 129}, "args.replica must be"),
    ("logs", {"app": "web", "follow": 1}, "args.follow must be true or false, got 1"),
    ("logs", {"app": "web", "after": {"r1": -1}}, "args.after must be null or an object"),
    ("logs", {"app": "web", "after": {"": 1}}, "args.after must be"),
    ("logs", {"app": "web", "after": [1]}, "args.after must be"),
    ("logs", {"app": "web", "after": {f"r{i}": 1 for i in range(10_001)}}, "args.after must be"),
    ("logs", {"app": "web", "since": "now"}, "args.since must be null or a time"),
    ("logs", {"app": "web", "since": -1}, "args.since must be"),
    ("logs", {"app": "web", "tailz": 1}, 'unknown argument "tailz" for logs'),
]


@pytest.mark.parametrize(("cmd", "args", "words"), BAD_ARGS)
def test_bad_args(cmd, args, words):
    err = refused(message(cmd, args))
    assert err.id == "r1"
    assert words in err.message
    assert words in check_args(cmd, args)


def test_every_command_has_good_and_bad_cases():
    assert {c for c, _, _ in GOOD_ARGS} == COMMANDS
    assert {c for c, _, _ in BAD_ARGS} == COMMANDS


def test_long_bad_values_are_not_echoed_in_full():
    err = refused(message("down", {"app": "X" * 100_000}))
    assert len(err.message) < 200


# --------------------------------------------------------------------------- envelope


@pytest.mark.parametrize(
    ("data", "words", "rid"),
    [
        ("", "not valid JSON", None),
        ("{", "not valid JSON", None),
        ("[]", "must be a JSON object, got an array", None),
        ('"hi"', "got a string", None),
        ("null", "got null", None),
        ("3", "got a number", None),
        ('{"v":1,"id":"r1","cmd":"ping","args":{}} x', "not valid JSON", None),
        ('{"v":1,"id":"r1","cmd":"ping","args":{},"ts":NaN}', "NaN is not valid JSON", None),
        ('{"v":1,"id":"r1","cmd":"ping","args":{"a":Infinity}}', "Infinity", None),
        ('{"v":1,"id":"r1","cmd":"ping","cmd":"up","args":{}}', 'duplicate key "cmd"', None),
        ('{"v":1,"id":"r1","cmd":"ping","args":{"a":1,"a":2}}', "duplicate key", None),
        ('{"id":"r1","cmd":"ping","args":{}}', "v is required", "r1"),
        (
            '{"v":2,"id":"r1","cmd":"ping","args":{}}',
            "v must be 1 (the protocol version), got 2",
            "r1",
        ),
        ('{"v":true,"id":"r1","cmd":"ping","args":{}}', "v must be 1", "r1"),
        ('{"v":1.0,"id":"r1","cmd":"ping","args":{}}', "v must be 1", "r1"),
        ('{"v":"1","id":"r1","cmd":"ping","args":{}}', "v must be 1", "r1"),
        ('{"v":1,"cmd":"ping","args":{}}', "id is required", None),
        ('{"v":1,"id":"","cmd":"ping","args":{}}', "id must be a string of 1..128", None),
        ('{"v":1,"id":7,"cmd":"ping","args":{}}', "id must be a string", None),
        ('{"v":1,"id":"\\ud800","cmd":"ping","args":{}}', "id must be a string", None),
        ('{"v":1,"id":"r1","args":{}}', "cmd is required", "r1"),
        (
            '{"v":1,"id":"r1","cmd":"reboot","args":{}}',
            'unknown cmd "reboot" (expected one of:',
            "r1",
        ),
        ('{"v":1,"id":"r1","cmd":["up"],"args":{}}', "unknown cmd", "r1"),
        ('{"v":1,"id":"r1","cmd":"ping"}', "args is required", "r1"),
        ('{"v":1,"id":"r1","cmd":"ping","args":{},"extra":1}', 'unknown field "extra"', "r1"),
        ('{"v":1,"id":"r1","cmd":"ping","args":{},"ts":"now"}', "ts must be a finite number", "r1"),
        ('{"v":1,"id":"r1","cmd":"ping","args":{},"ts":true}', "ts must be", "r1"),
        ('{"v":1,"id":"r1","cmd":"ping","args":{},"ts":1e400}', "ts must be", "r1"),
        ('{"v":1,"id":"r1","cmd":"ping","args":{},"nonce":"abc"}', "nonce must be 16..128", "r1"),
        ('{"v":1,"id":"r1","cmd":"list","args":{},"key":"AB"}', "key must be a public key", "r1"),
        ('{"v":1,"id":"r1","cmd":"status","args":{},"sig":5}', "sig must be a signature", "r1"),
    ],
)
def test_bad_envelopes(data, words, rid):
    err = refused(data)
    assert words in err.message
    assert err.id == rid


def test_id_is_recovered_when_later_fields_are_bad():
    err = refused(json.dumps({"v": 1, "id": "abc-123", "cmd": "scale", "args": {"app": 1}}))
    assert err.id == "abc-123"


def test_id_limits():
    assert decoded("ping", {}, id="x" * 128).id == "x" * 128
    err = refused(message("ping", {}, id="x" * 129))
    assert err.id is None
    assert "id must be a string of 1..128 characters" in err.message


def test_bytes_and_text_are_both_accepted():
    data = message("up", dict(MANIFEST, manifest="app wéb ✓\n"))
    assert decode_request(data.encode()) == decode_request(data)
    assert decode_request(bytearray(data.encode())) == decode_request(data)


@pytest.mark.parametrize("data", [b"\xff\xfe{}", b'{"v":1,"id":"\xc3"}', b"\xed\xa0\x80"])
def test_invalid_utf8_bytes(data):
    assert "not valid UTF-8" in refused(data).message


def test_text_with_lone_surrogate_is_not_utf8():
    assert "not valid UTF-8" in refused('{"v":1,"id":"\ud800"}').message


@pytest.mark.parametrize("data", [None, 5, ["x"], object()])
def test_non_text_input(data):
    assert "must be JSON text" in refused(data).message


def test_deep_nesting_is_an_error_not_a_crash():
    data = '{"v":1,"id":"r","cmd":"ping","args":' + "[" * 200_000 + "]" * 200_000 + "}"
    assert isinstance(decode_request(data), DecodeError)


def test_huge_integer_is_an_error_not_a_crash():
    data = '{"v":1,"id":"r","cmd":"scale","args":{"app":"a","replicas":' + "9" * 5000 + "}}"
    assert isinstance(decode_request(data), DecodeError)


def padded_ping(size: int) -> str:
    """A valid ping message of exactly *size* UTF-8 bytes (padding in the id-free whitespace)."""
    base = message("ping", {})
    return base[:-1] + " " * (size - len(base.encode())) + "}"


def test_message_of_exactly_one_mib_is_accepted():
    data = padded_ping(MAX_MESSAGE_BYTES)
    assert len(data.encode()) == MAX_MESSAGE_BYTES
    assert isinstance(decode_request(data), Request)
    assert isinstance(decode_request(data.encode()), Request)


def test_message_of_one_mib_and_one_byte_is_refused():
    data = padded_ping(MAX_MESSAGE_BYTES + 1)
    for form in (data, data.encode()):
        err = refused(form)
        assert "over the 1048576-byte limit" in err.message


def test_size_limit_counts_utf8_bytes_not_characters():
    # 2-byte characters: under the limit in characters, over it in bytes.
    manifest = "é" * (MAX_MESSAGE_BYTES // 2)
    data = message("up", dict(MANIFEST, manifest=manifest))
    assert len(data) < MAX_MESSAGE_BYTES < len(data.encode())
    assert "over the 1048576-byte limit" in refused(data).message


# --------------------------------------------------------------------------- signature fields


def test_read_only_command_unsigned():
    req = decoded("list", {})
    assert (req.ts, req.nonce, req.key, req.sig) == (None, None, None, None)


def test_read_only_command_with_wellformed_signature_fields():
    req = decoded("status", {}, ts=NOW, nonce=NONCE, key=KEY, sig=SIG)
    assert (req.ts, req.nonce, req.key, req.sig) == (NOW, NONCE, KEY, SIG)


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"key": 5, "sig": "nothex", "nonce": "x", "ts": "soon"},
        {"key": KEY.upper(), "sig": SIG[:-1], "ts": 10**400},
        {"key": None, "sig": None, "nonce": None, "ts": None},
    ],
)
def test_signed_command_passes_garbled_signature_fields_through_as_none(fields):
    # Authentication, not the decoder, answers for these (UNAUTHORIZED, not BAD_REQUEST).
    raw = {"v": 1, "id": "r1", "cmd": "down", "args": {"app": "web"}, **fields}
    req = decode_request(json.dumps(raw))
    assert isinstance(req, Request)
    assert (req.ts, req.nonce, req.key, req.sig) == (None, None, None, None)
    assert req.raw == json.loads(json.dumps(raw))


def test_signed_command_keeps_wellformed_signature_fields():
    req = decoded("down", {"app": "web"}, ts=int(NOW), nonce=NONCE, key=KEY, sig=SIG)
    assert (req.ts, req.nonce, req.key, req.sig) == (NOW, NONCE, KEY, SIG)
    assert isinstance(req.ts, float)


def test_decode_envelope_does_not_look_at_args():
    env = decode_envelope(message("up", "garbage", extra=1))
    assert isinstance(env, Envelope)
    assert (env.id, env.cmd) == ("r1", "up")


# --------------------------------------------------------------------------- accept_request


def accept(data, *, guard=None, now=NOW, authorized=AUTHORIZED, insecure=False):
    guard = ReplayGuard() if guard is None else guard
    return accept_request(data, authorized=authorized, guard=guard, now=now, insecure=insecure)


def signed_text(cmd="scale", args=None, *, key=ADMIN, ts=NOW, nonce=None, id="r1") -> str:
    return encode_request(
        id=id,
        cmd=cmd,
        args={"app": "web", "replicas": 2} if args is None else args,
        signing_key=key,
        ts=ts,
        nonce=nonce,
    )


def test_accept_signed_request():
    req = accept(signed_text())
    assert isinstance(req, Request)
    assert req.signer == fingerprint(ADMIN.public)
    assert req.args == {"app": "web", "replicas": 2}
    assert req.key == ADMIN.public


@pytest.mark.parametrize("cmd", sorted(SIGNED_COMMANDS))
@pytest.mark.parametrize("args", [{}, "garbage", {"app": "web", "bogus": [1]}, None])
def test_unsigned_mutating_request_is_unauthorized_whatever_its_args(cmd, args):
    result = accept(message(cmd, args))
    assert isinstance(result, DecodeError)
    assert result.code == "UNAUTHORIZED"
    assert result.id == "r1"


def test_unsigned_mutating_request_without_args_is_unauthorized():
    result = accept(json.dumps({"v": 1, "id": "r1", "cmd": "down", "junk": 1}))
    assert (result.code, result.id) == ("UNAUTHORIZED", "r1")


def test_validly_signed_request_with_bad_args_is_bad_request_and_spends_nonce():
    guard = ReplayGuard()
    text = signed_text(args={"app": "web", "replicas": 2})
    raw = json.loads(text)
    raw["args"]["replicas"] = 5000
    # Re-sign the bad args with the admin key: the signature is good, the args are not.
    bad = sign_request(ADMIN, id="r1", cmd="scale", args=raw["args"], ts=NOW, nonce=raw["nonce"])
    result = accept(json.dumps(bad), guard=guard)
    assert (result.code, result.id) == ("BAD_REQUEST", "r1")
    assert "args.replicas must be an integer 0..1000" in result.message
    assert len(guard) == 1
    assert accept(json.dumps(bad), guard=guard).code == "REPLAY"


def test_accept_orders_auth_errors():
    guard = ReplayGuard()
    assert accept(signed_text(key=OTHER), guard=guard).code == "UNAUTHORIZED"
    assert accept(signed_text(ts=NOW - 31), guard=guard).code == "EXPIRED"
    text = signed_text()
    assert isinstance(accept(text, guard=guard), Request)
    assert accept(text, guard=guard, now=NOW + 5).code == "REPLAY"


def test_accept_read_only_is_not_verified():
    assert isinstance(accept(message("list", {})), Request)
    # Signed by a key the conductor does not know: still fine for a read-only verb.
    req = accept(signed_text("status", {}, key=OTHER, ts=NOW - 3600))
    assert isinstance(req, Request)
    assert req.signer is None


def test_accept_insecure_skips_authentication():
    req = accept(message("down", {"app": "web"}), insecure=True, authorized=AuthorizedKeys())
    assert isinstance(req, Request)
    assert req.signer is None
    assert accept(message("down", {}), insecure=True).code == "BAD_REQUEST"


def test_accept_frame_errors_come_first():
    assert accept("not json").code == "BAD_REQUEST"
    assert accept(message("reboot", {})).code == "BAD_REQUEST"


# --------------------------------------------------------------------------- encode round trips


@pytest.mark.parametrize(("cmd", "args", "normalized"), GOOD_ARGS)
def test_encode_decode_round_trip_unsigned(cmd, args, normalized):
    text = encode_request(id="abc", cmd=cmd, args=args)
    req = decode_request(text)
    assert isinstance(req, Request)
    assert (req.id, req.cmd, req.args) == ("abc", cmd, normalized)
    assert json.loads(text) == {"v": 1, "id": "abc", "cmd": cmd, "args": args}


@pytest.mark.parametrize(("cmd", "args", "normalized"), GOOD_ARGS)
def test_encode_decode_round_trip_signed(cmd, args, normalized):
    text = encode_request(id="abc", cmd=cmd, args=args, signing_key=ADMIN, ts=NOW, nonce=NONCE)
    req = accept(text)
    assert isinstance(req, Request), req
    assert (req.id, req.cmd, req.args, req.ts, req.nonce) == ("abc", cmd, normalized, NOW, NONCE)
    assert req.key == ADMIN.public


def test_encode_non_ascii_manifest_is_signed_and_sent_as_utf8():
    args = dict(MANIFEST, manifest="app web\n  env\n    GREETING grüß 你好\n")
    text = encode_request(id="1", cmd="up", args=args, signing_key=ADMIN, ts=NOW)
    assert "grüß 你好" in text
    assert isinstance(accept(text.encode()), Request)


def test_request_message_sends_args_as_given():
    # The conductor judges the args (BAD_REQUEST, exit 1): the client never refuses them.
    assert request_message(id="1", cmd="scale", args={"app": "web"}) == {
        "v": 1, "id": "1", "cmd": "scale", "args": {"app": "web"}}


def test_a_signed_request_message_needs_ts():
    with pytest.raises(ValueError, match="needs ts"):
        request_message(id="1", cmd="ping", args={}, signing_key=ADMIN)


# --------------------------------------------------------------------------- replies


@pytest.mark.parametrize(
    "result",
    [{"pong": "conductor", "version": "0.1.0"}, [], [{"app": "wéb"}], {"lines": []}, None],
)
def test_ok_reply_round_trip(result):
    text = ok_reply("r1", result)
    assert json.loads(text) == {"v": 1, "id": "r1", "ok": True, "result": result}
    assert text.isascii()
    assert decode_reply(text) == Reply(id="r1", ok=True, result=result)


@pytest.mark.parametrize("code", [c for c in ERROR_CODES if c != "NOT_LEADER"])
def test_error_reply_round_trip(code):
    text = error_reply("r1", code, "it broke: ✗")
    assert json.loads(text) == {
        "v": 1,
        "id": "r1",
        "ok": False,
        "error": {"code": code, "message": "it broke: ✗"},
    }
    assert decode_reply(text.encode()) == Reply(
        id="r1", ok=False, error_code=code, error_message="it broke: ✗"
    )


def test_error_reply_without_id():
    assert json.loads(error_reply(None, "BAD_REQUEST", "x"))["id"] is None


def test_error_reply_refuses_unknown_code():
    with pytest.raises(ValueError, match="error code must be one of"):
        error_reply("r1", "TEAPOT", "x")


def test_replies_can_carry_any_text():
    text = ok_reply("r1", {"lines": [{"text": "bad \udc80 byte"}]})
    assert text.isascii()
    assert decode_reply(text).result["lines"][0]["text"] == "bad \udc80 byte"


def test_ok_reply_refuses_nan():
    with pytest.raises(ValueError):
        ok_reply("r1", {"cpu_pct": float("nan")})


@pytest.mark.parametrize(
    ("data", "words"),
    [
        ("[]", "must be a JSON object"),
        ('{"v":2,"id":"r","ok":true,"result":{}}', "reply v must be 1"),
        ('{"v":1,"id":3,"ok":true,"result":{}}', "reply id must be a string or null"),
        ('{"v":1,"id":"r","ok":"yes","result":{}}', "reply ok must be true or false"),
        ('{"v":1,"id":"r","ok":true}', "has no result"),
        ('{"v":1,"id":"r","ok":false}', "reply error must be an object"),
        ('{"v":1,"id":"r","ok":false,"error":{"message":"m"}}', "error.code must be"),
        ('{"v":1,"id":"r","ok":false,"error":{"code":"X","message":1}}', "error.message must"),
    ],
)
def test_decode_reply_refuses(data, words):
    result = decode_reply(data)
    assert isinstance(result, DecodeError)
    assert words in result.message


def test_decode_reply_keeps_unknown_codes_and_ignores_extra_fields():
    data = '{"v":1,"id":"r","ok":false,"error":{"code":"RATE_LIMITED","message":"m"},"x":1}'
    assert decode_reply(data) == Reply(
        id="r", ok=False, error_code="RATE_LIMITED", error_message="m"
    )


# --------------------------------------------------------------------------- watch stream


def test_event_round_trip():
    text = event_message(7, NOW, "replica.ready", {"app": "web", "replica": "web-1-a"})
    assert json.loads(text) == {
        "v": 1,
        "type": "event",
        "seq": 7,
        "ts": NOW,
        "event": "replica.ready",
        "data": {"app": "web", "replica": "web-1-a"},
    }
    assert decode_watch_message(text) == EventMessage(
        seq=7, ts=NOW, event="replica.ready", data={"app": "web", "replica": "web-1-a"}
    )


def test_snapshot_round_trip():
    state = {"nodes": [], "apps": [], "replicas": [], "rollouts": []}
    text = snapshot_message(0, NOW, state)
    assert json.loads(text) == {"v": 1, "type": "snapshot", "seq": 0, "ts": NOW, "state": state}
    assert decode_watch_message(text.encode()) == SnapshotMessage(seq=0, ts=NOW, state=state)


@pytest.mark.parametrize(
    "name", ["replica.ready", "rollout.phase", "node.lost", "a.b.c", "rollout.auto_rollback"]
)
def test_good_event_names(name):
    assert json.loads(event_message(1, NOW, name, {}))["event"] == name


@pytest.mark.parametrize(
    "name", ["replica", "Replica.ready", "replica.", ".ready", "replica..ready", "r_x.y", "a.b-c"]
)
def test_bad_event_names(name):
    with pytest.raises(ValueError, match="dotted name"):
        event_message(1, NOW, name, {})


@pytest.mark.parametrize(
    ("args", "words"),
    [
        ((-1, NOW, "a.b", {}), "seq must be"),
        ((True, NOW, "a.b", {}), "seq must be"),
        ((1, float("inf"), "a.b", {}), "ts must be"),
        ((1, NOW, "a.b", []), "data must be a dict"),
    ],
)
def test_event_message_refuses(args, words):
    with pytest.raises(ValueError, match=words):
        event_message(*args)


@pytest.mark.parametrize(
    ("data", "words"),
    [
        ('{"v":1,"type":"event","seq":1,"ts":1,"event":"a.b"}', "event data must be an object"),
        ('{"v":1,"type":"event","seq":1,"ts":1,"event":"ab","data":{}}', "dotted name"),
        ('{"v":1,"type":"snapshot","seq":1,"ts":1}', "snapshot state must be an object"),
        ('{"v":1,"type":"other","seq":1,"ts":1}', 'type must be "event", "snapshot" or "error"'),
        ('{"v":1,"type":"event","seq":-1,"ts":1,"event":"a.b","data":{}}', "seq must be"),
        ('{"v":1,"type":"event","seq":1,"ts":"x","event":"a.b","data":{}}', "ts must be"),
        ('{"v":0,"type":"event","seq":1,"ts":1,"event":"a.b","data":{}}', "v must be 1"),
    ],
)
def test_decode_watch_message_refuses(data, words):
    result = decode_watch_message(data)
    assert isinstance(result, DecodeError)
    assert words in result.message


# --------------------------------------------------------------------------- never raises

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


def request_like():
    cmds = st.sampled_from(sorted(COMMANDS) + ["x"])
    arg_names = st.sampled_from(
        ["app", "replicas", "manifest", "format", "base_dir", "force", "to", "replica", "tail", "q"]
    )
    return st.fixed_dictionaries(
        {"v": st.sampled_from([1, 1, 2, True, "1"]), "id": st.text(max_size=5), "cmd": cmds},
        optional={
            "args": st.dictionaries(arg_names, json_values, max_size=5) | json_values,
            "ts": json_values,
            "nonce": st.sampled_from([NONCE, "x"]) | json_values,
            "key": st.sampled_from([KEY, ADMIN.public]) | json_values,
            "sig": st.sampled_from([SIG]) | json_values,
        },
    )


DECODERS = [decode_request, decode_envelope, decode_reply, decode_watch_message, accept]


@pytest.mark.parametrize("decoder", DECODERS)
@given(data=st.text())
def test_arbitrary_text_never_raises(decoder, data):
    assert decoder(data) is not None


@pytest.mark.parametrize("decoder", DECODERS)
@given(data=st.binary())
def test_arbitrary_bytes_never_raise(decoder, data):
    assert decoder(data) is not None


@pytest.mark.parametrize("decoder", DECODERS)
@given(value=json_values)
def test_arbitrary_json_never_raises(decoder, value):
    assert decoder(json.dumps(value)) is not None


@given(value=request_like())
def test_request_like_json_never_raises(value):
    for data in (
        json.dumps(value),
        json.dumps(value, ensure_ascii=False).encode("utf-8", "replace"),
    ):
        result = decode_request(data)
        assert isinstance(result, Request | DecodeError)
        result = accept(data)
        assert isinstance(result, Request | DecodeError)
        if isinstance(result, DecodeError):
            assert result.code in ("BAD_REQUEST", "UNAUTHORIZED", "EXPIRED", "REPLAY")
            # An error reply can always be built from it.
            json.loads(error_reply(result.id, result.code, result.message))


@given(
    cmd_args=st.sampled_from(GOOD_ARGS),
    rid=st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=128),
    ts=st.floats(min_value=NOW - 30, max_value=NOW + 30),
)
def test_signed_round_trip_with_any_id(cmd_args, rid, ts):
    cmd, args, normalized = cmd_args
    text = encode_request(id=rid, cmd=cmd, args=args, signing_key=ADMIN, ts=ts)
    req = accept(text)
    assert isinstance(req, Request), req
    assert (req.id, req.args, req.ts) == (rid, normalized, ts)


def test_not_leader_reply_carries_the_leader_both_ways():
    from skr8tr.core.protocol import decode_reply, error_reply

    raw = error_reply("r1", "NOT_LEADER", "a follower", leader="ws://10.0.0.2:7771")
    assert json.loads(raw)["error"] == {"code": "NOT_LEADER", "message": "a follower",
                                        "leader": "ws://10.0.0.2:7771"}
    reply = decode_reply(raw)
    assert (reply.error_code, reply.error_leader) == ("NOT_LEADER", "ws://10.0.0.2:7771")
    unknown = json.loads(error_reply("r2", "NOT_LEADER", "no leader yet"))
    assert unknown["error"]["leader"] is None
    assert "leader" not in json.loads(error_reply("r3", "CONFLICT", "busy"))["error"]


def test_watch_error_message_decodes():
    from skr8tr.core.protocol import WatchError, decode_watch_message, not_leader_watch_message

    msg = decode_watch_message(not_leader_watch_message("follower", "ws://h:1"))
    assert msg == WatchError(code="NOT_LEADER", message="follower", leader="ws://h:1")
    bad = decode_watch_message(json.dumps({"v": 1, "type": "error", "error": {
        "code": "NOT_LEADER", "message": "x", "leader": 5}}))
    assert bad.code == "BAD_REQUEST"
