"""The audit log: a hash chain over JSON lines, what the conductor writes, `audit verify`."""

from __future__ import annotations

import json
import logging
import subprocess
import time
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from skr8tr import audit_head
from skr8tr.conductor import audit
from skr8tr.conductor.daemon import ConductorConfig, StartError, run_conductor
from skr8tr.core import audit_chain, keys, manifest, signatures
from skr8tr.core.audit_chain import GENESIS, ChainError, Head
from tests.conftest import skr8tr_command
from tests.security_helpers import open_conductor, scrape, send_all
from tests.wire_helpers import encode_request

DEADLINE_S = 30
SECRET = "s3cret-value-never-logged"


def chain(n: int) -> tuple[bytes, Head]:
    head = Head(0, GENESIS)
    lines = []
    for i in range(n):
        line, head = audit_chain.seal({"cmd": "scale", "args": {"app": f"a{i}",
                                                                "replicas": i}}, head)
        lines.append(line)
    return "".join(lines).encode(), head


# ---------------------------------------------------------------------- the chain


def test_an_intact_chain_verifies_and_reports_its_head():
    data, head = chain(5)
    assert audit_chain.verify(data).head == head
    assert audit_chain.verify(b"").head == Head(0, GENESIS)
    assert audit_chain.verify(data, recorded=head).expected_at is None
    assert audit_chain.verify(data, expect_head=head.hash).expected_at == 5


def _lines(data: bytes) -> list[bytes]:
    return data.split(b"\n")[:-1]


def _join(lines: list[bytes]) -> bytes:
    return b"".join(line + b"\n" for line in lines)


@pytest.mark.parametrize("tamper, bad_line", [
    (lambda ls: ls[:2] + [ls[2].replace(b'"replicas":2', b'"replicas":9')] + ls[3:], 3),
    (lambda ls: ls[:1] + ls[2:], 2),  # a line removed
    (lambda ls: ls[1:], 1),  # the first line removed
    (lambda ls: [ls[0], ls[2], ls[1], *ls[3:]], 2),  # two lines swapped
    (lambda ls: ls[:3] + [ls[3].replace(b'"cmd":"scale"', b'"cmd": "scale"')] + ls[4:], 4),
    (lambda ls: ls[:4] + [b"not json"], 5),
    (lambda ls: ls + [b"{}"], 6),
])
def test_edits_are_found_at_their_line(tamper, bad_line):
    data, _ = chain(5)
    with pytest.raises(ChainError) as found:
        audit_chain.verify(_join(tamper(_lines(data))))
    assert found.value.line == bad_line


def test_a_torn_last_line_is_found():
    data, _ = chain(3)
    with pytest.raises(ChainError, match="incomplete") as found:
        audit_chain.verify(data[:-10])
    assert found.value.line == 3


def test_cutting_the_end_needs_a_head_kept_elsewhere():
    data, head = chain(5)
    cut = _join(_lines(data)[:3])
    assert audit_chain.verify(cut).head.entries == 3, "on its own, a shorter chain is valid"
    with pytest.raises(ChainError, match="cut off the end"):
        audit_chain.verify(cut, expect_head=head.hash)
    with pytest.raises(ChainError, match="cut off the end"):
        audit_chain.verify(cut, recorded=head)
    # One entry past the recorded head is a crash between the two writes: accepted.
    four = _join(_lines(data)[:4])
    assert audit_chain.verify(data, recorded=Head(4, audit_chain.verify(four).head.hash))
    with pytest.raises(ChainError, match="stale"):
        audit_chain.verify(data, recorded=Head(3, audit_chain.verify(cut).head.hash))


def test_a_rewritten_chain_is_found_only_against_a_kept_head():
    data, head = chain(4)
    forged, forged_head = chain(4)
    forged = forged.replace(b'"replicas":3', b'"replicas":7')
    forged = _join(_lines(forged)[:3]) + audit_chain.seal(
        {"cmd": "scale", "args": {"app": "a3", "replicas": 7}},
        audit_chain.verify(_join(_lines(forged)[:3])).head)[0].encode()
    assert audit_chain.verify(forged).head != head
    with pytest.raises(ChainError, match="rewritten"):
        audit_chain.verify(forged, recorded=head)
    with pytest.raises(ChainError):
        audit_chain.verify(forged, expect_head=head.hash)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_any_single_byte_change_is_detected(data):
    log, head = chain(4)
    at = data.draw(st.integers(0, len(log) - 1))
    new = data.draw(st.integers(0, 255).filter(lambda b: b != log[at]))
    changed = log[:at] + bytes([new]) + log[at + 1:]
    with pytest.raises(ChainError):
        audit_chain.verify(changed, recorded=head)


def test_seal_refuses_reserved_fields():
    with pytest.raises(ValueError, match="seq"):
        audit_chain.seal({"seq": 1}, Head(0, GENESIS))


# ---------------------------------------------------------------------- redaction


def test_manifests_are_recorded_without_env_values():
    text = f"app web\n  exec /bin/true\n  env\n    TOKEN {SECRET}\n    MODE prod\n"
    args = {"manifest": text, "format": "skr8tr", "base_dir": "/x"}
    parsed = manifest.parse_manifest(text, filename="m", base_dir="/x")
    shown = audit.redact_args("up", args, parsed)
    assert SECRET not in json.dumps(shown) and "prod" not in json.dumps(shown)
    assert shown["app"] == "web" and shown["env_keys"] == ["MODE", "TOKEN"]
    assert shown["manifest_bytes"] == len(text.encode())
    # Without the caller's parse (a refused request's), the text is never parsed.
    unparsed = audit.redact_args("up", args)
    assert "app" not in unparsed and unparsed["manifest_sha256"] == shown["manifest_sha256"]
    broken = audit.redact_args("up", {"manifest": f"app ?? {SECRET}", "format": "skr8tr"})
    assert SECRET not in json.dumps(broken) and "manifest_sha256" in broken
    assert audit.redact_args("down", "nonsense") == {"unreadable": "'nonsense'"}


# ---------------------------------------------------------------------- a real conductor


def manifest_args(tmp_path: Path) -> dict:
    return {"manifest": f"app vault\n  exec /bin/sleep\n  args 60\n  replicas 0\n  env\n"
                        f"    API_TOKEN {SECRET}\n",
            "format": "skr8tr", "base_dir": str(tmp_path)}


def run_verify(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*skr8tr_command(), "audit", "verify", *args], capture_output=True,
                          text=True, timeout=30, stdin=subprocess.DEVNULL)


async def test_conductor_records_every_signed_command(tmp_path: Path, caplog):
    caplog.set_level(logging.DEBUG)
    log_path = tmp_path / "audit" / "audit.jsonl"
    stranger, _ = keys.generate_keypair()
    with trio.fail_after(DEADLINE_S):
        async with open_conductor(tmp_path, audit_log=str(log_path)) as c:
            up = encode_request(id="1", cmd="up", args=manifest_args(tmp_path),
                                         signing_key=c.admin, ts=time.time())
            forged = encode_request(id="2", cmd="up", args=manifest_args(tmp_path),
                                             signing_key=stranger, ts=time.time())
            unsigned = encode_request(id="3", cmd="down", args={"app": "vault"})
            scale = encode_request(id="4", cmd="scale",
                                            args={"app": "vault", "replicas": 0},
                                            signing_key=c.admin, ts=time.time())
            ping = encode_request(id="5", cmd="ping", args={})
            down = encode_request(id="6", cmd="down", args={"app": "vault"},
                                           signing_key=c.admin, ts=time.time())
            replies = await send_all(c.url, [up, forged, unsigned, scale, scale, ping, down])
            codes = [r["error"]["code"] if not r["ok"] else "ok" for r in replies]
            assert codes == ["ok", "UNAUTHORIZED", "UNAUTHORIZED", "ok", "REPLAY", "ok", "ok"]
            samples = await scrape(c.http_port)
            assert samples[("skr8tr_audit_entries", ())] == 6
            assert samples[("skr8tr_audit_write_errors_total", ())] == 0

    text = log_path.read_text()
    assert SECRET not in text and SECRET not in caplog.text
    entries = [json.loads(line) for line in text.splitlines()]
    assert [(e["cmd"], e["verified"], e["result"]["ok"]) for e in entries] == [
        ("up", True, True), ("up", False, False), ("down", False, False),
        ("scale", True, True), ("scale", True, False), ("down", True, True)]
    first = entries[0]
    assert first["key"] == signatures.fingerprint(c.admin.public)
    assert first["peer"] == "127.0.0.1" and first["args"]["app"] == "vault"
    assert first["args"]["env_keys"] == ["API_TOKEN"]
    assert first["result"] == {"ok": True, "app": "vault", "generation": 1, "replicas": 0}
    assert entries[1]["key"] == signatures.fingerprint(stranger.public)
    assert entries[1]["result"]["code"] == "UNAUTHORIZED"
    assert entries[2]["key"] is None
    assert entries[4]["result"]["code"] == "REPLAY"
    assert first["utc"].endswith("Z") and abs(first["time"] - time.time()) < 60

    good = run_verify(str(log_path))
    assert good.returncode == 0, good.stderr
    head = audit_chain.verify(log_path.read_bytes()).head
    assert good.stdout.strip() == f"{log_path}: intact, 6 entries; head {head.hash}"
    assert audit_head.read_head_file(str(log_path)) == head
    as_json = json.loads(run_verify(str(log_path), "--json").stdout)
    assert as_json["entries"] == 6 and as_json["checked_against"] == ["the HEAD file"]

    # An edited line is named; so is a cut-off end (the HEAD file remembers it).
    original = log_path.read_bytes()
    log_path.write_bytes(original.replace(b'"replicas":0', b'"replicas":5', 1))
    edited = run_verify(str(log_path))
    assert edited.returncode == 1
    assert edited.stderr.startswith(f"error: AUDIT: {log_path}:1: ")
    log_path.write_bytes(_join(_lines(original)[:4]))
    cut = run_verify(str(log_path))
    assert cut.returncode == 1 and "cut off the end" in cut.stderr
    # Without the HEAD file, only a head kept elsewhere tells.
    Path(audit_head.head_path(str(log_path))).unlink()
    alone = run_verify(str(log_path))
    assert alone.returncode == 0 and "cannot be told apart" in alone.stderr
    expected = run_verify(str(log_path), "--expect-head", head.hash)
    assert expected.returncode == 1 and "not in the chain" in expected.stderr
    assert run_verify(str(tmp_path / "missing")).returncode == 2
    assert run_verify(str(log_path), "--expect-head", "xyz").returncode == 2


async def test_conductor_refuses_to_start_on_a_broken_log_and_continues_an_intact_one(
        tmp_path: Path):
    log_path = tmp_path / "audit.jsonl"
    with trio.fail_after(DEADLINE_S):
        async with open_conductor(tmp_path, audit_log=str(log_path)) as c:
            down = encode_request(id="1", cmd="down", args={"app": "x"},
                                           signing_key=c.admin, ts=time.time())
            assert (await send_all(c.url, [down]))[0]["error"]["code"] == "NOT_FOUND"
        # A second start continues the same chain.
        async with open_conductor(tmp_path, audit_log=str(log_path)) as c:
            down = encode_request(id="2", cmd="down", args={"app": "y"},
                                           signing_key=c.admin, ts=time.time())
            await send_all(c.url, [down])
    assert audit_chain.verify(log_path.read_bytes()).head.entries == 2
    log_path.write_bytes(log_path.read_bytes().replace(b'"app":"y"', b'"app":"z"'))
    config = ConductorConfig(listen=("127.0.0.1", 0), http=("127.0.0.1", 0), insecure=True,
                             audit_log=str(log_path))
    with pytest.raises(StartError, match=r"audit.jsonl:2: .*edited"):
        await run_conductor(config)  # refuses before it listens or starts anything
