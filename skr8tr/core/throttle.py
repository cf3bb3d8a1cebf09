"""Pure bookkeeping that both daemons use to bound what one client costs them.

:class:`AddressSlots` counts open connections per client key, at most
``limit`` each; :class:`LogThrottle` lets a flood of refusals through to the
log as one line per reason every :data:`LOG_EVERY_S`, with the count. The
conductor (:mod:`skr8tr.conductor.limits`) and the ingress
(:mod:`skr8tr.ingress.limits`) build their limits on these. Pure: the time
comes in as an argument.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["LOG_EVERY_S", "AddressSlots", "LogThrottle"]

LOG_EVERY_S = 10.0


@dataclass
class AddressSlots:
    """Open connections per client key (an address, or what a daemon groups addresses
    by), at most ``limit`` each."""

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
