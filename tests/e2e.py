"""End-to-end harness: a real conductor and real node agents as separate OS processes.

Everything goes through the real CLI (``skr8tr ...`` subprocesses) and real
sockets on loopback. Every wait polls with a deadline. At teardown the nodes
stop their workloads, the daemons are stopped with SIGTERM, and the harness
checks that no workload it ever saw is still alive.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from tests.conftest import free_port, http_get, skr8tr_command

DEADLINE_S = 30.0


def poll(predicate: Callable[[], Any], *, timeout_s: float = DEADLINE_S, step_s: float = 0.1,
         what: str = "condition") -> Any:
    """Call ``predicate`` until it returns something truthy; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(step_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}; last: {last!r}")


@dataclass
class Daemon:
    name: str
    proc: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
            raise AssertionError(f"{self.name} did not exit within {timeout_s} s of "
                                 f"{signal.Signals(sig).name}\n{self.log()[-3000:]}") from None


@dataclass
class Cluster:
    """A running conductor plus node agents, and a CLI bound to them."""

    root: Path
    env: dict[str, str]
    ws_port: int = 0
    http_port: int = 0
    conductor: Daemon | None = None
    nodes: dict[str, Daemon] = field(default_factory=dict)
    seen_pids: set[int] = field(default_factory=set)
    port_block: str = ""
    others: dict[str, Daemon] = field(default_factory=dict)  # ingresses, load generators

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.ws_port}"

    # -------------------------------------------------------------- keys

    def make_keys(self, alg: str = "ed25519") -> None:
        """An admin and a node key of algorithm *alg* (``skr8tr keygen --alg``), both
        authorized."""
        keys = self.root / "keys"
        admin = self.cli_ok("keygen", "--alg", alg, "--out", str(keys / "admin"),
                            conductor=False).strip()
        node = self.cli_ok("keygen", "--alg", alg, "--out", str(keys / "node"),
                           conductor=False).strip()
        self.admin_pub, self.node_pub = admin, node
        self.authorized_keys = keys / "authorized_keys"
        self.authorized_keys.write_text(f"admin {admin} test admin\nnode {node} test nodes\n")
        self.admin_key = keys / "admin" / "signing.sec"
        self.node_key = keys / "node" / "signing.sec"

    def add_key(self, name: str, role: str, alg: str = "ed25519") -> Path:
        """One more key of *alg* in ``root/keys/NAME``, authorized as *role* (a line
        appended to authorized_keys: a running conductor reads it on SIGHUP); returns its
        ``signing.sec``, for ``start_node(key=)`` or ``cli(key=)``."""
        out = self.root / "keys" / name
        pub = self.cli_ok("keygen", "--alg", alg, "--out", str(out), conductor=False).strip()
        with open(self.authorized_keys, "a") as f:
            f.write(f"{role} {pub} {name}\n")
        return out / "signing.sec"

    # -------------------------------------------------------------- processes

    def _spawn(self, name: str, *args: str) -> Daemon:
        log_path = self.root / f"{name}.log"
        with open(log_path, "ab") as log_file:
            proc = subprocess.Popen(
                [*skr8tr_command(), *args], env=self.env, stdout=log_file,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )
        return Daemon(name, proc, log_path)

    def start_conductor(self, *extra: str, node_timeout_s: float = 5.0) -> Daemon:
        if not self.ws_port:
            self.ws_port, self.http_port = free_port(), free_port()
        if "--port-range" not in extra:
            # A block of its own for `port auto`, below the ephemeral ports, so two
            # suites on one machine do not take each other's ports (same block on restart).
            if not self.port_block:
                self.port_block = new_port_block()
            extra = (*extra, "--port-range", self.port_block)
        self.conductor = self._spawn(
            "conductor", "conductor", "--listen", f"127.0.0.1:{self.ws_port}",
            "--http", f"127.0.0.1:{self.http_port}", "--authorized-keys",
            str(self.authorized_keys), "--node-timeout", str(node_timeout_s),
            "--log-level", "debug", *extra,
        )
        poll(lambda: self.cli("ping").returncode == 0 or self._died(self.conductor),
             what="the conductor to answer ping")
        self._assert_alive(self.conductor)
        return self.conductor

    def start_node(self, node_id: str, advertise: str = "127.0.0.1", *extra: str,
                   wait: bool = True, key: Path | None = None) -> Daemon:
        """A node agent signing with *key* (default: the node key of make_keys)."""
        daemon = self._spawn(
            node_id, "node", "--conductor", self.url, "--key", str(key or self.node_key),
            "--node-id", node_id, "--data-dir", str(self.root / "nodes" / node_id),
            "--advertise", advertise, "--stop-workloads", "--log-level", "debug", *extra,
        )
        self.nodes[node_id] = daemon
        if wait:
            poll(lambda: node_id in {n["node"] for n in self.json("nodes")}
                 or self._died(daemon), what=f"node {node_id} to join")
            self._assert_alive(daemon)
        return daemon

    def start_process(self, name: str, argv: list[str]) -> Daemon:
        """Any other process (``argv`` in full), logged to ``root/NAME.log`` and stopped
        (SIGTERM) at shutdown before the nodes."""
        log_path = self.root / f"{name}.log"
        with open(log_path, "ab") as log_file:
            proc = subprocess.Popen(argv, env=self.env, stdout=log_file,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        self.others[name] = Daemon(name, proc, log_path)
        return self.others[name]

    def start_ingress(self, *routes: str, extra: tuple[str, ...] = (),
                      name: str = "ingress") -> tuple[Daemon, str]:
        """``skr8tr ingress`` on a free port with ``--route`` for each of ``routes``;
        returns the daemon and its base URL once it accepts connections."""
        port = free_port()
        route_flags = [flag for r in routes for flag in ("--route", r)]
        daemon = self.start_process(name, [
            *skr8tr_command(), "ingress", "--listen", f"127.0.0.1:{port}", *route_flags,
            "--conductor", self.url, "--log-level", "debug", *extra])

        def listening() -> bool:
            if self._died(daemon):
                return True
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port),
                                                                        timeout=1):
                return True
            return False

        poll(listening, what=f"the ingress to listen on port {port}")
        self._assert_alive(daemon)
        return daemon, f"http://127.0.0.1:{port}"

    def replica_log(self, node: str, replica: str) -> str:
        """A replica's stdout as its node agent wrote it ('' if there is none)."""
        path = self.root / "nodes" / node / "logs" / f"{replica}.stdout"
        return path.read_text(errors="replace") if path.exists() else ""

    def _died(self, daemon: Daemon) -> bool:
        return daemon.proc.poll() is not None

    def _assert_alive(self, daemon: Daemon) -> None:
        assert daemon.proc.poll() is None, (
            f"{daemon.name} exited with {daemon.proc.returncode}:\n{daemon.log()[-3000:]}")

    # -------------------------------------------------------------- the CLI

    def cli(self, *args: str, conductor: bool = True, signed: bool = True,
            timeout_s: float = 30.0, url: str | None = None, key: Path | None = None
            ) -> subprocess.CompletedProcess[str]:
        """The real CLI, signing with *key* (default: the admin key of make_keys)."""
        flags: list[str] = []
        if conductor:
            flags += ["--conductor", url or self.url]
        if signed and (key is not None or hasattr(self, "admin_key")):
            flags += ["--key", str(key or self.admin_key)]
        return subprocess.run(
            [*skr8tr_command(), *args, *flags], env=self.env, capture_output=True, text=True,
            timeout=timeout_s, stdin=subprocess.DEVNULL,
        )

    def cli_ok(self, *args: str, **kw: Any) -> str:
        proc = self.cli(*args, **kw)
        assert proc.returncode == 0, (f"skr8tr {' '.join(args)} exited {proc.returncode}: "
                                      f"{proc.stderr}{proc.stdout}")
        return proc.stdout

    def json(self, *args: str, **kw: Any) -> Any:
        doc = json.loads(self.cli_ok(*args, "--json", **kw))
        if args and args[0] == "list":
            self.seen_pids.update(r["pid"] for r in doc if r["pid"])
        return doc

    def addresses(self) -> dict[str, str]:
        """Each node's advertised address, by node id."""
        return {n["node"]: n["address"] for n in self.json("nodes")}

    def versions(self, rows: list[dict]) -> set[str]:
        """The versions the replicas in *rows* (of the example HTTP service) answer with;
        each must answer 200 from the pid it claims."""
        where = self.addresses()
        seen = set()
        for r in rows:
            status, headers, _ = http_get(where[r["node"]], r["port"])
            assert status == 200 and headers["X-Pid"] == str(r["pid"])
            seen.add(headers["X-Version"])
        return seen

    def replicas(self, app: str | None = None) -> list[dict]:
        return self.json("list", *([app] if app else []))

    def wait_ready(self, app: str, count: int, *, timeout_s: float = DEADLINE_S,
                   generation: int | None = None) -> list[dict]:
        def ready() -> list[dict] | None:
            rows = self.replicas(app)
            good = [r for r in rows if r["state"] == "ready"
                    and (generation is None or r["generation"] == generation)]
            return rows if len(good) == count and len(rows) == count else None
        return poll(ready, timeout_s=timeout_s, what=f"{count} ready replica(s) of {app}")

    # -------------------------------------------------------------- teardown

    def conductor_daemons(self) -> list[Daemon]:
        """What shutdown stops after the nodes (a subclass may run several)."""
        return [] if self.conductor is None else [self.conductor]

    def after_daemons(self) -> None:
        """Called by shutdown once every daemon has stopped (a subclass stops etcd)."""

    def shutdown(self) -> None:
        """Stop nodes (which stop their workloads), then the conductor; check for orphans."""
        problems = []
        for daemon in [*self.others.values(), *self.nodes.values(),
                       *self.conductor_daemons()]:
            try:
                daemon.stop()
            except AssertionError as exc:
                problems.append(str(exc))
        self.after_daemons()
        survivors = [p for p in self.seen_pids if psutil.pid_exists(p)
                     and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        for pid in survivors:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        if survivors:
            problems.append(f"workloads outlived the test: {sorted(survivors)}")
        assert not problems, "\n".join(problems)


def new_port_block() -> str:
    """A block of 200 ports for `port auto`, below the ephemeral ports, so that two
    suites on one machine do not take each other's ports."""
    lo = random.randrange(10000, 19800, 200)
    return f"{lo}-{lo + 199}"


def private_env(root: Path) -> dict[str, str]:
    """The test's environment without SKR8TR_* and with a HOME of its own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKR8TR_")}
    env["HOME"] = str(root / "home")
    return env


@contextmanager
def running_cluster(root: Path, *conductor_flags: str, node_timeout_s: float = 5.0,
                    key_alg: str = "ed25519", nodes: tuple[str, ...] = (),
                    state: bool = False) -> Iterator[Cluster]:
    """Keys (of *key_alg*) and a started conductor in ``root``, with a private HOME, and a
    node agent for each of *nodes*; with *state*, the conductor keeps ``--state`` in
    ``cluster.state_file``. Shut down after."""
    cluster = Cluster(root=root, env=private_env(root))
    cluster.make_keys(key_alg)
    if state:
        cluster.state_file = root / "state" / "conductor.toml"
        conductor_flags = ("--state", str(cluster.state_file), *conductor_flags)
    try:
        cluster.start_conductor(*conductor_flags, node_timeout_s=node_timeout_s)
        for node_id in nodes:
            cluster.start_node(node_id)
        yield cluster
    finally:
        cluster.shutdown()
