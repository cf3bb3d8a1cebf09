"""Counters, gauges and histograms, rendered as Prometheus text format 0.0.4.

Deliberately tiny: the conductor exports a dozen series and needs no client
library for that. Each metric keeps its samples keyed by label values and
renders itself; :func:`render` joins them. Pure: no trio, no clock (callers
pass in the durations they measured).
"""

from __future__ import annotations

import abc
import math
from collections.abc import Iterable, Mapping, Sequence

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Command latency buckets, in seconds: from a local `ping` (~1 ms) up to
# `rollout abort`, which may wait ABORT_WAIT_S (45 s) for the cleanup.
LATENCY_BUCKETS_S: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)

LabelValues = tuple[str, ...]


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    if float(value).is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


def _labels(names: Sequence[str], values: Sequence[str],
            extra: Mapping[str, str] | None = None) -> str:
    pairs = list(zip(names, values, strict=True)) + list((extra or {}).items())
    if not pairs:
        return ""
    return "{" + ",".join(f'{k}="{_escape_label(str(v))}"' for k, v in pairs) + "}"


class _Metric(abc.ABC):
    kind = "untyped"

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = ()) -> None:
        self.name = name
        self.help = help_text
        self.label_names = tuple(labels)

    def _key(self, labels: Mapping[str, str]) -> LabelValues:
        if set(labels) != set(self.label_names):
            raise ValueError(f"{self.name} takes labels {self.label_names}, got {sorted(labels)}")
        return tuple(str(labels[n]) for n in self.label_names)

    def _header(self) -> list[str]:
        return [f"# HELP {self.name} {_escape_help(self.help)}", f"# TYPE {self.name} {self.kind}"]

    @abc.abstractmethod
    def render(self) -> list[str]:
        """The metric's lines in Prometheus text format 0.0.4."""


class Gauge(_Metric):
    """A value that goes up and down; set from the current state at each scrape."""

    kind = "gauge"

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = ()) -> None:
        super().__init__(name, help_text, labels)
        self.values: dict[LabelValues, float] = {}

    def set(self, value: float, **labels: str) -> None:
        self.values[self._key(labels)] = float(value)

    def render(self) -> list[str]:
        return self._header() + [
            f"{self.name}{_labels(self.label_names, key)} {_number(v)}"
            for key, v in sorted(self.values.items())
        ]


class Counter(_Metric):
    """A count that only goes up. ``preset`` label values are shown at 0 from the start,
    so that ``rate()`` sees the first increment."""

    kind = "counter"

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = (),
                 preset: Iterable[Mapping[str, str]] = ()) -> None:
        if not name.endswith("_total"):
            raise ValueError(f"counter {name} must end in _total")
        super().__init__(name, help_text, labels)
        self.values: dict[LabelValues, float] = {self._key(p): 0.0 for p in preset}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        if amount < 0:
            raise ValueError(f"{self.name} can only go up, got {amount}")
        key = self._key(labels)
        self.values[key] = self.values.get(key, 0.0) + amount

    def set_total(self, total: float, **labels: str) -> None:
        """Mirror a count kept elsewhere (which itself only goes up)."""
        self.values[self._key(labels)] = float(total)

    def value(self, **labels: str) -> float:
        return self.values.get(self._key(labels), 0.0)

    def render(self) -> list[str]:
        return self._header() + [
            f"{self.name}{_labels(self.label_names, key)} {_number(v)}"
            for key, v in sorted(self.values.items())
        ]


class Histogram(_Metric):
    """Observations in cumulative ``le`` buckets, with ``_sum`` and ``_count``."""

    kind = "histogram"

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = (),
                 buckets: Sequence[float] = LATENCY_BUCKETS_S) -> None:
        super().__init__(name, help_text, labels)
        if "le" in self.label_names:
            raise ValueError("a histogram cannot have a label named le")
        self.buckets = tuple(sorted(buckets))
        # label values -> (per-bucket counts, not cumulative; sum; count)
        self.series: dict[LabelValues, tuple[list[int], list[float]]] = {}

    def observe(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        counts, totals = self.series.setdefault(key, ([0] * len(self.buckets), [0.0, 0.0]))
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                counts[i] += 1
                break
        totals[0] += value
        totals[1] += 1

    def count(self, **labels: str) -> int:
        series = self.series.get(self._key(labels))
        return 0 if series is None else int(series[1][1])

    def render(self) -> list[str]:
        lines = self._header()
        for key, (counts, (total, n)) in sorted(self.series.items()):
            running = 0
            for bound, c in zip(self.buckets, counts, strict=True):
                running += c
                le = _labels(self.label_names, key, {"le": repr(float(bound))})
                lines.append(f"{self.name}_bucket{le} {running}")
            inf = _labels(self.label_names, key, {"le": "+Inf"})
            lines.append(f"{self.name}_bucket{inf} {int(n)}")
            lines.append(f"{self.name}_sum{_labels(self.label_names, key)} {_number(total)}")
            lines.append(f"{self.name}_count{_labels(self.label_names, key)} {int(n)}")
        return lines


def render(metrics: Iterable[_Metric]) -> str:
    """The exposition text of ``metrics``, in the order given, ending in a newline."""
    lines: list[str] = []
    for metric in metrics:
        lines.extend(metric.render())
    return "\n".join(lines) + "\n"
