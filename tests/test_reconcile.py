"""Reconciliation decisions (pure), table-driven: (spec, observed, now) -> actions."""

from __future__ import annotations

import pytest

from skr8tr.core.reconcile import (
    AppView,
    Forget,
    Launch,
    Stop,
    backoff_s,
    on_exit,
    reconcile_app,
)
from skr8tr.core.reconcile import ReplicaView as R


def test_backoff_doubles_and_caps_at_sixty():
    assert [backoff_s(n) for n in range(0, 10)] == [0, 1, 2, 4, 8, 16, 32, 60, 60, 60]


@pytest.mark.parametrize("kw, expected", [
    # a service that crashes quickly: restart with backoff
    (dict(app_type="process", restart="always", exit_code=1, signal=None, launch_failed=False,
          ran_for_s=0.5, restart_count=0, node_lost=False),
     ("failed", 101.0, 1, False, False)),
    (dict(app_type="process", restart="always", exit_code=1, signal=None, launch_failed=False,
          ran_for_s=0.5, restart_count=3, node_lost=False),
     ("failed", 108.0, 4, False, False)),
    # ran long enough: the count starts again
    (dict(app_type="process", restart="always", exit_code=1, signal=None, launch_failed=False,
          ran_for_s=30.0, restart_count=6, node_lost=False),
     ("failed", 101.0, 1, False, False)),
    # clean exit of a service under `always` is restarted too
    (dict(app_type="process", restart="always", exit_code=0, signal=None, launch_failed=False,
          ran_for_s=1, restart_count=0, node_lost=False),
     ("exited", 101.0, 1, False, False)),
    # on-failure: a clean exit is the end
    (dict(app_type="process", restart="on-failure", exit_code=0, signal=None,
          launch_failed=False, ran_for_s=1, restart_count=0, node_lost=False),
     ("exited", None, 0, False, True)),
    # killed by a signal is a failure
    (dict(app_type="process", restart="on-failure", exit_code=None, signal=9,
          launch_failed=False, ran_for_s=1, restart_count=0, node_lost=False),
     ("failed", 101.0, 1, False, False)),
    # never
    (dict(app_type="process", restart="never", exit_code=3, signal=None, launch_failed=False,
          ran_for_s=1, restart_count=0, node_lost=False),
     ("failed", None, 0, False, True)),
    # a job that succeeds is complete
    (dict(app_type="job", restart="on-failure", exit_code=0, signal=None, launch_failed=False,
          ran_for_s=1, restart_count=2, node_lost=False),
     ("exited", None, 0, True, False)),
    # a launch that failed counts as a crash
    (dict(app_type="process", restart="always", exit_code=None, signal=None,
          launch_failed=True, ran_for_s=0, restart_count=1, node_lost=False),
     ("failed", 102.0, 2, False, False)),
    # node lost: re-place at once, no count
    (dict(app_type="process", restart="never", exit_code=None, signal=None,
          launch_failed=False, ran_for_s=0, restart_count=2, node_lost=True),
     ("failed", 100.0, 2, False, False)),
])
def test_on_exit(kw, expected):
    out = on_exit(now=100.0, **kw)
    assert (out.state, out.restart_at, out.restart_count, out.completed, out.given_up) == expected


APP = AppView("web", generation=2, desired=3)


@pytest.mark.parametrize("app, replicas, now, actions, wake_at", [
    # nothing yet: launch three
    (APP, [], 0, [Launch("web", 2)] * 3, None),
    # at the count: nothing to do
    (APP, [R("a", 2, "ready", 1), R("b", 2, "running", 2), R("c", 2, "pending", 3)], 0, [],
     None),
    # one too many: stop pending before running before ready, newest first
    (AppView("web", 2, 1), [R("a", 2, "ready", 1), R("b", 2, "running", 2),
                            R("c", 2, "running", 3)], 0,
     [Stop("c", "scaled down"), Stop("b", "scaled down")], None),
    # stopping replicas do not count: replace them
    (APP, [R("a", 2, "ready", 1), R("b", 2, "stopping", 2), R("c", 2, "draining", 3)], 0,
     [Launch("web", 2), Launch("web", 2)], None),
    # other generations are not counted; left over after a rollout, they are stopped
    (APP, [R("a", 1, "ready", 1), R("b", 2, "ready", 2), R("c", 3, "failed", 3),
           R("d", 3, "stopping", 4)], 0,
     [Stop("a", "generation 1 is not current (2 is)"), Forget("c"), Launch("web", 2),
      Launch("web", 2)], None),
    # while a rollout runs it owns the app: nothing at all
    (AppView("web", 2, 3, rolling=True), [R("a", 1, "ready", 1), R("b", 2, "failed", 2)], 0,
     [], None),
    # an ended replica waiting for its restart holds its place until due
    (APP, [R("a", 2, "ready", 1), R("b", 2, "ready", 2),
           R("c", 2, "failed", 3, restart_at=10.0, restart_count=2)], 5, [], 10.0),
    (APP, [R("a", 2, "ready", 1), R("b", 2, "ready", 2),
           R("c", 2, "failed", 3, restart_at=10.0, restart_count=2)], 10,
     [Launch("web", 2, 2, "c")], None),
    # an ended replica that is not restarted is forgotten
    (APP, [R("a", 2, "exited", 1)], 0, [Forget("a")] + [Launch("web", 2)] * 3, None),
    # finished jobs and given-up replicas lower the target
    (AppView("job", 1, 3, completed=2), [], 0, [Launch("job", 1)], None),
    (AppView("web", 1, 2, given_up=2), [R("a", 1, "ready", 1)], 0, [Stop("a", "scaled down")],
     None),
    # scale down drops waiting restarts before stopping anything live
    (AppView("web", 2, 1), [R("a", 2, "ready", 1),
                            R("b", 2, "failed", 2, restart_at=50.0, restart_count=1)], 0,
     [Forget("b")], None),
])
def test_reconcile_app(app, replicas, now, actions, wake_at):
    plan = reconcile_app(app, replicas, now)
    assert list(plan.actions) == actions
    assert plan.wake_at == wake_at
