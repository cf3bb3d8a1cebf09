"""core/ingress_protocol.py: the /v1/ingress hello is bounded field by field before any
signature is looked at; the conductor's messages have the shapes of DESIGN.md §11."""

from __future__ import annotations

import json

import pytest

from skr8tr.core import ingress_protocol as ip
from skr8tr.core.keys import generate_keypair

PUB = generate_keypair()[1]
GOOD = {"type": "hello", "ingress": "edge-1.example_a", "key": PUB, "sig": "ab" * 64,
        "version": "0.18.0"}


def test_a_good_hello_decodes():
    assert ip.decode_hello(dict(GOOD)) == ip.IngressHello("edge-1.example_a", PUB, "ab" * 64,
                                                          "0.18.0")


@pytest.mark.parametrize("change, says", [
    ({"type": "report"}, "expected"),
    ({"extra": 1}, "exactly"),
    ({"ingress": ""}, "ingress must be"),
    ({"ingress": "x" * 65}, "ingress must be"),
    ({"ingress": "edge 1"}, "ingress must be"),
    ({"ingress": "edge/1"}, "ingress must be"),
    ({"ingress": 7}, "ingress must be"),
    ({"key": ""}, "key must be"),
    ({"key": "a" * 4097}, "key must be"),
    ({"key": None}, "key must be"),
    ({"sig": "a" * 8193}, "sig must be"),
    ({"sig": 1}, "sig must be"),
    ({"version": "1 0"}, "version must be"),
    ({"version": "v" * 65}, "version must be"),
])
def test_a_bad_hello_says_which_field(change, says):
    why = ip.decode_hello({**GOOD, **change})
    assert isinstance(why, str) and says in why and len(why) < 120


def test_a_missing_field_is_refused():
    for name in ("ingress", "key", "sig", "version"):
        hello = dict(GOOD)
        del hello[name]
        assert "exactly" in ip.decode_hello(hello)


def test_parse_is_strict_and_bounded():
    assert isinstance(ip.parse('{"a":1,"a":2}'), str)  # duplicate keys
    assert isinstance(ip.parse('{"a":NaN}'), str)
    assert isinstance(ip.parse("[1]"), str)
    assert "limit" in ip.parse('{"a":"' + "x" * ip.MAX_MESSAGE_BYTES + '"}')
    assert ip.parse('{"type":"hello"}') == {"type": "hello"}


def test_the_conductors_messages():
    assert json.loads(ip.challenge(b"\x01" * 32)) == {"type": "challenge", "nonce": "01" * 32}
    assert json.loads(ip.welcome(1.0)) == {"type": "welcome", "interval_s": 1.0}
    assert json.loads(ip.error("BAD_REQUEST", "no")) == {
        "type": "error", "code": "BAD_REQUEST", "message": "no"}
    assert json.loads(ip.error("NOT_LEADER", "follower", leader=None, with_leader=True)) == {
        "type": "error", "code": "NOT_LEADER", "message": "follower", "leader": None}


def test_traffic_metrics_name_only_the_apps_held():
    from skr8tr.conductor import metrics, traffic_metrics
    from skr8tr.conductor.cluster import Cluster
    from skr8tr.conductor.traffic import TrafficBook
    from skr8tr.core.traffic import Counts, Report

    owners = {"web-1": ("web", 1), "web-2": ("web", 2), "old-1": ("old", 1)}
    cluster = Cluster(node_timeout_s=9.0)
    cluster.traffic = TrafficBook(owners.get)
    cluster.apps = {"web": None}  # only the names are read
    c = Counts()
    for status in (200, 200, 500, None):
        c.record(status, 20.0)
    cluster.traffic.add(Report(1, {"web-1": c, "web-2": Counts(1, 0, 1, {}),
                                   "old-1": c, "nobody": c}))
    text = metrics.render(traffic_metrics.families(cluster))
    assert 'skr8tr_traffic_requests_total{app="web",generation="1"} 4' in text
    assert 'skr8tr_traffic_errors_total{app="web",generation="1"} 1' in text
    assert 'skr8tr_traffic_failed_total{app="web",generation="2"} 1' in text
    assert 'skr8tr_traffic_p99_seconds{app="web",generation="1"} 0.02' in text
    assert 'generation="2"} ' not in text.split("skr8tr_traffic_p99_seconds")[-1]  # no answers
    assert 'app="old"' not in text  # not an app this conductor runs (any more)
    assert "skr8tr_ingress_report_rows_unknown_total 1" in text
    assert 'skr8tr_ingress_refused_total{reason="unauthorized"} 0' in text


def test_the_human_status_lists_the_ingresses_only_when_there_are_some():
    from skr8tr import output

    doc = {"nodes": [], "apps": [], "replicas": [], "rollouts": [], "ingresses": []}
    assert "INGRESSES" not in output.status(doc)
    doc["ingresses"] = [{"ingress": "edge-1", "key": "sha256:0123456789abcdef",
                         "address": "10.0.0.7", "reports": 42, "last_report_s": 0.4},
                        {"ingress": "edge-2", "key": "sha256:fedcba9876543210",
                         "address": "10.0.0.8", "reports": 0, "last_report_s": None}]
    text = output.status(doc).split("INGRESSES\n", 1)[1]
    assert text.splitlines() == [
        "INGRESS  ADDRESS   KEY                      REPORTS  LAST REPORT",
        "edge-1   10.0.0.7  sha256:0123456789abcdef  42       0.4s ago",
        "edge-2   10.0.0.8  sha256:fedcba9876543210  0        -"]


def test_max_ingresses_from_file_env_and_command_line(tmp_path):
    from skr8tr import daemon_config
    from skr8tr.cli_args import build_parser
    from skr8tr.conductor.daemon import config_from_args

    def resolve(argv, environ=None):
        parser = build_parser()
        return daemon_config.apply(parser, argv, parser.parse_args(argv),
                                   environ=environ or {})

    def max_ingresses(argv, environ=None):
        return config_from_args(resolve(["conductor", "--insecure", *argv],
                                        environ)).limits.max_ingresses

    cfg = tmp_path / "c.toml"
    cfg.write_text("max-ingresses = 3\n")
    assert max_ingresses([]) == 16
    assert max_ingresses(["--config", str(cfg)]) == 3
    assert max_ingresses(["--config", str(cfg)], {"SKR8TR_CONDUCTOR_MAX_INGRESSES": "5"}) == 5
    assert max_ingresses(["--max-ingresses", "7"], {"SKR8TR_CONDUCTOR_MAX_INGRESSES": "5"}) == 7
    with pytest.raises(daemon_config.ConfigError):
        max_ingresses([], {"SKR8TR_CONDUCTOR_MAX_INGRESSES": "0"})
