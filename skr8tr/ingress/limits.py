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
from dataclasses import dataclass, field

__all__ = ["FD_RESERVE", "FDS_PER_CONNECTION", "LOG_EVERY_S", "AddressSlots", "LogThrottle",
           "address_key", "connection_cap"]

FD_RESERVE = 64
FDS_PER_CONNECTION = 3  # the client's, one to a replica in use, one idle in the pool
LOG_EVERY_S = 10.0
IPV6_GROUP_PREFIX = 64


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


@dataclass
class AddressSlots:
    """Open connections per key (:func:`address_key`), at most ``limit`` each."""

    limit: int
    open: dict[str, int] = field(default_factory=dict)

    def acquire(self, key: str) -> bool:
        """Take a slot for ``key``; False (nothing taken) when it holds ``limit`` already."""
        n = self.open.get(key, 0)
        if n >= self.limit:
            return False
        self.open[key] = n + 1
        return True

    def release(self, key: str) -> None:
        """Give back a slot taken by :meth:`acquire`; the key is forgotten at zero."""
        n = self.open.get(key, 0) - 1
        if n > 0:
            self.open[key] = n
        else:
            self.open.pop(key, None)


@dataclass
class LogThrottle:
    """At most one log line per reason every ``interval_s``, carrying the count since the
    last one, so that a flood of refusals cannot flood the log. :meth:`flush`, called
    now and then, tells the events kept quiet when none followed them."""

    interval_s: float = LOG_EVERY_S
    _last: dict[str, float] = field(default_factory=dict)
    _pending: dict[str, int] = field(default_factory=dict)

    def note(self, reason: str, now: float) -> int:
        """Count one event; returns how many events the line due now should report
        (this one and those kept quiet since the last line), or 0 when none is due."""
        pending = self._pending.get(reason, 0) + 1
        last = self._last.get(reason)
        if last is not None and now - last < self.interval_s:
            self._pending[reason] = pending
            return 0
        self._last[reason] = now
        self._pending[reason] = 0
        return pending

    def flush(self, now: float) -> dict[str, int]:
        """The reasons with events kept quiet whose line is due now, with their counts;
        each such reason's interval starts again."""
        due = {reason: n for reason, n in self._pending.items()
               if n and now - self._last[reason] >= self.interval_s}
        for reason in due:
            self._last[reason] = now
            self._pending[reason] = 0
        return due
