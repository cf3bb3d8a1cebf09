"""``tables.RanLog``: which node ran each replica, bounded per app; and own_lines with it."""

from __future__ import annotations

from skr8tr.conductor.cluster import Cluster
from skr8tr.conductor.logs import own_lines
from skr8tr.conductor.tables import RAN_KEPT_PER_APP, RanLog, ReplicaState
from tests.test_log_follow import line


def row(rid: str, app: str, node: str) -> ReplicaState:
    return ReplicaState(
        replica_id=rid,
        app=app,
        generation=1,
        node_id=node,
        address="127.0.0.1",
        port=None,
        seq=1,
        launched_at=0.0,
    )


def test_the_last_n_of_each_app_are_kept():
    ran = RanLog(per_app=3)
    for i in range(5):
        ran.note("web", f"web-{i}", f"n{i}")
    ran.note("api", "api-0", "n9")
    assert [ran.node_of("web", f"web-{i}") for i in range(5)] == [None, None, "n2", "n3", "n4"]
    assert ran.node_of("api", "api-0") == "n9"  # one app's churn does not push out another's
    assert ran.node_of("api", "web-4") is None  # an id is known only under its own app
    ran.note("web", "web-2", "n2")  # noted again: the most recent now
    ran.note("web", "web-5", "n5")
    assert ran.node_of("web", "web-2") == "n2" and ran.node_of("web", "web-3") is None
    ran.forget_app("web")
    assert ran.by_app.keys() == {"api"}


def test_a_crash_loop_stays_bounded():
    ran = RanLog()
    for i in range(10 * RAN_KEPT_PER_APP):
        ran.note("web", f"web-{i:06x}", "n1")
    assert len(ran.by_app["web"]) == RAN_KEPT_PER_APP


def test_lines_of_an_ended_replica_only_from_the_node_that_ran_it():
    c = Cluster(clock=lambda: 0.0, wall=lambda: 1000.0)
    c.replicas["web-aaaaaa"] = row("web-aaaaaa", "web", "n1")
    del c.replicas["web-aaaaaa"]  # ended, its row gone
    lines = [line("web-aaaaaa", 1), line("web-bbbbbb", 1)]  # ran on n1; never placed
    assert own_lines(lines, "n1", "web", None, c) == [line("web-aaaaaa", 1)]
    assert own_lines(lines, "n2", "web", None, c) == []
    assert own_lines(lines, "n1", "api", None, c) == []  # not under another app's name
    assert own_lines(lines, "n1", "web", "web-bbbbbb", c) == []


def test_removing_an_app_forgets_its_replicas():
    c = Cluster(clock=lambda: 0.0, wall=lambda: 1000.0)
    c.replicas["web-aaaaaa"] = row("web-aaaaaa", "web", "n1")
    del c.replicas["web-aaaaaa"]
    c.apps["web"] = object()  # remove_app only pops it
    c.loaded_apps.add("web")
    c.remove_app("web")
    assert c.replicas.ran.node_of("web", "web-aaaaaa") is None
