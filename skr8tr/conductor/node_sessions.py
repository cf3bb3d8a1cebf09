"""``/v1/node``: one task tree per connected node agent.

The session proves the node's key (it signs the conductor's random challenge), attaches
it to the :class:`Cluster`, then runs two tasks in its own nursery: one sends
what the cluster queued in the node's outbox, one applies what the node
reports. The session ends when either side closes, when the cluster closes
the outbox (the node expired, or a newer session replaced this one), or when
the conductor shuts down; the node is then detached but not yet lost — that
happens only when its heartbeats stay away for ``--node-timeout``.

Limits: the ``hello`` must come within ``Limits.handshake_timeout_s`` of the
challenge; a node sending more than ``Limits.messages_per_s`` (burst
``message_burst``) is closed with 1008. A node sending more than
``Limits.node_bytes_per_s`` (twice that saved up) is not closed but slowed: the
conductor stops reading its socket until the excess is earned back, so TCP makes
the node wait (closing would look like a lost node and re-place its replicas; a
real node never comes near the budget). A session whose key loses the
``node`` role on a SIGHUP re-read is told ``refused`` and closed at once
(:meth:`Authority.replace_keys`). Each of these is counted and logged.
"""

from __future__ import annotations

import contextlib
import logging

import trio

from skr8tr.conductor.authority import Authority, NodeSessionHandle
from skr8tr.conductor.cluster import Cluster
from skr8tr.conductor.errors import CommandError
from skr8tr.conductor.limits import TokenBucket
from skr8tr.conductor.logs import LogRequests
from skr8tr.conductor.node_reports import NODE_OUTBOX
from skr8tr.conductor.policing import Policing
from skr8tr.core import envelope
from skr8tr.core.keys import parse_authorized_keys
from skr8tr.core.node_protocol import (
    Challenge,
    Heartbeat,
    Hello,
    LogsPush,
    LogsReply,
    NodeDecodeError,
    Refused,
    ReplicaReport,
    Welcome,
    decode_node_message,
)
from skr8tr.core.signatures import fingerprint
from skr8tr.ws.server import ConnectionClosed, ServerConnection

log = logging.getLogger("skr8tr.conductor")


async def _refuse(ws: ServerConnection, code: str, message: str) -> None:
    with contextlib.suppress(ConnectionClosed):  # it left first: fine
        # No leader field: only a follower's refusal names one (daemon.py).
        await ws.send_message(Refused(code=code, message=message,
                                      omit=frozenset({"leader"})).encode())
        await ws.aclose(code=1008, reason=message[:120])


async def serve_node(cluster: Cluster, authority: Authority, policing: Policing,
                     log_requests: LogRequests, ws: ServerConnection) -> None:
    peer = ws.peer
    challenge = envelope.new_challenge()
    raw: str | bytes | None = None
    timeout_s = policing.limits.handshake_timeout_s
    try:
        await ws.send_message(Challenge(nonce=challenge.hex(),
                                        term=cluster.seat.term).encode())
        with trio.move_on_after(timeout_s):
            raw = await ws.get_message()
    except ConnectionClosed as exc:
        policing.count_close(exc, peer)
        return
    if raw is None:
        policing.closed.count("handshake_timeout")
        log.warning("refused a node session from %s: no hello within %g s", peer, timeout_s)
        await _refuse(ws, "BAD_REQUEST", f"no hello within {timeout_s:g} s")
        return
    hello = decode_node_message(raw)
    if not isinstance(hello, Hello):
        why = hello.message if isinstance(hello, NodeDecodeError) else "expected hello"
        policing.refusals.count("BAD_REQUEST")
        log.warning("refused a node session from %s: %s", peer, why)
        await _refuse(ws, "BAD_REQUEST", why)
        return
    authorized = authority.authorized
    if authority.insecure:
        authorized = parse_authorized_keys(f"node {hello['key']}\n", filename="--insecure")
    try:
        envelope.verify_challenge(key=hello.key, sig=hello.sig, challenge=challenge,
                                  node_id=hello.node_id, authorized=authorized)
    except envelope.AuthError as exc:
        policing.refusals.count(exc.code)
        log.warning("refused node %s from %s (key %s): %s", hello.node_id, peer,
                    fingerprint(hello.key), exc.message)
        await _refuse(ws, exc.code, exc.message)
        return

    outbox_send, outbox_recv = trio.open_memory_channel[str](NODE_OUTBOX)
    try:
        session = cluster.attach_node(hello, outbox_send)
    except CommandError as exc:
        policing.refusals.count(exc.code)
        log.warning("refused node %s from %s (key %s): %s", hello.node_id, peer,
                    fingerprint(hello.key), exc.message)
        await _refuse(ws, exc.code, exc.message)
        return
    node_id = hello.node_id
    handle = NodeSessionHandle(node_id, hello.key, trio.CancelScope())
    authority.node_sessions.add(handle)
    try:
        # ConnectionClosed from either task simply ends the session.
        with handle.scope, contextlib.suppress(ConnectionClosed):
            await ws.send_message(Welcome(node_id=node_id, heartbeat_s=cluster.heartbeat_s,
                                          term=cluster.seat.term).encode())
            async with trio.open_nursery() as nursery:
                async def send_outbox() -> None:
                    async with outbox_recv:
                        async for text in outbox_recv:
                            # Everything queued by now (a rollout batch's launches)
                            # goes in one write, before the command's reply: see
                            # ServerConnection.send_messages and
                            # CliApi.serve_connection.
                            burst = [text]
                            while True:
                                try:
                                    burst.append(outbox_recv.receive_nowait())
                                except (trio.WouldBlock, trio.EndOfChannel):
                                    break
                            await ws.send_messages(burst)
                    # The cluster closed the outbox: this session is over.
                    nursery.cancel_scope.cancel()

                nursery.start_soon(send_outbox)
                await _receive(cluster, policing, log_requests, ws, node_id)
                nursery.cancel_scope.cancel()
    finally:
        authority.node_sessions.discard(handle)
        cluster.detach_node(node_id, session)
        with trio.CancelScope(shield=True), trio.move_on_after(2):
            if handle.revoked:
                policing.closed.count("revoked")
                policing.refusals.count("UNAUTHORIZED")
                log.warning("closed the session of node %s from %s: its key %s is no longer "
                            "authorized as node", node_id, peer, fingerprint(hello.key))
                await _refuse(ws, "UNAUTHORIZED", "this node's key was revoked")
            await ws.aclose()


async def _receive(cluster: Cluster, policing: Policing, log_requests: LogRequests,
                   ws: ServerConnection, node_id: str) -> None:
    limits = policing.limits
    bucket = TokenBucket(limits.messages_per_s, limits.message_burst, trio.current_time())
    byte_rate = limits.node_bytes_per_s
    byte_budget = TokenBucket(byte_rate, 2 * byte_rate, trio.current_time())
    while True:
        try:
            raw = await ws.get_message()
        except ConnectionClosed as exc:
            policing.count_close(exc, f"node {node_id}")
            return
        if not bucket.take(trio.current_time()):
            await policing.close_for(ws, f"node {node_id}", "rate_limit", 1008,
                                f"more than {limits.messages_per_s:g} messages/s")
            return
        wait_s = byte_budget.charge(trio.current_time(), len(raw))
        if wait_s > 0:
            # Before decoding, and without reading on: the node's socket fills and TCP
            # holds it back (module docstring). Its messages are all still applied.
            policing.note_slowed(f"node {node_id}", byte_rate)
            await trio.sleep(wait_s)
        msg = decode_node_message(raw)
        if isinstance(msg, NodeDecodeError):
            log.warning("node %s sent a message we cannot read: %s", node_id, msg.message)
            continue
        node = cluster.nodes.get(node_id)
        if node is None or node.outbox is None:
            return  # expired or replaced while this message was in flight
        if isinstance(msg, Heartbeat):
            cluster.node_heartbeat(node_id, msg)
        elif isinstance(msg, ReplicaReport):
            cluster.replica_report(node_id, msg)
        elif isinstance(msg, LogsReply):
            log_requests.reply(node_id, msg, cluster)
        elif isinstance(msg, LogsPush):
            log_requests.push(node_id, msg, cluster)
        else:
            log.warning("node %s sent an unexpected %s message", node_id, msg.TYPE)
