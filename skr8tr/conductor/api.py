"""``/v1/cli``: signed requests in, one reply each (DESIGN.md §4).

Every message gets exactly one reply and nothing a client sends takes the
conductor down: undecodable or unauthorized requests get an error reply,
a failing command gets ``INTERNAL`` and a log line, and the connection goes on.
Oversized messages are closed with 1009 by trio-websocket itself
(``max_message_size``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass, field

import trio
import trio_websocket

from skr8tr.conductor import commands, metrics
from skr8tr.conductor.cluster import Cluster, CommandError
from skr8tr.conductor.rollout import RolloutManager
from skr8tr.core import envelope, protocol
from skr8tr.core.keys import AuthorizedKeys, fingerprint, is_key_hex

log = logging.getLogger("skr8tr.conductor")


@dataclass
class Authority:
    """Who may do what: the authorized keys (replaced on SIGHUP) and the replay guard."""

    authorized: AuthorizedKeys
    insecure: bool = False
    guard: envelope.ReplayGuard = field(default_factory=envelope.ReplayGuard)


@dataclass
class RefusalCounter:
    """Requests refused, by reason (exported by /metrics)."""

    by_code: dict[str, int] = field(default_factory=dict)

    def count(self, code: str) -> None:
        self.by_code[code] = self.by_code.get(code, 0) + 1


class CliApi:
    def __init__(self, cluster: Cluster, authority: Authority, wall_clock) -> None:
        self.cluster = cluster
        self.authority = authority
        self.wall = wall_clock
        self.log_requests = commands.LogRequests()
        self.rollouts = RolloutManager(
            cluster, commands.make_log_fetcher(cluster, self.log_requests))
        self.handlers = commands.handlers(self.log_requests, self.rollouts)
        self.refusals = RefusalCounter()
        self.command_seconds = metrics.Histogram(
            "skr8tr_command_duration_seconds",
            "Time from receiving a /v1/cli request to its reply, by command.", labels=("cmd",))

    async def handle_message(self, raw: str | bytes, peer: str) -> str:
        """The reply to one message. Never raises (but for cancellation)."""
        started = time.perf_counter()
        req = protocol.accept_request(
            raw, authorized=self.authority.authorized, guard=self.authority.guard,
            now=self.wall(), insecure=self.authority.insecure,
        )
        if isinstance(req, protocol.DecodeError):
            self.refusals.count(req.code)
            log.warning("refused a request from %s (key %s): %s: %s", peer,
                        _claimed_key(raw), req.code, req.message)
            return protocol.error_reply(req.id, req.code, req.message)
        handler = self.handlers[req.cmd]  # the decoder admits only known commands
        try:
            result = await handler(self.cluster, req.args)
        except CommandError as exc:
            if req.signer is not None:
                log.info("%s by %s refused: %s: %s", req.cmd, req.signer, exc.code, exc.message)
            return protocol.error_reply(req.id, exc.code, exc.message)
        except Exception:
            log.exception("command %s failed", req.cmd)
            return protocol.error_reply(req.id, "INTERNAL",
                                        f"{req.cmd} failed inside the conductor; see its log")
        finally:
            self.command_seconds.observe(time.perf_counter() - started, cmd=req.cmd)
        if req.cmd in envelope.SIGNED_COMMANDS:
            log.info("%s %s by %s", req.cmd, _summary(req.args), req.signer or "insecure mode")
        return protocol.ok_reply(req.id, result)

    async def serve_connection(self, ws: trio_websocket.WebSocketConnection) -> None:
        peer = f"{ws.remote.address}:{ws.remote.port}" if hasattr(ws.remote, "address") else "?"
        while True:
            try:
                raw = await ws.get_message()
            except trio_websocket.ConnectionClosed:
                return
            reply = await self.handle_message(raw, peer)
            try:
                await ws.send_message(reply)
            except trio_websocket.ConnectionClosed:
                return


def _claimed_key(raw: str | bytes) -> str:
    """The fingerprint of the key a refused message claims, for the log (or "none")."""
    try:
        key = json.loads(raw).get("key")
    except Exception:
        return "none"
    return fingerprint(key) if isinstance(key, str) and is_key_hex(key) else "none"


def _summary(args: dict) -> str:
    shown = {k: v for k, v in args.items() if k != "manifest"}
    return " ".join(f"{k}={v}" for k, v in shown.items())


async def serve_watch(cluster: Cluster, ws: trio_websocket.WebSocketConnection) -> None:
    """``/v1/watch``: a snapshot, then every event, then a snapshot after each change burst."""
    with cluster.events.subscribe() as events:
        await ws.send_message(protocol.snapshot_message(cluster.events.seq, cluster.wall(),
                                                        cluster.status()))
        async with trio.open_nursery() as nursery:
            async def drain_client() -> None:
                # Watchers only listen; read so that a close from their side ends us.
                try:
                    while True:
                        await ws.get_message()
                except trio_websocket.ConnectionClosed:
                    nursery.cancel_scope.cancel()

            nursery.start_soon(drain_client)
            with contextlib.suppress(trio_websocket.ConnectionClosed):  # the watcher left
                async for ev in events:
                    await ws.send_message(protocol.event_message(ev.seq, ev.ts, ev.event,
                                                                 ev.data))
            nursery.cancel_scope.cancel()

