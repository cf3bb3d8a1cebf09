"""Reading a file that an operator names (a flag, a config file, an environment
variable), bounded: at most a given number of bytes, and only a regular file.

``--authorized-keys /dev/zero`` would otherwise read until memory runs out, a
FIFO would wait for a writer forever (before the daemon says anything), and a
folder fails with a less clear error. One helper for every such file: daemon
config files, authorized keys, ``signing.sec``, the state file.

The bound of each caller is one a real file never comes near; its message
says it is not such a file.
"""

from __future__ import annotations

import os
import stat

__all__ = ["FileRefused", "kind_of", "open_regular", "read_regular"]


class FileRefused(Exception):
    """The file is not a regular file, or is larger than its bound; the message says
    which (``PATH: a FIFO`` / ``PATH: over N bytes``) and the caller adds what it wants.
    ``reason`` is that message without the path; ``too_big`` tells the two apart."""

    def __init__(self, path: str | os.PathLike[str], reason: str, *, too_big: bool = False):
        self.path = os.fspath(path)
        self.reason = reason
        self.too_big = too_big
        super().__init__(f"{self.path}: {reason}")


def kind_of(mode: int) -> str:
    """What a non-regular file is, in words: "a folder", "a FIFO", "a device", ..."""
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def open_regular(path: str | os.PathLike[str], flags: int = os.O_RDONLY,
                 mode: int = 0o600) -> int:
    """A descriptor of the regular file at *path*, opened with *flags* (and *mode*, should
    they hold O_CREAT).

    O_NONBLOCK for the open, so that a FIFO is refused at once rather than waited on;
    the check is on the open descriptor (``fstat``), so the file checked is the file
    read. Raises OSError when it cannot be opened, FileRefused when it is not a
    regular file (``PATH: a FIFO``).
    """
    fd = os.open(path, flags | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    try:
        st_mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(st_mode):
            raise FileRefused(path, kind_of(st_mode))
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular(path: str | os.PathLike[str], max_bytes: int) -> bytes:
    """The content of the regular file at *path*, of at most *max_bytes* bytes.

    Raises OSError when it cannot be opened or read, FileRefused when it is not a
    regular file or is larger than *max_bytes* (``PATH: over N bytes``); never
    reads more than *max_bytes* + 1 bytes.
    """
    fd = open_regular(path)
    try:
        chunks: list[bytes] = []
        size = 0
        while size <= max_bytes:
            chunk = os.read(fd, min(1 << 20, max_bytes + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    if size > max_bytes:
        raise FileRefused(path, f"over {max_bytes} bytes", too_big=True)
    return b"".join(chunks)
