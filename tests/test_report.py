"""The evaluator's picture set (evaluation.pictures) and ``reliev3r report`` (reliev3r.report):
pictures beside each evaluation JSON, one self-contained HTML page of the learning curves, and
that page rendered by headless Chromium (skipped, with the reason, where it is not installed)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch

from evaluation.datasets import EvalWindow
from evaluation.evaluate import TITLES
from evaluation.pictures import picture_snapshot, write_pictures
from reliev3r import report
from reliev3r.cli import main as cli_main

V, H, W = 4, 24, 32


def window(seed: int = 0) -> EvalWindow:
    """A window with a sloped ground-truth depth (one invalid corner) and a circular path."""
    rng = np.random.default_rng(seed)
    depth = np.tile(np.linspace(1.0, 4.0, W, dtype=np.float32), (V, H, 1))
    depth[:, :3, :3] = 0
    poses = np.tile(np.eye(4, dtype=np.float32), (V, 1, 1))
    angle = np.linspace(0, np.pi / 2, V)
    poses[:, 0, 3], poses[:, 2, 3] = np.cos(angle), np.sin(angle)
    images = rng.integers(0, 255, (V, H, W, 3), dtype=np.uint8)
    K = np.tile(np.array([[30, 0, W / 2], [0, 30, H / 2], [0, 0, 1]], np.float32), (V, 1, 1))
    return EvalWindow("w0", images, K, depth, poses)


def predicted(win: EvalWindow, noise: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """A prediction in another gauge: depth x0.5 plus a ripple, poses scaled, moved and noisy."""
    rng = np.random.default_rng(1)
    depth = 0.5 * np.tile(np.linspace(1.0, 4.0, W, dtype=np.float32), (V, H, 1)) * (1 + noise * rng.random((V, H, W)))
    pose = win.gt_cam_to_world.astype(np.float64).copy()
    pose[:, :3, 3] = 2.0 * pose[:, :3, 3] + np.array([5.0, 1.0, -2.0]) + noise * rng.standard_normal((V, 3))
    return depth.astype(np.float32), pose


def make_run(folder: Path, steps: list[int], *, pictures: bool, slope: float) -> Path:
    """A run folder with evaluation JSONs as the evaluator writes them (and, optionally, the
    picture set of each)."""
    out = folder / "evaluations"
    out.mkdir(parents=True)
    keys = [k for k in TITLES if k not in ("accuracy", "completeness")]
    baseline = {k: 0.5 + 0.1 * i for i, k in enumerate(keys)}
    for n, step in enumerate(steps):
        stem = f"step-{step:09d}"
        model = {k: 0.2 + 0.05 * i + slope * n for i, k in enumerate(keys)}
        record = {"snapshot": f"{folder}/snapshots/{stem}", "step": step, "data": "synthetic", "windows": 4,
                  "model": model, "baseline_constant_identity": baseline, "seconds": 1.0}
        if pictures:
            win = window()
            depth, pose = predicted(win, noise=0.3 / (n + 1))
            record["pictures"] = write_pictures(out, stem, [(win, depth, pose)])
        (out / f"{stem}.json").write_text(json.dumps(record))
    return folder


def test_pictures_are_written_beside_the_json(tmp_path):
    win = window()
    depth, pose = predicted(win)
    names = write_pictures(tmp_path, "step-000000025", [(win, depth, pose)])
    assert names == ["step-000000025.depth.png", "step-000000025.trajectory.png"]
    depth_png = cv2.imread(str(tmp_path / names[0]))
    assert depth_png is not None and depth_png.shape[1] >= 3 * 160  # image | gt | prediction, zoomed
    assert depth_png.std() > 10
    traj = cv2.imread(str(tmp_path / names[1]))
    assert traj is not None and traj.std() > 10
    # both tracks are drawn: pixels of the estimate's blue and the ground truth's green
    for bgr in ((180, 119, 31), (44, 160, 44)):
        assert (np.abs(traj.astype(int) - bgr).max(-1) < 30).sum() > 20
    assert not list(tmp_path.glob("*.tmp*"))


def test_pictures_follow_the_ground_truth_there_is(tmp_path):
    win = window()
    depth, pose = predicted(win)
    no_depth = EvalWindow("a", win.images, win.intrinsics, None, win.gt_cam_to_world)
    assert write_pictures(tmp_path, "s", [(no_depth, depth, pose)]) == ["s.trajectory.png"]
    no_pose = EvalWindow("b", win.images, win.intrinsics, win.gt_depth, None)
    assert write_pictures(tmp_path, "t", [(no_pose, depth, pose)]) == ["t.depth.png"]


def test_picture_snapshot_runs_the_model_once_per_pictured_window(tmp_path):
    win = window()
    depth, pose = predicted(win)
    calls = []

    class Model(torch.nn.Module):
        def forward(self, images):
            calls.append(tuple(images.shape))
            return SimpleNamespace(depth=torch.from_numpy(depth)[None], cam_to_world=torch.from_numpy(pose)[None])

    model = Model().train()
    names = picture_snapshot(model, [win, win, win], "cpu", tmp_path, "step-000000001")
    assert names == ["step-000000001.depth.png", "step-000000001.trajectory.png"]
    assert calls == [(1, V, 3, H, W)] and model.training


def test_report_page_is_self_contained(tmp_path):
    weak = make_run(tmp_path / "weak", [25, 50, 75, 100], pictures=True, slope=-0.03)
    sup = make_run(tmp_path / "supervised", [25, 50, 100], pictures=False, slope=-0.05)
    out = report.write_report(weak, [sup], tmp_path / "page" / "report.html")
    page = out.read_text()
    keys = report.metric_keys([report.load_run(weak)])
    assert len(keys) == len(TITLES) - 2
    assert page.count("<svg") == len(keys)
    assert page.count('stroke="#1f77b4"') == len(keys) and page.count('stroke="#ff7f0e"') == len(keys)
    assert page.count('stroke-dasharray="6 4"') == len(keys)  # the baseline on every chart
    assert page.count("data:image/png;base64,") == 2  # the weak run's newest pictures
    assert "pictures of step 100" in page
    assert "<script" not in page and "https://" not in page
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")


def test_report_command(tmp_path, capsys):
    run = make_run(tmp_path / "run", [10, 20], pictures=True, slope=-0.01)
    assert cli_main(["report", str(run)]) == 0
    assert capsys.readouterr().out.strip() == str(run / "report.html")
    assert (run / "report.html").stat().st_size > 1000
    assert cli_main(["report", str(tmp_path / "missing")]) == 2


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def screenshot(page: Path, shot: Path) -> np.ndarray:
    """Render ``page`` in headless Chromium into ``shot`` (1200 x 2000) and return it (BGR)."""
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={shot.parent / 'chromium-profile'}", f"--screenshot={shot}", "--window-size=1200,2000",
           "--hide-scrollbars", page.resolve().as_uri()]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    print(f"report screenshot: {shot}")
    assert shot.is_file(), f"chromium wrote no screenshot (rc {done.returncode}): {done.stderr[-2000:]}"
    image = cv2.imread(str(shot))
    assert image is not None and image.shape == (2000, 1200, 3)
    assert image.std() > 5, "blank screenshot"
    return image


def assert_curves(image: np.ndarray, colours=(("reported run (blue)", (180, 119, 31)),), *,
                  min_pixels: int = 500) -> None:
    """The curves' colours in the charts (the upper part of the page; the pictures come after
    every chart and the table); ``min_pixels`` lower for a run of one or two evaluations."""
    charts = image[:1000].astype(int)
    for name, bgr in colours:
        pixels = int((np.abs(charts - bgr).max(-1) < 40).sum())
        assert pixels > min_pixels, f"{name}: {pixels} pixels of its colour in the charts"


@pytest.mark.timeout(300)
def test_report_renders_in_headless_chromium(tmp_path):
    if chromium() is None:
        pytest.skip("chromium is not installed (Debian package `chromium`; .ci/run installs it)")
    weak = make_run(tmp_path / "weak", [25, 50, 75, 100, 125, 150, 175, 200], pictures=True, slope=-0.02)
    sup = make_run(tmp_path / "supervised", [25, 50, 100, 200], pictures=False, slope=-0.04)
    page = report.write_report(weak, [sup], tmp_path / "report.html")
    image = screenshot(page, tmp_path / "report.png")
    assert_curves(image, (("weak run (blue)", (180, 119, 31)), ("compared run (orange)", (14, 127, 255))))
