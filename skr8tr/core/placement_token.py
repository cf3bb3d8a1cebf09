"""Placement tokens: a node's proof that the conductor placed a replica on it.

Every ``launch`` carries a token, an HMAC under a secret only the conductor
holds (kept in its state, so tokens outlive its restarts) over the node id,
replica id, app, generation and port. The node keeps it in the replica's
record and sends it back with every report. A conductor that restarted knows
no replica rows; it adopts a replica a node reports only when the token is
right for *that* node id: a node key cannot claim another node's replicas,
nor invent replicas of an app for the ingress to route users to (#13.2).

A restarted replica's launch also carries its slot (``Launch.slot``: the slot's
name, its restart count, its backoff's count and why the one before ended), sealed
the same way by :func:`make_slot` for that replica on that node: the node echoes it
in its reports, and a conductor that restarted restores the slot only when the seal
is right, so a node key cannot set or reset any replica's count or reason (#17).

Pure: no clock, no I/O.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets

__all__ = ["SECRET_BYTES", "TOKEN_HEX", "new_secret", "make", "check", "make_slot",
           "check_slot"]

SECRET_BYTES = 32
TOKEN_HEX = 32  # 128 bits of the HMAC-SHA256
_DOMAIN = b"skr8tr placement token v1\0"
_SLOT_DOMAIN = b"skr8tr slot v1\0"
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


def make_slot(secret: bytes, *, node_id: str, replica: str, app: str, name: str,
              restarts: int, backoff: int,
              last_end: tuple[str, int | None, int | None] | None) -> str:
    """The seal of a replica's slot as its launch carries it (``Launch.slot``): the
    slot's name, its restart count, the count its restart backoff goes on from and why
    the one before ended, for this replica on this node. A conductor that restarted
    takes these back from a node's report only with the right seal: a node key cannot
    raise, reset or rename another's count, nor write its own reason into a row
    (issue #17)."""
    fields = json.dumps([node_id, replica, app, name, restarts, backoff,
                         None if last_end is None else list(last_end)],
                        ensure_ascii=False, separators=(",", ":"))
    return hmac.new(secret, _SLOT_DOMAIN + fields.encode("utf-8", "surrogatepass"),
                    hashlib.sha256).hexdigest()[:TOKEN_HEX]


def check_slot(secret: bytes, mac: object, *, node_id: str, replica: str, app: str,
               name: str, restarts: int, backoff: int,
               last_end: tuple[str, int | None, int | None] | None) -> bool:
    """Is *mac* the one :func:`make_slot` gives for these fields? (Constant time.)"""
    if not isinstance(mac, str) or _TOKEN_RE.fullmatch(mac) is None:
        return False
    expected = make_slot(secret, node_id=node_id, replica=replica, app=app, name=name,
                         restarts=restarts, backoff=backoff, last_end=last_end)
    return hmac.compare_digest(expected, mac)
