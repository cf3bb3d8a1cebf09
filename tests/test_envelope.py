"""Signed requests, the replay guard and node-join challenges (DESIGN.md §4)."""

from __future__ import annotations

import copy
import json
import math

import nacl.signing
import pytest
from hypothesis import given
from hypothesis import strategies as st

from skr8tr.core.envelope import (
    CHALLENGE_BYTES,
    READ_ONLY_COMMANDS,
    SIGNED_COMMANDS,
    AuthError,
    ReplayGuard,
    canonical_json,
    new_challenge,
    new_nonce,
    sign_challenge,
    sign_request,
    verify_challenge,
    verify_request,
)
from skr8tr.core.keys import AuthorizedKeys, fingerprint, parse_authorized_keys
from skr8tr.core.signatures import ED25519, Signer

NOW = 1_700_000_000.0
ADMIN = Signer(ED25519, bytes(range(32)))
NODE = Signer(ED25519, bytes(range(1, 33)))
STRANGER = Signer(ED25519, bytes(range(2, 34)))
AUTHORIZED = parse_authorized_keys(
    f"admin {ADMIN.public} alice\nnode {NODE.public} n1\n", filename="ak"
)
ARGS = {"app": "web", "replicas": 3, "nested": {"list": [1, "two", {"x": None}]}}


def signed(key=ADMIN, *, ts=NOW, nonce=None, cmd="scale", args=None, id="req-1") -> dict:
    return sign_request(
        key,
        id=id,
        cmd=cmd,
        args=copy.deepcopy(ARGS) if args is None else args,
        ts=ts,
        nonce=nonce or new_nonce(),
    )


def verify(req, *, guard=None, now=NOW, role="admin", authorized=AUTHORIZED) -> str:
    guard = ReplayGuard() if guard is None else guard
    return verify_request(req, authorized=authorized, guard=guard, now=now, role=role)


def auth_code(req, **kw) -> str:
    with pytest.raises(AuthError) as info:
        verify(req, **kw)
    return info.value.code


def test_command_sets():
    signed_cmds = {"up", "down", "rollout", "rollout-abort", "rollout-undo", "scale", "logs",
                   "restart", "describe", "revision", "rollout-promote", "rollout-pause",
                   "rollout-resume"}
    read_only = {"ping", "list", "nodes", "status", "history", "rollout-status"}
    assert signed_cmds == SIGNED_COMMANDS
    assert read_only == READ_ONLY_COMMANDS


def test_sign_request_shape():
    req = signed(nonce="ab" * 16)
    assert set(req) == {"v", "id", "cmd", "args", "ts", "nonce", "key", "sig"}
    assert req["v"] == 1
    assert req["key"] == ADMIN.public
    assert len(req["sig"]) == 128 and req["sig"] == req["sig"].lower()
    body = {k: v for k, v in req.items() if k != "sig"}
    # An independent check with PyNaCl itself: the Ed25519 wire is unchanged.
    verify_key = nacl.signing.VerifyKey(bytes.fromhex(ADMIN.public))
    verify_key.verify(canonical_json(body), bytes.fromhex(req["sig"]))


def test_new_nonce_is_32_lowercase_hex_and_fresh():
    nonces = {new_nonce() for _ in range(100)}
    assert len(nonces) == 100
    assert all(len(n) == 32 and n == n.lower() and int(n, 16) >= 0 for n in nonces)


def test_signed_request_verifies_and_returns_fingerprint():
    req = signed()
    assert verify(req) == fingerprint(ADMIN.public)


def test_signed_request_survives_a_json_round_trip():
    req = signed(args={"manifest": "app wëb ✓\n", "format": "skr8tr", "base_dir": "/tmp"})
    wire = json.dumps(req)  # any formatting, any escaping
    assert verify(json.loads(wire))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("v", 2),
        ("id", "req-2"),
        ("cmd", "down"),
        ("args", {"app": "web", "replicas": 4, "nested": ARGS["nested"]}),
        ("args", {"app": "web", "replicas": 3, "nested": {"list": [1, "two", {"x": 0}]}}),
        ("args", {"app": "web", "replicas": 3}),
        ("ts", NOW + 1),
        ("ts", int(NOW) + 0.5),
        ("nonce", "0" * 32),
        ("key", STRANGER.public),
        ("extra", "smuggled"),
    ],
)
def test_changing_any_signed_field_fails(field, value):
    authorized = parse_authorized_keys(
        f"admin {ADMIN.public}\nadmin {STRANGER.public}\n", filename="ak"
    )
    req = signed()
    req[field] = value
    assert auth_code(req, authorized=authorized) == "UNAUTHORIZED"


def test_removing_a_signed_field_fails():
    req = signed()
    del req["id"]
    assert auth_code(req) == "UNAUTHORIZED"


@given(index=st.integers(min_value=0, max_value=63), bit=st.integers(min_value=0, max_value=7))
def test_flipping_any_signature_bit_fails(index, bit):
    req = signed(nonce="cd" * 16)
    sig = bytearray(bytes.fromhex(req["sig"]))
    sig[index] ^= 1 << bit
    req["sig"] = sig.hex()
    assert auth_code(req) == "UNAUTHORIZED"


def test_signature_from_another_key_fails():
    req = signed()
    req["sig"] = signed(STRANGER, nonce=req["nonce"])["sig"]
    assert auth_code(req) == "UNAUTHORIZED"


def test_unauthorized_key_fails_even_with_a_valid_signature():
    with pytest.raises(AuthError) as info:
        verify(signed(STRANGER))
    assert info.value.code == "UNAUTHORIZED"
    assert "not authorized as admin" in info.value.message
    assert STRANGER.public in info.value.message  # the line to add


def test_node_key_is_not_an_admin():
    assert auth_code(signed(NODE)) == "UNAUTHORIZED"
    assert verify(signed(NODE), role="node") == fingerprint(NODE.public)


def test_key_with_both_roles_is_an_admin():
    both = parse_authorized_keys(
        f"node {NODE.public}\nadmin {NODE.public}\n", filename="ak"
    )
    assert verify(signed(NODE), authorized=both)


def test_empty_authorized_keys_refuses_everyone():
    assert auth_code(signed(), authorized=AuthorizedKeys()) == "UNAUTHORIZED"


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda r: (r.pop("key"), r.pop("sig")), "not signed"),
        (lambda r: r.pop("sig"), "sig must be"),
        (lambda r: r.pop("key"), "key must be"),
        (lambda r: r.update(key=r["key"].upper()), "key must be"),
        (lambda r: r.update(key=r["key"][:-2]), "key must be"),
        (lambda r: r.update(key=7), "key must be"),
        (lambda r: r.update(sig=r["sig"].upper()), "sig must be"),
        (lambda r: r.update(sig=r["sig"] + "00"), "sig must be"),
        (lambda r: r.update(sig=None), "sig must be"),
        (lambda r: r.pop("nonce"), "nonce must be"),
        (lambda r: r.update(nonce="ab" * 7), "nonce must be"),
        (lambda r: r.update(nonce="AB" * 8), "nonce must be"),
        (lambda r: r.update(nonce="ab" * 65), "nonce must be"),
        (lambda r: r.pop("ts"), "ts must be a number"),
        (lambda r: r.update(ts="1700000000"), "ts must be a number"),
        (lambda r: r.update(ts=True), "ts must be a number"),
    ],
)
def test_malformed_credentials_are_unauthorized(mutate, message):
    req = signed()
    mutate(req)
    with pytest.raises(AuthError) as info:
        verify(req)
    assert info.value.code == "UNAUTHORIZED"
    assert message in info.value.message


@pytest.mark.parametrize(
    "args",
    [
        "garbage",
        None,
        [1, 2, 3],
        {"app": "../../etc", "replicas": -5, "unknown": {"deep": [float("inf")]}},
    ],
)
def test_unsigned_mutating_request_with_garbage_args_is_unauthorized(args):
    req = {"v": 1, "id": "x", "cmd": "scale", "args": args, "ts": NOW, "nonce": new_nonce()}
    assert auth_code(req) == "UNAUTHORIZED"


def test_forged_request_with_garbage_args_is_unauthorized():
    req = signed()
    req["args"] = {"replicas": "many"}
    assert auth_code(req) == "UNAUTHORIZED"


def test_authentication_is_checked_before_freshness_and_replay():
    guard = ReplayGuard()
    req = signed(STRANGER, ts=NOW - 3600)
    assert auth_code(req, guard=guard) == "UNAUTHORIZED"
    good = signed()
    verify(good, guard=guard)
    forged = dict(good, sig="00" * 64)  # a replay of a spent nonce, badly signed
    assert auth_code(forged, guard=guard) == "UNAUTHORIZED"


def test_bad_signature_does_not_spend_the_nonce():
    guard = ReplayGuard()
    req = signed()
    assert auth_code(dict(req, sig="00" * 64), guard=guard) == "UNAUTHORIZED"
    assert len(guard) == 0
    assert verify(req, guard=guard)


def test_replayed_nonce_is_refused():
    guard = ReplayGuard()
    req = signed()
    verify(req, guard=guard)
    with pytest.raises(AuthError) as info:
        verify(copy.deepcopy(req), guard=guard, now=NOW + 10)
    assert info.value.code == "REPLAY"


def test_same_nonce_in_a_new_request_is_a_replay_too():
    guard = ReplayGuard()
    verify(signed(nonce="ab" * 16), guard=guard)
    assert auth_code(signed(nonce="ab" * 16, ts=NOW + 1, id="other"), guard=guard) == "REPLAY"


def test_nonces_are_per_key():
    both = parse_authorized_keys(
        f"admin {ADMIN.public}\nadmin {STRANGER.public}\n", filename="ak"
    )
    guard = ReplayGuard()
    verify(signed(ADMIN, nonce="ab" * 16), guard=guard, authorized=both)
    verify(signed(STRANGER, nonce="ab" * 16), guard=guard, authorized=both)


@pytest.mark.parametrize("skew", [-30, -29.999, 0, 29.5, 30])
def test_ts_inside_window_is_accepted(skew):
    verify(signed(ts=NOW + skew))


@pytest.mark.parametrize("skew", [-31, -30.001, 30.001, 31, 1e9, -NOW])
def test_ts_outside_window_is_expired(skew):
    with pytest.raises(AuthError) as info:
        verify(signed(ts=NOW + skew))
    assert info.value.code == "EXPIRED"
    assert "check the client's clock" in info.value.message


@pytest.mark.parametrize("ts", [10**400, -(10**400)])
def test_ts_too_large_for_a_float_is_expired(ts):
    req = signed(ts=ts)  # validly signed: the ts check is what fails
    assert auth_code(req) == "EXPIRED"


@pytest.mark.parametrize("ts", [math.inf, -math.inf, math.nan, None, "1", True])
def test_guard_refuses_a_non_finite_ts(ts):
    # JSON cannot carry Infinity or NaN, but the guard must not rely on that.
    with pytest.raises(AuthError) as info:
        ReplayGuard().check("k", "n", ts, NOW)
    assert info.value.code == "EXPIRED"


def test_expired_request_does_not_spend_its_nonce():
    guard = ReplayGuard()
    req = signed(ts=NOW)
    assert auth_code(req, guard=guard, now=NOW + 31) == "EXPIRED"
    assert len(guard) == 0


def test_nonce_spent_even_if_the_command_later_fails():
    # verify_request is the only place that spends; the command's outcome is not an input.
    guard = ReplayGuard()
    req = signed(args={"app": "no-such-app", "replicas": 5000})
    verify(req, guard=guard)
    assert len(guard) == 1
    assert auth_code(req, guard=guard) == "REPLAY"


# --------------------------------------------------------------------------- replay guard


def test_guard_forgets_nonces_once_they_expire_and_replays_then_fail_as_expired():
    guard = ReplayGuard()
    assert guard  # an empty guard is still truthy
    reqs = [signed(ts=NOW + i) for i in range(5)]
    for i, req in enumerate(reqs):
        verify(req, guard=guard, now=NOW + i)
    assert len(guard) == 5
    # Just inside the window of the first request: still remembered, still REPLAY.
    assert auth_code(reqs[0], guard=guard, now=NOW + 30) == "REPLAY"
    assert len(guard) == 5
    # Past the window of the first two: they are forgotten...
    verify(signed(ts=NOW + 31.5), guard=guard, now=NOW + 31.5)
    assert len(guard) == 4  # 3 old + the new one
    # ...and replaying them fails as EXPIRED, never accepted.
    assert auth_code(reqs[0], guard=guard, now=NOW + 31.5) == "EXPIRED"
    assert auth_code(reqs[1], guard=guard, now=NOW + 31.5) == "EXPIRED"
    assert auth_code(reqs[2], guard=guard, now=NOW + 31.5) == "REPLAY"
    # Long after: everything is forgotten.
    guard.check("k" * 64, "ab" * 16, NOW + 1000, NOW + 1000)
    assert len(guard) == 0


def test_guard_remembers_future_ts_until_its_own_expiry():
    guard = ReplayGuard()
    guard.check_and_spend("k", "n1", NOW + 30, NOW)
    guard.check("k", "n2", NOW + 55, NOW + 55)  # prunes nothing: n1 valid until NOW + 60
    assert len(guard) == 1
    with pytest.raises(AuthError, match="REPLAY"):
        guard.check("k", "n1", NOW + 30, NOW + 60)
    guard.check("k", "n2", NOW + 60.5, NOW + 60.5)
    assert len(guard) == 0


def test_guard_is_not_fooled_by_a_clock_stepping_back():
    guard = ReplayGuard()
    guard.check_and_spend("k", "n", NOW, NOW)
    guard.check("k", "other", NOW + 100, NOW + 100)  # prunes "n"
    assert len(guard) == 0
    # The wall clock steps back 80 s: "n" at ts NOW would pass |now - ts| <= 30,
    # but it may have been forgotten, so it must not be accepted.
    with pytest.raises(AuthError) as info:
        guard.check("k", "n", NOW, NOW + 20)
    assert info.value.code == "EXPIRED"


def test_guard_size_is_bounded_by_the_window():
    guard = ReplayGuard(window_s=30)
    for i in range(10_000):
        now = NOW + i * 0.01  # 100 requests per second for 100 s
        guard.check_and_spend("k", f"{i:032x}", now, now)
    # Only the last ~60 s (ts + window) worth can still be remembered.
    assert len(guard) <= 3100
    assert len(guard._heap) <= 3100


@pytest.mark.parametrize("now", [math.nan, math.inf])
def test_guard_rejects_a_non_finite_clock(now):
    with pytest.raises(ValueError):
        ReplayGuard().check("k", "n", NOW, now)


def test_guard_window_is_configurable():
    guard = ReplayGuard(window_s=5)
    guard.check("k", "n", NOW - 5, NOW)
    with pytest.raises(AuthError, match="EXPIRED"):
        guard.check("k", "n", NOW - 5.5, NOW)


# A conductor started at NOW - 10: what was signed before then may have been accepted by
# the process before it (#13.8).
@pytest.mark.parametrize(("ts", "now", "code"), [
    (NOW - 10.001, NOW, "EXPIRED"),  # inside the 30 s window, but from before the start
    (NOW - 29, NOW - 9, "EXPIRED"),
    (NOW - 10, NOW, None),  # signed at the very start
    (NOW - 5, NOW, None),
    (NOW + 20, NOW, None),  # ahead of this clock: not_before cannot tell (replay_store)
    (NOW - 40, NOW, "EXPIRED"),  # the window says so first
])
def test_guard_refuses_what_was_signed_before_not_before(ts, now, code):
    guard = ReplayGuard(not_before=NOW - 10)
    req = signed(ts=ts)
    if code is None:
        verify(req, guard=guard, now=now)
        assert auth_code(req, guard=guard, now=now) == "REPLAY"
        return
    with pytest.raises(AuthError) as info:
        verify(req, guard=guard, now=now)
    assert info.value.code == code
    assert len(guard) == 0  # a refused request spends nothing
    if ts >= now - 30:
        assert "before this conductor (re)started" in info.value.message
        assert "sign it again" in info.value.message


@pytest.mark.parametrize("not_before", [math.nan, math.inf])
def test_guard_not_before_must_be_a_time(not_before):
    with pytest.raises(ValueError):
        ReplayGuard(not_before=not_before)


# --------------------------------------------------------------------------- robustness


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=10,
)


REQUEST_KEYS = st.sampled_from(["v", "id", "cmd", "args", "ts", "nonce", "key", "sig", "x"])


@given(st.dictionaries(REQUEST_KEYS, json_values, max_size=9))
def test_verify_request_raises_only_auth_error(req):
    with pytest.raises(AuthError):
        verify(req)


@given(json_values)
def test_verify_request_raises_only_auth_error_on_any_value(value):
    with pytest.raises(AuthError):
        verify(value)


@given(st.text())
def test_verify_request_with_valid_credentials_and_odd_content(text):
    req = signed()
    req["args"] = {"weird": text, "surrogate": "\udc80"}
    with pytest.raises(AuthError) as info:
        verify(req)
    assert info.value.code == "UNAUTHORIZED"


def test_verify_request_with_uncanonicalisable_content():
    req = signed()
    loop: list = []
    loop.append(loop)
    req["args"] = {"loop": loop, "obj": object()}
    assert auth_code(req) == "UNAUTHORIZED"


# --------------------------------------------------------------------------- canonical JSON


def test_canonical_json_is_sorted_compact_and_utf8():
    fields = {"b": "wëb ✓ 雪", "a": {"z": 1, "y": [1.5, None, True]}, "id": "é"}
    assert canonical_json(fields) == (
        '{"a":{"y":[1.5,null,true],"z":1},"b":"wëb ✓ 雪","id":"é"}'.encode()
    )


def test_signature_over_non_ascii_args_verifies():
    req = signed(args={"manifest": "app café\n  env\n    GREETING 你好\n"})
    assert verify(json.loads(json.dumps(req, ensure_ascii=True)))


# --------------------------------------------------------------------------- node joins


def test_join_challenge_round_trip():
    challenge = new_challenge()
    assert len(challenge) == CHALLENGE_BYTES
    sig = sign_challenge(NODE, challenge, "node-a")
    fpr = verify_challenge(
        key=NODE.public, sig=sig, challenge=challenge, node_id="node-a", authorized=AUTHORIZED
    )
    assert fpr == fingerprint(NODE.public)


@pytest.mark.parametrize(
    "change",
    [
        {"node_id": "node-b"},
        {"challenge": bytes(CHALLENGE_BYTES)},
        {"key": ADMIN.public},
        {"sig": "00" * 64},
        {"sig": "zz"},
        {"key": None},
        {"node_id": 5},
    ],
)
def test_join_challenge_refusals(change):
    challenge = b"\x01" * CHALLENGE_BYTES
    kw = {
        "key": NODE.public,
        "sig": sign_challenge(NODE, challenge, "node-a"),
        "challenge": challenge,
        "node_id": "node-a",
        "authorized": AUTHORIZED,
    }
    kw.update(change)
    with pytest.raises(AuthError) as info:
        verify_challenge(**kw)
    assert info.value.code == "UNAUTHORIZED"


def test_admin_key_cannot_join_as_node():
    challenge = new_challenge()
    with pytest.raises(AuthError, match="not authorized as node"):
        verify_challenge(
            key=ADMIN.public,
            sig=sign_challenge(ADMIN, challenge, "n"),
            challenge=challenge,
            node_id="n",
            authorized=AUTHORIZED,
        )


def test_join_signature_and_request_signature_are_not_interchangeable():
    both = parse_authorized_keys(
        f"admin {NODE.public}\nnode {NODE.public}\n", filename="ak"
    )
    req = signed(NODE)
    body = canonical_json({k: v for k, v in req.items() if k != "sig"})
    # A request signature is not a join answer, whatever challenge/node id split is tried.
    challenge = body[:CHALLENGE_BYTES]
    with pytest.raises(AuthError):
        verify_challenge(
            key=req["key"], sig=req["sig"], challenge=challenge, node_id="x", authorized=both
        )
    # And a join signature is not a request signature.
    join_sig = sign_challenge(NODE, b"\x02" * CHALLENGE_BYTES, "n")
    assert auth_code(dict(req, sig=join_sig), authorized=both) == "UNAUTHORIZED"
