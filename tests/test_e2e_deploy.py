"""End to end: a real conductor, two real node agents, real workloads, the real CLI."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import trio

from skr8tr import keyfiles
from skr8tr.core import envelope
from skr8tr.ws import trio_client
from tests.conftest import HELLO_HTTP, MANIFESTS, free_port, http_get, skr8tr_command
from tests.e2e import Cluster, poll, running_cluster

pytestmark = pytest.mark.e2e


@pytest.fixture
def cluster(tmp_path: Path):
    with running_cluster(tmp_path) as c:
        yield c


def node_address(cluster: Cluster, node_id: str) -> str:
    return {n["node"]: n["address"] for n in cluster.json("nodes")}[node_id]


def assert_serving(cluster: Cluster, rows: list[dict], version: str) -> None:
    for row in rows:
        assert psutil.pid_exists(row["pid"]), row
        status, headers, body = http_get(node_address(cluster, row["node"]), row["port"])
        assert status == 200
        assert headers["X-Version"] == version
        assert headers["X-Pid"] == str(row["pid"]), "the reported pid is the serving process"


def fixed_port_manifest(tmp_path: Path, port: int, replicas: int = 3) -> Path:
    path = tmp_path / "fixed.skr8tr"
    path.write_text(
        f"app fixed\n  exec {HELLO_HTTP}\n  args --host {{host}} --port {{port}} --version f1\n"
        f"  port {port}\n  replicas {replicas}\n  health\n    check GET /healthz\n"
        f"    interval 200ms\n"
    )
    return path


def test_deploy_scale_logs_down(cluster: Cluster):
    cluster.start_node("n1")
    cluster.start_node("n2")
    up = cluster.json("up", str(MANIFESTS / "web.skr8tr"))
    assert up["app"] == "web" and up["generation"] == 1 and len(up["replicas"]) == 3
    assert {r["node"] for r in up["replicas"]} == {"n1", "n2"}
    rows = cluster.wait_ready("web", 3)
    assert len({r["port"] for r in rows}) == 3
    assert_serving(cluster, rows, "v1")
    first_pids = {r["pid"] for r in rows}

    # the same manifest again changes nothing
    again = cluster.json("up", str(MANIFESTS / "web.skr8tr"))
    assert {r["pid"] for r in again["replicas"]} == first_pids

    cluster.json("scale", "web", "5")
    rows = cluster.wait_ready("web", 5)
    assert_serving(cluster, rows, "v1")
    assert first_pids <= {r["pid"] for r in rows}, "scaling up leaves running replicas alone"
    nodes = {n["node"]: n for n in cluster.json("nodes")}
    assert sum(n["replicas"] for n in nodes.values()) == 5
    assert sorted(p for n in nodes.values() for p in n["ports"]) == sorted(r["port"]
                                                                         for r in rows)

    before = {r["pid"] for r in rows}
    cluster.json("scale", "web", "1")
    rows = cluster.wait_ready("web", 1)
    gone = before - {rows[0]["pid"]}
    poll(lambda: not any(psutil.pid_exists(p) for p in gone), what="scaled-down pids to exit")

    logs = cluster.json("logs", "web", "--tail", "500")["lines"]
    texts = [line["text"] for line in logs]
    assert any(f"pid {rows[0]['pid']}" in t and "listening on" in t for t in texts), texts
    assert all(line["stream"] in ("stdout", "stderr") for line in logs)

    human = cluster.cli_ok("list")
    assert "web" in human and str(rows[0]["pid"]) in human

    down = cluster.json("down", "web")
    assert down == {"app": "web", "stopped": 1}
    poll(lambda: cluster.replicas() == [], what="the replica rows to disappear")
    poll(lambda: not any(psutil.pid_exists(p) for p in cluster.seen_pids),
         what="every workload process to exit")
    assert all(n["ports"] == [] for n in cluster.json("nodes"))


def test_job_runs_to_completion_and_its_logs_stay(cluster: Cluster):
    cluster.start_node("n1")
    cluster.json("up", str(MANIFESTS / "job.skr8tr"))
    poll(lambda: any(a["app"] == "report" and a["completed"] == 1
                     for a in cluster.json("status")["apps"]),
         what="the job to complete")
    assert cluster.replicas("report") == []
    texts = [line["text"] for line in cluster.json("logs", "report")["lines"]]
    assert "done" in texts and any(t.startswith("report started as pid") for t in texts)


def test_fixed_port_on_two_addresses_runs_two_and_says_no_capacity(cluster, tmp_path):
    cluster.start_node("n1", "127.0.0.1")
    cluster.start_node("n2", "127.0.0.2")
    port = free_port()
    proc = cluster.cli("up", str(fixed_port_manifest(tmp_path, port)))
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: NO_CAPACITY: placed 2 of 3 replica(s) of fixed")
    assert f"port {port} is taken" in proc.stderr and "port auto" in proc.stderr
    rows = cluster.wait_ready("fixed", 2)
    assert sorted((node_address(cluster, r["node"]), r["port"]) for r in rows) == [
        ("127.0.0.1", port), ("127.0.0.2", port)]
    assert_serving(cluster, rows, "f1")


def test_fixed_port_on_one_shared_address_runs_one(cluster, tmp_path):
    cluster.start_node("n1", "127.0.0.1")
    cluster.start_node("n2", "127.0.0.1")
    proc = cluster.cli("up", str(fixed_port_manifest(tmp_path, free_port())))
    assert proc.returncode == 1 and "placed 1 of 3" in proc.stderr
    rows = cluster.wait_ready("fixed", 1)
    assert_serving(cluster, rows, "f1")


def test_launch_failure_is_reported_not_hung(cluster, tmp_path):
    cluster.start_node("n1")
    bad = tmp_path / "bad.skr8tr"
    bad.write_text("app broken\n  exec ./no-such-program\n  replicas 1\n")
    cluster.json("up", str(bad))
    events = poll(lambda: [a for a in cluster.json("status")["apps"] if a["app"] == "broken"
                           and a["running"] == 0], what="the app row")
    assert events
    log = poll(lambda: "no-such-program" in cluster.conductor.log()
               and cluster.conductor.log(), what="the launch failure in the conductor log")
    assert "No such file or directory" in log


# ------------------------------------------------------------------ hostile requests


async def _send_raw(url: str, messages: list[str | bytes]) -> list[dict]:
    replies = []
    async with trio_client.open_websocket(url + "/v1/cli",
                                                 max_message_bytes=4 * 2**20) as ws:
        for msg in messages:
            await ws.send_message(msg)
            replies.append(json.loads(await ws.get_message()))
    return replies


def _signed(key_path: Path, cmd: str, args: dict, *, ts: float | None = None) -> dict:
    return envelope.sign_request(keyfiles.load_signing_key(str(key_path)), id=f"t-{cmd}",
                                 cmd=cmd, args=args, ts=time.time() if ts is None else ts,
                                 nonce=envelope.new_nonce())


async def test_refused_requests_change_nothing_and_ping_keeps_answering(cluster, tmp_path):
    await trio.to_thread.run_sync(cluster.start_node, "n1")
    manifest_args = {"manifest": (MANIFESTS / "sleep.skr8tr").read_text(), "format": "skr8tr",
                     "base_dir": str(MANIFESTS)}
    keyfiles.write_keypair(str(tmp_path / "stranger"))
    unsigned = {"v": 1, "id": "u1", "cmd": "up", "args": {"junk": True}}
    forged = _signed(tmp_path / "stranger" / "signing.sec", "up", manifest_args)
    node_key = _signed(cluster.node_key, "up", manifest_args)  # a node key may not command
    expired = _signed(cluster.admin_key, "up", manifest_args, ts=time.time() - 31)
    tampered = _signed(cluster.admin_key, "up", manifest_args)
    tampered["args"] = dict(manifest_args, manifest=manifest_args["manifest"] + "\n")
    good_down = _signed(cluster.admin_key, "down", {"app": "nothing-here"})
    replies = await _send_raw(cluster.url, [
        json.dumps(unsigned), json.dumps(forged), json.dumps(node_key), json.dumps(expired),
        json.dumps(tampered), json.dumps(good_down), json.dumps(good_down),
        "not json at all", b"\xff\xfe binary", json.dumps({"v": 1, "id": "p", "cmd": "ping",
                                                             "args": {}}),
    ])
    codes = [r["error"]["code"] if not r["ok"] else "ok" for r in replies]
    assert codes == ["UNAUTHORIZED", "UNAUTHORIZED", "UNAUTHORIZED", "EXPIRED",
                     "UNAUTHORIZED", "NOT_FOUND", "REPLAY", "BAD_REQUEST", "BAD_REQUEST", "ok"]
    assert replies[-1]["result"]["pong"] == "conductor"
    listing = await trio.to_thread.run_sync(cluster.replicas)
    assert listing == []
    status = json.loads(await trio.to_thread.run_sync(
        lambda: cluster.cli_ok("status", "--json")))
    assert status["apps"] == []
    log = cluster.conductor.log()
    assert "refused" in log and "UNAUTHORIZED" in log and "sha256:" in log


async def test_oversized_message_closes_that_connection_only(cluster):
    async with trio_client.open_websocket(cluster.url + "/v1/cli",
                                                 max_message_bytes=4 * 2**20) as ws:
        await ws.send_message("x" * (2**20 + 1))
        with pytest.raises(trio_client.ConnectionClosed) as closed:
            await ws.get_message()
        assert closed.value.code == 1009
    replies = await _send_raw(cluster.url, [json.dumps({"v": 1, "id": "p", "cmd": "ping",
                                                        "args": {}})])
    assert replies[0]["ok"] is True


async def test_unauthorized_node_cannot_join(cluster, tmp_path):
    keyfiles.write_keypair(str(tmp_path / "rogue"))
    rogue = cluster._spawn("rogue", "node", "--conductor", cluster.url, "--key",
                           str(tmp_path / "rogue" / "signing.sec"), "--node-id", "rogue",
                           "--data-dir", str(tmp_path / "rogue-data"))
    cluster.nodes["rogue"] = rogue
    await trio.to_thread.run_sync(lambda: poll(lambda: "refused node rogue" in
                                               cluster.conductor.log(),
                                               what="the refusal in the log"))
    assert cluster.json("nodes") == []


def test_sighup_rereads_authorized_keys(cluster: Cluster, tmp_path):
    newcomer = keyfiles.write_keypair(str(tmp_path / "newcomer"))
    new_key = tmp_path / "newcomer" / "signing.sec"
    before = cluster.cli("down", "nothing", "--key", str(new_key), signed=False)
    assert before.returncode == 1 and "UNAUTHORIZED" in before.stderr
    text = cluster.authorized_keys.read_text()
    cluster.authorized_keys.write_text(text + f"admin {newcomer} added later\n")
    cluster.conductor.proc.send_signal(signal.SIGHUP)
    poll(lambda: "SIGHUP: re-read" in cluster.conductor.log(), what="the reload")
    after = cluster.cli("down", "nothing", "--key", str(new_key), signed=False)
    assert after.returncode == 1 and "NOT_FOUND" in after.stderr  # authorized now
    # a broken file keeps the previous keys
    cluster.authorized_keys.write_text("superuser abc\n")
    cluster.conductor.proc.send_signal(signal.SIGHUP)
    poll(lambda: "keeping the previous authorized keys" in cluster.conductor.log(),
         what="the rejected reload")
    still = cluster.cli("down", "nothing", "--key", str(new_key), signed=False)
    assert "NOT_FOUND" in still.stderr


def test_watch_streams_events_until_interrupted(cluster: Cluster):
    cluster.start_node("n1")
    watcher = subprocess.Popen(
        [*skr8tr_command(), "watch", "--json", "--conductor", cluster.url], env=cluster.env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = json.loads(watcher.stdout.readline())
        assert first["type"] == "snapshot" and first["state"]["nodes"][0]["node"] == "n1"
        cluster.json("up", str(MANIFESTS / "sleep.skr8tr"))
        seen = []
        while len([e for e in seen if e.get("event") == "replica.ready"]) != 3:
            seen.append(json.loads(watcher.stdout.readline()))
        names = [e["event"] for e in seen]
        assert names[0] == "app.created"
        assert names.count("replica.placed") == 3 and names.count("replica.running") == 3
        assert all(e["data"]["app"] == "sleeper" for e in seen)
        watcher.send_signal(signal.SIGINT)
        assert watcher.wait(timeout=10) == 130
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.wait()
        watcher.stdout.close()
        watcher.stderr.close()


@pytest.mark.parametrize("argv, message", [
    (["conductor", "--listen", "127.0.0.1:0"], "no --authorized-keys FILE given"),
    (["conductor", "--authorized-keys", "/nonexistent/keys"], "/nonexistent/keys: no such file"),
    (["conductor", "--insecure", "--listen", "nowhere"], "expected HOST:PORT"),
    (["conductor", "--insecure", "--port-range", "9-2"], "expected LO-HI"),
    (["conductor", "--insecure", "--store", "etcd://127.0.0.1:2379", "--state", "s.toml"],
     "--store and --state exclude each other"),
    (["conductor", "--insecure", "--store", "http://127.0.0.1:2379"],
     "is not an etcd store URL"),
    (["conductor", "--insecure", "--store", "etcd://h:1", "--store-prefix", "skr8tr"],
     "--store-prefix 'skr8tr': expected a key path"),
    (["conductor", "--insecure", "--store", "etcd://h:1", "--lease-ttl", "1"],
     "--lease-ttl 1: expected 2 to 3600 seconds"),
    (["conductor", "--insecure", "--store", "etcd://h:1", "--advertise-url", "10.0.0.1"],
     "--advertise-url '10.0.0.1': expected ws://HOST:PORT"),
    (["conductor", "--insecure", "--store", "etcd://h:1", "--listen", "0.0.0.0:7771"],
     "with --store needs --advertise-url"),
])
def test_conductor_refuses_to_start_with_one_line(argv, message, tmp_path):
    proc = subprocess.run([*skr8tr_command(), *argv], capture_output=True, text=True,
                          timeout=30, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: START: ") and message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("flag", ["--listen", "--http"])
def test_a_busy_port_exits_2_naming_the_flag(flag):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        ports = {"--listen": f"127.0.0.1:{free_port()}", "--http": f"127.0.0.1:{free_port()}"}
        ports[flag] = f"127.0.0.1:{port}"
        proc = subprocess.run(
            [*skr8tr_command(), "conductor", "--insecure", "--listen", ports["--listen"],
             "--http", ports["--http"]], capture_output=True, text=True, timeout=30,
            stdin=subprocess.DEVNULL)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]  # after the INSECURE MODE warning
    assert last.startswith(f"error: START: cannot listen on 127.0.0.1:{port} ({flag}): ")
    assert "Traceback" not in proc.stderr


def test_insecure_mode_says_so_loudly(tmp_path):
    ws, http = free_port(), free_port()
    proc = subprocess.Popen(
        [*skr8tr_command(), "conductor", "--insecure", "--listen", f"127.0.0.1:{ws}",
         "--http", f"127.0.0.1:{http}"], stderr=subprocess.PIPE, text=True,
        stdin=subprocess.DEVNULL)
    try:
        line = proc.stderr.readline()
        assert "INSECURE MODE" in line
        status, _, body = poll(lambda: _try_get(http, "/healthz"), what="/healthz")
        assert status == 200 and body == "ok\n"
        status, _, body = _try_get(http, "/api/state")
        state = json.loads(body)
        assert status == 200 and state == {
            "nodes": [], "apps": [], "replicas": [], "rollouts": [], "history": {},
            "leader": f"ws://127.0.0.1:{ws}",
            "conductors": [{"url": f"ws://127.0.0.1:{ws}", "role": "leader",
                            "since": state["conductors"][0]["since"],
                            "http": f"http://127.0.0.1:{http}"}],
            "ingresses": []}
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        proc.stderr.close()


def _try_get(port: int, path: str):
    try:
        return http_get("127.0.0.1", port, path)
    except OSError:
        return None


async def test_watchers_that_leave_do_not_stop_the_conductor_accepting(cluster: Cluster):
    """A /v1/watch client that disconnects must leave the server accepting (regression:
    seen once while the listener was rewritten; every later connect was refused)."""
    await trio.to_thread.run_sync(cluster.start_node, "n1")
    for _ in range(5):
        async with trio_client.open_websocket(cluster.url + "/v1/watch") as ws:
            first = json.loads(await ws.get_message())
            assert first["type"] == "snapshot"
        replies = await _send_raw(cluster.url, [json.dumps({"v": 1, "id": "p", "cmd": "ping",
                                                            "args": {}})])
        assert replies[0]["ok"] is True
    nodes = await trio.to_thread.run_sync(cluster.json, "nodes")
    assert [n["node"] for n in nodes] == ["n1"]  # the node session survived too
