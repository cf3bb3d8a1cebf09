"""Why a new replica fails a rollout, in words a person can act on: its health probes
(:func:`probe_verdict`, :func:`probe_line`) and the paragraph a failure keeps
(:func:`describe_failure`). Pure; used by :mod:`skr8tr.core.rollout`."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from skr8tr.core.manifest import HealthCheck
    from skr8tr.core.rollout import ReplicaView

__all__ = ["describe_failure", "probe_line", "probe_verdict"]


def probe_line(text: str | None, count: int) -> str | None:
    """A last probe as people read it: ``GET /healthz -> 404, want 200 (3 in a row)``."""
    if text is None:
        return None
    return f"{text} ({count} in a row)" if count > 1 else text


def probe_verdict(r: ReplicaView, health: HealthCheck | None) -> str | None:
    """Why ``r`` will not become ready by waiting, or None: its health check got a
    definite wrong answer (:meth:`HealthCheck.refuses`: a complete response with
    another status than ``health`` wants, 503 excepted) ``retries`` times in a row."""
    if health is None or not health.refuses(r.probe_status) or r.probe_count < health.retries:
        return None
    return (f"failed its health check {r.probe_count} times in a row: "
            f"{r.probe or f'HTTP {r.probe_status}'}")


def describe_failure(replica: str, *, app: str, why: str, exit_code: int | None = None,
                     signal: int | None = None, message: str | None = None) -> str:
    """One paragraph a person can act on: which replica, what happened, where to look.

    Never the workload's own output: this text reaches every surface anyone can
    read without a key (``rollout status``, ``/api/state``, ``/v1/watch``), and
    a process may print a secret. Its lines are one signed ``logs`` away.
    """
    parts = [f"replica {replica} {why}"]
    said = message or ""  # the node's message often says it already ("exited with code 1")
    if exit_code is not None and f"code {exit_code}" not in said:
        parts.append(f"exit code {exit_code}")
    if signal is not None and f"signal {signal}" not in said:
        parts.append(f"killed by signal {signal}")
    if message:
        parts.append(message)
    return ", ".join(parts) + f" (its output: skr8tr logs {app} --replica {replica})"
