"""``reliev3r.swap``: who finishes a replacement of a folder's outputs that its writer left
under way."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from reliev3r import swap

# A writer that stops (blocked on its stdin) before its first rename of an output, once the marker
# is written: a replacement under way, by a process that still runs.
_PAUSED_WRITER = r"""
import os, sys
from pathlib import Path
from reliev3r import swap

out, real = Path(sys.argv[1]), os.replace

def replace(src, dst, **kw):
    if Path(dst).name != swap.MARKER:
        print("under way", flush=True)
        sys.stdin.read()
    return real(src, dst, **kw)

os.replace = replace
swap.replace(out, out / ".reconstruct-new", ("poses.txt",))
"""


@pytest.fixture
def paused_writer(tmp_path):
    """``(out, writer)``: ``out`` holding an earlier output, a new one staged and the marker of
    the live ``writer`` (a :class:`subprocess.Popen`) that is replacing it."""
    out = tmp_path / "out"
    (out / ".reconstruct-new").mkdir(parents=True)
    (out / "poses.txt").write_text("earlier")
    (out / ".reconstruct-new" / "poses.txt").write_text("new")
    writer = subprocess.Popen([sys.executable, "-c", _PAUSED_WRITER, str(out)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1])
    try:
        assert writer.stdout.readline() == "under way\n"
        yield out, writer
    finally:
        writer.kill()
        writer.wait()


def _marker(out: Path, **changes) -> None:
    record = json.loads((out / swap.MARKER).read_text())
    for key, value in changes.items():
        if value is None:
            record.pop(key, None)
        else:
            record[key] = value
    (out / swap.MARKER).write_text(json.dumps(record))


def _process(pid: int) -> tuple[str, int]:
    """The boot and the start (clock ticks since boot, field 22 of its stat) of process ``pid``."""
    start = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip(), start


def _under_way(out: Path) -> bool:
    return (out / swap.MARKER).exists() and (out / "poses.txt").read_text() == "earlier"


def _finished(out: Path) -> bool:
    return sorted(p.name for p in out.iterdir()) == ["poses.txt"] and (out / "poses.txt").read_text() == "new"


def test_a_replacement_whose_writer_still_runs_is_left_to_it(paused_writer):
    out, writer = paused_writer
    record = json.loads((out / swap.MARKER).read_text())
    assert record["pid"] == writer.pid
    if Path("/proc/self/stat").exists():
        assert (record["boot_id"], record["start"]) == _process(writer.pid)
    swap.settle(out)
    assert _under_way(out)
    _marker(out, start=None, boot_id=None)  # a marker written before they were recorded: the pid alone
    swap.settle(out)
    assert _under_way(out)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="a process's start is read from /proc")
@pytest.mark.parametrize("change", ["start", "boot_id"])
def test_a_replacement_whose_pid_now_names_another_process_is_finished(paused_writer, change):
    """The marker's pid is alive, but the process is not the one that wrote it (the writer was
    killed and its pid taken by another process: started at another time, or in another boot).
    Before, the replacement was left to that process and unfinished until it ended."""
    out, writer = paused_writer
    boot_id, start = _process(writer.pid)
    recorded = {"boot_id": boot_id, "start": start, change: start + 1 if change == "start" else "another boot"}
    _marker(out, **recorded)
    swap.settle(out)
    assert _finished(out)
