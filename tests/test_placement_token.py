"""Placement tokens (skr8tr/core/placement_token.py): bound to every field they cover."""

from __future__ import annotations

import pytest

from skr8tr.core import placement_token

SECRET = bytes(range(32))
FIELDS = {"node_id": "n1", "replica": "web-1a2b3c", "app": "web", "generation": 3,
          "port": 20001}


def test_a_token_checks_for_exactly_its_placement():
    token = placement_token.make(SECRET, **FIELDS)
    assert len(token) == placement_token.TOKEN_HEX and int(token, 16) >= 0
    assert placement_token.check(SECRET, token, **FIELDS)


@pytest.mark.parametrize(("name", "other"), [
    ("node_id", "n2"), ("replica", "web-1a2b3d"), ("app", "api"), ("generation", 4),
    ("port", 20002), ("port", None)])
def test_a_token_does_not_check_for_any_other_placement(name, other):
    token = placement_token.make(SECRET, **FIELDS)
    assert not placement_token.check(SECRET, token, **{**FIELDS, name: other})


@pytest.mark.parametrize("token", [None, "", "0" * 32, "A" * 32, 42, "0" * 31, "0" * 64])
def test_anything_else_is_no_token(token):
    assert not placement_token.check(SECRET, token, **FIELDS)


def test_another_secret_gives_another_token():
    assert not placement_token.check(bytes(32), placement_token.make(SECRET, **FIELDS),
                                     **FIELDS)
