"""A CUDA Multi-Process Service daemon for one run (``run.mps``).

Without it, processes that share a GPU take turns on it: the GPU time-slices between their
contexts, so a labeler's teacher batch holds the learner's kernels back. Under MPS the processes'
kernels go to one server context and run side by side. The supervisor starts
``nvidia-cuda-mps-control -f`` as its own child (it dies with the supervisor, as the stages do)
with a pipe directory of its own, and gives every stage that directory in its environment; the
run's end sends the daemon ``quit``, which also ends the server it started.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

CONTROL = "nvidia-cuda-mps-control"
START_S = 10.0
"""How long the daemon has to open its control pipe."""
STOP_S = 10.0
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the daemon's process, before exec
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass  # not Linux/glibc: the run's end still stops it


class MPS:
    """A running daemon: ``env`` for the processes that are to be its clients; ``stop()``."""

    def __init__(self, proc: subprocess.Popen, pipe_dir: Path, log_dir: Path):
        self.proc = proc
        self.pipe_dir = pipe_dir
        self.log_dir = log_dir

    @property
    def env(self) -> dict[str, str]:
        return {"CUDA_MPS_PIPE_DIRECTORY": str(self.pipe_dir), "CUDA_MPS_LOG_DIRECTORY": str(self.log_dir)}

    def stop(self) -> None:
        """``quit`` to the daemon (it ends its server once the clients are gone), then SIGKILL
        if it is still there ``STOP_S`` later; the pipe directory is removed."""
        if self.proc.poll() is None:
            exe = shutil.which(CONTROL) or CONTROL
            try:
                subprocess.run([exe], input=b"quit\n", env={**os.environ, **self.env}, timeout=STOP_S,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
                self.proc.wait(timeout=STOP_S)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.pipe_dir, ignore_errors=True)


def start(log_dir: Path) -> tuple[MPS | None, str]:
    """Start a daemon whose log goes to ``log_dir``; returns it, or None and why not: the
    environment already names a daemon (``CUDA_MPS_PIPE_DIRECTORY``: its processes use that
    one), the control program is not installed, or it did not open its pipe (its exit code and
    log). The pipe directory is a short path under the system's temporary folder (a Unix socket's
    path holds about 100 characters; a run folder's may be longer)."""
    if given := os.environ.get("CUDA_MPS_PIPE_DIRECTORY"):
        return None, f"the environment's MPS daemon serves the run (CUDA_MPS_PIPE_DIRECTORY={given})"
    exe = shutil.which(CONTROL)
    if exe is None:
        return None, f"{CONTROL} is not on PATH (it comes with the NVIDIA driver)"
    log_dir.mkdir(parents=True, exist_ok=True)
    pipe_dir = Path(tempfile.mkdtemp(prefix="reliev3r-mps-"))
    with open(log_dir / "daemon.out", "ab") as out:
        proc = subprocess.Popen([exe, "-f"], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, "CUDA_MPS_PIPE_DIRECTORY": str(pipe_dir),
                                     "CUDA_MPS_LOG_DIRECTORY": str(log_dir)},
                                preexec_fn=_die_with_parent)
    service = MPS(proc, pipe_dir, log_dir)
    deadline = time.monotonic() + START_S
    while proc.poll() is None and not (pipe_dir / "control").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    if proc.poll() is None and (pipe_dir / "control").exists():
        return service, ""
    code = proc.poll()
    service.stop()
    return None, (f"{CONTROL} exited with code {code}" if code is not None else
                  f"{CONTROL} opened no control pipe in {START_S:g} s") + f" (log: {log_dir})"
