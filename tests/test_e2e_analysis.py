"""Rollouts judged by live traffic (DESIGN.md §11), end to end under real load.

Real processes throughout: a conductor, two node agents, hello_http replicas, one or
two ``skr8tr ingress`` daemons reporting with keys of role ``ingress``, and load
generators (tests/loadgen.py) sending ~100 requests/s in all through the ingresses.
What the users saw (every response's status and ``X-Version``, from the load
generators' own records) is checked against what the conductor decided and counted
(``rollout status --json``, /metrics, the watch stream's event times).
"""

from __future__ import annotations

import re
import urllib.request
from pathlib import Path

import pytest
from playwright.sync_api import expect

from tests.e2e import Cluster, poll, private_env
from tests.test_e2e_rollout import web as rollout_manifest
from tests.test_ingress_load import failures, start_load, start_watch, wait_serving
from tests.test_status_page import WAIT_MS, chromium_page, shot

pytestmark = pytest.mark.e2e

WINDOW_S = 4
HEALTHY_WINDOW_S = 3  # the second test's: three batches each wait it out
# From a batch's last replica ready to the failure, at the latest: the window, then at
# most one report interval (1 s) for the window's last counts, then the decision. (A
# release failing 20 % is surely over 1 % after a few dozen requests: sooner.)
JUDGED_WITHIN_S = WINDOW_S + 2.5


@pytest.fixture
def keys_cluster(tmp_path: Path):
    """Keys made (admin, node, two of role ingress), no conductor started yet."""
    c = Cluster(root=tmp_path, env=private_env(tmp_path))
    c.make_keys()
    c.ingress_keys = [c.add_key(f"ingress-{n}", "ingress") for n in "ab"]
    try:
        yield c
    finally:
        c.shutdown()


def start(c: Cluster) -> None:
    c.start_conductor()
    c.start_node("n1", "127.0.0.1", "--keep-logs", "100")
    c.start_node("n2", "127.0.0.1", "--keep-logs", "100")


def web(tmp_path: Path, version: str, *, extra_args: str = "", analysis: str = "",
        ready_timeout: str = "20s") -> Path:
    """The example service at ``version`` (3 replicas, surge 1, drain 1s), closing idle
    keep-alive connections on SIGTERM as production servers do; *analysis*: the lines
    of the rollout's analysis block, ``;``-separated."""
    return rollout_manifest(tmp_path, version, analysis=analysis,
                            extra_args=f"--close-idle-on-term {extra_args}".rstrip(),
                            rollout=f"surge 1; drain 1s; ready-timeout {ready_timeout}")


def start_ingress(c: Cluster, name: str, key: Path) -> str:
    _, url = c.start_ingress("/:web", name=name, extra=("--key", str(key), "--name", name))
    return url


def metrics(c: Cluster) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{c.http_port}/metrics", timeout=5) as r:
        return r.read().decode()


def metric(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample of /metrics (labels in any order); None if absent."""
    for line in text.splitlines():
        m = re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", line)
        if m is None:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        if all(got.get(k) == v for k, v in labels.items()):
            return float(m.group(2))
    return None


def counted(c: Cluster, generation: int) -> tuple[float | None, ...]:
    """(requests, 5xx, failed) the conductor summed for web's ``generation``."""
    text = metrics(c)
    g = str(generation)
    return tuple(metric(text, f"skr8tr_traffic_{what}_total", app="web", generation=g)
                 for what in ("requests", "errors", "failed"))


def ingresses_reporting(c: Cluster, count: int) -> bool:
    rows = c.json("status").get("ingresses", [])
    return sum(1 for r in rows if r.get("reports", 0) >= 1) >= count


# ------------------------------------------------------------------------------ the proofs


def test_a_failing_version_is_rolled_back_within_one_window_counted_exactly(
        keys_cluster: Cluster, tmp_path: Path):
    """v2 answers 500 to every 5th request. Through two ingresses (summed by the
    conductor), its first batch is judged over one window and rolled back; no request to
    v1 failed; the conductor's counts of v2 equal what the users saw, request for request."""
    c = keys_cluster
    start(c)
    analysis = f"window {WINDOW_S}s; max-error-rate 1%; min-requests 20"
    c.json("up", str(web(tmp_path, "v1", analysis=analysis)))
    c.wait_ready("web", 3, generation=1)
    urls = [start_ingress(c, f"ingress-{n}", key) for n, key in zip("ab", c.ingress_keys,
                                                                   strict=True)]
    for url in urls:
        wait_serving(url, "v1")
    poll(lambda: ingresses_reporting(c, 2), what="both ingresses to report")
    watch = start_watch(c)
    loads = [start_load(c, url, f"load-{n}", 50) for n, url in zip("ab", urls, strict=True)]

    bad = web(tmp_path, "v2", extra_args="--fail-rate 0.2", analysis=analysis)
    proc = c.cli("rollout", str(bad), "--watch", timeout_s=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr  # ended, not complete
    status = c.json("rollout", "status", "web")
    assert status["state"] == "rolled_back", status
    assert re.search(r"error rate [0-9.]+% \(\d+/\d+\) in \d+(\.\d+)?s > 1%",
                     status["message"]), status["message"]

    # Judged within one window of the batch being ready.
    ready = [e["ts"] for e in watch.events("replica.ready") if e["data"].get("generation") == 2]
    failed = watch.events("rollout.failed")
    assert ready and failed, (ready, failed)
    assert failed[0]["ts"] - min(ready) <= JUDGED_WITHIN_S, (min(ready), failed[0])
    # One batch only: the rollback came before a second v2 replica was started.
    launched = {e["data"]["replica"] for e in watch.events("replica.placed")
                if e["data"].get("generation") == 2}
    assert len(launched) == 1, launched

    # A second more of load on v1 alone, then stop: every v1 request was served.
    finished = watch.events("rollout.finished")[-1]["ts"]
    poll(lambda: all(s["start"] > finished + 1 for ld in loads for s in ld.samples()[-5:]),
         what="a second of load after the rollback")
    samples = [s for ld in loads for s in ld.stop()]
    assert [s for s in failures(samples) if s["version"] != "v2"] == []
    v2 = [s for s in samples if s["version"] == "v2"]
    v2_errors = [s for s in v2 if s["status"] == 500]
    assert v2 and v2_errors, "the load reached v2 and saw its 500s"
    assert all(s["status"] in (200, 500) for s in v2)

    # The conductor counted exactly what the users saw (both ingresses summed), once the
    # ingresses' last reports are in.
    want = (float(len(v2)), float(len(v2_errors)), 0.0)
    poll(lambda: counted(c, 2) == want, what=f"the conductor's counts of v2 to be {want}",
         timeout_s=15)
    assert counted(c, 1)[1:] == (0.0, 0.0)


def test_healthy_version_passes_latency_and_thin_traffic_fail_wrong_keys_refused(
        keys_cluster: Cluster, tmp_path: Path):
    c = keys_cluster
    start(c)
    analysis = f"window {HEALTHY_WINDOW_S}s; max-error-rate 1%; max-p99 100ms; min-requests 20"
    c.json("up", str(web(tmp_path, "v1", analysis=analysis)))
    c.wait_ready("web", 3, generation=1)

    # Keys that may not report: the node's, the admin's, and a key nobody listed. Each such
    # ingress is refused (and says so) but routes as before.
    stranger = c.root / "keys" / "stranger"
    c.cli_ok("keygen", "--out", str(stranger), conductor=False)
    refused = {"node": c.node_key, "admin": c.admin_key,
               "stranger": stranger / "signing.sec"}
    for name, key in refused.items():
        url = start_ingress(c, f"wrong-{name}", key)
        wait_serving(url, "v1")
    for name in refused:
        poll(lambda name=name: "UNAUTHORIZED" in c.others[f"wrong-{name}"].log(),
             what=f"the ingress with the {name} key to be refused")
    assert c.json("status").get("ingresses", []) == []
    for name in refused:
        c.others.pop(f"wrong-{name}").stop()

    url = start_ingress(c, "ingress-a", c.ingress_keys[0])
    wait_serving(url, "v1")
    poll(lambda: ingresses_reporting(c, 1), what="the ingress to report")
    load = start_load(c, url, "load", 100)

    # A healthy version: every batch watched for a window, then complete. While the
    # first batch is judged, its live figures are in `rollout status`, /metrics and the
    # status page, per generation.
    watch = start_watch(c)
    c.json("rollout", str(web(tmp_path, "v2", analysis=analysis)))

    def judging() -> dict | None:
        st = c.json("rollout", "status", "web")
        a, gens = st.get("analysis") or {}, {t["generation"]: t for t in st["traffic"]}
        return st if (a.get("verdict") == "watching" and a["requests"] > 0
                      and gens.get(1, {}).get("requests") and gens.get(2, {}).get("requests")
                      ) else None
    live = poll(judging, what="the first batch's live figures")
    assert live["state"] == "rolling" and live["analysis"]["generation"] == 2
    assert live["analysis"]["error_rate"] == 0.0 and live["analysis"]["p99_ms"] > 0
    assert live["analysis"]["elapsed_s"] < HEALTHY_WINDOW_S
    assert metric(metrics(c), "skr8tr_rollout_analysis_error_rate", app="web",
                  generation="2") == 0.0
    with chromium_page(1280, 900) as (_, page, page_errors):
        page.goto(f"http://127.0.0.1:{c.http_port}/", timeout=WAIT_MS)
        card = page.locator('#rollouts article[data-app="web"]')
        figures = card.locator(".analysis")
        expect(figures).to_contain_text("Traffic analysis of generation 2", timeout=WAIT_MS)
        expect(figures.locator('tr[data-generation="2"]')).to_contain_text("2 (new)")
        expect(figures.locator('tr[data-generation="1"]')).to_contain_text("1 (old)")
        shot(page, "analysis-live")
        assert page_errors == []
    proc = c.cli("rollout", "status", "web", "--watch", timeout_s=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # --watch said the live figures of the batches it followed, old generation beside
    assert re.search(r"analysis \d+s/3s: \d+ requests, error rate 0%, p99 \S+ "
                     r"\(old gen 1: 0%, p99 ", proc.stdout), proc.stdout
    status = c.json("rollout", "status", "web")
    assert status["state"] == "complete", status
    assert status["analysis"]["verdict"] == "passed", status
    assert status["analysis"]["requests"] >= 20, status
    by_generation = {t["generation"]: t for t in status["traffic"]}
    assert by_generation[2]["requests"] > 0 and by_generation[2]["errors"] == 0
    # Each of the three batches was watched for at least the window: its old replica was
    # drained no sooner than the window after the batch's new replica was ready.
    ready = sorted(e["ts"] for e in watch.events("replica.ready")
                   if e["data"].get("generation") == 2)
    drained = sorted(e["ts"] for e in watch.events("replica.draining")
                     if e["data"].get("generation") == 1)
    assert len(ready) == 3 and len(drained) == 3, (ready, drained)
    for r, d in zip(ready, drained, strict=True):
        assert d - r >= HEALTHY_WINDOW_S - 0.05, (r, d)

    # A version answering in 150 ms breaks max-p99 100ms: rolled back, the figure said.
    slow = web(tmp_path, "v3", extra_args="--delay-ms 150", analysis=analysis)
    proc = c.cli("rollout", str(slow), "--watch", timeout_s=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    status = c.json("rollout", "status", "web")
    assert status["state"] == "rolled_back", status
    assert re.search(r"p99 \d+(\.\d+)?ms in \d+(\.\d+)?s > 100ms", status["message"]), status

    samples = load.stop()
    assert failures(samples) == [], failures(samples)[:5]
    assert {s["version"] for s in samples} >= {"v1", "v2", "v3"}

    # Without traffic there is nothing to judge: after max(window, ready-timeout) the
    # rollout fails and rolls back, saying how many requests it saw.
    thin = web(tmp_path, "v4", analysis=analysis, ready_timeout="4s")
    proc = c.cli("rollout", str(thin), "--watch", timeout_s=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    status = c.json("rollout", "status", "web")
    assert status["state"] == "rolled_back", status
    assert "not enough traffic to judge: 0 requests" in status["message"], status
    assert {r["generation"] for r in c.wait_ready("web", 3)} == {2}
