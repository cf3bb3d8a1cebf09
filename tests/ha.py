"""End-to-end harness for several conductors: a real etcd, three real conductors on it
(``--store``), real node agents and the real CLI, each a separate OS process.

Clients get every conductor's URL (``--conductor A,B,C``) and find the leader
themselves, as an operator's would. ``leader()`` asks each conductor directly
(``ping --json`` with only its URL). Teardown stops the ingress and load first,
then the nodes (which stop their workloads), the conductors, and etcd; then it
checks that no workload it saw outlived the test.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import free_port, skr8tr_command
from tests.e2e import Cluster, Daemon, new_port_block, poll, private_env
from tests.etcd import Etcd
from tests.netns import Partitionable

LEASE_TTL_S = 2  # the shortest etcd 3.4 grants: failovers in about 2-3 s


@dataclass
class Conductor:
    name: str
    ws_port: int
    http_port: int
    daemon: Daemon | None = None
    host: str = "127.0.0.1"
    netns: Partitionable | None = None  # runs inside this namespace when set
    store_url: str | None = None  # how it reaches etcd (default: the cluster's)

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.ws_port}"

    @property
    def alive(self) -> bool:
        return self.daemon is not None and self.daemon.proc.poll() is None


@dataclass
class HaCluster(Cluster):
    etcd: Etcd | None = None
    conductors: dict[str, Conductor] = field(default_factory=dict)
    node_timeout_s: float = 5.0

    @property
    def url(self) -> str:  # every client gets the whole list
        return ",".join(c.url for c in self.conductors.values())

    def start_conductors(self, count: int = 3, *extra: str) -> None:
        for i in range(count):
            name = f"c{i + 1}"
            self.conductors[name] = Conductor(name, free_port(), free_port())
        for name in self.conductors:
            self.start_ha_conductor(name, *extra)
        poll(self.leader, what="a leader to be elected")

    def start_ha_conductor(self, name: str, *extra: str) -> Daemon:
        c = self.conductors[name]
        assert self.etcd is not None
        argv = [*skr8tr_command(), "conductor", "--listen", f"{c.host}:{c.ws_port}",
                "--http", f"{c.host}:{c.http_port}", "--authorized-keys",
                str(self.authorized_keys), "--node-timeout", str(self.node_timeout_s),
                "--store", c.store_url or self.etcd.store_url, "--lease-ttl",
                str(LEASE_TTL_S), "--port-range", self.port_block, "--log-level", "debug",
                *extra]
        log_path = self.root / f"{name}.log"
        with open(log_path, "ab") as log_file:
            proc = subprocess.Popen(c.netns.wrap(argv) if c.netns else argv, env=self.env,
                                    stdout=log_file, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        c.daemon = Daemon(name, proc, log_path)
        poll(lambda: self.ping(name) is not None or not c.alive,
             what=f"conductor {name} to answer ping")
        self._assert_alive(c.daemon)
        return c.daemon

    def ping(self, name: str) -> dict | None:
        """``ping --json`` sent to this one conductor only; None when it does not answer."""
        proc = self.cli("ping", "--json", "--timeout", "2", signed=False,
                        url=self.conductors[name].url)
        return json.loads(proc.stdout) if proc.returncode == 0 else None

    def leader(self, among: tuple[str, ...] | None = None) -> str | None:
        """The one conductor that says it leads and whom every live one (of ``among``)
        names; None while they disagree or none leads."""
        answers = {name: self.ping(name) for name, c in self.conductors.items()
                   if c.alive and (among is None or name in among)}
        leaders = [n for n, a in answers.items() if a is not None and a["role"] == "leader"]
        if len(leaders) != 1:
            return None
        url = self.conductors[leaders[0]].url
        if any(a is None or a["leader"] != url for a in answers.values()):
            return None
        return leaders[0]

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        daemon = self.conductors[name].daemon
        assert daemon is not None
        daemon.proc.send_signal(sig)
        if sig == signal.SIGKILL:
            daemon.proc.wait(timeout=10)

    def nodes_on(self, timeout_s: float = 30.0) -> set[str]:
        """Wait until every node agent has joined the current leader; their ids."""
        want = set(self.nodes)
        poll(lambda: {n["node"] for n in self.json("nodes")} == want, timeout_s=timeout_s,
             what=f"nodes {sorted(want)} to join the leader")
        return want

    def conductor_daemons(self) -> list[Daemon]:
        daemons = []
        for c in self.conductors.values():
            if c.daemon is None:
                continue
            if c.daemon.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(c.daemon.proc.pid, signal.SIGCONT)  # a test may have stopped it
            daemons.append(c.daemon)
        return daemons

    def after_daemons(self) -> None:
        if self.etcd is not None and self.etcd.process is not None:
            self.etcd.stop()


@contextmanager
def running_ha_cluster(root: Path, *conductor_flags: str, conductors: int = 3,
                       nodes: int = 2) -> Iterator[HaCluster]:
    """etcd, keys, ``conductors`` conductors on it with a leader elected, and ``nodes``
    node agents joined to it; everything stopped after."""
    cluster = HaCluster(root=root, env=private_env(root), port_block=new_port_block())
    try:
        cluster.etcd = Etcd(root / "etcd").start()
        cluster.make_keys()
        cluster.start_conductors(conductors, *conductor_flags)
        for i in range(nodes):
            cluster.start_node(f"n{i + 1}")
        yield cluster
    finally:
        cluster.shutdown()
