"""Ingress overhead: requests/s and latency through `skr8tr ingress` vs straight to a replica.

Method: a real conductor and one real node agent on loopback; the example HTTP
service (manifests/apps/hello_http.py, a threaded stdlib server) with one
replica; `skr8tr ingress --route /:web` in front of it as its own process.
The load generator (tests/loadgen.py: trio + h11, keep-alive, closed
loop: each client sends its next GET / as soon as the last one is answered)
runs in this process, first straight at the replica's port, then at the
ingress, for 1, 16 and 64 concurrent clients. Each run is preceded by a 0.5 s
warm-up (connections opened, the ingress's pool filled) that is not counted.
Everything shares the same cores, so the figures compare the two paths on one
machine; they are not the capacity of a dedicated ingress host.

``--count``: the ingress runs with ``--key`` and so counts every attempt per
replica for the rollout analysis (skr8tr/ingress/traffic.py); the key is the
run's admin key, which the conductor does not take as an ingress's, so the
reports themselves are refused: what is measured is the counting on the
request path, the only part of it a request pays for.
"""

from __future__ import annotations

import argparse

import trio
from _harness import REPO, call_options, local_cluster, machine

from skr8tr import client
from tests import loadgen
from tests.conftest import http_get
from tests.e2e import poll

HELLO = REPO / "manifests" / "apps" / "hello_http.py"
CLIENTS = (1, 16, 64)
MAX_REQUESTS = 500_000  # a bound on each run besides its duration


def manifest() -> str:
    return (f"app web\n  exec {HELLO}\n  args --host {{host}} --port {{port}} --version v1\n"
            "  port auto\n  replicas 1\n  health\n    check GET /healthz\n"
            "    interval 200ms\n")


async def deploy(opts) -> dict:
    args = {"format": "skr8tr", "base_dir": str(REPO), "manifest": manifest()}
    async with client.open_conductor(opts.conductor, "/v1/cli", opts.timeout_s) as ws:
        await client.call_on(ws, opts, "up", args)
        while True:
            rows = await client.call_on(ws, opts, "list", {"app": "web"})
            if len(rows) == 1 and rows[0]["state"] == "ready":
                return rows[0]
            await trio.sleep(0.05)


def measure(url: str, clients: int, duration_s: float) -> dict:
    trio.run(lambda: loadgen.run_load(url, concurrency=clients, duration_s=0.5,
                                      max_requests=MAX_REQUESTS))
    samples = trio.run(lambda: loadgen.run_load(url, concurrency=clients,
                                                duration_s=duration_s,
                                                max_requests=MAX_REQUESTS))
    summary = loadgen.summarize(samples)
    summary["rate_per_s"] = round(len(samples) / duration_s, 1)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1.5 s per run instead of 5 s")
    parser.add_argument("--count", action="store_true",
                        help="the ingress counts traffic per replica (runs with --key)")
    args = parser.parse_args()
    duration_s = 1.5 if args.quick else 5.0
    results = []
    with local_cluster(nodes=1) as cluster:
        row = trio.run(deploy, call_options(cluster))
        direct = f"http://127.0.0.1:{row['port']}/"
        counting = ("--key", str(cluster.admin_key)) if args.count else ()
        _, ingress_url = cluster.start_ingress("/:web", extra=("--log-level", "info",
                                                               *counting))
        host, port = ingress_url.removeprefix("http://").split(":")
        poll(lambda: http_get(host, int(port))[0] == 200,
             what="the ingress to route to the replica")
        for clients in CLIENTS:
            results.append((clients, measure(direct, clients, duration_s),
                            measure(ingress_url + "/", clients, duration_s)))
    print("## Ingress (bench/ingress.py)")
    print()
    print(f"Machine: {machine()}. {duration_s:g} s per run, closed loop, keep-alive, one "
          "hello_http replica; load generator, ingress and replica share the machine"
          + ("; the ingress counts traffic per replica (--count)." if args.count else "."))
    print()
    print("| clients | direct req/s | direct p50 ms | direct p99 ms | ingress req/s "
          "| ingress p50 ms | ingress p99 ms | failed |")
    print("|---|---|---|---|---|---|---|---|")
    for clients, d, i in results:
        failed = d["failed"] + d["non_2xx"] + i["failed"] + i["non_2xx"]
        print(f"| {clients} | {d['rate_per_s']:.0f} | {d['p50_ms']:.2f} | {d['p99_ms']:.2f} "
              f"| {i['rate_per_s']:.0f} | {i['p50_ms']:.2f} | {i['p99_ms']:.2f} | {failed} |")


if __name__ == "__main__":
    main()
