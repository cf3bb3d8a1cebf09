"""The conductor's side of ``logs --follow``: subscribing nodes, relaying what they push
through a bounded buffer, and unsubscribing when the client goes. In memory, with a
node session's outbox read directly (no sockets)."""

from __future__ import annotations

import json

import pytest
import trio
import trio.testing

from skr8tr.conductor.cluster import Cluster
from skr8tr.conductor.commands import make_logs_handler
from skr8tr.conductor.errors import CommandError
from skr8tr.conductor.logs import FOLLOW_KEY, FOLLOW_PENDING_LINES, LogFollow, LogRequests
from skr8tr.core.node_protocol import LogsPush, LogsReply
from tests.fakes import FakeNode


def line(replica: str, seq: int, text: str | None = None) -> dict:
    return {"replica": replica, "ts": float(seq), "stream": "stdout",
            "text": text if text is not None else f"line {seq}", "seq": seq}


class Node:
    """A node session's outbox, read by the test; answers follow requests by hand."""

    def __init__(self, cluster: Cluster, node_id: str) -> None:
        self.cluster = cluster
        self.node_id = node_id
        self.send, self.recv = trio.open_memory_channel[str](100)
        self.session = cluster.attach_node(FakeNode(cluster, node_id).hello(), self.send)

    def messages(self) -> list[dict]:
        out = []
        while True:
            try:
                out.append(json.loads(self.recv.receive_nowait()))
            except trio.WouldBlock:
                return out


async def open_follow(cluster: Cluster, requests: LogRequests, nodes: list[Node],
                      answers: dict[str, list[dict]], **args) -> tuple[dict, LogFollow]:
    """Run the logs handler with follow; each node answers its request with *answers*."""
    handler = make_logs_handler(requests)
    result: dict = {}

    async def run() -> None:
        result.update(await handler(cluster, {"app": "web", "replica": None, "tail": 10,
                                              "follow": True, **args}))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        await trio.testing.wait_all_tasks_blocked()
        for node in nodes:
            [msg] = node.messages()
            assert (msg["type"], msg["follow"]) == ("logs", True)
            node.req = msg["req"]
            node.first = msg
            requests.reply(node.node_id, LogsReply(req=msg["req"],
                                                    lines=answers.get(node.node_id, [])))
    follow = result.pop(FOLLOW_KEY)
    return result, follow


@pytest.fixture
def cluster() -> Cluster:
    c = Cluster(clock=lambda: 0.0, wall=lambda: 1000.0)
    c.apps["web"] = object()  # the handler only checks that the app is known
    return c


async def test_a_follow_merges_first_lines_then_relays_pushes_in_order(cluster):
    requests = LogRequests()
    n1, n2 = Node(cluster, "n1"), Node(cluster, "n2")
    result, follow = await open_follow(cluster, requests, [n1, n2], {
        "n1": [line("web-a", 1), line("web-a", 3)], "n2": [line("web-b", 2)]})
    assert [x["seq"] for x in result["lines"]] == [1, 2, 3]
    assert result["follow"] is True
    assert "since" not in n1.first and "after" not in n1.first and n1.first["tail"] == 10

    requests.push("n1", LogsPush(req=n1.req, lines=[line("web-a", 4)], skipped=0))
    requests.push("n2", LogsPush(req=n2.req, lines=[line("web-b", 5)], skipped=0))
    requests.push("n2", LogsPush(req=n1.req, lines=[line("web-x", 9)], skipped=0))  # not n2's
    lines, skipped = await follow.next_batch(100)
    assert ([(x["replica"], x["seq"]) for x in lines], skipped) == (
        [("web-a", 4), ("web-b", 5)], 0)
    assert follow.last_seq == {"web-b": 5, "web-a": 4}


async def test_a_slow_client_costs_a_bounded_buffer_and_learns_what_it_lost(cluster):
    requests = LogRequests()
    n1 = Node(cluster, "n1")
    _, follow = await open_follow(cluster, requests, [n1], {})
    for start in range(0, 3 * FOLLOW_PENDING_LINES, 1000):
        requests.push("n1", LogsPush(req=n1.req, lines=[
            line("web-a", i + 1) for i in range(start, start + 1000)], skipped=0))
    assert len(follow.pending) == FOLLOW_PENDING_LINES
    assert follow.skipped == 2 * FOLLOW_PENDING_LINES
    got = []
    while True:
        lines, skipped = await follow.next_batch(3000)
        got.extend(x["seq"] for x in lines)
        if skipped:
            break
    assert got == list(range(1, FOLLOW_PENDING_LINES + 1))
    assert skipped == 2 * FOLLOW_PENDING_LINES
    # Caught up: new lines flow again.
    requests.push("n1", LogsPush(req=n1.req, lines=[line("web-a", 99_999)], skipped=0))
    assert [x["seq"] for x in (await follow.next_batch(10))[0]] == [99_999]


async def test_big_lines_are_bounded_by_characters(cluster):
    requests = LogRequests()
    n1 = Node(cluster, "n1")
    _, follow = await open_follow(cluster, requests, [n1], {})
    big = "x" * 64 * 1024
    requests.push("n1", LogsPush(req=n1.req, lines=[line("web-a", i + 1, big)
                                                     for i in range(200)], skipped=0))
    assert follow.pending_chars <= 4 * 2**20
    assert len(follow.pending) < 200 and follow.skipped == 200 - len(follow.pending)


async def test_a_node_count_of_skipped_lines_reaches_the_client_in_place(cluster):
    requests = LogRequests()
    n1 = Node(cluster, "n1")
    _, follow = await open_follow(cluster, requests, [n1], {})
    requests.push("n1", LogsPush(req=n1.req, lines=[line("web-a", 1)], skipped=7))
    requests.push("n1", LogsPush(req=n1.req, lines=[line("web-a", 9)], skipped=0))
    lines, skipped = await follow.next_batch(10)
    assert ([x["seq"] for x in lines], skipped) == ([1], 7)
    assert [x["seq"] for x in (await follow.next_batch(10))[0]] == [9]


async def test_closing_the_follow_unsubscribes_every_node(cluster):
    requests = LogRequests()
    n1, n2 = Node(cluster, "n1"), Node(cluster, "n2")
    _, follow = await open_follow(cluster, requests, [n1, n2], {})
    requests.close_follow(cluster, follow)
    assert n1.messages() == [{"v": 1, "type": "logs_unfollow", "req": n1.req}]
    assert n2.messages() == [{"v": 1, "type": "logs_unfollow", "req": n2.req}]
    requests.push("n1", LogsPush(req=n1.req, lines=[line("web-a", 1)], skipped=0))
    assert not follow.pending and requests.follows == set()
    assert requests._follow_reqs == {}


async def test_a_node_that_comes_back_is_asked_for_the_lines_after_those_shown(cluster):
    requests = LogRequests()
    n1 = Node(cluster, "n1")
    _, follow = await open_follow(cluster, requests, [n1], {})
    requests.push("n1", LogsPush(req=n1.req, lines=[line("web-a", 1), line("web-a", 2)],
                                 skipped=0))
    await follow.next_batch(10)
    assert requests.rescan(cluster, follow) == 0  # same session: nothing to do
    back = Node(cluster, "n1")  # a new session of the node
    n3 = Node(cluster, "n3")  # a node that joined
    assert requests.rescan(cluster, follow) == 2
    [again] = back.messages()
    assert (again["tail"], again["after"], again["since"]) == (0, {"web-a": 2}, 1000.0)
    [joined] = n3.messages()
    assert joined["after"] == {"web-a": 2}
    # Its answer goes into the stream; pushes of the old session's request no longer do.
    requests.reply("n1", LogsReply(req=again["req"], lines=[line("web-a", 3)]))
    requests.push("n1", LogsPush(req=n1.req, lines=[line("web-a", 2)], skipped=0))
    assert [x["seq"] for x in (await follow.next_batch(10))[0]] == [3]


async def test_follows_are_capped(cluster):
    requests = LogRequests(max_follows=2)
    n1 = Node(cluster, "n1")
    follows = [(await open_follow(cluster, requests, [n1], {}))[1] for _ in range(2)]
    with pytest.raises(CommandError) as err:
        await make_logs_handler(requests)(cluster, {"app": "web", "replica": None,
                                                    "tail": 0, "follow": True})
    assert err.value.code == "CONFLICT"
    assert n1.messages() == []  # refused before any node was asked
    requests.close_follow(cluster, follows[0])
    assert [m["type"] for m in n1.messages()] == ["logs_unfollow"]
    await open_follow(cluster, requests, [n1], {})  # room again


async def test_tail_zero_without_follow_asks_no_node(cluster):
    requests = LogRequests()
    n1 = Node(cluster, "n1")
    result = await make_logs_handler(requests)(cluster, {"app": "web", "replica": None,
                                                         "tail": 0})
    assert result == {"lines": []}
    assert n1.messages() == []


# --------------------------------------------------------------------------- the CLI's side


async def test_the_cli_prints_a_follow_and_resumes_after_the_last_line_shown(nursery, tmp_path):
    """The real CLI against a scripted conductor: the first reply and two more on the
    same connection (one saying lines were skipped), then the connection drops; the CLI
    asks again with what it showed, and exits 1 on the error it then gets."""
    import os

    from skr8tr import keyfiles
    from skr8tr.core import protocol
    from skr8tr.ws import server as wsserver
    from skr8tr.ws import trio_client
    from tests.conftest import skr8tr_command
    from tests.ws_helpers import serve_websocket

    keyfiles.write_keypair(str(tmp_path / "keys"))
    received: list[dict] = []

    async def handle(request: wsserver.Request) -> None:
        ws = await request.accept()
        try:
            msg = json.loads(await ws.get_message())
        except trio_client.ConnectionClosed:
            return
        received.append(msg)
        if len(received) == 1:
            await ws.send_message(protocol.ok_reply(msg["id"], {
                "lines": [line("web-a", 1), line("web-b", 1)], "follow": True}))
            await ws.send_message(protocol.ok_reply(msg["id"], {
                "lines": [line("web-a", 2)], "skipped": 5}))
            await ws.send_message(protocol.ok_reply(msg["id"], {
                "lines": [line("web-a", 8)], "skipped": 0}))
            await ws.aclose(1011, "going away")
        else:
            await ws.send_message(protocol.error_reply(msg["id"], "NOT_FOUND", "no app web"))

    server = await nursery.start(serve_websocket, handle, "127.0.0.1", 0, None)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKR8TR_")}
    env["HOME"] = str(tmp_path)
    with trio.fail_after(30):
        proc = await trio.run_process(
            [*skr8tr_command(), "logs", "web", "--follow", "--tail", "3",
             "--conductor", f"ws://127.0.0.1:{server.port}",
             "--key", str(tmp_path / "keys" / "signing.sec")],
            env=env, capture_stdout=True, capture_stderr=True, check=False, stdin=b"")
    out = proc.stdout.decode().splitlines()
    assert [x.split(" ", 1)[1] for x in out] == [
        "web-a stdout: line 1", "web-b stdout: line 1", "web-a stdout: line 2",
        "web-a stdout: line 8"]
    err = proc.stderr.decode()
    assert "# 5 line(s) skipped" in err
    assert "lost the log stream" in err and "error: NOT_FOUND: no app web" in err
    assert proc.returncode == 1
    first, again = received
    assert (first["cmd"], first["args"]) == ("logs", {"app": "web", "replica": None,
                                                      "tail": 3, "follow": True})
    assert again["args"]["after"] == {"web-b": 1, "web-a": 8}
    assert (again["args"]["tail"], again["args"]["follow"]) == (0, True)
    assert isinstance(again["args"]["since"], float)


# --------------------------------------------------------------------------- the relay


class StuckClient:
    """A client connection that took the first message and then stopped reading."""

    peer = "198.51.100.7"

    def __init__(self) -> None:
        self.sent: list[dict] = []
        self.pings: list[bytes] = []

    @property
    def last_received(self) -> float:  # its pongs come (only its reading stopped)
        return trio.current_time()

    async def send_ping(self, payload: bytes) -> None:
        self.pings.append(payload)  # and its pong comes (last_received)

    async def send_message(self, text: str) -> None:
        if self.sent:
            await trio.sleep_forever()  # its TCP window is full
        self.sent.append(json.loads(text))

    async def get_message(self) -> str:
        await trio.sleep_forever()


async def test_a_client_that_stops_reading_ends_its_follow(autojump_clock):
    from skr8tr.conductor import api as api_mod
    from skr8tr.conductor.authority import Authority
    from skr8tr.core.keys import parse_authorized_keys

    cluster = Cluster(node_timeout_s=9.0, wall=lambda: 1000.0)
    cluster.apps["web"] = object()
    api = api_mod.CliApi(cluster, Authority(parse_authorized_keys("", filename="(none)"),
                                            insecure=True), lambda: 1000.0)
    n1 = Node(cluster, "n1")
    _, follow = await open_follow(cluster, api.log_requests, [n1], {})
    ws = StuckClient()
    started = trio.current_time()

    async def flood() -> None:  # the node keeps pushing 1,000 lines a second
        seq = 0
        while True:
            api.log_requests.push("n1", LogsPush(req=n1.req, lines=[
                line("web-a", seq + i + 1) for i in range(100)], skipped=0))
            seq += 100
            assert len(follow.pending) <= FOLLOW_PENDING_LINES
            await trio.sleep(0.1)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(flood)
        assert await api._relay_follow(ws, cluster, "r1", follow) is None
        nursery.cancel_scope.cancel()
    assert trio.current_time() - started == pytest.approx(api_mod.FOLLOW_SEND_TIMEOUT_S, abs=1)
    assert ws.sent[0]["id"] == "r1" and ws.sent[0]["result"]["lines"][0]["seq"] == 1
    assert follow.skipped > 0
    assert ws.pings  # kept alive while stuck: the send timeout, not the pings, ended it
    api.log_requests.close_follow(cluster, follow)  # as serve_connection does
    assert n1.messages()[-1] == {"v": 1, "type": "logs_unfollow", "req": n1.req}
