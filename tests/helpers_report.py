"""What the report and view tests share (test_report, test_view, test_pipeline): a small
evaluation window with its ground truth, a prediction of it in another gauge, and a page
rendered by headless Chromium with a check of the curves' colours in it."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np

from evaluation.datasets import EvalWindow

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
