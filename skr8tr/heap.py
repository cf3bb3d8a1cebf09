"""Giving the C heap's free memory back to the kernel (glibc ``malloc_trim``).

CPython's small objects live in arenas that it frees, but glibc keeps what
was freed inside the process: a conductor that served thousands of watchers
for a minute kept ~800 MB of RSS after they left (#13.5), and a node agent
keeps its start-up's garbage. Both daemons call :func:`release_free_heap`
after such peaks. Shared by ``node/`` and ``conductor/`` (which never import
each other); no trio here.
"""

from __future__ import annotations

__all__ = ["release_free_heap", "TrimAfterPeaks"]


def release_free_heap() -> bool:
    """Hand the C heap's free pages back to the kernel; False where there is no glibc
    (musl, macOS): nothing happens there. Costs a few ms on a large heap."""
    import ctypes  # here: the node agent's start-up and footprint do without it

    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return False
    trim(0)
    return True


class TrimAfterPeaks:
    """Decides when a load that came and went is worth a trim: once the count of open
    connections has fallen by *min_drop* or more from the peak since the last trim."""

    def __init__(self, min_drop: int = 256) -> None:
        self.min_drop = min_drop
        self._peak = 0

    def due(self, open_now: int) -> bool:
        """Feed the current count; True when a trim is due (the peak then restarts)."""
        self._peak = max(self._peak, open_now)
        if self._peak - open_now >= self.min_drop:
            self._peak = open_now
            return True
        return False
