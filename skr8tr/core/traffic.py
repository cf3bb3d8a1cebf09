"""What users saw of each replica, as the ingresses count it (DESIGN.md §11). Pure.

An ingress counts, per replica it routed to: the requests (every attempt sent to
that replica, including those that could not connect and were retried on
another one), the 5xx answers, the failures (no connection, or the connection
failed before a whole response head came back) and the latency of every answer
in a fixed histogram (:data:`BOUNDS_MS`; the time from the attempt's start to
the response head). It reports the counts since its last report to the
conductor (:class:`Report`); the conductor adds them up per replica and per
generation (:class:`Counts` is a sum that can be added and subtracted), and a
rollout's analysis judges a batch on the difference between two sums.

The histogram has 10 buckets per decade from 0.1 ms to 100 s, on the round
numbers people pick for a limit (100ms, 200ms, 250ms, 500ms, 1s, ...), so a
``max-p99`` on one of them is judged exactly; the p99 is interpolated inside
its bucket, as Prometheus' ``histogram_quantile`` does.

:class:`Report` is the ``/v1/ingress`` message of one interval, with every field
bounded (:func:`decode_report`): the hostile-input rules of the node protocol
apply to ingresses too.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "BOUNDS_MS",
    "BUCKETS",
    "MAX_COUNT",
    "MAX_REPORT_REPLICAS",
    "Counts",
    "Report",
    "ReportError",
    "bucket_of",
    "decode_report",
    "format_rate",
    "format_ms",
]

# Upper bounds (ms) of the latency buckets: 0.1 ms .. 100 s, ten per decade; one more
# bucket holds everything slower.
_STEPS = (1.0, 1.2, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0)
BOUNDS_MS: tuple[float, ...] = tuple(round(step * 10.0 ** exp, 6)
                                     for exp in range(-1, 5) for step in _STEPS) + (100000.0,)
BUCKETS = len(BOUNDS_MS) + 1  # the last: slower than 100 s

MAX_REPORT_REPLICAS = 4096  # replicas in one report
MAX_COUNT = 10**9  # any one count in one report (a second of traffic is far below)


def bucket_of(ms: float) -> int:
    """The bucket of a latency of ``ms`` milliseconds: the first bound >= it."""
    lo, hi = 0, len(BOUNDS_MS)
    while lo < hi:
        mid = (lo + hi) // 2
        if BOUNDS_MS[mid] < ms:
            lo = mid + 1
        else:
            hi = mid
    return lo


@dataclass
class Counts:
    """Requests routed to one replica (or a sum over several), and what came of them.

    ``requests``: attempts sent; ``errors``: 5xx answers; ``failed``: attempts that got
    no response head (refused, reset, timed out); ``latency``: answers per bucket
    (sparse: bucket index -> count). ``errors + failed`` is what ``max-error-rate``
    judges; the answers in ``latency`` are ``requests - failed``.
    """

    requests: int = 0
    errors: int = 0
    failed: int = 0
    latency: dict[int, int] = field(default_factory=dict)

    def record(self, status: int | None, ms: float | None) -> None:
        """One attempt: ``status`` None when it got no response head."""
        self.requests += 1
        if status is None:
            self.failed += 1
            return
        if status >= 500:
            self.errors += 1
        if ms is not None:
            b = bucket_of(ms)
            self.latency[b] = self.latency.get(b, 0) + 1

    def add(self, other: Counts) -> None:
        self.requests += other.requests
        self.errors += other.errors
        self.failed += other.failed
        for b, n in other.latency.items():
            self.latency[b] = self.latency.get(b, 0) + n

    def minus(self, earlier: Counts) -> Counts:
        """What was added since ``earlier`` (a sum taken before this one)."""
        latency = {b: n - earlier.latency.get(b, 0) for b, n in self.latency.items()}
        return Counts(self.requests - earlier.requests, self.errors - earlier.errors,
                      self.failed - earlier.failed, {b: n for b, n in latency.items() if n})

    def copy(self) -> Counts:
        return Counts(self.requests, self.errors, self.failed, dict(self.latency))

    @classmethod
    def total(cls, parts: Iterable[Counts]) -> Counts:
        out = cls()
        for part in parts:
            out.add(part)
        return out

    @property
    def bad(self) -> int:
        """Requests users saw fail: 5xx answers and attempts with no answer."""
        return self.errors + self.failed

    @property
    def error_rate(self) -> float | None:
        """``bad / requests``; None without requests."""
        return self.bad / self.requests if self.requests else None

    def quantile_ms(self, q: float) -> float | None:
        """The ``q`` quantile of the answers' latency, interpolated inside its bucket;
        ``math.inf`` when it falls in the last (over 100 s); None without answers."""
        answers = sum(self.latency.values())
        if not answers:
            return None
        rank = max(1, math.ceil(q * answers))
        seen = 0
        for b in sorted(self.latency):
            n = self.latency[b]
            if seen + n >= rank:
                if b >= len(BOUNDS_MS):
                    return math.inf
                lower = BOUNDS_MS[b - 1] if b else 0.0
                return lower + (BOUNDS_MS[b] - lower) * (rank - seen) / n
            seen += n
        return math.inf  # not reached: the ranks add up

    @property
    def p99_ms(self) -> float | None:
        return self.quantile_ms(0.99)

    def fields(self) -> dict[str, Any]:
        """As a report row (without the replica)."""
        return {"requests": self.requests, "errors": self.errors, "failed": self.failed,
                "latency": [[b, n] for b, n in sorted(self.latency.items())]}

    def summary(self) -> dict[str, Any]:
        """The figures people read (status, --json): counts, error rate, p99."""
        rate, p99 = self.error_rate, self.p99_ms
        return {"requests": self.requests, "errors": self.errors, "failed": self.failed,
                "error_rate": None if rate is None else round(rate, 6),
                "p99_ms": None if p99 is None or math.isinf(p99) else round(p99, 3)}


def format_rate(rate: float) -> str:
    """``0.125`` -> ``12.5%``; ``0.01`` -> ``1%``."""
    text = f"{rate * 100:.2f}".rstrip("0").rstrip(".")
    return f"{text}%"


def format_ms(ms: float) -> str:
    """A latency as people write it: ``812ms``, ``1.5s``, ``>100s``."""
    if math.isinf(ms):
        return ">100s"
    if ms >= 1000:
        return f"{ms / 1000:.3g}s"
    return f"{ms:.3g}ms" if ms < 10 else f"{ms:.0f}ms"


class ReportError(ValueError):
    """A report that breaks the rules: the message says which and where."""


@dataclass(frozen=True)
class Report:
    """One ingress's counts of one interval (``/v1/ingress``):
    ``{"type":"report","seq":N,"replicas":[{"replica":ID,"requests":N,"errors":N,
    "failed":N,"latency":[[BUCKET,N],...]},...]}``; ``seq`` counts up from 1 per
    connection."""

    seq: int
    replicas: Mapping[str, Counts]

    def fields(self) -> dict[str, Any]:
        return {"type": "report", "seq": self.seq,
                "replicas": [{"replica": rid, **c.fields()}
                             for rid, c in sorted(self.replicas.items())]}


def _count(row: Mapping[str, Any], key: str, where: str) -> int:
    value = row.get(key)
    if type(value) is not int or not 0 <= value <= MAX_COUNT:
        raise ReportError(f"{where}: {key} must be a whole number 0..{MAX_COUNT}")
    return value


def decode_report(msg: Mapping[str, Any], *, max_id_chars: int = 128) -> Report:
    """A report message (already parsed JSON), checked: bounded counts and list sizes,
    bucket indexes in range, each replica once, ``errors + failed <= requests`` and
    answers in ``latency`` <= ``requests - failed``. ReportError says what is wrong."""
    if set(msg) != {"type", "seq", "replicas"} or msg["type"] != "report":
        raise ReportError('a report is {"type":"report","seq":N,"replicas":[...]}')
    seq = msg["seq"]
    if type(seq) is not int or not 1 <= seq <= 2**53:
        raise ReportError("seq must be a whole number 1..2^53")
    rows = msg["replicas"]
    if not isinstance(rows, list) or len(rows) > MAX_REPORT_REPLICAS:
        raise ReportError(f"replicas must be a list of at most {MAX_REPORT_REPLICAS}")
    out: dict[str, Counts] = {}
    for i, row in enumerate(rows):
        where = f"replicas[{i}]"
        if not isinstance(row, dict) or set(row) != {"replica", "requests", "errors",
                                                     "failed", "latency"}:
            raise ReportError(f"{where}: must have exactly replica, requests, errors, "
                              "failed, latency")
        rid = row["replica"]
        if not isinstance(rid, str) or not 0 < len(rid) <= max_id_chars:
            raise ReportError(f"{where}: replica must be an id of 1..{max_id_chars} "
                              "characters")
        if rid in out:
            raise ReportError(f"{where}: replica {rid!r} is listed twice")
        requests = _count(row, "requests", where)
        errors = _count(row, "errors", where)
        failed = _count(row, "failed", where)
        if errors + failed > requests:
            raise ReportError(f"{where}: errors + failed exceed requests")
        latency = row["latency"]
        if not isinstance(latency, list) or len(latency) > BUCKETS:
            raise ReportError(f"{where}: latency must be a list of at most {BUCKETS} "
                              "[bucket, count] pairs")
        buckets: dict[int, int] = {}
        answers = 0
        for pair in latency:
            if (not isinstance(pair, list) or len(pair) != 2 or type(pair[0]) is not int
                    or not 0 <= pair[0] < BUCKETS or type(pair[1]) is not int
                    or not 0 < pair[1] <= MAX_COUNT or pair[0] in buckets):
                raise ReportError(f"{where}: latency pairs are [bucket 0..{BUCKETS - 1}, "
                                  f"count 1..{MAX_COUNT}], each bucket once")
            buckets[pair[0]] = pair[1]
            answers += pair[1]
        if answers > requests - failed:
            raise ReportError(f"{where}: more answers in latency than requests - failed")
        out[rid] = Counts(requests, errors, failed, buckets)
    return Report(seq, out)
