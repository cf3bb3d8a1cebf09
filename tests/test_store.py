"""The Store interface and its file implementation: atomic changes, group commit off the
event loop, failed writes that keep nothing, and commands that end the store as memory."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from skr8tr.conductor import audit, state_file
from skr8tr.conductor.errors import CommandError
from skr8tr.conductor.file_store import FileStore
from skr8tr.conductor.store import Change, MemoryStore, StoreError, merged
from skr8tr.core import audit_chain
from tests.test_rollout_sim import Harness, manifest
from tests.test_state_file import GOOD, sha


def app(name: str, desired: int = 1) -> state_file.StoredApp:
    text = f"app {name}\n  exec /bin/server\n  replicas {desired}\n"
    revision = state_file.StoredRevision(1, "skr8tr", "/srv", sha(text), text)
    return state_file.StoredApp(name, 1, desired, 0, 0, (revision,), GOOD.apps[0].history[:1])


names = st.sampled_from(["a", "b", "c", "d"])
changes = st.builds(
    Change,
    apps=st.dictionaries(names, st.one_of(st.none(), st.integers(0, 9))).map(
        lambda picks: {n: None if d is None else app(n, d) for n, d in picks.items()}),
    rollouts=st.dictionaries(names, st.booleans()).map(
        lambda picks: {n: {"app": n, "state": "complete"} if keep else None
                       for n, keep in picks.items()}))


@given(st.lists(changes, max_size=6))
def test_merged_keeps_every_app_once_sorted_and_no_rollout_without_its_app(chain):
    state = state_file.StoredState(apps=(), rollouts=())
    for change in chain:
        state = merged(state, change)
        # the last word on each app wins
        for name, value in change.apps.items():
            assert (value in state.apps) if value is not None else all(
                a.name != name for a in state.apps)
    assert [a.name for a in state.apps] == sorted({a.name for a in state.apps})
    assert {r["app"] for r in state.rollouts} <= {a.name for a in state.apps}


async def test_concurrent_changes_share_writes_and_all_reach_the_file(tmp_path: Path):
    path = str(tmp_path / "state.toml")
    store = FileStore(path)
    assert await store.load() is None

    async def one(i: int) -> None:
        await store.apply(Change(apps={f"app{i:02d}": app(f"app{i:02d}", i)}))

    async with trio.open_nursery() as nursery:
        for i in range(20):
            nursery.start_soon(one, i)
    assert store.changes == 20
    assert store.writes <= 2, "the first write carries one change, the next all the others"
    stored = state_file.load(path)
    assert stored is not None
    assert [(a.name, a.desired) for a in stored.apps] == [(f"app{i:02d}", i) for i in range(20)]


async def test_the_event_loop_runs_while_the_file_is_written(tmp_path: Path, monkeypatch):
    release, entered = threading.Event(), threading.Event()
    save = state_file.save

    def slow_save(path, state):
        entered.set()
        release.wait(10)
        save(path, state)

    monkeypatch.setattr(state_file, "save", slow_save)
    store = FileStore(str(tmp_path / "state.toml"))
    await store.load()
    ticks = 0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(store.apply, Change(apps={"web": app("web")}))
        while not entered.is_set():
            await trio.sleep(0.001)
        for _ in range(5):  # the loop goes on while the thread is inside the write
            await trio.sleep(0)
            ticks += 1
        assert store.writes == 0
        release.set()
    assert ticks == 5 and store.writes == 1


async def test_a_failed_write_keeps_nothing_of_its_changes(tmp_path: Path, monkeypatch):
    path = str(tmp_path / "state.toml")
    store = FileStore(path)
    await store.load()
    await store.apply(Change(apps={"web": app("web", 3)}))
    before = Path(path).read_bytes()

    def broken(path, state):
        raise state_file.StateWriteError(f"cannot write the state file {path}: No space left")

    monkeypatch.setattr(state_file, "save", broken)
    with pytest.raises(StoreError, match="No space left"):
        await store.apply(Change(apps={"api": app("api")}))
    assert Path(path).read_bytes() == before
    monkeypatch.undo()
    await store.apply(Change(apps={"db": app("db")}))
    stored = state_file.load(path)
    assert stored is not None and [a.name for a in stored.apps] == ["db", "web"], \
        "the failed change is not carried by the next write"


async def test_a_first_write_without_load_keeps_what_the_file_holds(tmp_path: Path):
    path = str(tmp_path / "state.toml")
    state_file.save(path, state_file.StoredState(apps=(app("old"),), rollouts=()))
    await FileStore(path).apply(Change(apps={"new": app("new")}))
    stored = state_file.load(path)
    assert stored is not None and [a.name for a in stored.apps] == ["new", "old"]


@pytest.mark.parametrize("make", [MemoryStore, "file"])
async def test_watch_sees_each_applied_state(tmp_path: Path, make):
    store = MemoryStore() if make is MemoryStore else FileStore(str(tmp_path / "s.toml"))
    seen = []
    states = store.watch()  # from here on
    async with trio.open_nursery() as nursery:
        async def follow():
            async for state in states:
                seen.append(tuple(a.name for a in state.apps))
                if len(seen) == 2:
                    return
        nursery.start_soon(follow)
        await store.apply(Change(apps={"a": app("a")}))
        await trio.sleep(0.01)
        await store.apply(Change(apps={"b": app("b")}))
    assert seen == [("a",), ("a", "b")]


async def test_commands_on_one_app_end_the_store_as_memory(tmp_path, autojump_clock,
                                                           nursery):
    """Two `up`s of one app with different manifests at once: one creates it, the other
    is refused (CONFLICT), never both written with memory holding the one or the other."""
    state = str(tmp_path / "state.toml")
    h = await Harness(nursery, state_path=state).start()
    await h.node("n1")
    outcomes = []

    async def up(replicas: int) -> None:
        try:
            await h.run("up", manifest(replicas=replicas))
            outcomes.append(("ok", replicas))
        except CommandError as exc:
            outcomes.append((exc.code, replicas))

    async with trio.open_nursery() as inner:
        for n in (1, 2):
            inner.start_soon(up, n)
    assert sorted(code for code, _ in outcomes) == ["CONFLICT", "ok"]
    created = next(n for code, n in outcomes if code == "ok")
    stored = state_file.load(state)
    assert stored is not None and stored.apps[0].desired == created
    assert h.cluster.apps["web"].desired == created
    async with trio.open_nursery() as inner:
        for n in (3, 5, 2, 4):
            inner.start_soon(h.run, "scale", {"app": "web", "replicas": n})
    stored = state_file.load(state)
    assert stored is not None
    assert stored.apps[0].desired == h.cluster.apps["web"].desired


async def test_audit_entries_share_fsyncs_and_keep_the_chain(tmp_path: Path, monkeypatch):
    log = audit.AuditLog.open(str(tmp_path / "audit.log"), quiet=True)
    fsyncs = 0
    real = os.fsync

    def counting(fd):
        nonlocal fsyncs
        fsyncs += 1
        real(fd)

    monkeypatch.setattr(os, "fsync", counting)
    async with trio.open_nursery() as nursery:
        await nursery.start(log.serve)

        async def one(i: int) -> None:
            await log.written(log.append({"cmd": "scale", "i": i}, 1_700_000_000.0 + i))

        async with trio.open_nursery() as inner:
            for i in range(30):
                inner.start_soon(one, i)
        nursery.cancel_scope.cancel()
    log.close()
    data = (tmp_path / "audit.log").read_bytes()
    assert audit_chain.verify(data).head.entries == 30
    assert audit.read_head_file(str(tmp_path / "audit.log")) == audit_chain.verify(data).head
    assert fsyncs < 30 * 2, "each entry alone would fsync the log and its head file"
