"""Benchmark commands as their docstrings write them, run at the smallest sizes: each finishes with
exit 0 and prints what its docstring says it prints (the figures themselves are not checked)."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_replay_throughput_runs_every_backend_of_our_replay(tmp_path):
    # The docstring's second command, scaled down: windows of 32 px, two writers. Its windows
    # must be ones the replay accepts (whole view indices in the matches), or no row is made.
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "replay_throughput.py"), "--sizes", "32",
                          "--windows", "4", "--batches", "2", "--batch", "2", "--writers", "2", "--dir", str(tmp_path)],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| 32 |")]
    assert [row.split("|")[2].strip() for row in rows][:4] == [
        "service-memory (2 writers)", "service-durable (2 writers)", "buffer-memory", "buffer-durable"], out.stdout


def test_scaling_refuses_frames_that_its_patch_does_not_tile_before_starting_a_rank():
    # The model refuses such frames in every rank (after torchrun started them); the driver says so first.
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "scaling.py"), "--device", "cpu", "--size", "tiny",
                          "--height", "64", "--width", "96", "--nprocs", "1"],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 2, (out.returncode, out.stdout[-2000:], out.stderr[-2000:])
    assert "--height 64 and --width 96 must be multiples of --patch 14" in out.stderr
    assert "torch.distributed" not in out.stdout + out.stderr
