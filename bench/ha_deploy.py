"""Deploy latency with the etcd store vs `--state FILE`: a signed `up` -> the replica's pid.

Method: bench/deploy.py's, `/bin/sleep` (`settle 0s`), trio client: a real
conductor and one real node agent on loopback (log level info); one process
holds an open `/v1/cli` connection and an open `/v1/watch` stream; each
deploy signs an `up` of a new app name (signing not timed), the clock starts
as the request is written and stops when the watch stream delivers
`replica.running` (the node reported the pid); then `down`, and the next
deploy starts once `replica.exited` arrived. Two (or three) such clusters run
side by side: the conductor with `--state FILE` (on disk), and with `--store`
on an etcd of its own (Debian's, single member; data on disk, and with `--etcd
both` also one on tmpfs). The deploys are interleaved in blocks (each block 5
warm-up deploys, then 25 timed; `--quick`: 10), cluster after cluster, so that
all see the same machine. With the etcd store an `up` is one etcd transaction
(the app) before its reply and placement, and the nonce another.
"""

from __future__ import annotations

import argparse
import contextlib
import functools

import trio
from _harness import call_options, local_cluster, machine, median, pct
from deploy import deploy_series, sleep_manifest

BLOCKS = 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10 deploys per block")
    parser.add_argument("--etcd", choices=("disk", "tmpfs", "both"), default="both",
                        help="where etcd keeps its data (default both)")
    options = parser.parse_args()
    per_block = 10 if options.quick else 25
    stores = ["state"] + [f"etcd-{w}" for w in (("disk", "tmpfs") if options.etcd == "both"
                                                else (options.etcd,))]
    to_pid: dict[str, list[float]] = {s: [] for s in stores}
    with contextlib.ExitStack() as stack:
        opts = {s: call_options(stack.enter_context(
            local_cluster(nodes=1, log_level="info", store=s))) for s in stores}
        for block in range(BLOCKS):
            for store in stores:
                pid, _ready = trio.run(functools.partial(
                    deploy_series, opts[store], sleep_manifest, f"{store}-{block}", per_block))
                to_pid[store] += pid
    labels = {"state": "`--state FILE` (disk)", "etcd-disk": "`--store etcd://` (etcd on disk)",
              "etcd-tmpfs": "`--store etcd://` (etcd on tmpfs)"}
    print("## Deploy latency, etcd store vs state file (bench/ha_deploy.py)")
    print()
    print(f"Machine: {machine()}. {BLOCKS} interleaved blocks of {per_block} timed deploys "
          "per store; `/bin/sleep`, trio client; ms.")
    print()
    print("| store | up -> pid p50 | p90 | p99 | deploys |")
    print("|---|---|---|---|---|")
    for store in stores:
        v = to_pid[store]
        print(f"| {labels[store]} | {median(v) * 1000:.2f} | {pct(v, 90) * 1000:.2f} "
              f"| {pct(v, 99) * 1000:.2f} | {len(v)} |")


if __name__ == "__main__":
    main()
