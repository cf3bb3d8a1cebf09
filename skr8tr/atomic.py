"""Replacing a file so that a crash leaves the old content or the new, never a torn file.

One helper for every file skr8tr rewrites in place: the conductor's state file
and replay guard, the audit log's head file, a key pair replaced with
``keygen --force``, a node's replica records.

The steps: write a temporary file in the same folder (same file system, so the
rename is atomic), fsync it, rename it over the target, then fsync the folder
so that the rename itself survives a power cut. The temporary file is named
``.NAME.RANDOM.tmp``: readers of a folder skip names that start with a dot,
and a node removes such leftovers on start.
"""

from __future__ import annotations

import contextlib
import os
import tempfile

__all__ = ["write_atomically", "fsync_folder"]


def write_atomically(path: str | os.PathLike[str], data: bytes | str, mode: int = 0o600, *,
                     sync_folder: bool = True) -> None:
    """Replace *path* by *data* (a str is written as UTF-8), with permissions exactly *mode*.

    The umask does not apply: the file ends up with *mode*, and the temporary
    file is never more open than 0600 on the way. With *sync_folder* False the
    caller fsyncs the folder itself (:func:`fsync_folder`), once for a batch
    of files.

    Raises OSError when any step fails; the previous file at *path* (if any)
    is then unchanged and the temporary file is removed. The same holds when
    the write is interrupted by KeyboardInterrupt or another BaseException.
    Synchronous: the caller decides whether it runs on an event loop or in a
    worker thread.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    content = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                               dir=folder)
    try:
        try:
            # mkstemp made it 0600 less the umask: change it only when that is not
            # *mode* (an inode change on every write adds to the journal's work).
            if os.fstat(fd).st_mode & 0o777 != mode:
                os.fchmod(fd, mode)
            view = memoryview(content)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):  # it may already be gone
            os.unlink(tmp)
        raise
    if sync_folder:
        fsync_folder(folder)


def fsync_folder(path: str | os.PathLike[str]) -> None:
    """fsync the folder *path*, so that the renames and removals in it are on disk.

    Raises OSError.
    """
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
