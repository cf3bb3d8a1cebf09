"""The manifest parser: every key, every default, every error at its exact line and column."""

import operator

import pytest

from skr8tr.core.manifest import (
    HealthCheck,
    Manifest,
    ManifestError,
    RolloutPolicy,
    format_skr8tr,
    format_toml,
    manifest_to_dict,
    parse_manifest,
)
from skr8tr.manifest_files import load_manifest

BASE = "/srv/site"


def parse(source: str | bytes, **kwargs) -> Manifest:
    kwargs.setdefault("filename", "web.skr8tr")
    return parse_manifest(source, base_dir=BASE, **kwargs)


def app(*lines: str) -> str:
    """A manifest for app `web` with `exec /bin/true` and the given lines inside the app."""
    return "app web\n  exec /bin/true\n" + "".join(f"  {line}\n" for line in lines)


def error(source: str | bytes, **kwargs) -> ManifestError:
    with pytest.raises(ManifestError) as caught:
        parse(source, **kwargs)
    return caught.value


# --- values --------------------------------------------------------------------------------


ACCEPTED = [
    (["type process"], "type", "process"),
    (["type job"], "type", "job"),
    (["args 3600"], "args", ("3600",)),
    (["args --name 'my app' \"x y\" '#fff'"], "args", ("--name", "my app", "x y", "#fff")),
    (["args a b # a comment"], "args", ("a", "b")),
    (["args a#b it\\'s"], "args", ("a#b", "it's")),
    (["args {} {1} '{ x }' {HOST"], "args", ("{}", "{1}", "{ x }", "{HOST")),
    (
        ["port 80", "args --port={port} --host {host}"],
        "args",
        ("--port={port}", "--host", "{host}"),
    ),
    (["args ''"], "args", ("",)),
    (["workdir /var/lib/web"], "workdir", "/var/lib/web"),
    (["workdir 'my data'"], "workdir", "my data"),
    (["port 1"], "port", 1),
    (["port 65535"], "port", 65535),
    (["port 08080"], "port", 8080),
    (["port auto"], "port", "auto"),
    (["replicas 0"], "replicas", 0),
    (["replicas 1000"], "replicas", 1000),
    (["ram 512M"], "ram_bytes", 512 * 2**20),
    (["ram 512MB"], "ram_bytes", 512 * 2**20),
    (["ram 512MiB"], "ram_bytes", 512 * 2**20),
    (["ram 1024K"], "ram_bytes", 2**20),
    (["ram 2G"], "ram_bytes", 2 * 2**30),
    (["ram 1T"], "ram_bytes", 2**40),
    (["ram 100B"], "ram_bytes", 100),
    (["cpu 0.5"], "cpu", 0.5),
    (["cpu 2"], "cpu", 2.0),
    (["cpu 1024"], "cpu", 1024.0),
    (["stop-grace 10s"], "stop_grace_ms", 10_000),
    (["stop-grace 0s"], "stop_grace_ms", 0),
    (["stop-grace 1m30s"], "stop_grace_ms", 90_000),
    (["stop-grace 1.5s"], "stop_grace_ms", 1500),
    (["stop-grace 250ms"], "stop_grace_ms", 250),
    (["stop-grace 1h"], "stop_grace_ms", 3_600_000),
    (["stop-grace 720h"], "stop_grace_ms", 30 * 24 * 3_600_000),
    (["restart always"], "restart", "always"),
    (["restart on-failure"], "restart", "on-failure"),
    (["restart never"], "restart", "never"),
    (["type job", "restart always"], "restart", "always"),
    (["env", "  B two words", "  A 1"], "env", (("A", "1"), ("B", "two words"))),
    (["env", "  A hello # comment"], "env", (("A", "hello"),)),
    (["env", "  A ' padded # not a comment '"], "env", (("A", " padded # not a comment "),)),
    (["env", "  A ''", '  B ""'], "env", (("A", ""), ("B", ""))),
    (["env", "  A it's {x} $HOME"], "env", (("A", "it's {x} $HOME"),)),
    # Quotes open and close as in the shell, also inside a literal value: no comment in a quote.
    (["env", "  A it's # no comment"], "env", (("A", "it's # no comment"),)),
    (["env", "  A a\\ #b"], "env", (("A", "a\\ #b"),)),
    (["env", "  a_1 x"], "env", (("a_1", "x"),)),
    (["env"], "env", ()),
    (["port 80", "env", "  PORTS x"], "env", (("PORTS", "x"),)),
    (["health", "  check GET /healthz"], "health", HealthCheck(path="/healthz")),
    (["health", "  check GET /ok 204"], "health.expect_status", 204),
    (["health", "  check GET /a#b?c=d 599"], "health.path", "/a#b?c=d"),
    (["health", "  check GET / 100", "  interval 500ms"], "health.interval_ms", 500),
    (["health", "  check GET /", "  timeout 2s"], "health.timeout_ms", 2000),
    (["health", "  check GET /", "  retries 1"], "health.retries", 1),
    (["health", "  check GET /", "  retries 100"], "health.retries", 100),
    (["rollout", "  settle 0s"], "rollout.settle_ms", 0),
    (["rollout", "  settle 2s"], "rollout.settle_ms", 2000),
    (["rollout", "  surge 1000"], "rollout.surge", 1000),
    (["rollout", "  ready-timeout 5m"], "rollout.ready_timeout_ms", 300_000),
    (["rollout", "  drain 1s"], "rollout.drain_ms", 1000),
    (["rollout", "  auto-rollback no"], "rollout.auto_rollback", False),
    (["rollout", "  auto-rollback yes"], "rollout.auto_rollback", True),
    (["rollout", "  order stop-first"], "rollout.order", "stop-first"),
    (["rollout", "  order start-first"], "rollout.order", "start-first"),
]


@pytest.mark.parametrize(("lines", "attribute", "expected"), ACCEPTED)
def test_value_is_read_into_its_field(lines, attribute, expected):
    assert operator.attrgetter(attribute)(parse(app(*lines))) == expected


def test_a_minimal_manifest_has_every_default():
    m = parse("app x\n  exec /bin/true\n")
    assert m == Manifest(app="x", exec="/bin/true", base_dir=BASE)
    assert (m.type, m.args, m.workdir, m.port, m.replicas) == ("process", (), None, None, 1)
    assert (m.ram_bytes, m.cpu, m.env, m.health) == (None, None, (), None)
    assert (m.stop_grace_ms, m.restart) == (5000, "always")
    assert m.rollout == RolloutPolicy(8000, 1, 60_000, 0, True, "start-first")


def test_a_job_restarts_on_failure_by_default():
    assert parse(app("type job")).restart == "on-failure"


def test_health_defaults():
    health = parse(app("health", "  check GET /healthz")).health
    assert health == HealthCheck("/healthz", "GET", 200, 1000, 1000, 3)
    assert (health.interval_s, health.timeout_s) == (1.0, 1.0)


def test_seconds_properties():
    m = parse(app("stop-grace 2500ms", "rollout", "  settle 1s", "  drain 1500ms"))
    assert (m.stop_grace_s, m.rollout.settle_s, m.rollout.drain_s) == (2.5, 1.0, 1.5)
    assert m.rollout.ready_timeout_s == 60.0


@pytest.mark.parametrize(
    ("exec_", "expected"),
    [
        ("./apps/x.py", f"{BASE}/apps/x.py"),
        ("apps/x.py", f"{BASE}/apps/x.py"),
        ("../bin/y", "/srv/bin/y"),
        ("/abs/z", "/abs/z"),
        ("python3", "python3"),
    ],
)
def test_exec_path_is_resolved_against_the_manifest_folder(exec_, expected):
    m = parse(f"app web\n  exec {exec_}\n")
    assert m.exec == exec_
    assert m.exec_path == expected


@pytest.mark.parametrize(
    ("workdir", "expected"),
    [("./data", f"{BASE}/data"), ("data", f"{BASE}/data"), ("../d", "/srv/d"), ("/v/x", "/v/x")],
)
def test_workdir_path_is_resolved_against_the_manifest_folder(workdir, expected):
    assert parse(app(f"workdir {workdir}")).workdir_path == expected
    assert parse(app()).workdir_path is None


def test_expand_args_fills_in_host_and_port():
    m = parse(app("port auto", "args --bind {host}:{port} {1} {}"), filename="x")
    assert m.expand_args("10.0.0.5", 20001) == ("--bind", "10.0.0.5:20001", "{1}", "{}")


def test_expand_args_refuses_a_missing_port():
    m = parse(app("port auto", "args {port}"))
    with pytest.raises(ValueError, match="port"):
        m.expand_args("h", None)
    assert parse(app("args {host}")).expand_args("{port}", None) == ("{port}",)


def test_env_dict():
    assert parse(app("env", "  A 1", "  B 2")).env_dict() == {"A": "1", "B": "2"}


# --- layout: indentation, braces, comments, line ends -----------------------------------------


INDENTED = """\
# leading comment

app web   # trailing comment
  exec ./server.py
  args --port {port}
  port auto

  env
    GREETING hello
  health
    check GET /healthz 200
  rollout
    surge 2
"""
EQUIVALENT_LAYOUTS = [
    """\
app web {
  exec ./server.py
  args --port {port}
  port auto
  env {
    GREETING hello
  }
  health {
    check GET /healthz 200
  }
  rollout {
    surge 2
  }
}
""",
    """\
app web {
exec ./server.py
args --port {port}
port auto
env {
      GREETING hello
}
health {
 check GET /healthz 200
  }
rollout {
surge 2
}
}
""",
    """\
app web
  exec ./server.py
  args --port {port}
  port auto
  env {
    GREETING hello
  }
  health
    check GET /healthz 200
  rollout {
    surge 2 # comment
  }  # comment
""",
    """\
app web {
    exec ./server.py
    args --port {port}
    port auto
    env
      GREETING hello
    health
      check GET /healthz 200
    rollout
      surge 2
}
""",
    INDENTED.replace("\n", "\r\n"),
    "\ufeff" + INDENTED,
]


@pytest.mark.parametrize("source", EQUIVALENT_LAYOUTS)
def test_braces_mixed_layouts_and_crlf_read_the_same(source):
    assert parse(source) == parse(INDENTED)


def test_indented_form_reads_as_expected():
    m = parse(INDENTED)
    assert m.env == (("GREETING", "hello"),)
    assert m.health == HealthCheck("/healthz")
    assert m.rollout.surge == 2


def test_bytes_are_read_as_utf8():
    assert parse(app("env", "  A café").encode()).env == (("A", "café"),)


# --- errors --------------------------------------------------------------------------------


ERRORS = [
    # the app itself
    ("", 1, 1, "expected 'app NAME'"),
    ("# only a comment\n\n", 1, 1, "expected 'app NAME'"),
    ("exec /bin/true\n", 1, 1, "unexpected 'exec' at top level"),
    ("app a\n  exec /x\napp b\n  exec /x\n", 3, 1, "second 'app'"),
    ("app a\nexec /x\n", 2, 1, "unexpected 'exec' at top level"),
    ("app\n  exec /x\n", 1, 1, "'app' needs a name"),
    ("app Web\n  exec /x\n", 1, 5, "bad app name 'Web'"),
    ("app -web\n  exec /x\n", 1, 5, "a-z, 0-9 and '-'"),
    ("app web_1\n  exec /x\n", 1, 5, "bad app name"),
    ("app " + "a" * 64 + "\n  exec /x\n", 1, 5, "1 to 63 characters"),
    ("app web extra\n  exec /x\n", 1, 5, "bad app name 'web extra'"),
    ("app web\n", 1, 1, "has no 'exec'"),
    ("  app web\n", 1, 3, "bad indentation (2 spaces): expected 0 spaces"),
    ("app web\n  type job\n", 1, 1, "has no 'exec'"),
    # keys
    ("app web\n  exce /x\n", 2, 3, "unknown key 'exce' in app block: did you mean 'exec'?"),
    (app("colour red"), 3, 3, "expected one of args, cpu, env, exec, health"),
    (app("health", "  chek GET /"), 4, 5, "did you mean 'check'?"),
    (app("rollout", "  settl 1s"), 4, 5, "unknown key 'settl' in rollout block"),
    (app("port 80", "replicas 2", "port 81"), 5, 3, "duplicate key 'port'"),
    (app("port 80", "replicas 2", "port 81"), 5, 3, "already given at line 3"),
    ("app web\n  exec /x\n  exec /y\n", 3, 3, "duplicate key 'exec'"),
    (app("health", "  check GET /", "  check GET /b"), 5, 5, "already given at line 4"),
    (app("exec"), 3, 3, "duplicate key"),
    ("app web\n  exec\n", 2, 3, "'exec' needs a value"),
    (app("port"), 3, 3, "'port' needs a value"),
    (app("env foo"), 3, 7, "'env' takes a block, not a value"),
    (app("health GET /"), 3, 10, "'health' takes a block"),
    (app("replicas", "  two"), 4, 5, "'replicas' takes a value, not a block"),
    (app("replicas 2 {", "}"), 3, 14, "'replicas' takes a value, not a block"),
    # indentation and braces
    ("app web\n exec /x\n", 2, 2, "bad indentation (1 spaces): expected 2 spaces"),
    ("app web\n    exec /x\n", 2, 5, "expected 2 spaces"),
    ("app web\n  exec /x\n     args a\n", 3, 6, "expected 4 spaces"),
    ("app web\n  exec /x\n  env\n     A b\n", 4, 6, "expected 4 spaces"),
    ("app web\n  env\n    A b\n   exec /x\n", 4, 4, "expected 2 spaces"),
    ("app web\n\texec /x\n", 2, 1, "tab in indentation: use two spaces"),
    ("app web\n  exec /x\n \targs a\n", 3, 2, "tab in indentation"),
    ("app web {\n  exec /x\n", 1, 9, "missing '}' for block opened at line 1"),
    ("app web {\n  exec /x\n  env {\n    A b\n}\n", 1, 9, "missing '}' for block opened"),
    ("app web\n  exec /x\n  env {\n", 3, 7, "missing '}' for block opened at line 3"),
    ("app web\n  exec /x\n}\n", 3, 1, "unexpected '}'"),
    ("app web {\n  exec /x\n}\n}\n", 4, 1, "unexpected '}'"),
    ("app web {\n  exec /x\n  env {\n    A b\n  }\n  exec /y\n}\n", 6, 3, "duplicate key"),
    ("app web {\n    exec /x\n  port 80\n}\n", 3, 3, "expected 4 spaces or a '}'"),
    ("app web {\n  exec /x\n}\n  port 1\n", 4, 3, "expected 0 spaces"),
    ("app web\n{\n", 2, 1, "'{' on a line of its own"),
    # values
    (app("type service"), 3, 8, "bad type 'service': expected process or job"),
    (app("port 0"), 3, 8, "bad port '0' (out of range): expected a port number 1..65535 or auto"),
    (app("port 65536"), 3, 8, "out of range"),
    (app("port abc"), 3, 8, "bad port 'abc'"),
    (app("port -1"), 3, 8, "bad port '-1'"),
    (app("port 99999999999999999999999"), 3, 8, "out of range"),
    (app("replicas 1001"), 3, 12, "bad replicas '1001' (out of range): expected a whole number"),
    (app("replicas lots"), 3, 12, "bad replicas 'lots'"),
    (app("replicas 1.5"), 3, 12, "bad replicas"),
    (app("ram 512"), 3, 7, "bad ram '512' (no unit)"),
    (app("ram 0M"), 3, 7, "must be more than 0"),
    (app("ram 1.5G"), 3, 7, "expected a size like 512M"),
    (app("ram 512iB"), 3, 7, "bad ram"),
    (app("ram 512mb"), 3, 7, "bad ram"),
    (app("ram 1025T"), 3, 7, "more than 1024T"),
    (app("cpu 0"), 3, 7, "bad cpu '0' (out of range)"),
    (app("cpu 1025"), 3, 7, "out of range"),
    (app("cpu -1"), 3, 7, "bad cpu"),
    (app("cpu 1e3"), 3, 7, "bad cpu"),
    (app("stop-grace 8x"), 3, 14, "bad duration '8x': expected a duration like 500ms, 8s or 2m"),
    (app("stop-grace 8"), 3, 14, "bad duration '8' (no unit)"),
    (app("stop-grace -1s"), 3, 14, "(negative)"),
    (app("stop-grace 0.5ms"), 3, 14, "not a whole number of milliseconds"),
    (app("stop-grace 31d"), 3, 14, "bad duration"),
    (app("stop-grace 721h"), 3, 14, "more than 30 days"),
    (app("restart sometimes"), 3, 11, "bad restart 'sometimes'"),
    (app("restart on_failure"), 3, 11, "did you mean 'on-failure'?"),
    (app("args 'unclosed"), 3, 8, "the quote at \"'\" is never closed"),
    (app("args a \"b c"), 3, 10, "never closed"),
    (app("args a\\"), 3, 9, "lone backslash"),
    # placeholders
    (app("args --name {name}"), 3, 15, "'{name}' in args: expected {port} or {host}"),
    (app("port 80", "args '{Port}'"), 4, 9, "unknown placeholder '{Port}'"),
    (app("args --port {port}"), 3, 15, "'{port}' in args but the app has no 'port'"),
    # env
    (app("env", "  1A x"), 4, 5, "bad env key '1A'"),
    (app("env", "  A-B x"), 4, 5, "bad env key 'A-B'"),
    (app("env", "  A x", "  A y"), 5, 5, "duplicate env key 'A'"),
    (app("env", "  A"), 4, 5, "'A' needs a value"),
    (app("env", "  A 'x' y"), 4, 7, "more than one word"),
    (app("env", "  A 'x"), 4, 7, "never closed"),
    (app("env", "  A x", "    B y"), 5, 7, "'A' takes a value, not a block"),
    (app("port 8080", "env", "  PORT 1"), 5, 5, "env 'PORT' clashes with 'port'"),
    (app("env", "  HOST x", "port auto"), 4, 5, "env 'HOST' clashes with 'port'"),
    # health
    (app("type job", "health", "  check GET /"), 4, 3, "'health' on a job"),
    (app("health", "  interval 1s"), 3, 3, "health block has no 'check'"),
    (app("health"), 3, 3, "health block has no 'check'"),
    (app("health", "  check"), 4, 5, "'check' needs a value"),
    (app("health", "  check GET"), 4, 11, "bad check 'GET': expected GET /PATH [CODE]"),
    (app("health", "  check POST /x"), 4, 11, "unsupported method 'POST' in check: expected GET"),
    (app("health", "  check get /x"), 4, 11, "unsupported method 'get'"),
    (app("health", "  check GET healthz"), 4, 15, "bad health path 'healthz'"),
    (app("health", "  check GET /x 99"), 4, 18, "bad status code '99'"),
    (app("health", "  check GET /x 600"), 4, 18, "expected an HTTP status code 100..599"),
    (app("health", "  check GET /x OK"), 4, 18, "bad status code 'OK'"),
    (app("health", "  check GET /x 200 extra"), 4, 11, "bad check"),
    (app("health", "  check GET /", "  interval 0s"), 5, 14, "must be more than 0"),
    (app("health", "  check GET /", "  timeout 0ms"), 5, 13, "must be more than 0"),
    (app("health", "  check GET /", "  retries 0"), 5, 13, "bad retries '0' (out of range)"),
    (app("health", "  check GET /", "  retries 101"), 5, 13, "expected a whole number 1..100"),
    # rollout
    (app("rollout", "  surge 0"), 4, 11, "bad surge '0' (out of range): expected a whole"),
    (app("rollout", "  surge 1001"), 4, 11, "out of range"),
    (app("rollout", "  ready-timeout 0s"), 4, 19, "must be more than 0"),
    (app("rollout", "  settle 8"), 4, 12, "bad duration '8'"),
    (app("rollout", "  drain -1s"), 4, 11, "negative"),
    (app("rollout", "  auto-rollback true"), 4, 19, "bad auto-rollback 'true': expected yes or no"),
    (app("rollout", "  order last-first"), 4, 11, "expected start-first or stop-first"),
    # characters
    ("app web\x00\n", 1, 8, "control character '\\x00'"),
    (app("args a\x07b"), 3, 9, "control character '\\x07'"),
    ("app web\r  exec /x\n", 1, 8, "control character '\\r'"),
    (app("env", "  A \x7f"), 4, 7, "control character '\\x7f'"),
]  # fmt: skip


@pytest.mark.parametrize(("source", "line", "column", "message"), ERRORS)
def test_error_names_line_column_and_problem(source, line, column, message):
    exc = error(source)
    assert (exc.line, exc.column) == (line, column), str(exc)
    assert message in exc.message
    assert str(exc) == f"web.skr8tr:{line}:{column}: {exc.message}"


def test_error_carries_text_and_expected():
    exc = error(app("stop-grace 8x"))
    assert (exc.filename, exc.text) == ("web.skr8tr", "8x")
    assert exc.expected.startswith("a duration like 500ms, 8s or 2m")
    assert str(exc).startswith("web.skr8tr:3:14: bad duration '8x': expected a duration like")
    assert isinstance(exc, ValueError)


@pytest.mark.parametrize(
    ("source", "line", "column"),
    [
        (b"app web\n  exec /\xff\n", 2, 9),
        (b"\xc3(", 1, 1),
        ("app café\n".encode() + b"\x80", 2, 1),
        ("app é\xe9".encode()[:-2] + b"\xe9x", 1, 6),
    ],
)
def test_bytes_that_are_not_utf8(source, line, column):
    exc = error(source)
    assert (exc.line, exc.column) == (line, column), str(exc)
    assert "not UTF-8" in exc.message


def test_unknown_key_lists_the_keys_without_a_hint_when_nothing_is_close():
    exc = error(app("zzz 1"))
    assert "did you mean" not in exc.message
    assert exc.message.endswith(
        "expected one of args, cpu, env, exec, health, port, ram, replicas, restart, rollout, "
        "stop-grace, type, workdir"
    )


def test_programming_errors_are_not_manifest_errors():
    with pytest.raises(ValueError, match="absolute") as caught:
        parse_manifest("app x\n", filename="x", base_dir="relative")
    assert not isinstance(caught.value, ManifestError)
    with pytest.raises(ValueError, match="format"):
        parse_manifest("app x\n", filename="x", base_dir="/", format="yaml")


# --- formatting ----------------------------------------------------------------------------


def test_format_skr8tr_is_normalised():
    source = """\
app web {
  rollout {
    drain 1000ms
    settle 8s
    auto-rollback no
  }
  health {
    check GET /healthz
  }
  env {
    B ' x'
    A it's
    C ''
  }
  restart on-failure
  stop-grace 120s
  cpu 0.50
  ram 2048M
  replicas 3
  port auto
  workdir ./data dir
  args --port {port} 'a b' '#x' "{"
  exec ./server.py
}
"""
    assert (
        format_skr8tr(parse(source))
        == """\
app web
  exec ./server.py
  args --port {port} 'a b' '#x' '{'
  workdir ./data dir
  port auto
  replicas 3
  ram 2G
  cpu 0.5
  stop-grace 2m
  restart on-failure
  env
    A it's
    B ' x'
    C ''
  health
    check GET /healthz 200
    interval 1s
    timeout 1s
    retries 3
  rollout
    drain 1s
    auto-rollback no
"""
    )


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        ([], "app web\n  exec /bin/true\n"),
        (["type job", "restart on-failure"], "app web\n  type job\n  exec /bin/true\n"),
        (["type job", "restart never"], "app web\n  type job\n  exec /bin/true\n  restart never\n"),
        (["ram 1000B"], "app web\n  exec /bin/true\n  ram 1000B\n"),
        (["ram 1536K"], "app web\n  exec /bin/true\n  ram 1536K\n"),
        (["stop-grace 1500ms"], "app web\n  exec /bin/true\n  stop-grace 1500ms\n"),
        (["stop-grace 90s"], "app web\n  exec /bin/true\n  stop-grace 90s\n"),
        (["stop-grace 5s"], "app web\n  exec /bin/true\n"),
        (["rollout", "  settle 8s", "  surge 1"], "app web\n  exec /bin/true\n"),
        (["env", "  A '#'", "  B { x", "  C 'x {'"], "app web\n  exec /bin/true\n  env\n"
                                                 "    A '#'\n    B { x\n    C 'x {'\n"),
    ],
)  # fmt: skip
def test_format_skr8tr_leaves_out_defaults(lines, expected):
    assert format_skr8tr(parse(app(*lines))) == expected


def test_format_toml():
    m = parse(app("args a 'b c'", "port 80", "cpu 1.5", "env", "  A x", "rollout", "  drain 2s"))
    assert format_toml(m) == (
        'app = "web"\nexec = "/bin/true"\nargs = [\n    "a",\n    "b c",\n]\nport = 80\n'
        'cpu = 1.5\n\n[env]\nA = "x"\n\n[rollout]\ndrain = "2s"\n'
    )


def test_manifest_to_dict_has_every_key():
    m = parse(app("ram 1G", "health", "  check GET /"))
    assert manifest_to_dict(m) == {
        "app": "web",
        "type": "process",
        "exec": "/bin/true",
        "args": [],
        "workdir": None,
        "port": None,
        "replicas": 1,
        "ram": "1G",
        "cpu": None,
        "stop-grace": "5s",
        "restart": "always",
        "env": {},
        "health": {"check": "GET / 200", "interval": "1s", "timeout": "1s", "retries": 3},
        "rollout": {
            "settle": "8s",
            "surge": 1,
            "ready-timeout": "1m",
            "drain": "0s",
            "auto-rollback": True,
            "order": "start-first",
            "analysis": None,
        },
        "base_dir": BASE,
    }
    with_analysis = parse(app("rollout", "  analysis", "    window 10s"))
    assert manifest_to_dict(with_analysis)["rollout"]["analysis"] == {
        "window": "10s", "max-error-rate": "1%", "max-p99": None, "min-requests": 20}


# --- TOML ----------------------------------------------------------------------------------


TOML = """\
# comment
app = "web"
exec = "./server.py"
args = ["--port", "{port}"]
port = "auto"

[env]
GREETING = "hello"

[health]
check = "GET /healthz 200"

[rollout]
surge = 2
"""


def test_toml_reads_like_the_skr8tr_form():
    assert parse(TOML, filename="web.toml") == parse(INDENTED)
    assert parse(TOML, filename="web.skr8tr", format="toml") == parse(INDENTED)


@pytest.mark.parametrize(
    ("lines", "attribute", "expected"),
    [
        ("args = \"--name 'my app'\"", "args", ("--name", "my app")),
        ("args = []", "args", ()),
        ("port = 8080", "port", 8080),
        ("replicas = 0", "replicas", 0),
        ('ram = "1G"', "ram_bytes", 2**30),
        ("cpu = 2", "cpu", 2.0),
        ("cpu = 0.25", "cpu", 0.25),
        ('stop-grace = "2s"', "stop_grace_ms", 2000),
        ('type = "job"', "restart", "on-failure"),
        ('[env]\nA = ""\nB = "\'quoted\' # kept"', "env", (("A", ""), ("B", "'quoted' # kept"))),
        ("[rollout]\nauto-rollback = false", "rollout.auto_rollback", False),
        ('[rollout]\nauto-rollback = "no"', "rollout.auto_rollback", False),
        ('[rollout]\n"ready-timeout" = "1m"', "rollout.ready_timeout_ms", 60_000),
        ('health = {check = "GET /x", retries = 5}', "health.retries", 5),
    ],
)
def test_toml_values(lines, attribute, expected):
    source = f'app = "web"\nexec = "/bin/true"\n{lines}\n'
    assert operator.attrgetter(attribute)(parse(source, filename="web.toml")) == expected


T = 'app = "web"\nexec = "/x"\n'  # the start of a valid TOML manifest
TOML_ERRORS = [
    ('app = "web"\nexec = \n', 2, 8, "invalid TOML at the end of the line"),
    (T + 'port = 80 80\n', 3, 11, "invalid TOML at '80'"),
    (T + '[env\n', 3, 5, "invalid TOML"),
    (T + 'exec = "/y"\n', 3, 12, "invalid TOML"),
    ('exec = "/x"\n', 1, 1, 'expected app = "NAME"'),
    ("", 1, 1, "no app"),
    ('app = "Web"\nexec = "/x"\n', 1, 7, "bad app name 'Web'"),
    ("app = 5\n", 1, 7, "'app' is an integer"),
    ('app = "web"\n', 1, 1, "has no 'exec'"),
    (T + 'exce = 1\n', 3, 1, "unknown key 'exce' at the top level: did you mean"),
    (T + 'replicas = true\n', 3, 12, "'replicas' is a boolean"),
    (T + 'replicas = 2.0\n', 3, 12, "'replicas' is a float"),
    (T + 'port = true\n', 3, 8, "'port' is a boolean"),
    (T + 'port = 0\n', 3, 8, "bad port '0' (out of range)"),
    (T + 'cpu = true\n', 3, 7, "'cpu' is a boolean"),
    (T + 'cpu = nan\n', 3, 7, "bad cpu 'nan'"),
    (T + 'ram = 1024\n', 3, 7, "'ram' is an integer"),
    ('app = "web"\nexec = 5\n', 2, 8, "'exec' is an integer"),
    ('app = "web"\nexec = ""\n', 2, 8, "bad exec '' (empty)"),
    (T + 'args = ["a", 1]\n', 3, 8, "'args' holds an integer"),
    (T + 'args = ["a\\nb"]\n', 3, 8, "control character '\\n'"),
    (T + 'args = "{nope}"\n', 3, 9, "unknown placeholder '{nope}'"),
    (T + 'args = ["{port}"]\n', 3, 8, "has no 'port'"),
    (T + 'env = "A=b"\n', 3, 7, "'env' takes a block, not a value: expected a [env] table"),
    (T + '[exec2]\n', 3, 2, "unknown key 'exec2'"),
    ('app = "web"\n[exec]\n', 2, 2, "'exec' takes a value, not a block"),
    (T + '[rollout]\n[rollout.surge]\n', 4, 10, "'surge' takes a value"),
    (T + '[env]\nA = 1\n', 4, 5, "'A' is an integer"),
    (T + '[env]\n"A B" = "x"\n', 4, 1, "bad env key 'A B'"),
    (T + 'port = 1\n[env]\nHOST = "h"\n', 5, 1, "env 'HOST' clashes"),
    (T + '[env.A]\nB = "c"\n', 3, 6, "'A' takes a value, not a block"),
    (T + '[health]\ninterval = "1s"\n', 3, 2, "health block has no 'check'"),
    (T + '[health]\ncheck = "GET healthz"\n', 4, 14, "bad health path"),
    (T + '[health]\ncheck = \'POST /\'\n', 4, 10, "unsupported method"),
    (T + '[health]\ncheck = "GET /"\nretries = true\n', 5, 11, "'retries' is a boolean"),
    (T + '[health]\ncheck = "GET /"\ninterval = 1\n', 5, 12, "'interval' is an integer"),
    (T + 'type = "job"\n[health]\ncheck = "GET /"\n', 4, 2, "'health' on a job"),
    (T + '[rollout]\nsettle = "8x"\n', 4, 10, "bad duration '8x'"),
    (T + '[rollout]\n  "surge" = 0\n', 4, 13, "bad surge '0'"),
    (T + '[rollout]\nauto-rollback = 1\n', 4, 17, "'auto-rollback' is an integer"),
    (T + '[rollout]\nsurge = 1\n[rollout.x]\n', 5, 10, "unknown key 'x' in rollout block"),
    (T + 'rollout.surge = 0\n', 3, 17, "bad surge '0'"),
    (T + 'health = {check = "GET /", retries = 0}\n', 3, 10, "bad retries"),
    ('app = "web"\nexec = "/x\\u0000"\n', 2, 8, "control character '\\x00'"),
]  # fmt: skip


@pytest.mark.parametrize(("source", "line", "column", "message"), TOML_ERRORS)
def test_toml_error_names_line_column_and_problem(source, line, column, message):
    exc = error(source, filename="web.toml")
    assert (exc.line, exc.column) == (line, column), str(exc)
    assert message in exc.message
    assert str(exc).startswith(f"web.toml:{line}:{column}: ")


# --- files ---------------------------------------------------------------------------------


def test_load_manifest_resolves_against_the_file_folder(tmp_path):
    (tmp_path / "apps").mkdir()
    path = tmp_path / "web.skr8tr"
    path.write_text("app web\n  exec ./apps/x.py\n  workdir data\n")
    m = load_manifest(path)
    assert m.base_dir == str(tmp_path)
    assert m.exec_path == str(tmp_path / "apps" / "x.py")
    assert m.workdir_path == str(tmp_path / "data")
    toml_path = tmp_path / "web.toml"
    toml_path.write_text(format_toml(m))
    assert load_manifest(str(toml_path)) == m


def test_load_manifest_names_the_file_in_errors(tmp_path):
    path = tmp_path / "bad.skr8tr"
    path.write_text("app web\n  exec /bin/true\n  replicas lots\n")
    with pytest.raises(ManifestError) as caught:
        load_manifest(str(path))
    assert str(caught.value).startswith(f"{path}:3:12: bad replicas 'lots'")


def test_load_manifest_of_a_missing_file(tmp_path):
    missing = tmp_path / "missing.skr8tr"
    with pytest.raises(ManifestError) as caught:
        load_manifest(str(missing))
    exc = caught.value
    assert (exc.filename, exc.line, exc.column) == (str(missing), 1, 1)
    assert "cannot read manifest" in exc.message and "No such file" in exc.message
