"""The status page with several conductors, in a real headless Chromium: a follower's
page says so and links to the leader's; after a failover it goes live by itself."""

from __future__ import annotations

from pathlib import Path

import pytest
from playwright.sync_api import expect

from tests.e2e import poll
from tests.ha import running_ha_cluster
from tests.test_status_page import CHROMIUM, WAIT_MS, chromium_page, shot

pytestmark = pytest.mark.e2e


def test_a_followers_page_links_to_the_leader_and_goes_live_after_a_failover(
        tmp_path: Path):
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: run ./tools/test, which installs Debian's chromium")
    with running_ha_cluster(tmp_path, conductors=2, nodes=0) as ha:
        leader = ha.leader()
        follower = next(name for name in ha.conductors if name != leader)
        leader_http = f"http://127.0.0.1:{ha.conductors[leader].http_port}"
        follower_http = f"http://127.0.0.1:{ha.conductors[follower].http_port}"
        with chromium_page(1280, 700) as (browser, page, errors):
            page.goto(follower_http + "/", timeout=WAIT_MS)
            banner = page.locator("#follower")
            expect(banner).to_be_visible(timeout=WAIT_MS)
            expect(page.locator("#leader-link")).to_have_attribute(
                "href", leader_http, timeout=WAIT_MS)
            expect(page.locator("#banner")).to_be_hidden()
            expect(page.locator("#conn-text")).to_contain_text("Follower",
                                                               timeout=WAIT_MS)
            shot(page, "ha-1-follower")

            other = browser.new_page(viewport={"width": 1280, "height": 700})
            other.goto(leader_http + "/", timeout=WAIT_MS)
            expect(other.locator("#conn")).to_have_attribute("data-state", "live",
                                                             timeout=WAIT_MS)
            expect(other.locator("#follower")).to_be_hidden()
            expect(other.locator("#sum-conductor-note")).to_contain_text(
                "leader of 2 conductors", timeout=WAIT_MS)
            shot(other, "ha-2-leader")

            ha.kill(leader)
            poll(lambda: ha.leader() == follower, what="the follower to lead")
            # The dead leader's page offers the other conductors' pages.
            expect(other.locator("#banner a.other-conductor")).to_have_attribute(
                "href", follower_http + "/", timeout=WAIT_MS)
            shot(other, "ha-4-leader-lost")
            other.close()
            # The page retries with backoff (at most 10 s) and goes live by itself.
            expect(page.locator("#conn")).to_have_attribute("data-state", "live",
                                                            timeout=WAIT_MS)
            expect(banner).to_be_hidden()
            shot(page, "ha-3-now-leader")
            assert errors == []
