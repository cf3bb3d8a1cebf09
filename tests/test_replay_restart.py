"""No request accepted before a conductor restart is accepted after it (#13.8).

A restarted conductor refuses what was signed before it started (``not_before``),
and keeps the nonces of requests signed ahead of its clock in ``STATE.nonces``,
the only ones ``not_before`` cannot tell from fresh ones.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest

from skr8tr import blocking_client, keyfiles
from skr8tr.conductor import replay_store
from skr8tr.core import envelope, keys
from skr8tr.core.envelope import AuthError, ReplayGuard
from tests.e2e import Cluster, running_cluster
from tests.wire_helpers import encode_request

NOW = 1_700_000_000.0
ADMIN, ADMIN_PUB = keys.generate_keypair()
AUTHORIZED = keys.parse_authorized_keys(f"admin {ADMIN_PUB} test\n", filename="ak")


def request(ts: float, cmd: str = "scale", args: dict | None = None) -> dict:
    return json.loads(encode_request(
        id="r", cmd=cmd, args={"app": "web", "replicas": 2} if args is None else args,
        signing_key=ADMIN, ts=ts))


def admit(guard: ReplayGuard, req: dict, now: float) -> str:
    """"ok" or the refusal's code, as the conductor judges the request at *now*."""
    try:
        envelope.verify_request(req, authorized=AUTHORIZED, guard=guard, now=now)
    except AuthError as exc:
        return exc.code
    return "ok"


# --------------------------------------------------------------------------- the guard


def test_a_restart_refuses_every_request_accepted_before_it(tmp_path):
    path = str(tmp_path / "state.toml.nonces")
    first = replay_store.DurableReplayGuard(path, started_at=NOW)
    on_time = request(NOW + 1)
    ahead = request(NOW + 21)  # from a client whose clock runs 20 s ahead
    assert admit(first, on_time, NOW + 1.5) == "ok"
    assert admit(first, ahead, NOW + 1) == "ok"
    # The conductor restarts 2 s later; both are inside their 30 s window.
    second = replay_store.DurableReplayGuard(path, started_at=NOW + 3)
    assert admit(second, on_time, NOW + 4) == "EXPIRED"
    assert admit(second, ahead, NOW + 4) == "REPLAY"
    # Fresh requests pass, from either clock.
    assert admit(second, request(NOW + 4), NOW + 4) == "ok"
    assert admit(second, request(NOW + 24), NOW + 4) == "ok"
    # A second restart still remembers the request from ahead, until its window ends.
    third = replay_store.DurableReplayGuard(path, started_at=NOW + 5)
    assert admit(third, ahead, NOW + 6) == "REPLAY"
    assert admit(third, ahead, NOW + 51.5) == "EXPIRED"


def test_only_requests_signed_ahead_are_written_and_only_while_they_can_pass(tmp_path):
    path = tmp_path / "nonces"
    guard = replay_store.DurableReplayGuard(str(path), started_at=NOW)
    assert admit(guard, request(NOW), NOW + 0.1) == "ok"
    assert not path.exists()  # in the past when it arrived: not_before covers it
    for i in range(100):  # a client 5 s ahead, one request a second
        assert admit(guard, request(NOW + i + 5), NOW + i) == "ok"
    lines = [line for line in path.read_text().splitlines() if not line.startswith("#")]
    # Only those whose ts + 30 s has not passed at the last write: ts from NOW + 69.
    assert len(lines) == 36
    assert oct(path.stat().st_mode & 0o777) == "0o600"


def test_an_unreadable_nonces_file_refuses_the_first_window_instead(tmp_path, caplog):
    path = tmp_path / "nonces"
    path.write_text(f"{ADMIN_PUB} not-a-nonce 1700000000.5\n")
    with caplog.at_level(logging.WARNING, logger="skr8tr.conductor"):
        guard = replay_store.DurableReplayGuard(str(path), started_at=NOW)
    assert f"{path}: line 1: expected KEY NONCE TS" in caplog.text
    assert admit(guard, request(NOW + 20), NOW + 1) == "EXPIRED"
    assert admit(guard, request(NOW + 30), NOW + 30) == "ok"


def test_a_failed_write_is_logged_and_the_request_goes_on(tmp_path, caplog):
    path = tmp_path / "no-such-folder" / "nonces"
    guard = replay_store.DurableReplayGuard(str(path), started_at=NOW)
    req = request(NOW + 10)
    with caplog.at_level(logging.ERROR, logger="skr8tr.conductor"):
        assert admit(guard, req, NOW) == "ok"
    assert f"cannot write {path}" in caplog.text
    assert admit(guard, req, NOW + 1) == "REPLAY"  # still spent in memory


def test_without_a_state_file_the_start_is_still_a_limit():
    guard = replay_store.open_replay_guard(None, started_at=NOW)
    assert type(guard) is ReplayGuard
    assert admit(guard, request(NOW - 1), NOW) == "EXPIRED"
    assert admit(guard, request(NOW), NOW) == "ok"


# --------------------------------------------------------------------------- end to end


@pytest.fixture
def cluster(tmp_path: Path):
    state_file = tmp_path / "state" / "conductor.toml"
    with running_cluster(tmp_path, "--state", str(state_file)) as c:
        c.state_file = state_file
        yield c


def signed_text(cluster: Cluster, cmd: str, args: dict, *, ahead_s: float = 0.0) -> str:
    return encode_request(
        id=f"t-{cmd}", cmd=cmd, args=args, signing_key=keyfiles.load_signing_key(
            str(cluster.admin_key)), ts=time.time() + ahead_s)


def send(cluster: Cluster, text: str) -> str:
    """Send one request on a fresh connection: "ok" or the error code."""
    with blocking_client.connect(cluster.url + "/v1/cli", 10) as conn:
        deadline = time.monotonic() + 10
        conn.send_text(text, deadline)
        reply = json.loads(conn.receive_message(deadline))
    return "ok" if reply["ok"] else reply["error"]["code"]


def apps(cluster: Cluster) -> list[str]:
    return [a["app"] for a in cluster.json("status")["apps"]]


def kill_and_restart(cluster: Cluster) -> None:
    cluster.conductor.proc.kill()  # SIGKILL: as after a crash
    cluster.conductor.proc.wait(timeout=10)
    cluster.start_conductor("--state", str(cluster.state_file))


def up(cluster: Cluster, tmp_path: Path) -> None:
    manifest = tmp_path / "web.skr8tr"
    manifest.write_text("app web\n  exec /bin/sleep\n  args 3600\n  replicas 0\n")
    cluster.json("up", str(manifest))


DOWN = {"app": "web"}
SCALE = {"app": "web", "replicas": 0}


@pytest.mark.e2e
def test_a_request_captured_before_a_restart_is_refused_after_it(cluster: Cluster, tmp_path):
    up(cluster, tmp_path)
    captured = signed_text(cluster, "down", DOWN)
    signed_at = time.monotonic()
    assert send(cluster, captured) == "ok"
    assert apps(cluster) == []
    up(cluster, tmp_path)
    kill_and_restart(cluster)
    assert apps(cluster) == ["web"]
    assert time.monotonic() - signed_at < 25, "the replay must be inside its 30 s window"
    assert send(cluster, captured) in ("EXPIRED", "REPLAY")
    assert apps(cluster) == ["web"]
    assert send(cluster, signed_text(cluster, "scale", SCALE)) == "ok"
    cluster.cli_ok("scale", "web", "0")
    assert "before this conductor (re)started" in cluster.conductor.log()


@pytest.mark.e2e
def test_a_request_signed_ahead_of_the_conductor_is_refused_after_a_restart(
        cluster: Cluster, tmp_path):
    up(cluster, tmp_path)
    captured = signed_text(cluster, "down", DOWN, ahead_s=20)  # a clock 20 s ahead
    signed_at = time.monotonic()
    assert send(cluster, captured) == "ok"
    up(cluster, tmp_path)
    kill_and_restart(cluster)
    assert time.monotonic() - signed_at < 15, "the replay must be inside the clock's lead"
    assert send(cluster, captured) == "REPLAY"
    assert apps(cluster) == ["web"]
    # Neither that admin nor one whose clock is right is locked out.
    assert send(cluster, signed_text(cluster, "scale", SCALE, ahead_s=20)) == "ok"
    cluster.cli_ok("scale", "web", "0")
