"""Scale: one conductor, 1,000 simulated nodes heartbeating every second, 10,000 replicas.

Method: a real conductor (`--node-timeout 3`, so nodes beat every 1 s; log
level info) and one other process (bench/_simnodes.py) holding 1,000 real
node sessions that speak the real protocol and answer launches with fake
pids. Then, from this process on open connections:
1. conductor CPU% (psutil, over a window) with the idle fleet;
2. 100 apps x 100 replicas (`port auto`), each a signed `up`: its round trip
   divided by 100 is the placement time per replica (first and last ten apps
   reported apart, to show how it grows with the replicas already placed);
3. with every replica ready: conductor CPU% and RSS, `list`, `status`,
   `nodes` round trips (median of 10);
4. 100 nodes fall silent at once (one last heartbeat, then nothing): the time
   from the first `node.lost` event to the last of their replicas `ready`
   elsewhere (both as received on /v1/watch; this includes the simulator's
   answers to the 1,000 launches).
"""

from __future__ import annotations

import argparse
import functools
import subprocess
import sys
import time

import psutil
import trio
from _harness import (
    REPO,
    call_options,
    local_cluster,
    machine,
    median,
    raise_fd_limit,
    timed_call,
)

from skr8tr import client


def manifest(name: str, replicas: int) -> str:
    return (f"app {name}\n  exec /bin/sleep\n  args 3600\n  port auto\n"
            f"  replicas {replicas}\n")


def cpu_pct(proc: psutil.Process, seconds: float) -> float:
    proc.cpu_percent(None)
    time.sleep(seconds)
    return proc.cpu_percent(None)


def start_sim(cluster, count: int) -> tuple[subprocess.Popen, float]:
    t0 = time.perf_counter()
    sim = subprocess.Popen(
        [sys.executable, str(REPO / "bench" / "_simnodes.py"), "--url",
         cluster.url + "/v1/node", "--key", str(cluster.node_key), "--count", str(count)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = sim.stdout.readline().strip()
    assert line == f"joined {count}", f"the simulator said {line!r}"
    return sim, time.perf_counter() - t0


async def deploy(opts, apps: int, per_app: int) -> list[float]:
    """Seconds per `up` of each app."""
    times = []
    async with client.open_conductor(opts.conductor, "/v1/cli", opts.timeout_s) as ws:
        for i in range(apps):
            elapsed, result = await timed_call(ws, opts, "up", {
                "manifest": manifest(f"app{i}", per_app), "format": "skr8tr",
                "base_dir": str(REPO)})
            assert len(result["replicas"]) == per_app, result
            times.append(elapsed)
    return times


async def wait_all_ready(opts, total: int) -> list[dict]:
    async with client.open_conductor(opts.conductor, "/v1/cli", opts.timeout_s) as ws:
        while True:
            _, rows = await timed_call(ws, opts, "list", {"app": None})
            if len(rows) == total and all(r["state"] == "ready" for r in rows):
                return rows
            await trio.sleep(0.5)


async def round_trips(opts, runs: int) -> dict[str, list[float]]:
    unsigned = client.CallOptions(opts.conductor, opts.timeout_s, None)
    out: dict[str, list[float]] = {}
    async with client.open_conductor(opts.conductor, "/v1/cli", opts.timeout_s) as ws:
        for cmd, args in (("ping", {}), ("list", {"app": None}), ("list", {"app": "app0"}),
                          ("status", {}), ("nodes", {})):
            label = cmd if cmd != "list" else f"list {args['app'] or '(all)'}"
            out[label] = [(await timed_call(ws, unsigned, cmd, args))[0] for _ in range(runs)]
    return out


async def replace_silenced(opts, sim: subprocess.Popen, silenced: set[str], lost: int,
                           total: int) -> float:
    """Silence the nodes; seconds from the first `node.lost` to the `replica.ready` of the
    last of their ``lost`` replicas placed elsewhere (events received on /v1/watch). If the
    conductor cuts the watcher off in the burst, the end is found by polling `list`."""
    lost_at = None
    ready_at = None
    placed: set[str] = set()
    ready = 0
    async with client.open_watch(opts) as stream, trio.open_nursery() as nursery:
        async def follow() -> None:
            nonlocal lost_at, ready_at, ready
            try:
                async for msg in stream:
                    if msg.type != "event":
                        continue
                    if msg.event == "node.lost" and lost_at is None:
                        lost_at = time.perf_counter()
                    elif msg.event == "replica.placed" and lost_at is not None:
                        placed.add(msg.data["replica"])
                    elif msg.event == "replica.ready" and msg.data["replica"] in placed:
                        ready += 1
                        if ready == lost:
                            ready_at = time.perf_counter()
                            break
            except client.ClientError:
                pass  # cut off
            nursery.cancel_scope.cancel()

        nursery.start_soon(follow)
        await trio.sleep(1.0)  # the watch snapshot of every replica has arrived
        sim.stdin.write(f"silence {len(silenced)}\n")
        sim.stdin.flush()
        await trio.sleep(60)
        raise AssertionError("no node expired within 60 s")
    assert lost_at is not None
    if ready_at is not None:
        return ready_at - lost_at
    async with client.open_conductor(opts.conductor, "/v1/cli", opts.timeout_s) as ws:
        while True:
            _, rows = await timed_call(ws, opts, "list", {"app": None})
            done = time.perf_counter()
            if (len(rows) == total and all(r["state"] == "ready" for r in rows)
                    and not any(r["node"] in silenced for r in rows)):
                return done - lost_at
            await trio.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="200 nodes, 2,000 replicas, shorter CPU windows")
    parser.add_argument("--nodes", type=int)
    parser.add_argument("--apps", type=int)
    parser.add_argument("--per-app", type=int, default=100)
    parser.add_argument("--silence", type=int)
    options = parser.parse_args()
    nodes = options.nodes or (200 if options.quick else 1000)
    apps = options.apps or (20 if options.quick else 100)
    silence = options.silence or nodes // 10
    window_s = 3.0 if options.quick else 10.0
    total = apps * options.per_app
    raise_fd_limit()

    with local_cluster(nodes=0, node_timeout_s=3.0, log_level="info") as cluster:
        opts = call_options(cluster)
        opts = client.CallOptions(opts.conductor, 300.0, opts.signing_key)
        conductor = psutil.Process(cluster.conductor.proc.pid)
        rss_empty = conductor.memory_info().rss
        sim, join_s = start_sim(cluster, nodes)
        try:
            time.sleep(2.0)
            cpu_idle = cpu_pct(conductor, window_s)
            t0 = time.perf_counter()
            up_times = trio.run(deploy, opts, apps, options.per_app)
            rows = trio.run(wait_all_ready, opts, total)
            deploy_s = time.perf_counter() - t0
            time.sleep(2.0)
            cpu_full = cpu_pct(conductor, window_s)
            rss_full = conductor.memory_info().rss
            rtts = trio.run(round_trips, opts, 10)
            silenced = {f"sim-{i:04d}" for i in range(silence)}
            lost = sum(r["node"] in silenced for r in rows)
            replace_s = trio.run(functools.partial(replace_silenced, opts, sim, silenced,
                                                   lost, total))
        finally:
            sim.kill()
            sim.wait()

    per_replica_first = median(up_times[:10]) / options.per_app
    per_replica_last = median(up_times[-10:]) / options.per_app
    print("## Scale (bench/scale.py)")
    print()
    print(f"Machine: {machine()}. {nodes} simulated nodes (one process, real sessions, "
          f"heartbeat 1 s), {apps} apps x {options.per_app} replicas = {total}; CPU% over "
          f"{window_s:g} s windows (100 % = one core).")
    print()
    print("| figure | value |")
    print("|---|---|")
    print(f"| {nodes} nodes joined (handshakes, 50 at a time) | {join_s:.2f} s |")
    print(f"| conductor RSS, no node | {rss_empty / 2**20:.1f} MB |")
    print(f"| conductor CPU, {nodes} nodes heartbeating, no replica | {cpu_idle:.1f} % |")
    print(f"| conductor CPU, {nodes} nodes heartbeating, {total} replicas | {cpu_full:.1f} % |")
    print(f"| conductor RSS, {nodes} nodes, {total} replicas | {rss_full / 2**20:.1f} MB |")
    print(f"| placement per replica (`up` of {options.per_app} / {options.per_app}), first "
          f"10 apps | {per_replica_first * 1000:.3f} ms |")
    print(f"| placement per replica, last 10 apps ({total - 10 * options.per_app}+ placed) "
          f"| {per_replica_last * 1000:.3f} ms |")
    print(f"| deploy {total} replicas, first `up` to all ready | {deploy_s:.2f} s |")
    for label, times in rtts.items():
        print(f"| `{label}` round trip, median of {len(times)} | {median(times) * 1000:.2f} ms |")
    print(f"| {silence} nodes expire -> their {lost} replicas ready elsewhere (from the "
          f"first `node.lost` to the last `replica.ready`) | {replace_s * 1000:.0f} ms |")


if __name__ == "__main__":
    main()
