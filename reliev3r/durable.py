"""Durable writes, shared by the snapshots, the output swap, the streamer's progress file and
the evaluator's results.

:func:`fsync` flushes a file or a folder to disk by its path (a folder: the names made, renamed
or removed in it, so a rename survives a power loss once its folder is fsynced).
:func:`write_text` writes a file atomically and durably: the text into a temporary file,
fsynced, renamed over the file, then the file's folder fsynced, so a reader sees the earlier
file or the new one whole, never a part, and once it returns the new one survives a power loss
(without the folder's fsync the earlier file may stand again after one).
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync(path: str | Path) -> None:
    """Flush the file or folder ``path`` to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text(path: str | Path, text: str, *, tmp: str | Path) -> None:
    """Write ``text`` to ``path`` atomically through the temporary file ``tmp`` (on the same
    file system, replaced if there): written, fsynced, renamed to ``path``, and the folder of
    ``path`` fsynced after the rename."""
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync(Path(path).parent)
