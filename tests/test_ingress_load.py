"""The ingress under load: rollouts, aborts, auto-rollbacks and scale-downs drop nothing.

Real processes throughout: a conductor, two node agents, hello_http replicas,
``skr8tr ingress`` and a load generator (``tests/loadgen.py``)
sending a steady ~100 requests/s through the ingress, all on loopback. The
replicas run with ``--close-idle-on-term`` (they close idle keep-alive
connections on SIGTERM, as production servers do, so a replica that still got
traffic after its SIGTERM would drop it) and ``--log-times`` (every request
line carries its wall-clock time, so we can tell when each one arrived).

What is measured against what:
- every response the load generator got (status, ``X-Version``, start time);
- the conductor's events from ``skr8tr watch --json`` (when each replica was
  marked ``draining``, when the rollout finished);
- each replica's own request log (what reached it, and when its SIGTERM came).
"""

from __future__ import annotations

import json
import os
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import HELLO_HTTP, REPO, http_get, skr8tr_command
from tests.e2e import Cluster, Daemon, poll

LOADGEN = REPO / "tests" / "loadgen.py"  # run as its own process, like a client

pytestmark = pytest.mark.e2e

RATE = 100  # requests per second through the ingress
# A request routed just before the ingress saw a `draining` event may reach the replica a
# little after the event's time stamp; any request later than this margin was routed
# after the ingress knew (the drain in these manifests is 1 s).
ROUTING_MARGIN_S = 0.25
REQUEST_LINE = re.compile(r"^(\d+\.\d+) \S+ \"GET / HTTP")  # the load's, not health checks
SIGNAL_LINE = re.compile(r"^(\d+\.\d+) received SIGTERM")


@pytest.fixture
def cluster(tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKR8TR_")}
    env["HOME"] = str(tmp_path / "home")
    c = Cluster(root=tmp_path, env=env)
    c.make_keys()
    # A port range of its own (below the ephemeral ports), so that clusters of other tests
    # running at the same time on this host do not take our replicas' ports.
    low = random.randrange(10_000, 19_800, 200)
    c.start_conductor("--port-range", f"{low}-{low + 199}")
    try:
        # arrivals() reads drained replicas' logs after the rollouts: keep them all
        c.start_node("n1", "127.0.0.1", "--keep-logs", "100")
        c.start_node("n2", "127.0.0.1", "--keep-logs", "100")
        yield c
    finally:
        c.shutdown()


def web(tmp_path: Path, version: str, *, extra_args: str = "", replicas: int = 3,
        surge: int = 1, drain: str = "1s", ready_timeout: str = "20s") -> Path:
    """The example service at ``version``, with the ingress-test knobs on."""
    path = tmp_path / f"web-{version}.skr8tr"
    path.write_text("\n".join([
        "app web",
        f"  exec {HELLO_HTTP}",
        f"  args --host {{host}} --port {{port}} --version {version} --log-times "
        f"--close-idle-on-term {extra_args}".rstrip(),
        "  port auto",
        f"  replicas {replicas}",
        "  stop-grace 3s",
        "  health",
        "    check GET /healthz 200",
        "    interval 200ms",
        "  rollout",
        f"    surge {surge}",
        f"    drain {drain}",
        f"    ready-timeout {ready_timeout}",
    ]) + "\n")
    return path


# ---------------------------------------------------------------------------- helpers


@dataclass
class Load:
    """A load generator process and the file it writes one JSON line per request to."""

    daemon: Daemon
    out: Path

    def samples(self) -> list[dict]:
        if not self.out.exists():
            return []
        lines = self.out.read_text().splitlines()
        return [json.loads(line) for line in lines if line.endswith("}")]

    def stop(self) -> list[dict]:
        rc = self.daemon.stop()
        assert rc == 0, self.daemon.log()[-2000:]
        return self.samples()


def start_load(cluster: Cluster, url: str, name: str = "load", rate: int = RATE) -> Load:
    """``rate`` requests a second to ``url`` (at most 110 s), once half a second of them
    has been answered."""
    out = cluster.root / f"{name}.jsonl"
    daemon = cluster.start_process(name, [
        sys.executable, str(LOADGEN), url + "/", "--rate", str(rate),
        "--concurrency", "8", "--duration", "110", "--out", str(out)])
    load = Load(daemon, out)
    poll(lambda: len(load.samples()) >= rate // 2 or daemon.proc.poll() is not None,
         what=f"the load through {name} to flow")
    assert daemon.proc.poll() is None, daemon.log()
    return load


@dataclass
class Watch:
    """``skr8tr watch --json`` into a file: the conductor's events with their times."""

    daemon: Daemon

    def events(self, name: str | None = None) -> list[dict]:
        docs = [json.loads(line) for line in self.daemon.log().splitlines()
                if line.startswith("{") and line.endswith("}")]
        return [d for d in docs if d.get("type") == "event"
                and (name is None or d["event"] == name)]


def start_watch(cluster: Cluster) -> Watch:
    daemon = cluster.start_process("watch", [*skr8tr_command(), "watch", "--json",
                                             "--conductor", cluster.url])
    watch = Watch(daemon)
    poll(lambda: '"snapshot"' in daemon.log(), what="the watch stream's snapshot")
    return watch


def failures(samples: list[dict]) -> list[dict]:
    return [s for s in samples if s["status"] is None or not 200 <= s["status"] < 300]


def assert_steady(samples: list[dict]) -> None:
    """The load really was ~RATE/s for the whole run (no stall hid a gap)."""
    starts = sorted(s["start"] for s in samples)
    span = starts[-1] - starts[0]
    assert len(samples) >= 0.8 * RATE * span, (len(samples), span)
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    assert max(gaps) < 1.0, f"the load stalled for {max(gaps):.2f} s"


@dataclass
class Arrivals:
    """What reached one replica after the conductor marked it draining."""

    replica: str
    drained_at: float
    sigterm_at: float | None
    after_margin: int  # requests later than drained_at + ROUTING_MARGIN_S
    after_sigterm: int
    last_after_drain_s: float | None  # the last request's arrival, relative to drained_at


def arrivals(cluster: Cluster, watch: Watch, replicas: set[str] | None = None
             ) -> list[Arrivals]:
    """For each replica marked draining (of ``replicas``, if given): its own request log
    read against the time of its ``replica.draining`` event."""
    result = []
    for ev in watch.events("replica.draining"):
        rid, node = ev["data"]["replica"], ev["data"]["node"]
        if replicas is not None and rid not in replicas:
            continue
        text = cluster.replica_log(node, rid)
        times = [float(m.group(1)) for line in text.splitlines()
                 if (m := REQUEST_LINE.match(line))]
        term = [float(m.group(1)) for line in text.splitlines()
                if (m := SIGNAL_LINE.match(line))]
        sigterm_at = term[0] if term else None
        late = [t - ev["ts"] for t in times if t > ev["ts"]]
        result.append(Arrivals(
            replica=rid, drained_at=ev["ts"], sigterm_at=sigterm_at,
            after_margin=sum(t > ev["ts"] + ROUTING_MARGIN_S for t in times),
            after_sigterm=0 if sigterm_at is None else sum(t > sigterm_at for t in times),
            last_after_drain_s=max(late) if late else None))
    return result


def ingress_summary(daemon: Daemon) -> str:
    """Stop the ingress (SIGTERM) and return its closing summary line."""
    assert daemon.stop() == 0, daemon.log()[-3000:]
    lines = [line for line in daemon.log().splitlines() if " served " in line]
    assert lines, daemon.log()[-3000:]
    return lines[-1]


def wait_serving(url: str, version: str) -> None:
    host, port = url.removeprefix("http://").split(":")
    poll(lambda: _get_version(host, int(port)) == version,
         what=f"the ingress to serve {version}")


def _get_version(host: str, port: int) -> str | None:
    try:
        status, headers, _ = http_get(host, port)
    except OSError:
        return None
    lower = {name.lower(): value for name, value in headers.items()}
    return lower.get("x-version") if status == 200 else None


# ---------------------------------------------------------------------------- the proofs


def test_rollout_abort_and_auto_rollback_drop_nothing(cluster: Cluster, tmp_path: Path):
    cluster.json("up", str(web(tmp_path, "v1")))
    v1 = {r["replica"] for r in cluster.wait_ready("web", 3, generation=1)}
    watch = start_watch(cluster)
    ingress, url = cluster.start_ingress("/:web")
    wait_serving(url, "v1")
    load = start_load(cluster, url)

    # (a) v1 -> v2, 3 replicas, one at a time
    proc = cluster.cli("rollout", str(web(tmp_path, "v2")), "--watch", timeout_s=90)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (finished,) = poll(lambda: watch.events("rollout.finished"), what="rollout.finished")
    v2 = {r["replica"] for r in cluster.wait_ready("web", 3, generation=2)}

    # (b) v3 never becomes ready: abort it while it waits
    status = cluster.json("rollout", str(web(tmp_path, "v3", extra_args="--fail-health",
                                              ready_timeout="120s")))
    assert status["to_generation"] == 3
    poll(lambda: any(r["generation"] == 3 for r in cluster.replicas("web")),
         what="a v3 replica to start")
    assert cluster.json("rollout", "abort", "web")["state"] == "aborted"
    cluster.wait_ready("web", 3, generation=2)

    # (c) v4 crashes half a second after it starts: the rollout rolls itself back
    proc = cluster.cli("rollout", str(web(tmp_path, "v4",
                                          extra_args="--ready-after 30 --crash-after 0.5")),
                       "--watch", timeout_s=90)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert cluster.json("rollout", "status", "web")["state"] == "rolled_back"
    rows = cluster.wait_ready("web", 3, generation=2)
    assert {r["replica"] for r in rows} == v2, "v2 kept serving, untouched"
    count = len(load.samples())
    poll(lambda: len(load.samples()) >= count + RATE, what="a second more of load")
    samples = load.stop()

    # Zero failed or non-2xx responses, at a steady rate, for the whole of (a), (b), (c)
    assert_steady(samples)
    started, ended = watch.events("rollout.started"), watch.events("rollout.finished")
    assert [e["data"]["state"] for e in ended] == ["complete", "aborted", "rolled_back"]
    assert samples[0]["start"] < started[0]["ts"] and samples[-1]["start"] > ended[-1]["ts"]
    assert failures(samples) == [], failures(samples)[:5]
    # once the rollout was complete, every response came from v2 (never v3 or v4)
    after = [s for s in samples if s["start"] > finished["ts"]]
    assert after and {s["version"] for s in after} == {"v2"}
    assert {s["version"] for s in samples} == {"v1", "v2"}

    # Draining, not luck: no request reached a v1 replica once the ingress knew it was
    # draining, nor after its SIGTERM; and the ingress never needed a retry.
    report = arrivals(cluster, watch, v1)
    assert {a.replica for a in report} == v1
    for a in report:
        assert a.sigterm_at is not None and a.sigterm_at >= a.drained_at + 0.9, a
        assert a.after_margin == 0 and a.after_sigterm == 0, a
    summary = ingress_summary(ingress)
    assert " 0 retried, 0 cut off" in summary, summary
    assert "502" not in summary and "503" not in summary and "504" not in summary, summary


def test_scale_down_drops_nothing(cluster: Cluster, tmp_path: Path):
    cluster.json("up", str(web(tmp_path, "v1", replicas=5)))
    cluster.wait_ready("web", 5, generation=1)
    watch = start_watch(cluster)
    ingress, url = cluster.start_ingress("/:web")
    wait_serving(url, "v1")
    load = start_load(cluster, url)

    cluster.json("scale", "web", "1")
    (kept,) = poll(lambda: [r for r in cluster.replicas("web")]
                   if len(cluster.replicas("web")) == 1 else None,
                   what="web to shrink to 1 replica")
    count = len(load.samples())
    poll(lambda: len(load.samples()) >= count + RATE, what="a second more of load")
    samples = load.stop()

    stopped = {ev["data"]["replica"] for ev in watch.events("replica.stopping")}
    drained = {ev["data"]["replica"] for ev in watch.events("replica.draining")}
    assert len(stopped) == 4 and kept["replica"] not in stopped
    # Conductor side: a scale-down must drain before it stops (DESIGN.md §3 `drain`).
    assert stopped <= drained, (f"the conductor stopped {sorted(stopped - drained)} without "
                                "marking them draining first")
    assert_steady(samples)
    assert failures(samples) == [], failures(samples)[:5]
    for a in arrivals(cluster, watch, stopped):
        assert a.after_margin == 0 and a.after_sigterm == 0, a
    summary = ingress_summary(ingress)
    assert " 0 retried, 0 cut off" in summary, summary


def test_drain_is_what_makes_the_difference(cluster: Cluster, tmp_path: Path):
    """The same load and the same kind of rollout, with retries off so nothing is masked:
    with `drain 0s` and an ingress that ignores draining (it learns that a replica is
    gone only when it has exited), requests fail; with `drain 1s` and the real ingress,
    none fail and none reach a replica after it was marked draining.

    6 replicas, 2 at a time; the naive half rolls twice (12 replicas replaced), since
    each replacement loses only the few requests of the moment between its SIGTERM
    and the ingress hearing of its exit."""
    def rollout(version: str, drain: str) -> set[str]:
        proc = cluster.cli("rollout", str(web(tmp_path, version, replicas=6, surge=2,
                                              drain=drain)), "--watch", timeout_s=90)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        gen = int(version[1:])
        return {r["replica"] for r in cluster.wait_ready("web", 6, generation=gen)}

    # The drain applied when a replica is replaced is that of its own manifest.
    cluster.json("up", str(web(tmp_path, "v1", replicas=6, surge=2, drain="0s")))
    cluster.wait_ready("web", 6, generation=1)
    watch = start_watch(cluster)

    # Without draining
    naive, url = cluster.start_ingress("/:web", extra=("--ignore-drain", "--retries", "0"),
                                       name="naive-ingress")
    wait_serving(url, "v1")
    load = start_load(cluster, url, name="naive-load")
    rollout("v2", drain="0s")
    v3 = rollout("v3", drain="1s")
    naive_samples = load.stop()
    naive.stop()
    lost = failures(naive_samples)
    assert len(lost) > 0, "without draining, requests sent to stopping replicas must fail"

    # With draining: the next rollout, same load, the real ingress (still no retries)
    ingress, url = cluster.start_ingress("/:web", extra=("--retries", "0"))
    wait_serving(url, "v3")
    load = start_load(cluster, url)
    rollout("v4", drain="1s")
    samples = load.stop()
    assert_steady(samples)
    assert failures(samples) == [], failures(samples)[:5]
    report = arrivals(cluster, watch, v3)
    assert {a.replica for a in report} == v3
    for a in report:
        assert a.after_margin == 0 and a.after_sigterm == 0, a
    print(f"\nwithout drain: {len(lost)} of {len(naive_samples)} requests failed "
          f"({sorted({s['error'] or s['status'] for s in lost}, key=str)[:3]}); "
          f"with drain: 0 of {len(samples)}; last arrival after the draining mark: "
          f"{max(a.last_after_drain_s or 0 for a in report) * 1000:.1f} ms")
    ingress_summary(ingress)
