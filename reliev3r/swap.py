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
left to it. The marker names that process by its pid and, where ``/proc`` tells them, the boot
and the time it started, so a pid that another process took after the writer was killed does not
keep the replacement waiting (a marker written without them, or read where ``/proc`` is absent,
is left to any live process of its pid)."""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

from reliev3r import durable

MARKER = ".reconstruct.swap"
"""The file in ``out`` that says a replacement is under way (JSON: ``staging``, ``host``,
``pid``, ``replaced``, ``new``; ``boot_id`` and ``start``, the writer's :func:`_process`, where
``/proc`` tells them)."""
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
    process = _process(os.getpid())
    if process is not None:
        record["boot_id"], record["start"] = process
    durable.write(out / MARKER, json.dumps(record), tmp=staging / MARKER)  # renamed into place whole, out fsynced
    _finish(out, record)


def settle(out: Path) -> None:
    """Finish the replacement in ``out`` that a kill interrupted, if its marker is there and its
    process is not running on this host."""
    try:
        record = json.loads((Path(out) / MARKER).read_text())
    except (FileNotFoundError, NotADirectoryError):
        return
    if record["host"] == socket.gethostname() and _running(record):
        return  # under way
    _finish(Path(out), record)


def _running(record: dict) -> bool:
    """Whether the process that wrote the marker ``record`` on this host still runs: its pid is
    alive and, where the marker and ``/proc`` tell them, that process has its boot and start."""
    pid = int(record["pid"])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: alive
        pass
    if "start" not in record:  # written before the start was recorded, or where /proc is absent
        return True
    process = _process(pid)
    return process is None or process == (record["boot_id"], record["start"])


def _process(pid: int) -> tuple[str, int] | None:
    """What tells process ``pid`` from another that has its pid later: the boot's id and the
    process's start in clock ticks since boot (field 22 of ``/proc/PID/stat``); ``None`` where
    ``/proc`` does not tell (none, or the process has just ended)."""
    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return boot_id, int(stat.rsplit(")", 1)[1].split()[19])  # after the command's name (2), fields 3 on


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
