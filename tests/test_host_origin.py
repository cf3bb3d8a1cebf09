"""Host and Origin: DNS rebinding and foreign pages are refused (issue #13, part 4).

A real conductor runs in this test's trio run with ``--allowed-host
status.example`` and ``--allowed-origin https://proxy.example``; requests are
written by hand so that every header is the one under test. The status page's
own origin is exercised by a real browser in ``test_status_page.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from skr8tr.conductor.origins import HostPolicy, OriginError, normalize_origin
from tests.conftest import read_until_closed
from tests.security_helpers import open_conductor, ping, scrape

DEADLINE_S = 30
ALLOWED = {"allowed_hosts": ("status.example",), "allowed_origins": ("https://proxy.example",)}


# ---------------------------------------------------------------------- the pure rules


@pytest.mark.parametrize("host, ok", [
    (None, True),  # HTTP/1.0, scripts: no browser
    (b"127.0.0.1", True), (b"127.0.0.1:7780", True), (b"10.1.2.3:80", True),
    (b"[::1]:7780", True), (b"[fe80::1]", True), (b"localhost", True),
    (b"LOCALHOST:7780", True), (b"localhost.:7780", True), (b"status.example", True),
    (b"Status.Example:8443", True),
    (b"evil.example", False), (b"evil.example:7780", False), (b"localhost.evil.example", False),
    (b"127.0.0.1.nip.io", False), (b"::1", False), (b"", False), (b"x, 127.0.0.1", False),
    (b"127.0.0.1:99999", False), (b"a b", False), (b"[::1", False),
])
def test_host_rule(host, ok):
    policy = HostPolicy.from_flags(["status.example"], [])
    why = policy.check_host(host)
    assert (why is None) is ok, why
    if not ok:
        assert "\n" not in why and "IP address or localhost" in why


@pytest.mark.parametrize("origin, ok", [
    (None, True),  # the CLI, node agents, the ingress
    (b"http://127.0.0.1:7780", True), (b"http://localhost:7780", True),
    (b"http://[::1]:7780", True), (b"http://status.example:7780", True),
    (b"https://proxy.example", True), (b"https://proxy.example:443", True),
    (b"HTTPS://Proxy.Example/", True),
    (b"http://10.0.0.5:7780", True),  # the address the HTTP listener is bound to
    (b"http://evil.example", False), (b"http://evil.example:7780", False),
    (b"http://203.0.113.5:7780", False),  # someone else's address, our port
    (b"http://127.0.0.1:7781", False), (b"https://127.0.0.1:7780", False),
    (b"http://proxy.example", False), (b"null", False), (b"", False),
    (b"http://127.0.0.1:7780/page", False), (b"file://", False),
])
def test_origin_rule(origin, ok):
    policy = HostPolicy.from_flags(["status.example"], ["https://proxy.example"])
    policy.http_address, policy.http_port = "10.0.0.5", 7780
    why = policy.check_origin(origin, local_address="10.0.0.5")
    assert (why is None) is ok, why


def test_origin_on_a_wildcard_listener_is_the_address_the_connection_came_in_on():
    policy = HostPolicy.from_flags([], [])
    policy.http_address, policy.http_port = "0.0.0.0", 7780
    assert policy.check_origin(b"http://192.168.1.10:7780", "192.168.1.10") is None
    assert policy.check_origin(b"http://192.168.1.10:7780", "::ffff:192.168.1.10") is None
    assert policy.check_origin(b"http://192.168.1.11:7780", "192.168.1.10") is not None


@pytest.mark.parametrize("text, origin", [
    ("https://a.example", "https://a.example:443"), ("http://A.example:8080/", "http://a.example:8080"),
    ("http://[::1]:80", "http://[::1]:80"), ("ftp://a.example", None), ("a.example", None),
    ("https://a.example/x", None), ("https://", None), ("https://a.example:x", None),
])
def test_origins_are_normalized(text, origin):
    assert normalize_origin(text) == origin


@pytest.mark.parametrize("hosts, origins", [
    (["status.example:80"], []), (["10.0.0.1"], []), (["a/b"], []),
    ([], ["status.example"]), ([], ["https://status.example/path"]),
])
def test_bad_flags_are_refused(hosts, origins):
    with pytest.raises(OriginError, match="--allowed-"):
        HostPolicy.from_flags(hosts, origins)


# ---------------------------------------------------------------------- a real conductor


async def exchange(port: int, request: bytes) -> tuple[int, bytes]:
    """Send *request*; the status of the answer and its bytes (read until closed, or
    for a 101 just its head)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = await stream.receive_some(65536)
            if not chunk:
                break
            data += chunk
        if not data.startswith(b"HTTP/1.1 101 "):
            data += await read_until_closed(stream)
    return int(data[9:12]), data


def upgrade(port: int, path: str, *, host: str | None = None, origin: str | None = None
            ) -> bytes:
    lines = [f"GET {path} HTTP/1.1", f"Host: {host or f'127.0.0.1:{port}'}",
             "Upgrade: websocket", "Connection: Upgrade",
             "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version: 13"]
    if origin is not None:
        lines.append(f"Origin: {origin}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def get(path: str, host: str | None) -> bytes:
    head = [f"GET {path} HTTP/1.1" if host is not None else f"GET {path} HTTP/1.0"]
    if host is not None:
        head.append(f"Host: {host}")
    return ("\r\n".join([*head, "Connection: close"]) + "\r\n\r\n").encode()


async def test_foreign_origins_cannot_open_a_websocket(tmp_path: Path):
    with trio.fail_after(DEADLINE_S):
        async with open_conductor(tmp_path, **ALLOWED) as c:
            own = f"http://127.0.0.1:{c.http_port}"
            cases = [
                ("/v1/watch", "http://evil.example", 403),
                ("/v1/watch", f"http://evil.example:{c.http_port}", 403),
                ("/v1/cli", "http://evil.example", 403),
                ("/v1/node", "null", 403),
                ("/v1/watch", f"http://127.0.0.1:{c.ws_port}", 403),  # not the page's port
                ("/v1/watch", own, 101),  # the status page served by this conductor
                ("/v1/watch", f"http://localhost:{c.http_port}", 101),
                ("/v1/watch", f"http://status.example:{c.http_port}", 101),
                ("/v1/watch", "https://proxy.example", 101),
                ("/v1/watch", None, 101),  # skr8tr watch, the ingress
            ]
            for path, origin, expected in cases:
                status, answer = await exchange(c.ws_port, upgrade(c.ws_port, path,
                                                                   origin=origin))
                assert status == expected, (path, origin, answer)
                if expected == 403:
                    assert b"is not this conductor's status page" in answer
            assert (await ping(c.url))["ok"]  # no Origin: the CLI as ever
            samples = await scrape(c.http_port)
            assert samples[("skr8tr_foreign_requests_total", (("header", "origin"),))] == 5


async def test_a_foreign_host_is_misdirected(tmp_path: Path):
    with trio.fail_after(DEADLINE_S):
        async with open_conductor(tmp_path, **ALLOWED) as c:
            port = c.http_port
            for path in ("/", "/api/state", "/api/events", "/metrics", "/healthz",
                         "/static/app.js"):
                status, answer = await exchange(port, get(path, "evil.example"))
                assert status == 421, (path, answer)
                assert answer.endswith(b"Host 'evil.example' is not served here: use an IP "
                                       b"address or localhost; start the conductor with "
                                       b"--allowed-host evil.example to serve that name\n")
                for host in (f"127.0.0.1:{port}", f"localhost:{port}", "status.example",
                             f"[::1]:{port}", None):
                    status, answer = await exchange(port, get(path, host))
                    assert status == 200, (path, host, answer)
            # The WebSocket handshakes check it for browsers (they send Origin); the CLI,
            # node agents and the ingress send none and may use any name for the host.
            for path in ("/v1/watch", "/v1/cli", "/v1/node"):
                status, answer = await exchange(c.ws_port, upgrade(
                    c.ws_port, path, host=f"evil.example:{c.ws_port}",
                    origin=f"http://evil.example:{c.http_port}"))
                assert status == 421 and b"--allowed-host evil.example" in answer, answer
                status, answer = await exchange(c.ws_port, upgrade(
                    c.ws_port, path, host=f"conductor.example:{c.ws_port}"))
                assert status == 101, answer
            status, _ = await exchange(c.ws_port, upgrade(c.ws_port, "/v1/cli",
                                                          host="status.example"))
            assert status == 101
            samples = await scrape(port)
            assert samples[("skr8tr_foreign_requests_total", (("header", "host"),))] == 9
