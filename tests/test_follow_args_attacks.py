"""Issue #17, attacked: the new ``logs`` arguments from a client and the new node
messages, at the decoders (what held: each is refused before any handler runs)."""

from __future__ import annotations

import json
import time

import pytest

from skr8tr.core import command_args
from skr8tr.core.node_protocol import NodeDecodeError, decode_node_message

FOLLOW = {"app": "web", "tail": 0, "follow": True}


@pytest.mark.parametrize("since", [float("nan"), float("inf"), -1.0, 1e308, -0.5, "1", True])
def test_since_out_of_range_is_refused(since):
    assert isinstance(command_args.check_args("logs", {**FOLLOW, "since": since}), str)


@pytest.mark.parametrize(
    "after",
    [
        {f"web-{i:06x}": 1 for i in range(command_args.MAX_FOLLOW_AFTER + 1)},  # too many
        {"x" * 129: 1},  # an id too long
        {"web-a": -1},
        {"web-a": 2**53 + 1},
        {"web-a": 1.5},
        {"web-a": True},
        {"": 1},
        ["web-a"],
    ],
)
def test_after_out_of_range_is_refused(after):
    started = time.perf_counter()
    assert isinstance(command_args.check_args("logs", {**FOLLOW, "after": after}), str)
    assert time.perf_counter() - started < 1.0  # bounded work (generous for a busy box)


def push(**fields) -> str:
    msg = {
        "v": 1,
        "type": "logs_push",
        "req": "0123456789abcdef",
        "skipped": 0,
        "lines": [{"replica": "web-a", "ts": 1.0, "stream": "stdout", "text": "x", "seq": 1}],
        **fields,
    }
    return json.dumps(msg)


def line(**fields) -> dict:
    return {"replica": "web-a", "ts": 1.0, "stream": "stdout", "text": "x", "seq": 1, **fields}


@pytest.mark.parametrize(
    "text",
    [
        push(skipped=-1),
        push(skipped=2**53 + 1),
        push(skipped=1.0),
        push(lines=[line(seq=0)]),
        push(lines=[line(seq=-5)]),
        push(lines=[line(seq=2**53 + 1)]),
        push(lines=[line(replica="../../etc/passwd")]),
        push(lines=[line(replica="a/b")]),
        push(lines=[line(text="x" * (64 * 1024 + 1))]),
        push(lines=[line(ts=float("inf"))]),
        push(req="../x"),
        json.dumps({"v": 1, "type": "app_gone", "app": "../../etc"}),
        json.dumps({"v": 1, "type": "app_gone", "app": "a/b"}),
        json.dumps({"v": 1, "type": "logs_unfollow", "req": "a/b"}),
    ],
)
def test_hostile_node_messages_are_refused_by_the_decoder(text):
    assert isinstance(decode_node_message(text), NodeDecodeError)


def test_a_well_formed_push_decodes():
    assert not isinstance(decode_node_message(push(skipped=2**53)), NodeDecodeError)
