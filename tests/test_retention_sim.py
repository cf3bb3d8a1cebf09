"""Revision retention and the never-reused generation counter (#17), and what an
interrupted restart keeps across a conductor restart, against fake nodes under MockClock."""

from __future__ import annotations

import hashlib

import pytest
import trio

from skr8tr.conductor import state_file
from skr8tr.conductor.errors import CommandError
from skr8tr.core.revisions import HISTORY_KEPT
from tests.fakes import FakeNode, wait_for
from tests.test_restart_sim import conductor_dies
from tests.test_rollout_sim import Harness, manifest

QUICK = "settle 1s"


async def restart(h: Harness) -> dict:
    await h.run("restart", {"app": "web", "force": False})
    final = await h.until_done()
    assert final["state"] == "complete", final
    return final


async def test_restarts_keep_n_plus_one_manifests_undo_works_and_the_counter_goes_on(
        tmp_path, autojump_clock):
    state = str(tmp_path / "state.toml")
    n1 = FakeNode(None, "n1", "127.0.0.1")
    async with trio.open_nursery() as first:
        h = await Harness(first, state_path=state).start()
        h.cluster.keep_revisions = 4
        await h.reattach(n1)
        await h.run("up", manifest("v1", replicas=2, rollout=QUICK))
        await h.settled(1, 2)
        await h.run("rollout", manifest("v2", replicas=2, rollout=QUICK))
        await h.until_done()
        for _ in range(15):  # generations 3..17, all of v2
            await restart(h)
        app = h.cluster.apps["web"]
        # The current one (17), the plain-undo target (1, the last v1), the newest others.
        assert sorted(app.revisions) == [1, 14, 15, 16, 17]
        assert app.last_generation == 17
        await wait_for(lambda: len(state_file.load(state).apps[0].history) == 17)
        stored = state_file.load(state).apps[0]
        assert [r.generation for r in stored.revisions] == [1, 14, 15, 16, 17]
        assert stored.last_generation == 17
        history = await h.run("history", {"app": "web"})
        assert [e["generation"] for e in history] == list(range(1, 18))
        assert [e["generation"] for e in history if not e["manifest_kept"]] == list(
            range(2, 14))
        # A pruned row still names its manifest (the same v2 as the current one).
        assert history[4]["manifest_sha256"] == history[-1]["manifest_sha256"]
        for cmd, args in (("revision", {"app": "web", "generation": 5}),
                          ("rollout-undo", {"app": "web", "to": 5, "force": False})):
            with pytest.raises(CommandError) as err:
                await h.run(cmd, args)
            assert err.value.code == "NOT_FOUND"
            assert "generation 5" in err.value.message and "was pruned" in err.value.message
            assert "4 others" in err.value.message and "--keep-revisions" in err.value.message
        with pytest.raises(CommandError) as err:  # one never taken is not "pruned"
            await h.run("revision", {"app": "web", "generation": 18})
        assert err.value.code == "NOT_FOUND" and "pruned" not in err.value.message
        # A plain undo goes back to v1 (generation 1, kept for it) under generation 18.
        undone = await h.run("rollout-undo", {"app": "web", "to": None, "force": False})
        assert (undone["from_generation"], undone["to_generation"]) == (17, 18)
        assert (await h.until_done())["state"] == "complete"
        assert h.cluster.apps["web"].revision.text == manifest("v1", replicas=2,
                                                               rollout=QUICK)["manifest"]
        assert len(h.cluster.apps["web"].revisions) <= 5
        await wait_for(lambda: state_file.load(state).apps[0].generation == 18)
        await conductor_dies(first)
    async with trio.open_nursery() as second:
        h = await Harness(second, state_path=state).start()
        await h.reattach(n1)
        await h.settled(18, 2)
        after = await restart(h)
        assert (after["from_generation"], after["to_generation"]) == (18, 19)
        second.cancel_scope.cancel()


async def test_the_counter_never_goes_back_below_last_generation(tmp_path, autojump_clock):
    """A state whose newest generations were all pruned (here: written so) still takes
    the number after last_generation."""
    state = str(tmp_path / "state.toml")
    text = manifest("v1", replicas=1, rollout=QUICK)["manifest"]
    sha = hashlib.sha256(text.encode()).hexdigest()
    state_file.save(state, state_file.StoredState(apps=(state_file.StoredApp(
        "web", 7, 1, 0, 0, (state_file.StoredRevision(7, "skr8tr", "/srv/apps", sha, text),),
        (state_file.StoredHistory(7, "complete", 1.0, 2.0),
         state_file.StoredHistory(30, "aborted", 3.0, 4.0, sha)),
        last_generation=30),), rollouts=()))
    async with trio.open_nursery() as nursery:
        h = await Harness(nursery, state_path=state).start()
        await h.node("n1")
        await h.settled(7, 1)
        final = await restart(h)
        assert (final["from_generation"], final["to_generation"]) == (7, 31)
        nursery.cancel_scope.cancel()


async def test_history_rows_are_bounded_too(autojump_clock, nursery):
    h = await Harness(nursery).start()
    h.cluster.keep_revisions = 2
    await h.node("n1")
    await h.run("up", manifest("v1", replicas=1, rollout=QUICK))
    await h.settled(1, 1)
    await h.run("rollout", manifest("v2", replicas=1, rollout=QUICK))
    await h.until_done()
    for _ in range(HISTORY_KEPT + 5):
        await restart(h)
    app = h.cluster.apps["web"]
    last = HISTORY_KEPT + 7
    assert app.last_generation == last
    # The newest HISTORY_KEPT rows, and the row of generation 1 whose manifest a plain
    # undo needs; 3 manifests: the current one, the undo target, the one before.
    assert [e.generation for e in app.history] == [1, *range(last - HISTORY_KEPT + 1,
                                                             last + 1)]
    assert sorted(app.revisions) == [1, last - 1, last]
    with pytest.raises(CommandError) as err:
        await h.run("rollout-undo", {"app": "web", "to": 3, "force": False})
    assert "pruned" in err.value.message


async def test_an_interrupted_restart_keeps_its_kind_and_count(tmp_path, autojump_clock):
    state = str(tmp_path / "state.toml")
    policy = "settle 4s"
    n1, n2 = (FakeNode(None, "n1", "127.0.0.1", ready_after_s=None),
              FakeNode(None, "n2", "127.0.0.2", ready_after_s=None))
    async with trio.open_nursery() as first:
        h = await Harness(first, state_path=state).start()
        await h.reattach(n1)
        await h.reattach(n2)
        await h.run("up", manifest("v1", rollout=policy))
        await h.settled(1, 3)
        await h.run("scale", {"app": "web", "replicas": 5})
        await h.settled(1, 5)
        await h.run("restart", {"app": "web", "force": False})
        # Durable from its start, before any batch: what it is and the count it keeps.
        stored = state_file.load(state).rollouts[0]
        assert (stored["state"], stored["kind"], stored["desired"]) == ("rolling",
                                                                         "restart", 5)
        await trio.sleep(6)  # one replaced, the second batch settling
        await conductor_dies(first)
    async with trio.open_nursery() as second:
        h = await Harness(second, state_path=state).start()
        record = h.rollouts.last["web"]
        assert (record.kind, record.desired) == ("restart", 5)
        await h.reattach(n1)
        await h.reattach(n2)
        await wait_for(lambda: h.rollouts.last["web"].done.is_set())
        assert h.rollouts.last["web"].state == "rolled_back"
        interrupted = [e.data for e in h.cluster.events.recent
                       if e.event == "rollout.interrupted"]
        assert [(e["kind"], e["to_generation"]) for e in interrupted] == [("restart", 2)]
        await h.settled(1, 5)  # the scaled count, not the manifest's 3
        assert h.cluster.apps["web"].desired == 5
        await wait_for(lambda: state_file.load(state).rollouts[0]["state"] == "rolled_back")
        assert state_file.load(state).rollouts[0]["kind"] == "restart"
        second.cancel_scope.cancel()


async def test_a_conductor_starts_from_a_state_file_written_before_retention(
        tmp_path, autojump_clock):
    from tests.test_state_file import OLD_FORMAT

    state = tmp_path / "state.toml"
    state.write_text(OLD_FORMAT)
    async with trio.open_nursery() as nursery:
        h = await Harness(nursery, state_path=str(state)).start()
        assert h.cluster.apps["web"].last_generation == 2
        await h.node("n1")
        # Its interrupted rollout (no kind stored: a plain rollout) ends by its policy.
        await wait_for(lambda: h.rollouts.last["web"].done.is_set())
        record = h.rollouts.last["web"]
        assert (record.state, record.kind, record.desired) == ("rolled_back", "rollout", None)
        await h.settled(1, 4)
        final = await restart(h)
        assert (final["from_generation"], final["to_generation"]) == (1, 3)
        await wait_for(lambda: state_file.load(str(state)).apps[0].generation == 3)
        stored = state_file.load(str(state))
        assert stored.apps[0].last_generation == 3
        assert stored.rollouts[0]["kind"] == "restart"
        nursery.cancel_scope.cancel()
