"""The rollout verbs of the ``skr8tr`` CLI: ``rollout FILE``, ``rollout status | abort |
undo | history | promote | pause | resume APP`` and ``restart APP``, and ``--watch``,
which follows a rollout until it ends."""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Any

from skr8tr import output
from skr8tr.cli_calls import print_json, read_manifest, run_client, simple_call
from skr8tr.wire import EXIT_OK, EXIT_REMOTE_ERROR, EXIT_USAGE, RECONNECT_BUDGET_S
from skr8tr.wire import ClientError as CliError

ROLLOUT_SUBVERBS = ("status", "abort", "undo", "history", "promote", "pause", "resume")


def cmd_rollout(opts: argparse.Namespace) -> int:
    target = opts.target
    if target[0] in ROLLOUT_SUBVERBS and not os.path.isfile(target[0]):
        sub = target[0]
        if len(target) != 2:
            raise CliError("USAGE", f"usage: skr8tr rollout {sub} APP", EXIT_USAGE)
        if opts.watch and sub not in ("status", "undo"):
            raise CliError("USAGE", f"--watch goes with `rollout FILE`, `rollout status APP` "
                           f"or `rollout undo APP`, not `rollout {sub}`", EXIT_USAGE)
        if opts.force and sub != "undo":
            raise CliError("USAGE", f"--force goes with `rollout FILE` or `rollout undo APP`, "
                           f"not `rollout {sub}`", EXIT_USAGE)
        if opts.to is not None and sub != "undo":
            raise CliError("USAGE", "--to goes with `rollout undo APP`", EXIT_USAGE)
        if opts.generation is not None and sub != "history":
            raise CliError("USAGE", "--generation goes with `rollout history APP`", EXIT_USAGE)
        app = target[1]
        if sub == "status":
            return rollout_call("rollout-status", {"app": app}, opts, signed=False)
        if sub in ("abort", "promote", "pause", "resume"):
            return simple_call(f"rollout-{sub}", lambda o: {"app": app},
                                output.rollout_status, signed=True)(opts)
        if sub == "undo":
            args = {"app": app, "to": opts.to}
            if opts.force:  # only when asked: a conductor older than --force still answers
                args["force"] = True
            return rollout_call("rollout-undo", args, opts, signed=True)
        if opts.generation is not None:
            return simple_call("revision", lambda o: {"app": app, "generation": o.generation},
                                output.revision, signed=True)(opts)
        return simple_call("history", lambda o: {"app": app}, output.history,
                            signed=False)(opts)
    if len(target) != 1:
        raise CliError("USAGE", "usage: skr8tr rollout FILE [--watch] [--force]", EXIT_USAGE)
    if opts.to is not None:
        raise CliError("USAGE", "--to goes with `rollout undo APP`", EXIT_USAGE)
    if opts.generation is not None:
        raise CliError("USAGE", "--generation goes with `rollout history APP`", EXIT_USAGE)
    text, fmt, base_dir = read_manifest(target[0])
    args = {"manifest": text, "format": fmt, "base_dir": base_dir, "force": opts.force}
    return rollout_call("rollout", args, opts, signed=True)


def cmd_restart(opts: argparse.Namespace) -> int:
    args: dict[str, Any] = {"app": opts.app}
    if opts.force:
        args["force"] = True
    return rollout_call("restart", args, opts, signed=True)


def rollout_call(cmd: str, args: dict, opts: argparse.Namespace, *, signed: bool) -> int:
    """A command whose result is a rollout status; with ``--watch``, the rollout followed
    until it ends: exit 0 only when it ends ``complete`` (1 otherwise)."""
    from skr8tr import blocking_client as client

    def body(call_opts: Any) -> int:
        with client.Session(call_opts) as session:
            status = session.call(cmd, args)
            if not opts.watch:
                if opts.json:
                    print_json(status)
                else:
                    print(output.rollout_status(status))
                return EXIT_OK
            return follow_rollout(session, status, opts)

    return run_client(opts, body, signed=signed)


def follow_rollout(session: Any, status: dict, opts: argparse.Namespace) -> int:
    """Print a rollout's progress until it ends; 0 only for ``complete``."""
    import time

    # Follow by polling rollout-status on the open connection: it needs no
    # command beyond the fixed set every conductor answers, and survives lost
    # events. A poll outlives a failover: it looks for the new leader for up to
    # RECONNECT_BUDGET_S, which then reports how the rollout ended (§7).
    tty = sys.stdout.isatty() and not opts.json
    last = None
    while status["state"] == "rolling":
        line = output.rollout_status(status)
        # On a terminal the line is redrawn in place; in a log, a new line is
        # written only when something other than the elapsed time changed.
        # (The live traffic figures of an analysis count as elapsed time here.)
        key = line if tty else re.sub(r" · [0-9.]+ s$", "", output.rollout_status(
            {**status, "analysis": None}))
        if not opts.json and key != last:
            sys.stdout.write(("\r\x1b[K" + line) if tty else line + "\n")
            sys.stdout.flush()
            last = key
        time.sleep(0.2)
        status = session.call("rollout-status", {"app": status["app"]},
                              patient_s=RECONNECT_BUDGET_S)
    if opts.json:
        print_json(status)
    else:
        if tty:
            sys.stdout.write("\r\x1b[K")
        print(output.rollout_status(status))
    return EXIT_OK if status["state"] == "complete" else EXIT_REMOTE_ERROR
