"""Command throughput: signed read and mutating requests per second, 1 and 32 connections.

Method: a real conductor and one real node agent on loopback (log level
info), an app `tp` with one `/bin/sleep` replica. Every request is signed
as the CLI signs it, before the clock starts (the client's signing is not
in the figure). Each connection runs a closed loop: send, wait for the
reply, send the next. Read: `list tp`. Mutating: `scale tp 1` (the count it
already has: authentication, replay guard, the command and a reconcile
pass, without launching anything). Then the same mutating request with the
conductor's `--state` and `--audit-log` on: each accepted request is made
durable in the state file and the audit log before its reply. With 32
connections each connection scales its own app (`tp0`..`tp31`): changes of one
app are made one after the other by design, changes of different apps share
the writes.
The conductor's CPU% over the run (psutil; 100 % = one core) says whether
it, and not the client, was the limit. Three runs per case, median shown.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time

import psutil
import trio
from _harness import REPO, call_options, local_cluster, machine, request_text, timed_call

from skr8tr import client

CASES = (("read: `list tp`", "list", {"app": "tp"}),
         ("mutating: `scale tp 1`", "scale", {"app": "tp", "replicas": 1}))


async def closed_loop(opts, texts: list[tuple[str, str]]) -> None:
    async with client.open_conductor(opts.conductor, "/v1/cli", opts.timeout_s) as ws:
        for rid, text in texts:
            await ws.send_message(text)
            reply = json.loads(await ws.get_message())
            assert reply["id"] == rid and reply["ok"], reply


def signed_batches(opts, cmd: str, args: dict, connections: int, per_connection: int
                   ) -> list[list[tuple[str, str]]]:
    """``per_connection`` signed requests for each of ``connections`` connections."""
    return [[request_text(opts, cmd, args) for _ in range(per_connection)]
            for _ in range(connections)]


async def run_case(opts, cmd: str, args: dict, connections: int, per_connection: int
                   ) -> float:
    return await run_batches(opts, signed_batches(opts, cmd, args, connections,
                                                  per_connection))


async def run_batches(opts, batches: list[list[tuple[str, str]]]) -> float:
    """Requests per second: each batch sent on a connection of its own, closed loop."""
    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for texts in batches:
            nursery.start_soon(closed_loop, opts, texts)
    return sum(map(len, batches)) / (time.perf_counter() - t0)


async def set_up(opts, names=("tp",)) -> None:
    async with client.open_conductor(opts.conductor, "/v1/cli", opts.timeout_s) as ws:
        for name in names:
            await timed_call(ws, opts, "up", {
                "manifest": f"app {name}\n  exec /bin/sleep\n  args 3600\n",
                "format": "skr8tr", "base_dir": str(REPO)})


async def run_per_app(opts, connections: int, per_connection: int) -> float:
    """Each connection scales its own app (tp0, tp1, ...)."""
    batches = [[request_text(opts, "scale", {"app": f"tp{i}", "replicas": 1})
                for _ in range(per_connection)] for i in range(connections)]
    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for texts in batches:
            nursery.start_soon(closed_loop, opts, texts)
    return connections * per_connection / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests, one run")
    options = parser.parse_args()
    total = 2000 if options.quick else 6000
    runs = 1 if options.quick else 3
    results = []
    with local_cluster(nodes=1, log_level="info") as cluster:
        opts = call_options(cluster)
        conductor = psutil.Process(cluster.conductor.proc.pid)
        trio.run(set_up, opts)
        for label, cmd, args in CASES:
            for connections in (1, 32):
                rates, cpus = [], []
                for _ in range(runs):
                    conductor.cpu_percent(None)
                    rates.append(trio.run(functools.partial(
                        run_case, opts, cmd, args, connections, total // connections)))
                    cpus.append(conductor.cpu_percent(None))
                results.append((label, connections, rates, statistics.median(cpus)))
    with local_cluster(nodes=1, log_level="info", durable=True) as cluster:
        opts = call_options(cluster)
        conductor = psutil.Process(cluster.conductor.proc.pid)
        trio.run(set_up, opts, ("tp", *(f"tp{i}" for i in range(32))))
        label = "mutating, `--state` + `--audit-log`"
        # Fewer: every request is signed before its run starts, and must arrive within
        # the 30 s a signature stays fresh at a few hundred requests a second.
        durable_total = total // 3
        for connections in (1, 32):
            rates, cpus = [], []
            for _ in range(runs):
                conductor.cpu_percent(None)
                if connections == 1:
                    rates.append(trio.run(functools.partial(
                        run_case, opts, "scale", {"app": "tp", "replicas": 1}, 1,
                        durable_total)))
                else:
                    rates.append(trio.run(functools.partial(
                        run_per_app, opts, connections, durable_total // connections)))
                cpus.append(conductor.cpu_percent(None))
            results.append((label, connections, rates, statistics.median(cpus)))
    print("## Command throughput (bench/throughput.py)")
    print()
    print(f"Machine: {machine()}. {total} requests per run, {runs} run(s) per case; "
          "the client (one trio process) shares the 2 cores with the conductor.")
    print()
    print("| request | connections | median req/s | min | max | conductor CPU % |")
    print("|---|---|---|---|---|---|")
    for label, connections, rates, cpu in results:
        print(f"| {label} | {connections} | {statistics.median(rates):.0f} | {min(rates):.0f} "
              f"| {max(rates):.0f} | {cpu:.0f} |")


if __name__ == "__main__":
    main()
