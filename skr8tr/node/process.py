"""One workload process: starting it, and stopping it and its process group.

What the :class:`~.supervisor.Supervisor` asks of the operating system, apart
from the replica's life story (readiness, reports, records), which stays there:

- :func:`spawn` starts a :class:`~skr8tr.core.node_protocol.Launch` in a session
  (and so a process group) of its own, with its output going straight to its
  log files, as the ``--run-as`` user when there is one; :func:`check_port_free`
  first makes sure nothing listens on its port;
- :func:`terminate` (a child of this agent) and :func:`terminate_adopted` (a
  process re-adopted after an agent restart, watched by polling) send SIGTERM to
  the group, give it the launch's ``stop_grace_ms``, SIGKILL what is left and
  wait for the exit. Both run shielded: once begun a stop completes, bounded by
  the grace plus :data:`KILL_WAIT_S`.
"""

from __future__ import annotations

import errno
import logging
import os
import pwd
import signal
import socket
import subprocess
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

import trio

from skr8tr.core.node_protocol import Launch
from skr8tr.node.adopt import AdoptedProcess

log = logging.getLogger("skr8tr.node")

INHERITED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TZ")
# After SIGKILL a process is gone in microseconds unless stuck in the kernel;
# the shielded part of a stop waits this long, then the replica task keeps
# waiting unshielded.
KILL_WAIT_S = 10.0
GROUP_POLL_S = 0.05


@dataclass(frozen=True)
class RunAs:
    """The user workloads run as (``skr8tr node --run-as USER``), resolved once."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str


class RunAsError(Exception):
    """``--run-as`` cannot be used; the message says why."""


def resolve_run_as(name: str) -> RunAs:
    """Look up *name* (or a numeric uid) and its groups; RunAsError if unknown or if this
    process cannot switch users (it is not root)."""
    try:
        entry = pwd.getpwuid(int(name)) if name.isdigit() else pwd.getpwnam(name)
    except (KeyError, OverflowError):
        raise RunAsError(f"--run-as {name!r}: no such user on this machine") from None
    if os.geteuid() != 0:
        raise RunAsError(f"--run-as {name}: the agent must run as root to start workloads as "
                         f"another user (it runs as uid {os.geteuid()})")
    groups = tuple(sorted(set(os.getgrouplist(entry.pw_name, entry.pw_gid))))
    return RunAs(entry.pw_name, entry.pw_uid, entry.pw_gid, groups, entry.pw_dir)


class LaunchFailed(Exception):
    """A replica could not be started; the message goes into the ``failed`` report.

    ``reason`` is the report's ``reason``: ``port_in_use`` (the conductor picks
    another port) or ``launch_error``.
    """

    def __init__(self, message: str, reason: str = "launch_error") -> None:
        super().__init__(message)
        self.reason = reason


async def spawn(spec: Launch, fds: dict[str, int], *, data_dir: str,
                run_as: RunAs | None) -> trio.Process:
    """Start *spec* with its stdout and stderr on *fds* (which the caller closes), in a
    session of its own. Its working directory is the launch's ``workdir``, else
    *data_dir* (or, with *run_as*, ``<data-dir>/work``, owned by that user).
    Raises LaunchFailed with the OS error."""
    user: dict[str, Any] = {}
    env = build_env(spec)
    workdir = spec.workdir or data_dir
    try:
        if run_as is not None:
            # The workload writes to the fds it inherits; owning its files lets it
            # reopen them too. The agent's data dir stays private (0700).
            for fd in fds.values():
                os.fchown(fd, run_as.uid, run_as.gid)
            user = {"user": run_as.uid, "group": run_as.gid,
                    "extra_groups": list(run_as.groups)}
            env.update(HOME=run_as.home, USER=run_as.name, LOGNAME=run_as.name)
            if spec.workdir is None:
                workdir = _work_dir(data_dir, run_as)
        return await trio.lowlevel.open_process(
            [spec.exec, *spec.args],
            stdin=subprocess.DEVNULL,
            stdout=fds["stdout"],
            stderr=fds["stderr"],
            cwd=workdir,
            env=env,
            start_new_session=True,
            **user,
        )
    except (OSError, ValueError) as exc:
        who = f" as {run_as.name}" if run_as is not None else ""
        raise LaunchFailed(f"{exc}{who}") from None


def _work_dir(data_dir: str, run_as: RunAs) -> str:
    """``<data-dir>/work``, owned by the --run-as user: the default workdir then."""
    path = os.path.join(data_dir, "work")
    os.makedirs(path, mode=0o750, exist_ok=True)
    st = os.stat(path)
    if (st.st_uid, st.st_gid) != (run_as.uid, run_as.gid):
        os.chown(path, run_as.uid, run_as.gid)
    # Inside the 0700 data dir: let the user through to its own folder only.
    data = os.stat(data_dir)
    if not data.st_mode & 0o001:
        os.chmod(data_dir, (data.st_mode & 0o7777) | 0o001)
    return path


async def terminate(proc: trio.Process, spec: Launch, *, why: str) -> None:
    """SIGTERM the group, wait up to the grace for it to go, SIGKILL what is left.

    Shielded: once begun it completes, bounded by the grace plus
    :data:`KILL_WAIT_S`.
    """
    grace_s = spec.stop_grace_ms / 1000
    with trio.CancelScope(shield=True):
        if proc.returncode is None:
            log.info("replica %s (app %s) pid %d: SIGTERM to its group (%s), grace %g s",
                     spec.replica, spec.app, proc.pid, why, grace_s)
            _signal_group(proc, signal.SIGTERM)
        deadline = trio.current_time() + grace_s
        with trio.move_on_at(deadline):
            await proc.wait()
            # The leader is gone; give the rest of its group the rest of the grace.
            while _group_alive(proc.pid):
                await trio.sleep(GROUP_POLL_S)
        if proc.returncode is None or _group_alive(proc.pid):
            log.warning("replica %s (app %s) pid %d: still there after %g s; SIGKILL to "
                        "its group", spec.replica, spec.app, proc.pid, grace_s)
            _signal_group(proc, signal.SIGKILL)
        with trio.move_on_after(KILL_WAIT_S):
            await proc.wait()
        if proc.returncode is None:
            log.error("replica %s pid %d survived SIGKILL for %g s; still waiting",
                      spec.replica, proc.pid, KILL_WAIT_S)


async def terminate_adopted(ap: AdoptedProcess, spec: Launch, *, why: str) -> int | None:
    """:func:`terminate` for a process this agent is not the parent of: signals, polls.

    Every signal to the process re-checks its pid and start time first
    (:meth:`AdoptedProcess.send_signal`). Returns the last signal sent while it
    was still there (None if none was).
    """
    sent: int | None = None
    grace_s = spec.stop_grace_ms / 1000
    target = "its group" if ap.group is not None else "it (not leading its own group)"
    with trio.CancelScope(shield=True):
        if ap.send_signal(signal.SIGTERM):
            sent = signal.SIGTERM
            log.info("replica %s (app %s) pid %d (adopted): SIGTERM to %s (%s), grace %g s",
                     spec.replica, spec.app, ap.pid, target, why, grace_s)
        with trio.move_on_after(grace_s):
            await ap.wait(GROUP_POLL_S)
            while ap.group_alive():
                await trio.sleep(GROUP_POLL_S)
        leader_there = ap.check()
        if leader_there or ap.group_alive():
            log.warning("replica %s (app %s) pid %d (adopted): still there after %g s; "
                        "SIGKILL to %s", spec.replica, spec.app, ap.pid, grace_s, target)
            if ap.send_signal(signal.SIGKILL) and leader_there:
                sent = signal.SIGKILL
        with trio.move_on_after(KILL_WAIT_S):
            await ap.wait(GROUP_POLL_S)
        if not ap.gone:
            log.error("replica %s pid %d survived SIGKILL for %g s; still waiting",
                      spec.replica, ap.pid, KILL_WAIT_S)
    return sent


def build_env(spec: Launch) -> dict[str, str]:
    """A few inherited variables, the manifest's env, then PORT/HOST and SKR8TR_*."""
    env = {k: os.environ[k] for k in INHERITED_ENV if k in os.environ}
    env.update(spec.env)
    if spec.port is not None:
        env["PORT"] = str(spec.port)
        env["HOST"] = spec.host
    env["SKR8TR_APP"] = spec.app
    env["SKR8TR_REPLICA"] = spec.replica
    env["SKR8TR_GENERATION"] = str(spec.generation)
    return env


async def check_port_free(host: str, port: int) -> None:
    """Raise LaunchFailed if something listens on (*host*, *port*).

    Binds a socket there and closes it. ``SO_REUSEADDR`` keeps connections in
    TIME_WAIT from counting as "in use" (the workload will set it too). When
    *host* is not an address of this machine, the port is checked on the
    wildcard address instead.
    """
    try:
        infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        infos = []
    targets = [(family, addr) for family, _t, _p, _c, addr in infos]
    if not targets:
        targets = [(socket.AF_INET, ("0.0.0.0", port))]
    family, addr = targets[0]
    try:
        _try_bind(family, addr)
        return
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise LaunchFailed(f"port {port} is already in use on {host}",
                               reason="port_in_use") from None
        if exc.errno != errno.EADDRNOTAVAIL:
            # E.g. EACCES for a low port: the workload may hold a capability we lack.
            log.debug("cannot check port %d on %s (%s); launching anyway", port, host, exc)
            return
    wildcard = ("::", port) if family == socket.AF_INET6 else ("0.0.0.0", port)
    try:
        _try_bind(family, wildcard)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise LaunchFailed(f"port {port} is already in use on {host}",
                               reason="port_in_use") from None


def _try_bind(family: int, addr: Any) -> None:
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)


def _signal_group(proc: trio.Process, sig: int) -> None:
    # The replica was started with start_new_session, so its pid is its group id.
    try:
        os.killpg(proc.pid, sig)
        return
    except ProcessLookupError:
        pass  # the group is empty, or the process moved to a group of its own
    except PermissionError as exc:
        log.warning("pid %d: cannot signal its group: %s", proc.pid, exc)
    if proc.returncode is None:
        with suppress(ProcessLookupError):
            proc.send_signal(sig)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"
