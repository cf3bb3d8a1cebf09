"""Writing a ``Manifest`` back out: normalised ``.skr8tr`` text, TOML, or a JSON-able dict.

Both text formats go through one sparse dict (:func:`to_dict`): canonical key
order, defaults left out, so ``.skr8tr`` and TOML output agree, and each reads
back to an equal ``Manifest``.

Internal to :mod:`skr8tr.core.manifest`, which re-exports the public
functions. Pure: no I/O.
"""

from __future__ import annotations

import re
import shlex
from decimal import Decimal
from typing import Any

import tomli_w

from skr8tr.core.durations import format_duration_ms
from skr8tr.core.manifest_comments import Comments
from skr8tr.core.manifest_model import RAM_UNITS, Analysis, Manifest
from skr8tr.core.manifest_schema import default_restart
from skr8tr.core.manifest_syntax import opens_brace, scan_line
from skr8tr.core.percent import format_percent

# shlex.quote's safe characters plus braces, so that `--port {port}` stays readable.
_SAFE_WORD = re.compile(r"[\w@%+=:,./{}-]+", re.ASCII)


def format_skr8tr(m: Manifest, comments: Comments | None = None) -> str:
    """The normalised ``.skr8tr`` text of `m`: canonical key order, defaults left out; with
    *comments* (from the source, :func:`read_comments`) each beside its key again."""
    fields = to_dict(m, full=False)
    placed = (comments or Comments()).placed(_paths(fields))
    lines: list[str] = []

    def write(path: tuple[str, ...], indent: str, text: str) -> None:
        lines.extend(indent + comment for comment in placed.before.get(path, []))
        trailing = placed.after.get(path)
        line = indent + text
        if trailing and scan_line(f"{line}  {trailing}")[0] != len(line) + 2:
            # a value with a quote left open (read as written) would take the comment in:
            # the comment goes on a line of its own above it
            lines.append(indent + trailing)
            trailing = None
        lines.append(f"{line}  {trailing}" if trailing else line)

    def write_block(path: tuple[str, ...], block: dict[str, Any]) -> None:
        indent = "  " * (len(path) + 1)
        for key, value in block.items():
            if isinstance(value, dict):  # env, health, rollout; rollout's analysis
                write((*path, key), indent, key)
                write_block((*path, key), value)
            else:
                literal = path == ("env",) or (not path and key in ("exec", "workdir"))
                write((*path, key), indent, f"{key} {_render(value, literal=literal)}")

    write(("app",), "", f"app {fields.pop('app')}")
    write_block((), fields)
    lines.extend(placed.end)
    return "\n".join(lines) + "\n"


def format_toml(m: Manifest, comments: Comments | None = None) -> str:
    """The TOML text of `m`, with the same keys and defaults left out as `format_skr8tr`,
    and its *comments* beside their keys. Without comments, exactly ``tomli_w``'s text of
    the same dict; with them, each key is written by tomli_w on its own and the comments
    put around it (tomli_w writes none)."""
    fields = to_dict(m, full=False)
    placed = (comments or Comments()).placed(_paths(fields))
    chunks: list[str] = []

    def write(path: tuple[str, ...], text: str) -> None:
        chunks.extend(comment + "\n" for comment in placed.before.get(path, []))
        trailing = placed.after.get(path)
        if trailing:
            first, sep, rest = text.partition("\n")
            text = f"{first}  {trailing}{sep}{rest}"
        chunks.append(text)

    def write_table(path: tuple[str, ...], table: dict[str, Any]) -> None:
        """The values of *table*, then its tables: ``[rollout]``, ``[rollout.analysis]``.
        Like tomli_w, a table that holds only tables gets no header of its own (unless a
        comment belongs to it)."""
        inner = {key: value for key, value in table.items() if isinstance(value, dict)}
        values = {key: value for key, value in table.items() if key not in inner}
        if path and (values or not inner or path in placed.before or path in placed.after):
            chunks.append("\n")
            write(path, f"[{'.'.join(path)}]\n")
        for key, value in values.items():
            write((*path, key), tomli_w.dumps({key: value}))
        for key, value in inner.items():
            write_table((*path, key), value)

    write_table((), fields)
    chunks.extend(comment + "\n" for comment in placed.end)
    return "".join(chunks)


def _paths(fields: dict[str, Any]) -> list[tuple[str, ...]]:
    """The keys the formatters write for *fields*, as comment paths."""
    paths: list[tuple[str, ...]] = []

    def add(path: tuple[str, ...], block: dict[str, Any]) -> None:
        for key, value in block.items():
            paths.append((*path, key))
            if isinstance(value, dict):
                add((*path, key), value)

    add((), fields)
    return paths


def manifest_to_dict(m: Manifest) -> dict[str, Any]:
    """Every key of `m` as the manifest language spells it (durations "8s", ram "512M", unset
    keys None), plus ``base_dir``; JSON-able."""
    fields = to_dict(m, full=True)
    fields["base_dir"] = m.base_dir
    return fields


# --- Formatting ---------------------------------------------------------------------------


def to_dict(m: Manifest, *, full: bool) -> dict[str, Any]:
    """Keys as the manifest language spells them, in canonical order; with full=False only
    those that differ from their default (the health block is always complete)."""
    health = m.health
    rollout = m.rollout
    fields: dict[str, Any] = {
        "app": m.app,
        "type": m.type,
        "exec": m.exec,
        "args": list(m.args),
        "workdir": m.workdir,
        "port": m.port,
        "replicas": m.replicas,
        "ram": None if m.ram_bytes is None else _format_ram(m.ram_bytes),
        "cpu": m.cpu,
        "stop-grace": format_duration_ms(m.stop_grace_ms),
        "restart": m.restart,
        "env": dict(m.env),
        "health": None
        if health is None
        else {
            "check": f"{health.method} {health.path} {health.expect_status}",
            "interval": format_duration_ms(health.interval_ms),
            "timeout": format_duration_ms(health.timeout_ms),
            "retries": health.retries,
        },
        "rollout": {
            "settle": format_duration_ms(rollout.settle_ms),
            "surge": rollout.surge,
            "ready-timeout": format_duration_ms(rollout.ready_timeout_ms),
            "drain": format_duration_ms(rollout.drain_ms),
            "auto-rollback": rollout.auto_rollback,
            "order": rollout.order,
            "analysis": _analysis_dict(rollout.analysis, full=full),
        },
    }
    if full:
        return fields
    # The same dict for a manifest with every default says what to leave out.
    defaults = to_dict(Manifest(m.app, m.exec, m.base_dir), full=True)
    defaults["restart"] = default_restart(m.type)
    fields["rollout"] = {
        key: value for key, value in fields["rollout"].items() if value != defaults["rollout"][key]
    }
    defaults["rollout"] = {}
    return {
        key: value
        for key, value in fields.items()
        if key in ("app", "exec") or value != defaults[key]
    }


def _analysis_dict(analysis: Analysis | None, *, full: bool) -> dict[str, Any] | None:
    """The analysis block, always whole (as health: the limits a batch is judged by are
    worth reading); ``max-p99`` None when not judged, left out with full=False."""
    if analysis is None:
        return None
    fields: dict[str, Any] = {
        "window": format_duration_ms(analysis.window_ms),
        "max-error-rate": format_percent(analysis.max_error_rate),
        "max-p99": None if analysis.max_p99_ms is None else format_duration_ms(
            analysis.max_p99_ms),
        "min-requests": analysis.min_requests,
    }
    if not full and fields["max-p99"] is None:
        del fields["max-p99"]
    return fields


def _format_ram(size: int) -> str:
    for unit, factor in RAM_UNITS.items():
        if size % factor == 0:
            return f"{size // factor}{unit}"
    raise AssertionError("unreachable: the B unit divides everything")


def _format_cpu(cpu: float) -> str:
    text = format(Decimal(repr(cpu)), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def _render(value: Any, *, literal: bool) -> str:
    """A value as .skr8tr text that reads back as the same value."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return _format_cpu(value)
    if isinstance(value, list):
        return " ".join(_quote_word(word) for word in value)
    if isinstance(value, str) and literal and _needs_quotes(value):
        return shlex.quote(value)
    return str(value)


def _quote_word(word: str) -> str:
    if word != "{" and _SAFE_WORD.fullmatch(word):
        return word
    return shlex.quote(word)


def _needs_quotes(value: str) -> bool:
    """Would `value`, written as is after a key, read back as something else?"""
    if not value or value[0] in "'\"" or value != value.strip(" \t"):
        return True
    line = "k " + value
    end, bare, _ = scan_line(line)
    return end != len(line) or opens_brace(line, bare)
