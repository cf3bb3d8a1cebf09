"""Small fake conductors for the failover tests: leaders, followers, conductors that lost
etcd or drop connections, on the real :mod:`skr8tr.ws.server` (tests/ws_helpers.py).

A :class:`FakeConductor` answers ``/v1/cli`` and ``/v1/watch`` according to its
``role``, read anew for every message, so a test can turn a leader into a
follower (a failover) while a client is connected:

- ``leader``: ``/v1/cli`` answers from ``results`` (cmd -> result, or a list
  of results consumed in turn, or ``(code, message)`` for an error reply);
  ``/v1/watch`` sends a snapshot of ``state`` then whatever is put on
  ``events`` until ``end_streams()``;
- ``follower``: ``ping`` answers with the role and ``leader``; anything
  else ``NOT_LEADER`` naming ``leader`` (None: an election under way);
  ``/v1/watch`` sends the NOT_LEADER error message and closes;
- ``unavailable``: ``UNAVAILABLE`` to everything but ``ping``;
- ``drop``: reads a request, then drops the TCP connection without a reply.

``stop()`` closes its listener and connections (a dead conductor). Every
``/v1/cli`` message is kept in ``received`` (the raw JSON objects).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

from skr8tr import __version__
from skr8tr.core import protocol
from skr8tr.ws import server as wsserver
from skr8tr.ws import trio_client
from tests.wire_helpers import decode_request
from tests.ws_helpers import serve_websocket

_GONE = (trio_client.ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError)


class FakeConductor:
    def __init__(self, role: str = "leader", *, leader: str | None = None) -> None:
        self.role = role
        self.leader = leader
        self.results: dict[str, Any] = {}
        self.state: dict[str, Any] = {"nodes": [], "replicas": []}
        self.received: list[dict[str, Any]] = []
        self.watch_connections = 0
        self.snapshots = 0  # sent as a leader
        self.url = ""
        self._scope = trio.CancelScope()
        self._seq = 0
        self._event_send, self._event_recv = trio.open_memory_channel[tuple[str, dict]](100)
        self._streams_end = trio.Event()

    # ------------------------------------------------------------------ control

    def stop(self) -> None:
        self._scope.cancel()

    def end_streams(self) -> None:
        """Close every /v1/watch stream now open (code 1001), as a dying leader would."""
        self._streams_end.set()
        self._streams_end = trio.Event()

    async def send_event(self, event: str, data: dict[str, Any]) -> None:
        await self._event_send.send((event, data))

    def cmds(self) -> list[str]:
        return [m.get("cmd") for m in self.received]

    # ------------------------------------------------------------------ serving

    async def serve(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        with self._scope:
            async with trio.open_nursery() as nursery:
                server = await nursery.start(serve_websocket, self._handle, "127.0.0.1", 0,
                                             None)
                self.url = f"ws://127.0.0.1:{server.port}"
                task_status.started(self.url)

    async def _handle(self, request: wsserver.Request) -> None:
        ws = await request.accept()
        try:
            if request.path == "/v1/watch":
                await self._watch(ws)
            else:
                await self._cli(ws)
        except _GONE:
            return  # the client left or the fake was stopped: nothing to answer

    async def _cli(self, ws: Any) -> None:
        while True:
            raw = await ws.get_message()
            self.received.append(json.loads(raw))
            req = decode_request(raw)
            assert not isinstance(req, protocol.DecodeError), req
            if self.role == "drop":
                await ws.stream.aclose()  # no close frame, no reply
                return
            await ws.send_message(self._answer(req))

    def _answer(self, req: protocol.Request) -> str:
        if req.cmd == "ping":
            return protocol.ok_reply(req.id, {"pong": "conductor", "version": __version__,
                                              "role": "follower" if self.role == "follower"
                                              else "leader", "leader": self.leader})
        if self.role == "follower":
            why = "this conductor is a follower" + ("" if self.leader else
                                                    "; no leader elected yet")
            return protocol.error_reply(req.id, "NOT_LEADER", why, leader=self.leader)
        if self.role == "unavailable":
            return protocol.error_reply(req.id, "UNAVAILABLE", "etcd cannot be reached")
        answer = self.results[req.cmd]
        if isinstance(answer, list):
            answer = answer.pop(0) if len(answer) > 1 else answer[0]
        if isinstance(answer, tuple):
            return protocol.error_reply(req.id, *answer)
        return protocol.ok_reply(req.id, answer)

    async def _watch(self, ws: Any) -> None:
        self.watch_connections += 1
        if self.role != "leader":
            await ws.send_message(protocol.not_leader_watch_message(
                "this conductor is a follower", self.leader))
            await ws.aclose(1000, "not the leader")
            return
        self._seq += 1
        self.snapshots += 1
        await ws.send_message(protocol.snapshot_message(self._seq, 1.0, self.state))
        ended = self._streams_end
        async with trio.open_nursery() as nursery:
            async def forward() -> None:
                async for event, data in self._event_recv:
                    self._seq += 1
                    await ws.send_message(protocol.event_message(self._seq, 2.0, event, data))

            nursery.start_soon(forward)
            await ended.wait()
            nursery.cancel_scope.cancel()
        await ws.aclose(1001, "conductor going away")


@asynccontextmanager
async def open_fakes(*roles: str) -> AsyncIterator[list[FakeConductor]]:
    """One running FakeConductor per role; all stopped on the way out."""
    fakes = [FakeConductor(role) for role in roles]
    async with trio.open_nursery() as nursery:
        for fake in fakes:
            await nursery.start(fake.serve)
        yield fakes
        nursery.cancel_scope.cancel()


async def wait_for(predicate: Any, what: str, timeout_s: float = 10.0) -> None:
    """Poll *predicate* every 10 ms until true; AssertionError naming *what* past the time."""
    with trio.move_on_after(timeout_s):
        while not predicate():
            await trio.sleep(0.01)
        return
    raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")


__all__ = ["FakeConductor", "open_fakes", "wait_for"]
