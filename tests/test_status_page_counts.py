"""Issue #17.3 and #17.4 on the status page, in a real headless Chromium: the counts stay
true through a rollout, and a replica that is not ready shows its last probe.

Real conductor and two node agents; screenshots go to ``test-artifacts/status-page/``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from playwright.sync_api import expect

from tests.e2e import running_cluster
from tests.test_e2e_rollout import web as example_manifest
from tests.test_status_page import CHROMIUM, WAIT_MS, chromium_page, metrics, shot

pytestmark = pytest.mark.e2e


def web_manifest(tmp_path: Path, version: str, extra_args: str = "") -> Path:
    return example_manifest(tmp_path, version, extra_args=extra_args,
                            rollout="surge 1; drain 1s; ready-timeout 30s")


# Records every ready count the app card and the summary card show, and the texts.
WATCH_COUNTS_JS = """() => {
  window.__counts = [];
  const record = () => {
    const app = document.querySelector('#apps section[data-app="web"] [data-ready]');
    const sum = document.getElementById('sum-replicas');
    if (!app || !sum.dataset.ready) return;
    window.__counts.push([Number(app.dataset.ready), Number(app.dataset.desired),
                          Number(sum.dataset.ready), app.textContent]);
  };
  new MutationObserver(record).observe(document.body,
                                       {childList: true, subtree: true, attributes: true});
  record();
}"""


def test_the_page_counts_what_serves_and_shows_probes(tmp_path: Path):
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: run ./tools/test, which installs Debian's chromium")
    with running_cluster(tmp_path) as cluster:
        cluster.start_node("n1")
        cluster.start_node("n2")
        cluster.json("up", str(web_manifest(tmp_path, "v1")))
        cluster.wait_ready("web", 3, generation=1)
        with chromium_page(1280, 900) as (_, page, errors):
            page.goto(f"http://127.0.0.1:{cluster.http_port}/", timeout=WAIT_MS)
            app = page.locator('#apps section[data-app="web"]')
            expect(app).to_contain_text("3 / 3 ready", timeout=WAIT_MS)
            expect(page.locator("#sum-replicas")).to_have_text("3 / 3")
            page.evaluate(WATCH_COUNTS_JS)

            # v2 answers 503 for 2 s: each new replica waits, probed, before it serves
            cluster.json("rollout", str(web_manifest(tmp_path, "v2", "--ready-after 2")))
            probe = app.locator('tr[data-state="running"] [data-probe]')
            expect(probe.first).to_contain_text("GET /healthz -> 503, want 200",
                                                timeout=WAIT_MS)
            expect(app).to_contain_text("+1 starting", timeout=WAIT_MS)
            shot(page, "counts-1-starting")
            expect(app).to_contain_text("1 draining", timeout=WAIT_MS)
            shot(page, "counts-2-draining")
            card = page.locator('#rollouts article[data-app="web"]')
            expect(card).to_have_attribute("data-state", "complete", timeout=60_000)
            expect(app.locator('tbody[data-generation="2"] tr[data-state="ready"]')
                   ).to_have_count(3, timeout=WAIT_MS)
            expect(app).to_contain_text("3 / 3 ready")
            shot(page, "counts-3-complete")

            seen = page.evaluate("() => window.__counts")
            assert any("starting" in text for *_, text in seen), seen
            # never a false outage: what serves never fell below the 3 wanted
            assert min(ready for ready, *_ in seen) >= 3, seen
            assert min(total for _, _, total, _ in seen) >= 3, seen
            assert all(desired == 3 for _, desired, _, _ in seen), seen
            assert not errors, errors
        m = metrics(cluster)
        assert m[("skr8tr_app_replicas", (("app", "web"), ("state", "ready")))] == 3
        assert m[("skr8tr_app_replicas", (("app", "web"), ("state", "desired")))] == 3
