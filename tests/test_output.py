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


def _replica(**fields) -> dict:
    row = {"app": "web", "replica": "web-aaaaaa", "node": "n1", "pid": 10, "port": 20000,
           "generation": 1, "state": "ready", "slot": "web-aaaaaa", "restarts": 0,
           "reason": None, "exit_code": None, "signal": None, "next_restart": None}
    row = {**row, **fields}
    return {**row, "slot": fields.get("slot", row["replica"])}


def test_replicas_table_has_no_reason_column_while_nothing_failed():
    lines = output.replicas([_replica(), _replica(replica="web-bbbbbb")]).splitlines()
    assert lines[0].split() == ["APP", "REPLICA", "NODE", "PID", "PORT", "GEN", "STATE",
                                "RESTARTS"]
    assert lines[1].split()[-2:] == ["ready", "0"]


def test_replicas_table_says_why_a_replica_failed_and_when_it_restarts():
    rows = [
        _replica(replica="web-cccccc", pid=None, state="failed", restarts=3, exit_code=1,
                 reason="exited with code 1", next_restart=7.6),
        _replica(replica="web-dddddd", restarts=2, reason="killed by signal 9 (SIGKILL)"),
        _replica(replica="web-eeeeee"),
        _replica(replica="web-ffffff", pid=None, state="failed", restarts=0,
                 reason="cannot start: [Errno 2] No such file or directory: '/nope'",
                 next_restart=0.2),
    ]
    rows[0]["slot"] = rows[1]["slot"] = "web-000000"  # restarted: a slot of their own
    lines = output.replicas(rows).splitlines()
    assert lines[0].split() == ["APP", "REPLICA", "SLOT", "NODE", "PID", "PORT", "GEN",
                                "STATE", "RESTARTS", "REASON"]
    assert lines[1].split(None, 9)[1:3] == ["web-cccccc", "web-000000"]
    assert lines[1].split(None, 9)[7:] == ["failed", "3",
                                           "exited with code 1; restarting in 8 s"]
    assert lines[2].split(None, 9)[7:] == ["ready", "2", "last: killed by signal 9 (SIGKILL)"]
    assert lines[3].split()[1:3] == ["web-eeeeee", "web-eeeeee"]  # a first launch: its own
    assert lines[3].split()[7:] == ["ready", "0", "-"]
    assert lines[4].endswith("cannot start: [Errno 2] No such file or directory: '/nope'; "
                             "restarting now")


def test_rollout_status_shows_the_live_analysis_and_the_old_generation():
    status = {"app": "web", "state": "rolling", "from_generation": 3, "to_generation": 4,
              "replaced": 1, "total": 3, "message": "judging web-7 on traffic · 12.0 s",
              "paused": False,
              "analysis": {"generation": 4, "replicas": ["web-7"], "window_s": 30.0,
                           "elapsed_s": 12.2, "requests": 240, "errors": 1, "failed": 0,
                           "error_rate": 0.004, "p99_ms": 38.2, "max_error_rate": 0.01,
                           "max_p99_ms": None, "min_requests": 20, "verdict": "watching"},
              "traffic": [{"generation": 3, "requests": 900, "errors": 0, "failed": 0,
                           "error_rate": 0.0, "p99_ms": 35.0},
                          {"generation": 4, "requests": 240, "errors": 1, "failed": 0,
                           "error_rate": 0.004, "p99_ms": 38.2}]}
    assert output.rollout_status(status) == (
        "web: rolling generation 3 -> 4, 1/3 replaced · analysis 12s/30s: 240 requests, "
        "error rate 0.4%, p99 38ms (old gen 3: 0%, p99 35ms) · judging web-7 on traffic · "
        "12.0 s")
    paused = dict(status, paused=True, analysis=None)
    assert output.rollout_status(paused).startswith(
        "web: rolling generation 3 -> 4, 1/3 replaced · paused · judging")
    # a conductor before §11, or hostile figures: no analysis part, no crash
    assert " · analysis" not in output.rollout_status(
        dict(status, analysis={"elapsed_s": "x", "requests": [1]}))


def test_an_analysis_without_requests_yet_says_so_once():
    status = {"app": "web", "state": "rolling", "from_generation": 1, "to_generation": 2,
              "replaced": 0, "total": 3, "message": "judging web-7 on traffic · 0.0 s",
              "analysis": {"elapsed_s": 0.0, "window_s": 10.0, "requests": 0, "errors": 0,
                           "failed": 0, "error_rate": None, "p99_ms": None,
                           "verdict": "watching"},
              "traffic": []}
    assert output.rollout_status(status) == (
        "web: rolling generation 1 -> 2, 0/3 replaced · analysis 0s/10s: 0 requests · "
        "judging web-7 on traffic · 0.0 s")
