"""What a hostile ingress costs the conductor (#18): reports of the largest size, as fast
as the limits let them through, and faster.

Method: a real conductor (log level info) and one real node agent on loopback, the
example service (3 replicas). Ingress sessions (the handshake of tests/ingress_client.py,
in this process) signed with authorized ingress keys send reports just under the 256 KiB
message limit, of two shapes: ``rows`` (about 2,900 rows, each an unknown replica id:
the most rows a message holds) and ``buckets`` (the 3 real replicas and about 430 unknown
ones, each with all 62 latency buckets: the most numbers a message holds). Paced: each
session sends 4 reports a second (the limit, after its burst of 8). Flood: one session
sends as fast as its socket takes them (dropped over the rate; the session is closed
after its strikes and at once dials again). The conductor's CPU (user + system, psutil)
is measured over MEASURE_S; the decode of one report is also timed in this process.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import psutil
import trio
from _harness import cpu_seconds, local_cluster, machine

from skr8tr import keyfiles
from skr8tr.core.ingress_protocol import MAX_MESSAGE_BYTES
from skr8tr.core.traffic import BUCKETS, decode_report
from skr8tr.ws import trio_client
from skr8tr.ws.frames import ConnectionClosed
from tests.ingress_client import say_hello
from tests.test_e2e_rollout import web

MEASURE_S = 10.0


def big_report(seq: int, shape: str, real: list[str]) -> str:
    """A report as close under MAX_MESSAGE_BYTES as its rows allow."""
    rows = []
    size, i = 60, 0
    while True:
        rid = real[i] if i < len(real) else f"web-{10**9 + i}"
        if shape == "rows":
            row = {"replica": rid, "requests": 999999, "errors": 99999, "failed": 99999,
                   "latency": []}
        else:
            row = {"replica": rid, "requests": 10**9, "errors": 0, "failed": 0,
                   "latency": [[b, 10**9 // BUCKETS] for b in range(BUCKETS)]}
        cost = len(json.dumps(row)) + 2
        if size + cost > MAX_MESSAGE_BYTES - 64 or len(rows) >= 4096:
            break
        rows.append(row)
        size += cost
        i += 1
    return json.dumps({"type": "report", "seq": seq, "replicas": rows})


async def paced(url: str, signer, name: str, shape: str, real: list[str],
                stop: trio.Event) -> int:
    sent = 0
    async with trio_client.open_websocket(url + "/v1/ingress") as ws:
        answer = await say_hello(ws, signer, name)
        assert answer["type"] == "welcome", answer
        texts = [big_report(seq, shape, real) for seq in (1, 2)]
        start = trio.current_time()
        while not stop.is_set():
            await ws.send_message(texts[sent % 2])
            sent += 1
            # The burst of 8 at once, then 4 a second.
            if sent >= 8:
                await trio.sleep_until(start + (sent - 7) / 4.0)
    return sent


async def flood(url: str, signer, real: list[str], stop: trio.Event) -> tuple[int, int]:
    sent = sessions = 0
    text = big_report(1, "buckets", real)
    while not stop.is_set():
        sessions += 1
        async with trio_client.open_websocket(url + "/v1/ingress") as ws:
            answer = await say_hello(ws, signer, "flood")
            assert answer["type"] == "welcome", answer
            try:
                while not stop.is_set():
                    await ws.send_message(text)
                    sent += 1
            except (ConnectionClosed, trio.BrokenResourceError):
                continue  # the conductor closed this session (strikes): flood from a new one
    return sent, sessions


async def pings(url: str, seconds: float) -> list[float]:
    """``ping`` on one open /v1/cli connection every 50 ms for *seconds*: how long the
    conductor's event loop keeps everyone else waiting. Run in a process of its own
    (``--pinger``), so that the attackers' work in this one is not in the figures."""
    out = []
    async with trio_client.open_websocket(url + "/v1/cli") as ws:
        end = trio.current_time() + seconds
        while trio.current_time() < end:
            t0 = time.perf_counter()
            await ws.send_message(json.dumps({"v": 1, "id": "p", "cmd": "ping", "args": {}}))
            await ws.get_message()
            out.append((time.perf_counter() - t0) * 1000)
            await trio.sleep(0.05)
    return out


def measure(cluster, proc, run) -> tuple[float, object, str]:
    """The conductor's CPU share while *run* runs, its result, and the latency of pings
    meanwhile (median / p99 / max ms)."""
    pinger = subprocess.Popen([sys.executable, __file__, "--pinger", cluster.url,
                               str(run.seconds)], stdout=subprocess.PIPE, text=True)
    before = cpu_seconds(proc)
    t0 = time.monotonic()
    result = trio.run(run)
    cpu = (cpu_seconds(proc) - before) / (time.monotonic() - t0)
    latencies = sorted(json.loads(pinger.communicate(timeout=60)[0]))
    figures = (f"{latencies[len(latencies) // 2]:.1f} / "
               f"{latencies[int(len(latencies) * 0.99)]:.1f} / {latencies[-1]:.1f}")
    return cpu, result, figures


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--pinger", nargs=2, metavar=("URL", "SECONDS"))
    args = parser.parse_args()
    if args.pinger:
        print(json.dumps(trio.run(pings, args.pinger[0], float(args.pinger[1]))))
        return 0
    quick = args.quick
    measure_s = 4.0 if quick else MEASURE_S
    print("## What a hostile ingress costs the conductor\n")
    print(f"Command: `./tools/bench ingress_intake`. Machine: {machine()}.\n")
    for shape in ("rows", "buckets"):
        text = big_report(1, shape, [])
        msg = json.loads(text)
        t0 = time.perf_counter()
        for _ in range(20):
            decode_report(json.loads(text))
        per = (time.perf_counter() - t0) / 20
        print(f"- one `{shape}` report ({len(text)} bytes, {len(msg['replicas'])} rows): "
              f"json + decode_report {per * 1000:.1f} ms in this process")
    with local_cluster(1, log_level="info") as cluster:
        signers = [keyfiles.load_signing_key(cluster.add_key(f"edge-{i}", "ingress"))
                   for i in range(16)]
        cluster.conductor.proc.send_signal(1)  # SIGHUP: read the new keys
        time.sleep(1.0)
        cluster.json("up", str(web(cluster.root, "v1", replicas=3)))
        real = [r["replica"] for r in cluster.wait_ready("web", 3)]
        proc = psutil.Process(cluster.conductor.proc.pid)
        print("\n| attack | sessions | reports sent/s | conductor CPU | ping ms: median / "
              "p99 / max |")
        print("|---|---|---|---|---|")
        async def idle_run():
            await trio.sleep(measure_s)
        idle_run.seconds = measure_s
        idle, _, ms = measure(cluster, proc, idle_run)
        print(f"| none (idle, 1 node, 3 replicas) | 0 | 0 | {idle * 100:.1f}% | {ms} |")
        for shape in ("rows", "buckets"):
            for n in (1, 16):
                async def run(n=n, shape=shape):
                    stop = trio.Event()
                    counts = []
                    async with trio.open_nursery() as nursery:
                        for i in range(n):
                            async def one(i=i):
                                counts.append(await paced(cluster.url, signers[i],
                                                          f"edge-{i}", shape, real, stop))
                            nursery.start_soon(one)
                        await trio.sleep(measure_s)
                        stop.set()
                    return sum(counts)
                run.seconds = measure_s
                cpu, sent, ms = measure(cluster, proc, run)
                print(f"| paced `{shape}` reports, 4/s | {n} | {sent / measure_s:.0f} | "
                      f"{cpu * 100:.1f}% | {ms} |")

        async def run_flood():
            stop = trio.Event()
            async with trio.open_nursery() as nursery:
                result = []

                async def go():
                    result.append(await flood(cluster.url, signers[0], real, stop))
                nursery.start_soon(go)
                await trio.sleep(measure_s)
                stop.set()
            return result[0]
        run_flood.seconds = measure_s
        cpu, (sent, sessions), ms = measure(cluster, proc, run_flood)
        print(f"| flood of `buckets` reports, reconnecting | 1 ({sessions} in turn) | "
              f"{sent / measure_s:.0f} | {cpu * 100:.1f}% | {ms} |")
        samples = cluster.cli_ok("status", "--json")
        assert json.loads(samples)["ingresses"] is not None
    return 0


if __name__ == "__main__":
    sys.exit(main())
