"""Fuzz the HTTP request path of the status page and of the ingress: 10,000 examples each.

Each example is a byte string a client might send: near-valid requests
(methods, targets, versions, headers, bodies, pipelining, bare LF) and plain
random bytes. It is fed to the real connection handler over an in-memory
stream whose sending side is then closed: the conductor's
:func:`skr8tr.conductor.http.handle_connection` with its real status routes,
and the ingress's :meth:`Proxy.serve_connection` with a route to a live
upstream. The handler must neither raise nor hang, and whatever it answers
must be HTTP/1.1 responses with a status it means (never a 500 of its own;
421 for a ``Host`` that is not the conductor's). Every 10th example also goes
to a real conductor over a loopback socket. After each batch both still
answer ``/healthz`` (the ingress: a proxied GET).
"""

from __future__ import annotations

import contextlib
import re
import time
from functools import partial

import h11
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from skr8tr.conductor import api as api_mod
from skr8tr.conductor.authority import Authority
from skr8tr.conductor.cluster import Cluster
from skr8tr.conductor.http import handle_connection
from skr8tr.conductor.limits import ClosedCounter, Limits
from skr8tr.conductor.origins import HostPolicy
from skr8tr.conductor.status_http import StatusSite
from skr8tr.core.keys import parse_authorized_keys
from skr8tr.ingress.limits import ProxyLimits
from skr8tr.ingress.pool import Pool
from skr8tr.ingress.proxy import Proxy
from skr8tr.ingress.routes import BackendTable, RouteTable, parse_route
from tests.conftest import read_until_closed
from tests.security_helpers import open_conductor

EXAMPLES = 10_000
BATCH = 1_000
SOCKET_EVERY = 10
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))
EXCHANGE_S = 10.0

METHODS = [b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"CONNECT", b"TRACE",
           b"get", b"G ET", b"", b"\x00", b"PATCH" * 20]
TARGETS = [b"/", b"/healthz", b"/api/state", b"/api/config", b"/api/events", b"/metrics",
           b"/static/app.js", b"/static/../../etc/passwd", b"/static/", b"/index.html",
           b"/app/x", b"/app", b"/other", b"*", b"http://evil/x", b"//x", b"/%00", b"/?a=b",
           b"/\xff", b"/" + b"a" * 5000, b"", b"/ /"]
VERSIONS = [b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1", b"", b"http/1.1"]
HEADERS = [b"Host: 127.0.0.1", b"Host: x", b"Host:", b"Host: localhost:7780",
           b"Connection: close", b"Connection: keep-alive",
           b"Content-Length: 5", b"Content-Length: -1", b"Content-Length: 99999999999",
           b"Content-Length: 3, 4", b"Transfer-Encoding: chunked", b"Transfer-Encoding: gzip",
           b"Expect: 100-continue", b"Upgrade: websocket", b"X-Forwarded-For: 1.2.3.4",
           b"bad header", b" Host: folded", b"X: \x00", b"X-Long: " + b"v" * 20000,
           b"Te: trailers", b": empty"]
BODIES = [b"", b"hello", b"5\r\nhello\r\n0\r\n\r\n", b"zz\r\n", b"0\r\n\r\n", b"x" * 70000]


@st.composite
def requests(draw) -> bytes:
    if not draw(st.integers(0, 4)):
        return draw(st.binary(max_size=300))
    out = b""
    for _ in range(draw(st.integers(1, 3))):
        if draw(st.booleans()):  # a plain, valid request (with a valid target or not)
            method = draw(st.sampled_from([b"GET", b"GET", b"HEAD"]))
            target = draw(st.sampled_from(TARGETS[:12]))
            out += method + b" " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
            continue
        eol = draw(st.sampled_from([b"\r\n", b"\r\n", b"\n"]))
        line = b" ".join([draw(st.sampled_from(METHODS)), draw(st.sampled_from(TARGETS)),
                          draw(st.sampled_from(VERSIONS))])
        headers = draw(st.lists(st.sampled_from(HEADERS), max_size=4))
        out += eol.join([line, *headers]) + eol + eol + draw(st.sampled_from(BODIES))
    if not draw(st.integers(0, 5)):
        out = out[:draw(st.integers(0, len(out)))]  # cut short anywhere
    return out


def collect() -> list[bytes]:
    examples = []

    @FUZZ
    @given(requests())
    def fuzz(data):
        examples.append(data)

    fuzz()
    return examples


async def exchange(serve, data: bytes) -> bytes:
    """Feed *data* to ``serve(stream)`` over memory streams, close our side, read all."""
    client, server = trio.testing.memory_stream_pair()
    answer = b""
    with trio.fail_after(EXCHANGE_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve, server)
            with contextlib.suppress(trio.BrokenResourceError):  # it closed first: fine
                await client.send_all(data)
            await client.send_stream.aclose()
            answer = await read_until_closed(client)
    return answer


STATUS_LINE = re.compile(rb"(?:^|\n)HTTP/1\.1 ([1-5][0-9][0-9]) [ -~]*\r\n")


def statuses(answer: bytes) -> list[int]:
    """The status codes of the responses in *answer*, which must start with one.

    (Status lines are found by pattern: a HEAD answer has no body, so a real
    HTTP parser would need to know which request each response answers.)
    """
    assert answer.startswith(b"HTTP/1.1 "), answer[:200]
    codes = [int(code) for code in STATUS_LINE.findall(answer)]
    assert codes, answer[:200]
    return codes


# ---------------------------------------------------------------------- the status page


def status_site() -> tuple[StatusSite, ClosedCounter]:
    cluster = Cluster(node_timeout_s=5.0, port_range=(20000, 20100))
    authority = Authority(parse_authorized_keys(""))
    closed = ClosedCounter()
    cli = api_mod.CliApi(cluster, authority, time.time, closed=closed)
    return StatusSite(cluster, cli, listen=("127.0.0.1", 7771)), closed


async def over_socket(port: int, data: bytes) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    answer = b""
    with trio.fail_after(EXCHANGE_S):
        async with stream:
            try:
                await stream.send_all(data)
                await stream.send_eof()
            except trio.BrokenResourceError:
                return answer  # it hung up on our request: no answer to read
            answer = await read_until_closed(stream)
    return answer


async def test_status_page_request_path(tmp_path):
    site, closed = status_site()
    limits = Limits()
    policy = HostPolicy()

    async def serve(stream):
        await handle_connection(stream, site, limits, closed, policy.check_host)

    examples = await trio.to_thread.run_sync(collect)
    assert len(examples) >= EXAMPLES
    seen: dict[int, int] = {}
    async with open_conductor(tmp_path) as c:
        for start in range(0, len(examples), BATCH):
            for i, data in enumerate(examples[start:start + BATCH], start=start):
                answer = await exchange(serve, data)
                if answer:
                    for code in statuses(answer):
                        assert code in (200, 400, 404, 405, 413, 421, 431, 501, 505), (
                            data, answer)
                        seen[code] = seen.get(code, 0) + 1
                if i % SOCKET_EVERY == 0:
                    real = await over_socket(c.http_port, data)
                    assert not real or all(code != 500 for code in statuses(real)), (data, real)
            ok = await exchange(serve, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert ok.startswith(b"HTTP/1.1 200 ") and ok.endswith(b"ok\n")
            real = await over_socket(c.http_port,
                                     b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert real.endswith(b"ok\n")
    assert seen.get(200, 0) > 100 and seen.get(400, 0) > 100 and seen.get(421, 0) > 10, seen


# ---------------------------------------------------------------------- the ingress


async def serve_upstream(stream: trio.SocketStream) -> None:
    """A replica: answers every request 200 with the target it got."""
    with contextlib.suppress(h11.ProtocolError, trio.BrokenResourceError):
        await _upstream(stream)


async def _upstream(stream: trio.SocketStream) -> None:
    conn = h11.Connection(h11.SERVER)
    async with stream:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                try:
                    data = await stream.receive_some(65536)
                except trio.BrokenResourceError:
                    return
                conn.receive_data(data)
            elif isinstance(event, h11.Request):
                target, head = event.target, event.method == b"HEAD"
            elif isinstance(event, h11.EndOfMessage):
                body = b"upstream saw " + target + b"\n"
                data = conn.send(h11.Response(status_code=200, headers=[
                    ("Content-Length", str(len(body)))]))
                if not head:
                    data += conn.send(h11.Data(data=body))
                await stream.send_all(data + conn.send(h11.EndOfMessage()))
                if conn.our_state is not h11.DONE:
                    return
                conn.start_next_cycle()
            elif isinstance(event, h11.ConnectionClosed):
                return


async def test_ingress_request_path():
    examples = await trio.to_thread.run_sync(collect)
    seen: dict[int, int] = {}
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, serve_upstream, 0,
                                                host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        table = BackendTable()
        table.apply_snapshot({"nodes": [{"node": "n1", "address": "127.0.0.1"}],
                              "replicas": [{"app": "web", "replica": "web-1", "node": "n1",
                                            "port": port, "state": "ready", "generation": 1,
                                            "pid": 1}], "apps": [], "rollouts": []})
        pool = Pool(table.is_routable, connect_timeout_s=2.0)
        limits = ProxyLimits(header_timeout_s=2.0, idle_timeout_s=2.0, body_timeout_s=2.0,
                               upstream_timeout_s=5.0)
        proxy = Proxy(RouteTable([parse_route("/app:web"), parse_route("/healthz:web")]),
                      table, pool, limits)
        await nursery.start(pool.run_sweeper)
        for start in range(0, len(examples), BATCH):
            for data in examples[start:start + BATCH]:
                answer = await exchange(proxy.serve_connection, data)
                if answer:
                    for code in statuses(answer):
                        assert code in (100, 200, 400, 404, 405, 408, 413, 414, 431, 501, 502,
                                        503, 505), (data, answer)
                        seen[code] = seen.get(code, 0) + 1
            ok = await exchange(proxy.serve_connection,
                                b"GET /app/ping HTTP/1.1\r\nHost: x\r\n\r\n")
            assert ok.startswith(b"HTTP/1.1 200 ") and ok.endswith(b"upstream saw /app/ping\n")
        assert proxy.active == 0
        nursery.cancel_scope.cancel()
    assert seen.get(200, 0) > 100 and seen.get(404, 0) > 100 and seen.get(400, 0) > 100, seen
