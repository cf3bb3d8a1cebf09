"""``/v1/cli``: signed requests in, one reply each (a result, or an error code and
message).

Every message gets exactly one reply and nothing a client sends takes the
conductor down: undecodable or unauthorized requests get an error reply,
a failing command gets ``INTERNAL`` and a log line, and the connection goes on.
Oversized messages are closed with 1009 by the connection itself
(:mod:`skr8tr.ws.server`, ``max_message_size``). A connection that
sends more than ``Limits.messages_per_s`` (with ``message_burst`` saved up)
is closed with 1008, one that sends nothing for ``Limits.idle_timeout_s``
with 1000; all three are counted (:mod:`skr8tr.conductor.limits`).

Every request for a signed command, accepted or refused, goes to the audit
log when there is one (:mod:`skr8tr.conductor.audit`); refusals beyond a few a
second are summed up in one line a second instead
(:mod:`skr8tr.conductor.refusals`). Manifests and their environment values
never reach the conductor's log.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import TYPE_CHECKING

import trio

from skr8tr import __version__
from skr8tr.conductor import audit, commands, logs, metrics
from skr8tr.conductor.authority import Authority
from skr8tr.conductor.cluster import Cluster
from skr8tr.conductor.errors import CommandError
from skr8tr.conductor.limits import ClosedCounter, Limits, TokenBucket
from skr8tr.conductor.policing import Policing
from skr8tr.conductor.refusals import RefusalReporter
from skr8tr.conductor.rollout import RolloutManager
from skr8tr.conductor.store import FenceLost, StoreUnavailable
from skr8tr.core import envelope, manifest, protocol
from skr8tr.core.names import MAX_ID_CHARS
from skr8tr.core.node_protocol import chunk_lines
from skr8tr.core.wire_json import parse_object
from skr8tr.ws.server import ConnectionClosed, ServerConnection

if TYPE_CHECKING:
    from skr8tr.conductor.etcd_nonces import EtcdNonceGuard

log = logging.getLogger("skr8tr.conductor")

LARGE_MESSAGE_BYTES = 64 * 1024  # above this, decoded and verified in a worker thread
BYTE_BUDGETS_KEPT = 10_000  # client addresses whose byte budget is remembered
FOLLOW_BATCH_LINES = 2000  # log lines taken for one follow message at a time
FOLLOW_SEND_TIMEOUT_S = 60.0  # a follow whose client reads nothing this long ends
FOLLOW_RESCAN_S = 0.5  # how soon a node that (re)connects joins the open follows


class CliApi:
    def __init__(self, cluster: Cluster, authority: Authority, wall_clock, *,
                 limits: Limits | None = None, closed: ClosedCounter | None = None,
                 audit_log: audit.AuditLog | None = None) -> None:
        self.cluster = cluster
        self.authority = authority
        self.wall = wall_clock
        self.policing = Policing(limits or Limits(), closed or ClosedCounter(),
                                 RefusalReporter(audit_log=audit_log, wall=wall_clock))
        self.limits, self.closed = self.policing.limits, self.policing.closed
        self.refusals = self.policing.refusals
        self.log_requests = logs.LogRequests()
        self.rollouts = RolloutManager(cluster)
        self.handlers = commands.handlers(self.log_requests, self.rollouts)
        self.audit_log = audit_log
        # With --store etcd: the cluster-wide nonce guard (etcd_nonces); None otherwise.
        self.nonces: EtcdNonceGuard | None = None
        # CPU-heavy work taken off the event loop (large requests' decode and signature
        # check, large manifests' parse) runs in one worker thread at a time.
        self._cpu_limiter = trio.CapacityLimiter(1)
        # Bytes of requests per client address (Limits.cli_bytes_per_s), kept after its
        # connections close, so that reconnecting does not refill it.
        self._byte_budgets: dict[str, TokenBucket] = {}
        self.command_seconds = metrics.Histogram(
            "skr8tr_command_duration_seconds",
            "Time from receiving a /v1/cli request to its reply, by command.", labels=("cmd",))

    @property
    def audit_log(self) -> audit.AuditLog | None:
        return self._audit_log

    @audit_log.setter
    def audit_log(self, value: audit.AuditLog | None) -> None:
        self._audit_log = self.refusals.audit_log = value

    async def handle_message(self, raw: str | bytes, peer: str,
                             follows: list[tuple[str, logs.LogFollow]] | None = None
                             ) -> str:
        """The reply to one message. Never raises (but for cancellation).

        A ``logs`` request with ``follow`` that succeeds appends ``(request id, its
        LogFollow)`` to *follows*, for the connection to relay after the reply
        (:meth:`serve_connection`); without *follows* the follow is closed at once.

        Checks go in the envelope's order (authentication, freshness, replay, then the
        command): nothing past the frame is looked at before the signature verified,
        and a refusal costs the JSON decode and the checks of the envelope, never a
        parse of what the arguments hold. A message
        over LARGE_MESSAGE_BYTES is decoded and verified in a worker thread (one
        at a time), so that it cannot hold up the event loop, node heartbeats and
        every other client; the replay guard always runs here, on the loop.
        """
        # The term's cluster and handlers, taken together with the leading check: a term
        # that ends during the awaits below leaves this command on its own (fenced) store,
        # where a write fails with NOT_LEADER, never on the next term's or a follower's.
        cluster, handlers, term = self.cluster, self.handlers, self.cluster.seat.term
        if not cluster.seat.leading:
            return self._not_leading(raw)
        started = time.perf_counter()
        authorized, insecure = self.authority.authorized, self.authority.insecure
        if len(raw) > LARGE_MESSAGE_BYTES:
            auth = await trio.to_thread.run_sync(
                functools.partial(protocol.authenticate_request, raw, authorized=authorized,
                                  insecure=insecure), limiter=self._cpu_limiter)
        else:
            auth = protocol.authenticate_request(raw, authorized=authorized, insecure=insecure)
        if self.nonces is None:
            req = protocol.admit_request(auth, guard=self.authority.guard, now=self.wall())
        else:  # several conductors: the nonce is also spent in etcd, for all of them
            from skr8tr.conductor import etcd_nonces  # not for a lone conductor (httpx)
            try:
                req = await etcd_nonces.admit_request(auth, guard=self.authority.guard,
                                                      nonces=self.nonces, now=self.wall())
            except StoreUnavailable as exc:
                return protocol.error_reply(_request_id(auth), "UNAVAILABLE",
                                            f"{exc}; nothing was changed")
            except FenceLost as exc:
                if cluster.seat.term == term:
                    cluster.deposed(str(exc))
                return self._not_leading(raw)
        if isinstance(req, protocol.DecodeError):
            self.refusals.refused(peer, req)
            return protocol.error_reply(req.id, req.code, req.message)
        handler = handlers[req.cmd]  # the decoder admits only known commands
        signed = req.cmd in envelope.SIGNED_COMMANDS
        args = req.args
        parsed = None
        try:
            if "manifest" in args:
                # Authenticated (or read-only) from here on: parse off the loop when large.
                parsed = await commands.parse_manifest_arg(args, self._cpu_limiter)
                args = {**args, "parsed": parsed}
            result = await handler(cluster, args)
            follow = result.pop(logs.FOLLOW_KEY, None) if isinstance(result, dict) else None
            if follow is not None:
                if follows is None:
                    self.log_requests.close_follow(cluster, follow)
                else:
                    follows.append((req.id, follow))
        except CommandError as exc:
            # The message may quote the manifest (file:line:col: text): never its env.
            shown = exc.message if exc.code != "INVALID_MANIFEST" else _location(exc.message)
            if req.signer is not None:
                log.info("%s by %s refused: %s: %s", req.cmd, req.signer, exc.code, shown)
            if signed:
                await self._audit_request(peer, req, parsed, {"ok": False, "code": exc.code,
                                                        "message": shown})
            return protocol.error_reply(req.id, exc.code, exc.message)
        except Exception:
            log.exception("command %s failed", req.cmd)
            if signed:
                await self._audit_request(peer, req, parsed, {"ok": False, "code": "INTERNAL"})
            return protocol.error_reply(req.id, "INTERNAL",
                                        f"{req.cmd} failed inside the conductor; see its log")
        finally:
            self.command_seconds.observe(time.perf_counter() - started, cmd=req.cmd)
        if signed:
            log.info("%s %s by %s", req.cmd, _summary(req.args), req.signer or "insecure mode")
            await self._audit_request(peer, req, parsed, audit.result_summary(req.cmd, result))
        return protocol.ok_reply(req.id, result)

    def begin_term(self, cluster: Cluster) -> None:
        """Serve commands from ``cluster``: this conductor leads (or follows) anew. The
        rollout manager and the handlers are the term's; limits, counters, the audit log
        and the connections are the process's."""
        self.cluster = cluster
        self.rollouts = RolloutManager(cluster)
        self.handlers = commands.handlers(self.log_requests, self.rollouts)

    def _not_leading(self, raw: str | bytes) -> str:
        """A follower's reply: ``ping`` is answered (role and leader), everything else
        is refused with NOT_LEADER (naming the leader) or UNAVAILABLE. Nothing is
        verified and no nonce is spent: the same signed request may go to the leader."""
        if len(raw) > LARGE_MESSAGE_BYTES:  # not parsed on the loop for a refusal
            code, message, leader = self.cluster.seat.refusal()
            return protocol.error_reply(None, code, message, leader=leader)
        msg = parse_object(raw, max_bytes=protocol.MAX_MESSAGE_BYTES, what="request")
        rid = msg.get("id") if isinstance(msg, dict) else None
        rid = rid if isinstance(rid, str) and len(rid) <= MAX_ID_CHARS else None
        seat = self.cluster.seat
        if isinstance(msg, dict) and msg.get("cmd") == "ping":
            return protocol.ok_reply(rid, seat.ping(__version__))
        code, message, leader = seat.refusal()
        return protocol.error_reply(rid, code, message, leader=leader)

    async def _audit_request(self, peer: str, req: protocol.Request,
                             parsed: manifest.Manifest | None, result: dict) -> None:
        """Record the request; the reply waits until the record is written."""
        if self._audit_log is not None:
            number = self._audit_log.append(
                {"peer": peer, **audit.signer_fields(req.raw.get("key")),
                 "verified": req.signer is not None,
                 "cmd": req.cmd, "args": audit.redact_args(req.cmd, req.args, parsed),
                 "result": result}, self.wall())
            await self._audit_log.written(number)

    async def serve_connection(self, ws: ServerConnection) -> None:
        """Answer requests until the client leaves, is idle too long or sends too fast."""
        peer = ws.peer
        bucket = TokenBucket(self.limits.messages_per_s, self.limits.message_burst,
                             trio.current_time())
        while True:
            with trio.move_on_after(self.limits.idle_timeout_s) as idle:
                try:
                    raw = await ws.get_message()
                except ConnectionClosed as exc:
                    self.policing.count_close(exc, peer)
                    return
            if idle.cancelled_caught:
                await self.policing.close_for(ws, peer, "idle_timeout", 1000,
                                     f"idle for {self.limits.idle_timeout_s:g} s")
                return
            if not await self._within_limits(ws, peer, bucket, raw):
                return
            queued = self.cluster.node_messages_queued
            cluster = self.cluster
            follows: list[tuple[str, logs.LogFollow]] = []
            try:
                reply = await self.handle_message(raw, peer, follows)
                if self.cluster.node_messages_queued != queued:
                    # The command queued work for nodes (a launch, a stop): one scheduling
                    # round lets their sessions write it before this reply goes out, so
                    # the node starts while the reply travels (see
                    # ServerConnection.send_messages).
                    await trio.sleep(0)
                if follows:
                    # `logs --follow`: the connection relays the follow until the client
                    # closes it or sends another request (answered as usual).
                    rid, follow = follows[0]
                    try:
                        await ws.send_message(reply)
                        raw_next = await self._relay_follow(ws, cluster, rid, follow)
                    except ConnectionClosed:
                        return
                    # The message that ended the follow is a request like any other: its
                    # bytes and its place in the rate count (or a client alternating a
                    # follow and a large request would pass half of them uncounted).
                    if raw_next is None or not await self._within_limits(ws, peer, bucket,
                                                                         raw_next):
                        return
                    reply = await self.handle_message(raw_next, peer)
            finally:
                # However this ends (the client left, cancellation): the nodes stop pushing.
                for _, follow in follows:
                    self.log_requests.close_follow(cluster, follow)
            try:
                await ws.send_message(reply)
            except ConnectionClosed:
                return

    async def _within_limits(self, ws: ServerConnection, peer: str, bucket: TokenBucket,
                             raw: str | bytes) -> bool:
        """Whether *raw*, just received, keeps within the connection's message rate and
        its address's byte rate; if not, the connection is closed (1008)."""
        now = trio.current_time()
        if not bucket.take(now):
            await self.policing.close_for(ws, peer, "rate_limit", 1008,
                                 f"more than {self.limits.messages_per_s:g} messages/s")
            return False
        if not self._byte_budget(peer, now).take(now, len(raw)):
            # Before any decoding: a flood of large requests costs their reception.
            await self.policing.close_for(ws, peer, "byte_rate_limit", 1008,
                                 f"more than {self.limits.cli_bytes_per_s} bytes/s of "
                                 f"requests from {peer}")
            return False
        return True

    async def _relay_follow(self, ws: ServerConnection, cluster: Cluster, rid: str | None,
                            follow: logs.LogFollow) -> str | bytes | None:
        """Send the lines *follow* gets, each batch a reply ``{"lines", "skipped"}`` to
        request *rid*, until the client sends a message (returned) or closes the
        connection (None; also when a send stays blocked FOLLOW_SEND_TIMEOUT_S: a
        client that stopped reading; and when nothing, a pong included, came from it for
        ``watch_idle_timeout_s``). Nodes that connect meanwhile are subscribed too.
        Raises ConnectionClosed."""
        received: list[str | bytes] = []

        async def pump() -> None:
            while True:
                lines, skipped = await follow.next_batch(FOLLOW_BATCH_LINES)
                chunks = chunk_lines(lines, protocol.MAX_MESSAGE_BYTES // 2) or [[]]
                for i, chunk in enumerate(chunks):
                    last = i == len(chunks) - 1
                    text = protocol.ok_reply(rid, {"lines": chunk,
                                                   "skipped": skipped if last else 0})
                    with trio.move_on_after(FOLLOW_SEND_TIMEOUT_S) as stuck:
                        try:
                            await ws.send_message(text)
                        except ConnectionClosed:
                            nursery.cancel_scope.cancel()
                            return
                    if stuck.cancelled_caught:
                        log.warning("log follow of %s by %s ended: the client read nothing "
                                    "for %g s", follow.app, ws.peer, FOLLOW_SEND_TIMEOUT_S)
                        nursery.cancel_scope.cancel()
                        return

        async def rescan() -> None:
            while True:
                await trio.sleep(FOLLOW_RESCAN_S)
                if not cluster.seat.leading:
                    nursery.cancel_scope.cancel()  # a deposed leader: the client moves on
                    return
                self.log_requests.rescan(cluster, follow)

        async def listen() -> None:
            try:
                received.append(await ws.get_message())
            except ConnectionClosed as exc:
                self.policing.count_close(exc, ws.peer)  # (a message over 1 MiB: counted)
            nursery.cancel_scope.cancel()

        async def keepalive() -> None:
            # A quiet app's follow sends nothing: without pings a client gone without a
            # word (a dropped network) would hold its follow, one of MAX_FOLLOWS, forever.
            # Pinged as watchers are; listen() reads the pongs.
            idle_s = self.limits.watch_idle_timeout_s
            n = 0
            while True:
                await trio.sleep(idle_s / 2)
                if trio.current_time() >= ws.last_received + idle_s:
                    self.policing.closed.count("ping_timeout")
                    log.warning("log follow of %s by %s ended: no pong within %g s",
                                follow.app, ws.peer, idle_s)
                    nursery.cancel_scope.cancel()
                    return
                n += 1
                with trio.move_on_after(idle_s / 2):  # (behind a write the client does not read)
                    try:
                        await ws.send_ping(n.to_bytes(8, "big"))
                    except ConnectionClosed:
                        nursery.cancel_scope.cancel()
                        return

        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump)
            nursery.start_soon(rescan)
            nursery.start_soon(listen)
            nursery.start_soon(keepalive)
        return received[0] if received else None

    def _byte_budget(self, peer: str, now: float) -> TokenBucket:
        budget = self._byte_budgets.get(peer)
        if budget is None:
            if len(self._byte_budgets) >= BYTE_BUDGETS_KEPT:
                # Forget the addresses that have their whole budget back: nothing lost.
                for address in [a for a, b in self._byte_budgets.items() if b.full(now)]:
                    del self._byte_budgets[address]
            rate = self.limits.cli_bytes_per_s
            budget = self._byte_budgets[peer] = TokenBucket(rate, 2 * rate, now)
        return budget


def _request_id(auth: protocol.Authenticated | protocol.DecodeError) -> str | None:
    return auth.id if isinstance(auth, protocol.DecodeError) else auth.envelope.id


def _summary(args: dict) -> str:
    """The arguments of a signed command for the log: never a manifest (it holds env values)."""
    shown = {k: v for k, v in args.items() if k != "manifest"}
    return " ".join(f"{k}={v}" for k, v in shown.items())


def _location(message: str) -> str:
    """``FILE:LINE:COL`` of a manifest error, without the text it quotes."""
    head = message.split(": ", 1)[0]
    return f"{head}: (manifest error; details in the reply, not logged)"
