"""Peak memory of ``reliev3r reconstruct`` against the video's length (issue 19).

Makes a synthetic video of N frames (a textured plane panning past the camera, 160x120 by
default, H.264 through PyAV; written to a temporary folder, never kept), trains a tiny snapshot
(``tests/tiny_snapshot.py``: the tiny model at 48x64) and runs ``reliev3r reconstruct`` on the
video in a child process for each N, reading that child's peak resident set size from
``os.wait4`` (``ru_maxrss``). Prints a markdown table with peak(N) / peak(first N).

    .venv/bin/python benchmarks/reconstruct_memory.py                 # 1k, 5k, 10k frames
    .venv/bin/python benchmarks/reconstruct_memory.py --frames 200 800 --colmap
    .venv/bin/python benchmarks/reconstruct_memory.py --frames 1000 3000 --poses model   # the pose head's
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_video(path: Path, frames: int, width: int, height: int, fps: int = 30) -> Path:
    """A texture of smooth blobs and fine noise sliding 2 pixels a frame, one frame at a time."""
    rng = np.random.default_rng(0)
    tex_w = width + 2 * 512
    base = rng.integers(0, 256, (height // 8 + 1, tex_w // 8 + 1, 3), dtype=np.uint8)
    texture = np.repeat(np.repeat(base, 8, 0), 8, 1)[:height, :tex_w]
    texture = np.clip(texture.astype(np.int16) + rng.integers(-24, 24, texture.shape), 0, 255).astype(np.uint8)
    container = av.open(str(path), "w")
    stream = container.add_stream("libx264", rate=fps, options={"preset": "ultrafast"})
    stream.height, stream.width, stream.pix_fmt = height, width, "yuv420p"
    for k in range(frames):
        x = (2 * k) % (tex_w - width)  # back and forth would look the same to the benchmark
        rgb = np.ascontiguousarray(texture[:, x:x + width])
        for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    return path


def run_reconstruct(snapshot: Path, video: Path, out: Path, frames: int, extra: list[str]) -> tuple[float, int]:
    """(seconds, peak RSS in bytes) of one ``reliev3r reconstruct`` child process."""
    argv = [sys.executable, "-m", "reliev3r.cli", "reconstruct", "--checkpoint", str(snapshot), "--input",
            str(video), "--out", str(out), "--max-frames", str(frames), "--device", "cpu", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    t0 = time.perf_counter()
    with open(out.with_suffix(".log"), "w") as log:
        child = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - t0
    if child.returncode != 0:
        raise RuntimeError(f"reconstruct failed ({child.returncode}); see {out.with_suffix('.log')}")
    return seconds, usage.ru_maxrss * 1024  # Linux reports kibibytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, nargs="+", default=[1000, 5000, 10000])
    ap.add_argument("--width", type=int, default=160)
    ap.add_argument("--height", type=int, default=120)
    ap.add_argument("--colmap", action="store_true", help="also write the COLMAP model (--colmap bin)")
    ap.add_argument("--poses", choices=("fitted", "model"), default="fitted",
                    help="reconstruct's --poses (fitted: its default, with the matching it needs)")
    ap.add_argument("--keep", default=None, help="folder to keep the outputs in (default: a temporary one)")
    args = ap.parse_args()

    import torch

    from tests.tiny_snapshot import make_tiny_snapshot

    extra = (["--colmap", "bin"] if args.colmap else []) + ["--poses", args.poses]
    with tempfile.TemporaryDirectory(prefix="reconstruct_memory-") as tmp:
        work = Path(args.keep or tmp)
        work.mkdir(parents=True, exist_ok=True)
        snapshot = make_tiny_snapshot(work / "run")
        rows = []
        for n in args.frames:
            t0 = time.perf_counter()
            video = make_video(work / f"video{n}.mp4", n, args.width, args.height)
            made = time.perf_counter() - t0
            seconds, peak = run_reconstruct(snapshot, video, work / f"rec{n}", n, extra)
            summary = json.loads((work / f"rec{n}" / "reconstruction.json").read_text())
            poses = sum(1 for line in open(work / f"rec{n}" / "poses.txt") if not line.startswith("#"))
            rows.append((n, summary["frames"], poses, summary["windows"], summary["points"], peak, seconds, made))
            print(f"N={n}: {peak / 2**20:.1f} MiB peak RSS, {seconds:.0f} s ({n / seconds:.0f} frames/s), "
                  f"video made in {made:.0f} s", flush=True)
            video.unlink()
    base = rows[0][5]
    print(f"\ntorch {torch.__version__}, {os.cpu_count()} CPUs, video {args.width}x{args.height}, model 48x64, "
          f"--poses {args.poses}" + (", --colmap bin" if args.colmap else ""))
    print("| frames | decoded | poses written | windows | points in PLY | peak RSS (MiB) | ratio | time (s) "
          "| frames/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n, decoded, poses, windows, points, peak, seconds, _ in rows:
        print(f"| {n} | {decoded} | {poses} | {windows} | {points} | {peak / 2**20:.1f} | {peak / base:.3f} | "
              f"{seconds:.0f} | {n / seconds:.0f} |")


if __name__ == "__main__":
    main()
