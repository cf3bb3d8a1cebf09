"""The launch message, defined once (skr8tr.core.node_protocol.Launch): from a manifest
and a placement on the conductor to the node's reading of it, field by field."""

from __future__ import annotations

import json

import pytest

from skr8tr.core import manifest
from skr8tr.core.durations import MAX_DURATION_MS
from skr8tr.core.node_protocol import Launch, decode_node_message

SOURCE = """\
app web
  exec ./serve.py
  args --host {host} --port {port}
  port auto
  env
    GREETING hi
  health
    check GET /healthz 204
    interval 250ms
    retries 4
  rollout
    settle 3s
  stop-grace 2s
"""


def placed(source: str = SOURCE, port: int | None = 20001) -> Launch:
    m = manifest.parse_manifest(source, filename="web.skr8tr", base_dir="/srv/web")
    return Launch.for_replica(m, replica="web-1-abc", generation=2, host="10.0.0.5",
                              port=port, token="ab" * 16)


def test_the_conductor_builds_it_from_the_manifest_and_the_placement():
    launch = placed()
    assert (launch.app, launch.generation, launch.app_type) == ("web", 2, "process")
    assert launch.exec == "/srv/web/serve.py"
    assert launch.args == ("--host", "10.0.0.5", "--port", "20001")
    assert (launch.port, launch.host) == (20001, "10.0.0.5")
    assert dict(launch.env) == {"GREETING": "hi"}
    assert launch.settle_ms == 3000 and launch.stop_grace_ms == 2000
    assert launch.health == manifest.HealthCheck("/healthz", expect_status=204,
                                                 interval_ms=250, retries=4)


def test_the_node_reads_back_exactly_what_was_sent():
    launch = placed()
    assert decode_node_message(launch.encode()) == launch
    # A replica record keeps the fields without the envelope: the same reading.
    assert Launch.from_fields(json.loads(json.dumps(launch.fields()))) == launch


def test_settle_defaults_in_the_manifest():
    launch = placed(SOURCE.replace("  rollout\n    settle 3s\n", ""))
    assert launch.settle_ms == manifest.RolloutPolicy().settle_ms == 8000


def test_the_longest_settle_a_manifest_allows_can_be_sent():
    # 300h was a valid manifest that the old wire bound (10**9 ms) could not carry.
    for settle in ("300h", "720h"):
        launch = placed(SOURCE.replace("settle 3s", f"settle {settle}"))
        assert decode_node_message(launch.encode()) == launch
    assert placed(SOURCE.replace("settle 3s", "settle 720h")).settle_ms == MAX_DURATION_MS


def test_no_port_without_a_port_line():
    launch = placed(SOURCE.replace("  port auto\n", "").replace(" --port {port}", ""),
                    port=None)
    assert launch.port is None and launch.args == ("--host", "10.0.0.5")
    # {port} without a port line never gets this far: the manifest is refused.
    with pytest.raises(manifest.ManifestError, match="the app has no 'port'"):
        placed(SOURCE.replace("  port auto\n", ""), port=None)


@pytest.mark.parametrize(("change", "words"), [
    ({"settle_ms": MAX_DURATION_MS + 1}, "'settle_ms'"),
    ({"settle_ms": -1}, "'settle_ms'"),
    ({"stop_grace_ms": 1.5}, "'stop_grace_ms'"),
    ({"port": 0}, "'port'"),
    ({"port": 65_536}, "'port'"),
    ({"health": {"path": "/h", "expect_status": 200, "interval_ms": 100, "timeout_ms": 100,
                 "retries": manifest.MAX_RETRIES + 1}}, "'health'"),
    ({"health": {"path": "/h", "expect_status": 200, "interval_ms": 0, "timeout_ms": 100,
                 "retries": 1}}, "'health'"),
    ({"args": "--port 1"}, "'args'"),
    ({"replica": "../etc"}, "'replica'"),
])
def test_every_field_is_checked_on_reading(change, words):
    with pytest.raises(ValueError, match=words):
        Launch.from_fields({**placed().fields(), **change})
    assert words in decode_node_message(
        json.dumps({"v": 1, "type": "launch", **placed().fields(), **change})).message


def test_a_missing_field_is_named():
    fields = placed().fields()
    del fields["settle_ms"]
    with pytest.raises(ValueError, match="missing field 'settle_ms'"):
        Launch.from_fields(fields)
