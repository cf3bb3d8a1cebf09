"""The ``analysis`` block of a manifest's ``rollout`` (DESIGN.md §11), in both formats.

Every key and its bounds, the percentages of ``max-error-rate`` (exact, three decimals at
most), every error at its line and column, ``fmt`` (both formats, comments kept) and the
real ``skr8tr fmt``. Round trips of any analysis: tests/test_manifest_properties.py and
tests/test_fmt.py draw it in their manifests.
"""

from __future__ import annotations

import dataclasses
import operator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from skr8tr.core.manifest import (
    Analysis,
    ManifestError,
    format_skr8tr,
    format_toml,
    parse_manifest,
    read_comments,
)
from skr8tr.core.percent import PercentError, format_percent, parse_percent
from skr8tr.manifest_files import load_manifest
from tests.conftest import MANIFESTS, run_cli
from tests.test_manifest_properties import FAST


def parse(source: str, filename: str = "web.skr8tr"):
    return parse_manifest(source, filename=filename, base_dir="/srv")


def app(*lines: str) -> str:
    """App `web` with a rollout block holding `analysis` and then *lines* inside it."""
    return "app web\n  exec /bin/true\n  rollout\n    analysis\n" + "".join(
        f"      {line}\n" for line in lines)


T = 'app = "web"\nexec = "/x"\n'  # the start of a valid TOML manifest


def toml(*lines: str) -> str:
    return T + "[rollout.analysis]\n" + "".join(f"{line}\n" for line in lines)


def error(source: str, filename: str = "web.skr8tr") -> ManifestError:
    with pytest.raises(ManifestError) as caught:
        parse(source, filename)
    return caught.value


# --- values --------------------------------------------------------------------------------


def test_no_block_no_analysis_and_an_empty_block_every_default():
    assert parse("app web\n  exec /x\n").rollout.analysis is None
    assert parse("app web\n  exec /x\n  rollout\n    surge 2\n").rollout.analysis is None
    defaults = Analysis(window_ms=30_000, max_error_rate=0.01, max_p99_ms=None, min_requests=20)
    assert Analysis() == defaults
    for source, name in [
        (app(), "web.skr8tr"),
        ("app web {\n  exec /x\n  rollout {\n    analysis {\n    }\n  }\n}\n", "web.skr8tr"),
        (T + "[rollout.analysis]\n", "web.toml"),
        (T + "[rollout]\nanalysis = {}\n", "web.toml"),
    ]:
        assert parse(source, name).rollout.analysis == defaults, source


ACCEPTED = [
    ("window 10s", "window_ms", 10_000),
    ("window 1s", "window_ms", 1000),
    ("window 1h", "window_ms", 3_600_000),
    ("window 1m30s", "window_ms", 90_000),
    ("max-error-rate 1%", "max_error_rate", 0.01),
    ("max-error-rate 0%", "max_error_rate", 0.0),
    ("max-error-rate 100%", "max_error_rate", 1.0),
    ("max-error-rate 0.5%", "max_error_rate", 0.005),
    ("max-error-rate 12.5%", "max_error_rate", 0.125),
    ("max-error-rate 0.001%", "max_error_rate", 0.00001),
    ("max-error-rate 2.500%", "max_error_rate", 0.025),  # trailing zeros are not decimals
    ("max-p99 500ms", "max_p99_ms", 500),
    ("max-p99 1ms", "max_p99_ms", 1),
    ("max-p99 10m", "max_p99_ms", 600_000),
    ("min-requests 1", "min_requests", 1),
    ("min-requests 1000000", "min_requests", 1_000_000),
]


@pytest.mark.parametrize(("line", "attribute", "expected"), ACCEPTED)
def test_value_is_read_into_its_field_in_both_formats(line, attribute, expected):
    got = operator.attrgetter(attribute)
    assert got(parse(app(line)).rollout.analysis) == expected
    key, value = line.split(" ", 1)
    toml_value = value if key == "min-requests" else f'"{value}"'
    assert got(parse(toml(f"{key} = {toml_value}"), "web.toml").rollout.analysis) == expected


def test_the_block_sits_beside_the_other_rollout_keys():
    m = parse("app web\n  exec /x\n  rollout\n    surge 2\n    analysis\n      window 10s\n"
              "      max-p99 250ms\n    drain 1s\n")
    assert (m.rollout.surge, m.rollout.drain_ms) == (2, 1000)
    assert m.rollout.analysis == Analysis(window_ms=10_000, max_p99_ms=250)
    assert m.rollout.analysis.window_s == 10.0
    dotted = T + '[rollout]\nsurge = 2\nanalysis.window = "10s"\nanalysis.max-p99 = "250ms"\n'
    assert parse(dotted, "web.toml").rollout.analysis == m.rollout.analysis


# --- errors --------------------------------------------------------------------------------


ERRORS = [
    (app("window 500ms"), 5, 14, "bad window '500ms' (less than 1s): expected a duration"),
    (app("window 2h"), 5, 14, "bad window '2h' (more than 1h)"),
    (app("window 0s"), 5, 14, "(less than 1s)"),
    (app("window 10"), 5, 14, "bad duration '10' (no unit)"),
    (app("window soon"), 5, 14, "expected a duration like 10s, 30s or 1m (1s..1h)"),
    (app("max-error-rate 1"), 5, 22, "bad max-error-rate '1' (no '%'): expected a percent"),
    (app("max-error-rate 0.5"), 5, 22, "(no '%')"),
    (app("max-error-rate -1%"), 5, 22, "bad max-error-rate '-1%' (negative)"),
    (app("max-error-rate 101%"), 5, 22, "bad max-error-rate '101%' (more than 100%)"),
    (app("max-error-rate 100.001%"), 5, 22, "(more than 100%)"),
    (app("max-error-rate 1.2345%"), 5, 22, "(more than 3 decimals)"),
    (app("max-error-rate 1 %"), 5, 22, "bad max-error-rate '1 %'"),
    (app("max-error-rate .5%"), 5, 22, "expected a percent 0%..100% like 1%, 0.5% or 12.5%"),
    (app("max-error-rate " + "9" * 5000 + "%"), 5, 22, "(more than 100%)"),
    (app("max-p99 0ms"), 5, 15, "bad max-p99 '0ms' (less than 1ms)"),
    (app("max-p99 11m"), 5, 15, "bad max-p99 '11m' (more than 10m): expected a duration"),
    (app("max-p99 0.5ms"), 5, 15, "not a whole number of milliseconds"),
    (app("min-requests 0"), 5, 20, "bad min-requests '0' (out of range): expected a whole"),
    (app("min-requests 1000001"), 5, 20, "expected a whole number 1..1000000"),
    (app("min-requests 2.5"), 5, 20, "bad min-requests '2.5'"),
    (app("window"), 5, 7, "'window' needs a value"),
    (app("windw 10s"), 5, 7, "unknown key 'windw' in analysis block: did you mean 'window'?"),
    (app("window 10s", "window 20s"), 6, 7, "duplicate key 'window' in analysis block"),
    (app("window 10s", "  deeper 1"), 6, 9, "'window' takes a value, not a block"),
    ("app web\n  exec /x\n  rollout\n    analysis yes\n", 4, 14,
     "'analysis' takes a block, not a value"),
    ("app web\n  exec /x\n  rollout\n    window 10s\n", 4, 5,
     "unknown key 'window' in rollout block"),
    ("app web\n  exec /x\n  analysis\n", 3, 3, "unknown key 'analysis' in app block"),
    ("app web\n  exec /x\n  rollout\n    analysis\n    analysis\n", 5, 5,
     "duplicate key 'analysis' in rollout block"),
]  # fmt: skip


@pytest.mark.parametrize(("source", "line", "column", "message"), ERRORS)
def test_error_names_line_column_and_problem(source, line, column, message):
    exc = error(source)
    assert (exc.line, exc.column) == (line, column), str(exc)
    assert message in exc.message, exc.message
    assert str(exc) == f"web.skr8tr:{line}:{column}: {exc.message}"


TOML_ERRORS = [
    (toml("max-error-rate = 1"), 4, 18, "'max-error-rate' is an integer: expected a string"),
    (toml("max-error-rate = 0.01"), 4, 18, "'max-error-rate' is a float"),
    (toml('max-error-rate = "101%"'), 4, 18, "bad max-error-rate '101%' (more than 100%)"),
    (toml('max-error-rate = "1"'), 4, 18, "(no '%')"),
    (toml("window = 10"), 4, 10, "'window' is an integer"),
    (toml('window = "90m"'), 4, 10, "bad window '90m' (more than 1h)"),
    (toml('max-p99 = "0s"'), 4, 11, "(less than 1ms)"),
    (toml("min-requests = 0"), 4, 16, "bad min-requests '0' (out of range)"),
    (toml('min-requests = "20"', "min-requests = 20"), 5, 18, "invalid TOML"),
    (toml("min-requests = true"), 4, 16, "'min-requests' is a boolean"),
    (toml('colour = "x"'), 4, 1, "unknown key 'colour' in analysis block"),
    (toml("[rollout.analysis.deep]"), 4, 19, "unknown key 'deep' in analysis block"),
    (T + '[rollout]\nanalysis = "on"\n', 4, 12, "'analysis' takes a block, not a value: "
                                              "expected a [rollout.analysis] table"),
    (T + '[rollout]\nanalysis = {window = "5h"}\n', 4, 12, "bad window '5h'"),
]  # fmt: skip


@pytest.mark.parametrize(("source", "line", "column", "message"), TOML_ERRORS)
def test_toml_error_names_line_column_and_problem(source, line, column, message):
    exc = error(source, "web.toml")
    assert (exc.line, exc.column) == (line, column), str(exc)
    assert message in exc.message, exc.message
    assert str(exc).startswith(f"web.toml:{line}:{column}: ")


def test_every_error_in_the_block_is_reported_in_line_order():
    exc = error(app("window 500ms", "max-error-rate 1", "max-p99 11m", "min-requests 0",
                    "colour blue") + "    surge 0\n")
    assert [(e.line, e.column) for e in exc.errors] == [(5, 14), (6, 22), (7, 15), (8, 20),
                                                        (9, 7), (10, 11)]


# --- percentages ---------------------------------------------------------------------------


@FAST
@given(st.integers(0, 100_000))
def test_every_percent_formats_and_reads_back_exactly(steps):
    rate = steps / 100_000
    text = format_percent(rate)
    assert parse_percent(text) == rate
    assert text.endswith("%") and not text.startswith(".")
    decimals = text[:-1].partition(".")[2]
    assert len(decimals) <= 3 and not decimals.endswith("0")


@pytest.mark.parametrize(("text", "rate", "again"), [
    ("1%", 0.01, "1%"), ("0.5%", 0.005, "0.5%"), ("12.5%", 0.125, "12.5%"),
    ("100%", 1.0, "100%"), ("0%", 0.0, "0%"), ("007.250%", 0.0725, "7.25%"),
])  # fmt: skip
def test_percent_examples(text, rate, again):
    assert parse_percent(text) == rate and format_percent(rate) == again


@pytest.mark.parametrize(("text", "reason"), [
    ("1", "no '%'"), ("0.5", "no '%'"), ("-1%", "negative"), ("101%", "more than 100%"),
    ("1.2345%", "more than 3 decimals"), ("%", None), ("1.%", None), ("1e2%", None), ("", None),
    ("１%", None),  # a fullwidth digit is not a digit here
])  # fmt: skip
def test_percent_refusals_say_why(text, reason):
    with pytest.raises(PercentError) as caught:
        parse_percent(text)
    assert caught.value.reason == reason


# --- fmt -----------------------------------------------------------------------------------


COMMENTED = """\
app web
  exec ./server
  rollout  # the rollout
    surge 2
    # judged on live traffic
    analysis  # per batch
      window 10s  # long enough for 20 requests
      max-error-rate 0.5%
      # a comment before max-p99
      max-p99 500ms
      min-requests 20  # the default: kept, as every analysis key
    drain 1s
"""


def test_fmt_writes_the_whole_block_with_its_comments_in_both_formats():
    m = parse(COMMENTED)
    comments = read_comments(COMMENTED, format="skr8tr")
    out = format_skr8tr(m, comments)
    assert out == (
        "app web\n"
        "  exec ./server\n"
        "  rollout  # the rollout\n"
        "    surge 2\n"
        "    drain 1s\n"
        "    # judged on live traffic\n"
        "    analysis  # per batch\n"
        "      window 10s  # long enough for 20 requests\n"
        "      max-error-rate 0.5%\n"
        "      # a comment before max-p99\n"
        "      max-p99 500ms\n"
        "      min-requests 20  # the default: kept, as every analysis key\n"
    )
    assert format_skr8tr(m, read_comments(out, format="skr8tr")) == out
    as_toml = format_toml(m, comments)
    assert as_toml == (
        'app = "web"\n'
        'exec = "./server"\n'
        "\n"
        "[rollout]  # the rollout\n"
        "surge = 2\n"
        'drain = "1s"\n'
        "\n"
        "# judged on live traffic\n"
        "[rollout.analysis]  # per batch\n"
        'window = "10s"  # long enough for 20 requests\n'
        'max-error-rate = "0.5%"\n'
        "# a comment before max-p99\n"
        'max-p99 = "500ms"\n'
        "min-requests = 20  # the default: kept, as every analysis key\n"
    )
    assert parse(as_toml, "web.toml") == m
    assert format_toml(m, read_comments(as_toml, format="toml")) == as_toml
    assert format_skr8tr(m, read_comments(as_toml, format="toml")) == out


def test_fmt_fills_in_the_defaults_and_leaves_out_an_unjudged_p99():
    m = parse(app())
    assert format_skr8tr(m) == ("app web\n  exec /bin/true\n  rollout\n    analysis\n"
                                "      window 30s\n      max-error-rate 1%\n"
                                "      min-requests 20\n")
    # a rollout block holding only the analysis: TOML writes no empty [rollout] table
    assert format_toml(m) == ('app = "web"\nexec = "/bin/true"\n\n[rollout.analysis]\n'
                              'window = "30s"\nmax-error-rate = "1%"\nmin-requests = 20\n')
    assert parse(format_toml(m), "web.toml") == m


def test_cli_fmt_checks_and_converts_the_block(cli_env, tmp_path):
    path = tmp_path / "web.skr8tr"
    path.write_text(COMMENTED)
    proc = run_cli("fmt", "--toml", str(path), env=cli_env)
    assert proc.returncode == 0, proc.stderr
    assert '[rollout.analysis]  # per batch\nwindow = "10s"' in proc.stdout
    toml_path = tmp_path / "web.toml"
    toml_path.write_text(proc.stdout)
    proc = run_cli("fmt", str(toml_path), env=cli_env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == format_skr8tr(parse(COMMENTED), read_comments(COMMENTED,
                                                                        format="skr8tr"))
    path.write_text(app("window 500ms", "max-error-rate 101%"))
    proc = run_cli("fmt", str(path), env=cli_env)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        f"error: INVALID_MANIFEST: {path}:5:14: bad window '500ms' (less than 1s): expected "
        "a duration like 10s, 30s or 1m (1s..1h)",
        f"error: INVALID_MANIFEST: {path}:6:22: bad max-error-rate '101%' (more than 100%): "
        "expected a percent 0%..100% like 1%, 0.5% or 12.5%",
    ]


# --- the example manifests -----------------------------------------------------------------


def test_the_example_manifests_differ_only_in_the_release():
    good = load_manifest(MANIFESTS / "hello-analysis.skr8tr")
    bad = load_manifest(MANIFESTS / "hello-analysis-bad.skr8tr")
    assert good.rollout.analysis == Analysis(window_ms=10_000, max_error_rate=0.01,
                                             max_p99_ms=500, min_requests=20)
    assert (good.app, good.replicas, good.port) == ("hello", 3, "auto")
    assert good.args[-2:] == ("--version", "v1")
    assert bad.args[-4:] == ("--version", "v2", "--fail-rate", "0.2")
    assert dataclasses.replace(bad, args=good.args) == good
