"""The ingress's connection limits: the pure bookkeeping, then the proxy under MockClock.

The proxy tests serve memory streams (a fake peer address where one matters)
under ``MockClock(autojump_threshold=0)``, so each time limit is asserted at
the exact second it fires. The same limits on real sockets, against a real
``skr8tr ingress`` process, are in test_ingress_limits_e2e.py.
"""

from __future__ import annotations

import logging

import h11
import pytest
import trio
import trio.testing

from skr8tr.ingress.limits import (
    FD_RESERVE,
    AddressSlots,
    LogThrottle,
    ProxyLimits,
    address_key,
    connection_cap,
)
from skr8tr.ingress.pool import Pool, UpstreamConnection
from skr8tr.ingress.proxy import Proxy
from skr8tr.ingress.routes import Backend, BackendTable, Route, RouteTable
from tests.conftest import read_until_closed

DEADLINE_S = 600.0  # on the mock clock: far beyond every limit below
NOT_FOUND = b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n"  # answered by the ingress itself


# ---------------------------------------------------------------------------- pure


@pytest.mark.parametrize(("ip", "key"), [
    ("127.0.0.1", "127.0.0.1"),
    ("10.1.2.3", "10.1.2.3"),
    ("::ffff:10.1.2.3", "10.1.2.3"),  # IPv4 on a dual-stack socket counts as IPv4
    ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
    ("2001:db8:1:2::9", "2001:db8:1:2::/64"),  # same /64, same count
    ("2001:db8:1:3::9", "2001:db8:1:3::/64"),
    ("fe80::1%eth0", "fe80::/64"),
    ("::1", "::/64"),
    ("unknown", "unknown"),
])
def test_address_key(ip, key):
    assert address_key(ip) == key


def test_address_slots_count_per_key_and_forget_at_zero():
    slots = AddressSlots(limit=2)
    assert [slots.acquire("a") for _ in range(3)] == [True, True, False]
    assert slots.acquire("b")
    assert slots.open == {"a": 2, "b": 1}
    slots.release("a")
    assert slots.acquire("a") and not slots.acquire("a")
    for key in ("a", "a", "b"):
        slots.release(key)
    assert slots.open == {}
    slots.release("never-seen")  # a stray release does not go negative
    assert slots.open == {} and slots.acquire("never-seen")


@pytest.mark.parametrize(("requested", "soft", "cap"), [
    (1024, None, 1024),  # no limit
    (1024, 1_048_576, 1024),
    (1024, 20_000, 1024),
    (1024, 1024, (1024 - FD_RESERVE) // 3),
    (1024, 160, (160 - FD_RESERVE) // 3),
    (10, 1024, 10),
    (1024, FD_RESERVE, 1),  # never zero
    (1024, 3, 1),
])
def test_connection_cap_fits_three_descriptors_per_client(requested, soft, cap):
    assert connection_cap(requested, soft) == cap
    if soft is not None and cap > 1:
        assert 3 * cap + FD_RESERVE <= soft


def test_log_throttle_one_line_per_reason_per_interval_with_the_count():
    throttle = LogThrottle(interval_s=10.0)
    assert throttle.note("cap", 0.0) == 1  # the first one is told at once
    assert [throttle.note("cap", t) for t in (1.0, 2.0, 9.9)] == [0, 0, 0]
    assert throttle.note("timeout", 5.0) == 1  # reasons are apart
    assert throttle.note("cap", 10.0) == 4  # the three kept quiet and this one
    assert throttle.note("cap", 19.9) == 0
    assert throttle.note("cap", 20.0) == 2
    assert throttle.note("timeout", 100.0) == 1


def test_log_throttle_flush_tells_the_tail_of_a_burst():
    throttle = LogThrottle(interval_s=10.0)
    assert throttle.flush(0.0) == {}
    assert throttle.note("cap", 0.0) == 1
    assert throttle.flush(50.0) == {}  # nothing kept quiet: nothing to tell
    assert throttle.note("cap", 50.0) == 1
    assert [throttle.note("cap", t) for t in (51.0, 52.0)] == [0, 0]
    assert throttle.note("timeout", 53.0) == 1
    assert throttle.flush(59.9) == {}  # not due yet
    assert throttle.flush(60.0) == {"cap": 2}
    assert throttle.flush(100.0) == {}
    assert throttle.note("cap", 65.0) == 0  # the flush started the interval again
    assert throttle.flush(70.0) == {"cap": 1}


# ---------------------------------------------------------------------------- the pool


def _done_connection(backend: Backend) -> tuple[UpstreamConnection, trio.socket.SocketType]:
    """A connection to ``backend`` whose exchange ended cleanly (both h11 sides DONE)."""
    ours, theirs = trio.socket.socketpair()
    uc = UpstreamConnection(backend, trio.SocketStream(ours))
    uc.h11.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
    uc.h11.send(h11.EndOfMessage())
    uc.h11.receive_data(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
    assert isinstance(uc.h11.next_event(), h11.Response)
    assert isinstance(uc.h11.next_event(), h11.EndOfMessage)
    return uc, theirs


async def test_the_pool_keeps_at_most_max_idle_in_all():
    backends = [Backend(f"web-{i}", "web", "127.0.0.1", 20000 + i, 1) for i in range(3)]
    pool = Pool(lambda key: True, max_idle=2)
    pairs = [_done_connection(b) for b in backends]
    try:
        for uc, _ in pairs:
            pool.release(uc)
        assert pool.idle_count() == 2
        assert [pool.idle_count(b.key) for b in backends] == [1, 1, 0]
        assert pairs[2][0].stream.socket.fileno() == -1  # over max_idle: closed, not kept
        pool.retire([backends[0]])
        assert pool.idle_count() == 1
        again = await pool.connect(backends[1])  # taken from the pool: no connect
        assert again is pairs[1][0] and pool.idle_count() == 0 and pool.opened == 0
        pairs.append(_done_connection(backends[2]))
        pool.release(pairs[-1][0])
        assert pool.idle_count() == 1
        assert pool.sweep(trio.current_time() + pool.idle_timeout_s) == 1
        assert pool.idle_count() == 0
    finally:
        pool.close_all()
        for uc, theirs in pairs:
            uc.close()
            theirs.close()


# ---------------------------------------------------------------------------- the proxy


class _FakeSocket:
    def __init__(self, ip: str) -> None:
        self.ip = ip

    def getpeername(self) -> tuple[str, int]:
        return (self.ip, 40000)


def _connection(ip: str | None = None) -> tuple[trio.StapledStream, trio.StapledStream]:
    """(client, server) memory streams; the server side reports peer ``ip`` if given."""
    client, server = trio.testing.memory_stream_pair()
    if ip is not None:
        server.socket = _FakeSocket(ip)
    return client, server


def _proxy(**limits) -> Proxy:
    table = BackendTable()
    return Proxy(RouteTable([Route("/web", "web")]), table, Pool(table.is_routable),
                 ProxyLimits(**limits))


async def test_a_silent_first_connection_closes_at_the_header_timeout_not_the_idle_one(
        autojump_clock):
    proxy = _proxy(header_timeout_s=10.0, idle_timeout_s=30.0)
    client, server = _connection()
    with trio.fail_after(DEADLINE_S):
        async with trio.open_nursery() as nursery:
            t0 = trio.current_time()
            nursery.start_soon(proxy.serve_connection, server)
            assert await read_until_closed(client) == b""  # closed without a word
            assert trio.current_time() - t0 == 10.0
    assert proxy.stats.head_timeouts == 1 and proxy.active == 0 and proxy.slots.open == {}


async def test_a_trickled_first_head_is_cut_at_the_header_timeout_from_accept(
        autojump_clock):
    proxy = _proxy(header_timeout_s=10.0, idle_timeout_s=30.0)
    client, server = _connection()
    answered_at = None
    with trio.fail_after(DEADLINE_S):
        async with trio.open_nursery() as nursery:
            t0 = trio.current_time()
            nursery.start_soon(proxy.serve_connection, server)

            async def trickle() -> None:  # the first byte at 3 s, then a line a second
                await trio.sleep(3.0)
                await client.send_all(b"GET /web HTTP/1.1\r\n")
                while True:
                    await trio.sleep(1.0)
                    await client.send_all(b"X-Slow: yes\r\n")

            nursery.start_soon(trickle)
            answer = await client.receive_some(65536)
            answered_at = trio.current_time() - t0
            nursery.cancel_scope.cancel()
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert answered_at == 10.0  # from accept: 3 s earlier than from the first byte
    assert proxy.stats.head_timeouts == 1


async def test_keep_alive_idle_is_its_own_timeout(autojump_clock):
    proxy = _proxy(header_timeout_s=10.0, idle_timeout_s=30.0)
    client, server = _connection()
    with trio.fail_after(DEADLINE_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(proxy.serve_connection, server)
            await client.send_all(NOT_FOUND)
            assert (await client.receive_some(65536)).startswith(b"HTTP/1.1 404 ")
            t0 = trio.current_time()
            # Idle past the header timeout: a kept-alive connection is still served ...
            await trio.sleep(25.0)
            await client.send_all(NOT_FOUND)
            assert (await client.receive_some(65536)).startswith(b"HTTP/1.1 404 ")
            assert trio.current_time() - t0 == 25.0
            # ... and closed after the idle timeout with nothing more to say.
            t1 = trio.current_time()
            assert await read_until_closed(client) == b""
            assert trio.current_time() - t1 == 30.0
    assert proxy.stats.head_timeouts == 0 and proxy.stats.statuses[404] == 2


async def test_a_later_head_must_complete_within_the_header_timeout_of_its_first_byte(
        autojump_clock):
    proxy = _proxy(header_timeout_s=10.0, idle_timeout_s=30.0)
    client, server = _connection()
    with trio.fail_after(DEADLINE_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(proxy.serve_connection, server)
            await client.send_all(NOT_FOUND)
            assert (await client.receive_some(65536)).startswith(b"HTTP/1.1 404 ")
            await trio.sleep(25.0)
            t0 = trio.current_time()
            await client.send_all(b"GET /web HTTP/1.1\r\n")  # ... and nothing more
            answer = await client.receive_some(65536)
            assert trio.current_time() - t0 == 10.0  # past the idle timeout's 30 s
            nursery.cancel_scope.cancel()
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert proxy.stats.head_timeouts == 0  # that count is for first requests


async def test_one_address_over_its_cap_gets_503_and_others_are_served(autojump_clock,
                                                                        caplog):
    caplog.set_level(logging.INFO, logger="skr8tr.ingress")
    proxy = _proxy(max_connections=10, max_connections_per_address=3,
                   header_timeout_s=10.0)
    with trio.fail_after(DEADLINE_S):
        async with trio.open_nursery() as nursery:
            await nursery.start(proxy.run_limit_logs)
            silent = []
            for _ in range(3):
                client, server = _connection("127.0.0.1")
                nursery.start_soon(proxy.serve_connection, server)
                silent.append(client)
            await trio.testing.wait_all_tasks_blocked()
            assert proxy.slots.open == {"127.0.0.1": 3}
            for _ in range(20):  # over the cap: answered and closed at once
                client, server = _connection("127.0.0.1")
                t0 = trio.current_time()
                nursery.start_soon(proxy.serve_connection, server)
                answer = await read_until_closed(client)
                assert trio.current_time() == t0
                assert answer.startswith(b"HTTP/1.1 503 ")
                assert b"connection: close" in answer
                assert b"too many connections from your address" in answer
            # another address is served meanwhile
            client, server = _connection("127.0.0.2")
            nursery.start_soon(proxy.serve_connection, server)
            await client.send_all(NOT_FOUND)
            assert (await client.receive_some(65536)).startswith(b"HTTP/1.1 404 ")
            await client.aclose()
            # the silent three are closed by the header timeout, and their slots are free
            for c in silent:
                assert await read_until_closed(c) == b""
            await trio.testing.wait_all_tasks_blocked()
            assert proxy.slots.open == {} and proxy.active == 0
            await trio.sleep(60.0)  # long enough for every line to be due
            nursery.cancel_scope.cancel()
    assert proxy.stats.refused_per_address == 20 and proxy.stats.refused_connections == 0
    assert proxy.stats.head_timeouts == 3
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    # 20 refusals at one instant: the first at once, the other 19 in one line later
    assert refusals == [f"refused {n} connection(s) over --max-connections-per-address 3; "
                        "the latest from 127.0.0.1" for n in (1, 19)]
    timeouts = [r.getMessage() for r in caplog.records if "no whole request head" in
                r.getMessage()]
    assert [m.split(" that")[0] for m in timeouts] == ["closed 1 connection(s)",
                                                        "closed 2 connection(s)"]


async def test_the_total_cap_refuses_every_address_and_frees_its_slot(autojump_clock):
    proxy = _proxy(max_connections=2, max_connections_per_address=5)
    with trio.fail_after(DEADLINE_S):
        async with trio.open_nursery() as nursery:
            held = []
            for ip in ("127.0.0.1", "127.0.0.2"):
                client, server = _connection(ip)
                nursery.start_soon(proxy.serve_connection, server)
                held.append(client)
            await trio.testing.wait_all_tasks_blocked()
            client, server = _connection("127.0.0.3")
            nursery.start_soon(proxy.serve_connection, server)
            answer = await read_until_closed(client)
            assert answer.startswith(b"HTTP/1.1 503 ") and b"connection limit" in answer
            # refused at the total cap: no per-address slot is left taken
            assert proxy.slots.open == {"127.0.0.1": 1, "127.0.0.2": 1}
            await held[0].aclose()
            await trio.testing.wait_all_tasks_blocked()
            client, server = _connection("127.0.0.3")
            nursery.start_soon(proxy.serve_connection, server)
            await client.send_all(NOT_FOUND)
            assert (await client.receive_some(65536)).startswith(b"HTTP/1.1 404 ")
            nursery.cancel_scope.cancel()
    assert proxy.stats.refused_connections == 1 and proxy.stats.refused_per_address == 0
