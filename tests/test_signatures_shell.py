"""Issue #16 around the core: the conductor's start with ``--require-pq``, ``skr8tr keygen
--alg`` and signed CLI commands as real processes, node joins and the audit log of a real
conductor, for each key algorithm (DESIGN.md §10). The core's rules:
tests/test_signatures.py.
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
import time
from pathlib import Path

import pytest
import trio

from skr8tr import keyfiles
from skr8tr.cli_args import build_parser
from skr8tr.conductor.audit import signer_fields
from skr8tr.conductor.daemon import (
    ConductorConfig,
    StartError,
    _load_keys,
    config_from_args,
    run_conductor,
)
from skr8tr.conductor.replay_store import DurableReplayGuard
from skr8tr.core import envelope, keys, signatures
from skr8tr.core.signatures import ALGORITHMS, ED25519, HYBRID, ML_DSA_65, Signer, fingerprint
from skr8tr.ws import trio_client
from tests.conftest import run_cli
from tests.node_impostor import send_hello
from tests.security_helpers import send_all
from tests.test_cli_wire import ScriptedConductor, cli
from tests.wire_helpers import accept_request, encode_request
from tests.ws_helpers import serve_websocket

DEADLINE_S = 30
ALGS = (ED25519, ML_DSA_65, HYBRID)
each_alg = pytest.mark.parametrize("alg", ALGS, ids=[a.name for a in ALGS])
# What each file holds, in bytes, newline included (DESIGN §10).
FILE_BYTES = {ED25519: (65, 65), ML_DSA_65: (10 + 64 + 1, 10 + 3904 + 1),
              HYBRID: (18 + 128 + 1, 18 + 3968 + 1)}


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# ---------------------------------------------------------------------------- conductor start


def conductor_opts(*argv: str):
    return build_parser().parse_args(["conductor", *argv])


def test_require_pq_and_insecure_refuse_to_start():
    with pytest.raises(StartError) as info:
        config_from_args(conductor_opts("--insecure", "--require-pq"))
    assert "--require-pq and --insecure contradict each other" in str(info.value)
    assert "post-quantum keys" in str(info.value)
    assert config_from_args(conductor_opts("--insecure")).require_pq is False
    config = config_from_args(conductor_opts("--authorized-keys", "/k", "--require-pq"))
    assert (config.require_pq, config.insecure) == (True, False)


def test_the_real_conductor_exits_2_on_require_pq_with_insecure(cli_env):
    proc = run_cli("conductor", "--insecure", "--require-pq", "--listen", "127.0.0.1:0",
                   "--http", "127.0.0.1:0", env=cli_env)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: START: --require-pq and --insecure contradict")
    assert "Traceback" not in proc.stderr


def write_authorized(tmp_path: Path, lines: list[tuple[str, Signer, str]]) -> Path:
    path = tmp_path / "authorized_keys"
    path.write_text("# role key comment\n"
                    + "".join(f"{role} {s.public} {comment}\n" for role, s, comment in lines))
    return path


def test_load_keys_with_require_pq_names_each_ignored_key(tmp_path, caplog):
    old_admin, old_node = keys.generate_keypair()[0], keys.generate_keypair()[0]
    pq_admin, pq_node = (keys.generate_keypair(HYBRID)[0],
                         keys.generate_keypair(ML_DSA_65)[0])
    path = write_authorized(tmp_path, [("node", old_node, "old-box"),
                                       ("admin", pq_admin, "carol"),
                                       ("admin", old_admin, "alice"),
                                       ("node", pq_node, "web-1")])
    caplog.set_level(logging.DEBUG, logger="skr8tr.conductor")
    loaded = _load_keys(ConductorConfig(authorized_keys=str(path), require_pq=True))
    assert loaded.require_pq
    assert [e.pub_hex for e in loaded.ignored()] == [old_node.public, old_admin.public]
    assert loaded.has_role(pq_admin.public, "admin") and loaded.has_role(pq_node.public, "node")
    assert not loaded.has_role(old_admin.public, "admin")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    for record, (signer, role, comment) in zip(
            warnings, [(old_node, "node", "old-box"), (old_admin, "admin", "alice")],
            strict=True):
        text = record.getMessage()
        assert text.startswith("--require-pq: ignoring ed25519 key " + fingerprint(signer.public))
        assert f"({role}, {comment})" in text and str(path) in text
        assert "not post-quantum" in text
    assert fingerprint(pq_admin.public) not in caplog.text
    assert fingerprint(pq_node.public) not in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_load_keys_with_require_pq_and_no_post_quantum_key_logs_an_error(tmp_path, caplog):
    admin = keys.generate_keypair()[0]
    path = write_authorized(tmp_path, [("admin", admin, "alice"), ("node", admin, "")])
    caplog.set_level(logging.DEBUG, logger="skr8tr.conductor")
    loaded = _load_keys(ConductorConfig(authorized_keys=str(path), require_pq=True))
    assert loaded.roles(admin.public) == frozenset()
    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert fingerprint(admin.public) in warning.getMessage()
    assert "(admin/node, alice)" in warning.getMessage()
    [error] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert error.getMessage() == (f"--require-pq: no key in {path} is post-quantum; no "
                                  "command and no node will be accepted")


def test_load_keys_without_require_pq_ignores_nothing(tmp_path, caplog):
    admin = keys.generate_keypair()[0]
    path = write_authorized(tmp_path, [("admin", admin, "alice")])
    caplog.set_level(logging.DEBUG, logger="skr8tr.conductor")
    loaded = _load_keys(ConductorConfig(authorized_keys=str(path)))
    assert not loaded.require_pq and loaded.has_role(admin.public, "admin")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


# ---------------------------------------------------------------------------- keygen


@each_alg
def test_keygen_writes_the_files_of_its_algorithm(tmp_path, cli_env, alg):
    out = tmp_path / "keys"
    proc = run_cli("keygen", "--alg", alg.name, "--out", str(out), env=cli_env)
    assert proc.returncode == 0, proc.stderr
    sec, pub = out / "signing.sec", out / "signing.pub"
    assert (mode_of(sec), mode_of(pub)) == (0o600, 0o644)
    assert (sec.stat().st_size, pub.stat().st_size) == FILE_BYTES[alg]
    prefix = re.escape(alg.prefix)
    assert re.fullmatch(f"{prefix}[0-9a-f]{{{2 * alg.seed_bytes}}}\n", sec.read_text())
    assert re.fullmatch(f"{prefix}[0-9a-f]{{{2 * alg.public_bytes}}}\n", pub.read_text())
    public = pub.read_text().strip()
    assert proc.stdout == public + "\n"  # stdout is the key alone; the rest is on stderr
    signer = keyfiles.load_signing_key(sec)
    assert (signer.algorithm, signer.public) == (alg, public)
    assert f"({alg.name})" in proc.stderr


@pytest.mark.parametrize("alg", [ML_DSA_65, HYBRID], ids=["ml-dsa-65", "ed25519+ml-dsa-65"])
def test_keygen_json(tmp_path, cli_env, alg):
    out = tmp_path / "k"
    proc = run_cli("keygen", "--alg", alg.name, "--out", str(out), "--json", env=cli_env)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    public = (out / "signing.pub").read_text().strip()
    assert doc == {"public_key": public, "secret_key_file": str(out / "signing.sec"),
                   "public_key_file": str(out / "signing.pub"),
                   "fingerprint": fingerprint(public), "algorithm": alg.name}
    assert re.fullmatch(r"sha256:[0-9a-f]{16}", doc["fingerprint"])


def test_keygen_with_an_unknown_algorithm_exits_2(tmp_path, cli_env):
    out = tmp_path / "k"
    proc = run_cli("keygen", "--alg", "bogus", "--out", str(out), env=cli_env)
    assert proc.returncode == 2
    assert "error: USAGE: argument --alg: invalid choice: 'bogus'" in proc.stderr
    assert all(name in proc.stderr for name in ALGORITHMS)
    assert not out.exists()


# ---------------------------------------------------------------------------- signed CLI commands


async def scripted(nursery, authorized: keys.AuthorizedKeys) -> ScriptedConductor:
    peer = ScriptedConductor(authorized)
    server = await nursery.start(serve_websocket, peer.handle, "127.0.0.1", 0, None)
    peer.url = f"ws://127.0.0.1:{server.port}"
    return peer


@each_alg
async def test_cli_signs_with_a_key_of_each_algorithm(nursery, tmp_path, alg):
    pub = keyfiles.write_keypair(tmp_path / "keys", algorithm=alg)
    other = keyfiles.write_keypair(tmp_path / "other", algorithm=alg)
    peer = await scripted(nursery, keys.parse_authorized_keys(f"admin {pub} me\n"))
    peer.script["down"] = [(True, {"app": "web", "stopped": 2})]
    proc = await cli(peer, "down", "web", "--json", key=tmp_path / "keys" / "signing.sec")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"app": "web", "stopped": 2}
    sent = peer.received[-1]
    assert sent["key"] == pub
    assert signatures.is_signature(sent["sig"], alg)
    assert peer.fingerprints[-1] == fingerprint(pub)
    # Another key of the same algorithm is refused by the peer, and the CLI says so.
    proc = await cli(peer, "down", "web", key=tmp_path / "other" / "signing.sec")
    assert proc.returncode == 1
    assert proc.stderr.decode().startswith(
        f"error: UNAUTHORIZED: key {fingerprint(other)} is not authorized as admin")


async def test_cli_with_an_ed25519_key_against_require_pq(nursery, tmp_path):
    pub = keyfiles.write_keypair(tmp_path / "keys")
    authorized = keys.parse_authorized_keys(f"admin {pub} me\n").post_quantum_only()
    peer = await scripted(nursery, authorized)
    proc = await cli(peer, "scale", "web", "2", key=tmp_path / "keys" / "signing.sec")
    assert proc.returncode == 1
    err = proc.stderr.decode()
    assert err.startswith(f"error: UNAUTHORIZED: key {fingerprint(pub)} is ed25519")
    assert "--require-pq" in err and "skr8tr keygen --alg ed25519+ml-dsa-65" in err
    assert peer.fingerprints == []  # nothing got past the signature check


# ---------------------------------------------------------------------------- a real conductor


def manifest_args(tmp_path: Path) -> dict:
    return {"manifest": "app vault\n  exec /bin/sleep\n  args 60\n  replicas 0\n",
            "format": "skr8tr", "base_dir": str(tmp_path)}


async def join(url: str, signer: Signer, node_id: str) -> dict:
    """The conductor's answer to a node's hello signed by *signer*."""
    async with trio_client.open_websocket(url + "/v1/node") as ws:
        await send_hello(ws, signer, node_id)
        return json.loads(await ws.get_message())


def forge_one_half(genuine: Signer, other: Signer, request: str) -> str:
    """*request* (signed by the hybrid key *genuine*) with the ML-DSA half of its
    signature made by *other*: the Ed25519 half still verifies."""
    fields = json.loads(request)
    body = envelope.canonical_json({k: v for k, v in fields.items() if k != "sig"})
    fields["sig"] = (genuine.sign(body)[:64] + other.sign(body)[64:]).hex()
    return json.dumps(fields)


async def test_a_require_pq_conductor_audits_and_admits_by_algorithm(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="skr8tr.conductor")
    hy_admin, hy_node, hy_stranger = (keys.generate_keypair(HYBRID)[0] for _ in range(3))
    ml_admin = keys.generate_keypair(ML_DSA_65)[0]
    ed_admin, ed_node = keys.generate_keypair()[0], keys.generate_keypair()[0]
    path = write_authorized(tmp_path, [("admin", hy_admin, "carol"), ("admin", ml_admin, "bob"),
                                       ("admin", ed_admin, "alice"), ("node", hy_node, "web-1"),
                                       ("node", ed_node, "old-box")])
    log_path = tmp_path / "audit.jsonl"
    with trio.fail_after(DEADLINE_S):
        async with trio.open_nursery() as nursery:
            config = ConductorConfig(listen=("127.0.0.1", 0), http=("127.0.0.1", 0),
                                     authorized_keys=str(path), require_pq=True,
                                     audit_log=str(log_path))
            ws_port, _ = await nursery.start(run_conductor, config)
            url = f"ws://127.0.0.1:{ws_port}"
            # Signed now: a conductor refuses what was signed before it started.
            now = time.time
            up = encode_request(id="1", cmd="up", args=manifest_args(tmp_path),
                                signing_key=hy_admin, ts=now())
            messages = [
                up,
                encode_request(id="2", cmd="up", args=manifest_args(tmp_path),
                               signing_key=hy_stranger, ts=now()),
                forge_one_half(hy_admin, hy_stranger, encode_request(
                    id="3", cmd="down", args={"app": "vault"}, signing_key=hy_admin, ts=now())),
                encode_request(id="4", cmd="scale", args={"app": "vault", "replicas": 0},
                               signing_key=ed_admin, ts=now()),
                up,  # a replay
                encode_request(id="6", cmd="down", args={"app": "vault"}, signing_key=ml_admin,
                               ts=now()),
            ]
            replies = await send_all(url, messages)
            welcome = await join(url, hy_node, "web-1")
            refused = await join(url, ed_node, "old-box")
            nursery.cancel_scope.cancel()

    codes = [r["error"]["code"] if not r["ok"] else "ok" for r in replies]
    assert codes == ["ok", "UNAUTHORIZED", "UNAUTHORIZED", "UNAUTHORIZED", "REPLAY", "ok"]
    assert replies[2]["error"]["message"] == (
        f"bad signature for key {fingerprint(hy_admin.public)} (ed25519+ml-dsa-65)")
    assert "--require-pq" in replies[3]["error"]["message"]
    assert welcome["type"] == "welcome", welcome
    assert (refused["type"], refused["code"]) == ("refused", "UNAUTHORIZED")
    assert "--require-pq" in refused["message"]
    # The start named the two Ed25519 keys it ignores.
    assert caplog.text.count("--require-pq: ignoring ed25519 key") == 2
    assert fingerprint(ed_admin.public) in caplog.text
    assert fingerprint(ed_node.public) in caplog.text

    entries = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert [(e["cmd"], e["alg"], e["key"], e["verified"], e["result"].get("code"))
            for e in entries] == [
        ("up", "ed25519+ml-dsa-65", fingerprint(hy_admin.public), True, None),
        ("up", "ed25519+ml-dsa-65", fingerprint(hy_stranger.public), False, "UNAUTHORIZED"),
        ("down", "ed25519+ml-dsa-65", fingerprint(hy_admin.public), False, "UNAUTHORIZED"),
        ("scale", "ed25519", fingerprint(ed_admin.public), False, "UNAUTHORIZED"),
        ("up", "ed25519+ml-dsa-65", fingerprint(hy_admin.public), True, "REPLAY"),
        ("down", "ml-dsa-65", fingerprint(ml_admin.public), True, None),
    ]
    assert entries[0]["result"]["ok"] is True and entries[5]["result"]["ok"] is True


def test_signer_fields_of_each_algorithm():
    for alg in ALGS:
        public = Signer(alg, bytes(alg.seed_bytes)).public
        assert signer_fields(public) == {"key": fingerprint(public), "alg": alg.name}
    for junk in (None, 7, "", "ed25519:" + "00" * 32, "ml-dsa-65:00", "a" * 1_000_000):
        assert signer_fields(junk) == {"key": None, "alg": None}


@each_alg
def test_a_restart_remembers_a_post_quantum_nonce_signed_ahead(tmp_path, alg):
    # A request from a clock 20 s ahead: its nonce outlives a restart in STATE.nonces,
    # whose lines then hold a 4 KB key text.
    admin = keys.generate_keypair(alg)[0]
    authorized = keys.parse_authorized_keys(f"admin {admin.public}\n")
    start = 1_700_000_000.0
    ahead = encode_request(id="r", cmd="scale", args={"app": "web", "replicas": 2},
                           signing_key=admin, ts=start + 21)
    path = str(tmp_path / "state.toml.nonces")

    def code(guard, now: float) -> str:
        result = accept_request(ahead, authorized=authorized, guard=guard, now=now)
        return getattr(result, "code", "ok")

    assert code(DurableReplayGuard(path, started_at=start), start + 1) == "ok"
    assert admin.public in Path(path).read_text()
    assert code(DurableReplayGuard(path, started_at=start + 3), start + 4) == "REPLAY"
    assert code(DurableReplayGuard(path, started_at=start + 5), start + 52) == "EXPIRED"
