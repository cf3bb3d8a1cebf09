"""Reconciliation: what to do so an app has the replicas it should (pure).

Two decisions live here, both plain functions of their inputs:

- :func:`on_exit` — a replica has ended: is it restarted, when, and does it
  count as a finished job or a replica given up on?
- :func:`reconcile_app` — given an app's desired count and its replicas, which
  replicas to launch, which to stop, which exited rows to forget, and when to
  look again.

Restart backoff: the first restart after a quick exit waits 1 s, then 2, 4, 8,
16, 32 and at most 60 s, so a crash loop never spins the CPU. A replica that
ran for at least :data:`BACKOFF_RESET_S` before it ended starts the count
again. A replica lost with its node is re-placed at once, not counted as a
crash. An exited replica keeps its row (state ``exited`` or ``failed``) until
its successor is launched, so ``list`` shows a crash loop while it happens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from skr8tr.core import replica_state

__all__ = [
    "BACKOFF_BASE_S",
    "BACKOFF_CAP_S",
    "BACKOFF_RESET_S",
    "LIVE_STATES",
    "AppView",
    "ReplicaView",
    "ExitOutcome",
    "Launch",
    "Stop",
    "Forget",
    "Plan",
    "backoff_s",
    "on_exit",
    "reconcile_app",
]

BACKOFF_BASE_S = 1.0
BACKOFF_CAP_S = 60.0
BACKOFF_RESET_S = 30.0

# The replica states' groups, from their one home (core/replica_state.py). A stopping
# or draining replica is on its way out: it neither counts toward the desired number
# nor is stopped twice.
LIVE_STATES = replica_state.LIVE
LEAVING_STATES = replica_state.LEAVING
ENDED_STATES = replica_state.ENDED


def backoff_s(restart_count: int) -> float:
    """Delay before the ``restart_count``-th consecutive restart (1-based)."""
    if restart_count <= 0:
        return 0.0
    return min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** (restart_count - 1))


@dataclass(frozen=True)
class ExitOutcome:
    state: str  # "exited" (code 0) or "failed"
    restart_at: float | None  # None: not restarted
    restart_count: int  # the count the successor carries
    completed: bool = False  # a job that finished successfully
    given_up: bool = False  # a replica that is not restarted (policy), not a job success


def on_exit(
    *,
    app_type: str,
    restart: str,
    exit_code: int | None,
    signal: int | None,
    launch_failed: bool,
    ran_for_s: float,
    restart_count: int,
    node_lost: bool,
    now: float,
) -> ExitOutcome:
    """Decide what follows the end of a replica that nobody asked to stop.

    ``restart_count`` is the count the replica itself carried (0 for a first
    launch). Never raises.
    """
    success = not launch_failed and not node_lost and exit_code == 0 and signal is None
    state = "exited" if success else "failed"
    if node_lost:
        # Not the workload's fault: put it somewhere else at once.
        return ExitOutcome(state, now, restart_count)
    if app_type == "job" and success:
        return ExitOutcome(state, None, 0, completed=True)
    wants_restart = restart == "always" or (restart == "on-failure" and not success)
    if not wants_restart:
        return ExitOutcome(state, None, 0, given_up=True)
    count = 1 if ran_for_s >= BACKOFF_RESET_S else restart_count + 1
    return ExitOutcome(state, now + backoff_s(count), count)


@dataclass(frozen=True)
class AppView:
    name: str
    generation: int
    desired: int
    completed: int = 0  # jobs that finished
    given_up: int = 0  # replicas not restarted by policy
    rolling: bool = False  # a rollout owns the app's replicas until it ends


@dataclass(frozen=True)
class ReplicaView:
    replica_id: str
    generation: int
    state: str
    seq: int  # creation order, for "newest first"
    restart_at: float | None = None  # for an ended replica waiting for its successor
    restart_count: int = 0


@dataclass(frozen=True)
class Launch:
    app: str
    generation: int
    restart_count: int = 0
    replaces: str | None = None  # the ended replica whose row the new one takes over


@dataclass(frozen=True)
class Stop:
    replica_id: str
    reason: str


@dataclass(frozen=True)
class Forget:
    replica_id: str


@dataclass(frozen=True)
class Plan:
    actions: tuple[Launch | Stop | Forget, ...]
    wake_at: float | None  # look again at this time even if nothing changes


_STOP_PREFERENCE = {"pending": 0, "running": 1, "ready": 2}


def reconcile_app(app: AppView, replicas: Sequence[ReplicaView], now: float) -> Plan:
    """Launch, stop or forget so that ``app`` converges on its target count.

    While a rollout runs (``app.rolling``) it owns the app: nothing is done.
    Otherwise only replicas of ``app.generation`` count toward the target, and
    live replicas of any other generation (left over by an ended rollout) are
    stopped. Never raises.
    """
    if app.rolling:
        return Plan((), None)
    actions: list[Launch | Stop | Forget] = []
    for r in replicas:
        if r.generation != app.generation:
            if r.state in ENDED_STATES:
                actions.append(Forget(r.replica_id))
            elif r.state in LIVE_STATES:
                actions.append(Stop(r.replica_id, f"generation {r.generation} is not current "
                                                  f"({app.generation} is)"))
    mine = [r for r in replicas if r.generation == app.generation]
    live = [r for r in mine if r.state in LIVE_STATES]
    waiting = [r for r in mine if r.state in ENDED_STATES and r.restart_at is not None]
    done = [r for r in mine if r.state in ENDED_STATES and r.restart_at is None]
    target = max(0, app.desired - app.completed - app.given_up)
    actions.extend(Forget(r.replica_id) for r in done)

    excess = len(live) + len(waiting) - target
    if excess > 0:
        # Drop pending restarts first (latest first), then stop live replicas:
        # pending before running before ready, newest first.
        for r in sorted(waiting, key=lambda r: (-(r.restart_at or 0.0), -r.seq))[:excess]:
            actions.append(Forget(r.replica_id))
            waiting.remove(r)
            excess -= 1
        victims = sorted(live, key=lambda r: (_STOP_PREFERENCE[r.state], -r.seq))[:excess]
        actions.extend(Stop(r.replica_id, "scaled down") for r in victims)
    else:
        actions.extend(Launch(app.name, app.generation) for _ in range(-excess))

    wake_at: float | None = None
    for r in sorted(waiting, key=lambda r: r.seq):
        assert r.restart_at is not None
        if r.restart_at <= now:
            actions.append(Launch(app.name, app.generation, r.restart_count, r.replica_id))
        elif wake_at is None or r.restart_at < wake_at:
            wake_at = r.restart_at
    return Plan(tuple(actions), wake_at)
