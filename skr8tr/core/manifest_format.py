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
from skr8tr.core.manifest_model import RAM_UNITS, Manifest
from skr8tr.core.manifest_schema import default_restart
from skr8tr.core.manifest_syntax import opens_brace, scan_line

# shlex.quote's safe characters plus braces, so that `--port {port}` stays readable.
_SAFE_WORD = re.compile(r"[\w@%+=:,./{}-]+", re.ASCII)


def format_skr8tr(m: Manifest) -> str:
    """The normalised ``.skr8tr`` text of `m`: canonical key order, defaults left out."""
    fields = to_dict(m, full=False)
    lines = [f"app {fields.pop('app')}"]
    for key, value in fields.items():
        if isinstance(value, dict):  # env, health, rollout
            lines.append(f"  {key}")
            for sub_key, sub_value in value.items():
                lines.append(f"    {sub_key} {_render(sub_value, literal=key == 'env')}")
        else:
            lines.append(f"  {key} {_render(value, literal=key in ('exec', 'workdir'))}")
    return "\n".join(lines) + "\n"


def format_toml(m: Manifest) -> str:
    """The TOML text of `m`, with the same keys and defaults left out as `format_skr8tr`."""
    return tomli_w.dumps(to_dict(m, full=False))


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
