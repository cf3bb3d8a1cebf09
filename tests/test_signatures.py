"""Issue #16: the rules of signed requests, node joins and authorized keys, for each key
algorithm (Ed25519, ML-DSA-65 and the hybrid of both; DESIGN.md §4, §10).

Every test here runs once per algorithm. The pure core only: signatures, key text and
key files' lines, the signed-request path (``verify_request``, and the conductor's
``authenticate_request`` + ``admit_request``), node joins, ``--require-pq`` in
:class:`AuthorizedKeys` and :meth:`Authority.replace_keys`. The daemon, the CLI and the
audit log with these keys: tests/test_signatures_shell.py.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import re
from typing import Any, NamedTuple

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from skr8tr.conductor.authority import Authority, NodeSessionHandle
from skr8tr.core import signatures
from skr8tr.core.envelope import (
    CHALLENGE_BYTES,
    AuthError,
    ReplayGuard,
    canonical_json,
    new_nonce,
    sign_challenge,
    sign_request,
    verify_challenge,
    verify_request,
)
from skr8tr.core.keys import (
    AuthorizedKeys,
    AuthorizedKeysError,
    KeyFileError,
    parse_authorized_keys,
    parse_signing_key,
    public_key_line,
    secret_key_line,
)
from skr8tr.core.protocol import DecodeError, Request, admit_request, authenticate_request
from skr8tr.core.signatures import (
    ALGORITHMS,
    ED25519,
    HYBRID,
    ML_DSA_65,
    Algorithm,
    Signer,
    fingerprint,
    is_public_key,
    is_signature,
    key_algorithm,
    public_key_bytes,
    verify,
)

NOW = 1_700_000_000.0
ALGS = (ED25519, ML_DSA_65, HYBRID)
each_alg = pytest.mark.parametrize("alg", ALGS, ids=[a.name for a in ALGS])
# ML-DSA-65 signs in about a millisecond; a few dozen examples per algorithm say enough,
# and the wall clock never fails a property test (conftest's profile, restated here).
PROPERTY = settings(max_examples=25, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def make_signer(alg: Algorithm, n: int) -> Signer:
    """A fixed key of *alg*: the same on every run, different for each *n*."""
    return Signer(alg, bytes((7 * n + i) % 256 for i in range(alg.seed_bytes)))


class Keys(NamedTuple):
    admin: Signer
    node: Signer
    stranger: Signer  # same algorithm, listed nowhere
    authorized: AuthorizedKeys


@functools.cache
def keys_of(alg: Algorithm) -> Keys:
    admin, node, stranger = (make_signer(alg, n) for n in (1, 2, 3))
    authorized = parse_authorized_keys(
        f"# team\nadmin {admin.public} alice\nnode {node.public} web-1\n", filename="ak")
    return Keys(admin, node, stranger, authorized)


def body_of(req: dict[str, Any]) -> bytes:
    """The bytes a request's signature covers."""
    return canonical_json({k: v for k, v in req.items() if k != "sig"})


def signed(key: Signer, *, ts: float = NOW, nonce: str | None = None,
           args: dict[str, Any] | None = None) -> dict[str, Any]:
    return sign_request(key, id="r1", cmd="scale",
                        args={"app": "web", "replicas": 3} if args is None else args,
                        ts=ts, nonce=nonce or new_nonce())


# ---------------------------------------------------------------------------- sizes


@pytest.mark.parametrize(("alg", "seed", "public", "sig"), [
    (ED25519, 32, 32, 64),
    (ML_DSA_65, 32, 1952, 3309),
    (HYBRID, 64, 1984, 3373),
], ids=[a.name for a in ALGS])
def test_sizes_are_those_of_design_section_10(alg, seed, public, sig):
    signer = make_signer(alg, 1)
    assert (alg.seed_bytes, alg.public_bytes, alg.signature_bytes) == (seed, public, sig)
    assert len(signer.seed) == seed
    assert len(public_key_bytes(signer.public)) == public
    assert len(signer.sign(b"m")) == sig
    # The text forms: signing.sec, signing.pub (each one line) and the wire's sig.
    prefix = "" if alg is ED25519 else alg.name + ":"
    assert secret_key_line(signer) == prefix + signer.seed.hex() + "\n"
    assert len(secret_key_line(signer)) == len(prefix) + 2 * seed + 1
    assert public_key_line(signer.public) == signer.public + "\n"
    assert len(signer.public) == len(prefix) + 2 * public
    assert signer.public.startswith(prefix) and signer.public == signer.public.lower()
    assert alg.post_quantum is (alg is not ED25519)
    assert ALGORITHMS[alg.name] is alg


def test_hybrid_parts_are_the_ed25519_key_then_the_ml_dsa_one():
    seed = bytes(range(64))
    hybrid = Signer(HYBRID, seed)
    ed, ml = Signer(ED25519, seed[:32]), Signer(ML_DSA_65, seed[32:])
    assert public_key_bytes(hybrid.public) == (public_key_bytes(ed.public)
                                               + public_key_bytes(ml.public))
    sig = hybrid.sign(b"both")
    assert verify(ed.public, b"both", sig[:64].hex())
    assert verify(ml.public, b"both", sig[64:].hex())


# ---------------------------------------------------------------------------- round trips


@each_alg
@PROPERTY
@given(message=st.binary(max_size=300))
def test_any_message_signs_and_verifies(alg, message):
    k = keys_of(alg)
    sig = k.admin.sign(message).hex()
    assert is_signature(sig, alg)
    assert verify(k.admin.public, message, sig)
    assert not verify(k.stranger.public, message, sig)  # another key of the same kind
    assert not verify(k.admin.public, message + b"\0", sig)


def _flip(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


@each_alg
@PROPERTY
@given(data=st.data())
def test_flipping_any_bit_of_message_or_signature_fails(alg, data):
    k = keys_of(alg)
    message = data.draw(st.binary(min_size=1, max_size=200), label="message")
    sig = k.admin.sign(message)
    bit = data.draw(st.integers(0, 8 * len(message) - 1), label="message bit")
    assert not verify(k.admin.public, _flip(message, bit), sig.hex())
    # Half the draws in the first 64 bytes: the Ed25519 half of a hybrid signature.
    bit = data.draw(st.one_of(st.integers(0, 8 * 64 - 1), st.integers(0, 8 * len(sig) - 1)),
                    label="signature bit")
    assert not verify(k.admin.public, message, _flip(sig, bit).hex())
    assert verify(k.admin.public, message, sig.hex())  # the original still verifies


@each_alg
@PROPERTY
@given(data=st.data())
def test_key_file_lines_round_trip(alg, data):
    seed = data.draw(st.binary(min_size=alg.seed_bytes, max_size=alg.seed_bytes))
    signer = Signer(alg, seed)
    sec = secret_key_line(signer)
    for text in (sec, sec.upper().replace(alg.name.upper(), alg.name), "  " + sec + "\r\n"):
        loaded = parse_signing_key(text.encode(), filename="signing.sec")
        assert (loaded.algorithm, loaded.seed, loaded.public) == (alg, seed, signer.public)
    pub = public_key_line(signer.public)
    assert key_algorithm(pub.strip()) is alg
    assert fingerprint(pub.strip()) == "sha256:" + hashlib.sha256(
        public_key_bytes(signer.public)).hexdigest()[:16]


@each_alg
@PROPERTY
@given(junk=st.binary(min_size=1, max_size=64))
def test_a_random_signature_of_the_right_length_is_false_never_an_error(alg, junk):
    sig = (junk * (alg.signature_bytes // len(junk) + 1))[:alg.signature_bytes]
    assert verify(keys_of(alg).admin.public, b"m", sig.hex()) is False


@each_alg
def test_a_signature_of_another_algorithm_length_is_false(alg):
    k = keys_of(alg)
    for other in ALGS:
        if other is not alg:
            sig = make_signer(other, 1).sign(b"m").hex()
            assert not is_signature(sig, alg)
            assert verify(k.admin.public, b"m", sig) is False


@each_alg
def test_key_text_forms(alg):
    pub = keys_of(alg).admin.public
    hex_part = pub[len(alg.prefix):]
    assert key_algorithm(pub) is alg and is_public_key(pub)
    upper = alg.prefix + hex_part.upper()
    assert key_algorithm(upper) is None  # the wire wants lowercase
    assert key_algorithm(upper, any_case=True) is alg  # an operator may type upper case
    for bad in ("ed25519:" + hex_part, "ml-dsa-44:" + hex_part, "ML-DSA-65:" + hex_part,
                hex_part if alg is not ED25519 else "ml-dsa-65:" + hex_part,
                pub[:-2], pub + "00", pub[:-1] + "g", " " + pub, pub + "\n"):
        assert key_algorithm(bad) is None, bad[:30]
        assert key_algorithm(bad, any_case=True) is None, bad[:30]
        with pytest.raises(ValueError):
            fingerprint(bad)


# ---------------------------------------------------------------------------- refusals
# Each refusal, on both paths: envelope.verify_request, and what the conductor runs
# (protocol.authenticate_request on the wire text, then admit_request).

Outcome = tuple[str, str] | None  # (code, message) of a refusal; None when accepted


def via_envelope(req: dict[str, Any], *, authorized: AuthorizedKeys, guard: ReplayGuard,
                 now: float = NOW) -> Outcome:
    try:
        fpr = verify_request(req, authorized=authorized, guard=guard, now=now)
    except AuthError as exc:
        return exc.code, exc.message
    assert fpr == fingerprint(req["key"])
    return None


def via_protocol(req: dict[str, Any], *, authorized: AuthorizedKeys, guard: ReplayGuard,
                 now: float = NOW) -> Outcome:
    auth = authenticate_request(json.dumps(req), authorized=authorized)
    result = admit_request(auth, guard=guard, now=now)
    if isinstance(result, DecodeError):
        # What the refusal log and the audit trail keep: the key only when well-formed.
        assert result.key == (req.get("key") if is_public_key(req.get("key")) else None)
        return result.code, result.message
    assert isinstance(result, Request)
    assert result.signer == fingerprint(req["key"])
    return None


each_path = pytest.mark.parametrize("submit", [via_envelope, via_protocol],
                                    ids=["verify_request", "protocol"])


def refused(submit, req, *, authorized=None, guard=None, now=NOW, alg=None) -> tuple[str, str]:
    if authorized is None:
        authorized = keys_of(alg or key_algorithm(req["key"])).authorized
    outcome = submit(req, authorized=authorized, guard=guard or ReplayGuard(), now=now)
    assert outcome is not None, "accepted"
    return outcome


@each_alg
@each_path
def test_a_good_request_is_accepted_once(alg, submit):
    k = keys_of(alg)
    guard = ReplayGuard()
    req = signed(k.admin)
    assert len(req["sig"]) == 2 * alg.signature_bytes
    assert submit(req, authorized=k.authorized, guard=guard) is None
    assert len(guard) == 1


@each_alg
@each_path
def test_forged_by_another_key_of_the_same_algorithm(alg, submit):
    k = keys_of(alg)
    req = signed(k.admin)
    req["sig"] = k.stranger.sign(body_of(req)).hex()
    code, message = refused(submit, req)
    assert code == "UNAUTHORIZED"
    assert message == f"bad signature for key {fingerprint(k.admin.public)} ({alg.name})"
    # The stranger signing for itself is refused for who it is.
    code, message = refused(submit, signed(k.stranger), alg=alg)
    assert code == "UNAUTHORIZED"
    assert f"key {fingerprint(k.stranger.public)} is not authorized as admin" in message


@each_alg
@each_path
@pytest.mark.parametrize("change", [
    {"args": {"app": "web", "replicas": 4}},
    {"args": {"app": "db", "replicas": 3}},
    {"cmd": "down"},
    {"ts": NOW + 1},
    {"nonce": "0" * 32},
    {"id": "r2"},
], ids=["replicas", "app", "cmd", "ts", "nonce", "id"])
def test_tampered_request(alg, submit, change):
    req = signed(keys_of(alg).admin)
    req.update(copy.deepcopy(change))
    code, message = refused(submit, req)
    assert (code, message.split(" for key")[0]) == ("UNAUTHORIZED", "bad signature")


@each_alg
@each_path
@pytest.mark.parametrize("skew", [-31.0, 31.0, -3600.0])
def test_expired(alg, submit, skew):
    guard = ReplayGuard()
    code, message = refused(submit, signed(keys_of(alg).admin, ts=NOW + skew), guard=guard)
    assert code == "EXPIRED"
    assert "check the client's clock" in message
    assert len(guard) == 0  # nothing spent


@each_alg
@each_path
def test_replayed_nonce(alg, submit):
    k = keys_of(alg)
    guard = ReplayGuard()
    req = signed(k.admin)
    assert submit(req, authorized=k.authorized, guard=guard) is None
    code, message = refused(submit, copy.deepcopy(req), guard=guard, now=NOW + 5)
    assert (code, message) == ("REPLAY", "nonce already used by this key; send a fresh request")
    # A new request with the spent nonce is a replay too.
    again = signed(k.admin, ts=NOW + 1, nonce=req["nonce"], args={"app": "x", "replicas": 1})
    assert refused(submit, again, guard=guard)[0] == "REPLAY"


@each_alg
@each_path
def test_a_node_key_is_not_an_admin(alg, submit):
    k = keys_of(alg)
    code, message = refused(submit, signed(k.node))
    assert code == "UNAUTHORIZED"
    assert f"key {fingerprint(k.node.public)} is not authorized as admin" in message
    # The line to add: a short key in full, a long one by its file.
    shown = k.node.public if alg is ED25519 else "$(cat signing.pub)"
    assert f"add `admin {shown}`" in message


@each_alg
def test_an_admin_key_cannot_join_as_a_node(alg):
    k = keys_of(alg)
    challenge = b"\x05" * CHALLENGE_BYTES
    with pytest.raises(AuthError) as info:
        verify_challenge(key=k.admin.public, sig=sign_challenge(k.admin, challenge, "n1"),
                         challenge=challenge, node_id="n1", authorized=k.authorized)
    assert info.value.code == "UNAUTHORIZED"
    assert f"key {fingerprint(k.admin.public)} is not authorized as node" in info.value.message


@each_alg
def test_node_join_round_trip_and_refusals(alg):
    k = keys_of(alg)
    challenge = bytes(range(CHALLENGE_BYTES))
    sig = sign_challenge(k.node, challenge, "web-1")
    assert len(sig) == 2 * alg.signature_bytes
    good = {"key": k.node.public, "sig": sig, "challenge": challenge, "node_id": "web-1",
            "authorized": k.authorized}
    assert verify_challenge(**good) == fingerprint(k.node.public)
    for change, words in [
        ({"node_id": "web-2"}, f"bad join signature for key {fingerprint(k.node.public)} "
                               f"({alg.name})"),
        ({"challenge": bytes(CHALLENGE_BYTES)}, "bad join signature"),
        ({"sig": sign_challenge(k.stranger, challenge, "web-1")}, "bad join signature"),
        ({"sig": sig[:-2]}, f"sig must be {2 * alg.signature_bytes} lowercase hex"),
        ({"key": k.stranger.public, "sig": sign_challenge(k.stranger, challenge, "web-1")},
         "is not authorized as node"),
    ]:
        with pytest.raises(AuthError) as info:
            verify_challenge(**{**good, **change})
        assert info.value.code == "UNAUTHORIZED"
        assert words in info.value.message
    # A request signature is not a join answer, nor the reverse.
    both = parse_authorized_keys(f"admin {k.node.public}\nnode {k.node.public}\n")
    req = signed(k.node)
    with pytest.raises(AuthError, match="bad join signature"):
        verify_challenge(key=k.node.public, sig=req["sig"], challenge=challenge,
                         node_id="web-1", authorized=both)
    assert refused(via_envelope, dict(req, sig=sig), authorized=both)[0] == "UNAUTHORIZED"


@each_alg
@each_path
def test_a_revoked_key_is_refused_at_once(alg, submit):
    k = keys_of(alg)
    authority = Authority(k.authorized)
    assert submit(signed(k.admin), authorized=authority.authorized,
                  guard=authority.guard) is None
    without = parse_authorized_keys(f"node {k.node.public}\n", filename="ak")
    assert authority.replace_keys(without) == []  # no node session to end
    code, message = refused(submit, signed(k.admin), authorized=authority.authorized,
                            guard=authority.guard)
    assert code == "UNAUTHORIZED" and "is not authorized as admin" in message


@each_alg
@each_path
def test_a_signature_of_the_wrong_length_for_the_key(alg, submit):
    k = keys_of(alg)
    req = signed(k.admin)
    want = f"sig must be {2 * alg.signature_bytes} lowercase hex characters (a {alg.name} " \
           "signature)"
    others = [make_signer(a, 1).sign(body_of(req)).hex() for a in ALGS if a is not alg]
    for sig in [*others, req["sig"][:-2], req["sig"] + "00", req["sig"][:64], "", 7, None]:
        code, message = refused(submit, dict(req, sig=sig))
        assert (code, message) == ("UNAUTHORIZED", want)
    # The right length, not lowercase hex.
    for sig in (req["sig"].upper(), req["sig"][:-1] + "g"):
        assert refused(submit, dict(req, sig=sig)) == ("UNAUTHORIZED", want)


@each_alg
@each_path
def test_key_text_with_a_wrong_or_unknown_prefix(alg, submit):
    k = keys_of(alg)
    raw_hex = public_key_bytes(k.admin.public).hex()
    # Every key listed under every algorithm, so only the key's text can be what fails.
    everyone = parse_authorized_keys("".join(f"admin {keys_of(a).admin.public}\n"
                                             for a in ALGS))
    for key in ("ed25519:" + raw_hex, "ml-dsa-44:" + raw_hex, "ML-DSA-65:" + raw_hex,
                "ed25519+ml-dsa-44:" + raw_hex, ":" + raw_hex,
                *(a.prefix + raw_hex for a in ALGS if a is not alg)):
        req = signed(k.admin)
        req["key"] = key
        req["sig"] = k.admin.sign(body_of(req)).hex()  # signed over the odd key, too
        code, message = refused(submit, req, authorized=everyone)
        assert code == "UNAUTHORIZED"
        assert message.startswith("key must be 64 lowercase hex characters (Ed25519), or "
                                  "ml-dsa-65:HEX or ed25519+ml-dsa-65:HEX"), key[:20]


def test_hybrid_with_one_half_forged_is_refused():
    k = keys_of(HYBRID)
    for submit in (via_envelope, via_protocol):
        req = signed(k.admin)
        mine, theirs = k.admin.sign(body_of(req)), k.stranger.sign(body_of(req))
        assert mine[:64] != theirs[:64] and mine[64:] != theirs[64:]
        for sig in (mine[:64] + theirs[64:], theirs[:64] + mine[64:]):
            assert verify(k.admin.public, body_of(req), sig.hex()) is False
            code, message = refused(submit, dict(req, sig=sig.hex()))
            assert (code, message) == (
                "UNAUTHORIZED", f"bad signature for key {fingerprint(k.admin.public)} "
                                "(ed25519+ml-dsa-65)")
        assert submit(req, authorized=k.authorized, guard=ReplayGuard()) is None


def test_hybrid_key_with_only_one_half_of_a_signature_is_refused():
    k = keys_of(HYBRID)
    for submit in (via_envelope, via_protocol):
        req = signed(k.admin)
        full = k.admin.sign(body_of(req))
        # Each half is a good signature by that part of the key; alone it is not enough.
        ed_part = Signer(ED25519, k.admin.seed[:32])
        ml_part = Signer(ML_DSA_65, k.admin.seed[32:])
        assert verify(ed_part.public, body_of(req), full[:64].hex())
        assert verify(ml_part.public, body_of(req), full[64:].hex())
        for half in (full[:64], full[64:]):
            code, message = refused(submit, dict(req, sig=half.hex()))
            assert code == "UNAUTHORIZED"
            assert message.startswith("sig must be 6746 lowercase hex characters")


@each_path
def test_a_part_of_a_hybrid_key_is_not_the_hybrid_key(submit):
    # A downgrade: signing with one part of an authorized hybrid key, presented as a key
    # of that part's algorithm, grants nothing.
    k = keys_of(HYBRID)
    for part in (Signer(ED25519, k.admin.seed[:32]), Signer(ML_DSA_65, k.admin.seed[32:])):
        code, message = refused(submit, signed(part), authorized=k.authorized)
        assert code == "UNAUTHORIZED" and "is not authorized as admin" in message


# ---------------------------------------------------------------------------- --require-pq


def mixed_keys() -> tuple[str, dict[str, Signer]]:
    """An authorized-keys text with keys of every algorithm, Ed25519 ones first and last."""
    s = {"ed_admin": make_signer(ED25519, 10), "ml_admin": make_signer(ML_DSA_65, 11),
         "hy_admin": make_signer(HYBRID, 12), "ed_node": make_signer(ED25519, 13),
         "hy_node": make_signer(HYBRID, 14), "ml_node": make_signer(ML_DSA_65, 15)}
    text = (f"node {s['ed_node'].public} old-box\n"
            f"admin {s['ml_admin'].public} bob\n"
            f"admin {s['ed_admin'].public} alice\n"
            f"admin {s['hy_admin'].public} carol\n"
            f"node {s['hy_node'].public} web-1\n"
            f"node {s['ml_node'].public} web-2\n"
            f"node {s['ed_admin'].public} alice-node\n")
    return text, s


def test_require_pq_grants_nothing_to_ed25519_keys():
    text, s = mixed_keys()
    listed = parse_authorized_keys(text, filename="ak")
    pq = listed.post_quantum_only()
    assert (pq.require_pq, listed.require_pq) == (True, False)
    assert listed.roles(s["ed_admin"].public) == {"admin", "node"}  # unchanged
    assert listed.ignored() == []
    for name in ("ed_admin", "ed_node"):
        pub = s[name].public
        assert pq.roles(pub) == frozenset() and pq.entry(pub) is None
        assert not pq.has_role(pub, "admin") and not pq.has_role(pub, "node")
        assert pub in pq  # still listed, so it can be named
        refusal = pq.refusal(pub, "admin")
        assert f"key {fingerprint(pub)} is ed25519" in refusal
        assert "--require-pq" in refusal
        assert "skr8tr keygen --alg ed25519+ml-dsa-65" in refusal and "ml-dsa-65" in refusal
    for name, role in (("ml_admin", "admin"), ("hy_admin", "admin"), ("hy_node", "node"),
                       ("ml_node", "node")):
        assert pq.roles(s[name].public) == {role}
        assert pq.entry(s[name].public) == listed.entry(s[name].public)
    # In file order, one entry for a key listed twice.
    assert [e.pub_hex for e in pq.ignored()] == [s["ed_node"].public, s["ed_admin"].public]
    assert [e.comment for e in pq.ignored()] == ["old-box", "alice"]
    assert pq.ignored()[1].roles == {"admin", "node"}
    assert len(pq) == len(listed) == 6
    assert pq.post_quantum_only() == pq


@each_path
def test_require_pq_refuses_ed25519_requests_and_accepts_the_others(submit):
    text, s = mixed_keys()
    pq = parse_authorized_keys(text).post_quantum_only()
    code, message = refused(submit, signed(s["ed_admin"]), authorized=pq)
    assert code == "UNAUTHORIZED"
    assert "accepts only post-quantum keys (--require-pq)" in message
    assert "skr8tr keygen --alg ed25519+ml-dsa-65" in message
    for name in ("ml_admin", "hy_admin"):
        assert submit(signed(s[name]), authorized=pq, guard=ReplayGuard()) is None


def test_require_pq_node_joins():
    text, s = mixed_keys()
    pq = parse_authorized_keys(text).post_quantum_only()
    challenge = b"\x09" * CHALLENGE_BYTES
    for name, ok in (("ed_node", False), ("ed_admin", False), ("hy_node", True),
                     ("ml_node", True)):
        signer = s[name]
        kw = {"key": signer.public, "sig": sign_challenge(signer, challenge, "n"),
              "challenge": challenge, "node_id": "n", "authorized": pq}
        if ok:
            assert verify_challenge(**kw) == fingerprint(signer.public)
            continue
        with pytest.raises(AuthError) as info:
            verify_challenge(**kw)
        assert info.value.code == "UNAUTHORIZED"
        assert "--require-pq" in info.value.message and "ed25519" in info.value.message
        # Without --require-pq the same answer is good.
        assert verify_challenge(**{**kw, "authorized": parse_authorized_keys(text)})


async def test_replace_keys_with_require_pq_ends_ed25519_node_sessions():
    text, s = mixed_keys()
    authority = Authority(parse_authorized_keys(text))
    ended: list[str] = []
    handles = {name: NodeSessionHandle(name, s[name].public, trio.CancelScope())
               for name in ("ed_node", "ed_admin", "hy_node", "ml_node")}

    async def session(handle: NodeSessionHandle) -> None:
        with handle.scope:
            await trio.sleep_forever()
        ended.append(handle.node_id)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for handle in handles.values():
                authority.node_sessions.add(handle)
                nursery.start_soon(session, handle)
            await trio.testing.wait_all_tasks_blocked()
            assert authority.replace_keys(parse_authorized_keys(text)) == []
            revoked = authority.replace_keys(parse_authorized_keys(text).post_quantum_only())
            assert {h.node_id for h in revoked} == {"ed_node", "ed_admin"}
            assert all(h.revoked for h in revoked)
            await trio.testing.wait_all_tasks_blocked()
            assert sorted(ended) == ["ed_admin", "ed_node"]
            assert not handles["hy_node"].revoked and not handles["ml_node"].revoked
            assert authority.authorized.require_pq
            nursery.cancel_scope.cancel()
    # The Ed25519 admin is refused from then on; the post-quantum ones are not.
    assert refused(via_protocol, signed(s["ed_admin"]), authorized=authority.authorized,
                   guard=authority.guard)[0] == "UNAUTHORIZED"
    assert via_protocol(signed(s["hy_admin"]), authorized=authority.authorized,
                        guard=authority.guard) is None


async def test_an_insecure_authority_ends_no_session():
    text, s = mixed_keys()
    authority = Authority(parse_authorized_keys(""), insecure=True)
    handle = NodeSessionHandle("n", s["ed_node"].public, trio.CancelScope())
    authority.node_sessions.add(handle)
    assert authority.replace_keys(parse_authorized_keys(text).post_quantum_only()) == []
    assert not handle.revoked and not handle.scope.cancel_called


# ---------------------------------------------------------------------------- authorized-keys


@each_alg
def test_authorized_keys_good_lines(alg):
    pub = keys_of(alg).admin.public
    hex_part = pub[len(alg.prefix):]
    for written in (pub, alg.prefix + hex_part.upper(), pub.upper()):
        keys = parse_authorized_keys(f"\n# c\n  admin\t{written}   alice@laptop \r\n",
                                     filename="ak")
        [entry] = list(keys)
        assert (entry.pub_hex, entry.roles, entry.comment) == (pub, {"admin"}, "alice@laptop")
        assert entry.algorithm is alg
        assert keys.has_role(pub, "admin") and keys.has_role(written, "admin")


def test_authorized_keys_with_every_algorithm():
    text = "".join(f"admin {keys_of(a).admin.public} {a.name}\nnode {keys_of(a).node.public}\n"
                   for a in ALGS)
    keys = parse_authorized_keys(text)
    assert [e.algorithm for e in keys] == [ED25519, ED25519, ML_DSA_65, ML_DSA_65, HYBRID,
                                          HYBRID]
    assert [e.comment for e in keys][::2] == [a.name for a in ALGS]


def _parse_error(line: str) -> AuthorizedKeysError:
    # The bad line is the fourth: a comment, a blank line and a good line come first.
    text = f"# keys\n\nadmin {keys_of(ED25519).admin.public}\n{line}\nnode nothex\n"
    with pytest.raises(AuthorizedKeysError) as info:
        parse_authorized_keys(text, filename="/etc/skr8tr/authorized_keys")
    err = info.value
    assert isinstance(err, KeyFileError)
    assert (err.filename, err.line) == ("/etc/skr8tr/authorized_keys", 4)
    assert str(err).startswith("/etc/skr8tr/authorized_keys:4: ")
    return err


@each_alg
@pytest.mark.parametrize("cut", [-2, 2, -1])
def test_authorized_keys_wrong_length_names_the_algorithm_and_count(alg, cut):
    pub = keys_of(alg).admin.public
    key = pub[:cut] if cut < 0 else pub + "ab"[:cut]
    want = 2 * alg.public_bytes
    got = len(key) - len(alg.prefix)
    err = _parse_error(f"admin {key} alice")
    assert err.message == (f"{alg.name} public key must be {want} hex characters "
                           f"({alg.public_bytes} bytes), got {got} characters")


@each_alg
def test_authorized_keys_not_hex(alg):
    pub = keys_of(alg).admin.public
    err = _parse_error(f"node {pub[:-1]}z")
    want = 2 * alg.public_bytes
    assert err.message == (f"{alg.name} public key is not hex (expected {want} "
                           "characters 0-9, a-f)")


@each_alg
@pytest.mark.parametrize("prefix", ["ed25519:", "ml-dsa-44:", "ml-dsa-87:", "rsa:", "ed448:"])
def test_authorized_keys_unknown_prefix(alg, prefix):
    raw_hex = public_key_bytes(keys_of(alg).admin.public).hex()
    err = _parse_error(f"admin {prefix}{raw_hex}")
    assert err.message == (f"unknown key algorithm {prefix[:-1]!r} (expected ml-dsa-65 or "
                           "ed25519+ml-dsa-65, or a bare Ed25519 key)")


@each_alg
def test_authorized_keys_a_key_where_the_role_goes(alg):
    pub = keys_of(alg).admin.public
    err = _parse_error(f"{pub} admin")
    assert err.message.startswith("line starts with a key; expected `ROLE PUBLIC_KEY")


# ---------------------------------------------------------------------------- hostile input


def test_the_longest_key_text_is_a_hybrid_one():
    assert len("ed25519+ml-dsa-65:") + 2 * HYBRID.public_bytes == signatures._MAX_KEY_TEXT
    assert len(keys_of(HYBRID).admin.public) == signatures._MAX_KEY_TEXT


class _Spy:
    """Stands in for a function and counts the calls that reach it."""

    def __init__(self, real: Any) -> None:
        self.real, self.calls = real, 0

    def __call__(self, *args: Any, **kw: Any) -> Any:
        self.calls += 1
        return self.real(*args, **kw)


@pytest.mark.parametrize("text", [
    "a" * (signatures._MAX_KEY_TEXT + 1),
    "ed25519+ml-dsa-65:" + "a" * (2 * HYBRID.public_bytes + 1),
    "ml-dsa-65:" + "a" * 1_000_000,
    "a" * 1_000_000,
])
def test_key_algorithm_refuses_an_oversized_text_by_its_length(monkeypatch, text):
    split, scan = _Spy(signatures.split_key), _Spy(signatures.is_hex)
    monkeypatch.setattr(signatures, "split_key", split)
    monkeypatch.setattr(signatures, "is_hex", scan)
    assert key_algorithm(text) is None
    assert key_algorithm(text, any_case=True) is None
    assert not is_public_key(text)
    assert (split.calls, scan.calls) == (0, 0)
    # The spies do see a key of the longest size.
    assert key_algorithm(keys_of(HYBRID).admin.public) is HYBRID
    assert (split.calls, scan.calls) == (1, 1)


def test_is_signature_refuses_an_oversized_text_by_its_length(monkeypatch):
    scan = _Spy(signatures.is_hex)
    monkeypatch.setattr(signatures, "is_hex", scan)
    for alg in (None, *ALGS):
        assert not is_signature("a" * 1_000_000, alg)
    assert scan.calls == 0


@each_alg
@each_path
@pytest.mark.parametrize("field", ["key", "sig"])
def test_a_one_megabyte_key_or_sig_is_unauthorized(alg, submit, field):
    req = signed(keys_of(alg).admin)
    req[field] = ("ml-dsa-65:" if field == "key" else "") + "a" * 1_000_000
    code, message = refused(submit, req, alg=alg)
    assert code == "UNAUTHORIZED"
    assert message.startswith(f"{field} must be")
    if field == "sig":
        assert f"{2 * alg.signature_bytes} lowercase hex characters" in message


def test_a_refusal_names_no_more_than_a_fingerprint():
    # An Ed25519 key fits in a message; a post-quantum one (4 KB) is named by its file.
    for alg in ALGS:
        k = keys_of(alg)
        message = k.authorized.refusal(k.stranger.public, "admin")
        assert fingerprint(k.stranger.public) in message
        assert len(message) < 250
        assert re.search(r"[0-9a-f]{65}", message) is None
