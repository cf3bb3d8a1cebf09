"""Leader election on an etcd lease, against a real etcd and real time: one leader at a
time, takeover when the leader's lease ends, a deposed leader's writes refused, loss
signalled when etcd goes away, and a new campaign once it is back."""

from __future__ import annotations

import pytest
import trio

from skr8tr.conductor.election import (
    Leadership,
    LeadershipLost,
    current_leader,
    open_leadership,
    watch_leader,
)
from skr8tr.conductor.etcd_client import EtcdClient
from skr8tr.conductor.etcd_store import EtcdStore, FenceLost
from skr8tr.conductor.store import Change
from tests.etcd import Etcd, etcd_fixture  # noqa: F401 - the fixture
from tests.test_store import app

TTL_S = 2  # etcd's smallest lease with its default heartbeat
DEADLINE_S = 30
A, B = "ws://127.0.0.1:7001", "ws://127.0.0.1:7002"


class Candidate:
    """One conductor's election, run in a task: ``leading`` is its Leadership while it
    leads, ``outcome`` how its last leadership ended."""

    def __init__(self, client: EtcdClient, url: str) -> None:
        self.client, self.url = client, url
        self.leading: Leadership | None = None
        self.outcome: str | None = None
        self.elected = trio.Event()
        self.scope = trio.CancelScope()

    async def run(self) -> None:
        with self.scope:
            try:
                async with open_leadership(self.client, "/t", self.url, TTL_S) as leadership:
                    self.leading = leadership
                    self.elected.set()
                    await trio.sleep_forever()
            except LeadershipLost as exc:
                self.outcome = f"lost: {exc}"
            finally:
                self.leading = None
        if self.outcome is None:
            self.outcome = "resigned"


async def until(predicate, what: str, timeout_s: float = DEADLINE_S) -> float:
    """Poll ``predicate`` until it holds; how long that took. Fails after timeout_s."""
    began = trio.current_time()
    with trio.fail_after(timeout_s):
        while not predicate():
            await trio.sleep(0.02)
    return trio.current_time() - began


async def test_one_of_two_candidates_leads_and_the_other_sees_it(etcd: Etcd):
    with trio.fail_after(DEADLINE_S):
        async with EtcdClient([etcd.url]) as client, trio.open_nursery() as nursery:
            a, b = Candidate(client, A), Candidate(client, B)
            nursery.start_soon(a.run)
            nursery.start_soon(b.run)
            await until(lambda: a.elected.is_set() or b.elected.is_set(), "a leader")
            await trio.sleep(TTL_S)  # several keepalives: still exactly one leader
            leader, other = (a, b) if a.elected.is_set() else (b, a)
            assert not other.elected.is_set()
            assert await current_leader(client, "/t") == leader.url
            assert leader.leading is not None and leader.leading.reason is None
            nursery.cancel_scope.cancel()


async def test_when_the_leaders_lease_ends_the_other_takes_over_within_a_ttl(etcd: Etcd):
    with trio.fail_after(DEADLINE_S):
        async with EtcdClient([etcd.url]) as client, trio.open_nursery() as nursery:
            a = Candidate(client, A)
            nursery.start_soon(a.run)
            await a.elected.wait()
            b = Candidate(client, B)
            nursery.start_soon(b.run)
            assert a.leading is not None
            old = a.leading
            await client.revoke(old.lease)  # as etcd does when the leader dies
            await until(lambda: a.outcome is not None, "A steps down", TTL_S)
            assert a.outcome == "lost: the leader key was deleted"
            await until(b.elected.is_set, "B leads", TTL_S)
            assert b.leading is not None and b.leading.term > old.term
            assert await current_leader(client, "/t") == B
            nursery.cancel_scope.cancel()


async def test_a_deposed_leaders_fenced_write_fails_and_changes_nothing(etcd: Etcd):
    with trio.fail_after(DEADLINE_S):
        async with EtcdClient([etcd.url]) as client, trio.open_nursery() as nursery:
            store = EtcdStore(client, "/t")
            a = Candidate(client, A)
            nursery.start_soon(a.run)
            await a.elected.wait()
            assert a.leading is not None
            old = a.leading
            await store.apply(Change(apps={"web": app("web")}), fence=old.fence())
            a.scope.cancel()  # A resigns, B takes over
            b = Candidate(client, B)
            nursery.start_soon(b.run)
            await b.elected.wait()
            assert b.leading is not None
            before = await store.load()
            with pytest.raises(FenceLost):  # a deposed leader's write changes nothing
                await store.apply(Change(apps={"web": None, "x": app("x")}),
                                  fence=old.fence())
            assert await store.load() == before
            await store.apply(Change(apps={"x": app("x")}), fence=b.leading.fence())
            nursery.cancel_scope.cancel()


async def test_a_leader_that_ends_its_body_resigns_and_the_next_need_not_wait(etcd: Etcd):
    with trio.fail_after(DEADLINE_S):
        async with EtcdClient([etcd.url]) as client, trio.open_nursery() as nursery:
            async with open_leadership(client, "/t", A, TTL_S) as first:
                b = Candidate(client, B)
                nursery.start_soon(b.run)
                await trio.sleep(0.1)
                assert not b.elected.is_set()
            assert first.reason == "resigned" and first.lost.is_set()
            # well before A's lease could have expired
            await until(b.elected.is_set, "B leads", TTL_S / 2)
            nursery.cancel_scope.cancel()


async def test_followers_see_each_leader(etcd: Etcd):
    with trio.fail_after(DEADLINE_S):
        async with EtcdClient([etcd.url]) as client, trio.open_nursery() as nursery:
            seen: list[str | None] = []

            async def follow() -> None:
                async for url in watch_leader(client, "/t"):
                    seen.append(url)

            nursery.start_soon(follow)
            await until(lambda: seen == [None], "none leads yet")
            a = Candidate(client, A)
            nursery.start_soon(a.run)
            await until(lambda: seen == [None, A], "A leads")
            a.scope.cancel()
            b = Candidate(client, B)
            nursery.start_soon(b.run)
            await until(lambda: seen == [None, A, None, B], "then B")
            nursery.cancel_scope.cancel()


async def test_etcd_away_ends_leadership_and_a_campaign_wins_once_it_is_back(etcd: Etcd):
    with trio.fail_after(DEADLINE_S):
        async with EtcdClient([etcd.url], timeout_s=0.5) as client, \
                trio.open_nursery() as nursery:
            a = Candidate(client, A)
            nursery.start_soon(a.run)
            await a.elected.wait()
            await trio.to_thread.run_sync(etcd.stop)
            took = await until(lambda: a.outcome is not None, "A steps down", TTL_S + 1)
            assert a.outcome == f"lost: no lease keepalive got through for {TTL_S} s"
            assert took <= TTL_S + 0.5
            b = Candidate(client, B)
            nursery.start_soon(b.run)  # campaigns while etcd is away: retries
            await trio.sleep(0.5)
            assert not b.elected.is_set()
            await trio.to_thread.run_sync(etcd.start)
            # A's lease was not revoked (etcd was away): it ends a TTL after etcd is back
            await until(b.elected.is_set, "B leads", 3 * TTL_S + 2)
            assert await current_leader(client, "/t") == B
            nursery.cancel_scope.cancel()


async def test_a_campaign_ends_its_own_stale_term_instead_of_waiting_for_its_lease(
        etcd: Etcd):
    """A leader cut off from etcd could not revoke its lease; etcd, restarted, gives that
    lease a fresh TTL. Campaigning again under the same URL ends it at once."""
    from skr8tr.conductor import election
    from skr8tr.conductor.election import campaign, leader_key

    async with EtcdClient([etcd.url]) as client:
        lease, _ttl = await client.grant(60)
        election._granted.add(lease)  # as if this process's earlier term had granted it
        stale = await client.put(leader_key("/t"), A.encode(), lease=lease)
        with trio.fail_after(5):  # far below the stale lease's 60 s
            leadership = await campaign(client, "/t", A, TTL_S)
        assert leadership.term > stale and leadership.lease != lease
        assert await client.keepalive(lease) == 0, "the stale lease was ended"
        await client.revoke(leadership.lease)


async def test_a_key_with_our_url_under_a_lease_we_did_not_grant_is_left_alone(etcd: Etcd):
    """Two conductors misconfigured with one URL must not depose each other forever."""
    from skr8tr.conductor.election import campaign, leader_key

    async with EtcdClient([etcd.url]) as client:
        lease, _ttl = await client.grant(60)  # another process's, same URL
        await client.put(leader_key("/t"), A.encode(), lease=lease)
        with trio.move_on_after(1.5) as waited:
            await campaign(client, "/t", A, TTL_S)
        assert waited.cancelled_caught, "it waited instead of taking over"
        assert await client.keepalive(lease) > 0, "the other's lease is untouched"
        await client.revoke(lease)
