"""Keep-alive connections to replicas, reused across requests.

A connection goes back to the pool only when its last exchange ended cleanly
(both h11 sides ``DONE``) and its replica is still routable; a replica that
leaves rotation (``draining`` and after) has its idle connections closed at
once (:meth:`Pool.retire`), and a connection in use at that moment is closed
when its request ends instead of being pooled. So a drained replica holds no
connection from the ingress by the time it is told to stop, and a server that
waits for its keep-alive connections to close before exiting is not held up.

Before an idle connection is reused it is checked for readability without
blocking: a connection the replica closed (or wrote to unasked) is dropped
rather than handed out, which removes most of the keep-alive race. Idle
connections older than ``idle_timeout_s`` are closed by :meth:`run_sweeper`.

At most ``max_idle_per_backend`` idle connections are kept per replica and
``max_idle`` in all (the ingress sets it to its client connection cap, which
keeps its descriptors within budget: :mod:`skr8tr.ingress.limits`).
"""

from __future__ import annotations

import contextlib
import logging
import select
from collections.abc import Callable, Iterable

import h11
import trio

from skr8tr.ingress.routes import Backend

log = logging.getLogger("skr8tr.ingress")

MAX_RESPONSE_HEAD_BYTES = 64 * 1024
MAX_IDLE_PER_BACKEND = 64
IDLE_TIMEOUT_S = 30.0
CONNECT_TIMEOUT_S = 2.0

Key = tuple[str, str, int]


class ConnectFailed(Exception):
    """Could not open a connection to a replica; nothing was sent to it."""

    def __init__(self, backend: Backend, why: str) -> None:
        super().__init__(f"cannot connect to {backend}: {why}")
        self.backend = backend
        self.why = why


class UpstreamConnection:
    """One TCP connection to a replica with its h11 client state."""

    def __init__(self, backend: Backend, stream: trio.SocketStream) -> None:
        self.backend = backend
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_RESPONSE_HEAD_BYTES)
        self.reused = False
        self.idle_since = 0.0
        self.received_bytes = 0  # in the current exchange

    def close(self) -> None:
        """Close now (synchronous; a task blocked on the socket gets ClosedResourceError)."""
        with contextlib.suppress(OSError):
            self.stream.socket.close()

    def looks_closed(self) -> bool:
        """True when the idle socket is readable: the replica closed it (or misbehaves)."""
        try:
            poller = select.poll()
            poller.register(self.stream.socket.fileno(), select.POLLIN | select.POLLERR
                            | select.POLLHUP)
            return bool(poller.poll(0))
        except (OSError, ValueError):
            return True


class Pool:
    """Idle keep-alive connections by replica; ``is_routable(key)`` says which may be kept."""

    def __init__(self, is_routable: Callable[[Key], bool], *,
                 connect_timeout_s: float = CONNECT_TIMEOUT_S,
                 idle_timeout_s: float = IDLE_TIMEOUT_S,
                 max_idle_per_backend: int = MAX_IDLE_PER_BACKEND,
                 max_idle: int | None = None) -> None:
        self.is_routable = is_routable
        self.connect_timeout_s = connect_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.max_idle_per_backend = max_idle_per_backend
        self.max_idle = max_idle  # in all; None: no limit but the one per backend
        self._idle: dict[Key, list[UpstreamConnection]] = {}
        self._idle_total = 0
        self.opened = 0  # connections opened, for logs and tests

    def idle_count(self, key: Key | None = None) -> int:
        if key is not None:
            return len(self._idle.get(key, ()))
        return self._idle_total

    async def connect(self, backend: Backend) -> UpstreamConnection:
        """An idle connection to ``backend`` or a new one.

        Raises ConnectFailed when a new connection cannot be made within
        ``connect_timeout_s``.
        """
        idle = self._idle.get(backend.key)
        while idle:
            uc = idle.pop()  # the most recently used one: least likely to have timed out
            self._idle_total -= 1
            if not idle:
                del self._idle[backend.key]
            if uc.looks_closed():
                uc.close()
                continue
            uc.reused = True
            uc.received_bytes = 0
            await trio.lowlevel.checkpoint()
            return uc
        try:
            with trio.fail_after(self.connect_timeout_s):
                stream = await trio.open_tcp_stream(backend.address, backend.port)
        except trio.TooSlowError:
            raise ConnectFailed(backend, f"no answer within {self.connect_timeout_s:g} s"
                                ) from None
        except OSError as exc:
            raise ConnectFailed(backend, exc.strerror or str(exc)) from None
        self.opened += 1
        return UpstreamConnection(backend, stream)

    def release(self, uc: UpstreamConnection) -> None:
        """Give a connection back after an exchange: pooled if reusable, else closed."""
        conn = uc.h11
        if (conn.our_state is h11.DONE and conn.their_state is h11.DONE
                and self.is_routable(uc.backend.key)):
            try:
                conn.start_next_cycle()
            except h11.LocalProtocolError:
                uc.close()
                return
            idle = self._idle.setdefault(uc.backend.key, [])
            if len(idle) < self.max_idle_per_backend and (
                    self.max_idle is None or self._idle_total < self.max_idle):
                uc.idle_since = trio.current_time()
                idle.append(uc)
                self._idle_total += 1
                return
            if not idle:
                del self._idle[uc.backend.key]
        uc.close()

    def retire(self, backends: Iterable[Backend]) -> None:
        """Close the idle connections of replicas that left rotation."""
        for b in backends:
            for uc in self._idle.pop(b.key, []):
                self._idle_total -= 1
                uc.close()

    def close_all(self) -> None:
        for idle in self._idle.values():
            for uc in idle:
                uc.close()
        self._idle.clear()
        self._idle_total = 0

    def sweep(self, now: float) -> int:
        """Close idle connections older than ``idle_timeout_s``; returns how many."""
        closed = 0
        for key in list(self._idle):
            keep = []
            for uc in self._idle[key]:
                if now - uc.idle_since >= self.idle_timeout_s:
                    uc.close()
                    closed += 1
                else:
                    keep.append(uc)
            if keep:
                self._idle[key] = keep
            else:
                del self._idle[key]
        self._idle_total -= closed
        return closed

    async def run_sweeper(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Sweep idle connections every half ``idle_timeout_s``, until cancelled."""
        task_status.started()
        try:
            while True:
                await trio.sleep(self.idle_timeout_s / 2)
                self.sweep(trio.current_time())
        finally:
            self.close_all()
