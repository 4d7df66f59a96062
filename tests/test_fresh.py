"""Fresh-window streams for studies (studies.fresh): partial renders equal full ones, the producer
writes whole windows and stops cleanly on SIGTERM, the learner-side ring is a FIFO served like
a labelled dataset, and the study trains from it."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from reliev3r.synthetic import render_scene
from studies.dataset import DatasetError, ensure_dataset, parse_spec
from studies.fresh import FreshStream, produce, window_frames

REPO = Path(__file__).resolve().parents[1]
SPEC = dict(frames=12, views=3, stride=3, height=24, width=32, match_scale=4, seed=5)


def _spec(**over):
    return replace(parse_spec("synthetic"), **{**SPEC, **over})


def test_selected_frames_equal_the_full_render():
    full = render_scene(11, frames=9, height=12, width=16)
    part = render_scene(11, frames=9, height=12, width=16, select=[6, 0, 3])
    for name in ("images", "depth", "cam_to_world"):
        assert torch.equal(getattr(part, name), getattr(full, name)[[6, 0, 3]]), name
    with pytest.raises(ValueError, match="select"):
        render_scene(11, frames=9, height=12, width=16, select=[9])


def test_window_frames_fit_the_clip_and_are_seeded():
    spec = _spec()
    starts = set()
    for k in range(40):
        frames = window_frames(spec, k)
        assert frames == window_frames(spec, k)
        assert np.all(np.diff(frames) == spec.stride) and frames[0] >= 0 and frames[-1] < spec.frames
        starts.add(frames[0])
    assert starts == set(range(spec.frames - (spec.views - 1) * spec.stride))  # every start occurs
    with pytest.raises(ValueError, match="do not fit"):
        window_frames(_spec(stride=6), 0)


def test_producer_writes_windows_that_the_ring_serves_fifo(tmp_path):
    spec = _spec()
    assert produce(spec, tmp_path, workers=1, limit=3, progress_every=0) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta.json", "w000000000.npz", "w000000001.npz",
                                                           "w000000002.npz"]
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["fresh"] and meta["spec"]["stride"] == 3 and meta["teacher"]["name"] == "oracle-gt"

    ring = FreshStream(tmp_path, capacity=2)
    assert len(ring) == 0 and ring.refresh(max_new=1) == 1 and ring.refresh() == 2
    assert len(ring) == 2 and ring.loaded == 3 and ring.refresh() == 0
    names = [str(n) for n in ring.arrays["names"]]
    assert names[0].startswith("fresh-5-2:") and names[1].startswith("fresh-5-1:")  # window 2 replaced window 0

    # Each served window is the render of its own scene at its own frames, with exact ground truth.
    from reliev3r.synthetic import scene_seed

    frames = window_frames(spec, 1)
    scene = render_scene(scene_seed(spec.seed, 1), frames=spec.frames, height=24, width=32, select=frames)
    assert np.array_equal(ring.arrays["images"][1], scene.images.numpy())
    np.testing.assert_allclose(ring.arrays["gt_depth"][1], scene.depth.numpy(), rtol=1e-3)

    batch = ring.batch([1, 0, 1], "cpu")
    assert batch["images"].shape == (3, 3, 3, 24, 32) and batch["teacher_depth"].shape == (3, 3, 24, 32)
    m = batch["matches"]
    assert m.shape[1] == 8 and len(m) == 2 * len(ring.matches_of(1)) + len(ring.matches_of(0))
    assert set(m[:, 0].long().tolist()) <= {0, 1, 2}
    stats = ring.stats()
    assert stats["windows"] == 2 and stats["loaded"] == 3 and stats["baseline_over_depth"] > 0

    # The folder refuses windows of another spec.
    with pytest.raises(DatasetError, match="another spec"):
        produce(_spec(stride=2), tmp_path, workers=1, limit=1)


def test_ring_without_producer_says_so(tmp_path):
    with pytest.raises(DatasetError, match="no meta.json"):
        FreshStream(tmp_path, timeout=0.1)


def test_producer_process_stops_on_sigterm(tmp_path):
    out = tmp_path / "w"
    cmd = [sys.executable, "-m", "studies.fresh", "--out", str(out), "--workers", "2", "--views", "3",
           "--height", "24", "--width", "32", "--stride", "3", "--spec", "synthetic:frames=12,seed=9"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "w000000001.npz").exists():
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "no window written in 120 s"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output
    written = sorted(out.glob("w*.npz"))
    assert f"wrote {len(written)} windows" in output
    assert [p.name for p in written] == [f"w{k:09d}.npz" for k in range(len(written))]  # contiguous
    assert not list(out.glob(".*tmp"))  # no partial file left behind
    ring = FreshStream(out)
    assert ring.refresh() == len(written)


def test_study_trains_from_a_fresh_stream(tmp_path):
    from learner.config import LearnerConfig
    from studies.study import run_study

    spec = _spec()
    produce(spec, tmp_path / "w", workers=1, limit=4, progress_every=0)
    held = ensure_dataset(replace(spec, scenes=1, seed=1005, hop=6), tmp_path / "cache", workers=1, progress=False)
    ring = FreshStream(tmp_path / "w", capacity=8)
    cfg = LearnerConfig(batch_size=2, warmup_steps=1, ema_decay=0.5, snapshot_every=1000, lr=1e-3, device="cpu")
    result = run_study(cfg, ring, held.windows(), steps=4, eval_every=2, seed=0, device="cpu", log_every=0,
                       out=tmp_path / "run", refresh_every=2)
    assert result.steps == 4 and [row["train_windows"] for row in result.curve] == [4, 4]
    assert np.isfinite(result.final["absrel_med"]) and np.isfinite(result.final["rot_err_deg"])
    # The EMA weights are scored beside the live ones, and differ from them after 4 steps.
    assert result.final_ema is not None and result.final_ema == result.curve[-1]["eval_ema"]
    assert result.final_ema["absrel_med"] != result.final["absrel_med"]
    doc = json.loads((tmp_path / "run" / "curve.json").read_text())
    assert doc["dataset"]["meta"]["fresh"] and doc["dataset"]["stats"]["loaded"] == 4
