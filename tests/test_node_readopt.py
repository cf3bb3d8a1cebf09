"""A restarted node agent re-adopts the replicas it left running (issue #6, node half).

The supervisor-level tests close a supervisor without stopping its replicas
(what a crashed agent leaves behind) and open another on the same data dir.
Those replicas are children of this test process, so once they die they are
zombies until :func:`reap` collects them; the agent treats a zombie as gone.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
from contextlib import suppress
from pathlib import Path
from typing import Any

import psutil
import pytest
import trio

from skr8tr.keyfiles import write_keypair
from skr8tr.node.adopt import AdoptedProcess, identify
from skr8tr.node.health import HealthTracker
from skr8tr.node.logs import ReplicaLog
from skr8tr.node.supervisor import open_supervisor
from tests.conftest import free_port, skr8tr_command
from tests.test_node_agent import sleep_launch, start_conductor
from tests.test_node_supervisor import (
    Reports,
    alive,
    assert_gone,
    hello_spec,
    spec,
    texts,
    wait_until,
)

TEST_DEADLINE_S = 45


def reap(pids: list[int]) -> None:
    """Kill what is left of *pids* (whole groups) and collect those that are our children."""
    for pid in pids:
        if alive(pid):
            with suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
    for pid in pids:
        with suppress(ChildProcessError):
            os.waitpid(pid, 0)


def record_of(data: Path, replica: str) -> dict[str, Any]:
    return json.loads((data / "replicas" / f"{replica}.json").read_text())


# --------------------------------------------------------------------------- supervisor


async def test_a_new_supervisor_readopts_watches_and_stops(tmp_path: Path) -> None:
    data = tmp_path / "data"
    trigger = tmp_path / "go"
    port = free_port()
    script = (f"echo before; echo oops >&2; while [ ! -e {trigger} ]; do sleep 0.05; done; "
              "echo after; exec sleep 60")
    pids: list[int] = []
    try:
        with trio.fail_after(TEST_DEADLINE_S):
            # The first supervisor goes away without stopping anything, like a crashed agent.
            first = Reports()
            async with open_supervisor(str(data), stop_on_exit=False) as sup:
                sup.attach(first)
                sup.launch(hello_spec("web-1", port, settle_ms=60_000))
                sup.launch(spec("log-1", "/bin/sh", "-c", script))
                sup.launch(spec("idle-1", "/bin/sleep", "60", settle_ms=60_000))
                for replica in ("web-1", "log-1"):
                    await first.wait_for(replica, "ready")
                await first.wait_for("idle-1", "running")
                pids = [first.of(r)[0]["pid"] for r in ("web-1", "log-1", "idle-1")]
            web_pid, log_pid, idle_pid = pids
            assert all(alive(p) for p in pids)
            assert record_of(data, "log-1")["state"] == "ready"
            assert record_of(data, "idle-1")["state"] == "running"

            second = Reports()
            async with open_supervisor(str(data), stop_on_exit=True,
                                       tail_interval_s=0.05) as sup:
                # What the first hello carries: every replica with its old pid.
                hello = {r.replica: r for r in sup.attach(second)}
                assert {r: hello[r].pid for r in hello} == {
                    "web-1": web_pid, "log-1": log_pid, "idle-1": idle_pid}
                assert {r.state for r in hello.values()} <= {"running", "ready"}

                # Readiness: the health check passes once; recorded ready without a
                # check is ready at once; recorded running still has its settle ahead.
                await second.wait_for("web-1", "ready")
                await second.wait_for("log-1", "ready")
                assert "ready" not in second.states("idle-1")
                assert "ready" not in [r.state for r in sup.reports()
                                       if r.replica == "idle-1"]

                # Logs: the tail starts from the files on disk and follows new lines.
                assert sorted(texts(sup.tail_logs("demo", "log-1", 10))) == ["before", "oops"]
                trigger.touch()
                await wait_until(lambda: texts(sup.tail_logs("demo", "log-1", 1)) == ["after"])

                # An exit nobody asked for is noticed by polling; its status is unknown.
                os.kill(idle_pid, signal.SIGKILL)
                exited = await second.wait_for("idle-1", "exited")
                assert (exited["pid"], exited["exit_code"], exited["signal"]) == (
                    idle_pid, None, None)
                assert exited["message"] == "exited while adopted; exit status unknown"
                await sup.records.flush()
                assert not (data / "replicas" / "idle-1.json").exists()

                # A stop SIGTERMs the group and waits for it to go.
                sup.stop("log-1")
                stopped = await second.wait_for("log-1", "exited")
                assert (stopped["pid"], stopped["signal"], stopped["exit_code"]) == (
                    log_pid, signal.SIGTERM, None)
                assert not alive(log_pid)
                await sup.records.flush()
                assert not (data / "replicas" / "log-1.json").exists()
                assert [r.replica for r in sup.reports()] == ["web-1"]
            # Closing with stop_on_exit stops the adopted replica that is left.
            await assert_gone([web_pid])
            assert second.of("web-1")[-1]["signal"] == signal.SIGTERM
            assert list((data / "replicas").iterdir()) == []
    finally:
        reap(pids)


async def test_adopted_replica_that_ignores_sigterm_is_killed(tmp_path: Path) -> None:
    data = tmp_path / "data"
    pids: list[int] = []
    try:
        with trio.fail_after(TEST_DEADLINE_S):
            first = Reports()
            async with open_supervisor(str(data)) as sup:
                sup.attach(first)
                sup.launch(spec("r1", "/bin/sh", "-c", 'trap "" TERM; sleep 100; exit 0',
                                stop_grace_ms=300))
                pid = (await first.wait_for("r1", "running"))["pid"]
                pids.append(pid)
                await wait_until(lambda: psutil.Process(pid).children())
            group = {pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))}
            second = Reports()
            async with open_supervisor(str(data)) as sup:
                sup.attach(second)
                started = trio.current_time()
                sup.stop("r1")
                exited = await second.wait_for("r1", "exited")
                assert trio.current_time() - started >= 0.3
                assert (exited["signal"], exited["exit_code"]) == (signal.SIGKILL, None)
            await assert_gone(group)
    finally:
        reap(pids)


async def test_records_of_gone_or_other_processes_are_dropped_never_signalled(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="skr8tr.node")
    data = tmp_path / "data"
    records = data / "replicas"
    records.mkdir(parents=True)
    bystander = await trio.lowlevel.open_process(["/bin/sleep", "60"], start_new_session=True)
    try:
        with trio.fail_after(TEST_DEADLINE_S):
            started = psutil.Process(bystander.pid).create_time()
            # A pid that was ours and is gone (reaped) by the time the record is read.
            short = await trio.lowlevel.open_process(["/bin/sleep", "60"])
            gone_pid = short.pid
            gone_started = psutil.Process(gone_pid).create_time()
            short.kill()
            await short.wait()

            def fake(replica: str, pid: int, create_time: float | None, **kw: Any) -> None:
                record = {"version": 1, "replica": replica, "app": "demo", "generation": 1,
                          "pid": pid, "create_time": create_time, "port": None,
                          "state": "ready",
                          "launch": spec(replica, "/bin/sleep", "60").fields()}
                record.update(kw)
                (records / f"{replica}.json").write_text(json.dumps(record))

            fake("reused", bystander.pid, started - 1000)  # pid now someone else's
            fake("nostart", bystander.pid, None)  # died before its start time was read
            fake("gone", gone_pid, gone_started)
            fake("badlaunch", bystander.pid, started, launch={"exec": 1})
            (records / "torn.json").write_text('{"replica": "torn", "pi')
            (records / ".torn.json.abcd.tmp").write_text("{")

            reports = Reports()
            async with open_supervisor(str(data), stop_on_exit=True) as sup:
                assert sup.attach(reports) == []
            assert reports.items == []
            assert list(records.iterdir()) == []
            # Never signalled: the bystander is still there after a stop_on_exit close.
            assert bystander.returncode is None and alive(bystander.pid)
        messages = "\n".join(r.getMessage() for r in caplog.records)
        assert f"replica reused: not re-adopted, record dropped: pid {bystander.pid}: pid " \
               "reused by another process" in messages
        assert "replica nostart: not re-adopted" in messages
        assert "no process start time was recorded" in messages
        assert f"replica gone: not re-adopted, record dropped: pid {gone_pid}: " in messages
        assert "replica badlaunch: not re-adopted, record dropped: bad launch fields" in messages
        assert "replica torn: not re-adopted, record dropped: unreadable record" in messages
    finally:
        bystander.kill()
        await bystander.wait()


# --------------------------------------------------------------------------- pieces


async def test_identify_and_signal_check(tmp_path: Path) -> None:
    proc = await trio.lowlevel.open_process(["/bin/sleep", "60"], start_new_session=True)
    try:
        started = psutil.Process(proc.pid).create_time()
        assert identify(proc.pid, started) is None
        assert identify(proc.pid, started + 0.005) is None  # within the tolerance
        assert "pid reused by another process" in (identify(proc.pid, started + 5) or "")
        wrong = AdoptedProcess(proc.pid, started + 5)
        assert wrong.send_signal(signal.SIGTERM) is False
        assert wrong.gone and alive(proc.pid)
        ours = AdoptedProcess(proc.pid, started)
        assert ours.group == proc.pid
        assert ours.check() and ours.group_alive()
        # As if ours had gone and its pid now led another session: not ours to signal.
        impostor = AdoptedProcess(proc.pid, started)
        impostor.create_time = started - 5
        assert not impostor.group_alive()
        assert impostor.send_signal(signal.SIGTERM) is False
        assert alive(proc.pid)
        assert ours.send_signal(signal.SIGTERM) is True
        with trio.fail_after(10):
            await proc.wait()  # reaped here, so the adopted side sees it gone
            await ours.wait(poll_s=0.02)
        assert identify(proc.pid, started) is not None
        assert not ours.group_alive()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_a_zombie_is_not_adopted() -> None:
    proc = subprocess.Popen(["/bin/true"])
    try:
        with trio.fail_after(10):
            started = psutil.Process(proc.pid).create_time()
            await wait_until(lambda: psutil.Process(proc.pid).status() == psutil.STATUS_ZOMBIE)
        assert identify(proc.pid, started) == "a zombie"
    finally:
        proc.wait()


def test_resume_loads_the_files_on_disk(tmp_path: Path) -> None:
    rlog = ReplicaLog("r1", "demo", str(tmp_path), max_lines=4, clock=lambda: 2e9)
    Path(rlog.paths["stdout"] + ".1").write_bytes(b"rotated 1\nrotated 2\n")
    os.utime(rlog.paths["stdout"] + ".1", (1000, 1000))
    Path(rlog.paths["stdout"]).write_bytes(b"out 1\nout 2\nunfinish")
    os.utime(rlog.paths["stdout"], (3000, 3000))
    Path(rlog.paths["stderr"]).write_bytes(b"err 1\n")
    os.utime(rlog.paths["stderr"], (2000, 2000))
    assert rlog.resume() == 4
    assert [(x["ts"], x["stream"], x["text"]) for x in rlog.lines] == [
        (1000, "stdout", "rotated 2"), (2000, "stderr", "err 1"), (3000, "stdout", "out 1"),
        (3000, "stdout", "out 2")]
    # Following on: the unfinished line is completed, nothing is read twice.
    with open(rlog.paths["stdout"], "ab") as f:
        f.write(b"ed\nout 3\n")
    assert rlog.read_new() == 2
    assert texts_of(rlog)[-2:] == ["unfinished", "out 3"]


def test_resume_of_missing_files_is_empty(tmp_path: Path) -> None:
    rlog = ReplicaLog("r1", "demo", str(tmp_path))
    assert rlog.resume() == 0
    Path(rlog.paths["stderr"]).write_bytes(b"late\n")
    assert rlog.read_new() == 1


def texts_of(rlog: ReplicaLog) -> list[str]:
    return [line["text"] for line in rlog.lines]


@pytest.mark.parametrize(("results", "expected"), [
    ("P", ["ready"]),
    ("FFP", [None, "unhealthy", "ready"]),
    ("FFFF", [None, "unhealthy", None, None]),
    ("PFF", ["ready", None, "unhealthy"]),
])
def test_health_tracker_of_a_replica_that_was_ready(results: str,
                                                    expected: list[str | None]) -> None:
    tracker = HealthTracker(2, was_ready=True)
    assert [tracker.observe(r == "P") for r in results] == expected


# --------------------------------------------------------------------------- agent process


@pytest.fixture
def key_path(tmp_path: Path) -> Path:
    write_keypair(tmp_path / "keys")
    return tmp_path / "keys" / "signing.sec"


async def start_agent(url: str, key_path: Path, data_dir: Path, log_file: Any) -> trio.Process:
    return await trio.lowlevel.open_process(
        [*skr8tr_command(), "node", "--conductor", url, "--key", str(key_path),
         "--node-id", "node-r", "--data-dir", str(data_dir), "--log-level", "debug"],
        stdout=log_file, stderr=log_file, stdin=subprocess.DEVNULL)


async def test_agent_killed_and_restarted_readopts_its_replicas(tmp_path: Path,
                                                                key_path: Path) -> None:
    data_dir = tmp_path / "data"
    agents: list[trio.Process] = []
    workload_pid: int | None = None
    try:
        with trio.fail_after(TEST_DEADLINE_S), open(tmp_path / "agent.log", "wb") as log_file:
            async with trio.open_nursery() as nursery:
                conductor, url = await start_conductor(nursery)
                agents.append(await start_agent(url, key_path, data_dir, log_file))
                peer = await conductor.next_peer()
                await peer.challenge()
                await peer.send("welcome", node_id="node-r", heartbeat_s=5)
                await peer.send("launch", **sleep_launch(
                    "r1", args=["-c", "echo before the restart; exec sleep 60"]))
                workload_pid = (await peer.expect("replica", replica="r1",
                                                  state="running"))["pid"]
                await peer.expect("replica", replica="r1", state="ready")

                agents[0].kill()  # kill -9 of the agent only
                await agents[0].wait()
                assert alive(workload_pid)

                agents.append(await start_agent(url, key_path, data_dir, log_file))
                peer = await conductor.next_peer()
                _, hello = await peer.challenge()
                assert [(r["replica"], r["app"], r["pid"]) for r in hello["replicas"]] == [
                    ("r1", "demo", workload_pid)]
                assert hello["replicas"][0]["state"] in ("running", "ready")
                await peer.send("welcome", node_id="node-r", heartbeat_s=5)

                await peer.send("logs", req="q1", app="demo", replica=None, tail=10)
                reply = await peer.expect("logs_reply", req="q1")
                assert [(x["replica"], x["stream"], x["text"]) for x in reply["lines"]] == [
                    ("r1", "stdout", "before the restart")]

                await peer.send("stop", replica="r1")
                exited = await peer.expect("replica", replica="r1", state="exited")
                assert (exited["pid"], exited["signal"]) == (workload_pid, signal.SIGTERM)
                await assert_gone([workload_pid])
                # The agent removes the record in a worker thread, just after the report.
                await wait_until(lambda: not (data_dir / "replicas" / "r1.json").exists())

                agents[1].send_signal(signal.SIGTERM)
                with trio.fail_after(10):
                    assert await agents[1].wait() == 0
                nursery.cancel_scope.cancel()
    finally:
        for agent in agents:
            if agent.returncode is None:
                agent.kill()
                await agent.wait()
        if workload_pid is not None and alive(workload_pid):
            os.killpg(workload_pid, signal.SIGKILL)
            await assert_gone([workload_pid])
    log_text = (tmp_path / "agent.log").read_text()
    assert "re-adopted 1 of 1 recorded replica(s): r1" in log_text


async def test_a_readopted_replica_reports_the_slot_its_launch_carried(tmp_path: Path) -> None:
    """The slot a launch carried survives an agent restart in the replica's record, and
    comes back in the hello's report: what a restarted conductor restores (issue #17). A
    record written before the field existed (no ``slot``) still re-adopts, without one."""
    data = tmp_path / "data"
    slot = {"name": "demo-aaaaaa", "restarts": 7, "backoff": 7,
            "last_end": {"reason": "exited with code 1", "exit_code": 1, "signal": None},
            "mac": "0123456789abcdef" * 2}
    pids: list[int] = []
    try:
        with trio.fail_after(TEST_DEADLINE_S):
            first = Reports()
            async with open_supervisor(str(data), stop_on_exit=False) as sup:
                sup.attach(first)
                sup.launch(spec("demo-bbbbbb", "/bin/sleep", "60", slot=slot))
                sup.launch(spec("demo-cccccc", "/bin/sleep", "60"))
                running = [await first.wait_for(r, "running")
                           for r in ("demo-bbbbbb", "demo-cccccc")]
                pids = [r["pid"] for r in running]
                assert running[0]["slot"] == slot and "slot" not in running[1]
                await sup.records.flush()
            assert record_of(data, "demo-bbbbbb")["launch"]["slot"] == slot
            assert "slot" not in record_of(data, "demo-cccccc")["launch"]  # as before #17

            second = Reports()
            async with open_supervisor(str(data), stop_on_exit=True) as sup:
                hello = {r.replica: r for r in sup.attach(second)}
                assert set(hello) == {"demo-bbbbbb", "demo-cccccc"}
                assert hello["demo-bbbbbb"].slot == slot
                assert hello["demo-cccccc"].slot is None
                assert "slot" not in json.loads(hello["demo-cccccc"].encode())
                assert json.loads(hello["demo-bbbbbb"].encode())["slot"] == slot
            await assert_gone(pids)
    finally:
        reap(pids)
