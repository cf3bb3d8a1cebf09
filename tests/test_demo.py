"""``./tools/demo`` as a user runs it: the export line it prints works from any folder.

The real script, in a folder of its own (SKR8TR_DEMO_DIR) and on free ports, so a
demo the developer has running is left alone; then the printed ``export`` line is
run in a fresh bash in another folder, where ``skr8tr`` (not on PATH before it)
must find the cluster and sign with the demo's key. ``./tools/demo stop`` ends it
and every workload.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import psutil
import pytest

from tests.conftest import free_port
from tests.e2e import poll

REPO = Path(__file__).resolve().parent.parent


def assert_rollout_stopped_by_traffic(stdout: str) -> None:
    """The demo's last step: hello's bad release rolled back on what users saw, v1 never
    failing a request."""
    assert re.search(r"^    generation 2 rolled_back: .*error rate", stdout, re.M), stdout[-3000:]
    users = dict(re.findall(r"^    (v[12]): (\d+ requests, \d+ failed)$", stdout, re.M))
    assert users["v1"].endswith(" 0 failed"), stdout[-3000:]
    assert not users["v2"].endswith(" 0 failed"), stdout[-3000:]


@pytest.mark.e2e
def test_demo_export_line_works_from_another_folder(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKR8TR_")}
    env.update(HOME=str(tmp_path / "home"), SKR8TR_DEMO_DIR=str(tmp_path / "demo"),
               SKR8TR_DEMO_API=str(free_port()), SKR8TR_DEMO_HTTP=str(free_port()),
               SKR8TR_DEMO_INGRESS=str(free_port()),
               SKR8TR_DEMO_INGRESS_ANALYSIS=str(free_port()))
    # without the venv on PATH, as a user's shell is
    bin_dir = str(REPO / ".venv" / "bin")
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if p != bin_dir and "/.venv/" not in p + "/")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    pids: list[int] = []
    try:
        demo = subprocess.run([str(REPO / "tools" / "demo")], env=env, cwd=elsewhere,
                              capture_output=True, text=True, timeout=600,
                              stdin=subprocess.DEVNULL)
        assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
        assert "web: complete generation 1 -> 2, 3/3 replaced" in demo.stdout
        assert_rollout_stopped_by_traffic(demo.stdout)
        export = [line.strip().removeprefix("CLI:").strip() for line in demo.stdout.splitlines()
                  if line.strip().startswith("CLI:")]
        assert len(export) == 1 and export[0].startswith("export "), demo.stdout[-2000:]
        assert "SKR8TR_KEY=/" in export[0]  # absolute
        probe = subprocess.run(["bash", "--norc", "-c", "command -v skr8tr || echo none"],
                               env=env, cwd=elsewhere, capture_output=True, text=True,
                               timeout=30)
        assert probe.stdout.strip() == "none"  # not on PATH before the export
        proc = subprocess.run(["bash", "--norc", "-c", f"{export[0]}\nskr8tr list web --json"],
                              env=env, cwd=elsewhere, capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 0, proc.stderr
        rows = json.loads(proc.stdout)
        pids = [r["pid"] for r in rows if r["pid"]]
        assert len(rows) == 3 and {r["generation"] for r in rows} == {2}
        # a signed verb works too: the key path resolves from here
        proc = subprocess.run(["bash", "--norc", "-c", f"{export[0]}\nskr8tr scale web 2"],
                              env=env, cwd=elsewhere, capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 0, proc.stderr
    finally:
        stop = subprocess.run([str(REPO / "tools" / "demo"), "stop"], env=env, cwd=elsewhere,
                              capture_output=True, text=True, timeout=120)
        assert stop.returncode == 0, stop.stderr
    poll(lambda: not [p for p in pids if psutil.pid_exists(p)
                      and psutil.Process(p).status() != psutil.STATUS_ZOMBIE],
         what="the demo's workloads to stop")
