"""A folder's outputs replaced by a set written beside them, so that a process killed at any
instant (SIGKILL, power loss) leaves one whole set: the earlier one or the new one.

:func:`replace` takes ``staging`` (a folder inside ``out`` that holds every new output) and:

1. flushes every file under ``staging`` to disk, then writes the marker :data:`MARKER` in
   ``out`` (atomically: a file renamed into place), which names ``staging``, the output names
   replaced and those ``staging`` holds. Before the marker is there, ``out`` holds the earlier
   set untouched; from then on the new set is the one that stands;
2. name by name, moves the earlier output (if any) into ``staging/.replaced`` and the new one
   (if any) into ``out``;
3. removes the marker, then ``staging`` with the earlier outputs.

:func:`settle` finishes a replacement that a kill interrupted after step 1, from its marker
(steps 2 and 3 again, each rename done at most once): the next ``reliev3r reconstruct`` into the
folder calls it before anything else, ``reliev3r view`` before it reads the folder. One process
replaces a folder's outputs at a time: a marker whose process is still running on this host is
left to it."""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

from reliev3r import durable

MARKER = ".reconstruct.swap"
"""The file in ``out`` that says a replacement is under way (JSON: ``staging``, ``host``,
``pid``, ``replaced``, ``new``)."""
REPLACED = ".replaced"
"""The folder inside ``staging`` that takes the earlier outputs until they are removed."""


def replace(out: Path, staging: Path, names: tuple[str, ...]) -> None:
    """Put the outputs ``names`` held in ``staging`` in place of those in ``out`` (the module's
    steps); a name ``staging`` lacks is removed from ``out``."""
    for folder, _, files in os.walk(staging):
        for name in files:
            durable.fsync(Path(folder) / name)
        durable.fsync(Path(folder))
    (staging / REPLACED).mkdir()
    record = {"staging": staging.name, "host": socket.gethostname(), "pid": os.getpid(), "replaced": list(names),
              "new": [name for name in names if os.path.lexists(staging / name)]}
    durable.write(out / MARKER, json.dumps(record), tmp=staging / MARKER)  # renamed into place whole, out fsynced
    _finish(out, record)


def settle(out: Path) -> None:
    """Finish the replacement in ``out`` that a kill interrupted, if its marker is there and its
    process is not running on this host."""
    try:
        record = json.loads((Path(out) / MARKER).read_text())
    except (FileNotFoundError, NotADirectoryError):
        return
    if record["host"] == socket.gethostname():
        try:
            os.kill(int(record["pid"]), 0)
            return  # under way
        except ProcessLookupError:
            pass
        except OSError:  # another user's process
            return
    _finish(Path(out), record)


def _finish(out: Path, record: dict) -> None:
    staging = out / record["staging"]
    earlier = staging / REPLACED
    earlier.mkdir(parents=True, exist_ok=True)
    for name in record["replaced"]:
        waiting = name in record["new"] and os.path.lexists(staging / name)  # else in place already, or none
        if os.path.lexists(out / name) and (waiting or name not in record["new"]):  # an earlier output
            os.replace(out / name, earlier / name)
        if waiting:
            os.replace(staging / name, out / name)
    durable.fsync(out)
    (out / MARKER).unlink()
    durable.fsync(out)
    shutil.rmtree(staging, ignore_errors=True)
