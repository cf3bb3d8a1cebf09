"""The ``skr8tr`` command line: the verbs, their dispatch and their output.

The argument tree (every verb and flag) is :mod:`skr8tr.cli_args`. The CLI
talks to the conductor only over the wire, with the blocking client
(:mod:`skr8tr.blocking_client`): a CLI run makes a request or a few and exits,
so it needs no event loop. Heavy imports happen inside the verbs that need
them (trio only for the daemons: ``conductor``, ``node``, ``ingress``) so that
``skr8tr ping`` and ``skr8tr --help`` start fast.

Exit codes: 0 success; 1 the conductor answered with an error; 2 bad usage or
an invalid manifest (caught before sending); 3 the conductor could not be
reached.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

from skr8tr import output
from skr8tr.cli_args import build_parser
from skr8tr.cli_calls import (
    fail,
    invalid_manifest,
    print_json,
    read_manifest,
    run_client,
    simple_call,
)
from skr8tr.cli_rollout import cmd_restart, cmd_rollout

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
    RECONNECT_BUDGET_S,
)
from skr8tr.wire import ClientError as CliError

# --------------------------------------------------------------------------- output


# --------------------------------------------------------------------------- verbs


def cmd_keygen(opts: argparse.Namespace) -> int:
    from skr8tr import keyfiles
    from skr8tr.core import keys, signatures

    out = os.path.expanduser(opts.out)
    try:
        pub = keyfiles.write_keypair(out, force=opts.force,
                                     algorithm=signatures.algorithm_named(opts.alg))
    except keys.KeyFileError as exc:
        raise CliError("KEY_EXISTS" if "exists" in str(exc) else "KEY_FILE", str(exc),
                       EXIT_USAGE) from None
    except OSError as exc:
        raise CliError("KEY_FILE", f"cannot write keys to {out}: {exc.strerror}",
                       EXIT_USAGE) from None
    sec_path = os.path.join(out, "signing.sec")
    pub_path = os.path.join(out, "signing.pub")
    if opts.json:
        print_json({"public_key": pub, "secret_key_file": sec_path, "public_key_file": pub_path,
                     "fingerprint": signatures.fingerprint(pub), "algorithm": opts.alg})
    else:
        print(pub)
        print(f"# secret key: {sec_path} (mode 0600; keep it private)", file=sys.stderr)
        print(f"# public key: {pub_path} ({opts.alg}); authorize it on the conductor with a "
              "line", file=sys.stderr)
        if len(pub) <= 64:
            print(f"#   admin {pub}", file=sys.stderr)
        else:  # a post-quantum key is ~4,000 characters: let the shell copy it
            print(f"#   admin {opts.alg}:... (the whole of signing.pub), e.g.", file=sys.stderr)
            print(f"#   echo \"admin $(cat {pub_path})\" >> authorized_keys", file=sys.stderr)
    return EXIT_OK


def cmd_fmt(opts: argparse.Namespace) -> int:
    from skr8tr import manifest_files
    from skr8tr.core import manifest

    try:
        source, m = manifest_files.read_manifest(opts.file)
    except manifest.ManifestError as exc:
        raise invalid_manifest(exc) from None
    comments = manifest.read_comments(
        source, format="toml" if opts.file.endswith(".toml") else "skr8tr")
    text = (manifest.format_toml(m, comments) if opts.toml
            else manifest.format_skr8tr(m, comments))
    if opts.json:
        print_json({"format": "toml" if opts.toml else "skr8tr", "text": text})
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
    from skr8tr.bounded_files import FileRefused, open_regular

    try:
        fd = open_regular(opts.file)
    except FileRefused as exc:
        raise CliError("AUDIT", f"{exc}; an audit log is a regular file", EXIT_USAGE) from None
    except OSError as exc:
        raise CliError("AUDIT", f"cannot read {opts.file}: {exc.strerror or exc}",
                       EXIT_USAGE) from None
    # Read a chunk at a time (audit_head.verify_stream): a log of any size is checked
    # in the memory of one chunk.
    with os.fdopen(fd, "rb", buffering=0) as f:
        try:
            recorded = audit_head.read_head_file(opts.file)
        except ValueError as exc:
            raise CliError("AUDIT", f"{exc}", EXIT_REMOTE_ERROR) from None
        try:
            verified = audit_head.verify_stream(f.read, expect_head=expect, recorded=recorded)
        except audit_chain.ChainError as exc:
            raise CliError("AUDIT", f"{opts.file}:{exc.line}: {exc.message}",
                           EXIT_REMOTE_ERROR) from None
        except OSError as exc:
            raise CliError("AUDIT", f"cannot read {opts.file}: {exc.strerror or exc}",
                           EXIT_USAGE) from None
    head = verified.head
    checked = [name for name, used in (("the HEAD file", recorded is not None),
                                       ("--expect-head", expect is not None)) if used]
    if opts.json:
        print_json({"file": opts.file, "ok": True, "entries": head.entries,
                     "head": head.hash, "checked_against": checked})
        return EXIT_OK
    print(f"{opts.file}: intact, {head.entries} entries; head {head.hash}")
    if not checked:
        print(f"# no {audit_head.head_path(opts.file)} and no --expect-head: lines cut off the "
              "end, or a rewritten log, cannot be told apart from an intact one. Keep this "
              "head elsewhere and pass it as --expect-head next time.", file=sys.stderr)
    return EXIT_OK


def cmd_completion(opts: argparse.Namespace) -> int:
    """The shell's completion script, generated from the argument tree by shtab: every
    verb, sub-verb and flag, files where a FILE goes. Costs nothing at start-up: the
    script is static, and shtab is imported only here."""
    import shtab

    sys.stdout.write(shtab.complete(build_parser(), shell=opts.shell))
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


def _render_ping(result: dict) -> str:
    """``pong from conductor (version V, leader)``, ``(version V, follower; leader URL)``;
    a conductor older than roles: ``(version V)``."""
    about = f"version {result.get('version', '?')}"
    role = result.get("role")
    if role == "follower":
        leader = result.get("leader")
        about += f", follower; leader {leader}" if leader else ", follower; no leader known"
    elif role is not None:
        about += f", {role}"
    return f"pong from {result.get('pong', '?')} ({about})"


def _render_down(result: dict) -> str:
    return f"{result['app']}: stopped {result['stopped']} replica(s)"


def cmd_up(opts: argparse.Namespace) -> int:
    text, fmt, base_dir = read_manifest(opts.file)
    return simple_call(
        "up", lambda o: {"manifest": text, "format": fmt, "base_dir": base_dir},
        output.up, signed=True,
    )(opts)


def cmd_describe(opts: argparse.Namespace) -> int:
    return simple_call("describe", lambda o: {"app": o.app}, output.describe,
                        signed=True)(opts)


def cmd_version(opts: argparse.Namespace) -> int:
    """The CLI's version, and the conductor's when it answers ``ping``. Exit 0 when it
    does; when it cannot be reached the client's version is still printed, with the
    error, and the exit code is the error's (3 unreachable)."""
    from skr8tr import __version__, blocking_client, wire

    call_opts = wire.CallOptions(conductor=opts.conductor, timeout_s=opts.timeout,
                                 signing_key=None, ca_file=opts.ca)
    try:
        pong = blocking_client.call(call_opts, "ping", {})
    except CliError as err:
        if opts.json:
            print_json({"client": __version__, "conductor": None,
                         "error": {"code": err.code, "message": err.message}})
        else:
            print(f"client: {__version__}")
        sys.stderr.write(f"error: {err.code}: {err.message}\n")
        return err.exit
    conductor = pong.get("version") if isinstance(pong, dict) else None
    if opts.json:
        print_json({"client": __version__, "conductor": conductor})
    else:
        print(f"client: {__version__}")
        print(f"conductor: {conductor if conductor is not None else '?'}")
    return EXIT_OK


# Replicas whose last line number a follow sends when it resumes (the most recent ones).
FOLLOW_RESUME_REPLICAS = 1000


def cmd_logs(opts: argparse.Namespace) -> int:
    import time

    from skr8tr import blocking_client as client

    args = {"app": opts.app, "replica": opts.replica, "tail": opts.tail}

    def note(text: str) -> None:  # on stderr: stdout keeps the lines only
        sys.stderr.write(f"# {text}\n")
        sys.stderr.flush()

    def body(call_opts: Any) -> int:
        with client.Session(call_opts) as session:
            if not opts.follow:
                result = session.call("logs", args)
                if opts.json:
                    print_json(result)
                else:
                    for line in result["lines"]:
                        print(output.log_line(line))
                return EXIT_OK
            # A stream: the conductor relays every line the nodes read, once, in order
            # per replica. When the connection drops (a failover, a restart) the follow
            # is asked again with the last line number shown per replica, and other
            # replicas' lines from when this follow began: nothing printed twice.
            shown: dict[str, int] = {}
            since = time.time()
            result = session.call("logs", {**args, "follow": True})
            while True:
                for line in result["lines"]:
                    if isinstance(line.get("seq"), int):
                        shown.pop(line["replica"], None)  # the most recent last
                        shown[line["replica"]] = line["seq"]
                        if len(shown) > FOLLOW_RESUME_REPLICAS:
                            del shown[next(iter(shown))]
                    if opts.json:
                        print_json(line)  # --follow --json: one JSON line per log line
                    else:
                        print(output.log_line(line))
                skipped = result.get("skipped") or 0
                if skipped:
                    if opts.json:
                        print_json({"skipped": skipped})
                    else:
                        note(f"{skipped} line(s) skipped: they came faster than they were read")
                sys.stdout.flush()
                try:
                    result = session.next_result()
                except CliError as err:
                    if err.code != "UNREACHABLE":
                        raise
                    note(f"lost the log stream ({err.message}); looking for the leader for "
                         f"up to {RECONNECT_BUDGET_S:g} s")
                    resume = {**args, "tail": 0, "follow": True, "after": shown,
                              "since": since}
                    give_up = time.monotonic() + RECONNECT_BUDGET_S
                    while True:
                        try:
                            result = session.call("logs", resume,
                                                  patient_s=max(1.0, give_up - time.monotonic()))
                            break
                        except CliError as again:
                            # Signed while no conductor ran: a restarted one refuses it
                            # (it may be a replay); a request signed now is not.
                            if again.code != "EXPIRED" or time.monotonic() > give_up:
                                raise
                    note(f"following the logs on {session.conductor}")

    return run_client(opts, body, signed=True)


def cmd_watch(opts: argparse.Namespace) -> int:
    from skr8tr import blocking_client as client

    def note(text: str) -> None:  # on stderr: stdout keeps one document per line
        sys.stderr.write(f"# {text}\n")
        sys.stderr.flush()

    def body(call_opts: Any) -> int:
        # A dropped stream is looked for again (the leader may have failed over); the
        # new leader's stream starts with a snapshot of its own.
        for msg in client.follow_watch(call_opts, note=note):
            if opts.json:
                # one JSON document per line: a stream has no single document
                print_json(dataclasses.asdict(msg))
                sys.stdout.flush()
            elif msg.type == "event":
                print(output.event_line(msg.seq, msg.ts, msg.event, msg.data), flush=True)
            else:
                print(f"snapshot #{msg.seq}: {len(msg.state.get('nodes', []))} node(s), "
                      f"{len(msg.state.get('replicas', []))} replica(s)", flush=True)
        return EXIT_OK

    return run_client(opts, body, signed=False)


VERBS: dict[str, Callable[[argparse.Namespace], int]] = {
    "keygen": cmd_keygen,
    "fmt": cmd_fmt,
    "audit": cmd_audit,
    "conductor": cmd_conductor,
    "node": cmd_node,
    "ingress": cmd_ingress,
    "up": cmd_up,
    "down": lambda o: simple_call("down", lambda o: {"app": o.app}, _render_down,
                                   signed=True)(o),
    "scale": lambda o: simple_call(
        "scale", lambda o: {"app": o.app, "replicas": o.replicas}, output.up, signed=True)(o),
    "rollout": cmd_rollout,
    "restart": cmd_restart,
    "describe": cmd_describe,
    "version": cmd_version,
    "list": lambda o: simple_call(
        "list", lambda o: {"app": o.app}, output.replicas, signed=False)(o),
    "nodes": lambda o: simple_call("nodes", lambda o: {}, output.nodes, signed=False)(o),
    "status": lambda o: simple_call("status", lambda o: {}, output.status, signed=False)(o),
    "ping": lambda o: simple_call("ping", lambda o: {}, _render_ping, signed=False)(o),
    "logs": cmd_logs,
    "watch": cmd_watch,
    "completion": cmd_completion,
}


# What a Unix tool's exit status is when its reader went away (128 + SIGPIPE).
EXIT_CLOSED_PIPE = 141


def main(argv: Sequence[str] | None = None) -> int:
    """Run one verb; its exit status. Output into a pipe whose reader left
    (``skr8tr list | head -1``) ends the CLI quietly with EXIT_CLOSED_PIPE."""
    try:
        try:
            return _main(argv)
        finally:  # (--help's SystemExit too) here, not at exit, where it prints a traceback
            sys.stdout.flush()
    except BrokenPipeError:
        # Python's advice (the signal module's note on SIGPIPE): stdout to devnull, so
        # that the interpreter's own flush at exit fails no more.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_CLOSED_PIPE


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    opts = parser.parse_args(argv)
    if opts.verb in ("conductor", "node", "ingress"):
        from skr8tr import daemon_config

        try:
            opts = daemon_config.apply(parser, sys.argv[1:] if argv is None else argv, opts)
        except daemon_config.ConfigError as exc:
            sys.stderr.write(f"error: CONFIG: {exc}\n")
            return EXIT_USAGE
    try:
        return VERBS[opts.verb](opts)
    except CliError as err:
        return fail(opts, err)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
