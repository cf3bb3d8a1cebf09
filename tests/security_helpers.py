"""Helpers for the security tests: throwaway TLS certificates, an in-process conductor."""

from __future__ import annotations

import datetime
import ipaddress
import json
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import h11
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from prometheus_client.parser import text_string_to_metric_families

from skr8tr.conductor.daemon import ConductorConfig, run_conductor
from skr8tr.conductor.limits import Limits
from skr8tr.core import keys
from skr8tr.ws import trio_client
from tests.wire_helpers import encode_request


@dataclass(frozen=True)
class Pki:
    ca: Path  # the CA certificate (PEM): what clients pass as --ca
    cert: Path  # the server certificate for 127.0.0.1 and localhost (PEM)
    key: Path  # its private key (PEM)


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def make_pki(folder: Path, label: str = "skr8tr test") -> Pki:
    """A fresh CA and a server certificate it signed for 127.0.0.1, ::1 and localhost."""
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder().subject_name(_name(f"{label} CA"))
        .issuer_name(_name(f"{label} CA")).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder().subject_name(_name("skr8tr conductor"))
        .issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.IPAddress(ipaddress.ip_address("::1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pki = Pki(folder / "ca.pem", folder / "server.pem", folder / "server.key")
    pki.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    pki.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pki.key.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    pki.key.chmod(0o600)
    return pki


@dataclass
class Conductor:
    """An in-process conductor (``run_conductor``) and the keys it trusts."""

    ws_port: int
    http_port: int
    admin: object  # core.signatures.Signer
    node: object
    authorized: Path
    scheme: str = "ws"

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.ws_port}"


@asynccontextmanager
async def open_conductor(tmp_path: Path, **config):
    """Run a conductor on free loopback ports inside this test's trio run."""
    admin, admin_pub = keys.generate_keypair()
    node, node_pub = keys.generate_keypair()
    authorized = tmp_path / "authorized_keys"
    authorized.write_text(f"admin {admin_pub} test admin\nnode {node_pub} test node\n")
    config = {"listen": ("127.0.0.1", 0), "http": ("127.0.0.1", 0), **config}
    cfg = ConductorConfig(authorized_keys=str(authorized), **config)
    async with trio.open_nursery() as nursery:
        ws_port, http_port = await nursery.start(run_conductor, cfg)
        yield Conductor(ws_port, http_port, admin, node, authorized,
                        "wss" if cfg.tls_cert else "ws")
        nursery.cancel_scope.cancel()


def ping_text(rid: str = "p") -> str:
    return encode_request(id=rid, cmd="ping", args={})


async def ping(url: str, ssl_context=None) -> dict:
    """One ping over a fresh /v1/cli connection; the reply."""
    async with trio_client.open_websocket(url + "/v1/cli", ssl_context=ssl_context) as ws:
        await ws.send_message(ping_text())
        return json.loads(await ws.get_message())


async def send_all(url: str, messages: list[str]) -> list[dict]:
    """Send *messages* one after another on one /v1/cli connection; their replies."""
    replies = []
    async with trio_client.open_websocket(url + "/v1/cli") as ws:
        for msg in messages:
            await ws.send_message(msg)
            replies.append(json.loads(await ws.get_message()))
    return replies


async def http_get(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    """One GET over a fresh connection, parsed with h11."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        conn = h11.Connection(h11.CLIENT)
        request = h11.Request(method="GET", target=path,
                              headers=[("Host", "127.0.0.1"), ("Connection", "close")])
        await stream.send_all(conn.send(request) + conn.send(h11.EndOfMessage()))
        status, headers, body = 0, {}, b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
                headers = {k.decode(): v.decode() for k, v in event.headers}
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                return status, headers, body


async def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """/metrics as {(name, sorted labels): value}."""
    status, _, body = await http_get(port, "/metrics")
    assert status == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body.decode())
            for s in family.samples}


def closed_count(samples: dict, reason: str) -> float:
    return samples.get(("skr8tr_connections_closed_total", (("reason", reason),)), 0.0)


def refused_count(samples: dict, code: str) -> float:
    return samples.get(("skr8tr_requests_refused_total", (("reason", code),)), 0.0)


# ---------------------------------------------------------------------- fuzzing a daemon

# Limits high enough for a fuzzer's pace on one connection.
FUZZ_LIMITS = Limits(messages_per_s=1e6, message_burst=10**6)


def in_trio(afn, *args, timeout_s: float = 30.0):
    """From a worker thread (``trio.to_thread.run_sync``): ``await afn(*args)`` in the
    test's trio run, bounded by *timeout_s*; its result. Hypothesis runs in that thread
    while the conductor (which wants the main thread, for signals) runs in trio's."""
    async def bounded():
        with trio.fail_after(timeout_s):
            return await afn(*args)
    return trio.from_thread.run(bounded)
