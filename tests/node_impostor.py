"""A node agent's side of /v1/node done by hand, for tests that play a hostile node.

It holds a real node key (what an attacker who stole one, or a compromised
machine, has) and says whatever the test wants in its ``hello`` and after.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from skr8tr import __version__, keyfiles
from skr8tr.core import envelope
from skr8tr.core.node_protocol import encode_node_message
from skr8tr.core.signatures import Signer
from skr8tr.ws import trio_client


def report(replica: str, app: str, generation: int, *, state: str = "running",
           pid: int | None = 1, port: int | None = None, **extra: Any) -> dict[str, Any]:
    """One replica report as a node sends it (in a hello, or alone)."""
    return {"replica": replica, "app": app, "generation": generation, "state": state,
            "pid": pid, "port": port, "ts": time.time(), **extra}


async def send_hello(ws: Any, signer: Signer, node_id: str, *,
                     replicas: Sequence[dict[str, Any]] = (), address: str = "127.0.0.1") -> None:
    """Read the conductor's challenge on a fresh /v1/node *ws* and answer it with a hello
    signed by *signer*."""
    challenge = json.loads(await ws.get_message())
    assert challenge["type"] == "challenge", challenge
    sig = envelope.sign_challenge(signer, bytes.fromhex(challenge["nonce"]), node_id)
    await ws.send_message(encode_node_message(
        "hello", node_id=node_id, key=signer.public, sig=sig, version=__version__,
        address=address, cores=1, ram_total_mb=1024, ram_free_mb=1024, cpu_pct=0.0,
        replicas=list(replicas)))


@asynccontextmanager
async def impostor_node(url: str, key_file: Path, node_id: str, *,
                        replicas: list[dict[str, Any]] = (),  # type: ignore[assignment]
                        address: str = "127.0.0.1") -> AsyncIterator[Any]:
    """Join the conductor at *url* as *node_id* with *key_file*'s node key and a hello
    that reports *replicas*; yields the open WebSocket once welcomed."""
    key = keyfiles.load_signing_key(key_file)
    async with trio_client.open_websocket(url + "/v1/node") as ws:
        await send_hello(ws, key, node_id, replicas=replicas, address=address)
        welcome = json.loads(await ws.get_message())
        assert welcome["type"] == "welcome", welcome
        yield ws
