"""What users saw of each replica through this ingress, counted per interval (DESIGN.md §11).

The proxy tells a :class:`TrafficCounter` about every attempt it sends to a
replica, and the reporter (:mod:`skr8tr.ingress.reporter`) takes the counts of
the interval every ``interval_s`` and sends them to the conductor, where a
rollout's analysis judges a batch's new replicas on them. The rules, per attempt:

- a connection to the replica could not be opened: a request and a failure of
  THAT replica, even when the request is then retried on another one (the
  retry counts for the replica it goes to);
- the replica failed before a whole response head came back (reset, closed,
  timed out): a request and a failure;
- a response head came back: a request with that status (5xx: an error) and
  the latency from the attempt's start (before connecting) to the head.

The ingress's own answers (404 no route, 503 no ready replica, 501 CONNECT) are
nobody's: no replica is counted for them. Nor is an attempt the ingress itself
could not forward (a request h11 refuses to write), nor one whose client stopped
sending its body or went away before the head came: they say nothing of the replica.

Bounded: only replicas the proxy routed to (replica ids from the conductor's
watch stream) are counted, at most ``max_replicas`` in one interval and ids of at
most ``max_id_chars`` (what a report may carry, :mod:`skr8tr.core.traffic`); an
attempt beyond that is not counted, only tallied in ``skipped``. A replica that
left rotation during the interval is still reported: its last answers (a bad
version's failures above all) are what the analysis needs.

Cost: about 0.2 µs an answer and 0.1 µs a failure on the machine of
BENCHMARKS.md (a dict lookup, a few additions, a C binary search over the 61
latency bounds), plus two clock reads in the proxy (0.2 µs each), against the
~700 µs a request costs the ingress; pure and
synchronous (the caller passes the times), so the proxy's tests drive it through
real sockets and its own through plain calls.
"""

from __future__ import annotations

from bisect import bisect_left

from skr8tr.core.traffic import BOUNDS_MS, MAX_REPORT_REPLICAS, Counts

__all__ = ["MAX_ID_CHARS", "TrafficCounter"]

MAX_ID_CHARS = 128  # core.traffic.decode_report's default: a longer id spoils the report


class TrafficCounter:
    """The counts of the current interval per replica id; :meth:`take` starts the next."""

    __slots__ = ("_now", "max_id_chars", "max_replicas", "skipped")

    def __init__(self, *, max_replicas: int = MAX_REPORT_REPLICAS,
                 max_id_chars: int = MAX_ID_CHARS) -> None:
        self._now: dict[str, Counts] = {}
        self.max_replicas = max_replicas
        self.max_id_chars = max_id_chars
        self.skipped = 0  # attempts not counted: over max_replicas, or an id too long

    def _of(self, replica: str) -> Counts | None:
        counts = self._now.get(replica)
        if counts is None:
            if len(self._now) >= self.max_replicas or len(replica) > self.max_id_chars:
                self.skipped += 1
                return None
            counts = self._now[replica] = Counts()
        return counts

    def answered(self, replica: str, status: int, started: float, now: float) -> None:
        """A response head with *status* from *replica*; the attempt began at *started*
        (seconds, the same clock as *now*)."""
        counts = self._now.get(replica) or self._of(replica)
        if counts is None:
            return
        # Counts.record inlined, with bisect for core.traffic.bucket_of (the same bucket:
        # the first bound >= the latency): this runs for every request.
        counts.requests += 1
        if status >= 500:
            counts.errors += 1
        bucket = bisect_left(BOUNDS_MS, (now - started) * 1000.0)
        latency = counts.latency
        latency[bucket] = latency.get(bucket, 0) + 1

    def failed(self, replica: str) -> None:
        """An attempt on *replica* that got no response head (no connection, or the
        connection failed or timed out before the head)."""
        counts = self._of(replica)
        if counts is not None:
            counts.requests += 1
            counts.failed += 1

    def take(self) -> dict[str, Counts]:
        """The counts since the last take (only replicas with requests), and start over."""
        taken, self._now = self._now, {}
        return taken

    @property
    def pending_requests(self) -> int:
        """Requests counted in the current interval so far."""
        return sum(c.requests for c in self._now.values())
