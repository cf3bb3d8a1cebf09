"""The ``skr8tr`` command line (DESIGN.md §5).

Argument parsing, dispatch and output. The CLI talks to the conductor only over
the wire, with the blocking client (:mod:`skr8tr.blocking_client`): a CLI run
makes a request or a few and exits, so it needs no event loop. Heavy imports
happen inside the verbs that need them (trio only for the daemons:
``conductor``, ``node``, ``ingress``) so that ``skr8tr ping`` and
``skr8tr --help`` start fast.

Exit codes: 0 success; 1 the conductor answered with an error; 2 bad usage or
an invalid manifest (caught before sending); 3 the conductor could not be
reached.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

from skr8tr import __version__, output

# The client's failures and the CLI's own are one kind of error: printed as
# ``error: CODE: message``, the process exits with ``exit`` (skr8tr.wire is
# stdlib only, so importing it costs the CLI nothing).
from skr8tr.wire import (  # noqa: F401 (the exit codes are part of this module's API)
    DEFAULT_CONDUCTOR_URL,
    DEFAULT_TIMEOUT_S,
    EXIT_OK,
    EXIT_REMOTE_ERROR,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
)
from skr8tr.wire import ClientError as CliError

DEFAULT_KEY_FILE = "~/.skr8tr/signing.sec"

ROLLOUT_SUBVERBS = ("status", "abort", "undo", "history")


# --------------------------------------------------------------------------- parsing


def _add_client_flags(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """The client flags, accepted before or after the verb.

    On the top-level parser they carry the defaults; on each verb's parser they
    default to SUPPRESS so that a flag given before the verb is not overwritten.
    """
    dflt: Callable[[Any], Any] = (lambda v: v) if top else (lambda v: argparse.SUPPRESS)
    group = parser.add_argument_group("client options (before or after the verb)")
    group.add_argument(
        "--conductor", metavar="URL",
        default=dflt(os.environ.get("SKR8TR_CONDUCTOR") or DEFAULT_CONDUCTOR_URL),
        help=f"conductor WebSocket URL (env SKR8TR_CONDUCTOR; default {DEFAULT_CONDUCTOR_URL})",
    )
    group.add_argument(
        "--key", metavar="FILE",
        default=dflt(os.environ.get("SKR8TR_KEY") or DEFAULT_KEY_FILE),
        help=f"secret signing key (env SKR8TR_KEY; default {DEFAULT_KEY_FILE})",
    )
    group.add_argument(
        "--ca", metavar="FILE", default=dflt(os.environ.get("SKR8TR_CA") or None),
        help="for a wss:// conductor: the CA certificate (PEM) to verify it with, instead "
        "of the system's trust store (env SKR8TR_CA)",
    )
    group.add_argument("--json", action="store_true", default=dflt(False),
                       help="print exactly one JSON document on stdout")
    group.add_argument("--timeout", metavar="S", type=_positive_float,
                       default=dflt(DEFAULT_TIMEOUT_S),
                       help=f"seconds to wait for the conductor (default {DEFAULT_TIMEOUT_S:g})")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    value = _non_negative_int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {text!r}")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse with ``error: USAGE: ...`` lines, so every failure has the same shape."""

    def error(self, message: str) -> Any:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"error: USAGE: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="skr8tr",
        description="Run bare processes on a fleet of machines; update them without "
        "dropping a request.",
        epilog="Exit codes: 0 success, 1 the conductor answered with an error, "
        "2 bad usage or invalid manifest, 3 the conductor could not be reached.",
    )
    parser.add_argument("--version", action="version", version=f"skr8tr {__version__}")
    _add_client_flags(parser, top=True)
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    verbs.required = True

    def verb(name: str, help: str, **kw: Any) -> argparse.ArgumentParser:
        p = verbs.add_parser(name, help=help, description=help, **kw)
        _add_client_flags(p, top=False)
        return p

    p = verb("keygen", "create an Ed25519 signing key pair")
    p.add_argument("--out", metavar="DIR", default="~/.skr8tr",
                   help="folder for signing.sec and signing.pub (default ~/.skr8tr)")
    p.add_argument("--force", action="store_true", help="replace an existing key pair")

    p = verb("conductor", "run the conductor daemon")
    p.add_argument("--listen", metavar="H:P", default="127.0.0.1:7771",
                   help="WebSocket API address (default 127.0.0.1:7771)")
    p.add_argument("--http", metavar="H:P", default="127.0.0.1:7780",
                   help="status page, /api/state, /metrics, /healthz (default 127.0.0.1:7780)")
    p.add_argument("--authorized-keys", metavar="F", help="keys allowed to command or join")
    p.add_argument("--state", metavar="F", help="desired-state file (TOML)")
    p.add_argument("--node-timeout", metavar="S", type=_positive_float, default=15.0,
                   help="seconds without heartbeat before a node is lost (default 15)")
    p.add_argument("--port-range", metavar="LO-HI", default="20000-32000",
                   help="ports for `port auto` (default 20000-32000)")
    p.add_argument("--insecure", action="store_true",
                   help="run without --authorized-keys (accepts anyone; never in production)")
    p.add_argument("--adopt-grace", metavar="S", type=_positive_float, default=None,
                   help="after a restart, seconds to wait for nodes to report running "
                   "replicas before placing new ones (default: 2 x the node heartbeat)")
    sec = p.add_argument_group("security (see SECURITY.md)")
    sec.add_argument("--tls-cert", metavar="FILE",
                     help="serve wss:// and https:// with this PEM certificate (chain)")
    sec.add_argument("--tls-key", metavar="FILE", help="the PEM private key of --tls-cert")
    sec.add_argument("--audit-log", metavar="FILE",
                     help="append every signed command to FILE as hash-chained JSON lines "
                     "(check it with `skr8tr audit verify FILE`)")
    sec.add_argument("--max-connections-per-address", metavar="N", type=_positive_int,
                     help="open connections per client address, on each listener "
                     "(default 2048, at most half of --max-connections)")
    sec.add_argument("--max-messages-per-s", metavar="N", type=_positive_float,
                     help="WebSocket messages per second per connection before it is "
                     "closed (default 2000)")
    sec.add_argument("--message-burst", metavar="N", type=_positive_int,
                     help="messages a connection may send at once above that rate "
                     "(default 10000)")
    sec.add_argument("--handshake-timeout", metavar="S", type=_positive_float,
                     help="TLS + WebSocket handshake, and a node's hello (default 10)")
    sec.add_argument("--idle-timeout", metavar="S", type=_positive_float,
                     help="close a /v1/cli connection that sends nothing for S (default 300)")
    sec.add_argument("--max-connections", metavar="N", type=_positive_int,
                     help="open connections on both listeners together; lowered to fit the "
                     "open-file limit (default: as many as that allows)")
    sec.add_argument("--watch-idle-timeout", metavar="S", type=_positive_float,
                     help="ping /v1/watch clients every S/2 and close one silent for S "
                     "(default 60)")
    sec.add_argument("--watch-queue-bytes", metavar="N", type=_positive_int,
                     help="close a /v1/watch client with more than N bytes of events not "
                     "yet sent to it (default 4194304)")
    sec.add_argument("--max-bytes-per-s", metavar="N", type=_positive_int,
                     help="bytes of /v1/cli requests per second from one client address "
                     "(twice that at once) before its connection is closed (default "
                     "16777216)")
    sec.add_argument("--max-watchers-per-address", metavar="N", type=_positive_int,
                     help="/v1/watch streams open from one client address; more are "
                     "answered 429 (default 64)")
    sec.add_argument("--allowed-host", metavar="NAME", action="append",
                     help="a host name the HTTP routes and WebSockets answer besides IP "
                     "addresses and localhost, e.g. behind a reverse proxy (repeatable)")
    sec.add_argument("--allowed-origin", metavar="URL", action="append",
                     help="a web page origin (SCHEME://HOST[:PORT]) that may open "
                     "WebSockets besides the conductor's own status page (repeatable)")
    p.add_argument("--log-level", default="info",
                   choices=["debug", "info", "warning", "error"])

    p = verb("node", "run a node agent that dials the conductor")
    p.add_argument("--node-id", metavar="ID", help="this node's id (default: the host name)")
    p.add_argument("--data-dir", metavar="D", help="replica records and logs")
    p.add_argument("--advertise", metavar="ADDR",
                   help="address replicas are reached at (default: the local address of "
                   "the connection to the conductor)")
    p.add_argument("--stop-workloads", action="store_true",
                   help="stop every replica when the agent exits (default: leave them running)")
    p.add_argument("--run-as", metavar="USER",
                   help="start workloads as this user (and its groups); the agent itself "
                   "must run as root for that")
    p.add_argument("--log-level", default="info",
                   choices=["debug", "info", "warning", "error"])

    p = verb("ingress", "run the HTTP ingress in front of apps")
    p.add_argument("--listen", metavar="H:P", required=True)
    p.add_argument("--route", metavar="/PREFIX:APP", action="append", required=True,
                   help="route a path prefix to an app (repeatable)")
    p.add_argument("--max-connections", metavar="N", type=_positive_int, default=1024,
                   help="client connections served at once, lowered to fit the open-file "
                   "limit; more get a 503 (default 1024)")
    p.add_argument("--max-connections-per-address", metavar="N", type=_positive_int,
                   default=256, help="client connections from one address (IPv6: one /64) "
                   "at once; more get a 503 (default 256)")
    p.add_argument("--header-timeout", metavar="S", type=_positive_float, default=10.0,
                   help="the first request head must arrive whole within S of connecting, "
                   "a later one within S of its first byte (default 10)")
    p.add_argument("--idle-timeout", metavar="S", type=_positive_float, default=30.0,
                   help="close a keep-alive client connection idle S between requests "
                   "(default 30)")
    p.add_argument("--body-timeout", metavar="S", type=_positive_float, default=30.0,
                   help="each read of a request body and each write to a client must "
                   "progress within S (default 30)")
    p.add_argument("--connect-timeout", metavar="S", type=_positive_float, default=2.0,
                   help="connecting to a replica (default 2)")
    p.add_argument("--upstream-timeout", metavar="S", type=_positive_float, default=60.0,
                   help="wait for a replica's response, and each read of it (default 60)")
    p.add_argument("--retries", metavar="N", type=_non_negative_int, default=2,
                   help="other replicas tried after a connect failure, or a failure before "
                   "the response of an idempotent request without body (default 2)")
    # Keeps draining replicas in rotation: only to demonstrate what draining prevents.
    p.add_argument("--ignore-drain", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--log-level", default="info",
                   choices=["debug", "info", "warning", "error"])

    p = verb("up", "submit a manifest: deploy a new app")
    p.add_argument("file", metavar="FILE")

    p = verb("down", "stop every replica of an app and forget it")
    p.add_argument("app", metavar="APP")

    p = verb(
        "rollout", "rolling update, or its status / abort / undo / history",
        usage="skr8tr rollout FILE [--watch] [--force]\n"
        "       skr8tr rollout status APP | abort APP | undo APP [--to GEN] | history APP",
    )
    p.add_argument("target", nargs="+", metavar="FILE | SUBVERB APP",
                   help="a manifest file, or one of: status, abort, undo, history "
                   "followed by the app")
    p.add_argument("--watch", action="store_true", help="follow the rollout until it ends")
    p.add_argument("--force", action="store_true", help="abort a running rollout first")
    p.add_argument("--to", metavar="GEN", type=_positive_int,
                   help="with undo: the generation to return to")

    p = verb("scale", "change an app's replica count")
    p.add_argument("app", metavar="APP")
    p.add_argument("replicas", metavar="N", type=_non_negative_int)

    p = verb("list", "list replicas")
    p.add_argument("app", metavar="APP", nargs="?")
    verb("nodes", "list node agents")
    verb("status", "nodes, apps, replicas and rollouts at once")
    verb("ping", "check that the conductor answers")

    p = verb("logs", "show a replica's or an app's logs")
    p.add_argument("app", metavar="APP")
    p.add_argument("--replica", metavar="ID")
    p.add_argument("--tail", metavar="N", type=_positive_int, default=100)
    p.add_argument("--follow", action="store_true", help="keep printing new lines")

    verb("watch", "print live events until Ctrl-C")

    p = verb("audit", "check an audit log written by `skr8tr conductor --audit-log`")
    p.add_argument("action", choices=["verify"], metavar="verify",
                   help="verify: check the hash chain of FILE")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--expect-head", metavar="HASH",
                   help="a head printed by an earlier verify, kept elsewhere: fail unless "
                   "the chain still contains it (catches lines cut off the end)")

    p = verb("fmt", "check a manifest and print it normalised")
    p.add_argument("--toml", action="store_true", help="print it as TOML")
    p.add_argument("file", metavar="FILE")
    return parser


# --------------------------------------------------------------------------- output


def _print_json(doc: Any) -> None:
    sys.stdout.write(json.dumps(doc, ensure_ascii=False) + "\n")


def _fail(opts: argparse.Namespace, err: CliError) -> int:
    sys.stderr.write(f"error: {err.code}: {err.message}\n")
    if getattr(opts, "json", False):
        _print_json({"error": {"code": err.code, "message": err.message}})
    return err.exit


# --------------------------------------------------------------------------- verbs


def cmd_keygen(opts: argparse.Namespace) -> int:
    from skr8tr import keyfiles
    from skr8tr.core import keys

    out = os.path.expanduser(opts.out)
    try:
        pub = keyfiles.write_keypair(out, force=opts.force)
    except keys.KeyFileError as exc:
        raise CliError("KEY_EXISTS" if "exists" in str(exc) else "KEY_FILE", str(exc),
                       EXIT_USAGE) from None
    except OSError as exc:
        raise CliError("KEY_FILE", f"cannot write keys to {out}: {exc.strerror}",
                       EXIT_USAGE) from None
    sec_path = os.path.join(out, "signing.sec")
    pub_path = os.path.join(out, "signing.pub")
    if opts.json:
        _print_json({"public_key": pub, "secret_key_file": sec_path, "public_key_file": pub_path,
                     "fingerprint": keys.fingerprint(pub)})
    else:
        print(pub)
        print(f"# secret key: {sec_path} (mode 0600; keep it private)", file=sys.stderr)
        print(f"# public key: {pub_path}; authorize it on the conductor with a line",
              file=sys.stderr)
        print(f"#   admin {pub}", file=sys.stderr)
    return EXIT_OK


def _read_manifest(path: str) -> tuple[str, str, str]:
    """(text, format, base_dir) of a manifest file, validated locally first (exit 2)."""
    from skr8tr import manifest_files
    from skr8tr.core import manifest

    try:
        text, parsed = manifest_files.read_manifest(path)
    except manifest.ManifestError as exc:
        raise CliError("INVALID_MANIFEST", str(exc), EXIT_USAGE) from None
    fmt = "toml" if path.endswith(".toml") else "skr8tr"
    return text, fmt, parsed.base_dir


def cmd_fmt(opts: argparse.Namespace) -> int:
    from skr8tr import manifest_files
    from skr8tr.core import manifest

    try:
        m = manifest_files.load_manifest(opts.file)
    except manifest.ManifestError as exc:
        raise CliError("INVALID_MANIFEST", str(exc), EXIT_USAGE) from None
    text = manifest.format_toml(m) if opts.toml else manifest.format_skr8tr(m)
    if opts.json:
        _print_json({"format": "toml" if opts.toml else "skr8tr", "text": text})
    else:
        sys.stdout.write(text)
    return EXIT_OK


def cmd_audit(opts: argparse.Namespace) -> int:
    """``audit verify FILE``: 0 and the head when the chain is intact, 1 naming the first
    bad line otherwise, 2 when FILE cannot be read."""
    from skr8tr import audit_head
    from skr8tr.core import audit_chain

    expect = opts.expect_head
    if expect is not None and re.fullmatch(r"[0-9a-f]{64}", expect) is None:
        raise CliError("USAGE", "--expect-head takes the 64 lowercase hex characters "
                       "printed by `skr8tr audit verify`", EXIT_USAGE)
    try:
        with open(opts.file, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise CliError("AUDIT", f"cannot read {opts.file}: {exc.strerror or exc}",
                       EXIT_USAGE) from None
    try:
        recorded = audit_head.read_head_file(opts.file)
    except ValueError as exc:
        raise CliError("AUDIT", f"{exc}", EXIT_REMOTE_ERROR) from None
    try:
        verified = audit_chain.verify(data, expect_head=expect, recorded=recorded)
    except audit_chain.ChainError as exc:
        raise CliError("AUDIT", f"{opts.file}:{exc.line}: {exc.message}",
                       EXIT_REMOTE_ERROR) from None
    head = verified.head
    checked = [name for name, used in (("the HEAD file", recorded is not None),
                                       ("--expect-head", expect is not None)) if used]
    if opts.json:
        _print_json({"file": opts.file, "ok": True, "entries": head.entries,
                     "head": head.hash, "checked_against": checked})
        return EXIT_OK
    print(f"{opts.file}: intact, {head.entries} entries; head {head.hash}")
    if not checked:
        print(f"# no {audit_head.head_path(opts.file)} and no --expect-head: lines cut off the "
              "end, or a rewritten log, cannot be told apart from an intact one. Keep this "
              "head elsewhere and pass it as --expect-head next time.", file=sys.stderr)
    return EXIT_OK


def cmd_conductor(opts: argparse.Namespace) -> int:
    from skr8tr.conductor import daemon

    return daemon.main(opts)


def cmd_node(opts: argparse.Namespace) -> int:
    from skr8tr.node import agent

    return agent.main(opts)


def cmd_ingress(opts: argparse.Namespace) -> int:
    from skr8tr.ingress import daemon

    return daemon.main(opts)


def _signing_key(opts: argparse.Namespace, *, required: bool) -> Any | None:
    path = os.path.expanduser(opts.key)
    if not required and not os.path.exists(path):
        return None  # read-only verbs go unsigned when there is no key file
    from skr8tr import keyfiles
    from skr8tr.core import keys

    try:
        return keyfiles.load_signing_key(path)
    except keys.KeyFileError as exc:
        if not required:
            return None
        raise CliError(
            "NO_KEY",
            f"`skr8tr {opts.verb}` must be signed: {exc}. "
            "Create a key with `skr8tr keygen`, or pass --key FILE / set SKR8TR_KEY",
            EXIT_USAGE,
        ) from None


def _run_client(opts: argparse.Namespace, body: Callable[[Any], int], *, signed: bool) -> int:
    """Run ``body(call_options)``, mapping client failures to exit codes."""
    from skr8tr import wire

    call_opts = wire.CallOptions(
        conductor=opts.conductor,
        timeout_s=opts.timeout,
        signing_key=_signing_key(opts, required=signed),
        ca_file=opts.ca,
    )
    return body(call_opts)  # a wire.ClientError is a CliError: main() prints it


def _simple_call(cmd: str, args_of: Callable[[argparse.Namespace], dict],
                 render: Callable[[Any], str], *, signed: bool):
    def run(opts: argparse.Namespace) -> int:
        from skr8tr import blocking_client

        def body(call_opts: Any) -> int:
            result = blocking_client.call(call_opts, cmd, args_of(opts))
            if opts.json:
                _print_json(result)
            else:
                print(render(result))
            return EXIT_OK

        return _run_client(opts, body, signed=signed)

    return run


def _render_ping(result: dict) -> str:
    return f"pong from {result.get('pong', '?')} (version {result.get('version', '?')})"


def _render_down(result: dict) -> str:
    return f"{result['app']}: stopped {result['stopped']} replica(s)"


def cmd_up(opts: argparse.Namespace) -> int:
    text, fmt, base_dir = _read_manifest(opts.file)
    return _simple_call(
        "up", lambda o: {"manifest": text, "format": fmt, "base_dir": base_dir},
        output.up, signed=True,
    )(opts)


def cmd_rollout(opts: argparse.Namespace) -> int:
    target = opts.target
    if target[0] in ROLLOUT_SUBVERBS and not os.path.isfile(target[0]):
        sub = target[0]
        if len(target) != 2:
            raise CliError("USAGE", f"usage: skr8tr rollout {sub} APP", EXIT_USAGE)
        if opts.watch or opts.force:
            raise CliError("USAGE", f"--watch and --force go with `rollout FILE`, not "
                           f"`rollout {sub}`", EXIT_USAGE)
        if opts.to is not None and sub != "undo":
            raise CliError("USAGE", "--to goes with `rollout undo APP`", EXIT_USAGE)
        app = target[1]
        if sub == "status":
            return _simple_call("rollout-status", lambda o: {"app": app},
                                output.rollout_status, signed=False)(opts)
        if sub == "abort":
            return _simple_call("rollout-abort", lambda o: {"app": app},
                                output.rollout_status, signed=True)(opts)
        if sub == "undo":
            return _simple_call("rollout-undo", lambda o: {"app": app, "to": o.to},
                                output.rollout_status, signed=True)(opts)
        return _simple_call("history", lambda o: {"app": app}, output.history,
                            signed=False)(opts)
    if len(target) != 1:
        raise CliError("USAGE", "usage: skr8tr rollout FILE [--watch] [--force]", EXIT_USAGE)
    if opts.to is not None:
        raise CliError("USAGE", "--to goes with `rollout undo APP`", EXIT_USAGE)
    text, fmt, base_dir = _read_manifest(target[0])
    args = {"manifest": text, "format": fmt, "base_dir": base_dir, "force": opts.force}

    import time

    from skr8tr import blocking_client as client

    def body(call_opts: Any) -> int:
        with client.open_conductor(call_opts.conductor, "/v1/cli", call_opts.timeout_s,
                                   ca_file=call_opts.ca_file) as conn:
            status = client.call_on(conn, call_opts, "rollout", args)
            if not opts.watch:
                if opts.json:
                    _print_json(status)
                else:
                    print(output.rollout_status(status))
                return EXIT_OK
            # Follow by polling rollout-status on the open connection: it needs
            # nothing but the commands of DESIGN.md §4 and survives lost events.
            tty = sys.stdout.isatty() and not opts.json
            last = None
            while status["state"] == "rolling":
                line = output.rollout_status(status)
                # On a terminal the line is redrawn in place; in a log, a new line is
                # written only when something other than the elapsed time changed.
                key = line if tty else re.sub(r" · [0-9.]+ s$", "", line)
                if not opts.json and key != last:
                    sys.stdout.write(("\r\x1b[K" + line) if tty else line + "\n")
                    sys.stdout.flush()
                    last = key
                time.sleep(0.2)
                status = client.call_on(conn, call_opts, "rollout-status",
                                        {"app": status["app"]})
        if opts.json:
            _print_json(status)
        else:
            if tty:
                sys.stdout.write("\r\x1b[K")
            print(output.rollout_status(status))
        return EXIT_OK if status["state"] == "complete" else EXIT_REMOTE_ERROR

    return _run_client(opts, body, signed=True)


def cmd_logs(opts: argparse.Namespace) -> int:
    import time

    from skr8tr import blocking_client as client

    args = {"app": opts.app, "replica": opts.replica, "tail": opts.tail}

    def body(call_opts: Any) -> int:
        with client.open_conductor(call_opts.conductor, "/v1/cli", call_opts.timeout_s,
                                   ca_file=call_opts.ca_file) as conn:
            result = client.call_on(conn, call_opts, "logs", args)
            if opts.json and not opts.follow:
                _print_json(result)
                return EXIT_OK
            seen: set[tuple] = set()
            while True:
                for line in result["lines"]:
                    key = (line.get("replica"), line.get("ts"), line.get("stream"),
                           line.get("text"))
                    if key in seen:
                        continue
                    seen.add(key)
                    if opts.json:
                        _print_json(line)  # --follow --json: one JSON line per log line
                        sys.stdout.flush()
                    else:
                        print(output.log_line(line), flush=True)
                if not opts.follow:
                    return EXIT_OK
                time.sleep(1.0)
                result = client.call_on(conn, call_opts, "logs", args)

    return _run_client(opts, body, signed=True)


def cmd_watch(opts: argparse.Namespace) -> int:
    from skr8tr import blocking_client as client

    def body(call_opts: Any) -> int:
        with client.open_watch(call_opts) as stream:
            for msg in stream:
                if opts.json:
                    # one JSON document per line: a stream has no single document
                    _print_json(dataclasses.asdict(msg))
                    sys.stdout.flush()
                elif msg.type == "event":
                    print(output.event_line(msg.seq, msg.ts, msg.event, msg.data), flush=True)
                else:
                    print(f"snapshot #{msg.seq}: {len(msg.state.get('nodes', []))} node(s), "
                          f"{len(msg.state.get('replicas', []))} replica(s)", flush=True)
        return EXIT_OK

    return _run_client(opts, body, signed=False)


VERBS: dict[str, Callable[[argparse.Namespace], int]] = {
    "keygen": cmd_keygen,
    "fmt": cmd_fmt,
    "audit": cmd_audit,
    "conductor": cmd_conductor,
    "node": cmd_node,
    "ingress": cmd_ingress,
    "up": cmd_up,
    "down": lambda o: _simple_call("down", lambda o: {"app": o.app}, _render_down,
                                   signed=True)(o),
    "scale": lambda o: _simple_call(
        "scale", lambda o: {"app": o.app, "replicas": o.replicas}, output.up, signed=True)(o),
    "rollout": cmd_rollout,
    "list": lambda o: _simple_call(
        "list", lambda o: {"app": o.app}, output.replicas, signed=False)(o),
    "nodes": lambda o: _simple_call("nodes", lambda o: {}, output.nodes, signed=False)(o),
    "status": lambda o: _simple_call("status", lambda o: {}, output.status, signed=False)(o),
    "ping": lambda o: _simple_call("ping", lambda o: {}, _render_ping, signed=False)(o),
    "logs": cmd_logs,
    "watch": cmd_watch,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    opts = parser.parse_args(argv)
    try:
        return VERBS[opts.verb](opts)
    except CliError as err:
        return _fail(opts, err)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
