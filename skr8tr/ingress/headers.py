"""What the proxy changes in a request head on its way to a replica, and in the response back.

Pure: h11 header lists in, header lists out; no trio, no sockets.

- Hop-by-hop headers (``Connection`` and the headers it names, ``Keep-Alive``,
  ``TE``, ``Trailer``, ``Transfer-Encoding``, ``Upgrade``...) describe one
  connection and are not forwarded in either direction; a chunked request
  body is re-framed as chunked towards the replica.
- ``X-Forwarded-For`` gets the client's address appended to what the client
  sent; ``X-Forwarded-Proto`` is replaced by the ingress's own scheme.
- ``Expect`` is answered by the ingress itself (``100 Continue``), not passed on.
- A request without ``Host`` gets the replica's ``ADDRESS:PORT``
  (:data:`HOST_PLACEHOLDER` until the replica is picked).
- Header names keep the sender's casing.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import h11

__all__ = ["IDEMPOTENT_METHODS", "HOP_BY_HOP", "HOST_PLACEHOLDER", "origin_form",
           "request_framing", "upstream_headers", "response_headers"]

# Methods a request may be resent for, to another replica, when it failed before
# the first response byte (and has no body: a body cannot be read twice).
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
                        b"transfer-encoding", b"upgrade"})
HOST_PLACEHOLDER = (b"Host", b"")  # replaced by the replica's address when it is sent


def origin_form(target: str) -> str:
    """``http://host/path?q`` -> ``/path?q`` (the absolute form of RFC 9112); else as is."""
    if target.startswith("/") or "://" not in target:
        return target
    parts = urlsplit(target)
    return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")


def request_framing(headers: list[tuple[bytes, bytes]]) -> str | None:
    """"chunked", "length" (a non-empty body of known size) or None (no body)."""
    framing = None
    for name, value in headers:
        if name == b"transfer-encoding":
            return "chunked"
        if name == b"content-length" and value.strip() not in (b"0", b""):
            framing = "length"
    return framing


def upstream_headers(req: h11.Request, client_ip: str, framing: str | None, scheme: bytes
                     ) -> list[tuple[bytes, bytes]]:
    """The headers *req* is forwarded to a replica with (see the module docstring).

    Ends with :data:`HOST_PLACEHOLDER` when the client sent no ``Host``."""
    named = _named_by_connection(req.headers)
    out: list[tuple[bytes, bytes]] = []
    forwarded_for: list[bytes] = []
    has_host = False
    for raw_name, name, value in _raw_headers(req.headers):
        if name in HOP_BY_HOP or name in named or name == b"expect":
            continue
        if name == b"x-forwarded-for":
            forwarded_for.append(value)
            continue
        if name == b"x-forwarded-proto":
            continue
        has_host = has_host or name == b"host"
        out.append((raw_name, value))
    if framing == "chunked":
        out.append((b"transfer-encoding", b"chunked"))
    forwarded_for.append(client_ip.encode("ascii", "replace"))
    out.append((b"X-Forwarded-For", b", ".join(forwarded_for)))
    out.append((b"X-Forwarded-Proto", scheme))
    if not has_host:
        out.append(HOST_PLACEHOLDER)
    return out


def response_headers(headers) -> list[tuple[bytes, bytes]]:
    """A replica's response headers without the hop-by-hop ones, for the client."""
    named = _named_by_connection(headers)
    return [(raw, v) for raw, n, v in _raw_headers(headers)
            if n not in HOP_BY_HOP and n not in named]


def _named_by_connection(headers) -> set[bytes]:
    return {token.strip().lower() for name, value in headers if name == b"connection"
            for token in value.split(b",")}


def _raw_headers(headers) -> list[tuple[bytes, bytes, bytes]]:
    """(name as sent, lower-case name, value): h11 keeps the sender's casing, and so do we."""
    return [(raw, raw.lower(), value) for raw, value in headers.raw_items()]
