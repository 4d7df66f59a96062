"""``run.mps``: the run's own CUDA Multi-Process Service daemon (``reliev3r.mps``), started,
handed to the stages and stopped; and the named reasons it is not started. The whole run with it
is in tests/test_pipeline.py."""

from __future__ import annotations

import os
import tempfile
import time

from reliev3r import mps
from tests.helpers_mps import stand_in_control


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return open(f"/proc/{pid}/stat").read().split()[2] != "Z"


def test_the_daemon_starts_gives_its_pipe_and_stops_on_quit(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", f"{stand_in_control(tmp_path / 'bin')}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_MPS_PIPE_DIRECTORY", raising=False)
    service, why = mps.start(tmp_path / "logs" / "mps")
    assert service is not None, why
    pipe = service.pipe_dir
    assert service.env == {"CUDA_MPS_PIPE_DIRECTORY": str(pipe), "CUDA_MPS_LOG_DIRECTORY": str(tmp_path / "logs" / "mps")}
    assert (pipe / "control").exists() and len(str(pipe / "control")) < 100  # a Unix socket's path
    pid = int((tmp_path / "logs" / "mps" / "control.log").read_text())
    service.stop()
    assert service.proc.returncode == 0  # it ended on quit, not by a kill
    assert not _alive(pid) and not pipe.exists()


def test_no_daemon_without_the_program_or_beside_the_environments(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.delenv("CUDA_MPS_PIPE_DIRECTORY", raising=False)
    service, why = mps.start(tmp_path / "mps")
    assert service is None and why == "nvidia-cuda-mps-control is not on PATH (it comes with the NVIDIA driver)"
    monkeypatch.setenv("PATH", str(stand_in_control(tmp_path / "bin")))
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", "/tmp/theirs")
    service, why = mps.start(tmp_path / "mps")
    assert service is None and "CUDA_MPS_PIPE_DIRECTORY=/tmp/theirs" in why


def test_a_daemon_that_exits_at_once_is_a_named_failure(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-cuda-mps-control").write_text("#!/bin/sh\necho 'cannot open the GPU' >&2\nexit 3\n")
    (bin_dir / "nvidia-cuda-mps-control").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_MPS_PIPE_DIRECTORY", raising=False)
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # where the pipe directory goes
    started = time.monotonic()
    service, why = mps.start(tmp_path / "mps")
    assert service is None and why == f"nvidia-cuda-mps-control exited with code 3 (log: {tmp_path / 'mps'})"
    assert time.monotonic() - started < mps.START_S  # it did not wait out the start-up time
    assert "cannot open the GPU" in (tmp_path / "mps" / "daemon.out").read_text()
    assert not list((tmp_path / "tmp").iterdir())  # its pipe directory removed
