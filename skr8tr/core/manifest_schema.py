"""The manifest's schema: the tree of either format checked key by key into a ``Manifest``.

Every key's rule, default, limit and error message exists here once, whatever
the format it was written in: an unknown or repeated key, a value of the wrong
kind, a number out of range, a duration, a ``check`` line, shell words in
``args``. Errors name the line and column of the offending character and what
was expected there.

Internal to :mod:`skr8tr.core.manifest`. Pure: no I/O.
"""

from __future__ import annotations

import re
from typing import Any, NoReturn

from skr8tr.core.durations import (
    DURATION_EXAMPLES,
    DurationError,
    format_duration_ms,
    parse_duration_ms,
)
from skr8tr.core.manifest_model import (
    MAX_CPU,
    MAX_MIN_REQUESTS,
    MAX_P99_MS,
    MAX_RAM_BYTES,
    MAX_REPLICAS,
    MAX_RETRIES,
    MAX_SURGE,
    MAX_VALUE_CHARS,
    MAX_WINDOW_MS,
    MIN_P99_MS,
    MIN_WINDOW_MS,
    ORDERS,
    PLACEHOLDERS,
    RAM_UNITS,
    RESTARTS,
    TYPES,
    Analysis,
    HealthCheck,
    Manifest,
    RolloutPolicy,
)
from skr8tr.core.manifest_syntax import scan_line
from skr8tr.core.manifest_tree import (
    APP_NAME_EXPECTED,
    FAILED,
    WORD,
    Collector,
    Entry,
    did_you_mean,
    fail,
    kind_of,
    quote,
)
from skr8tr.core.names import APP_NAME_RE
from skr8tr.core.percent import PERCENT_EXAMPLES, PercentError, parse_percent
from skr8tr.core.shell_words import shell_words

_NAME = APP_NAME_RE
_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_DIGITS = re.compile(r"[0-9]+")
_DECIMAL = re.compile(r"[0-9]+(?:\.[0-9]+)?")
_RAM = re.compile(r"([0-9]+)([KMGT]?)(B|iB)?")


_EXPECT = {
    "app": APP_NAME_EXPECTED,
    "type": "process or job",
    "exec": "the path of an executable, like ./server.py, /usr/bin/env or python3",
    "args": "shell-style words, like --port {port} --name 'my app'",
    "workdir": "a directory",
    "port": "a port number 1..65535 or auto",
    "replicas": f"a whole number 0..{MAX_REPLICAS}",
    "ram": "a size like 512M, 2G or 1024K",
    "cpu": f"a number of cores more than 0 and at most {MAX_CPU}, like 0.5 or 2",
    "restart": "always, on-failure or never",
    "check": "GET /PATH [CODE], like GET /healthz 200",
    "retries": f"a whole number 1..{MAX_RETRIES}",
    "surge": f"a whole number 1..{MAX_SURGE}",
    "auto-rollback": "yes or no",
    "order": "start-first or stop-first",
    "window": "a duration like 10s, 30s or 1m (1s..1h)",
    "max-p99": "a duration like 250ms or 1s (1ms..10m)",
    "max-error-rate": PERCENT_EXAMPLES,
    "min-requests": f"a whole number 1..{MAX_MIN_REQUESTS}",
}
_DURATION_KEYS = ("stop-grace", "interval", "timeout", "settle", "ready-timeout", "drain")
_POSITIVE_DURATIONS = ("interval", "timeout", "ready-timeout")

# Keys of each block in canonical order; True marks a key that takes a block, not a value.
_APP_KEYS = {
    "type": False,
    "exec": False,
    "args": False,
    "workdir": False,
    "port": False,
    "replicas": False,
    "ram": False,
    "cpu": False,
    "stop-grace": False,
    "restart": False,
    "env": True,
    "health": True,
    "rollout": True,
}
_HEALTH_KEYS = {"check": False, "interval": False, "timeout": False, "retries": False}
_ROLLOUT_KEYS = {
    "settle": False,
    "surge": False,
    "ready-timeout": False,
    "drain": False,
    "auto-rollback": False,
    "order": False,
    "analysis": True,
}
_ANALYSIS_KEYS = {"window": False, "max-error-rate": False, "max-p99": False,
                  "min-requests": False}
_TABLE_NAMES = {"analysis": "rollout.analysis"}  # the TOML table of a nested block



# --- Validation: the tree to a Manifest -----------------------------------------------------


def build(app: Entry, base_dir: str) -> Manifest:
    """The Manifest of the tree *app*. Raises Problems with every error found, in line
    order: each key is checked even when one before it was wrong."""
    checks = Collector()
    name = checks.run(_app_name, app)
    keys = _keys(app, _APP_KEYS, checks)
    if _missing(app, "exec", _APP_KEYS):
        checks.run(
            fail,
            app.line,
            app.key_col,
            f"app {name if name is not FAILED else app.value!r} has no 'exec'",
            "app",
            f"an 'exec' key: {_EXPECT['exec']}",
        )
    kind = checks.run(_choice, keys["type"], TYPES) if "type" in keys else "process"
    kind = "process" if kind is FAILED else kind
    port = checks.run(_port, keys["port"]) if "port" in keys else None
    has_port = _given(app, "port")  # a bad port is reported once, not again by args or env
    fields: dict[str, Any] = {"type": kind, "port": port, "restart": default_restart(kind)}
    parts: list[tuple[str, str, Any, tuple[Any, ...]]] = [
        ("exec", "exec", _path, ()),
        ("args", "args", _args, ()),
        ("workdir", "workdir", _path, ()),
        ("replicas", "replicas", _int, (0, MAX_REPLICAS)),
        ("ram", "ram_bytes", _ram, ()),
        ("cpu", "cpu", _cpu, ()),
        ("stop-grace", "stop_grace_ms", _duration, ()),
        ("restart", "restart", _choice, (RESTARTS,)),
        ("env", "env", _env, ()),
        ("health", "health", _health, ()),
        ("rollout", "rollout", _rollout, ()),
    ]
    for key, field, check, extra in parts:
        if key not in keys:
            continue
        kw = {"has_port": has_port} if key in ("args", "env") else {}
        if key == "health" and kind == "job":
            health = keys["health"]
            checks.run(
                fail,
                health.line,
                health.key_col,
                "'health' on a job",
                "health",
                "no health block with type job",
                advice="a job runs to completion and is not probed: remove the health block",
            )
            continue
        fields[field] = checks.run(check, keys[key], *extra, **kw)
    checks.raise_any()
    return Manifest(app=name, base_dir=base_dir, **fields)


def _given(block: Entry, key: str) -> bool:
    return any(entry.key == key for entry in block.children)


def _missing(block: Entry, key: str, schema: dict[str, bool]) -> bool:
    """Is *key* missing from *block*, and not just misspelt (an unknown key whose "did you
    mean" names it is reported already)?"""
    if _given(block, key):
        return False
    known = sorted(schema)
    misspelt = f"did you mean {key!r}?"
    return not any(
        entry.key not in schema and did_you_mean(entry.key, known) == misspelt
        for entry in block.children
    )


def default_restart(kind: str) -> str:
    return "on-failure" if kind == "job" else "always"


def _keys(block: Entry, schema: dict[str, bool], checks: Collector) -> dict[str, Entry]:
    """The block's entries by key, each checked: known, given once, value or block as it
    needs. An entry that is not is reported to *checks* and left out."""
    where = block.where or f"in {block.key} block"
    found: dict[str, Entry] = {}
    for entry in block.children:
        if entry.key not in schema:
            known = sorted(schema)
            checks.run(
                fail,
                entry.line,
                entry.key_col,
                f"unknown key {quote(entry.key)} {where}",
                entry.key,
                "one of " + ", ".join(known),
                hint=did_you_mean(entry.key, known),
            )
            continue
        if entry.key in found:
            checks.run(
                fail,
                entry.line,
                entry.key_col,
                f"duplicate key {entry.key!r} {where}",
                entry.key,
                "each key at most once",
                advice=f"it was already given at line {found[entry.key].line}",
            )
            continue
        if checks.run(_check_shape, entry, schema[entry.key]) is FAILED:
            continue  # reported; _given() still sees it, so it is not "missing" too
        found[entry.key] = entry
    return found


def _check_shape(entry: Entry, takes_block: bool) -> None:
    key = entry.key
    if takes_block:
        if entry.value is not None:
            expected = (
                f"'{key}' alone on its line, with its entries below it indented two more spaces"
                if entry.literal
                else f"a [{_TABLE_NAMES.get(key, key)}] table"
            )
            fail(*entry.at(), f"{key!r} takes a block, not a value", _text(entry.value), expected)
        return
    if entry.block:
        expected = f"'{key} VALUE' on one line" if entry.literal else f"{key} = VALUE"
        fail(
            entry.block_line, entry.block_col, f"{key!r} takes a value, not a block", key, expected
        )
    if entry.value is None:
        fail(entry.line, entry.key_col, f"{key!r} needs a value", key, _expect(key))


def _expect(key: str) -> str:
    if key in _DURATION_KEYS:
        more = "more than 0" if key in _POSITIVE_DURATIONS else "0 or more"
        return f"{DURATION_EXAMPLES} ({more})"
    return _EXPECT.get(key, "a value (write '' for an empty one)")


def _text(value: Any) -> str:
    return value if isinstance(value, str) else repr(value)


def _wrong_type(entry: Entry, expected: str) -> NoReturn:
    fail(*entry.at(), f"{entry.key!r} is {kind_of(entry.value)}", _text(entry.value), expected)


def _string(entry: Entry) -> str:
    if not isinstance(entry.value, str):
        _wrong_type(entry, f"a string: {_expect(entry.key)}")
    _check_length(entry, entry.value)
    return entry.value


def _check_length(entry: Entry, value: str) -> None:
    if len(value) > MAX_VALUE_CHARS:
        fail(*entry.at(), f"{entry.key} value is {len(value)} characters long", value[:60],
              f"at most {MAX_VALUE_CHARS} characters")


def _bad_value(entry: Entry, text: str, offset: int | None = None, why: str = "") -> NoReturn:
    problem = f"bad {entry.key} {quote(text)}" + (f" ({why})" if why else "")
    fail(*entry.at(offset), problem, text, _expect(entry.key))


def _app_name(app: Entry) -> str:
    if app.value is None:
        fail(app.line, app.key_col, "'app' needs a name", "app", _EXPECT["app"])
    name = _string(app)
    if not _NAME.fullmatch(name):
        fail(*app.at(), f"bad app name {quote(name)}", name, _EXPECT["app"])
    return name


def _choice(entry: Entry, choices: tuple[str, ...]) -> str:
    value = _string(entry)
    if value not in choices:
        problem = f"bad {entry.key} {quote(value)}"
        fail(*entry.at(), problem, value, _expect(entry.key), hint=did_you_mean(value, choices))
    return value


def _int(entry: Entry, low: int, high: int) -> int:
    """A whole number from text or a TOML integer (never a boolean, although bool is an int)."""
    value = entry.value
    if isinstance(value, bool) or not isinstance(value, int | str):
        _wrong_type(entry, _expect(entry.key))
    if isinstance(value, int):
        number = value
    elif _DIGITS.fullmatch(value):
        number = int(value) if len(value) <= 18 else high + 1
    else:
        _bad_value(entry, value)
    if not low <= number <= high:
        _bad_value(entry, _text(value), why="out of range")
    return number


def _port(entry: Entry) -> int | str:
    if entry.value == "auto":
        return "auto"
    return _int(entry, 1, 65535)


def _ram(entry: Entry) -> int:
    text = _string(entry)
    match = _RAM.fullmatch(text)
    if not match or not (match[2] or match[3] == "B"):
        why = "no unit" if _DIGITS.fullmatch(text) else ""
        _bad_value(entry, text, why=why)
    digits = match[1].lstrip("0") or "0"
    size = int(digits) * RAM_UNITS[match[2] or "B"] if len(digits) <= 18 else MAX_RAM_BYTES + 1
    if size == 0:
        _bad_value(entry, text, why="must be more than 0")
    if size > MAX_RAM_BYTES:
        _bad_value(entry, text, why="more than 1024T")
    return size


def _cpu(entry: Entry) -> float:
    value = entry.value
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        _wrong_type(entry, _expect(entry.key))
    if isinstance(value, str):
        if not _DECIMAL.fullmatch(value):
            _bad_value(entry, value)
        number: float = float(value)
    else:
        number = value
    if not 0 < number <= MAX_CPU:  # also refuses TOML's nan
        _bad_value(entry, _text(value), why="out of range")
    return float(number)


def _duration(entry: Entry) -> int:
    text = _string(entry)
    try:
        ms = parse_duration_ms(text)
    except DurationError as exc:
        why = f" ({exc.reason})" if exc.reason else ""
        fail(*entry.at(), f"bad duration {quote(text)}{why}", text, _expect(entry.key))
    if ms == 0 and entry.key in _POSITIVE_DURATIONS:
        _bad_value(entry, text, why="must be more than 0")
    return ms


def _yes_no(entry: Entry) -> bool:
    if isinstance(entry.value, bool):
        return entry.value
    return _choice(entry, ("yes", "no")) == "yes"


def _words(entry: Entry, text: str) -> list[str]:
    """Shell words, with an unclosed quote or a trailing backslash reported where it is."""
    try:
        return shell_words(text)
    except ValueError:
        opened = scan_line(text)[2]
        if opened is None:
            _bad_value(entry, text, len(text) - 1, why="it ends with a lone backslash")
        _bad_value(entry, text, opened, why=f"the quote at {text[opened]!r} is never closed")


def _path(entry: Entry) -> str:
    """exec, workdir and env values: the text as written or, when it starts with a quote, one
    shell word (so it may hold ' #', outer spaces, or be empty)."""
    text = _string(entry)
    if entry.literal and text[:1] in ("'", '"'):
        words = _words(entry, text)
        if len(words) != 1:
            _bad_value(entry, text, why="more than one word: quote the whole value")
        text = words[0]
    if not text and entry.key in ("exec", "workdir"):
        _bad_value(entry, text, why="empty")
    return text


def _args(entry: Entry, *, has_port: bool) -> tuple[str, ...]:
    value = entry.value
    if isinstance(value, list):
        for item in value:
            if not isinstance(item, str):
                fail(
                    *entry.at(), f"'args' holds {kind_of(item)}", _text(item), "an array of strings"
                )
            _check_length(entry, item)
        words = value
    else:
        words = _words(entry, _string(entry))
    source = value if isinstance(value, str) else ""
    for word in words:
        for match in _PLACEHOLDER.finditer(word):
            found = source.find(match[0])
            offset = found if found >= 0 else None
            if match[1] not in PLACEHOLDERS:
                fail(
                    *entry.at(offset),
                    f"unknown placeholder {match[0]!r} in args",
                    match[0],
                    "{port} or {host}",
                    advice="expected {port} or {host} (other braces are kept as written)",
                )
            if match[1] == "port" and not has_port:
                fail(
                    *entry.at(offset),
                    "'{port}' in args but the app has no 'port'",
                    match[0],
                    "a 'port N' or 'port auto' key",
                )
    return tuple(words)


def _env(block: Entry, *, has_port: bool) -> tuple[tuple[str, str], ...]:
    env: dict[str, str] = {}
    lines: dict[str, int] = {}
    checks = Collector()
    for entry in block.children:
        key = entry.key
        if not _ENV_KEY.fullmatch(key):
            checks.run(
                fail,
                entry.line,
                entry.key_col,
                f"bad env key {quote(key)}",
                key,
                "a name of letters, digits and '_', not starting with a digit",
            )
            continue
        if key in lines:
            checks.run(
                fail,
                entry.line,
                entry.key_col,
                f"duplicate env key {key!r}",
                key,
                "each key at most once",
                advice=f"it was already given at line {lines[key]}",
            )
            continue
        lines[key] = entry.line
        if has_port and key in ("PORT", "HOST"):
            checks.run(
                fail,
                entry.line,
                entry.key_col,
                f"env {key!r} clashes with 'port'",
                key,
                "no PORT or HOST in env when 'port' is given",
                advice="skr8tr sets PORT and HOST for the process itself: remove it",
            )
            continue
        if checks.run(_check_shape, entry, False) is FAILED:
            continue
        env[key] = checks.run(_path, entry)
    checks.raise_any()
    return tuple(sorted(env.items()))


def _health(block: Entry) -> HealthCheck:
    checks = Collector()
    keys = _keys(block, _HEALTH_KEYS, checks)
    if _missing(block, "check", _HEALTH_KEYS):
        checks.run(
            fail,
            block.line,
            block.key_col,
            "health block has no 'check'",
            "health",
            f"a 'check' line: {_EXPECT['check']}",
        )
    fields: dict[str, Any] = {}
    if "check" in keys:
        checked = checks.run(_check, keys["check"])
        if checked is not FAILED:
            fields["path"], fields["expect_status"] = checked
    if "interval" in keys:
        fields["interval_ms"] = checks.run(_duration, keys["interval"])
    if "timeout" in keys:
        fields["timeout_ms"] = checks.run(_duration, keys["timeout"])
    if "retries" in keys:
        fields["retries"] = checks.run(_int, keys["retries"], 1, MAX_RETRIES)
    checks.raise_any()
    return HealthCheck(**fields)


def _check(entry: Entry) -> tuple[str, int]:
    text = _string(entry)
    words = [(match[0], match.start()) for match in WORD.finditer(text)]
    if not 2 <= len(words) <= 3:
        _bad_value(entry, text)
    method, at = words[0]
    if method != "GET":
        fail(*entry.at(at), f"unsupported method {quote(method)} in check", method, "GET")
    path, at = words[1]
    if not path.startswith("/") or any(char.isspace() for char in path):
        fail(
            *entry.at(at),
            f"bad health path {quote(path)}",
            path,
            "a path that starts with '/' and has no spaces, like /healthz",
        )
    if len(words) == 2:
        return path, 200
    code, at = words[2]
    if not (len(code) == 3 and code.isascii() and code.isdigit() and 100 <= int(code) <= 599):
        fail(
            *entry.at(at),
            f"bad status code {quote(code)} in check",
            code,
            "an HTTP status code 100..599",
        )
    return path, int(code)


def _rollout(block: Entry) -> RolloutPolicy:
    checks = Collector()
    keys = _keys(block, _ROLLOUT_KEYS, checks)
    fields: dict[str, Any] = {}
    for key, name in (
        ("settle", "settle_ms"),
        ("ready-timeout", "ready_timeout_ms"),
        ("drain", "drain_ms"),
    ):
        if key in keys:
            fields[name] = checks.run(_duration, keys[key])
    if "surge" in keys:
        fields["surge"] = checks.run(_int, keys["surge"], 1, MAX_SURGE)
    if "auto-rollback" in keys:
        fields["auto_rollback"] = checks.run(_yes_no, keys["auto-rollback"])
    if "order" in keys:
        fields["order"] = checks.run(_choice, keys["order"], ORDERS)
    if "analysis" in keys:
        fields["analysis"] = checks.run(_analysis, keys["analysis"])
    checks.raise_any()
    return RolloutPolicy(**fields)


def _analysis(block: Entry) -> Analysis:
    """The ``analysis`` block of ``rollout``; an empty one is every default."""
    checks = Collector()
    keys = _keys(block, _ANALYSIS_KEYS, checks)
    fields: dict[str, Any] = {}
    if "window" in keys:
        fields["window_ms"] = checks.run(_bounded_duration, keys["window"], MIN_WINDOW_MS,
                                         MAX_WINDOW_MS)
    if "max-error-rate" in keys:
        fields["max_error_rate"] = checks.run(_percent, keys["max-error-rate"])
    if "max-p99" in keys:
        fields["max_p99_ms"] = checks.run(_bounded_duration, keys["max-p99"], MIN_P99_MS,
                                          MAX_P99_MS)
    if "min-requests" in keys:
        fields["min_requests"] = checks.run(_int, keys["min-requests"], 1, MAX_MIN_REQUESTS)
    checks.raise_any()
    return Analysis(**fields)


def _bounded_duration(entry: Entry, low_ms: int, high_ms: int) -> int:
    ms = _duration(entry)
    if not low_ms <= ms <= high_ms:
        low, high = format_duration_ms(low_ms), format_duration_ms(high_ms)
        _bad_value(entry, entry.value, why=f"less than {low}" if ms < low_ms
                   else f"more than {high}")
    return ms


def _percent(entry: Entry) -> float:
    text = _string(entry)
    try:
        return parse_percent(text)
    except PercentError as exc:
        _bad_value(entry, text, why=exc.reason or "")
