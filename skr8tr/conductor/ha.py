"""Several conductors on etcd: campaign, lead one term at a time, follow in between.

``skr8tr conductor --store etcd://H:P[,...]`` runs this loop next to its
listeners (which serve whatever the :class:`~skr8tr.conductor.seat.Seat` says):

1. **Membership**: the conductor keeps ``PREFIX/conductors/ID`` (its URL, status
   page and since when it holds its role) under a lease of its own, renewed every
   third of ``--lease-ttl``. When no renewal got through for a whole TTL it knows
   it is cut off from etcd: ``store_reachable`` turns false and what it cannot
   serve is refused with ``UNAVAILABLE``; the next renewal that gets through
   turns it back.
2. **Who leads**: the leader key is watched (:func:`election.watch_leader`) and
   the members re-read every half TTL, so that a follower's ``NOT_LEADER`` names
   the leader and ``status`` lists every conductor.
3. **Campaign, then lead**: :func:`election.open_leadership` returns once this
   conductor holds the leader key. A term then builds a fresh cluster on the
   etcd store (every write fenced on this leadership), loads the desired state,
   waits the adopt grace for the nodes to come and report what runs (same pids:
   a failover restarts nothing), ends interrupted rollouts by their policy, and
   serves until the leadership ends: lease lost (etcd unreachable for a TTL),
   leader key gone or another's, or a write whose fence failed. Then it steps
   down at once: node sessions and watch streams of the term are closed,
   rollouts are cancelled without touching a workload (the next leader ends
   them), and it campaigns again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Awaitable, Callable

import trio

from skr8tr.conductor import election
from skr8tr.conductor.cluster import Cluster
from skr8tr.conductor.etcd_client import EtcdClient, EtcdError
from skr8tr.conductor.etcd_store import EtcdStore
from skr8tr.conductor.seat import Member, Seat
from skr8tr.conductor.state_file import StateFileError
from skr8tr.conductor.store import StoreError

__all__ = ["member_key", "serve_ha"]

log = logging.getLogger("skr8tr.conductor")

RETRY_S = 0.5  # between attempts while etcd does not answer
LOAD_RETRY_S = 2.0  # after a term that could not load the state


def member_key(prefix: str, url: str) -> str:
    return f"{prefix}/conductors/{hashlib.sha256(url.encode()).hexdigest()[:16]}"


async def serve_ha(client: EtcdClient, prefix: str, ttl_s: float, seat: Seat,
                   new_cluster: Callable[[EtcdStore | None], Cluster],
                   begin_term: Callable[[Cluster], Awaitable[None]],
                   serve_term: Callable[..., Awaitable[None]],
                   on_follow: Callable[[Cluster], None], *,
                   task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Campaign, lead and follow until cancelled.

    ``new_cluster(store)`` builds a cluster on the seat (a follower's has no store);
    ``begin_term(cluster)`` loads the desired state into it and gives it to the command
    API (raises StoreError or StateFileError when it cannot);
    ``serve_term(cluster, task_status=)`` runs a leader's loops until cancelled;
    ``on_follow(cluster)`` gives a follower's empty cluster to the command API.
    """
    seat.step_down(None)
    on_follow(new_cluster(None))
    async with trio.open_nursery() as nursery:
        await nursery.start(_serve_membership, client, prefix, ttl_s, seat)
        nursery.start_soon(_follow_leader, client, prefix, ttl_s, seat)
        task_status.started()
        while True:
            try:
                async with election.open_leadership(client, prefix, seat.url,
                                                    ttl_s) as leadership:
                    await _lead(prefix, leadership, seat, new_cluster(
                        EtcdStore(client, prefix, fence=leadership.fence)),
                        begin_term, serve_term)
            except election.LeadershipLost as exc:
                log.warning("stepped down: %s", exc)
            except _CannotLoad as exc:
                log.error("resigned: %s; trying again in %g s", exc, LOAD_RETRY_S)
                _end_term(seat, on_follow, new_cluster)
                await trio.sleep(LOAD_RETRY_S)
                continue
            _end_term(seat, on_follow, new_cluster)


class _CannotLoad(Exception):
    """The new leader could not read the desired state; it resigns and tries again."""


def _end_term(seat: Seat, on_follow, new_cluster) -> None:
    """Follow: the term's cluster (its apps, nodes, events) is dropped, so that a
    follower's status page and /api/state show no stale copy of the cluster."""
    if seat.leading:
        seat.step_down(None)
    on_follow(new_cluster(None))


async def _lead(prefix: str, leadership: election.Leadership, seat: Seat,
                cluster: Cluster, begin_term, serve_term) -> None:
    try:
        try:
            await begin_term(cluster)
        except (StoreError, StateFileError) as exc:
            raise _CannotLoad(f"cannot load the desired state from etcd {prefix}: "
                              f"{exc}") from None
        # Only now: a node or command let in before the state is loaded and installed
        # would meet the follower's empty cluster (and its unknown placement secret).
        seat.lead(leadership.term, leadership.fence)
        # At once when it ends, before the term's tasks have wound down (a store flush,
        # etcd timeouts): node sessions and watchers close, commands get NOT_LEADER.
        leadership.on_lose.append(lambda reason: seat.step_down(None))
        async with trio.open_nursery() as nursery:
            def deposed(reason: str) -> None:
                leadership.lose(reason)
                nursery.cancel_scope.cancel()

            cluster.deposed = deposed
            await nursery.start(serve_term, cluster)
            log.info("leading (term %d): %d app(s) loaded; waiting %g s for the nodes to "
                     "report", leadership.term, len(cluster.apps), cluster.adopt_grace_s)
            await leadership.lost.wait()
            nursery.cancel_scope.cancel()
    finally:
        if seat.leading:
            seat.step_down(None)


async def _serve_membership(client: EtcdClient, prefix: str, ttl_s: float, seat: Seat, *,
                            task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Keep this conductor's member key alive; track whether etcd answers."""
    key = member_key(prefix, seat.url)
    lease = 0
    written: tuple[str, float] | None = None  # (role, since) last written
    last_ok = trio.current_time()
    started = False
    while True:
        try:
            if lease == 0:
                lease, _ttl = await client.grant(max(2, round(ttl_s)))
                written = None
            elif await client.keepalive(lease) == 0:
                lease = 0  # it expired while we could not renew it: a new one
                continue
            if written != (seat.role, seat.since):
                now = (seat.role, seat.since)
                await client.put(key, json.dumps({"url": seat.url, "http": seat.http,
                                                  "role": seat.role, "since": seat.since}
                                                 ).encode(), lease=lease)
                written = now
            last_ok = trio.current_time()
            if not seat.store_reachable:
                log.info("etcd answers again")
            seat.store_reachable = True
        except EtcdError as exc:
            if trio.current_time() - last_ok >= ttl_s and seat.store_reachable:
                seat.store_reachable = False
                log.warning("etcd has not answered for %g s: %s", ttl_s, exc)
        if not started:
            started = True
            task_status.started()
        with trio.move_on_after(ttl_s / 3):
            await seat.changed.wait()


async def _follow_leader(client: EtcdClient, prefix: str, ttl_s: float, seat: Seat) -> None:
    """Keep ``seat.leader`` and ``seat.members`` up to date."""
    while True:
        try:
            await _read_members(client, prefix, seat)
            with trio.move_on_after(ttl_s / 2):
                async for leader in election.watch_leader(client, prefix):
                    if leader != seat.leader and not seat.leading:
                        log.info("the leader is %s", leader or "(none: an election is due)")
                    seat.follow(leader)
        except EtcdError:
            await trio.sleep(RETRY_S)


async def _read_members(client: EtcdClient, prefix: str, seat: Seat) -> None:
    kvs, _revision = await client.get(f"{prefix}/conductors/", prefix=True)
    members: dict[str, Member] = {}
    for kv in kvs:
        try:
            value = json.loads(kv.value)
            url, http, since = value["url"], value.get("http"), float(value["since"])
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring %s in etcd: not a conductor's record", kv.key)
            continue
        if isinstance(url, str) and (http is None or isinstance(http, str)):
            members[url] = Member(url, http, since)
    seat.members = members
