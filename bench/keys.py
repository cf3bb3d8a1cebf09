"""Key algorithms (#16): Ed25519, ML-DSA-65 and the hybrid, in-process and end to end.

Method. In-process (this process, one core): for each algorithm a fresh key
signs a `scale tp 1` request as the CLI builds it; timed, each the median of
many calls after a warm-up: the signature of the request's canonical bytes,
its verification (`signatures.verify`, the parsed public key cached as in the
conductor), the whole `envelope.check_signature` of the parsed request (field
checks, authorized-keys lookup, fingerprint, canonical JSON, verify), the
whole `protocol.authenticate_request` of the JSON text (decode + the above),
and making the key from its `signing.sec` text (what every CLI run does).

End to end: three clusters side by side, one per algorithm (a real conductor,
log level info, no state file, and one real node agent; admin and node keys of
that algorithm). Each conductor is pinned to core 0 (every thread, after
start); this process (the load generator), the node agents and the CLI runs
are pinned to the other core(s). The conductors run with `--max-bytes-per-s`
raised to 1 GiB/s: the default byte budget per client address (16 MiB/s) is
itself about 1,540 hybrid requests/s. Runs are interleaved across the three
algorithms, so that all see the same machine.
- Signed mutating requests/s: bench/throughput.py's `scale tp 1` (the count it
  has), signed before the clock starts, a closed loop per connection, 1 and 32
  connections; conductor and load generator CPU from psutil over each run
  (100 % = one core).
- Deploy -> pid: bench/deploy.py's `/bin/sleep` case (trio client; from writing
  the signed `up` to the watch stream's `replica.running`), in blocks of 5
  warm-up then N timed deploys per cluster.
- `skr8tr up FILE --key KEY` as a whole process (a new app each run, taken
  down afterwards, untimed); `skr8tr ping` (unsigned) and `python -c pass` as
  whole processes for reference.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import statistics
import subprocess
import sys
import time

import psutil
import trio
from _harness import (
    REPO,
    call_options,
    cpu_seconds,
    load_average,
    local_cluster,
    machine,
    median,
    pct,
    pin_process,
)
from deploy import WARMUP, cli_start, deploy_series, sleep_manifest
from throughput import run_batches, set_up, signed_batches

from skr8tr import blocking_client, wire
from skr8tr.core import protocol, signatures
from skr8tr.core.envelope import canonical_json, check_signature
from skr8tr.core.keys import parse_authorized_keys, parse_signing_key, secret_key_line

ALGS = ("ed25519", "ml-dsa-65", "ed25519+ml-dsa-65")
SCALE = ("scale", {"app": "tp", "replicas": 1})
BYTE_BUDGET = str(1 << 30)  # --max-bytes-per-s for the conductors (see the docstring)
RUN_LIMIT_S = 120.0  # any one timed run (a trio.run) must end within this


# --------------------------------------------------------------------------- in-process


def median_us(fn, count: int, budget_s: float) -> tuple[float, int]:
    """(median µs, calls timed) of ``fn()``: 20 warm-up calls, then up to ``count``
    calls or ``budget_s`` seconds, whichever comes first."""
    for _ in range(20):
        fn()
    times: list[int] = []
    deadline = time.perf_counter() + budget_s
    for _ in range(count):
        t0 = time.perf_counter_ns()
        fn()
        times.append(time.perf_counter_ns() - t0)
        if time.perf_counter() > deadline:
            break
    return statistics.median(times) / 1000, len(times)


def in_process(name: str, count: int, budget_s: float) -> dict:
    alg = signatures.algorithm_named(name)
    signer = signatures.generate(alg)
    authorized = parse_authorized_keys(f"admin {signer.public} bench\n")
    req = wire.build_request(*SCALE, signer)
    text = json.dumps(req)
    message = canonical_json({k: v for k, v in req.items() if k != "sig"})
    sec_text = secret_key_line(signer).encode()
    assert signatures.verify(signer.public, message, req["sig"])
    auth = protocol.authenticate_request(text, authorized=authorized)
    assert isinstance(auth, protocol.Authenticated) and auth.signer is not None, auth
    timed = {
        "sign": lambda: signer.sign(message),
        "verify": lambda: signatures.verify(signer.public, message, req["sig"]),
        "check_signature": lambda: check_signature(req, authorized=authorized),
        "authenticate_request": lambda: protocol.authenticate_request(
            text, authorized=authorized),
        "key load": lambda: parse_signing_key(sec_text, filename="signing.sec"),
    }
    row = {"alg": alg, "key_chars": len(signer.public), "request_bytes": len(text.encode()),
           "signed_bytes": len(message)}
    for label, fn in timed.items():
        row[label] = median_us(fn, count, budget_s)
    return row


# --------------------------------------------------------------------------- clusters


async def bounded(fn, *args):
    with trio.fail_after(RUN_LIMIT_S):
        return await fn(*args)


def throughput(opts, conductors, total: int, runs: int) -> list[tuple]:
    """Rows (alg, connections, rates, conductor CPU %s, client CPU %s, req per
    conductor CPU-second)."""
    me = psutil.Process()
    rows = []
    for connections in (1, 32):
        got: dict[str, tuple[list, list, list, list]] = {a: ([], [], [], []) for a in ALGS}
        for _ in range(runs):
            for alg in ALGS:
                batches = signed_batches(opts[alg], *SCALE, connections, total // connections)
                c0, m0, t0 = cpu_seconds(conductors[alg]), cpu_seconds(me), time.perf_counter()
                rate = trio.run(bounded, run_batches, opts[alg], batches)
                wall = time.perf_counter() - t0
                c_cpu, m_cpu = cpu_seconds(conductors[alg]) - c0, cpu_seconds(me) - m0
                rates, c_pct, m_pct, per_cpu = got[alg]
                rates.append(rate)
                c_pct.append(100 * c_cpu / wall)
                m_pct.append(100 * m_cpu / wall)
                per_cpu.append(sum(map(len, batches)) / c_cpu)
        rows += [(alg, connections, *got[alg]) for alg in ALGS]
    return rows


def deploys(opts, blocks: int, per_block: int) -> dict[str, list[float]]:
    """up -> pid seconds per algorithm, in blocks interleaved across the clusters."""
    to_pid: dict[str, list[float]] = {a: [] for a in ALGS}
    for block in range(blocks):
        for alg in ALGS:
            pid, _ready = trio.run(bounded, functools.partial(
                deploy_series, opts[alg], sleep_manifest, f"k{block}", per_block))
            to_pid[alg] += pid
    return to_pid


def cli_up(clusters, opts, runs: int) -> tuple[dict[str, list[float]], list[float], list[float]]:
    """Wall seconds of `skr8tr up FILE --key KEY` per algorithm (a new app each run,
    taken down afterwards), and of `skr8tr ping` and `python -c pass` (per round)."""
    script = str(REPO / ".venv" / "bin" / "skr8tr")
    up: dict[str, list[float]] = {a: [] for a in ALGS}
    ping: list[float] = []
    bare: list[float] = []
    for i in range(runs):
        for alg in ALGS:
            cluster = clusters[alg]
            name = f"cli-{i}"
            path = cluster.root / f"{name}.skr8tr"
            path.write_text(sleep_manifest(name))
            t0 = time.perf_counter()
            subprocess.run([script, "up", str(path), "--conductor", cluster.url,
                            "--key", str(cluster.admin_key)], env=cluster.env, check=True,
                           stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL, timeout=30)
            up[alg].append(time.perf_counter() - t0)
            blocking_client.call(opts[alg], "down", {"app": name})
        p, b = cli_start(clusters[ALGS[0]], 1)
        ping += p
        bare += b
    return up, ping, bare


# --------------------------------------------------------------------------- output


def us(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


def ms(x: float) -> str:
    return f"{x * 1000:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short runs, one of each")
    options = parser.parse_args()
    quick = options.quick
    calls, budget_s = (300, 2.0) if quick else (2000, 10.0)
    total, runs = (1200, 1) if quick else (6000, 3)
    blocks, per_block = (1, 10) if quick else (3, 20)
    cli_runs = 5 if quick else 20

    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        sys.exit("bench/keys.py needs 2 cores: the conductor on one, the load on the rest")
    conductor_core, load_cores = {cores[0]}, set(cores[1:])
    os.sched_setaffinity(0, load_cores)  # inherited by the daemons and CLI runs started below
    load_before = load_average()
    started = time.strftime("%Y-%m-%d %H:%M", time.gmtime())

    ops = [in_process(alg, calls, budget_s) for alg in ALGS]
    with contextlib.ExitStack() as stack:
        clusters = {alg: stack.enter_context(local_cluster(
            nodes=1, log_level="info", key_alg=alg,
            conductor_flags=("--max-bytes-per-s", BYTE_BUDGET))) for alg in ALGS}
        conductors = {}
        for alg, cluster in clusters.items():
            pin_process(cluster.conductor.proc.pid, conductor_core)
            conductors[alg] = psutil.Process(cluster.conductor.proc.pid)
        opts = {alg: call_options(cluster) for alg, cluster in clusters.items()}
        for alg in ALGS:
            trio.run(set_up, opts[alg])
        rates = throughput(opts, conductors, total, runs)
        to_pid = deploys(opts, blocks, per_block)
        up, ping, bare = cli_up(clusters, opts, cli_runs)
    load_after = load_average()
    ended = time.strftime("%H:%M", time.gmtime())

    print("## Key algorithms (#16) (bench/keys.py)")
    print()
    print(f"Machine: {machine()}; {started}-{ended} UTC; load average (1 / 5 / 15 min) "
          f"{load_before} before, {load_after} after. Conductors pinned to core "
          f"{cores[0]}, everything else to {', '.join(map(str, sorted(load_cores)))}.")
    print()
    print("| algorithm | public key bytes | signature bytes | `key` text chars "
          "| signed bytes (canonical) | `scale` request on the wire, bytes |")
    print("|---|---|---|---|---|---|")
    for row in ops:
        a = row["alg"]
        print(f"| {a.name} | {a.public_bytes:,} | {a.signature_bytes:,} | {row['key_chars']:,} "
              f"| {row['signed_bytes']:,} | {row['request_bytes']:,} |")
    print()
    print("In-process, µs, median (calls timed):")
    print()
    labels = ("sign", "verify", "check_signature", "authenticate_request", "key load")
    print("| algorithm | " + " | ".join(labels) + " |")
    print("|---|" + "---|" * len(labels))
    for row in ops:
        print(f"| {row['alg'].name} | "
              + " | ".join(f"{us(row[k][0])} ({row[k][1]})" for k in labels) + " |")
    print()
    print(f"Signed `scale tp 1`, conductor on one core: {total:,} requests per run, "
          f"{runs} run(s) per case, median (min-max):")
    print()
    print("| algorithm | connections | req/s | conductor CPU % | load generator CPU % "
          "| req per conductor CPU-second |")
    print("|---|---|---|---|---|---|")
    for alg, connections, rs, c_pct, m_pct, per_cpu in rates:
        print(f"| {alg} | {connections} | {median(rs):,.0f} ({min(rs):,.0f}-{max(rs):,.0f}) "
              f"| {median(c_pct):.0f} | {median(m_pct):.0f} | {median(per_cpu):,.0f} |")
    print()
    print(f"Latency, ms ({blocks} x {per_block} deploys per algorithm, each block after "
          f"{WARMUP} warm-ups; {cli_runs} CLI runs):")
    print()
    print("| algorithm | deploy -> pid p50 | p99 | `skr8tr up` whole process p50 | p99 |")
    print("|---|---|---|---|---|")
    for alg in ALGS:
        print(f"| {alg} | {ms(median(to_pid[alg]))} | {ms(pct(to_pid[alg], 99))} "
              f"| {ms(median(up[alg]))} | {ms(pct(up[alg], 99))} |")
    print(f"| `skr8tr ping` whole process (unsigned) | | | {ms(median(ping))} "
          f"| {ms(pct(ping, 99))} |")
    print(f"| `python -c pass` | | | {ms(median(bare))} | {ms(pct(bare, 99))} |")
    leftovers = psutil.Process().children(recursive=True)
    if leftovers:
        print(f"warning: processes left: {[p.pid for p in leftovers]}", file=sys.stderr)


if __name__ == "__main__":
    main()
