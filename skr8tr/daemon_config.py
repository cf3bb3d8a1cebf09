"""A daemon's flags from a ``--config`` TOML file and the environment.

``skr8tr conductor``, ``node`` and ``ingress`` take every flag from three places
besides its default, the first that sets it winning: the command line, the
environment (``SKR8TR_<VERB>_<FLAG>``: ``SKR8TR_CONDUCTOR_LISTEN``,
``SKR8TR_NODE_DATA_DIR``, ``SKR8TR_INGRESS_ROUTE``), then the TOML file of
``--config FILE`` (or ``SKR8TR_<VERB>_CONFIG``) whose keys are the flags' names
without ``--`` (``listen = "0.0.0.0:7771"``, ``route = ["/:web"]``). The client
flags a daemon uses also keep their old variables (``SKR8TR_CONDUCTOR``,
``SKR8TR_KEY``, ``SKR8TR_CA``), below the daemon's own.

Each value is checked as its flag is: the same conversions and ranges, the
same choices. A wrong one is a :class:`ConfigError` naming ``FILE:LINE:COL``
or the variable; the CLI prints it as one line and exits 2. Only argparse and
the standard library, imported only for the daemons' verbs.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from skr8tr.bounded_files import FileRefused, read_regular
from skr8tr.cli_args import DAEMON_CLIENT_FLAGS

__all__ = ["DAEMON_VERBS", "ConfigError", "apply", "env_name", "options_of"]

DAEMON_VERBS = tuple(DAEMON_CLIENT_FLAGS)
# A config file is a few hundred bytes; anything near this is not one.
MAX_CONFIG_BYTES = 1 << 20
# The client flags' older, verb-independent variables (below SKR8TR_<VERB>_<FLAG>).
GENERIC_ENV = {"conductor": "SKR8TR_CONDUCTOR", "key": "SKR8TR_KEY", "ca": "SKR8TR_CA"}
# Flags that are never config keys: the file itself, and the client's output flags.
NOT_CONFIGURABLE = frozenset({"help", "config", "json", "timeout"})
TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS = frozenset({"0", "false", "no", "off"})
# Flags a daemon cannot start without (checked after the three sources are merged).
REQUIRED = {"ingress": ("listen", "route")}
# Client flags whose client default and generic variable a daemon does not take: set only
# on its command line, by SKR8TR_<VERB>_<FLAG> or in its config file, else None. The
# ingress reports traffic only with a key given for it (role ingress); SKR8TR_KEY, an
# admin's key in most shells, or ~/.skr8tr/signing.sec would be the wrong one.
NO_DEFAULT = {"ingress": ("key",)}


class ConfigError(Exception):
    """A value from the config file or the environment that the daemon cannot take.

    ``str(exc)`` is one line naming where it came from (``FILE:LINE:COL: ...`` or
    ``SKR8TR_...=...: ...``)."""


@dataclass(frozen=True)
class Option:
    """One configurable flag of a daemon."""

    key: str  # the flag without "--": "node-timeout"
    dest: str  # its argparse dest: "node_timeout"
    kind: str  # "bool", "list", "int", "float" or "str"
    convert: Callable[[str], Any] | None  # the flag's own type= (ranges, messages)
    choices: tuple[str, ...] | None
    client: bool  # a client flag (--conductor, --key, --ca): default on the top parser


def env_name(verb: str, key: str) -> str:
    """``SKR8TR_CONDUCTOR_NODE_TIMEOUT`` for ``skr8tr conductor --node-timeout``."""
    return f"SKR8TR_{verb.upper()}_{key.upper().replace('-', '_')}"


def _kind(action: argparse.Action) -> str:
    if isinstance(action, argparse._StoreTrueAction):
        return "bool"
    if isinstance(action, argparse._AppendAction):
        return "list"
    name = getattr(action.type, "__name__", "")
    if name.endswith("_float"):
        return "float"
    if name.endswith("_int"):
        return "int"
    return "str"


def options_of(verb: str, sub: argparse.ArgumentParser) -> dict[str, Option]:
    """The configurable flags of daemon *verb* (its parser *sub*), by key."""
    client = set(DAEMON_CLIENT_FLAGS[verb])
    all_client = {"conductor", "key", "ca", "json", "timeout"}
    out: dict[str, Option] = {}
    for action in sub._actions:
        longs = [s for s in action.option_strings if s.startswith("--")]
        if not longs:
            continue
        key = longs[0][2:]
        if key in NOT_CONFIGURABLE or (key in all_client and key not in client):
            continue
        out[key] = Option(key=key, dest=action.dest, kind=_kind(action),
                          convert=action.type if callable(action.type) else None,
                          choices=tuple(action.choices) if action.choices else None,
                          client=key in client)
    return out


# --------------------------------------------------------------------------- values


def _checked(opt: Option, text: str) -> Any:
    """*text* through the flag's own conversion; ValueError with its message."""
    if opt.choices is not None and text not in opt.choices:
        raise ValueError(f"expected one of {', '.join(opt.choices)}, got {text!r}")
    if opt.convert is None:
        return text
    try:
        return opt.convert(text)
    except argparse.ArgumentTypeError as exc:
        raise ValueError(str(exc)) from None


def _toml_type(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a float", str: "a string",
             list: "an array", dict: "a table"}
    return names.get(type(value), f"a {type(value).__name__} (date or time)")


def value_from_toml(opt: Option, value: Any) -> Any:
    """The flag's value for a TOML *value*; ValueError saying what was expected."""
    if opt.kind == "bool":
        if not isinstance(value, bool):
            raise ValueError(f"expected true or false, got {_toml_type(value)}")
        return value
    if opt.kind == "list":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"expected an array of strings, e.g. {opt.key} = [\"...\"], "
                             f"got {_toml_type(value)}")
        if not value:
            raise ValueError("expected at least one string in the array")
        return [_checked(opt, v) for v in value]
    if opt.kind in ("int", "float"):
        numeric = (int,) if opt.kind == "int" else (int, float)
        if isinstance(value, bool) or not isinstance(value, numeric):
            want = "an integer" if opt.kind == "int" else "a number"
            raise ValueError(f"expected {want}, got {_toml_type(value)}")
        return _checked(opt, repr(value))
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {_toml_type(value)}")
    return _checked(opt, value)


def value_from_env(opt: Option, text: str) -> Any:
    """The flag's value for an environment variable's *text*; ValueError if wrong."""
    if opt.kind == "bool":
        word = text.strip().lower()
        if word in TRUE_WORDS:
            return True
        if word in FALSE_WORDS:
            return False
        raise ValueError(f"expected true or false (1/0, yes/no, on/off), got {text!r}")
    if opt.kind == "list":
        items = [item.strip() for item in text.split(",") if item.strip()]
        if not items:
            raise ValueError("expected a comma-separated list, got nothing")
        return [_checked(opt, item) for item in items]
    return _checked(opt, text.strip() if opt.kind in ("int", "float") else text)


# --------------------------------------------------------------------------- file


_TOML_POSITION = re.compile(r"^(?P<msg>.*) \(at line (?P<line>\d+), column (?P<col>\d+)\)$")
_KEY_LINE = re.compile(
    r"""^(?P<indent>\s*)\[*\s*(?:"(?P<dq>[^"]*)"|'(?P<sq>[^']*)'|(?P<bare>[A-Za-z0-9_-]+))""")


def _key_position(text: str, key: str) -> tuple[int, int]:
    """Line and column (1-based) where top-level *key* is set or opened as a table."""
    for number, line in enumerate(text.splitlines(), 1):
        match = _KEY_LINE.match(line)
        if match and key in (match["dq"], match["sq"], match["bare"]):
            return number, len(match["indent"]) + 1
    return 1, 1


def read_config(path: str, verb: str, options: Mapping[str, Option]) -> dict[str, Any]:
    """{dest: value} of the TOML file *path*; ConfigError on any fault, naming its place."""
    import tomllib

    try:
        data = read_regular(path, MAX_CONFIG_BYTES)
    except FileRefused as exc:
        if exc.too_big:
            raise ConfigError(f"{exc}: not a config file") from None
        raise ConfigError(f"{exc}; a config file is a regular TOML file") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        col = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ConfigError(f"{path}:{line}:{col}: not UTF-8 text") from None
    try:
        doc = tomllib.loads(text)
    except RecursionError:
        # tomllib recurses per nested array or inline table: a few thousand levels.
        raise ConfigError(f"{path}: arrays or tables nested too deeply: not a config "
                          "file") from None
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        match = _TOML_POSITION.match(message)
        if match:
            raise ConfigError(f"{path}:{match['line']}:{match['col']}: "
                              f"{match['msg']}") from None
        lines = text.count("\n") + 1
        raise ConfigError(f"{path}:{lines}:1: {message}") from None
    values: dict[str, Any] = {}
    for key, value in doc.items():
        line, col = _key_position(text, key)
        opt = options.get(key)
        if opt is None and isinstance(value, dict):
            raise ConfigError(f"{path}:{line}:{col}: unknown table [{key}]: the flags of "
                              f"`skr8tr {verb}` are top-level keys, without a table")
        if opt is None:
            close = difflib.get_close_matches(key, list(options), n=1)
            hint = (f"did you mean {close[0]!r}?" if close
                    else f"the keys are its flags without --: {', '.join(options)}")
            raise ConfigError(f"{path}:{line}:{col}: unknown key {key!r} for "
                              f"`skr8tr {verb}`; {hint}")
        try:
            values[opt.dest] = value_from_toml(opt, value)
        except ValueError as exc:
            raise ConfigError(f"{path}:{line}:{col}: {key}: {exc}") from None
    return values


def read_env(verb: str, options: Mapping[str, Option],
             environ: Mapping[str, str]) -> dict[str, Any]:
    """{dest: value} of the daemon's environment variables; ConfigError naming a bad one."""
    values: dict[str, Any] = {}
    for opt in options.values():
        names = [env_name(verb, opt.key)]
        if opt.client and opt.key not in NO_DEFAULT.get(verb, ()):
            names.append(GENERIC_ENV[opt.key])
        for name in names:
            text = environ.get(name)
            if text is None or text == "":
                continue  # unset, or set empty (as systemd's Environment=X= does)
            try:
                values[opt.dest] = value_from_env(opt, text)
            except ValueError as exc:
                raise ConfigError(f"{name}={text[:80]!r}: {exc}") from None
            break
    return values


# --------------------------------------------------------------------------- merge


class _Unset:
    def __repr__(self) -> str:
        return "<unset>"


UNSET: Any = _Unset()


def _explicit_dests(argv: Sequence[str], verb: str, dests: set[str]) -> set[str]:
    """The *dests* that *argv* sets on the command line (before or after the verb)."""
    from skr8tr.cli_args import build_parser

    probe = build_parser()
    sub = probe.verb_parsers[verb]  # type: ignore[attr-defined]
    for parser in (probe, sub):
        for action in parser._actions:
            if action.dest in dests and action.default is not argparse.SUPPRESS:
                # An append's default must be None or a list: None stands for unset.
                action.default = None if isinstance(action, argparse._AppendAction) else UNSET
            action.required = False
    ns = probe.parse_args(list(argv))
    return {d for d in dests if getattr(ns, d, UNSET) not in (UNSET, None)}


def apply(parser: argparse.ArgumentParser, argv: Sequence[str], opts: argparse.Namespace,
          environ: Mapping[str, str] | None = None) -> argparse.Namespace:
    """*opts* (parsed from *argv*) with the flags not on the command line taken from the
    environment, then the config file. Raises ConfigError; a missing required flag
    exits 2 through the verb's parser, as argparse would."""
    environ = os.environ if environ is None else environ
    verb = opts.verb
    sub = parser.verb_parsers[verb]  # type: ignore[attr-defined]
    options = options_of(verb, sub)
    config_path = opts.config or environ.get(env_name(verb, "config")) or None
    from_file = read_config(config_path, verb, options) if config_path else {}
    from_env = read_env(verb, options, environ)
    layered = {**from_file, **from_env}
    explicit = _explicit_dests(argv, verb, {o.dest for o in options.values()})
    for dest, value in layered.items():
        if dest not in explicit:
            setattr(opts, dest, value)
    for key in NO_DEFAULT.get(verb, ()):
        dest = options[key].dest
        if dest not in explicit and dest not in layered:
            setattr(opts, dest, None)
    opts.config = config_path
    missing = [f"--{key}" for key in REQUIRED.get(verb, ())
               if getattr(opts, options[key].dest, None) is None]
    if missing:
        sub.error(f"the following arguments are required: {', '.join(missing)} "
                  f"(on the command line, in --config FILE or as "
                  f"{env_name(verb, missing[0][2:])})")
    return opts
