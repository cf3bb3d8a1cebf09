"""The ingress proxy in one process: fake replicas (h11 on trio), a real Proxy, real sockets.

Loopback only; every test runs under a deadline; time limits are set short
where a test is about them. Drain, retry, pooling, streaming and the limits
against slow clients are each shown on the wire.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import h11
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from skr8tr.core import protocol
from skr8tr.ingress.daemon import IngressConfig, run_ingress
from skr8tr.ingress.limits import ProxyLimits
from skr8tr.ingress.pool import Pool
from skr8tr.ingress.proxy import Proxy
from skr8tr.ingress.routes import BackendTable, Route, RouteTable
from skr8tr.ws import server as wsserver
from skr8tr.ws import trio_client
from tests.conftest import free_port
from tests.ws_helpers import serve_websocket

DEADLINE_S = 15.0
ROOT = (Route("/", "web"),)


# ---------------------------------------------------------------------------- fake replicas


@dataclass
class FakeReplica:
    """An HTTP server with knobs. Paths: ``/stream`` (first chunk, then waits for
    ``release``), ``/slow`` (no answer for 30 s), ``/crash-mid`` (promises 100 bytes,
    sends 10, hangs up), ``/upload`` (records body progress); anything else echoes the
    request as JSON. ``hang_up`` closes every connection instead of answering."""

    name: str
    port: int = 0
    hang_up: bool = False
    connections: int = 0
    open: int = 0
    requests: list[dict] = field(default_factory=list)
    progress: int = 0  # bytes of the current /upload body received so far
    release: trio.Event = field(default_factory=trio.Event)


async def next_h11_event(conn: h11.Connection, stream: trio.SocketStream):
    """The next event of an h11 connection, reading from *stream* as it needs."""
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        conn.receive_data(await stream.receive_some(65536))


async def serve_fake_replica(replica: FakeReplica, *, task_status=trio.TASK_STATUS_IGNORED):
    async def handle(stream: trio.SocketStream) -> None:
        replica.connections += 1
        replica.open += 1
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                req = await next_h11_event(conn, stream)
                if not isinstance(req, h11.Request):
                    return
                if replica.hang_up:
                    return
                target = req.target.decode()
                body = b""
                replica.progress = 0
                while True:
                    ev = await next_h11_event(conn, stream)
                    if isinstance(ev, h11.Data):
                        body += ev.data
                        replica.progress += len(ev.data)
                    elif isinstance(ev, h11.EndOfMessage):
                        break
                    else:
                        return
                replica.requests.append({
                    "method": req.method.decode(), "target": target, "body": body,
                    "headers": [(n.decode(), v.decode()) for n, v in req.headers.raw_items()]})
                await _answer(replica, conn, stream, req, target, body)
                if conn.our_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            return
        finally:
            replica.open -= 1
            await stream.aclose()

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    replica.port = listeners[0].socket.getsockname()[1]
    await trio.serve_listeners(handle, listeners, task_status=task_status)


async def _answer(replica: FakeReplica, conn: h11.Connection, stream: trio.SocketStream,
                  req: h11.Request, target: str, body: bytes) -> None:
    async def send(*events) -> None:
        for ev in events:
            data = conn.send(ev)
            if data:
                await stream.send_all(data)

    mine = [("X-Replica", replica.name), ("Connection", "keep-alive, X-Hop"), ("X-Hop", "no"),
            ("Keep-Alive", "timeout=5")]
    if target == "/stream":
        await send(h11.Response(status_code=200, headers=mine), h11.Data(data=b"first;"))
        await replica.release.wait()
        await send(h11.Data(data=b"last"), h11.EndOfMessage())
    elif target == "/slow":
        await trio.sleep(30)
    elif target == "/crash-mid":
        await send(h11.Response(status_code=200, headers=[*mine, ("Content-Length", "100")]),
                   h11.Data(data=b"0123456789"))
        stream.socket.close()
    else:
        doc = {"replica": replica.name, "method": req.method.decode(), "target": target,
               "body_len": len(body), "body_sha256": hashlib.sha256(body).hexdigest()}
        data = json.dumps(doc).encode()
        await send(h11.Response(status_code=200, headers=[
            *mine, ("Content-Type", "application/json"), ("Content-Length", str(len(data)))]),
            h11.Data(data=data) if req.method != b"HEAD" else h11.Data(data=b""),
            h11.EndOfMessage())


# ---------------------------------------------------------------------------- a test client


@dataclass
class Reply:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes
    reason: bytes = b""

    def json(self) -> dict:
        return json.loads(self.body)


class Client:
    """One keep-alive client connection (h11)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)

    async def send(self, *events) -> None:
        for ev in events:
            data = self.conn.send(ev)
            if data:
                await self.stream.send_all(data)

    async def next_event(self):
        return await next_h11_event(self.conn, self.stream)

    async def request(self, method: str = "GET", target: str = "/", headers=(),
                      body: bytes | None = None) -> Reply:
        hdrs = [("Host", "example.test"), *headers]
        if body is not None:
            hdrs.append(("Content-Length", str(len(body))))
        await self.send(h11.Request(method=method, target=target, headers=hdrs))
        if body:
            await self.send(h11.Data(data=body))
        await self.send(h11.EndOfMessage())
        return await self.read_reply()

    async def read_reply(self) -> Reply:
        response, body = None, b""
        while True:
            ev = await self.next_event()
            if isinstance(ev, h11.Response):
                response = ev
            elif isinstance(ev, h11.Data):
                body += ev.data
            elif isinstance(ev, h11.EndOfMessage):
                break
            elif isinstance(ev, h11.InformationalResponse):
                continue
            else:
                raise AssertionError(f"unexpected {ev!r}")
        assert response is not None
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        return Reply(response.status_code,
                     {n.decode().lower(): v.decode() for n, v in response.headers}, body,
                     response.reason)


@asynccontextmanager
async def open_client(port: int) -> AsyncIterator[Client]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        yield Client(stream)


async def get(port: int, target: str = "/", **kw) -> Reply:
    async with open_client(port) as c:
        return await c.request("GET", target, **kw)


# ---------------------------------------------------------------------------- the harness


def snapshot(replicas: list[FakeReplica], dead: tuple[str, ...] = ()) -> dict:
    rows = [{"app": "web", "replica": r.name, "node": "n1", "pid": 1, "port": r.port,
             "generation": 1, "state": "ready"} for r in replicas]
    rows += [{"app": "web", "replica": name, "node": "n1", "pid": 1, "port": free_port(),
              "generation": 1, "state": "ready"} for name in dead]
    return {"nodes": [{"node": "n1", "address": "127.0.0.1"}], "replicas": rows}


@dataclass
class Harness:
    proxy: Proxy
    table: BackendTable
    pool: Pool
    port: int
    replicas: dict[str, FakeReplica]

    def event(self, event: str, replica: str) -> None:
        """What the watch follower does with an event: apply it, retire what left."""
        self.pool.retire(self.table.apply_event(event, {"app": "web", "replica": replica,
                                                        "node": "n1"}))


@asynccontextmanager
async def open_ingress(names=("a", "b"), *, dead: tuple[str, ...] = (),
                       limits: ProxyLimits | None = None, routes: tuple[Route, ...] = ROOT,
                       synced: bool = True) -> AsyncIterator[Harness]:
    replicas = [FakeReplica(name) for name in names]
    with trio.fail_after(DEADLINE_S):
        async with trio.open_nursery() as nursery:
            for r in replicas:
                await nursery.start(serve_fake_replica, r)
            table = BackendTable()
            if synced:
                table.apply_snapshot(snapshot(replicas, dead))
            pool = Pool(table.is_routable, connect_timeout_s=1.0)
            proxy = Proxy(RouteTable(routes), table, pool, limits or ProxyLimits())
            listeners = await nursery.start(functools.partial(
                trio.serve_tcp, proxy.serve_connection, 0, host="127.0.0.1"))
            yield Harness(proxy, table, pool, listeners[0].socket.getsockname()[1],
                          {r.name: r for r in replicas})
            nursery.cancel_scope.cancel()


async def eventually(predicate, what: str, timeout_s: float = 5.0) -> None:
    with trio.move_on_after(timeout_s):
        while not predicate():
            await trio.sleep(0.01)
        return
    raise AssertionError(f"timed out waiting for {what}")


# ---------------------------------------------------------------------------- routing


async def test_unknown_route_is_404_and_no_replica_is_503_with_retry_after():
    async with open_ingress(routes=(Route("/web", "web"), Route("/api", "api"))) as h:
        r = await get(h.port, "/other")
        assert r.status == 404 and b"no route matches /other" in r.body
        assert r.reason == b"Not Found"
        r = await get(h.port, "/api/x")
        assert r.status == 503 and r.headers["retry-after"] == "1"
        assert r.reason == b"Service Unavailable"  # what clients and logs show
        assert b"no ready replica of app api" in r.body
        assert (await get(h.port, "/web/x")).status == 200


async def test_before_the_first_snapshot_the_503_says_why():
    async with open_ingress(synced=False) as h:
        r = await get(h.port)
        assert r.status == 503 and b"not heard from the conductor" in r.body


async def test_round_robin_headers_and_keep_alive_to_replicas():
    async with open_ingress() as h, open_client(h.port) as c:
        seen = []
        for _ in range(6):
            r = await c.request("GET", "/p?q=1", headers=[
                ("X-Forwarded-For", "203.0.113.9"), ("X-Forwarded-Proto", "https"),
                ("Connection", "keep-alive, X-Secret"), ("X-Secret", "s"),
                ("Keep-Alive", "timeout=9"), ("X-Custom-Case", "kept")])
            assert r.status == 200 and r.json()["target"] == "/p?q=1"
            seen.append(r.headers["x-replica"])
            # hop-by-hop headers of the replica's response stay behind
            assert "x-hop" not in r.headers and "keep-alive" not in r.headers
        assert seen == ["a", "b"] * 3
        forwarded = dict(h.replicas["a"].requests[0]["headers"])
        assert forwarded["X-Custom-Case"] == "kept"  # the sender's casing survives
        forwarded = {n.lower(): v for n, v in forwarded.items()}
        assert forwarded["host"] == "example.test"
        assert forwarded["x-forwarded-for"] == "203.0.113.9, 127.0.0.1"
        assert forwarded["x-forwarded-proto"] == "http"
        assert not {"connection", "x-secret", "keep-alive"} & set(forwarded)
        # one pooled connection per replica carried all six requests
        assert (h.replicas["a"].connections, h.replicas["b"].connections) == (1, 1)
        assert h.pool.opened == 2


async def test_absolute_form_targets_are_forwarded_in_origin_form():
    async with open_ingress(routes=(Route("/api", "web"),)) as h:
        r = await get(h.port, "http://example.test/api/x?y=1")
        assert r.status == 200 and r.json()["target"] == "/api/x?y=1"


async def test_head_and_expect_100_continue():
    async with open_ingress(names=("a",)) as h, open_client(h.port) as c:
        r = await c.request("HEAD", "/")
        assert r.status == 200 and r.body == b"" and int(r.headers["content-length"]) > 0
        await c.send(h11.Request(method="POST", target="/", headers=[
            ("Host", "x"), ("Content-Length", "5"), ("Expect", "100-continue")]))
        ev = await c.next_event()
        assert isinstance(ev, h11.InformationalResponse) and ev.status_code == 100
        await c.send(h11.Data(data=b"hello"), h11.EndOfMessage())
        r = await c.read_reply()
        assert r.status == 200 and r.json()["body_len"] == 5


# ---------------------------------------------------------------------------- streaming


async def test_request_and_response_bodies_stream():
    async with open_ingress(names=("a",)) as h, open_client(h.port) as c:
        a = h.replicas["a"]
        # request: the first chunk reaches the replica before the client sends the rest
        await c.send(h11.Request(method="POST", target="/upload", headers=[
            ("Host", "x"), ("Transfer-Encoding", "chunked")]), h11.Data(data=b"x" * 1000))
        await eventually(lambda: a.progress >= 1000, "the first chunk to reach the replica")
        await c.send(h11.Data(data=b"y" * 5000), h11.EndOfMessage())
        r = await c.read_reply()
        assert r.json()["body_len"] == 6000
        assert r.json()["body_sha256"] == hashlib.sha256(b"x" * 1000 + b"y" * 5000).hexdigest()
        # response: the first chunk reaches the client before the replica sends the rest
        await c.send(h11.Request(method="GET", target="/stream", headers=[("Host", "x")]),
                     h11.EndOfMessage())
        assert isinstance(await c.next_event(), h11.Response)
        assert (await c.next_event()).data == b"first;"
        a.release.set()
        assert (await c.next_event()).data == b"last"
        assert isinstance(await c.next_event(), h11.EndOfMessage)


async def test_a_large_body_arrives_whole():
    body = bytes(range(256)) * 8192  # 2 MiB
    async with open_ingress(names=("a",)) as h, open_client(h.port) as c:
        r = await c.request("PUT", "/big", body=body)
        assert r.json()["body_len"] == len(body)
        assert r.json()["body_sha256"] == hashlib.sha256(body).hexdigest()


# ---------------------------------------------------------------------------- retries


async def test_a_connect_failure_moves_on_to_another_replica():
    async with open_ingress(names=("b",), dead=("a-dead",)) as h:
        for method in ("GET", "POST", "GET", "POST"):  # nothing was sent: any method
            async with open_client(h.port) as c:
                r = await c.request(method, "/", body=b"" if method == "POST" else None)
            assert r.status == 200 and r.headers["x-replica"] == "b"
        assert h.proxy.stats.retries >= 1


async def test_without_retries_a_dead_replica_is_a_502():
    async with open_ingress(names=(), dead=("a-dead",), limits=ProxyLimits(retries=0)) as h:
        r = await get(h.port)
        assert r.status == 502 and b"cannot connect to a-dead" in r.body


async def test_after_sending_only_idempotent_bodyless_requests_are_retried():
    async with open_ingress(names=("a-hangs-up", "b")) as h:
        h.replicas["a-hangs-up"].hang_up = True
        for _ in range(2):  # the round robin starts on each replica once
            assert (await get(h.port)).headers["x-replica"] == "b"
        statuses = set()
        for _ in range(2):
            async with open_client(h.port) as c:
                statuses.add((await c.request("POST", "/", body=b"x")).status)
        assert statuses == {200, 502}  # the POST that went to a-hangs-up was not resent
        async with open_client(h.port) as c:
            replies = [await c.request("PUT", "/", body=b"x") for _ in range(2)]
        assert sorted(r.status for r in replies) == [200, 502]


# ---------------------------------------------------------------------------- drain


async def test_a_draining_replica_gets_no_new_request_and_loses_its_idle_connections():
    async with open_ingress() as h:
        for _ in range(4):
            await get(h.port)
        a = h.replicas["a"]
        await eventually(lambda: h.pool.idle_count() == 2, "both connections to be pooled")
        assert a.open == 1
        h.event("replica.draining", "a")
        await eventually(lambda: a.open == 0, "a's pooled connection to close")
        before = len(a.requests)
        for _ in range(6):
            assert (await get(h.port)).headers["x-replica"] == "b"
        assert len(a.requests) == before


async def test_a_request_in_flight_on_a_draining_replica_finishes():
    async with open_ingress() as h, open_client(h.port) as c:
        a = h.replicas["a"]
        await c.send(h11.Request(method="GET", target="/stream", headers=[("Host", "x")]),
                     h11.EndOfMessage())
        assert isinstance(await c.next_event(), h11.Response)  # served by a (round robin)
        h.event("replica.draining", "a")
        a.release.set()
        body = b""
        while not isinstance(ev := await c.next_event(), h11.EndOfMessage):
            body += ev.data
        assert body == b"first;last"
        c.conn.start_next_cycle()
        # ... and then its connection is closed, not pooled
        await eventually(lambda: a.open == 0, "the drained replica's connection to close")
        r = await c.request()
        assert r.status == 200 and r.headers["x-replica"] == "b"


# ---------------------------------------------------------------------------- limits


async def test_a_slow_request_head_gets_408_and_is_closed():
    async with open_ingress(limits=ProxyLimits(header_timeout_s=0.3)) as h:
        stream = await trio.open_tcp_stream("127.0.0.1", h.port)
        async with stream:
            await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n")  # ... and nothing more
            with trio.fail_after(3):
                data = b""
                while chunk := await stream.receive_some(4096):
                    data += chunk
        assert data.startswith(b"HTTP/1.1 408 ")


async def test_a_trickling_head_does_not_reset_the_clock():
    async with open_ingress(limits=ProxyLimits(header_timeout_s=0.5)) as h:
        stream = await trio.open_tcp_stream("127.0.0.1", h.port)
        async with stream:
            await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
            answer = b""
            with trio.fail_after(5):
                async with trio.open_nursery() as nursery:
                    async def trickle() -> None:  # a header line every 100 ms, forever
                        with contextlib.suppress(trio.BrokenResourceError,
                                                 trio.ClosedResourceError):
                            while True:
                                await trio.sleep(0.1)
                                await stream.send_all(b"X-Slow: yes\r\n")

                    nursery.start_soon(trickle)
                    with contextlib.suppress(trio.BrokenResourceError):
                        while chunk := await stream.receive_some(4096):
                            answer += chunk
                    nursery.cancel_scope.cancel()
            # Closed though bytes kept coming: a trickle that reset the 0.5 s head deadline
            # would keep it open until fail_after(5) ends the test. (The 408 itself may be
            # lost to a reset: the client was still sending.)
            assert answer == b"" or answer.startswith(b"HTTP/1.1 408 ")


async def test_an_idle_keep_alive_connection_is_closed():
    async with open_ingress(limits=ProxyLimits(idle_timeout_s=0.3)) as h, open_client(h.port) as c:
        assert (await c.request()).status == 200
        with trio.fail_after(3):
            assert await c.stream.receive_some(10) == b""


async def test_a_stalled_request_body_is_cut_off():
    async with open_ingress(names=("a",), limits=ProxyLimits(body_timeout_s=0.3)) as h:
        async with open_client(h.port) as c:
            await c.send(h11.Request(method="POST", target="/", headers=[
                ("Host", "x"), ("Content-Length", "10")]), h11.Data(data=b"12345"))
            with trio.fail_after(3):
                assert await c.stream.receive_some(100) == b""
        await eventually(lambda: h.replicas["a"].open == 0, "the upstream side to close too")


async def test_connections_beyond_the_limit_get_503():
    async with open_ingress(limits=ProxyLimits(max_connections=1)) as h, open_client(h.port) as c1:
        assert (await c1.request()).status == 200
        r = await get(h.port)
        assert r.status == 503 and r.headers["retry-after"] == "1"
        assert b"connection limit" in r.body
        assert (await c1.request()).status == 200
        assert h.proxy.stats.refused_connections == 1


async def test_a_replica_that_does_not_answer_is_a_504():
    async with open_ingress(names=("a",), limits=ProxyLimits(upstream_timeout_s=0.3)) as h:
        r = await get(h.port, "/slow")
        assert r.status == 504 and b"no answer within 0.3 s" in r.body


async def test_a_replica_dying_mid_response_cuts_the_client_off():
    async with open_ingress(names=("a",)) as h, open_client(h.port) as c:
        await c.send(h11.Request(method="GET", target="/crash-mid", headers=[("Host", "x")]),
                     h11.EndOfMessage())
        assert isinstance(await c.next_event(), h11.Response)
        assert (await c.next_event()).data == b"0123456789"
        with pytest.raises(h11.RemoteProtocolError):
            await c.next_event()  # the body ends short: the client can tell
        assert h.proxy.stats.aborted == 1


# ---------------------------------------------------------------------------- fuzz


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
async def test_garbage_never_takes_the_ingress_down(garbage):
    async with open_ingress(names=("a",), limits=ProxyLimits(header_timeout_s=0.5)) as h:
        stream = await trio.open_tcp_stream("127.0.0.1", h.port)
        async with stream:
            with trio.fail_after(5):
                try:
                    await stream.send_all(garbage)
                    await stream.send_eof()
                    data = b""
                    while chunk := await stream.receive_some(4096):
                        data += chunk
                except trio.BrokenResourceError:
                    data = b""
        # whatever it was: an HTTP answer or a close, never a hang; and the ingress goes on
        assert data == b"" or data.startswith(b"HTTP/1.1 ")
        assert (await get(h.port)).status == 200


_token = st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=12)
_path = st.lists(st.text("abcXYZ019-._~%!$&'()*+,;=:@", min_size=1, max_size=8),
                 max_size=4).map(lambda parts: "/" + "/".join(parts))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_path, st.dictionaries(_token.map(lambda t: "x-" + t),
                              st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7e),
                                      max_size=30).map(str.strip), max_size=5),
       st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]),
       st.binary(max_size=3000))
async def test_requests_arrive_as_sent(path, headers, method, body):
    async with open_ingress(names=("a",)) as h, open_client(h.port) as c:
        r = await c.request(method, path, headers=list(headers.items()),
                            body=body if method in ("POST", "PUT", "PATCH") else None)
        assert r.status == 200
        doc = r.json()
        assert (doc["method"], doc["target"]) == (method, path)
        sent = h.replicas["a"].requests[-1]
        assert sent["body"] == (body if method in ("POST", "PUT", "PATCH") else b"")
        got = {n.lower(): v for n, v in sent["headers"]}
        for name, value in headers.items():
            assert got[name] == value


# ---------------------------------------------------------------------------- the daemon


def contextlib_suppress_closed():
    return contextlib.suppress(trio_client.ConnectionClosed)


async def test_the_daemon_follows_the_watch_stream_and_reconnects():
    a, b = FakeReplica("a"), FakeReplica("b")
    async with trio.open_nursery() as nursery:
        with trio.fail_after(DEADLINE_S):
            await nursery.start(serve_fake_replica, a)
            await nursery.start(serve_fake_replica, b)
            state = snapshot([a, b])
            channels: list[trio.MemorySendChannel] = []
            connections = [0]

            async def handler(request: wsserver.Request) -> None:
                ws = await request.accept()
                connections[0] += 1
                await ws.send_message(protocol.snapshot_message(connections[0], 0.0, state))
                send, recv = trio.open_memory_channel(100)
                channels.append(send)
                with contextlib_suppress_closed():
                    async with recv:
                        async for event, data in recv:
                            await ws.send_message(protocol.event_message(1, 0.0, event, data))
                    await ws.aclose()

            server = await nursery.start(serve_websocket, handler, "127.0.0.1",
                                         0, None)
            synced = trio.Event()
            shutdown = trio.Event()
            config = IngressConfig(listen=("127.0.0.1", 0), routes=(Route("/", "web"),),
                                   conductor_url=f"ws://127.0.0.1:{server.port}")
            port = await nursery.start(lambda task_status: run_ingress(
                config, shutdown=shutdown, synced=synced, task_status=task_status))
            await synced.wait()
            assert {(await get(port)).headers["x-replica"] for _ in range(4)} == {"a", "b"}

            # a draining event takes b out at once
            await channels[-1].send(("replica.draining", {"app": "web", "replica": "b",
                                                          "node": "n1"}))
            await eventually(lambda: b.open == 0, "b's pooled connection to close")
            assert {(await get(port)).headers["x-replica"] for _ in range(4)} == {"a"}

            # the stream ends: the ingress keeps serving, reconnects, takes the new snapshot
            state = snapshot([b])
            await channels[-1].aclose()
            await eventually(lambda: connections[0] == 2, "a reconnection", timeout_s=8)
            await eventually(lambda: not a.open, "a's connection to be retired")
            assert {(await get(port)).headers["x-replica"] for _ in range(4)} == {"b"}

            # graceful shutdown: the request in flight finishes, new connections are refused
            async with open_client(port) as c:
                await c.send(h11.Request(method="GET", target="/stream",
                                         headers=[("Host", "x")]), h11.EndOfMessage())
                response = await c.next_event()
                assert isinstance(response, h11.Response)
                shutdown.set()
                await trio.testing.wait_all_tasks_blocked()
                with pytest.raises(OSError):
                    await trio.open_tcp_stream("127.0.0.1", port)
                b.release.set()
                body = b""
                while not isinstance(ev := await c.next_event(), h11.EndOfMessage):
                    body += ev.data
                assert body == b"first;last"
                with trio.fail_after(3):  # ... and the connection is closed after it
                    assert await c.stream.receive_some(10) == b""
        nursery.cancel_scope.cancel()
