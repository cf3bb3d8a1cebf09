"""Key files' content and the conductor's authorized-keys text.

Key files (the algorithms and their sizes: :mod:`skr8tr.core.signatures`):

- ``signing.sec``: one line, the secret seed in lowercase hex (mode 0600): for
  Ed25519 the bare 32-byte seed (64 characters), for the others
  ``ALG:HEX`` (``ml-dsa-65:`` + 32 bytes, ``ed25519+ml-dsa-65:`` + the Ed25519
  seed then the ML-DSA-65 seed, 64 bytes).
- ``signing.pub``: one line, the public key's text (mode 0644): bare hex for
  Ed25519, ``ALG:HEX`` for the others.

Authorized keys, one entry per line, ``ROLE [ALG:]HEX [comment]``::

    # ROLE  PUBLIC KEY (signing.pub)                                          comment
    admin   3b6a27bcceb6a42d62a3a8d02a6f0d73653215771de243a63ac048a18b59da29  alice@laptop
    node    ed25519+ml-dsa-65:3b6a27bc...(3,968 hex characters)              web-1
    ingress 9d1c0e5f...(64 hex characters)                                    edge-1

Roles: ``admin`` signs commands, ``node`` joins as a node agent, ``ingress``
reports traffic counts on ``/v1/ingress`` (DESIGN.md §11).

A key listed on two lines holds both roles. ``#`` starts a comment at the
start of a line or after whitespace. A conductor that requires post-quantum
keys (``--require-pq``) keeps the Ed25519 lines but grants them nothing
(:meth:`AuthorizedKeys.post_quantum_only`).

Pure: no file I/O. Reading and writing the files, with their modes, is
:mod:`skr8tr.keyfiles`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import NamedTuple

from skr8tr.core.signatures import (
    ALGORITHMS,
    ED25519,
    Algorithm,
    Signer,
    fingerprint,
    generate,
    is_hex,
    key_algorithm,
    split_key,
)

__all__ = [
    "ROLES",
    "SECRET_KEY_FILE",
    "PUBLIC_KEY_FILE",
    "KeyFileError",
    "AuthorizedKeysError",
    "AuthorizedKey",
    "AuthorizedKeys",
    "generate_keypair",
    "secret_key_line",
    "public_key_line",
    "parse_signing_key",
    "parse_authorized_keys",
]

ROLES = ("admin", "node", "ingress")
SECRET_KEY_FILE = "signing.sec"
PUBLIC_KEY_FILE = "signing.pub"


class KeyFileError(Exception):
    """A key file is missing, unsafe or malformed. The message names the path and a fix."""


class AuthorizedKeysError(KeyFileError):
    """The authorized-keys file is unreadable or malformed.

    ``str(err)`` is ``"filename:line: message"`` (or ``"filename: message"`` when
    the problem is not on one line).
    """

    def __init__(self, filename: str, line: int | None, message: str) -> None:
        self.filename = filename
        self.line = line
        self.message = message
        where = f"{filename}:{line}" if line is not None else filename
        super().__init__(f"{where}: {message}")


def generate_keypair(algorithm: Algorithm = ED25519) -> tuple[Signer, str]:
    """A fresh secret key of *algorithm* and its public key's text."""
    signer = generate(algorithm)
    return signer, signer.public


# --------------------------------------------------------------------------- key file text


def secret_key_line(signer: Signer) -> str:
    """The content of a ``signing.sec`` file: ``[ALG:]HEX`` of the seed, one line."""
    return signer.algorithm.prefix + signer.seed.hex() + "\n"


def public_key_line(public: str) -> str:
    """The content of a ``signing.pub`` file: the public key's text, one line."""
    return public + "\n"


_SEED_FORMS = ("one line of 64 hex characters (a 32-byte Ed25519 seed), or "
               "ml-dsa-65:HEX (64 hex) or ed25519+ml-dsa-65:HEX (128 hex)")


def parse_signing_key(data: bytes, *, filename: str) -> Signer:
    """The secret key in a ``signing.sec`` file's content *data*.

    Raises KeyFileError, naming *filename*, unless *data* is one line of
    ``[ALG:]HEX`` with a known algorithm and its seed's length (surrounding
    whitespace is fine).
    """
    expected = f"expected {_SEED_FORMS}"
    try:
        text = data.decode("ascii").strip()
    except UnicodeDecodeError:
        raise KeyFileError(f"{filename} is not a skr8tr key file: {expected}") from None
    parts = split_key(text)
    if parts is None:
        name = text.partition(":")[0]
        raise KeyFileError(f"{filename} is not a skr8tr key file: unknown algorithm "
                           f"{name[:40]!r}; {expected}")
    algorithm, hex_part = parts
    # is_hex, not bytes.fromhex alone: fromhex skips whitespace, so "ab  cd..." of the
    # right length would decode to a short seed (a ValueError, not KeyFileError).
    if len(hex_part) != 2 * algorithm.seed_bytes or not is_hex(hex_part, any_case=True):
        raise KeyFileError(f"{filename} is not a skr8tr key file: {expected}")
    return Signer(algorithm, bytes.fromhex(hex_part))


# --------------------------------------------------------------------------- authorized keys


class AuthorizedKey(NamedTuple):
    """One trusted key: its text (lowercase, as in signing.pub), its roles, and the comment
    from its first line."""

    pub_hex: str
    roles: frozenset[str]
    comment: str

    @property
    def algorithm(self) -> Algorithm:
        found = key_algorithm(self.pub_hex)
        assert found is not None  # parse_authorized_keys admits only well-formed keys
        return found


@dataclass(frozen=True)
class AuthorizedKeys:
    """The keys the conductor trusts, each with its roles (``admin``, ``node``).

    Immutable. Lookups accept hex in either case. Iterating yields
    ``AuthorizedKey(pub_hex, roles, comment)`` tuples in file order.

    With ``require_pq`` (:meth:`post_quantum_only`), keys that are not post-quantum
    (Ed25519) stay listed but hold no role; :meth:`refusal` says why.
    """

    entries: tuple[AuthorizedKey, ...] = ()
    require_pq: bool = False
    _by_key: MappingProxyType[str, AuthorizedKey] = field(init=False, repr=False, compare=False)
    # The entries that hold their roles: all of them, or the post-quantum ones.
    _granted: MappingProxyType[str, AuthorizedKey] = field(init=False, repr=False,
                                                           compare=False)

    def __post_init__(self) -> None:
        merged: dict[str, AuthorizedKey] = {}
        for entry in self.entries:
            pub = entry.pub_hex.lower()
            old = merged.get(pub)
            if old is None:
                merged[pub] = AuthorizedKey(pub, frozenset(entry.roles), entry.comment)
            else:
                merged[pub] = old._replace(roles=old.roles | entry.roles)
        object.__setattr__(self, "entries", tuple(merged.values()))
        object.__setattr__(self, "_by_key", MappingProxyType(merged))
        granted = {k: e for k, e in merged.items()
                   if not self.require_pq or e.algorithm.post_quantum}
        object.__setattr__(self, "_granted", MappingProxyType(granted))

    def post_quantum_only(self) -> AuthorizedKeys:
        """The same list, granting roles only to ML-DSA-65 and hybrid keys."""
        return AuthorizedKeys(self.entries, require_pq=True)

    def ignored(self) -> list[AuthorizedKey]:
        """The listed keys that hold no role because of ``require_pq``, in file order."""
        if not self.require_pq:
            return []
        return [e for e in self.entries if not e.algorithm.post_quantum]

    def entry(self, pub_hex: object) -> AuthorizedKey | None:
        """The entry of a key that holds a role here; None for any other value."""
        if not isinstance(pub_hex, str):
            return None
        return self._granted.get(pub_hex.lower())

    def roles(self, pub_hex: object) -> frozenset[str]:
        """The roles of *pub_hex*; empty for an unknown key, a key ``require_pq`` ignores,
        or a non-string."""
        entry = self.entry(pub_hex)
        return entry.roles if entry is not None else frozenset()

    def has_role(self, pub_hex: object, role: str) -> bool:
        return role in self.roles(pub_hex)

    def refusal(self, pub_hex: str, role: str) -> str:
        """Why *pub_hex* (a well-formed key) may not act as *role*: the text of an
        ``UNAUTHORIZED`` error, with what to do about it."""
        fpr = fingerprint(pub_hex)
        algorithm = key_algorithm(pub_hex)
        if self.require_pq and algorithm is not None and not algorithm.post_quantum:
            return (f"key {fpr} is {algorithm.name}, and this conductor accepts only "
                    "post-quantum keys (--require-pq); make one with `skr8tr keygen --alg "
                    "ed25519+ml-dsa-65` (or ml-dsa-65) and authorize it")
        shown = pub_hex if len(pub_hex) <= 80 else "$(cat signing.pub)"
        return (f"key {fpr} is not authorized as {role}; add `{role} {shown}` to the "
                "conductor's authorized-keys file")

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[AuthorizedKey]:
        return iter(self.entries)

    def __contains__(self, pub_hex: object) -> bool:
        return isinstance(pub_hex, str) and pub_hex.lower() in self._by_key


_KEY_FORMS = ("64 hex characters (Ed25519, the content of signing.pub), or "
              "ALG:HEX for ml-dsa-65 and ed25519+ml-dsa-65")


def parse_authorized_keys(text: str, *, filename: str = "<authorized-keys>") -> AuthorizedKeys:
    """Parse authorized-keys *text*; see the module docstring for the format.

    Raises AuthorizedKeysError ``"filename:line: message"`` on the first bad line:
    an unknown role, a missing key, an unknown algorithm, or hex that is not a key
    of its algorithm's size. Hex may be given in either case; it is stored in
    lowercase.
    """
    entries: list[AuthorizedKey] = []
    # Split on "\n" only: str.splitlines() also breaks on form feeds and the
    # like, which would make our line numbers disagree with the operator's editor.
    for lineno, raw_line in enumerate(text.split("\n"), start=1):
        words = raw_line.split(maxsplit=2)
        if not words or words[0].startswith("#"):
            continue
        role = words[0]
        if role not in ROLES and key_algorithm(role.lower(), any_case=True) is not None:
            raise AuthorizedKeysError(
                filename,
                lineno,
                "line starts with a key; expected `ROLE PUBLIC_KEY [comment]` "
                "with ROLE admin, node or ingress",
            )
        if role not in ROLES:
            raise AuthorizedKeysError(
                filename, lineno, f"unknown role {_short(role)} (expected admin, node or ingress)"
            )
        if len(words) < 2 or words[1].startswith("#"):
            raise AuthorizedKeysError(
                filename, lineno,
                f"missing public key after role {role!r} (expected {_KEY_FORMS})",
            )
        key = words[1].lower()
        problem = _key_problem(key)
        if problem is not None:
            raise AuthorizedKeysError(filename, lineno, problem)
        comment = words[2].strip() if len(words) > 2 else ""
        if comment.startswith("#"):
            comment = comment[1:].strip()
        entries.append(AuthorizedKey(key, frozenset({role}), comment))
    return AuthorizedKeys(tuple(entries))


def _key_problem(key: str) -> str | None:
    """What is wrong with a public key's text (lowercased), or None if nothing is."""
    if key_algorithm(key) is not None:
        return None
    parts = split_key(key)
    if parts is None:
        return (f"unknown key algorithm {_short(key.partition(':')[0])} (expected "
                f"{' or '.join(a.name for a in ALGORITHMS.values() if a is not ED25519)}, "
                "or a bare Ed25519 key)")
    algorithm, hex_part = parts
    want = 2 * algorithm.public_bytes
    if len(hex_part) != want:
        return (f"{algorithm.name} public key must be {want} hex characters "
                f"({algorithm.public_bytes} bytes), got {len(hex_part)} characters")
    return f"{algorithm.name} public key is not hex (expected {want} characters 0-9, a-f)"


def _short(value: str, limit: int = 40) -> str:
    shown = repr(value)
    return shown if len(shown) <= limit else shown[: limit - 4] + "...'"
