"""contrib/systemd: the example units and config files, run for real without systemd.

Each unit is parsed; its ExecStart, with the paths moved into a temporary root,
is started as a real process (the conductor, two node agents, the ingress)
from the example config files, and must serve an app end to end. The node
unit's promise, workloads outliving a restart of the agent (KillMode=process),
is checked on the same processes. ``systemd-analyze verify`` runs when the
machine has it.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import MANIFESTS, free_port, http_get, skr8tr_command
from tests.e2e import Cluster, new_port_block, poll, private_env

CONTRIB = Path(__file__).resolve().parent.parent / "contrib" / "systemd"
UNITS = ("skr8tr-conductor.service", "skr8tr-node.service", "skr8tr-ingress.service")
BINARY = "/usr/local/bin/skr8tr"


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """{section: {key: [values in order]}} of a systemd unit file (keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"{path.name}: {raw!r} before any section"
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: {raw!r} is not KEY=VALUE"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def one(unit: dict[str, dict[str, list[str]]], key: str) -> str:
    values = unit["Service"].get(key, [])
    assert len(values) == 1, f"{key}: {values}"
    return values[0]


@pytest.mark.parametrize("name", UNITS)
def test_unit_is_hardened(name):
    unit = parse_unit(CONTRIB / name)
    assert one(unit, "User") == "skr8tr"
    assert one(unit, "Restart") == "on-failure"
    assert one(unit, "RestartPreventExitStatus") == "2"  # a refusal to start is not retried
    assert one(unit, "NoNewPrivileges") == "yes"
    assert one(unit, "ProtectSystem") == "strict"
    assert one(unit, "ProtectHome") == "yes"
    exec_start = shlex.split(one(unit, "ExecStart"))
    assert exec_start[0] == BINARY and exec_start[2:4] == ["--config", exec_start[3]]
    assert (CONTRIB / Path(exec_start[3]).name).exists()  # the example config it names
    if name == "skr8tr-node.service":
        # workloads are the agent's children and must outlive its restart (DESIGN §7)
        assert one(unit, "KillMode") == "process"
        assert one(unit, "PrivateTmp") == "no"
    else:
        assert one(unit, "KillMode") == "control-group"
        assert one(unit, "PrivateTmp") == "yes"
    if name != "skr8tr-ingress.service":  # the ingress writes nothing
        state = one(unit, "StateDirectory")
        assert one(unit, "ReadWritePaths") == f"/var/lib/{state}"


def test_systemd_analyze_verify(tmp_path):
    # tools/test installs Debian's systemd for this; missing, the test fails, not skips.
    assert shutil.which("systemd-analyze"), "systemd-analyze is missing (Debian: systemd)"
    for name in UNITS:
        text = (CONTRIB / name).read_text().replace(BINARY, skr8tr_command()[0])
        (tmp_path / name).write_text(text)
    proc = subprocess.run(["systemd-analyze", "verify", *(str(tmp_path / n) for n in UNITS)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    ours = [line for line in proc.stderr.splitlines() if "skr8tr" in line]
    assert not ours, "\n".join(ours)


def _moved(text: str, root: Path, ports: dict[str, str]) -> str:
    """A unit's or config's *text* with its paths under *root* and its addresses free."""
    text = text.replace(BINARY, skr8tr_command()[0])
    text = text.replace("/etc/skr8tr", str(root / "etc"))
    text = text.replace("/var/lib/skr8tr", str(root / "var"))
    for old, new in ports.items():
        text = text.replace(old, new)
    return text


@pytest.mark.e2e
def test_units_serve_an_app_from_their_config_files(tmp_path):
    ws, http, ingress = free_port(), free_port(), free_port()
    ports = {"0.0.0.0:7771": f"127.0.0.1:{ws}", "127.0.0.1:7780": f"127.0.0.1:{http}",
             "conductor.example.org:7771": f"127.0.0.1:{ws}",
             "0.0.0.0:8080": f"127.0.0.1:{ingress}"}
    cluster = Cluster(root=tmp_path, env=private_env(tmp_path))
    cluster.ws_port, cluster.http_port = ws, http
    cluster.make_keys()
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "authorized_keys").write_text(cluster.authorized_keys.read_text())
    shutil.copy(cluster.node_key, etc / "node.sec")
    for name in ("conductor.toml", "node.toml", "ingress.toml"):
        (etc / name).write_text(_moved((CONTRIB / name).read_text(), tmp_path, ports))
    argv = {}
    for name in UNITS:
        unit = parse_unit(CONTRIB / name)
        # what systemd would do before ExecStart: make the StateDirectory
        for state in unit["Service"].get("StateDirectory", []):
            (tmp_path / "var" / state.removeprefix("skr8tr/")).mkdir(parents=True)
        argv[name] = shlex.split(_moved(one(unit, "ExecStart"), tmp_path, ports))

    # A port block of its own, and two nodes on one machine: given as environment
    # variables, which override the config files (as `systemctl edit` would).
    cluster.env["SKR8TR_CONDUCTOR_PORT_RANGE"] = new_port_block()

    def start_node(node_id: str) -> None:
        cluster.env.update(SKR8TR_NODE_NODE_ID=node_id,
                           SKR8TR_NODE_DATA_DIR=str(tmp_path / "var" / "node" / node_id))
        cluster.nodes[node_id] = cluster.start_process(node_id, argv["skr8tr-node.service"])
        del cluster.others[node_id]
        poll(lambda: node_id in {n["node"] for n in cluster.json("nodes")}
             or cluster._died(cluster.nodes[node_id]), what=f"node {node_id} to join")
        cluster._assert_alive(cluster.nodes[node_id])

    try:
        cluster.conductor = cluster.start_process("conductor", argv["skr8tr-conductor.service"])
        del cluster.others["conductor"]
        poll(lambda: cluster.cli("ping").returncode == 0 or cluster._died(cluster.conductor),
             what="the conductor to answer ping")
        cluster._assert_alive(cluster.conductor)
        start_node("n1")
        start_node("n2")
        daemon = cluster.start_process("ingress", argv["skr8tr-ingress.service"])

        cluster.cli_ok("up", str(MANIFESTS / "web.skr8tr"))
        rows = cluster.wait_ready("web", 3)
        assert {r["node"] for r in rows} == {"n1", "n2"}
        status, headers, _ = poll(lambda: (r := http_get("127.0.0.1", ingress, "/"))[0] == 200
                                  and r, what="a 200 through the ingress")
        assert headers["X-Version"] == "v1"
        cluster._assert_alive(daemon)
        # the example config's state file and audit log, in the StateDirectory
        assert (tmp_path / "var" / "conductor" / "state.toml").exists()
        assert (tmp_path / "var" / "conductor" / "audit.log").stat().st_size > 0

        # `systemctl restart skr8tr-node` with KillMode=process: only the agent is
        # signalled; its workloads keep running and the new agent adopts them.
        before = {r["replica"]: r["pid"] for r in rows if r["node"] == "n1"}
        assert cluster.nodes["n1"].stop() == 0
        start_node("n1")
        after = poll(lambda: (rs := {r["replica"]: r["pid"] for r in cluster.replicas("web")
                                     if r["node"] == "n1" and r["state"] == "ready"})
                     == before and rs, what="n1's replicas adopted with the same pids")
        assert after == before

        cluster.cli_ok("down", "web")  # the node unit leaves workloads running on exit
        poll(lambda: not cluster.replicas(), what="web's replicas to stop")
    finally:
        cluster.shutdown()
