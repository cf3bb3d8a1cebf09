"""/metrics: the exposition format (checked by prometheus_client's parser) and live counters."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from skr8tr.conductor import metrics
from skr8tr.conductor.daemon import ConductorConfig, run_conductor
from skr8tr.core import keys
from skr8tr.ws import trio_client
from tests.security_helpers import http_get
from tests.wire_helpers import encode_request

DEADLINE_S = 20


def parse(text: str) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


# ---------------------------------------------------------------------- the format


def test_render_parses_as_prometheus_text():
    gauge = metrics.Gauge("x_nodes", "Nodes.\nBy state \\ kind.", ("state",))
    gauge.set(2, state="live")
    gauge.set(0.5, state='odd "quoted"\nname\\')
    counter = metrics.Counter("x_refused_total", "Refused.", ("reason",),
                              preset=[{"reason": "UNAUTHORIZED"}])
    counter.inc(reason="REPLAY")
    counter.inc(2, reason="REPLAY")
    plain = metrics.Counter("x_events_total", "Events.")
    plain.set_total(7)
    hist = metrics.Histogram("x_seconds", "Latency.", ("cmd",), buckets=(0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 3.0):
        hist.observe(value, cmd="ping")

    text = metrics.render([gauge, counter, plain, hist])
    assert text.endswith("\n")
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["x_nodes"].type == "gauge"
    assert families["x_nodes"].documentation == "Nodes.\nBy state \\ kind."
    assert families["x_refused"].type == "counter"
    assert families["x_seconds"].type == "histogram"
    samples = parse(text)
    assert samples[("x_nodes", (("state", "live"),))] == 2
    assert samples[("x_nodes", (("state", 'odd "quoted"\nname\\'),))] == 0.5
    assert samples[("x_refused_total", (("reason", "UNAUTHORIZED"),))] == 0
    assert samples[("x_refused_total", (("reason", "REPLAY"),))] == 3
    assert samples[("x_events_total", ())] == 7
    buckets = {dict(labels)["le"]: v for (name, labels), v in samples.items()
               if name == "x_seconds_bucket"}
    assert buckets == {"0.1": 2, "1.0": 3, "+Inf": 4}, "cumulative, le inclusive"
    assert samples[("x_seconds_count", (("cmd", "ping"),))] == 4
    assert samples[("x_seconds_sum", (("cmd", "ping"),))] == pytest.approx(3.65)


@pytest.mark.parametrize("make, message", [
    (lambda: metrics.Counter("x_things", "no suffix"), "must end in _total"),
    (lambda: metrics.Counter("x_total", "t", ("a",)).inc(-1, a="1"), "only go up"),
    (lambda: metrics.Gauge("x", "g", ("a",)).set(1, b="1"), "takes labels"),
    (lambda: metrics.Histogram("x", "h", ("le",)), "named le"),
])
def test_misuse_is_refused(make, message):
    with pytest.raises(ValueError, match=message):
        make()


# ---------------------------------------------------------------------- a real conductor


async def scrape(port: int) -> dict[tuple[str, tuple], float]:
    status, headers, body = await http_get(port, "/metrics")
    assert status == 200
    assert headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    return parse(body.decode())


async def call(ws: trio_client.ClientConnection, message: str) -> dict:
    await ws.send_message(message)
    return json.loads(await ws.get_message())


def refused(samples: dict, code: str) -> float:
    return samples.get(("skr8tr_requests_refused_total", (("reason", code),)), 0.0)


async def test_counters_move_when_requests_are_refused(tmp_path: Path):
    signing_key, pub = keys.generate_keypair()
    authorized = tmp_path / "authorized_keys"
    authorized.write_text(f"admin {pub} test\n")
    config = ConductorConfig(listen=("127.0.0.1", 0), http=("127.0.0.1", 0),
                             authorized_keys=str(authorized))
    with trio.fail_after(DEADLINE_S):
        async with trio.open_nursery() as nursery:
            ws_port, http_port = await nursery.start(run_conductor, config)
            before = await scrape(http_port)
            assert refused(before, "UNAUTHORIZED") == 0
            assert before[("skr8tr_nodes_live", ())] == 0
            assert before[("skr8tr_rollouts_total", (("state", "complete"),))] == 0

            async with trio_client.open_websocket(
                    f"ws://127.0.0.1:{ws_port}/v1/cli") as ws:
                up = encode_request(id="1", cmd="up", args={
                    "manifest": "app x\n  exec /bin/true\n", "format": "skr8tr",
                    "base_dir": str(tmp_path)})
                reply = await call(ws, up)
                assert reply["error"]["code"] == "UNAUTHORIZED"
                stale = encode_request(id="2", cmd="down", args={"app": "x"},
                                                signing_key=signing_key, ts=time.time() - 600)
                assert (await call(ws, stale))["error"]["code"] == "EXPIRED"
                once = encode_request(id="3", cmd="down", args={"app": "x"},
                                               signing_key=signing_key, ts=time.time())
                assert (await call(ws, once))["error"]["code"] == "NOT_FOUND"
                assert (await call(ws, once))["error"]["code"] == "REPLAY"
                for i in range(3):
                    reply = await call(ws, encode_request(id=f"p{i}", cmd="ping",
                                                                   args={}))
                    assert reply["ok"]

            after = await scrape(http_port)
            assert refused(after, "UNAUTHORIZED") == 1
            assert refused(after, "EXPIRED") == 1
            assert refused(after, "REPLAY") == 1
            assert after[("skr8tr_command_duration_seconds_count", (("cmd", "ping"),))] == 3
            assert after[("skr8tr_command_duration_seconds_count", (("cmd", "down"),))] == 1
            assert after[("skr8tr_command_duration_seconds_bucket",
                          (("cmd", "ping"), ("le", "+Inf")))] == 3
            assert ("skr8tr_command_duration_seconds_count", (("cmd", "up"),)) not in after, \
                "a refused request runs no command"
            nursery.cancel_scope.cancel()
