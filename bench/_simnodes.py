"""Simulated node agents: N real node sessions in one process; only the spawn is fake.

    python bench/_simnodes.py --url ws://HOST:PORT --key NODE.sec --count 1000

Each simulated node speaks the real protocol of :mod:`skr8tr.core.node_protocol`
on its own WebSocket: challenge -> hello signed with ``envelope.sign_challenge``
-> welcome -> a heartbeat every ``heartbeat_s`` (the welcome's, from a random
offset so the fleet does not beat in step). ``launch`` is answered with a
``replica`` report ``running`` (a fake pid) and then ``ready``; ``stop`` with
``exited``. Node ``i`` advertises the address ``10.X.Y.Z`` made from ``i``, so
every node has its own port space, as on a real fleet.

Control on stdin, one command a line; answers on stdout:
- at start, ``joined N`` once every node was welcomed;
- ``silence K``: nodes 0..K-1 send one last heartbeat at the same instant and
  then nothing (their sockets stay open), so the conductor expires them
  together; answers ``silenced K``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trio  # noqa: E402
from _harness import raise_fd_limit  # noqa: E402

from skr8tr import __version__, keyfiles  # noqa: E402
from skr8tr.core import envelope  # noqa: E402
from skr8tr.core.node_protocol import (  # noqa: E402
    MAX_NODE_MESSAGE_BYTES,
    decode_node_message,
    encode_node_message,
)
from skr8tr.ws import trio_client  # noqa: E402

_pids = itertools.count(100000)
FIGURES = {"cpu_pct": 3.0, "ram_free_mb": 60000, "ram_total_mb": 64000, "cores": 16}


def address_of(i: int) -> str:
    return f"10.{i // 62500}.{i // 250 % 250}.{i % 250 + 1}"


class SimNode:
    def __init__(self, index: int, url: str, signing_key) -> None:
        self.index = index
        self.node_id = f"sim-{index:04d}"
        self.url = url
        self.key = signing_key
        self.silent = trio.Event()
        self.outbox_send, self.outbox_recv = trio.open_memory_channel[str](100000)
        self.replicas: dict[str, tuple[str, int]] = {}  # replica -> (app, generation)

    def send(self, kind: str, **fields) -> None:
        self.outbox_send.send_nowait(encode_node_message(kind, **fields))

    async def run(self, welcomed: trio.CapacityLimiter, joined) -> None:
        async with trio_client.open_websocket(
                self.url, max_message_bytes=MAX_NODE_MESSAGE_BYTES) as ws:
            async with welcomed:  # bound the handshakes in flight
                challenge = decode_node_message(await ws.get_message())
                sig = envelope.sign_challenge(self.key, bytes.fromhex(challenge.nonce),
                                              self.node_id)
                await ws.send_message(encode_node_message(
                    "hello", node_id=self.node_id, key=self.key.public, sig=sig,
                    version=__version__, address=address_of(self.index), replicas=[],
                    **FIGURES))
                welcome = decode_node_message(await ws.get_message())
                assert welcome.TYPE == "welcome", welcome
            joined()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._send_outbox, ws)
                nursery.start_soon(self._heartbeat, welcome.heartbeat_s)
                await self._serve(ws)
                nursery.cancel_scope.cancel()

    async def _send_outbox(self, ws) -> None:
        async for text in self.outbox_recv:
            await ws.send_message(text)

    async def _heartbeat(self, interval_s: float) -> None:
        await trio.sleep(random.uniform(0, interval_s))
        while not self.silent.is_set():
            self.send("heartbeat", **FIGURES)
            with trio.move_on_after(interval_s):
                await self.silent.wait()

    async def _serve(self, ws) -> None:
        while True:
            try:
                raw = await ws.get_message()
            except trio_client.ConnectionClosed:
                return
            msg = json.loads(raw)
            kind = msg["type"]
            if kind == "launch":
                report = {"replica": msg["replica"], "app": msg["app"],
                          "generation": msg["generation"], "pid": next(_pids),
                          "port": msg["port"], "ts": time.time()}
                self.replicas[msg["replica"]] = (msg["app"], msg["generation"])
                self.send("replica", state="running", **report)
                self.send("replica", state="ready", **report)
            elif kind == "stop":
                app, generation = self.replicas.pop(msg["replica"], ("", 1))
                self.send("replica", replica=msg["replica"], app=app, generation=generation,
                          state="exited", signal=15, ts=time.time())
            elif kind == "logs":
                self.send("logs_reply", req=msg["req"], lines=[])


async def read_commands(nodes: list[SimNode]) -> None:
    stdin = trio.lowlevel.FdStream(0)
    buffer = b""
    while True:
        data = await stdin.receive_some()
        if not data:
            return
        buffer += data
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            verb, _, arg = line.decode().partition(" ")
            if verb == "silence":
                count = int(arg)
                for node in nodes[:count]:
                    node.send("heartbeat", **FIGURES)  # the last one, all at once
                    node.silent.set()
                print(f"silenced {count}", flush=True)


async def main_async(url: str, key_path: str, count: int) -> None:
    signing_key = keyfiles.load_signing_key(key_path)
    nodes = [SimNode(i, url, signing_key) for i in range(count)]
    done = 0

    def joined() -> None:
        nonlocal done
        done += 1
        if done == count:
            print(f"joined {count}", flush=True)

    limiter = trio.CapacityLimiter(50)
    async with trio.open_nursery() as nursery:
        for node in nodes:
            nursery.start_soon(node.run, limiter, joined)
        await read_commands(nodes)
        nursery.cancel_scope.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="ws://HOST:PORT/v1/node")
    parser.add_argument("--key", required=True, help="a node key's signing.sec")
    parser.add_argument("--count", type=int, default=1000)
    options = parser.parse_args()
    raise_fd_limit()
    trio.run(main_async, options.url, options.key, options.count)


if __name__ == "__main__":
    main()
