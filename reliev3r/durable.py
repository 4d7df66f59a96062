"""Durable writes, shared by the snapshots, the output swap, the streamer's progress file, the
evaluator's results and pictures, the report page, the studies' datasets, curves and tables,
the synthetic world's videos and ground truth, the embedded teacher's weights and meta (and the
7-Scenes score recorded in it), the CURVE key files and the replay's damaged database moved aside.

:func:`fsync` flushes a file or a folder to disk by its path (a folder: the names made, renamed
or removed in it, so a rename survives a power loss once its folder is fsynced).
:func:`write` writes a file atomically and durably: the text or bytes into a temporary file,
fsynced, renamed over the file, then the file's folder fsynced, so a reader sees the earlier file
or the new one whole, never a part, and once it returns the new one survives a power loss
(without the folder's fsync the earlier file may stand again after one). It makes the file with
a given mode where asked (a secret key's 0600, from its first byte on), and leaves the folder's
fsync to a caller that writes several files into one folder and fsyncs it once after the last.
A write that fails (a full disk: ENOSPC, an I/O error: EIO, a rename refused) raises its
``OSError`` with the temporary file removed, so none is left taking the room a full disk lacks,
and the file as it was. :func:`write_temporary` is its first half (the temporary file written
whole and fsynced, with its mode), for a caller that renames several files into place only once
all of them are whole (the CURVE keys: a pair is replaced together or not at all).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path


def fsync(path: str | Path) -> None:
    """Flush the file or folder ``path`` to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write(path: str | Path, data: str | bytes | memoryview, *, tmp: str | Path, mode: int | None = None,
          fsync_folder: bool = True) -> None:
    """Write ``data`` (text, as UTF-8, or bytes) to ``path`` atomically through the temporary
    file ``tmp`` (on the same file system, replaced if there): written, fsynced, renamed to
    ``path``, and the folder of ``path`` fsynced after the rename.

    ``mode`` (e.g. 0o600 for a secret): ``tmp`` is made afresh with it (one there is removed
    first, never written into), set to it whatever the umask before a byte is written, so the
    file has it from its first byte on; without it the file gets the umask's default mode.
    ``fsync_folder=False`` leaves the folder's fsync to the caller, who writes several files
    into it and fsyncs it once after the last (until then a power loss may undo the rename).
    A write or rename that fails raises, ``tmp`` removed and ``path`` as it was."""
    write_temporary(tmp, data, mode=mode)
    try:
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    if fsync_folder:
        fsync(Path(path).parent)


def write_temporary(tmp: str | Path, data: str | bytes | memoryview, *, mode: int | None = None) -> None:
    """The first half of :func:`write`: ``data`` into ``tmp``, written and fsynced, ``mode`` as
    there (from the first byte on); the caller renames it into place and fsyncs the folder. A
    write that fails raises with ``tmp`` removed (no part of it left)."""
    try:
        _write_temporary(tmp, data, mode=mode)
    except BaseException:
        _remove(tmp)
        raise


def _remove(tmp: str | Path) -> None:
    """Remove the temporary file of a write that failed, if it is there: a failure to remove it
    (it was never made, the folder is gone) must not hide the write's."""
    try:
        os.unlink(tmp)
    except OSError:
        pass


def _write_temporary(tmp: str | Path, data: str | bytes | memoryview, *, mode: int | None) -> None:
    if mode is None:
        f = open(tmp, "wb")
    else:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)  # the umask may narrow it: set below
        try:
            os.fchmod(fd, mode)
        except BaseException:
            os.close(fd)
            raise
        f = open(fd, "wb")
    with f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())


REFUSED = (errno.ENOSPC, errno.EDQUOT, errno.EIO)
"""The errors of a disk that refuses a write (full, over its quota, an I/O error): what a stage
says once, counts and tries again rather than exits on (the evaluator's data, the streamer's
synthetic world)."""


def errno_name(err: OSError) -> str:
    """The name of a write failure's errno (``ENOSPC``: a full disk, ``EIO``: an I/O error), as
    the stages label their counts of refused writes; the error's type where it has none."""
    return errno.errorcode.get(err.errno or 0, type(err).__name__)


def refusal(err: OSError) -> str:
    """A write failure as the stages' status says it: ``ENOSPC: No space left on device``."""
    return f"{errno_name(err)}: {err.strerror or err}"

