"""The §4 nonce guard in etcd: spends per second and latency, group commit on and off.

Method: one local etcd (Debian's, single member, default settings, its data in a
temporary folder), started as the tests start it. N nonces (5,000; `--quick`
1,000) are spent through one EtcdNonceGuard from 32 concurrent tasks, each a closed
loop (spend, wait for the answer, spend the next). "batch on": nonces that arrive
while a transaction is in flight go together into the next (at most 126 with the
fence). "batch off": each spend is a transaction of its own, 32 in flight. Both
are fenced on a real leadership (two compares per transaction), as a leader's
writes are. Latency is from the call to spend to its answer. etcd's CPU% over the
run, and this process's (the guard and its HTTP client; psutil; 100 % = one
core), say which was the limit. Three runs per
case, the median run (by spends/s) shown; `--quick`: one run.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import psutil
import trio
from _harness import machine, pct

from skr8tr.conductor.election import campaign
from skr8tr.conductor.etcd_client import EtcdClient
from skr8tr.conductor.etcd_nonces import EtcdNonceGuard
from tests.etcd import Etcd

TASKS = 32
KEY = "ab" * 32


async def run_case(etcd: Etcd, prefix: str, n: int, batch: bool
                   ) -> tuple[float, list[float], int, float, float]:
    """(spends/s, latencies in s, transactions, etcd CPU %, this process's CPU %)."""
    etcd_proc, me = psutil.Process(etcd.process.pid), psutil.Process()
    async with EtcdClient([etcd.url]) as client, trio.open_nursery() as nursery:
        leadership = await campaign(client, prefix, "ws://bench", ttl_s=60)
        guard = EtcdNonceGuard(client, prefix, fence=leadership.fence, batch=batch)
        await nursery.start(guard.serve)
        await guard.spend(KEY, "f" * 32, 0.0)  # the bucket lease, outside the figure
        latencies: list[float] = []

        async def loop(task: int) -> None:
            for i in range(task, n, TASKS):
                t0 = time.perf_counter()
                assert await guard.spend(KEY, f"{task:08x}{i:024x}", 0.0)
                latencies.append(time.perf_counter() - t0)

        before_txns = guard.transactions
        cpu0, mine0 = etcd_proc.cpu_times(), me.cpu_times()
        t0 = time.perf_counter()
        async with trio.open_nursery() as loops:
            for task in range(TASKS):
                loops.start_soon(loop, task)
        elapsed = time.perf_counter() - t0
        cpu1, mine1 = etcd_proc.cpu_times(), me.cpu_times()
        nursery.cancel_scope.cancel()
    cpu = (cpu1.user + cpu1.system - cpu0.user - cpu0.system) / elapsed * 100
    mine = (mine1.user + mine1.system - mine0.user - mine0.system) / elapsed * 100
    return len(latencies) / elapsed, latencies, guard.transactions - before_txns, cpu, mine


async def main_async(n: int, runs: int) -> None:
    with tempfile.TemporaryDirectory(prefix="skr8tr-bench-etcd-") as tmp:
        etcd = Etcd(Path(tmp) / "etcd")
        etcd.start()
        try:
            rows = []
            for label, batch in (("batch on", True), ("batch off", False)):
                results = []
                for run in range(runs):
                    prefix = f"/bench/{label.replace(' ', '-')}/{run}"
                    results.append(await run_case(etcd, prefix, n, batch))
                results.sort(key=lambda r: r[0])
                rate, latencies, txns, cpu, mine = results[len(results) // 2]
                rows.append((label, rate, [r[0] for r in results], latencies, txns, cpu, mine))
        finally:
            etcd.stop()
    print(f"## etcd nonce guard ({n} spends, {TASKS} tasks)\n")
    print("| case | spends/s (median) | runs | p50 ms | p99 ms | transactions | "
          "nonces/txn | etcd CPU % | client CPU % |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for label, rate, rates, latencies, txns, cpu, mine in rows:
        print(f"| {label} | {rate:,.0f} | {', '.join(f'{r:,.0f}' for r in rates)} | "
              f"{pct(latencies, 50) * 1000:.1f} | {pct(latencies, 99) * 1000:.1f} | {txns} | "
              f"{len(latencies) / txns:.1f} | {cpu:.0f} | {mine:.0f} |")
    print(f"\nMachine: {machine()}. Mean latency batch on "
          f"{statistics.mean(rows[0][3]) * 1000:.1f} ms.")
    print(__doc__.split("\n\n", 1)[1].strip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1,000 spends, one run")
    parser.add_argument("-n", type=int, default=None, help="spends per run")
    args = parser.parse_args()
    n = args.n or (1000 if args.quick else 5000)
    trio.run(main_async, n, 1 if args.quick else 3)


if __name__ == "__main__":
    main()
