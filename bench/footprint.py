"""Footprint: resident memory (RSS) of an idle conductor, an idle node agent, and of a
node agent supervising 100 replicas.

Method: a real conductor and one real node agent (log level info), started
with the real CLI; RSS read with psutil 3 s after each state is reached
(median of 5 readings 0.2 s apart; 1 s with --quick). The 100 replicas are `/bin/sleep`
(one app, `replicas 100`, no port), all reported ready.
"""

from __future__ import annotations

import argparse
import statistics
import time

import psutil
import trio
from _harness import REPO, call_options, local_cluster, machine, timed_call

from skr8tr import client


def rss_mb(proc: psutil.Process, settle_s: float) -> float:
    time.sleep(settle_s)
    readings = []
    for _ in range(5):
        readings.append(proc.memory_info().rss / 2**20)
        time.sleep(0.2)
    return statistics.median(readings)


async def deploy(opts, count: int) -> None:
    async with client.open_conductor(opts.conductor, "/v1/cli", opts.timeout_s) as ws:
        await timed_call(ws, opts, "up", {
            "manifest": f"app many\n  exec /bin/sleep\n  args 3600\n  replicas {count}\n"
                        "  rollout\n    settle 0s\n",
            "format": "skr8tr", "base_dir": str(REPO)})
        while True:
            _, rows = await timed_call(ws, opts, "list", {"app": "many"})
            if len(rows) == count and all(r["state"] == "ready" for r in rows):
                return
            await trio.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 s settling instead of 3 s")
    settle_s = 1.0 if parser.parse_args().quick else 3.0
    with local_cluster(nodes=1, log_level="info") as cluster:
        conductor = psutil.Process(cluster.conductor.proc.pid)
        node = psutil.Process(cluster.nodes["n1"].proc.pid)
        idle_conductor = rss_mb(conductor, settle_s)
        idle_node = rss_mb(node, settle_s)
        trio.run(deploy, call_options(cluster), 100)
        busy_node = rss_mb(node, settle_s)
        busy_conductor = rss_mb(conductor, settle_s)
        children = len(node.children())
    print("## Footprint (bench/footprint.py)")
    print()
    print(f"Machine: {machine()}. RSS in MB (median of 5 readings).")
    print()
    print("| process | state | RSS MB |")
    print("|---|---|---|")
    print(f"| conductor | idle, one node joined | {idle_conductor:.1f} |")
    print(f"| node agent | idle, no replica | {idle_node:.1f} |")
    print(f"| node agent | supervising 100 replicas ({children} child processes) "
          f"| {busy_node:.1f} |")
    print(f"| conductor | 1 node, 100 replicas | {busy_conductor:.1f} |")


if __name__ == "__main__":
    main()
