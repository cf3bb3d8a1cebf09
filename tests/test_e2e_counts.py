"""Issue #17.4 end to end: every count the CLI shows is true, during a real rollout too.

Real conductor, two real node agents, hello_http workloads, the real CLI.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e import DEADLINE_S, poll, running_cluster
from tests.test_e2e_rollout import web as example_manifest

pytestmark = pytest.mark.e2e


def web(tmp_path: Path, version: str, extra_args: str = "", replicas: int = 3) -> Path:
    """``drain 1s``: each old replica is seen draining; surge 1: one new one at a time."""
    return example_manifest(tmp_path, version, extra_args=extra_args, replicas=replicas,
                            rollout="surge 1; drain 1s; ready-timeout 30s")


def apps_table(text: str) -> list[dict[str, str]]:
    """The APPS table of the human ``status``, as rows of {COLUMN: cell}."""
    lines = text.split("APPS\n", 1)[1].split("\n\n", 1)[0].splitlines()
    header = lines[0].split()
    return [dict(zip(header, line.split(), strict=False)) for line in lines[1:]]


def test_counts_during_a_rollout_never_show_a_false_outage(tmp_path: Path):
    with running_cluster(tmp_path) as cluster:
        cluster.start_node("n1")
        cluster.start_node("n2")
        cluster.json("up", str(web(tmp_path, "v1")))
        cluster.wait_ready("web", 3, generation=1)
        # v2 answers 503 ("not yet") for 1.5 s: each batch is seen starting, then draining
        status = cluster.json("rollout", str(web(tmp_path, "v2", "--ready-after 1.5")))
        assert status["state"] == "rolling"
        samples: list[tuple[dict, list[dict], str]] = []

        def sample() -> bool:
            doc = cluster.json("status")
            (app,) = [a for a in doc["apps"] if a["app"] == "web"]
            (rollout,) = [r for r in doc["rollouts"] if r["app"] == "web"]
            samples.append((app, doc["replicas"], rollout["state"]))
            return rollout["state"] != "rolling"

        poll(sample, timeout_s=DEADLINE_S, step_s=0.05, what="the rollout to end")
        assert samples[-1][2] == "complete"
        during = [(app, rows) for app, rows, state in samples if state == "rolling"]
        assert during, "no sample while rolling"
        for app, rows in during:
            serving = sum(r["state"] == "ready" for r in rows)
            # the count is what serves, of any generation (was: of the old one only)
            assert app["ready"] == serving, (app, rows)
            assert app["ready"] >= app["desired"] == 3, (app, rows)
            assert app["starting"] == sum(r["state"] in ("pending", "running") for r in rows)
            assert app["draining"] == sum(r["state"] == "draining" for r in rows)
        assert any(app["starting"] >= 1 for app, _ in during), during
        assert any(app["draining"] >= 1 for app, _ in during), during
        assert any({r["generation"] for r in rows if r["state"] == "ready"} == {1, 2}
                   for _, rows in during), "never saw both generations serving"

        # the human table says the same
        (row,) = apps_table(cluster.cli_ok("status"))
        assert (row["APP"], row["DESIRED"], row["READY"]) == ("web", "3", "3")


def test_scale_says_from_and_to_and_what_the_replicas_do(tmp_path: Path):
    with running_cluster(tmp_path) as cluster:
        cluster.start_node("n1")
        cluster.start_node("n2")
        cluster.json("up", str(web(tmp_path, "v1")))
        cluster.wait_ready("web", 3)
        out = cluster.cli_ok("scale", "web", "5").splitlines()[0]
        assert out == "web: 3 -> 5 replicas, 3 ready, 2 starting", out
        cluster.wait_ready("web", 5)
        out = cluster.cli_ok("scale", "web", "2").splitlines()[0]
        assert out == "web: 5 -> 2 replicas, 2 ready, 3 draining", out
        poll(lambda: len(cluster.replicas("web")) == 2, what="three replicas to go")
        out = cluster.cli_ok("scale", "web", "0").splitlines()[0]
        assert out == "web: 2 -> 0 replicas, 2 draining", out
        result = cluster.json("scale", "web", "1")
        assert (result["previous"], result["desired"]) == (0, 1)
        (app,) = cluster.json("status")["apps"]
        assert app["desired"] == 1
