"""Issue #18, the conductor's intake end to end: a real conductor, two real node agents and
real workloads (the example service), the real CLI; two test ingresses (tests/ingress_client.py,
the handshake done by hand) report counts for the real replicas, and the conductor sums
them per generation in ``status --json`` and ``/metrics``. Keys come and go by SIGHUP."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from skr8tr import keyfiles
from skr8tr.ws import trio_client
from skr8tr.ws.frames import ConnectionClosed
from tests.conftest import http_get
from tests.e2e import Cluster, poll, running_cluster
from tests.ingress_client import open_ingress, report, say_hello
from tests.test_e2e_rollout import web

pytestmark = pytest.mark.e2e


def scrape(cluster: Cluster) -> dict[tuple[str, tuple], float]:
    status, _, body = http_get("127.0.0.1", cluster.http_port, "/metrics")
    assert status == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body)
            for s in family.samples}


def traffic(samples: dict, generation: int) -> tuple[float, float, float]:
    labels = (("app", "web"), ("generation", str(generation)))
    return tuple(samples.get((f"skr8tr_traffic_{kind}_total", labels), 0.0)
                 for kind in ("requests", "errors", "failed"))


def reload_keys(cluster: Cluster, times: int) -> None:
    cluster.conductor.proc.send_signal(signal.SIGHUP)
    poll(lambda: cluster.conductor.log().count("SIGHUP: re-read") == times,
         what="the conductor to re-read its keys")


def test_two_ingresses_are_summed_per_generation_and_a_revoked_key_is_cut_off(tmp_path: Path):
    with running_cluster(tmp_path, "--max-ingresses", "2") as cluster:
        keys_a = keyfiles.load_signing_key(cluster.add_key("edge-a", "ingress"))
        keys_b = keyfiles.load_signing_key(cluster.add_key("edge-b", "ingress"))
        reload_keys(cluster, 1)
        cluster.start_node("n1")
        cluster.start_node("n2")
        cluster.json("up", str(web(tmp_path, "v1", replicas=2)))
        r1, r2 = (r["replica"] for r in cluster.wait_ready("web", 2, generation=1))

        async def two_ingresses() -> None:
            async with open_ingress(cluster.url, keys_a, "edge-a") as a, \
                    open_ingress(cluster.url, keys_b, "edge-b") as b:
                # a: 33 requests to r1 (3 of them 500), 12 to r2 (2 never answered);
                # b: 22 to r1 (2 of them 503); and a replica nobody runs.
                await a.send_message(report(1, {r1: ([200] * 30 + [500] * 3, 5.0),
                                                r2: ([200] * 10 + [None] * 2, 5.0)}))
                await b.send_message(report(1, {r1: ([200] * 20 + [503] * 2, 50.0),
                                                "web-999": ([200], 1.0)}))

                def both_counted() -> dict | None:
                    doc = cluster.json("status")
                    rows = {r["ingress"]: r for r in doc["ingresses"]}
                    return rows if [r["reports"] for r in rows.values()] == [1, 1] else None

                rows = await trio.to_thread.run_sync(
                    lambda: poll(both_counted, what="both reports in status"))
                assert sorted(rows) == ["edge-a", "edge-b"]
                assert {r["address"] for r in rows.values()} == {"127.0.0.1"}
                human = await trio.to_thread.run_sync(cluster.cli_ok, "status")
                listed = human.split("INGRESSES\n", 1)[1].splitlines()[1:]
                assert sorted(line.split()[0] for line in listed) == ["edge-a", "edge-b"]
                samples = await trio.to_thread.run_sync(scrape, cluster)
                assert traffic(samples, 1) == (67, 5, 2)
                assert samples[("skr8tr_ingress_sessions", ())] == 2
                assert samples[("skr8tr_ingress_reports_total", ())] == 2
                assert samples[("skr8tr_ingress_report_rows_unknown_total", ())] == 1
                # 65 answers: 43 at 5 ms, 22 at 50 ms; the 99th percentile is in 50's bucket
                p99 = samples[("skr8tr_traffic_p99_seconds",
                               (("app", "web"), ("generation", "1")))]
                assert 0.040 < p99 <= 0.050

                # --max-ingresses 2: a third session is refused, whatever its key.
                async with trio_client.open_websocket(cluster.url + "/v1/ingress") as c:
                    answer = await say_hello(c, keys_a, "edge-c")
                    assert answer["code"] == "NO_CAPACITY"

                # edge-b's key leaves authorized_keys: its session is closed at once.
                text = cluster.authorized_keys.read_text()
                cluster.authorized_keys.write_text(
                    "".join(line for line in text.splitlines(keepends=True)
                            if not line.rstrip().endswith(" edge-b")))
                await trio.to_thread.run_sync(reload_keys, cluster, 2)
                with trio.fail_after(10):
                    refusal = json.loads(await b.get_message())
                    assert refusal["code"] == "UNAUTHORIZED" and "revoked" in refusal["message"]
                    with pytest.raises(ConnectionClosed) as closed:
                        await b.get_message()
                assert closed.value.code == 1008
                await a.send_message(report(2, {r2: ([200] * 4, 5.0)}))

                def a_counted() -> bool:
                    rows = cluster.json("status")["ingresses"]
                    return [(r["ingress"], r["reports"]) for r in rows] == [("edge-a", 2)]

                await trio.to_thread.run_sync(lambda: poll(a_counted, what="edge-a alone"))

        trio.run(two_ingresses)
        samples = scrape(cluster)
        assert traffic(samples, 1) == (71, 5, 2)
        assert samples[("skr8tr_ingress_refused_total", (("reason", "revoked"),))] == 1
        assert samples[("skr8tr_ingress_refused_total",
                        (("reason", "too_many_ingresses"),))] == 1
        poll(lambda: cluster.json("status")["ingresses"] == [], what="the sessions to end")

        # A new generation is counted apart; the old one's sums stay.
        cluster.json("rollout", str(web(tmp_path, "v2", replicas=2)))
        poll(lambda: cluster.json("rollout", "status", "web")["state"] == "complete",
             what="the rollout to complete")
        (n1,) = [r["replica"] for r in cluster.wait_ready("web", 2, generation=2)][:1]

        async def one_more() -> None:
            async with open_ingress(cluster.url, keys_a, "edge-a") as a:
                await a.send_message(report(1, {n1: ([200, 502], 8.0)}))
                await trio.to_thread.run_sync(
                    lambda: poll(lambda: traffic(scrape(cluster), 2) == (2, 1, 0),
                                 what="generation 2's traffic"))

        trio.run(one_more)
        assert traffic(scrape(cluster), 1) == (71, 5, 2)


def test_the_real_ingress_reports_every_request_it_routed(tmp_path: Path):
    """`skr8tr ingress --key` (skr8tr/ingress/reporter.py) against this intake: 50 GETs
    through it to one replica that fails every 5th request; the conductor counts 50
    requests and exactly 10 errors for that generation."""
    import http.client

    with running_cluster(tmp_path) as cluster:
        key = cluster.add_key("edge", "ingress")
        reload_keys(cluster, 1)
        cluster.start_node("n1")
        cluster.start_node("n2")
        cluster.json("up", str(web(tmp_path, "v1", replicas=1, extra_args="--fail-rate 0.2")))
        cluster.wait_ready("web", 1, generation=1)
        _, base = cluster.start_ingress("/:web", extra=("--key", str(key), "--name", "edge-1"))
        poll(lambda: [r["ingress"] for r in cluster.json("status")["ingresses"]] == ["edge-1"],
             what="the ingress to join")
        host, port = base.removeprefix("http://").split(":")
        statuses = []
        for _ in range(50):
            conn = http.client.HTTPConnection(host, int(port), timeout=5)
            conn.request("GET", "/")
            statuses.append(conn.getresponse().status)
            conn.close()
        assert statuses.count(500) == 10 and statuses.count(200) == 40
        poll(lambda: traffic(scrape(cluster), 1) == (50, 10, 0),
             what="the ingress's counts at the conductor")
        [row] = cluster.json("status")["ingresses"]
        assert row["ingress"] == "edge-1" and row["reports"] >= 1
        samples = scrape(cluster)
        assert samples[("skr8tr_ingress_report_rows_unknown_total", ())] == 0
        assert sum(v for (name, _), v in samples.items()
                   if name == "skr8tr_ingress_refused_total") == 0
