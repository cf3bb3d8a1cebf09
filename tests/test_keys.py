"""Keys, key files (keygen, modes, loading) and the authorized-keys file."""

from __future__ import annotations

import os
import re
import stat

import nacl.signing
import pytest

from skr8tr.core.keys import (
    AuthorizedKey,
    AuthorizedKeys,
    AuthorizedKeysError,
    KeyFileError,
    fingerprint,
    generate_keypair,
    parse_authorized_keys,
    parse_signing_key,
    public_key_line,
    secret_key_line,
)
from skr8tr.core.signatures import Signer
from skr8tr.keyfiles import load_authorized_keys, load_signing_key, write_keypair

K1 = "3b6a27bcceb6a42d62a3a8d02a6f0d73653215771de243a63ac048a18b59da29"
K2 = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
HEX64 = re.compile(r"[0-9a-f]{64}\n")


def mode_of(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# --------------------------------------------------------------------------- keygen


def test_generate_keypair_returns_matching_public_hex():
    key, pub = generate_keypair()
    assert isinstance(key, Signer)
    # The public key is the one PyNaCl derives from the seed: Ed25519 files are unchanged.
    assert pub == key.public == nacl.signing.SigningKey(key.seed).verify_key.encode().hex()
    assert len(pub) == 64


def test_write_keypair_creates_dir_and_files_with_modes_and_formats(tmp_path):
    out = tmp_path / "sub" / ".skr8tr"
    pub = write_keypair(out)
    assert mode_of(out) == 0o700
    sec_text = (out / "signing.sec").read_text()
    pub_text = (out / "signing.pub").read_text()
    assert HEX64.fullmatch(sec_text)
    assert HEX64.fullmatch(pub_text)
    assert pub_text == pub + "\n"
    assert mode_of(out / "signing.sec") == 0o600
    assert mode_of(out / "signing.pub") == 0o644
    # The seed on disk is the key whose public half is in signing.pub.
    assert (load_signing_key(out / "signing.sec")).public == pub


def test_write_keypair_modes_do_not_depend_on_umask(tmp_path):
    old = os.umask(0o000)
    try:
        write_keypair(tmp_path / "k")
    finally:
        os.umask(old)
    assert mode_of(tmp_path / "k" / "signing.sec") == 0o600
    assert mode_of(tmp_path / "k") == 0o700


def test_write_keypair_leaves_an_existing_dir_mode_alone(tmp_path):
    tmp_path.chmod(0o755)
    write_keypair(tmp_path)
    assert mode_of(tmp_path) == 0o755


@pytest.mark.parametrize("existing", ["signing.sec", "signing.pub"])
def test_write_keypair_refuses_to_overwrite(tmp_path, existing):
    (tmp_path / existing).write_text("keep me\n")
    with pytest.raises(KeyFileError, match="use --force to replace it"):
        write_keypair(tmp_path)
    assert (tmp_path / existing).read_text() == "keep me\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [existing]


def test_write_keypair_force_replaces_both_files(tmp_path):
    first = write_keypair(tmp_path)
    (tmp_path / "signing.sec").chmod(0o644)  # a bad mode must not survive
    second = write_keypair(tmp_path, force=True)
    assert first != second
    assert (tmp_path / "signing.pub").read_text() == second + "\n"
    assert mode_of(tmp_path / "signing.sec") == 0o600
    assert (load_signing_key(tmp_path / "signing.sec")).public == second
    assert sorted(p.name for p in tmp_path.iterdir()) == ["signing.pub", "signing.sec"]


def test_write_keypair_refuses_a_file_as_out_dir(tmp_path):
    target = tmp_path / "file"
    target.write_text("")
    with pytest.raises(KeyFileError, match="not a folder"):
        write_keypair(target)


# --------------------------------------------------------------------------- load


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o606])
def test_load_refuses_key_readable_by_others(tmp_path, mode):
    write_keypair(tmp_path)
    path = tmp_path / "signing.sec"
    path.chmod(mode)
    with pytest.raises(KeyFileError) as info:
        load_signing_key(path)
    assert str(info.value) == (
        f"{path} is readable by other users (mode {mode:04o}); run: chmod 600 {path}"
    )


@pytest.mark.parametrize("mode", [0o620, 0o610, 0o602, 0o601])
def test_load_refuses_any_group_or_other_permission(tmp_path, mode):
    write_keypair(tmp_path)
    path = tmp_path / "signing.sec"
    path.chmod(mode)
    with pytest.raises(KeyFileError, match=f"chmod 600 {re.escape(str(path))}"):
        load_signing_key(path)


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_load_accepts_owner_only_modes(tmp_path, mode):
    pub = write_keypair(tmp_path)
    (tmp_path / "signing.sec").chmod(mode)
    assert (load_signing_key(tmp_path / "signing.sec")).public == pub


def test_load_missing_file_says_how_to_make_one(tmp_path):
    with pytest.raises(KeyFileError) as info:
        load_signing_key(tmp_path / "nope.sec")
    msg = str(info.value)
    assert str(tmp_path / "nope.sec") in msg
    assert "skr8tr keygen" in msg
    assert "--key" in msg


def test_load_refuses_the_public_key_file(tmp_path):
    write_keypair(tmp_path)
    with pytest.raises(KeyFileError, match="public key; pass the signing.sec"):
        load_signing_key(tmp_path / "signing.pub")


def test_load_refuses_a_directory(tmp_path):
    d = tmp_path / "dir"
    d.mkdir(mode=0o700)
    with pytest.raises(KeyFileError, match="not a regular file"):
        load_signing_key(d)


SEED = "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60"


@pytest.mark.parametrize(
    "content",
    [
        SEED,
        SEED + "\n",
        "  " + SEED + "\r\n\n",
        SEED.upper() + "\n",
    ],
)
def test_load_accepts_seed_with_surrounding_whitespace(tmp_path, content):
    path = tmp_path / "k.sec"
    path.write_text(content)
    path.chmod(0o600)
    assert load_signing_key(path).seed.hex() == SEED


@pytest.mark.parametrize(
    "content",
    [
        "",
        "\n",
        SEED[:-1] + "\n",
        SEED + "0\n",
        SEED[:32] + "\n" + SEED[32:] + "\n",
        SEED[:-1] + "g\n",
        SEED + "\n" + SEED + "\n",
        "-----BEGIN OPENSSH PRIVATE KEY-----\n",
        # The right length, but whitespace inside (bytes.fromhex would skip it).
        SEED[:2] + "  " + SEED[4:] + "\n",
        SEED[:30] + "\t\n" + SEED[32:] + "\n",
        "ml-dsa-65:" + SEED[:2] + "  " + SEED[4:] + "\n",
        "ed25519+ml-dsa-65:" + SEED + SEED[:2] + "  " + SEED[4:] + "\n",
    ],
)
def test_load_rejects_bad_content(tmp_path, content):
    path = tmp_path / "k.sec"
    path.write_text(content)
    path.chmod(0o600)
    with pytest.raises(KeyFileError, match="not a skr8tr key file: expected one line of 64 hex"):
        load_signing_key(path)


def test_load_rejects_binary_content(tmp_path):
    path = tmp_path / "k.sec"
    path.write_bytes(b"\xff" * 64)
    path.chmod(0o600)
    with pytest.raises(KeyFileError, match="not a skr8tr key file"):
        load_signing_key(path)


def test_key_file_lines_parse_back_without_any_file():
    key, pub = generate_keypair()
    assert HEX64.fullmatch(secret_key_line(key)) and HEX64.fullmatch(public_key_line(pub))
    assert parse_signing_key(secret_key_line(key).encode(), filename="x").seed == key.seed
    with pytest.raises(KeyFileError, match="^x is not a skr8tr key file"):
        parse_signing_key(public_key_line(pub).encode() * 2, filename="x")


def test_fingerprint():
    import hashlib

    assert fingerprint(K1) == "sha256:" + hashlib.sha256(bytes.fromhex(K1)).hexdigest()[:16]
    assert re.fullmatch(r"sha256:[0-9a-f]{16}", fingerprint(K1))
    assert fingerprint(K1) != fingerprint(K2)


# --------------------------------------------------------------------------- authorized keys


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", []),
        ("\n\n   \n", []),
        ("# only a comment\n", []),
        (f"admin {K1}\n", [(K1, {"admin"}, "")]),
        (f"admin {K1}", [(K1, {"admin"}, "")]),
        (f"node {K1} rack-3 box 7\n", [(K1, {"node"}, "rack-3 box 7")]),
        (f"  admin\t{K1}   alice@laptop  \r\n", [(K1, {"admin"}, "alice@laptop")]),
        (f"admin {K1} # main key\n", [(K1, {"admin"}, "main key")]),
        (f"admin {K1.upper()}\n", [(K1, {"admin"}, "")]),
        (f"   # indented comment\nadmin {K1}\n", [(K1, {"admin"}, "")]),
        (
            f"admin {K1} alice\nnode {K2} n1\nnode {K1} alice-node\n",
            [(K1, {"admin", "node"}, "alice"), (K2, {"node"}, "n1")],
        ),
        (f"admin {K1}\nadmin {K1}\n", [(K1, {"admin"}, "")]),
    ],
)
def test_parse_authorized_keys_valid(text, expected):
    keys = parse_authorized_keys(text, filename="ak")
    assert [(p, set(r), c) for p, r, c in keys] == expected
    assert len(keys) == len(expected)


def test_authorized_keys_lookups():
    keys = parse_authorized_keys(f"admin {K1}\nnode {K1}\nnode {K2}\n", filename="ak")
    assert keys.roles(K1) == frozenset({"admin", "node"})
    assert keys.roles(K1.upper()) == frozenset({"admin", "node"})
    assert keys.has_role(K1, "admin")
    assert keys.has_role(K2, "node")
    assert not keys.has_role(K2, "admin")
    assert keys.roles("00" * 32) == frozenset()
    assert keys.roles(None) == frozenset()  # type: ignore[arg-type]
    assert K2 in keys
    assert all(isinstance(entry, AuthorizedKey) for entry in keys)


def test_authorized_keys_is_frozen():
    keys = parse_authorized_keys(f"admin {K1}\n", filename="ak")
    with pytest.raises(AttributeError):
        keys.entries = ()  # type: ignore[misc]
    assert AuthorizedKeys() == AuthorizedKeys(())
    assert len(AuthorizedKeys()) == 0


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        (f"root {K1}\n", 1, "unknown role 'root' (expected admin, node or ingress)"),
        (f"Admin {K1}\n", 1, "unknown role 'Admin' (expected admin, node or ingress)"),
        (f"# ok\n\nadmin {K1}\nnodes {K2}\n", 4, "unknown role 'nodes'"),
        ("admin\n", 1, "missing public key after role 'admin'"),
        ("\n\nnode   # no key here\n", 3, "missing public key after role 'node'"),
        (f"admin {K1[:-2]}\n", 1, "public key must be 64 hex characters (32 bytes), got 62"),
        (f"admin {K1}00\n", 1, "public key must be 64 hex characters (32 bytes), got 66"),
        (f"admin {K1}#c\n", 1, "got 66 characters"),
        (f"admin {K1[:-1]}z\n", 1, "public key is not hex"),
        (f"admin {K1}\nadmin {K2}\n\n\nadmin xyz\n", 5, "got 3 characters"),
        (f"{K1} admin\n", 1, "line starts with a key; expected `ROLE PUBLIC_KEY [comment]`"),
        (f"{K1[:10]} admin\n", 1, "unknown role '3b6a27bcce'"),
        (f"node{'x' * 60} {K1}\n", 1, "unknown role 'node" + "x" * 31 + "...'"),
    ],
)
def test_parse_authorized_keys_errors(text, line, message):
    with pytest.raises(AuthorizedKeysError) as info:
        parse_authorized_keys(text, filename="/etc/skr8tr/keys")
    err = info.value
    assert err.line == line
    assert err.filename == "/etc/skr8tr/keys"
    assert str(err).startswith(f"/etc/skr8tr/keys:{line}: ")
    assert message in str(err)
    assert isinstance(err, KeyFileError)


def test_line_numbers_count_only_newlines():
    # A form feed is not a line break for an editor's line numbers.
    with pytest.raises(AuthorizedKeysError) as info:
        parse_authorized_keys(f"admin {K1} a\fb\nbad {K2}\n", filename="ak")
    assert info.value.line == 2


def test_load_authorized_keys(tmp_path):
    path = tmp_path / "authorized_keys"
    path.write_text(f"# team\nadmin {K1} alice\n")
    keys = load_authorized_keys(path)
    assert keys.has_role(K1, "admin")


def test_load_authorized_keys_missing(tmp_path):
    with pytest.raises(AuthorizedKeysError) as info:
        load_authorized_keys(tmp_path / "none")
    assert str(info.value).startswith(f"{tmp_path / 'none'}: no such file")
    assert info.value.line is None


def test_load_authorized_keys_error_names_the_file(tmp_path):
    path = tmp_path / "ak"
    path.write_text(f"admin {K1}\nnode nothex\n")
    with pytest.raises(AuthorizedKeysError, match=f"^{re.escape(str(path))}:2: "):
        load_authorized_keys(path)


def test_load_authorized_keys_invalid_utf8(tmp_path):
    path = tmp_path / "ak"
    path.write_bytes(f"admin {K1}\n# caf\xe9\n".encode("latin-1"))
    with pytest.raises(AuthorizedKeysError, match=":2: not valid UTF-8"):
        load_authorized_keys(path)
