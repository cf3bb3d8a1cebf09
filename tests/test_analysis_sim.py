"""Rollouts judged on their traffic (DESIGN.md §11) against fake nodes under MockClock:
every verdict at its exact time, with its exact text; promote, pause and resume.

Traffic is fed straight into ``cluster.traffic`` as an ingress's reports would bring
it: one report a second, at half-seconds, so that no report lands on the instant a
batch becomes ready."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import pytest
import trio

from skr8tr.conductor import commands
from skr8tr.conductor.errors import CommandError
from skr8tr.conductor.rollout_record import analysis_gauges
from skr8tr.core.manifest import Analysis
from skr8tr.core.traffic import Counts, Report
from tests.test_rollout_sim import Harness, crash_second_of, deploy, manifest

# generation, seconds since the feed started -> (requests, 5xx answers, latency ms) a
# ready replica of that generation gets in one second
Load = Callable[[int, float], tuple[int, int, float]]


def steady(bad: dict[int, tuple[int, int, float]] | None = None,
           good: tuple[int, int, float] = (10, 0, 20.0)) -> Load:
    return lambda gen, t: (bad or {}).get(gen, good)


async def feed(h: Harness, load: Load, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Report, every second from 0.5 s on, each ready replica's traffic of that second."""
    start = trio.current_time()
    task_status.started()
    seq = 0
    while True:
        await trio.sleep_until(start + seq + 0.5)
        rows = {}
        for r in h.cluster.replicas.values():
            if r.app != "web" or r.state != "ready":
                continue
            n, errors, ms = load(r.generation, trio.current_time() - start)
            c = Counts()
            for i in range(n):
                c.record(500 if i < errors else 200, ms)
            if n:
                rows[r.replica_id] = c
        seq += 1
        h.cluster.traffic.add(Report(seq, rows))


async def roll(h: Harness, version: str, analysis: Analysis | None, rollout: str = "",
               **kw) -> dict:
    """``rollout`` of the manifest ``version`` with ``analysis`` as its analysis block."""
    args = manifest(version, rollout=rollout, **kw)
    m = await commands.parse_manifest_arg(args)
    m = dataclasses.replace(m, rollout=dataclasses.replace(m.rollout, analysis=analysis))
    return await h.run("rollout", {**args, "parsed": m})


@pytest.fixture
async def h(nursery) -> Harness:
    return await Harness(nursery).start()


WINDOW = Analysis(window_ms=10000, max_error_rate=0.01, min_requests=20)


async def start(h: Harness, nursery, load: Load, **deploy_kw) -> float:
    await h.node("n1")
    await h.node("n2", "127.0.0.2")
    await deploy(h, **deploy_kw)
    t0 = trio.current_time()
    await nursery.start(feed, h, load)
    return t0


def analyses(h: Harness) -> list[dict]:
    return [e.data for e in h.cluster.events.recent if e.event == "rollout.analysis"]


async def test_each_batch_passes_after_exactly_the_window(h, nursery, autojump_clock):
    t0 = await start(h, nursery, steady())
    first = await roll(h, "v2", WINDOW)
    assert first["paused"] is False and first["analysis"] is None
    await trio.sleep(4.0)
    live = (await h.run("rollout-status", {"app": "web"}))["analysis"]
    assert live["verdict"] == "watching" and live["elapsed_s"] == pytest.approx(4.0)
    assert live["requests"] == 40 and live["error_rate"] == 0.0  # 4 reports of 10
    assert live["window_s"] == 10.0 and live["min_requests"] == 20
    final = await h.until_done()
    assert final["state"] == "complete"
    assert trio.current_time() - t0 == pytest.approx(30.0)  # 3 batches x 10 s
    done = analyses(h)
    assert [a["verdict"] for a in done] == ["passed"] * 3
    assert [a["requests"] for a in done] == [100] * 3
    assert final["analysis"]["verdict"] == "passed" and final["analysis"]["generation"] == 2
    gens = {row["generation"]: row for row in final["traffic"]}
    # 3 old replicas for 10 s, 2 for 10 s, 1 for 10 s; the new ones 1, 2, 3 the same
    assert gens[1]["requests"] == 600 and gens[2]["requests"] == 600
    assert gens[2]["error_rate"] == 0.0
    assert gens[2]["p99_ms"] == pytest.approx(19.95)  # in (15, 20]: 15 + 5 x 594/600


async def test_error_rate_fails_with_the_figures_and_rolls_back(h, nursery, autojump_clock):
    # 2% (1 of 50 a second) over 1%: not sure before the window's end, so judged at it
    t0 = await start(h, nursery, steady({2: (50, 1, 20.0)}))
    old = sorted(r.replica_id for r in h.replicas(1))
    await roll(h, "v2", WINDOW)
    final = await h.until_done()
    assert final["state"] == "rolled_back"
    assert trio.current_time() - t0 == pytest.approx(10.0)
    new = final["analysis"]["replicas"]
    assert ("error rate 2% (10/500) in 10s > 1% (generation 2, replicas "
            f"{new[0]})") in final["message"]
    assert final["analysis"]["verdict"] == "failed" and final["analysis"]["errors"] == 10
    assert sorted(r.replica_id for r in h.replicas(1)) == old  # never touched
    assert [a["verdict"] for a in analyses(h)] == ["failed"]
    # the judged batch was stopped at once (its old replica still served), not replaced
    # by a new generation-1 replica while it kept serving
    gen1_launches = [m for n in h.nodes for _, m in n.launches if m["generation"] == 1]
    assert len(gen1_launches) == 3
    assert "rolling back: stopping " + new[0] in [
        e.data["phase"] for e in h.cluster.events.recent if e.event == "rollout.phase"]


async def test_a_sure_breach_fails_before_the_window_ends(h, nursery, autojump_clock):
    # 20%: after 3 reports (30 requests, 6 bad) the rate is surely over 1%; the report
    # before (20, 4) had fewer than EARLY_MIN_BAD bad answers
    t0 = await start(h, nursery, steady({2: (10, 2, 20.0)}))
    await roll(h, "v2", WINDOW)
    final = await h.until_done()
    assert final["state"] == "rolled_back"
    assert trio.current_time() - t0 < 5.0
    assert re.search(r"error rate 20% \(6/30\) in [0-9.]+s > 1% \(generation 2", final["message"])
    assert final["analysis"]["elapsed_s"] < 3.0


async def test_without_auto_rollback_it_fails(h, nursery, autojump_clock):
    await start(h, nursery, steady({2: (10, 5, 20.0)}))
    await roll(h, "v2", WINDOW, rollout="auto-rollback no")
    final = await h.until_done()
    assert final["state"] == "failed"
    assert re.search(r"error rate 50% \(\d+/\d+\) in [0-9.]+s > 1%", final["message"])
    assert len(h.replicas(1)) == 3 and not h.replicas(2)


async def test_p99_over_the_limit_fails(h, nursery, autojump_clock):
    t0 = await start(h, nursery, steady({2: (10, 0, 800.0)}))
    await roll(h, "v2", dataclasses.replace(WINDOW, max_p99_ms=500))
    final = await h.until_done()
    assert final["state"] == "rolled_back"
    assert trio.current_time() - t0 == pytest.approx(10.0)
    # 800 ms falls in the (600, 800] bucket; the 99th of 100 answers: 600 + 200 x 0.99
    assert "p99 798ms in 10s > 500ms (generation 2, replicas " in final["message"]


async def test_not_enough_traffic_keeps_watching_then_fails(h, nursery, autojump_clock):
    t0 = await start(h, nursery, steady(good=(1, 0, 20.0)), rollout="ready-timeout 15s")
    await roll(h, "v2", WINDOW, rollout="ready-timeout 15s")
    await trio.sleep(12.0)
    status = await h.run("rollout-status", {"app": "web"})
    assert status["state"] == "rolling" and status["analysis"]["verdict"] == "watching"
    assert "min-requests 20" in status["message"]
    final = await h.until_done()
    assert trio.current_time() - t0 == pytest.approx(15.0)  # since + max(window, 15 s)
    assert final["state"] == "rolled_back"
    assert ("not enough traffic to judge: 15 requests in 15s (min-requests 20)"
            in final["message"])


async def test_enough_traffic_arriving_late_passes_at_that_moment(h, nursery, autojump_clock):
    # 1 request a second, then 10 from the report at 12.5 s: 13 + 10 >= 20 there
    def load(gen: int, t: float) -> tuple[int, int, float]:
        return (11, 0, 20.0) if gen == 2 and t > 12 else (1, 0, 20.0)

    t0 = await start(h, nursery, load, replicas=1, rollout="ready-timeout 60s")
    await roll(h, "v2", WINDOW, replicas=1, rollout="ready-timeout 60s")
    final = await h.until_done()
    assert final["state"] == "complete"
    assert trio.current_time() - t0 == pytest.approx(12.5)
    assert analyses(h)[0]["requests"] == 23


async def test_a_batch_replica_ending_during_analysis_fails_it(h, nursery, autojump_clock):
    await h.node("n1", launch_hook=lambda m: {"crash_after_s": 5.0, "exit_code": 7}
                 if m["generation"] == 2 else {})
    await deploy(h)
    t0 = trio.current_time()
    await nursery.start(feed, h, steady())
    await roll(h, "v2", WINDOW)
    final = await h.until_done()
    assert trio.current_time() - t0 == pytest.approx(5.0)
    assert final["state"] == "rolled_back"
    assert "ended while its traffic was judged" in final["message"]
    assert "exit code 7" in final["message"]
    assert final["analysis"]["verdict"] == "failed"


async def test_promote_passes_the_current_batch_only(h, nursery, autojump_clock):
    t0 = await start(h, nursery, steady(), replicas=2)
    await roll(h, "v2", dataclasses.replace(WINDOW, window_ms=100000), replicas=2)
    await trio.sleep(3.0)
    status = await h.run("rollout-promote", {"app": "web"})
    assert status["analysis"]["verdict"] == "promoted"
    assert trio.current_time() - t0 == pytest.approx(3.0)
    await trio.sleep(1.0)  # the next batch is judged again
    status = await h.run("rollout-status", {"app": "web"})
    assert status["replaced"] == 1 and status["analysis"]["verdict"] == "watching"
    final = await h.until_done()
    assert final["state"] == "complete"
    assert trio.current_time() - t0 == pytest.approx(103.0)
    assert [a["verdict"] for a in analyses(h)] == ["promoted", "passed"]


async def test_pause_holds_between_batches_and_resume_continues(h, nursery, autojump_clock):
    t0 = await start(h, nursery, steady(), rollout="ready-timeout 5s")
    await roll(h, "v2", WINDOW, rollout="ready-timeout 5s")
    await trio.sleep(2.0)
    paused = await h.run("rollout-pause", {"app": "web"})
    assert paused["paused"] is True
    with pytest.raises(CommandError) as err:
        await h.run("rollout-pause", {"app": "web"})
    assert err.value.code == "CONFLICT" and "already paused" in err.value.message
    await trio.sleep(600.0)  # the batch under way finished (10 s), then nothing: no deadline
    status = await h.run("rollout-status", {"app": "web"})
    assert status["state"] == "rolling" and status["replaced"] == 1
    assert "paused before the next batch (1/3 replaced)" in status["message"]
    assert len(h.replicas(2)) == 1
    resumed = await h.run("rollout-resume", {"app": "web"})
    assert resumed["paused"] is False
    final = await h.until_done()
    assert final["state"] == "complete"
    assert trio.current_time() - t0 == pytest.approx(602.0 + 20.0)
    assert [e.event for e in h.cluster.events.recent
            if e.event in ("rollout.paused", "rollout.resumed")] == ["rollout.paused",
                                                                     "rollout.resumed"]


async def test_promote_pause_resume_refusals(h, nursery, autojump_clock):
    await h.node("n1")
    for cmd in ("rollout-promote", "rollout-pause", "rollout-resume"):
        with pytest.raises(CommandError) as err:
            await h.run(cmd, {"app": "nope"})
        assert err.value.code == "NOT_FOUND"
    await deploy(h)
    for cmd in ("rollout-promote", "rollout-pause", "rollout-resume"):
        with pytest.raises(CommandError) as err:
            await h.run(cmd, {"app": "web"})
        assert err.value.code == "CONFLICT" and "no rollout of web is running" in str(
            err.value.message)
    await roll(h, "v2", None, rollout="settle 5s")
    with pytest.raises(CommandError) as err:  # no analysis block: nothing to promote
        await h.run("rollout-promote", {"app": "web"})
    assert err.value.code == "CONFLICT" and "not judging" in err.value.message
    with pytest.raises(CommandError) as err:
        await h.run("rollout-resume", {"app": "web"})
    assert err.value.code == "CONFLICT" and "not paused" in err.value.message
    assert (await h.until_done())["state"] == "complete"


async def test_a_rollback_is_never_judged(h, nursery, autojump_clock):
    # v1 has an analysis block too; v2's second batch crashes: the rollback to v1
    # replaces the ready v2 replica at once, with no traffic at all (min-requests
    # would hold a judged batch until ready-timeout)
    launches: list[int] = []
    await h.node("n1", launch_hook=crash_second_of(2, launches))
    args = manifest("v1")
    m = await commands.parse_manifest_arg(args)
    m = dataclasses.replace(m, rollout=dataclasses.replace(m.rollout, analysis=WINDOW))
    await h.run("up", {**args, "parsed": m})
    await h.settled(1, 3)
    await nursery.start(feed, h, steady())
    t0 = trio.current_time()
    await roll(h, "v2", WINDOW)
    final = await h.until_done()
    assert final["state"] == "rolled_back"
    assert trio.current_time() - t0 == pytest.approx(10.5)  # batch 1 judged, crash at 0.5 s
    # batch 2's replica ended while judged; the generation-1 replica the rollback
    # launched was not judged at all
    assert [(a["generation"], a["verdict"]) for a in analyses(h)] == [(2, "passed"),
                                                                       (2, "failed")]
    assert launches == [1, 1, 1, 2, 2, 1]


async def test_metrics_show_the_analysis_under_way_only(h, nursery, autojump_clock):
    await start(h, nursery, steady({2: (10, 1, 20.0)}))
    await roll(h, "v2", dataclasses.replace(WINDOW, max_error_rate=0.2))
    await trio.sleep(4.0)

    def samples() -> list[str]:
        families = analysis_gauges(h.rollouts.active, h.cluster.clock())
        return [line for f in families for line in f.render() if not line.startswith("#")]

    assert samples() == [
        'skr8tr_rollout_analysis_error_rate{app="web",generation="2"} 0.1',
        'skr8tr_rollout_analysis_p99_seconds{app="web",generation="2"} 0.02']  # 40th of 40: the top
    assert (await h.until_done())["state"] == "complete"
    assert samples() == []


async def test_growing_batches_are_judged_too(h, nursery, autojump_clock):
    t0 = await start(h, nursery, steady(), replicas=1)
    await roll(h, "v2", WINDOW, replicas=3)  # replace 1, then grow by 2 (surge 1)
    final = await h.until_done()
    assert final["state"] == "complete"
    assert trio.current_time() - t0 == pytest.approx(30.0)
    assert [(a["generation"], a["verdict"]) for a in analyses(h)] == [(2, "passed")] * 3


async def test_an_abort_during_analysis_keeps_the_figures_it_had(h, nursery, autojump_clock):
    await start(h, nursery, steady({2: (10, 1, 20.0)}))
    await roll(h, "v2", dataclasses.replace(WINDOW, max_error_rate=0.2))  # 10% passes
    await trio.sleep(5.0)
    status = await h.run("rollout-abort", {"app": "web"})
    assert status["state"] == "aborted"
    assert status["analysis"]["requests"] == 50 and status["analysis"]["errors"] == 5
    await trio.sleep(10.0)  # traffic goes on; the ended rollout's figures do not move
    later = await h.run("rollout-status", {"app": "web"})
    assert later["analysis"] == status["analysis"]
    assert later["traffic"] == status["traffic"]
