"""The matches of ``reliev3r eval``, the evaluator and ``reliev3r reconstruct`` are found on the
window's views at 640 pixels on the long side (``labelers.matches.match_size``) and brought to the
model's pixels (``reliev3r.imaging.rescale_matches``): exact maps between the two sizes'
pixels, windows that carry their views at both sizes, and matches on real 7-Scenes frames that
land where the ground truth puts them."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from evaluation.baselines import window_matches
from evaluation.datasets import load_windows
from labelers.config import LabelerConfig
from labelers.matches import MATCH_LONG_SIDE, match_size
from reliev3r import imaging
from tests.helpers_world import write_7scenes

KITCHEN = Path(__file__).resolve().parents[2] / "shared" / "data" / "7scenes-redkitchen"
SEVEN_SCENES_K = np.array([[585.0, 0, 320], [0, 585, 240], [0, 0, 1]])


def project(K: np.ndarray, points: np.ndarray) -> np.ndarray:
    uv = points @ K.T
    return uv[:, :2] / uv[:, 2:]


@pytest.mark.parametrize("model", [(64, 96), (168, 224), (48, 64), (90, 120)])
def test_rescaled_matches_are_the_points_projected_at_the_other_size(model):
    """Points seen by a 640x480 camera, projected into the views fitted to the match size and to
    the model's size (``fit_intrinsics``: resize and centre crop, rounded as the frames are): the
    pixels at the match size, rescaled, are the model-size pixels (float64 maps, float32 rows:
    1e-3 px); the view indices and scores are kept, and each view uses its own intrinsics."""
    rng = np.random.default_rng(0)
    big = match_size(*model)
    cameras = [SEVEN_SCENES_K, np.array([[640.0, 0, 318], [0, 642, 243], [0, 0, 1]])]  # one per view
    small_K = np.stack([imaging.fit_intrinsics(K, 480, 640, *model) for K in cameras]).astype(np.float64)
    big_K = np.stack([imaging.fit_intrinsics(K, 480, 640, *big) for K in cameras]).astype(np.float64)
    points = np.column_stack([rng.uniform(-1, 1, 50), rng.uniform(-0.7, 0.7, 50), rng.uniform(1, 4, 50)])
    i = np.array([0, 1] * 25)
    j = 1 - i

    def pixels(Ks, views):  # each point in the view its row names
        return np.where((views == 0)[:, None], project(Ks[0], points), project(Ks[1], points))

    rows = np.column_stack([i, j, pixels(big_K, i), pixels(big_K, j), rng.uniform(0, 1, 50)]).astype(np.float32)
    out = imaging.rescale_matches(rows, big_K, small_K)
    np.testing.assert_allclose(out[:, 2:4], pixels(small_K, i), atol=1e-3)
    np.testing.assert_allclose(out[:, 4:6], pixels(small_K, j), atol=1e-3)
    np.testing.assert_array_equal(out[:, [0, 1, 6]], rows[:, [0, 1, 6]])
    assert imaging.rescale_matches(np.zeros((0, 7), np.float32), big_K, small_K).shape == (0, 7)


def test_match_size_keeps_the_aspect_at_640_on_the_long_side():
    assert MATCH_LONG_SIDE == 640
    assert match_size(64, 96) == (427, 640)
    assert match_size(168, 224) == (480, 640)
    assert match_size(240, 180) == (640, 480)
    assert match_size(480, 640) is None and match_size(518, 700) is None  # the model's own frames


def test_eval_windows_carry_their_views_at_the_match_size(tmp_path):
    """A window carries its views fitted to the match size from the frames as recorded (enlarged
    here: 60x80 to 480x640) and their intrinsics, as ``fit_image``/``fit_intrinsics`` give them;
    a model reading 640 pixels on the long side matches its own frames (None)."""
    seq = write_7scenes(tmp_path / "seq", 8)
    (win, *_) = load_windows(f"7scenes:{seq}", views=2, height=24, width=36, windows=1, stride=2, run_dir=tmp_path)
    recorded = cv2.cvtColor(imaging.read_image(seq / "frame-000000.color.jpg"), cv2.COLOR_BGR2RGB)
    K = np.array([[70.0, 0, 39.5], [0, 70, 29.5], [0, 0, 1]])
    assert win.match_images.shape == (2, 427, 640, 3)
    np.testing.assert_array_equal(win.match_images[0], imaging.fit_image(recorded, 427, 640))
    np.testing.assert_allclose(win.match_intrinsics[0], imaging.fit_intrinsics(K, 60, 80, 427, 640), rtol=1e-6)
    frames, intrinsics = win.matching()
    assert frames is win.match_images and intrinsics is win.match_intrinsics
    row = np.array([[0, 1, *intrinsics[0, :2, 2], *intrinsics[1, :2, 2], 1.0]], np.float32)  # principal points
    np.testing.assert_allclose(win.in_model_pixels(row)[0, 2:6], [*win.intrinsics[0, :2, 2], *win.intrinsics[1, :2, 2]],
                               atol=1e-4)
    (own, *_) = load_windows(f"7scenes:{seq}", views=2, height=480, width=640, windows=1, stride=2, run_dir=tmp_path)
    assert own.match_images is None and own.matching()[0] is own.images
    assert own.in_model_pixels(row) is row


@pytest.mark.skipif(not KITCHEN.is_dir(), reason=f"7-Scenes frames absent ({KITCHEN})")
def test_matches_found_at_640_land_where_the_ground_truth_puts_them_in_the_models_pixels(tmp_path):
    """Real 7-Scenes frames (640x480) in windows for a 48x64 model: the verified SIFT matches
    found at 480x640, brought to the model's pixels, agree with the ground-truth depth and poses
    there (median reprojection error under a model pixel: a map that missed the crop or the
    scale would be tens of pixels off); the essential-matrix baseline solves them at the match
    size's intrinsics."""
    from evaluation.baselines import classical_pose_baseline

    windows = load_windows(f"7scenes:{KITCHEN}@0-60", views=2, height=48, width=64, windows=3, stride=10,
                           run_dir=tmp_path)
    found = window_matches(windows, LabelerConfig())
    errors = []
    for win, matches in zip(windows, found):
        assert win.match_images.shape[1:3] == (480, 640) and len(matches) > 100
        m = win.in_model_pixels(matches)
        rows, cols = (np.clip(np.round(m[:, c]).astype(int), 0, n - 1) for c, n in ((3, 48), (2, 64)))
        z = win.gt_depth[0][rows, cols]
        ok = z > 0
        rays = np.linalg.solve(win.intrinsics[0].astype(np.float64), np.stack([m[ok, 2], m[ok, 3], np.ones(ok.sum())]))
        a_to_b = np.linalg.inv(win.gt_cam_to_world[1].astype(np.float64)) @ win.gt_cam_to_world[0]
        q = win.intrinsics[1].astype(np.float64) @ (a_to_b[:3, :3] @ (rays * z[ok]) + a_to_b[:3, 3:])
        errors.append(np.hypot(q[0] / q[2] - m[ok, 4], q[1] / q[2] - m[ok, 5]))
    assert np.median(np.concatenate(errors)) < 1.0
    assert classical_pose_baseline(windows, LabelerConfig(), matches=found)["rra30"] == 1.0
