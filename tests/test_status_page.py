"""The status page in a real headless Chromium, against a real conductor and two node agents.

Debian's ``chromium`` (``/usr/bin/chromium``, installed by ``./tools/test``)
driven by Playwright's Python package; Playwright never downloads a browser
here. Screenshots go to ``test-artifacts/status-page/``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import HELLO_HTTP, REPO, http_get
from tests.e2e import Cluster, running_cluster

pytestmark = pytest.mark.e2e

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
ARTIFACTS = REPO / "test-artifacts" / "status-page"
WAIT_MS = 30_000


@contextmanager
def chromium_page(width: int, height: int) -> Iterator[tuple[Browser, Page, list[str]]]:
    """Debian's Chromium through Playwright, one page of *width* x *height*, and the list
    its JavaScript errors are collected in; the browser is closed on the way out."""
    with sync_playwright() as pw:
        try:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS,
                                         headless=True, timeout=WAIT_MS)
        except Exception as exc:
            pytest.fail(f"cannot launch {CHROMIUM} through Playwright: {exc}")
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            yield browser, page, errors
        finally:
            browser.close()


@pytest.fixture
def cluster(tmp_path: Path):
    with running_cluster(tmp_path) as c:
        yield c


def web_manifest(tmp_path: Path, version: str) -> Path:
    """The example service with fast probes; ``drain 1s`` so each batch is visible."""
    path = tmp_path / f"web-{version}.skr8tr"
    path.write_text("\n".join([
        "app web",
        f"  exec {HELLO_HTTP}",
        f"  args --host {{host}} --port {{port}} --version {version}",
        "  port auto",
        "  replicas 3",
        "  health",
        "    check GET /healthz 200",
        "    interval 200ms",
        "  rollout",
        "    surge 1",
        "    drain 1s",
        "    ready-timeout 20s",
    ]) + "\n")
    return path


def metrics(cluster: Cluster) -> dict[tuple[str, tuple], float]:
    status, headers, body = http_get("127.0.0.1", cluster.http_port, "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body) for s in family.samples}


def shot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


# Records every (state, replaced) the rollout card shows, to prove it advanced in place.
WATCH_ROLLOUT_JS = """() => {
  window.__rollout = [];
  const record = () => {
    const card = document.querySelector('#rollouts article[data-app="web"]');
    if (!card) return;
    const seen = [card.dataset.state, Number(card.dataset.replaced)];
    const last = window.__rollout[window.__rollout.length - 1];
    if (!last || last[0] !== seen[0] || last[1] !== seen[1]) window.__rollout.push(seen);
  };
  new MutationObserver(record).observe(document.getElementById('rollouts'),
                                       {childList: true, subtree: true, attributes: true});
  record();
}"""


def test_status_page_follows_the_cluster_live(cluster: Cluster, tmp_path: Path):
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: run ./tools/test, which installs Debian's chromium "
                    "(apt-get install -y chromium)")
    cluster.start_node("n1")
    cluster.start_node("n2")
    cluster.json("up", str(web_manifest(tmp_path, "v1")))
    cluster.wait_ready("web", 3, generation=1)
    base = f"http://127.0.0.1:{cluster.http_port}"

    with chromium_page(1280, 900) as (_, page, page_errors):
        requests: list[str] = []
        page.on("request", lambda req: requests.append(req.url))
        page.goto(base + "/", timeout=WAIT_MS)
        page.evaluate("() => { window.__loadedOnce = true; }")

        conn = page.locator("#conn")
        expect(conn).to_have_attribute("data-state", "live", timeout=WAIT_MS)
        nodes = page.locator("#nodes tr[data-node]")
        expect(nodes).to_have_count(2, timeout=WAIT_MS)
        for node_id in ("n1", "n2"):
            row = page.locator(f'#nodes tr[data-node="{node_id}"]')
            expect(row).to_have_attribute("data-status", "live", timeout=WAIT_MS)
        app = page.locator('#apps section[data-app="web"]')
        expect(app.locator('tr[data-replica][data-state="ready"]')).to_have_count(
            3, timeout=WAIT_MS)
        expect(app).to_contain_text("3 / 3 ready")
        expect(page.locator('#events tr[data-event="replica.ready"]')).to_have_count(3)
        # read-only: nothing to click that could change the cluster
        assert page.locator("form, button, input").count() == 0
        shot(page, "1-deployed")

        # A rollout: the progress bar advances and ends at complete, without a reload.
        page.evaluate(WATCH_ROLLOUT_JS)
        status = cluster.json("rollout", str(web_manifest(tmp_path, "v2")))
        assert status["state"] == "rolling"
        card = page.locator('#rollouts article[data-app="web"]')
        page.wait_for_function(
            "() => window.__rollout.some(([s, n]) => s === 'rolling' && n >= 1)",
            timeout=WAIT_MS)
        expect(card).to_contain_text("Phase:")
        expect(card.locator('[data-tick="elapsed"]')).to_contain_text("elapsed")
        shot(page, "2-rolling")
        expect(card).to_have_attribute("data-state", "complete", timeout=60_000)
        progress = card.get_by_role("progressbar")
        expect(progress).to_have_attribute("aria-valuenow", "3")
        expect(card).to_contain_text("3/3 replaced")
        expect(app.locator('tbody[data-generation="2"] tr[data-state="ready"]')).to_have_count(
            3, timeout=WAIT_MS)
        seen = page.evaluate("() => window.__rollout")
        replaced = [n for _, n in seen]
        assert replaced == sorted(replaced), f"the bar went backwards: {seen}"
        assert any(s == "rolling" and 0 < n < 3 for s, n in seen), seen
        assert seen[-1] == ["complete", 3], seen
        shot(page, "3-complete")

        m = metrics(cluster)
        assert m[("skr8tr_rollouts_total", (("state", "complete"),))] == 1
        assert m[("skr8tr_nodes_live", ())] == 2

        page.set_viewport_size({"width": 390, "height": 844})
        shot(page, "4-narrow")
        page.emulate_media(color_scheme="dark")
        page.set_viewport_size({"width": 1280, "height": 900})
        shot(page, "5-dark")
        page.emulate_media(color_scheme="light")

        # The conductor goes away: the page says so and keeps retrying by itself.
        cluster.conductor.stop()
        expect(conn).to_have_attribute("data-state", "disconnected", timeout=WAIT_MS)
        expect(page.locator("#conn-text")).to_contain_text("reconnecting", timeout=WAIT_MS)
        expect(page.locator("#banner")).to_contain_text("Lost the conductor")
        expect(page.locator("#sum-conductor")).to_have_text("Unreachable")
        shot(page, "6-disconnected")

        # Same ports again: the page recovers and shows the new conductor's state.
        cluster.start_conductor()
        expect(conn).to_have_attribute("data-state", "live", timeout=WAIT_MS)
        expect(page.locator("#banner")).to_be_hidden()
        for node_id in ("n1", "n2"):
            row = page.locator(f'#nodes tr[data-node="{node_id}"]')
            expect(row).to_have_attribute("data-status", "live", timeout=WAIT_MS)
        apps = {a["app"] for a in cluster.json("status")["apps"]}
        if not apps:  # state is not persisted (yet): the app is gone after a restart
            expect(page.locator("#apps")).to_contain_text("No app is deployed.",
                                                          timeout=WAIT_MS)
        else:
            for app in apps:
                expect(page.locator(f'#apps section[data-app="{app}"]')).to_be_visible(
                    timeout=WAIT_MS)
        expect(page.locator('#events tr[data-event="node.joined"]')).to_have_count(
            2, timeout=WAIT_MS)
        shot(page, "7-recovered")

        # A node agent stops: disconnected, then expired (greyed out) after --node-timeout.
        cluster.nodes["n2"].stop()
        n2 = page.locator('#nodes tr[data-node="n2"]')
        expect(n2).to_have_attribute("data-status", "disconnected", timeout=WAIT_MS)
        expect(n2).to_have_attribute("data-status", "expired", timeout=WAIT_MS)
        expect(n2).to_have_class("expired")
        expect(n2).to_contain_text("expired")
        expect(page.locator("#sum-nodes")).to_have_text("1 / 2")
        shot(page, "8-node-expired")

        assert page.evaluate("() => window.__loadedOnce === true"), "the page reloaded"
        assert not page_errors, page_errors
        outside = [u for u in requests if not u.startswith(base + "/")]
        assert not outside, f"the page fetched from elsewhere: {outside}"


# What /api/state gains during an analysis (DESIGN.md §11), laid over the real rollout's
# status until the merged ingress reports real traffic (the shapes are the conductor's,
# tests/test_analysis_sim.py proves the figures).
def _with_analysis(state: dict, verdict: str) -> dict:
    for r in state["rollouts"]:
        if r["app"] == "web":
            r["analysis"] = {
                "generation": 2, "replicas": ["web-7"], "window_s": 30.0, "elapsed_s": 12.0,
                "requests": 200, "errors": 25, "failed": 0, "error_rate": 0.125,
                "p99_ms": 38.0, "max_error_rate": 0.01, "max_p99_ms": 500, "min_requests": 20,
                "verdict": verdict}
            r["traffic"] = [
                {"generation": 1, "requests": 900, "errors": 0, "failed": 0,
                 "error_rate": 0.0, "p99_ms": 35.0},
                {"generation": 2, "requests": 200, "errors": 25, "failed": 0,
                 "error_rate": 0.125, "p99_ms": 38.0}]
    return state


def test_rollout_card_shows_pause_and_the_traffic_analysis(cluster: Cluster, tmp_path: Path):
    import json

    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: run ./tools/test (apt-get install -y chromium)")
    cluster.start_node("n1")
    cluster.start_node("n2")
    cluster.json("up", str(web_manifest(tmp_path, "v1")))
    cluster.wait_ready("web", 3, generation=1)
    slow = web_manifest(tmp_path, "v2")
    slow.write_text(slow.read_text().replace("--version v2", "--version v2 --fail-health")
                    .replace("ready-timeout 20s", "ready-timeout 120s"))
    assert cluster.json("rollout", str(slow))["state"] == "rolling"
    assert cluster.json("rollout", "pause", "web")["paused"] is True
    base = f"http://127.0.0.1:{cluster.http_port}"
    verdict = {"now": "watching"}

    def overlay(route):
        response = route.fetch()
        body = _with_analysis(response.json(), verdict["now"])
        route.fulfill(response=response, body=json.dumps(body))

    with chromium_page(1280, 900) as (_, page, page_errors):
        page.route(base + "/api/state", overlay)
        page.goto(base + "/", timeout=WAIT_MS)
        card = page.locator('#rollouts article[data-app="web"]')
        expect(card).to_have_attribute("data-state", "rolling", timeout=WAIT_MS)
        expect(card.locator('[data-badge="paused"]')).to_be_visible(timeout=WAIT_MS)
        analysis = card.locator(".analysis")
        expect(analysis).to_contain_text("Traffic analysis of generation 2", timeout=WAIT_MS)
        expect(analysis.locator('[data-badge="watching"]')).to_be_visible()
        expect(analysis).to_contain_text("12 s of 30 s")
        expect(analysis).to_contain_text("max error rate 1 %")
        new = analysis.locator('tr[data-generation="2"]')
        expect(new).to_contain_text("2 (new)")
        expect(new).to_contain_text("12.5 %")
        expect(new).to_contain_text("38 ms")
        expect(new.locator(".tone-bad-text")).to_have_count(1)  # over the limit
        old = analysis.locator('tr[data-generation="1"]')
        expect(old).to_contain_text("1 (old)")
        expect(old.locator(".tone-bad-text")).to_have_count(0)
        window = analysis.get_by_role("progressbar")
        expect(window).to_have_attribute("aria-valuenow", "12")
        shot(page, "9-analysis-watching")

        verdict["now"] = "failed"  # the next read of /api/state (every 2 s)
        expect(analysis.locator('[data-badge="failed"]')).to_be_visible(timeout=WAIT_MS)
        shot(page, "10-analysis-failed")

        # resumed for real: the paused badge goes
        assert cluster.json("rollout", "resume", "web")["paused"] is False
        expect(card.locator('[data-badge="paused"]')).to_have_count(0, timeout=WAIT_MS)
        assert not page_errors, page_errors
    cluster.json("rollout", "abort", "web")
