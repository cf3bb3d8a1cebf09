"""What one client may cost the ingress: connection caps, the descriptor budget, quiet logs.

| limit (flag) | default | over it |
|---|---|---|
| client connections at once (``--max-connections``) | 1024, within budget | 503 |
| connections per address, IPv6 per /64 (``--max-connections-per-address``) | 256 | 503 |
| first request head, whole, from connect (``--header-timeout``) | 10 s | closed |
| later request head, whole, from its first byte (``--header-timeout``) | 10 s | 408 |
| keep-alive between requests (``--idle-timeout``) | 30 s | closed |

A 503 here says ``Connection: close`` and the connection is closed after it; a
first head that began but did not complete in time is answered 408 first.

The descriptor budget: every client connection may hold one connection to a
replica at a time, and the pool keeps at most as many idle ones as there are
client connections, so the ingress needs at most three descriptors per client
connection plus :data:`FD_RESERVE` for the rest (listeners, the conductor
link, the event loop, connections being refused). The client cap is lowered
until that fits under the soft ``RLIMIT_NOFILE``; the ingress raises the soft
limit to the hard one at start, so this bites only where the hard limit is low.
Then ``accept`` never fails with ``EMFILE``: a connection over the cap is
answered and closed instead.

IPv6 clients are counted per /64: one host is usually given a whole /64, and a
per-address count would let it open a connection from each of 2**64 addresses.

Pure: no trio, no sockets, no clock; callers pass the current time.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from skr8tr.core.throttle import LOG_EVERY_S, AddressSlots, LogThrottle

__all__ = ["FD_RESERVE", "FDS_PER_CONNECTION", "LOG_EVERY_S", "AddressSlots", "LogThrottle",
           "ProxyLimits", "address_key", "connection_cap"]

FD_RESERVE = 64
FDS_PER_CONNECTION = 3  # the client's, one to a replica in use, one idle in the pool
IPV6_GROUP_PREFIX = 64


@dataclass(frozen=True)
class ProxyLimits:
    """The proxy's limits (the table above) and its retries; the flags of ``skr8tr ingress``."""

    max_connections: int = 1024
    max_connections_per_address: int = 256  # IPv6: per /64
    idle_timeout_s: float = 30.0  # keep-alive: between requests
    header_timeout_s: float = 10.0  # first head from accept, later ones from their first byte
    body_timeout_s: float = 30.0  # each read of a request body, each write to a client
    upstream_timeout_s: float = 60.0  # response head, and each read of a response body
    retries: int = 2  # other replicas tried after a failure that allows it
    max_head_bytes: int = 32 * 1024


def address_key(ip: str) -> str:
    """The key a client's connections are counted under.

    An IPv4 address as is (also when it comes IPv4-mapped, ``::ffff:a.b.c.d``),
    an IPv6 address as its /64 network, anything unparseable (a test's memory
    stream says ``unknown``) as is."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])  # a zone id is not part of it
    except ValueError:
        return ip
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((addr, IPV6_GROUP_PREFIX), strict=False))
    return str(addr)


def connection_cap(requested: int, fd_soft_limit: int | None) -> int:
    """The client connections the ingress may serve at once: ``requested``, lowered to
    what the descriptor budget allows (module docstring); ``None`` means no limit.

    Never below 1: an ingress with almost no descriptors still serves one client."""
    if fd_soft_limit is None:
        return requested
    return max(1, min(requested, (fd_soft_limit - FD_RESERVE) // FDS_PER_CONNECTION))


