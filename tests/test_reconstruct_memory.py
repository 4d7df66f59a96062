"""``reliev3r reconstruct`` in bounded memory (issue 19): the Python heap's peak (tracemalloc:
numpy arrays are traced) does not grow with the video's length beyond a stated per-frame
bookkeeping bound, outputs reach the disk window by window, and the streaming pieces (chain,
PLY with a patched header, chunked subsample, value sample) agree with what they replace."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from evaluation.tum import read_tum
from reliev3r import geometry, reconstruct_stream
from reliev3r.reconstruct import (FrameStream, ReconstructOptions, WindowResult, chain_windows, reconstruct,
                                  window_starts)
from reliev3r.reconstruct_stream import PlyStream, StreamingChain, ValueSample, sampled_rows

H, W = 48, 64
PER_FRAME_BYTES = 1024
"""What the reconstruction may hold per frame of the video: its pose, intrinsics and timestamp,
then the trajectory's arrays at the end (about 230 bytes measured); a held frame of these tests
is far larger (9 KB of RGB, 12 KB each of depth and confidence)."""


class FakeReconstructor:
    """The model's interface without a model: deterministic depth, confidence and poses; at each
    window it records what the run has written so far (into its hidden folder in the output
    folder, ``reliev3r.reconstruct.STAGING``: the outputs must be streamed)."""

    def __init__(self, out: Path) -> None:
        self.out, self.seen = out, []

    def run(self, images, intrinsics=None, size=None, poses="fitted") -> dict:
        (writing,) = self.out.glob(".reconstruct-*")  # the run's outputs until they are all written
        ply = writing / "points.ply"
        self.seen.append((len(list((writing / "depth").glob("*.png"))),
                          sum(not line.startswith("#") for line in (writing / "poses.txt").open()),
                          ply.stat().st_size))
        v = len(images)
        stack = np.stack(images)
        depth = 1.0 + stack.mean(-1, dtype=np.float32) / 255.0
        conf = 1.0 + stack[..., 1].astype(np.float32) / 255.0
        poses = np.tile(np.eye(4, dtype=np.float32), (v, 1, 1))
        poses[:, 0, 3] = 0.01 * np.arange(v)
        K = np.tile(geometry.intrinsics_from_fov(60.0, W, H).numpy(), (v, 1, 1))
        return {"images": stack, "depth": depth, "confidence": conf, "cam_to_world": poses, "intrinsics": K,
                "fitted": np.zeros(v, bool)}


def _frames(n: int):
    """``n`` frames made one at a time (the test holds none of them)."""
    for k in range(n):
        rgb = np.random.default_rng(k).integers(0, 256, (H, W, 3), dtype=np.uint8)
        yield rgb, k / 10.0


def _run(tmp_path: Path, n: int, **kw) -> tuple[int, dict, FakeReconstructor]:
    out = tmp_path / f"rec{n}"
    out.mkdir()
    fake = FakeReconstructor(out)
    opts = ReconstructOptions(views=8, overlap=2, max_frames=10**6, **kw)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        summary = reconstruct(fake, FrameStream(_frames(n), None, None, n), out, opts)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return peak, summary, fake


def test_heap_peak_is_flat_in_the_video_length_and_outputs_stream(tmp_path, monkeypatch):
    # A small depth sample so that its cap, not the video, bounds it in a test this short.
    monkeypatch.setattr(reconstruct_stream, "DEPTH_SAMPLE_CAP", 50_000)
    n = 24
    _run(tmp_path, 9)  # first use: imports and caches land in the heap too
    peak_n, summary_n, _ = _run(tmp_path, n)
    peak_4n, summary_4n, fake = _run(tmp_path, 4 * n)
    assert summary_n["frames"] == n and summary_4n["frames"] == 4 * n
    assert summary_4n["windows"] == len(window_starts(4 * n, 8, 2))
    # 3n more frames may add their bookkeeping, nothing more: holding frames, depth or points
    # would add over 20 KB a frame.
    print(f"heap peak: {peak_n} B at {n} frames, {peak_4n} B at {4 * n}")
    assert peak_4n - peak_n <= 3 * n * PER_FRAME_BYTES, (peak_n, peak_4n)
    # Streamed: before each window, the frames chained so far are on disk (depth PNG, pose line,
    # points), and the PLY grew at every window.
    depth_pngs, pose_lines, ply_sizes = (np.array(x) for x in zip(*fake.seen))
    chained = np.array([0] + [s + 8 for s in window_starts(4 * n, 8, 2)[:-1]])
    np.testing.assert_array_equal(depth_pngs, chained)
    np.testing.assert_array_equal(pose_lines, chained)
    assert np.all(np.diff(ply_sizes) > 0)
    stamps, _ = read_tum(tmp_path / f"rec{4 * n}" / "poses.txt")
    np.testing.assert_allclose(stamps, np.arange(4 * n) / 10.0, atol=1e-6)
    assert not list((tmp_path / f"rec{4 * n}").glob(".spool-*"))  # temporary spools removed


def test_points_beyond_max_points_are_subsampled_to_exactly_max_points(tmp_path):
    plyfile = pytest.importorskip("plyfile")
    _, summary, _ = _run(tmp_path, 12, max_points=10_000)
    vertex = plyfile.PlyData.read(str(tmp_path / "rec12" / "points.ply"))["vertex"]
    assert summary["points"] == len(vertex) == 10_000


@pytest.mark.parametrize("overlap", [1, 3])
def test_streaming_chain_equals_chain_windows(overlap):
    rng = np.random.default_rng(1)
    n, views = 23, 5
    results = []
    for start in window_starts(n, views, overlap):
        R = geometry.axis_angle_to_matrix(torch.from_numpy(rng.normal(size=(views, 3)))).numpy()
        poses = np.tile(np.eye(4), (views, 1, 1))
        poses[:, :3, :3], poses[:, :3, 3] = R, rng.normal(size=(views, 3))
        results.append(WindowResult(start, rng.uniform(1, 3, (views, 4, 6)).astype(np.float32),
                                    rng.uniform(1, 2, (views, 4, 6)).astype(np.float32), poses.astype(np.float32)))
    poses, depth, conf = chain_windows(results, n)
    chain, got = StreamingChain(), []
    for r in results:
        got += chain.add(r)
        assert len(chain.depth) <= views  # only the last window's frames are held
    assert [k for k, *_ in got] == list(range(n))
    np.testing.assert_array_equal(np.stack([p for *_, p, _, _ in got]), poses)
    np.testing.assert_array_equal(np.stack([d for *_, d, _ in got]), depth)
    np.testing.assert_array_equal(np.stack([c for *_, c in got]), conf)


def test_sampled_rows_is_exact_uniform_and_matches_choice_within_a_chunk():
    picks = [start + p for start, p in sampled_rows(10_000, 700, seed=3, chunk=1_000)]
    rows = np.concatenate(picks)
    assert len(rows) == len(np.unique(rows)) == 700 and np.all(np.diff(rows) > 0) and rows.max() < 10_000
    # every row equally likely: 2000 draws of 1 in 10 rows of 10 chunks land in each chunk ~200 times
    hits = np.zeros(10)
    for seed in range(2000):
        for start, p in sampled_rows(100, 10, seed=seed, chunk=10):
            hits[start // 10] += len(p)
    assert hits.sum() == 20_000 and np.all(np.abs(hits - 2000) < 200)
    # one chunk: the same rows as numpy's choice (what reconstruct used before streaming)
    (_, one), = sampled_rows(500, 50, seed=0)
    np.testing.assert_array_equal(one, np.sort(np.random.default_rng(0).choice(500, 50, replace=False)))


def test_ply_stream_header_is_patched_in_place(tmp_path):
    plyfile = pytest.importorskip("plyfile")
    rng = np.random.default_rng(0)
    ply = PlyStream(tmp_path / "p.ply")
    pts, cols = [], []
    for size in (0, 7, 123456):
        p, c = rng.normal(size=(size, 3)).astype(np.float32), rng.integers(0, 256, (size, 3), dtype=np.uint8)
        ply.append(p, c, np.ones(size, np.float32))
        pts.append(p), cols.append(c)
    assert ply.close() == 123463
    vertex = plyfile.PlyData.read(str(tmp_path / "p.ply"))["vertex"]
    np.testing.assert_array_equal(np.stack([vertex["x"], vertex["y"], vertex["z"]], -1), np.concatenate(pts))
    np.testing.assert_array_equal(np.stack([vertex["red"], vertex["green"], vertex["blue"]], -1),
                                  np.concatenate(cols))


def test_value_sample_is_exact_until_full_then_bounded():
    sample = ValueSample(cap=1000)
    sample.add(np.arange(600.0))
    np.testing.assert_array_equal(np.sort(sample.values()), np.arange(600.0))
    for k in range(50):
        sample.add(np.arange(600.0) + 600 * (k + 1))
    values = sample.values()
    assert len(values) == 1000 and sample.seen == 600 * 51
    assert abs(np.median(values) / (600 * 51 / 2) - 1) < 0.1  # a uniform sample of 0..30599
