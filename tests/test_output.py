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
