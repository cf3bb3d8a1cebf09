"""Key files on disk: ``keygen`` writes them, the CLI, the node agent and the conductor read them.

The formats and their parsing are pure and live in :mod:`skr8tr.core.keys`;
this module does the file I/O around them, small and synchronous (a key file
is read once, at start-up):

- ``signing.sec`` is created with mode 0600 from its first byte, and refused
  on load if its mode grants anything to group or others;
- ``signing.pub`` gets mode 0644;
- the authorized-keys file is read as UTF-8 text.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING

from skr8tr.atomic import write_atomically
from skr8tr.bounded_files import FileRefused, open_regular, read_regular
from skr8tr.core.keys import (
    PUBLIC_KEY_FILE,
    SECRET_KEY_FILE,
    AuthorizedKeys,
    AuthorizedKeysError,
    KeyFileError,
    generate_keypair,
    parse_authorized_keys,
    parse_signing_key,
    public_key_line,
    secret_key_line,
)
from skr8tr.core.signatures import ED25519, Algorithm

if TYPE_CHECKING:
    from skr8tr.core.signatures import Signer

__all__ = ["write_keypair", "load_signing_key", "load_authorized_keys"]

# Key files are one line (a hybrid signing.pub, the longest, is 3,987 bytes);
# anything much longer is not a key file.
_MAX_KEY_FILE_BYTES = 8192
# Thousands of hybrid (post-quantum) keys at ~4 KB a line fit many times over: a file
# larger than this is not an authorized-keys file (/dev/zero, a log named by mistake).
MAX_AUTHORIZED_KEYS_BYTES = 64 * 1024 * 1024


def write_keypair(out_dir: str | os.PathLike[str], *, force: bool = False,
                  algorithm: Algorithm = ED25519) -> str:
    """Generate a key pair of *algorithm*; write ``signing.sec`` and ``signing.pub`` in *out_dir*.

    Creates *out_dir* (mode 0700) if it is missing. The secret file is created
    with mode 0600 by ``open(2)`` itself, so it is never readable by others,
    not even for an instant. Without *force*, refuses (KeyFileError) if either
    file exists; with *force*, each file is replaced atomically
    (:func:`skr8tr.atomic.write_atomically`), so a crash leaves either the old
    or the new key, never a torn one.

    Returns the new public key's text (what ``signing.pub`` holds).
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

    signing_key, pub = generate_keypair(algorithm)
    sec_line = secret_key_line(signing_key).encode("ascii")
    pub_line = public_key_line(pub).encode("ascii")
    try:
        if force:
            write_atomically(sec_path, sec_line, 0o600)
            write_atomically(pub_path, pub_line, 0o644)
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
    """Create *path* (never replace it: FileExistsError) with exactly *mode*, and fsync it."""
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, mode)
    try:
        # The umask may have taken bits away from *mode*; set exactly what we promise.
        os.fchmod(fd, mode)
        os.write(fd, content)
        os.fsync(fd)
    finally:
        os.close(fd)


def load_signing_key(path: str | os.PathLike[str]) -> Signer:
    """Read a ``signing.sec`` file written by ``skr8tr keygen``.

    Raises KeyFileError when the file is missing (the message says how to make
    one or pass ``--key``), is not a regular file, grants any permission to
    group or others (the message gives the ``chmod 600`` to run), or does not
    hold one line ``[ALG:]HEX`` of a known algorithm's seed (surrounding whitespace is
    fine).
    """
    p = Path(path).expanduser()
    if p.name == PUBLIC_KEY_FILE:
        # An Ed25519 one has the same shape as a seed; loading it would sign with a wrong key.
        raise KeyFileError(f"{p} is a public key; pass the signing.sec next to it")
    try:
        fd = open_regular(p)
    except FileRefused as exc:
        raise KeyFileError(f"{p} is not a regular file ({exc.reason}); pass the signing.sec "
                           "file with --key") from None
    except FileNotFoundError:
        raise KeyFileError(
            f"no key file at {p}; create one with `skr8tr keygen` or pass --key FILE"
        ) from None
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {p}: {exc.strerror or exc}") from exc
    try:
        # fstat on the open descriptor: the file we check is the file we read.
        st = os.fstat(fd)  # a regular file (open_regular)
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
    return parse_signing_key(data, filename=str(p))


def load_authorized_keys(path: str | os.PathLike[str]) -> AuthorizedKeys:
    """Read and parse an authorized-keys file. Raises AuthorizedKeysError."""
    p = Path(path).expanduser()
    try:
        raw = read_regular(p, MAX_AUTHORIZED_KEYS_BYTES)
    except FileRefused as exc:
        raise AuthorizedKeysError(str(p), None, f"{exc.reason}: not an authorized-keys file "
                                  "(a regular text file, one key a line)") from None
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
