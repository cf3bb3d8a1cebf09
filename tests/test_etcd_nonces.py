"""The §4 nonce guard in etcd, against a real etcd: fresh then REPLAY, cluster-wide across
two guards, one replay in a batch refusing only itself, exactly-once under concurrency,
keys under bucket leases that outlive the window, a deposed leader writing nothing, etcd
away giving an error and never "fresh", and the api's admit path (local guard first)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import httpx
import pytest
import trio

from skr8tr.conductor.election import campaign
from skr8tr.conductor.etcd_client import EtcdClient
from skr8tr.conductor.etcd_nonces import EtcdNonceGuard, admit_request
from skr8tr.conductor.store import FenceLost, StoreUnavailable
from skr8tr.core import protocol
from skr8tr.core.envelope import ReplayGuard
from skr8tr.core.keys import parse_authorized_keys
from skr8tr.core.signatures import ED25519, Signer
from tests.etcd import Etcd, etcd_fixture  # noqa: F401 - the fixture

DEADLINE_S = 30
PREFIX = "/t"
KEY = "ab" * 32
OTHER_KEY = "cd" * 32
TS = 1_700_000_000.0


def nonce(i: int) -> str:
    return f"{i:032x}"


@asynccontextmanager
async def serving(guard: EtcdNonceGuard) -> AsyncIterator[EtcdNonceGuard]:
    async with trio.open_nursery() as nursery:
        await nursery.start(guard.serve)
        yield guard
        nursery.cancel_scope.cancel()


async def nonce_keys(client: EtcdClient) -> list[str]:
    kvs, _revision = await client.get(PREFIX + "/nonces/", prefix=True)
    return [kv.key for kv in kvs]


async def test_fresh_then_replay_and_the_key_layout(etcd: Etcd):
    with trio.fail_after(DEADLINE_S):
        async with EtcdClient([etcd.url]) as client, \
                serving(EtcdNonceGuard(client, PREFIX)) as guard:
            assert await guard.spend(KEY, nonce(1), TS) is True
            assert await guard.spend(KEY, nonce(1), TS) is False
            # the same nonce from another key is another request
            assert await guard.spend(OTHER_KEY, nonce(1), TS) is True
            keys = await nonce_keys(client)
            assert keys == sorted([guard.key(KEY, nonce(1)), guard.key(OTHER_KEY, nonce(1))])
            assert guard.key(KEY, nonce(1)).startswith(PREFIX + "/nonces/sha256:")
            assert guard.key(KEY, nonce(1)).endswith("/" + nonce(1))


async def test_accepted_by_one_conductor_is_a_replay_on_the_other(etcd: Etcd):
    with trio.fail_after(DEADLINE_S):
        async with EtcdClient([etcd.url]) as client_a, EtcdClient([etcd.url]) as client_b, \
                serving(EtcdNonceGuard(client_a, PREFIX)) as a, \
                serving(EtcdNonceGuard(client_b, PREFIX)) as b:
            assert await a.spend(KEY, nonce(1), TS) is True
            assert await b.spend(KEY, nonce(1), TS) is False
            assert await b.spend(KEY, nonce(2), TS) is True
            assert await a.spend(KEY, nonce(2), TS) is False


async def test_one_replayed_nonce_in_a_batch_refuses_only_itself(etcd: Etcd):
    with trio.fail_after(DEADLINE_S):
        async with EtcdClient([etcd.url]) as client, \
                serving(EtcdNonceGuard(client, PREFIX)) as guard:
            assert await guard.spend(KEY, nonce(25), TS) is True
            before = guard.transactions
            results: dict[int, bool] = {}

            async def spend(i: int) -> None:
                results[i] = await guard.spend(KEY, nonce(i), TS)

            async with trio.open_nursery() as nursery:
                for i in range(51):  # 0..50: 50 fresh ones and nonce 25 again
                    nursery.start_soon(spend, i)
            assert results == {i: i != 25 for i in range(51)}
            # one batch: refused as a whole (it read which keys exist), then the 50 again
            assert guard.transactions - before == 2
            assert len(await nonce_keys(client)) == 51


@pytest.mark.parametrize("how", ["one guard", "two guards", "no batching"])
async def test_each_of_100_nonces_sent_twice_at_once_is_fresh_exactly_once(etcd: Etcd,
                                                                           how: str):
    with trio.fail_after(DEADLINE_S):
        async with EtcdClient([etcd.url]) as client_a, EtcdClient([etcd.url]) as client_b, \
                serving(EtcdNonceGuard(client_a, PREFIX, batch=how != "no batching")) as a, \
                serving(EtcdNonceGuard(client_b, PREFIX)) as b:
            guards = [a, b if how == "two guards" else a]
            fresh: list[str] = []

            async def spend(i: int) -> None:
                n = nonce(i // 2)
                if await guards[i % 2].spend(KEY, n, TS):
                    fresh.append(n)

            async with trio.open_nursery() as nursery:
                for i in range(200):
                    nursery.start_soon(spend, i)
            assert sorted(fresh) == [nonce(i) for i in range(100)]
            assert len(await nonce_keys(client_a)) == 100
            if how != "no batching":  # group commit: far fewer transactions than spends
                assert a.transactions + (b.transactions if how == "two guards" else 0) < 100


async def time_to_live(etcd: Etcd, lease: int) -> tuple[int, int]:
    """(TTL left, TTL granted) of ``lease``, from etcd's lease timetolive."""
    async with httpx.AsyncClient() as http:
        answer = (await http.post(etcd.url + "/v3/lease/timetolive",
                                  json={"ID": str(lease)})).json()
    return int(answer.get("TTL", -1)), int(answer.get("grantedTTL", 0))


async def test_keys_carry_a_bucket_lease_that_outlives_the_window(etcd: Etcd):
    now = [1000.0]
    with trio.fail_after(DEADLINE_S):
        async with EtcdClient([etcd.url]) as client, \
                serving(EtcdNonceGuard(client, PREFIX, clock=lambda: now[0])) as guard:

            async def lease_of(n: str) -> int:
                assert await guard.spend(KEY, n, TS) is True
                kvs, _revision = await client.get(guard.key(KEY, n))
                return kvs[0].lease

            first = await lease_of(nonce(1))
            assert first != 0
            left, granted = await time_to_live(etcd, first)
            # 60 s = 2 x 30 s window, plus the 30 s bucket and the 10 s skew margin
            assert granted == guard.ttl_s == 100
            assert left >= 60
            now[0] += 29.9  # same bucket: same lease, no new grant
            assert await lease_of(nonce(2)) == first
            now[0] += 0.1  # the bucket is over: a new lease
            second = await lease_of(nonce(3))
            assert second not in (0, first)
            assert (await time_to_live(etcd, second))[1] == 100
            now[0] += 5
            assert await lease_of(nonce(4)) == second


async def test_a_lease_etcd_no_longer_has_is_replaced(etcd: Etcd):
    with trio.fail_after(DEADLINE_S):
        async with EtcdClient([etcd.url]) as client, \
                serving(EtcdNonceGuard(client, PREFIX)) as guard:
            assert await guard.spend(KEY, nonce(1), TS) is True
            (kv,), _revision = await client.get(guard.key(KEY, nonce(1)))
            await client.revoke(kv.lease)  # deletes nonce 1 with it
            assert await guard.spend(KEY, nonce(2), TS) is True
            (kv2,), _revision = await client.get(guard.key(KEY, nonce(2)))
            assert kv2.lease not in (0, kv.lease)


@pytest.mark.parametrize("batch", [True, False])
async def test_a_deposed_leader_gets_fence_lost_and_writes_nothing(etcd: Etcd, batch: bool):
    with trio.fail_after(DEADLINE_S):
        async with EtcdClient([etcd.url]) as client:
            leadership = await campaign(client, PREFIX, "ws://a", ttl_s=30)
            guard = EtcdNonceGuard(client, PREFIX, fence=leadership.fence, batch=batch)
            async with serving(guard):
                assert await guard.spend(KEY, nonce(1), TS) is True
                await client.revoke(leadership.lease)  # A's lease ends, B takes over
                await campaign(client, PREFIX, "ws://b", ttl_s=30)
                outcomes: list[str] = []

                async def spend(i: int) -> None:
                    try:
                        outcomes.append(str(await guard.spend(KEY, nonce(i), TS)))
                    except FenceLost as exc:
                        outcomes.append(f"FenceLost: {exc}")

                async with trio.open_nursery() as nursery:
                    for i in range(2, 12):
                        nursery.start_soon(spend, i)
                assert len(outcomes) == 10
                assert all(o.startswith("FenceLost: ") and "no longer leads" in o
                           for o in outcomes), outcomes
                # a nonce already spent is still a replay, fence or not
                assert await guard.spend(KEY, nonce(1), TS) is False
            assert await nonce_keys(client) == [guard.key(KEY, nonce(1))]


async def test_a_fence_that_names_no_term_writes_nothing(etcd: Etcd):
    with trio.fail_after(DEADLINE_S):
        async with EtcdClient([etcd.url]) as client, \
                serving(EtcdNonceGuard(client, PREFIX, fence=lambda: None)) as guard:
            with pytest.raises(FenceLost, match="does not lead"):
                await guard.spend(KEY, nonce(1), TS)
            assert await nonce_keys(client) == []


async def test_etcd_away_is_an_error_never_fresh_and_the_guard_recovers(etcd: Etcd):
    with trio.fail_after(DEADLINE_S):
        async with EtcdClient([etcd.url], timeout_s=0.5) as client, \
                serving(EtcdNonceGuard(client, PREFIX)) as guard:
            assert await guard.spend(KEY, nonce(1), TS) is True
            await trio.to_thread.run_sync(etcd.stop)
            for n in (nonce(1), nonce(2)):  # a replay and a fresh one: neither is judged
                with pytest.raises(StoreUnavailable, match="nonce not recorded in etcd"):
                    await guard.spend(KEY, n, TS)
            await trio.to_thread.run_sync(etcd.start)
            assert await nonce_keys(client) == [guard.key(KEY, nonce(1))]
            assert await guard.spend(KEY, nonce(1), TS) is False
            assert await guard.spend(KEY, nonce(2), TS) is True


async def test_spend_without_serve_says_what_to_start(etcd: Etcd):
    async with EtcdClient([etcd.url]) as client:
        with pytest.raises(RuntimeError, match="serve is not running"):
            await EtcdNonceGuard(client, PREFIX).spend(KEY, nonce(1), TS)


# --------------------------------------------------------------------------- the api's path

ADMIN = Signer(ED25519, bytes(range(32)))
AUTHORIZED = parse_authorized_keys(f"admin {ADMIN.public}\n", filename="ak")
NOW = 1_800_000_000.0


def signed(cmd: str = "scale", args: dict | None = None, ts: float = NOW) -> str:
    return json.dumps(protocol.request_message(
        id="r1", cmd=cmd, args={"app": "web", "replicas": 2} if args is None else args,
        signing_key=ADMIN, ts=ts))


def admitter(guard: EtcdNonceGuard | None) -> Callable[[str], object]:
    local = ReplayGuard()

    async def admit(text: str, now: float = NOW):
        auth = protocol.authenticate_request(text, authorized=AUTHORIZED)
        return await admit_request(auth, guard=local, nonces=guard, now=now)
    return admit


def code(reply: object) -> str:
    return reply.code if isinstance(reply, protocol.DecodeError) else "OK"


async def test_admit_a_request_once_in_the_cluster(etcd: Etcd):
    with trio.fail_after(DEADLINE_S):
        async with EtcdClient([etcd.url]) as client, \
                serving(EtcdNonceGuard(client, PREFIX)) as a, \
                serving(EtcdNonceGuard(client, PREFIX)) as b:
            on_a, on_b = admitter(a), admitter(b)
            text = signed()
            request = await on_a(text)
            assert isinstance(request, protocol.Request)
            assert request.signer is not None and request.args["replicas"] == 2
            before = a.transactions
            again = await on_a(text)  # seen here: refused by memory, no round trip
            assert (code(again), a.transactions) == ("REPLAY", before)
            elsewhere = await on_b(text)
            assert code(elsewhere) == "REPLAY"
            assert "another conductor" in elsewhere.message
            # freshness is judged first, by the local guard, before etcd
            assert code(await on_b(signed(ts=NOW - 31))) == "EXPIRED"
            # bad args: the nonce is spent all the same (§4), then BAD_REQUEST
            bad = signed(args={"app": "web", "replicas": "two"})
            assert code(await on_a(bad)) == "BAD_REQUEST"
            assert code(await on_b(bad)) == "REPLAY"
            # read-only and unsigned: no nonce, no etcd
            assert code(await on_b(json.dumps({"v": 1, "id": "p", "cmd": "ping",
                                               "args": {}}))) == "OK"
            assert len(await nonce_keys(client)) == 2


async def test_admit_raises_store_error_when_etcd_is_away(etcd: Etcd):
    with trio.fail_after(DEADLINE_S):
        async with EtcdClient([etcd.url], timeout_s=0.5) as client, \
                serving(EtcdNonceGuard(client, PREFIX)) as guard:
            admit = admitter(guard)
            await trio.to_thread.run_sync(etcd.stop)
            text = signed()
            with pytest.raises(StoreUnavailable):
                await admit(text)
            await trio.to_thread.run_sync(etcd.start)
            # spent in memory: the same signed request is not retried into a double
            assert code(await admit(text)) == "REPLAY"
