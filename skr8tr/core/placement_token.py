"""Placement tokens: a node's proof that the conductor placed a replica on it.

Every ``launch`` carries a token, an HMAC under a secret only the conductor
holds (kept in its state, so tokens outlive its restarts) over the node id,
replica id, app, generation and port. The node keeps it in the replica's
record and sends it back with every report. A conductor that restarted knows
no replica rows; it adopts a replica a node reports only when the token is
right for *that* node id: a node key cannot claim another node's replicas,
nor invent replicas of an app for the ingress to route users to (#13.2).

Pure: no clock, no I/O.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

__all__ = ["SECRET_BYTES", "TOKEN_HEX", "new_secret", "make", "check"]

SECRET_BYTES = 32
TOKEN_HEX = 32  # 128 bits of the HMAC-SHA256
_DOMAIN = b"skr8tr placement token v1\0"
_TOKEN_RE = re.compile(f"[0-9a-f]{{{TOKEN_HEX}}}")


def new_secret() -> bytes:
    return secrets.token_bytes(SECRET_BYTES)


def make(secret: bytes, *, node_id: str, replica: str, app: str, generation: int,
         port: int | None) -> str:
    """The token for one placement, as lowercase hex."""
    fields = "\0".join((node_id, replica, app, str(generation),
                        "" if port is None else str(port)))
    return hmac.new(secret, _DOMAIN + fields.encode("utf-8"),
                    hashlib.sha256).hexdigest()[:TOKEN_HEX]


def check(secret: bytes, token: object, *, node_id: str, replica: str, app: str,
          generation: int, port: int | None) -> bool:
    """Is *token* the one :func:`make` gives for these fields? (Constant time.)"""
    if not isinstance(token, str) or _TOKEN_RE.fullmatch(token) is None:
        return False
    expected = make(secret, node_id=node_id, replica=replica, app=app, generation=generation,
                    port=port)
    return hmac.compare_digest(expected, token)
