"""Deploy latency: a signed `up` leaving the client -> the replica's pid -> the replica ready.

Method: a real conductor and one real node agent on loopback (log level
info, the default). One process holds an open `/v1/cli` connection and an
open `/v1/watch` stream. Each deploy signs an `up` of a new app name (one
replica), starts the clock as the request leaves, and stops it when the
watch stream delivers `replica.running` (the node reported the pid) and
`replica.ready`; then `down`, and the next deploy starts once
`replica.exited` arrived. No CLI start-up is in these figures; it is
measured on its own: `skr8tr ping` as a whole process, against the same
conductor. The read round trip (an unsigned `ping` on an open connection,
from send to reply) is taken with both wire clients, the Trio one (skr8tr.ws.trio_client)
and the CLI's blocking one, taking turns call by call so that both see the
same machine. Floors: spawning `/bin/sleep` from Python (trio) and the example
service's own start (spawn -> first `200` on /healthz, polled every 1 ms).
"""

from __future__ import annotations

import argparse
import functools
import json
import socket
import subprocess
import sys
import time

import trio
from _harness import (
    REPO,
    EventClock,
    blocking_timed_call,
    call_options,
    local_cluster,
    machine,
    median,
    pct,
    request_text,
    timed_call,
)

from skr8tr import blocking_client, client

HELLO = REPO / "manifests" / "apps" / "hello_http.py"
WARMUP = 5


def sleep_manifest(name: str) -> str:
    # No health check: ready once alive for `settle`, here 0 s (the floor).
    return f"app {name}\n  exec /bin/sleep\n  args 3600\n  rollout\n    settle 0s\n"


def http_manifest(name: str) -> str:
    return (f"app {name}\n  exec {HELLO}\n  args --host {{host}} --port {{port}}\n"
            "  port auto\n  health\n    check GET /healthz\n    interval 100ms\n")


async def deploy_series(opts, make_manifest, prefix: str, count: int
                        ) -> tuple[list[float], list[float]]:
    to_pid: list[float] = []
    to_ready: list[float] = []
    clock = EventClock()
    async with client.open_conductor(opts.conductor, "/v1/cli", opts.timeout_s) as ws, \
            client.open_watch(opts) as stream, trio.open_nursery() as nursery:
        nursery.start_soon(clock.serve, stream)
        for i in range(count + WARMUP):
            name = f"{prefix}-{i}"
            args = {"manifest": make_manifest(name), "format": "skr8tr",
                    "base_dir": str(REPO)}
            rid, text = request_text(opts, "up", args)
            t0 = time.perf_counter()
            await ws.send_message(text)
            reply = json.loads(await ws.get_message())
            assert reply["id"] == rid and reply["ok"], reply
            t_pid = await clock.wait(name, "replica.running")
            assert clock.data[(name, "replica.running")]["pid"], "running without a pid"
            t_ready = await clock.wait(name, "replica.ready")
            await timed_call(ws, opts, "down", {"app": name})
            await clock.wait(name, "replica.exited")
            if i >= WARMUP:
                to_pid.append(t_pid - t0)
                to_ready.append(t_ready - t0)
        nursery.cancel_scope.cancel()
    return to_pid, to_ready


def deploy_series_blocking(opts, make_manifest, prefix: str, count: int
                           ) -> tuple[list[float], list[float]]:
    """:func:`deploy_series` with the CLI's blocking client: one connection for the
    commands, one for /v1/watch. The clock stops when the event is read from the watch
    socket; the `up` reply (sent before it) is read afterwards, from the buffer."""
    to_pid: list[float] = []
    to_ready: list[float] = []
    with blocking_client.open_conductor(opts.conductor, "/v1/cli", opts.timeout_s) as conn, \
            blocking_client.open_watch(opts) as stream:
        events = iter(stream)

        def wait(name: str, event: str) -> float:
            for msg in events:
                if msg.type == "event" and msg.event == event and msg.data.get("app") == name:
                    return time.perf_counter()
            raise RuntimeError("the watch stream ended")

        for i in range(count + WARMUP):
            name = f"{prefix}-{i}"
            args = {"manifest": make_manifest(name), "format": "skr8tr",
                    "base_dir": str(REPO)}
            rid, text = request_text(opts, "up", args)
            t0 = time.perf_counter()
            conn.send_text(text)
            t_pid = wait(name, "replica.running")
            t_ready = wait(name, "replica.ready")
            reply = json.loads(conn.receive_message())
            assert reply["id"] == rid and reply["ok"], reply
            blocking_timed_call(conn, opts, "down", {"app": name})
            wait(name, "replica.exited")
            if i >= WARMUP:
                to_pid.append(t_pid - t0)
                to_ready.append(t_ready - t0)
    return to_pid, to_ready


async def spawn_floor(runs: int) -> list[float]:
    """Seconds for trio to spawn /bin/sleep (fork + exec), the node's own floor."""
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        proc = await trio.lowlevel.open_process(["/bin/sleep", "3600"],
                                                start_new_session=True)
        times.append(time.perf_counter() - t0)
        proc.kill()
        await proc.wait()
    return times


def app_start(runs: int) -> list[float]:
    """Seconds from spawning the example service to its first 200 on /healthz."""
    times = []
    for _ in range(runs):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        t0 = time.perf_counter()
        # As the node runs it: the file itself, so its `#!/usr/bin/env python3` line
        # picks the interpreter from PATH (here a pyenv shim, ~60 ms slower to start
        # than the venv's python).
        proc = subprocess.Popen([str(HELLO), "--host", "127.0.0.1",
                                 "--port", str(port)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            while True:
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=1) as c:
                        c.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                        if c.recv(64).split(b" ")[1:2] == [b"200"]:
                            break
                except OSError:
                    time.sleep(0.001)
            times.append(time.perf_counter() - t0)
        finally:
            proc.terminate()
            proc.wait()
    return times


def cli_start(cluster, runs: int) -> tuple[list[float], list[float]]:
    """Wall seconds of `skr8tr ping` as a whole process, and of `python -c pass`."""
    script = [str(REPO / ".venv" / "bin" / "skr8tr"), "ping", "--conductor", cluster.url]
    ping, bare = [], []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(script, env=cluster.env, check=True, stdout=subprocess.DEVNULL)
        ping.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        bare.append(time.perf_counter() - t0)
    return ping, bare


def ms(x: float) -> str:
    return f"{x * 1000:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="30 deploys instead of 200")
    parser.add_argument("--deploys", type=int, default=None)
    options = parser.parse_args()
    count = options.deploys or (30 if options.quick else 200)
    cli_runs = 10 if options.quick else 30
    rows = []
    with local_cluster(nodes=1, log_level="info") as cluster:
        opts = call_options(cluster)
        for label, make, prefix in (("/bin/sleep (settle 0 s)", sleep_manifest, "sleep"),
                                    ("example HTTP service (probe every 100 ms)",
                                     http_manifest, "web")):
            pid, ready = trio.run(functools.partial(deploy_series, opts, make, prefix, count))
            rows.append((f"{label}, trio client", pid, ready))
            pid, ready = deploy_series_blocking(opts, make, f"{prefix}-b", count)
            rows.append((f"{label}, blocking client (the CLI's)", pid, ready))
        ping, bare = cli_start(cluster, cli_runs)
        trio_rtt, blocking_rtt = _read_rtts(opts, 2000 if not options.quick else 300)
    spawn = trio.run(spawn_floor, 50)
    start = app_start(10 if options.quick else 30)

    print("## Deploy latency (bench/deploy.py)")
    print()
    print(f"Machine: {machine()}. {count} deploys per workload after {WARMUP} warm-up "
          "deploys; one node agent; times in ms, taken in the client process.")
    print()
    print("| workload | up -> pid p50 | p99 | up -> ready p50 | p99 |")
    print("|---|---|---|---|---|")
    for label, pid, ready in rows:
        print(f"| {label} | {ms(median(pid))} | {ms(pct(pid, 99))} | {ms(median(ready))} "
              f"| {ms(pct(ready, 99))} |")
    print()
    print("| other figure | median ms | p99 ms |")
    print("|---|---|---|")
    for label, rtt in (("trio client", trio_rtt),
                       ("blocking client (the CLI's)", blocking_rtt)):
        print(f"| read round trip (`ping`, open connection, {len(rtt)} calls), {label} "
              f"| {ms(median(rtt))} | {ms(pct(rtt, 99))} |")
    print(f"| `skr8tr ping`, whole process ({len(ping)} runs) | {ms(median(ping))} "
          f"| {ms(pct(ping, 99))} |")
    print(f"| `python -c pass` (interpreter floor) | {ms(median(bare))} | {ms(pct(bare, 99))} |")
    print(f"| spawn /bin/sleep from trio (the node's floor) | {ms(median(spawn))} "
          f"| {ms(pct(spawn, 99))} |")
    print(f"| example service: spawn -> first answer on /healthz | {ms(median(start))} "
          f"| {ms(pct(start, 99))} |")


async def _trio_rtts(opts, count: int) -> list[float]:
    """Round trips of `ping` with the trio client; the first 50 are warm-up."""
    unsigned = client.CallOptions(opts.conductor, opts.timeout_s, None)
    rtts: list[float] = []
    async with client.open_conductor(opts.conductor, "/v1/cli", opts.timeout_s) as ws:
        for i in range(50 + count):
            elapsed = (await timed_call(ws, unsigned, "ping", {}))[0]
            if i >= 50:
                rtts.append(elapsed)
    return rtts


def _blocking_rtts(opts, count: int) -> list[float]:
    """Round trips of `ping` with the CLI's blocking client, as the CLI runs it: no
    event loop in this process at the time. The first 50 are warm-up."""
    unsigned = client.CallOptions(opts.conductor, opts.timeout_s, None)
    rtts: list[float] = []
    with blocking_client.open_conductor(opts.conductor, "/v1/cli", opts.timeout_s) as conn:
        for i in range(50 + count):
            elapsed = blocking_timed_call(conn, unsigned, "ping", {})[0]
            if i >= 50:
                rtts.append(elapsed)
    return rtts


def _read_rtts(opts, count: int) -> tuple[list[float], list[float]]:
    """Both clients, in three alternating blocks each, so both see the same machine."""
    trio_rtt: list[float] = []
    blocking_rtt: list[float] = []
    for _ in range(3):
        trio_rtt += trio.run(_trio_rtts, opts, count // 3)
        blocking_rtt += _blocking_rtts(opts, count // 3)
    return trio_rtt, blocking_rtt


if __name__ == "__main__":
    main()
