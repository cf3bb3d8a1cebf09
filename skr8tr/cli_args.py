"""The ``skr8tr`` command line's argument tree: every verb, its flags, their defaults and help.

Only argparse and :mod:`skr8tr.wire` (stdlib only), so that building the
parser costs ``skr8tr ping`` nothing. The verbs themselves are in
:mod:`skr8tr.cli`. Client flags (``--conductor``, ``--key``, ``--ca``,
``--json``, ``--timeout``) are accepted before or after the verb; a bad flag
or value exits 2 with one ``error: USAGE: ...`` line.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

from skr8tr import DEFAULT_KEY_FILE, __version__
from skr8tr.wire import DEFAULT_CONDUCTOR_URL, DEFAULT_TIMEOUT_S, EXIT_USAGE

__all__ = ["DAEMON_CLIENT_FLAGS", "DEFAULT_KEY_FILE", "build_parser"]


# The client flags a daemon uses (``skr8tr conductor`` none); the others are still
# accepted after a daemon's verb, as before, but left out of its --help.
DAEMON_CLIENT_FLAGS = {"conductor": (), "node": ("conductor", "key", "ca"),
                       "ingress": ("conductor", "ca", "key")}
# A daemon whose --key means something else than the client's: its own help. The
# ingress's key is optional and has no default (skr8tr.daemon_config.NO_DEFAULT).
_KEY_HELP = {"ingress": "signing key of role `ingress` (authorized as `ingress KEY` on the "
             "conductor): report the traffic of every replica to the conductor, for rollouts "
             "judged by it; without it nothing is reported (no default)"}


def _add_client_flags(parser: argparse.ArgumentParser, *, top: bool,
                      shown: tuple[str, ...] | None = None,
                      key_help: str | None = None) -> None:
    """The client flags, accepted before or after the verb.

    On the top-level parser they carry the defaults; on each verb's parser they
    default to SUPPRESS so that a flag given before the verb is not overwritten.
    *shown*: the flags listed in the verb's --help (default all of them).
    """
    dflt: Callable[[Any], Any] = (lambda v: v) if top else (lambda v: argparse.SUPPRESS)

    def help_(name: str, text: str) -> str:
        return text if shown is None or name in shown else argparse.SUPPRESS

    title = ("client options (before or after the verb)" if shown is None
             else "conductor options")
    group = parser.add_argument_group(title)
    group.add_argument(
        "--conductor", metavar="URL[,URL...]",
        default=dflt(os.environ.get("SKR8TR_CONDUCTOR") or DEFAULT_CONDUCTOR_URL),
        help=help_("conductor", "conductor WebSocket URL, or several conductors on etcd "
                   "comma-separated: tried in order, following a follower to the leader "
                   f"(env SKR8TR_CONDUCTOR; default {DEFAULT_CONDUCTOR_URL})"),
    )
    group.add_argument(
        "--key", metavar="FILE",
        default=dflt(os.environ.get("SKR8TR_KEY") or DEFAULT_KEY_FILE),
        help=help_("key", key_help
                   or f"secret signing key (env SKR8TR_KEY; default {DEFAULT_KEY_FILE})"),
    )
    group.add_argument(
        "--ca", metavar="FILE", default=dflt(os.environ.get("SKR8TR_CA") or None),
        help=help_("ca", "for a wss:// conductor: the CA certificate (PEM) to verify it "
                   "with, instead of the system's trust store (env SKR8TR_CA)"),
    )
    group.add_argument("--json", action="store_true", default=dflt(False),
                       help=help_("json", "print exactly one JSON document on stdout"))
    group.add_argument("--timeout", metavar="S", type=_positive_float,
                       default=dflt(DEFAULT_TIMEOUT_S),
                       help=help_("timeout", "seconds to wait for the conductor: to find the "
                                  f"leader, and for each reply (default {DEFAULT_TIMEOUT_S:g})"))


def _daemon_epilog(verb: str) -> str:
    env = f"SKR8TR_{verb.upper()}_"
    return (f"Every flag can also be set in a --config FILE (TOML; the key is the flag's "
            f"name without --, e.g. log-level = \"debug\"; a repeatable flag takes an "
            f"array) or in the environment as {env}FLAG (upper case, - as _, e.g. "
            f"{env}LOG_LEVEL=debug; a repeatable flag takes a comma-separated list; "
            f"true/false, 1/0, yes/no for a switch). The command line wins over the "
            f"environment, which wins over the file.")


def _add_config_flag(parser: argparse.ArgumentParser, verb: str) -> None:
    parser.add_argument("--config", metavar="FILE",
                        help=f"read flags from this TOML file (env SKR8TR_{verb.upper()}"
                        "_CONFIG); see below")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def _ingress_name(text: str) -> str:
    # The pattern of skr8tr.ingress.reporter.NAME_RE, not imported (test_cli_startup.py).
    if not 1 <= len(text) <= 64 or not all(c.isascii() and (c.isalnum() or c in "._-")
                                           for c in text):
        raise argparse.ArgumentTypeError(f"expected 1..64 of A-Z a-z 0-9 . _ -, got {text!r}")
    return text


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


def _int_in(low: int, high: int | None, what: str) -> Callable[[str], int]:
    """An argparse type: an integer in low..high (no upper bound when None); the error
    says the range and *what* the number is."""
    shown = f"{low}..{high}" if high is not None else f"a number >= {low}"

    def check(text: str) -> int:
        value = _non_negative_int(text)
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {shown} ({what}), got {text!r}")
        return value

    check.__name__ = "_ranged_int"  # daemon_config takes a *_int type for a TOML integer
    return check


# The bounds of skr8tr/core/revisions.py (MIN_/MAX_KEEP_REVISIONS) and conductor/limits.py
# (MIN_NODE_BYTES_PER_S), not imported here: the parser must not pull the core or the
# conductor in (test_cli_startup.py).
_keep_revisions_int = _int_in(2, 1000, "manifests kept per app besides the current one")
_keep_logs_int = _int_in(1, 1000, "finished replicas whose log files are kept per app")
_node_bytes_int = _int_in(1024 * 1024, None, "the largest node message, a second")


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
        _add_client_flags(p, top=False, shown=DAEMON_CLIENT_FLAGS.get(name),
                          key_help=_KEY_HELP.get(name))
        if name in DAEMON_CLIENT_FLAGS:
            p.epilog = _daemon_epilog(name)
            _add_config_flag(p, name)
        return p

    parser.verb_parsers = verbs.choices  # type: ignore[attr-defined] (skr8tr.daemon_config)

    p = verb("keygen", "create a signing key pair (Ed25519, ML-DSA-65 or both)")
    # The names are spelled out here: importing skr8tr.core.signatures for them
    # would not cost much, but every verb pays for what this module imports.
    p.add_argument("--alg", choices=("ed25519", "ml-dsa-65", "ed25519+ml-dsa-65"),
                   default="ed25519",
                   help="signature algorithm (default ed25519; ed25519+ml-dsa-65 is a hybrid "
                        "whose signatures need both to verify, post-quantum)")
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
    p.add_argument("--require-pq", action="store_true",
                   help="accept only post-quantum keys (ml-dsa-65, ed25519+ml-dsa-65) for "
                        "commands and node joins; Ed25519 keys listed are ignored, and named "
                        "at start")
    p.add_argument("--adopt-grace", metavar="S", type=_positive_float, default=None,
                   help="after a restart, seconds to wait for nodes to report running "
                   "replicas before placing new ones (default: 2 x the node heartbeat)")
    p.add_argument("--keep-revisions", metavar="N", type=_keep_revisions_int, default=10,
                   help="manifests kept per app besides the current one; older revisions "
                   "are pruned when a rollout starts, except those a running rollout or a "
                   "plain undo needs (2..1000, default 10)")
    ha = p.add_argument_group("several conductors on etcd (README: High availability)")
    ha.add_argument("--store", metavar="etcd://H:P[,H:P...]",
                    help="keep the desired state in etcd and elect one leader among the "
                    "conductors that share it (excludes --state)")
    ha.add_argument("--store-prefix", metavar="PREFIX", default="/skr8tr",
                    help="the etcd key prefix of this cluster (default /skr8tr)")
    ha.add_argument("--advertise-url", metavar="URL",
                    help="the URL clients and nodes reach this conductor at (default "
                    "ws:// or wss:// + --listen)")
    ha.add_argument("--lease-ttl", metavar="S", type=_positive_float, default=5.0,
                    help="the leader's etcd lease: a dead leader is replaced within about "
                    "this (default 5, at least 2)")
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
    sec.add_argument("--max-node-bytes-per-s", metavar="N", type=_node_bytes_int,
                     help="bytes of /v1/node messages per second from one node session "
                     "(twice that at once); beyond it the conductor pauses reading that "
                     "node instead of closing it (default 8388608, at least 1048576)")
    sec.add_argument("--max-watchers-per-address", metavar="N", type=_positive_int,
                     help="/v1/watch streams open from one client address; more are "
                     "answered 429 (default 64)")
    sec.add_argument("--max-ingresses", metavar="N", type=_positive_int,
                     help="ingress sessions reporting traffic (/v1/ingress) at once; more "
                     "are refused (default 16)")
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
    p.add_argument("--keep-logs", metavar="N", type=_keep_logs_int, default=10,
                   help="finished replicas per app whose log files are kept (1..1000, "
                   "default 10); `down` removes all of an app's files")
    p.add_argument("--log-level", default="info",
                   choices=["debug", "info", "warning", "error"])

    p = verb("ingress", "run the HTTP ingress in front of apps")
    # Required, here or in --config / the environment: skr8tr.daemon_config checks.
    p.add_argument("--listen", metavar="H:P", help="address to serve HTTP on (required)")
    p.add_argument("--route", metavar="/PREFIX:APP", action="append",
                   help="route a path prefix to an app (repeatable; at least one)")
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
    p.add_argument("--name", metavar="NAME", type=_ingress_name,
                   help="this ingress's name in the conductor's status and logs, with --key "
                   "(1..64 of A-Z a-z 0-9 . _ -; default the host name)")
    # Keeps draining replicas in rotation: only to demonstrate what draining prevents.
    p.add_argument("--ignore-drain", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--log-level", default="info",
                   choices=["debug", "info", "warning", "error"])

    p = verb("up", "submit a manifest: deploy a new app")
    p.add_argument("file", metavar="FILE")

    p = verb("down", "stop every replica of an app and forget it")
    p.add_argument("app", metavar="APP")

    p = verb(
        "rollout", "rolling update, or its status / abort / undo / history / promote / "
        "pause / resume",
        usage="skr8tr rollout FILE [--watch] [--force]\n"
        "       skr8tr rollout status APP [--watch] | abort APP\n"
        "       skr8tr rollout promote APP | pause APP | resume APP\n"
        "       skr8tr rollout undo APP [--to GEN] [--watch] [--force]\n"
        "       skr8tr rollout history APP [--generation N]",
        epilog="With --watch the exit code is 0 only when the rollout ends complete, "
        "1 otherwise. promote passes the batch whose traffic is being judged now (the "
        "manifest's rollout analysis block); pause holds the rollout before its next "
        "batch, resume lets it go on.",
    )
    p.add_argument("target", nargs="+", metavar="FILE | SUBVERB APP",
                   help="a manifest file, or one of: status, abort, undo, history, "
                   "promote, pause, resume followed by the app")
    p.add_argument("--watch", action="store_true",
                   help="follow the rollout until it ends (with FILE, status or undo)")
    p.add_argument("--force", action="store_true",
                   help="abort a running rollout first; with undo --to, also return to a "
                   "generation whose rollout was aborted, failed or rolled back")
    p.add_argument("--to", metavar="GEN", type=_positive_int,
                   help="with undo: the generation to return to")
    p.add_argument("--generation", metavar="N", type=_positive_int,
                   help="with history: that revision's state, times and manifest text "
                   "(signed: the manifest may hold secrets)")

    p = verb("restart", "rolling restart: replace every replica of an app with a new one "
             "of the same manifest, gated like a rollout (takes a new generation)")
    p.add_argument("app", metavar="APP")
    p.add_argument("--watch", action="store_true",
                   help="follow the restart until it ends (exit 0 only when complete)")
    p.add_argument("--force", action="store_true", help="abort a running rollout first")

    p = verb("describe", "an app in full: manifest, generation, replicas, last rollout, "
             "recent events (signed: the manifest may hold secrets)")
    p.add_argument("app", metavar="APP")

    p = verb("scale", "change an app's replica count")
    p.add_argument("app", metavar="APP")
    p.add_argument("replicas", metavar="N", type=_non_negative_int)

    p = verb("list", "list replicas")
    p.add_argument("app", metavar="APP", nargs="?")
    verb("nodes", "list node agents")
    verb("status", "nodes, apps, replicas and rollouts at once")
    verb("ping", "check that the conductor answers")
    verb("version", "the CLI's version and the conductor's (exit 3, after printing the "
         "CLI's, when the conductor cannot be reached)")

    p = verb("logs", "show a replica's or an app's logs")
    p.add_argument("app", metavar="APP")
    p.add_argument("--replica", metavar="ID")
    p.add_argument("--tail", metavar="N", type=_non_negative_int, default=100,
                   help="the last N lines (default 100); 0: none, with --follow only new ones")
    p.add_argument("--follow", "-f", action="store_true",
                   help="keep printing new lines as the replicas write them, replicas that "
                   "start meanwhile included, until Ctrl-C")

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

    p = verb("completion", "print a shell completion script: "
             "source <(skr8tr completion bash), or see README for zsh")
    p.add_argument("shell", choices=["bash", "zsh"], help="the shell to complete in")
    _mark_completions(parser)
    return parser


# Shell completion (`skr8tr completion`, generated from this tree by shtab): what
# each argument completes to, as shtab's ``.complete`` dicts, so that this module
# does not import shtab. Files for FILE/F, folders for DIR/D; rollout's first
# word is a sub-verb or a manifest file.
_FILE = {"bash": "_shtab_compgen_files", "zsh": "_files"}
_DIR = {"bash": "_shtab_compgen_dirs", "zsh": "_files -/"}
_ROLLOUT_TARGET = {
    "bash": "_skr8tr_rollout_target",
    "zsh": "_skr8tr_rollout_target",
    "preamble": {
        "bash": "_skr8tr_rollout_target() {\n"
                "  compgen -W 'status abort undo history promote pause resume' -- \"$1\"\n"
                "  compgen -f -- \"$1\"\n}\n",
        "zsh": "_skr8tr_rollout_target() {\n"
               "  _alternative 'subverbs:sub-verb:(status abort undo history promote pause "
               "resume)' "
               "'files:manifest:_files'\n}\n",
    },
}


def _mark_completions(parser: argparse.ArgumentParser) -> None:
    for sub in parser.verb_parsers.values():  # type: ignore[attr-defined]
        for action in sub._actions:
            if action.choices is not None:
                continue
            if action.metavar in ("FILE", "F"):
                action.complete = _FILE  # type: ignore[attr-defined]
            elif action.metavar in ("DIR", "D"):
                action.complete = _DIR  # type: ignore[attr-defined]
    rollout = parser.verb_parsers["rollout"]  # type: ignore[attr-defined]
    for action in rollout._actions:
        if action.dest == "target":
            action.complete = _ROLLOUT_TARGET  # type: ignore[attr-defined]


