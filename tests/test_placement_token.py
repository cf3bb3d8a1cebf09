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


SLOT = {"node_id": "n1", "replica": "web-1a2b3c", "app": "web", "name": "web-000aaa",
        "restarts": 5, "backoff": 3, "last_end": ("exited with code 1", 1, None)}


def test_a_slot_seal_checks_for_exactly_its_slot():
    mac = placement_token.make_slot(SECRET, **SLOT)
    assert len(mac) == placement_token.TOKEN_HEX
    assert placement_token.check_slot(SECRET, mac, **SLOT)
    assert mac != placement_token.make(SECRET, **FIELDS)  # another domain


@pytest.mark.parametrize(("name", "other"), [
    ("node_id", "n2"), ("replica", "web-1a2b3d"), ("app", "api"), ("name", "web-000aab"),
    ("restarts", 6), ("restarts", 0), ("backoff", 4), ("backoff", 0), ("last_end", None),
    ("last_end", ("exited with code 2", 1, None)), ("last_end", ("exited with code 1", 2, None)),
    ("last_end", ("exited with code 1", 1, 9))])
def test_a_slot_seal_does_not_check_for_any_other_slot(name, other):
    mac = placement_token.make_slot(SECRET, **SLOT)
    assert not placement_token.check_slot(SECRET, mac, **{**SLOT, name: other})
    assert not placement_token.check_slot(bytes(32), mac, **SLOT)


@pytest.mark.parametrize("mac", [None, "", "A" * 32, 42, "0" * 31])
def test_anything_else_is_no_slot_seal(mac):
    assert not placement_token.check_slot(SECRET, mac, **SLOT)
