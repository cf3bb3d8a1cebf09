"""What the ingress counts of each replica (skr8tr/ingress/traffic.py), on real sockets.

Small h11 replicas in the test answer what their path says (``/status/503``,
``/sleep/120``, ``/hangup`` closes before a head, ``/crash-mid`` dies after
one); a refused port stands for a replica that cannot be connected to. The
real Proxy routes to them with a TrafficCounter; every count is asserted
exactly against what the client saw. The counter's bounds are a unit test.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import h11
import pytest
import trio

from skr8tr.core.traffic import BOUNDS_MS, Counts, bucket_of
from skr8tr.ingress.limits import ProxyLimits
from skr8tr.ingress.pool import Pool
from skr8tr.ingress.proxy import Proxy
from skr8tr.ingress.routes import BackendTable, Route, RouteTable
from skr8tr.ingress.traffic import TrafficCounter
from tests.conftest import free_port
from tests.test_ingress_proxy import get, next_h11_event, open_client

DEADLINE_S = 20.0


async def serve_replica(name: str, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """An HTTP replica answering by path: ``/status/N`` N, ``/sleep/MS`` 200 after MS ms,
    ``/hangup`` no answer (the connection closed), ``/crash-mid`` a 200 head and part of
    its body, then closed; anything else 200. Every answer says ``x-replica: name``."""

    async def handle(stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                req = await next_h11_event(conn, stream)
                if not isinstance(req, h11.Request):
                    return
                event = await next_h11_event(conn, stream)
                while not isinstance(event, h11.EndOfMessage):  # a body is skipped
                    event = await next_h11_event(conn, stream)
                target = req.target.decode()
                status, body = 200, name.encode()
                if target == "/hangup":
                    return
                if target.startswith("/status/"):
                    status = int(target.rsplit("/", 1)[1])
                elif target.startswith("/sleep/"):
                    await trio.sleep(int(target.rsplit("/", 1)[1]) / 1000)
                length = 100 if target == "/crash-mid" else len(body)
                data = conn.send(h11.Response(status_code=status, headers=[
                    ("x-replica", name), ("content-length", str(length))]))
                data += conn.send(h11.Data(data=body))
                await stream.send_all(data)
                if target == "/crash-mid":
                    return
                await stream.send_all(conn.send(h11.EndOfMessage()))
                conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            return
        finally:
            await stream.aclose()

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(handle, listeners)


@dataclass
class Rig:
    port: int
    proxy: Proxy
    counter: TrafficCounter


@asynccontextmanager
async def open_rig(live: tuple[str, ...] = ("a", "b"), dead: tuple[str, ...] = (), *,
                   limits: ProxyLimits | None = None,
                   routes: tuple[Route, ...] = (Route("/", "web"),)) -> AsyncIterator[Rig]:
    with trio.fail_after(DEADLINE_S):
        async with trio.open_nursery() as nursery:
            ports = {name: await nursery.start(serve_replica, name) for name in live}
            ports.update({name: free_port() for name in dead})  # refused: nothing listens
            table = BackendTable()
            table.apply_snapshot({"nodes": [{"node": "n1", "address": "127.0.0.1"}],
                                  "replicas": [{"app": "web", "replica": name, "node": "n1",
                                                "port": port, "generation": 1, "pid": 1,
                                                "state": "ready"}
                                               for name, port in sorted(ports.items())]})
            counter = TrafficCounter()
            proxy = Proxy(RouteTable(routes), table, Pool(table.is_routable,
                                                          connect_timeout_s=1.0),
                          limits or ProxyLimits(), traffic=counter)
            listeners = await nursery.start(functools.partial(
                trio.serve_tcp, proxy.serve_connection, 0, host="127.0.0.1"))
            yield Rig(listeners[0].socket.getsockname()[1], proxy, counter)
            nursery.cancel_scope.cancel()


def figures(counts: dict[str, Counts]) -> dict[str, tuple[int, int, int, int]]:
    """replica -> (requests, 5xx, failed, answers in the histogram)."""
    return {rid: (c.requests, c.errors, c.failed, sum(c.latency.values()))
            for rid, c in counts.items()}


# ---------------------------------------------------------------------------- the rules


async def test_every_answer_counts_for_the_replica_that_gave_it():
    paths = ["/", "/status/500", "/status/503", "/status/404", "/status/502", "/",
             "/status/201", "/status/599", "/", "/status/500"] * 3
    async with open_rig() as rig, open_client(rig.port) as c:
        seen: Counter[tuple[str, bool]] = Counter()
        for path in paths:
            reply = await c.request("GET", path)
            assert reply.status == (int(path.rsplit("/", 1)[1]) if "status" in path else 200)
            seen[(reply.headers["x-replica"], reply.status >= 500)] += 1
        got = figures(rig.counter.take())
    expected = {rid: (seen[(rid, False)] + seen[(rid, True)], seen[(rid, True)], 0,
                      seen[(rid, False)] + seen[(rid, True)]) for rid in ("a", "b")}
    assert got == expected
    assert sum(n for n, *_ in got.values()) == len(paths)
    assert sum(e for _, e, *_ in got.values()) == 15  # 500, 503, 502, 599, 500 in 10


async def test_a_connect_failure_counts_for_that_replica_and_the_retry_for_the_next():
    async with open_rig(("b",), ("a-dead",)) as rig:
        for method in ("GET", "POST"):  # any method: nothing reached a-dead
            async with open_client(rig.port) as c:
                r = await c.request(method, "/", body=b"x" if method == "POST" else None)
            assert r.status == 200 and r.headers["x-replica"] == "b"
        # round robin by pick: a-dead, then b (the retry), a-dead, b: each request
        # tried a-dead first
        got = figures(rig.counter.take())
        assert got == {"a-dead": (2, 0, 2, 0), "b": (2, 0, 0, 2)}
        assert rig.proxy.stats.retries == 2


async def test_without_retries_the_failed_connect_is_counted_and_the_502_is_not_a_reply():
    async with open_rig((), ("a-dead",), limits=ProxyLimits(retries=0)) as rig:
        assert (await get(rig.port)).status == 502
        assert figures(rig.counter.take()) == {"a-dead": (1, 0, 1, 0)}


async def test_a_failure_before_the_response_head_is_failed_on_every_replica_tried():
    async with open_rig(("a", "b")) as rig:
        async with open_client(rig.port) as c:  # not retried: POST with a body
            assert (await c.request("POST", "/hangup", body=b"x")).status == 502
        assert figures(rig.counter.take()) == {"a": (1, 0, 1, 0)}
        # GET is retried, never on a replica already tried: one on each, both hang up
        assert (await get(rig.port, "/hangup")).status == 502
        assert figures(rig.counter.take()) == {"a": (1, 0, 1, 0), "b": (1, 0, 1, 0)}


async def test_a_replica_that_times_out_is_failed():
    async with open_rig(("a",), limits=ProxyLimits(upstream_timeout_s=0.2)) as rig:
        assert (await get(rig.port, "/sleep/3000")).status == 504
        assert figures(rig.counter.take()) == {"a": (1, 0, 1, 0)}


async def test_a_response_cut_off_after_its_head_counts_with_its_status():
    async with open_rig(("a",)) as rig:
        with pytest.raises((h11.RemoteProtocolError, trio.BrokenResourceError)):
            await get(rig.port, "/crash-mid")
        assert figures(rig.counter.take()) == {"a": (1, 0, 0, 1)}
        assert rig.proxy.stats.aborted == 1


async def test_the_ingress_own_answers_count_for_no_replica():
    routes = (Route("/web", "web"), Route("/api", "api"))
    async with open_rig(("a",), routes=routes) as rig:
        assert (await get(rig.port, "/nowhere")).status == 404
        assert (await get(rig.port, "/api/x")).status == 503  # no replica of api
        async with open_client(rig.port) as c:
            assert (await c.request("CONNECT", "/web")).status == 501
        assert rig.counter.take() == {}
        assert (await get(rig.port, "/web")).status == 200
        assert figures(rig.counter.take()) == {"a": (1, 0, 0, 1)}


async def test_latency_runs_from_the_attempt_to_the_response_head():
    async with open_rig(("a",)) as rig:
        assert (await get(rig.port, "/sleep/120")).status == 200
        counts = rig.counter.take()["a"]
        [(bucket, n)] = counts.latency.items()
        assert n == 1
        assert BOUNDS_MS[bucket] >= 120  # at least the replica's own 120 ms
        assert BOUNDS_MS[bucket - 1] < 2000  # and nothing like a timeout
        assert 120 <= counts.p99_ms <= BOUNDS_MS[bucket]


async def test_take_starts_a_new_interval():
    async with open_rig(("a",)) as rig:
        for _ in range(3):
            await get(rig.port)
        assert figures(rig.counter.take()) == {"a": (3, 0, 0, 3)}
        assert rig.counter.take() == {}
        await get(rig.port, "/status/503")
        assert figures(rig.counter.take()) == {"a": (1, 1, 0, 1)}


# ---------------------------------------------------------------------------- bounds


def test_the_counter_holds_at_most_max_replicas_and_only_ids_a_report_can_carry():
    counter = TrafficCounter(max_replicas=2)
    counter.answered("a", 200, 0.0, 0.001)
    counter.failed("b")
    counter.answered("c", 200, 0.0, 0.001)  # a third replica: not counted
    counter.failed("a")
    counter.failed("x" * 129)
    assert figures(counter.take()) == {"a": (2, 0, 1, 1), "b": (1, 0, 1, 0)}
    assert counter.skipped == 2
    counter.answered("x" * 128, 500, 0.0, 0.001)  # the longest id a report may carry
    assert figures(counter.take()) == {"x" * 128: (1, 1, 0, 1)}


@pytest.mark.parametrize("ms", [0.0, 0.05, 0.1, 0.1000001, 0.12, 1.0, 99.9, 100.0, 250.0,
                                250.0001, 812.3, 100000.0, 100000.1, 1e9])
def test_an_answer_lands_in_the_bucket_core_traffic_says(ms):
    counter = TrafficCounter()
    counter.answered("a", 503, 5.0, 5.0 + ms / 1000.0)
    expected = Counts()
    expected.record(503, (5.0 + ms / 1000.0 - 5.0) * 1000.0)
    assert counter.take() == {"a": expected}
    assert list(expected.latency) == [bucket_of((5.0 + ms / 1000.0 - 5.0) * 1000.0)]
