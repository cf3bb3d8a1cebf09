"""Shared set-up for benchmarks: a real local cluster and in-process wire clients.

The daemons are the real ones (separate processes, loopback sockets), started
with the same harness the end-to-end tests use; figures are taken with the
wire clients inside this process (the trio one, and the blocking one the CLI
uses), so the CLI's own start-up time is not in them.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import trio  # noqa: E402

from skr8tr import blocking_client, client, keyfiles  # noqa: E402
from tests.e2e import Cluster, running_cluster  # noqa: E402


def machine() -> str:
    return (f"{platform.machine()}, {os.cpu_count()} cores, Python "
            f"{platform.python_version()}, {platform.system()} {platform.release()}")


def raise_fd_limit() -> int:
    """Raise this process's soft limit of open files to the hard one; returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


ETCD_WHERE = {"disk": None, "tmpfs": "/dev/shm"}  # where a benchmark's etcd keeps its data


@contextmanager
def local_etcd(where: str = "disk"):
    """A single-member etcd (Debian's, as the tests start it: tests/etcd.py) whose data is
    on ``where``: "disk" (a temporary folder under /tmp) or "tmpfs" (/dev/shm); stopped
    and waited for afterwards."""
    from tests.etcd import Etcd

    with tempfile.TemporaryDirectory(prefix="skr8tr-bench-etcd-",
                                     dir=ETCD_WHERE[where]) as tmp:
        etcd = Etcd(Path(tmp) / "etcd")
        etcd.start()
        try:
            yield etcd
        finally:
            etcd.stop()


def ping_reply(url: str, timeout_s: float = 1.0) -> dict | None:
    """The result of an unsigned `ping` to ``url`` (a new connection), None when it does
    not answer."""
    try:
        return blocking_client.call(client.CallOptions(url, timeout_s, None), "ping", {})
    except client.ClientError:
        return None


def wait_leading(url: str, timeout_s: float = 30.0) -> float:
    """Wait until the conductor at ``url`` says it leads; returns the seconds waited."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        reply = ping_reply(url)
        if reply is not None and reply.get("role", "leader") == "leader":
            return time.monotonic() - t0
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not lead within {timeout_s} s")


@contextmanager
def local_cluster(nodes: int = 2, addresses: tuple[str, ...] = ("127.0.0.1",), *,
                  node_timeout_s: float = 5.0, log_level: str | None = None,
                  durable: bool = False, store: str | None = None,
                  key_alg: str = "ed25519", conductor_flags: tuple[str, ...] = ()):
    """A conductor and ``nodes`` node agents. ``log_level`` overrides the e2e harness's
    ``debug`` (benchmarks of speed use ``info``, the daemons' default). ``durable``: the
    conductor runs with ``--state`` and ``--audit-log`` (files in the run's folder).
    ``store``: None (as ``durable`` says), "state" (``--state`` only, no audit log), or
    "etcd-disk" / "etcd-tmpfs" (``--store`` on an etcd of its own, data on disk or tmpfs;
    the nodes start once the conductor leads). ``key_alg``: the admin and node keys'
    algorithm (``skr8tr keygen --alg``). ``conductor_flags``: more flags for the
    conductor."""
    extra = () if log_level is None else ("--log-level", log_level)
    with tempfile.TemporaryDirectory(prefix="skr8tr-bench-") as tmp, \
            contextlib.ExitStack() as stack:
        files: tuple[str, ...] = ()
        if durable:
            files = ("--state", str(Path(tmp) / "state" / "state.toml"),
                     "--audit-log", str(Path(tmp) / "state" / "audit.log"))
        elif store == "state":
            files = ("--state", str(Path(tmp) / "state" / "state.toml"))
        elif store is not None:
            etcd = stack.enter_context(local_etcd(store.removeprefix("etcd-")))
            files = ("--store", etcd.store_url)
        with running_cluster(Path(tmp), *extra, *files, *conductor_flags,
                             node_timeout_s=node_timeout_s, key_alg=key_alg) as cluster:
            try:
                if store is not None and store.startswith("etcd"):
                    cluster.etcd = etcd
                    wait_leading(cluster.url)
                for i in range(nodes):
                    cluster.start_node(f"n{i + 1}", addresses[i % len(addresses)], *extra)
                yield cluster
            except BaseException:
                alive = "running" if cluster.conductor.proc.poll() is None else (
                    f"exited {cluster.conductor.proc.returncode}")
                print(f"conductor ({alive}), end of its log:\n"
                      f"{cluster.conductor.log()[-3000:]}", file=sys.stderr)
                raise


def pin_process(pid: int, cpus: set[int]) -> None:
    """Pin every thread of process ``pid`` to ``cpus`` (``taskset -a -p``): the
    affinity is a thread's, and threads made later inherit their creator's."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(int(tid), cpus)


def cpu_seconds(proc) -> float:
    """User + system CPU seconds a psutil.Process has used so far."""
    times = proc.cpu_times()
    return times.user + times.system


def load_average() -> str:
    """The 1-, 5- and 15-minute load averages, as /proc/loadavg says."""
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def call_options(cluster: Cluster) -> client.CallOptions:
    return client.CallOptions(conductor=cluster.url, timeout_s=30.0,
                              signing_key=keyfiles.load_signing_key(str(cluster.admin_key)))


def request_text(opts: client.CallOptions, cmd: str, args: dict) -> tuple[str, str]:
    """(id, JSON text) of a request signed as the CLI signs it; signing is not timed."""
    req = client.build_request(cmd, args, opts.signing_key)
    return req["id"], json.dumps(req)


async def timed_call(ws, opts: client.CallOptions, cmd: str, args: dict) -> tuple[float, object]:
    """One request on an open connection: (seconds from send to reply, result)."""
    rid, text = request_text(opts, cmd, args)
    t0 = time.perf_counter()
    await ws.send_message(text)
    raw = await ws.get_message()
    elapsed = time.perf_counter() - t0
    reply = json.loads(raw)
    assert reply["id"] == rid and reply["ok"], reply
    return elapsed, reply["result"]


def blocking_timed_call(conn: blocking_client.Connection, opts: client.CallOptions, cmd: str,
                        args: dict) -> tuple[float, object]:
    """:func:`timed_call` with the CLI's blocking client."""
    rid, text = request_text(opts, cmd, args)
    t0 = time.perf_counter()
    conn.send_text(text)
    raw = conn.receive_message()
    elapsed = time.perf_counter() - t0
    reply = json.loads(raw)
    assert reply["id"] == rid and reply["ok"], reply
    return elapsed, reply["result"]


class EventClock:
    """Receive times (perf_counter, in this process) of /v1/watch events, by (key, event).

    ``key`` is what ``key_of(data)`` returns (the app, by default). Feed it from
    a task that reads the stream; ``wait`` returns when the event has been seen.
    """

    def __init__(self, key_of=lambda data: data.get("app")) -> None:
        self.key_of = key_of
        self.seen: dict[tuple[object, str], float] = {}
        self.data: dict[tuple[object, str], dict] = {}
        self._waiters: dict[tuple[object, str], trio.Event] = {}

    def feed(self, event: str, data: dict) -> None:
        key = (self.key_of(data), event)
        if key not in self.seen:
            self.seen[key] = time.perf_counter()
            self.data[key] = data
        waiter = self._waiters.pop(key, None)
        if waiter is not None:
            waiter.set()

    async def wait(self, key: object, event: str) -> float:
        while (key, event) not in self.seen:
            await self._waiters.setdefault((key, event), trio.Event()).wait()
        return self.seen[(key, event)]

    async def serve(self, stream) -> None:
        async for msg in stream:
            if msg.type == "event":
                self.feed(msg.event, msg.data)


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) by nearest rank."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]


def median(values: list[float]) -> float:
    return statistics.median(values)
