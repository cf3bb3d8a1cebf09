"""The replay guard across restarts: no request accepted before one is accepted after.

A conductor refuses every signed request whose ``ts`` is earlier than the moment
it started (``ReplayGuard.not_before``). That covers every request the previous
process accepted with ``ts`` at or before its own clock reading, since that
reading came before this start. It does not cover a request signed by a client
whose clock runs ahead: accepted at ``now`` with ``ts > now``, it may still be
fresh after a restart that follows within ``ts - now`` seconds. Those nonces,
and only those, are written to ``STATE.nonces`` next to the ``--state`` file
before the command runs, and a restarted conductor remembers them until their
window ends. With clocks that agree this file is rarely written: a request's
``ts`` is read before it is sent, so it is usually in the past when it arrives.

The file is rewritten atomically (as the state file) with the entries that can
still pass the window: one line ``KEY NONCE TS``, key and nonce in hex, ts in
Unix seconds. A file that cannot be read makes the conductor refuse requests
signed in the first ``window_s`` after its start instead (every request the
previous process accepted is then too old), and it says so in the log: this
never stops a start, and never lets a replay through.

Without ``--state`` nothing is written: a request signed ahead of the
conductor's clock can then be replayed after a restart that follows it within
that lead (SECURITY.md).
"""

from __future__ import annotations

import logging

from skr8tr.atomic import write_atomically
from skr8tr.bounded_files import FileRefused, read_regular
from skr8tr.core import envelope
from skr8tr.core.signatures import is_public_key

log = logging.getLogger("skr8tr.conductor")

# A line is under 400 bytes and only requests dated ahead of the clock are kept, for
# their window: a file past this is not one the conductor wrote.
MAX_NONCES_FILE_BYTES = 64 * 1024 * 1024
_HEADER = ("# skr8tr conductor: nonces of signed requests dated ahead of its clock, kept "
           "across restarts (KEY NONCE TS)\n")


def nonces_path(state_path: str) -> str:
    """Where the conductor with ``--state state_path`` keeps its future-dated nonces."""
    return state_path + ".nonces"


class DurableReplayGuard(envelope.ReplayGuard):
    """A ReplayGuard that also writes its future-dated nonces to *path* as it spends them.

    Writes happen inside :meth:`spend`, synchronously, so the nonce is on disk
    before the command runs. A failed write is logged and does not refuse the
    request: the nonce stays spent in memory, and only a restart within the
    request's lead would forget it.
    """

    def __init__(self, path: str, *, started_at: float,
                 window_s: float = envelope.REQUEST_WINDOW_S) -> None:
        super().__init__(window_s, not_before=started_at)
        self.path = path
        self._ahead: dict[tuple[str, str], float] = {}  # (key, nonce) -> ts, ts > its `now`
        entries, problem = _read(path)
        if problem is not None:
            self.not_before = started_at + self.window_s
            log.warning("%s; requests signed before %.3f (the next %g s) are refused, so that "
                        "none accepted before this restart can be replayed", problem,
                        self.not_before, self.window_s)
        for key, nonce, ts in entries:
            super().spend(key, nonce, ts, started_at)
            if ts + self.window_s >= started_at:
                self._ahead[(key, nonce)] = ts

    def spend(self, key: str, nonce: str, ts: float, now: float) -> None:
        super().spend(key, nonce, ts, now)
        ts_f = envelope.finite_float(ts)
        if ts_f is None or ts_f <= now:
            return  # not_before covers it after a restart
        self._ahead = {pair: t for pair, t in self._ahead.items() if t + self.window_s >= now}
        self._ahead[(key, nonce)] = ts_f
        text = _HEADER + "".join(f"{k} {n} {t!r}\n" for (k, n), t in sorted(self._ahead.items()))
        try:
            write_atomically(self.path, text)
        except OSError as exc:
            log.error("cannot write %s: %s; the request goes on, but it was signed %.1f s "
                      "ahead of this clock and a restart within that time would let it be "
                      "replayed", self.path, exc.strerror or exc, ts_f - now)


def open_replay_guard(state_path: str | None, *, started_at: float) -> envelope.ReplayGuard:
    """The conductor's replay guard: refuses requests signed before *started_at*, and with a
    state file remembers future-dated nonces across restarts. Never raises for the file's
    content (see the module docstring)."""
    if state_path is None:
        return envelope.ReplayGuard(not_before=started_at)
    return DurableReplayGuard(nonces_path(state_path), started_at=started_at)


def _read(path: str) -> tuple[list[tuple[str, str, float]], str | None]:
    """The entries of the nonces file and, if it is unusable, why (naming file and line)."""
    try:
        lines = read_regular(path, MAX_NONCES_FILE_BYTES).decode("utf-8").splitlines()
    except FileNotFoundError:
        return [], None
    except FileRefused as exc:  # a FIFO would hang the start, /dev/zero take all memory
        return [], f"{exc}: not a nonces file"
    except (OSError, UnicodeDecodeError) as exc:
        return [], f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}"
    entries = []
    for number, line in enumerate(lines, start=1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split()
        ts = envelope.finite_float(_text_float(parts[2])) if len(parts) == 3 else None
        if ts is None or not is_public_key(parts[0]) or not envelope.is_nonce(parts[1]):
            return [], (f"{path}: line {number}: expected KEY NONCE TS (64 hex, 16-128 hex, "
                        f"Unix seconds)")
        entries.append((parts[0], parts[1], ts))
    return entries, None




def _text_float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None
