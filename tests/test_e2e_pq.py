"""Post-quantum keys end to end (DESIGN §10): real conductor, real node agents, the real CLI.

One conductor with ``--require-pq`` serves the first three tests: hybrid
(Ed25519+ML-DSA-65) admin and nodes deploy, roll out and scale; the Ed25519
keys listed next to them are named at start and refused; pure ML-DSA-65 keys
deploy and join. A second conductor, without the flag, accepts Ed25519 and
hybrid keys side by side and closes a hybrid node's session when its key is
revoked on SIGHUP.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from skr8tr import keyfiles
from skr8tr.core import audit_chain, signatures
from tests.conftest import HELLO_HTTP
from tests.e2e import Cluster, poll, private_env

pytestmark = pytest.mark.e2e

HYBRID = "ed25519+ml-dsa-65"
UNAUTHORIZED_EXIT = 1  # DESIGN §5: the conductor answered with an error


@pytest.fixture(scope="module")
def pq(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """``--require-pq --audit-log``: hybrid admin and node keys (n1, n2 joined), and
    listed next to them an Ed25519 admin, an Ed25519 node, an ML-DSA-65 admin and an
    ML-DSA-65 node key (:func:`key`)."""
    root = tmp_path_factory.mktemp("pq")
    cluster = Cluster(root=root, env=private_env(root))
    cluster.make_keys(HYBRID)
    for name, role, alg in (("ed-admin", "admin", "ed25519"), ("ed-node", "node", "ed25519"),
                            ("ml-admin", "admin", "ml-dsa-65"), ("ml-node", "node", "ml-dsa-65")):
        cluster.add_key(name, role, alg)
    try:
        cluster.start_conductor("--require-pq", "--audit-log", str(root / "audit.jsonl"))
        cluster.start_node("n1")
        cluster.start_node("n2")
        yield cluster
    finally:
        cluster.shutdown()


def key(cluster: Cluster, name: str) -> Path:
    """The signing.sec of a key made by ``cluster.add_key(name, ...)``."""
    return cluster.root / "keys" / name / "signing.sec"


def fpr(key_file: Path) -> str:
    return signatures.fingerprint(keyfiles.load_signing_key(key_file).public)


def audit_entries(cluster: Cluster) -> list[dict]:
    data = (cluster.root / "audit.jsonl").read_bytes()
    audit_chain.verify(data)
    return [json.loads(line) for line in data.splitlines()]


def web(root: Path, version: str, replicas: int = 3) -> Path:
    path = root / f"web-{version}.skr8tr"
    path.write_text("\n".join([
        "app web", f"  exec {HELLO_HTTP}",
        f"  args --host {{host}} --port {{port}} --version {version}", "  port auto",
        f"  replicas {replicas}", "  health", "    check GET /healthz 200",
        "    interval 200ms", "  rollout", "    ready-timeout 20s"]) + "\n")
    return path


def sleeper(root: Path, app: str, replicas: int) -> Path:
    path = root / f"{app}.skr8tr"
    path.write_text(f"app {app}\n  exec /bin/sleep\n  args 600\n  replicas {replicas}\n"
                    "  rollout\n    settle 200ms\n")
    return path




# ------------------------------------------------------------------ --require-pq


def test_hybrid_keys_deploy_roll_out_and_scale_under_require_pq(pq: Cluster):
    audited = len(audit_entries(pq))
    up = pq.json("up", str(web(pq.root, "v1")))
    assert up["generation"] == 1 and len(up["replicas"]) == 3
    v1 = pq.wait_ready("web", 3, generation=1)
    assert {r["node"] for r in v1} == {"n1", "n2"}
    assert pq.versions(v1) == {"v1"}

    started = pq.json("rollout", str(web(pq.root, "v2")))
    assert started["to_generation"] == 2
    done = poll(lambda: (s := pq.json("rollout", "status", "web"))["state"] != "rolling" and s,
                what="the rollout to finish")
    assert done["state"] == "complete" and done["replaced"] == done["total"] == 3, done
    v2 = pq.wait_ready("web", 3, generation=2)
    assert pq.versions(v2) == {"v2"}
    poll(lambda: not any(psutil.pid_exists(r["pid"]) for r in v1), what="v1 pids to exit")
    assert not {r["pid"] for r in v1} & {r["pid"] for r in v2}

    pq.json("scale", "web", "2")
    rows = pq.wait_ready("web", 2, generation=2)
    assert {r["pid"] for r in rows} < {r["pid"] for r in v2}

    entries = audit_entries(pq)[audited:]
    assert [(e["cmd"], e["result"]["ok"]) for e in entries] == [
        ("up", True), ("rollout", True), ("scale", True)]
    admin = signatures.fingerprint(pq.admin_pub)
    assert all(e["alg"] == HYBRID and e["key"] == admin and e["verified"] for e in entries)


def test_require_pq_ignores_listed_ed25519_keys(pq: Cluster):
    ed_admin, ed_node = key(pq, "ed-admin"), key(pq, "ed-node")
    log = pq.conductor.log()
    # Named at start, by fingerprint and role; the post-quantum keys are not.
    assert f"--require-pq: ignoring ed25519 key {fpr(ed_admin)} (admin, ed-admin)" in log
    assert f"--require-pq: ignoring ed25519 key {fpr(ed_node)} (node, ed-node)" in log
    assert log.count("--require-pq: ignoring") == 2

    audited = len(audit_entries(pq))
    proc = pq.cli("up", str(sleeper(pq.root, "legacy", 1)), key=ed_admin)
    assert proc.returncode == UNAUTHORIZED_EXIT, proc.stderr + proc.stdout
    assert proc.stderr.startswith("error: UNAUTHORIZED: ")
    assert "--require-pq" in proc.stderr and fpr(ed_admin) in proc.stderr
    assert "NOT_FOUND" in pq.cli("list", "legacy").stderr, "nothing was deployed"
    [entry] = audit_entries(pq)[audited:]
    assert (entry["cmd"], entry["alg"], entry["key"], entry["result"]["code"]) == (
        "up", "ed25519", fpr(ed_admin), "UNAUTHORIZED")
    assert entry["verified"] is False, "refused before its signature was checked"

    # An Ed25519 node key, listed as node, never joins; the hybrid nodes stay.
    node = pq.start_node("legacy-node", key=ed_node, wait=False)
    refusal = f"refused node legacy-node from 127.0.0.1 (key {fpr(ed_node)}): "
    poll(lambda: refusal in pq.conductor.log(), what="the conductor to refuse the node")
    assert "accepts only post-quantum keys (--require-pq)" in pq.conductor.log().split(
        refusal, 1)[1].splitlines()[0]
    poll(lambda: "refused this node: UNAUTHORIZED" in node.log(), what="the node to hear it")
    assert "--require-pq" in node.log()
    node.stop()
    assert "welcomed by" not in node.log()
    assert "node legacy-node joined" not in pq.conductor.log()
    nodes = {n["node"]: n for n in pq.json("nodes")}
    assert "legacy-node" not in nodes
    assert nodes["n1"]["last_seen_s"] < 5 and nodes["n2"]["last_seen_s"] < 5

    # SIGHUP re-reads the file and names the ignored keys again; nothing else changes.
    pq.conductor.proc.send_signal(signal.SIGHUP)
    poll(lambda: "0 node session(s) closed" in pq.conductor.log(), what="the reload")
    assert pq.conductor.log().count("--require-pq: ignoring") == 4
    proc = pq.cli("down", "nothing", key=ed_admin)
    assert proc.returncode == UNAUTHORIZED_EXIT and "--require-pq" in proc.stderr
    nodes = {n["node"]: n for n in pq.json("nodes")}
    assert "legacy-node" not in nodes and nodes["n1"]["last_seen_s"] < 5


def test_ml_dsa_65_admin_deploys_and_ml_dsa_65_node_joins(pq: Cluster):
    ml_admin, ml_node = key(pq, "ml-admin"), key(pq, "ml-node")
    pq.start_node("n3", key=ml_node)
    audited = len(audit_entries(pq))
    up = json.loads(pq.cli_ok("up", str(sleeper(pq.root, "pure", 3)), "--json", key=ml_admin))
    assert up["app"] == "pure" and len(up["replicas"]) == 3
    rows = pq.wait_ready("pure", 3)
    assert "n3" in {r["node"] for r in rows}, "the ML-DSA-65 node runs a replica"
    assert all(psutil.pid_exists(r["pid"]) for r in rows)
    down = json.loads(pq.cli_ok("down", "pure", "--json", key=ml_admin))
    assert down["stopped"] == 3
    poll(lambda: not any(psutil.pid_exists(r["pid"]) for r in rows), what="pure to stop")
    entries = audit_entries(pq)[audited:]
    assert [(e["cmd"], e["alg"], e["key"], e["result"]["ok"]) for e in entries] == [
        (cmd, "ml-dsa-65", fpr(ml_admin), True) for cmd in ("up", "down")]


# ------------------------------------------------------------------ mixed, no --require-pq


@pytest.fixture
def mixed(tmp_path: Path) -> Iterator[Cluster]:
    """No --require-pq: Ed25519 admin and node keys (make_keys), and a hybrid admin and a
    hybrid node key (:func:`key`)."""
    cluster = Cluster(root=tmp_path, env=private_env(tmp_path))
    cluster.make_keys("ed25519")
    cluster.add_key("hy-admin", "admin", HYBRID)
    cluster.add_key("hy-node", "node", HYBRID)
    try:
        cluster.start_conductor("--audit-log", str(tmp_path / "audit.jsonl"))
        yield cluster
    finally:
        cluster.shutdown()


def test_ed25519_and_hybrid_keys_coexist_and_a_hybrid_node_is_revoked(mixed: Cluster):
    hy_admin, hy_node = key(mixed, "hy-admin"), key(mixed, "hy-node")
    assert "--require-pq" not in mixed.conductor.log()
    mixed.start_node("ed")
    mixed.start_node("hy", key=hy_node)
    mixed.json("up", str(sleeper(mixed.root, "mix", 2)))  # the Ed25519 admin
    rows = mixed.wait_ready("mix", 2)
    assert {r["node"] for r in rows} == {"ed", "hy"}
    mixed.cli_ok("scale", "mix", "4", key=hy_admin)
    rows = mixed.wait_ready("mix", 4)
    mixed.cli_ok("down", "mix", key=hy_admin)
    poll(lambda: not any(psutil.pid_exists(r["pid"]) for r in rows), what="mix to stop")
    entries = audit_entries(mixed)
    assert [(e["cmd"], e["alg"], e["key"], e["result"]["ok"]) for e in entries] == [
        ("up", "ed25519", signatures.fingerprint(mixed.admin_pub), True),
        ("scale", HYBRID, fpr(hy_admin), True),
        ("down", HYBRID, fpr(hy_admin), True)]

    # Revoke the hybrid node key: SIGHUP ends that session at once, not the other one.
    hy_pub = keyfiles.load_signing_key(hy_node).public
    text = mixed.authorized_keys.read_text()
    assert hy_pub in text
    mixed.authorized_keys.write_text(
        "".join(line for line in text.splitlines(keepends=True) if hy_pub not in line))
    mixed.conductor.proc.send_signal(signal.SIGHUP)
    poll(lambda: "closed the session of node hy from" in mixed.conductor.log(),
         what="the revoked node's session to be closed")
    assert f"its key {fpr(hy_node)} is no longer authorized as node" in mixed.conductor.log()
    poll(lambda: "(3 key(s)); 1 node session(s) closed for revoked keys"
         in mixed.conductor.log(), what="the reload's summary")
    poll(lambda: "key was revoked" in mixed.nodes["hy"].log(), what="the node to hear it")
    poll(lambda: f"refused node hy from 127.0.0.1 (key {fpr(hy_node)})"
         in mixed.conductor.log(), what="its reconnect to be refused")
    nodes = {n["node"]: n for n in mixed.json("nodes")}
    assert nodes["ed"]["last_seen_s"] < 5
    # Both admin keys still hold: the conductor answers them NOT_FOUND, not UNAUTHORIZED.
    for admin in (None, hy_admin):
        proc = mixed.cli("down", "nothing", key=admin)
        assert proc.returncode == 1 and proc.stderr.startswith("error: NOT_FOUND"), proc.stderr
