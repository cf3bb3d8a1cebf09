"""A rollout as the conductor keeps it: :class:`RolloutRecord`, what ``rollout status``
shows of it, and the live figures of a batch judged on its traffic (DESIGN.md §11).

The runner (:mod:`skr8tr.conductor.rollout`) fills the record as it drives; the
figures are read from the cluster's traffic book when someone asks (status, the
status page, /metrics), so they are as fresh as the last ingress report and cost
nothing between asks. An analysis that ended keeps the figures it was judged on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import trio

from skr8tr.conductor import metrics
from skr8tr.conductor.traffic import TrafficBook
from skr8tr.core.manifest import Analysis
from skr8tr.core.traffic import Counts

__all__ = ["LiveAnalysis", "RolloutRecord", "analysis_gauges"]


@dataclass
class LiveAnalysis:
    """The analysis of one batch: under way (``verdict`` "watching") or how it ended."""

    generation: int
    replicas: tuple[str, ...]
    since: float  # on the conductor's clock: when all of the batch was ready
    baseline: Counts  # the batch's running traffic sum then
    policy: Analysis
    verdict: str = "watching"  # then "passed", "promoted" or "failed"
    seen: Counts | None = None  # once ended: what it was judged on
    elapsed_s: float = 0.0  # once ended: how long it watched

    def figures(self, book: TrafficBook | None, now: float) -> tuple[Counts, float]:
        """What users saw of the batch since the analysis started, and for how long."""
        if self.seen is not None:
            return self.seen, self.elapsed_s
        if book is None:
            return Counts(), max(0.0, now - self.since)
        return book.sum_of(self.replicas).minus(self.baseline), max(0.0, now - self.since)

    def status(self, book: TrafficBook | None, now: float) -> dict[str, Any]:
        seen, elapsed = self.figures(book, now)
        a = self.policy
        return {"generation": self.generation, "replicas": list(self.replicas),
                "window_s": a.window_s, "elapsed_s": round(elapsed, 3), **seen.summary(),
                "max_error_rate": a.max_error_rate,
                "max_p99_ms": a.max_p99_ms, "min_requests": a.min_requests,
                "verdict": self.verdict}


@dataclass
class RolloutRecord:
    app: str
    from_generation: int
    to_generation: int
    total: int
    started_wall: float
    started_clock: float
    state: str = "rolling"
    replaced: int = 0
    phase: str = "starting"
    phase_since: float = 0.0
    reason: str = ""  # why it failed, kept after the final message is set
    # The count once complete; None: the manifest's `replicas`. Stored with `kind`, so a
    # restarted conductor ends an interrupted restart as the restart it was.
    desired: int | None = None
    kind: str = "rollout"  # what started it: "rollout", "undo" or "restart"
    probe: str | None = None  # while waiting for readiness: the first waited-for's last probe
    finished_wall: float | None = None
    launched: set[str] = field(default_factory=set)
    draining: set[str] = field(default_factory=set)  # drained, not yet told to stop
    done: trio.Event = field(default_factory=trio.Event)
    cancel_scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    # Traffic (§11): the book the figures are read from, each generation's running sum
    # when the rollout started, the last batch's analysis; frozen figures once ended.
    book: TrafficBook | None = None
    traffic_start: dict[int, Counts] = field(default_factory=dict)
    traffic_final: list[dict[str, Any]] | None = None
    analysis: LiveAnalysis | None = None
    # Asked by commands, applied by the runner at its next decision (`poke` wakes it).
    paused: bool = False
    promote_asked: bool = False
    poked: trio.Event = field(default_factory=trio.Event)

    def poke(self) -> None:
        """Wake the runner's wait: a command changed what it should do."""
        self.poked.set()
        self.poked = trio.Event()

    def base_status(self, now: float) -> dict[str, Any]:
        """The fields of DESIGN.md §5 (each key is part of the contract)."""
        if self.state == "rolling":
            probe = f" (last probe: {self.probe})" if self.probe else ""
            message = f"{self.phase}{probe} · {now - self.phase_since:.1f} s"
        else:
            message = self.phase
        return {"app": self.app, "state": self.state, "from_generation": self.from_generation,
                "to_generation": self.to_generation, "replaced": self.replaced,
                "total": self.total, "message": message}

    def status(self, now: float) -> dict[str, Any]:
        """What ``skr8tr rollout status APP --json`` prints: §5's fields and §11's
        ``paused``, ``analysis`` and ``traffic``."""
        return {**self.base_status(now), "paused": self.paused and self.state == "rolling",
                "analysis": None if self.analysis is None
                else self.analysis.status(self.book, now),
                "traffic": self.traffic_since_start()}

    def traffic_since_start(self) -> list[dict[str, Any]]:
        """Per generation of the app, what users saw since the rollout started: its two
        generations always, any other one that served since."""
        if self.traffic_final is not None:
            return self.traffic_final
        if self.book is None:
            return []
        now = self.book.generations(self.app)
        rows = []
        for g in sorted({self.from_generation, self.to_generation} | set(now)):
            seen = now.get(g, Counts()).minus(self.traffic_start.get(g, Counts()))
            if g in (self.from_generation, self.to_generation) or seen.requests:
                rows.append({"generation": g, **seen.summary()})
        return rows

    def freeze_traffic(self) -> None:
        """At the end: the figures stop growing with traffic that came after."""
        self.traffic_final = self.traffic_since_start()

    def stored(self, now: float) -> dict[str, Any]:
        """What the store keeps of it: its status, its kind and the count it was started
        for (state_file.py checks both). Traffic figures are not kept."""
        return {**self.base_status(now), "kind": self.kind,
                **({} if self.desired is None else {"desired": self.desired})}


def analysis_gauges(records: dict[str, RolloutRecord], now: float) -> list[metrics.Gauge]:
    """/metrics: the live error rate and p99 of every analysis under way."""
    rate = metrics.Gauge("skr8tr_rollout_analysis_error_rate",
                         "Error rate (5xx + failed / requests) of the batch a rollout is "
                         "judging, since its analysis started.", ("app", "generation"))
    p99 = metrics.Gauge("skr8tr_rollout_analysis_p99_seconds",
                        "p99 latency of the batch a rollout is judging, since its analysis "
                        "started.", ("app", "generation"))
    for name, record in sorted(records.items()):
        a = record.analysis
        if a is None or a.verdict != "watching":
            continue
        seen, _ = a.figures(record.book, now)
        labels = {"app": name, "generation": str(a.generation)}
        if seen.error_rate is not None:
            rate.set(seen.error_rate, **labels)
        if seen.p99_ms is not None and not math.isinf(seen.p99_ms):
            p99.set(seen.p99_ms / 1000, **labels)
    return [rate, p99]
