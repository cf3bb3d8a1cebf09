"""Why a replica ended (skr8tr.core.why): the shown reason, bounded and on one line."""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import given
from hypothesis import strategies as st

from skr8tr.core import why


@pytest.mark.parametrize(("fields", "expected"), [
    ({"exit_code": 1, "signal": None, "message": "exited with code 1"}, "exited with code 1"),
    ({"exit_code": 3, "signal": None, "message": None}, "exited with code 3"),
    ({"exit_code": None, "signal": 9, "message": None}, "killed by signal 9"),
    ({"exit_code": None, "signal": 9, "message": "killed by signal 9 (SIGKILL)"},
     "killed by signal 9 (SIGKILL)"),
    ({"exit_code": None, "signal": None, "message": "[Errno 2] No such file or directory: "
      "'/nope'", "launch_failed": True},
     "cannot start: [Errno 2] No such file or directory: '/nope'"),
    ({"exit_code": None, "signal": None, "message": None, "launch_failed": True},
     "cannot start: the node gave no reason"),
    ({"exit_code": None, "signal": None, "message": "node n1 lost"}, "node n1 lost"),
    ({"exit_code": None, "signal": None, "message": None}, "ended; the node gave no reason"),
])
def test_reason_reads_as_one_short_line(fields, expected):
    assert why.reason(**fields) == expected


def test_a_hostile_message_is_cut_and_loses_its_control_characters():
    nasty = "\x1b[31mred\x1b[0m\nsecond line\r\t\u202eevil\u0000" + "x" * 5000
    shown = why.reason(exit_code=1, signal=None, message=nasty)
    assert len(shown) == why.MAX_REASON_CHARS
    assert shown.endswith("…")
    assert shown.startswith("[31mred [0m second line evil xxx")
    assert not any(ord(ch) < 32 or ch == "\u202e" for ch in shown)


def test_clean_keeps_a_short_text_whole_and_collapses_white_space():
    assert why.clean("  a \n\n b  ") == "a b"
    assert why.clean("x" * why.MAX_REASON_CHARS) == "x" * why.MAX_REASON_CHARS
    assert why.clean("x" * (why.MAX_REASON_CHARS + 1)).endswith("x…")
    assert why.clean(" " * 10_000 + "tail") == "tail"
    # a text longer than what is looked at is cut even when its spaces collapse
    assert why.clean("a" + " " * 10_000 + "tail") == "a…"


@given(st.text(max_size=4096), st.integers(min_value=20, max_value=400))
def test_any_text_becomes_one_bounded_line_of_visible_characters(text, limit):
    shown = why.clean(text, limit)
    assert len(shown) <= limit
    assert shown == shown.strip()
    for ch in shown:
        assert ch == " " or unicodedata.category(ch)[0] not in "CZ", repr(ch)
    assert "  " not in shown
