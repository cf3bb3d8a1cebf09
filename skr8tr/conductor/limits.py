"""What one client may cost the conductor, and the count of connections closed for it.

Every limit closes only the connection that broke it, says why (a WebSocket
close reason, an HTTP status), and is counted in ``/metrics`` as
``skr8tr_connections_closed_total{reason}``; everyone else keeps being served.

| limit | default | reason |
|---|---|---|
| message size (``/v1/*``) | 1 MiB | ``message_too_big`` (close 1009) |
| messages per second per WebSocket | 2000/s, burst 10000 | ``rate_limit`` (close 1008) |
| bytes per second per node session | 8 MiB/s, burst 16 MiB | not closed: reading pauses |
| connections per address (API, HTTP each) | 2048, <= half the total | ``too_many_connections`` |
| connections at once (API and HTTP together) | what descriptors allow | ``max_connections`` |
| TLS + WebSocket handshake | 10 s | ``handshake_timeout`` / ``bad_handshake`` |
| node ``hello`` after the challenge | 10 s | ``handshake_timeout`` |
| ``/v1/cli`` connection without a request | 300 s | ``idle_timeout`` (close 1000) |
| ``/v1/watch`` watcher silent (pings unanswered) | 60 s | ``ping_timeout`` (close 1011) |
| ``/v1/watch`` events queued for one watcher, unsent | 4 MiB | ``watch_too_slow`` (close 1008) |
| HTTP request head: size (431) | 16 KiB | ``http_header_too_large`` |
| HTTP request head: arrives whole within | 10 s | ``http_header_timeout`` |
| HTTP keep-alive between requests | 30 s | ``http_idle_timeout`` |
| HTTP body read / response write progress | 10 s | ``http_slow_client`` |
| ``/v1/ingress`` message size | 256 KiB | ``message_too_big`` (close 1009) |
| bytes per second per ingress session | 256 KiB/s, burst 512 KiB | not closed: reading pauses |
| ``/v1/ingress`` reports per session | 4/s, burst 8 | dropped; 8 strikes: ``rate_limit`` (1008) |
| ``/v1/ingress`` sessions at once | 16 | refused (``error`` NO_CAPACITY, close 1008) |
| ``/v1/ingress`` session silent | 3 x interval + 5 s (8 s) | ``idle_timeout`` (close 1000) |
| ingress ``hello`` after the challenge | 10 s | ``handshake_timeout`` |

The defaults are generous on purpose: a benchmark opens 1,000 node sessions
from one address and sends thousands of requests a second on one connection.
A rate limit per connection is about fairness, not about the conductor's
CPU: many connections together can still keep it busy (SECURITY.md).

The descriptor budget (:func:`connection_budget`): every connection holds one
descriptor, so the connections of both listeners together are kept at
:data:`FD_RESERVE` below the soft ``RLIMIT_NOFILE`` (raised to the hard limit
at start). The reserve covers what is not a connection: stdio, the event
loop, the listeners, the state file and the audit log with their temporary
files, and the connection being refused. The cap per address is kept at
half the total, so that one address cannot take every slot. A connection
over a cap is accepted and closed at once, so ``accept`` never meets
``EMFILE``; refusals are logged at most once per :data:`LOG_EVERY_S` per
reason (:class:`LogThrottle`).

Pure: no trio, no clock; callers pass the current (monotonic) time.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from skr8tr.core.throttle import LOG_EVERY_S, AddressSlots, LogThrottle

__all__ = ["Limits", "TokenBucket", "AddressSlots", "ConnectionGate", "ClosedCounter",
           "LogThrottle", "CLOSE_REASONS", "FD_RESERVE", "LOG_EVERY_S", "connection_budget",
           "fit_to_descriptors", "INGRESS_STRIKE_BURST", "INGRESS_STRIKES_PER_S"]

CLOSE_REASONS = (
    "too_many_connections", "max_connections", "handshake_timeout", "bad_handshake",
    "rate_limit", "message_too_big", "idle_timeout", "ping_timeout", "watch_too_slow",
    "revoked", "http_header_too_large", "http_header_timeout", "http_idle_timeout",
    "http_slow_client", "http_bad_request", "too_many_watchers", "byte_rate_limit",
)
MIN_NODE_BYTES_PER_S = 1024 * 1024  # core.node_protocol.MAX_NODE_MESSAGE_BYTES a second
FD_RESERVE = 64  # descriptors that are not connections (module docstring)
# An ingress's reports refused (bad) or dropped (over the rate): this many at once, then
# one a second, before its session is closed (Limits.ingress_reports_per_s).
INGRESS_STRIKE_BURST = 8
INGRESS_STRIKES_PER_S = 1.0


@dataclass(frozen=True)
class Limits:
    """The conductor's per-client limits (flags of ``skr8tr conductor``)."""

    max_connections_per_address: int = 2048
    #: Connections of both listeners together; None: as many as the descriptors allow.
    max_connections: int | None = None
    messages_per_s: float = 2000.0
    message_burst: int = 10000
    handshake_timeout_s: float = 10.0
    idle_timeout_s: float = 300.0
    #: A watcher is pinged every half of this and closed when nothing came from it for
    #: this long.
    watch_idle_timeout_s: float = 60.0
    #: Encoded events queued for one watcher and not yet written to its socket.
    watch_queue_bytes: int = 4 * 1024 * 1024
    #: /v1/watch streams open from one client address: each event is written to every
    #: watcher, so a crowd of them from one place costs the event loop per event.
    max_watchers_per_address: int = 64
    #: Bytes of /v1/cli messages per second from one client address (twice that saved
    #: up): every byte of a request is decoded before it can be refused.
    cli_bytes_per_s: int = 16 * 1024 * 1024
    #: Bytes of /v1/node messages per second from one node session (twice that saved
    #: up). Over it the conductor stops reading the session for as long as the excess
    #: takes to earn back (TCP backpressure), rather than closing it: a closed session
    #: would look like a lost node. A busy real node sends a few KiB/s (heartbeats and
    #: reports) and log replies of at most a few MiB now and then.
    node_bytes_per_s: int = 8 * 1024 * 1024
    http_max_header_bytes: int = 16 * 1024
    http_header_timeout_s: float = 10.0
    http_idle_timeout_s: float = 30.0
    http_io_timeout_s: float = 10.0
    #: Ingress sessions (/v1/ingress) at once (--max-ingresses): each reports every
    #: ``ingress_interval_s``, so this bounds the reports decoded per second.
    max_ingresses: int = 16
    #: How often an ingress reports (sent in its welcome); a session silent for
    #: 3 x this + 5 s is closed.
    ingress_interval_s: float = 1.0
    #: Reports per second per ingress session, and how many may come at once (a
    #: reconnect, a stalled event loop). Over it a report is dropped; after
    #: INGRESS_STRIKE_BURST more such strikes (refilled at INGRESS_STRIKES_PER_S) the
    #: session is closed.
    ingress_reports_per_s: float = 4.0
    ingress_report_burst: int = 8
    #: Bytes of /v1/ingress messages per second per session (twice that saved up); over
    #: it the conductor pauses reading the session (TCP holds the ingress back). A
    #: report of 256 KiB costs the conductor 10 to 20 ms to decode: this keeps a hostile
    #: ingress key at about one such report a second (BENCHMARKS.md). A real ingress
    #: sends a few KiB a second.
    ingress_bytes_per_s: int = 256 * 1024

    @property
    def ingress_idle_timeout_s(self) -> float:
        return 3 * self.ingress_interval_s + 5.0

    def __post_init__(self) -> None:
        for name in ("max_connections_per_address", "message_burst", "http_max_header_bytes",
                     "watch_queue_bytes", "max_watchers_per_address", "cli_bytes_per_s",
                     "node_bytes_per_s", "max_ingresses", "ingress_report_burst",
                     "ingress_bytes_per_s"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.node_bytes_per_s < MIN_NODE_BYTES_PER_S:
            # One message may pause its session for 1 s at most: longer, and the node's
            # pings would go unanswered for its 3-heartbeat silence limit.
            raise ValueError(f"node_bytes_per_s must be >= {MIN_NODE_BYTES_PER_S} (the "
                             f"largest node message), got {self.node_bytes_per_s!r}")
        if self.max_connections is not None and self.max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, got {self.max_connections!r}")
        for name in ("messages_per_s", "handshake_timeout_s", "idle_timeout_s",
                     "watch_idle_timeout_s", "http_header_timeout_s", "http_idle_timeout_s",
                     "http_io_timeout_s", "ingress_interval_s", "ingress_reports_per_s"):
            value = getattr(self, name)
            if not (value > 0 and not math.isnan(value)):
                raise ValueError(f"{name} must be > 0, got {value!r}")


def connection_budget(fd_soft_limit: int | None) -> int | None:
    """The connections the descriptors allow: the soft limit less :data:`FD_RESERVE`,
    never below 2 (one for each listener); None when there is no limit."""
    if fd_soft_limit is None:
        return None
    return max(2, fd_soft_limit - FD_RESERVE)


def fit_to_descriptors(limits: Limits, fd_soft_limit: int | None) -> tuple[Limits, list[str]]:
    """*limits* with ``max_connections`` set and both connection caps lowered to fit
    the descriptor budget (module docstring), and one line for each value lowered."""
    budget = connection_budget(fd_soft_limit)
    notes = []
    total = limits.max_connections
    if total is None:
        total = budget if budget is not None else 65536
    elif budget is not None and total > budget:
        notes.append(f"--max-connections lowered from {total} to {budget}: the open-file "
                     f"limit is {fd_soft_limit} and {FD_RESERVE} descriptors are kept for "
                     "files and the listeners")
        total = budget
    per_address = limits.max_connections_per_address
    share = max(1, total // 2)
    if per_address > share:
        notes.append(f"--max-connections-per-address lowered from {per_address} to {share}: "
                     f"half of the {total} connections the conductor serves at once, so "
                     "that one address cannot take them all")
        per_address = share
    fitted = dataclasses.replace(limits, max_connections=total,
                                 max_connections_per_address=per_address)
    return fitted, notes


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up; one token per message (or
    one per byte, with *cost*)."""

    __slots__ = ("rate", "burst", "_tokens", "_last")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = float(rate)
        self.burst = float(burst)
        self._tokens = float(burst)
        self._last = now

    def take(self, now: float, cost: float = 1.0) -> bool:
        """Spend *cost* tokens if there are that many; False means the sender is over the
        limit (and nothing is spent)."""
        self._refill(now)
        if self._tokens >= cost:
            self._tokens -= cost
            return True
        return False

    def charge(self, now: float, cost: float) -> float:
        """Spend *cost* tokens even if there are not that many (a debt), and return the
        seconds to wait until the debt is paid back (0.0 when there was no debt): for a
        sender that is slowed down, not refused. The debt is at most one *cost*."""
        self._refill(now)
        self._tokens -= cost
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate

    def full(self, now: float) -> bool:
        """Has it saved up all it can (so forgetting it loses nothing)?"""
        self._refill(now)
        return self._tokens >= self.burst

    def _refill(self, now: float) -> None:
        if now > self._last:
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now


@dataclass
class ConnectionGate:
    """Admission of a new connection: at most ``limit`` open on all listeners together,
    and at most ``slots.limit`` per client address on the listener that owns *slots*."""

    limit: int
    open: int = 0

    def admit(self, slots: AddressSlots, address: str) -> str | None:
        """Take a slot for *address*; None if it was taken, else the reason it was not
        (``max_connections`` or ``too_many_connections``), and nothing is taken."""
        if self.open >= self.limit:
            return "max_connections"
        if not slots.acquire(address):
            return "too_many_connections"
        self.open += 1
        return None

    def release(self, slots: AddressSlots, address: str) -> None:
        """Give back what :meth:`admit` took."""
        slots.release(address)
        self.open = max(0, self.open - 1)


@dataclass
class ClosedCounter:
    """Connections closed by a limit, by reason (exported by /metrics)."""

    by_reason: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CLOSE_REASONS, 0))

    def count(self, reason: str) -> None:
        self.by_reason[reason] = self.by_reason.get(reason, 0) + 1
