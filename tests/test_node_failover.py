"""The node agent across several conductors: it follows a follower's ``refused`` NOT_LEADER
to the leader, and closes a session offered under a lower leadership term (a deposed leader),
then goes to the others. Scripted conductors from tests/test_node_agent.py; replicas are real
processes, and must keep running through all of it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import trio

from skr8tr.core.envelope import new_challenge
from skr8tr.keyfiles import write_keypair
from skr8tr.node.agent import AgentConfig, AgentConfigError, node_urls, run_agent
from skr8tr.node.session import StaleTerm, Terms
from skr8tr.ws import trio_client
from tests.test_node_agent import Peer, sleep_launch, start_conductor
from tests.test_node_supervisor import alive, assert_gone

TEST_DEADLINE_S = 30
STEP_S = 10


@pytest.fixture
def key_path(tmp_path: Path) -> Path:
    write_keypair(tmp_path / "keys")
    return tmp_path / "keys" / "signing.sec"


async def offer(peer: Peer, **term: int) -> dict:
    """A challenge (with ``term=T`` if given); the agent's hello."""
    await peer.send("challenge", nonce=new_challenge().hex(), **term)
    return await peer.expect("hello")


async def agent_on_two(nursery: trio.Nursery, tmp_path: Path, key_path: Path):
    """Two scripted conductors, ((conductor, url), (conductor, url)), and an agent given
    both URLs, in that order."""
    a, a_url = await start_conductor(nursery)
    b, b_url = await start_conductor(nursery)
    config = AgentConfig(f"{a_url},{b_url}", str(key_path), "node-a",
                         str(tmp_path / "d"), None, stop_workloads=True)
    await nursery.start(run_agent, config)
    return (a, a_url), (b, b_url)


async def closed_by_the_agent(peer: Peer) -> None:
    """The agent closes the connection, sending nothing more (no hello, no heartbeat)."""
    with trio.fail_after(STEP_S), pytest.raises(trio_client.ConnectionClosed):
        while True:
            msg = await peer.ws.get_message()
            assert '"heartbeat"' not in msg and '"hello"' not in msg, msg


async def test_a_follower_sends_the_node_to_the_leader_it_names(tmp_path: Path,
                                                                key_path: Path) -> None:
    with trio.fail_after(TEST_DEADLINE_S):
        async with trio.open_nursery() as nursery:
            follower, follower_url = await start_conductor(nursery)
            leader, leader_url = await start_conductor(nursery)
            # Only the follower is listed: the leader is found through its refusal.
            config = AgentConfig(follower_url, str(key_path), "node-a", str(tmp_path / "d"),
                                 None, stop_workloads=True)
            await nursery.start(run_agent, config)
            peer = await follower.next_peer()
            await peer.send("refused", code="NOT_LEADER", message="a follower",
                            leader=leader_url)
            await closed_by_the_agent(peer)
            peer = await leader.next_peer()  # at once: no backoff before a named leader
            hello = await offer(peer, term=12)
            await peer.send("welcome", node_id="node-a", heartbeat_s=0.05, term=12)
            await peer.expect("heartbeat")
            assert hello["node_id"] == "node-a"
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("where", ["challenge without a term", "welcome"])
async def test_a_lower_term_is_refused_and_the_others_are_tried(
        tmp_path: Path, key_path: Path, caplog: pytest.LogCaptureFixture, where: str) -> None:
    caplog.set_level(logging.INFO, logger="skr8tr.node")
    pids: list[int] = []
    with trio.fail_after(TEST_DEADLINE_S):
        async with trio.open_nursery() as nursery:
            (a, a_url), (b, _b_url) = await agent_on_two(nursery, tmp_path, key_path)

            # a leads under term 7 and starts a replica.
            peer = await a.next_peer()
            await offer(peer, term=7)
            await peer.send("welcome", node_id="node-a", heartbeat_s=5, term=7)
            await peer.send("launch", **sleep_launch("r1"))
            pids.append((await peer.expect("replica", replica="r1", state="running"))["pid"])
            await peer.ws.aclose()

            # a comes back (dialled first: it led last) offering an older term.
            peer = await a.next_peer()
            if where == "welcome":
                await offer(peer, term=7)
                await peer.send("welcome", node_id="node-a", heartbeat_s=0.05, term=3)
                older = 3
            else:
                await peer.send("challenge", nonce=new_challenge().hex())  # no term: 0
                older = 0
            await closed_by_the_agent(peer)

            # b, the next one listed, leads under a later term: the node joins it, the
            # replica still running.
            peer = await b.next_peer()
            hello = await offer(peer, term=9)
            assert [(r["replica"], r["pid"]) for r in hello["replicas"]] == [("r1", pids[0])]
            await peer.send("welcome", node_id="node-a", heartbeat_s=0.05, term=9)
            await peer.expect("heartbeat")
            assert alive(pids[0])
            nursery.cancel_scope.cancel()
    await assert_gone(pids)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"the conductor at {a_url}/v1/node offers leadership term {older}, lower than "
               "term 7" in w for w in warnings), warnings


def test_terms_remember_the_highest_welcome():
    terms = Terms()
    terms.check("ws://a", 0)  # a lone conductor (term 0) is fine until a term is seen
    terms.welcomed(5)
    terms.welcomed(3)  # never goes down
    assert terms.highest == 5
    terms.check("ws://a", 5)
    with pytest.raises(StaleTerm) as stale:
        terms.check("ws://b", 4)
    assert (stale.value.url, stale.value.term, stale.value.highest) == ("ws://b", 4, 5)


def test_the_conductor_list_is_checked_url_by_url():
    assert node_urls(" ws://a:1/, wss://b:2/v1/node ,") == ("ws://a:1/v1/node",
                                                            "wss://b:2/v1/node")
    for bad in ("ws://a:1,http://b:2", " , "):
        with pytest.raises(AgentConfigError) as err:
            node_urls(bad)
        assert err.value.code == "BAD_URL"


async def test_a_frozen_conductor_is_left_for_the_next(tmp_path: Path, key_path: Path) -> None:
    """A conductor that stops answering (SIGSTOP, a partition) keeps the TCP connection
    open; the agent notices by its unanswered pings and goes to the next one."""
    with trio.fail_after(TEST_DEADLINE_S):
        async with trio.open_nursery() as nursery:
            (a, _a_url), (b, _b_url) = await agent_on_two(nursery, tmp_path, key_path)
            peer = await a.next_peer()
            await offer(peer, term=3)
            await peer.send("welcome", node_id="node-a", heartbeat_s=0.1, term=3)
            await peer.expect("heartbeat")
            frozen_at = trio.current_time()
            # From now on `a` reads nothing: no pong goes back, as from a frozen process.
            peer = await b.next_peer()
            left_after = trio.current_time() - frozen_at
            assert left_after >= 0.3 - 0.05, "not before 3 silent heartbeats"
            await offer(peer, term=4)
            await peer.send("welcome", node_id="node-a", heartbeat_s=0.1, term=4)
            await peer.expect("heartbeat")
            nursery.cancel_scope.cancel()
