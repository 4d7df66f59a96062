"""Poses fitted to a window's depth and verified matches (learner.posefit): exact geometry gives
the true poses whatever the poses it starts from, outliers are left out, the fit follows the
depth's scale and the first view's frame, views without matches keep their predicted pose."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evaluation import metrics
from helpers_world import apply_similarity, make_world, random_similarity, with_outliers
from labelers.matches import make_matcher, match_window
from learner.posefit import bilinear, fit_poses
from reliev3r import geometry, synthetic

# With exact depth and matches the PnP's least squares has an exact zero; Levenberg-Marquardt
# stops at a relative step of FLT_EPSILON (~1.2e-7), so rotations agree to ~1e-5 degrees and
# translations to ~1e-7 of the scene's size; the bounds leave two orders of magnitude.
ROT_TOL_DEG = 1e-3
TRANS_TOL = 1e-5


def exact_window(seed: int = 3, views: int = 4):
    """(depth [V,H,W], true poses [V,4,4], intrinsics [V,3,3], matches [K,6]) as numpy float64."""
    world = make_world(seed, views=views, height=48, width=64, per_pair=30)
    return (world["depth"][0].numpy(), world["cam_to_world"][0].numpy(), world["intrinsics"][0].numpy(),
            world["matches"][:, 1:].numpy())


def identity_start(true_poses: np.ndarray) -> np.ndarray:
    """The first view at its true pose, every other at the identity: far from the truth."""
    start = np.repeat(np.eye(4)[None], len(true_poses), 0)
    start[0] = true_poses[0]
    return start


def assert_poses_close(got: np.ndarray, want: np.ndarray, scale: float) -> None:
    got, want = torch.from_numpy(got), torch.from_numpy(want)
    rot = geometry.rotation_angle_deg(got[:, :3, :3].transpose(-1, -2) @ want[:, :3, :3])
    assert float(rot.max()) < ROT_TOL_DEG
    assert float((got[:, :3, 3] - want[:, :3, 3]).norm(dim=-1).max()) < TRANS_TOL * scale


def test_exact_depth_and_matches_give_the_true_poses_from_a_far_start():
    depth, truth, K, matches = exact_window()
    fit = fit_poses(depth, identity_start(truth), K, matches)
    assert fit.fitted.all()
    assert (fit.inliers[1:] >= 30).all()
    assert_poses_close(fit.cam_to_world, truth, scale=float(depth.mean()))


def test_outlier_matches_are_left_out():
    """30 % of the matches moved to random pixels: RANSAC leaves out those off by more than its
    threshold; the few that land within it (a 2 px disc of a 48 x 64 image, or a wrong point that
    happens to project near) move the least-squares pose by a fraction of a degree, against
    tens of degrees between the start and the truth."""
    world = make_world(5, views=4, height=48, width=64, per_pair=30)
    matches, _ = with_outliers(world, seed=1, fraction=0.3)
    depth, truth, K = world["depth"][0].numpy(), world["cam_to_world"][0].numpy(), world["intrinsics"][0].numpy()
    fit = fit_poses(depth, identity_start(truth), K, matches[:, 1:].numpy())
    assert fit.fitted.all()
    rot, trans = metrics.pairwise_pose_errors(torch.from_numpy(fit.cam_to_world), torch.from_numpy(truth))
    assert float(rot.max()) < 0.5
    assert float(trans.max()) < 2.0


def test_the_fit_follows_the_depths_scale_and_the_first_views_frame():
    depth, truth, K, matches = exact_window(seed=7)
    s, R, t = random_similarity(11)
    moved_depth, moved = apply_similarity(torch.from_numpy(depth), torch.from_numpy(truth), s, R, t)
    fit = fit_poses(moved_depth.numpy(), identity_start(moved.numpy()), K, matches)
    assert fit.fitted.all()
    assert_poses_close(fit.cam_to_world, moved.numpy(), scale=s * float(depth.mean()))


def test_a_view_without_matches_keeps_its_predicted_pose():
    depth, truth, K, matches = exact_window(seed=9)
    alone = 2
    kept = matches[(matches[:, 0] != alone) & (matches[:, 1] != alone)]
    start = identity_start(truth)
    start[alone, :3, 3] = (1.0, 2.0, 3.0)
    fit = fit_poses(depth, start, K, kept)
    assert fit.fitted.tolist() == [True, True, False, True]
    assert fit.inliers[alone] == 0
    np.testing.assert_array_equal(fit.cam_to_world[alone], start[alone])
    others = [0, 1, 3]
    assert_poses_close(fit.cam_to_world[others], truth[others], scale=float(depth.mean()))


def test_a_view_that_shares_nothing_with_the_first_is_placed_through_the_others():
    depth, truth, K, matches = exact_window(seed=13)
    apart = ((matches[:, 0] == 0) & (matches[:, 1] == 3)) | ((matches[:, 0] == 3) & (matches[:, 1] == 0))
    fit = fit_poses(depth, identity_start(truth), K, matches[~apart])
    assert fit.fitted.all()
    assert_poses_close(fit.cam_to_world, truth, scale=float(depth.mean()))


def test_too_few_inliers_keep_the_prediction_and_bad_settings_are_refused():
    depth, truth, K, matches = exact_window(seed=17)
    start = identity_start(truth)
    fit = fit_poses(depth, start, K, matches, min_inliers=10_000)
    assert fit.fitted.tolist() == [True, False, False, False]
    np.testing.assert_array_equal(fit.cam_to_world, start)
    empty = fit_poses(depth, start, K, np.zeros((0, 7)))
    assert empty.fitted.tolist() == [True, False, False, False]
    for bad in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="threshold_px"):
            fit_poses(depth, start, K, matches, threshold_px=bad)
    with pytest.raises(ValueError, match="min_inliers"):
        fit_poses(depth, start, K, matches, min_inliers=3)


def test_matches_on_invalid_depth_are_not_lifted():
    depth, truth, K, matches = exact_window(seed=19)
    spoiled = depth.copy()
    spoiled[0] = 0.0  # the first view has no depth: its matches lift nothing
    spoiled[1, ::2] = np.nan
    fit = fit_poses(spoiled, identity_start(truth), K, matches)
    assert np.isfinite(fit.cam_to_world).all()


def test_bilinear_matches_the_geometry_convention():
    rng = np.random.default_rng(0)
    depth = rng.uniform(1, 5, (7, 9))
    xy = np.c_[rng.uniform(-1, 10, 50), rng.uniform(-1, 8, 50)]
    want = geometry.sample_bilinear(torch.from_numpy(depth), torch.from_numpy(xy)).numpy()
    np.testing.assert_allclose(bilinear(depth, xy), want, rtol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_rendered_scene_with_sift_matches_and_true_depth(seed):
    """The real path: SIFT matches of a ray-cast room (four views two frames apart), verified as
    the labelers verify them, and its true depth. Every view is placed; the matches' sub-pixel
    noise, not the solver, bounds the error: rotations within a degree, camera centres within 2 %
    of the scene's mean depth (the views lie 4-9 % of it apart; 0.2-0.7 % measured)."""
    scene = synthetic.render_scene(seed, frames=40, height=96, width=128, select=[0, 2, 4, 6])
    matches, _ = match_window(scene.images.numpy(), make_matcher("sift"), long_pairs=16, min_matches=8,
                              max_matches_per_pair=4096, threshold_px=1.0)
    truth = scene.cam_to_world.double().numpy()
    depth = scene.depth.double().numpy()
    fit = fit_poses(depth, identity_start(truth), scene.intrinsics.double().expand(4, 3, 3).numpy(), matches)
    assert fit.fitted.all()
    rot, _ = metrics.pairwise_pose_errors(torch.from_numpy(fit.cam_to_world), torch.from_numpy(truth))
    assert float(rot.max()) < 1.0
    centres = np.linalg.norm(fit.cam_to_world[:, :3, 3] - truth[:, :3, 3], axis=1)
    assert centres.max() < 0.02 * depth[depth > 0].mean()
