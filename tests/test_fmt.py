"""``skr8tr fmt`` keeps comments, and every manifest error is reported, in line order.

Core: comments found in both formats, written back beside their keys, surviving a
conversion, a dropped default and a second run (Hypothesis over any manifest).
CLI: the real ``skr8tr fmt`` / ``up`` as processes.
"""

from __future__ import annotations

import json

import tomli_w
from hypothesis import given
from hypothesis import strategies as st

from skr8tr.core import manifest
from skr8tr.core.manifest import Comments, ManifestError, parse_manifest, read_comments
from skr8tr.core.manifest_format import _paths, to_dict
from skr8tr.core.manifest_model import MAX_ERRORS
from tests.conftest import run_cli
from tests.test_manifest_properties import FAST, PLAIN, manifests

COMMENTED = """\
# A web service.
# Two lines above the app.

app web   # the app line
  # where the binary lives
  exec ./server  # trailing on exec
  args --port {port} '#not-a-comment'
  port auto
  env {   # env block
    # about B
    B "x # inside quotes"   # after B
  }  # closing brace
  rollout
    settle 8s  # the default: this line goes, its comment stays
    drain 1s
# the very end
"""

COMMENTED_TOML = """\
# A web service, in TOML.
app = "web"  # the app line
exec = "./server"  # "quoted" in a comment
args = [
  "--port", # inside the array
  "{port}",
]
port = "auto"

# about env
[env]  # the table
B = "x # inside quotes"  # after B
# the very end
"""


def parse(text: str, format: str = "skr8tr") -> manifest.Manifest:
    return parse_manifest(text, filename="m", base_dir="/srv", format=format)


def test_comments_are_read_by_key():
    c = read_comments(COMMENTED, format="skr8tr")
    assert c.before[("app",)] == ["# A web service.", "# Two lines above the app."]
    assert c.after[("app",)] == "# the app line"
    assert c.before[("exec",)] == ["# where the binary lives"]
    assert c.after[("exec",)] == "# trailing on exec"
    assert ("args",) not in c.after  # '#not-a-comment' is quoted
    assert c.after[("env",)] == "# env block"
    assert c.before[("env", "B")] == ["# about B"] and c.after[("env", "B")] == "# after B"
    assert c.before[("rollout",)] == ["# closing brace"]
    assert c.after[("rollout", "settle")].startswith("# the default")
    assert c.end == ["# the very end"]
    t = read_comments(COMMENTED_TOML, format="toml")
    assert t.after[("exec",)] == '# "quoted" in a comment'
    assert t.before[("port",)] == ["# inside the array"]
    assert t.before[("env",)] == ["# about env"] and t.after[("env",)] == "# the table"
    assert t.after[("env", "B")] == "# after B" and t.end == ["# the very end"]


def test_fmt_keeps_comments_in_skr8tr_output():
    m = parse(COMMENTED)
    out = manifest.format_skr8tr(m, read_comments(COMMENTED, format="skr8tr"))
    assert out == (
        "# A web service.\n"
        "# Two lines above the app.\n"
        "app web  # the app line\n"
        "  # where the binary lives\n"
        "  exec ./server  # trailing on exec\n"
        "  args --port {port} '#not-a-comment'\n"
        "  port auto\n"
        "  env  # env block\n"
        "    # about B\n"
        "    B 'x # inside quotes'  # after B\n"
        "  # closing brace\n"
        "  rollout\n"
        "    # the default: this line goes, its comment stays\n"
        "    drain 1s\n"
        "# the very end\n"
    )
    assert parse(out) == m
    assert manifest.format_skr8tr(m, read_comments(out, format="skr8tr")) == out


def test_fmt_keeps_comments_in_toml_output_and_across_formats():
    m = parse(COMMENTED)
    out = manifest.format_toml(m, read_comments(COMMENTED, format="skr8tr"))
    assert out.startswith("# A web service.\n# Two lines above the app.\n"
                          'app = "web"  # the app line\n# where the binary lives\n'
                          'exec = "./server"  # trailing on exec\n')
    assert '[env]  # env block\n# about B\nB = "x # inside quotes"  # after B\n' in out
    assert out.endswith('# the default: this line goes, its comment stays\ndrain = "1s"\n'
                        "# the very end\n")
    assert parse(out, "toml") == m
    # and back: TOML's comments into .skr8tr
    t = parse(COMMENTED_TOML, "toml")
    back = manifest.format_skr8tr(t, read_comments(COMMENTED_TOML, format="toml"))
    assert "app web  # the app line\n" in back and "    B 'x # inside quotes'  # after B\n" in back
    assert "  # inside the array\n  port auto\n" in back
    assert parse(back) == t


def test_without_comments_toml_is_exactly_tomli_w():
    m = parse(COMMENTED)
    assert manifest.format_toml(m) == tomli_w.dumps(to_dict(m, full=False))


COMMENT = st.text(PLAIN, max_size=12).map(lambda s: "#" + s.rstrip(" \t"))


@st.composite
def commented(draw: st.DrawFn) -> tuple[manifest.Manifest, Comments]:
    m = draw(manifests())
    paths = _paths(to_dict(m, full=False))
    comments = Comments(order=list(paths))
    for path in paths:
        before = draw(st.lists(COMMENT, max_size=2))
        if before:
            comments.before[path] = before
        if draw(st.booleans()):
            comments.after[path] = draw(COMMENT)
    comments.end = draw(st.lists(COMMENT, max_size=2))
    return m, comments


@FAST
@given(commented())
def test_any_comments_survive_both_formats(case) -> None:
    m, comments = case
    for fmt, write in (("skr8tr", manifest.format_skr8tr), ("toml", manifest.format_toml)):
        text = write(m, comments)
        assert parse_manifest(text, filename="m", base_dir=m.base_dir, format=fmt) == m
        again = read_comments(text, format=fmt)
        assert write(m, again) == text  # a second fmt changes nothing
        for lines in comments.before.values():
            for line in lines:
                assert line in text
        for line in comments.after.values():
            assert line in text


@FAST
@given(manifests())
def test_toml_output_unchanged_without_comments(m) -> None:
    assert manifest.format_toml(m) == tomli_w.dumps(to_dict(m, full=False))


# --------------------------------------------------------------------------- every error

BAD = """\
app web
  exec ./x
  replicas lots
  port 99999
  restart sometimes
  env
    1BAD x
  health
    check POST /h
    interval forever
  rollout
    surge 0
  colour blue
"""


def test_every_error_is_reported_in_line_order():
    try:
        parse(BAD)
    except ManifestError as exc:
        found = [(e.line, e.column) for e in exc.errors]
        assert found == [(3, 12), (4, 8), (5, 11), (7, 5), (9, 11), (10, 14), (12, 11),
                         (13, 3)]
        assert (exc.line, exc.column) == (3, 12)  # the exception is the first one
        assert all(line.startswith("m:") for line in exc.lines())
    else:
        raise AssertionError("parsed")


def test_syntax_errors_are_all_reported_too():
    text = "app web\n\texec x\n  replicas 2\n   port 8\n  }\n  exec /bin/true\n"
    try:
        parse(text)
    except ManifestError as exc:
        assert [(e.line, e.column) for e in exc.errors] == [(2, 1), (4, 4), (5, 3)]
    else:
        raise AssertionError("parsed")


def test_a_misspelt_key_is_not_also_missing():
    try:
        parse("app web\n  exce /x\n")
    except ManifestError as exc:
        assert [e.message.split(":")[0] for e in exc.errors] == ["unknown key 'exce' in app "
                                                                  "block"]
    else:
        raise AssertionError("parsed")


def test_errors_are_bounded():
    text = "app web\n  exec /x\n" + "  zz 1\n" * 1000
    try:
        parse(text)
    except ManifestError as exc:
        assert len(exc.errors) == MAX_ERRORS == 100
        assert exc.stopped and exc.lines()[-1] == "m: stopped after 100 errors"
    else:
        raise AssertionError("parsed")


# --------------------------------------------------------------------------- the real CLI


def test_cli_fmt_keeps_comments(cli_env, tmp_path):
    path = tmp_path / "web.skr8tr"
    path.write_text(COMMENTED)
    proc = run_cli("fmt", str(path), env=cli_env)
    assert proc.returncode == 0, proc.stderr
    assert "  exec ./server  # trailing on exec\n" in proc.stdout
    assert proc.stdout.startswith("# A web service.\n")
    proc = run_cli("fmt", "--toml", str(path), env=cli_env)
    assert proc.returncode == 0, proc.stderr
    assert 'exec = "./server"  # trailing on exec\n' in proc.stdout
    toml = tmp_path / "web.toml"
    toml.write_text(proc.stdout)
    proc = run_cli("fmt", str(toml), env=cli_env)
    assert "  exec ./server  # trailing on exec\n" in proc.stdout


def test_cli_reports_every_error_one_line_each(cli_env, tmp_path):
    path = tmp_path / "bad.skr8tr"
    path.write_text(BAD)
    for verb in ("fmt", "up", "rollout"):
        proc = run_cli(verb, str(path), env=cli_env)
        assert proc.returncode == 2
        lines = proc.stderr.splitlines()
        assert len(lines) == 8, proc.stderr
        assert all(line.startswith(f"error: INVALID_MANIFEST: {path}:") for line in lines)
        assert [line.split(":")[3] for line in lines] == ["3", "4", "5", "7", "9", "10", "12",
                                                          "13"]
    proc = run_cli("fmt", "--json", str(path), env=cli_env)
    doc = json.loads(proc.stdout)["error"]
    assert doc["message"] == doc["errors"][0] and len(doc["errors"]) == 8
