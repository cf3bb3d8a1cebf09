"""Issue #17, attacked: what a stolen node key can do to ``logs`` and ``logs --follow``.

Real conductor, two real node agents running hello_http, the real CLI; the
hostile node is played with a real node key (tests/node_impostor.py). A node
speaks only for its own replicas: lines it sends in the name of another node's
replica, of another app, or outside the replica asked for never reach a client.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import trio

from skr8tr import keyfiles
from skr8tr.core import protocol
from skr8tr.core.node_protocol import encode_node_message
from skr8tr.ws import trio_client
from tests.e2e import poll, running_cluster
from tests.node_impostor import impostor_node
from tests.test_e2e_rollout import web

pytestmark = pytest.mark.e2e

OWN = "web-0000ff"  # an id of web the conductor never placed: invented


def line(replica: str, text: str) -> dict:
    return {"replica": replica, "ts": time.time(), "stream": "stdout", "text": text, "seq": 1}


async def play_evil(ws, forged: list[str], asked: list[dict]) -> None:
    """Answer every logs request with lines in other replicas' names (text "forged ...")
    and one of its own; a follow also gets pushes of the same."""
    while True:
        msg = json.loads(await ws.get_message())
        if msg["type"] != "logs":
            continue
        asked.append(msg)
        await ws.send_message(
            encode_node_message(
                "logs_reply",
                req=msg["req"],
                lines=[*(line(r, f"forged reply {r}") for r in forged), line(OWN, "evil reply")],
            )
        )
        if msg.get("follow"):
            await ws.send_message(
                encode_node_message(
                    "logs_push",
                    req=msg["req"],
                    skipped=0,
                    lines=[*(line(r, f"forged push {r}") for r in forged), line(OWN, "evil push")],
                )
            )


async def test_a_node_key_cannot_speak_for_another_nodes_replicas(tmp_path: Path):
    with running_cluster(tmp_path, node_timeout_s=30.0) as cluster:
        cluster.start_node("n1")
        cluster.start_node("n2")
        cluster.json("up", str(web(tmp_path, "v1", replicas=2)))
        rows = cluster.wait_ready("web", 2)
        victim = rows[0]["replica"]  # runs on n1 or n2
        forged = [victim, "other-abc123"]  # another node's, another app's
        asked: list[dict] = []
        with trio.fail_after(90):
            async with (
                impostor_node(cluster.url, cluster.node_key, "evil") as ws,
                trio.open_nursery() as nursery,
            ):
                nursery.start_soon(play_evil, ws, forged, asked)

                # `logs` through the real CLI: evil was asked (it is a node of the
                # cluster), and neither the forged lines nor its invented replica's are
                # there; the real replicas' are.
                doc = await trio.to_thread.run_sync(lambda: cluster.json("logs", "web"))
                texts = [x["text"] for x in doc["lines"]]
                assert asked, "the evil node was not asked"
                assert "evil reply" not in texts
                assert not [t for t in texts if t.startswith("forged")], texts
                assert {x["replica"] for x in doc["lines"]} <= {r["replica"] for r in rows}
                # Its invented replica asked for by name: nothing.
                doc = await trio.to_thread.run_sync(
                    lambda: cluster.json("logs", "web", "--replica", OWN)
                )
                assert doc["lines"] == []

                # A follow: its first lines and every push go through the same check.
                key = keyfiles.load_signing_key(cluster.admin_key)
                request = protocol.request_message(
                    id="f1",
                    cmd="logs",
                    args={"app": "web", "tail": 10, "follow": True},
                    signing_key=key,
                    ts=time.time(),
                )
                async with trio_client.open_websocket(cluster.url + "/v1/cli") as cli:
                    await cli.send_message(json.dumps(request))
                    # The first reply holds what every node answered (the pushes are
                    # checked the same way: tests/test_log_follow_attacks.py).
                    reply = json.loads(await cli.get_message())
                    assert reply["ok"], reply
                    seen = reply["result"]["lines"]
                assert asked[-1]["follow"] is True
                assert not [x for x in seen if x["text"].startswith(("forged", "evil"))], seen
                nursery.cancel_scope.cancel()


async def test_a_node_message_never_reaches_into_the_admins_terminal(tmp_path: Path):
    # A node key reports its own replica's end with a message written for a terminal:
    # set its title (OSC), clear the screen, reverse the text that follows.
    hostile = "\x1b]0;pwned\x07\x1b[2J\x9b31m\u202eboom"
    with running_cluster(tmp_path, node_timeout_s=30.0) as cluster:
        with trio.fail_after(90):
            async with impostor_node(cluster.url, cluster.node_key, "evil") as ws:
                # The only node: the replica is placed there.
                manifest = tmp_path / "job.skr8tr"
                manifest.write_text("app job\n  exec /bin/true\n  restart never\n")
                await trio.to_thread.run_sync(lambda: cluster.cli_ok("up", str(manifest)))
                while True:
                    launch = json.loads(await ws.get_message())
                    if launch["type"] == "launch":
                        break
                await ws.send_message(
                    encode_node_message(
                        "replica",
                        replica=launch["replica"],
                        app="job",
                        generation=launch["generation"],
                        state="failed",
                        pid=None,
                        port=None,
                        exit_code=1,
                        message=hostile,
                        ts=time.time(),
                        token=launch["token"],
                    )
                )

                def described() -> str | None:
                    out = cluster.cli_ok("describe", "job")
                    return out if "boom" in out else None

                out = await trio.to_thread.run_sync(
                    lambda: poll(described, what="describe to show the replica's message")
                )
                assert "\\x1b]0;pwned\\x07\\x1b[2J\\x9b31m\\u202eboom" in out
                assert not {"\x1b", "\x07", "\x9b", "\u202e"} & set(out)
                # --json keeps the message as it came (a program reads it), every character a
                # terminal would act on written as a JSON escape.
                raw = await trio.to_thread.run_sync(
                    lambda: cluster.cli_ok("describe", "job", "--json")
                )
                assert not {"\x1b", "\x07", "\x9b", "\u202e"} & set(raw)
                doc = json.loads(raw)
                assert hostile in [e["data"].get("message") for e in doc["events"]]
