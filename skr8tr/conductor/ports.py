"""Port claims: which replica holds which port on which host, and ports found busy there.

A port is claimed when its replica is placed and released when the replica
has ended (or its row is dropped); a port that a launch found taken by
something else on the host is blocked there for ``PORT_CLASH_BLOCK_S``.
Placement (:func:`skr8tr.core.placement.place`) reads :meth:`PortClaims.taken`,
a live view without copies.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Set
from typing import Protocol

PORT_CLASH_BLOCK_S = 60.0  # a port found busy on a host is not offered there again for this long


class Claimant(Protocol):
    replica_id: str
    address: str
    port: int | None


class PortClaims:
    """Address -> port -> the replica holding it; address -> port -> blocked until (clock)."""

    def __init__(self) -> None:
        self.held: dict[str, dict[int, str]] = {}
        self.blocked: dict[str, dict[int, float]] = {}

    def holder(self, address: str, port: int | None) -> str | None:
        return None if port is None else self.held.get(address, {}).get(port)

    def claim(self, r: Claimant) -> None:
        if r.port is not None:
            self.held.setdefault(r.address, {})[r.port] = r.replica_id

    def release(self, r: Claimant) -> None:
        """Release ``r``'s port if ``r`` holds it (another replica may have it by now)."""
        if r.port is None:
            return
        held = self.held.get(r.address)
        if held is not None and held.get(r.port) == r.replica_id:
            del held[r.port]
            if not held:
                del self.held[r.address]

    def block(self, address: str, port: int, now: float) -> None:
        """Something else holds ``port`` on ``address``: offer it there again only later."""
        self.blocked.setdefault(address, {})[port] = now + PORT_CLASH_BLOCK_S

    def taken(self, now: float) -> Mapping[str, Set[int]]:
        """Address -> ports held or blocked there: a live view, valid until the next claim."""
        for address, ports in list(self.blocked.items()):
            for port, until in list(ports.items()):
                if until <= now:
                    del ports[port]
            if not ports:
                del self.blocked[address]
        return TakenPorts(self.held, self.blocked)


class TakenPorts(Mapping[str, Set[int]]):
    """Address -> ports held or blocked there, read straight from the claims (no copy).

    What :func:`~skr8tr.core.placement.place` needs: it asks only about the
    addresses of the nodes it looks at.
    """

    def __init__(self, held: dict[str, dict[int, str]], blocked: dict[str, dict[int, float]]):
        self._held = held
        self._blocked = blocked

    def __getitem__(self, address: str) -> Set[int]:
        held = self._held.get(address)
        blocked = self._blocked.get(address)
        if blocked:
            return set(held or ()) | set(blocked)
        if held is None:
            raise KeyError(address)
        return held.keys()

    def __iter__(self) -> Iterator[str]:
        return iter(set(self._held) | {a for a, p in self._blocked.items() if p})

    def __len__(self) -> int:
        return sum(1 for _ in self)

