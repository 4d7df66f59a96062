"""Durable writes, shared by the snapshots, the output swap, the streamer's progress file, the
evaluator's results and pictures, the report page, the studies' datasets and curves, the synthetic
world's videos and ground truth and the embedded teacher's weights and meta.

:func:`fsync` flushes a file or a folder to disk by its path (a folder: the names made, renamed
or removed in it, so a rename survives a power loss once its folder is fsynced).
:func:`write` writes a file atomically and durably: the text or bytes into a temporary file,
fsynced, renamed over the file, then the file's folder fsynced, so a reader sees the earlier file
or the new one whole, never a part, and once it returns the new one survives a power loss
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


def write(path: str | Path, data: str | bytes | memoryview, *, tmp: str | Path) -> None:
    """Write ``data`` (text, as UTF-8, or bytes) to ``path`` atomically through the temporary
    file ``tmp`` (on the same file system, replaced if there): written, fsynced, renamed to
    ``path``, and the folder of ``path`` fsynced after the rename."""
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync(Path(path).parent)
