"""``/v1/node``: one task tree per connected node agent.

The session proves the node's key (challenge-response, DESIGN.md §4), attaches
it to the :class:`Cluster`, then runs two tasks in its own nursery: one sends
what the cluster queued in the node's outbox, one applies what the node
reports. The session ends when either side closes, when the cluster closes
the outbox (the node expired, or a newer session replaced this one), or when
the conductor shuts down; the node is then detached but not yet lost — that
happens only when its heartbeats stay away for ``--node-timeout``.
"""

from __future__ import annotations

import contextlib
import logging

import trio
import trio_websocket

from skr8tr.conductor.api import Authority, CliApi
from skr8tr.conductor.cluster import NODE_OUTBOX, Cluster, CommandError
from skr8tr.core import envelope
from skr8tr.core.keys import fingerprint, parse_authorized_keys
from skr8tr.core.node_protocol import NodeDecodeError, decode_node_message, encode_node_message

log = logging.getLogger("skr8tr.conductor")

HANDSHAKE_TIMEOUT_S = 10.0


async def _refuse(ws: trio_websocket.WebSocketConnection, code: str, message: str) -> None:
    with contextlib.suppress(trio_websocket.ConnectionClosed):  # it left first: fine
        await ws.send_message(encode_node_message("refused", code=code, message=message))
        await ws.aclose(code=1008, reason=message[:120])


async def serve_node(cluster: Cluster, authority: Authority, api: CliApi,
                     ws: trio_websocket.WebSocketConnection) -> None:
    peer = getattr(ws.remote, "address", "?")
    challenge = envelope.new_challenge()
    raw: str | bytes | None = None
    try:
        await ws.send_message(encode_node_message("challenge", nonce=challenge.hex()))
        with trio.move_on_after(HANDSHAKE_TIMEOUT_S):
            raw = await ws.get_message()
    except trio_websocket.ConnectionClosed:
        return
    if raw is None:
        await _refuse(ws, "BAD_REQUEST", f"no hello within {HANDSHAKE_TIMEOUT_S:g} s")
        return
    hello = decode_node_message(raw)
    if isinstance(hello, NodeDecodeError) or hello["type"] != "hello":
        why = hello.message if isinstance(hello, NodeDecodeError) else "expected hello"
        api.refusals.count("BAD_REQUEST")
        log.warning("refused a node session from %s: %s", peer, why)
        await _refuse(ws, "BAD_REQUEST", why)
        return
    authorized = authority.authorized
    if authority.insecure:
        authorized = parse_authorized_keys(f"node {hello['key']}\n", filename="--insecure")
    try:
        envelope.verify_challenge(key=hello["key"], sig=hello["sig"], challenge=challenge,
                                  node_id=hello["node_id"], authorized=authorized)
    except envelope.AuthError as exc:
        api.refusals.count(exc.code)
        log.warning("refused node %s from %s (key %s): %s", hello["node_id"], peer,
                    fingerprint(hello["key"]), exc.message)
        await _refuse(ws, exc.code, exc.message)
        return

    outbox_send, outbox_recv = trio.open_memory_channel[str](NODE_OUTBOX)
    try:
        session = cluster.attach_node(hello, outbox_send)
    except CommandError as exc:
        api.refusals.count(exc.code)
        log.warning("refused node %s from %s (key %s): %s", hello["node_id"], peer,
                    fingerprint(hello["key"]), exc.message)
        await _refuse(ws, exc.code, exc.message)
        return
    node_id = hello["node_id"]
    try:
        # ConnectionClosed from either task simply ends the session.
        with contextlib.suppress(trio_websocket.ConnectionClosed):
            await ws.send_message(encode_node_message("welcome", node_id=node_id,
                                                      heartbeat_s=cluster.heartbeat_s))
            async with trio.open_nursery() as nursery:
                async def send_outbox() -> None:
                    async with outbox_recv:
                        async for text in outbox_recv:
                            await ws.send_message(text)
                    # The cluster closed the outbox: this session is over.
                    nursery.cancel_scope.cancel()

                nursery.start_soon(send_outbox)
                await _receive(cluster, api, ws, node_id)
                nursery.cancel_scope.cancel()
    finally:
        cluster.detach_node(node_id, session)
        with trio.CancelScope(shield=True), trio.move_on_after(2):
            await ws.aclose()


async def _receive(cluster: Cluster, api: CliApi, ws: trio_websocket.WebSocketConnection,
                   node_id: str) -> None:
    while True:
        try:
            raw = await ws.get_message()
        except trio_websocket.ConnectionClosed:
            return
        msg = decode_node_message(raw)
        if isinstance(msg, NodeDecodeError):
            log.warning("node %s sent a message we cannot read: %s", node_id, msg.message)
            continue
        node = cluster.nodes.get(node_id)
        if node is None or node.outbox is None:
            return  # expired or replaced while this message was in flight
        kind = msg["type"]
        if kind == "heartbeat":
            cluster.node_heartbeat(node_id, msg)
        elif kind == "replica":
            cluster.replica_report(node_id, msg)
        elif kind == "logs_reply":
            api.log_requests.reply(node_id, msg)
        else:
            log.warning("node %s sent an unexpected %s message", node_id, kind)
