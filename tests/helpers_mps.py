"""A stand-in for ``nvidia-cuda-mps-control`` (it comes with the NVIDIA driver, which a CPU host
lacks): with ``-f`` it opens ``$CUDA_MPS_PIPE_DIRECTORY/control`` and runs until told ``quit`` on
a second invocation's stdin, as the real daemon's control protocol goes. On a GPU host the real
one runs (benchmarks/issue18_gpu.sh, docs/BENCHMARKS.md)."""

from __future__ import annotations

import sys
from pathlib import Path

STAND_IN = """#!{python}
import os, sys, time
from pathlib import Path
pipe = Path(os.environ["CUDA_MPS_PIPE_DIRECTORY"])
if sys.argv[1:] == ["-f"]:
    (pipe / "control").touch()
    (Path(os.environ["CUDA_MPS_LOG_DIRECTORY"]) / "control.log").write_text(str(os.getpid()))
    while not (pipe / "quit").exists():
        time.sleep(0.05)
elif sys.stdin.read().strip() == "quit":
    (pipe / "quit").touch()
"""


def stand_in_control(bin_dir: Path) -> Path:
    """Write the stand-in as ``bin_dir/nvidia-cuda-mps-control``; returns ``bin_dir`` (for PATH)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    exe = bin_dir / "nvidia-cuda-mps-control"
    exe.write_text(STAND_IN.format(python=sys.executable))
    exe.chmod(0o755)
    return bin_dir
