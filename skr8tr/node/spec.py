"""What the conductor asks a node to run: the ``launch`` message as frozen dataclasses."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class HealthSpec:
    """``GET path`` must answer ``expect_status``; probed every ``interval_ms``."""

    path: str
    expect_status: int = 200
    interval_ms: int = 1000
    timeout_ms: int = 1000
    retries: int = 3


@dataclass(frozen=True)
class LaunchSpec:
    """One replica to start (field names and meaning as in the ``launch`` message).

    ``args`` are already expanded by the conductor; ``env`` is the manifest's
    (the supervisor adds PORT, HOST and SKR8TR_*). ``workdir`` None means the
    node's data dir.
    """

    replica: str
    app: str
    generation: int
    exec: str
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    app_type: str = "process"
    workdir: str | None = None
    port: int | None = None
    host: str = "127.0.0.1"
    health: HealthSpec | None = None
    settle_ms: int = 8000
    stop_grace_ms: int = 5000
    token: str | None = None  # the conductor's placement token, sent back with each report

    @classmethod
    def from_message(cls, msg: Mapping[str, Any]) -> LaunchSpec:
        """Build from a ``launch`` message that :func:`decode_node_message` accepted."""
        health = msg["health"]
        return cls(
            replica=msg["replica"],
            app=msg["app"],
            generation=msg["generation"],
            exec=msg["exec"],
            args=tuple(msg["args"]),
            env=dict(msg["env"]),
            app_type=msg["app_type"],
            workdir=msg["workdir"],
            port=msg["port"],
            host=msg["host"],
            health=None if health is None else HealthSpec(**health),
            settle_ms=msg["settle_ms"],
            stop_grace_ms=msg["stop_grace_ms"],
            token=msg.get("token"),
        )

    def to_message_fields(self) -> dict[str, Any]:
        """The fields of the ``launch`` message this spec came from (for replica records)."""
        h = self.health
        return {
            "replica": self.replica,
            "app": self.app,
            "generation": self.generation,
            "app_type": self.app_type,
            "exec": self.exec,
            "args": list(self.args),
            "env": dict(self.env),
            "workdir": self.workdir,
            "port": self.port,
            "host": self.host,
            "health": None if h is None else {
                "path": h.path, "expect_status": h.expect_status, "interval_ms": h.interval_ms,
                "timeout_ms": h.timeout_ms, "retries": h.retries,
            },
            "settle_ms": self.settle_ms,
            "stop_grace_ms": self.stop_grace_ms,
            "token": self.token,
        }
