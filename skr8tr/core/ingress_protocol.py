"""Messages between an ingress and the conductor on ``/v1/ingress`` (DESIGN.md §11). Pure.

Every message is one JSON object, text, at most :data:`MAX_MESSAGE_BYTES`:

1. conductor -> ingress ``{"type":"challenge","nonce":HEX64}`` (32 random bytes).
2. ingress -> conductor ``{"type":"hello","ingress":NAME,"key":PUB,"sig":HEX,
   "version":V}``: ``sig`` signs the challenge and the name
   (``envelope.sign_challenge(signer, challenge, NAME, role="ingress")``) with a
   key the conductor lists in the ``ingress`` role.
3. conductor -> ingress ``{"type":"welcome","interval_s":S}``, or
   ``{"type":"error","code":CODE,"message":TEXT}`` and a close; a follower's
   ``NOT_LEADER`` error also has ``"leader": URL or null``.
4. ingress -> conductor, every ``interval_s``: a report
   (:class:`skr8tr.core.traffic.Report`, checked by
   :func:`skr8tr.core.traffic.decode_report`). A report the conductor refuses is
   answered ``{"type":"error","code":"BAD_REQUEST","message":TEXT}`` and the
   session goes on.

One signature per connection, not per report: a nonce per report would cost the
replay store a write per second per ingress, and the challenge already binds the
session to the key. :func:`decode_hello` bounds every field of the hello before
anything is verified.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from skr8tr.core import wire_json

__all__ = ["MAX_MESSAGE_BYTES", "MAX_NAME_CHARS", "NAME_RE", "IngressHello", "challenge",
           "decode_hello", "error", "parse", "welcome"]

MAX_MESSAGE_BYTES = 256 * 1024
MAX_NAME_CHARS = 64
NAME_RE = re.compile(rf"[A-Za-z0-9._-]{{1,{MAX_NAME_CHARS}}}")
MAX_VERSION_CHARS = 64
_VERSION_RE = re.compile(rf"[\x21-\x7e]{{1,{MAX_VERSION_CHARS}}}")
# The longest key and signature texts (a hybrid key: "ed25519+ml-dsa-65:" + 1,984 bytes
# in hex; its signature 64 + 3,309 bytes in hex), with room to spare; the envelope checks
# the exact forms.
MAX_KEY_CHARS = 4096
MAX_SIG_CHARS = 8192
_HELLO_KEYS = frozenset({"type", "ingress", "key", "sig", "version"})


@dataclass(frozen=True)
class IngressHello:
    name: str
    key: str
    sig: str
    version: str


def parse(data: str | bytes) -> dict[str, Any] | str:
    """One message as a JSON object (strict: no duplicate keys, no NaN), or why not."""
    return wire_json.parse_object(data, max_bytes=MAX_MESSAGE_BYTES, what="the message")


def decode_hello(msg: dict[str, Any]) -> IngressHello | str:
    """The hello's fields, each bounded; or a one-line reason (a BAD_REQUEST)."""
    if msg.get("type") != "hello":
        return 'expected {"type":"hello",...} after the challenge'
    if set(msg) != _HELLO_KEYS:
        return "a hello has exactly type, ingress, key, sig and version"
    name, key, sig, version = msg["ingress"], msg["key"], msg["sig"], msg["version"]
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        return (f"ingress must be a name of 1 to {MAX_NAME_CHARS} characters of "
                "A-Z a-z 0-9 . _ -")
    if not isinstance(key, str) or not 0 < len(key) <= MAX_KEY_CHARS:
        return "key must be the text of signing.pub"
    if not isinstance(sig, str) or not 0 < len(sig) <= MAX_SIG_CHARS:
        return "sig must be the signature in lowercase hex"
    if not isinstance(version, str) or not _VERSION_RE.fullmatch(version):
        return f"version must be 1 to {MAX_VERSION_CHARS} printable ASCII characters"
    return IngressHello(name, key, sig, version)


def challenge(nonce: bytes) -> str:
    return wire_json.dumps({"type": "challenge", "nonce": nonce.hex()})


def welcome(interval_s: float) -> str:
    return wire_json.dumps({"type": "welcome", "interval_s": interval_s})


def error(code: str, message: str, *, leader: str | None = None,
          with_leader: bool = False) -> str:
    """An error message; ``leader`` is sent (null or a URL) with *with_leader*."""
    fields: dict[str, Any] = {"type": "error", "code": code, "message": message}
    if with_leader:
        fields["leader"] = leader
    return wire_json.dumps(fields)
