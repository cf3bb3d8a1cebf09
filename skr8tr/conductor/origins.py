"""Which ``Host`` and ``Origin`` headers the conductor answers (DNS rebinding, foreign pages).

**Host** (every HTTP request and every WebSocket handshake): a web page can
make a browser send requests to the conductor under the page's own *name*, by
pointing that name at the conductor's address (DNS rebinding); the ``Host``
header then carries the page's name. So a ``Host`` is accepted when it is an
IP literal (rebinding needs a name), ``localhost``, or a name given with
``--allowed-host``; its port is not looked at (a reverse proxy may change it).
A request without ``Host`` (HTTP/1.0, scripts) is accepted. Anything else is
answered 421 with one line saying which flag would allow it.

**Origin** (WebSocket handshakes): browsers let any page open a WebSocket to
any address and send the page's origin along. A handshake with an ``Origin``
is accepted only from the conductor's own status page, or from an origin given
with ``--allowed-origin``. The status page's origin is
``SCHEME://HOST:PORT`` of the HTTP listener: ``https`` with TLS, else ``http``;
the port it is bound to; a host that is ``localhost``, a ``--allowed-host``
name, or an IP address of this conductor: loopback, the address the HTTP
listener is bound to, or, when it listens on every address, the address the
WebSocket connection came in on. (Any IP literal will not do here: a page
served from someone else's address is exactly what this check keeps out.)
Behind a reverse proxy or a port mapping the browser sees another origin:
give it with ``--allowed-origin``. No ``Origin`` (the CLI, node agents, the
ingress) is accepted; ``Origin: null`` is not. Refusals are 403.

Pure: no trio, no sockets.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

__all__ = ["HostPolicy", "OriginError", "normalize_origin", "split_authority"]

WILDCARD_HOSTS = ("", "0.0.0.0", "::")
DEFAULT_PORTS = {"http": 80, "https": 443}
SHOWN_CHARS = 80


class OriginError(ValueError):
    """A ``--allowed-origin`` or ``--allowed-host`` value that is not one."""


def split_authority(text: str) -> tuple[str, int | None] | None:
    """``host[:port]`` as (lowercase host without brackets or a final dot, port or None);
    None when it is not one (an IPv6 literal must be in brackets)."""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            return None
        host, rest = text[1:end], text[end + 1:]
        if rest and not rest.startswith(":"):
            return None
        port_text = rest[1:] if rest else None
        if _ip(host) is None:
            return None
    else:
        host, sep, port_text = text.partition(":")
        if not sep:
            port_text = None
        if ":" in (port_text or ""):
            return None
    port = None
    if port_text is not None:
        if not port_text.isdigit() or not port_text.isascii() or int(port_text) > 65535:
            return None
        port = int(port_text)
    host = host.lower()
    if host.endswith(".") and not host.endswith(".."):
        host = host[:-1]
    if not host or any(c.isspace() or c in "/?#@\\" for c in host):
        return None
    return host, port


def normalize_origin(text: str) -> str | None:
    """``scheme://host:port`` (lowercase, default port made explicit) of a browser's
    ``Origin`` or of a ``--allowed-origin`` URL; None when it is not such an origin."""
    scheme, sep, rest = text.strip().partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in DEFAULT_PORTS:
        return None
    if rest.endswith("/"):
        rest = rest[:-1]
    if not rest or "/" in rest:
        return None
    parts = split_authority(rest)
    if parts is None:
        return None
    host, port = parts
    return f"{scheme}://{_bracket(host)}:{port if port is not None else DEFAULT_PORTS[scheme]}"


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def _show(value: str) -> str:
    return value if len(value) <= SHOWN_CHARS else value[:SHOWN_CHARS] + "..."


@dataclass
class HostPolicy:
    """The checks of the module docstring. ``http_port`` and ``http_address`` are those
    of the bound HTTP listener (set once it is bound; until then no page origin passes).

    ``refused`` counts refusals by header (``host``, ``origin``) for ``/metrics``.
    """

    allowed_hosts: frozenset[str] = frozenset()
    allowed_origins: frozenset[str] = frozenset()
    tls: bool = False
    http_address: str = ""
    http_port: int = 0
    refused: dict[str, int] = field(default_factory=lambda: {"host": 0, "origin": 0})

    @classmethod
    def from_flags(cls, hosts: list[str] | tuple[str, ...], origins: list[str] | tuple[str, ...],
                   *, tls: bool = False) -> HostPolicy:
        """The policy for ``--allowed-host`` and ``--allowed-origin`` values. Raises
        OriginError naming the first value that is not a host name or an origin."""
        names = set()
        for text in hosts:
            parts = split_authority(text.strip())
            if parts is None or parts[1] is not None or _ip(parts[0]) is not None:
                raise OriginError(f"--allowed-host {text!r}: expected a host name such as "
                                  "status.example.com (no port; IP addresses are always "
                                  "allowed)")
            names.add(parts[0])
        allowed = set()
        for text in origins:
            origin = normalize_origin(text)
            if origin is None:
                raise OriginError(f"--allowed-origin {text!r}: expected SCHEME://HOST[:PORT] "
                                  "as a browser sends it, e.g. https://status.example.com")
            allowed.add(origin)
        return cls(frozenset(names), frozenset(allowed), tls=tls)

    def host_allowed(self, host: str) -> bool:
        """An IP literal, ``localhost`` or a ``--allowed-host`` name (lowercase)."""
        return host == "localhost" or host in self.allowed_hosts or _ip(host) is not None

    def check_host(self, value: bytes | None) -> str | None:
        """None when a request with ``Host: value`` is answered, else why not (one line)."""
        if value is None:
            return None
        text = value.decode("latin-1").strip()
        parts = split_authority(text)
        if parts is not None and self.host_allowed(parts[0]):
            return None
        self.refused["host"] += 1
        shown = _show(parts[0] if parts is not None else text)
        hint = (f"; start the conductor with --allowed-host {shown} to serve that name"
                if parts is not None else "")
        return (f"Host {shown!r} is not served here: use an IP address or localhost"
                f"{hint}")

    def check_origin(self, value: bytes | None, local_address: str = "") -> str | None:
        """None when a WebSocket handshake with ``Origin: value`` is accepted, else why not
        (one line). *local_address* is the address the connection came in on."""
        if value is None:
            return None
        text = value.decode("latin-1").strip()
        origin = normalize_origin(text)
        if origin is not None and (origin in self.allowed_origins or self._own(origin,
                                                                                local_address)):
            return None
        self.refused["origin"] += 1
        return (f"Origin {_show(text)!r} is not this conductor's status page; start the "
                "conductor with --allowed-origin URL to let that page watch")

    def _own(self, origin: str, local_address: str) -> bool:
        scheme, _, rest = origin.partition("://")
        host, port = split_authority(rest) or ("", None)
        if scheme != ("https" if self.tls else "http") or port != self.http_port or not port:
            return False
        if host == "localhost" or host in self.allowed_hosts:
            return True
        addr = _ip(host)
        if addr is None:
            return False
        if addr.is_loopback:
            return True
        bound = self.http_address
        if bound in WILDCARD_HOSTS:
            return addr == _ip(local_address)
        return addr == _ip(bound)
