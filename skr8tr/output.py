"""Human-readable rendering of command results: the tables the CLI prints where ``--json``
prints the result as it came.

Pure functions from result dicts to text; the CLI prints what they return.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from typing import Any

Column = tuple[str, Callable[[dict], Any]]

# What a terminal acts on (C0 controls but tab, DEL, C1 controls) or shows in another order
# than it is read (bidirectional overrides and isolates). Text a node or a workload wrote
# (a replica's message, an event's fields) is shown with these escaped, never acted on: a
# node key must not reach into the terminal of whoever runs `describe` or `watch`.
_UNSAFE = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def shown(text: str) -> str:
    """*text* with what a terminal would act on written as escapes (``\\x1b``)."""
    return _UNSAFE.sub(lambda m: repr(m[0])[1:-1], text)


def table(rows: Sequence[dict], columns: Sequence[Column], empty: str = "(none)") -> str:
    """Left-aligned columns separated by two spaces, header in capitals."""
    if not rows:
        return empty
    cells = [[header for header, _ in columns]]
    for row in rows:
        cells.append([_cell(get(row)) for _, get in columns])
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
             for line in cells]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.1f}"
    if isinstance(value, list | tuple):
        return ",".join(shown(str(v)) for v in value) or "-"
    return shown(str(value))


def _key(name: str) -> Callable[[dict], Any]:
    return lambda row: row.get(name)


REPLICA_COLUMNS: list[Column] = [
    ("APP", _key("app")),
    ("REPLICA", _key("replica")),
    ("NODE", _key("node")),
    ("PID", _key("pid")),
    ("PORT", _key("port")),
    ("GEN", _key("generation")),
    ("STATE", _key("state")),
    ("RESTARTS", _key("restarts")),
]


def why(row: dict) -> str | None:
    """A replica's REASON cell: why it ended and when it restarts, or for a replica that
    restarted, why the one before it in its slot ended; None when nothing ended."""
    reason = row.get("reason")
    after = row.get("next_restart")
    if row.get("state") in ("exited", "failed"):
        parts = [str(reason)] if reason else []
        if isinstance(after, int | float):
            parts.append(f"restarting in {after:.0f} s" if after >= 1 else "restarting now")
        return "; ".join(parts) or None
    return f"last: {reason}" if reason else None


REASON_COLUMN: Column = ("REASON", why)
SLOT_COLUMN: Column = ("SLOT", _key("slot"))


# Fields a replica row shows in its SLOT, RESTARTS and REASON columns.
WHY_KEYS = frozenset({"slot", "restarts", "reason", "exit_code", "signal", "next_restart"})


def _restarted(row: dict) -> bool:
    return bool(row.get("slot")) and row.get("slot") != row.get("replica")


NODE_COLUMNS: list[Column] = [
    ("NODE", _key("node")),
    ("ADDRESS", _key("address")),
    ("CPU%", _key("cpu_pct")),
    ("RAM FREE", lambda r: None if r.get("ram_free_mb") is None else f"{r['ram_free_mb']} MB"),
    ("PORTS", _key("ports")),
    ("REPLICAS", _key("replicas")),
    ("LAST SEEN", lambda r: None if r.get("last_seen_s") is None else f"{r['last_seen_s']:.1f}s"),
]


def _when(ts: Any) -> str | None:
    if not isinstance(ts, int | float):
        return None
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


HISTORY_COLUMNS: list[Column] = [
    ("GEN", _key("generation")),
    ("STATE", _key("state")),
    ("STARTED", lambda r: _when(r.get("started"))),
    ("FINISHED", lambda r: _when(r.get("finished"))),
    ("MANIFEST", lambda r: ((r.get("manifest_sha256") or "")[:12]
                            + (" (pruned)" if r.get("manifest_kept") is False else "")) or None),
]


def replica_columns(rows: Sequence[dict]) -> list[Column]:
    """The replicas table's columns: a SLOT column (after REPLICA) only when some replica
    was restarted, a REASON column only when some replica has one."""
    columns = list(REPLICA_COLUMNS)
    if any(_restarted(row) for row in rows):
        columns.insert(2, SLOT_COLUMN)
    if any(why(row) for row in rows):
        columns.append(REASON_COLUMN)
    return columns


def replicas(rows: Sequence[dict]) -> str:
    return table(rows, replica_columns(rows), empty="no replicas")


def nodes(rows: Sequence[dict]) -> str:
    return table(rows, NODE_COLUMNS, empty="no nodes connected")


def history(rows: Sequence[dict]) -> str:
    return table(rows, HISTORY_COLUMNS, empty="no history")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


# How `up` and `scale` tell what the replicas are doing, in this order.
_DOING = (("ready", ("ready",)), ("starting", ("pending", "running")),
          ("draining", ("draining",)), ("stopping", ("stopping",)), ("exited", ("exited",)),
          ("failed", ("failed",)))


def doing(rows: Sequence[dict]) -> str:
    """``2 ready, 1 starting, 3 draining``: the replicas' states, counted."""
    states = [row.get("state") for row in rows]
    parts = [f"{n} {label}" for label, group in _DOING
             if (n := sum(state in group for state in states))]
    return ", ".join(parts)


def up(result: dict) -> str:
    """``up``: ``web: generation 1, 3 replicas, 3 starting``; ``scale`` (its result has
    ``previous``): ``web: 5 -> 2 replicas, 2 ready, 3 draining``."""
    rows = result.get("replicas", [])
    desired = result.get("desired", len(rows))  # a conductor before #17 sends no `desired`
    if "previous" in result:
        head = f"{result['app']}: {result['previous']} -> {_plural(desired, 'replica')}"
    else:
        head = f"{result['app']}: generation {result['generation']}, {_plural(desired, 'replica')}"
    now = doing(rows)
    return (f"{head}, {now}" if now else head) + "\n" + replicas(rows)


def rollout_status(result: dict) -> str:
    line = (f"{result['app']}: {result['state']} "
            f"generation {result['from_generation']} -> {result['to_generation']}, "
            f"{result['replaced']}/{result['total']} replaced")
    if result["state"] == "rolling" and result.get("paused"):
        line += " · paused"
    live = analysis_line(result) if result["state"] == "rolling" else None
    if live:
        line += f" · {live}"
    if result.get("message"):
        line += f" · {shown(str(result['message']))}"
    return line


def analysis_line(result: dict) -> str | None:
    """A rollout's batch judged on its traffic (DESIGN.md §11), e.g. ``analysis 12s/30s:
    240 requests, error rate 0.4%, p99 38ms (old gen 3: 0.0%, p99 35ms)``; None
    without one. Figures a conductor sent are shown only if they are numbers."""
    from skr8tr.core.traffic import format_ms, format_rate

    def figures(row: dict) -> str:
        rate, p99 = row.get("error_rate"), row.get("p99_ms")
        parts = [f"error rate {format_rate(rate)}"] if _number(rate) else []
        if _number(p99):
            parts.append(f"p99 {format_ms(p99)}")
        return ", ".join(parts)

    a = result.get("analysis")
    if not isinstance(a, dict) or not _number(a.get("elapsed_s")):
        return None
    if a.get("verdict") == "watching" and _number(a.get("window_s")):
        head = f"analysis {a['elapsed_s']:.0f}s/{a['window_s']:.0f}s"
    else:
        head = f"analysis {shown(str(a.get('verdict')))} after {a['elapsed_s']:.0f}s"
    requests = a.get("requests")
    line = f"{head}: {requests if _number(requests) else '?'} requests"
    if figures(a):
        line += f", {figures(a)}"
    old = next((row for row in result.get("traffic") or ()
                if isinstance(row, dict) and row.get("generation") == result["from_generation"]
                and _number(row.get("requests")) and row["requests"]), None)
    if old is not None:
        line += f" (old gen {result['from_generation']}: {figures(old).replace('error rate ', '')})"
    return line


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def generic_rows(rows: Sequence[dict], empty: str = "(none)") -> str:
    """A table whose columns are the keys of the first row (results without a table of
    their own)."""
    if not rows:
        return empty
    columns = [(key.upper().replace("_", " "), _key(key)) for key in rows[0]]
    return table(rows, columns, empty=empty)


def conductors(rows: Sequence[dict], now: float | None = None) -> str:
    """The conductors sharing one etcd, leader first, with how long each has held its
    role."""
    now = time.time() if now is None else now
    ordered = sorted(rows, key=lambda r: (r.get("role") != "leader", str(r.get("url"))))
    return table(ordered, [
        ("URL", _key("url")), ("ROLE", _key("role")),
        ("FOR", lambda r: _duration(now - r["since"]) if isinstance(r.get("since"), int | float)
         else None),
        ("STATUS PAGE", _key("http")),
    ])


def _duration(s: float) -> str:
    s = max(0, int(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def status(result: dict) -> str:
    parts = []
    if len(result.get("conductors", [])) > 1:  # several conductors on etcd
        parts += ["CONDUCTORS", conductors(result["conductors"]), ""]
    parts += [
        "NODES", nodes(result.get("nodes", [])), "",
        "APPS", generic_rows(result.get("apps", []), empty="no apps"), "",
        "REPLICAS", replicas(result.get("replicas", [])), "",
        "ROLLOUTS",
        "\n".join(rollout_status(r) for r in result.get("rollouts", [])) or "no rollouts",
    ]
    if result.get("ingresses"):  # ingresses reporting traffic (/v1/ingress)
        parts += ["", "INGRESSES", ingresses(result["ingresses"])]
    return "\n".join(parts)


def ingresses(rows: Sequence[dict]) -> str:
    """The ingresses reporting traffic: name, address, key, reports, the last one's age."""
    return table(rows, [
        ("INGRESS", _key("ingress")), ("ADDRESS", _key("address")), ("KEY", _key("key")),
        ("REPORTS", _key("reports")),
        ("LAST REPORT", lambda r: None if not isinstance(r.get("last_report_s"), int | float)
         else f"{r['last_report_s']:.1f}s ago"),
    ])


def log_line(line: dict) -> str:
    ts = line.get("ts")
    stamp = time.strftime("%H:%M:%S", time.localtime(ts)) if isinstance(ts, int | float) else "-"
    return f"{stamp} {line.get('replica', '-')} {line.get('stream', '-')}: {line.get('text', '')}"


def event_line(seq: int, ts: float, event: str, data: dict) -> str:
    stamp = time.strftime("%H:%M:%S", time.localtime(ts)) + f".{int(ts * 1000) % 1000:03d}"
    fields = " ".join(f"{k}={_cell(v)}" for k, v in data.items())
    return f"{stamp} #{seq} {event} {fields}".rstrip()


def revision(result: dict) -> str:
    """``rollout history APP --generation N``: the revision's facts, then its manifest."""
    head = [
        f"App:         {result.get('app')}",
        f"Generation:  {result.get('generation')}"
        + (" (current)" if result.get("current") else ""),
        f"State:       {_cell(result.get('state'))}",
        f"Started:     {_cell(_when(result.get('started')))}",
        f"Finished:    {_cell(_when(result.get('finished')))}",
        f"Manifest:    sha256 {result.get('manifest_sha256')} ({result.get('format')}, "
        f"base dir {result.get('base_dir')})",
        "",
    ]
    text = str(result.get("manifest", ""))
    return "\n".join(head) + "\n" + text.rstrip("\n")


# Fields a replica row may carry beyond those of `list` (reason, exit code, restarts,
# ...): `describe` shows a column for each one that some row has, in this order first.
_EXTRA_REPLICA_ORDER = ("restarts", "exit_code", "next_restart", "reason")


def _replica_columns(rows: Sequence[dict]) -> list[Column]:
    known = ({header.lower() for header, _ in REPLICA_COLUMNS} | {"generation", "app"}
             | WHY_KEYS)
    extra: list[str] = []
    for row in rows:
        for key in row:
            if key not in known and key not in extra and key != "gen":
                extra.append(key)
    extra.sort(key=lambda k: (_EXTRA_REPLICA_ORDER.index(k) if k in _EXTRA_REPLICA_ORDER
                              else len(_EXTRA_REPLICA_ORDER), k))
    columns = [c for c in replica_columns(rows) if c[0] != "APP"]
    return columns + [(k.upper().replace("_", " "), _key(k)) for k in extra]


def describe(result: dict) -> str:
    """``describe APP``, read top to bottom like ``kubectl describe``."""
    counts = result.get("counts") or {}
    lines = [
        f"Name:        {result.get('app')}",
        f"Type:        {result.get('type')}",
        f"Generation:  {result.get('generation')}",
        f"Replicas:    {result.get('desired')} desired"
        + "".join(f", {counts[k]} {k}" for k in ("running", "ready") if k in counts)
        + "".join(f", {counts[k]} {k}" for k in ("starting", "draining", "stopping")
                  if counts.get(k)),
    ]
    if counts.get("message"):
        lines.append(f"Placement:   {shown(str(counts['message']))}")
    lines.append(f"Manifest:    sha256 {result.get('manifest_sha256')} "
                 f"({result.get('format')}, base dir {result.get('base_dir')})")
    rollout = result.get("rollout")
    lines.append(f"Rollout:     {rollout_status(rollout) if rollout else 'none yet'}")
    rows = result.get("replicas") or []
    lines += ["", "Replicas:", _indent(table(rows, _replica_columns(rows), empty="none"))]
    lines += ["", "Rollouts:", _indent(history(result.get("history") or []))]
    events = result.get("events") or []
    lines += ["", "Events:"]
    if events:
        lines += [_indent(event_line(e.get("seq", 0), e.get("ts", 0.0), e.get("event", "?"),
                                     {k: v for k, v in (e.get("data") or {}).items()
                                      if k != "app"}))
                  for e in events]
    else:
        lines.append("  none recent")
    lines += ["", "Manifest text:", _indent(str(result.get("manifest", "")).rstrip("\n"))]
    return "\n".join(lines)


def _indent(text: str) -> str:
    return "\n".join(("  " + line).rstrip() for line in text.split("\n"))
