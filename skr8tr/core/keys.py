"""Ed25519 keys, their files' content and the conductor's authorized-keys text.

Key files:

- ``signing.sec``: one line, the 32-byte Ed25519 seed as 64 lowercase hex
  characters (mode 0600).
- ``signing.pub``: one line, the 32-byte public key as 64 lowercase hex
  characters (mode 0644).

Authorized keys, one entry per line::

    # ROLE  HEX_PUBKEY                                                        comment
    admin   3b6a27bcceb6a42d62a3a8d02a6f0d73653215771de243a63ac048a18b59da29  alice@laptop
    node    3b6a27bcceb6a42d62a3a8d02a6f0d73653215771de243a63ac048a18b59da29

A key listed on two lines holds both roles. ``#`` starts a comment at the
start of a line or after whitespace.

Pure: no file I/O. Reading and writing the files, with their modes, is
:mod:`skr8tr.keyfiles`.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:  # imported by what makes or loads a key: `skr8tr ping` with none is faster
    import nacl.signing

__all__ = [
    "ROLES",
    "SECRET_KEY_FILE",
    "PUBLIC_KEY_FILE",
    "KeyFileError",
    "AuthorizedKeysError",
    "AuthorizedKey",
    "AuthorizedKeys",
    "generate_keypair",
    "public_hex",
    "fingerprint",
    "is_key_hex",
    "secret_key_line",
    "public_key_line",
    "parse_signing_key",
    "parse_authorized_keys",
]

ROLES = ("admin", "node")
SECRET_KEY_FILE = "signing.sec"
PUBLIC_KEY_FILE = "signing.pub"

_KEY_HEX_RE = re.compile(r"[0-9a-fA-F]{64}")


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


def generate_keypair() -> tuple[nacl.signing.SigningKey, str]:
    """Return a fresh signing key and its public key as 64 lowercase hex characters."""
    import nacl.signing

    signing_key = nacl.signing.SigningKey.generate()
    return signing_key, public_hex(signing_key)


def public_hex(signing_key: nacl.signing.SigningKey) -> str:
    """The public half of *signing_key* as 64 lowercase hex characters."""
    return signing_key.verify_key.encode().hex()


def is_key_hex(value: object) -> bool:
    """True if *value* is a public key as the wire carries it: 64 lowercase hex characters."""
    return (
        isinstance(value, str)
        and len(value) == 64
        and _KEY_HEX_RE.fullmatch(value) is not None
        and value == value.lower()
    )


def fingerprint(pub_hex: str) -> str:
    """A short, log-friendly name for a public key: ``sha256:`` + 16 hex characters.

    Raises ValueError if *pub_hex* is not hex.
    """
    return "sha256:" + hashlib.sha256(bytes.fromhex(pub_hex)).hexdigest()[:16]


# --------------------------------------------------------------------------- key file text


def secret_key_line(signing_key: nacl.signing.SigningKey) -> str:
    """The content of a ``signing.sec`` file: the seed as 64 lowercase hex, one line."""
    return bytes(signing_key).hex() + "\n"


def public_key_line(pub_hex: str) -> str:
    """The content of a ``signing.pub`` file: the public key as 64 lowercase hex, one line."""
    return pub_hex + "\n"


def parse_signing_key(data: bytes, *, filename: str) -> nacl.signing.SigningKey:
    """The signing key in a ``signing.sec`` file's content *data*.

    Raises KeyFileError, naming *filename*, unless *data* is exactly 64 hex
    characters on one line (surrounding whitespace is fine).
    """
    expected = "expected one line of 64 hex characters (a 32-byte Ed25519 seed)"
    try:
        text = data.decode("ascii").strip()
    except UnicodeDecodeError:
        raise KeyFileError(f"{filename} is not a skr8tr key file: {expected}") from None
    if _KEY_HEX_RE.fullmatch(text) is None:
        raise KeyFileError(f"{filename} is not a skr8tr key file: {expected}")
    import nacl.signing

    return nacl.signing.SigningKey(bytes.fromhex(text))


# --------------------------------------------------------------------------- authorized keys


class AuthorizedKey(NamedTuple):
    """One trusted key: its lowercase hex, its roles, and the comment from its first line."""

    pub_hex: str
    roles: frozenset[str]
    comment: str


@dataclass(frozen=True)
class AuthorizedKeys:
    """The keys the conductor trusts, each with its roles (``admin``, ``node``).

    Immutable. Lookups accept hex in either case. Iterating yields
    ``AuthorizedKey(pub_hex, roles, comment)`` tuples in file order.
    """

    entries: tuple[AuthorizedKey, ...] = ()
    _by_key: MappingProxyType[str, AuthorizedKey] = field(init=False, repr=False, compare=False)

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

    def roles(self, pub_hex: str) -> frozenset[str]:
        """The roles of *pub_hex*; empty for an unknown key or a non-string."""
        if not isinstance(pub_hex, str):
            return frozenset()
        entry = self._by_key.get(pub_hex.lower())
        return entry.roles if entry is not None else frozenset()

    def has_role(self, pub_hex: str, role: str) -> bool:
        return role in self.roles(pub_hex)

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[AuthorizedKey]:
        return iter(self.entries)

    def __contains__(self, pub_hex: object) -> bool:
        return isinstance(pub_hex, str) and pub_hex.lower() in self._by_key


def parse_authorized_keys(text: str, *, filename: str = "<authorized-keys>") -> AuthorizedKeys:
    """Parse authorized-keys *text*; see the module docstring for the format.

    Raises AuthorizedKeysError ``"filename:line: message"`` on the first bad line:
    an unknown role, a missing key, or a key that is not 64 hex characters.
    Hex may be given in either case; it is stored in lowercase.
    """
    entries: list[AuthorizedKey] = []
    # Split on "\n" only: str.splitlines() also breaks on form feeds and the
    # like, which would make our line numbers disagree with the operator's editor.
    for lineno, raw_line in enumerate(text.split("\n"), start=1):
        words = raw_line.split(maxsplit=2)
        if not words or words[0].startswith("#"):
            continue
        role = words[0]
        if role not in ROLES and _KEY_HEX_RE.fullmatch(role):
            raise AuthorizedKeysError(
                filename,
                lineno,
                "line starts with a key; expected `ROLE HEX_PUBKEY [comment]` "
                "with ROLE admin or node",
            )
        if role not in ROLES:
            raise AuthorizedKeysError(
                filename, lineno, f"unknown role {_short(role)} (expected admin or node)"
            )
        if len(words) < 2 or words[1].startswith("#"):
            raise AuthorizedKeysError(
                filename,
                lineno,
                f"missing public key after role {role!r} (expected 64 hex "
                "characters, e.g. the content of signing.pub)",
            )
        key = words[1]
        if len(key) != 64:
            raise AuthorizedKeysError(
                filename,
                lineno,
                f"public key must be 64 hex characters (32 bytes), got {len(key)} characters",
            )
        if _KEY_HEX_RE.fullmatch(key) is None:
            raise AuthorizedKeysError(
                filename, lineno, "public key is not hex (expected 64 characters 0-9, a-f)"
            )
        comment = words[2].strip() if len(words) > 2 else ""
        if comment.startswith("#"):
            comment = comment[1:].strip()
        entries.append(AuthorizedKey(key.lower(), frozenset({role}), comment))
    return AuthorizedKeys(tuple(entries))


def _short(value: str, limit: int = 40) -> str:
    shown = repr(value)
    return shown if len(shown) <= limit else shown[: limit - 4] + "...'"
