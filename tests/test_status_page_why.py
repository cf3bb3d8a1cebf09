"""The status page says why (issue #17, item 10), in a real headless Chromium.

A real conductor and two node agents; Debian's chromium through Playwright, as in
tests/test_status_page.py. Shown and screenshotted (``test-artifacts/status-page/why-*``):
a crash-looping replica with its reason and restart count in its app card, a rolled
back rollout still listed in the app's history after a later one completed, and an
events table whose subject column stays on one line.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

from tests.e2e import Cluster, running_cluster
from tests.test_e2e_rollout import web as example_manifest
from tests.test_status_page import ARTIFACTS, CHROMIUM, WAIT_MS, chromium_page, shot

pytestmark = pytest.mark.e2e

LONG_APP = "a-rather-long-application-name-that-would-wrap-the-subject"


@pytest.fixture
def cluster(tmp_path: Path):
    with running_cluster(tmp_path) as c:
        yield c


def web(tmp_path: Path, version: str, extra_args: str = "") -> Path:
    return example_manifest(tmp_path, version, extra_args=extra_args, replicas=2,
                            rollout="surge 1; ready-timeout 20s")


def crash(tmp_path: Path, name: str) -> Path:
    script = tmp_path / "crash.sh"
    script.write_text("#!/bin/sh\nexit 1\n")
    script.chmod(0o755)
    path = tmp_path / f"{name}.skr8tr"
    path.write_text(f"app {name}\n  exec {script}\n  replicas 1\n")
    return path


def scroll_to(page: Page, selector: str) -> None:
    """Scroll to *selector* in one step: the page re-renders its cards every 2 s, so a
    located element may be replaced between finding and scrolling."""
    page.evaluate("(sel) => document.querySelector(sel).scrollIntoView()", selector)


def shot_of(page: Page, selector: str, name: str) -> None:
    """A screenshot of just *selector* (its box read and shot without waiting in between)."""
    box = page.evaluate("""(sel) => { const r = document.querySelector(sel)
        .getBoundingClientRect(); return {x: r.x + scrollX, y: r.y + scrollY,
        width: r.width, height: r.height}; }""", selector)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), clip=box, full_page=True)


def test_the_page_says_why_keeps_history_and_keeps_subjects_on_one_line(
        cluster: Cluster, tmp_path: Path):
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: run ./tools/test, which installs Debian's chromium "
                    "(apt-get install -y chromium)")
    cluster.start_node("n1")
    cluster.start_node("n2")
    cluster.json("up", str(web(tmp_path, "v1")))
    cluster.wait_ready("web", 2, generation=1)
    # v2 crashes before it is ready: rolled back; v3 then completes
    proc = cluster.cli("rollout", str(web(tmp_path, "v2", "--ready-after 30 --crash-after 0.3")),
                       "--watch", timeout_s=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    proc = cluster.cli("rollout", str(web(tmp_path, "v3")), "--watch", timeout_s=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert cluster.json("rollout", "status", "web")["state"] == "complete"
    (first,) = cluster.json("up", str(crash(tmp_path, LONG_APP)))["replicas"]
    base = f"http://127.0.0.1:{cluster.http_port}"

    with chromium_page(1280, 900) as (_, page, page_errors):
        page.goto(base + "/", timeout=WAIT_MS)
        expect(page.locator("#conn")).to_have_attribute("data-state", "live",
                                                        timeout=WAIT_MS)

        # 1. The crash loop: a failed row with its reason and a growing restart count.
        card = page.locator(f'#apps section[data-app="{LONG_APP}"]')
        failed = card.locator('tr[data-replica][data-state="failed"]')
        expect(failed).to_have_count(1, timeout=WAIT_MS)
        expect(card.locator("tr[data-replica]")).to_have_count(1)  # one slot
        expect(failed).to_have_attribute("data-slot", first["replica"])
        page.wait_for_function(
            """(name) => { const c = document.querySelector(
                 `#apps section[data-app="${name}"] tr[data-state="failed"] [data-restarts]`);
               return c && Number(c.dataset.restarts) >= 2; }""",
            arg=LONG_APP, timeout=WAIT_MS)
        expect(failed).not_to_have_attribute("data-replica", first["replica"])
        expect(failed.locator("th")).to_have_attribute(
            "title", re.compile(rf"^slot {first['replica']} · restart \d+$"))
        why = failed.locator(".why")
        expect(why).to_contain_text("exited with code 1")
        expect(why).to_contain_text("restarting")
        assert why.get_attribute("title").startswith("exited with code 1")
        scroll_to(page, f'#apps section[data-app="{LONG_APP}"]')
        shot(page, "why-1-crash-loop")

        # 2. The history: the rolled back generation 2 is still listed under web,
        # with how it ended, although the last rollout (3) completed.
        history = page.locator('#apps section[data-app="web"] [data-history="web"]')
        expect(history.locator("li[data-generation]")).to_have_count(3, timeout=WAIT_MS)
        states = [li.get_attribute("data-state")
                  for li in history.locator("li[data-generation]").all()]
        assert states == ["complete", "rolled_back", "complete"]  # newest first
        back = history.locator('li[data-generation="2"]')
        expect(back).to_contain_text("rolled back")
        expect(back.locator(".history-msg")).to_contain_text("exited")
        expect(page.locator('#rollouts article[data-app="web"]')).to_have_attribute(
            "data-state", "complete")
        scroll_to(page, '[data-history="web"]')
        shot(page, "why-2-history")

        # 3. The events table: every subject on one line, the whole in its title.
        subject_css = '#events tr[data-event="replica.failed"] .subject-text'
        expect(page.locator(subject_css).first).to_contain_text(LONG_APP, timeout=WAIT_MS)
        for width in (1280, 390):
            page.set_viewport_size({"width": width, "height": 900})
            # read in one step: the table is re-rendered on every event
            box = page.evaluate("""(sel) => { const s = document.querySelector(sel);
              return {
                height: s.getBoundingClientRect().height,
                line: parseFloat(getComputedStyle(s).lineHeight)
                      || 1.3 * parseFloat(getComputedStyle(s).fontSize),
                cut: s.scrollWidth > s.clientWidth, shown: s.clientWidth,
                title: s.title, text: s.textContent,
                wrap: getComputedStyle(s).whiteSpace }; }""", subject_css)
            assert box["wrap"] == "nowrap", box
            assert box["height"] < 1.6 * box["line"], f"the subject wraps: {box}"
            assert box["cut"], f"a long subject is cut with an ellipsis: {box}"
            assert box["shown"] >= 200, f"too little of the subject is shown: {box}"
            assert box["title"] == box["text"] and LONG_APP in box["title"]
            assert box["title"].count(" · ") == 2  # app · replica · node
            scroll_to(page, "#events-table")
            shot(page, f"why-3-events-{width}")
            # the history's reason fits the window (on a line of its own when narrow)
            right = page.evaluate("""() => document.querySelector(
                '[data-history="web"] li[data-generation="2"] .history-msg')
                .getBoundingClientRect().right""")
            assert right <= width, right
            shot_of(page, '[data-history="web"]', f"why-2-history-{width}")
        assert not page_errors, page_errors
    cluster.cli_ok("down", LONG_APP)
