"""``HOST:PORT`` flags, one parser for the conductor and the ingress."""

from __future__ import annotations

import pytest

from skr8tr.core.hostport import parse_hostport


@pytest.mark.parametrize(("text", "expected"), [
    ("127.0.0.1:7771", ("127.0.0.1", 7771)), (":0", ("127.0.0.1", 0)),
    ("[::1]:80", ("::1", 80)), ("0.0.0.0:65535", ("0.0.0.0", 65535)),
    ("conductor.example:7771", ("conductor.example", 7771)),
])
def test_good(text, expected):
    assert parse_hostport(text, "--listen") == expected


@pytest.mark.parametrize("text", ["7771", "host:", "host:port", "host:65536", "host:-1", ""])
def test_bad_names_the_flag_and_an_example(text):
    with pytest.raises(ValueError, match=r"^--http .*: expected HOST:PORT, e\.g\. 1\.2\.3\.4:5$"):
        parse_hostport(text, "--http", "1.2.3.4:5")
