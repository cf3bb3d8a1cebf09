"""Figures about this machine for ``hello`` and ``heartbeat`` (psutil)."""

from __future__ import annotations

import psutil

_MIB = 2**20


def prime_cpu() -> None:
    """Start psutil's CPU counter, so the first :func:`machine_figures` means something."""
    psutil.cpu_percent(interval=None)


def machine_figures() -> dict[str, float | int]:
    """``{cpu_pct, ram_free_mb, ram_total_mb, cores}``: CPU use since the last call."""
    cpu = psutil.cpu_percent(interval=None)
    vm = psutil.virtual_memory()
    return {
        "cpu_pct": min(100.0, max(0.0, float(cpu))),
        "ram_free_mb": int(vm.available // _MIB),
        "ram_total_mb": int(vm.total // _MIB),
        "cores": psutil.cpu_count() or 1,
    }
