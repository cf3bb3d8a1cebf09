"""Signed mutating requests per second with the etcd store vs `--state FILE`.

Method: bench/throughput.py's durable case: a real conductor and one real node
agent on loopback (log level info), apps `tp` and `tp0`..`tp31` of one
`/bin/sleep` replica each; every request a signed `scale APP 1` (the count it
has: signature, replay guard, the command, a reconcile pass, and the change
made durable before the reply), signed before the clock starts; each
connection a closed loop. 1 connection (all on `tp`), and 32 connections each
scaling its own app (changes of one app are made one after another by design;
changes of different apps may share a write). Stores, each a cluster of its
own running side by side: `--state FILE` on disk (no audit log), and `--store`
on an etcd of its own (Debian's, single member) with its data on disk and on
tmpfs. With etcd each accepted request spends its nonce in etcd (a fenced
transaction, nonces that arrive together share one) and writes the app (a
fenced transaction) before its reply. Runs interleaved store after store,
three of each (`--quick`: one); the median shown. CPU % (psutil, 100 % = one
core) of the conductor and of etcd over the run say who was the limit.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import statistics

import psutil
import trio
from _harness import call_options, local_cluster, machine
from throughput import run_case, run_per_app, set_up

LABELS = {"state": "`--state FILE` (disk)", "etcd-disk": "`--store`, etcd on disk",
          "etcd-tmpfs": "`--store`, etcd on tmpfs"}


def cpu_seconds(proc: psutil.Process | None) -> float:
    if proc is None:
        return 0.0
    t = proc.cpu_times()
    return t.user + t.system


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests, one run")
    parser.add_argument("--etcd", choices=("disk", "tmpfs", "both"), default="both")
    options = parser.parse_args()
    runs = 1 if options.quick else 3
    # Each run's requests are signed before it starts and must arrive within the 30 s a
    # signature stays fresh: sized for >= ~60 req/s on one connection.
    totals = {1: 300 if options.quick else 600, 32: 1600 if options.quick else 3200}
    stores = ["state"] + [f"etcd-{w}" for w in (("disk", "tmpfs") if options.etcd == "both"
                                                else (options.etcd,))]
    results: dict[tuple[str, int], list[tuple[float, float, float]]] = {}
    with contextlib.ExitStack() as stack:
        clusters = {s: stack.enter_context(local_cluster(nodes=1, log_level="info", store=s))
                    for s in stores}
        opts = {s: call_options(c) for s, c in clusters.items()}
        procs = {s: (psutil.Process(c.conductor.proc.pid),
                     psutil.Process(c.etcd.process.pid) if hasattr(c, "etcd") else None)
                 for s, c in clusters.items()}
        for s in stores:
            trio.run(set_up, opts[s], ("tp", *(f"tp{i}" for i in range(32))))
        for _ in range(runs):
            for connections in (1, 32):
                for s in stores:
                    conductor, etcd = procs[s]
                    c0, e0 = cpu_seconds(conductor), cpu_seconds(etcd)
                    if connections == 1:
                        run = functools.partial(run_case, opts[s], "scale",
                                                {"app": "tp", "replicas": 1}, 1, totals[1])
                    else:
                        run = functools.partial(run_per_app, opts[s], 32, totals[32] // 32)
                    rate = trio.run(run)
                    elapsed = totals[connections] / rate
                    results.setdefault((s, connections), []).append(
                        (rate, (cpu_seconds(conductor) - c0) / elapsed * 100,
                         (cpu_seconds(etcd) - e0) / elapsed * 100))
    print("## Signed mutating requests/s, etcd store vs state file (bench/ha_throughput.py)")
    print()
    print(f"Machine: {machine()}. Requests per run: {totals[1]} (1 connection), "
          f"{totals[32]} (32); {runs} run(s) per case, interleaved; the client (one trio "
          "process) shares the 2 cores with the conductor and etcd.")
    print()
    print("| store | connections | median req/s | runs | conductor CPU % | etcd CPU % |")
    print("|---|---|---|---|---|---|")
    for connections in (1, 32):
        for s in stores:
            rows = results[(s, connections)]
            rates = [r[0] for r in rows]
            print(f"| {LABELS[s]} | {connections} | {statistics.median(rates):,.0f} "
                  f"| {', '.join(f'{r:,.0f}' for r in rates)} "
                  f"| {statistics.median(r[1] for r in rows):.0f} "
                  f"| {'' if s == 'state' else f'{statistics.median(r[2] for r in rows):.0f}'} |")


if __name__ == "__main__":
    main()
