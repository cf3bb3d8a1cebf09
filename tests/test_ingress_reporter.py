"""The ingress's traffic reports (skr8tr/ingress/reporter.py) against a conductor played in
the test exactly as DESIGN.md §11 says: a random challenge, the hello's signature checked
with ``envelope.verify_challenge(role="ingress")`` against authorized keys, a welcome,
then reports decoded with ``core.traffic.decode_report``; followers answer NOT_LEADER,
unknown keys UNAUTHORIZED. Real sockets, the real ingress (run_ingress) routing to real
replicas (tests/test_ingress_traffic.py), every test under a deadline, polling for what
it waits for. The conductor's own side is tested with the conductor.
"""

from __future__ import annotations

import json
import logging
import ssl
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

from skr8tr import __version__, tls
from skr8tr.core import envelope, protocol
from skr8tr.core.keys import AuthorizedKeys, generate_keypair, parse_authorized_keys
from skr8tr.core.traffic import BOUNDS_MS, Counts, Report, bucket_of, decode_report
from skr8tr.ingress import reporter as reporter_mod
from skr8tr.ingress import upstreams
from skr8tr.ingress.daemon import IngressConfig, run_ingress
from skr8tr.ingress.reporter import Reporter, encode_reports
from skr8tr.ingress.routes import BackendTable, Route
from skr8tr.ingress.traffic import TrafficCounter
from skr8tr.ws import server as wsserver
from skr8tr.ws import trio_client
from tests.conftest import free_port
from tests.fake_conductors import wait_for
from tests.test_ingress_proxy import open_client
from tests.test_ingress_traffic import serve_replica
from tests.ws_helpers import serve_websocket

DEADLINE_S = 30.0
_GONE = (trio_client.ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError)


class Intake:
    """The conductor's side of /v1/ingress (and a /v1/watch snapshot of ``state``).

    ``role``: ``leader`` or ``follower`` (NOT_LEADER naming ``leader``). Every hello
    is kept in ``hellos``; every session's decoded reports in ``sessions``.
    ``refuse_seq``: report numbers answered BAD_REQUEST; ``deaf``: after the welcome,
    read nothing more (a frozen conductor); ``interval_s`` goes in the welcome."""

    def __init__(self, authorized: AuthorizedKeys, *, role: str = "leader",
                 interval_s: Any = 0.25, ssl_context: ssl.SSLContext | None = None) -> None:
        self.ssl_context = ssl_context
        self.authorized = authorized
        self.role = role
        self.leader: str | None = None
        self.interval_s = interval_s
        self.state: dict[str, Any] = {"nodes": [], "replicas": []}
        self.connections = 0
        self.hellos: list[dict[str, Any]] = []
        self.refusals: list[str] = []
        self.sessions: list[list[Report]] = []
        self.sizes: list[int] = []  # of every report, in bytes
        self.refuse_seq: set[int] = set()
        self.deaf = False
        self.demoted_to: str | None = None  # after 2 reports: NOT_LEADER naming this
        self.challenge_bytes: str | None = None  # replaces the challenge message
        self.url = ""

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(serve_websocket, self._handle, "127.0.0.1", 0,
                                         self.ssl_context)
            scheme = "ws" if self.ssl_context is None else "wss"
            self.url = f"{scheme}://127.0.0.1:{server.port}"
            task_status.started(self.url)

    async def _handle(self, request: wsserver.Request) -> None:
        ws = await request.accept()
        try:
            if request.path == "/v1/watch":
                await ws.send_message(protocol.snapshot_message(1, 1.0, self.state))
                await trio.sleep_forever()
            assert request.path == "/v1/ingress", request.path
            self.connections += 1
            await self._ingress(ws)
        except _GONE:
            return

    async def _ingress(self, ws: Any) -> None:
        if self.role == "follower":
            await ws.send_message(json.dumps({"type": "error", "code": "NOT_LEADER",
                                              "message": "a follower", "leader": self.leader}))
            await ws.aclose(1000, "not the leader")
            return
        if self.challenge_bytes is not None:
            await ws.send_message(self.challenge_bytes)
            await ws.get_message()
            return
        challenge = envelope.new_challenge()
        await ws.send_message(json.dumps({"type": "challenge", "nonce": challenge.hex()}))
        hello = json.loads(await ws.get_message())
        self.hellos.append(hello)
        assert set(hello) == {"type", "ingress", "key", "sig", "version"}, hello
        assert hello["type"] == "hello"
        try:
            envelope.verify_challenge(key=hello["key"], sig=hello["sig"], challenge=challenge,
                                      node_id=hello["ingress"], authorized=self.authorized,
                                      role="ingress")
        except envelope.AuthError as exc:
            self.refusals.append(exc.message)
            await ws.send_message(json.dumps({"type": "error", "code": "UNAUTHORIZED",
                                              "message": exc.message}))
            await ws.aclose(1008, "unauthorized")
            return
        await ws.send_message(json.dumps({"type": "welcome", "interval_s": self.interval_s}))
        reports: list[Report] = []
        self.sessions.append(reports)
        while True:
            if self.deaf:
                await trio.sleep_forever()
            raw = await ws.get_message()
            self.sizes.append(len(raw.encode()))
            report = decode_report(json.loads(raw))
            assert report.seq == len(reports) + 1  # from 1, one by one, on each connection
            reports.append(report)
            if report.seq == 2 and self.demoted_to is not None:
                await ws.send_message(json.dumps({
                    "type": "error", "code": "NOT_LEADER", "message": "lost the lease",
                    "leader": self.demoted_to}))
                await ws.aclose(1000, "not the leader")
                return
            if report.seq in self.refuse_seq:
                await ws.send_message(json.dumps({"type": "error", "code": "BAD_REQUEST",
                                                  "message": f"report {report.seq} refused"}))

    def totals(self) -> dict[str, Counts]:
        out: dict[str, Counts] = {}
        for reports in self.sessions:
            for report in reports:
                for rid, counts in report.replicas.items():
                    out.setdefault(rid, Counts()).add(counts)
        return out


def authorized(*lines: tuple[str, str]) -> AuthorizedKeys:
    return parse_authorized_keys("".join(f"{role} {key}\n" for role, key in lines))


@asynccontextmanager
async def open_intakes(*intakes: Intake) -> AsyncIterator[None]:
    async with trio.open_nursery() as nursery:
        for intake in intakes:
            await nursery.start(intake.serve)
        yield
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def open_reporter(urls: str, signer, counter: TrafficCounter | None = None,
                        name: str = "edge-1", ca_file: str | None = None
                        ) -> AsyncIterator[Reporter]:
    reporter = Reporter(urls, counter or TrafficCounter(), signer, name, ca_file=ca_file)
    async with trio.open_nursery() as nursery:
        await nursery.start(reporter.run)
        yield reporter
        nursery.cancel_scope.cancel()


# ---------------------------------------------------------------------------- end to end


async def test_the_reports_sum_to_what_went_through_the_ingress():
    signer, pub = generate_keypair()
    intake = Intake(authorized(("ingress", pub)))
    with trio.fail_after(DEADLINE_S):
        async with open_intakes(intake), trio.open_nursery() as nursery:
            ports = {name: await nursery.start(serve_replica, name) for name in ("a", "b")}
            ports["c-dead"] = free_port()  # refused: each attempt on it fails, is retried
            intake.state = {"nodes": [{"node": "n1", "address": "127.0.0.1"}], "replicas": [
                {"app": "web", "replica": name, "node": "n1", "port": port, "pid": 1,
                 "generation": 1, "state": "ready"} for name, port in ports.items()]}
            config = IngressConfig(listen=("127.0.0.1", 0), routes=(Route("/", "web"),),
                                   conductor_url=intake.url, signer=signer, name="edge-1")
            synced = trio.Event()
            port = await nursery.start(lambda task_status: run_ingress(
                config, synced=synced, task_status=task_status))
            await synced.wait()
            await wait_for(lambda: intake.sessions, "the ingress to join")
            seen: Counter[tuple[str, bool]] = Counter()
            async with open_client(port) as c:
                for i in range(60):
                    r = await c.request("GET", "/status/503" if i % 5 == 0 else "/")
                    seen[(r.headers["x-replica"], r.status >= 500)] += 1
                    if i % 20 == 0:
                        await trio.sleep(0.3)  # across several intervals
            expected = {rid: (seen[(rid, False)] + seen[(rid, True)], seen[(rid, True)])
                        for rid in ("a", "b")}
            await wait_for(lambda: {rid: (c.requests, c.errors) for rid, c
                                    in intake.totals().items() if rid != "c-dead"} == expected,
                           f"reports adding up to {expected}")
            totals = intake.totals()
            # c-dead: as many attempts as the round robin gave it, each failed and retried
            model = BackendTable()
            model.apply_snapshot(intake.state)
            attempts = sum(model.pick("web").replica == "c-dead"
                           and model.pick("web", exclude={"c-dead"}) is not None
                           for _ in range(60))
            dead = totals.pop("c-dead")
            assert attempts > 10
            assert (dead.requests, dead.failed, dead.errors, dead.latency) == (
                attempts, attempts, 0, {})
            assert sum(c.failed for c in totals.values()) == 0
            assert all(sum(c.latency.values()) == c.requests for c in totals.values())
            # several intervals, idle ones as heartbeats; one hello, as the design says
            await wait_for(lambda: sum(not r.replicas for r in intake.sessions[0]) >= 2,
                           "heartbeats")
            assert len(intake.sessions) == 1 and len(intake.hellos) == 1
            hello = intake.hellos[0]
            assert (hello["ingress"], hello["key"], hello["version"]) == (
                "edge-1", pub, __version__)
            nursery.cancel_scope.cancel()


async def test_a_graceful_shutdown_reports_the_interval_under_way():
    signer, pub = generate_keypair()
    intake = Intake(authorized(("ingress", pub)), interval_s=60)  # no report due before
    with trio.fail_after(DEADLINE_S):
        async with open_intakes(intake), trio.open_nursery() as nursery:
            port_a = await nursery.start(serve_replica, "a")
            intake.state = {"nodes": [{"node": "n1", "address": "127.0.0.1"}], "replicas": [
                {"app": "web", "replica": "a", "node": "n1", "port": port_a, "pid": 1,
                 "generation": 1, "state": "ready"}]}
            config = IngressConfig(listen=("127.0.0.1", 0), routes=(Route("/", "web"),),
                                   conductor_url=intake.url, signer=signer)
            synced, shutdown, stopped = trio.Event(), trio.Event(), trio.Event()

            async def ingress(task_status=trio.TASK_STATUS_IGNORED) -> None:
                await run_ingress(config, shutdown=shutdown, synced=synced,
                                  task_status=task_status)
                stopped.set()

            port = await nursery.start(ingress)
            await synced.wait()
            await wait_for(lambda: intake.sessions, "the ingress to join")
            async with open_client(port) as c:
                for path in ("/", "/status/500", "/", "/sleep/30"):
                    await c.request("GET", path)
            assert intake.sessions == [[]]  # nothing reported yet: the interval is 60 s
            shutdown.set()
            await stopped.wait()
            [[report]] = intake.sessions
            counts = report.replicas["a"]
            assert (report.seq, counts.requests, counts.errors, counts.failed) == (1, 4, 1, 0)
            nursery.cancel_scope.cancel()


async def test_without_a_key_the_ingress_never_dials_v1_ingress(caplog):
    intake = Intake(authorized())
    caplog.set_level(logging.INFO, "skr8tr.ingress")
    with trio.fail_after(DEADLINE_S):
        async with open_intakes(intake), trio.open_nursery() as nursery:
            config = IngressConfig(listen=("127.0.0.1", 0), routes=(Route("/", "web"),),
                                   conductor_url=intake.url)
            synced = trio.Event()
            await nursery.start(lambda task_status: run_ingress(
                config, synced=synced, task_status=task_status))
            await synced.wait()
            await trio.sleep(0.5)  # two intervals' worth: nothing may come
            assert intake.connections == 0
            nursery.cancel_scope.cancel()
    assert "no --key: this ingress reports no traffic" in caplog.text


# ---------------------------------------------------------------------------- the link


async def test_a_follower_sends_the_reporter_to_the_leader():
    signer, pub = generate_keypair()
    keys = authorized(("ingress", pub))
    follower, leader = Intake(keys, role="follower"), Intake(keys)
    with trio.fail_after(DEADLINE_S):
        async with open_intakes(follower, leader):
            follower.leader = leader.url
            counter = TrafficCounter()
            async with open_reporter(follower.url, signer, counter) as reporter:
                await wait_for(lambda: reporter.connected_to == leader.url,
                               "a session with the leader")
                assert follower.connections == 1 and len(leader.sessions) == 1
                counter.answered("web-1", 200, 0.0, 0.004)
                counter.failed("web-1")
                await wait_for(lambda: "web-1" in leader.totals(), "the counts")
                counts = leader.totals()["web-1"]
                assert (counts.requests, counts.failed) == (2, 1)
                assert counts.latency == {bucket_of(4.0): 1}


async def test_a_wss_conductor_is_reported_to_only_when_its_certificate_verifies(
        pki, other_pki, caplog):
    caplog.set_level(logging.DEBUG, "skr8tr.ingress")
    signer, pub = generate_keypair()
    intake = Intake(authorized(("ingress", pub)),
                    ssl_context=tls.server_context(str(pki.cert), str(pki.key)))
    with trio.fail_after(DEADLINE_S):
        async with open_intakes(intake):
            async with open_reporter(intake.url, signer, ca_file=str(other_pki.ca)):
                await wait_for(lambda: "certificate does not verify" in caplog.text,
                               "the refusal of an unknown CA")
                assert not intake.hellos
            async with open_reporter(intake.url, signer, ca_file=str(pki.ca)):
                await wait_for(lambda: intake.sessions and intake.sessions[0], "a report")


async def test_a_leader_that_steps_down_sends_the_reporter_to_its_successor():
    signer, pub = generate_keypair()
    keys = authorized(("ingress", pub))
    old, new = Intake(keys), Intake(keys)
    with trio.fail_after(DEADLINE_S):
        async with open_intakes(old, new):
            old.demoted_to = new.url  # not in the reporter's list: only the hint leads there
            async with open_reporter(old.url, signer) as reporter:
                await wait_for(lambda: new.sessions and new.sessions[0], "a report to new")
                assert reporter.connected_to == new.url and old.connections == 1


async def test_an_unauthorized_key_is_logged_with_the_fix_and_tried_again(caplog,
                                                                         monkeypatch):
    monkeypatch.setattr(upstreams, "BACKOFF_MAX_S", 0.2)  # the wait after UNAUTHORIZED
    caplog.set_level(logging.INFO, "skr8tr.ingress")
    signer, pub = generate_keypair()
    intake = Intake(authorized(("node", pub), ("admin", pub)))  # not as ingress
    with trio.fail_after(DEADLINE_S):
        async with open_intakes(intake), open_reporter(intake.url, signer) as reporter:
            await wait_for(lambda: len(intake.refusals) >= 2, "a refusal, then a retry")
            assert not intake.sessions and reporter.connected_to is None
            errors = [r for r in caplog.records if r.levelno == logging.ERROR]
            assert errors and f"add `ingress {pub}`" in errors[0].getMessage()
            intake.authorized = authorized(("ingress", pub))  # the operator adds the line
            await wait_for(lambda: intake.sessions and intake.sessions[0], "a report")


async def test_a_node_signature_for_the_same_name_is_not_an_ingress_one():
    # What the conductor checks; here the proof that the reporter signs as role ingress
    # (the fake verifies with role="ingress") and that another role's answer fails.
    signer, pub = generate_keypair()
    keys = authorized(("ingress", pub), ("node", pub))
    challenge = envelope.new_challenge()
    node_sig = envelope.sign_challenge(signer, challenge, "edge-1")
    with pytest.raises(envelope.AuthError):
        envelope.verify_challenge(key=pub, sig=node_sig, challenge=challenge,
                                  node_id="edge-1", authorized=keys, role="ingress")


async def test_a_refused_report_is_logged_and_the_session_goes_on(caplog):
    caplog.set_level(logging.INFO, "skr8tr.ingress")
    signer, pub = generate_keypair()
    intake = Intake(authorized(("ingress", pub)))
    intake.refuse_seq = {2, 3}
    with trio.fail_after(DEADLINE_S):
        async with open_intakes(intake), open_reporter(intake.url, signer) as reporter:
            await wait_for(lambda: intake.sessions and len(intake.sessions[0]) >= 5,
                           "reports after the refused ones")
            assert reporter.stats.refused_reports == 2 and len(intake.sessions) == 1
    assert "refused a traffic report (1 so far): report 2 refused" in caplog.text


async def test_a_dropped_session_is_joined_again_with_seq_from_1():
    signer, pub = generate_keypair()
    intake = Intake(authorized(("ingress", pub)))
    with trio.fail_after(DEADLINE_S):
        async with open_intakes(intake):
            async with open_reporter(intake.url, signer):
                await wait_for(lambda: intake.sessions and intake.sessions[0], "a report")
            # the reporter was cancelled: its connection closed; a new one starts over
            async with open_reporter(intake.url, signer) as reporter:
                await wait_for(lambda: len(intake.sessions) == 2 and intake.sessions[1],
                               "a report on the new session")
                assert reporter.stats.sessions == 1


async def test_a_silent_conductor_is_left_and_joined_again(monkeypatch):
    monkeypatch.setattr(reporter_mod, "SILENCE_EXTRA_S", 0.5)  # 3 x 0.25 s + 0.5 s
    signer, pub = generate_keypair()
    intake = Intake(authorized(("ingress", pub)))
    intake.deaf = True
    with trio.fail_after(DEADLINE_S):
        async with open_intakes(intake), open_reporter(intake.url, signer) as reporter:
            # the fake counts a session when it sends the welcome, the reporter when it
            # reads it: both must come to two
            await wait_for(lambda: len(intake.sessions) >= 2 and reporter.stats.sessions >= 2,
                           "a second session")


async def test_counts_made_while_no_session_is_up_are_dropped_and_tallied(monkeypatch):
    monkeypatch.setattr(upstreams, "BACKOFF_MAX_S", 0.2)
    signer, pub = generate_keypair()
    intake = Intake(authorized())  # nobody: every attempt refused
    counter = TrafficCounter()
    with trio.fail_after(DEADLINE_S):
        async with open_intakes(intake), open_reporter(intake.url, signer,
                                                       counter) as reporter:
            await wait_for(lambda: intake.refusals, "a refusal")
            for _ in range(7):
                counter.failed("web-1")
            await wait_for(lambda: reporter.stats.dropped_requests == 7, "the drop")
            assert counter.take() == {} and reporter.stats.reports == 0


@pytest.mark.parametrize(("interval_s", "most"), [(1.0, 3), (0.25, 1)])
async def test_a_huge_interval_goes_in_reports_under_256_kib_and_the_rest_is_tallied(
        interval_s, most):
    signer, pub = generate_keypair()
    intake = Intake(authorized(("ingress", pub)), interval_s=interval_s)
    counter = TrafficCounter()
    with trio.fail_after(DEADLINE_S):
        async with open_intakes(intake), open_reporter(intake.url, signer,
                                                       counter) as reporter:
            await wait_for(lambda: reporter.interval_s == interval_s, "the welcome")
            # 1,500 replicas with every latency bucket: ~1.8 MB of rows in one interval
            bounds = (0.0, *BOUNDS_MS, 300000.0)
            middles = [(bounds[i] + bounds[i + 1]) / 2 for i in range(len(bounds) - 1)]
            for i in range(1500):
                rid = f"web-{i:04d}-" + "x" * 100
                for bucket_ms in middles:  # one answer in each of the 62 buckets
                    counter.answered(rid, 200, 0.0, bucket_ms / 1000)
            await wait_for(lambda: reporter.stats.dropped_requests, "the rest dropped")
            await wait_for(lambda: len([r for r in intake.sessions[0] if r.replicas]) == most,
                           f"{most} full report(s)")
            await trio.sleep(2 * interval_s)  # and no more for that interval
            assert len([r for r in intake.sessions[0] if r.replicas]) == most
            assert max(intake.sizes) <= 200 * 1024
            got = intake.totals()
            assert all(c.requests == 62 and len(c.latency) == 62 for c in got.values())
            assert len(got) * 62 + reporter.stats.dropped_requests == 1500 * 62
            assert reporter.stats.dropped_intervals == 1


@pytest.mark.parametrize(("welcome_interval", "used"), [(0.01, 0.25), (3600, 60.0),
                                                         (0.5, 0.5)])
async def test_the_conductor_interval_is_held_within_bounds(welcome_interval, used):
    signer, pub = generate_keypair()
    intake = Intake(authorized(("ingress", pub)), interval_s=welcome_interval)
    with trio.fail_after(DEADLINE_S):
        async with open_intakes(intake), open_reporter(intake.url, signer) as reporter:
            await wait_for(lambda: reporter.interval_s is not None, "the welcome")
            assert reporter.interval_s == used


@pytest.mark.parametrize("bad", [
    json.dumps({"type": "challenge", "nonce": "ab" * 31}),  # too short
    json.dumps({"type": "welcome", "interval_s": 1}),  # not the step expected
    json.dumps({"type": "challenge", "nonce": "x" * 70_000}),  # over 64 KiB: closed
    "[1, 2]",
    json.dumps({"type": "error", "code": 7}),
])
async def test_a_conductor_breaking_the_handshake_is_left(bad):
    signer, pub = generate_keypair()
    intake = Intake(authorized(("ingress", pub)))
    intake.challenge_bytes = bad
    with trio.fail_after(DEADLINE_S):
        async with open_intakes(intake), open_reporter(intake.url, signer) as reporter:
            await wait_for(lambda: intake.connections >= 2, "a second attempt")
            assert reporter.stats.sessions == 0


# ---------------------------------------------------------------------------- messages


def test_reports_carry_every_count_and_decode():
    counts = {f"web-{i}": Counts(10, 1, 2, {5: 3, 40: 4, 61: 1}) for i in range(3)}
    messages, left = encode_reports(7, counts)
    assert left == {} and len(messages) == 1
    report = decode_report(json.loads(messages[0][0]))
    assert report.seq == 7 and dict(report.replicas) == counts
    [(text, chunk)] = encode_reports(1, {})[0]  # an empty interval: the heartbeat
    assert json.loads(text) == {"type": "report", "seq": 1, "replicas": []} and chunk == {}


def test_a_large_interval_is_split_under_the_size_limit_and_the_rest_dropped():
    latency = {b: 1000 + b for b in range(0, 62)}  # the widest rows a report can hold
    counts = {f"replica-{i:04d}-" + "x" * 100: Counts(10**6, 0, 0, latency)
              for i in range(400)}
    messages, left = encode_reports(1, counts, max_bytes=64 * 1024, max_reports=3)
    assert len(messages) == 3
    sent: dict[str, Counts] = {}
    for i, (text, chunk) in enumerate(messages):
        assert len(text.encode()) <= 64 * 1024
        report = decode_report(json.loads(text))
        assert report.seq == 1 + i and dict(report.replicas) == chunk
        sent.update(chunk)
    assert left and set(sent).isdisjoint(left) and {**sent, **left} == counts
