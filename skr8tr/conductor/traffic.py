"""The traffic book: what every ingress counted, summed per replica and per generation.

Ingresses report the counts of each interval (:class:`skr8tr.core.traffic.Report`);
:meth:`TrafficBook.add` adds them to a running sum per replica and per (app,
generation). Sums only grow, so a rollout's analysis takes one sum when a batch is
ready and judges the difference later (:meth:`Counts.minus`); several ingresses
simply add into the same sums.

Bounded by what the conductor knows: a row for a replica it does not hold is
skipped (and counted), so a report cannot make the book grow past the replica
table; rows of replicas that are gone are dropped once they outnumber the live
ones, their counts staying in their generation's sum; an app keeps the sums of
its last :data:`GENERATIONS_KEPT` generations.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import trio

from skr8tr.core.traffic import Counts, Report

GENERATIONS_KEPT = 16

# replica id -> (app, generation) of a replica the conductor holds; None otherwise.
Lookup = Callable[[str], "tuple[str, int] | None"]


class TrafficBook:
    def __init__(self, lookup: Lookup) -> None:
        self._lookup = lookup
        self._replicas: dict[str, Counts] = {}
        self._generations: dict[str, dict[int, Counts]] = {}
        self.rows_added = 0  # ever, for /metrics
        self.rows_unknown = 0  # rows naming a replica this conductor does not hold
        self._prune_at = 64
        self._added = trio.Event()  # set (and replaced) when a report adds a row

    def add(self, report: Report) -> int:
        """Add one report's rows; returns how many named a replica this conductor
        holds (the others are skipped)."""
        added = 0
        for rid, counts in report.replicas.items():
            owner = self._lookup(rid)
            if owner is None:
                self.rows_unknown += 1
                continue
            app, generation = owner
            self._replicas.setdefault(rid, Counts()).add(counts)
            gens = self._generations.setdefault(app, {})
            if generation not in gens and len(gens) >= GENERATIONS_KEPT:
                del gens[min(gens)]
            gens.setdefault(generation, Counts()).add(counts)
            added += 1
        self.rows_added += added
        if added:
            self._added.set()
            self._added = trio.Event()
        if len(self._replicas) > self._prune_at:
            self._prune()
        return added

    async def wait_added(self) -> None:
        """Return when the next report adds counts (a rollout judging a batch looks
        again: enough traffic may pass it at once)."""
        await self._added.wait()

    def of_replica(self, replica_id: str) -> Counts:
        """The running sum for one replica (a copy; zero if none was reported)."""
        counts = self._replicas.get(replica_id)
        return Counts() if counts is None else counts.copy()

    def sum_of(self, replica_ids: Iterable[str]) -> Counts:
        """The running sum over several replicas."""
        return Counts.total(self._replicas[rid] for rid in replica_ids
                            if rid in self._replicas)

    def of_generation(self, app: str, generation: int) -> Counts:
        """The running sum for every replica of one generation of ``app`` (a copy)."""
        counts = self._generations.get(app, {}).get(generation)
        return Counts() if counts is None else counts.copy()

    def generations(self, app: str) -> dict[int, Counts]:
        """Every generation of ``app`` with counts (copies), by generation."""
        return {g: c.copy() for g, c in sorted(self._generations.get(app, {}).items())}

    def forget_app(self, app: str) -> None:
        self._generations.pop(app, None)

    def _prune(self) -> None:
        """Drop the rows of replicas no longer held. Runs when the rows doubled since
        the last time, so its cost is spread over as many rows as it reads."""
        for rid in [rid for rid in self._replicas if self._lookup(rid) is None]:
            del self._replicas[rid]
        self._prune_at = max(64, 2 * len(self._replicas))
