"""Refused requests, reported at a bounded rate: one flood must not become a log flood.

Every refusal is counted (``skr8tr_requests_refused_total{reason}``). The first
:data:`REFUSALS_SHOWN_PER_S` per second (with a burst of
:data:`REFUSALS_SHOWN_BURST`) each get a log line and, for a command that
needs a signature, an audit line. The rest are summed up: once a second
(:meth:`RefusalReporter.serve`) one log line and one audit line say how many
were left out, with their codes, commands and client addresses. An attacker
sending a thousand refused requests a second thus costs the audit log a few
dozen fsynced lines a second, not a thousand, and nothing is lost from the
count.

What is written about a refused request comes from its envelope only; its
arguments are never parsed (a manifest is recorded as its size and SHA-256).
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from skr8tr.conductor import audit
from skr8tr.conductor.limits import TokenBucket
from skr8tr.core import envelope, protocol
from skr8tr.core.signatures import fingerprint

log = logging.getLogger("skr8tr.conductor")

REFUSALS_SHOWN_PER_S = 10.0
REFUSALS_SHOWN_BURST = 50
SUMMARY_EVERY_S = 1.0
SUMMARY_PEERS_SHOWN = 10  # client addresses named in one summary line


@dataclass
class _Suppressed:
    """Refusals left out of the log and audit since the last summary."""

    count: int = 0
    codes: collections.Counter[str] = field(default_factory=collections.Counter)
    commands: collections.Counter[str] = field(default_factory=collections.Counter)
    peers: collections.Counter[str] = field(default_factory=collections.Counter)
    first_wall: float | None = None


class RefusalReporter:
    """Counts every refused request; logs and audits them at a bounded rate."""

    def __init__(self, *, audit_log: audit.AuditLog | None, wall: Callable[[], float],
                 clock: Callable[[], float] = trio.current_time,
                 per_s: float = REFUSALS_SHOWN_PER_S,
                 burst: int = REFUSALS_SHOWN_BURST) -> None:
        self.audit_log = audit_log
        self.wall = wall
        self.clock = clock
        self.by_code: dict[str, int] = {}  # every refusal, by code (for /metrics)
        self.summarised = 0  # refusals that went into a summary instead of their own lines
        self._bucket = TokenBucket(per_s, burst, float("-inf"))  # starts full
        self._left_out = _Suppressed()

    def count(self, code: str) -> None:
        """Count a refusal that its caller reports itself (a node session's)."""
        self.by_code[code] = self.by_code.get(code, 0) + 1

    def refused(self, peer: str, err: protocol.DecodeError) -> None:
        """Record one refusal. O(1) and no parsing, whatever the message held."""
        self.count(err.code)
        signed_cmd = err.cmd if err.cmd in envelope.SIGNED_COMMANDS else None
        key = fingerprint(err.key) if err.key is not None else None
        if not self._bucket.take(self.clock()):
            left = self._left_out
            if left.first_wall is None:
                left.first_wall = self.wall()
            left.count += 1
            left.codes[err.code] += 1
            left.commands[err.cmd or "(none)"] += 1
            if peer in left.peers or len(left.peers) < 4 * SUMMARY_PEERS_SHOWN:
                left.peers[peer] += 1
            self.summarised += 1
            return
        log.warning("refused a request from %s (key %s): %s: %s", peer, key or "none",
                    err.code, err.message)
        if self.audit_log is not None and signed_cmd is not None:
            # EXPIRED and REPLAY are judged after the signature verified.
            verified = err.code in ("EXPIRED", "REPLAY")
            self.audit_log.append(
                {"peer": peer, **audit.signer_fields(err.key), "verified": verified,
                 "cmd": signed_cmd,
                 "args": audit.redact_args(signed_cmd, err.args),
                 "result": {"ok": False, "code": err.code, "message": err.message}},
                self.wall())

    def flush(self) -> None:
        """Write one summary of the refusals left out since the last one (if any)."""
        left = self._left_out
        if not left.count:
            return
        self._left_out = _Suppressed()
        peers = [p for p, _ in left.peers.most_common(SUMMARY_PEERS_SHOWN)]
        log.warning("refused %d more request(s) since %.3f, not logged one by one: codes %s; "
                    "commands %s; from %s%s", left.count, left.first_wall or 0.0,
                    dict(left.codes), dict(left.commands), ", ".join(peers),
                    " and others" if len(left.peers) > len(peers) else "")
        if self.audit_log is not None:
            self.audit_log.append(
                {"peer": None, "key": None, "alg": None, "verified": False,
                 "cmd": "(refusals)",
                 "args": {"since": round(left.first_wall or 0.0, 3)},
                 "result": {"ok": False, "summarised": left.count, "codes": dict(left.codes),
                            "commands": dict(left.commands), "peers": peers}},
                self.wall())

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Write the summary once a second while refusals are being left out; and once
        more when cancelled (the conductor's shutdown), so none goes unrecorded."""
        task_status.started()
        try:
            while True:
                await trio.sleep(SUMMARY_EVERY_S)
                self.flush()
        finally:
            self.flush()
