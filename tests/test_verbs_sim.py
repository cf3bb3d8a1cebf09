"""`restart`, `describe`, `revision` and the `rollout-undo` guard against fake nodes under
MockClock: exact timing, counts, and what each command refuses."""

from __future__ import annotations

import pytest
import trio

from skr8tr.conductor import commands
from skr8tr.conductor.errors import CommandError
from tests.test_rollout_sim import Harness, deploy, manifest


@pytest.fixture
async def h(nursery) -> Harness:
    return await Harness(nursery).start()


async def test_restart_is_a_gated_rollout_of_the_same_manifest(h, autojump_clock):
    await h.node("n1", ready_after_s=None)
    await h.node("n2", "127.0.0.2", ready_after_s=None)
    await deploy(h, rollout="settle 2s; drain 500ms")
    before = {r.replica_id for r in h.replicas(1)}
    text = h.cluster.apps["web"].revision.text
    lowest = []

    async def watch():
        while True:
            lowest.append(sum(r.state == "ready" for r in h.cluster.replicas.values()))
            await h.cluster.wait_changed()

    async with trio.open_nursery() as n:
        n.start_soon(watch)
        t0 = trio.current_time()
        first = await h.run("restart", {"app": "web", "force": False})
        assert (first["state"], first["from_generation"], first["to_generation"]) == (
            "rolling", 1, 2)
        final = await h.until_done()
        elapsed = trio.current_time() - t0
        n.cancel_scope.cancel()
    assert final["state"] == "complete" and final["replaced"] == 3
    # 3 batches of one: settle 2 s, then drain 0.5 s before the old one stops.
    assert elapsed == pytest.approx(3 * (2.0 + 0.5))
    assert min(lowest) == 3
    await h.settled(2, 3)
    assert not before & {r.replica_id for r in h.replicas(2)}
    app = h.cluster.apps["web"]
    assert app.generation == 2 and app.revision.text == text
    history = await h.run("history", {"app": "web"})
    assert [(e["generation"], e["state"]) for e in history] == [(1, "complete"),
                                                               (2, "complete")]
    assert history[0]["manifest_sha256"] == history[1]["manifest_sha256"]
    started = [e for e in h.cluster.events.recent if e.event == "rollout.started"]
    assert [(e.data["from_generation"], e.data["to_generation"], e.data["kind"])
            for e in started] == [(1, 2, "restart")]


async def test_restart_keeps_the_scaled_count(h, autojump_clock):
    await h.node("n1")
    await deploy(h)
    await h.run("scale", {"app": "web", "replicas": 5})
    await h.settled(1, 5)
    await h.run("restart", {"app": "web", "force": False})
    assert (await h.until_done())["state"] == "complete"
    await h.settled(2, 5)
    assert h.cluster.apps["web"].desired == 5


async def test_restart_conflicts_with_a_running_rollout_unless_forced(h, autojump_clock):
    await h.node("n1", ready_after_s=None)
    await deploy(h)
    await h.run("rollout", manifest("v2"))
    with pytest.raises(CommandError) as err:
        await h.run("restart", {"app": "web", "force": False})
    assert err.value.code == "CONFLICT" and "--force" in err.value.message
    forced = await h.run("restart", {"app": "web", "force": True})
    assert (forced["from_generation"], forced["to_generation"]) == (1, 3)
    assert (await h.until_done())["state"] == "complete"
    await h.settled(3, 3)
    app = h.cluster.apps["web"]
    assert "--version v1" in app.revision.text, "the restart kept generation 1's manifest"
    with pytest.raises(CommandError) as err:
        await h.run("restart", {"app": "nope", "force": False})
    assert err.value.code == "NOT_FOUND"


async def test_restart_of_an_app_scaled_to_zero_completes_at_once(h, autojump_clock):
    await h.node("n1")
    await deploy(h)
    await h.run("scale", {"app": "web", "replicas": 0})
    await h.settled(1, 0)
    await h.run("restart", {"app": "web", "force": False})
    final = await h.until_done()
    assert (final["state"], final["total"]) == ("complete", 0)
    assert h.cluster.apps["web"].desired == 0 and not h.replicas()


async def test_undo_to_an_aborted_generation_needs_force(h, autojump_clock):
    await h.node("n1", ready_after_s=None)
    await deploy(h)
    await h.run("rollout", manifest("v2", rollout="settle 30s"))
    await h.run("rollout-abort", {"app": "web"})
    for to in (2, 2**53):
        with pytest.raises(CommandError) as err:
            await h.run("rollout-undo", {"app": "web", "to": to, "force": False})
        assert err.value.code == ("CONFLICT" if to == 2 else "NOT_FOUND")
    assert "ended aborted" in (await _refusal(h, 2)) and "--force" in await _refusal(h, 2)
    assert [e["generation"] for e in await h.run("history", {"app": "web"})] == [1, 2]
    status = await h.run("rollout-undo", {"app": "web", "to": 2, "force": True})
    assert (status["from_generation"], status["to_generation"]) == (1, 3)
    assert (await h.until_done())["state"] == "complete"
    assert "--version v2" in h.cluster.apps["web"].revision.text
    kinds = [e.data["kind"] for e in h.cluster.events.recent if e.event == "rollout.started"]
    assert kinds == ["rollout", "undo"]


async def _refusal(h: Harness, to: int) -> str:
    with pytest.raises(CommandError) as err:
        await h.run("rollout-undo", {"app": "web", "to": to, "force": False})
    return err.value.message


async def test_plain_undo_after_a_restart_returns_to_the_other_manifest(h, autojump_clock):
    await h.node("n1")
    await deploy(h)
    await h.run("rollout", manifest("v2"))
    await h.until_done()
    await h.run("restart", {"app": "web", "force": False})
    await h.until_done()
    status = await h.run("rollout-undo", {"app": "web", "to": None, "force": False})
    assert status["to_generation"] == 4
    await h.until_done()
    assert "--version v1" in h.cluster.apps["web"].revision.text


async def test_describe_keeps_a_quiet_apps_events_in_a_busy_cluster(h, autojump_clock):
    # The shared ring holds the last 200 events of every app; describe keeps each app's
    # own last 20, so a busy neighbour does not push a quiet app's story out.
    from skr8tr.conductor.events import RECENT_EVENTS

    await h.node("n1")
    await deploy(h)
    quiet = [e.seq for e in h.cluster.events.recent if e.data.get("app") == "web"]
    for i in range(RECENT_EVENTS + 50):
        h.cluster.events.publish("app.noise", app="busy", n=i)
    assert not any(e.data.get("app") == "web" for e in h.cluster.events.recent)
    doc = await h.run("describe", {"app": "web"})
    assert [e["seq"] for e in doc["events"]] == quiet[-commands.DESCRIBE_EVENTS:]
    assert doc["events"]


def test_the_per_app_rings_are_bounded():
    from skr8tr.conductor import events

    bus = events.EventBus()
    for i in range(events.APPS_WITH_RECENT + 10):
        bus.publish("app.created", app=f"a{i}")
    newest = f"a{events.APPS_WITH_RECENT + 9}"
    for _ in range(30):
        bus.publish("x", app=newest)
    assert len(bus._by_app) == events.APPS_WITH_RECENT
    assert bus.recent_of("a0") == []  # the least recent app went first
    assert bus.recent_of("a10") != []
    assert len(bus.recent_of(newest)) == events.APP_RECENT_EVENTS  # its last 20 of 31
    assert bus.recent_of(newest)[-1].seq == bus.seq


async def test_describe_shows_the_app_and_only_its_own_recent_events(h, autojump_clock):
    await h.node("n1")
    await deploy(h)
    other = manifest("v1", replicas=2)
    other["manifest"] = other["manifest"].replace("app web", "app api")
    await h.run("up", other)
    for _ in range(3):  # plenty of events of both apps
        await h.run("scale", {"app": "api", "replicas": 0})
        await h.run("scale", {"app": "api", "replicas": 2})
        await h.run("restart", {"app": "web", "force": False})
        await h.until_done()
    doc = await h.run("describe", {"app": "web"})
    assert doc["manifest"] == manifest("v1")["manifest"]
    assert (doc["generation"], doc["desired"], doc["format"]) == (4, 3, "skr8tr")
    assert doc["rollout"]["state"] == "complete"
    assert len(doc["replicas"]) == 3 and {r["app"] for r in doc["replicas"]} == {"web"}
    assert doc["counts"]["app"] == "web" and doc["counts"]["desired"] == 3
    assert len(doc["events"]) == commands.DESCRIBE_EVENTS
    assert {e["data"]["app"] for e in doc["events"]} == {"web"}
    seqs = [e["seq"] for e in doc["events"]]
    assert seqs == sorted(seqs) and seqs[-1] == max(
        e.seq for e in h.cluster.events.recent if e.data.get("app") == "web")
    assert [e["generation"] for e in doc["history"]] == [1, 2, 3, 4]
    # An event a producer filled with something that is not JSON is left out, not fatal.
    bad = h.cluster.events.publish("replica.odd", app="web", what=object())
    doc = await h.run("describe", {"app": "web"})
    assert bad.seq not in [e["seq"] for e in doc["events"]]
    assert len(doc["events"]) == commands.DESCRIBE_EVENTS - 1
    with pytest.raises(CommandError) as err:
        await h.run("describe", {"app": "nope"})
    assert err.value.code == "NOT_FOUND"


async def test_revision_returns_an_old_manifest_or_not_found(h, autojump_clock):
    await h.node("n1")
    await deploy(h)
    await h.run("rollout", manifest("v2"))
    await h.until_done()
    old = await h.run("revision", {"app": "web", "generation": 1})
    assert old["manifest"] == manifest("v1")["manifest"]
    assert (old["generation"], old["state"], old["current"]) == (1, "complete", False)
    assert old["finished"] >= old["started"]
    assert (await h.run("revision", {"app": "web", "generation": 2}))["current"] is True
    for generation in (3, 2**53):
        with pytest.raises(CommandError) as err:
            await h.run("revision", {"app": "web", "generation": generation})
        assert err.value.code == "NOT_FOUND"
        assert f"web has no generation {generation} (known: 1, 2)" == err.value.message
