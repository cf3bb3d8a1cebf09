"""The conductor's side of /v1/ingress (DESIGN.md §11), against a real conductor
(``run_conductor`` on loopback ports) and a test client doing the handshake by hand:
who is welcomed, who is refused and why, what happens to bad, oversized and excess
reports, the cap on sessions, and a follower's answer."""

from __future__ import annotations

import json
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from skr8tr.conductor import daemon
from skr8tr.conductor.daemon import ConductorConfig, run_conductor
from skr8tr.conductor.limits import INGRESS_STRIKE_BURST, Limits
from skr8tr.conductor.seat import Seat
from skr8tr.core import keys
from skr8tr.core.signatures import HYBRID, ML_DSA_65, fingerprint
from skr8tr.ws import trio_client
from skr8tr.ws.frames import ConnectionClosed
from tests.ingress_client import open_ingress, report, say_hello
from tests.security_helpers import scrape, send_all
from tests.wire_helpers import encode_request

LEADER = "ws://10.0.0.9:7771"


@dataclass
class Conductor:
    url: str
    http_port: int
    seat: Seat
    admin: object
    node: object
    ingress: object
    pq_ingress: dict  # algorithm name -> signer


@asynccontextmanager
async def conductor(tmp_path: Path, monkeypatch, **config):
    """A conductor trusting an admin, a node and ingress keys (Ed25519, ML-DSA-65,
    hybrid); its seat is handed to the test (to make it a follower)."""
    admin, admin_pub = keys.generate_keypair()
    node, node_pub = keys.generate_keypair()
    ingress, ingress_pub = keys.generate_keypair()
    pq = {alg.name: keys.generate_keypair(alg)[0] for alg in (ML_DSA_65, HYBRID)}
    lines = [f"admin {admin_pub}", f"node {node_pub}", f"ingress {ingress_pub} edge",
             *(f"ingress {s.public} {name}" for name, s in pq.items())]
    authorized = tmp_path / "authorized_keys"
    authorized.write_text("\n".join(lines) + "\n")
    seats: list[Seat] = []

    def seat(**kw):
        seats.append(Seat(**kw))
        return seats[-1]

    monkeypatch.setattr(daemon, "Seat", seat)
    cfg = ConductorConfig(authorized_keys=str(authorized), listen=("127.0.0.1", 0),
                          http=("127.0.0.1", 0), **config)
    async with trio.open_nursery() as nursery:
        ws_port, http_port = await nursery.start(run_conductor, cfg)
        yield Conductor(f"ws://127.0.0.1:{ws_port}", http_port, seats[0], admin, node,
                        ingress, pq)
        nursery.cancel_scope.cancel()


async def status(url: str) -> dict:
    [reply] = await send_all(url, [encode_request(id="s", cmd="status", args={})])
    return reply["result"]


def refused(samples: dict, reason: str) -> float:
    return samples.get(("skr8tr_ingress_refused_total", (("reason", reason),)), 0.0)


async def wait_for(predicate, what: str, timeout_s: float = 10.0):
    with trio.fail_after(timeout_s):
        while True:
            value = await predicate()
            if value:
                return value
            await trio.sleep(0.05)
    raise AssertionError(what)  # not reached: fail_after raises


async def closed_with(ws) -> ConnectionClosed:
    """Read until the conductor closes *ws*; the close."""
    with trio.fail_after(15):
        while True:
            try:
                await ws.get_message()
            except ConnectionClosed as exc:
                return exc


# ---------------------------------------------------------------------- welcome


async def test_an_ingress_key_is_welcomed_and_its_reports_counted(tmp_path, monkeypatch):
    async with conductor(tmp_path, monkeypatch) as c, open_ingress(c.url, c.ingress) as ws:
        await ws.send_message(report(1))  # a heartbeat: no traffic
        await ws.send_message(report(2, {"web-404": ([200, 500], 3.0)}))

        async def two_reports():
            samples = await scrape(c.http_port)
            return samples[("skr8tr_ingress_reports_total", ())] == 2 and samples

        samples = await wait_for(two_reports, "two reports counted")
        assert samples[("skr8tr_ingress_sessions", ())] == 1
        # No such replica: the row is skipped, and counted.
        assert samples[("skr8tr_ingress_report_rows_unknown_total", ())] == 1
        [row] = (await status(c.url))["ingresses"]
        assert row["ingress"] == "edge-1" and row["address"] == "127.0.0.1"
        assert row["key"] == fingerprint(c.ingress.public) and row["reports"] == 2
        assert 0 <= row["last_report_s"] < 10
    async with conductor(tmp_path, monkeypatch) as c2:
        assert (await status(c2.url))["ingresses"] == []


@pytest.mark.parametrize("alg", [ML_DSA_65.name, HYBRID.name])
async def test_post_quantum_ingress_keys_are_welcomed(tmp_path, monkeypatch, alg):
    async with conductor(tmp_path, monkeypatch) as c, \
            open_ingress(c.url, c.pq_ingress[alg], "edge-pq") as ws:
        await ws.send_message(report(1))
        rows = await wait_for(
            lambda: _rows_with_reports(c.url), "the report counted")
        assert rows == [("edge-pq", fingerprint(c.pq_ingress[alg].public), 1)]


async def _rows_with_reports(url: str):
    rows = [(r["ingress"], r["key"], r["reports"]) for r in (await status(url))["ingresses"]]
    return rows if rows and all(n for _, _, n in rows) else None


# ---------------------------------------------------------------------- refusals


@pytest.mark.parametrize("who", ["forged", "node", "admin", "unknown", "node_domain"])
async def test_only_an_ingress_key_with_a_good_signature_is_welcomed(tmp_path, monkeypatch,
                                                                    who):
    async with conductor(tmp_path, monkeypatch) as c:
        stranger = keys.generate_keypair()[0]
        signer, kw = {
            # Claims the ingress key but signs with another: the signature fails.
            "forged": (stranger, {"key": c.ingress.public}),
            "node": (c.node, {}),
            "admin": (c.admin, {}),
            "unknown": (stranger, {}),
            # The ingress key's answer as a node: another domain, so it does not verify.
            "node_domain": (c.ingress, {"role": "node"}),
        }[who]
        async with trio_client.open_websocket(c.url + "/v1/ingress") as ws:
            answer = await say_hello(ws, signer, "edge-x", **kw)
            assert answer["type"] == "error" and answer["code"] == "UNAUTHORIZED", answer
            if who in ("node", "admin", "unknown"):
                assert (f"key {fingerprint(signer.public)} is not authorized as ingress; add "
                        f"`ingress {signer.public}`") in answer["message"]
            else:
                assert "bad join signature" in answer["message"]
            assert (await closed_with(ws)).code == 1008
        samples = await scrape(c.http_port)
        assert refused(samples, "unauthorized") == 1
        assert samples[("skr8tr_requests_refused_total", (("reason", "UNAUTHORIZED"),))] == 1
        assert (await status(c.url))["ingresses"] == []


@pytest.mark.parametrize("hello", [
    "not json", '{"type":"report","seq":1,"replicas":[]}',
    '{"type":"hello","ingress":"bad name!","key":"ab","sig":"cd","version":"1"}',
    '{"type":"hello","ingress":"e","key":"ab","sig":"cd","version":"1","extra":1}',
    '{"type":"hello","ingress":"e","key":"' + "a" * 5000 + '","sig":"cd","version":"1"}',
])
async def test_a_malformed_hello_is_a_bad_request(tmp_path, monkeypatch, hello):
    async with conductor(tmp_path, monkeypatch) as c:
        async with trio_client.open_websocket(c.url + "/v1/ingress") as ws:
            await ws.get_message()  # the challenge
            await ws.send_message(hello)
            answer = json.loads(await ws.get_message())
            assert answer["type"] == "error" and answer["code"] == "BAD_REQUEST", answer
            assert (await closed_with(ws)).code == 1008
        assert refused(await scrape(c.http_port), "bad_hello") == 1


async def test_no_hello_in_time_is_refused(tmp_path, monkeypatch):
    async with conductor(tmp_path, monkeypatch,
                         limits=Limits(handshake_timeout_s=0.5)) as c:
        async with trio_client.open_websocket(c.url + "/v1/ingress") as ws:
            await ws.get_message()
            answer = json.loads(await ws.get_message())
            assert answer["code"] == "BAD_REQUEST" and "no hello within 0.5 s" in answer["message"]
        assert refused(await scrape(c.http_port), "hello_timeout") == 1


# ---------------------------------------------------------------------- reports


@pytest.mark.parametrize("bad", [
    "[1, 2]",
    "{not json",
    '{"type":"report","seq":0,"replicas":[]}',
    '{"type":"report","seq":1,"replicas":[{"replica":"w-1","requests":1,"errors":1,'
    '"failed":1,"latency":[]}]}',  # errors + failed > requests
    '{"type":"report","seq":1,"replicas":[{"replica":"w-1","requests":1,"errors":0,'
    '"failed":0,"latency":[[99,1]]}]}',  # no such bucket
])
async def test_a_bad_report_is_answered_and_the_session_goes_on(tmp_path, monkeypatch, bad):
    async with conductor(tmp_path, monkeypatch) as c, open_ingress(c.url, c.ingress) as ws:
        await ws.send_message(bad)
        answer = json.loads(await ws.get_message())
        assert answer["type"] == "error" and answer["code"] == "BAD_REQUEST", answer
        await ws.send_message(report(1))
        assert await wait_for(lambda: _rows_with_reports(c.url), "the good report counted")
        samples = await scrape(c.http_port)
        assert refused(samples, "bad_report") == 1
        assert samples[("skr8tr_ingress_reports_total", ())] == 1


async def test_a_run_of_bad_reports_closes_the_session(tmp_path, monkeypatch):
    fast = Limits(ingress_reports_per_s=1000.0, ingress_report_burst=1000)  # strikes only
    async with conductor(tmp_path, monkeypatch, limits=fast) as c, \
            open_ingress(c.url, c.ingress) as ws:
        for _ in range(INGRESS_STRIKE_BURST + 4):
            await ws.send_message('{"type":"report"}')
        answers = 0
        with trio.fail_after(10):
            while True:
                try:
                    answers += json.loads(await ws.get_message())["code"] == "BAD_REQUEST"
                except ConnectionClosed as exc:
                    assert exc.code == 1008 and "too many bad reports" in exc.reason
                    break
        # Each is answered; the one past the strikes closes the session.
        assert INGRESS_STRIKE_BURST + 1 <= answers <= INGRESS_STRIKE_BURST + 2
        samples = await scrape(c.http_port)
        assert refused(samples, "strikes") == 1


async def test_a_message_over_256_kib_closes_the_session_1009(tmp_path, monkeypatch):
    async with conductor(tmp_path, monkeypatch) as c, open_ingress(c.url, c.ingress) as ws:
        # Just under the limit is read (and refused as a report, not closed).
        await ws.send_message('{"type":"report","pad":"' + "x" * (256 * 1024 - 40) + '"}')
        assert json.loads(await ws.get_message())["code"] == "BAD_REQUEST"
        await ws.send_message('{"type":"report","pad":"' + "x" * (256 * 1024) + '"}')
        assert (await closed_with(ws)).code == 1009
        samples = await scrape(c.http_port)
        assert refused(samples, "message_too_big") == 1
        assert samples[("skr8tr_connections_closed_total",
                        (("reason", "message_too_big"),))] == 1


async def test_reports_over_the_rate_are_dropped_then_the_session_closed(tmp_path,
                                                                        monkeypatch):
    limits = Limits()
    async with conductor(tmp_path, monkeypatch) as c, open_ingress(c.url, c.ingress) as ws:
        start = trio.current_time()
        sent = 40
        for seq in range(1, sent + 1):
            await ws.send_message(report(seq))
        exc = await closed_with(ws)
        elapsed = trio.current_time() - start
        assert exc.code == 1008 and "over the rate" in exc.reason
        samples = await scrape(c.http_port)
        accepted = samples[("skr8tr_ingress_reports_total", ())]
        dropped = refused(samples, "report_rate")
        # The burst, and what the rate earned meanwhile; every other one was dropped
        # until the strikes ran out (9 dropped: the 9th closed it; the rest unread).
        assert limits.ingress_report_burst <= accepted <= (
            limits.ingress_report_burst + limits.ingress_reports_per_s * elapsed + 1)
        assert dropped == INGRESS_STRIKE_BURST + 1
        assert refused(samples, "strikes") == 1
        assert samples[("skr8tr_connections_closed_total", (("reason", "rate_limit"),))] == 1


async def test_a_burst_within_the_strikes_is_dropped_and_the_session_lives(tmp_path,
                                                                          monkeypatch):
    async with conductor(tmp_path, monkeypatch) as c, open_ingress(c.url, c.ingress) as ws:
        for seq in range(1, 13):  # 8 accepted, about 4 dropped
            await ws.send_message(report(seq))
        await trio.sleep(1.5)  # the rate earns a few more
        await ws.send_message(report(13))

        async def all_read():
            s = await scrape(c.http_port)
            n = s[("skr8tr_ingress_reports_total", ())] + refused(s, "report_rate")
            return n == 13 and s

        samples = await wait_for(all_read, "13 reports accepted or dropped")
        assert 1 <= refused(samples, "report_rate") <= 4
        assert [r["ingress"] for r in (await status(c.url))["ingresses"]] == ["edge-1"]


async def test_a_silent_session_is_closed(tmp_path, monkeypatch):
    limits = Limits(ingress_interval_s=0.1)  # closed after 3 x 0.1 + 5 s
    async with conductor(tmp_path, monkeypatch, limits=limits) as c:
        async with trio_client.open_websocket(c.url + "/v1/ingress") as ws:
            assert (await say_hello(ws, c.ingress, "edge-1"))["interval_s"] == 0.1
            start = trio.current_time()
            exc = await closed_with(ws)
            assert exc.code == 1000 and "no report for 5.3 s" in exc.reason
            assert 5.0 < trio.current_time() - start < 10
        assert refused(await scrape(c.http_port), "idle_timeout") == 1


# ---------------------------------------------------------------------- sessions


async def test_the_17th_session_is_refused_until_one_leaves(tmp_path, monkeypatch):
    async with conductor(tmp_path, monkeypatch) as c:
        async with trio.open_nursery() as nursery:
            leave = [trio.Event() for _ in range(16)]

            async def hold(i, *, task_status=trio.TASK_STATUS_IGNORED):
                async with open_ingress(c.url, c.ingress, f"edge-{i}"):
                    task_status.started()
                    await leave[i].wait()

            for i in range(16):
                await nursery.start(hold, i)
            async with trio_client.open_websocket(c.url + "/v1/ingress") as ws:
                answer = await say_hello(ws, c.ingress, "edge-16")
                assert answer["code"] == "NO_CAPACITY" and "--max-ingresses" in answer["message"]
            assert len((await status(c.url))["ingresses"]) == 16
            leave[0].set()
            await wait_for(lambda: _count_ingresses(c.url, 15), "one session gone")
            async with open_ingress(c.url, c.ingress, "edge-16"):
                assert len((await status(c.url))["ingresses"]) == 16
            for event in leave:
                event.set()
        assert refused(await scrape(c.http_port), "too_many_ingresses") == 1


async def _count_ingresses(url: str, n: int) -> bool:
    return len((await status(url))["ingresses"]) == n


async def test_max_ingresses_is_a_flag(tmp_path, monkeypatch):
    async with conductor(tmp_path, monkeypatch, limits=Limits(max_ingresses=1)) as c, \
            open_ingress(c.url, c.ingress, "edge-a"), \
            trio_client.open_websocket(c.url + "/v1/ingress") as ws:
        assert (await say_hello(ws, c.ingress, "edge-b"))["code"] == "NO_CAPACITY"


async def test_a_reconnecting_ingress_replaces_its_old_session(tmp_path, monkeypatch):
    # The same name and key again: welcomed even at the cap; the old one is closed.
    async with conductor(tmp_path, monkeypatch, limits=Limits(max_ingresses=1)) as c, \
            open_ingress(c.url, c.ingress, "edge-a") as old, \
            open_ingress(c.url, c.ingress, "edge-a") as new:
        exc = await closed_with(old)
        assert exc.code == 1000 and "replaced" in exc.reason
        await new.send_message(report(1))
        assert await wait_for(lambda: _rows_with_reports(c.url), "the new one reports")
        assert len((await status(c.url))["ingresses"]) == 1


async def test_a_follower_answers_not_leader_and_a_deposed_leader_closes_sessions(
        tmp_path, monkeypatch):
    async with conductor(tmp_path, monkeypatch) as c, open_ingress(c.url, c.ingress) as ws:
        c.seat.step_down(LEADER)
        assert (await closed_with(ws)).code in (1000, 1001, 1006)
        async with trio_client.open_websocket(c.url + "/v1/ingress") as ws2:
            answer = json.loads(await ws2.get_message())
            assert answer == {"type": "error", "code": "NOT_LEADER", "leader": LEADER,
                              "message": f"this conductor is a follower; the leader is {LEADER}"}
        assert refused(await scrape(c.http_port), "not_leader") == 1


def big_report(seq: int, size: int) -> str:
    """A valid report of about *size* bytes (rows for replicas nobody runs)."""
    rows = [{"replica": f"web-{10**6 + i}", "requests": 1, "errors": 0, "failed": 0,
             "latency": [[20, 1]]} for i in range(size // 90)]
    return json.dumps({"type": "report", "seq": seq, "replicas": rows})


async def test_an_ingress_over_its_byte_rate_is_slowed_not_closed(tmp_path, monkeypatch):
    rate = Limits().ingress_bytes_per_s  # twice that saved up
    async with conductor(tmp_path, monkeypatch) as c, open_ingress(c.url, c.ingress) as ws:
        texts = [big_report(seq, 250 * 1024) for seq in range(1, 5)]
        assert all(rate * 0.9 < len(t) < rate for t in texts)
        start = trio.current_time()
        for text in texts:
            await ws.send_message(text)

        async def all_four():
            s = await scrape(c.http_port)
            return s[("skr8tr_ingress_reports_total", ())] == 4 and s

        samples = await wait_for(all_four, "the four reports, slowed")
        # Two fit the saved-up budget; the third and the fourth each wait for theirs.
        assert trio.current_time() - start > 2 * 0.9 * 250 * 1024 / rate - 0.2
        assert samples[("skr8tr_ingress_reads_paused_total", ())] == 2
        assert refused(samples, "report_rate") == 0
        assert [r["reports"] for r in (await status(c.url))["ingresses"]] == [4]


async def test_insecure_welcomes_any_well_formed_key_and_refuses_a_malformed_one(
        tmp_path, monkeypatch):
    async with conductor(tmp_path, monkeypatch, insecure=True) as c:
        stranger = keys.generate_keypair()[0]
        async with open_ingress(c.url, stranger, "edge-any"):  # asserts the welcome
            assert [i["ingress"] for i in (await status(c.url))["ingresses"]] == ["edge-any"]
        async with trio_client.open_websocket(c.url + "/v1/ingress") as ws:
            # Not a key: no authorized-keys line is made of it (a newline could add a role).
            answer = await say_hello(ws, stranger, "edge-x",
                                     key=stranger.public[:10] + "\nadmin " + stranger.public)
            assert answer["code"] == "UNAUTHORIZED" and "key must be" in answer["message"]


async def test_every_report_is_counted_once_accepted_or_refused(tmp_path, monkeypatch):
    """Mutated reports (a deterministic fuzz): each is accepted or answered BAD_REQUEST,
    and the counts add up to what was sent; the conductor goes on serving."""
    import random

    from skr8tr.conductor import ingress_sessions

    rnd = random.Random(18)
    fast = Limits(ingress_reports_per_s=1e6, ingress_report_burst=10**6)
    monkeypatch.setattr(ingress_sessions, "INGRESS_STRIKE_BURST", 10**6)  # strikes: above
    base = json.loads(report(1, {"web-1": ([200, 500, None, 200], 12.0)}))
    values = [None, True, -1, 0, 1, 2**53 + 1, 1.5, "x", [], {}, [[0, 1]], [[61, 2]],
              [[62, 1]], [[0, 0]], "web-" + "9" * 200, 10**9, 10**9 + 1]
    sent = 0
    async with conductor(tmp_path, monkeypatch, limits=fast) as c, \
            open_ingress(c.url, c.ingress) as ws:
        bad = 0
        for seq in range(1, 201):
            msg = json.loads(json.dumps(base))
            msg["seq"] = seq
            row = msg["replicas"][0]
            where, key = rnd.choice([(msg, "seq"), (msg, "replicas"), (msg, "type"),
                                     (row, "replica"), (row, "requests"), (row, "errors"),
                                     (row, "failed"), (row, "latency"), (row, "extra")])
            if rnd.random() < 0.3:
                where.pop(key, None)
            else:
                where[key] = rnd.choice(values)
            await ws.send_message(json.dumps(msg))
            sent += 1

        async def accepted_or_refused():
            nonlocal bad
            with trio.move_on_after(0.1):
                while True:  # each refused one is answered
                    answer = json.loads(await ws.get_message())
                    assert answer["type"] == "error" and answer["code"] == "BAD_REQUEST"
                    bad += 1
            s = await scrape(c.http_port)
            return s[("skr8tr_ingress_reports_total", ())] + bad == sent and s

        samples = await wait_for(accepted_or_refused, "every report accepted or refused")
        assert refused(samples, "bad_report") == bad and 0 < bad < sent
        assert (await status(c.url))["ingresses"][0]["reports"] == sent - bad
