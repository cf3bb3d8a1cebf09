"""A watcher that has its handshake answer sees every event published after it.

Found while timing deploys: `open_watch`, then `up` on another connection, then
waiting for `replica.placed` hung about one run in two, because the conductor
subscribed the watcher only after answering its handshake: a command handled
while the answer was being written put its first events into the snapshot
instead of the stream. Now the watcher is subscribed, and its snapshot taken,
before the answer goes out.
"""

from __future__ import annotations

import json

import trio
import trio.testing

from skr8tr.conductor import watch
from skr8tr.conductor.cluster import Cluster
from skr8tr.ws.frames import Message, Protocol
from skr8tr.ws.server import ServerConnection


async def test_an_event_published_while_the_handshake_is_answered_is_delivered():
    cluster = Cluster()
    server_end, client_end = trio.testing.memory_stream_pair()

    async def accept() -> ServerConnection:
        # A command runs while the 101 is being written (another task's turn).
        cluster.events.publish("app.created", app="web", generation=1, replicas=1)
        return ServerConnection(server_end, "test")

    client = Protocol(client=True)
    seen: list[dict] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch.serve_watch, cluster, accept)
        with trio.fail_after(5):
            while not any(m.get("type") == "event" for m in seen):
                for event in client.receive(await client_end.receive_some()):
                    if isinstance(event, Message):
                        seen.append(json.loads(event.data))
        nursery.cancel_scope.cancel()
    snapshot, event = seen[0], seen[1]
    assert snapshot["type"] == "snapshot" and snapshot["state"]["apps"] == []
    assert event["event"] == "app.created" and event["data"]["app"] == "web"
    assert event["seq"] > snapshot["seq"]
