"""Which conductor a client tries next (skr8tr.failover, pure), and both clients, the CLI's
blocking one and the trio one, following a follower to the leader the same way."""

from __future__ import annotations

from functools import partial

import pytest
import trio

from skr8tr import blocking_client, client
from skr8tr.failover import Doubling, LeaderSearch, conductor_urls, leader_hint
from skr8tr.wire import CallOptions, ClientError, FailoverCall
from tests.fake_conductors import open_fakes

DEADLINE_S = 30


def dial(search: LeaderSearch, n: int) -> list[tuple[str, float]]:
    """(url, wait) of the next *n* attempts, each one failing."""
    seen = []
    for _ in range(n):
        attempt = search.next()
        seen.append((attempt.url, attempt.wait_s))
        search.failed()
    return seen


def test_passes_go_down_the_list_with_a_doubling_wait_between_them():
    search = LeaderSearch(["a", "b"], backoff=Doubling(0.2, 1.0))
    assert dial(search, 10) == [("a", 0), ("b", 0), ("a", 0.2), ("b", 0), ("a", 0.4), ("b", 0),
                                ("a", 0.8), ("b", 0), ("a", 1.0), ("b", 0)]


def test_a_named_leader_is_next_without_waiting_and_a_served_one_is_first_after():
    search = LeaderSearch(["ws://a", "ws://b"])
    assert search.next().url == "ws://a"
    assert search.not_leader("ws://c") == "ws://c"
    attempt = search.next()
    assert (attempt.url, attempt.wait_s, attempt.followed) == ("ws://c", 0, True)
    search.served()
    again = search.next()  # the connection to c dropped: c first, after the backoff
    assert (again.url, again.wait_s, again.starts_pass) == ("ws://c", 0.2, True)
    search.failed()
    assert dial(search, 3) == [("ws://a", 0), ("ws://b", 0), ("ws://c", 0.4)]


@pytest.mark.parametrize("asked, leader, followed", [
    ("ws://a", "ws://b:7771", "ws://b:7771"),
    ("wss://a", "wss://b:7771", "wss://b:7771"),
    ("wss://a", "ws://b:7771", None),  # a follower cannot talk a client out of TLS
    ("ws://a", "http://b", None),
    ("ws://a", "ws://", None),
    ("ws://a", "ws://b:99999", None),
    ("ws://a", None, None),
    ("ws://a", 7, None),
])
def test_which_leader_hints_are_followed(asked, leader, followed):
    assert leader_hint(asked, leader) == followed


def test_hops_are_bounded_per_pass():
    search = LeaderSearch(["ws://a", "ws://b"])
    search.next()
    hops = 0
    while search.not_leader("ws://b" if hops % 2 == 0 else "ws://a"):
        search.next()
        hops += 1
    assert hops == 2 + 3
    assert search.next().url == "ws://b"  # on down the list


def test_conductor_urls():
    assert conductor_urls(" ws://a:1 ,, ws://b:2/ ") == ("ws://a:1", "ws://b:2/")
    with pytest.raises(ValueError, match="URL"):
        conductor_urls(" , ")


def test_a_bad_url_anywhere_in_the_list_is_bad_usage():
    with pytest.raises(ClientError) as err:
        FailoverCall("ws://a:1,http://b:2", "/v1/cli", 1.0, 0.0)
    assert (err.value.code, err.value.exit) == ("BAD_URL", 2)


async def test_both_clients_follow_a_follower_and_agree_when_nobody_leads():
    with trio.fail_after(DEADLINE_S):
        async with open_fakes("follower", "leader", "follower") as (a, leader, lost):
            a.leader = leader.url
            leader.results["status"] = {"nodes": [{"node": "n1"}]}
            opts = CallOptions(a.url, 5.0, None)
            assert await client.call(opts, "status", {}) == {"nodes": [{"node": "n1"}]}
            blocking = await trio.to_thread.run_sync(
                partial(blocking_client.call, opts, "status", {}), abandon_on_cancel=True)
            assert blocking == {"nodes": [{"node": "n1"}]}
            assert a.cmds() == leader.cmds() == ["status", "status"]

            async with client.open_watch(opts) as stream:
                first = await stream.__anext__()
            assert first.type == "snapshot" and stream.conductor == leader.url

            nobody = CallOptions(lost.url, 0.5, None)
            with pytest.raises(ClientError) as via_trio:
                await client.call(nobody, "nodes", {})
            with pytest.raises(ClientError) as via_blocking:
                await trio.to_thread.run_sync(
                    partial(blocking_client.call, nobody, "nodes", {}), abandon_on_cancel=True)
    assert (via_trio.value.code, via_trio.value.exit) == ("NOT_LEADER", 1)
    assert (via_blocking.value.code, via_blocking.value.exit) == ("NOT_LEADER", 1)
    assert via_trio.value.message == via_blocking.value.message
