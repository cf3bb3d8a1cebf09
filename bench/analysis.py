"""Traffic-gated rollouts: how fast a bad version is rolled back, and how many users saw it.

Method: a real conductor, two real node agents and one `skr8tr ingress` reporting with
a key of role `ingress`, on loopback; the example HTTP service (3 replicas, surge 1,
drain 1s, health check every 200 ms) at v1, with a `rollout.analysis` block (window W,
max-error-rate 1%, min-requests 20). tests/loadgen.py sends 100 requests/s (open loop)
through the ingress and records every response's `X-Version`. Then `skr8tr rollout` of
v2, which answers 500 to every 5th request (`--fail-rate 0.2`). Measured, from the
watch stream's event times and the load generator's records:
- ready -> failed: from v2's first replica `ready` to `rollout.failed` (the verdict);
- ready -> rolled back: to `rollout.finished` (v2 out of rotation and stopped, v1 back
  to 3 replicas);
- requests that saw v2: responses carrying `X-Version: v2` (and of them, the 500s);
- the target: the surge share of one window's traffic, rate x W x surge / (replicas +
  surge) (the new replica is one of four in rotation).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from _harness import machine

from tests.e2e import Cluster, private_env
from tests.test_e2e_analysis import start_ingress, web
from tests.test_ingress_load import start_load, start_watch, wait_serving

RATE = 100
REPLICAS, SURGE = 3, 1


def one_run(window_s: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="skr8tr-bench-analysis-") as tmp:
        root = Path(tmp)
        c = Cluster(root=root, env=private_env(root))
        c.make_keys()
        key = c.add_key("ingress", "ingress")
        try:
            c.start_conductor()
            c.start_node("n1", "127.0.0.1", "--keep-logs", "100")
            c.start_node("n2", "127.0.0.1", "--keep-logs", "100")
            analysis = f"window {window_s}s; max-error-rate 1%; min-requests 20"
            c.json("up", str(web(root, "v1", analysis=analysis)))
            c.wait_ready("web", REPLICAS, generation=1)
            url = start_ingress(c, "ingress", key)
            wait_serving(url, "v1")
            watch = start_watch(c)
            load = start_load(c, url, "load", RATE)
            bad = web(root, "v2", extra_args="--fail-rate 0.2", analysis=analysis)
            proc = c.cli("rollout", str(bad), "--watch", timeout_s=180)
            assert proc.returncode == 1, proc.stdout + proc.stderr
            samples = load.stop()
            ready = min(e["ts"] for e in watch.events("replica.ready")
                        if e["data"].get("generation") == 2)
            failed = watch.events("rollout.failed")[0]["ts"]
            finished = watch.events("rollout.finished")[-1]["ts"]
            v2 = [s for s in samples if s["version"] == "v2"]
            return {"ready_to_failed_s": failed - ready, "ready_to_rolled_back_s":
                    finished - ready, "saw_v2": len(v2),
                    "v2_errors": sum(1 for s in v2 if s["status"] == 500),
                    "old_failed": sum(1 for s in samples if s["version"] != "v2"
                                      and s["status"] != 200)}
        finally:
            c.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one run, window 5s")
    parser.add_argument("--runs", type=int, default=3)
    opts = parser.parse_args()
    windows = [5] if opts.quick else [5, 10]
    runs = 1 if opts.quick else opts.runs
    print("## Traffic-gated rollouts: a bad version rolled back (bench/analysis.py)\n")
    print(f"Machine: {machine()}. {RATE} req/s through one ingress; {REPLICAS} replicas, "
          f"surge {SURGE}; v2 fails 20 % of requests; {runs} run(s) per window, median "
          "(min-max).\n")
    print("| window | ready -> failed (s) | ready -> rolled back (s) | requests that saw v2 "
          "| of them 500 | target (surge share of one window) | v1 requests failed |")
    print("|---|---|---|---|---|---|---|")
    for w in windows:
        rows = [one_run(w) for _ in range(runs)]

        def cell(key: str, fmt: str = "{:.2f}", rows: list[dict] = rows) -> str:
            values = [r[key] for r in rows]
            text = fmt.format(statistics.median(values))
            return text if len(values) == 1 else (
                f"{text} ({fmt.format(min(values))}-{fmt.format(max(values))})")

        target = RATE * w * SURGE / (REPLICAS + SURGE)
        print(f"| {w} s | {cell('ready_to_failed_s')} | {cell('ready_to_rolled_back_s')} | "
              f"{cell('saw_v2', '{:.0f}')} | {cell('v2_errors', '{:.0f}')} | {target:.0f} | "
              f"{cell('old_failed', '{:.0f}')} |")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
