"""``HOST:PORT`` flags (``--listen``, ``--http``) as the daemons read them. Pure."""

from __future__ import annotations

__all__ = ["parse_hostport"]


def parse_hostport(text: str, flag: str, example: str = "127.0.0.1:7771") -> tuple[str, int]:
    """``(host, port)`` from ``HOST:PORT`` (``[::1]:PORT`` for IPv6; an empty host is
    127.0.0.1; port 0 asks the system for a free one). Raises ValueError naming *flag*."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{flag} {text!r}: expected HOST:PORT, e.g. {example}")
    return host.strip("[]") or "127.0.0.1", int(port)
