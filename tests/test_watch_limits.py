"""What one watcher (``/v1/watch``) may cost, and the accept loop under a descriptor shortage.

The keep-alive runs against a real conductor in this test's trio run; the
pure parts (caps fitted to descriptors, the gate, the quiet log, the byte
bound of a subscription, the shared snapshot, the shared frames) and the
accept loop's back-off are tested on their own.
"""

from __future__ import annotations

import errno
import json
import logging
from pathlib import Path

import pytest
import trio
from wsproto.connection import Connection, ConnectionType
from wsproto.events import TextMessage

from skr8tr.conductor import accept, watch
from skr8tr.conductor.accept import Admission, serve_accepting
from skr8tr.conductor.cluster import Cluster
from skr8tr.conductor.events import EventBus
from skr8tr.conductor.limits import (
    FD_RESERVE,
    AddressSlots,
    ClosedCounter,
    ConnectionGate,
    Limits,
    LogThrottle,
    fit_to_descriptors,
)
from skr8tr.core import protocol
from skr8tr.ws import frames as wsclient
from skr8tr.ws import trio_client
from skr8tr.ws.server import frame_text
from tests.security_helpers import closed_count, open_conductor, scrape

DEADLINE_S = 30

# ---------------------------------------------------------------------- caps and descriptors


@pytest.mark.parametrize("given, soft, total, per_address, lowered", [
    (Limits(), 256, 256 - FD_RESERVE, (256 - FD_RESERVE) // 2, ["per-address"]),
    (Limits(), 20000, 20000 - FD_RESERVE, 2048, []),
    (Limits(), None, 65536, 2048, []),
    (Limits(max_connections=100), 20000, 100, 50, ["per-address"]),
    (Limits(max_connections=10**6, max_connections_per_address=3), 1024, 1024 - FD_RESERVE, 3,
     ["max-connections"]),
    (Limits(), 10, 2, 1, ["per-address"]),  # almost nothing left: still one per listener
])
def test_caps_are_fitted_below_the_open_file_limit(given, soft, total, per_address, lowered):
    fitted, notes = fit_to_descriptors(given, soft)
    assert (fitted.max_connections, fitted.max_connections_per_address) == (total, per_address)
    assert len(notes) == len(lowered)
    for note, what in zip(notes, lowered, strict=True):
        assert f"--{what}" in note.replace("max-connections-per-address", "per-address")


def test_the_gate_counts_all_listeners_and_each_address():
    gate = ConnectionGate(limit=3)
    api, web = AddressSlots(2), AddressSlots(2)
    assert gate.admit(api, "a") is None and gate.admit(api, "a") is None
    assert gate.admit(api, "a") == "too_many_connections"
    assert gate.admit(web, "a") is None
    assert gate.admit(web, "b") == "max_connections"
    assert gate.open == 3
    gate.release(api, "a")
    assert gate.admit(web, "b") is None and gate.open == 3


def test_the_log_throttle_reports_the_count_kept_quiet():
    throttle = LogThrottle(interval_s=10)
    assert throttle.note("x", 0.0) == 1
    assert [throttle.note("x", t) for t in (1.0, 2.0, 9.9)] == [0, 0, 0]
    assert throttle.note("y", 5.0) == 1, "each reason has its own line"
    assert throttle.note("x", 10.0) == 4


# ---------------------------------------------------------------------- accept under EMFILE


class ShortOfDescriptors:
    """A listener whose first *failures* accepts fail with EMFILE, then real ones."""

    def __init__(self, real: trio.SocketListener, failures: int) -> None:
        self.real = real
        self.failures = failures

    async def accept(self) -> trio.SocketStream:
        await trio.lowlevel.checkpoint()
        if self.failures:
            self.failures -= 1
            raise OSError(errno.EMFILE, "Too many open files")
        return await self.real.accept()

    async def aclose(self) -> None:
        await self.real.aclose()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc_info):
        await self.aclose()


async def test_accept_backs_off_on_emfile_without_a_traceback_and_goes_on(caplog, monkeypatch):
    caplog.set_level(logging.DEBUG, logger="skr8tr.conductor")
    # The back-off's length is not the point here (its doubling is capped at 1 s).
    monkeypatch.setattr(accept, "ACCEPT_BACKOFF_S", 0.001)
    monkeypatch.setattr(accept, "ACCEPT_BACKOFF_MAX_S", 0.01)
    served = trio.Event()

    async def handler(stream: trio.SocketStream, address: str) -> None:
        assert address == "127.0.0.1"
        await stream.send_all(b"served")
        served.set()

    [real] = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = real.socket.getsockname()[1]
    admission = Admission(ConnectionGate(10), ClosedCounter())
    with trio.fail_after(DEADLINE_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_accepting, ShortOfDescriptors(real, 40), handler,
                               admission, AddressSlots(10), "API")
            client = await trio.open_tcp_stream("127.0.0.1", port)
            assert await client.receive_some(100) == b"served"
            await served.wait()
            await client.aclose()
            nursery.cancel_scope.cancel()
    assert admission.accept_errors == 40
    lines = [r for r in caplog.records if "accept failed" in r.getMessage()]
    assert len(lines) == 1, "one line per LOG_EVERY_S, not one per failure"
    assert all(r.exc_info is None for r in caplog.records), "no traceback"
    assert "EMFILE" in lines[0].getMessage()


# ---------------------------------------------------------------------- watch queue and frames


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 200_000])
def test_shared_frames_are_what_wsproto_would_send(size):
    text = "x" * size
    assert frame_text(text) == Connection(ConnectionType.SERVER).send(TextMessage(data=text))


async def test_a_subscription_over_its_byte_bound_is_cut_off():
    bus = EventBus(wall_clock=lambda: 1.0)
    cuts = []
    with bus.subscribe(max_bytes=1000) as slow, bus.subscribe() as other:
        slow.on_cut_off = lambda: cuts.append(slow.cut_off)
        sizes = []
        while not cuts:
            sizes.append(len(bus.publish("app.scaled", app="a" * 50).frame))
            assert len(sizes) < 100
        assert sum(sizes[:-1]) <= 1000 < sum(sizes)
        assert cuts == [f"{sum(sizes)} bytes queued, over 1000"]
        with pytest.raises(trio.EndOfChannel):
            slow.receive_nowait()  # nothing more is taken for it
        bus.publish("app.scaled", app="b")
        assert len(cuts) == 1
        assert [other.receive_nowait().seq for _ in sizes] == list(range(1, len(sizes) + 1))


async def test_the_bound_counts_what_is_taken_until_it_is_written():
    bus = EventBus(wall_clock=lambda: 1.0)
    with bus.subscribe(max_bytes=1000) as sub:
        for _ in range(20):
            ev = bus.publish("app.scaled", app="a" * 50)
            burst, nbytes = sub.take_all()
            assert burst == [ev] and nbytes == len(ev.frame) == sub.pending_bytes
            sub.written(nbytes)
            assert sub.pending_bytes == 0
        for _ in range(3):  # taken, never written: still counted
            bus.publish("app.scaled", app="a" * 50)
            sub.take_all()
        assert sub.cut_off is None and sub.pending_bytes == 3 * len(ev.frame)
        while sub.cut_off is None:
            bus.publish("app.scaled", app="a" * 50)
        assert bus.seq < 30


async def test_the_log_holds_only_what_the_slowest_subscriber_lags():
    bus = EventBus(wall_clock=lambda: 1.0)
    with bus.subscribe(max_bytes=10**6) as fast, bus.subscribe(max_bytes=10**6) as slow:
        for _ in range(1000):
            bus.publish("app.scaled", app="a")
            fast.take_all()
        assert len(bus._log) == 1000, "slow holds it all"
        burst, _ = slow.take_all()
        assert len(burst) == 1000
        bus.publish("app.scaled", app="a")
        assert len(bus._log) <= 2
    assert bus._log == []
    bus.publish("app.scaled", app="a")
    assert bus._log == [], "nobody listens: nothing kept"


async def test_an_event_that_is_not_json_is_skipped_not_fatal(caplog):
    bus = EventBus(wall_clock=lambda: 1.0)
    with bus.subscribe(max_bytes=1000) as sub:
        ev = bus.publish("app.scaled", value=float("nan"))
        assert ev.frame == b"" and sub.receive_nowait() is ev and sub.cut_off is None
    assert "cannot be sent on /v1/watch" in caplog.text


async def test_one_snapshot_serves_the_watchers_of_a_second(autojump_clock):
    cluster = Cluster()
    calls = []
    rows = cluster.rollout_statuses  # called once per snapshot (views.status)
    cluster.rollout_statuses = lambda: calls.append(1) or rows()
    cache = watch.SnapshotCache()
    first = cache.start_frames(cluster)
    assert cache.start_frames(cluster) == first and len(calls) == 1
    ev = cluster.events.publish("app.scaled", app="a")
    again = cache.start_frames(cluster)
    assert again == [first[0], ev.frame] and len(calls) == 1, "the event follows the snapshot"
    await trio.sleep(watch.SNAPSHOT_REUSE_S)
    fresh = cache.start_frames(cluster)
    assert len(fresh) == 1 and len(calls) == 2
    decoded = protocol.decode_watch_message(unframe(fresh[0]))
    assert decoded.seq == ev.seq  # type: ignore[union-attr]


def unframe(frame: bytes) -> str:
    """The text of one server frame, as a client reads it."""
    client = Connection(ConnectionType.CLIENT)
    client.receive_data(frame)
    [message] = list(client.events())
    assert isinstance(message, TextMessage)
    return message.data


# ---------------------------------------------------------------------- keep-alive, for real


async def silent_watcher(port: int) -> list[wsclient.Event]:
    """A watcher that reads but never answers a ping; the events it saw, ending with the
    server's close (or none, if the stream just ended)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        proto = wsclient.ClientProtocol(f"127.0.0.1:{port}", "/v1/watch")
        await stream.send_all(proto.handshake_request())
        rest = None
        while rest is None:
            rest = proto.receive_handshake(await stream.receive_some(65536))
        seen: list[wsclient.Event] = []
        data = rest
        while True:
            for event in proto.receive(data):
                seen.append(event)
                if isinstance(event, wsclient.Close):
                    return seen
            data = await stream.receive_some(65536)
            if not data:
                return seen


async def read_forever(ws: trio_client.ClientConnection) -> None:
    while True:
        await ws.get_message()


async def test_a_watcher_that_never_answers_pings_is_closed(tmp_path: Path):
    limits = Limits(watch_idle_timeout_s=1.0)
    with trio.fail_after(DEADLINE_S):
        async with open_conductor(tmp_path, limits=limits) as c:
            async with trio_client.open_websocket(c.url + "/v1/watch") as alive, \
                    trio.open_nursery() as reading:
                assert json.loads(await alive.get_message())["type"] == "snapshot"
                reading.start_soon(read_forever, alive)  # its reader answers pings: it stays
                for _ in range(2):  # two in a row: `alive` lives through both timeouts
                    seen = await silent_watcher(c.ws_port)
                    assert any(isinstance(e, wsclient.Ping) for e in seen), seen
                    close = seen[-1]
                    assert isinstance(close, wsclient.Close), seen
                    assert (close.code, close.reason) == (1011, "no pong within 1 s")
                assert alive.closed is None
                reading.cancel_scope.cancel()
            samples = await scrape(c.http_port)
            assert closed_count(samples, "ping_timeout") == 2
