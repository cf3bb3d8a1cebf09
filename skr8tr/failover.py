"""Which conductor a client talks to next (DESIGN.md §9). Pure: no trio, no sockets, no clock.

``--conductor`` and ``SKR8TR_CONDUCTOR`` take a comma-separated list of
conductor URLs (:func:`conductor_urls`). Several conductors on etcd elect one
leader; the others answer ``NOT_LEADER``, naming the leader when they know it.
:class:`LeaderSearch` is what every client (the CLI, the node agent, the
ingress) does with that list:

- a *pass* tries the URLs in the order given (the last conductor that served,
  if any, first); the first pass starts at once, every later one after a delay
  from the caller's backoff (which starts over once a conductor served);
- ``NOT_LEADER`` with a leader URL sends the next attempt straight to that
  leader, without waiting; at most ``len(urls) + 3`` such hops per pass, so two
  confused followers naming each other cannot keep a client bouncing;
- ``NOT_LEADER`` without a leader (an election under way), ``UNAVAILABLE``
  (the conductor lost etcd), a connection that fails or drops: the next URL
  of the pass.

A leader URL is followed only if it is a ``ws://`` or ``wss://`` URL with a
host, and never from ``wss://`` to plain ``ws://``: a follower cannot talk a
client out of TLS. Deadlines and what to report are the caller's
(:class:`skr8tr.wire.FailoverCall` for the CLI).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit

__all__ = [
    "Attempt",
    "Delays",
    "Doubling",
    "LeaderSearch",
    "conductor_urls",
    "leader_hint",
    "same_conductor",
]

EXTRA_HOPS = 3  # leader hints followed per pass beyond one per listed conductor


def conductor_urls(text: str) -> tuple[str, ...]:
    """The URLs of ``URL[,URL...]``, blanks around commas and empty items ignored.

    Raises ValueError when nothing is left. The URLs themselves are checked by
    whoever dials them (each client has its own error for a bad one).
    """
    urls = tuple(part.strip() for part in text.split(",") if part.strip())
    if not urls:
        raise ValueError(f"no conductor URL in {text!r}; expected URL[,URL...], "
                         "for example ws://10.0.0.1:7771,ws://10.0.0.2:7771")
    return urls


def same_conductor(a: str, b: str) -> bool:
    """Whether two base URLs name the same conductor (a trailing ``/`` aside)."""
    return a.strip().rstrip("/") == b.strip().rstrip("/")


def leader_hint(asked: str, leader: object) -> str | None:
    """The leader URL a ``NOT_LEADER`` from *asked* names, if a client may follow it.

    None for no leader, anything but a ``ws://``/``wss://`` URL with a host,
    and a ``ws://`` leader named by a ``wss://`` conductor.
    """
    if not isinstance(leader, str) or not leader:
        return None
    try:
        parts = urlsplit(leader)
        _ = parts.port  # ValueError for a port that is not a number in range
    except ValueError:
        return None
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        return None
    if asked.strip().startswith("wss://") and parts.scheme != "wss":
        return None
    return leader


class Delays(Protocol):
    """A backoff: ``next_delay()`` advances it, ``reset()`` starts it over
    (:class:`Doubling`, or the node agent's jittered :class:`skr8tr.node.backoff.Backoff`)."""

    def next_delay(self) -> float: ...

    def reset(self) -> None: ...


@dataclass
class Doubling:
    """``initial_s``, doubling up to ``cap_s``; no jitter (a CLI run is one client)."""

    initial_s: float = 0.2
    cap_s: float = 1.0
    _next_s: float | None = None

    def next_delay(self) -> float:
        delay = self.initial_s if self._next_s is None else self._next_s
        self._next_s = min(self.cap_s, delay * 2)
        return delay

    def reset(self) -> None:
        self._next_s = None


@dataclass(frozen=True)
class Attempt:
    """Dial ``url`` (a base URL: the caller adds its path) after waiting ``wait_s``.

    ``followed`` tells that a follower named it; ``pass_no`` counts the passes
    over the list, from 1; ``starts_pass`` marks an attempt that began one.
    """

    url: str
    wait_s: float
    followed: bool
    pass_no: int
    starts_pass: bool


class LeaderSearch:
    """The order in which a client dials a list of conductors; see the module docstring.

    Call :meth:`next` for each attempt, then tell what came of it:
    :meth:`not_leader` (with the leader the follower named), :meth:`failed`
    (unreachable, ``UNAVAILABLE``, dropped) or :meth:`served`. A call after
    :meth:`served` begins a new pass, with the serving conductor first.
    """

    def __init__(self, urls: tuple[str, ...] | list[str], *, backoff: Delays | None = None,
                 first: str | None = None, max_hops: int | None = None) -> None:
        if not urls:
            raise ValueError("a LeaderSearch needs at least one conductor URL")
        self.urls = tuple(urls)
        self.max_hops = len(self.urls) + EXTRA_HOPS if max_hops is None else max_hops
        self.passes = 0
        self._backoff: Delays = backoff if backoff is not None else Doubling()
        self._preferred = first
        self._queue: deque[str] = deque()
        self._hint: str | None = None
        self._hops = 0
        self._current: str | None = None

    def next(self) -> Attempt:
        """The next conductor to dial, and how long to wait first."""
        if self._hint is not None:
            url, self._hint = self._hint, None
            self._current = url
            return Attempt(url, 0.0, followed=True, pass_no=self.passes, starts_pass=False)
        starts_pass = not self._queue
        wait_s = 0.0
        if starts_pass:
            if self.passes > 0:
                wait_s = self._backoff.next_delay()
            self.passes += 1
            self._hops = 0
            self._queue = deque(self._pass_order())
        url = self._current = self._queue.popleft()
        return Attempt(url, wait_s, followed=False, pass_no=self.passes,
                       starts_pass=starts_pass)

    def not_leader(self, leader: str | None) -> str | None:
        """The conductor just dialled is a follower naming *leader* (None: unknown).

        Returns the URL the next attempt goes to when the hint is followed, None
        when the search goes on down the list instead (no usable leader, or the
        hops of this pass are spent).
        """
        hint = leader_hint(self._current or "", leader)
        if hint is None or self._hops >= self.max_hops:
            return None
        self._hops += 1
        self._hint = hint
        return hint

    def failed(self) -> None:
        """The conductor just dialled could not be used: the next one of the pass."""
        self._hint = None

    def served(self) -> None:
        """The conductor just dialled leads: start over from it next time."""
        self._preferred = self._current
        self._queue.clear()
        self._hint = None
        self._backoff.reset()

    def _pass_order(self) -> list[str]:
        order = [self._preferred] if self._preferred is not None else []
        for url in self.urls:
            if not any(same_conductor(url, seen) for seen in order):
                order.append(url)
        return order
