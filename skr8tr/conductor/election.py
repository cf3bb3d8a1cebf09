"""Which conductor leads: an election on an etcd lease.

The leader is whoever holds the key ``PREFIX/leader``; its value is the leader's
advertised URL, and it is attached to a lease of the leader's (``--lease-ttl``,
5 s by default) that the leader keeps alive every third of its TTL. A leader
that dies stops renewing; etcd then ends the lease, which deletes the key, and
the next candidate takes it within about one TTL.

A candidate campaigns by creating the key only if it does not exist (one
transaction: "created at revision 0, then put with my lease"); while another
holds it, it waits for the key's deletion and tries again. The *term* of a
leadership is the etcd revision at which its key was created: unique, and
larger for every later leader, so that nodes can tell an old leader from a new.

A leader stops leading the moment it learns or must assume it lost the key:
the key was deleted or is another's (seen by a watch), a keepalive answers that
the lease is gone, or no keepalive got through for a whole TTL (etcd may then
have ended the lease). Its writes carry :meth:`Leadership.fence`, so even a
leader that has not noticed yet cannot write once another leads.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

from skr8tr.conductor.etcd_client import Compare, EtcdClient, EtcdError, Get, Put

__all__ = ["LEASE_TTL_S", "Leadership", "LeadershipLost", "campaign", "current_leader",
           "leader_key", "open_leadership", "watch_leader"]

log = logging.getLogger("skr8tr.conductor")

LEASE_TTL_S = 5
RETRY_S = 0.2  # between attempts while etcd does not answer


# Leases this process granted for the leader key: only those it may end as stale (another
# conductor with the same URL, a misconfiguration, must not be deposed by it).
_granted: set[int] = set()


class LeadershipLost(Exception):
    """This conductor stopped leading (the message says why); it must step down."""


def leader_key(prefix: str) -> str:
    return prefix.rstrip("/") + "/leader"


@dataclass(eq=False)
class Leadership:
    """One term of leadership held by ``url``: the leader key, its lease and its term
    (the key's create revision). ``lost`` is set the moment it ends, ``reason`` says why."""

    url: str
    key: str
    lease: int
    term: int
    ttl_s: float
    renewed_at: float  # trio clock, sent time of the last renewal that etcd confirmed
    lost: trio.Event = field(default_factory=trio.Event)
    reason: str | None = None
    # Called with the reason, synchronously, the moment leadership is lost: before any
    # task of the term has been cancelled and has finished.
    on_lose: list[Callable[[str], None]] = field(default_factory=list)

    def fence(self) -> list[Compare]:
        """The compares under which a write is this leader's: the leader key was created
        at this term and still holds this leader's URL."""
        return [Compare.created_at(self.key, self.term), Compare.value(self.key,
                                                                       self.url.encode())]

    def lose(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
            log.log(logging.INFO if reason == "resigned" else logging.WARNING,
                    "no longer leading (term %d): %s", self.term, reason)
            self.lost.set()
            for callback in self.on_lose:
                callback(reason)


async def current_leader(client: EtcdClient, prefix: str) -> str | None:
    """The URL of the leader now, None when none leads. Raises EtcdError."""
    kvs, _revision = await client.get(leader_key(prefix))
    return kvs[0].value.decode("utf-8", "replace") if kvs else None


async def watch_leader(client: EtcdClient, prefix: str) -> AsyncIterator[str | None]:
    """The leader's URL now (None: none), then after each change of leader. Raises
    EtcdError when etcd goes away (watch again to go on)."""
    key = leader_key(prefix)
    kvs, revision = await client.get(key)
    yield kvs[0].value.decode("utf-8", "replace") if kvs else None
    async with client.watch(key, start_revision=revision + 1) as batches:
        async for events in batches:
            last = events[-1]
            yield None if last.kind == "DELETE" else last.kv.value.decode("utf-8", "replace")


async def campaign(client: EtcdClient, prefix: str, url: str, ttl_s: float = LEASE_TTL_S
                   ) -> Leadership:
    """Wait until ``url`` leads, and return its :class:`Leadership` (whose lease nobody
    keeps alive yet: :func:`open_leadership` does). Retries while etcd does not answer;
    returns only as leader, or is cancelled. A campaign cancelled after its lease was
    granted leaves that lease to expire by itself."""
    key = leader_key(prefix)
    while True:
        try:
            kvs, revision = await client.get(key)
            if kvs and kvs[0].value == url.encode() and kvs[0].lease in _granted:
                # Our own key from a term whose lease we could not revoke (etcd was away):
                # nobody else can hold it; end that lease rather than wait out its TTL.
                log.info("the leader key still holds our previous term; ending its lease")
                await client.revoke(kvs[0].lease)
                continue
            if kvs:  # someone leads: wait until the key is gone
                log.info("%s leads; waiting", kvs[0].value.decode("utf-8", "replace"))
                async with client.watch(key, start_revision=revision + 1) as batches:
                    async for events in batches:
                        if any(e.kind == "DELETE" for e in events):
                            break
                continue
            granted_at = trio.current_time()
            lease, ttl = await client.grant(max(1, round(ttl_s)))
            _granted.add(lease)
            result = await client.txn([Compare.created_at(key, 0)],
                                      [Put(key, url.encode(), lease), Get(key)])
            if result.succeeded:
                term = result.ranges[1][0].create_revision
                log.info("leading (term %d) as %s", term, url)
                return Leadership(url, key, lease, term, float(ttl), granted_at)
            await client.revoke(lease)  # another was quicker
        except EtcdError as exc:
            log.warning("campaign for %s: %s", key, exc)
            await trio.sleep(RETRY_S)


@asynccontextmanager
async def open_leadership(client: EtcdClient, prefix: str, url: str,
                          ttl_s: float = LEASE_TTL_S) -> AsyncIterator[Leadership]:
    """``async with open_leadership(...) as leadership:`` campaigns until ``url`` leads,
    then runs the body as leader while keeping the lease alive.

    The moment leadership is lost, ``leadership.lost`` is set, the body is cancelled and
    the ``async with`` raises :class:`LeadershipLost`. When the body ends (returns,
    raises or is cancelled from outside) the leader resigns: its lease is revoked, so
    that the next leader need not wait for it to expire (at most ``client.timeout_s``).
    """
    leadership = await campaign(client, prefix, url, ttl_s)
    try:
        async with trio.open_nursery() as nursery:
            def lose(reason: str) -> None:
                leadership.lose(reason)
                nursery.cancel_scope.cancel()

            nursery.start_soon(_keep_alive, client, leadership, lose)
            nursery.start_soon(_watch_key, client, leadership, lose)
            yield leadership
            nursery.cancel_scope.cancel()  # the body is done: so are its helpers
    except BaseExceptionGroup as group:
        # The helpers raise nothing: what the body raised is the one exception here.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(client.timeout_s):
            try:
                await client.revoke(leadership.lease)
            except EtcdError as exc:
                log.info("could not resign (the lease ends by itself): %s", exc)
        if leadership.reason is None:
            leadership.lose("resigned")
    if leadership.reason != "resigned":
        raise LeadershipLost(leadership.reason)


async def _keep_alive(client: EtcdClient, leadership: Leadership, lose) -> None:
    """Renew the lease every third of its TTL; lose leadership when etcd says the lease
    is gone, or when no renewal got through for a whole TTL."""
    period = leadership.ttl_s / 3
    await trio.sleep_until(leadership.renewed_at + period)
    while True:
        deadline = leadership.renewed_at + leadership.ttl_s
        sent = trio.current_time()
        if sent >= deadline:
            lose(f"no lease keepalive got through for {leadership.ttl_s:g} s")
            return
        ttl = None
        with trio.move_on_after(deadline - sent):
            try:
                ttl = await client.keepalive(leadership.lease)
            except EtcdError as exc:
                log.warning("lease keepalive: %s", exc)
        if ttl == 0:
            lose("etcd ended the lease")
            return
        if ttl is None:
            await trio.sleep(min(RETRY_S, max(0.0, deadline - trio.current_time())))
            continue
        leadership.renewed_at = sent
        await trio.sleep_until(sent + period)


async def _watch_key(client: EtcdClient, leadership: Leadership, lose) -> None:
    """Lose leadership the moment the leader key is deleted or another's."""
    key, term = leadership.key, leadership.term
    while True:
        try:
            kvs, revision = await client.get(key)
            if not kvs or kvs[0].create_revision != term:
                lose("the leader key was deleted" if not kvs
                     else f"{kvs[0].value.decode('utf-8', 'replace')} leads")
                return
            async with client.watch(key, start_revision=revision + 1) as batches:
                async for events in batches:
                    for event in events:
                        if event.kind == "DELETE":
                            lose("the leader key was deleted")
                            return
                        if event.kv.create_revision != term:
                            lose(f"{event.kv.value.decode('utf-8', 'replace')} leads")
                            return
        except EtcdError:
            await trio.sleep(RETRY_S)  # etcd away: the keepalive decides when that is loss
