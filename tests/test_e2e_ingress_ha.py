"""/v1/ingress on several conductors (DESIGN.md §9, §11): a real etcd and two real
conductors; a follower answers an ingress NOT_LEADER naming the leader before anything
is verified, the leader welcomes it, and after the leader dies the new one does."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import trio

from skr8tr import keyfiles
from skr8tr.ws import trio_client
from skr8tr.ws.frames import ConnectionClosed
from tests.e2e import poll
from tests.ha import running_ha_cluster
from tests.ingress_client import open_ingress, report

pytestmark = pytest.mark.e2e


async def first_message(url: str) -> dict:
    async with trio_client.open_websocket(url + "/v1/ingress") as ws:
        return json.loads(await ws.get_message())


def test_a_follower_sends_an_ingress_to_the_leader(tmp_path: Path):
    with running_ha_cluster(tmp_path, conductors=2, nodes=0) as ha:
        signer = keyfiles.load_signing_key(ha.add_key("edge", "ingress"))
        for c in ha.conductors.values():
            c.daemon.proc.send_signal(signal.SIGHUP)
            poll(lambda c=c: "SIGHUP: re-read" in c.daemon.log(), what="the keys re-read")
        leader = poll(ha.leader, what="a leader")
        (follower,) = [n for n in ha.conductors if n != leader]
        leader_url = ha.conductors[leader].url
        answer = trio.run(first_message, ha.conductors[follower].url)
        assert answer["type"] == "error" and answer["code"] == "NOT_LEADER"
        assert answer["leader"] == leader_url

        async def session_until_the_leader_dies() -> int:
            async with open_ingress(leader_url, signer) as ws:
                await ws.send_message(report(1))
                await trio.to_thread.run_sync(lambda: poll(
                    lambda: [r["reports"] for r in ha.json("status")["ingresses"]] == [1],
                    what="the report at the leader"))
                ha.kill(leader)
                with trio.fail_after(10), pytest.raises(ConnectionClosed) as closed:
                    while True:
                        await ws.get_message()
                return closed.value.code

        assert trio.run(session_until_the_leader_dies) == 1006
        assert poll(lambda: ha.leader() == follower, what="the follower to lead")

        async def welcomed_by_the_new_leader() -> None:
            async with open_ingress(ha.conductors[follower].url, signer) as ws:
                await ws.send_message(report(1))

        trio.run(welcomed_by_the_new_leader)
