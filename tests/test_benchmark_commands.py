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
