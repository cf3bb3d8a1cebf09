"""Replicas: launch, readiness, stop, exit — and the reports about them.

What a replica is comes from the conductor as a :class:`~skr8tr.core.node_protocol.Launch`
(its port, its ``settle_ms``, its health check); starting and stopping its process
is :mod:`.process`. The :class:`Supervisor` lives in the agent's root nursery, not in a conductor
session, so replicas outlive sessions. Each replica is one task:

    spawn (own session, output straight to its log files)  -> ``running``
    settle_ms alive, or first health-check pass             -> ``ready``
    ``retries`` failed probes after ready                   -> ``unhealthy``
    exit (by itself, or after ``stop``)                     -> ``exited``
    could not be spawned (port in use, OS error)            -> ``failed``

Reports go to whatever sink the current session attached; without a session
they are dropped (the next ``hello`` carries :meth:`Supervisor.reports`).

Stopping (:func:`.process.terminate`) is SIGTERM to the process group,
``stop_grace_ms`` for the group to go, SIGKILL to the group, and always a wait
for the exit. It runs shielded so that a stop the conductor asked for completes
even while the agent shuts down.
When the supervisor is closed (agent shutdown), replicas keep running unless
it was opened with ``stop_on_exit``.

Re-adoption. Every replica has a record in ``<data-dir>/replicas/``
(:mod:`.records`). When a supervisor opens, before any session, it reads
them: a process whose pid and start time both still match is re-adopted
(:mod:`.adopt`), every other record is dropped and its pid left alone. A
re-adopted replica is reported ``running`` (message "re-adopted after an
agent restart"), so the first ``hello`` lists it with its pid, and then:

- readiness, the fastest honest path: with a health check, the first passing
  probe makes it ``ready`` (and if it had been ready before the restart,
  ``retries`` failing probes make it ``unhealthy``); without one, it is
  ``ready`` at once if its record says it was ready, else once it has been
  alive for ``settle_ms`` counted from its process start time (the start
  time proves it has run without a break since then);
- it is watched by polling (:data:`~.adopt.ADOPTED_POLL_S`), the agent being
  no longer its parent; when it is gone it is reported ``exited`` with
  ``exit_code`` and ``signal`` null: the status cannot be known;
- a stop re-checks pid and start time before each signal, sends SIGTERM to
  its group (to the pid alone if it no longer leads its group), waits the
  grace, SIGKILLs what is left and polls until it is gone; ``exited`` then
  carries ``signal`` 15 or 9, the last signal sent before it went;
- its log tail starts from the files on disk (:meth:`.logs.ReplicaLog.resume`).
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import psutil
import trio

from skr8tr.core.names import APP_NAME_RE
from skr8tr.core.node_protocol import Launch, ReplicaReport
from skr8tr.node.adopt import AdoptedProcess, identify
from skr8tr.node.health import (
    HealthTracker,
    ProbeNotes,
    next_probe_delay,
    probe_http,
    probe_text,
)
from skr8tr.node.logs import (
    KEEP_FILES_PER_APP,
    ROTATE_BYTES,
    TAIL_INTERVAL_S,
    TAIL_LINES,
    LogBook,
    LogSubscription,
    ReplicaLog,
    run_tailer,
)
from skr8tr.node.process import (
    LaunchFailed,
    RunAs,
    check_port_free,
    signal_name,
    spawn,
    terminate,
    terminate_adopted,
)
from skr8tr.node.records import RecordWriter, read_records, remove_record

log = logging.getLogger("skr8tr.node")

KEEP_FINISHED_REPORTS = 1000
# The states a record keeps (for the readiness of a re-adopted replica).
RECORDED_STATES = ("running", "ready", "unhealthy")

Report = ReplicaReport
ReportSink = Callable[[Report], None]


@dataclass(eq=False)
class _Replica:
    spec: Launch
    log: ReplicaLog
    proc: trio.Process | None = None  # spawned by this agent
    adopted: AdoptedProcess | None = None  # or re-adopted after a restart
    was_ready: bool = False  # re-adopted, and its record said ready or unhealthy
    record: dict[str, Any] | None = None
    stop_requested: trio.Event = field(default_factory=trio.Event)
    stopping: bool = False
    # the last signal a stop sent while the (adopted) process was still there
    sent_signal: int | None = None
    readiness_scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    last_report: Report | None = None

    @property
    def pid(self) -> int | None:
        if self.adopted is not None:
            return self.adopted.pid
        return self.proc.pid if self.proc is not None else None

    @property
    def exited(self) -> bool:
        """Whether its process has gone (polls; for an adopted one, re-checks its identity)."""
        if self.adopted is not None:
            return not self.adopted.check()
        return self.proc is not None and self.proc.returncode is not None

    async def wait(self) -> None:
        if self.adopted is not None:
            await self.adopted.wait()
        else:
            assert self.proc is not None
            await self.proc.wait()


class Supervisor:
    """Starts, watches and stops replicas. Create it with :func:`open_supervisor`.

    The methods called by a session (:meth:`launch`, :meth:`stop`,
    :meth:`attach`, :meth:`detach`, :meth:`reports`, :meth:`tail_logs`) never
    block: the work happens in the replica's own task.
    """

    def __init__(self, nursery: trio.Nursery, data_dir: str, *, stop_on_exit: bool = False,
                 log_lines: int = TAIL_LINES, log_rotate_bytes: int = ROTATE_BYTES,
                 tail_interval_s: float = TAIL_INTERVAL_S,
                 clock: Callable[[], float] = time.time, run_as: RunAs | None = None,
                 records: RecordWriter | None = None,
                 keep_logs: int = KEEP_FILES_PER_APP) -> None:
        self.data_dir = data_dir
        self.run_as = run_as
        self.logs_dir = os.path.join(data_dir, "logs")
        self.records_dir = os.path.join(data_dir, "replicas")
        self.records = records or RecordWriter(self.records_dir)  # its task: open_supervisor
        self.stop_on_exit = stop_on_exit
        self.logbook = LogBook(self.logs_dir, max_lines=log_lines,
                               keep_files_per_app=keep_logs,
                               rotate_bytes=log_rotate_bytes, clock=clock)
        self._nursery = nursery
        self._tail_interval_s = tail_interval_s
        self._clock = clock
        self._live: dict[str, _Replica] = {}
        self._finished: OrderedDict[str, Report] = OrderedDict()
        self._sink: ReportSink | None = None

    # ------------------------------------------------------------------ session side

    def attach(self, sink: ReportSink) -> list[Report]:
        """Send every later report to *sink*; return the current reports (for ``hello``).

        Attaching and taking the snapshot happen at once, so no report falls
        between the two. *sink* must not block or raise.
        """
        self._sink = sink
        return self.reports()

    def detach(self, sink: ReportSink) -> None:
        """Stop sending reports to *sink* (if it is still the attached one)."""
        if self._sink is sink:
            self._sink = None

    def reports(self) -> list[Report]:
        """The last report of every replica that is running (in launch order)."""
        return [r.last_report for r in self._live.values() if r.last_report is not None]

    def tail_logs(self, app: str, replica: str | None, count: int) -> list[dict[str, Any]]:
        """The last *count* log lines of *app* (or one of its replicas), oldest first."""
        return self.logbook.tail(app, replica, count)

    def follow_logs(self, app: str, replica: str | None, *, tail: int,
                    after: dict[str, int] | None = None, since: float | None = None
                    ) -> tuple[list[dict[str, Any]], LogSubscription]:
        """Follow *app*'s (or one replica's) lines: :meth:`.logs.LogBook.subscribe`.
        Replicas of the app launched later join; call :meth:`unfollow_logs` when done."""
        return self.logbook.subscribe(app, replica, tail=tail, after=after, since=since)

    def unfollow_logs(self, sub: LogSubscription) -> None:
        self.logbook.unsubscribe(sub)

    def forget_app(self, app: str) -> None:
        """The conductor forgot *app* (``down``): its log files go
        (:meth:`.logs.LogBook.forget_app`)."""
        removed = self.logbook.forget_app(app)
        log.info("app %s is gone: removed the log files of %d finished replica(s)%s", app,
                 removed, "; those still stopping go when they exit"
                 if self.logbook.forgetting(app) else "")

    def launch(self, spec: Launch) -> None:
        """Start a replica in the background; its reports say how it goes.

        Launching a replica id that is still running is a duplicate: its last
        report is sent again and nothing else happens.
        """
        current = self._live.get(spec.replica)
        if current is not None:
            log.info("replica %s (app %s): duplicate launch ignored", spec.replica, spec.app)
            if current.last_report is not None:
                self._emit(current.last_report)
            return
        self._finished.pop(spec.replica, None)
        rep = _Replica(spec, self.logbook.open(spec.replica, spec.app))
        self._live[spec.replica] = rep
        self._nursery.start_soon(self._serve_replica, rep, name=f"replica {spec.replica}")

    def stop(self, replica: str) -> None:
        """Stop a replica in the background (SIGTERM, grace, SIGKILL); ``exited`` follows.

        Idempotent: for a replica already gone its last report is sent again;
        for one never seen, an ``exited`` report with message "unknown replica".
        """
        rep = self._live.get(replica)
        if rep is not None:
            if not rep.stop_requested.is_set():
                log.info("replica %s (app %s): stop requested", replica, rep.spec.app)
                rep.stop_requested.set()
            return
        last = self._finished.get(replica)
        if last is not None:
            log.info("replica %s: stop of a finished replica; sending its last report again",
                     replica)
            self._emit(last)
            return
        log.warning("replica %s: stop of an unknown replica", replica)
        # The wire needs app and generation; for a replica never seen they are
        # unknown, so they are sent empty / as 1. The conductor goes by replica id.
        # Without a token: the wire has always left it out of this report.
        self._emit(ReplicaReport(
            replica=replica, app="", generation=1, state="exited", pid=None, port=None,
            exit_code=None, signal=None, message="unknown replica", reason=None,
            ts=self._clock(), omit=frozenset({"token"}),
        ))

    # ------------------------------------------------------------------ replica task

    async def _serve_replica(self, rep: _Replica) -> None:
        try:
            proc = await self._spawn(rep)
        except LaunchFailed as exc:
            # In its stderr log too: `skr8tr logs APP` shows why it never ran.
            rep.log.note_start_error(rep.spec.exec, str(exc))
            self._report(rep, "failed", message=str(exc), reason=exc.reason)
            self.logbook.finish(rep.log)
            self._retire(rep)
            return
        rep.proc = proc
        # The report goes first, and a scheduling round lets the session send it
        # before the record is even prepared (psutil, JSON); the record is then
        # written in a worker thread (see skr8tr.node.records).
        self._report(rep, "running")
        await trio.lowlevel.cancel_shielded_checkpoint()  # not a cancel point: record next
        self._write_record(rep)
        await self._watch_replica(rep)

    async def _watch_replica(self, rep: _Replica) -> None:
        """Tail, probe and await the exit of a running replica (spawned or re-adopted)."""
        spec = rep.spec
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(run_tailer, rep.log, self._tail_interval_s)
                nursery.start_soon(self._watch_readiness, rep)
                nursery.start_soon(self._serve_stop_request, rep)
                await rep.wait()
                nursery.cancel_scope.cancel()
        finally:
            # Still running here means the supervisor is closing (agent shutdown).
            if not rep.exited and self.stop_on_exit:
                await self._terminate(rep, why="agent shutting down")
            if rep.exited:
                self._finish(rep)
            else:
                log.info("replica %s (app %s) pid %s left running", spec.replica, spec.app,
                         rep.pid)

    # ------------------------------------------------------------------ re-adoption

    def adopt_recorded(self) -> list[str]:
        """Re-adopt the recorded replicas whose processes still run; drop the other records.

        Called once by :func:`open_supervisor`, before any session or launch.
        A record is dropped (and its pid never signalled) when its process is
        gone, a zombie, or its pid now belongs to a process started at another
        time; also when it is unreadable, lacks a start time (the process was
        gone before it could be read) or its launch fields are invalid.
        Returns the ids of the re-adopted replicas. Never raises.
        """
        try:
            found = read_records(self.records_dir)
        except OSError as exc:
            log.error("cannot read the replica records in %s: %s; nothing re-adopted",
                      self.records_dir, exc)
            return []
        adopted = []
        for replica, record in found:
            problem = record if isinstance(record, str) else self._adopt(replica, record)
            if problem is None:
                adopted.append(replica)
                continue
            log.log(logging.INFO if problem.endswith(": gone") else logging.WARNING,
                    "replica %s: not re-adopted, record dropped: %s", replica, problem)
            try:
                remove_record(self.records_dir, replica)
            except OSError as exc:
                log.error("replica %s: cannot remove its record: %s", replica, exc)
        if found:
            log.info("re-adopted %d of %d recorded replica(s)%s", len(adopted), len(found),
                     f": {', '.join(adopted)}" if adopted else "")
        return adopted

    def _adopt(self, replica: str, record: dict[str, Any]) -> str | None:
        """Adopt the process of one record; return why not, or None once it is adopted."""
        pid, create_time = record.get("pid"), record.get("create_time")
        launch = record.get("launch")
        if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
            return f"no valid pid in the record ({pid!r})"
        if not isinstance(create_time, int | float) or isinstance(create_time, bool):
            return (f"pid {pid}: no process start time was recorded (the process was gone "
                    "before it could be read)")
        try:
            if not isinstance(launch, dict):
                raise ValueError("missing")
            spec = Launch.from_fields(launch)  # checks every field
        except (TypeError, ValueError) as exc:
            return f"bad launch fields in the record: {exc}"
        if spec.replica != replica:
            return f"the record's launch fields name replica {spec.replica!r}"
        why = identify(pid, float(create_time))
        if why is not None:
            return f"pid {pid}: {why}"
        state = record.get("state")
        rep = _Replica(spec, self.logbook.open(replica, spec.app),
                       adopted=AdoptedProcess(pid, float(create_time)),
                       was_ready=state in ("ready", "unhealthy"))
        rep.log.resume()
        self._live[replica] = rep
        self._report(rep, "running", message="re-adopted after an agent restart")
        # Attached after that report, so that the record keeps saying "ready" until
        # the replica is found ready again (or not) in this agent's life.
        rep.record = {**record, "state": state if state in RECORDED_STATES else "running"}
        self._nursery.start_soon(self._watch_replica, rep, name=f"replica {replica} (adopted)")
        return None

    async def _spawn(self, rep: _Replica) -> trio.Process:
        spec = rep.spec
        if spec.port is not None:
            await check_port_free(spec.host, spec.port)
        try:
            fds = rep.log.open_for_child()
        except OSError as exc:
            raise LaunchFailed(f"cannot open log files in {self.logs_dir}: {exc}") from None
        try:
            return await spawn(spec, fds, data_dir=self.data_dir, run_as=self.run_as)
        finally:
            for fd in fds.values():
                os.close(fd)

    async def _watch_readiness(self, rep: _Replica) -> None:
        spec = rep.spec
        with rep.readiness_scope:
            if spec.health is None or spec.port is None:
                if spec.health is not None:
                    log.warning("replica %s: health check without a port; using settle_ms",
                                spec.replica)
                await trio.sleep(self._settle_left_s(rep))
                if self._alive(rep):
                    self._report(rep, "ready")
                return
            health = spec.health
            tracker = HealthTracker(health.retries, was_ready=rep.was_ready)
            notes = ProbeNotes(health.retries)
            interval_s = health.interval_ms / 1000
            started_at = next_at = trio.current_time()
            while True:
                result = await probe_http(spec.host, spec.port, health.path,
                                          health.timeout_ms / 1000)
                passed = result.status == health.expect_status
                if not passed:
                    log.debug("replica %s: probe GET %s: %s", spec.replica, health.path,
                              result.describe())
                # The last outcome goes to the conductor (rollout status, list, the page);
                # the rollout fails on `retries` wrong answers in a row (core/rollout.py).
                note = notes.observe(probe_text(health.path, result, health.expect_status),
                                     result.status, passed, trio.current_time())
                change = tracker.observe(passed)
                if change is not None and self._alive(rep):
                    message = None
                    if change == "unhealthy":
                        # probe_text, not result.describe(): this message reaches
                        # /v1/watch readers without a key, and h11's error quotes the
                        # workload's bytes.
                        last = probe_text(health.path, result, health.expect_status)
                        message = (f"health check failed {health.retries} time(s) in a row "
                                   f"(last: {last}; expected HTTP {health.expect_status})")
                    self._report(rep, change, message=message, probe=note)
                elif note is not None and self._alive(rep) and rep.last_report is not None:
                    self._report(rep, rep.last_report.state, probe=note)
                now = trio.current_time()
                # Fast start-up probing looks for the moment it is ready; one that answers
                # a definite no is asked again at `interval`, so the `retries` wrong
                # answers that fail a rollout span (retries - 1) intervals, not a few
                # milliseconds of warm-up.
                starting = (not (tracker.ready or tracker.was_ready)
                            and not health.refuses(result.status))
                delay = next_probe_delay(interval_s, now - started_at if starting else None)
                next_at = max(next_at + delay, now)
                await trio.sleep_until(next_at)

    def _settle_left_s(self, rep: _Replica) -> float:
        settle_s = rep.spec.settle_ms / 1000
        if rep.adopted is None:
            return settle_s
        if rep.was_ready:
            return 0.0
        # The same pid and start time mean it has run without a break since then.
        alive_s = time.time() - rep.adopted.create_time
        return min(settle_s, max(0.0, settle_s - alive_s))

    async def _serve_stop_request(self, rep: _Replica) -> None:
        await rep.stop_requested.wait()
        await self._terminate(rep, why="stop requested")

    async def _terminate(self, rep: _Replica, *, why: str) -> None:
        """Stop the replica's process (:func:`.process.terminate`): shielded, bounded."""
        rep.stopping = True
        rep.readiness_scope.cancel()
        if rep.adopted is not None:
            rep.sent_signal = await terminate_adopted(rep.adopted, rep.spec, why=why)
            return
        assert rep.proc is not None
        await terminate(rep.proc, rep.spec, why=why)

    # ------------------------------------------------------------------ bookkeeping

    def _finish(self, rep: _Replica) -> None:
        assert rep.exited
        rep.log.read_new(final=True)
        self.logbook.finish(rep.log)
        self.records.put(rep.spec.replica, None)
        rep.record = None
        if rep.adopted is not None:
            sig = rep.sent_signal
            if sig is None:
                message = "exited while adopted; exit status unknown"
            else:
                message = (f"gone after a stop ({signal_name(sig)} sent); adopted, so its "
                           "exit status is unknown")
            self._report(rep, "exited", signal=sig, message=message)
            self._retire(rep)
            return
        proc = rep.proc
        assert proc is not None and proc.returncode is not None
        rc = proc.returncode
        if rc >= 0:
            message = f"exited with code {rc}"
        else:
            message = f"killed by signal {-rc} ({signal_name(-rc)})"
        if rep.stopping:
            message += " after a stop"
        self._report(rep, "exited", exit_code=rc if rc >= 0 else None,
                     signal=-rc if rc < 0 else None, message=message)
        self._retire(rep)

    def _retire(self, rep: _Replica) -> None:
        replica = rep.spec.replica
        if self._live.get(replica) is rep:
            del self._live[replica]
        if rep.last_report is not None:
            self._finished[replica] = rep.last_report
            self._finished.move_to_end(replica)
            while len(self._finished) > KEEP_FINISHED_REPORTS:
                self._finished.popitem(last=False)

    def _write_record(self, rep: _Replica) -> None:
        proc = rep.proc
        assert proc is not None
        spec = rep.spec
        try:
            create_time: float | None = psutil.Process(proc.pid).create_time()
        except psutil.Error:
            create_time = None  # already gone; the exit is reported right after
        rep.record = {
            "version": 1,
            "replica": spec.replica,
            "app": spec.app,
            "generation": spec.generation,
            "pid": proc.pid,
            "create_time": create_time,
            "port": spec.port,
            "host": spec.host,
            "stdout": rep.log.paths["stdout"],
            "stderr": rep.log.paths["stderr"],
            "started": self._clock(),
            "state": "running",
            "launch": spec.fields(),
        }
        self._save_record(rep)

    def _save_record(self, rep: _Replica) -> None:
        if rep.record is not None:
            self.records.put(rep.spec.replica, rep.record)

    def _alive(self, rep: _Replica) -> bool:
        return rep.pid is not None and not rep.stopping and not rep.exited

    def _report(self, rep: _Replica, state: str, *, exit_code: int | None = None,
                signal: int | None = None, message: str | None = None,
                reason: str | None = None, probe: dict[str, Any] | None = None) -> None:
        spec = rep.spec
        pid = rep.pid
        news = rep.last_report is None or rep.last_report.state != state or message is not None
        if (state in RECORDED_STATES and rep.record is not None
                and rep.record.get("state") != state):
            rep.record["state"] = state
            self._save_record(rep)
        report = ReplicaReport(
            replica=spec.replica, app=spec.app, generation=spec.generation, state=state,
            pid=pid, port=spec.port, exit_code=exit_code, signal=signal, message=message,
            reason=reason, ts=self._clock(), token=spec.token, probe=probe, slot=spec.slot,
        )
        rep.last_report = report
        level = logging.WARNING if state in ("failed", "unhealthy") else logging.INFO
        if not news:  # only a probe result: the agent's log has it at debug level
            log.debug("replica %s probe: %s", spec.replica, probe)
            self._emit(report)
            return
        log.log(level, "replica %s (app %s gen %d) %s%s%s", spec.replica, spec.app,
                spec.generation, state, f" pid {pid}" if pid is not None else "",
                f": {message}" if message else "")
        self._emit(report)

    def _emit(self, report: Report) -> None:
        if self._sink is not None:
            self._sink(report)  # frozen: shared safely


@asynccontextmanager
async def open_supervisor(data_dir: str, *, stop_on_exit: bool = False,
                          **options: Any) -> AsyncIterator[Supervisor]:
    """A :class:`Supervisor` whose replica tasks live in a nursery opened here.

    Creates ``logs/`` and ``replicas/`` under *data_dir* (OSError if it
    cannot), then re-adopts the replicas recorded there whose processes
    still run (:meth:`Supervisor.adopt_recorded`). On exit, normal or by
    cancellation, every replica task is cancelled: without *stop_on_exit* the
    processes keep running and their records stay; with it each one, re-adopted
    ones too, is stopped (shielded, SIGTERM, its grace, SIGKILL, waited for)
    before this returns. *options* go to the Supervisor.
    """
    for sub in ("logs", "replicas"):
        os.makedirs(os.path.join(data_dir, sub), mode=0o700, exist_ok=True)
    records = RecordWriter(os.path.join(data_dir, "replicas"))
    async with trio.open_nursery() as writer_nursery:
        writer_nursery.start_soon(records.run, name="replica records")
        try:
            async with trio.open_nursery() as nursery:
                supervisor = Supervisor(nursery, data_dir, stop_on_exit=stop_on_exit,
                                        records=records, **options)
                supervisor.adopt_recorded()
                # Files an earlier life of the agent left count towards their app's bound.
                supervisor.logbook.sweep_leftovers(app_of_replica)
                try:
                    yield supervisor
                finally:
                    nursery.cancel_scope.cancel()
            # Every replica task is done: what they queued (the removals of the
            # stopped ones, the records of those left running) goes to disk now.
        finally:
            with trio.CancelScope(shield=True):
                await records.flush()
            writer_nursery.cancel_scope.cancel()


def app_of_replica(replica: str) -> str | None:
    """The app a replica id names (the conductor gives ids as ``APP-SUFFIX``), or None."""
    app, dash, _ = replica.rpartition("-")
    return app if dash and APP_NAME_RE.fullmatch(app) else None
