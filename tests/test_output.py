"""The CLI's human tables (skr8tr.output): pure functions of results."""

from __future__ import annotations

from skr8tr import output


def test_status_lists_the_conductors_leader_first_only_when_there_are_several():
    rows = [{"url": "ws://b:7771", "role": "follower", "since": 940.0, "http": "http://b:7780"},
            {"url": "ws://a:7771", "role": "leader", "since": 1000.0 - 3725, "http": None}]
    text = output.conductors(rows, now=1000.0)
    lines = text.splitlines()
    assert lines[0].split() == ["URL", "ROLE", "FOR", "STATUS", "PAGE"]
    assert lines[1].split() == ["ws://a:7771", "leader", "1h02m", "-"]
    assert lines[2].split() == ["ws://b:7771", "follower", "1m00s", "http://b:7780"]
    lone = {"nodes": [], "apps": [], "replicas": [], "rollouts": [], "conductors": rows[:1]}
    assert "CONDUCTORS" not in output.status(lone)
    assert output.status({**lone, "conductors": rows}).startswith("CONDUCTORS\n")


def rows(*states: str) -> list[dict]:
    return [{"app": "web", "replica": f"web-{i}", "node": "n1", "pid": 100 + i,
             "port": 20000 + i, "generation": 1, "state": s} for i, s in enumerate(states)]


def test_scale_says_what_was_asked_and_what_is_happening():
    down = {"app": "web", "generation": 1, "desired": 2, "previous": 5,
            "replicas": rows("ready", "ready", "draining", "draining", "stopping")}
    assert output.up(down).splitlines()[0] == (
        "web: 5 -> 2 replicas, 2 ready, 2 draining, 1 stopping")
    zero = {"app": "web", "generation": 1, "desired": 0, "previous": 2,
            "replicas": rows("draining", "draining")}
    assert output.up(zero).splitlines()[0] == "web: 2 -> 0 replicas, 2 draining"
    up = {"app": "web", "generation": 1, "desired": 1, "previous": 0, "replicas": rows("pending")}
    assert output.up(up).splitlines()[0] == "web: 0 -> 1 replica, 1 starting"


def test_up_counts_the_desired_replicas_not_the_rows():
    result = {"app": "web", "generation": 1, "desired": 3,
              "replicas": rows("pending", "running", "ready")}
    assert output.up(result).splitlines()[0] == "web: generation 1, 3 replicas, 1 ready, 2 starting"
    older = {"app": "web", "generation": 1, "replicas": rows("ready", "ready")}  # no `desired`
    assert output.up(older).splitlines()[0] == "web: generation 1, 2 replicas, 2 ready"
