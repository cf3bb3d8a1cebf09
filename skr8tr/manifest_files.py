"""Manifest files: read one from disk and parse it, its folder as the base of relative paths.

The parser is pure (:func:`skr8tr.core.manifest.parse_manifest` takes text
and a folder); this is the file reading around it, for ``skr8tr up``,
``rollout`` and ``fmt``, and for tests and tools.
"""

from __future__ import annotations

import os

from skr8tr.core.manifest import Manifest, ManifestError, parse_manifest

__all__ = ["MAX_MANIFEST_BYTES", "load_manifest", "read_manifest"]

# The conductor takes requests of at most 1 MiB (core.protocol.MAX_MESSAGE_BYTES): a larger
# manifest could never be sent. Reading stops there, so `fmt /dev/zero` (or a pipe that
# never ends) costs a bounded read, not all the memory there is.
MAX_MANIFEST_BYTES = 1024 * 1024


def read_manifest(path: str | os.PathLike[str]) -> tuple[str, Manifest]:
    """The text of the manifest file at *path* and the manifest it holds.

    A relative ``exec`` or ``workdir`` is resolved against the file's folder;
    a ``.toml`` file is read as TOML. The text is what was validated, byte for
    byte (the file is read once). Raises ManifestError, also when the file
    cannot be read (at 1:1, saying why).
    """
    filename = os.fspath(path)
    try:
        with open(filename, "rb") as file:
            source = file.read(MAX_MANIFEST_BYTES + 1)
    except OSError as exc:
        raise ManifestError(
            f"cannot read manifest: {exc.strerror or exc}",
            filename=filename,
            line=1,
            column=1,
            text="",
            expected="a readable manifest file",
        ) from None
    if len(source) > MAX_MANIFEST_BYTES:
        raise ManifestError(
            f"manifest over {MAX_MANIFEST_BYTES} bytes",
            filename=filename,
            line=1,
            column=1,
            text="",
            expected=f"a manifest of at most {MAX_MANIFEST_BYTES} bytes (what the conductor "
            "takes in one request)",
        )
    base_dir = os.path.dirname(os.path.abspath(filename))
    parsed = parse_manifest(source, filename=filename, base_dir=base_dir)
    return source.decode("utf-8"), parsed  # parse_manifest refuses anything but UTF-8


def load_manifest(path: str | os.PathLike[str]) -> Manifest:
    """The manifest in the file at *path*; see :func:`read_manifest`. Raises ManifestError."""
    return read_manifest(path)[1]
