"""A node session's byte budget (``--max-node-bytes-per-s``): a node key that floods the
conductor with large messages is slowed down to the budget, never closed.

The pure part (:meth:`TokenBucket.charge`) is checked over a simulated period; the
real conductor against a real node key flooding it in ``test_e2e_node_flood``.
"""

from __future__ import annotations

import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from skr8tr.conductor.limits import Limits, TokenBucket

MIB = 1024 * 1024


def flood(rate: int, sizes: list[int], period_s: float) -> int:
    """Bytes a reader that pauses for what charge() says takes from a sender that always
    has the next message ready, within *period_s* of simulated time."""
    bucket = TokenBucket(rate, 2 * rate, now=0.0)
    now, accepted = 0.0, 0
    for size in sizes:
        if now > period_s:
            break
        accepted += size  # read and applied, then the pause before the next read
        now += bucket.charge(now, size)
    return accepted


def test_a_flood_gets_the_budget_and_no_more():
    rate = 8 * MIB
    accepted = flood(rate, [MIB] * 10_000, period_s=60.0)
    # The burst (2 * rate) plus 60 s of rate, plus the one message read at the end.
    assert accepted <= 2 * rate + 60 * rate + MIB
    assert accepted >= 60 * rate  # and it is served at the budget, not starved


def test_a_node_within_the_budget_never_waits():
    bucket = TokenBucket(8 * MIB, 16 * MIB, now=0.0)
    # A busy node: a heartbeat and a few reports of ~1 KiB a second, and a 1 MiB
    # logs_reply every second, for ten minutes.
    waits = [bucket.charge(t * 0.01, 1024 if t % 100 else MIB) for t in range(60_000)]
    assert max(waits) == 0.0


def test_the_debt_is_paid_back_in_time():
    bucket = TokenBucket(1000, 2000, now=0.0)
    assert bucket.charge(0.0, 2000) == 0.0  # the whole burst
    assert bucket.charge(0.0, 500) == 0.5  # 500 owed at 1000/s
    assert bucket.charge(0.5, 0) == 0.0  # paid back by then
    assert bucket.charge(0.5, 1000) == 1.0


@given(
    st.lists(st.integers(1, MIB), min_size=1, max_size=500),
    st.integers(1024, 64 * MIB),
    st.floats(0.5, 30.0),
)
def test_never_more_than_burst_plus_rate_times_time(sizes, rate, period_s):
    assert flood(rate, sizes, period_s) <= 2 * rate + rate * period_s + MIB


def test_the_default_and_its_check():
    assert Limits().node_bytes_per_s == 8 * MIB
    for bad in (0, MIB - 1):
        try:
            Limits(node_bytes_per_s=bad)
        except ValueError as exc:
            assert "node_bytes_per_s must be >= " in str(exc)
        else:
            raise AssertionError(f"node_bytes_per_s={bad} accepted")
    assert Limits(node_bytes_per_s=MIB).node_bytes_per_s == MIB


def test_the_flag_comes_from_a_config_file_or_the_environment(tmp_path):
    from skr8tr.conductor.daemon import config_from_args
    from tests.test_daemon_config import resolve

    cfg = tmp_path / "conductor.toml"
    cfg.write_text("max-node-bytes-per-s = 2000000\n")
    base = ["conductor", "--authorized-keys", "/dev/null"]
    for opts in (
        resolve([*base, "--max-node-bytes-per-s", "2000000"]),
        resolve([*base, "--config", str(cfg)]),
        resolve(base, {"SKR8TR_CONDUCTOR_MAX_NODE_BYTES_PER_S": "2000000"}),
    ):
        assert opts.max_node_bytes_per_s == 2000000
        assert config_from_args(opts).limits.node_bytes_per_s == 2000000
    assert config_from_args(resolve(base)).limits.node_bytes_per_s == 8 * MIB


class FloodingSocket:
    """What a node session's reader sees of a node that always has the next ~1 MiB
    message ready: counts what was read, and when (the mock clock)."""

    def __init__(self, message: str, period_s: float) -> None:
        self.message = message
        self.period_s = period_s
        self.read_bytes = 0
        self.closed_with: int | None = None

    async def get_message(self) -> str:
        from skr8tr.ws.frames import ConnectionClosed

        await trio.sleep(0)
        if trio.current_time() >= self.period_s:
            raise ConnectionClosed(1000)  # the test's end, not a limit
        self.read_bytes += len(self.message)
        return self.message

    async def aclose(self, code: int = 1000, reason: str = "") -> None:
        self.closed_with = code


def test_a_node_session_reads_no_more_than_its_budget():
    trio.run(_flood_one_session, clock=trio.testing.MockClock(autojump_threshold=0))


async def _flood_one_session() -> None:
    from skr8tr.conductor import node_sessions
    from skr8tr.conductor.cluster import Cluster
    from skr8tr.conductor.limits import ClosedCounter
    from skr8tr.conductor.logs import LogRequests
    from skr8tr.conductor.policing import Policing
    from skr8tr.conductor.refusals import RefusalReporter
    from tests.test_e2e_node_flood import big_push
    from tests.test_log_follow import Node

    cluster = Cluster(clock=trio.current_time, wall=lambda: 1000.0)
    Node(cluster, "n1")
    rate, period_s = 2 * MIB, 60.0
    policing = Policing(
        Limits(node_bytes_per_s=rate),
        ClosedCounter(),
        RefusalReporter(audit_log=None, wall=lambda: 1000.0),
    )
    ws = FloodingSocket(big_push(1), period_s)
    await node_sessions._receive(cluster, policing, LogRequests(), ws, "n1")
    # Slowed to the budget (its burst, 60 s of its rate, the message read last) ...
    assert ws.read_bytes <= 2 * rate + period_s * rate + MIB
    assert ws.read_bytes >= period_s * rate - MIB
    # ... and never closed for it.
    assert ws.closed_with is None
    assert not any(policing.closed.by_reason.values())
    assert policing.slowed > 0
