"""A small HTTP/1.1 load generator (trio + h11, keep-alive): proof that nothing is dropped.

    python tests/loadgen.py URL [--rate R] [--concurrency C]
                                 [--duration S] [--requests N] [--out FILE]

With ``--rate`` requests start at a steady R per second (open loop) over up to
C keep-alive connections; without it each of C connections sends its next
request as soon as the last one is answered (closed loop, for throughput).
It stops after ``--duration`` seconds, ``--requests`` requests, or SIGINT /
SIGTERM (requests in flight are finished, not cancelled), then prints one
JSON summary: counts, failures, non-2xx answers, the rate reached, latency
percentiles and the ``X-Version`` values seen. ``--out`` writes one JSON line
per request (start time, latency, status, ``X-Version``, ``X-Pid``, error).
Used by the ingress load tests and ``bench/ingress.py``.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import urlsplit

import h11
import trio

REQUEST_TIMEOUT_S = 10.0
RECEIVE_BYTES = 64 * 1024


@dataclass(frozen=True)
class Sample:
    start: float  # wall clock (time.time()) when the request was sent
    latency_s: float
    status: int | None  # None: no response (the error says why)
    version: str | None = None  # the X-Version response header
    pid: int | None = None  # the X-Pid response header
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


class _Connection:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.stream: trio.SocketStream | None = None
        self.h11 = h11.Connection(h11.CLIENT)

    async def request(self, path: str) -> tuple[int, dict[bytes, bytes]]:
        if self.stream is None:
            self.stream = await trio.open_tcp_stream(self.host, self.port)
            self.h11 = h11.Connection(h11.CLIENT)
        headers = [("host", f"{self.host}:{self.port}"), ("user-agent", "skr8tr-loadgen")]
        await self.stream.send_all(self.h11.send(h11.Request(method="GET", target=path,
                                                             headers=headers))
                                   + self.h11.send(h11.EndOfMessage()))
        response = None
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                self.h11.receive_data(await self.stream.receive_some(RECEIVE_BYTES))
            elif isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed):
                raise ConnectionError("the server closed the connection mid-response")
        assert response is not None
        if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
            self.h11.start_next_cycle()
        else:
            await self.aclose()
        return response.status_code, dict(response.headers)

    async def aclose(self) -> None:
        if self.stream is not None:
            stream, self.stream = self.stream, None
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await stream.aclose()


async def run_load(url: str, *, rate: float | None = None, concurrency: int = 8,
                   duration_s: float = 10.0, max_requests: int | None = None,
                   stop: trio.Event | None = None,
                   on_sample: Callable[[Sample], None] | None = None,
                   timeout_s: float = REQUEST_TIMEOUT_S) -> list[Sample]:
    """Send GET ``url`` until ``duration_s``, ``max_requests`` or ``stop``; every sample.

    Requests in flight when it stops are finished (each bounded by ``timeout_s``).
    """
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"expected an http:// URL, got {url!r}")
    host, port = parts.hostname, parts.port or 80
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    stop = trio.Event() if stop is None else stop
    samples: list[Sample] = []
    budget = [max_requests if max_requests is not None else math.inf]

    def take() -> bool:
        if stop.is_set() or budget[0] <= 0:
            return False
        budget[0] -= 1
        return True

    async def one(conn: _Connection) -> None:
        start, t0 = time.time(), time.perf_counter()
        try:
            with trio.fail_after(timeout_s):
                status, headers = await conn.request(path)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError,
                h11.ProtocolError, ConnectionError) as exc:
            await conn.aclose()
            sample = Sample(start, time.perf_counter() - t0, None,
                            error=f"{type(exc).__name__}: {exc}")
        else:
            pid = headers.get(b"x-pid")
            version = headers.get(b"x-version")
            sample = Sample(start, time.perf_counter() - t0, status,
                            version.decode() if version else None,
                            int(pid) if pid and pid.isdigit() else None)
        samples.append(sample)
        if on_sample is not None:
            on_sample(sample)

    async def closed_loop_worker() -> None:
        conn = _Connection(host, port)
        try:
            while take():
                await one(conn)
        finally:
            await conn.aclose()

    async def paced_worker(tokens: trio.MemoryReceiveChannel[None]) -> None:
        conn = _Connection(host, port)
        try:
            async for _ in tokens:
                await one(conn)
        finally:
            await conn.aclose()

    async def pacer(send: trio.MemorySendChannel[None]) -> None:
        assert rate is not None
        async with send:
            t0 = trio.current_time()
            i = 0
            while take():
                await trio.sleep_until(t0 + i / rate)
                if stop.is_set():
                    return
                await send.send(None)
                i += 1

    async def stopper() -> None:
        await trio.sleep(duration_s)
        stop.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(stopper)
        async with trio.open_nursery() as workers:
            if rate is None:
                for _ in range(concurrency):
                    workers.start_soon(closed_loop_worker)
            else:
                send, recv = trio.open_memory_channel[None](0)
                async with recv:
                    for _ in range(concurrency):
                        workers.start_soon(paced_worker, recv.clone())
                workers.start_soon(pacer, send)
        nursery.cancel_scope.cancel()
    return samples


def percentile(values: list[float], p: float) -> float:
    """The ``p``-th percentile (0-100) by nearest rank; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def summarize(samples: list[Sample]) -> dict[str, Any]:
    ok = [s for s in samples if s.status is not None]
    span = (max(s.start + s.latency_s for s in samples) - min(s.start for s in samples)
            if samples else 0.0)
    latencies = [s.latency_s for s in ok]
    return {
        "requests": len(samples),
        "failed": sum(s.status is None for s in samples),
        "non_2xx": sum(s.status is not None and not s.ok for s in samples),
        "rate_per_s": round(len(samples) / span, 1) if span > 0 else 0.0,
        "p50_ms": round(percentile(latencies, 50) * 1000, 2) if latencies else None,
        "p99_ms": round(percentile(latencies, 99) * 1000, 2) if latencies else None,
        "versions": dict(Counter(s.version or "-" for s in ok)),
        "errors": dict(Counter(s.error for s in samples if s.error).most_common(5)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python tests/loadgen.py",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("url", metavar="URL")
    parser.add_argument("--rate", type=float, metavar="R", help="requests per second (open "
                        "loop); without it: closed loop, as fast as answers come")
    parser.add_argument("--concurrency", type=int, default=8, metavar="C")
    parser.add_argument("--duration", type=float, default=10.0, metavar="S")
    parser.add_argument("--requests", type=int, metavar="N")
    parser.add_argument("--out", metavar="FILE", help="one JSON line per request")
    opts = parser.parse_args(argv)
    out = open(opts.out, "w", encoding="utf-8") if opts.out else None  # noqa: SIM115

    def record(sample: Sample) -> None:
        if out is not None:
            out.write(json.dumps(asdict(sample)) + "\n")
            out.flush()

    async def run() -> list[Sample]:
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            async def on_signals() -> None:
                with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for _ in signals:
                        stop.set()
                        return

            nursery.start_soon(on_signals)
            samples = await run_load(opts.url, rate=opts.rate, concurrency=opts.concurrency,
                                     duration_s=opts.duration, max_requests=opts.requests,
                                     stop=stop, on_sample=record)
            nursery.cancel_scope.cancel()
        return samples

    try:
        samples = trio.run(run)
    finally:
        if out is not None:
            out.close()
    print(json.dumps(summarize(samples)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
