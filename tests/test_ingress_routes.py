"""The ingress's pure tables: longest-prefix routes, and replicas from /v1/watch messages."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from skr8tr.ingress.routes import Backend, BackendTable, Route, RouteError, RouteTable, parse_route

# ---------------------------------------------------------------------------- routes


@pytest.mark.parametrize(("text", "expected"), [
    ("/:web", Route("/", "web")),
    ("/api:api", Route("/api", "api")),
    ("/api/:api", Route("/api", "api")),  # a trailing slash means the same prefix
    ("/a/b-c_d.e~:x9", Route("/a/b-c_d.e~", "x9")),
    ("/v1:8080:web", Route("/v1:8080", "web")),  # the app is after the last colon
])
def test_parse_route(text, expected):
    assert parse_route(text) == expected


@pytest.mark.parametrize(("text", "why"), [
    ("web", "expected /PREFIX:APP"),
    (":web", "expected /PREFIX:APP"),
    ("api:web", "must start with /"),
    ("/a b:web", "must start with /"),
    ("/a?x:web", "must start with /"),
    ("/api:Web", "is not an app name"),
    ("/api:", "is not an app name"),
    ("/api:-web", "is not an app name"),
])
def test_parse_route_refuses(text, why):
    with pytest.raises(RouteError, match="--route") as info:
        parse_route(text)
    assert why in str(info.value)


def test_a_prefix_routed_twice_is_refused():
    with pytest.raises(RouteError, match="already routed to a"):
        RouteTable([Route("/api", "a"), Route("/api", "b")])


TABLE = RouteTable([parse_route(r) for r in ("/:root", "/api:api", "/api/v2:v2", "/static/:st")])


@pytest.mark.parametrize(("target", "app"), [
    ("/", "root"),
    ("/index.html", "root"),
    ("/api", "api"),
    ("/api/", "api"),
    ("/api/users?id=3", "api"),
    ("/api?x=1", "api"),
    ("/apis", "root"),  # whole segments only
    ("/api/v2", "v2"),
    ("/api/v2/x", "v2"),
    ("/api/v20", "api"),
    ("/static", "st"),
    ("/static/app.js", "st"),
    ("*", None),  # OPTIONS * matches no prefix
    ("http://example.com/api", None),  # the proxy makes this origin form first
])
def test_longest_prefix_wins(target, app):
    route = TABLE.match(target)
    assert (route.app if route else None) == app


def test_without_a_root_route_unknown_paths_match_nothing():
    table = RouteTable([Route("/api", "api")])
    assert table.match("/other") is None
    assert table.match("/api/x").app == "api"


@given(st.lists(st.sampled_from(["a", "b", "ab", "c-d"]), max_size=4),
       st.lists(st.sampled_from(["a", "b", "ab", "x"]), max_size=5))
def test_match_is_the_longest_segment_prefix(prefix_parts, path_parts):
    routes = [Route("/" + "/".join(prefix_parts[:i]), f"app{i}")
              for i in range(len(prefix_parts) + 1)]
    path = "/" + "/".join(path_parts)
    route = RouteTable(routes).match(path)
    # the longest i such that the first i segments of the path are the prefix's
    best = max(i for i in range(len(prefix_parts) + 1)
               if path_parts[:i] == prefix_parts[:i])
    assert route is not None and route.app == f"app{best}"


# ---------------------------------------------------------------------------- replicas


def snapshot(*replicas: tuple[str, str, int, str], nodes=(("n1", "127.0.0.1"),
                                                            ("n2", "127.0.0.2"))):
    """A status document: replicas as (id, node, port, state), all of app web."""
    return {
        "nodes": [{"node": n, "address": a, "cpu_pct": 0, "ports": []} for n, a in nodes],
        "replicas": [{"app": "web", "replica": rid, "node": node, "pid": 100 + i,
                      "port": port, "generation": 1, "state": state}
                     for i, (rid, node, port, state) in enumerate(replicas)],
        "apps": [], "rollouts": [],
    }


def ids(backends) -> list[str]:
    return [b.replica for b in backends]


def test_snapshot_keeps_only_ready_replicas_with_known_nodes():
    t = BackendTable()
    assert not t.synced
    gone = t.apply_snapshot(snapshot(("r1", "n1", 2001, "ready"), ("r2", "n2", 2002, "ready"),
                                     ("r3", "n1", 2003, "running"),
                                     ("r4", "n1", 2004, "draining"),
                                     ("r5", "n9", 2005, "ready")))
    assert t.synced and gone == set()
    assert t.backends("web") == [Backend("r1", "web", "127.0.0.1", 2001, 1, 100),
                                 Backend("r2", "web", "127.0.0.2", 2002, 1, 101)]
    assert t.backends("other") == []


def test_round_robin_and_exclusion():
    t = BackendTable()
    t.apply_snapshot(snapshot(("r1", "n1", 1, "ready"), ("r2", "n1", 2, "ready"),
                              ("r3", "n2", 3, "ready")))
    assert ids(t.pick("web") for _ in range(6)) == ["r1", "r2", "r3", "r1", "r2", "r3"]
    assert t.pick("web", exclude={"r1", "r2", "r3"}) is None
    picks = {t.pick("web", exclude={"r2"}).replica for _ in range(4)}
    assert picks == {"r1", "r3"}
    assert t.pick("nope") is None


@pytest.mark.parametrize("event", ["replica.draining", "replica.stopping", "replica.exited",
                                   "replica.failed", "replica.unhealthy", "replica.running",
                                   "replica.pending", "replica.something-new"])
def test_any_state_but_ready_leaves_rotation_at_once(event):
    t = BackendTable()
    t.apply_snapshot(snapshot(("r1", "n1", 1, "ready"), ("r2", "n1", 2, "ready")))
    gone = t.apply_event(event, {"app": "web", "replica": "r1", "node": "n1", "port": 1,
                                 "generation": 1})
    assert ids(gone) == ["r1"]
    assert ids(t.backends("web")) == ["r2"]
    assert not t.is_routable(("r1", "127.0.0.1", 1))
    assert t.is_routable(("r2", "127.0.0.1", 2))


def test_a_replica_becomes_routable_when_ready_and_again_when_undrained():
    t = BackendTable()
    t.apply_snapshot(snapshot())
    data = {"app": "web", "replica": "r1", "node": "n2", "port": 7, "generation": 2}
    assert t.apply_event("replica.placed", data) == set()
    t.apply_event("replica.running", dict(data, pid=55))
    assert t.backends("web") == []
    t.apply_event("replica.ready", dict(data, pid=55))
    assert t.backends("web") == [Backend("r1", "web", "127.0.0.2", 7, 2, 55)]
    t.apply_event("replica.draining", {k: v for k, v in data.items()})
    assert t.backends("web") == []
    t.apply_event("replica.ready", dict(data, pid=55, undrained=True))  # an abort undrains
    assert ids(t.backends("web")) == ["r1"]


def test_adopted_replicas_carry_their_state():
    t = BackendTable()
    t.apply_snapshot(snapshot())
    data = {"app": "web", "replica": "r1", "node": "n1", "pid": 3, "port": 9, "generation": 1}
    t.apply_event("replica.adopted", dict(data, state="running"))
    assert t.backends("web") == []
    t.apply_event("replica.adopted", dict(data, state="ready"))
    assert ids(t.backends("web")) == ["r1"]


def test_nodes_come_and_go():
    t = BackendTable()
    t.apply_snapshot(snapshot(("r1", "n1", 1, "ready"), ("r2", "n3", 2, "ready")))
    assert ids(t.backends("web")) == ["r1"]
    t.apply_event("node.joined", {"node": "n3", "address": "10.0.0.3"})
    assert ids(t.backends("web")) == ["r1", "r2"]
    assert t.backends("web")[1].address == "10.0.0.3"
    t.apply_event("node.disconnected", {"node": "n3"})  # its replicas still run
    assert ids(t.backends("web")) == ["r1", "r2"]
    gone = t.apply_event("node.lost", {"node": "n3"})
    assert ids(gone) == ["r2"] and ids(t.backends("web")) == ["r1"]


def test_app_removed_takes_all_its_replicas_out():
    t = BackendTable()
    t.apply_snapshot(snapshot(("r1", "n1", 1, "ready"), ("r2", "n1", 2, "ready")))
    gone = t.apply_event("app.removed", {"app": "web", "stopping": 2})
    assert sorted(ids(gone)) == ["r1", "r2"] and t.backends("web") == []


def test_a_new_snapshot_replaces_everything():
    t = BackendTable()
    t.apply_snapshot(snapshot(("r1", "n1", 1, "ready"), ("r2", "n1", 2, "ready")))
    gone = t.apply_snapshot(snapshot(("r2", "n1", 2, "ready"), ("r3", "n1", 3, "ready")))
    assert ids(gone) == ["r1"]
    assert ids(t.backends("web")) == ["r2", "r3"]


def test_malformed_messages_are_ignored():
    t = BackendTable()
    t.apply_snapshot({"nodes": [None, {"node": 3}], "replicas": [7, {"app": "web"}]})
    assert t.synced and t.backends("web") == []
    for event, data in [("replica.ready", {}), ("replica.ready", {"replica": 5}),
                        ("node.joined", {"node": "n1"}), ("node.lost", {}),
                        ("app.removed", {"app": None}), ("rollout.progress", {"x": 1})]:
        assert t.apply_event(event, data) == set()
    t.apply_event("replica.ready", {"replica": "r1", "app": "web", "node": "n1",
                                    "port": True})  # not a port
    assert t.backends("web") == []


def test_ignore_drain_keeps_leaving_replicas_until_they_exit():
    t = BackendTable(ignore_drain=True)
    t.apply_snapshot(snapshot(("r1", "n1", 1, "ready")))
    for event in ("replica.draining", "replica.stopping"):
        assert t.apply_event(event, {"app": "web", "replica": "r1", "node": "n1"}) == set()
        assert ids(t.backends("web")) == ["r1"]
    assert ids(t.apply_event("replica.exited", {"app": "web", "replica": "r1",
                                                "node": "n1"})) == ["r1"]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_new_leaders_snapshot_without_a_node_keeps_that_nodes_replicas_routed():
    """A new leader in its adopt grace has not heard from n2 yet: n2's replicas serve
    on; they become rows again when the leader reports them."""
    from skr8tr.ingress.routes import CARRY_S

    clock = Clock()
    t = BackendTable(clock=clock)
    t.apply_snapshot(snapshot(("r1", "n1", 1, "ready"), ("r2", "n2", 2, "ready")))
    gone = t.apply_snapshot(snapshot(("r1", "n1", 1, "ready"), nodes=(("n1", "127.0.0.1"),)))
    assert gone == set() and ids(t.backends("web")) == ["r1", "r2"]
    t.apply_event("node.joined", {"node": "n2", "address": "127.0.0.2"})
    t.apply_event("replica.adopted", {"app": "web", "replica": "r2", "node": "n2",
                                      "state": "ready", "port": 2, "generation": 1})
    clock.now += CARRY_S + 1
    assert ids(t.backends("web")) == ["r1", "r2"] and t.pick("web").replica in ("r1", "r2")
    assert ids(t.backends("web")) == ["r1", "r2"], "reported again: no longer carried"


def test_carried_replicas_leave_soon_after_their_node_joins_without_them_or_at_the_limit():
    from skr8tr.ingress.routes import CARRY_S, REJOIN_S

    clock = Clock()
    t = BackendTable(clock=clock)
    t.apply_snapshot(snapshot(("r1", "n1", 1, "ready"), ("r2", "n2", 2, "ready"),
                              ("r3", "n2", 3, "ready"),
                              nodes=(("n1", "127.0.0.1"), ("n2", "127.0.0.2"),
                                     ("n3", "127.0.0.3"))))
    t.apply_snapshot(snapshot(("r1", "n1", 1, "ready"), nodes=(("n1", "127.0.0.1"),)))
    t.apply_event("node.joined", {"node": "n2", "address": "127.0.0.2"})
    t.apply_event("replica.adopted", {"app": "web", "replica": "r3", "node": "n2",
                                      "state": "ready", "port": 3, "generation": 1})
    clock.now += REJOIN_S
    assert t.pick("web") is not None
    assert ids(t.backends("web")) == ["r1", "r3"], "r2 was not reported by its node"
    # A replica whose node never comes back is routed at most CARRY_S.
    t.apply_snapshot(snapshot(("r1", "n1", 1, "ready"), ("r4", "n3", 4, "ready"),
                              nodes=(("n1", "127.0.0.1"), ("n2", "127.0.0.2"),
                                     ("n3", "127.0.0.3"))))
    assert ids(t.backends("web")) == ["r1", "r4"]  # n2 known, r3 not listed: gone
    t.apply_snapshot(snapshot(("r1", "n1", 1, "ready"), nodes=(("n1", "127.0.0.1"),)))
    assert ids(t.backends("web")) == ["r1", "r4"]
    clock.now += CARRY_S
    gone = t.apply_event("replica.ready", {"app": "web", "replica": "r1", "node": "n1",
                                           "state": "ready", "port": 1})
    assert ids(gone) == ["r4"] and ids(t.backends("web")) == ["r1"]
    # A snapshot whose conductor knows the node but not the replica: gone at once.
    t.apply_snapshot(snapshot(("r1", "n1", 1, "ready"), ("r5", "n1", 5, "ready"),
                              nodes=(("n1", "127.0.0.1"),)))
    gone = t.apply_snapshot(snapshot(("r1", "n1", 1, "ready"), nodes=(("n1", "127.0.0.1"),)))
    assert ids(gone) == ["r5"]
