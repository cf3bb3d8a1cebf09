"""Reconnect delays: exponential, capped, jittered. Pure (randomness is injectable)."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

INITIAL_DELAY_S = 0.5
MAX_DELAY_S = 10.0
JITTER = 0.25


@dataclass
class Backoff:
    """Delays 0.5 s, 1 s, 2 s, ... up to ``cap_s``, each scaled by a random factor in
    ``[1 - jitter, 1 + jitter]`` and never above ``cap_s``.

    ``reset()`` starts over (the agent calls it when a session was welcomed).
    """

    initial_s: float = INITIAL_DELAY_S
    cap_s: float = MAX_DELAY_S
    jitter: float = JITTER
    rand: Callable[[], float] = field(default=random.random, repr=False)
    _attempt: int = field(default=0, repr=False)

    def next_delay(self) -> float:
        """The delay before the next attempt, in seconds; advances the sequence."""
        base = min(self.cap_s, self.initial_s * 2.0 ** self._attempt)
        # Past the cap the exponent no longer matters; bound it so it cannot overflow.
        self._attempt = min(self._attempt + 1, 64)
        factor = 1.0 + self.jitter * (2.0 * self.rand() - 1.0)
        return min(self.cap_s, base * factor)

    def reset(self) -> None:
        self._attempt = 0
