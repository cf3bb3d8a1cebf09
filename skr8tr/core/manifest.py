"""Manifests: the ``.skr8tr`` language and its TOML twin, read into a frozen `Manifest`.

The public face of the manifest code; import every manifest name from here.
Both formats are first read into the same small tree of entries (key, value,
line, columns, children); one validator that knows the schema then turns that
tree into a `Manifest`, so every rule, default and error message exists once,
whatever the format. The formatters go the other way through one sparse dict,
so ``.skr8tr`` and TOML output agree too. The pieces, one file each:

- :mod:`skr8tr.core.manifest_model`: `Manifest`, `HealthCheck`, `RolloutPolicy` and its
  `Analysis`, `ManifestError` and the limits (``MAX_REPLICAS``...);
- :mod:`skr8tr.core.manifest_tree`: the tree and errors that know their position;
- :mod:`skr8tr.core.manifest_syntax`: the ``.skr8tr`` lines, indentation and quoting;
- :mod:`skr8tr.core.manifest_toml`: TOML, with the position of every key;
- :mod:`skr8tr.core.manifest_schema`: the validator, tree to `Manifest`;
- :mod:`skr8tr.core.manifest_format`: `Manifest` back to text;
- :mod:`skr8tr.core.shell_words` and :mod:`skr8tr.core.percent`: ``args`` words and
  ``max-error-rate`` percentages.

Pure code: no trio, no clock, no processes, no files (:mod:`skr8tr.manifest_files`
reads them).
"""

from __future__ import annotations

import os
from typing import Any

from skr8tr.core.manifest_comments import Comments
from skr8tr.core.manifest_comments import read_comments as _read_comments
from skr8tr.core.manifest_format import format_skr8tr, format_toml, manifest_to_dict
from skr8tr.core.manifest_model import (
    FORMATS,
    MAX_CPU,
    MAX_ERRORS,
    MAX_LINE_CHARS,
    MAX_RAM_BYTES,
    MAX_REPLICAS,
    MAX_RETRIES,
    MAX_SURGE,
    MAX_VALUE_CHARS,
    ORDERS,
    PLACEHOLDERS,
    RAM_UNITS,
    RESTARTS,
    TYPES,
    Analysis,
    HealthCheck,
    Manifest,
    ManifestError,
    RolloutPolicy,
)
from skr8tr.core.manifest_schema import build
from skr8tr.core.manifest_syntax import read_skr8tr
from skr8tr.core.manifest_toml import read_toml
from skr8tr.core.manifest_tree import Problem, Problems, decode_source
from skr8tr.core.shell_words import shell_words

__all__ = [
    "FORMATS", "TYPES", "RESTARTS", "ORDERS", "PLACEHOLDERS", "MAX_REPLICAS", "MAX_SURGE",
    "MAX_RETRIES", "MAX_CPU", "RAM_UNITS", "MAX_RAM_BYTES", "MAX_LINE_CHARS", "MAX_VALUE_CHARS",
    "ManifestError", "HealthCheck", "Analysis", "RolloutPolicy", "Manifest", "parse_manifest",
    "format_skr8tr", "format_toml", "manifest_to_dict", "shell_words", "Comments",
    "read_comments",
]


def read_comments(source: str | bytes, *, format: str) -> Comments:
    """The comments of a manifest that parses (``parse_manifest`` first), by the key each
    belongs to, for ``format_skr8tr(m, comments)`` / ``format_toml(m, comments)``."""
    return _read_comments(decode_source(source), format)


def parse_manifest(
    source: str | bytes, *, filename: str, base_dir: str, format: str | None = None
) -> Manifest:
    """Parse a manifest written in ``format`` ("skr8tr" or "toml"; None: ``.toml`` files are TOML).

    Raises ManifestError, and nothing else, for any text or bytes that is not a valid manifest.
    Raises ValueError (a bug in the caller, not in the manifest) if `base_dir` is not absolute or
    `format` unknown.
    """
    if not os.path.isabs(base_dir):
        raise ValueError(f"base_dir must be an absolute path, got {base_dir!r}")
    if format is None:
        format = "toml" if filename.endswith(".toml") else "skr8tr"
    if format not in FORMATS:
        raise ValueError(f"unknown manifest format {format!r}: expected one of {FORMATS}")
    try:
        text = decode_source(source)
        app = read_toml(text) if format == "toml" else read_skr8tr(text)
        return build(app, base_dir)
    except Problems as found:
        raise _error(found.problems, filename, stopped=found.stopped) from None
    except Problem as problem:
        raise _error([problem], filename) from None


def _error(problems: list[Problem], filename: str, *, stopped: bool = False) -> ManifestError:
    """One ManifestError for *problems* (in line order): the first, holding them all."""

    def one(problem: Problem, **more: Any) -> ManifestError:
        return ManifestError(problem.message, filename=filename, line=problem.line,
                             column=problem.column, text=problem.text,
                             expected=problem.expected, **more)

    shown = problems[:MAX_ERRORS]
    return one(shown[0], others=tuple(one(p) for p in shown[1:]),
               stopped=stopped or len(problems) > MAX_ERRORS)
