"""One session with the conductor on ``/v1/node`` (see :mod:`skr8tr.core.node_protocol`).

challenge -> hello (signed, with the replicas already running) -> welcome or
refused; then heartbeats every ``heartbeat_s``, replica reports as they
happen, and the conductor's ``launch``, ``stop`` and ``logs`` requests.

A follower conductor answers the connection with ``refused`` NOT_LEADER
instead of a challenge (:class:`Refused`, with the leader it names). The
challenge and the welcome carry the conductor's leadership term (absent: 0);
:class:`Terms` keeps the highest one this agent was welcomed under, and a
session offered under a lower one (a deposed leader that has not noticed yet)
is closed with :class:`StaleTerm` before the node obeys it.

Everything the node sends after the handshake goes through one bounded
outbox drained by one task, so messages never interleave and a stuck
connection cannot make the agent buffer without bound: when the outbox is
full the session ends, and the next ``hello`` carries the current state.
"""

from __future__ import annotations

import json
import logging
import ssl
import time
from collections.abc import Callable
from typing import Any, TypeVar

import trio

from skr8tr import __version__
from skr8tr.core import node_protocol
from skr8tr.core.envelope import sign_challenge
from skr8tr.core.node_protocol import (
    MAX_NODE_MESSAGE_BYTES,
    AppGone,
    Challenge,
    Heartbeat,
    Hello,
    Launch,
    LogsPush,
    LogsReply,
    LogsRequest,
    LogsUnfollow,
    NodeDecodeError,
    NodeMessage,
    ReplicaReport,
    Stop,
    Welcome,
    chunk_lines,
    decode_node_message,
)
from skr8tr.core.signatures import Signer
from skr8tr.node.health import os_error_text
from skr8tr.node.supervisor import Report, Supervisor
from skr8tr.node.sysinfo import machine_figures
from skr8tr.tls import TlsError
from skr8tr.ws import trio_client

log = logging.getLogger("skr8tr.node")

CONNECT_TIMEOUT_S = 10.0
HANDSHAKE_TIMEOUT_S = 10.0
DISCONNECT_TIMEOUT_S = 2.0
OUTBOX_LIMIT = 4096
# Room left in a logs_reply for everything but the lines.
_REPLY_OVERHEAD_BYTES = 4096
# Log follows (``logs`` with follow) one session serves at once; the conductor asks
# for far fewer (one per follow of its clients, which it caps).
MAX_FOLLOWS = 64
PUSH_BATCH_LINES = 2000  # lines taken from a follow's buffer at a time


class SessionError(Exception):
    """The conductor broke the protocol, or the session could not keep up."""


class ConductorSilent(SessionError):
    """The conductor sent nothing, not even a pong, for SILENCE_HEARTBEATS heartbeats."""


class Refused(SessionError):
    """The conductor answered with ``refused``: to ``hello``, or at once (a follower:
    code NOT_LEADER, ``leader`` its URL or None)."""

    def __init__(self, code: str, message: str, leader: str | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.leader = leader


class StaleTerm(SessionError):
    """The conductor offered a leadership term lower than one this node was welcomed under."""

    def __init__(self, url: str, term: int, highest: int) -> None:
        super().__init__(f"the conductor at {url} leads under term {term}, older than term "
                         f"{highest} this node was welcomed under")
        self.url = url
        self.term = term
        self.highest = highest


class Terms:
    """The highest leadership term the agent was welcomed under.

    Kept in memory only: a restarted agent starts from 0 and trusts the first
    conductor that welcomes it; a deposed leader steps down within its etcd
    lease anyway, so the window this guards is the seconds in which two
    conductors both believe they lead.
    """

    def __init__(self) -> None:
        self.highest = 0

    def check(self, url: str, term: int) -> None:
        """Raises StaleTerm (after a warning naming *url* and both terms) if *term* is
        lower than the highest one welcomed under."""
        if term < self.highest:
            log.warning("the conductor at %s offers leadership term %d, lower than term %d "
                        "this node was welcomed under (a deposed leader); closing the session",
                        url, term, self.highest)
            raise StaleTerm(url, term, self.highest)

    def welcomed(self, term: int) -> None:
        self.highest = max(self.highest, term)


async def run_session(url: str, *, node_id: str, signing_key: Signer,
                      advertise: str | None, supervisor: Supervisor,
                      on_welcome: Callable[[], None] = lambda: None,
                      ssl_context: ssl.SSLContext | None = None,
                      terms: Terms | None = None, leave_when_silent: bool = True) -> None:
    """Connect to *url*, join as *node_id* and serve until the connection ends.

    With *leave_when_silent* (the agent has other conductors to go to) a conductor
    that sends nothing, not even a pong, for SILENCE_HEARTBEATS heartbeats is left
    (:class:`ConductorSilent`). A lone conductor is never left for its silence: it
    has no replacement, and on waking it excuses its own stall instead of declaring
    its nodes lost.

    Returns normally when the conductor closes a session it had welcomed.
    Raises :class:`Refused` when the conductor refuses the node (a follower
    does so at once, NOT_LEADER), :class:`StaleTerm` when its challenge or
    welcome carries a term lower than *terms* remembers (which records the
    term of a welcome),
    :class:`SessionError` when it cannot be reached, breaks the protocol or
    the outbox overflows, and :mod:`skr8tr.ws.trio_client`'s HandshakeError /
    ConnectionClosed when the WebSocket handshake fails or the connection
    drops during the join (possibly inside an exception group). Calls
    *on_welcome* once the conductor welcomed the node.

    On cancellation the session says goodbye properly: close code 1001 and
    the close handshake, bounded by :data:`DISCONNECT_TIMEOUT_S`, then
    Cancelled propagates. For that the session runs shielded from the outer
    cancellation, which reaches the session's work through a forwarding task
    instead, so the close itself is not cancelled.

    A ``wss://`` *url* is verified with *ssl_context* (see :mod:`skr8tr.tls`);
    a certificate that does not verify fails the connection (SessionError).
    """
    work_scope = trio.CancelScope()
    async with trio.open_nursery() as forwarder:
        forwarder.start_soon(_cancel_when_cancelled, work_scope)
        with trio.CancelScope(shield=True):
            await _connect_and_serve(work_scope, url, ssl_context=ssl_context,
                                     node_id=node_id, signing_key=signing_key,
                                     advertise=advertise, supervisor=supervisor,
                                     on_welcome=on_welcome,
                                     terms=terms if terms is not None else Terms(),
                                     leave_when_silent=leave_when_silent)
        forwarder.cancel_scope.cancel()
    # When the outer scope was cancelled, the checkpoint here raises Cancelled.
    await trio.lowlevel.checkpoint_if_cancelled()


async def _cancel_when_cancelled(scope: trio.CancelScope) -> None:
    try:
        await trio.sleep_forever()
    finally:
        scope.cancel()


async def _connect_and_serve(work_scope: trio.CancelScope, url: str,
                             ssl_context: ssl.SSLContext | None = None,
                             **serve_options: Any) -> None:
    ws: trio_client.ClientConnection | None = None
    try:
        with work_scope:
            try:
                with trio.fail_after(CONNECT_TIMEOUT_S):
                    ws = await trio_client.connect(url, ssl_context=ssl_context,
                                            max_message_bytes=MAX_NODE_MESSAGE_BYTES)
            except TlsError as exc:
                raise SessionError(f"the conductor at {url}: {exc}") from None
            except trio.TooSlowError:
                raise SessionError(f"no answer within {CONNECT_TIMEOUT_S:g} s") from None
            except OSError as exc:
                raise SessionError(f"cannot connect: {os_error_text(exc)}") from None
            await _serve(ws, url=url, **serve_options)
    finally:
        if ws is not None:
            code, reason = ((1001, "node agent shutting down") if work_scope.cancel_called
                            else (1000, "node agent closing the session"))
            with trio.move_on_after(DISCONNECT_TIMEOUT_S):
                await ws.aclose(code, reason)


async def _serve(ws: trio_client.ClientConnection, *, url: str, node_id: str,
                 signing_key: Signer, advertise: str | None,
                 supervisor: Supervisor, on_welcome: Callable[[], None], terms: Terms,
                 leave_when_silent: bool = True) -> None:
    challenge = await _receive_handshake(ws, Challenge)
    terms.check(url, challenge.term or 0)
    address = advertise or _local_address(ws)
    outbox_send, outbox_recv = trio.open_memory_channel[NodeMessage](OUTBOX_LIMIT)

    with trio.CancelScope() as session_scope:
        def sink(report: Report) -> None:
            try:
                outbox_send.send_nowait(report.fit())
            except trio.WouldBlock:
                log.error("node %s: %d messages waiting for %s; ending the session",
                          node_id, OUTBOX_LIMIT, url)
                session_scope.cancel()

        replicas = tuple(report.fit() for report in supervisor.attach(sink))
        try:
            sig = sign_challenge(signing_key, bytes.fromhex(challenge.nonce), node_id)
            await ws.send_message(Hello(
                node_id=node_id, key=signing_key.public, sig=sig, version=__version__,
                address=address, **machine_figures(), replicas=replicas).encode())
            log.info("node %s: hello sent to %s (address %s, %d replica(s) running)",
                     node_id, url, address, len(replicas))
            reply = await _receive_handshake(ws, Welcome)
            term = reply.term or 0
            terms.check(url, term)
            terms.welcomed(term)
            on_welcome()
            heartbeat_s = reply.heartbeat_s
            log.info("node %s: welcomed by %s under term %d (heartbeat every %g s)", node_id,
                     url, term, heartbeat_s)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_send_outbox, ws, outbox_recv)
                nursery.start_soon(_send_heartbeats, outbox_send, heartbeat_s)
                if leave_when_silent:
                    nursery.start_soon(_watch_conductor, ws, url, heartbeat_s)
                await _serve_commands(ws, node_id, supervisor, outbox_send, nursery)
                nursery.cancel_scope.cancel()
        finally:
            supervisor.detach(sink)
    if session_scope.cancelled_caught:
        raise SessionError(f"the connection to {url} could not keep up with "
                           f"{OUTBOX_LIMIT} queued messages")


SILENCE_HEARTBEATS = 3  # a conductor silent this many heartbeats (pings unanswered) is gone


async def _watch_conductor(ws: trio_client.ClientConnection, url: str,
                           heartbeat_s: float) -> None:
    """Ping the conductor every heartbeat; end the session when nothing (a pong included)
    came from it for SILENCE_HEARTBEATS of them. A conductor that is frozen (SIGSTOP,
    a partition) keeps the TCP connection open: without this the node would stay with
    it and never go to the leader that replaced it. The conductor declares a silent
    node lost after the same time (``--node-timeout`` is 3 heartbeats)."""
    limit_s = SILENCE_HEARTBEATS * heartbeat_s
    pinged_at = trio.current_time()
    while True:
        await trio.sleep(heartbeat_s / 2)  # noticed within half a heartbeat of the limit
        now = trio.current_time()
        silent_s = now - ws.last_received
        if silent_s >= limit_s:
            raise ConductorSilent(f"nothing from {url} for {silent_s:.1f} s (not even a "
                                  "pong); it is frozen or cut off")
        if now - pinged_at >= heartbeat_s:
            pinged_at = now
            await ws.send_ping()


_Handshake = TypeVar("_Handshake", Challenge, Welcome)


async def _receive_handshake(ws: trio_client.ClientConnection,
                             expected: type[_Handshake]) -> _Handshake:
    """The next message, of type *expected*; raises :class:`Refused` for a ``refused``
    (a follower, before anything else; or a hello refused) and SessionError for
    anything else or nothing within HANDSHAKE_TIMEOUT_S."""
    wanted = f"{expected.TYPE} or refused"
    with trio.move_on_after(HANDSHAKE_TIMEOUT_S):
        data = await ws.get_message()
        msg = decode_node_message(data)
        if isinstance(msg, NodeDecodeError):
            raise SessionError(f"bad message from the conductor, expected {wanted}: "
                               f"{msg.message}")
        if isinstance(msg, node_protocol.Refused):
            raise Refused(msg.code, msg.message, msg.leader)
        if not isinstance(msg, expected):
            raise SessionError(f"expected {wanted} from the conductor, got {msg.TYPE}")
        return msg
    raise SessionError(f"no {wanted} from the conductor within {HANDSHAKE_TIMEOUT_S:g} s")


def _local_address(ws: trio_client.ClientConnection) -> str:
    return ws.local_address or "127.0.0.1"


async def _send_outbox(ws: trio_client.ClientConnection,
                       outbox: trio.MemoryReceiveChannel[NodeMessage]) -> None:
    async for msg in outbox:
        try:
            text = msg.encode()
        except ValueError:
            log.exception("cannot encode a %s message; dropped (this is a bug)", msg.TYPE)
            continue
        try:
            await ws.send_message(text)
        except trio_client.ConnectionClosed:
            return  # the receiving side notices and ends the session


async def _send_heartbeats(outbox: trio.MemorySendChannel[NodeMessage],
                           interval_s: float) -> None:
    while True:
        await trio.sleep(interval_s)
        await outbox.send(Heartbeat(**machine_figures()))


async def _serve_commands(ws: trio_client.ClientConnection, node_id: str,
                          supervisor: Supervisor,
                          outbox: trio.MemorySendChannel[NodeMessage],
                          nursery: trio.Nursery) -> None:
    follows: dict[str, trio.CancelScope] = {}  # req -> its pusher's scope
    while True:
        try:
            data = await ws.get_message()
        except trio_client.ConnectionClosed as exc:
            log.info("node %s: the conductor closed the session (code %s%s)", node_id,
                     exc.code, f": {exc.reason}" if exc.reason else "")
            return
        msg = decode_node_message(data)
        if isinstance(msg, NodeDecodeError):
            log.warning("node %s: bad message from the conductor ignored: %s", node_id,
                        msg.message)
            await _answer_bad_launch(data, msg, outbox)
            continue
        if isinstance(msg, node_protocol.Refused):  # e.g. this node's key was revoked
            raise Refused(msg.code, msg.message)
        if isinstance(msg, Launch):
            supervisor.launch(msg)
        elif isinstance(msg, Stop):
            supervisor.stop(msg.replica)
        elif isinstance(msg, LogsRequest):
            if not msg.follow:
                lines = supervisor.tail_logs(msg.app, msg.replica, msg.tail)
                await outbox.send(LogsReply(req=msg.req, lines=fit_lines(lines)))
                continue
            if msg.req in follows or len(follows) >= MAX_FOLLOWS:
                log.warning("node %s: log follow %s refused (%s)", node_id, msg.req,
                            "a duplicate" if msg.req in follows
                            else f"{MAX_FOLLOWS} follows already")
                await outbox.send(LogsReply(req=msg.req, lines=[]))
                continue
            follows[msg.req] = await nursery.start(_push_logs, msg, supervisor, outbox,
                                                   follows)
            log.info("node %s: log follow %s of %s started (%d served)", node_id, msg.req,
                     msg.replica or msg.app, len(follows))
        elif isinstance(msg, LogsUnfollow):
            scope = follows.pop(msg.req, None)
            if scope is not None:
                scope.cancel()
        elif isinstance(msg, AppGone):
            supervisor.forget_app(msg.app)
        else:
            log.warning("node %s: unexpected %s message from the conductor ignored",
                        node_id, msg.TYPE)


async def _push_logs(msg: LogsRequest, supervisor: Supervisor,
                     outbox: trio.MemorySendChannel[NodeMessage],
                     follows: dict[str, trio.CancelScope],
                     task_status: trio.TaskStatus[trio.CancelScope] = trio.TASK_STATUS_IGNORED
                     ) -> None:
    """Serve one follow: subscribe, answer with the first lines (``logs_reply``), then
    send the new lines as they come, until cancelled (``logs_unfollow``, or the session
    ends); the subscription lives exactly as long as this task. Leaves half the outbox
    to reports and heartbeats: while it is fuller, lines wait in the subscription's
    bounded buffer (and beyond it are counted as skipped)."""
    req = msg.req
    with trio.CancelScope() as scope:
        first, sub = supervisor.follow_logs(msg.app, msg.replica, tail=msg.tail,
                                            after=msg.after, since=msg.since)
        task_status.started(scope)
        limit = MAX_NODE_MESSAGE_BYTES - _REPLY_OVERHEAD_BYTES
        try:
            if msg.after is None:
                # A tail: its newest lines that fit (the oldest go; no gap at the seam).
                await outbox.send(LogsReply(req=req, lines=fit_lines(first)))
            else:
                # A resumed follow: every line after those shown, in as many messages
                # as it takes (a gap here would be a gap in what the user reads).
                chunks = chunk_lines(first, limit) or [[]]
                await outbox.send(LogsReply(req=req, lines=chunks[0]))
                for chunk in chunks[1:]:
                    await outbox.send(LogsPush(req=req, lines=chunk, skipped=0))
            while True:
                lines, skipped = await sub.next_batch(PUSH_BATCH_LINES)
                chunks = chunk_lines(lines, limit) or [[]]
                for i, chunk in enumerate(chunks):
                    while outbox.statistics().current_buffer_used > OUTBOX_LIMIT // 2:
                        await trio.sleep(0.05)
                    last = i == len(chunks) - 1
                    await outbox.send(LogsPush(req=req, lines=chunk,
                                               skipped=skipped if last else 0))
        finally:
            supervisor.unfollow_logs(sub)
            if follows.get(req) is scope:
                del follows[req]
            log.info("log follow %s ended (%d still served)", req, len(follows))


async def _answer_bad_launch(data: str | bytes, problem: NodeDecodeError,
                             outbox: trio.MemorySendChannel[NodeMessage]) -> None:
    """A launch we cannot read still names its replica: say it failed, so nobody waits."""
    try:
        msg = json.loads(data)
    except (ValueError, RecursionError):
        return
    if not isinstance(msg, dict) or msg.get("type") != "launch":
        return
    try:
        # Checked as the conductor will (no token: the wire has always left it out).
        report = ReplicaReport.from_fields({
            "replica": msg.get("replica"), "app": msg.get("app"),
            "generation": msg.get("generation"), "state": "failed", "pid": None,
            "port": None, "exit_code": None, "signal": None,
            "message": f"bad launch message: {problem.message}", "reason": "launch_error",
            "ts": time.time(),
        })
    except ValueError:
        return  # not even the replica id is usable
    await outbox.send(report)


def fit_lines(lines: list[dict[str, Any]],
              limit: int = MAX_NODE_MESSAGE_BYTES - _REPLY_OVERHEAD_BYTES) -> list[dict[str, Any]]:
    """The newest *lines* whose JSON fits in *limit* bytes (oldest dropped first)."""
    total = 0
    start = len(lines)
    while start > 0:
        size = len(json.dumps(lines[start - 1], ensure_ascii=False).encode()) + 1
        if total + size > limit:
            break
        total += size
        start -= 1
    return lines[start:]
