"""TLS: the conductor serves wss:// and https://; the CLI and node agents verify it."""

from __future__ import annotations

import logging
import os
import ssl
from functools import partial
from pathlib import Path

import h11
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from skr8tr import client, tls
from skr8tr.core.keys import secret_key_line
from skr8tr.node.agent import AgentConfig, AgentConfigError, run_agent, security
from tests.conftest import skr8tr_command
from tests.security_helpers import closed_count, open_conductor, ping

DEADLINE_S = 30



async def run_cli(*args: str, env: dict[str, str] | None = None) -> trio.Process:
    return await trio.run_process([*skr8tr_command(), *args], capture_stdout=True,
                                  capture_stderr=True, check=False, env=env)


async def test_cli_verifies_the_conductor_with_its_ca(tmp_path, pki, other_pki):
    with trio.fail_after(DEADLINE_S):
        async with open_conductor(tmp_path, tls_cert=str(pki.cert),
                                  tls_key=str(pki.key)) as c:
            assert c.url.startswith("wss://")
            good = await run_cli("ping", "--conductor", c.url, "--ca", str(pki.ca))
            assert good.returncode == 0, good.stderr
            assert b"pong from conductor" in good.stdout

            wrong = await run_cli("ping", "--conductor", c.url, "--ca", str(other_pki.ca))
            assert wrong.returncode == 3
            err = wrong.stderr.decode()
            assert err.startswith("error: UNREACHABLE:") and "certificate" in err, err
            assert "--ca" in err

            # Without --ca the system's trust store is used: our test CA is not in it.
            system = await run_cli("ping", "--conductor", c.url)
            assert system.returncode == 3 and b"certificate" in system.stderr

            # A --ca on a ws:// URL would protect nothing: refused as bad usage.
            plain = await run_cli("ping", "--conductor", f"ws://127.0.0.1:{c.ws_port}",
                                  "--ca", str(pki.ca))
            assert plain.returncode == 2 and b"wss://" in plain.stderr

            # The conductor still serves a verified client after all that.
            reply = await ping(c.url, tls.client_context(str(pki.ca)))
            assert reply["ok"] and reply["result"]["pong"] == "conductor"


async def test_client_library_and_plain_websocket_against_tls(tmp_path, pki, other_pki):
    with trio.fail_after(DEADLINE_S):
        async with open_conductor(tmp_path, tls_cert=str(pki.cert),
                                  tls_key=str(pki.key)) as c:
            opts = client.CallOptions(c.url, 5.0, None, ca_file=str(pki.ca))
            assert (await client.call(opts, "ping", {}))["pong"] == "conductor"
            for url in (c.url, c.url.replace("127.0.0.1", "localhost")):
                opts = client.CallOptions(url, 5.0, None, ca_file=str(pki.ca))
                assert (await client.call(opts, "nodes", {})) == []
            bad = client.CallOptions(c.url, 5.0, None, ca_file=str(other_pki.ca))
            with pytest.raises(client.ClientError) as refused:
                await client.call(bad, "ping", {})
            assert refused.value.exit == 3 and "certificate" in refused.value.message
            # Speaking plain ws:// to a TLS port gets nowhere (and breaks nothing).
            with pytest.raises(client.ClientError) as plain:
                await client.call(client.CallOptions(c.url.replace("wss", "ws"), 3.0, None),
                                  "ping", {})
            assert plain.value.exit == 3
            assert (await ping(c.url, tls.client_context(str(pki.ca))))["ok"]


async def https_get(port: int, path: str, ca: Path) -> tuple[int, bytes]:
    stream = await trio.open_ssl_over_tcp_stream("127.0.0.1", port,
                                                 ssl_context=tls.client_context(str(ca)),
                                                 https_compatible=True)
    async with stream:
        conn = h11.Connection(h11.CLIENT)
        await stream.send_all(conn.send(h11.Request(
            method="GET", target=path, headers=[("Host", "127.0.0.1"),
                                                ("Connection", "close")]))
            + conn.send(h11.EndOfMessage()))
        status, body = 0, b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                return status, body


async def test_status_page_over_https(tmp_path, pki, other_pki):
    with trio.fail_after(DEADLINE_S):
        async with open_conductor(tmp_path, tls_cert=str(pki.cert),
                                  tls_key=str(pki.key)) as c:
            assert await https_get(c.http_port, "/healthz", pki.ca) == (200, b"ok\n")
            status, body = await https_get(c.http_port, "/api/config", pki.ca)
            assert status == 200 and b'"ws_url": "wss://127.0.0.1:' in body
            with pytest.raises(trio.BrokenResourceError) as failed:
                await https_get(c.http_port, "/healthz", other_pki.ca)
            assert isinstance(failed.value.__cause__, ssl.SSLCertVerificationError)
            # Plain HTTP to the HTTPS port: the TLS handshake fails, the listener goes on.
            with trio.move_on_after(5):
                stream = await trio.open_tcp_stream("127.0.0.1", c.http_port)
                async with stream:
                    await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                    with pytest.raises(trio.BrokenResourceError):
                        while await stream.receive_some(1024):
                            pass  # read until the conductor cuts the connection
                        raise trio.BrokenResourceError  # closed cleanly: also no answer
            assert await https_get(c.http_port, "/healthz", pki.ca) == (200, b"ok\n")


def _agent_config(tmp_path: Path, url: str, key_file: Path, ca: Path | None,
                  node_id: str = "tls-node") -> AgentConfig:
    return AgentConfig(conductor_url=url, key_path=str(key_file), node_id=node_id,
                       data_dir=str(tmp_path / f"data-{node_id}"), advertise="127.0.0.1",
                       stop_workloads=True, ca_file=None if ca is None else str(ca))


def _write_key(tmp_path: Path, signing_key) -> Path:
    path = tmp_path / "node.sec"
    path.write_text(secret_key_line(signing_key))
    path.chmod(0o600)
    return path


async def _nodes(url: str, ca: Path) -> list[str]:
    opts = client.CallOptions(url, 5.0, None, ca_file=str(ca))
    return [n["node"] for n in await client.call(opts, "nodes", {})]


async def test_node_agent_joins_over_wss_only_with_the_right_ca(tmp_path, pki, other_pki,
                                                                caplog):
    caplog.set_level(logging.INFO)
    with trio.fail_after(DEADLINE_S):
        async with open_conductor(tmp_path, tls_cert=str(pki.cert),
                                  tls_key=str(pki.key)) as c:
            key_file = _write_key(tmp_path, c.node)
            async with trio.open_nursery() as nursery:
                await nursery.start(run_agent, _agent_config(tmp_path, c.url, key_file,
                                                             other_pki.ca, "impostor-ca"))
                await nursery.start(run_agent, _agent_config(tmp_path, c.url, key_file,
                                                             pki.ca, "tls-node"))
                while "tls-node" not in await _nodes(c.url, pki.ca):
                    await trio.sleep(0.05)
                while "does not verify" not in caplog.text:
                    await trio.sleep(0.05)
                assert await _nodes(c.url, pki.ca) == ["tls-node"]
                nursery.cancel_scope.cancel()
    assert "certificate does not verify" in caplog.text and "--ca FILE" in caplog.text


def test_agent_refuses_a_ca_with_plain_ws_and_a_missing_ca(tmp_path):
    config = _agent_config(tmp_path, "ws://127.0.0.1:1", tmp_path / "k", tmp_path / "ca.pem")
    with pytest.raises(AgentConfigError) as plain:
        security(config)
    assert plain.value.code == "BAD_CA" and "wss://" in plain.value.message
    config = _agent_config(tmp_path, "wss://127.0.0.1:1", tmp_path / "k", tmp_path / "ca.pem")
    with pytest.raises(AgentConfigError) as missing:
        security(config)
    assert missing.value.code == "BAD_CA" and "no such file" in missing.value.message


async def test_conductor_warns_without_tls_on_a_non_loopback_address(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    with trio.fail_after(DEADLINE_S):
        async with open_conductor(tmp_path, listen=("0.0.0.0", 0)) as c:
            assert (await ping(f"ws://127.0.0.1:{c.ws_port}"))["ok"]
    assert "NO TLS on --listen 0.0.0.0" in caplog.text
    assert "travel in clear" in caplog.text
    assert "NO TLS on --http" not in caplog.text  # that one is on loopback


async def test_no_warning_on_loopback_or_with_tls(tmp_path, pki, caplog):
    caplog.set_level(logging.WARNING)
    with trio.fail_after(DEADLINE_S):
        async with open_conductor(tmp_path):
            pass  # start and stop: the warning (or none) is logged at start
        async with open_conductor(tmp_path, listen=("0.0.0.0", 0), tls_cert=str(pki.cert),
                                  tls_key=str(pki.key)):
            pass  # start and stop, as above
    assert "NO TLS" not in caplog.text


@pytest.mark.parametrize("extra, message", [
    (["--tls-cert", "/nonexistent.pem"], "--tls-cert and --tls-key go together"),
    (["--tls-cert", "/nonexistent.pem", "--tls-key", "/nonexistent.key"],
     "--tls-cert /nonexistent.pem: no such file"),
])
def test_conductor_refuses_bad_tls_flags_with_one_line(extra, message):
    import subprocess

    proc = subprocess.run([*skr8tr_command(), "conductor", "--insecure", "--listen",
                           "127.0.0.1:0", "--http", "127.0.0.1:0", *extra],
                          capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: START: ") and message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_a_key_that_does_not_match_the_certificate_is_refused(tmp_path, pki, other_pki):
    with pytest.raises(tls.TlsError) as mismatch:
        tls.server_context(str(pki.cert), str(other_pki.key))
    assert "cannot use them" in str(mismatch.value)


async def test_wss_to_a_plain_conductor_fails_at_once_with_a_reason(tmp_path, pki):
    with trio.fail_after(DEADLINE_S):
        async with open_conductor(tmp_path) as c:
            opts = client.CallOptions(f"wss://127.0.0.1:{c.ws_port}", 20.0, None,
                                      ca_file=str(pki.ca))
            started = trio.current_time()
            with pytest.raises(client.ClientError) as failed:
                await client.call(opts, "ping", {})
            assert failed.value.exit == 3 and "TLS" in failed.value.message
            assert trio.current_time() - started < 10, "not a wait for the connect timeout"
            assert (await ping(c.url))["ok"]


async def test_ingress_follows_a_wss_conductor_only_with_the_right_ca(tmp_path, pki,
                                                                      other_pki, caplog):
    from skr8tr.ingress.daemon import IngressConfig, run_ingress
    from skr8tr.ingress.routes import parse_route

    caplog.set_level(logging.INFO)
    with trio.fail_after(DEADLINE_S):
        async with open_conductor(tmp_path, tls_cert=str(pki.cert),
                                  tls_key=str(pki.key)) as c, trio.open_nursery() as nursery:
            good, bad = trio.Event(), trio.Event()
            for ca, synced in ((pki.ca, good), (other_pki.ca, bad)):
                config = IngressConfig(listen=("127.0.0.1", 0),
                                       routes=(parse_route("/:web"),),
                                       conductor_url=c.url, ca_file=str(ca))
                nursery.start_soon(partial(run_ingress, config, synced=synced))
            await good.wait()
            while "certificate does not verify" not in caplog.text:
                await trio.sleep(0.05)
            assert not bad.is_set()
            nursery.cancel_scope.cancel()


def test_real_daemons_over_tls(tmp_path, pki):
    """Separate OS processes: a conductor with the security flags, a node agent and the CLI
    over wss://, the audit log checked by `skr8tr audit verify`."""
    import subprocess

    from tests.conftest import free_port
    from tests.e2e import Daemon, poll

    env = {k: v for k, v in os.environ.items() if not k.startswith("SKR8TR_")}
    env["HOME"] = str(tmp_path / "home")

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*skr8tr_command(), *args], env=env, capture_output=True,
                              text=True, timeout=30, stdin=subprocess.DEVNULL)

    for who in ("admin", "node"):
        assert cli("keygen", "--out", str(tmp_path / who)).returncode == 0
    pub = {who: (tmp_path / who / "signing.pub").read_text().strip() for who in ("admin",
                                                                                 "node")}
    authorized = tmp_path / "authorized_keys"
    authorized.write_text(f"admin {pub['admin']}\nnode {pub['node']}\n")
    ws_port, http_port = free_port(), free_port()
    url = f"wss://localhost:{ws_port}"
    daemons = []

    def spawn(name: str, *args: str) -> Daemon:
        log = tmp_path / f"{name}.log"
        with open(log, "ab") as f:
            proc = subprocess.Popen([*skr8tr_command(), *args], env=env, stdout=f,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        daemons.append(Daemon(name, proc, log))
        return daemons[-1]

    try:
        conductor = spawn(
            "conductor", "conductor", "--listen", f"127.0.0.1:{ws_port}", "--http",
            f"127.0.0.1:{http_port}", "--authorized-keys", str(authorized), "--tls-cert",
            str(pki.cert), "--tls-key", str(pki.key), "--audit-log",
            str(tmp_path / "audit.jsonl"), "--max-connections-per-address", "64",
            "--max-messages-per-s", "500", "--message-burst", "1000",
            "--handshake-timeout", "5", "--idle-timeout", "60")
        ca = ("--ca", str(pki.ca), "--conductor", url)
        poll(lambda: cli("ping", *ca).returncode == 0 or conductor.proc.poll() is not None,
             what="the conductor to answer over wss")
        assert conductor.proc.poll() is None, conductor.log()
        spawn("n1", "node", "--conductor", url, "--ca", str(pki.ca), "--key",
              str(tmp_path / "node" / "signing.sec"), "--node-id", "n1", "--data-dir",
              str(tmp_path / "n1"), "--stop-workloads")
        poll(lambda: '"node": "n1"' in cli("nodes", "--json", *ca).stdout,
             what="the node to join over wss")
        down = cli("down", "nothing", *ca, "--key", str(tmp_path / "admin" / "signing.sec"))
        assert down.returncode == 1 and "NOT_FOUND" in down.stderr
        verify = cli("audit", "verify", str(tmp_path / "audit.jsonl"))
        assert verify.returncode == 0 and "intact, 1 entries" in verify.stdout
        assert "API wss://127.0.0.1" in conductor.log() and "NO TLS" not in conductor.log()
        # The node agent and the CLI each opened one connection: no handshake failed.
        assert "did not send a WebSocket upgrade" not in conductor.log()
    finally:
        for daemon in reversed(daemons):
            daemon.stop()


def _samples(body: bytes) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body.decode())
            for s in family.samples}


async def test_node_agent_and_trio_client_open_no_throwaway_tls_connection(tmp_path, pki,
                                                                          caplog):
    """Issue #13, item 11: no TLS handshake of its own before the real connection, so
    the conductor counts no bad_handshake and logs no handshake failure."""
    caplog.set_level(logging.INFO)
    with trio.fail_after(DEADLINE_S):
        async with open_conductor(tmp_path, tls_cert=str(pki.cert),
                                  tls_key=str(pki.key)) as c:
            key_file = _write_key(tmp_path, c.node)
            async with trio.open_nursery() as nursery:
                await nursery.start(run_agent, _agent_config(tmp_path, c.url, key_file,
                                                             pki.ca))
                while "tls-node" not in await _nodes(c.url, pki.ca):  # the trio client
                    await trio.sleep(0.05)
                async with client.open_watch(client.CallOptions(c.url, 5.0, None,
                                                                ca_file=str(pki.ca))) as watch:
                    async for _ in watch:
                        break  # the first snapshot: connected
                status, body = await https_get(c.http_port, "/metrics", pki.ca)
                nursery.cancel_scope.cancel()
    assert status == 200
    samples = _samples(body)
    for reason in ("bad_handshake", "handshake_timeout"):
        assert closed_count(samples, reason) == 0, reason
    assert "closed a connection from" not in caplog.text
    assert "did not send a WebSocket upgrade" not in caplog.text


async def test_a_name_the_certificate_does_not_list_is_named(tmp_path, pki, caplog):
    caplog.set_level(logging.INFO)
    with trio.fail_after(DEADLINE_S):
        async with open_conductor(tmp_path, listen=("0.0.0.0", 0), tls_cert=str(pki.cert),
                                  tls_key=str(pki.key)) as c:
            # The certificate lists 127.0.0.1, ::1 and localhost; 127.0.0.2 is the same
            # listener under an address it does not list.
            url = f"wss://127.0.0.2:{c.ws_port}"
            with pytest.raises(client.ClientError) as mismatch:
                await client.call(client.CallOptions(url, 5.0, None, ca_file=str(pki.ca)),
                                  "ping", {})
            assert mismatch.value.exit == 3
            assert "IP address mismatch" in mismatch.value.message
            assert "that the certificate lists" in mismatch.value.message
            cli = await run_cli("ping", "--conductor", url, "--ca", str(pki.ca))
            assert cli.returncode == 3 and b"that the certificate lists" in cli.stderr
            key_file = _write_key(tmp_path, c.node)
            async with trio.open_nursery() as nursery:
                await nursery.start(run_agent, _agent_config(tmp_path, url, key_file, pki.ca))
                while "that the certificate lists" not in caplog.text:
                    await trio.sleep(0.05)
                nursery.cancel_scope.cancel()
    assert "IP address mismatch" in caplog.text
