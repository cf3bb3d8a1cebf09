"""Shared set-up for benchmarks: a real local cluster and an in-process wire client.

The daemons are the real ones (separate processes, loopback sockets), started
with the same harness the end-to-end tests use; figures are taken with the
wire client inside this process, so the CLI's own start-up time is not in them.
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from skr8tr import client  # noqa: E402
from skr8tr.core import keys  # noqa: E402
from tests.e2e import Cluster  # noqa: E402


def machine() -> str:
    return (f"{platform.machine()}, {os.cpu_count()} cores, Python "
            f"{platform.python_version()}, {platform.system()} {platform.release()}")


@contextmanager
def local_cluster(nodes: int = 2, addresses: tuple[str, ...] = ("127.0.0.1",)):
    with tempfile.TemporaryDirectory(prefix="skr8tr-bench-") as tmp:
        root = Path(tmp)
        env = {k: v for k, v in os.environ.items() if not k.startswith("SKR8TR_")}
        env["HOME"] = str(root / "home")
        cluster = Cluster(root=root, env=env)
        cluster.make_keys()
        cluster.start_conductor()
        try:
            for i in range(nodes):
                cluster.start_node(f"n{i + 1}", addresses[i % len(addresses)])
            yield cluster
        finally:
            cluster.shutdown()


def call_options(cluster: Cluster) -> client.CallOptions:
    return client.CallOptions(conductor=cluster.url, timeout_s=30.0,
                              signing_key=keys.load_signing_key(str(cluster.admin_key)))
