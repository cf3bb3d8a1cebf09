"""Hostile clients end to end: real conductor, real node agents, real CLI.

Extends tests/test_e2e_deploy.py (which checks the reply codes of unsigned,
forged, wrong-role, expired, tampered and replayed requests) with what an
operator sees: each refusal is counted in /metrics, logged with the key's
fingerprint and written to the audit log, and changes nothing. Then the
revocations on SIGHUP, node impersonation, and a rollout under a storm of
garbage connections.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path

import psutil
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from skr8tr import keyfiles
from skr8tr.core import audit_chain, envelope, signatures
from skr8tr.ws import trio_client
from tests.conftest import HELLO_HTTP, MANIFESTS, http_get
from tests.e2e import Cluster, poll

pytestmark = pytest.mark.e2e


@pytest.fixture
def cluster(tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKR8TR_")}
    env["HOME"] = str(tmp_path / "home")
    c = Cluster(root=tmp_path, env=env)
    c.make_keys()
    c.start_conductor("--audit-log", str(tmp_path / "audit.jsonl"))
    try:
        yield c
    finally:
        c.shutdown()


def metrics(cluster: Cluster) -> dict[tuple[str, tuple], float]:
    status, _, body = http_get("127.0.0.1", cluster.http_port, "/metrics")
    assert status == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body)
            for s in family.samples}


def refused(samples: dict, code: str) -> float:
    return samples.get(("skr8tr_requests_refused_total", (("reason", code),)), 0.0)


def closed(samples: dict, reason: str) -> float:
    return samples.get(("skr8tr_connections_closed_total", (("reason", reason),)), 0.0)


def signed(key_path: Path, cmd: str, args: dict, *, ts: float | None = None) -> str:
    return json.dumps(envelope.sign_request(
        keyfiles.load_signing_key(str(key_path)), id=f"t-{cmd}-{random.random()}", cmd=cmd,
        args=args, ts=time.time() if ts is None else ts, nonce=envelope.new_nonce()))


async def send(url: str, messages: list[str]) -> list[str]:
    """The error code (or "ok") of each reply, one connection."""
    codes = []
    async with trio_client.open_websocket(url + "/v1/cli") as ws:
        for msg in messages:
            await ws.send_message(msg)
            reply = json.loads(await ws.get_message())
            codes.append("ok" if reply["ok"] else reply["error"]["code"])
    return codes


def audit_entries(cluster: Cluster) -> list[dict]:
    data = (cluster.root / "audit.jsonl").read_bytes()
    audit_chain.verify(data)
    return [json.loads(line) for line in data.splitlines()]


async def test_every_refusal_is_counted_logged_and_audited(cluster: Cluster, tmp_path):
    await trio.to_thread.run_sync(cluster.start_node, "n1")
    manifest = {"manifest": (MANIFESTS / "sleep.skr8tr").read_text(), "format": "skr8tr",
                "base_dir": str(MANIFESTS)}
    keyfiles.write_keypair(str(tmp_path / "stranger"))
    stranger = tmp_path / "stranger" / "signing.sec"
    tampered = json.loads(signed(cluster.admin_key, "up", manifest))
    tampered["args"]["manifest"] += "\n"
    replayed = signed(cluster.admin_key, "scale", {"app": "sleeper", "replicas": 1})
    before = await trio.to_thread.run_sync(metrics, cluster)
    codes = await send(cluster.url, [
        json.dumps({"v": 1, "id": "u", "cmd": "up", "args": manifest}),  # unsigned
        signed(stranger, "up", manifest),  # forged: a key nobody authorized
        signed(cluster.node_key, "up", manifest),  # wrong role: a node key
        signed(cluster.admin_key, "up", manifest, ts=time.time() - 120),  # expired
        json.dumps(tampered),  # signed, then changed
        replayed, replayed,  # the second is a replay (the first: NOT_FOUND)
    ])
    assert codes == ["UNAUTHORIZED", "UNAUTHORIZED", "UNAUTHORIZED", "EXPIRED",
                     "UNAUTHORIZED", "NOT_FOUND", "REPLAY"]
    after = await trio.to_thread.run_sync(metrics, cluster)
    assert refused(after, "UNAUTHORIZED") - refused(before, "UNAUTHORIZED") == 4
    assert refused(after, "EXPIRED") - refused(before, "EXPIRED") == 1
    assert refused(after, "REPLAY") - refused(before, "REPLAY") == 1
    # Nothing changed.
    status = json.loads(await trio.to_thread.run_sync(
        lambda: cluster.cli_ok("status", "--json")))
    assert status["apps"] == [] and status["replicas"] == []
    log = cluster.conductor.log()
    for fpr in (signatures.fingerprint(keyfiles.load_signing_key(str(k)).public)
                for k in (stranger, cluster.node_key, cluster.admin_key)):
        assert f"(key {fpr}): " in log
    assert log.count("refused a request from 127.0.0.1") >= 6
    entries = audit_entries(cluster)
    assert [(e["cmd"], e["result"].get("code")) for e in entries] == [
        ("up", "UNAUTHORIZED"), ("up", "UNAUTHORIZED"), ("up", "UNAUTHORIZED"),
        ("up", "EXPIRED"), ("up", "UNAUTHORIZED"), ("scale", "NOT_FOUND"),
        ("scale", "REPLAY")]
    assert "sleep" not in json.dumps(entries[0]["args"]).replace("sleeper", "")


async def test_revoking_an_admin_key_refuses_it_at_once(cluster: Cluster):
    before = await trio.to_thread.run_sync(lambda: cluster.cli("down", "nothing"))
    assert before.returncode == 1 and "NOT_FOUND" in before.stderr
    # An open connection, authenticated a moment ago, gets no grace either.
    async with trio_client.open_websocket(cluster.url + "/v1/cli") as ws:
        await ws.send_message(signed(cluster.admin_key, "down", {"app": "nothing"}))
        assert json.loads(await ws.get_message())["error"]["code"] == "NOT_FOUND"
        cluster.authorized_keys.write_text(f"node {cluster.node_pub} nodes only\n")
        cluster.conductor.proc.send_signal(signal.SIGHUP)
        await trio.to_thread.run_sync(lambda: poll(
            lambda: "SIGHUP: re-read" in cluster.conductor.log(), what="the reload"))
        await ws.send_message(signed(cluster.admin_key, "down", {"app": "nothing"}))
        reply = json.loads(await ws.get_message())
        assert reply["error"]["code"] == "UNAUTHORIZED"
        assert "not authorized as admin" in reply["error"]["message"]
    after = await trio.to_thread.run_sync(lambda: cluster.cli("down", "nothing"))
    assert after.returncode == 1 and "UNAUTHORIZED" in after.stderr
    assert refused(await trio.to_thread.run_sync(metrics, cluster), "UNAUTHORIZED") == 2


def test_revoking_a_node_key_closes_its_session(cluster: Cluster, tmp_path):
    cluster.start_node("n1")
    cluster.json("up", str(MANIFESTS / "sleep.skr8tr"))
    rows = cluster.wait_ready("sleeper", 3)
    cluster.authorized_keys.write_text(f"admin {cluster.admin_pub} admin only\n")
    cluster.conductor.proc.send_signal(signal.SIGHUP)
    poll(lambda: "closed the session of node n1" in cluster.conductor.log(),
         what="the session of the revoked node to be closed")
    assert "1 node session(s) closed for revoked keys" in cluster.conductor.log()
    node_log = poll(lambda: "refused this node: UNAUTHORIZED" in cluster.nodes["n1"].log()
                    and cluster.nodes["n1"].log(), what="the node to hear it")
    assert "key was revoked" in node_log
    # It keeps trying, and is refused each time: nothing else is accepted from it.
    poll(lambda: "refused node n1 from 127.0.0.1" in cluster.conductor.log(),
         what="a reconnect to be refused")
    samples = metrics(cluster)
    assert closed(samples, "revoked") == 1 and refused(samples, "UNAUTHORIZED") >= 2
    node = {n["node"]: n for n in cluster.json("nodes")}["n1"]
    assert node["last_seen_s"] >= 0  # known, detached: it expires by --node-timeout
    # Its workloads were not touched by the revocation (the agent keeps them).
    assert all(psutil.pid_exists(r["pid"]) for r in rows)


def test_a_node_cannot_take_another_nodes_id(cluster: Cluster, tmp_path):
    cluster.start_node("n1")
    other = keyfiles.write_keypair(str(tmp_path / "other-node"))
    cluster.authorized_keys.write_text(cluster.authorized_keys.read_text()
                                       + f"node {other} a second node key\n")
    cluster.conductor.proc.send_signal(signal.SIGHUP)
    poll(lambda: "SIGHUP: re-read" in cluster.conductor.log(), what="the reload")
    before = refused(metrics(cluster), "UNAUTHORIZED")
    impostor = cluster._spawn("impostor", "node", "--conductor", cluster.url, "--key",
                              str(tmp_path / "other-node" / "signing.sec"), "--node-id", "n1",
                              "--data-dir", str(tmp_path / "impostor-data"))
    cluster.nodes["impostor"] = impostor
    poll(lambda: "is held by another key" in impostor.log(), what="the impostor's refusal")
    assert "refused node n1 from 127.0.0.1 (key " in cluster.conductor.log()
    assert refused(metrics(cluster), "UNAUTHORIZED") > before
    nodes = cluster.json("nodes")
    assert [n["node"] for n in nodes] == ["n1"] and nodes[0]["last_seen_s"] < 5


def test_an_unauthorized_node_is_refused_and_counted(cluster: Cluster, tmp_path):
    keyfiles.write_keypair(str(tmp_path / "rogue"))
    rogue = cluster._spawn("rogue", "node", "--conductor", cluster.url, "--key",
                           str(tmp_path / "rogue" / "signing.sec"), "--node-id", "rogue",
                           "--data-dir", str(tmp_path / "rogue-data"))
    cluster.nodes["rogue"] = rogue
    poll(lambda: "refused node rogue" in cluster.conductor.log(), what="the refusal")
    assert "not authorized as node" in cluster.conductor.log()
    assert refused(metrics(cluster), "UNAUTHORIZED") >= 1
    assert cluster.json("nodes") == []


# ---------------------------------------------------------------------- load


def web(tmp_path: Path, version: str) -> Path:
    path = tmp_path / f"web-{version}.skr8tr"
    path.write_text("\n".join([
        "app web", f"  exec {HELLO_HTTP}",
        f"  args --host {{host}} --port {{port}} --version {version}", "  port auto",
        "  replicas 3", "  health", "    check GET /healthz 200", "    interval 200ms",
        "  rollout", "    ready-timeout 30s"]) + "\n")
    return path


GARBAGE = [b"", b"\x00" * 64, b"GET / HTTP/1.1\r\n\r\n", b"\x16\x03\x01\x02\x00",
           b"GET /v1/cli HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n",
           b"\xff" * 4096, b"POST /v1/node HTTP/1.0\r\nContent-Length: 99999\r\n\r\nxx"]


async def storm(port: int, http_port: int, until: trio.Event, counts: dict) -> None:
    """One of 200 loops: connect, send garbage (or a WebSocket full of it), close; again."""
    rng = random.Random()
    while not until.is_set():
        try:
            if rng.random() < 0.3:
                with trio.fail_after(10):
                    async with trio_client.open_websocket(
                            f"ws://127.0.0.1:{port}/v1/{rng.choice(['cli', 'node', 'watch'])}"
                    ) as ws:
                        for _ in range(rng.randint(1, 5)):
                            await ws.send_message(rng.choice([b"\x00\x01", "{", "[]", "null",
                                                              '{"v":1,"id":"g","cmd":"up"}']))
            else:
                target = port if rng.random() < 0.7 else http_port
                stream = await trio.open_tcp_stream("127.0.0.1", target)
                async with stream:
                    await stream.send_all(rng.choice(GARBAGE))
            counts["sent"] += 1
        except (OSError, trio.BrokenResourceError, trio_client.HandshakeError,
                trio_client.ConnectionClosed, trio.TooSlowError):
            counts["failed"] += 1
        await trio.sleep(rng.uniform(0, 0.02))


async def test_rollout_completes_under_a_storm_of_garbage_connections(cluster, tmp_path):
    for node in ("n1", "n2"):
        await trio.to_thread.run_sync(cluster.start_node, node)
    await trio.to_thread.run_sync(lambda: cluster.json("up", str(web(tmp_path, "v1"))))
    await trio.to_thread.run_sync(lambda: cluster.wait_ready("web", 3))
    counts = {"sent": 0, "failed": 0, "pings": 0}
    done = trio.Event()
    result = {}

    async def rollout() -> None:
        try:
            proc = await trio.run_process(
                [*cluster_cli(cluster), "rollout", str(web(tmp_path, "v2")), "--watch",
                 "--json", "--timeout", "30"], capture_stdout=True, capture_stderr=True,
                check=False, env=cluster.env)
            result["proc"] = proc
        finally:
            done.set()

    async def pings() -> None:
        # A well-behaved client all along: every request is answered.
        async with trio_client.open_websocket(cluster.url + "/v1/cli") as ws:
            while not done.is_set():
                await ws.send_message(json.dumps({"v": 1, "id": "p", "cmd": "ping",
                                                  "args": {}}))
                assert json.loads(await ws.get_message())["ok"]
                counts["pings"] += 1
                await trio.sleep(0.05)

    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            for _ in range(200):
                nursery.start_soon(storm, cluster.ws_port, cluster.http_port, done, counts)
            nursery.start_soon(pings)
            await rollout()
    proc = result["proc"]
    assert proc.returncode == 0, proc.stderr.decode()
    assert json.loads(proc.stdout)["state"] == "complete"
    assert counts["sent"] > 200 and counts["pings"] > 5, counts
    rows = await trio.to_thread.run_sync(lambda: cluster.wait_ready("web", 3, generation=2))
    where = {n["node"]: n["address"] for n in await trio.to_thread.run_sync(
        lambda: cluster.json("nodes"))}
    for r in rows:
        status, headers, _ = await trio.to_thread.run_sync(http_get, where[r["node"]],
                                                           r["port"])
        assert status == 200 and headers["X-Version"] == "v2"
    nodes = await trio.to_thread.run_sync(lambda: cluster.json("nodes"))
    assert sorted(n["node"] for n in nodes) == ["n1", "n2"]
    assert all(n["last_seen_s"] < 5 for n in nodes), "no node session was lost"
    history = await trio.to_thread.run_sync(lambda: cluster.json("rollout", "history", "web"))
    assert [h["state"] for h in history] == ["complete", "complete"]
    samples = await trio.to_thread.run_sync(metrics, cluster)
    assert closed(samples, "bad_handshake") > 0
    assert "Traceback" not in cluster.conductor.log()


def cluster_cli(cluster: Cluster) -> list[str]:
    from tests.conftest import skr8tr_command
    return [*skr8tr_command(), "--conductor", cluster.url, "--key", str(cluster.admin_key)]


# ---------------------------------------------------------------------- env values


def test_env_values_never_show_outside_the_workload(cluster: Cluster, tmp_path):
    secret = "tok-3f9c1d2b7e"
    manifest = tmp_path / "vault.skr8tr"
    manifest.write_text("\n".join([
        "app vault", "  exec /bin/sh",
        "  args -c 'test \"$API_TOKEN\" = tok-3f9c1d2b7e && echo token-ok; exec sleep 60'",
        "  replicas 2", "  env", f"    API_TOKEN {secret}", "    MODE prod",
        "  rollout", "    settle 200ms"]) + "\n")
    cluster.start_node("n1")
    cluster.json("up", str(manifest))
    cluster.wait_ready("vault", 2)
    poll(lambda: any(line["text"] == "token-ok"
                     for line in cluster.json("logs", "vault")["lines"]),
         what="the workload to see its env value")
    # A manifest the conductor refuses, with the error on the env line, is answered
    # (to its sender) but logged and audited by position only.
    broken = manifest.read_text().replace(f"API_TOKEN {secret}", f"API_TOKEN '{secret}")
    codes = trio.run(send, cluster.url, [signed(cluster.admin_key, "up", {
        "manifest": broken, "format": "skr8tr", "base_dir": str(tmp_path)})])
    assert codes == ["INVALID_MANIFEST"]
    shown = []
    for args in (("list",), ("list", "vault"), ("status",), ("nodes",),
                 ("rollout", "history", "vault")):
        shown.append(cluster.cli_ok(*args))
        shown.append(cluster.cli_ok(*args, "--json"))
    for path in ("/api/state", "/api/events", "/", "/metrics", "/api/config"):
        shown.append(http_get("127.0.0.1", cluster.http_port, path)[2])

    async def first_watch_messages() -> list[str]:
        async with trio_client.open_websocket(cluster.url + "/v1/watch") as ws:
            return [await ws.get_message()]

    shown += trio.run(first_watch_messages)
    shown += [cluster.conductor.log(), cluster.nodes["n1"].log(),
              (cluster.root / "audit.jsonl").read_text()]
    for text in shown:
        assert secret not in text and "MODE prod" not in text
    assert any("API_TOKEN" in text for text in shown[-1:]), "the audit log names the key"

