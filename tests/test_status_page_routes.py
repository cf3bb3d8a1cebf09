"""The status routes without a browser: files, config, events, the rollout counter."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import pytest
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families

from skr8tr.conductor import metrics
from skr8tr.conductor.cluster import Cluster
from skr8tr.conductor.refusals import RefusalReporter
from skr8tr.conductor.seat import Member, Seat
from skr8tr.conductor.status_http import StatusSite


def make_site(listen=("127.0.0.1", 7771), ws_port=None) -> StatusSite:
    cluster = Cluster(node_timeout_s=9.0, seat=Seat(url="ws://127.0.0.1:7771",
                                                    http="http://127.0.0.1:7780"))
    api = SimpleNamespace(cluster=cluster,
        refusals=RefusalReporter(audit_log=None, wall=time.time),
        rollouts=SimpleNamespace(active={}),
        command_seconds=metrics.Histogram("skr8tr_command_duration_seconds", "t", ("cmd",)))
    return StatusSite(cluster, api, listen=listen, ws_port=ws_port)


def test_page_and_its_files_are_served_from_the_package():
    site = make_site()
    page = site("GET", "/")
    assert page.status == 200 and page.content_type.startswith("text/html")
    html = page.body.decode()
    assert '<script src="/static/app.js"' in html and "/static/style.css" in html
    assert "http://" not in html and "https://" not in html, "no outside resources"
    headers = dict(page.headers)
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    for name, kind in [("app.js", "text/javascript"), ("style.css", "text/css"),
                       ("favicon.svg", "image/svg+xml")]:
        resp = site("GET", f"/static/{name}")
        assert resp.status == 200 and resp.content_type.startswith(kind), name
        assert b"http://" not in resp.body.replace(b"http://www.w3.org/2000/svg", b"")
    for missing in ("/static/index.html", "/static/../daemon.py", "/nope", "/static/"):
        resp = site("GET", missing)
        assert resp.status == 404 and b"/api/state" in resp.body, missing
    assert site("GET", "/healthz").body == b"ok\n"


async def test_api_state_is_the_status_document():
    site = make_site()
    doc = json.loads(site("GET", "/api/state").body)
    since = site.cluster.seat.since
    assert doc == {"nodes": [], "apps": [], "replicas": [], "rollouts": [], "history": {},
                   "leader": "ws://127.0.0.1:7771",
                   "conductors": [{"url": "ws://127.0.0.1:7771", "role": "leader",
                                   "since": since, "http": "http://127.0.0.1:7780"}],
                   "ingresses": []}
    assert site("GET", "/healthz").body == b"ok\n"


async def test_a_follower_names_its_leader_on_healthz_state_and_config():
    site = make_site()
    seat = site.cluster.seat
    seat.members = {"ws://10.0.0.2:7771": Member("ws://10.0.0.2:7771",
                                                 "http://10.0.0.2:7780", 5.0)}
    seat.step_down("ws://10.0.0.2:7771")
    health = site("GET", "/healthz")
    assert health.status == 200
    assert json.loads(health.body) == {"role": "follower", "leader": "ws://10.0.0.2:7771"}
    doc = json.loads(site("GET", "/api/state").body)
    assert doc["leader"] == "ws://10.0.0.2:7771"
    assert [(c["url"], c["role"], c["http"]) for c in doc["conductors"]] == [
        ("ws://10.0.0.2:7771", "leader", "http://10.0.0.2:7780"),
        ("ws://127.0.0.1:7771", "follower", "http://127.0.0.1:7780")]
    config = json.loads(site("GET", "/api/config").body)
    assert (config["role"], config["leader"]) == ("follower", "ws://10.0.0.2:7771")


@pytest.mark.parametrize("listen, ws_port, url, host", [
    (("127.0.0.1", 7771), None, "ws://127.0.0.1:7771/v1/watch", "127.0.0.1"),
    (("127.0.0.1", 0), lambda: 40001, "ws://127.0.0.1:40001/v1/watch", "127.0.0.1"),
    (("::1", 7771), None, "ws://[::1]:7771/v1/watch", "::1"),
    (("0.0.0.0", 7771), None, None, None),  # the page uses the host it came from
    (("::", 7771), None, None, None),
])
def test_config_tells_the_page_where_the_watch_stream_is(listen, ws_port, url, host):
    config = json.loads(make_site(listen, ws_port)("GET", "/api/config").body)
    assert config["ws_url"] == url and config["ws_host"] == host
    assert config["ws_path"] == "/v1/watch"
    assert config["ws_port"] == (ws_port() if ws_port else listen[1])
    assert config["node_timeout_s"] == 9.0 and config["version"]


def test_events_are_the_last_200_newest_first():
    site = make_site()
    for i in range(250):
        site.cluster.events.publish("app.scaled", app="web", replicas_from=i, replicas_to=i + 1)
    events = json.loads(site("GET", "/api/events").body)
    assert len(events) == 200
    assert [e["seq"] for e in events] == list(range(250, 50, -1))
    assert events[0]["event"] == "app.scaled" and events[0]["data"]["replicas_to"] == 250


async def test_finished_rollouts_are_counted_by_final_state():
    site = make_site()
    async with trio.open_nursery() as nursery:
        await nursery.start(site.count_rollouts)
        for state in ("complete", "complete", "rolled_back", "aborted"):
            site.cluster.events.publish("rollout.finished", app="web", state=state)
        site.cluster.events.publish("rollout.started", app="web")
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    text = site("GET", "/metrics").body.decode()
    samples = {(s.name, tuple(s.labels.items())): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples[("skr8tr_rollouts_total", (("state", "complete"),))] == 2
    assert samples[("skr8tr_rollouts_total", (("state", "rolled_back"),))] == 1
    assert samples[("skr8tr_rollouts_total", (("state", "aborted"),))] == 1
    assert samples[("skr8tr_rollouts_total", (("state", "failed"),))] == 0
    assert samples[("skr8tr_events_total", ())] == 5
    assert samples[("skr8tr_replicas", (("state", "ready"),))] == 0
