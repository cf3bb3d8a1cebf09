"""Daemon flags from ``--config FILE`` (TOML) and ``SKR8TR_<VERB>_<FLAG>``.

The merge itself is checked on the parser (command line > env > file > default);
the daemons are started as real processes from a config file and the
environment, and every error path is a real ``skr8tr`` exiting 2 with its line.
"""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest

from skr8tr import daemon_config
from skr8tr.cli_args import build_parser
from tests.conftest import free_port, http_get, run_cli, skr8tr_command
from tests.e2e import poll


def resolve(argv: list[str], environ: dict[str, str] | None = None):
    parser = build_parser()
    opts = parser.parse_args(argv)
    return daemon_config.apply(parser, argv, opts, environ=environ or {})


# --------------------------------------------------------------------------- the merge


def test_every_daemon_flag_is_a_config_key():
    parser = build_parser()
    for verb, client in (("conductor", ()), ("node", ("conductor", "key", "ca")),
                         ("ingress", ("conductor", "ca", "key"))):
        sub = parser.verb_parsers[verb]
        flags = {s[2:] for a in sub._actions for s in a.option_strings
                 if s.startswith("--") and a.help != "==SUPPRESS=="}
        keys = set(daemon_config.options_of(verb, sub))
        assert flags - {"help", "config"} <= keys, verb
        assert {"json", "timeout"}.isdisjoint(keys)
        assert set(client) <= keys


def test_command_line_beats_env_beats_file_beats_default(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('listen = "127.0.0.1:1001"\nhttp = "127.0.0.1:2001"\n'
                   'node-timeout = 7\nport-range = "100-200"\n')
    env = {"SKR8TR_CONDUCTOR_LISTEN": "127.0.0.1:1002",
           "SKR8TR_CONDUCTOR_NODE_TIMEOUT": "9.5"}
    opts = resolve(["conductor", "--config", str(cfg), "--listen", "127.0.0.1:1003"], env)
    assert opts.listen == "127.0.0.1:1003"  # command line
    assert opts.node_timeout == 9.5  # env over the file's 7
    assert opts.http == "127.0.0.1:2001"  # file over the default
    assert opts.port_range == "100-200"
    assert opts.adopt_grace is None and opts.log_level == "info"  # defaults untouched
    opts = resolve(["conductor", "--config", str(cfg)], env)
    assert opts.listen == "127.0.0.1:1002"
    opts = resolve(["conductor", "--config", str(cfg)])
    assert (opts.listen, opts.node_timeout) == ("127.0.0.1:1001", 7.0)
    opts = resolve(["conductor"])
    assert (opts.listen, opts.http, opts.node_timeout) == ("127.0.0.1:7771",
                                                           "127.0.0.1:7780", 15.0)


def test_config_file_named_by_env(tmp_path):
    cfg = tmp_path / "n.toml"
    cfg.write_text('node-id = "from-file"\nstop-workloads = true\n')
    opts = resolve(["node"], {"SKR8TR_NODE_CONFIG": str(cfg)})
    assert (opts.node_id, opts.stop_workloads) == ("from-file", True)
    # a switch from env, and false in env overriding true in the file
    opts = resolve(["node"], {"SKR8TR_NODE_CONFIG": str(cfg),
                              "SKR8TR_NODE_STOP_WORKLOADS": "no"})
    assert opts.stop_workloads is False
    # but the command line's switch wins over both
    opts = resolve(["node", "--stop-workloads"], {"SKR8TR_NODE_CONFIG": str(cfg),
                                                  "SKR8TR_NODE_STOP_WORKLOADS": "0"})
    assert opts.stop_workloads is True


def test_repeatable_flag_is_an_array_and_the_command_line_replaces_it(tmp_path):
    cfg = tmp_path / "i.toml"
    cfg.write_text('listen = "127.0.0.1:8080"\nroute = ["/api:api", "/:web"]\n')
    opts = resolve(["ingress", "--config", str(cfg)])
    assert opts.route == ["/api:api", "/:web"] and opts.listen == "127.0.0.1:8080"
    opts = resolve(["ingress", "--config", str(cfg)], {"SKR8TR_INGRESS_ROUTE": "/a:a, /b:b"})
    assert opts.route == ["/a:a", "/b:b"]
    opts = resolve(["ingress", "--config", str(cfg), "--route", "/x:x"],
                   {"SKR8TR_INGRESS_ROUTE": "/a:a"})
    assert opts.route == ["/x:x"]  # replaced, not appended to


def test_client_flags_of_a_daemon(tmp_path):
    cfg = tmp_path / "n.toml"
    cfg.write_text('conductor = "ws://10.0.0.1:7771"\nkey = "/etc/k"\n')
    opts = resolve(["node", "--config", str(cfg)])
    assert (opts.conductor, opts.key) == ("ws://10.0.0.1:7771", "/etc/k")
    # the old SKR8TR_CONDUCTOR is an environment variable too: over the file ...
    opts = resolve(["node", "--config", str(cfg)], {"SKR8TR_CONDUCTOR": "ws://g:1"})
    assert opts.conductor == "ws://g:1"
    # ... and under the daemon's own, and under the command line before the verb
    opts = resolve(["node", "--config", str(cfg)], {"SKR8TR_CONDUCTOR": "ws://g:1",
                                                    "SKR8TR_NODE_CONDUCTOR": "ws://n:1"})
    assert opts.conductor == "ws://n:1"
    opts = resolve(["--conductor", "ws://cli:1", "node", "--config", str(cfg)],
                   {"SKR8TR_NODE_CONDUCTOR": "ws://n:1"})
    assert opts.conductor == "ws://cli:1"
    # the conductor daemon has no client flags to configure
    cfg.write_text('key = "/etc/k"\n')
    with pytest.raises(daemon_config.ConfigError, match=r":1:1: unknown key 'key'"):
        resolve(["conductor", "--config", str(cfg)])


@pytest.mark.parametrize(("text", "error"), [
    ('listen = "a:1"\nnode-timeout = "soon"\n', ":2:1: node-timeout: expected a number, got a "
                                               "string"),
    ("node-timeout = 0\n", ":1:1: node-timeout: expected a positive number of seconds, "
                           "got '0'"),
    ("node-timeout = inf\n", ":1:1: node-timeout: expected a positive number of seconds"),
    ("insecure = 1\n", ":1:1: insecure: expected true or false, got an integer"),
    ("message-burst = 1.5\n", ":1:1: message-burst: expected an integer, got a float"),
    ("allowed-host = \"a\"\n", ":1:1: allowed-host: expected an array of strings"),
    ("log-level = \"loud\"\n", ":1:1: log-level: expected one of debug, info, warning, "
                               "error, got 'loud'"),
    ("\n\n  lissten = \"a:1\"\n", ":3:3: unknown key 'lissten' for `skr8tr conductor`; "
                                 "did you mean 'listen'?"),
    ("[tls]\ncert = \"x\"\n", ":1:1: unknown table [tls]: the flags of `skr8tr conductor` "
                              "are top-level keys"),
    ("zzzz = 1\n", ":1:1: unknown key 'zzzz' for `skr8tr conductor`; the keys are its flags "
                   "without --: listen, http, "),
    ("listen = \"a:1\"\nhttp = \n", ":2:8: Invalid value"),
    ("listen = \"a:1\"\nlisten = \"b:2\"\n", ":2:"),
])
def test_config_file_errors_name_file_line_and_column(tmp_path, text, error):
    cfg = tmp_path / "conductor.toml"
    cfg.write_text(text)
    with pytest.raises(daemon_config.ConfigError) as info:
        resolve(["conductor", "--config", str(cfg)])
    assert str(info.value).startswith(f"{cfg}{error}"), str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("name", "value", "error"), [
    ("SKR8TR_CONDUCTOR_NODE_TIMEOUT", "x", "expected a number of seconds, got 'x'"),
    ("SKR8TR_CONDUCTOR_INSECURE", "maybe", "expected true or false"),
    ("SKR8TR_CONDUCTOR_LOG_LEVEL", "loud", "expected one of debug"),
    ("SKR8TR_CONDUCTOR_MAX_CONNECTIONS", "0", "expected a number >= 1"),
])
def test_env_errors_name_the_variable(name, value, error):
    with pytest.raises(daemon_config.ConfigError) as info:
        resolve(["conductor"], {name: value})
    assert str(info.value) == f"{name}={value!r}: {error}" or (
        str(info.value).startswith(f"{name}={value!r}: {error}")), str(info.value)


def test_oversized_or_binary_config_is_refused(tmp_path):
    big = tmp_path / "big.toml"
    big.write_bytes(b"# " + b"x" * daemon_config.MAX_CONFIG_BYTES + b"\n")
    with pytest.raises(daemon_config.ConfigError, match="over 1048576 bytes"):
        resolve(["conductor", "--config", str(big)])
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b'listen = "a:1"\n# \xff\xfe\n')
    with pytest.raises(daemon_config.ConfigError, match=r"bin.toml:2:3: not UTF-8 text"):
        resolve(["conductor", "--config", str(binary)])


# --------------------------------------------------------------------------- real processes


def _serves(ws_port: int, env: dict[str, str]) -> bool:
    proc = run_cli("ping", "--conductor", f"ws://127.0.0.1:{ws_port}", "--timeout", "2",
                   env=env)
    return proc.returncode == 0 and "pong" in proc.stdout


def _start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as f:
        return subprocess.Popen([*skr8tr_command(), *args], env=env, stdout=f,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)


def _stop(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
        raise


@pytest.mark.e2e
def test_conductor_listens_where_config_and_env_say(tmp_path, cli_env):
    """The layer that wins decides where a real conductor listens."""
    file_port, env_port, cli_port, http_port = (free_port() for _ in range(4))
    cfg = tmp_path / "conductor.toml"
    cfg.write_text(f'# a throwaway cluster\nlisten = "127.0.0.1:{file_port}"\n'
                   f'http = "127.0.0.1:{http_port}"\ninsecure = true\n'
                   f'state = "{tmp_path / "state" / "state.toml"}"\nlog-level = "warning"\n')
    for extra_env, extra_args, port in (
        ({}, [], file_port),
        ({"SKR8TR_CONDUCTOR_LISTEN": f"127.0.0.1:{env_port}"}, [], env_port),
        ({"SKR8TR_CONDUCTOR_LISTEN": f"127.0.0.1:{env_port}"},
         ["--listen", f"127.0.0.1:{cli_port}"], cli_port),
    ):
        env = {**cli_env, **extra_env}
        proc = _start(["conductor", "--config", str(cfg), *extra_args], env,
                      tmp_path / f"conductor-{port}.log")
        try:
            poll(lambda port=port, proc=proc: _serves(port, cli_env) or proc.poll() is not None,
                 what=f"the conductor on {port}")
            assert proc.poll() is None, (tmp_path / f"conductor-{port}.log").read_text()
            for other in {file_port, env_port, cli_port} - {port}:
                assert not _serves(other, cli_env)
            assert http_get("127.0.0.1", http_port, "/healthz")[0] == 200
        finally:
            assert _stop(proc) == 0
    assert (tmp_path / "state" / "state.toml").exists()  # the file's --state was used


@pytest.mark.parametrize(("verb", "text", "env", "line"), [
    ("conductor", 'listen = "127.0.0.1:1"\nnode-timeout = "x"\n', {},
     "{cfg}:2:1: node-timeout: expected a number, got a string"),
    ("conductor", 'lisen = "127.0.0.1:1"\n', {},
     "{cfg}:1:1: unknown key 'lisen' for `skr8tr conductor`; did you mean 'listen'?"),
    ("node", 'node-id = "a"\ndata-dir = \n', {}, "{cfg}:2:12: Invalid value"),
    ("ingress", 'route = "/:web"\n', {},
     "{cfg}:1:1: route: expected an array of strings, e.g. route = [\"...\"], got a string"),
    ("node", "", {"SKR8TR_NODE_LOG_LEVEL": "verbose"},
     "SKR8TR_NODE_LOG_LEVEL='verbose': expected one of debug, info, warning, error, "
     "got 'verbose'"),
    ("conductor", None, {}, "cannot read config file {cfg}: No such file or directory"),
])
def test_daemon_refuses_bad_config_with_one_line_exit_2(tmp_path, cli_env, verb, text, env,
                                                         line):
    cfg = tmp_path / f"{verb}.toml"
    if text is not None:
        cfg.write_text(text)
    proc = run_cli(verb, "--config", str(cfg), env={**cli_env, **env})
    assert proc.returncode == 2
    assert proc.stderr == f"error: CONFIG: {line.format(cfg=cfg)}\n"


def test_ingress_still_requires_listen_and_route(cli_env):
    proc = run_cli("ingress", "--listen", "127.0.0.1:1", env=cli_env)
    assert proc.returncode == 2
    assert "error: USAGE: the following arguments are required: --route" in proc.stderr


def test_keep_revisions_from_file_env_and_command_line(tmp_path):
    from skr8tr.conductor.daemon import config_from_args

    cfg = tmp_path / "c.toml"
    cfg.write_text("keep-revisions = 3\n")
    opts = resolve(["conductor", "--insecure", "--config", str(cfg)])
    assert config_from_args(opts).keep_revisions == 3
    opts = resolve(["conductor", "--insecure", "--config", str(cfg)],
                   {"SKR8TR_CONDUCTOR_KEEP_REVISIONS": "25"})
    assert config_from_args(opts).keep_revisions == 25
    opts = resolve(["conductor", "--insecure", "--keep-revisions", "4"],
                   {"SKR8TR_CONDUCTOR_KEEP_REVISIONS": "25"})
    assert config_from_args(opts).keep_revisions == 4
    assert config_from_args(resolve(["conductor", "--insecure"])).keep_revisions == 10
    for bad in ("1", "1001", "ten"):
        with pytest.raises(daemon_config.ConfigError) as err:
            resolve(["conductor"], {"SKR8TR_CONDUCTOR_KEEP_REVISIONS": bad})
        assert "SKR8TR_CONDUCTOR_KEEP_REVISIONS" in str(err.value)


def test_the_ingress_key_is_only_the_one_given_for_it(tmp_path):
    # No default and not SKR8TR_KEY (an admin's key in most shells): without a key
    # given for it the ingress reports nothing.
    base = ["ingress", "--listen", "127.0.0.1:1", "--route", "/:web"]
    assert resolve(base).key is None
    assert resolve(base, {"SKR8TR_KEY": "/admin.sec"}).key is None
    assert resolve(base, {"SKR8TR_INGRESS_KEY": "/i.sec"}).key == "/i.sec"
    assert resolve([*base, "--key", "/c.sec"], {"SKR8TR_INGRESS_KEY": "/i.sec"}).key == "/c.sec"
    assert resolve(["--key", "/before.sec", *base]).key == "/before.sec"
    cfg = tmp_path / "i.toml"
    cfg.write_text('key = "/f.sec"\nname = "edge-2"\n')
    opts = resolve([*base, "--config", str(cfg)])
    assert (opts.key, opts.name) == ("/f.sec", "edge-2")
    # the node keeps its default and SKR8TR_KEY
    assert resolve(["node"], {"SKR8TR_KEY": "/n.sec"}).key == "/n.sec"
