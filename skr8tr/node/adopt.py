"""Processes a restarted agent finds still running: identity checks and watching by polling.

A replica record names a pid and the process's start time (psutil's
``create_time``). After a restart that pid may belong to the replica still,
to nobody, or, once the kernel has handed the number out again, to an
unrelated process. Only a process whose pid *and* start time both match, and
that is not a zombie, is the replica: :func:`identify` says which case it is,
and nothing that fails that check is ever adopted or signalled.

The restarted agent is no longer the replica's parent, so it cannot wait for
the exit: :class:`AdoptedProcess` polls instead, and re-checks the identity
right before every signal it sends.
"""

from __future__ import annotations

import logging
import os
import signal

import psutil
import trio

log = logging.getLogger("skr8tr.node")

# create_time is a float computed from the boot time and the start tick; the
# same process always yields the same value, another process started in a
# different tick yields one at least a tick (10 ms) apart.
CREATE_TIME_TOLERANCE_S = 0.01
ADOPTED_POLL_S = 0.5


def identify(pid: int, create_time: float) -> str | None:
    """None if *pid* is a live (non-zombie) process started at *create_time*, else why not.

    The reason is one of "gone", "a zombie" (it exited; its parent has not
    collected it yet), "pid reused by another process (started at ...)" or
    "cannot inspect pid N: ..." (another user's process, so not ours). Never
    raises.
    """
    try:
        proc = psutil.Process(pid)
        started = proc.create_time()
        status = proc.status()
    except psutil.NoSuchProcess:
        return "gone"
    except psutil.Error as exc:
        return f"cannot inspect pid {pid}: {exc}"
    if abs(started - create_time) > CREATE_TIME_TOLERANCE_S:
        return (f"pid reused by another process (started at {started:.2f}, "
                f"recorded {create_time:.2f})")
    if status == psutil.STATUS_ZOMBIE:
        return "a zombie"
    return None


class AdoptedProcess:
    """A replica process this agent did not start (or no longer is the parent of).

    Create it for a process :func:`identify` accepted. ``group`` is its
    process group id when it leads its own group (replicas are started as
    session leaders, so pgid == pid), else None and signals go to the pid
    alone. ``gone`` turns true once the process is seen gone, a zombie or
    replaced; its exit status is never known.

    Every signal is preceded by a fresh identity check. What remains between
    that check and the signal is a window of microseconds in which the
    kernel would have to hand the same pid out again, which it does only
    after cycling through the whole pid space.
    """

    def __init__(self, pid: int, create_time: float) -> None:
        self.pid = pid
        self.create_time = create_time
        self.gone = False
        self._gone_event = trio.Event()
        self.group: int | None = None
        try:
            pgid: int | None = os.getpgid(pid)
        except OSError:
            pgid = None
        # Checked after getpgid, so that the group id read is this process's.
        if identify(pid, create_time) is not None:
            self._mark_gone()
        elif pgid == pid:
            self.group = pid

    def check(self) -> bool:
        """Whether the process is still there (same pid, same start time, not a zombie)."""
        if not self.gone and identify(self.pid, self.create_time) is not None:
            self._mark_gone()
        return not self.gone

    async def wait(self, poll_s: float = ADOPTED_POLL_S) -> None:
        """Return once the process is gone, checking every *poll_s*. Cancellable.

        Also returns as soon as any other check (another waiter polling faster,
        a signal that found it gone) sees it gone.
        """
        while self.check():
            with trio.move_on_after(poll_s):
                await self._gone_event.wait()

    def _mark_gone(self) -> None:
        self.gone = True
        self._gone_event.set()

    def send_signal(self, sig: int) -> bool:
        """Send *sig* to the group (or the pid alone); return whether anything was signalled.

        The process's identity is checked right before: a pid that belongs to
        another process now is never signalled. Once the process itself is
        gone, the rest of its group is still signalled (see :meth:`group_alive`).
        """
        if self.check():
            try:
                if self.group is not None:
                    os.killpg(self.group, sig)
                else:
                    os.kill(self.pid, sig)
                return True
            except ProcessLookupError:
                self._mark_gone()
            except PermissionError as exc:
                log.warning("pid %d: cannot send %s: %s", self.pid,
                            signal.Signals(sig).name, exc)
                return False
        if self.group is not None and self.group_alive():
            try:
                os.killpg(self.group, sig)
                return True
            except (ProcessLookupError, PermissionError):
                return False
        return False

    def group_alive(self) -> bool:
        """Whether the process, or any non-zombie member of its group, is still there.

        Members left after the process itself went are the replica's own
        descendants: a group never spans sessions, and the kernel does not
        hand out a group's id as a new pid while the group has members. So
        when the pid already belongs to another process, the group is empty.
        """
        if self.group is None:
            return self.check()
        why = identify(self.pid, self.create_time)
        if why is None:
            return True
        self._mark_gone()
        if why not in ("gone", "a zombie"):
            return False  # the pid is someone else's now: the group has no members left
        try:
            os.killpg(self.group, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            # Members run as another user: the scan below still sees them.
            log.debug("group %d: no permission to probe it; scanning for members",
                      self.group)
        # killpg also succeeds for a group of zombies; look at the members.
        for proc in psutil.process_iter():
            try:
                if os.getpgid(proc.pid) == self.group and proc.status() != psutil.STATUS_ZOMBIE:
                    return True
            except (OSError, psutil.Error):
                continue
        return False
