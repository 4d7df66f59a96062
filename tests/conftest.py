"""Fixtures that several test modules share: a pipeline config in a temporary run folder,
an ``insert`` message, a ``reliev3r`` stage as a real process, and waiting for a condition."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from reliev3r import config as rconfig
from reliev3r import protocol

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def make_cfg(tmp_path) -> Callable[..., rconfig.PipelineConfig]:
    """``make_cfg(*overrides, **sections)``: a PipelineConfig with ``run.dir`` in ``tmp_path``,
    free work and replay ports and no metrics endpoint, then ``sections`` (plain data per
    section, e.g. ``streamer={"views": 3}``) and ``key.sub=value`` overrides on top."""

    def make(*overrides: str, **sections: Any) -> rconfig.PipelineConfig:
        data = rconfig.merge({"run": {"dir": str(tmp_path / "run")},
                              "network": {"work_port": rconfig.free_port(), "replay_port": rconfig.free_port()},
                              "monitoring": {"enabled": False}}, sections)
        return rconfig.build(rconfig.PipelineConfig, rconfig.merge(data, rconfig.load_data([], overrides)))

    return make


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
