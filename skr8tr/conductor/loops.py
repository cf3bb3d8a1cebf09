"""The conductor's long-running tasks around the :class:`~skr8tr.conductor.cluster.Cluster`.

Each one waits for its moment and then makes one synchronous change to the
cluster: the reconciler converges apps after every change (and when a pass
asked to look again), the expiry watchdog declares silent nodes lost, and
the store writer stores what changed other than by a command. ``daemon.py``
starts them in its nursery; the simulation tests start the same ones.
"""

from __future__ import annotations

import logging

import trio

from skr8tr.conductor.cluster import STALL_TOLERANCE_S, Cluster
from skr8tr.conductor.store import FenceLost, StoreError

log = logging.getLogger("skr8tr.conductor")

STORE_RETRY_S = 1.0  # a failed write-behind is tried again after this long
STORE_FLUSH_S = 5.0  # at shutdown, how long the last write-behind may take


async def serve_reconciler(cluster: Cluster, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Reconcile on every change, and at the times the last pass asked for."""
    task_status.started()
    while True:
        dirty = cluster.take_dirty()
        wake_at = cluster.reconcile()
        with trio.move_on_at(wake_at if wake_at is not None else float("inf")):
            await dirty.wait()


async def serve_expiry_watchdog(cluster: Cluster, *,
                                task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Expire nodes exactly ``node_timeout_s`` after their last heartbeat.

    O(nodes) per wake, and it wakes about once per ``node_timeout_s -
    heartbeat_s`` while every node beats (the oldest heartbeat is then about
    one period old): cheaper than a deadline heap, whose stale entries would
    each cost a wake. Waking more than STALL_TOLERANCE_S late means the
    conductor itself did not run: the nodes get that time back first.
    """
    task_status.started()
    while True:
        deadline = cluster.next_expiry()
        if deadline is None:
            await cluster.wait_node_joined()
            continue
        await trio.sleep_until(deadline)
        late = cluster.clock() - deadline
        if late > STALL_TOLERANCE_S:
            cluster.excuse_stall(late)
        cluster.expire_nodes()


async def serve_store_writes(cluster: Cluster, *,
                             task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Store the apps :meth:`Cluster.save_soon` named, each as it is when its turn comes
    (after any command changing it). A write that fails is logged by the store and
    tried again every STORE_RETRY_S until it succeeds; the apps keep running meanwhile."""
    task_status.started()
    try:
        while True:
            await cluster.unsaved_event.wait()
            failed = await _store_unsaved(cluster)
            if failed:
                await trio.sleep(STORE_RETRY_S)
                for name in failed:
                    cluster.save_soon(name)
    finally:
        # Shutting down: what is not stored yet is stored now (bounded), so that a
        # rollout that ended is not found "rolling" by the next start.
        with trio.CancelScope(shield=True), trio.move_on_after(STORE_FLUSH_S):
            await _store_unsaved(cluster)


async def _store_unsaved(cluster: Cluster) -> list[str]:
    """Store each app named so far; returns those whose write failed."""
    cluster.unsaved_event = trio.Event()
    names, cluster.unsaved = sorted(cluster.unsaved), set()
    failed = []
    for name in names:
        async with cluster.changing(name):
            try:
                await cluster.store.apply(cluster.saved_form(name))
            except FenceLost as exc:
                cluster.deposed(str(exc))  # another conductor leads: nothing more to write
                return []
            except StoreError:
                failed.append(name)
    return failed
