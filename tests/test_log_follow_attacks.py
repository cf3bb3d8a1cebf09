"""Issue #17, attacked: a hostile node's ``logs_push`` and ``logs_reply`` against the
conductor's follows, in memory (tests/test_log_follow.py's node outboxes)."""

from __future__ import annotations

import dataclasses

import pytest

from skr8tr.conductor.cluster import Cluster
from skr8tr.conductor.logs import (
    FOLLOW_PENDING_LINES,
    MAX_FOLLOW_AFTER,
    LogRequests,
    is_replica_of,
    own_lines,
)
from skr8tr.conductor.tables import ReplicaState
from skr8tr.core.node_protocol import MAX_NODE_MESSAGE_BYTES, LogsPush, LogsRequest
from tests.test_log_follow import Node, line, open_follow


@pytest.fixture
def cluster() -> Cluster:
    c = Cluster(clock=lambda: 0.0, wall=lambda: 1000.0)
    c.apps["web"] = object()  # the handler only checks that the app is known
    return c


def test_replica_ids_of_an_app():
    apps = {"web", "web-abc"}
    assert is_replica_of("web-0a1b2c", "web", apps)
    assert not is_replica_of("web-abc-0a1b2c", "web", apps)  # app web-abc's
    assert is_replica_of("web-abc-0a1b2c", "web-abc", apps)
    assert is_replica_of("web-1-0a1b2c", "web", apps)  # (whatever comes after the app)
    assert not is_replica_of("webx-0a1b2c", "web", apps)
    assert not is_replica_of("web", "web", apps) and not is_replica_of("web-", "web", apps)


async def test_a_node_that_pushes_only_skipped_counts_costs_no_buffer(cluster):
    requests = LogRequests()
    n1 = Node(cluster, "n1")
    _, follow = await open_follow(cluster, requests, [n1], {})
    for _ in range(3 * FOLLOW_PENDING_LINES):
        requests.push("n1", LogsPush(req=n1.req, lines=[], skipped=2**53))
    assert len(follow.pending) == 1  # one marker, however many counts came
    lines, skipped = await follow.next_batch(100)
    assert (lines, skipped) == ([], 3 * FOLLOW_PENDING_LINES * 2**53)
    # Counts between lines stay in place, merged; a full buffer takes them in its own.
    requests.push("n1", LogsPush(req=n1.req, lines=[line("web-a", 1)], skipped=3))
    requests.push("n1", LogsPush(req=n1.req, lines=[], skipped=4))
    requests.push("n1", LogsPush(req=n1.req, lines=[line("web-a", 9)], skipped=0))
    assert len(follow.pending) == 3
    assert await follow.next_batch(100) == ([line("web-a", 1)], 7)
    requests.push(
        "n1",
        LogsPush(
            req=n1.req,
            lines=[line("web-a", i + 10) for i in range(2 * FOLLOW_PENDING_LINES)],
            skipped=0,
        ),
    )
    for _ in range(1000):
        requests.push("n1", LogsPush(req=n1.req, lines=[], skipped=1))
    assert len(follow.pending) == FOLLOW_PENDING_LINES
    assert follow.skipped == FOLLOW_PENDING_LINES + 1 + 1000


async def test_a_node_pushes_only_its_own_replicas_of_the_followed_app(cluster):
    requests = LogRequests()
    n1, n2 = Node(cluster, "n1"), Node(cluster, "n2")
    cluster.replicas["web-aaaaaa"] = ReplicaState(
        replica_id="web-aaaaaa",
        app="web",
        generation=1,
        node_id="n2",
        address="127.0.0.1",
        port=None,
        seq=1,
        launched_at=0.0,
    )
    # n1's own replica, of another app whose name starts with web-
    cluster.apps["web-x"] = object()
    cluster.replicas["web-x-eeeeee"] = dataclasses.replace(
        cluster.replicas["web-aaaaaa"], replica_id="web-x-eeeeee", app="web-x", node_id="n1"
    )
    # n1 ran web-dddddd, which has ended (its row is gone; the conductor remembers).
    cluster.replicas["web-dddddd"] = dataclasses.replace(
        cluster.replicas["web-aaaaaa"], replica_id="web-dddddd", node_id="n1"
    )
    del cluster.replicas["web-dddddd"]
    _, follow = await open_follow(cluster, requests, [n1, n2], {})
    forged = [
        line("web-aaaaaa", 1, "n2's"),
        line("api-bbbbbb", 1),
        line("web-x-cccccc", 1),
        line("web-x-eeeeee", 1),
        line("web-ffffff", 1, "invented"),  # an id of web the conductor never placed
    ]
    requests.push(
        "n1", LogsPush(req=n1.req, lines=[*forged, line("web-dddddd", 5)], skipped=0), cluster
    )
    requests.push("n2", LogsPush(req=n2.req, lines=[line("web-aaaaaa", 2)], skipped=0), cluster)
    lines, _ = await follow.next_batch(100)
    assert [(x["replica"], x["seq"]) for x in lines] == [("web-dddddd", 5), ("web-aaaaaa", 2)]
    assert follow.last_seq == {"web-dddddd": 5, "web-aaaaaa": 2}


async def test_a_follow_of_one_replica_takes_no_other(cluster):
    requests = LogRequests()
    n1 = Node(cluster, "n1")
    _, follow = await open_follow(cluster, requests, [n1], {}, replica="web-aaaaaa")
    requests.push(
        "n1", LogsPush(req=n1.req, lines=[line("web-bbbbbb", 1), line("web-aaaaaa", 2)], skipped=0)
    )
    assert [x["replica"] for x in (await follow.next_batch(100))[0]] == ["web-aaaaaa"]


def test_own_lines_keeps_the_list_when_all_are_fine():
    lines = [line("web-aaaaaa", 1), line("web-bbbbbb", 2)]
    assert own_lines(lines, "n1", "web", None, None) is lines


async def test_a_resume_point_always_fits_in_a_node_message(cluster):
    # A node may name its replicas with ids of up to 128 characters: 10,000 of them
    # shown would make a request the node cannot read (it would leave and come back).
    requests = LogRequests()
    n1 = Node(cluster, "n1")
    _, follow = await open_follow(cluster, requests, [n1], {})
    ids = [f"web-{i:0124d}" for i in range(MAX_FOLLOW_AFTER)]
    for start in range(0, len(ids), 1000):
        requests.push(
            "n1",
            LogsPush(
                req=n1.req, skipped=0, lines=[line(r, 2**53) for r in ids[start : start + 1000]]
            ),
        )
        await follow.next_batch(1000)
    assert len(follow.last_seq) == MAX_FOLLOW_AFTER
    after = follow.resume_point()
    text = LogsRequest(
        req="r" * 16, app="web", replica=None, tail=0, follow=True, after=after, since=1.0
    ).encode()
    assert len(text.encode()) < MAX_NODE_MESSAGE_BYTES
    assert ids[-1] in after and 5000 < len(after) < MAX_FOLLOW_AFTER  # the most recent
    assert list(after) == ids[-len(after) :]
