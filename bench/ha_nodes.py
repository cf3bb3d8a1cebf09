"""Conductor CPU with 1,000 simulated nodes: the etcd store vs `--state FILE`.

Method: bench/scale.py's: a real conductor (`--node-timeout 3`, so nodes beat
every 1 s; log level info) and bench/_simnodes.py holding 1,000 real node
sessions (the real protocol; only the spawn is fake). The conductor runs with
`--store` on an etcd of its own (Debian's, single member, data on disk), then
(a fresh cluster) with `--state FILE` on disk. For each: CPU % of the conductor
(psutil, 100 % = one core) and of etcd over three 10 s windows (median shown;
`--quick`: one 5 s window) with the idle fleet, then again once 10 apps x 100
replicas (`port auto`, each app a signed `up`) are all ready. A leader with
the etcd store also renews its leader lease and its member key (every third
of the 5 s TTL) and watches the leader key; heartbeats and replica reports are
not written to etcd.
"""

from __future__ import annotations

import argparse
import statistics
import time

import psutil
import trio
from _harness import call_options, local_cluster, machine
from scale import deploy, start_sim, wait_all_ready

NODES = 1000


def windows(procs: list[psutil.Process | None], count: int, seconds: float
            ) -> list[float]:
    """Median CPU % of each process over ``count`` windows."""
    samples: list[list[float]] = [[] for _ in procs]
    for _ in range(count):
        live = [p for p in procs if p is not None]
        for p in live:
            p.cpu_percent(None)
        time.sleep(seconds)
        for i, p in enumerate(procs):
            if p is not None:
                samples[i].append(p.cpu_percent(None))
    return [statistics.median(s) if s else float("nan") for s in samples]


def measure(store: str, count: int, seconds: float, apps: int) -> dict[str, list[float]]:
    out = {}
    with local_cluster(nodes=0, node_timeout_s=3, log_level="info", store=store) as cluster:
        opts = call_options(cluster)
        conductor = psutil.Process(cluster.conductor.proc.pid)
        etcd = psutil.Process(cluster.etcd.process.pid) if hasattr(cluster, "etcd") else None
        sim, _joined_s = start_sim(cluster, NODES)
        try:
            time.sleep(3)  # past the joins
            out["idle"] = windows([conductor, etcd], count, seconds)
            trio.run(deploy, opts, apps, 100)
            trio.run(wait_all_ready, opts, apps * 100)
            time.sleep(3)
            out["replicas"] = windows([conductor, etcd], count, seconds)
        finally:
            sim.kill()
            sim.wait()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one 5 s window")
    options = parser.parse_args()
    count, seconds = (1, 5.0) if options.quick else (3, 10.0)
    apps = 10
    results = {s: measure(s, count, seconds, apps) for s in ("etcd-disk", "state")}
    print("## Conductor CPU, 1,000 simulated nodes, etcd store vs state file "
          "(bench/ha_nodes.py)")
    print()
    print(f"Machine: {machine()}. {count} window(s) of {seconds:g} s, median; "
          "100 % = one core.")
    print()
    print("| store | fleet | conductor CPU % | etcd CPU % |")
    print("|---|---|---|---|")
    for store, label in (("etcd-disk", "`--store`, etcd on disk"),
                         ("state", "`--state FILE`")):
        for phase, what in (("idle", f"{NODES} nodes heartbeating, no replica"),
                            ("replicas", f"{NODES} nodes, {apps * 100} replicas ready")):
            cpu, etcd = results[store][phase]
            print(f"| {label} | {what} | {cpu:.1f} | "
                  f"{'' if store == 'state' else f'{etcd:.1f}'} |")


if __name__ == "__main__":
    main()
