"""A network namespace joined to the host by a veth pair, for partition tests.

``Partitionable()`` creates namespace ``skr8tr-PID-N`` and a veth pair: the host
end gets ``HOST_IP/30`` and the namespace end ``NS_IP/30`` (and the namespace's
loopback is brought up). A process started with ``wrap(argv)`` runs inside it
and reaches the host (etcd, nodes) at ``host_ip``; the host reaches it at
``ns_ip``. ``cut()`` sets the host end down (every packet between them is lost,
without a reset: a partition, not a crash); ``heal()`` brings it back.
``close()`` removes the namespace and with it the pair. Needs root (CAP_NET_ADMIN).
"""

from __future__ import annotations

import itertools
import os
import subprocess

_numbers = itertools.count()


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=10)


def available() -> str | None:
    """None when namespaces and veth pairs can be made here; else why not."""
    probe = Partitionable.__new__(Partitionable)
    try:
        probe.__init__()  # type: ignore[misc]
    except (OSError, subprocess.CalledProcessError) as exc:
        stderr = getattr(exc, "stderr", "") or ""
        return f"{exc} {stderr}".strip()
    probe.close()
    return None


class Partitionable:
    def __init__(self) -> None:
        n = next(_numbers)
        self.name = f"skr8tr-{os.getpid()}-{n}"
        third = (os.getpid() * 7 + n) % 250 + 1
        self.host_ip, self.ns_ip = f"10.213.{third}.1", f"10.213.{third}.2"
        self.host_end = f"sk{os.getpid() % 100000}h{n}"
        ns_end = f"sk{os.getpid() % 100000}n{n}"
        _ip("netns", "add", self.name)
        try:
            _ip("link", "add", self.host_end, "type", "veth", "peer", "name", ns_end)
            _ip("link", "set", ns_end, "netns", self.name)
            _ip("addr", "add", f"{self.host_ip}/30", "dev", self.host_end)
            _ip("link", "set", self.host_end, "up")
            _ip("-n", self.name, "addr", "add", f"{self.ns_ip}/30", "dev", ns_end)
            _ip("-n", self.name, "link", "set", ns_end, "up")
            _ip("-n", self.name, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise

    def wrap(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def cut(self) -> None:
        _ip("link", "set", self.host_end, "down")

    def heal(self) -> None:
        _ip("link", "set", self.host_end, "up")

    def close(self) -> None:
        subprocess.run(["ip", "link", "del", self.host_end], capture_output=True, timeout=10)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=10)
