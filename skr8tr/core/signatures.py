"""Signature algorithms: Ed25519, ML-DSA-65 (FIPS 204) and the hybrid of both.

Every key and signature skr8tr handles is one of three algorithms:

| algorithm | secret (seed) | public key | signature | post-quantum |
|---|---|---|---|---|
| ``ed25519`` | 32 bytes | 32 bytes | 64 bytes | no |
| ``ml-dsa-65`` | 32 bytes (FIPS 204 seed xi) | 1,952 bytes | 3,309 bytes | yes |
| ``ed25519+ml-dsa-65`` | both seeds (64) | both keys (1,984) | both (3,373) | yes |

(hybrid: the Ed25519 part first, then the ML-DSA-65 one.)

A hybrid signature is good only if both halves verify: a forgery must break
Ed25519 *and* ML-DSA-65. ML-DSA-65 signs in its pure form with an empty
context.

A key is written as text: an Ed25519 key as bare lowercase hex (the files
and wire of before), any other as ``ALG:HEX`` (``ml-dsa-65:...``). That text
is what ``signing.pub`` holds, what authorized-keys lists after the role and
what a request's ``key`` carries, so the algorithm always travels with the
key. A signature is bare hex; its length follows from the key's algorithm.

The libraries are imported where a key is made, loaded or checked: PyNaCl
for Ed25519, pyca/cryptography (>= 47) for ML-DSA-65, so that a command that
signs nothing (``skr8tr ping``) starts without either.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ED25519",
    "ML_DSA_65",
    "HYBRID",
    "ALGORITHMS",
    "Algorithm",
    "Signer",
    "algorithm_named",
    "key_algorithm",
    "is_public_key",
    "is_signature",
    "public_key_bytes",
    "fingerprint",
    "generate",
    "verify",
]


@dataclass(frozen=True)
class Algorithm:
    """One signature algorithm and the sizes of what it makes, in bytes."""

    name: str
    seed_bytes: int
    public_bytes: int
    signature_bytes: int
    post_quantum: bool

    @property
    def prefix(self) -> str:
        """What precedes the hex of a key in text: ``""`` for Ed25519, else ``NAME:``."""
        return "" if self is ED25519 else self.name + ":"


ED25519 = Algorithm("ed25519", 32, 32, 64, post_quantum=False)
ML_DSA_65 = Algorithm("ml-dsa-65", 32, 1952, 3309, post_quantum=True)
HYBRID = Algorithm("ed25519+ml-dsa-65", 64, 32 + 1952, 64 + 3309, post_quantum=True)
ALGORITHMS: dict[str, Algorithm] = {a.name: a for a in (ED25519, ML_DSA_65, HYBRID)}

# What the key text of each prefix must be: its length in hex characters.
_KEY_HEX_LEN = {a.prefix: 2 * a.public_bytes for a in ALGORITHMS.values()}
_SIG_HEX_LENS = frozenset(2 * a.signature_bytes for a in ALGORITHMS.values())
_MAX_KEY_TEXT = max(len(p) + n for p, n in _KEY_HEX_LEN.items())


def algorithm_named(name: str) -> Algorithm:
    """The algorithm called *name*; ValueError naming the choices for anything else."""
    try:
        return ALGORITHMS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown key algorithm {name!r} "
                         f"(choose {', '.join(ALGORITHMS)})") from None


def split_key(key: str) -> tuple[Algorithm, str] | None:
    """(algorithm, hex) of a key's text, None unless the prefix is known; the hex is
    not checked here."""
    prefix, colon, rest = key.partition(":")
    if not colon:
        return ED25519, key
    algorithm = ALGORITHMS.get(prefix)
    if algorithm is None or algorithm is ED25519:
        return None  # Ed25519 is written bare, never "ed25519:..."
    return algorithm, rest


def key_algorithm(key: object, *, any_case: bool = False) -> Algorithm | None:
    """The algorithm of a key's text if it is well-formed, else None.

    Well-formed: bare hex of 32 bytes (Ed25519) or ``ALG:HEX`` with ALG
    ``ml-dsa-65`` or ``ed25519+ml-dsa-65`` and exactly that algorithm's public key
    size. The wire wants lowercase hex; *any_case* accepts upper case too (what an
    operator types into authorized-keys). Costs one length check before any
    scanning, so an oversized value is refused in constant time.
    """
    if not isinstance(key, str) or len(key) > _MAX_KEY_TEXT:
        return None
    parts = split_key(key)
    if parts is None:
        return None
    algorithm, hex_part = parts
    if len(hex_part) != 2 * algorithm.public_bytes:
        return None
    return algorithm if is_hex(hex_part, any_case) else None


def is_hex(value: str, any_case: bool = False) -> bool:
    """True if *value* is hex (lowercase unless *any_case*), nothing else: bytes.fromhex
    and back, about twice as fast as a regular expression on kilobytes."""
    try:
        text = bytes.fromhex(value).hex()
    except ValueError:
        return False
    return text == (value.lower() if any_case else value)


def is_public_key(value: object) -> bool:
    """True if *value* is a public key as the wire carries it (lowercase hex, any
    of the three algorithms)."""
    return key_algorithm(value) is not None


def is_signature(value: object, algorithm: Algorithm | None = None) -> bool:
    """True if *value* is lowercase hex of a signature's length: of *algorithm*'s, or of
    any algorithm's when None."""
    if not isinstance(value, str):
        return False
    if algorithm is None:
        if len(value) not in _SIG_HEX_LENS:
            return False
    elif len(value) != 2 * algorithm.signature_bytes:
        return False
    return is_hex(value)


def public_key_bytes(key: str) -> bytes:
    """The raw public key of a well-formed key text (ValueError otherwise)."""
    algorithm = key_algorithm(key, any_case=True)
    if algorithm is None:
        raise ValueError("not a public key")
    return bytes.fromhex(key[len(algorithm.prefix):])


@functools.lru_cache(maxsize=1024)
def fingerprint(key: str) -> str:
    """A short, log-friendly name for a key: ``sha256:`` + 16 hex characters of the
    SHA-256 of its raw public key (for an Ed25519 key the same as before).
    ValueError for a malformed key. Remembered for the last 1,024 keys: a signed
    request asks for it up to three times (check, audit, log), and a post-quantum
    key costs a 4 KB scan and a SHA-256 each time."""
    return "sha256:" + hashlib.sha256(public_key_bytes(key)).hexdigest()[:16]


# --------------------------------------------------------------------------- signing


class Signer:
    """A secret key: signs messages, knows its public key text and its seed.

    Made by :func:`generate` or ``Signer(algorithm, seed)``; read from a
    ``signing.sec`` by :func:`skr8tr.keyfiles.load_signing_key`.
    """

    __slots__ = ("algorithm", "_seed", "_ed", "_ml", "public")

    def __init__(self, algorithm: Algorithm, seed: bytes) -> None:
        if len(seed) != algorithm.seed_bytes:
            raise ValueError(f"a {algorithm.name} seed is {algorithm.seed_bytes} bytes, "
                             f"got {len(seed)}")
        self.algorithm = algorithm
        self._seed = bytes(seed)
        self._ed: Any = None
        self._ml: Any = None
        raw = b""
        if algorithm in (ED25519, HYBRID):
            import nacl.signing

            self._ed = nacl.signing.SigningKey(seed[:32])
            raw += self._ed.verify_key.encode()
        if algorithm in (ML_DSA_65, HYBRID):
            from cryptography.hazmat.primitives.asymmetric import mldsa

            self._ml = mldsa.MLDSA65PrivateKey.from_seed_bytes(seed[-32:])
            raw += self._ml.public_key().public_bytes_raw()
        #: The public key as text: what ``signing.pub`` holds and requests carry.
        self.public: str = algorithm.prefix + raw.hex()

    @property
    def seed(self) -> bytes:
        """The secret: what ``signing.sec`` holds."""
        return self._seed

    def sign(self, message: bytes) -> bytes:
        """The signature of *message*: Ed25519, ML-DSA-65 (pure, empty context), or both
        concatenated."""
        sig = b""
        if self._ed is not None:
            sig += self._ed.sign(message).signature
        if self._ml is not None:
            sig += self._ml.sign(message)
        return sig

    def __repr__(self) -> str:
        return f"<Signer {self.algorithm.name} {fingerprint(self.public)}>"


def generate(algorithm: Algorithm = ED25519) -> Signer:
    """A fresh secret key of *algorithm* (seed from the operating system's CSPRNG)."""
    import os

    return Signer(algorithm, os.urandom(algorithm.seed_bytes))


# --------------------------------------------------------------------------- verifying

# Parsed public keys by key text. Only keys that passed the authorized-keys
# check are verified, so this holds at most the listed keys (bounded anyway).
_VERIFIERS: dict[str, tuple[Any, Any]] = {}
_MAX_VERIFIERS = 4096


def _verifiers(key: str, algorithm: Algorithm) -> tuple[Any, Any]:
    found = _VERIFIERS.get(key)
    if found is not None:
        return found
    raw = bytes.fromhex(key[len(algorithm.prefix):])
    ed = ml = None
    if algorithm in (ED25519, HYBRID):
        import nacl.signing

        ed = nacl.signing.VerifyKey(raw[:32])
    if algorithm in (ML_DSA_65, HYBRID):
        from cryptography.hazmat.primitives.asymmetric import mldsa

        ml = mldsa.MLDSA65PublicKey.from_public_bytes(raw[-ML_DSA_65.public_bytes:])
    if len(_VERIFIERS) >= _MAX_VERIFIERS:
        _VERIFIERS.clear()
    _VERIFIERS[key] = (ed, ml)
    return ed, ml


def verify(key: str, message: bytes, sig_hex: str) -> bool:
    """True if *sig_hex* is a good signature of *message* by *key* (a key's text).

    False for a malformed key, a signature of the wrong length for the key's
    algorithm, or a bad signature; for a hybrid key both halves must verify
    (the cheap Ed25519 half is checked first). Never raises.
    """
    algorithm = key_algorithm(key)
    if algorithm is None or not is_signature(sig_hex, algorithm):
        return False
    return verify_well_formed(algorithm, key, message, sig_hex)


def verify_well_formed(algorithm: Algorithm, key: str, message: bytes, sig_hex: str) -> bool:
    """:func:`verify` of a key and signature already checked as well-formed."""
    sig = bytes.fromhex(sig_hex)
    try:
        ed, ml = _verifiers(key, algorithm)
    except ValueError:
        return False  # bytes no library accepts as a key of its kind
    if ed is not None:
        import nacl.exceptions

        try:
            ed.verify(message, sig[:64])
        except (nacl.exceptions.CryptoError, ValueError, TypeError):
            return False
    if ml is not None:
        from cryptography.exceptions import InvalidSignature

        try:
            ml.verify(sig[-ML_DSA_65.signature_bytes:], message)
        except InvalidSignature:
            return False
    return True
