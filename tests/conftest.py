"""Fixtures that several test modules share: a pipeline config in a temporary run folder (and
one for the streamer and labeler tests), an ``insert`` message, a ZeroMQ context, a stage's
``run`` in a thread, a ``reliev3r`` stage as a real process, waiting for a condition, the
fsyncs of a folder or of any file, and a small disk that fills up."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import zmq

from reliev3r import config as rconfig
from reliev3r import protocol
from reliev3r.service import Runtime

REPO = Path(__file__).resolve().parents[1]
STAGE_STOP_S = 120.0
"""How long a stopped stage thread may take to return: bounds a hang only."""
TEST_DEFAULTS = {"labeler": {"teacher": "none"}, "replay": {"dedup": False}}
"""What a test config (``make_cfg``) sets where the product's default would make a test slow
or depend on its frames: no depth teacher, no near-duplicate rejection."""


@pytest.fixture
def make_cfg(tmp_path) -> Callable[..., rconfig.PipelineConfig]:
    """``make_cfg(*overrides, **sections)``: a PipelineConfig with ``run.dir`` in ``tmp_path``,
    free work and replay ports, no metrics endpoint, no depth teacher (``labeler.teacher``
    none) and no near-duplicate rejection (``replay.dedup`` false), then ``sections`` (plain
    data per section, e.g. ``streamer={"views": 3}``) and ``key.sub=value`` overrides on top.
    The product's defaults for those two (the embedded teacher, dedup on) are for a test that
    sets them."""

    def make(*overrides: str, **sections: Any) -> rconfig.PipelineConfig:
        data = rconfig.merge({"run": {"dir": str(tmp_path / "run")},
                              "network": {"work_port": rconfig.free_port(), "replay_port": rconfig.free_port()},
                              "monitoring": {"enabled": False}, **TEST_DEFAULTS}, sections)
        return rconfig.build(rconfig.PipelineConfig, rconfig.merge(data, rconfig.load_data([], overrides)))

    return make


@pytest.fixture
def stream_cfg(make_cfg) -> Callable[..., rconfig.PipelineConfig]:
    """``stream_cfg(sources, streamer=None, labeler=None)``: ``make_cfg`` for the streamer and
    labeler tests: those sources, windows of 3 views at 64x96 (every 2nd frame, a window every
    4), no looping, no depth teacher (``make_cfg``'s); ``streamer``/``labeler`` (plain data) on top."""

    def make(sources, streamer: dict | None = None, labeler: dict | None = None) -> rconfig.PipelineConfig:
        return make_cfg(streamer={"sources": [str(s) for s in sources], "views": 3, "height": 64, "width": 96,
                                  "frame_stride": 2, "window_step": 4, "loop": False, **(streamer or {})},
                        labeler=labeler or {})

    return make


@pytest.fixture
def ctx():
    """A ZeroMQ context for the test's own sockets, destroyed at the end."""
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


class StageThread:
    """A stage's ``run(cfg, runtime)`` in a thread with its own Runtime (no signal handlers,
    no metrics endpoint): ``rc`` once it returned, ``metric(name, labels)``, ``stop()``."""

    def __init__(self, run, cfg, name):
        self.runtime = Runtime(name, cfg, install_signals=False, serve_metrics=False)
        self.rc = None
        self.closed = False
        self.thread = threading.Thread(target=self._run, args=(run, cfg), daemon=True)
        self.thread.start()

    def _run(self, run, cfg):
        self.rc = run(cfg, self.runtime)

    def metric(self, name, labels=None):
        return self.runtime.metrics.registry.get_sample_value(name, labels or {}) or 0.0

    def stop(self):
        """Ask the stage to stop; it must return within STAGE_STOP_S. Then close its runtime."""
        if self.closed:
            return
        self.runtime.stop()
        self.thread.join(STAGE_STOP_S)
        assert not self.thread.is_alive()
        self.runtime.close()
        self.closed = True


@pytest.fixture
def stage() -> Callable[..., StageThread]:
    """``stage(run, cfg, name)``: a :class:`StageThread` running e.g. ``streamer.service.run``;
    those not stopped by the test are stopped at its end."""
    started: list[StageThread] = []

    def start(run, cfg, name: str) -> StageThread:
        started.append(StageThread(run, cfg, name))
        return started[-1]

    yield start
    for s in started:
        s.stop()


@pytest.fixture
def make_insert() -> Callable[..., protocol.Message]:
    """``make_insert(i, views=2, size=16, teacher=True, frames=None)``: labeler -> replay
    ``insert`` message ``w{i}``, reproducible from ``i`` (random frames and teacher depth,
    1 + i % 3 matches)."""

    def make(i: int, *, views: int = 2, size: int = 16, teacher: bool = True, frames=None) -> protocol.Message:
        rng = np.random.default_rng(i)
        arrays = {"frames": rng.integers(0, 256, (views, size, size, 3), dtype=np.uint8) if frames is None else frames,
                  "intrinsics": np.tile(np.eye(3, dtype=np.float32), (views, 1, 1)),
                  "matches": np.array([[0, 1, 1.0, 2.0, 3.0, 4.0, 0.9]] * (1 + i % 3), np.float32)}
        if teacher:
            arrays["teacher_depth"] = rng.random((views, size, size)).astype(np.float32) + 0.5
            arrays["teacher_valid"] = np.ones((views, size, size), np.uint8)
        meta = {"window_id": f"w{i}", "source": "test", "frame_indices": list(range(views)),
                "teacher": {"depth": {"name": "fake", "version": "1"}}}
        return protocol.Message("insert", meta, arrays)

    return make


@pytest.fixture
def reliev3r_process() -> Callable[..., subprocess.Popen]:
    """``reliev3r_process(*args, env=None, **popen)``: ``python -m reliev3r.cli *args`` from the
    repository root (``env`` adds variables); the ones still running at the end of the test
    get SIGTERM, then SIGKILL."""
    started: list[subprocess.Popen] = []

    def start(*args: str, env: dict[str, str] | None = None, **popen: Any) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-m", "reliev3r.cli", *map(str, args)], cwd=REPO,
                                env={**os.environ, **(env or {})}, **popen)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def wait_for() -> Callable[..., Any]:
    """``wait_for(predicate, timeout, what, procs=())``: poll ``predicate`` until it returns
    something true (returned) or ``timeout`` seconds pass (the test fails naming ``what``);
    fails at once when one of ``procs`` has exited (with the tail of its output, if piped)."""

    def wait(predicate: Callable[[], Any], timeout: float, what: str, procs=(), interval: float = 0.2) -> Any:
        deadline = time.monotonic() + timeout  # not time.time(): a clock step must not cut a wait short
        while time.monotonic() < deadline:
            for p in procs:
                if p.poll() is not None:
                    out = p.stdout.read()[-3000:] if p.stdout is not None else ""
                    pytest.fail(f"{what}: process {p.args[3:5]} exited with {p.returncode}:\n{out}")
            value = predicate()
            if value:
                return value
            time.sleep(interval)
        pytest.fail(f"timed out waiting for {what}")

    return wait


@pytest.fixture
def folder_fsyncs(monkeypatch) -> Callable[[Path, Callable[[], Any]], list]:
    """``watch(folder, seen)``: from then on, every ``os.fsync`` of ``folder`` (known by its
    inode, whatever path opened it, in any thread) appends ``seen()`` to the list returned: what
    the test needs to hold when the folder is flushed (e.g. a file renamed into it is there)."""

    def watch(folder: Path, seen: Callable[[], Any]) -> list:
        key, calls, real = os.stat(folder), [], os.fsync

        def fsync(fd: int) -> None:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) == (key.st_dev, key.st_ino):
                calls.append(seen())
            real(fd)

        monkeypatch.setattr(os, "fsync", fsync)
        return calls

    return watch


class Flushed:
    """The files and folders ``os.fsync`` has flushed, by inode: ``path in flushed`` tells whether
    what stands at ``path`` now was flushed (a file renamed since keeps its inode)."""

    def __init__(self) -> None:
        self.keys: set[tuple[int, int]] = set()

    def __contains__(self, path: Path) -> bool:
        st = os.stat(path)
        return (st.st_dev, st.st_ino) in self.keys


@pytest.fixture
def fsynced(monkeypatch) -> Flushed:
    """Every ``os.fsync`` from the test's start on (any thread) is recorded: ``path in fsynced``
    tells whether the file at ``path`` was flushed (its bytes, before a rename put it there)."""
    flushed, real = Flushed(), os.fsync

    def fsync(fd: int) -> None:
        st = os.fstat(fd)
        flushed.keys.add((st.st_dev, st.st_ino))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return flushed


class SmallDisk:
    """A file system of its own (a tmpfs of ``size`` bytes) at ``path``: what is written there
    runs out of space as on a full disk (ENOSPC), with none of the host's disk touched.
    :meth:`fill` takes what space is left, :meth:`free` gives it back. A tmpfs full of bytes still
    makes folders (they take none), as a full ext4 does not (a folder takes a block): one made with
    ``inodes`` (the most files and folders it holds) has them taken too by :meth:`fill`, and then
    refuses a new folder (ENOSPC)."""

    def __init__(self, path: Path, size: int, inodes: int | None = None):
        self.path, self.size, self.inodes = path, size, inodes
        self.filler = path / "filler"
        self.empty: list[Path] = []
        """The empty files that take the inodes left (with ``inodes``)."""

    def fill(self) -> None:
        """Write the filler until the disk refuses a byte more; with ``inodes``, then make empty
        files until it refuses one more."""
        try:
            with open(self.filler, "ab", buffering=0) as f:
                for block in (1 << 20, 1 << 12, 1):
                    try:
                        while True:
                            f.write(bytes(block))
                    except OSError as err:
                        if err.errno != errno.ENOSPC:
                            raise
        except OSError as err:  # no inode left for the filler: no byte can be written either
            if err.errno != errno.ENOSPC:
                raise
        while self.inodes is not None:
            path = self.path / f"empty-{len(self.empty)}"
            try:
                path.touch(exist_ok=False)
            except OSError as err:
                if err.errno != errno.ENOSPC:
                    raise
                break
            self.empty.append(path)

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)
        for path in self.empty:
            path.unlink(missing_ok=True)
        self.empty.clear()

    def available(self) -> int:
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize


@pytest.fixture
def small_disk(tmp_path) -> Callable[..., SmallDisk]:
    """``small_disk(size, inodes=None)``: a :class:`SmallDisk` of ``size`` bytes (and at most
    ``inodes`` files and folders, where given) mounted under ``tmp_path``, unmounted at the end of
    the test. Mounting needs the privilege to (root, or CAP_SYS_ADMIN): without it the test is
    skipped, saying so."""
    mounted: list[Path] = []

    def make(size: int, inodes: int | None = None) -> SmallDisk:
        path = tmp_path / f"disk{len(mounted)}"
        path.mkdir()
        if shutil.which("mount") is None:
            pytest.skip("a full disk is a small tmpfs, and this host has no mount command")
        options = f"size={size}" + (f",nr_inodes={inodes}" if inodes is not None else "")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"a full disk is a small tmpfs, and mounting one is not permitted here: {done.stderr.strip()}")
        mounted.append(path)
        return SmallDisk(path, size, inodes)

    yield make
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)
