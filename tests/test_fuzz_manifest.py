"""Fuzz the manifest parser, alone and through a running conductor: 10,000 examples.

Examples are near-manifests in both languages (real keys and values, broken
indentation, braces, quotes, comments, odd Unicode) and plain random text.
Every one must parse into a Manifest or raise ManifestError naming the file,
a line and a column; nothing else. A manifest that parses must print
(``format_skr8tr``) as text that parses to the same manifest. Every 10th
example is also sent to a real conductor as a signed ``up``; its answer must
be a protocol answer (never ``INTERNAL``), and after each batch the
conductor still answers ``ping``.
"""

from __future__ import annotations

import re
import time

import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from skr8tr.core import protocol
from skr8tr.core.manifest import ManifestError, format_skr8tr, parse_manifest
from skr8tr.ws import trio_client
from tests.security_helpers import FUZZ_LIMITS, open_conductor, ping
from tests.wire_helpers import encode_request

EXAMPLES = 10_000
SEND_EVERY = 10
BATCH = 100  # of those sent
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))
WHERE = re.compile(r"fuzz\.(skr8tr|toml):([1-9][0-9]*):([1-9][0-9]*): .")

KEYS = ["app", "type", "exec", "args", "workdir", "port", "replicas", "ram", "cpu", "env",
        "health", "check", "interval", "timeout", "retries", "rollout", "settle", "surge",
        "ready-timeout", "drain", "auto-rollback", "order", "stop-grace", "restart", "name",
        "GREETING", "PATH", "app web", "apps", "#", "}", "{", ""]
WORDS = ["web", "fz", "job", "process", "/bin/true", "./apps/x.py", "auto", "0", "1", "3",
         "1000", "1001", "-1", "65536", "500ms", "8s", "2m", "1m30s", "8x", "0s", "yes", "no",
         "GET", "POST", "/healthz", "200", "99", "512M", "2G", "0.5", "{port}", "{host}",
         "{Port}", "{", "}", "'", '"', "'a b'", '"x # y"', "#", "# c", "\\", "é", "雪",
         "\u2028", "\xa0", "\t", "start-first", "stop-first", "always", "never",
         "on-failure", "--port", "=", "[", "]", "true", "1e9"]
INDENTS = ["", "", "  ", "  ", "    ", "    ", "      ", " ", "\t", "   "]


@st.composite
def skr8tr_texts(draw):
    lines = []
    if draw(st.integers(0, 3)):
        lines.append(f"app {draw(st.sampled_from(WORDS))}")
    for _ in range(draw(st.integers(0, 12))):
        words = [draw(st.sampled_from(WORDS)) for _ in range(draw(st.integers(0, 3)))]
        tail = draw(st.sampled_from(["", "", "", " {", " }", " # note", "  "]))
        lines.append(draw(st.sampled_from(INDENTS)) + " ".join(
            [draw(st.sampled_from(KEYS)), *words]) + tail)
    return draw(st.sampled_from(["\n", "\r\n", "\n\n"])).join(lines) + draw(
        st.sampled_from(["", "\n"]))


@st.composite
def toml_texts(draw):
    lines = []
    for _ in range(draw(st.integers(0, 10))):
        if not draw(st.integers(0, 3)):
            lines.append(f"[{draw(st.sampled_from(['env', 'health', 'rollout', 'x', '']))}]")
            continue
        value = draw(st.sampled_from(['"web"', '"/bin/true"', "3", "-1", '"auto"', "true",
                                      '"8s"', "1.5", '["a", 1]', "{a = 1}", '"""x"""', "'",
                                      '"é"', "2000", '"500ms"', "nan", "inf", '"{port}"']))
        lines.append(f"{draw(st.sampled_from(KEYS))} = {value}")
    return "\n".join(lines) + "\n"


OPTIONAL = [
    ["  replicas {n}"], ["  port auto"], ["  port {p}"], ["  args --port {{port}} --v '{w}'"],
    ["  env", "    GREETING {w}", "    TOKEN 'a # b'"], ["  type job"], ["  restart {r}"],
    ["  health", "    check GET /healthz 200", "    interval 500ms", "    retries 2"],
    ["  rollout", "    surge {n}", "    settle 1s", "    order stop-first", "    drain 0s"],
    ["  stop-grace 2s"], ["  ram 512M"], ["  cpu 0.5"], ["  workdir ./data"],
]


@st.composite
def near_valid(draw):
    """A valid manifest, often with one thing broken in it."""
    lines = [f"app {draw(st.sampled_from(['web', 'fz', 'a-1', 'job']))}",
             f"  exec {draw(st.sampled_from(['/bin/true', './x', 'python3']))}"]
    for block in draw(st.lists(st.sampled_from(OPTIONAL), max_size=6, unique_by=id)):
        lines += [line.format(n=draw(st.integers(0, 5)), p=draw(st.integers(1, 65535)),
                              w=draw(st.sampled_from(["hi", "x y", "é", "{host}"])),
                              r=draw(st.sampled_from(["always", "never", "on-failure"])))
                  for line in block]
    for _ in range(draw(st.integers(0, 2))):
        at = draw(st.integers(0, len(lines) - 1))
        action = draw(st.sampled_from(["word", "indent", "drop", "dup", "brace"]))
        if action == "word":
            words = lines[at].split(" ")
            words[draw(st.integers(0, len(words) - 1))] = draw(st.sampled_from(WORDS))
            lines[at] = " ".join(words)
        elif action == "indent":
            lines[at] = draw(st.sampled_from(INDENTS)) + lines[at].lstrip()
        elif action == "drop":
            del lines[at]
        elif action == "dup":
            lines.insert(at, lines[at])
        else:
            lines[at] += draw(st.sampled_from([" {", " }", "}"]))
    return "\n".join(lines) + "\n"


manifests = st.one_of(
    st.tuples(st.just("skr8tr"), near_valid()),
    st.tuples(st.just("skr8tr"), near_valid()),
    st.tuples(st.just("skr8tr"), skr8tr_texts()),
    st.tuples(st.just("toml"), toml_texts()),
    st.tuples(st.sampled_from(["skr8tr", "toml"]), st.text(max_size=200)),
)


def check(fmt: str, text: str) -> None:
    try:
        m = parse_manifest(text, filename=f"fuzz.{fmt}", base_dir="/srv", format=fmt)
    except ManifestError as exc:
        assert WHERE.match(str(exc)), str(exc)
        assert exc.line >= 1 and exc.column >= 1 and exc.expected is not None
        return
    again = parse_manifest(format_skr8tr(m), filename="fuzz.skr8tr", base_dir="/srv")
    assert again == m, (text, format_skr8tr(m))


def run_fuzz() -> list:
    sample = []
    count = {"n": 0}

    @FUZZ
    @given(manifests)
    def fuzz(example):
        check(*example)
        count["n"] += 1
        if count["n"] % SEND_EVERY == 0:
            sample.append(example)

    fuzz()
    assert count["n"] >= EXAMPLES
    return sample


async def test_manifest_parser_and_conductor_never_break(tmp_path):
    async with open_conductor(tmp_path, limits=FUZZ_LIMITS) as c:
        sample = await trio.to_thread.run_sync(run_fuzz)
        codes: dict[str, int] = {}
        async with trio_client.open_websocket(c.url + "/v1/cli") as ws:
            for start in range(0, len(sample), BATCH):
                for i, (fmt, text) in enumerate(sample[start:start + BATCH], start=start):
                    req = encode_request(
                        id=f"m{i}", cmd="up", signing_key=c.admin, ts=time.time(),
                        args={"manifest": text, "format": fmt, "base_dir": "/srv"})
                    await ws.send_message(req)
                    reply = protocol.decode_reply(await ws.get_message())
                    assert not isinstance(reply, protocol.DecodeError), reply
                    code = "ok" if reply.ok else reply.error_code
                    assert code in ("ok", "INVALID_MANIFEST", "NO_CAPACITY", "CONFLICT"), \
                        (text, reply)
                    codes[code] = codes.get(code, 0) + 1
                assert (await ping(c.url))["result"]["pong"] == "conductor"
    assert codes.get("INVALID_MANIFEST", 0) > 100, codes
    reached = codes.get("ok", 0) + codes.get("NO_CAPACITY", 0) + codes.get("CONFLICT", 0)
    assert reached > 50, codes  # valid manifests got past the parser to the cluster
