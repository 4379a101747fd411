"""Writing a run's files whole or not at all (``atomic_write``), and ``WriteError``, which says in plain
words why a write failed (a full disk, a quota, permissions) and names the file."""

from __future__ import annotations

import contextlib
import errno
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import IO

# A full disk or quota: said as "no space left on device while writing X" (os.strerror's words).
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
# Torch's own message when a write fails in its C++ writer (the OSError is lost there).
_TORCH_WRITE_FAILED = re.compile(r"unexpected pos|file write failed|PytorchStreamWriter failed writing")


class WriteError(OSError):
    """A file of a run (a checkpoint, a snapshot, the final weights, the MLflow journal) could not be written
    (disk full, quota, permissions); the message names it, ``errno`` is kept."""

    def __str__(self) -> str:  # the message alone, without OSError's "[Errno 28]" before it
        return str(self.strerror)


def atomic_write(path: Path, write: Callable[[IO[bytes]], None], *, what: str = "file", note: str = "") -> None:
    """Writes ``path`` through ``write(file)`` all or nothing: a temporary file, fsync, rename, fsync of the folder.

    On any failure (KeyboardInterrupt included) the temporary file is removed and ``path`` keeps its
    old contents. An OSError anywhere in the failure's chain, or torch's own message for a failed
    write, becomes a ``WriteError`` that names ``what`` and ``path`` (with ``note`` after it)
    and says in plain words when the disk is full: torch otherwise reports a full disk as
    "unexpected pos 64 vs 0".
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        failure = write_error(err, f"{what} {path}", note, tmp.parent) if isinstance(err, Exception) else None
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if failure is not None:
            raise failure from err
        raise
    _fsync_dir(path.parent)


def write_error(err: Exception, what: str, note: str = "", folder: Path | None = None) -> WriteError | None:
    """The error to raise for ``err`` raised while writing ``what`` (into ``folder``); None to raise ``err`` as
    it is."""
    cause: BaseException | None = err
    for _ in range(10):  # bounded: exception chains can loop
        if cause is None or isinstance(cause, OSError):
            break
        cause = cause.__cause__ or cause.__context__
    code = cause.errno if isinstance(cause, OSError) else None
    if code is None and _TORCH_WRITE_FAILED.search(str(err)):
        # torch's C++ writer drops the errno; a full file system is the usual reason (checked before
        # the temporary file is removed, which frees its space).
        code = errno.ENOSPC if folder is not None and _free_bytes(folder) < 2**20 else errno.EIO
    elif code is None:
        return None  # not a write failure (e.g. an object that cannot be pickled)
    tail = f"; {note}" if note else ""
    if code in NO_SPACE:
        return WriteError(code, f"{os.strerror(code).lower()} while writing {what}{tail}")
    reason = (cause.strerror or str(cause)) if isinstance(cause, OSError) else str(err).splitlines()[0]
    return WriteError(code, f"could not write {what}: {reason}{tail}")


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _free_bytes(directory: Path) -> int:
    try:
        stat = os.statvfs(directory)
    except OSError:
        return 2**63
    return stat.f_bavail * stat.f_frsize
