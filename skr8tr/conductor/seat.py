"""What this conductor is right now: leader or follower, under which term, and who leads.

A lone conductor (``--state FILE`` or nothing) is the leader of term 0 for its whole
life. With ``--store etcd://...`` (:mod:`skr8tr.conductor.ha`) the seat changes as
elections go: only the leader accepts node sessions, watchers and commands; a
follower answers ``ping`` with its role and the leader's URL and everything else
with ``NOT_LEADER`` naming the leader; a conductor that has lost touch with etcd
for a whole lease answers ``UNAVAILABLE`` (it cannot know who leads, and could not
store a change).

Whatever a term opened that must not outlive it (node sessions, watch streams)
runs under :meth:`Seat.for_term`; :meth:`Seat.step_down` cancels them all, so a
deposed leader closes its node sessions at once and the nodes go to the new one.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import trio

__all__ = ["Member", "Seat"]


@dataclass(frozen=True)
class Member:
    """One conductor as the others see it: its WebSocket URL, its status page, and since
    when it has been running (wall clock)."""

    url: str
    http: str | None
    since: float


@dataclass(eq=False)
class Seat:
    url: str  # this conductor's advertised WebSocket URL
    http: str | None = None  # its status page, for followers' pages to link to
    role: str = "leader"  # "leader" | "follower"
    term: int = 0  # the leadership term while leading (0: a lone conductor)
    leader: str | None = None  # the leader's URL (ours while leading)
    since: float = field(default_factory=time.time)  # wall clock of the last role change
    store_reachable: bool = True  # False: no answer from etcd for a whole lease
    members: dict[str, Member] = field(default_factory=dict)  # by URL, ours included
    changed: trio.Event = field(default_factory=trio.Event)  # set (and renewed) on a change
    # While leading with etcd: the compares that fence a write on this leadership.
    fence: Callable[[], Any] | None = None
    _scopes: set[trio.CancelScope] = field(default_factory=set)

    def __post_init__(self) -> None:
        if self.role == "leader" and self.leader is None:
            self.leader = self.url

    @property
    def leading(self) -> bool:
        return self.role == "leader"

    # ------------------------------------------------------------ transitions

    def lead(self, term: int, fence: Callable[[], Any] | None = None) -> None:
        self.fence = fence
        self.role, self.term, self.leader, self.since = "leader", term, self.url, time.time()
        self._changed()

    def step_down(self, leader: str | None = None) -> None:
        """Stop leading: every node session and watch stream of the term is cancelled."""
        if self.role == "leader":
            self.since = time.time()
        self.role, self.term, self.fence = "follower", 0, None
        self.leader = None if leader == self.url else leader
        for scope in list(self._scopes):
            scope.cancel()
        self._changed()

    def follow(self, leader: str | None) -> None:
        """The leader changed (seen by the election watch) while we follow."""
        if self.role != "leader":
            self.leader = None if leader == self.url else leader

    def _changed(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    @contextlib.contextmanager
    def for_term(self) -> Iterator[trio.CancelScope]:
        """Run the body as part of the current term: cancelled when it ends."""
        scope = trio.CancelScope()
        if not self.leading:
            scope.cancel()
        self._scopes.add(scope)
        try:
            with scope:
                yield scope
        finally:
            self._scopes.discard(scope)

    # ------------------------------------------------------------ what others are told

    def refusal(self) -> tuple[str, str, str | None]:
        """``(code, message, leader)`` for a request this conductor does not serve."""
        if not self.store_reachable and self.leader is None:
            return ("UNAVAILABLE", "this conductor cannot reach its store (etcd) and knows "
                    "no leader; workloads keep running; try again or another conductor",
                    None)
        if self.leader is None:
            return ("NOT_LEADER", "this conductor is a follower and no leader is elected "
                    "yet (an election takes up to the lease TTL); try again", None)
        return ("NOT_LEADER", f"this conductor is a follower; the leader is {self.leader}",
                self.leader)

    def current_fence(self) -> Any:
        """The fence of the leadership held now; None when not leading (a write then
        must not happen: etcd_nonces treats None as "no term")."""
        return self.fence() if self.leading and self.fence is not None else None

    def ping(self, version: str) -> dict[str, Any]:
        return {"pong": "conductor", "version": version, "role": self.role,
                "leader": self.leader}

    def conductors(self) -> list[dict[str, Any]]:
        """``status``'s ``conductors``: every known conductor, its role and since when."""
        members = dict(self.members)
        if self.url not in members:
            members[self.url] = Member(self.url, self.http, self.since)
        rows = []
        for url, member in sorted(members.items()):
            role = "leader" if url == self.leader else "follower"
            since = self.since if url == self.url else member.since
            rows.append({"url": url, "role": role, "since": since, "http": member.http})
        return rows
