"""The node's process supervisor, on real processes (sleep, sh, the example HTTP service)."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import psutil
import pytest
import trio

from skr8tr.core.manifest import HealthCheck
from skr8tr.core.node_protocol import Launch, ReplicaReport
from skr8tr.node.supervisor import Supervisor, open_supervisor
from tests.conftest import HELLO_HTTP, free_port

DEADLINE_S = 15
TEST_DEADLINE_S = 30


class Reports:
    """Collects a supervisor's reports; every one must be a valid wire message."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []
        self.pids: set[int] = set()

    def __call__(self, report: ReplicaReport) -> None:
        report.encode()  # raises if it breaks the schema
        report = report.fields()  # as the wire carries it
        self.items.append(report)
        if report["pid"] is not None:
            self.pids.add(report["pid"])

    def of(self, replica: str) -> list[dict[str, Any]]:
        return [r for r in self.items if r["replica"] == replica]

    def states(self, replica: str) -> list[str]:
        return [r["state"] for r in self.of(replica)]

    async def wait_for(self, replica: str, state: str, count: int = 1,
                       timeout: float = DEADLINE_S) -> dict[str, Any]:
        """The *count*-th report of *replica* in *state*, waiting for it under a deadline."""
        with trio.fail_after(timeout):
            while True:
                found = [r for r in self.of(replica) if r["state"] == state]
                if len(found) >= count:
                    return found[count - 1]
                await trio.sleep(0.02)


async def wait_until(predicate, timeout: float = DEADLINE_S, what: str = "condition") -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.02)


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def assert_gone(pids: set[int] | list[int]) -> None:
    await wait_until(lambda: not any(alive(p) for p in pids), timeout=5, what="pids gone")


@asynccontextmanager
async def supervisor_for_test(data_dir: Path, **options: Any) -> AsyncIterator[
        tuple[Supervisor, Reports]]:
    """A supervisor that stops its replicas on exit; afterwards no launched pid may remain.

    The whole test body runs under a deadline.
    """
    reports = Reports()
    with trio.fail_after(TEST_DEADLINE_S):
        async with open_supervisor(str(data_dir), stop_on_exit=True, **options) as sup:
            sup.attach(reports)
            yield sup, reports
        await assert_gone(reports.pids)


def spec(replica: str, exec_: str, *args: str, **kw: Any) -> Launch:
    fields: dict[str, Any] = {
        "app": "demo", "generation": 1, "app_type": "process", "env": {}, "workdir": None,
        "port": None, "host": "127.0.0.1", "health": None, "settle_ms": 100,
        "stop_grace_ms": 2000, **kw}
    return Launch(replica=replica, exec=exec_, args=tuple(args), **fields)


def hello_spec(replica: str, port: int, *extra: str, **kw: Any) -> Launch:
    kw.setdefault("health", HealthCheck("/healthz", expect_status=200, interval_ms=100,
                                        timeout_ms=300, retries=2))
    return spec(replica, sys.executable, str(HELLO_HTTP), "--host", "127.0.0.1", "--port",
                str(port), "--version", "v1", *extra, port=port, host="127.0.0.1", **kw)


def texts(lines: list[dict[str, Any]]) -> list[str]:
    return [line["text"] for line in lines]


# --------------------------------------------------------------------------- lifecycle


async def test_settle_makes_ready_and_stop_sends_sigterm(tmp_path: Path) -> None:
    data = tmp_path / "data"
    async with supervisor_for_test(data) as (sup, reports):
        sup.launch(spec("r1", "/bin/sleep", "30", settle_ms=200))
        running = await reports.wait_for("r1", "running")
        pid = running["pid"]
        assert alive(pid)
        ready = await reports.wait_for("r1", "ready")
        assert ready["ts"] - running["ts"] >= 0.19
        assert ready["pid"] == pid

        await sup.records.flush()  # records are written off the event loop
        record_file = data / "replicas" / "r1.json"
        record = json.loads(record_file.read_text())
        assert record["pid"] == pid
        assert record["create_time"] == psutil.Process(pid).create_time()
        assert (record["replica"], record["app"], record["generation"]) == ("r1", "demo", 1)
        assert record["stdout"] == str(data / "logs" / "r1.stdout")
        assert record["stderr"] == str(data / "logs" / "r1.stderr")
        assert record["launch"]["exec"] == "/bin/sleep"
        assert not list((data / "replicas").glob(".*.tmp"))

        sup.launch(spec("r1", "/bin/sleep", "30"))  # duplicate: last report again, no process
        await wait_until(lambda: reports.states("r1") == ["running", "ready", "ready"])

        sup.stop("r1")
        exited = await reports.wait_for("r1", "exited")
        assert (exited["signal"], exited["exit_code"], exited["pid"]) == (signal.SIGTERM, None,
                                                                          pid)
        assert "after a stop" in exited["message"]
        assert not alive(pid)
        assert not record_file.exists()
        assert reports.states("r1") == ["running", "ready", "ready", "exited"]

        sup.stop("r1")  # idempotent: the last report again
        await wait_until(lambda: len(reports.of("r1")) == 5)
        assert reports.of("r1")[-1] == exited
        assert sup.reports() == []


async def test_stop_unknown_replica_reports_exited(tmp_path: Path) -> None:
    async with supervisor_for_test(tmp_path) as (sup, reports):
        sup.stop("ghost")
        report = await reports.wait_for("ghost", "exited")
        assert report["message"] == "unknown replica"


async def test_process_that_exits_by_itself(tmp_path: Path) -> None:
    async with supervisor_for_test(tmp_path) as (sup, reports):
        sup.launch(spec("r1", "/bin/sh", "-c", "exit 3", settle_ms=5000))
        exited = await reports.wait_for("r1", "exited")
        assert (exited["exit_code"], exited["signal"]) == (3, None)
        assert exited["message"] == "exited with code 3"
        assert reports.states("r1") == ["running", "exited"]
        await sup.records.flush()
        assert not (tmp_path / "replicas" / "r1.json").exists()


async def test_stop_kills_a_process_that_ignores_sigterm(tmp_path: Path) -> None:
    async with supervisor_for_test(tmp_path) as (sup, reports):
        sup.launch(spec("r1", "/bin/sh", "-c", 'trap "" TERM; sleep 100; exit 0',
                        stop_grace_ms=300))
        pid = (await reports.wait_for("r1", "running"))["pid"]
        # Wait for the shell's `sleep` so that the whole group is there to be killed.
        await wait_until(lambda: psutil.Process(pid).children(recursive=True))
        group = {pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))}
        started = trio.current_time()
        sup.stop("r1")
        exited = await reports.wait_for("r1", "exited")
        assert trio.current_time() - started >= 0.3
        assert (exited["signal"], exited["exit_code"]) == (signal.SIGKILL, None)
        await assert_gone(group)


async def test_stop_also_ends_the_rest_of_the_group(tmp_path: Path) -> None:
    # The leader exits on SIGTERM at once; its child ignores SIGTERM and is SIGKILLed
    # once the grace is over, instead of being left behind holding the port.
    script = 'sh -c \'trap "" TERM; sleep 100\' & trap "exit 0" TERM; wait'
    async with supervisor_for_test(tmp_path) as (sup, reports):
        sup.launch(spec("r1", "/bin/sh", "-c", script, stop_grace_ms=300))
        pid = (await reports.wait_for("r1", "running"))["pid"]
        await wait_until(lambda: len(psutil.Process(pid).children(recursive=True)) >= 2)
        group = {pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))}
        sup.stop("r1")
        exited = await reports.wait_for("r1", "exited")
        assert exited["exit_code"] == 0
        await assert_gone(group)


# --------------------------------------------------------------------------- failures


@pytest.mark.parametrize("case", ["missing executable", "not executable", "bad workdir"])
async def test_launch_failures_report_the_os_error(tmp_path: Path, case: str) -> None:
    not_exec = tmp_path / "script.sh"
    not_exec.write_text("#!/bin/sh\necho hi\n")
    not_exec.chmod(0o644)
    launch, expected = {
        "missing executable": (spec("r1", str(tmp_path / "nope")), "No such file or directory"),
        "not executable": (spec("r1", str(not_exec)), "Permission denied"),
        "bad workdir": (spec("r1", "/bin/sleep", "30", workdir=str(tmp_path / "nowhere")),
                        "No such file or directory"),
    }[case]
    async with supervisor_for_test(tmp_path / "data") as (sup, reports):
        sup.launch(launch)
        failed = await reports.wait_for("r1", "failed")
        assert expected in failed["message"]
        assert (failed["pid"], failed["reason"]) == (None, "launch_error")
        assert reports.states("r1") == ["failed"]
        # Why it never ran is in its stderr log, on disk and in the tail (`skr8tr logs`).
        why = f"skr8tr: cannot start {launch.exec}: {failed['message']}"
        stderr = tmp_path / "data" / "logs" / "r1.stderr"
        assert stderr.read_text() == why + "\n"
        assert [(x["stream"], x["text"]) for x in sup.tail_logs("demo", None, 10)] == [
            ("stderr", why)]
        await sup.records.flush()
        assert not (tmp_path / "data" / "replicas" / "r1.json").exists()
        sup.stop("r1")  # answered with the failed report again
        await wait_until(lambda: reports.states("r1") == ["failed", "failed"])


async def test_port_in_use_fails_the_launch(tmp_path: Path) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        async with supervisor_for_test(tmp_path) as (sup, reports):
            sup.launch(spec("r1", "/bin/sleep", "30", port=port, host="127.0.0.1"))
            failed = await reports.wait_for("r1", "failed")
            assert failed["message"] == f"port {port} is already in use on 127.0.0.1"
            assert (failed["port"], failed["reason"]) == (port, "port_in_use")


# --------------------------------------------------------------------------- environment, logs


async def test_environment_and_workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SKR8TR_TEST_SECRET", "must-not-leak")
    monkeypatch.setenv("LANG", "C.UTF-8")
    port = free_port()
    data = tmp_path / "data"
    async with supervisor_for_test(data) as (sup, reports):
        sup.launch(spec("web-1", "/bin/sh", "-c", 'env; echo "CWD=$(pwd)"', app="web",
                        generation=7, port=port, host="127.0.0.1",
                        env={"GREETING": "hello there", "PORT": "overridden"}))
        await reports.wait_for("web-1", "exited")
        lines = texts(sup.tail_logs("web", "web-1", 1000))
    env = dict(line.split("=", 1) for line in lines if "=" in line)
    assert env["PORT"] == str(port)
    assert env["HOST"] == "127.0.0.1"
    assert env["SKR8TR_APP"] == "web"
    assert env["SKR8TR_REPLICA"] == "web-1"
    assert env["SKR8TR_GENERATION"] == "7"
    assert env["GREETING"] == "hello there"
    assert env["LANG"] == "C.UTF-8"
    assert "PATH" in env
    assert "SKR8TR_TEST_SECRET" not in env
    assert env["CWD"] == str(data)


async def test_no_port_means_no_port_or_host_variables(tmp_path: Path) -> None:
    async with supervisor_for_test(tmp_path) as (sup, reports):
        sup.launch(spec("r1", "/bin/sh", "-c", "env"))
        await reports.wait_for("r1", "exited")
        names = {t.split("=", 1)[0] for t in texts(sup.tail_logs("demo", None, 1000))}
    assert "SKR8TR_APP" in names
    assert not names & {"PORT", "HOST"}


async def test_logs_are_captured_per_stream_and_tailed(tmp_path: Path) -> None:
    data = tmp_path / "data"
    script = "echo out1; echo err1 >&2; sleep 0.3; echo out2; printf 'no newline'"
    async with supervisor_for_test(data) as (sup, reports):
        sup.launch(spec("r1", "/bin/sh", "-c", script))
        sup.launch(spec("r2", "/bin/sh", "-c", "echo second replica"))
        sup.launch(spec("o1", "/bin/sh", "-c", "echo other app", app="other"))
        for replica in ("r1", "r2", "o1"):
            await reports.wait_for(replica, "exited")
        r1 = sup.tail_logs("demo", "r1", 100)
        assert [(x["stream"], x["text"]) for x in r1] == [
            ("stdout", "out1"), ("stderr", "err1"), ("stdout", "out2"), ("stdout", "no newline")]
        assert all(x["replica"] == "r1" for x in r1)
        assert r1[0]["ts"] <= r1[-1]["ts"]
        assert texts(sup.tail_logs("demo", "r1", 2)) == ["out2", "no newline"]
        both = sup.tail_logs("demo", None, 100)
        assert sorted(texts(both)) == sorted(["out1", "err1", "out2", "no newline",
                                              "second replica"])
        assert [x["ts"] for x in both] == sorted(x["ts"] for x in both)
        assert texts(sup.tail_logs("other", None, 100)) == ["other app"]
        assert sup.tail_logs("other", "r1", 100) == []
    assert (data / "logs" / "r1.stdout").read_text() == "out1\nout2\nno newline"
    assert (data / "logs" / "r1.stderr").read_text() == "err1\n"


async def test_running_process_logs_are_tailed_live(tmp_path: Path) -> None:
    async with supervisor_for_test(tmp_path, tail_interval_s=0.05) as (sup, reports):
        sup.launch(spec("r1", "/bin/sh", "-c", "echo started; exec sleep 30"))
        await reports.wait_for("r1", "running")
        await wait_until(lambda: texts(sup.tail_logs("demo", "r1", 10)) == ["started"])


async def test_rotation_of_a_live_process(tmp_path: Path) -> None:
    # Each batch is one write(2) (cat of a small file), so no line can fall into
    # copy-truncate's window between the tailer's read and the truncate.
    first = tmp_path / "first.txt"
    first.write_text("".join(f"first {i}\n" for i in range(100)))  # about 1 KB
    second = tmp_path / "second.txt"
    second.write_text("second batch\n")
    data = tmp_path / "data"
    script = f"cat {first}; sleep 0.5; cat {second}; exec sleep 30"
    async with supervisor_for_test(data, log_rotate_bytes=500, tail_interval_s=0.05) as (
            sup, reports):
        sup.launch(spec("r1", "/bin/sh", "-c", script))
        await reports.wait_for("r1", "running")
        await wait_until(lambda: "second batch" in texts(sup.tail_logs("demo", "r1", 1000)))
        logs = data / "logs"
        assert (logs / "r1.stdout.1").read_text() == first.read_text()
        assert (logs / "r1.stdout").read_text() == "second batch\n"
        assert texts(sup.tail_logs("demo", "r1", 1000)) == [
            *(f"first {i}" for i in range(100)), "second batch"]


# --------------------------------------------------------------------------- health checks


async def test_health_check_makes_ready(tmp_path: Path) -> None:
    port = free_port()
    async with supervisor_for_test(tmp_path) as (sup, reports):
        sup.launch(hello_spec("web-1", port, "--ready-after", "0.3", settle_ms=60_000))
        running = await reports.wait_for("web-1", "running")
        ready = await reports.wait_for("web-1", "ready")
        assert ready["ts"] - running["ts"] >= 0.3
        assert ready["port"] == port
        sup.stop("web-1")
        exited = await reports.wait_for("web-1", "exited")
        assert exited["exit_code"] == 0  # hello_http exits 0 on SIGTERM
        assert "hello_http stopped cleanly" in texts(sup.tail_logs("demo", "web-1", 100))


async def test_unhealthy_after_retries_then_ready_again(tmp_path: Path) -> None:
    port = free_port()
    async with supervisor_for_test(tmp_path) as (sup, reports):
        sup.launch(hello_spec("web-1", port))
        pid = (await reports.wait_for("web-1", "ready"))["pid"]
        os.kill(pid, signal.SIGSTOP)  # probes now time out
        try:
            unhealthy = await reports.wait_for("web-1", "unhealthy")
        finally:
            os.kill(pid, signal.SIGCONT)
        assert "failed 2 time(s) in a row" in unhealthy["message"]
        assert "no answer within" in unhealthy["message"]
        await reports.wait_for("web-1", "ready", count=2)
        assert reports.states("web-1") == ["running", "ready", "unhealthy", "ready"]


async def test_failing_health_check_never_makes_ready(tmp_path: Path) -> None:
    port = free_port()
    async with supervisor_for_test(tmp_path, tail_interval_s=0.05) as (sup, reports):
        sup.launch(hello_spec("web-1", port, "--fail-health", settle_ms=0))
        await reports.wait_for("web-1", "running")

        def probes_answered_503() -> int:
            return sum('"GET /healthz HTTP/1.1" 503' in t
                       for t in texts(sup.tail_logs("demo", "web-1", 100)))

        await wait_until(lambda: probes_answered_503() >= 3)
        assert reports.states("web-1") == ["running"]


async def test_closing_without_stop_leaves_workloads_running(tmp_path: Path) -> None:
    reports = Reports()
    with trio.fail_after(TEST_DEADLINE_S):
        async with open_supervisor(str(tmp_path), stop_on_exit=False) as sup:
            sup.attach(reports)
            sup.launch(spec("r1", "/bin/sleep", "30"))
            pid = (await reports.wait_for("r1", "running"))["pid"]
    try:
        assert alive(pid)
        assert (tmp_path / "replicas" / "r1.json").exists()
        assert reports.states("r1") == ["running"]
    finally:
        os.killpg(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert not alive(pid)


async def test_many_replicas_start_and_stop_together(tmp_path: Path) -> None:
    async with supervisor_for_test(tmp_path) as (sup, reports):
        for i in range(10):
            sup.launch(spec(f"r{i}", "/bin/sleep", "30"))
        for i in range(10):
            await reports.wait_for(f"r{i}", "ready")
        assert len(sup.reports()) == 10
    # Closing stopped all ten (supervisor_for_test checks that the pids are gone).
    assert len(reports.pids) == 10
