"""What a follower conductor answers on /v1/cli (DESIGN.md §9), without etcd: the seat
says follower, and every request but ping is refused naming the leader, before
anything is verified or spent."""

from __future__ import annotations

import json
import time

from skr8tr.conductor.api import LARGE_MESSAGE_BYTES, CliApi
from skr8tr.conductor.authority import Authority
from skr8tr.conductor.cluster import Cluster
from skr8tr.conductor.seat import Seat
from skr8tr.core.keys import parse_authorized_keys

LEADER = "ws://10.0.0.2:7771"


def follower_api(*, reachable: bool = True, leader: str | None = LEADER) -> CliApi:
    seat = Seat(url="ws://10.0.0.1:7771", role="follower", leader=leader)
    seat.store_reachable = reachable
    authority = Authority(parse_authorized_keys("", filename="(none)"), insecure=True)
    return CliApi(Cluster(node_timeout_s=9.0, seat=seat), authority, time.time)


async def test_a_follower_answers_ping_and_refuses_the_rest_naming_the_leader():
    api = follower_api()
    ping = json.loads(await api.handle_message(json.dumps(
        {"v": 1, "id": "p", "cmd": "ping", "args": {}}), "127.0.0.1"))
    assert ping["result"] == {"pong": "conductor", "version": ping["result"]["version"],
                              "role": "follower", "leader": LEADER}
    for cmd, args in (("list", {"app": None}), ("scale", {"app": "web", "replicas": 2}),
                      ("restart", {"app": "web"}), ("describe", {"app": "web"}),
                      ("revision", {"app": "web", "generation": 1}),
                      ("rollout-undo", {"app": "web", "to": 1, "force": True})):
        reply = json.loads(await api.handle_message(json.dumps(
            {"v": 1, "id": "r", "cmd": cmd, "args": args}), "127.0.0.1"))
        assert reply["id"] == "r" and reply["error"]["code"] == "NOT_LEADER"
        assert reply["error"]["leader"] == LEADER


async def test_without_etcd_and_a_leader_it_is_unavailable_and_large_requests_are_not_parsed(
        monkeypatch):
    from skr8tr.conductor import api as api_mod

    parsed: list[int] = []
    real = api_mod.parse_object
    monkeypatch.setattr(api_mod, "parse_object",
                        lambda raw, **kw: parsed.append(len(raw)) or real(raw, **kw))
    api = follower_api(reachable=False, leader=None)
    reply = json.loads(await api.handle_message(json.dumps(
        {"v": 1, "id": "r", "cmd": "status", "args": {}}), "127.0.0.1"))
    assert reply["error"]["code"] == "UNAVAILABLE"
    big = '{"v":1,"id":"big","cmd":"up","args":{"manifest":"' + "x" * LARGE_MESSAGE_BYTES + '"}}'
    assert len(parsed) == 1  # the small one
    reply = json.loads(await api.handle_message(big, "127.0.0.1"))
    assert reply["id"] is None and reply["error"]["code"] == "UNAVAILABLE"
    assert len(parsed) == 1, "a request over LARGE_MESSAGE_BYTES is refused unparsed"


async def test_a_message_to_a_node_whose_session_just_ended_is_not_sent_and_raises_nothing():
    """A deposed leader's reconciler may still place on a node whose session the step-down
    has just closed: BrokenResourceError took the whole conductor down."""
    from types import SimpleNamespace

    import trio

    from skr8tr.core.node_protocol import Stop

    cluster = Cluster(node_timeout_s=9.0)
    send, receive = trio.open_memory_channel[str](8)
    cluster.nodes["n1"] = SimpleNamespace(outbox=send)  # type: ignore[assignment]
    await receive.aclose()  # the session's side is gone
    assert cluster.send("n1", Stop(replica="r1")) is False
    assert cluster.nodes["n1"].outbox is None


async def test_a_write_whose_outcome_is_unknown_ends_the_term_and_says_it_may_have_happened():
    """etcd timed out after the transaction was sent: it may have been kept, so the
    command must not say "nothing was changed", and memory (which may now differ from
    etcd) is dropped with the term."""
    import pytest

    from skr8tr.conductor.errors import CommandError
    from skr8tr.conductor.etcd_client import EtcdError
    from skr8tr.conductor.etcd_store import EtcdStore
    from skr8tr.conductor.store import Change, StoreOutcomeUnknown, StoreUnavailable
    from tests.test_store import app

    class Client:
        def __init__(self, sent: bool) -> None:
            self.sent = sent

        async def txn(self, *args, **kwargs):
            raise EtcdError("etcd http://h:1: /v3/kv/txn: read timed out", sent=self.sent)

    unsent = EtcdStore(Client(sent=False), "/t")  # type: ignore[arg-type]
    with pytest.raises(StoreUnavailable) as caught:
        await unsent.apply(Change(apps={"web": app("web")}))
    assert not isinstance(caught.value, StoreOutcomeUnknown)

    cluster = Cluster(node_timeout_s=9.0, store=EtcdStore(Client(sent=True), "/t"))  # type: ignore[arg-type]
    deposed: list[str] = []
    cluster.deposed = deposed.append
    with pytest.raises(CommandError) as refused:
        await cluster.commit(Change(apps={"web": app("web")}))
    assert refused.value.code == "UNAVAILABLE"
    assert "may have been applied" in refused.value.message
    assert deposed and "outcome is unknown" in deposed[0]
