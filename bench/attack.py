"""Latency under attack (#13): `skr8tr ping` and a GET through the ingress while attacks run.

Method: a real conductor and two real node agents on loopback (log level
info), an app `web` (the example HTTP service, 3 replicas, health-checked)
behind `skr8tr ingress --route /:web`, and an app `churn` (`/bin/sleep`, 0
replicas) for attack 5 to scale. In each phase this process makes N pairs of
calls, spread evenly over the phase:

- `ping` as the CLI makes it (skr8tr/blocking_client.py `call`): a new
  connection per call from 127.0.0.1, WebSocket handshake, the unsigned
  request, its reply and the close handshake. The CLI's Python start-up
  (~60 ms, see "Deploy latency") is not in it.
- `GET /` through the ingress on a new connection (`Connection: close`) from
  127.0.0.2, another address than the slowloris one.

A call that fails, or takes over 5 s, counts as failed, not as a latency. At
the end of each phase: the conductor's and the ingress's RSS and open
descriptors (psutil), the CPU the conductor and the attack workers used over
the phase's calls, and the lines with a traceback or an ERROR in the daemons'
logs (and anything an attack worker wrote to stderr).

The attacks run in worker processes (this file with ``--worker``) from
loopback addresses only, started before the phase's first call once their
connections are open (or after RAMP_S), and stopped when its last call is
done; each also stops by itself after ``--max-s`` and bounds every loop in
count. The attacks on the conductor come from 127.0.0.3, so that a cap per
address falls on them and not on the CLI's and the nodes' 127.0.0.1.

1. ``flood``: 3 connections each sending, in a loop, an unsigned `up` whose
   manifest has one 1,000,000-character `args` word (~1.0 MB of JSON, under
   the 1 MiB limit) and reading the refusal; 2 more connections sending
   small unsigned `scale` requests as fast as the socket takes them (batches
   of 100, replies read by a second task) until the rate limit closes them
   (1008), then reconnecting at once.
5. ``watchers``: 1,100 idle `/v1/watch` connections (they read every event
   and answer pings), 300 that finish the handshake and never read a byte
   (closure seen through TCP_INFO, not by reading), and, with the admin key,
   `scale churn` between 3 and 0 every 0.5 s to produce events.
7. ``slowloris``: 1,030 connections from 127.0.0.1 to the ingress, half
   silent, half sending one byte of a request head every 3 s, never ending it.

A connection the target closes is renewed after RENEW_PAUSE_S (the flood's
and the big `up`s' at once).
"""

from __future__ import annotations

import argparse
import collections
import http.client
import ipaddress
import json
import os
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import trio
from _harness import REPO, call_options, local_cluster, machine, pct, raise_fd_limit

from skr8tr import blocking_client, client, keyfiles, wire
from skr8tr.ws import frames as wsclient
from tests.e2e import poll

HELLO = REPO / "manifests" / "apps" / "hello_http.py"
WEB_REPLICAS = 3
CHURN_APP = "churn"
CHURN_REPLICAS = 3
CHURN_PERIOD_S = 0.5

CALL_TIMEOUT_S = 5.0  # a ping or GET slower than this counts as failed
TARGET_P50_MS = 20.0
WARMUP_CALLS = 5

PING_SOURCE = "127.0.0.1"  # where blocking_client connects from, as the CLI does
GET_SOURCE = "127.0.0.2"
CONDUCTOR_ATTACK_SOURCE = "127.0.0.3"
SLOWLORIS_SOURCE = "127.0.0.1"

BIG_UP_CONNECTIONS = 3
BIG_ARGS_CHARS = 1_000_000
FLOOD_CONNECTIONS = 2
FLOOD_BATCH = 100
IDLE_WATCHERS = 1100
MUTE_WATCHERS = 300
SLOW_CONNECTIONS = 1030
DRIBBLE_S = 3.0

RAMP_S = 60.0  # the longest a worker takes to open its connections before "ready"
RENEW_PAUSE_S = 1.0
CONNECTS_IN_FLIGHT = 64
MAX_RENEWALS = 2000  # per connection slot
MAX_MESSAGES = 5_000_000  # per connection slot, over all its renewals
MAX_SCALES = 10_000
RECEIVE_BYTES = 65536
SETTLE_S = 90.0  # for the daemons' descriptors to come back between phases

# Linux TCP_INFO: the first byte is the connection's state.
TCP_ESTABLISHED = 1


# --------------------------------------------------------------------------- workers


class ConnectionEnded(Exception):
    """The WebSocket ended: ``code`` as in a close frame, 1006 for no close frame."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


@dataclass
class Ramp:
    """Connection slots that have been established once; ``done`` when all have."""

    target: int
    up: set = field(default_factory=set)
    done: trio.Event = field(default_factory=trio.Event)

    def reached(self, slot: object) -> None:
        self.up.add(slot)
        if len(self.up) >= self.target:
            self.done.set()


class WsConnection:
    """A WebSocket over a trio stream with skr8tr's sans-IO client; one writer at a time."""

    def __init__(self, stream: trio.SocketStream, proto: wsclient.ClientProtocol,
                 pending: bytes) -> None:
        self.stream = stream
        self.proto = proto
        self.events = collections.deque(proto.receive(pending) if pending else ())
        self._send_lock = trio.Lock()

    async def send(self, data: bytes) -> None:
        async with self._send_lock:
            await self.stream.send_all(data)

    async def next_message(self) -> str | bytes:
        """The next message, answering pings; ConnectionEnded when the connection ends."""
        while True:
            while self.events:
                event = self.events.popleft()
                answer = self.proto.reply_to(event)
                # A close is answered only if no write is stuck: a flooding writer may
                # be blocked on a peer that stopped reading, until it drops us.
                if answer and not (isinstance(event, wsclient.Close)
                                   and self._send_lock.locked()):
                    try:
                        await self.send(answer)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        raise ConnectionEnded(1006) from None
                if isinstance(event, wsclient.Message):
                    return event.data
                if isinstance(event, wsclient.Close):
                    raise ConnectionEnded(event.code)
            try:
                data = await self.stream.receive_some(RECEIVE_BYTES)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                raise ConnectionEnded(1006)
            self.events.extend(self.proto.receive(data))


async def open_websocket(host: str, port: int, path: str, source: str, limiter,
                         handshake_read_bytes: int = RECEIVE_BYTES
                         ) -> WsConnection:
    """A WebSocket to ``host:port`` from ``source``. ``handshake_read_bytes=1`` reads
    the server's answer byte by byte, so that not one byte after it is read."""
    async with limiter:
        stream = await trio.open_tcp_stream(host, port, local_address=source)
        try:
            proto = wsclient.ClientProtocol(f"{host}:{port}", path)
            await stream.send_all(proto.handshake_request())
            pending = None
            while pending is None:
                data = await stream.receive_some(handshake_read_bytes)
                if not data:
                    raise wsclient.HandshakeError("closed during the handshake")
                pending = proto.receive_handshake(data)
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
    return WsConnection(stream, proto, pending)


CONNECT_ERRORS = (OSError, trio.BrokenResourceError, trio.ClosedResourceError,
                  wsclient.HandshakeError)


def error_name(exc: BaseException) -> str:
    if isinstance(exc, wsclient.HandshakeError):
        return f"handshake_refused:{exc.status}"
    return type(exc).__name__


def big_up_text() -> str:
    manifest = f"app evil\n  exec /bin/sleep\n  args {'a' * BIG_ARGS_CHARS}\n"
    text = json.dumps(wire.build_request(
        "up", {"manifest": manifest, "format": "skr8tr", "base_dir": "/tmp"}, None))
    assert len(text.encode()) < 1024 * 1024, len(text)
    return text


async def big_up_slot(slot: int, target, tally: collections.Counter, ramp: Ramp,
                      limiter) -> None:
    """Attack 1a: unsigned 1 MB `up`s, one at a time, each refusal read before the next."""
    text = big_up_text()
    sent = 0
    for _ in range(MAX_RENEWALS):
        try:
            conn = await open_websocket(*target, "/v1/cli", CONDUCTOR_ATTACK_SOURCE, limiter)
        except CONNECT_ERRORS as exc:
            tally[f"big_up_connect_failed:{error_name(exc)}"] += 1
            await trio.sleep(RENEW_PAUSE_S)
            continue
        tally["big_up_connections"] += 1
        async with conn.stream:
            frame = conn.proto.encode_text(text)
            try:
                while sent < MAX_MESSAGES:
                    await conn.send(frame)
                    sent += 1
                    tally["big_up_sent"] += 1
                    reply = json.loads(await conn.next_message())
                    code = "ok" if reply.get("ok") else reply.get("error", {}).get("code")
                    tally[f"big_up_reply:{code}"] += 1
                    ramp.reached(("big", slot))
            except ConnectionEnded as ended:
                tally[f"big_up_closed:{ended.code}"] += 1
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                tally["big_up_closed:1006"] += 1
        if sent >= MAX_MESSAGES:
            return


async def flood_slot(slot: int, target, tally: collections.Counter, ramp: Ramp,
                     limiter) -> None:
    """Attack 1b: small unsigned mutating requests as fast as the socket takes them."""
    sent = [0]

    async def send_batches(conn: WsConnection, batch: bytes) -> None:
        try:
            while sent[0] < MAX_MESSAGES:
                await conn.send(batch)
                sent[0] += FLOOD_BATCH
                tally["flood_sent"] += FLOOD_BATCH
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return  # the reader sees the end and records how it ended

    for _ in range(MAX_RENEWALS):
        if sent[0] >= MAX_MESSAGES:
            return
        try:
            conn = await open_websocket(*target, "/v1/cli", CONDUCTOR_ATTACK_SOURCE, limiter)
        except CONNECT_ERRORS as exc:
            tally[f"flood_connect_failed:{error_name(exc)}"] += 1
            await trio.sleep(RENEW_PAUSE_S)
            continue
        tally["flood_connections"] += 1
        batch = b"".join(conn.proto.encode_text(json.dumps(wire.build_request(
            "scale", {"app": "web", "replicas": 0}, None))) for _ in range(FLOOD_BATCH))
        async with conn.stream, trio.open_nursery() as nursery:
            nursery.start_soon(send_batches, conn, batch)
            try:
                while True:
                    await conn.next_message()
                    tally["flood_replies"] += 1
                    ramp.reached(("flood", slot))
            except ConnectionEnded as ended:
                tally[f"flood_closed:{ended.code}"] += 1
            nursery.cancel_scope.cancel()


async def idle_watcher_slot(slot: int, target, tally: collections.Counter, ramp: Ramp,
                            limiter) -> None:
    """Attack 5a: a /v1/watch connection that reads everything and answers pings."""
    for _ in range(MAX_RENEWALS):
        try:
            conn = await open_websocket(*target, "/v1/watch", CONDUCTOR_ATTACK_SOURCE, limiter)
        except CONNECT_ERRORS as exc:
            tally[f"idle_connect_failed:{error_name(exc)}"] += 1
            await trio.sleep(RENEW_PAUSE_S)
            continue
        tally["idle_opened"] += 1
        ramp.reached(("idle", slot))
        async with conn.stream:
            try:
                for _ in range(MAX_MESSAGES):
                    await conn.next_message()
                    tally["idle_messages_read"] += 1
            except ConnectionEnded as ended:
                tally[f"idle_closed:{ended.code}"] += 1
        await trio.sleep(RENEW_PAUSE_S)


def tcp_state(sock) -> int:
    return struct.unpack("B", sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1))[0]


async def mute_watcher_slot(slot: int, target, tally: collections.Counter, ramp: Ramp,
                            limiter) -> None:
    """Attack 5b: a /v1/watch connection that never reads a byte after the handshake.

    That the conductor closed it is seen in the socket's TCP state (FIN or RST
    received), checked every second, never by reading."""
    for _ in range(MAX_RENEWALS):
        try:
            conn = await open_websocket(*target, "/v1/watch", CONDUCTOR_ATTACK_SOURCE, limiter,
                                        handshake_read_bytes=1)
        except CONNECT_ERRORS as exc:
            tally[f"mute_connect_failed:{error_name(exc)}"] += 1
            await trio.sleep(RENEW_PAUSE_S)
            continue
        tally["mute_opened"] += 1
        ramp.reached(("mute", slot))
        async with conn.stream:
            while tcp_state(conn.stream.socket) == TCP_ESTABLISHED:
                await trio.sleep(1.0)
            tally["mute_closed_by_conductor"] += 1
        await trio.sleep(RENEW_PAUSE_S)


async def churn(target, key_file: str, tally: collections.Counter, ramp: Ramp,
                limiter) -> None:
    """Attack 5c: signed `scale churn` between CHURN_REPLICAS and 0, to make events."""
    signing_key = keyfiles.load_signing_key(key_file)
    scales = 0
    try:
        for _ in range(MAX_RENEWALS):
            try:
                conn = await open_websocket(*target, "/v1/cli", PING_SOURCE, limiter)
            except CONNECT_ERRORS as exc:
                tally[f"scale_connect_failed:{error_name(exc)}"] += 1
                await trio.sleep(RENEW_PAUSE_S)
                continue
            async with conn.stream:
                try:
                    while scales < MAX_SCALES:
                        replicas = CHURN_REPLICAS if scales % 2 == 0 else 0
                        request = wire.build_request(
                            "scale", {"app": CHURN_APP, "replicas": replicas}, signing_key)
                        await conn.send(conn.proto.encode_text(json.dumps(request)))
                        reply = json.loads(await conn.next_message())
                        scales += 1
                        tally["scale_ok" if reply.get("ok") else
                              f"scale_failed:{reply.get('error', {}).get('code')}"] += 1
                        ramp.reached("churn")
                        await trio.sleep(CHURN_PERIOD_S)
                    return
                except ConnectionEnded as ended:
                    tally[f"scale_closed:{ended.code}"] += 1
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    tally["scale_closed:1006"] += 1
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(10):
            await scale_to_zero(target, signing_key, tally)


async def scale_to_zero(target, signing_key, tally: collections.Counter) -> None:
    try:
        conn = await open_websocket(*target, "/v1/cli", PING_SOURCE, trio.CapacityLimiter(1))
        async with conn.stream:
            request = wire.build_request("scale", {"app": CHURN_APP, "replicas": 0},
                                         signing_key)
            await conn.send(conn.proto.encode_text(json.dumps(request)))
            await conn.next_message()
    except (*CONNECT_ERRORS, ConnectionEnded) as exc:
        tally[f"scale_to_zero_failed:{error_name(exc)}"] += 1


async def slow_slot(slot: int, target, tally: collections.Counter, ramp: Ramp,
                    limiter) -> None:
    """Attack 7: a connection to the ingress that sends nothing (even slots) or one byte
    of a never-ending request head every DRIBBLE_S (odd slots), renewed when closed."""
    head = b"GET / HTTP/1.1\r\nHost: attack\r\nX-Slow: "

    async def dribble(stream: trio.SocketStream) -> None:
        sent = 0
        try:
            while sent < MAX_MESSAGES:
                await stream.send_all(head[sent:sent + 1] if sent < len(head) else b"a")
                sent += 1
                tally["slow_bytes_sent"] += 1
                await trio.sleep(DRIBBLE_S)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return

    for _ in range(MAX_RENEWALS):
        try:
            async with limiter:
                stream = await trio.open_tcp_stream(*target, local_address=SLOWLORIS_SOURCE)
        except OSError as exc:
            tally[f"slow_connect_failed:{error_name(exc)}"] += 1
            await trio.sleep(RENEW_PAUSE_S)
            continue
        tally["slow_opened"] += 1
        ramp.reached(slot)
        answer = b""
        async with stream, trio.open_nursery() as nursery:
            if slot % 2:
                nursery.start_soon(dribble, stream)
            try:
                while data := await stream.receive_some(RECEIVE_BYTES):
                    answer += data[:64 - len(answer)]
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # a reset is a close too; counted below
            nursery.cancel_scope.cancel()
        status = answer.split(b" ")[1:2]
        tally[f"slow_closed:{status[0].decode() if status else 'no answer'}"] += 1
        await trio.sleep(RENEW_PAUSE_S)


async def stop_on_eof(cancel_scope: trio.CancelScope) -> None:
    """Cancel the attack when the benchmark closes our stdin (or dies)."""
    stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    async with stdin:
        while await stdin.receive_some(1024):
            continue
    cancel_scope.cancel()


def say(word: str, tally: collections.Counter) -> None:
    print(word, json.dumps(dict(tally)), flush=True)


async def run_worker(options: argparse.Namespace) -> None:
    """One attack until stdin closes or ``--max-s``: ``ready {...}`` on stdout once its
    connections are open (or after RAMP_S), ``done {...}`` with its counts at the end."""
    for address in (options.host, options.source):
        if not ipaddress.ip_address(address).is_loopback:
            raise SystemExit(f"refusing to attack {address}: loopback addresses only")
    target = (options.host, options.port)
    tally: collections.Counter = collections.Counter()
    limiter = trio.CapacityLimiter(CONNECTS_IN_FLIGHT)
    slots: list[tuple] = []
    if options.worker == "flood":
        slots += [(big_up_slot, i) for i in range(BIG_UP_CONNECTIONS)]
        slots += [(flood_slot, i) for i in range(FLOOD_CONNECTIONS)]
    elif options.worker == "watchers":
        slots += [(idle_watcher_slot, i) for i in range(IDLE_WATCHERS)]
        slots += [(mute_watcher_slot, i) for i in range(MUTE_WATCHERS)]
    else:
        slots += [(slow_slot, i) for i in range(SLOW_CONNECTIONS)]
    ramp = Ramp(len(slots) + (options.worker == "watchers"))
    with trio.move_on_after(options.max_s):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stop_on_eof, nursery.cancel_scope)
            for attack, slot in slots:
                nursery.start_soon(attack, slot, target, tally, ramp, limiter)
            if options.worker == "watchers":
                nursery.start_soon(churn, target, options.key, tally, ramp, limiter)
            with trio.move_on_after(RAMP_S):
                await ramp.done.wait()
            tally["ramp_slots_up"] = len(ramp.up)
            tally["ramp_slots"] = ramp.target
            say("ready", tally)
    say("done", tally)


# --------------------------------------------------------------------------- the benchmark


class AttackProcess:
    """One worker process (this file with ``--worker``), in its own session."""

    def __init__(self, kind: str, target: tuple[str, int], source: str, max_s: float,
                 key: Path, log_path: Path) -> None:
        self.kind = kind
        self.log_path = log_path
        with open(log_path, "ab") as log_file:
            self.proc = subprocess.Popen(
                [sys.executable, __file__, "--worker", kind, "--host", target[0],
                 "--port", str(target[1]), "--source", source, "--max-s", f"{max_s:g}",
                 "--key", str(key)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log_file, text=True,
                start_new_session=True)

    def _line(self, timeout_s: float) -> str:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        return self.proc.stdout.readline() if ready else ""

    def wait_ready(self) -> dict:
        line = self._line(RAMP_S + 30)
        if not line.startswith("ready "):
            self.kill()
            raise RuntimeError(f"attack worker {self.kind} did not start: {line!r}\n"
                               f"{self.log_path.read_text()[-3000:]}")
        return json.loads(line.removeprefix("ready "))

    def stop(self) -> dict:
        """Close its stdin and collect its counts; kill its group if it does not stop.
        (Its last line is short: it fits in the pipe, so waiting first cannot block it.)"""
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill()
            return {"worker_killed_after_30s": 1}
        for line in self.proc.stdout.read().splitlines():
            if line.startswith("done "):
                return json.loads(line.removeprefix("done "))
        return {f"worker_exit_{self.proc.returncode}": 1}

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@dataclass
class Samples:
    ok_ms: list[float] = field(default_factory=list)
    failures: collections.Counter = field(default_factory=collections.Counter)


def ping_once(url: str) -> str | None:
    """One `ping` as the CLI makes it; None when it worked, else why it failed."""
    opts = blocking_client.CallOptions(conductor=url, timeout_s=CALL_TIMEOUT_S, signing_key=None)
    try:
        result = blocking_client.call(opts, "ping", {})
    except blocking_client.ClientError as exc:
        return f"{exc.code}: {str(exc)[:100]}"
    return None if result.get("pong") == "conductor" else f"bad reply {result!r:.80}"


def get_once(port: int) -> str | None:
    """One GET / through the ingress from GET_SOURCE on a new connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=CALL_TIMEOUT_S,
                                      source_address=(GET_SOURCE, 0))
    try:
        conn.request("GET", "/", headers={"Connection": "close"})
        resp = conn.getresponse()
        resp.read()
        return None if resp.status == 200 else f"HTTP {resp.status}"
    except (OSError, http.client.HTTPException) as exc:
        return type(exc).__name__
    finally:
        conn.close()


def timed(samples: Samples, call, *args) -> None:
    t0 = time.perf_counter()
    why = call(*args)
    elapsed_s = time.perf_counter() - t0
    if why is None and elapsed_s > CALL_TIMEOUT_S:
        why = f"slower than {CALL_TIMEOUT_S:g} s"
    if why is None:
        samples.ok_ms.append(elapsed_s * 1000)
    else:
        samples.failures[why] += 1


def measure(url: str, ingress_port: int, calls: int, phase_s: float) -> tuple[Samples, Samples]:
    """``calls`` pings and GETs, taking turns, spread over ``phase_s``."""
    for _ in range(WARMUP_CALLS):
        ping_once(url)
        get_once(ingress_port)
    ping, get = Samples(), Samples()
    interval_s = phase_s / calls
    start = time.monotonic()
    for i in range(calls):
        timed(ping, ping_once, url)
        timed(get, get_once, ingress_port)
        pause = start + (i + 1) * interval_s - time.monotonic()
        if pause > 0:
            time.sleep(pause)
    return ping, get


@dataclass
class LogWatch:
    """New lines with a traceback or an ERROR/CRITICAL level in the daemons' logs."""

    offsets: dict[str, int] = field(default_factory=dict)

    def new_problems(self, daemons: dict) -> list[str]:
        problems = []
        for name, daemon in daemons.items():
            text = daemon.log()
            start = self.offsets.get(name, 0)
            self.offsets[name] = len(text)
            lines = text[start:].splitlines()
            for i, line in enumerate(lines):
                if "Traceback" in line:
                    problems.append(f"{name}: " + " | ".join(lines[i:i + 40])[-1500:])
                elif re.search(r"\b(ERROR|CRITICAL)\b", line):
                    problems.append(f"{name}: {line[:300]}")
        return problems


@dataclass
class Phase:
    name: str
    kinds: tuple[str, ...]
    ping: Samples | None = None
    get: Samples | None = None
    conductor: dict = field(default_factory=dict)
    ingress: dict = field(default_factory=dict)
    attackers: dict = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    dead: list[str] = field(default_factory=list)


PHASES = (
    ("idle", ()),
    ("attack 1: big unsigned `up`s + small-request flood", ("flood",)),
    ("attack 5: 1,100 idle + 300 non-reading watchers, churn", ("watchers",)),
    ("attack 7: slowloris on the ingress", ("slowloris",)),
    ("1 + 5 + 7 at once", ("flood", "watchers", "slowloris")),
)


def cpu_s(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return times.user + times.system


def usage(proc: psutil.Process) -> dict:
    return {"rss_mb": proc.memory_info().rss / 2**20, "fds": proc.num_fds()}


def settle(procs: list[psutil.Process], baseline: list[int]) -> float:
    """Wait (at most SETTLE_S) until each process holds at most 50 descriptors more than
    at the start; the seconds it took."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < SETTLE_S:
        if all(p.num_fds() <= b + 50 for p, b in zip(procs, baseline, strict=True)):
            break
        time.sleep(0.5)
    return time.monotonic() - t0


def web_manifest() -> str:
    return (f"app web\n  exec {HELLO}\n  args --host {{host}} --port {{port}}\n"
            f"  port auto\n  replicas {WEB_REPLICAS}\n  health\n    check GET /healthz\n"
            "    interval 500ms\n")


def churn_manifest() -> str:
    return (f"app {CHURN_APP}\n  exec /bin/sleep\n  args 3600\n  replicas 0\n"
            "  rollout\n    settle 0s\n")


async def deploy(opts) -> None:
    async with client.open_conductor(opts.conductor, "/v1/cli", opts.timeout_s) as ws:
        for text in (web_manifest(), churn_manifest()):
            await client.call_on(ws, opts, "up", {"manifest": text, "format": "skr8tr",
                                                  "base_dir": str(REPO)})
        with trio.fail_after(60):
            while True:
                rows = await client.call_on(ws, opts, "list", {"app": "web"})
                if len(rows) == WEB_REPLICAS and all(r["state"] == "ready" for r in rows):
                    return
                await trio.sleep(0.1)


def run_phases(cluster, calls: int, phase_s: float) -> list[Phase]:
    opts = call_options(cluster)
    trio.run(deploy, opts)
    ingress, ingress_url = cluster.start_ingress("/:web", extra=("--log-level", "info"))
    ingress_port = int(ingress_url.rsplit(":", 1)[1])
    poll(lambda: get_once(ingress_port) is None, what="the ingress to route GET / to web")
    conductor = psutil.Process(cluster.conductor.proc.pid)
    ingress_proc = psutil.Process(ingress.proc.pid)
    baseline = [conductor.num_fds(), ingress_proc.num_fds()]
    daemons = {"conductor": cluster.conductor, **cluster.nodes, "ingress": ingress}
    logs = LogWatch()
    logs.new_problems(daemons)
    max_s = RAMP_S + 3 * phase_s + 60  # the workers' own bound; the bench stops them sooner
    conductor_target = (("127.0.0.1", cluster.ws_port), CONDUCTOR_ATTACK_SOURCE)
    targets = {"flood": conductor_target, "watchers": conductor_target,
               "slowloris": (("127.0.0.1", ingress_port), SLOWLORIS_SOURCE)}
    phases = []
    for name, kinds in PHASES:
        phase = Phase(name, kinds)
        phases.append(phase)
        workers = []
        try:
            for kind in kinds:
                address, source = targets[kind]
                workers.append(AttackProcess(kind, address, source, max_s,
                                             cluster.admin_key,
                                             cluster.root / f"attack-{kind}.log"))
            for worker in workers:
                phase.attackers[worker.kind] = {"ready": worker.wait_ready()}
            watched = [conductor, *(psutil.Process(w.proc.pid) for w in workers)]
            cpu0, t0 = [cpu_s(p) for p in watched], time.monotonic()
            phase.ping, phase.get = measure(cluster.url, ingress_port, calls, phase_s)
            cpu1, t1 = [cpu_s(p) for p in watched], time.monotonic()
            cpu_pct = [100 * (b - a) / (t1 - t0) for a, b in zip(cpu0, cpu1, strict=True)]
            phase.conductor = usage(conductor) | {"cpu_pct": cpu_pct[0],
                                                  "attackers_cpu_pct": sum(cpu_pct[1:])}
            phase.ingress = usage(ingress_proc)
        finally:
            for worker in workers:
                phase.attackers.setdefault(worker.kind, {"ready": {}})["done"] = worker.stop()
                worker_log = worker.log_path.read_text(errors="replace").strip()
                if worker_log:
                    phase.problems.append(f"attack worker {worker.kind}: {worker_log[-1500:]}")
                worker.log_path.unlink()
        phase.dead = [n for n, d in daemons.items() if d.proc.poll() is not None]
        phase.problems += logs.new_problems(daemons)
        if phase.dead:
            break
        phase.conductor["settle_s"] = settle([conductor, ingress_proc], baseline)
    return phases


def ms_row(s: Samples) -> str:
    if not s.ok_ms:
        return "- | - | - | - | " + str(sum(s.failures.values()))
    return (f"{pct(s.ok_ms, 50):.2f} | {pct(s.ok_ms, 90):.2f} | {pct(s.ok_ms, 99):.2f} "
            f"| {max(s.ok_ms):.2f} | {sum(s.failures.values())}")


def what_attackers_did(attackers: dict) -> str:
    parts = []
    for kind, report in attackers.items():
        done = dict(sorted(report.get("done", {}).items()))
        ready = report["ready"]
        shown = ", ".join(f"{k} {v}" for k, v in done.items() if not k.startswith("ramp"))
        parts.append(f"{kind} ({ready.get('ramp_slots_up')}/{ready.get('ramp_slots')} "
                     f"slots up at start): {shown}")
    return "; ".join(parts) or "-"


def code_version() -> str:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                          capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "skr8tr"], cwd=REPO,
                           capture_output=True, text=True).stdout.splitlines()
    return f"{head}" + (f" plus uncommitted changes in {len(dirty)} files of skr8tr/"
                        if dirty else "")


def report(phases: list[Phase], calls: int, phase_s: float, started: str,
           load: tuple[float, float]) -> None:
    print("## Latency under attack (bench/attack.py)")
    print()
    print(f"Machine: {machine()}. Run {started}, load average {load[0]:.1f} at the start, "
          f"{load[1]:.1f} at the end; code {code_version()}. {calls} pings and {calls} GETs "
          f"per phase, taking turns over ~{phase_s:g} s, after {WARMUP_CALLS} warm-up pairs; "
          "ms; `failed`: an error or over 5 s. CPU: 100 % is one core, over the phase's "
          "calls.")
    print()
    print("| phase | ping p50 | p90 | p99 | max | failed | GET via ingress p50 | p90 | p99 "
          "| max | failed | ping p50 < 20 ms |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for p in phases:
        if p.ping is None:
            print(f"| {p.name} | not measured |||||||||||")
            continue
        met = bool(p.ping.ok_ms) and pct(p.ping.ok_ms, 50) < TARGET_P50_MS
        print(f"| {p.name} | {ms_row(p.ping)} | {ms_row(p.get)} | {'yes' if met else 'NO'} |")
    print()
    print("| phase | conductor RSS MB | conductor fds | conductor CPU % | attack workers CPU % "
          "| ingress RSS MB | ingress fds | fds back to baseline (+50) after the attack |")
    print("|---|---|---|---|---|---|---|---|")
    for p in phases:
        if not p.conductor:
            continue
        c, i = p.conductor, p.ingress
        back = f"{c['settle_s']:.1f} s" if "settle_s" in c else "-"
        print(f"| {p.name} | {c['rss_mb']:.1f} | {c['fds']} | {c['cpu_pct']:.0f} "
              f"| {c['attackers_cpu_pct']:.0f} | {i['rss_mb']:.1f} | {i['fds']} | {back} |")
    print()
    print("What the attackers did (counts over the phase, from the workers):")
    print()
    for p in phases:
        if p.attackers:
            print(f"- {p.name}: {what_attackers_did(p.attackers)}")
    print()
    failures = [(p.name, what, s.failures) for p in phases
                for what, s in (("ping", p.ping), ("GET", p.get)) if s and s.failures]
    print("Failed calls: " + ("none." if not failures else "; ".join(
        f"{name}, {what}: " + ", ".join(f"{k} x{v}" for k, v in f.items())
        for name, what, f in failures)))
    problems = [(p.name, line) for p in phases for line in p.problems]
    dead = [(p.name, d) for p in phases for d in p.dead]
    print()
    print("Daemons: " + ("all alive at the end; " if not dead else
                         "; ".join(f"{d} DIED during {n}" for n, d in dead) + "; ")
          + ("no traceback and no ERROR line in their logs." if not problems else
             f"{len(problems)} log lines with a traceback or ERROR:"))
    for name, line in problems[:30]:
        print(f"    [{name}] {line}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="50 calls over ~10 s per phase instead of 200 over ~30 s")
    parser.add_argument("--calls", type=int, default=None)
    parser.add_argument("--worker", choices=("flood", "watchers", "slowloris"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--host", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    parser.add_argument("--max-s", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--key", help=argparse.SUPPRESS)
    options = parser.parse_args()
    raise_fd_limit()
    if options.worker:
        trio.run(run_worker, options)
        return
    calls = options.calls or (50 if options.quick else 200)
    phase_s = 10.0 if options.quick else 30.0
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load_start = os.getloadavg()[0]
    with local_cluster(nodes=2, log_level="info") as cluster:
        phases = run_phases(cluster, calls, phase_s)
    report(phases, calls, phase_s, started, (load_start, os.getloadavg()[0]))


if __name__ == "__main__":
    main()
