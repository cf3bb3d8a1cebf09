"""Placement (pure): table-driven cases and a property that no port is ever claimed twice."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from skr8tr.core.placement import (
    LoadOrder,
    NoCapacity,
    NodeView,
    Placement,
    PlacementRequest,
    place,
    place_many,
)

N1 = NodeView("n1", "10.0.0.1", cores=4, ram_free_mb=4000)
N2 = NodeView("n2", "10.0.0.2", cores=4, ram_free_mb=4000)


@pytest.mark.parametrize("request_, nodes, ports, expected", [
    # least loaded wins: fewest replicas first
    (PlacementRequest("a"), [NodeView("n1", "h1", replicas=2), NodeView("n2", "h2", replicas=1)],
     {}, Placement("n2", "h2", None)),
    # then lowest CPU%
    (PlacementRequest("a"), [NodeView("n1", "h1", cpu_pct=50), NodeView("n2", "h2", cpu_pct=10)],
     {}, Placement("n2", "h2", None)),
    # then node id
    (PlacementRequest("a"), [NodeView("n2", "h2"), NodeView("n1", "h1")], {},
     Placement("n1", "h1", None)),
    # dead nodes are skipped
    (PlacementRequest("a"), [NodeView("n1", "h1", live=False), NodeView("n2", "h2", replicas=9)],
     {}, Placement("n2", "h2", None)),
    # a fixed port must be free on the node's address
    (PlacementRequest("a", port=8080), [N1, N2], {"10.0.0.1": {8080}},
     Placement("n2", "10.0.0.2", 8080)),
    # auto takes the lowest free port of the range on that address
    (PlacementRequest("a", port="auto"), [N1], {"10.0.0.1": {20000, 20001, 20003}},
     Placement("n1", "10.0.0.1", 20002)),
    # ram hint: free minus reserved must fit
    (PlacementRequest("a", ram_mb=3000),
     [NodeView("n1", "h1", ram_free_mb=4000, reserved_ram_mb=1500),
      NodeView("n2", "h2", ram_free_mb=3000, replicas=5)], {}, Placement("n2", "h2", None)),
    # cpu hint: cores * (1 - cpu%) - reserved
    (PlacementRequest("a", cpu=1.5),
     [NodeView("n1", "h1", cores=2, cpu_pct=50), NodeView("n2", "h2", cores=2, replicas=3)],
     {}, Placement("n2", "h2", None)),
    # nodes to avoid
    (PlacementRequest("a", avoid_nodes=frozenset({"n1"})), [N1, N2], {},
     Placement("n2", "10.0.0.2", None)),
])
def test_place_chooses(request_, nodes, ports, expected):
    assert place(request_, nodes, ports, (20000, 20010)) == expected


@pytest.mark.parametrize("request_, nodes, ports, needles", [
    (PlacementRequest("web"), [], {}, ["no node is connected"]),
    (PlacementRequest("web", port=8080), [N1, NodeView("n3", "10.0.0.1")],
     {"10.0.0.1": {8080}},
     ["port 8080 is taken on 10.0.0.1 (n1)", "port 8080 is taken on 10.0.0.1 (n3)",
      "hint: use `port auto`", "order stop-first"]),
    (PlacementRequest("web", port="auto"), [N1], {"10.0.0.1": set(range(20000, 20011))},
     ["no free port in 20000-20010 on 10.0.0.1"]),
    (PlacementRequest("web", ram_mb=5000), [N1], {}, ["n1 has 4000 MB RAM free, needs 5000 MB"]),
    (PlacementRequest("web", cpu=8), [N1], {}, ["n1 has 4.00 cores free, needs 8"]),
    (PlacementRequest("web"), [NodeView("n1", "h1", live=False)], {}, ["n1 is not connected"]),
])
def test_no_capacity_names_what_did_not_fit(request_, nodes, ports, needles):
    result = place(request_, nodes, ports, (20000, 20010))
    assert isinstance(result, NoCapacity)
    assert result.message.startswith("no node can run a replica of web")
    for needle in needles:
        assert needle in result.message


def test_place_many_spreads_and_claims_as_it_goes():
    nodes = [NodeView("n1", "h"), NodeView("n2", "h"), NodeView("n3", "g")]
    done, short = place_many(PlacementRequest("a", port="auto"), 6, nodes, {}, (100, 200))
    assert short is None
    assert sorted(p.node_id for p in done) == ["n1", "n1", "n2", "n2", "n3", "n3"]
    # n1 and n2 share the address h: four distinct ports there
    assert sorted(p.port for p in done if p.address == "h") == [100, 101, 102, 103]
    assert sorted(p.port for p in done if p.address == "g") == [100, 101]


def test_place_many_stops_at_the_first_shortfall():
    done, short = place_many(PlacementRequest("a", port=80), 3,
                             [NodeView("n1", "h"), NodeView("n2", "g")], {}, (1, 2))
    assert [(p.node_id, p.port) for p in done] == [("n1", 80), ("n2", 80)]
    assert isinstance(short, NoCapacity)


node_st = st.builds(
    NodeView,
    node_id=st.sampled_from(["n1", "n2", "n3", "n4", "n5"]),
    address=st.sampled_from(["a", "b", "c"]),
    live=st.booleans(),
    cpu_pct=st.floats(0, 100),
    cores=st.integers(1, 8),
    ram_free_mb=st.integers(0, 8000),
    replicas=st.integers(0, 5),
)


@settings(max_examples=300, deadline=None)
@given(
    nodes=st.lists(node_st, max_size=5, unique_by=lambda n: n.node_id),
    port=st.one_of(st.none(), st.just("auto"), st.integers(1, 3)),
    count=st.integers(0, 12),
    held=st.dictionaries(st.sampled_from(["a", "b", "c"]),
                         st.sets(st.integers(1, 12), max_size=6)),
    ram=st.one_of(st.none(), st.integers(1, 4000)),
)
def test_never_claims_a_port_twice_and_never_picks_a_dead_node(nodes, port, count, held, ram):
    done, short = place_many(PlacementRequest("a", port=port, ram_mb=ram), count, nodes,
                             held, (1, 12))
    assert len(done) == count or isinstance(short, NoCapacity)
    live = {n.node_id: n for n in nodes if n.live}
    claimed = set()
    for p in done:
        assert p.node_id in live and live[p.node_id].address == p.address
        if port is not None:
            assert p.port is not None
            assert p.port not in held.get(p.address, set())
            assert (p.address, p.port) not in claimed
            claimed.add((p.address, p.port))
        else:
            assert p.port is None


@settings(max_examples=300, deadline=None)
@given(
    nodes=st.lists(node_st, min_size=1, max_size=6, unique_by=lambda n: n.node_id),
    steps=st.lists(st.tuples(st.integers(0, 5), st.integers(-2, 2), st.floats(0, 100)),
                   max_size=12),
    port=st.one_of(st.none(), st.just("auto"), st.integers(1, 3)),
    held=st.dictionaries(st.sampled_from(["a", "b", "c"]),
                         st.sets(st.integers(1, 12), max_size=6)),
    ram=st.one_of(st.none(), st.integers(1, 4000)),
)
def test_load_order_chooses_what_place_chooses(nodes, steps, port, held, ram):
    """The conductor's heap gives the answer of the full scan, whatever changed in between
    (replica counts up or down, CPU% up or down), as long as decreases are offered."""
    current = {n.node_id: n for n in nodes}
    order = LoadOrder()
    order.rebuild(list(current.values()))
    request = PlacementRequest("a", port=port, ram_mb=ram)
    for index, delta, cpu in steps:
        node = list(current.values())[index % len(current)]
        changed = dataclasses.replace(node, replicas=max(0, node.replicas + delta), cpu_pct=cpu)
        current[node.node_id] = changed
        if (changed.replicas, changed.cpu_pct) < (node.replicas, node.cpu_pct):
            order.offer(changed)
        expected = place(request, sorted(current.values(), key=lambda n: n.node_id), held,
                         (1, 12))
        got = order.place(request, current.get, held, (1, 12))
        assert got == (None if isinstance(expected, NoCapacity) else expected)
