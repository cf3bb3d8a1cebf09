"""core/analysis.py: the window arithmetic and the verdict texts (DESIGN.md §11); and
the analysis step, promote and pause in core/rollout.py."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from skr8tr.core import analysis
from skr8tr.core import rollout as plan
from skr8tr.core.manifest import Analysis, RolloutPolicy
from skr8tr.core.traffic import Counts

A = Analysis(window_ms=30000, max_error_rate=0.01, max_p99_ms=500, min_requests=20)
IDS = ("web-7", "web-8")


def counts(requests: int, errors: int = 0, failed: int = 0, ms: float = 20.0) -> Counts:
    c = Counts()
    for i in range(requests):
        if i < failed:
            c.record(None, None)
        else:
            c.record(500 if i < failed + errors else 200, ms)
    return c


def judge(now: float, seen: Counts, a: Analysis = A, ready_timeout_s: float = 60.0,
          since: float = 100.0):
    return analysis.judge(a, ready_timeout_s=ready_timeout_s, since=since, now=now,
                          seen=seen, generation=4, replicas=IDS)


@pytest.mark.parametrize(("now", "seen", "expected"), [
    (100.0, counts(0), analysis.Wait(130.0, False)),
    (129.9, counts(200, errors=4), analysis.Wait(130.0, True)),  # 2% may be luck: wait
    (101.0, counts(25, errors=4), analysis.Wait(130.0, True)),  # 16%, but only 4 bad
    (101.0, counts(25, errors=5),  # 20% of 25 is surely over 1%: no need to wait
     analysis.Fail("error rate 20% (5/25) in 1s > 1% (generation 4, replicas web-7, web-8)")),
    (100.5, counts(19, errors=19), analysis.Wait(130.0, False)),  # under min-requests
    (130.0, counts(200), analysis.Pass()),
    (130.0, counts(200, errors=2), analysis.Pass()),  # 1% is not over 1%
    (130.0, counts(200, errors=25),
     analysis.Fail("error rate 12.5% (25/200) in 30s > 1% (generation 4, replicas web-7, "
                   "web-8)")),
    (130.0, counts(200, errors=1, failed=2),  # no answer counts as bad too
     analysis.Fail("error rate 1.5% (3/200) in 30s > 1% (generation 4, replicas web-7, "
                   "web-8)")),
    (130.0, counts(100, ms=900.0),  # (800, 1000]: 800 + 200 x 99/100
     analysis.Fail("p99 998ms in 30s > 500ms (generation 4, replicas web-7, web-8)")),
    (130.0, counts(19), analysis.Wait(160.0, False)),  # max(window, ready-timeout)
    (159.9, counts(19), analysis.Wait(160.0, False)),
    (160.0, counts(3),
     analysis.Fail("not enough traffic to judge: 3 requests in 60s (min-requests 20)")),
    (145.5, counts(20), analysis.Pass()),  # enough arrived late: passes then
])
def test_verdicts(now, seen, expected):
    assert judge(now, seen) == expected


def test_a_window_longer_than_ready_timeout_gives_up_at_its_end():
    a = Analysis(window_ms=90000, min_requests=20)
    assert judge(190.0, counts(5), a) == analysis.Fail(
        "not enough traffic to judge: 5 requests in 90s (min-requests 20)")


def test_no_p99_limit_judges_no_latency():
    a = Analysis(window_ms=1000, max_p99_ms=None, min_requests=1)
    assert judge(101.0, counts(10, ms=99000.0), a) == analysis.Pass()


def test_the_window_end_is_reached_on_the_very_sum_waited_for():
    # 10.009999999999998 - 0.01 < 10: the verdict must not wait for that instant forever
    since = 0.01
    until = judge(since, counts(0), Analysis(window_ms=10000), since=since).until
    assert not isinstance(judge(until, counts(100), Analysis(window_ms=10000), since=since),
                          analysis.Wait)


@given(st.floats(0, 10_000), st.floats(0, 10_000), st.integers(0, 500), st.integers(0, 500),
       st.integers(1, 3600), st.integers(1, 600))
def test_judge_is_total_and_waits_only_forward(since, dt, requests, bad, window_s, rt_s):
    seen = counts(requests, errors=min(bad, requests))
    a = Analysis(window_ms=window_s * 1000, min_requests=20)
    verdict = judge(since + dt, seen, a, ready_timeout_s=rt_s, since=since)
    if isinstance(verdict, analysis.Wait):
        assert verdict.until > since + dt
        assert verdict.until <= since + max(window_s, rt_s)
    elif isinstance(verdict, analysis.Pass):
        assert requests >= 20 and bad * 100 <= requests
    elif since + dt < since + window_s:  # failed before the window's end: surely over
        assert verdict.reason.startswith("error rate ") and requests >= 20
        assert analysis.surely_over(min(bad, requests), requests, 0.01)


@pytest.mark.parametrize(("bad", "requests", "sure"), [
    (5, 25, True), (4, 25, False),  # never on fewer than EARLY_MIN_BAD
    (2, 100, False), (5, 100, True), (10, 500, False),  # 2% of 500: may still be luck
    (500, 500, True), (0, 0, False)])
def test_surely_over_one_percent(bad, requests, sure):
    assert analysis.surely_over(bad, requests, 0.01) is sure


@given(st.integers(0, 2000), st.integers(1, 2000), st.floats(0.0, 1.0))
def test_surely_over_only_when_the_observed_rate_is_over(bad, requests, limit):
    bad = min(bad, requests)
    if analysis.surely_over(bad, requests, limit):
        assert bad / requests > limit and bad >= analysis.EARLY_MIN_BAD


@pytest.mark.parametrize(("s", "text"), [(30.0, "30s"), (12.5, "12.5s"), (60.04, "60s"),
                                          (0.0, "0s")])
def test_format_s(s, text):
    assert analysis.format_s(s) == text


# ------------------------------------------------------------------ the step in core/rollout.py


def _views(*rows: tuple[str, int, str]) -> dict[str, plan.ReplicaView]:
    return {rid: plan.ReplicaView(rid, gen, state, seq)
            for seq, (rid, gen, state) in enumerate(rows)}


def _judging(traffic_now: Counts, *, paused: bool = False) -> tuple[plan.Step, plan.Progress]:
    """A rollout of 2 replicas, surge 1, whose first new replica just became ready."""
    forward = RolloutPolicy(analysis=Analysis(window_ms=10000, min_requests=20))
    p = plan.begin(app="web", from_generation=1, to_generation=2, total=2, want=2,
                   forward=forward, back=RolloutPolicy(), now=0.0)
    p = plan.pause(plan.launched(p, ["web-n1"], 0.0), paused)
    replicas = _views(("web-o1", 1, "ready"), ("web-o2", 1, "ready"), ("web-n1", 2, "ready"))
    step = plan.decide(p, replicas, 1.0, lambda ids: traffic_now.copy())
    return step, p


def test_a_ready_batch_is_judged_from_then_on_with_its_traffic_then_as_baseline():
    step, _ = _judging(counts(7))
    assert isinstance(step, plan.AwaitTraffic)
    assert (step.waiting, step.since, step.until) == (("web-n1",), 1.0, 11.0)
    assert step.then.work.baseline == counts(7) and step.seen.requests == 0
    assert plan.promote(step.then) is not None


def test_promote_passes_at_the_next_decision_and_needs_an_analysis_under_way():
    step, p = _judging(Counts())
    assert plan.promote(p) is None  # nothing judged yet
    promoted = plan.promote(step.then)
    replicas = _views(("web-o1", 1, "ready"), ("web-o2", 1, "ready"), ("web-n1", 2, "ready"))
    done = plan.decide(promoted, replicas, 2.0, lambda ids: Counts())
    assert isinstance(done, plan.AnalysisDone) and done.verdict == "promoted"
    assert plan.promote(done.then) is None  # passed: not under way any more
    nxt = plan.decide(done.then, replicas, 2.0, lambda ids: Counts())
    assert isinstance(nxt, plan.Retire) and nxt.replica_ids == ("web-o1",)


def test_a_paused_rollout_holds_before_a_batch_never_inside_one():
    forward = RolloutPolicy()
    p = plan.pause(plan.begin(app="web", from_generation=1, to_generation=2, total=2,
                              want=2, forward=forward, back=RolloutPolicy(), now=0.0), True)
    replicas = _views(("web-o1", 1, "ready"), ("web-o2", 1, "ready"))
    assert isinstance(plan.decide(p, replicas, 0.0), plan.Hold)
    assert isinstance(plan.decide(plan.pause(p, False), replicas, 0.0), plan.Launch)
    step, _ = _judging(Counts(), paused=True)  # a batch under way goes on
    assert isinstance(step, plan.AwaitTraffic)
    # a rollback is never held, nor judged
    back = dataclasses.replace(p, stage="rolling back", work=None)
    rolled = plan.decide(back, _views(("web-o1", 1, "ready"), ("web-n1", 2, "ready")), 0.0)
    assert isinstance(rolled, plan.Announce)
    assert not isinstance(plan.decide(rolled.then, _views(("web-o1", 1, "ready"),
                                                          ("web-n1", 2, "ready")), 0.0),
                          plan.Hold)
