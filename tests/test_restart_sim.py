"""Conductor restarts and host loss against fake nodes under MockClock (DESIGN.md §7)."""

from __future__ import annotations

import math

import pytest
import trio

from skr8tr.core import placement_token
from tests.fakes import FakeNode, wait_for
from tests.test_rollout_sim import Harness, manifest


async def conductor_dies(nursery: trio.Nursery) -> None:
    """Like kill -9: every task of that conductor is gone at once; nodes stay."""
    nursery.cancel_scope.cancel()


async def first_conductor_deploys_then_dies(state: str, nodes: list[FakeNode],
                                            replicas: int) -> None:
    """A conductor with ``state`` deploys v1 on ``nodes``, waits until it is ready,
    then dies at once (kill -9); the nodes keep their replicas."""
    async with trio.open_nursery() as first:
        h = await Harness(first, state_path=state).start()
        for node in nodes:
            await h.reattach(node)
        await h.run("up", manifest("v1", replicas=replicas))
        await h.settled(1, replicas)
        await conductor_dies(first)


async def test_restart_readopts_every_replica_and_launches_nothing(tmp_path, autojump_clock):
    state = str(tmp_path / "state.toml")
    n1, n2 = FakeNode(None, "n1", "127.0.0.1"), FakeNode(None, "n2", "127.0.0.2")
    await first_conductor_deploys_then_dies(state, [n1, n2], replicas=4)
    before = sorted((r.replica, r.pid) for n in (n1, n2) for r in n.running.values())
    launches_before = len(n1.launches) + len(n2.launches)
    async with trio.open_nursery() as second:
        h = await Harness(second, state_path=state).start()
        assert h.cluster.apps["web"].generation == 1
        await trio.sleep(1.0)  # a node reconnects inside the grace (4 s = 2 x heartbeat)
        await h.reattach(n1)
        await h.reattach(n2)
        await trio.sleep(30)
        after = sorted((r.replica_id, r.pid) for r in h.cluster.replicas.values())
        assert after == before  # same replicas, same pids
        assert len(n1.launches) + len(n2.launches) == launches_before  # nothing new
        assert not n1.stops and not n2.stops
        assert all(r.state == "ready" for r in h.cluster.replicas.values())
        ports = {(r.address, r.port) for r in h.cluster.replicas.values()}
        assert ports == {(a, p) for a, held in h.cluster.ports.held.items() for p in held}
        # and a rollout works afterwards
        await h.run("rollout", manifest("v2", replicas=4))
        assert (await h.until_done())["state"] == "complete"
        second.cancel_scope.cancel()


async def test_a_node_that_misses_the_grace_is_replaced_and_its_duplicates_stopped(
        tmp_path, autojump_clock):
    state = str(tmp_path / "state.toml")
    n1, n2 = FakeNode(None, "n1", "127.0.0.1"), FakeNode(None, "n2", "127.0.0.2")
    await first_conductor_deploys_then_dies(state, [n1, n2], replicas=2)
    async with trio.open_nursery() as second:
        h = await Harness(second, state_path=state).start()
        await h.reattach(n1)
        await trio.sleep(10)  # n2 comes back only after the grace: its replica is re-placed
        assert len(h.replicas(1, {"ready"})) == 2
        await h.reattach(n2)
        await wait_for(lambda: len(h.cluster.replicas) == 2
                       and len(n1.running) + len(n2.running) == 2)
        assert len(n2.stops) == 1  # the duplicate
        second.cancel_scope.cancel()


async def test_host_loss_then_return_stops_the_duplicates(autojump_clock, nursery):
    h = await Harness(nursery, node_timeout_s=5.0).start()
    n1 = await h.node("n1")
    n2 = await h.node("n2", "127.0.0.2")
    await h.run("up", manifest("v1", replicas=4))
    await h.settled(1, 4)
    n2.silent = True
    await wait_for(lambda: h.cluster.nodes["n2"].expired)
    await h.settled(1, 4)  # re-placed on n1
    assert len(n1.running) == 4 and len(n2.running) == 2  # n2's processes still run
    await h.reattach(n2)  # it comes back
    await wait_for(lambda: len(n1.running) + len(n2.running) == 4)
    await h.settled(1, 4)
    assert len(n2.stops) == 2


@pytest.mark.parametrize("auto_rollback, final_state", [("yes", "rolled_back"),
                                                         ("no", "failed")])
async def test_restart_in_the_middle_of_a_rollout_ends_it_by_policy(
        tmp_path, autojump_clock, auto_rollback, final_state):
    state = str(tmp_path / "state.toml")
    policy = f"settle 4s; auto-rollback {auto_rollback}"
    n1, n2 = (FakeNode(None, "n1", "127.0.0.1", ready_after_s=None),
              FakeNode(None, "n2", "127.0.0.2", ready_after_s=None))
    async with trio.open_nursery() as first:
        h = await Harness(first, state_path=state).start()
        await h.reattach(n1)
        await h.reattach(n2)
        await h.run("up", manifest("v1", rollout=policy))
        await h.settled(1, 3)
        await h.run("rollout", manifest("v2", rollout=policy))
        await trio.sleep(6)  # one replaced, the second v2 replica is settling
        assert h.rollouts.last["web"].replaced == 1
        await conductor_dies(first)
    async with trio.open_nursery() as second:
        h = await Harness(second, state_path=state).start()
        assert h.cluster.apps["web"].rolling
        await h.reattach(n1)
        await h.reattach(n2)
        record_done = await _wait_record(h)
        status = await record_done
        assert status["state"] == final_state
        assert "interrupted by a conductor restart" in status["message"]
        await h.settled(1, 3)  # exactly the old count, all generation 1
        assert not [r for n in (n1, n2) for r in n.running.values() if r.generation == 2]
        history = await h.run("history", {"app": "web"})
        assert [(e["generation"], e["state"]) for e in history] == [(1, "complete"),
                                                                     (2, final_state)]
        second.cancel_scope.cancel()


async def _wait_record(h: Harness):
    await wait_for(lambda: "web" in h.rollouts.active or (
        "web" in h.rollouts.last and h.rollouts.last["web"].state != "rolling"
        and h.rollouts.last["web"].from_generation == 1
        and not h.cluster.apps["web"].rolling))

    async def done():
        record = h.rollouts.last["web"]
        await record.done.wait()
        return record.status(h.cluster.clock())

    return done()


async def test_unwritable_state_refuses_the_command_and_keeps_everything(
        tmp_path, autojump_clock, nursery, monkeypatch):
    state = tmp_path / "state.toml"
    h = await Harness(nursery, state_path=str(state)).start()
    await h.node("n1", ready_after_s=math.inf)
    await h.run("up", manifest("v1", replicas=1))
    on_disk = state.read_text()

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("skr8tr.conductor.state_file.os.replace", no_space)
    from skr8tr.conductor.errors import CommandError
    for cmd, args in [("scale", {"app": "web", "replicas": 3}), ("down", {"app": "web"}),
                      ("up", manifest("v1", replicas=1) | {"manifest": manifest(
                          "v1", replicas=1)["manifest"].replace("app web", "app other")}),
                      ("rollout", manifest("v2", replicas=1))]:
        with pytest.raises(CommandError) as err:
            await h.run(cmd, args)
        assert err.value.code == "INTERNAL"
        assert "No space left on device; nothing was changed" in err.value.message
    assert state.read_text() == on_disk
    assert list(tmp_path.iterdir()) == [state]  # no temporary file left behind
    app = h.cluster.apps["web"]
    assert app.desired == 1 and app.generation == 1 and len(app.history) == 1
    assert list(h.cluster.apps) == ["web"] and "web" not in h.rollouts.active


async def _crash_loop_then_die(state: str, node: FakeNode, *, crashes: int) -> dict:
    """A conductor with ``state`` runs one replica of web on ``node`` that crashes
    ``crashes`` times (exit code 1), the next launch staying up; once that one is ready
    the conductor dies (kill -9). Returns its ``list`` row."""
    node.crash_after_s = 0.0
    node.launch_hook = (lambda msg: {"crash_after_s": None}
                        if len(node.launches) > crashes else {})
    async with trio.open_nursery() as first:
        h = await Harness(first, state_path=state).start()
        await h.reattach(node)
        await h.run("up", manifest("v1", replicas=1))
        await wait_for(lambda: any(r.state == "ready" for r in h.cluster.replicas.values()),
                       timeout_s=300)
        (row,) = await h.run("list", {"app": "web"})
        await conductor_dies(first)
    return row


async def test_a_restarted_conductor_keeps_the_slot_its_restarts_and_the_last_end(
        tmp_path, autojump_clock):
    state = str(tmp_path / "state.toml")
    n1 = FakeNode(None, "n1", "127.0.0.1")
    before = await _crash_loop_then_die(state, n1, crashes=3)
    assert before["restarts"] == 3 and before["slot"] != before["replica"]
    assert (before["reason"], before["exit_code"]) == ("exited with code 1", 1)
    async with trio.open_nursery() as second:
        h = await Harness(second, state_path=state).start()
        await h.reattach(n1)
        # past the adoption grace, not past the backoff's reset (30 s of running)
        await trio.sleep(h.cluster.adopt_grace_s + 1)
        (row,) = await h.run("list", {"app": "web"})
        assert row["replica"] == before["replica"] and row["pid"] == before["pid"]
        assert (row["slot"], row["restarts"], row["reason"], row["exit_code"],
                row["signal"]) == (before["slot"], 3, "exited with code 1", 1, None)
        assert len(n1.launches) == 4  # adopted, nothing launched
        # it crashes under the new conductor: its successor counts on in the same slot
        (r,) = n1.running.values()
        r.alive = False
        del n1.running[r.replica]
        n1._report(r, "exited", exit_code=2)
        (row,) = await h.run("list", {"app": "web"})
        # the backoff goes on from the count before the restart (4th: 8 s), not from 1 s
        assert (row["state"], row["restarts"], row["next_restart"]) == ("failed", 3, 8.0)
        await wait_for(lambda: any(x.state == "ready" for x in h.cluster.replicas.values()),
                       timeout_s=300)
        (row,) = await h.run("list", {"app": "web"})
        assert row["replica"] != before["replica"]
        assert (row["slot"], row["restarts"], row["reason"]) == (
            before["slot"], 4, "exited with code 2")
        assert n1.launches[-1][1]["slot"]["restarts"] == 4
        second.cancel_scope.cancel()


async def test_an_agent_older_than_slots_gets_launches_without_one(nursery, autojump_clock):
    # Both sides refuse unknown fields: an agent of 0.1.0 would fail every relaunch that
    # carried a `slot` (launch_error), so its launches carry none; it still restarts.
    h = await Harness(nursery).start()
    n1 = await h.node("n1", version="0.1.0", crash_after_s=0.5)
    await h.run("up", manifest("v1", replicas=1))
    await wait_for(lambda: len(n1.launches) >= 3, timeout_s=60)
    assert all("slot" not in msg for _, msg in n1.launches)
    rows = await h.run("list", {"app": "web"})
    assert rows[0]["restarts"] >= 2  # the conductor counts the slot all the same


def test_reads_slots_by_version():
    from skr8tr.core.node_protocol import reads_slots

    assert reads_slots("0.2.0") and reads_slots("0.2.0.dev1") and reads_slots("1.0")
    assert reads_slots("0.10.0")
    assert not reads_slots("0.1.0") and not reads_slots("0.1.9")
    assert not reads_slots("fake") and not reads_slots("") and not reads_slots("0")
    assert not reads_slots("9" * 64 + ".0")  # a hostile number costs nothing


@pytest.mark.parametrize("forge", ["restarts", "backoff", "name", "last_end", "other_app",
                                   "mac", "old_agent"])
async def test_a_slot_not_sealed_for_the_replica_is_not_restored(
        tmp_path, autojump_clock, forge):
    """A node key holder cannot raise or reset a count, rename the slot, write its own
    reason, nor name another app's replica as the slot: the replica is still adopted
    (its placement token is right), as a slot of its own with 0 restarts. So is the
    replica of an agent from before #17, whose reports carry no slot."""
    state = str(tmp_path / "state.toml")
    n1 = FakeNode(None, "n1", "127.0.0.1")
    before = await _crash_loop_then_die(state, n1, crashes=2)
    (r,) = n1.running.values()
    slot = dict(r.slot)
    if forge == "restarts":
        slot["restarts"] = 99
    elif forge == "backoff":
        slot["backoff"] = 0
    elif forge == "name":
        slot["name"] = "web-000000"
    elif forge == "last_end":
        slot["last_end"] = {"reason": "disk on fire", "exit_code": 1, "signal": None}
    elif forge == "mac":
        slot["mac"] = "0" * 32
    async with trio.open_nursery() as second:
        h = await Harness(second, state_path=state).start()
        if forge == "other_app":
            # sealed with the real secret (as a bug might), but naming another app's replica
            slot["name"] = "api-123456"
            slot["mac"] = placement_token.make_slot(
                h.cluster.placement_secret, node_id="n1", replica=r.replica, app="web",
                name="api-123456", restarts=slot["restarts"], backoff=slot["backoff"],
                last_end=(
                    slot["last_end"]["reason"], slot["last_end"]["exit_code"],
                    slot["last_end"]["signal"]))
        r.slot = None if forge == "old_agent" else slot
        await h.reattach(n1)
        await trio.sleep(30)
        (row,) = await h.run("list", {"app": "web"})
        assert row["replica"] == before["replica"] and row["state"] == "ready"
        assert (row["slot"], row["restarts"], row["reason"]) == (row["replica"], 0, None)
        second.cancel_scope.cancel()


async def test_a_slot_sealed_for_it_but_unchanged_is_restored(tmp_path, autojump_clock):
    """The control of the test above: the same path with the slot as sent is restored."""
    state = str(tmp_path / "state.toml")
    n1 = FakeNode(None, "n1", "127.0.0.1")
    before = await _crash_loop_then_die(state, n1, crashes=2)
    async with trio.open_nursery() as second:
        h = await Harness(second, state_path=state).start()
        await h.reattach(n1)
        await trio.sleep(30)
        (row,) = await h.run("list", {"app": "web"})
        assert (row["slot"], row["restarts"]) == (before["slot"], 2)
        second.cancel_scope.cancel()


async def test_a_slot_waiting_in_backoff_at_a_restart_starts_over(tmp_path, autojump_clock):
    """What a restart does to a slot whose replica has ended and waits out its backoff
    (``next_restart``): no process runs, so no node reports it, and the state file keeps
    no replicas (DESIGN §7). The new conductor launches one replica once its adoption
    grace is over, without the rest of the wait, as a new slot with 0 restarts: the count
    survives only while a replica of the slot runs (documented, issue #17)."""
    state = str(tmp_path / "state.toml")
    n1 = FakeNode(None, "n1", "127.0.0.1", crash_after_s=0.0)
    async with trio.open_nursery() as first:
        h = await Harness(first, state_path=state).start()
        await h.reattach(n1)
        await h.run("up", manifest("v1", replicas=1))
        await wait_for(lambda: any(r.state == "failed" and r.restarts == 3
                                   for r in h.cluster.replicas.values()), timeout_s=300)
        (row,) = await h.run("list", {"app": "web"})
        assert row["next_restart"] == 8.0  # the backoff after the fourth crash
        await conductor_dies(first)
    n1.crash_after_s = None
    launched = len(n1.launches)
    async with trio.open_nursery() as second:
        t0 = trio.current_time()
        h = await Harness(second, state_path=state).start()
        await h.reattach(n1)
        await wait_for(lambda: len(n1.launches) > launched, timeout_s=300)
        assert trio.current_time() - t0 == pytest.approx(h.cluster.adopt_grace_s, abs=0.1)
        await trio.sleep(30)
        assert len(n1.launches) == launched + 1  # one, not a pile
        (row,) = await h.run("list", {"app": "web"})
        assert (row["slot"], row["restarts"], row["reason"], row["next_restart"]) == (
            row["replica"], 0, None, None)
        assert "slot" not in n1.launches[-1][1]
        second.cancel_scope.cancel()
