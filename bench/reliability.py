"""Reliability figures: time to re-adopt after a conductor crash, time to re-place after
host loss.

Method: a real conductor (with --state) and two real node agents on loopback; the
example HTTP service with 4 replicas and a 200 ms health check.
- Re-adopt: `kill -9` the conductor, start it again with the same flags, and time
  from the restart to `list` showing all 4 replicas ready with their old pids
  (the CLI start-up is included: `list` is polled every 50 ms).
- Re-place: `kill -9` one node agent and its workloads; time until `list` shows 4
  ready replicas, all on the surviving node. This is dominated by --node-timeout
  (3 s here; 15 s by default): the figure minus the timeout is the reaction time.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import tempfile
import time
from pathlib import Path

from _harness import REPO, machine

from tests.e2e import poll, running_cluster

HELLO = REPO / "manifests" / "apps" / "hello_http.py"
NODE_TIMEOUT_S = 3.0
REPLICAS = 4


def manifest(folder: Path) -> Path:
    path = folder / "web.skr8tr"
    path.write_text(f"app web\n  exec {HELLO}\n  args --host {{host}} --port {{port}}\n"
                    f"  port auto\n  replicas {REPLICAS}\n  health\n    check GET /healthz\n"
                    f"    interval 200ms\n")
    return path


def one_run() -> tuple[float, float]:
    with tempfile.TemporaryDirectory(prefix="skr8tr-bench-") as tmp:
        root = Path(tmp)
        state = str(root / "state.toml")
        with running_cluster(root, "--state", state, node_timeout_s=NODE_TIMEOUT_S) as c:
            c.start_node("n1")
            c.start_node("n2")
            c.json("up", str(manifest(root)))
            before = sorted(r["pid"] for r in c.wait_ready("web", REPLICAS))

            c.conductor.proc.kill()
            c.conductor.proc.wait()
            t0 = time.monotonic()
            c.start_conductor("--state", state, node_timeout_s=NODE_TIMEOUT_S)
            poll(lambda: sorted(r["pid"] for r in c.replicas("web")
                                if r["state"] == "ready") == before, step_s=0.05,
                 what="re-adoption")
            readopt = time.monotonic() - t0

            victims = [r for r in c.replicas("web") if r["node"] == "n2"]
            c.nodes["n2"].proc.kill()
            for r in victims:
                os.killpg(r["pid"], signal.SIGKILL)
            t0 = time.monotonic()
            c.nodes["n2"].proc.wait()
            c.nodes.pop("n2")
            poll(lambda: (rows := c.replicas("web")) and len(rows) == REPLICAS
                 and all(r["node"] == "n1" and r["state"] == "ready" for r in rows),
                 timeout_s=60, step_s=0.05, what="re-placement")
            replace = time.monotonic() - t0
    return readopt, replace


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one run instead of three")
    runs = 1 if parser.parse_args().quick else 3
    results = [one_run() for _ in range(runs)]
    readopt = [r[0] for r in results]
    replace = [r[1] for r in results]
    print("## Reliability (bench/reliability.py)")
    print()
    print(f"Machine: {machine()}. Runs: {runs}. {REPLICAS} replicas on 2 nodes, "
          f"--node-timeout {NODE_TIMEOUT_S:g} s.")
    print()
    print("| figure | median s | min s | max s |")
    print("|---|---|---|---|")
    print(f"| conductor kill -9 → restart → all replicas re-adopted (same pids) | "
          f"{statistics.median(readopt):.2f} | {min(readopt):.2f} | {max(readopt):.2f} |")
    print(f"| node agent + workloads kill -9 → all replicas ready elsewhere | "
          f"{statistics.median(replace):.2f} | {min(replace):.2f} | {max(replace):.2f} |")


if __name__ == "__main__":
    main()
