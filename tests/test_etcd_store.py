"""EtcdStore against a real etcd: the Store behaviours (atomic changes, load gives what
was written, watch gives each state), fenced writes that keep nothing, and values that
break the state's rules refused with their key named."""

from __future__ import annotations

import json

import pytest
import trio

from skr8tr.conductor import state_file
from skr8tr.conductor.etcd_client import Compare, EtcdClient, EtcdError
from skr8tr.conductor.etcd_store import EtcdStore, FenceLost, StoredValueError, encode_app
from skr8tr.conductor.store import EMPTY, Change, StoreError, merged
from tests.conftest import free_port
from tests.etcd import Etcd, etcd_fixture  # noqa: F401 - the fixture
from tests.test_store import app

DEADLINE_S = 20
KEY = "ab" * 32


def rollout(name: str, state: str = "complete") -> dict:
    return {"app": name, "state": state, "from_generation": 1, "to_generation": 1,
            "replaced": 1, "total": 1, "message": ""}


CHAIN = [
    Change(apps={"web": app("web", 3), "api": app("api")}, rollouts={"web": rollout("web")},
           placement_key=KEY),
    Change(apps={"db": app("db", 2)}, rollouts={"api": rollout("api", "failed")}),
    Change(apps={"web": None}, rollouts={"db": rollout("db")}),  # web's rollout goes too
    Change(rollouts={"api": None}),
    Change(apps={"web": app("web", 7)}, placement_key="cd" * 32),
]


async def test_load_gives_what_each_change_left(etcd: Etcd):
    with trio.fail_after(DEADLINE_S):
        async with EtcdClient([etcd.url]) as client:
            store = EtcdStore(client, "/t")
            assert await store.load() is None
            expected = EMPTY
            for change in CHAIN:
                await store.apply(change)
                expected = merged(expected, change)
                assert await store.load() == expected
                assert await EtcdStore(client, "/t/").load() == expected, "a fresh reader"
            kvs, _ = await client.get("/t/", prefix=True)
            assert sorted(kv.key for kv in kvs) == [
                "/t/apps/api", "/t/apps/db", "/t/apps/web", "/t/placement_key",
                "/t/rollouts/db"]


async def test_one_change_is_one_transaction(etcd: Etcd):
    with trio.fail_after(DEADLINE_S):
        async with EtcdClient([etcd.url]) as client:
            store = EtcdStore(client, "/t")
            await store.apply(CHAIN[0])
            _, before = await client.get("/t/", prefix=True)
            await store.apply(Change(apps={"a": app("a"), "b": app("b"), "web": None},
                                     rollouts={"a": rollout("a")}))
            kvs, after = await client.get("/t/", prefix=True)
            assert after == before + 1, "every put and delete at one revision"
            assert {kv.key for kv in kvs if kv.mod_revision == after} == {
                "/t/apps/a", "/t/apps/b", "/t/rollouts/a"}


async def test_a_failed_fence_keeps_nothing_and_says_so(etcd: Etcd):
    with trio.fail_after(DEADLINE_S):
        async with EtcdClient([etcd.url]) as client:
            store = EtcdStore(client, "/t")
            await client.put("/t/leader", b"http://me")
            kvs, _ = await client.get("/t/leader")
            mine = [Compare.created_at("/t/leader", kvs[0].create_revision),
                    Compare.value("/t/leader", b"http://me")]
            await store.apply(CHAIN[0], fence=mine)
            before = await store.load()
            await client.delete("/t/leader")
            await client.put("/t/leader", b"http://other")
            with pytest.raises(FenceLost, match="no longer leads"):
                await store.apply(Change(apps={"web": None, "new": app("new")}), fence=mine)
            assert await store.load() == before
            assert await store.load() is not None and before is not None


async def test_a_rollout_without_its_app_is_refused_whole(etcd: Etcd):
    with trio.fail_after(DEADLINE_S):
        async with EtcdClient([etcd.url]) as client:
            store = EtcdStore(client, "/t")
            await store.apply(Change(apps={"web": app("web")}))
            with pytest.raises(StoreError, match="ghost") as caught:
                await store.apply(Change(apps={"api": app("api")},
                                         rollouts={"ghost": rollout("ghost")}))
            assert not isinstance(caught.value, FenceLost)
            stored = await store.load()
            assert stored is not None and [a.name for a in stored.apps] == ["web"]
            # a rollout of a stored app needs no app in the change
            await store.apply(Change(rollouts={"web": rollout("web")}))
            stored = await store.load()
            assert stored is not None and stored.rollouts == (rollout("web"),)


async def test_watch_gives_each_state_a_follower_sees(etcd: Etcd):
    with trio.fail_after(DEADLINE_S):
        async with EtcdClient([etcd.url]) as client:
            leader, follower = EtcdStore(client, "/t"), EtcdStore(client, "/t")
            await leader.apply(Change(apps={"old": app("old")}))
            assert await follower.load() is not None
            states = follower.watch()  # from what the follower read on
            await client.put("/t/leader", b"http://x")  # not the store's: no state
            for change in CHAIN:
                await leader.apply(change)
            await client.put("/other/apps/web", b"not ours")  # another prefix
            seen = []
            expected = merged(EMPTY, Change(apps={"old": app("old")}))
            async for state in states:
                seen.append(state)
                if len(seen) == len(CHAIN):
                    break
            for state, change in zip(seen, CHAIN, strict=True):
                expected = merged(expected, change)
                assert state == expected


async def test_watch_of_a_store_that_read_nothing_starts_at_its_first_step(etcd: Etcd):
    with trio.fail_after(DEADLINE_S):
        async with EtcdClient([etcd.url]) as client:
            writer, follower = EtcdStore(client, "/t"), EtcdStore(client, "/t")
            await writer.apply(Change(apps={"a": app("a")}))
            seen: list[tuple[str, ...]] = []
            async with trio.open_nursery() as nursery:
                async def follow() -> None:
                    async for state in follower.watch():
                        seen.append(tuple(a.name for a in state.apps))
                        if len(seen) == 2:
                            return
                nursery.start_soon(follow)
                while follower.revision == 0:  # its watch has read the state it starts from
                    await trio.sleep(0.01)
                await writer.apply(Change(apps={"b": app("b")}))
                await writer.apply(Change(apps={"a": None}))
            assert seen == [("a", "b"), ("b",)]


@pytest.mark.parametrize(("key", "value", "message"), [
    ("/t/apps/web", b"{not json", "etcd key /t/apps/web: not JSON"),
    ("/t/apps/Bad_Name", None, "etcd key /t/apps/Bad_Name: app name 'Bad_Name' is not valid"),
    ("/t/apps/web", "sha",
     r"etcd key /t/apps/web field revisions\[0\]\.sha256: .* does not match"),
    ("/t/apps/web", "desired", "etcd key /t/apps/web field desired: .* expected a whole"),
    ("/t/rollouts/web", b'{"app": "api"}', "etcd key /t/rollouts/web: expected a rollout "
     "status object whose app is 'web'"),
    ("/t/rollouts/web", b'{"app": "web", "state": "bogus"}', "etcd key /t/rollouts/web: "
     "rollout entry #1: from_generation is missing"),
    ("/t/placement_key", b"short", "etcd key /t/placement_key: placement_key is not 64"),
    ("/t/apps/web", b'{"generation": NaN}', "etcd key /t/apps/web: not JSON"),
])
async def test_values_that_break_the_rules_name_their_key(etcd: Etcd, key, value, message):
    with trio.fail_after(DEADLINE_S):
        async with EtcdClient([etcd.url]) as client:
            store = EtcdStore(client, "/t")
            await store.apply(Change(apps={"web": app("web")}))
            good = json.loads(encode_app(app("web")))
            if value is None:
                value = encode_app(app("web"))
            elif value == "sha":
                good["revisions"][0]["sha256"] = "0" * 64
                value = json.dumps(good).encode()
            elif value == "desired":
                good["desired"] = -1
                value = json.dumps(good).encode()
            await client.put(key, value)
            with pytest.raises(StoredValueError, match=message) as caught:
                await store.load()
            assert isinstance(caught.value, state_file.StateFileError)
            assert "\n" not in str(caught.value)


async def test_etcd_away_is_a_store_error_and_keeps_nothing(etcd: Etcd):
    with trio.fail_after(DEADLINE_S):
        async with EtcdClient([etcd.url]) as client:
            store = EtcdStore(client, "/t")
            await store.apply(Change(apps={"web": app("web")}))
            await trio.to_thread.run_sync(etcd.stop)
            with pytest.raises(StoreError, match="no etcd endpoint answers"):
                await store.apply(Change(apps={"api": app("api")}))
            with pytest.raises(StoreError, match="cannot read"):
                await store.load()
            await trio.to_thread.run_sync(etcd.start)
            stored = await store.load()
            assert stored is not None and [a.name for a in stored.apps] == ["web"]


async def test_the_next_endpoint_answers_when_the_first_cannot_be_reached(etcd: Etcd):
    with trio.fail_after(DEADLINE_S):
        dead = f"http://127.0.0.1:{free_port()}"
        async with EtcdClient([dead, etcd.url]) as client:
            await EtcdStore(client, "/t").apply(Change(apps={"web": app("web")}))
            assert client.endpoints[client._preferred] == etcd.url
        async with EtcdClient([dead]) as client:
            with pytest.raises(EtcdError, match=f"no etcd endpoint answers \\({dead}\\)"):
                await client.get("/t")


class CountingClient(EtcdClient):
    """An EtcdClient that counts its transactions."""

    txns = 0

    async def txn(self, *args, **kwargs):
        self.txns += 1
        return await super().txn(*args, **kwargs)


async def test_changes_in_flight_together_share_transactions(etcd: Etcd):
    """Group commit: 60 commands' changes at once cost a few etcd commits, not 60, and
    each change is all there."""
    with trio.fail_after(DEADLINE_S):
        async with CountingClient([etcd.url]) as client:
            store = EtcdStore(client, "/t")
            async with trio.open_nursery() as nursery:
                for i in range(60):
                    nursery.start_soon(store.apply, Change(apps={f"a{i}": app(f"a{i}", i)},
                                                           rollouts={f"a{i}": rollout(f"a{i}")}))
            assert client.txns <= 10, client.txns
            stored = await store.load()
            assert stored is not None
            assert sorted(a.name for a in stored.apps) == sorted(f"a{i}" for i in range(60))
            assert {a.name: a.desired for a in stored.apps} == {f"a{i}": i for i in range(60)}
            assert len(stored.rollouts) == 60


async def test_one_refused_change_in_a_batch_keeps_the_others(etcd: Etcd):
    with trio.fail_after(DEADLINE_S):
        async with EtcdClient([etcd.url]) as client:
            store = EtcdStore(client, "/t")
            outcomes: dict[str, str] = {}

            async def apply(name: str, change: Change) -> None:
                try:
                    await store.apply(change)
                    outcomes[name] = "ok"
                except StoreError as exc:
                    outcomes[name] = type(exc).__name__

            async with trio.open_nursery() as nursery:
                for i in range(20):
                    nursery.start_soon(apply, f"a{i}", Change(apps={f"a{i}": app(f"a{i}")}))
                nursery.start_soon(apply, "ghost", Change(rollouts={"ghost": rollout("ghost")}))
            assert outcomes.pop("ghost") == "StoreError"
            assert set(outcomes.values()) == {"ok"} and len(outcomes) == 20
            stored = await store.load()
            assert stored is not None and len(stored.apps) == 20 and stored.rollouts == ()


async def test_a_waiter_cancelled_in_the_queue_is_not_written_and_stops_no_one(etcd: Etcd):
    with trio.fail_after(DEADLINE_S):
        async with EtcdClient([etcd.url]) as client:
            store = EtcdStore(client, "/t")
            async with trio.open_nursery() as nursery:
                for i in range(10):
                    nursery.start_soon(store.apply, Change(apps={f"a{i}": app(f"a{i}")}))
                while not store._writing:  # one of them is writing; the rest wait their turn
                    await trio.sleep(0)
                with trio.CancelScope() as scope:
                    scope.cancel()  # queued behind the writer, cancelled before its turn
                    await store.apply(Change(apps={"never": app("never")}))
            stored = await store.load()
            assert stored is not None
            assert sorted(a.name for a in stored.apps) == sorted(f"a{i}" for i in range(10))


async def test_a_pruned_app_and_a_restarts_record_round_trip_and_the_counter_holds(
        etcd: Etcd):
    """#17 retention on etcd (HA): what pruning leaves — last_generation above the kept
    revisions, rows that keep their manifest's hash, a restart's kind and count — is what
    a new leader loads, and it goes on after last_generation."""
    from skr8tr.conductor.cluster import Cluster
    from tests.test_state_file import PRUNED

    with trio.fail_after(DEADLINE_S):
        async with EtcdClient([etcd.url]) as client:
            store = EtcdStore(client, "/t")
            web = PRUNED.apps[0]
            await store.apply(Change(apps={"web": web}, rollouts={"web": PRUNED.rollouts[0]}))
            loaded = await EtcdStore(client, "/t").load()
            assert loaded.apps == PRUNED.apps and loaded.rollouts == PRUNED.rollouts
            value = json.loads((await client.get("/t/apps/web"))[0][0].value)
            assert value["last_generation"] == 12
            assert [h.get("sha256") is not None for h in value["history"]] == [
                False, True, False, False]
            leader = Cluster(store=EtcdStore(client, "/t"))
            _, interrupted = await leader.open_store("etcd")
            assert interrupted == ["web"]
            assert leader.apps["web"].last_generation == 12
            # A value whose counter went back below a stored revision is refused.
            value["last_generation"] = 11
            await client.put("/t/apps/web", json.dumps(value).encode())
            with pytest.raises(StoredValueError, match=r"etcd key /t/apps/web field "
                               r"last_generation: .* expected a whole number >= 12"):
                await store.load()
