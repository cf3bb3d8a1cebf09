"""What one client may cost the conductor, and the count of connections closed for it.

Every limit closes only the connection that broke it, says why (a WebSocket
close reason, an HTTP status), and is counted in ``/metrics`` as
``skr8tr_connections_closed_total{reason}``; everyone else keeps being served.

| limit | default | reason |
|---|---|---|
| message size (``/v1/*``) | 1 MiB | ``message_too_big`` (close 1009) |
| messages per second per WebSocket | 2000/s, burst 10000 | ``rate_limit`` (close 1008) |
| connections per client address (API and HTTP, each) | 2048 | ``too_many_connections`` |
| TLS + WebSocket handshake | 10 s | ``handshake_timeout`` / ``bad_handshake`` |
| node ``hello`` after the challenge | 10 s | ``handshake_timeout`` |
| ``/v1/cli`` connection without a request | 300 s | ``idle_timeout`` (close 1000) |
| HTTP request head: size (431) | 16 KiB | ``http_header_too_large`` |
| HTTP request head: arrives whole within | 10 s | ``http_header_timeout`` |
| HTTP keep-alive between requests | 30 s | ``http_idle_timeout`` |
| HTTP body read / response write progress | 10 s | ``http_slow_client`` |

The defaults are generous on purpose: a benchmark opens 1,000 node sessions
from one address and sends thousands of requests a second on one connection.
A rate limit per connection is about fairness, not about the conductor's
CPU: many connections together can still keep it busy (SECURITY.md).

Pure: no trio, no clock; callers pass the current (monotonic) time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

__all__ = ["Limits", "TokenBucket", "AddressSlots", "ClosedCounter", "CLOSE_REASONS"]

CLOSE_REASONS = (
    "too_many_connections", "handshake_timeout", "bad_handshake", "rate_limit",
    "message_too_big", "idle_timeout", "revoked", "http_header_too_large",
    "http_header_timeout", "http_idle_timeout", "http_slow_client", "http_bad_request",
)


@dataclass(frozen=True)
class Limits:
    """The conductor's per-client limits (flags of ``skr8tr conductor``)."""

    max_connections_per_address: int = 2048
    messages_per_s: float = 2000.0
    message_burst: int = 10000
    handshake_timeout_s: float = 10.0
    idle_timeout_s: float = 300.0
    http_max_header_bytes: int = 16 * 1024
    http_header_timeout_s: float = 10.0
    http_idle_timeout_s: float = 30.0
    http_io_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        for name in ("max_connections_per_address", "message_burst", "http_max_header_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("messages_per_s", "handshake_timeout_s", "idle_timeout_s",
                     "http_header_timeout_s", "http_idle_timeout_s", "http_io_timeout_s"):
            value = getattr(self, name)
            if not (value > 0 and not math.isnan(value)):
                raise ValueError(f"{name} must be > 0, got {value!r}")


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up; one token per message."""

    __slots__ = ("rate", "burst", "_tokens", "_last")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = float(rate)
        self.burst = float(burst)
        self._tokens = float(burst)
        self._last = now

    def take(self, now: float) -> bool:
        """Spend one token if there is one; False means the sender is over the limit."""
        if now > self._last:
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


@dataclass
class AddressSlots:
    """Open connections per client address, at most ``limit`` each."""

    limit: int
    open: dict[str, int] = field(default_factory=dict)

    def acquire(self, address: str) -> bool:
        n = self.open.get(address, 0)
        if n >= self.limit:
            return False
        self.open[address] = n + 1
        return True

    def release(self, address: str) -> None:
        n = self.open.get(address, 0) - 1
        if n > 0:
            self.open[address] = n
        else:
            self.open.pop(address, None)


@dataclass
class ClosedCounter:
    """Connections closed by a limit, by reason (exported by /metrics)."""

    by_reason: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CLOSE_REASONS, 0))

    def count(self, reason: str) -> None:
        self.by_reason[reason] = self.by_reason.get(reason, 0) + 1
