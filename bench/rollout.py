"""Rollout wall time: readiness-gated (health check) against the fixed 8 s settle window.

Method: a real conductor and two real node agents on loopback; the example
HTTP service (manifests/apps/hello_http.py, starts in ~50 ms) with 3 replicas.
Each run deploys v1, then times from sending the signed `rollout` request to
`rollout-status` reporting `complete` (polled every 20 ms on the open
connection), for v1 -> v2. Variant A has a health check (GET /healthz every
100 ms, surge 1); variant B has no health check, so each batch waits the
default 8 s settle window, which is what the original design did.

Larger rollouts: 10 and 50 replicas of `/bin/sleep` that count as ready
100 ms after they start (`settle 100ms`, no health check), with surge 1, 5
and 10; the same method (the 8 s variant is left out there: it only scales
the settle window).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import trio
from _harness import REPO, call_options, local_cluster, machine

from skr8tr import client

HELLO = REPO / "manifests" / "apps" / "hello_http.py"


def manifest(version: str, *, health: bool | None, replicas: int, surge: int) -> str:
    """health: True (example service, health check), False (example service, fixed
    8 s settle) or None (`/bin/sleep`, ready 100 ms after it starts)."""
    if health is None:
        return (f"app web\n  exec /bin/sleep\n  args 3600\n  replicas {replicas}\n"
                f"  env\n    VERSION {version}\n  rollout\n    settle 100ms\n"
                f"    surge {surge}\n")
    text = (f"app web\n  exec {HELLO}\n  args --host {{host}} --port {{port}} --version "
            f"{version}\n  port auto\n  replicas {replicas}\n")
    if health:
        text += "  health\n    check GET /healthz\n    interval 100ms\n"
    text += f"  rollout\n    surge {surge}\n"
    return text


async def one_rollout(opts, *, health: bool | None, replicas: int, surge: int) -> float:
    args = {"format": "skr8tr", "base_dir": str(REPO)}
    async with client.open_conductor(opts.conductor, "/v1/cli", opts.timeout_s) as ws:
        await client.call_on(ws, opts, "up", dict(args, manifest=manifest(
            "v1", health=health, replicas=replicas, surge=surge)))
        while True:  # until every v1 replica is ready
            rows = await client.call_on(ws, opts, "list", {"app": "web"})
            if len(rows) == replicas and all(r["state"] == "ready" for r in rows):
                break
            await trio.sleep(0.05)
        t0 = time.perf_counter()
        status = await client.call_on(ws, opts, "rollout", dict(args, manifest=manifest(
            "v2", health=health, replicas=replicas, surge=surge), force=False))
        while status["state"] == "rolling":
            await trio.sleep(0.02)
            status = await client.call_on(ws, opts, "rollout-status", {"app": "web"})
        elapsed = time.perf_counter() - t0
        assert status["state"] == "complete", status
        await client.call_on(ws, opts, "down", {"app": "web"})
        while await client.call_on(ws, opts, "list", {"app": None}):
            await trio.sleep(0.05)
        return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="one run per variant; of the larger ones only 10/5 and 50/10")
    runs = 1 if parser.parse_args().quick else 3
    cases = [("health check, surge 1", True, 3, 1),
             ("fixed 8 s settle, surge 1", False, 3, 1)]
    sizes = ((10, 5), (50, 10)) if runs == 1 else (
        (replicas, surge) for replicas in (10, 50) for surge in (1, 5, 10))
    cases += [(f"/bin/sleep ready after 100 ms, surge {surge}", None, replicas, surge)
              for replicas, surge in sizes]
    results = []
    with local_cluster(nodes=2, log_level="info") as cluster:
        opts = call_options(cluster)
        for label, health, replicas, surge in cases:
            times = [trio.run(functools.partial(one_rollout, opts, health=health,
                                                replicas=replicas, surge=surge))
                     for _ in range(runs)]
            results.append((label, replicas, times))
    print("## Rollout wall time (bench/rollout.py)")
    print()
    print(f"Machine: {machine()}. Runs per variant: {runs}.")
    print()
    print("| variant | replicas | median s | min s | max s |")
    print("|---|---|---|---|---|")
    for label, replicas, times in results:
        print(f"| {label} | {replicas} | {statistics.median(times):.2f} | {min(times):.2f} "
              f"| {max(times):.2f} |")


if __name__ == "__main__":
    main()
