"""The ingress across a conductor failover: its watch follows NOT_LEADER, goes round the
--conductor list, keeps routing to the replicas it knew while no conductor serves, and
takes the new leader's snapshot as the whole truth.

Fake conductors (tests/fake_conductors.py) and fake replicas (tests/test_ingress_proxy.py),
a real ingress (run_ingress), real sockets.
"""

from __future__ import annotations

import trio

from skr8tr.ingress.daemon import IngressConfig, run_ingress
from skr8tr.ingress.routes import Route
from tests.fake_conductors import open_fakes, wait_for
from tests.test_ingress_proxy import FakeReplica, get, serve_fake_replica, snapshot

DEADLINE_S = 30


async def served_by(port: int, n: int = 6) -> set[str]:
    return {(await get(port)).headers["x-replica"] for _ in range(n)}


async def test_the_ingress_follows_the_leader_and_keeps_routing_through_a_failover():
    a, b, c = FakeReplica("a"), FakeReplica("b"), FakeReplica("c")
    with trio.fail_after(DEADLINE_S):
        async with open_fakes("follower", "leader", "follower") as (first, old, second), \
                trio.open_nursery() as nursery:
            for replica in (a, b, c):
                await nursery.start(serve_fake_replica, replica)
            first.leader = old.url
            old.state = snapshot([a, b])
            # The leader is not listed: the ingress finds it through the follower.
            config = IngressConfig(listen=("127.0.0.1", 0), routes=(Route("/", "web"),),
                                   conductor_url=f"{first.url},{second.url}")
            synced = trio.Event()
            port = await nursery.start(lambda task_status: run_ingress(
                config, synced=synced, task_status=task_status))
            await synced.wait()
            assert await served_by(port) == {"a", "b"}
            assert (first.watch_connections, old.watch_connections) == (1, 1)

            # The leader dies; an election is under way: nobody serves /v1/watch.
            first.leader = None
            old.stop()
            await wait_for(lambda: first.watch_connections >= 2
                           and second.watch_connections >= 2, "the list tried again")
            # Meanwhile every request is still routed to the replicas it knew.
            assert await served_by(port) == {"a", "b"}

            # The second one wins: its snapshot replaces the whole table.
            second.state = snapshot([c])
            second.role, first.leader = "leader", second.url
            await wait_for(lambda: second.snapshots == 1 and not a.open and not b.open,
                           "the new snapshot, a and b retired")
            assert await served_by(port) == {"c"}
            nursery.cancel_scope.cancel()
