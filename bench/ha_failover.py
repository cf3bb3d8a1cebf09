"""Failover: kill -9 of the leader -> a new leader says so -> it accepts a signed `scale`.

Method: one local etcd (Debian's, single member; its data on disk, or on tmpfs
with `--etcd tmpfs`), three real conductors on it (`--store`, log level info,
each its own process on its own ports), two real node agents given the three
URLs (`--conductor A,B,C`: they find and follow the leader), and an app `fo`
of three `/bin/sleep` replicas deployed on the first leader. Each run: find the leader
(`ping` on each), wait a random fraction of a keepalive period (so the kill
falls anywhere between two lease renewals), `kill -9` it, and start the clock.
From this process, in a loop over the two survivors, each try on a new
connection with a 0.5 s timeout and 20 ms between rounds: an unsigned `ping`
(the first answer saying `"role":"leader"` stops the first clock) and a signed
`scale fo 3` (the count it has; the first accepted one stops the second; the
client follows a `NOT_LEADER` to the leader it names, as the CLI does). Then the
new leader's `nodes` is polled every 20 ms until both agents are on it (the
third clock). Then
the killed conductor is started again with the same flags (it joins as a
follower) and the next run begins 1 s after it answers. Five runs per lease
TTL (`--runs`), `--lease-ttl 5` (the default) and 2.
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

from _harness import REPO, local_etcd, machine, median, ping_reply

from skr8tr import blocking_client, client, keyfiles
from tests.conftest import free_port
from tests.e2e import Cluster, Daemon, poll

TRY_TIMEOUT_S = 0.5
ROUND_PAUSE_S = 0.02


class HaCluster:
    """Three conductors on one etcd, two node agents that follow the leader."""

    def __init__(self, root: Path, store_url: str, ttl_s: float) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SKR8TR_")}
        env["HOME"] = str(root / "home")
        self.cluster = Cluster(root=root, env=env)
        self.cluster.make_keys()
        self.store_url, self.ttl_s = store_url, ttl_s
        self.ports = [(free_port(), free_port()) for _ in range(3)]
        self.urls = [f"ws://127.0.0.1:{ws}" for ws, _ in self.ports]
        self.conductors: list[Daemon | None] = [None, None, None]
        lo = random.randrange(10000, 19800, 200)
        self.port_block = f"{lo}-{lo + 199}"
        self.admin = keyfiles.load_signing_key(str(self.cluster.admin_key))

    def start_conductor(self, i: int) -> None:
        ws, http = self.ports[i]
        self.conductors[i] = self.cluster._spawn(
            f"c{i + 1}", "conductor", "--listen", f"127.0.0.1:{ws}", "--http",
            f"127.0.0.1:{http}", "--authorized-keys", str(self.cluster.authorized_keys),
            "--store", self.store_url, "--lease-ttl", f"{self.ttl_s:g}",
            "--port-range", self.port_block, "--log-level", "info")
        poll(lambda: ping_reply(self.urls[i]) is not None, what=f"conductor c{i + 1}")

    def leader(self, timeout_s: float = 30.0) -> int:
        def find() -> int | None:
            for i, url in enumerate(self.urls):
                reply = ping_reply(url)
                if reply is not None and reply.get("role") == "leader":
                    return i + 1
            return None
        return poll(find, timeout_s=timeout_s, step_s=0.05, what="a leader") - 1

    def start(self) -> None:
        for i in range(3):
            self.start_conductor(i)
        for name in ("n1", "n2"):
            self.cluster.nodes[name] = self.cluster._spawn(
                name, "node", "--conductor", ",".join(self.urls), "--key",
                str(self.cluster.node_key), "--node-id", name, "--data-dir",
                str(self.cluster.root / "nodes" / name), "--advertise", "127.0.0.1",
                "--stop-workloads", "--log-level", "info")

    def call(self, url: str, cmd: str, args: dict, signed: bool) -> tuple[bool, str]:
        opts = client.CallOptions(url, TRY_TIMEOUT_S, self.admin if signed else None)
        try:
            result = blocking_client.call(opts, cmd, args)
        except client.ClientError as exc:
            return False, exc.code
        return True, result.get("role", "") if isinstance(result, dict) else ""

    def stop(self) -> None:
        for daemon in self.conductors:
            if daemon is not None and daemon.proc.poll() is None:
                daemon.stop()
        self.cluster.shutdown()


def failover_run(ha: HaCluster, codes: collections.Counter
                 ) -> tuple[float, float, float]:
    """Kill the leader; seconds to a survivor's ping saying leader, to an accepted scale,
    to both nodes on the new leader."""
    old = ha.leader()
    time.sleep(random.uniform(0, ha.ttl_s / 3))
    victim = ha.conductors[old]
    survivors = [ha.urls[i] for i in range(3) if i != old]
    os.kill(victim.proc.pid, signal.SIGKILL)
    t0 = time.perf_counter()
    to_ping = to_scale = None
    while to_scale is None and time.perf_counter() - t0 < 60:
        for url in survivors:
            ok, role = ha.call(url, "ping", {}, signed=False)
            if ok and role == "leader" and to_ping is None:
                to_ping = time.perf_counter() - t0
            ok, code = ha.call(url, "scale", {"app": "fo", "replicas": 3}, signed=True)
            if ok:
                to_scale = time.perf_counter() - t0
                new = url
                break
            codes[code] += 1
        time.sleep(ROUND_PAUSE_S)
    if to_scale is None:
        raise RuntimeError("no survivor accepted a scale within 60 s")
    opts = client.CallOptions(new, TRY_TIMEOUT_S, None)
    poll(lambda: len(blocking_client.call(opts, "nodes", {})) == 2, step_s=ROUND_PAUSE_S,
         what="both nodes on the new leader")
    to_nodes = time.perf_counter() - t0
    victim.proc.wait()
    ha.start_conductor(old)
    time.sleep(1.0)
    return to_ping if to_ping is not None else to_scale, to_scale, to_nodes


def run_ttl(where: str, ttl_s: float, runs: int) -> tuple[list[float], list[float],
                                                          list[float], collections.Counter]:
    codes: collections.Counter = collections.Counter()
    with local_etcd(where) as etcd, \
            tempfile.TemporaryDirectory(prefix="skr8tr-bench-ha-") as tmp:
        ha = HaCluster(Path(tmp), etcd.store_url, ttl_s)
        try:
            ha.start()
            first = ha.urls[ha.leader()]
            opts = client.CallOptions(first, 10.0, ha.admin)
            poll(lambda: len(blocking_client.call(opts, "nodes", {})) == 2,
                 what="both nodes on the leader")
            blocking_client.call(opts, "up", {
                "manifest": "app fo\n  exec /bin/sleep\n  args 3600\n  replicas 3\n",
                "format": "skr8tr", "base_dir": str(REPO)})
            poll(lambda: sum(r["state"] == "ready" for r in blocking_client.call(
                opts, "list", {"app": "fo"})) == 3, what="3 ready replicas of fo")
            pings, scales, nodes = [], [], []
            for _ in range(runs):
                to_ping, to_scale, to_nodes = failover_run(ha, codes)
                pings.append(to_ping)
                scales.append(to_scale)
                nodes.append(to_nodes)
        except BaseException:
            for daemon in ha.conductors:
                if daemon is not None:
                    print(f"{daemon.name}, end of its log:\n{daemon.log()[-2000:]}",
                          file=sys.stderr)
            raise
        finally:
            ha.stop()
    return pings, scales, nodes, codes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 runs per TTL")
    parser.add_argument("--runs", type=int, default=None, help="runs per TTL (default 5)")
    parser.add_argument("--etcd", choices=("disk", "tmpfs"), default="disk",
                        help="where etcd keeps its data (default disk)")
    parser.add_argument("--ttl", type=float, action="append", default=None,
                        help="lease TTL(s) to measure (default 5 and 2)")
    options = parser.parse_args()
    runs = options.runs or (3 if options.quick else 5)
    rows = []
    for ttl in options.ttl or (5.0, 2.0):
        rows.append((ttl, *run_ttl(options.etcd, ttl, runs)))
    print("## Failover: kill -9 of the leader (bench/ha_failover.py)")
    print()
    print(f"Machine: {machine()}. Three conductors, one etcd (data on {options.etcd}), "
          f"{runs} runs per lease TTL; seconds from the kill.")
    print()
    print("| `--lease-ttl` | `ping` says leader: median | max | signed `scale` accepted: "
          "median | max | (each run) | both nodes on it: median | max | refusals before |")
    print("|---|---|---|---|---|---|---|---|---|")
    for ttl, pings, scales, nodes, codes in rows:
        seen = ", ".join(f"{code} {n}" for code, n in codes.most_common())
        print(f"| {ttl:g} s | {median(pings):.2f} | {max(pings):.2f} | {median(scales):.2f} "
              f"| {max(scales):.2f} | {', '.join(f'{s:.2f}' for s in scales)} "
              f"| {median(nodes):.2f} | {max(nodes):.2f} | {seen} |")


if __name__ == "__main__":
    main()
