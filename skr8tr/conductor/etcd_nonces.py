"""The §4 nonce guard in etcd: a request accepted by one conductor is REPLAY on every other.

Each spent nonce is one key ``PREFIX/nonces/FINGERPRINT/NONCE``, created only if
absent (compare: create revision 0) and attached to a lease, so that etcd deletes
it once no conductor could accept the request again.

*Key names.* ``FINGERPRINT`` is :func:`skr8tr.core.signatures.fingerprint` of the
signing key (``sha256:`` + 16 hex digits) rather than its 64 hex digits: the key
stays short and matches the logs. Mapping (key, nonce) to an etcd key only has
to be a function for replays to be caught: the same request always lands on the
same etcd key, so a fingerprint collision can never let a replay through. All it
could do is make two different admin keys share nonces, and a nonce is 16 random
bytes the signer draws itself: refusing a fresh request would need a 64-bit
fingerprint collision *and* a 128-bit nonce collision.

*How long a key must live.* A conductor accepts ``ts`` while
``|now - ts| <= window_s`` (30 s) and its in-memory guard remembers the nonce until
``ts + window_s``. The latest ``ts`` accepted at ``now`` is ``now + window_s``, so a
nonce spent at ``now`` must be kept until ``now + 2 * window_s`` = 60 s later.

*Leases, one per bucket.* One lease per nonce would be a grant per request; instead
the guard grants a lease lazily for a *bucket* of ``bucket_s`` (30 s) of its clock and
puts every nonce of that bucket under it; it never revokes one (it expires). With the
lease granted at ``g`` (the guard's clock read *before* asking etcd, so etcd's lease
starts no earlier), a key written at ``t < g + bucket_s`` is deleted no earlier than
``g + ttl_s``, and with ``ttl_s = 2 * window_s + bucket_s + skew_s`` (60 + 30 + 10 = 100 s)
that is more than ``t + 2 * window_s + skew_s``. The ``skew_s`` margin covers a
conductor whose clock lags this one's: it accepts a request up to ``skew_s`` later.
etcd keeps at most ``ttl_s / bucket_s + 1`` (4) of these leases alive per conductor.

*Group commit.* :meth:`EtcdNonceGuard.serve` writes the nonces of many requests in one
transaction: those that arrive while one is in flight go together into the next
(at most ``MAX_TXN_OPS`` minus the fence's compares, etcd's default limit per
transaction). Its compares are the leadership fence and "absent" for each key; its
success branch puts them all, its failure branch reads them all. One transaction
fails as a whole, so on failure the keys it found are the replays (False), and the
rest go again in a new transaction; when it found none, the fence failed.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import trio

from skr8tr.conductor.etcd_client import Compare, EtcdClient, EtcdError, Get, Put
from skr8tr.conductor.store import FenceLost, StoreError, StoreUnavailable
from skr8tr.core import envelope, protocol
from skr8tr.core.envelope import AuthError, ReplayGuard
from skr8tr.core.signatures import fingerprint, is_public_key

__all__ = ["BUCKET_S", "MAX_TXN_OPS", "SKEW_S", "EtcdNonceGuard", "admit_request"]

log = logging.getLogger("skr8tr.conductor")

BUCKET_S = 30.0  # a new lease for the nonces of each bucket of this many seconds
SKEW_S = 10.0  # how far another conductor's clock may lag this one's
MAX_TXN_OPS = 128  # etcd's default --max-txn-ops: compares, and each branch's operations

Fence = Callable[[], Sequence[Compare] | None]


@dataclass(eq=False)
class _Waiter:
    key: str
    done: trio.Event = field(default_factory=trio.Event)
    fresh: bool | None = None
    error: tuple[type[StoreError], str] | None = None
    abandoned: bool = False  # its spend was cancelled before the batch was taken

    def settle(self, fresh: bool) -> None:
        self.fresh = fresh
        self.done.set()

    def fail(self, kind: type[StoreError], message: str) -> None:
        self.error = (kind, message)
        self.done.set()


class EtcdNonceGuard:
    """Spent nonces of signed requests, kept in etcd under ``PREFIX/nonces/``.

    ``fence`` gives the compares under which this conductor leads (``Leadership.fence``
    of the current term), read once per transaction; when it gives None this
    conductor leads no term, and spends raise FenceLost. Without ``fence`` (None, a
    conductor that holds no election) nonces are written unfenced. ``clock`` is only
    used to age the bucket leases (monotonic by default). ``batch=False`` writes each
    nonce in a transaction of its own, from the spending task (for comparison;
    :meth:`serve` is then not needed).
    """

    def __init__(self, client: EtcdClient, prefix: str = "/skr8tr", *,
                 fence: Fence | None = None, clock: Callable[[], float] = time.monotonic,
                 window_s: float = envelope.REQUEST_WINDOW_S, bucket_s: float = BUCKET_S,
                 skew_s: float = SKEW_S, batch: bool = True,
                 max_batch: int = MAX_TXN_OPS) -> None:
        prefix = prefix.rstrip("/")
        if not prefix.startswith("/"):
            raise ValueError(f"store prefix {prefix!r} must start with /")
        if not (bucket_s > 0 and window_s >= 0 and skew_s >= 0):
            raise ValueError("bucket_s must be > 0, window_s and skew_s >= 0")
        self.client = client
        self.prefix = prefix
        self.fence = fence
        self.clock = clock
        self.bucket_s = float(bucket_s)
        self.ttl_s = math.ceil(2 * window_s + bucket_s + skew_s)
        self.batch = batch
        self.max_batch = max(1, max_batch)
        self._lease: tuple[int, float] | None = None  # (id, clock reading before its grant)
        self._queue: deque[_Waiter] = deque()
        self._wake = trio.Event()
        self._serving = False
        self.transactions = 0  # committed or refused nonce transactions, for tests and bench

    def key(self, key_hex: str, nonce: str) -> str:
        """The etcd key of ``nonce`` spent by the public key ``key_hex``."""
        return f"{self.prefix}/nonces/{fingerprint(key_hex)}/{nonce}"

    # ------------------------------------------------------------ spending

    async def spend(self, key_hex: str, nonce: str, ts: float) -> bool:
        """Record ``nonce`` of ``key_hex`` in etcd: True when no conductor had, False when
        one had (REPLAY). True only once etcd committed it.

        ``ts`` is not judged here (the in-memory guard did, :func:`admit_request`); every
        key lives ``ttl_s`` from its bucket, enough for any ``ts`` that passed.
        Raises FenceLost when this conductor no longer leads (nothing was written),
        StoreUnavailable when etcd cannot be reached or refuses: the caller answers
        UNAVAILABLE; the command may be sent again signed anew (this nonce may have been
        recorded).
        RuntimeError when batching and :meth:`serve` is not running. A cancelled spend
        may or may not have been recorded.
        """
        del ts  # every key lives long enough for any ts the window admits
        waiter = _Waiter(self.key(key_hex, nonce))
        if not self.batch:
            await self._commit([waiter])
        else:
            if not self._serving:
                raise RuntimeError("EtcdNonceGuard.serve is not running; start it in the "
                                   "conductor's nursery before spending nonces")
            self._queue.append(waiter)
            self._wake.set()
            try:
                await waiter.done.wait()
            except BaseException:
                waiter.abandoned = True  # still queued: never written; taken: no one waits
                raise
        if waiter.error is not None:
            kind, message = waiter.error
            raise kind(message)  # a new exception per waiter: each raises with its traceback
        assert waiter.fresh is not None
        return waiter.fresh

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        """Write queued nonces, one transaction at a time, until cancelled. Started
        (``await nursery.start(guard.serve)``) once spends can be queued. When it ends,
        every spend still waiting fails with StoreUnavailable."""
        self._serving = True
        task_status.started()
        taken: list[_Waiter] = []
        try:
            while True:
                if not self._queue:
                    self._wake = trio.Event()
                    await self._wake.wait()
                taken = self._take()
                if taken:
                    await self._commit(taken)
                taken = []
        finally:
            self._serving = False
            for waiter in [*taken, *self._queue]:
                if not waiter.done.is_set():
                    waiter.fail(StoreUnavailable, "the nonce guard stopped before this "
                                "nonce was recorded in etcd (it may have been)")
            self._queue.clear()

    def _take(self) -> list[_Waiter]:
        fence = (self.fence() if self.fence else None) or ()
        room = min(self.max_batch, MAX_TXN_OPS - len(fence))
        taken: list[_Waiter] = []
        while self._queue and len(taken) < room:
            waiter = self._queue.popleft()
            if not waiter.abandoned:
                taken.append(waiter)
        return taken

    # ------------------------------------------------------------ one transaction

    async def _commit(self, waiters: list[_Waiter]) -> None:
        """Settle every waiter: fresh, replay, or an error."""
        by_key: dict[str, list[_Waiter]] = {}
        for waiter in waiters:
            by_key.setdefault(waiter.key, []).append(waiter)
        try:
            for key, fresh in (await self._write(list(by_key))).items():
                first, *again = by_key[key]
                first.settle(fresh)
                for waiter in again:  # the same nonce twice in one batch: one is a replay
                    waiter.settle(False)
        except StoreError as exc:  # FenceLost or StoreUnavailable: each waiter gets its own
            for waiter in waiters:
                if not waiter.done.is_set():
                    waiter.fail(type(exc), str(exc))
        except BaseException:
            for waiter in waiters:
                if not waiter.done.is_set():
                    waiter.fail(StoreUnavailable, "cancelled while recording the nonce "
                                "in etcd (it may have been)")
            raise

    async def _write(self, keys: list[str]) -> dict[str, bool]:
        """Create each of ``keys`` (distinct) unless it exists; key -> created. Raises
        FenceLost, StoreUnavailable."""
        outcome: dict[str, bool] = {}
        pending = keys
        lease_retried = False
        while pending:
            fence = self._compares()
            try:
                lease = await self._current_lease()
                result = await self.client.txn(
                    [*fence, *(Compare.created_at(k, 0) for k in pending)],
                    [Put(k, b"", lease) for k in pending],
                    [Get(k) for k in pending])
            except EtcdError as exc:
                if exc.code == 5 and not lease_retried:  # NOT_FOUND: the lease is gone
                    self._lease, lease_retried = None, True
                    continue
                raise StoreUnavailable(f"nonce not recorded in etcd: {exc}") from None
            self.transactions += 1
            if result.succeeded:
                outcome.update(dict.fromkeys(pending, True))
                break
            found = {k for k, kvs in zip(pending, result.ranges, strict=True) if kvs}
            if not found:  # every key was absent: the fence is what failed
                raise FenceLost(f"nonce not recorded: this conductor no longer leads (the "
                                f"leadership fence under {self.prefix} failed)")
            outcome.update(dict.fromkeys(found, False))
            pending = [k for k in pending if k not in found]
        return outcome

    def _compares(self) -> list[Compare]:
        if self.fence is None:
            return []
        compares = self.fence()
        if compares is None:  # between terms, or never elected: write nothing
            raise FenceLost(f"nonce not recorded: this conductor does not lead (no "
                            f"leadership term under {self.prefix})")
        return list(compares)

    async def _current_lease(self) -> int:
        now = self.clock()
        if self._lease is not None:
            lease, granted_at = self._lease
            if granted_at <= now < granted_at + self.bucket_s:
                return lease
        lease, ttl = await self.client.grant(self.ttl_s)
        if ttl < self.ttl_s:
            raise EtcdError(f"etcd granted a nonce lease of {ttl} s, {self.ttl_s} s needed")
        self._lease = (lease, now)
        log.debug("nonces under %s/nonces/ now go under lease %x (%d s)", self.prefix,
                  lease, ttl)
        return lease


async def admit_request(auth: protocol.Authenticated | protocol.DecodeError, *,
                        guard: ReplayGuard, nonces: EtcdNonceGuard | None,
                        now: float) -> protocol.Request | protocol.DecodeError:
    """:func:`protocol.admit_request` with the nonce also spent in etcd, cluster-wide.

    The in-memory ``guard`` judges first (EXPIRED, then REPLAY), so a replay this
    conductor has seen, or the same nonce twice at once, costs no round trip; then
    ``nonces`` records it in etcd, where a nonce another conductor spent is REPLAY.
    Like the in-memory spend, the etcd one happens once the signature verified,
    before the fields and args are judged (§4: spent whatever the outcome).
    Raises FenceLost (no longer leader) and StoreUnavailable (etcd unreachable: answer
    UNAVAILABLE); the nonce stays spent in memory, so the same signed request is
    REPLAY here afterwards. Anything else is a reply, as from protocol.admit_request.
    """
    if isinstance(auth, protocol.DecodeError) or auth.signer is None or nonces is None:
        return protocol.admit_request(auth, guard=guard, now=now)
    raw = auth.envelope.raw
    key = auth.key if auth.key is not None else raw["key"]
    try:
        guard.check(key, raw["nonce"], raw["ts"], now)
    except AuthError as exc:
        return _refused(auth.envelope, exc)
    guard.spend(key, raw["nonce"], raw["ts"], now)
    if not await nonces.spend(key, raw["nonce"], raw["ts"]):
        return _refused(auth.envelope, AuthError(
            "REPLAY", "nonce already used by this key (on another conductor); send a "
            "fresh request"))
    request = protocol.validate_request(auth.envelope)
    if isinstance(request, protocol.DecodeError):
        return request
    return replace(request, signer=auth.signer)


def _refused(env: protocol.Envelope, exc: AuthError) -> protocol.DecodeError:
    key = env.raw.get("key")
    return protocol.DecodeError(env.id, exc.code, exc.message, cmd=env.cmd,
                                key=key if is_public_key(key) else None,
                                args=env.raw.get("args"))
