"""Requests as the tests send them and fake conductors read them, on top of
:mod:`skr8tr.core.protocol` (no second definition of a request)."""

from __future__ import annotations

import json
from typing import Any

from skr8tr.core import protocol
from skr8tr.core.envelope import ReplayGuard
from skr8tr.core.keys import AuthorizedKeys


def encode_request(**fields: Any) -> str:
    """The JSON text of :func:`protocol.request_message` (*fields* are its arguments)."""
    return json.dumps(protocol.request_message(**fields), separators=(",", ":"),
                      ensure_ascii=False, allow_nan=False)


def decode_request(data: str | bytes) -> protocol.Request | protocol.DecodeError:
    """The frame and the fields of a request, without authentication (a fake conductor's
    reading; steps 1 and 3 of the conductor's)."""
    envelope = protocol.decode_envelope(data)
    if isinstance(envelope, protocol.DecodeError):
        return envelope
    return protocol.validate_request(envelope)


def accept_request(data: str | bytes, *, authorized: AuthorizedKeys, guard: ReplayGuard,
                   now: float, insecure: bool = False) -> protocol.Request | protocol.DecodeError:
    """What the conductor does with a request: authenticate, then admit."""
    auth = protocol.authenticate_request(data, authorized=authorized, insecure=insecure)
    return protocol.admit_request(auth, guard=guard, now=now)
