"""A small async client for etcd v3 through its JSON gateway (``/v3/...``), over httpx.

What it offers is what the conductor's etcd store and leader election need:
reading a key or a prefix, transactions (compares, then the operations of the
branch that won), put and delete, leases (grant, keep alive, revoke) and the
streaming watch. Keys are text, values bytes; the gateway wants both in
base64 and 64-bit numbers as decimal strings, which this module hides.

Several endpoints (``http://host:port``) make one etcd cluster: a request whose
connection cannot be made goes to the next endpoint, and the one that answered
is tried first next time. A request that was sent but whose answer was lost
is *not* sent again elsewhere (its outcome is unknown): it fails.

Every failure — no endpoint reachable, a timeout, an answer etcd refuses or
that is not what the gateway sends — is one :class:`EtcdError` with a one-line
message naming the endpoint. Every request is bounded by ``timeout_s``; a
watch is bounded in connecting, not in how long it stays quiet (a quiet key
is normal): bound it with a cancel scope when needed.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx

__all__ = ["Compare", "Delete", "EtcdClient", "EtcdError", "Event", "Get", "KeyValue", "Put",
           "TxnResult", "endpoints_from_url"]

TIMEOUT_S = 2.0


class EtcdError(Exception):
    """etcd could not be reached, or refused or garbled a request. One line for people;
    ``code`` is etcd's gRPC status code when etcd answered with an error."""

    def __init__(self, message: str, code: int | None = None, *,
                 sent: bool = False) -> None:
        super().__init__(message)
        self.code = code
        # The request may have reached etcd and been carried out (a timeout or a broken
        # connection after it was sent): its outcome is unknown.
        self.sent = sent


def endpoints_from_url(url: str) -> list[str]:
    """``etcd://H:P[,H:P...]`` -> ``["http://H:P", ...]``; ValueError for anything else."""
    scheme, sep, rest = url.partition("://")
    if scheme != "etcd" or not sep or not rest:
        raise ValueError(f"{url!r} is not an etcd store URL; expected etcd://HOST:PORT[,...]")
    endpoints = []
    for hostport in rest.split(","):
        host, colon, port = hostport.rpartition(":")
        if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{hostport!r} in {url!r} is not HOST:PORT")
        endpoints.append(f"http://{hostport}")
    return endpoints


# --------------------------------------------------------------------------- values


@dataclass(frozen=True)
class KeyValue:
    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int = 0


@dataclass(frozen=True)
class Event:
    """One change seen by a watch: ``kind`` is "PUT" or "DELETE" (then ``kv.value`` is
    empty and only ``kv.key`` and ``kv.mod_revision`` mean something)."""

    kind: str
    kv: KeyValue


@dataclass(frozen=True)
class Compare:
    """One condition of a transaction: ``target`` of ``key`` (VALUE, CREATE, MOD, VERSION,
    LEASE) compared with ``operand`` by ``result`` (EQUAL, NOT_EQUAL, GREATER, LESS).
    A key that does not exist has create, mod revision and version 0."""

    key: str
    target: str
    operand: bytes | int
    result: str = "EQUAL"

    @classmethod
    def value(cls, key: str, value: bytes) -> Compare:
        return cls(key, "VALUE", value)

    @classmethod
    def created_at(cls, key: str, revision: int) -> Compare:
        """The key was created at ``revision`` (0: the key does not exist)."""
        return cls(key, "CREATE", revision)

    @classmethod
    def exists(cls, key: str) -> Compare:
        return cls(key, "VERSION", 0, "GREATER")

    def to_json(self) -> dict[str, Any]:
        field = {"VALUE": "value", "CREATE": "create_revision", "MOD": "mod_revision",
                 "VERSION": "version", "LEASE": "lease"}[self.target]
        operand = (_b64(self.operand) if isinstance(self.operand, bytes)
                   else str(self.operand))
        return {"key": _b64(self.key), "target": self.target, "result": self.result,
                field: operand}


@dataclass(frozen=True)
class Put:
    key: str
    value: bytes
    lease: int = 0

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"key": _b64(self.key), "value": _b64(self.value)}
        if self.lease:
            body["lease"] = str(self.lease)
        return {"request_put": body}


@dataclass(frozen=True)
class Delete:
    key: str
    prefix: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"request_delete_range": _range(self.key, self.prefix)}


@dataclass(frozen=True)
class Get:
    key: str
    prefix: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"request_range": _range(self.key, self.prefix)}


@dataclass(frozen=True)
class TxnResult:
    """Whether the compares held, the store revision after the transaction, and the keys
    each :class:`Get` of the branch that ran found (in order; other operations give [])."""

    succeeded: bool
    revision: int
    ranges: tuple[tuple[KeyValue, ...], ...]


Op = Put | Delete | Get


# --------------------------------------------------------------------------- the client


class EtcdClient:
    """An etcd cluster reached at ``endpoints``. Use as ``async with EtcdClient(...)``
    or call :meth:`aclose`."""

    def __init__(self, endpoints: Sequence[str], *, timeout_s: float = TIMEOUT_S) -> None:
        if not endpoints:
            raise ValueError("no etcd endpoint given")
        self.endpoints = [e.rstrip("/") for e in endpoints]
        self.timeout_s = timeout_s
        self._preferred = 0
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(timeout_s))

    async def __aenter__(self) -> EtcdClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # ------------------------------------------------------------ keys

    async def get(self, key: str, *, prefix: bool = False,
                  revision: int | None = None) -> tuple[list[KeyValue], int]:
        """The keys at ``key`` (or under it, with ``prefix``), sorted, and the store revision
        they were read at (``revision``: as they were then; an error once compacted)."""
        body = _range(key, prefix)
        if revision is not None:
            body["revision"] = str(revision)
        answer = await self._call("/v3/kv/range", body)
        return [_kv(kv) for kv in answer.get("kvs", [])], _revision(answer)

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        """Set ``key``; the new store revision."""
        answer = await self._call("/v3/kv/put", Put(key, value, lease).to_json()["request_put"])
        return _revision(answer)

    async def delete(self, key: str, *, prefix: bool = False) -> int:
        """Remove ``key`` (or every key under it); how many keys were removed."""
        answer = await self._call("/v3/kv/deleterange", _range(key, prefix))
        return int(answer.get("deleted", 0))

    async def txn(self, compare: Sequence[Compare], success: Sequence[Op],
                  failure: Sequence[Op] = ()) -> TxnResult:
        """Atomically: when every compare holds, run ``success``, else ``failure``.
        etcd refuses (EtcdError) a transaction that names one key twice among its puts
        and deletes."""
        answer = await self._call("/v3/kv/txn", {
            "compare": [c.to_json() for c in compare],
            "success": [op.to_json() for op in success],
            "failure": [op.to_json() for op in failure]})
        ranges = tuple(tuple(_kv(kv) for kv in r.get("response_range", {}).get("kvs", []))
                       for r in answer.get("responses", []))
        return TxnResult(bool(answer.get("succeeded", False)), _revision(answer), ranges)

    # ------------------------------------------------------------ leases

    async def grant(self, ttl_s: int) -> tuple[int, int]:
        """A new lease: its id and the TTL etcd granted (it may raise a TTL below its
        minimum, about 2 s with default settings)."""
        answer = await self._call("/v3/lease/grant", {"TTL": str(ttl_s)})
        if answer.get("error"):
            raise EtcdError(f"etcd refused a lease of {ttl_s} s: {answer['error']}")
        return int(answer["ID"]), int(answer.get("TTL", 0))

    async def keepalive(self, lease: int) -> int:
        """Renew ``lease``; the TTL it has again, 0 when it no longer exists (expired or
        revoked)."""
        answer = await self._call("/v3/lease/keepalive", {"ID": str(lease)}, stream=True)
        return int(answer.get("TTL", 0))

    async def revoke(self, lease: int) -> None:
        """End ``lease`` and delete its keys; a lease that no longer exists is no error."""
        try:
            await self._call("/v3/lease/revoke", {"ID": str(lease)})
        except EtcdError as exc:
            if exc.code != 5:  # NOT_FOUND: already gone
                raise

    # ------------------------------------------------------------ watch

    @asynccontextmanager
    async def watch(self, key: str, *, prefix: bool = False, start_revision: int = 0
                    ) -> AsyncIterator[AsyncIterator[list[Event]]]:
        """``async with client.watch(...) as batches``: each ``async for`` item is the list
        of events of one store revision on ``key`` (or under it), from ``start_revision``
        (0: from now). The stream ends with EtcdError when etcd goes away or cancels the
        watch (for example when ``start_revision`` was compacted)."""
        body = _range(key, prefix)
        if start_revision:
            body["start_revision"] = str(start_revision)
        timeout = httpx.Timeout(self.timeout_s, read=None)
        for endpoint in self._order():
            try:
                request = self._http.build_request("POST", endpoint + "/v3/watch",
                                                   json={"create_request": body},
                                                   timeout=timeout)
                response = await self._http.send(request, stream=True)
            except httpx.ConnectError:
                continue
            except httpx.HTTPError as exc:
                raise EtcdError(f"etcd {endpoint}: watch of {key}: {_why(exc)}") from None
            self._preferred = self.endpoints.index(endpoint)
            try:
                lines = response.aiter_lines()
                first = _result(await _next_line(lines, endpoint), endpoint)
                if not first.get("created"):
                    raise EtcdError(f"etcd {endpoint}: watch of {key} was not created")
                batches = _batches(lines, endpoint, key)
                try:
                    yield batches
                finally:
                    await batches.aclose()
            finally:
                await response.aclose()
            return
        raise self._unreachable()

    # ------------------------------------------------------------ plumbing

    def _order(self) -> list[str]:
        n = len(self.endpoints)
        return [self.endpoints[(self._preferred + i) % n] for i in range(n)]

    def _unreachable(self) -> EtcdError:
        return EtcdError(f"no etcd endpoint answers ({', '.join(self.endpoints)})")

    async def _call(self, path: str, body: dict[str, Any], *, stream: bool = False
                    ) -> dict[str, Any]:
        for endpoint in self._order():
            try:
                response = await self._http.post(endpoint + path, json=body)
            except httpx.ConnectError:
                continue  # nothing was sent: the next endpoint may answer
            except httpx.HTTPError as exc:
                sent = not isinstance(exc, httpx.ConnectTimeout | httpx.PoolTimeout)
                raise EtcdError(f"etcd {endpoint}: {path}: {_why(exc)}", sent=sent) from None
            self._preferred = self.endpoints.index(endpoint)
            if stream:  # a streaming endpoint sent one result per line; one was asked for
                return _result(response.text.partition("\n")[0], endpoint)
            return _answer(response.text, endpoint, response.status_code)
        raise self._unreachable()


async def _next_line(lines: AsyncIterator[str], endpoint: str) -> str:
    try:
        while True:
            line = await lines.__anext__()
            if line.strip():
                return line
    except StopAsyncIteration:
        raise EtcdError(f"etcd {endpoint} closed the stream") from None
    except httpx.HTTPError as exc:
        raise EtcdError(f"etcd {endpoint}: stream broken: {_why(exc)}") from None


async def _batches(lines: AsyncIterator[str], endpoint: str, key: str
                   ) -> AsyncIterator[list[Event]]:
    while True:
        result = _result(await _next_line(lines, endpoint), endpoint)
        if result.get("canceled"):
            reason = result.get("cancel_reason") or (
                f"revision {result.get('compact_revision')} was compacted")
            raise EtcdError(f"etcd {endpoint} cancelled the watch of {key}: {reason}")
        events = [Event(e.get("type", "PUT"), _kv(e.get("kv", {})))
                  for e in result.get("events", [])]
        # One answer may carry several revisions: hand them out one revision at a time.
        while events:
            revision = events[0].kv.mod_revision
            batch = [e for e in events if e.kv.mod_revision == revision]
            events = [e for e in events if e.kv.mod_revision != revision]
            yield batch


def _answer(text: str, endpoint: str, status: int) -> dict[str, Any]:
    try:
        answer = json.loads(text)
    except ValueError:
        raise EtcdError(f"etcd {endpoint} answered HTTP {status} with no JSON") from None
    if not isinstance(answer, dict):
        raise EtcdError(f"etcd {endpoint} answered HTTP {status} with JSON that is not "
                        "an object")
    if "error" in answer or status != 200:
        message = answer.get("message") or answer.get("error") or f"HTTP {status}"
        code = answer.get("code")
        raise EtcdError(f"etcd {endpoint}: {message}",
                        code if isinstance(code, int) else None)
    return answer


def _result(line: str, endpoint: str) -> dict[str, Any]:
    """One line of a streaming answer: ``{"result": ...}``, or an error raised."""
    try:
        answer = json.loads(line)
    except ValueError:
        raise EtcdError(f"etcd {endpoint} sent a stream line that is not JSON") from None
    if not isinstance(answer, dict):
        raise EtcdError(f"etcd {endpoint} sent a stream line that is not a JSON object")
    error = answer.get("error")
    if isinstance(error, dict):  # an error inside a stream
        code = error.get("grpc_code")
        raise EtcdError(f"etcd {endpoint}: {error.get('message', 'error')}",
                        code if isinstance(code, int) else None)
    if error:
        _answer(line, endpoint, 200)  # raises, with etcd's message and code
    result = answer.get("result")
    if not isinstance(result, dict):
        raise EtcdError(f"etcd {endpoint} sent a stream line with no result")
    return result


def _why(exc: httpx.HTTPError) -> str:
    if isinstance(exc, httpx.TimeoutException):
        return "no answer in time"
    return str(exc) or type(exc).__name__


def _b64(data: str | bytes) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return base64.b64encode(raw).decode("ascii")


def _range(key: str, prefix: bool) -> dict[str, Any]:
    body = {"key": _b64(key)}
    if prefix:
        body["range_end"] = _b64(_prefix_end(key.encode()))
    return body


def _prefix_end(key: bytes) -> bytes:
    """The first key after every key that starts with ``key``."""
    raw = bytearray(key)
    while raw:
        if raw[-1] < 0xFF:
            raw[-1] += 1
            return bytes(raw)
        raw.pop()
    return b"\x00"  # every key


def _kv(kv: dict[str, Any]) -> KeyValue:
    try:
        return KeyValue(base64.b64decode(kv.get("key", "")).decode("utf-8", "replace"),
                        base64.b64decode(kv.get("value", "")),
                        int(kv.get("create_revision", 0)), int(kv.get("mod_revision", 0)),
                        int(kv.get("version", 0)), int(kv.get("lease", 0)))
    except (ValueError, TypeError) as exc:
        raise EtcdError(f"etcd sent a key-value it cannot be read as: {exc}") from None


def _revision(answer: dict[str, Any]) -> int:
    try:
        return int(answer.get("header", {}).get("revision", 0))
    except (ValueError, TypeError, AttributeError):
        raise EtcdError("etcd sent an answer without a readable revision") from None
