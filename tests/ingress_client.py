"""An ingress's side of /v1/ingress done by hand: the tests of the conductor's intake play
a real ingress, a forger, or a hostile one with it."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from skr8tr import __version__
from skr8tr.core import envelope
from skr8tr.core.signatures import Signer
from skr8tr.core.traffic import Counts, Report
from skr8tr.ws import trio_client


def hello_text(challenge: dict[str, Any], signer: Signer, name: str, *,
               key: str | None = None, role: str = "ingress") -> str:
    """The hello answering *challenge*, signed by *signer* in *role*'s domain, claiming
    *key* (default: the signer's own)."""
    sig = envelope.sign_challenge(signer, bytes.fromhex(challenge["nonce"]), name, role=role)
    return json.dumps({"type": "hello", "ingress": name, "key": key or signer.public,
                       "sig": sig, "version": __version__})


async def say_hello(ws: Any, signer: Signer, name: str, **kw: Any) -> dict[str, Any]:
    """Answer the challenge on a fresh *ws*; the conductor's answer (welcome or error)."""
    challenge = json.loads(await ws.get_message())
    assert challenge["type"] == "challenge" and len(challenge["nonce"]) == 64, challenge
    await ws.send_message(hello_text(challenge, signer, name, **kw))
    return json.loads(await ws.get_message())


@asynccontextmanager
async def open_ingress(url: str, signer: Signer, name: str = "edge-1"
                       ) -> AsyncIterator[Any]:
    """A welcomed ingress session; yields the WebSocket."""
    async with trio_client.open_websocket(url + "/v1/ingress") as ws:
        answer = await say_hello(ws, signer, name)
        assert answer == {"type": "welcome", "interval_s": 1.0}, answer
        yield ws


def report(seq: int, rows: dict[str, tuple[list[int | None], float]] | None = None) -> str:
    """A report of *rows*: replica -> (statuses, latency in ms of each answer); a None
    status is an attempt that got no answer."""
    counts = {}
    for rid, (statuses, ms) in (rows or {}).items():
        c = Counts()
        for status in statuses:
            c.record(status, None if status is None else ms)
        counts[rid] = c
    return json.dumps(Report(seq, counts).fields())
