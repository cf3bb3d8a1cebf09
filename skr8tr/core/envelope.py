"""Signed requests and node-join challenges: what is signed, and the order of the checks.

A request on ``/v1/cli`` carries ``key`` (the signer's public key, its text as
in ``signing.pub``) and ``sig`` (a signature over the canonical JSON of every
other field: Ed25519, ML-DSA-65 or both, as the key's algorithm says, see
:mod:`skr8tr.core.signatures`). The conductor checks, in this order, and stops
at the first failure:

1. **Authentication** -> ``UNAUTHORIZED``: ``key``, ``sig``, ``nonce`` and ``ts``
   are present and well-formed, the key is authorized for the role, and the
   signature verifies. Nothing else about the request (its arguments included)
   is looked at before this passes.
2. **Freshness** -> ``EXPIRED``: ``|now - ts| <= window_s`` (30 s), and ``ts`` not
   before the guard's ``not_before`` (the conductor's start: a request signed
   before a restart may have been accepted by the previous process).
3. **Replay** -> ``REPLAY``: the (key, nonce) pair has not been spent inside
   the window. It is spent right here, before the command runs, so it stays
   spent whatever the command's outcome.

A node joins by signing the conductor's random challenge; that message is
domain-separated (``skr8tr-node-join:`` prefix) so it can never pass for a
request signature, nor a request signature for a join.

Pure: the current time is always a parameter.
"""

from __future__ import annotations

import heapq
import json
import math
import os
import re
from typing import TYPE_CHECKING, Any

from skr8tr.core.keys import AuthorizedKeys
from skr8tr.core.signatures import (
    Algorithm,
    fingerprint,
    is_signature,
    key_algorithm,
    verify,
    verify_well_formed,
)

if TYPE_CHECKING:
    from skr8tr.core.signatures import Signer

__all__ = [
    "REQUEST_WINDOW_S",
    "SIGNED_COMMANDS",
    "READ_ONLY_COMMANDS",
    "COMMANDS",
    "AUTH_ERROR_CODES",
    "CHALLENGE_BYTES",
    "AuthError",
    "ReplayGuard",
    "canonical_json",
    "new_nonce",
    "sign_request",
    "verify_request",
    "new_challenge",
    "sign_challenge",
    "verify_challenge",
]

REQUEST_WINDOW_S = 30.0

# Commands that need a signature from an admin key. `logs` changes nothing
# but shows what workloads print, which may be secret, so it is signed too;
# so are `describe` and `revision`, which show a manifest's text (its env
# values may be secret). `restart` is a rollout.
SIGNED_COMMANDS = frozenset(
    {"up", "down", "rollout", "rollout-abort", "rollout-undo", "scale", "logs", "restart",
     "describe", "revision", "rollout-promote", "rollout-pause", "rollout-resume"}
)
READ_ONLY_COMMANDS = frozenset({"ping", "list", "nodes", "status", "history", "rollout-status"})
COMMANDS = SIGNED_COMMANDS | READ_ONLY_COMMANDS

AUTH_ERROR_CODES = ("UNAUTHORIZED", "EXPIRED", "REPLAY")

NONCE_MIN_HEX = 16
NONCE_MAX_HEX = 128
CHALLENGE_BYTES = 32
# What a join signature signs begins with its role's domain, so an answer given to join
# as one role never verifies as another (a node's hello is no ingress's).
_JOIN_DOMAINS = {"node": b"skr8tr-node-join:", "ingress": b"skr8tr-ingress-join:"}

_LOWER_HEX_RE = re.compile(r"[0-9a-f]+")


class AuthError(Exception):
    """A request or join failed authentication, freshness or replay checks.

    ``code`` is ``UNAUTHORIZED``, ``EXPIRED`` or ``REPLAY`` (an error code of the
    wire protocol); ``message`` says what was wrong and, where useful, what to do.
    """

    def __init__(self, code: str, message: str) -> None:
        if code not in AUTH_ERROR_CODES:
            raise ValueError(f"AuthError code must be one of {AUTH_ERROR_CODES}, got {code!r}")
        self.code = code
        self.message = message
        super().__init__(f"{code}: {message}")


def canonical_json(fields: dict[str, Any]) -> bytes:
    """The bytes that a request signature covers: every field but ``sig``, keys sorted, no
    spaces, UTF-8 (the same bytes on every client and the conductor).

    Raises TypeError/ValueError for values JSON cannot carry (including
    strings with lone surrogates, which have no UTF-8 encoding).
    """
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def new_nonce() -> str:
    """32 lowercase hex characters from 16 random bytes."""
    return os.urandom(16).hex()


def is_nonce(value: object) -> bool:
    """True for 16 to 128 lowercase hex characters."""
    return (
        isinstance(value, str)
        and NONCE_MIN_HEX <= len(value) <= NONCE_MAX_HEX
        and _LOWER_HEX_RE.fullmatch(value) is not None
    )


def sign_request(
    signer: Signer,
    *,
    id: str,
    cmd: str,
    args: dict[str, Any],
    ts: float,
    nonce: str,
) -> dict[str, Any]:
    """Build the full signed request dict ``{"v","id","cmd","args","ts","nonce","key","sig"}``."""
    fields: dict[str, Any] = {
        "v": 1,
        "id": id,
        "cmd": cmd,
        "args": args,
        "ts": ts,
        "nonce": nonce,
        "key": signer.public,
    }
    fields["sig"] = signer.sign(canonical_json(fields)).hex()
    return fields


# --------------------------------------------------------------------------- replay guard


class ReplayGuard:
    """Remembers spent (key, nonce) pairs for as long as they could pass the ts check.

    A pair spent with timestamp ``ts`` is forgotten once ``now > ts + window_s``:
    from then on the same signed request fails as EXPIRED, so it need not be
    remembered. Memory is therefore bounded by the requests accepted within
    one window, and pruning costs O(log n) per spent nonce (a heap by expiry).

    Wall clocks can step backwards. Pruning uses the latest ``now`` seen, and
    ``check`` treats any ``ts`` that may already have been pruned as EXPIRED,
    so a backwards step can make requests fail but never lets a replay through.

    The guard lives in memory, so what it spent is gone with its process. A
    request with ``ts < not_before`` is EXPIRED: a conductor passes the moment it
    started, so that no request signed before a restart (and possibly accepted
    by the previous process) is accepted after it. A client whose clock lags the
    conductor's by L seconds is refused for L seconds after a start; one whose
    clock runs ahead signs requests that ``not_before`` cannot tell apart, and
    the conductor keeps those across restarts itself
    (:mod:`skr8tr.conductor.replay_store`).
    """

    def __init__(self, window_s: float = REQUEST_WINDOW_S, *,
                 not_before: float = -math.inf) -> None:
        if not (math.isfinite(window_s) and window_s >= 0):
            raise ValueError(f"window_s must be a finite number >= 0, got {window_s!r}")
        if math.isnan(not_before) or not_before == math.inf:
            raise ValueError(f"not_before must be a number or -inf, got {not_before!r}")
        self.window_s = float(window_s)
        self.not_before = float(not_before)
        self._expiry: dict[tuple[str, str], float] = {}
        self._heap: list[tuple[float, str, str]] = []
        self._latest_now = -math.inf

    def __len__(self) -> int:
        """How many spent nonces are remembered right now."""
        return len(self._expiry)

    def __bool__(self) -> bool:
        # An empty guard is still a guard: `guard or ReplayGuard()` must not swap it out.
        return True

    def check(self, key: str, nonce: str, ts: float, now: float) -> None:
        """Raise AuthError EXPIRED if *ts* is outside the window or before ``not_before``,
        REPLAY if already spent."""
        self._advance(now)
        ts_f = finite_float(ts)
        if ts_f is None:
            raise AuthError("EXPIRED", f"ts must be a finite number of seconds, got {ts!r:.40}")
        skew = now - ts_f
        if abs(skew) > self.window_s:
            direction = "old" if skew > 0 else "in the future"
            raise AuthError(
                "EXPIRED",
                f"request ts is {abs(skew):.1f} s {direction} (allowed: {self.window_s:g} s); "
                "check the client's clock",
            )
        if ts_f < self.not_before:
            raise AuthError(
                "EXPIRED",
                f"request was signed {self.not_before - ts_f:.1f} s before this conductor "
                "(re)started, and a request from before a restart may be a replay; sign it "
                "again (if this repeats, the client's clock is behind the conductor's)",
            )
        if ts_f + self.window_s < self._latest_now:
            # Only after this clock stepped back: the nonce may already be forgotten.
            raise AuthError(
                "EXPIRED",
                "request ts is outside the window of requests already seen "
                "(the conductor's clock stepped back); send a fresh request",
            )
        if (key, nonce) in self._expiry:
            raise AuthError("REPLAY", "nonce already used by this key; send a fresh request")

    def spend(self, key: str, nonce: str, ts: float, now: float) -> None:
        """Remember (key, nonce) until it can no longer pass ``check`` on its own ts."""
        self._advance(now)
        ts_f = finite_float(ts)
        if ts_f is None:
            return  # could never pass check(): nothing to remember
        expiry = ts_f + self.window_s
        if expiry < self._latest_now:
            return
        pair = (key, nonce)
        if self._expiry.get(pair, -math.inf) < expiry:
            self._expiry[pair] = expiry
            heapq.heappush(self._heap, (expiry, key, nonce))

    def check_and_spend(self, key: str, nonce: str, ts: float, now: float) -> None:
        self.check(key, nonce, ts, now)
        self.spend(key, nonce, ts, now)

    def _advance(self, now: float) -> None:
        if not math.isfinite(now):
            raise ValueError(f"now must be a finite number, got {now!r}")
        if now > self._latest_now:
            self._latest_now = now
        heap = self._heap
        while heap and heap[0][0] < self._latest_now:
            expiry, key, nonce = heapq.heappop(heap)
            # A pair may have been re-spent with a later ts; only drop the entry
            # this heap item stands for.
            if self._expiry.get((key, nonce)) == expiry:
                del self._expiry[(key, nonce)]


def finite_float(value: object) -> float | None:
    """*value* as a finite float if it is a finite number (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        f = float(value)
    except OverflowError:  # an int too large for a float
        return None
    return f if math.isfinite(f) else None


# --------------------------------------------------------------------------- verification


def verify_request(
    req: dict[str, Any],
    *,
    authorized: AuthorizedKeys,
    guard: ReplayGuard,
    now: float,
    role: str = "admin",
) -> str:
    """Authenticate a parsed request and spend its nonce; return the key's fingerprint.

    Checks in the contractual order (module docstring): UNAUTHORIZED, then
    EXPIRED, then REPLAY. Looks only at ``key``, ``sig``, ``ts`` and ``nonce``
    and at the signed bytes; never at ``cmd`` or ``args``. For any input,
    raises nothing but AuthError (ValueError only for a non-finite *now*).
    """
    fpr = check_signature(req, authorized=authorized, role=role)
    key, nonce, ts = req["key"], req["nonce"], req["ts"]
    guard.check(key, nonce, ts, now)
    guard.spend(key, nonce, ts, now)
    return fpr


def check_signature(req: dict[str, Any], *, authorized: AuthorizedKeys,
                    role: str = "admin") -> str:
    """The UNAUTHORIZED half of :func:`verify_request`: well-formed fields, a key with
    *role* and a good signature; returns the key's fingerprint. Spends nothing.

    Touches no shared state, so a large request can be checked in a worker thread;
    the replay guard (EXPIRED, REPLAY) must then run on the caller's thread.
    Raises nothing but AuthError.
    """
    if not isinstance(req, dict):
        raise AuthError("UNAUTHORIZED", "request must be a JSON object")
    key, sig = req.get("key"), req.get("sig")
    if key is None and sig is None:
        raise AuthError(
            "UNAUTHORIZED",
            f"request is not signed; this command needs a signature from an {role} key "
            "(create one with `skr8tr keygen`, pass it with --key)",
        )
    algorithm = _key_and_sig(key, sig)
    nonce, ts = req.get("nonce"), req.get("ts")
    if not is_nonce(nonce):
        raise AuthError(
            "UNAUTHORIZED",
            f"nonce must be {NONCE_MIN_HEX} to {NONCE_MAX_HEX} lowercase hex characters",
        )
    if isinstance(ts, bool) or not isinstance(ts, int | float):
        raise AuthError("UNAUTHORIZED", "ts must be a number (seconds since the epoch)")

    if not authorized.has_role(key, role):
        raise AuthError("UNAUTHORIZED", authorized.refusal(key, role))
    fpr = fingerprint(key)
    fields = {k: v for k, v in req.items() if k != "sig"}
    try:
        message = canonical_json(fields)
    except (TypeError, ValueError, RecursionError):
        raise AuthError("UNAUTHORIZED", "request cannot be put in canonical JSON form") from None
    if not verify_well_formed(algorithm, key, message, sig):
        raise AuthError("UNAUTHORIZED", f"bad signature for key {fpr} ({algorithm.name})")
    return fpr


_KEY_FORMS = ("64 lowercase hex characters (Ed25519), or ml-dsa-65:HEX or "
              "ed25519+ml-dsa-65:HEX, as in signing.pub")


def _key_and_sig(key: object, sig: object) -> Algorithm:
    """The algorithm of a well-formed *key* whose *sig* has that algorithm's length;
    AuthError UNAUTHORIZED naming what is wrong otherwise. Costs a length check
    before any scan."""
    algorithm = key_algorithm(key)
    if algorithm is None:
        raise AuthError("UNAUTHORIZED", f"key must be {_KEY_FORMS}")
    if not is_signature(sig, algorithm):
        raise AuthError("UNAUTHORIZED",
                        f"sig must be {2 * algorithm.signature_bytes} lowercase hex characters "
                        f"(a {algorithm.name} signature)")
    return algorithm


# --------------------------------------------------------------------------- node joins


def new_challenge() -> bytes:
    """A fresh random challenge for a joining node or ingress (CHALLENGE_BYTES bytes)."""
    return os.urandom(CHALLENGE_BYTES)


def _join_message(challenge: bytes, node_id: str, role: str) -> bytes:
    return _JOIN_DOMAINS[role] + challenge + b":" + node_id.encode("utf-8")


def sign_challenge(signer: Signer, challenge: bytes, node_id: str, *, role: str = "node"
                   ) -> str:
    """Answer a join challenge as ``role`` (``node``, or ``ingress`` with the ingress's
    name as ``node_id``): the signature as lowercase hex."""
    if len(challenge) != CHALLENGE_BYTES:
        raise ValueError(f"challenge must be {CHALLENGE_BYTES} bytes, got {len(challenge)}")
    return signer.sign(_join_message(challenge, node_id, role)).hex()


def verify_challenge(
    *,
    key: object,
    sig: object,
    challenge: bytes,
    node_id: object,
    authorized: AuthorizedKeys,
    role: str = "node",
) -> str:
    """Check a node's answer to *challenge*; return the key's fingerprint.

    Raises AuthError UNAUTHORIZED if the key is malformed or not authorized as
    *role*, the node id is not a string, or the signature does not verify.
    The caller must use each challenge for one join only.
    """
    if len(challenge) != CHALLENGE_BYTES:
        raise ValueError(f"challenge must be {CHALLENGE_BYTES} bytes, got {len(challenge)}")
    algorithm = _key_and_sig(key, sig)
    assert isinstance(key, str) and isinstance(sig, str)
    if not isinstance(node_id, str):
        raise AuthError("UNAUTHORIZED", "node id must be a string")
    if not authorized.has_role(key, role):
        raise AuthError("UNAUTHORIZED", authorized.refusal(key, role))
    fpr = fingerprint(key)
    try:
        message = _join_message(challenge, node_id, role)
    except UnicodeEncodeError:
        raise AuthError("UNAUTHORIZED", "node id is not valid UTF-8") from None
    if not verify(key, message, sig):
        raise AuthError("UNAUTHORIZED", f"bad join signature for key {fpr} ({algorithm.name})")
    return fpr
