"""Ed25519 key files and the conductor's authorized-keys file (DESIGN.md §4).

Key files:

- ``signing.sec``: one line, the 32-byte Ed25519 seed as 64 lowercase hex
  characters. Created with mode 0600 from the first byte written, and refused
  on load if its mode grants anything to group or others.
- ``signing.pub``: one line, the 32-byte public key as 64 lowercase hex
  characters (mode 0644).

Authorized keys, one entry per line::

    # ROLE  HEX_PUBKEY                                                        comment
    admin   3b6a27bcceb6a42d62a3a8d02a6f0d73653215771de243a63ac048a18b59da29  alice@laptop
    node    3b6a27bcceb6a42d62a3a8d02a6f0d73653215771de243a63ac048a18b59da29

A key listed on two lines holds both roles. ``#`` starts a comment at the
start of a line or after whitespace.

The helpers here do small synchronous file I/O (key files are read once at
start-up); everything else is pure.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
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
    "write_keypair",
    "load_signing_key",
    "parse_authorized_keys",
    "load_authorized_keys",
]

ROLES = ("admin", "node")
SECRET_KEY_FILE = "signing.sec"
PUBLIC_KEY_FILE = "signing.pub"

_KEY_HEX_RE = re.compile(r"[0-9a-fA-F]{64}")
# Key files are one short line; anything much longer is not a key file.
_MAX_KEY_FILE_BYTES = 4096


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


# --------------------------------------------------------------------------- key files


def write_keypair(out_dir: str | os.PathLike[str], *, force: bool = False) -> str:
    """Generate a key pair and write ``signing.sec`` and ``signing.pub`` into *out_dir*.

    Creates *out_dir* (mode 0700) if it is missing. The secret file is created
    with mode 0600 by ``open(2)`` itself, so it is never readable by others,
    not even for an instant. Without *force*, refuses (KeyFileError) if either
    file exists; with *force*, each file is written to a temporary file in the
    same folder and renamed over the old one, so a crash leaves either the old
    or the new key, never a torn one.

    Returns the new public key as 64 lowercase hex characters.
    """
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise KeyFileError(f"{out} exists and is not a folder; pass another --out DIR")
    try:
        out.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise KeyFileError(f"cannot create {out}: {exc.strerror or exc}") from exc

    sec_path = out / SECRET_KEY_FILE
    pub_path = out / PUBLIC_KEY_FILE
    if not force:
        for path in (sec_path, pub_path):
            if path.exists() or path.is_symlink():
                raise KeyFileError(f"{path} already exists; use --force to replace it")

    signing_key, pub = generate_keypair()
    sec_line = (bytes(signing_key).hex() + "\n").encode("ascii")
    pub_line = (pub + "\n").encode("ascii")
    try:
        if force:
            _replace_file(sec_path, sec_line, 0o600)
            _replace_file(pub_path, pub_line, 0o644)
        else:
            _create_file(sec_path, sec_line, 0o600)
            try:
                _create_file(pub_path, pub_line, 0o644)
            except BaseException:
                # Do not leave half a key pair behind.
                sec_path.unlink(missing_ok=True)
                raise
    except FileExistsError as exc:
        raise KeyFileError(f"{exc.filename} already exists; use --force to replace it") from exc
    except OSError as exc:
        raise KeyFileError(f"cannot write key files in {out}: {exc.strerror or exc}") from exc
    return pub


def _create_file(path: Path, content: bytes, mode: int) -> None:
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, mode)
    try:
        # The umask may have taken bits away from *mode*; set exactly what we promise.
        os.fchmod(fd, mode)
        os.write(fd, content)
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_file(path: Path, content: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.{os.urandom(6).hex()}.tmp")
    try:
        _create_file(tmp, content, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_signing_key(path: str | os.PathLike[str]) -> nacl.signing.SigningKey:
    """Read a ``signing.sec`` file written by ``skr8tr keygen``.

    Raises KeyFileError when the file is missing (the message says how to make
    one or pass ``--key``), is not a regular file, grants any permission to
    group or others (the message gives the ``chmod 600`` to run), or does not
    hold exactly 64 hex characters on one line (surrounding whitespace is fine).
    """
    p = Path(path).expanduser()
    if p.name == PUBLIC_KEY_FILE:
        # Its content has the same shape as a seed; loading it would sign with a wrong key.
        raise KeyFileError(f"{p} is a public key; pass the signing.sec next to it")
    try:
        fd = os.open(p, os.O_RDONLY)
    except FileNotFoundError:
        raise KeyFileError(
            f"no key file at {p}; create one with `skr8tr keygen` or pass --key FILE"
        ) from None
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {p}: {exc.strerror or exc}") from exc
    try:
        # fstat on the open descriptor: the file we check is the file we read.
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KeyFileError(f"{p} is not a regular file; pass the signing.sec file with --key")
        perms = stat.S_IMODE(st.st_mode)
        if perms & 0o077:
            what = "readable" if perms & 0o044 else "accessible"
            raise KeyFileError(
                f"{p} is {what} by other users (mode {perms:04o}); run: chmod 600 {p}"
            )
        data = os.read(fd, _MAX_KEY_FILE_BYTES + 1)
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {p}: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)

    expected = "expected one line of 64 hex characters (a 32-byte Ed25519 seed)"
    try:
        text = data.decode("ascii").strip()
    except UnicodeDecodeError:
        raise KeyFileError(f"{p} is not a skr8tr key file: {expected}") from None
    if _KEY_HEX_RE.fullmatch(text) is None:
        raise KeyFileError(f"{p} is not a skr8tr key file: {expected}")
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


def load_authorized_keys(path: str | os.PathLike[str]) -> AuthorizedKeys:
    """Read and parse an authorized-keys file. Raises AuthorizedKeysError."""
    p = Path(path).expanduser()
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise AuthorizedKeysError(
            str(p),
            None,
            "no such file; list trusted keys there as `admin HEX_PUBKEY` lines "
            "(the hex is in signing.pub from `skr8tr keygen`)",
        ) from None
    except OSError as exc:
        raise AuthorizedKeysError(str(p), None, f"cannot read: {exc.strerror or exc}") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise AuthorizedKeysError(str(p), line, "not valid UTF-8 text") from None
    return parse_authorized_keys(text, filename=str(p))


def _short(value: str, limit: int = 40) -> str:
    shown = repr(value)
    return shown if len(shown) <= limit else shown[: limit - 4] + "...'"
