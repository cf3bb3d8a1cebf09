"""The manifest's data model: frozen dataclasses, the limits they obey, and ManifestError.

Internal to :mod:`skr8tr.core.manifest`, which re-exports every name here:
import them from there.

Pure: no I/O.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

FORMATS = ("skr8tr", "toml")
TYPES = ("process", "job")
RESTARTS = ("always", "on-failure", "never")
ORDERS = ("start-first", "stop-first")
PLACEHOLDERS = ("host", "port")
MAX_REPLICAS = 1000
MAX_SURGE = 1000
MAX_RETRIES = 100
SERVICE_UNAVAILABLE = 503  # a health check's "not yet" (HealthCheck.refuses)
MAX_DURATION_MS = 30 * 24 * 3600 * 1000  # the longest duration a manifest may give
MAX_CPU = 1024
RAM_UNITS = {"T": 2**40, "G": 2**30, "M": 2**20, "K": 2**10, "B": 1}  # largest first
MAX_RAM_BYTES = 1024 * RAM_UNITS["T"]
# The rollout's `analysis` block (DESIGN.md §11): window 1s..1h, max-p99 1ms..10m.
MIN_WINDOW_MS, MAX_WINDOW_MS = 1000, 3600 * 1000
MIN_P99_MS, MAX_P99_MS = 1, 600 * 1000
MAX_MIN_REQUESTS = 1_000_000
# Bounds that keep the parser's cost linear and small for any text it is given: a line of
# the .skr8tr language, and any one string value (a TOML string, one word of `args`).
MAX_LINE_CHARS = 16 * 1024
MAX_VALUE_CHARS = 16 * 1024
# Errors reported for one manifest: all of an ordinary one's, a bounded list for any text.
MAX_ERRORS = 100

_KNOWN_PLACEHOLDER = re.compile(r"\{(host|port)\}")


class ManifestError(ValueError):
    """A manifest that cannot be used, with where and why: ``FILE:LINE:COLUMN: message``.

    ``line`` and ``column`` are 1-based (columns count characters); ``text`` is the offending
    text and ``expected`` what would have been accepted there. This is the manifest's first
    error in line order; ``errors`` holds every error found (this one first), in line order:
    all of them, or with ``stopped`` the first MAX_ERRORS found before the checks stopped.
    """

    def __init__(
        self, message: str, *, filename: str, line: int, column: int, text: str, expected: str,
        others: tuple[ManifestError, ...] = (), stopped: bool = False,
    ) -> None:
        super().__init__(f"{filename}:{line}:{column}: {message}")
        self.message = message
        self.filename = filename
        self.line = line
        self.column = column
        self.text = text
        self.expected = expected
        self.errors: tuple[ManifestError, ...] = (self, *others)
        self.stopped = stopped

    def lines(self) -> list[str]:
        """Every error as ``FILE:LINE:COLUMN: message``, in line order (and a last line
        saying so when the checks stopped at MAX_ERRORS)."""
        out = [str(error) for error in self.errors]
        if self.stopped:
            out.append(f"{self.filename}: stopped after {len(self.errors)} errors")
        return out


@dataclass(frozen=True)
class HealthCheck:
    path: str
    method: str = "GET"
    expect_status: int = 200
    interval_ms: int = 1000
    timeout_ms: int = 1000
    retries: int = 3

    @property
    def interval_s(self) -> float:
        return self.interval_ms / 1000

    @property
    def timeout_s(self) -> float:
        return self.timeout_ms / 1000

    def refuses(self, status: int | None) -> bool:
        """True when a probe's answer is a definite no: a complete HTTP response with
        another status than the one wanted. Not an absent answer (refused, timeout)
        nor 503 Service Unavailable ("not yet"): a starting process gives those."""
        return (status is not None and status != self.expect_status
                and status != SERVICE_UNAVAILABLE)


@dataclass(frozen=True)
class Analysis:
    """The ``analysis`` block of ``rollout`` (DESIGN.md §11): each batch's new replicas
    are judged on the traffic the ingresses routed to them for ``window_ms`` after the
    batch is ready. ``max_error_rate`` is a fraction (``1%`` is 0.01) of requests that
    got a 5xx answer or could not reach the replica; ``max_p99_ms`` None: latency is
    not judged; fewer than ``min_requests`` in the window: keep watching, up to the
    rollout's ``ready-timeout``."""

    window_ms: int = 30000
    max_error_rate: float = 0.01
    max_p99_ms: int | None = None
    min_requests: int = 20

    @property
    def window_s(self) -> float:
        return self.window_ms / 1000


@dataclass(frozen=True)
class RolloutPolicy:
    settle_ms: int = 8000
    surge: int = 1
    ready_timeout_ms: int = 60000
    drain_ms: int = 0
    auto_rollback: bool = True
    order: str = "start-first"
    analysis: Analysis | None = None  # None: batches are not judged on traffic

    @property
    def settle_s(self) -> float:
        return self.settle_ms / 1000

    @property
    def ready_timeout_s(self) -> float:
        return self.ready_timeout_ms / 1000

    @property
    def drain_s(self) -> float:
        return self.drain_ms / 1000


@dataclass(frozen=True)
class Manifest:
    app: str
    exec: str
    base_dir: str
    type: str = "process"
    args: tuple[str, ...] = ()
    workdir: str | None = None
    port: int | str | None = None
    replicas: int = 1
    ram_bytes: int | None = None
    cpu: float | None = None
    env: tuple[tuple[str, str], ...] = ()
    health: HealthCheck | None = None
    rollout: RolloutPolicy = RolloutPolicy()
    stop_grace_ms: int = 5000
    restart: str = "always"

    @property
    def exec_path(self) -> str:
        """`exec` resolved against `base_dir`; a bare name like ``python3`` is left to PATH."""
        if "/" not in self.exec or os.path.isabs(self.exec):
            return self.exec
        return os.path.normpath(os.path.join(self.base_dir, self.exec))

    @property
    def workdir_path(self) -> str | None:
        """`workdir` resolved against `base_dir` (None: the node picks one)."""
        if self.workdir is None or os.path.isabs(self.workdir):
            return self.workdir
        return os.path.normpath(os.path.join(self.base_dir, self.workdir))

    @property
    def stop_grace_s(self) -> float:
        return self.stop_grace_ms / 1000

    def env_dict(self) -> dict[str, str]:
        return dict(self.env)

    def expand_args(self, host: str, port: int | None) -> tuple[str, ...]:
        """`args` with ``{host}`` and ``{port}`` replaced; ValueError if ``{port}`` lacks one."""

        def value(match: re.Match[str]) -> str:
            if match[1] == "host":
                return host
            if port is None:
                raise ValueError(f"app {self.app!r} uses {{port}} in args but got no port")
            return str(port)

        return tuple(_KNOWN_PLACEHOLDER.sub(value, arg) for arg in self.args)


