"""How a verb of the ``skr8tr`` CLI calls the conductor and prints what it got.

Shared by :mod:`skr8tr.cli` and :mod:`skr8tr.cli_rollout`: the signing key a verb needs,
one call with its output (``--json`` or a table), the error line and exit code of a
failure, and a manifest file read and checked before anything is sent. Stdlib only at
import time, like the CLI.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable
from typing import Any

from skr8tr.wire import EXIT_OK, EXIT_USAGE
from skr8tr.wire import ClientError as CliError

# Characters JSON may carry as they are but a terminal acts on (C1 controls: U+009B is a
# CSI) or shows out of order (bidirectional overrides): written as \u escapes instead,
# the same document. (json.dumps escapes C0 controls itself.)
_JSON_UNSAFE = re.compile("[\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def print_json(doc: Any) -> None:
    text = json.dumps(doc, ensure_ascii=False)
    text = _JSON_UNSAFE.sub(lambda m: f"\\u{ord(m[0]):04x}", text)
    sys.stdout.write(text + "\n")


def fail(opts: argparse.Namespace, err: CliError) -> int:
    # An invalid manifest has every error it holds, one line each, in line order.
    errors = getattr(err, "errors", None) or [err.message]
    for message in errors:
        sys.stderr.write(f"error: {err.code}: {message}\n")
    if getattr(opts, "json", False):
        doc = {"code": err.code, "message": err.message}
        if len(errors) > 1:
            doc["errors"] = errors
        print_json({"error": doc})
    return err.exit


def invalid_manifest(exc: Any) -> CliError:
    """A ManifestError as the CLI reports it: exit 2; ``message`` the first error, ``errors``
    every one (``FILE:LINE:COL: message`` each)."""
    err = CliError("INVALID_MANIFEST", str(exc), EXIT_USAGE)
    err.errors = exc.lines()  # type: ignore[attr-defined]
    return err


def read_manifest(path: str) -> tuple[str, str, str]:
    """(text, format, base_dir) of a manifest file, validated locally first (exit 2)."""
    from skr8tr import manifest_files
    from skr8tr.core import manifest

    try:
        text, parsed = manifest_files.read_manifest(path)
    except manifest.ManifestError as exc:
        raise invalid_manifest(exc) from None
    fmt = "toml" if path.endswith(".toml") else "skr8tr"
    return text, fmt, parsed.base_dir


def signing_key(opts: argparse.Namespace, *, required: bool) -> Any | None:
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
        # Said once: a missing file's message already says how to make one.
        hint = " (or set SKR8TR_KEY)" if "skr8tr keygen" in str(exc) else (
            ". Create a key with `skr8tr keygen`, or pass --key FILE / set SKR8TR_KEY")
        raise CliError("NO_KEY", f"`skr8tr {opts.verb}` must be signed: {exc}{hint}",
                       EXIT_USAGE) from None


def run_client(opts: argparse.Namespace, body: Callable[[Any], int], *, signed: bool) -> int:
    """Run ``body(call_options)``, mapping client failures to exit codes."""
    from skr8tr import wire

    call_opts = wire.CallOptions(
        conductor=opts.conductor,
        timeout_s=opts.timeout,
        signing_key=signing_key(opts, required=signed),
        ca_file=opts.ca,
    )
    return body(call_opts)  # a wire.ClientError is a CliError: main() prints it


def simple_call(cmd: str, args_of: Callable[[argparse.Namespace], dict],
                 render: Callable[[Any], str], *, signed: bool):
    def run(opts: argparse.Namespace) -> int:
        from skr8tr import blocking_client

        def body(call_opts: Any) -> int:
            result = blocking_client.call(call_opts, cmd, args_of(opts))
            if opts.json:
                print_json(result)
            else:
                print(render(result))
            return EXIT_OK

        return run_client(opts, body, signed=signed)

    return run
