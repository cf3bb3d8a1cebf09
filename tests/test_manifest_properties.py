"""Properties of the manifest parser: formatting round-trips, and no input crashes it."""

import json
import re

from hypothesis import HealthCheck as Health
from hypothesis import given, settings
from hypothesis import strategies as st

from skr8tr.core.durations import MAX_DURATION_MS
from skr8tr.core.manifest import (
    Analysis,
    HealthCheck,
    Manifest,
    ManifestError,
    RolloutPolicy,
    format_skr8tr,
    format_toml,
    manifest_to_dict,
    parse_manifest,
)

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[Health.too_slow])

CONTROLS = "".join(chr(c) for c in range(0x20) if c != 0x09) + "\x7f"
# What a manifest refuses besides (terminal controls, bidirectional overrides): core/manifest_tree.
CONTROLS += "".join(map(chr, [*range(0x80, 0x85), *range(0x86, 0xA0), *range(0x202A, 0x202F),
                             *range(0x2066, 0x206A)]))
PLAIN = st.characters(exclude_categories=("Cs",), exclude_characters=CONTROLS)
# What the quoting, comment and brace rules have to get right.
TRICKY = st.sampled_from(
    [" ", "  ", "\t", "#", " #", "# ", "'", '"', "\\", "{", "}", " {", "{}", "{1}", "{ x }",
     "{port}", "{host}", "{Port}", "é", "雪", "\u2028", "\xa0", "\x85", "$HOME", "a=b", ";"]
)  # fmt: skip
VALUE = st.lists(st.one_of(st.text(PLAIN, max_size=4), TRICKY), max_size=6).map("".join)
PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def placeholders_ok(word: str, has_port: bool) -> bool:
    allowed = {"host", "port"} if has_port else {"host"}
    return all(name in allowed for name in PLACEHOLDER.findall(word))


durations = st.one_of(
    st.integers(0, MAX_DURATION_MS),
    st.sampled_from([0, 1, 500, 1000, 1500, 8000, 60_000, 90_000, 3_600_000, MAX_DURATION_MS]),
)
positive_durations = durations.filter(lambda ms: ms > 0)
health_paths = st.text(
    st.characters(exclude_categories=("Cs", "Zs", "Zl", "Zp"), exclude_characters=CONTROLS)
    .filter(lambda c: not c.isspace()),
    max_size=12,
).map(lambda rest: "/" + rest)  # fmt: skip

healths = st.builds(
    HealthCheck,
    path=health_paths,
    expect_status=st.integers(100, 599),
    interval_ms=positive_durations,
    timeout_ms=positive_durations,
    retries=st.integers(1, 100),
)
# Every rate a manifest can write: a whole number of thousandths of a percent.
error_rates = st.one_of(st.integers(0, 100_000), st.sampled_from([0, 1000, 500, 12_500, 100_000]))
analyses = st.builds(
    Analysis,
    window_ms=st.one_of(st.integers(1000, 3_600_000), st.sampled_from([1000, 10_000, 30_000])),
    max_error_rate=error_rates.map(lambda steps: steps / 100_000),
    max_p99_ms=st.one_of(st.none(), st.integers(1, 600_000), st.sampled_from([250, 500, 1000])),
    min_requests=st.integers(1, 1_000_000),
)
rollouts = st.one_of(
    st.just(RolloutPolicy()),
    st.just(RolloutPolicy(analysis=Analysis())),
    st.builds(
        RolloutPolicy,
        settle_ms=durations,
        surge=st.integers(1, 1000),
        ready_timeout_ms=positive_durations,
        drain_ms=durations,
        auto_rollback=st.booleans(),
        order=st.sampled_from(["start-first", "stop-first"]),
        analysis=st.one_of(st.none(), analyses),
    ),
)


@st.composite
def manifests(draw: st.DrawFn) -> Manifest:
    kind = draw(st.sampled_from(["process", "job"]))
    port = draw(st.one_of(st.none(), st.just("auto"), st.integers(1, 65535)))
    has_port = port is not None
    env_keys = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True)
    if has_port:
        env_keys = env_keys.filter(lambda key: key not in ("PORT", "HOST"))
    env = draw(st.dictionaries(env_keys, VALUE, max_size=4))
    return Manifest(
        app=draw(st.from_regex(r"[a-z0-9][a-z0-9-]{0,62}", fullmatch=True)),
        exec=draw(VALUE.filter(bool)),
        base_dir=draw(st.sampled_from(["/", "/srv/apps", "/home/ann/my app"])),
        type=kind,
        args=tuple(draw(st.lists(VALUE.filter(lambda w: placeholders_ok(w, has_port))))),
        workdir=draw(st.one_of(st.none(), VALUE.filter(bool))),
        port=port,
        replicas=draw(st.integers(0, 1000)),
        ram_bytes=draw(
            st.one_of(
                st.none(),
                st.integers(1, 2**50),
                st.sampled_from([2**20, 512 * 2**20, 3 * 2**30, 2**40, 1000]),
            )
        ),
        cpu=draw(
            st.one_of(
                st.none(),
                st.floats(0, 1024, exclude_min=True),
                st.sampled_from([0.5, 1.0, 2.0, 0.25, 1024.0]),
            )
        ),
        env=tuple(sorted(env.items())),
        health=None if kind == "job" else draw(st.one_of(st.none(), healths)),
        rollout=draw(rollouts),
        stop_grace_ms=draw(durations),
        restart=draw(st.sampled_from(["always", "on-failure", "never"])),
    )


@FAST
@given(manifests())
def test_skr8tr_text_reads_back_as_the_same_manifest(m: Manifest) -> None:
    text = format_skr8tr(m)
    assert parse_manifest(text, filename="x", base_dir=m.base_dir) == m
    assert text.endswith("\n") and not text.endswith("\n\n")


@FAST
@given(manifests())
def test_toml_reads_back_as_the_same_manifest(m: Manifest) -> None:
    assert parse_manifest(format_toml(m), filename="x", base_dir=m.base_dir, format="toml") == m


@FAST
@given(manifests())
def test_skr8tr_to_toml_to_manifest(m: Manifest) -> None:
    from_text = parse_manifest(format_skr8tr(m), filename="web.skr8tr", base_dir=m.base_dir)
    assert parse_manifest(format_toml(from_text), filename="web.toml", base_dir=m.base_dir) == m


@FAST
@given(manifests())
def test_dict_is_json(m: Manifest) -> None:
    fields = manifest_to_dict(m)
    assert json.loads(json.dumps(fields)) == fields


def parses_or_fails_cleanly(source: str | bytes, format: str) -> None:
    try:
        parse_manifest(source, filename="f", base_dir="/srv", format=format)
    except ManifestError as exc:
        assert exc.line >= 1 and exc.column >= 1
        assert str(exc).startswith(f"f:{exc.line}:{exc.column}: ")


FORMATS = st.sampled_from(["skr8tr", "toml"])


@FAST
@given(st.text(), FORMATS)
def test_any_text_gives_a_manifest_or_a_manifest_error(source: str, format: str) -> None:
    parses_or_fails_cleanly(source, format)


@FAST
@given(st.binary(), FORMATS)
def test_any_bytes_give_a_manifest_or_a_manifest_error(source: bytes, format: str) -> None:
    parses_or_fails_cleanly(source, format)


KEYS = [
    "app", "type", "exec", "args", "workdir", "port", "replicas", "ram", "cpu", "stop-grace",
    "restart", "env", "health", "rollout", "check", "interval", "timeout", "retries", "settle",
    "surge", "ready-timeout", "drain", "auto-rollback", "order", "PORT", "FOO", "exce", "{", "}",
    "analysis", "window", "max-error-rate", "max-p99", "min-requests",
]  # fmt: skip
WORDS = [
    "web", "job", "process", "auto", "0", "1", "65536", "512M", "1.5", "8s", "1m30s", "0.5ms",
    "GET", "/healthz", "200", "yes", "no", "{port}", "{host}", "{x}", "{", "}", "'", '"', "#",
    "# c", "'a b'", '"x', "\\", "always", "stop-first", "\t", "\x00", "é", "=", '"web"', "[env]",
    "[health]", "[rollout]", "[[env]]", "[]", "true", "{A = 1}", '"GET / 200"',
    "1%", "0.5%", "100%", "101%", "-1%", "1.2345%", '"1%"', "[rollout.analysis]",
]  # fmt: skip
lines = st.tuples(
    st.sampled_from(["", " ", "  ", "    ", "      ", "\t", " \t"]),
    st.sampled_from(KEYS),
    st.lists(st.sampled_from(WORDS), max_size=4),
    st.sampled_from(["", " ", " {", " # note", " =", "\r"]),
).map(lambda t: f"{t[0]}{t[1]} {' '.join(t[2])}{t[3]}".rstrip(" "))
manifest_like = st.lists(lines, max_size=14).map(lambda ls: "app web\n" + "\n".join(ls))
toml_like = st.lists(
    st.tuples(st.sampled_from(KEYS), st.sampled_from(WORDS)).map(lambda t: f"{t[0]} = {t[1]}"),
    max_size=10,
).map(lambda ls: 'app = "web"\nexec = "/x"\n' + "\n".join(ls))


@FAST
@given(st.one_of(manifest_like, toml_like), FORMATS)
def test_manifest_like_text_gives_a_manifest_or_a_manifest_error(source: str, format: str) -> None:
    parses_or_fails_cleanly(source, format)


@FAST
@given(manifests(), st.data())
def test_damaged_manifests_give_a_manifest_or_a_manifest_error(m: Manifest, data) -> None:
    for text, format in ((format_skr8tr(m), "skr8tr"), (format_toml(m), "toml")):
        at = data.draw(st.integers(0, len(text)))
        cut = data.draw(st.integers(0, 3))
        insert = data.draw(st.one_of(TRICKY, st.sampled_from(["\n", "\n  ", "\n}", "["])))
        parses_or_fails_cleanly(text[:at] + insert + text[at + cut :], format)
