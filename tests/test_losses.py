"""Known answers and properties of the Reliev3R losses on a small synthetic world (CPU)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from learner.config import LossConfig, RefineConfig
from learner.losses import (
    median_mad_normalize,
    relative_depth_loss,
    reprojection_loss,
    robust_angle_cost,
    gradient_share,
    shape_damped,
    supervised_loss,
    teacher_aligned_depth,
    weighted_median,
)
from learner.model import view_depth
from learner.objective import compute_loss, weighted_loss
from learner.refinement import refine_geometry, refined_geometry_loss
from reliev3r import geometry
from tests.helpers_world import (F64, apply_similarity, assert_finite_grads, make_world, perturbed, random_similarity,
                                 with_outliers)


# ---------------------------------------------------------------------------------------------
# Weighted median / MAD: known answers.
# ---------------------------------------------------------------------------------------------

def numpy_weighted_median(x: np.ndarray, w: np.ndarray) -> float:
    order = np.argsort(x, kind="stable")
    cum = np.cumsum(w[order])
    return float(x[order][np.searchsorted(cum, 0.5 * cum[-1], side="left")])


def test_weighted_median_hand_example():
    x = torch.tensor([[3.0, 1.0, 10.0, 2.0]], dtype=F64)
    w = torch.tensor([[1.0, 1.0, 5.0, 1.0]], dtype=F64)
    assert weighted_median(x, w).item() == 10.0
    # mad = (7 + 9 + 0 + 8) / 8 = 3
    expected = (x - 10.0) / 3.0
    torch.testing.assert_close(median_mad_normalize(x, w), expected)
    # Zero weights are excluded: the median of {1, 2} (lower) is 1.
    assert weighted_median(x, torch.tensor([[0.0, 1.0, 0.0, 1.0]], dtype=F64)).item() == 1.0


def test_weighted_median_and_mad_match_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 37))
    w = rng.uniform(0.0, 2.0, size=(6, 37)) * (rng.uniform(size=(6, 37)) > 0.3)
    med = weighted_median(torch.from_numpy(x), torch.from_numpy(w))[:, 0].numpy()
    gamma = median_mad_normalize(torch.from_numpy(x), torch.from_numpy(w)).numpy()
    for row in range(6):
        m = numpy_weighted_median(x[row], w[row])
        assert med[row] == m
        mad = np.sum(w[row] * np.abs(x[row] - m)) / np.sum(w[row])
        np.testing.assert_allclose(gamma[row], (x[row] - m) / mad, rtol=1e-12)


def test_normalize_is_affine_invariant_and_guards_constant_maps():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 50, generator=g, dtype=F64)
    w = torch.rand(3, 50, generator=g, dtype=F64)
    torch.testing.assert_close(median_mad_normalize(7.5 * x - 3.0, w), median_mad_normalize(x, w))
    const = torch.full((2, 20), 4.0, requires_grad=True)
    out = median_mad_normalize(const, torch.ones(2, 20))
    assert torch.equal(out, torch.zeros(2, 20))
    out.sum().backward()
    assert torch.isfinite(const.grad).all()


# ---------------------------------------------------------------------------------------------
# Relative depth loss.
# ---------------------------------------------------------------------------------------------

def depth_case(seed: int = 0, *, b: int = 2, v: int = 3, h: int = 12, w: int = 16):
    g = torch.Generator().manual_seed(seed)
    depth = 1.0 + 3.0 * torch.rand(b, v, h, w, generator=g, dtype=F64)
    conf = 0.1 + 1.8 * torch.rand(b, v, h, w, generator=g, dtype=F64)
    valid = torch.rand(b, v, h, w, generator=g) > 0.2
    a = 0.1 + 5 * torch.rand(b, v, 1, 1, generator=g, dtype=F64)
    shift = 10 * torch.randn(b, v, 1, 1, generator=g, dtype=F64)
    return depth, conf, valid, a, shift, g


@pytest.mark.parametrize("space", ["depth", "disparity"])
def test_depth_loss_zero_for_affine_teacher(space):
    depth, _, valid, a, shift, _ = depth_case()
    teacher = a * depth + shift if space == "depth" else a / depth + shift
    ones = torch.ones_like(depth)
    loss = relative_depth_loss(depth, teacher, ones, valid, teacher_space=space)
    assert abs(loss.item()) < 1e-5
    # And a wrong space is not zero: the loss does see the shape of the map.
    other = "disparity" if space == "depth" else "depth"
    assert relative_depth_loss(depth, teacher, ones, valid, teacher_space=other).item() > 0.05


def test_depth_loss_invariances():
    depth, conf, valid, a, shift, g = depth_case(1)
    teacher = depth * (1 + 0.3 * torch.randn(depth.shape, generator=g, dtype=F64)).abs()
    base = relative_depth_loss(depth, teacher, conf, valid).item()
    assert base > 0
    s, R, t = random_similarity(3)
    # Window similarity (depth * s) and any per-view scale of the prediction.
    assert relative_depth_loss(s * depth, teacher, conf, valid).item() == pytest.approx(base, rel=1e-5)
    assert relative_depth_loss(a * depth, teacher, conf, valid).item() == pytest.approx(base, rel=1e-5)
    # Per-view teacher scale and shift.
    assert relative_depth_loss(depth, a * teacher + shift, conf, valid).item() == pytest.approx(base, rel=1e-5)
    # Disparity mode: per-view teacher scale and shift of its disparity.
    disp = 1 / teacher
    base_d = relative_depth_loss(depth, disp, conf, valid, teacher_space="disparity").item()
    moved = relative_depth_loss(s * depth, a * disp + shift, conf, valid, teacher_space="disparity").item()
    assert moved == pytest.approx(base_d, rel=1e-5)


def test_depth_loss_grows_with_perturbation():
    depth, _, valid, _, _, g = depth_case(2)
    noise = torch.randn(depth.shape, generator=g, dtype=F64)
    ones = torch.ones_like(depth)
    losses = [relative_depth_loss(depth * torch.exp(eps * noise), depth, ones, valid).item()
              for eps in (0.0, 0.02, 0.05, 0.1, 0.2, 0.4)]
    assert losses[0] < 1e-6
    assert all(b > a for a, b in zip(losses, losses[1:])), losses


def test_depth_loss_confidence_gradient_known_answer():
    # d/dW of (W r − alpha log W) / n = (r − alpha / W) / n: W = alpha / r is the optimum.
    depth, conf, valid, _, _, g = depth_case(3, b=1, v=1)
    teacher = depth + 0.5 * torch.randn(depth.shape, generator=g, dtype=F64)
    conf = conf.clone().requires_grad_(True)
    alpha = 0.7
    loss = relative_depth_loss(depth, teacher, conf, valid, alpha=alpha)
    loss.backward()
    w = conf.detach().flatten(-2)[0]
    mask = valid.flatten(-2)[0]
    r = (median_mad_normalize(depth.flatten(-2)[0], w * mask)
         - median_mad_normalize(teacher.flatten(-2)[0], w * mask)).abs()
    n = mask.sum()
    expected = torch.where(mask, (r - alpha / w) / n, torch.zeros_like(r))
    torch.testing.assert_close(conf.grad.flatten(-2)[0], expected)


def test_depth_loss_too_few_valid_pixels_is_connected_zero():
    depth = (1 + torch.rand(1, 2, 8, 8)).requires_grad_(True)
    conf = torch.ones(1, 2, 8, 8, requires_grad=True)
    teacher = torch.full((1, 2, 8, 8), float("nan"))
    valid = torch.zeros(1, 2, 8, 8, dtype=torch.bool)
    valid[0, 0, 0, :5] = True
    teacher[valid] = 1.0
    loss = relative_depth_loss(depth, teacher, conf, valid)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(depth.grad, torch.zeros_like(depth))
    assert torch.equal(conf.grad, torch.zeros_like(conf))


def test_depth_loss_ignores_invalid_nonfinite_teacher_and_skips_small_views():
    depth, conf, valid, a, shift, _ = depth_case(4)
    teacher = a * depth + shift
    teacher[~valid] = float("inf")
    valid[0, 1] = False
    valid[0, 1, 0, :3] = True  # too few pixels: this view is skipped
    depth = depth.clone().requires_grad_(True)
    loss = relative_depth_loss(depth, teacher, torch.ones_like(depth), valid)
    loss.backward()
    assert abs(loss.item()) < 1e-5
    assert_finite_grads(depth)


# ---------------------------------------------------------------------------------------------
# Reprojection (angle) loss.
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("robust", ["none", "cauchy", "geman_mcclure"])
def test_reprojection_zero_for_exact_geometry(robust):
    world = make_world(0, batch=2)
    assert world["matches"].shape[0] >= 150
    loss = reprojection_loss(world["depth"], world["cam_to_world"], world["intrinsics"], world["matches"],
                             robust=robust)
    assert abs(loss.item()) < 1e-10
    # In fp32 too.
    w32 = {k: v.float() for k, v in world.items()}
    loss32 = reprojection_loss(w32["depth"], w32["cam_to_world"], w32["intrinsics"], w32["matches"], robust=robust)
    assert abs(loss32.item()) < 1e-5


@pytest.mark.parametrize("seed", [0, 1])
def test_reprojection_invariant_to_window_similarity(seed):
    world = make_world(10 + seed)
    depth, poses = perturbed(world, seed)
    base = reprojection_loss(depth, poses, world["intrinsics"], world["matches"])
    assert base.item() > 1e-4
    s, R, t = random_similarity(seed)
    depth2, poses2 = apply_similarity(depth, poses, s, R, t)
    moved = reprojection_loss(depth2, poses2, world["intrinsics"], world["matches"])
    assert moved.item() == pytest.approx(base.item(), rel=1e-5)


def test_reprojection_grows_with_translation_and_per_view_depth_scale_errors():
    world = make_world(2)
    args = (world["intrinsics"], world["matches"])
    direction = torch.tensor([0.6, -0.3, 0.74], dtype=F64)
    trans, scale = [], []
    for eps in (0.0, 0.02, 0.05, 0.1, 0.2):
        poses = world["cam_to_world"].clone()
        poses[0, 1, :3, 3] += eps * direction
        trans.append(reprojection_loss(world["depth"], poses, *args).item())
        depth = world["depth"].clone()
        depth[0, 2] *= 1 + eps  # a per-frame scale error: invisible to the depth loss
        scale.append(reprojection_loss(depth, world["cam_to_world"], *args).item())
    for series in (trans, scale):
        assert series[0] < 1e-10
        assert all(b > a for a, b in zip(series, series[1:])), series


def test_reprojection_per_view_scale_unobservable_without_parallax():
    # Pure rotation about a shared centre: every per-view depth scale fits every match.
    world = make_world(3, baseline=0.0)
    g = torch.Generator().manual_seed(0)
    depth = world["depth"] * (0.2 + 3 * torch.rand(1, 4, 1, 1, generator=g, dtype=F64))
    loss = reprojection_loss(depth, world["cam_to_world"], world["intrinsics"], world["matches"])
    assert abs(loss.item()) < 1e-10
    # The same scale error with parallax is seen.
    world = make_world(3)
    loss = reprojection_loss(world["depth"] * torch.tensor([1.0, 1.5, 1.0, 1.0], dtype=F64)[:, None, None],
                             world["cam_to_world"], world["intrinsics"], world["matches"])
    assert loss.item() > 1e-4  # small: the angle signal scales with baseline / depth


def test_reprojection_finite_when_points_fall_behind_cameras():
    world = make_world(4)
    poses = world["cam_to_world"].clone()
    flip = geometry.axis_angle_to_matrix(torch.tensor([0.0, math.pi, 0.0], dtype=F64))
    poses[0, 1, :3, :3] = poses[0, 1, :3, :3] @ flip  # camera 1 now looks backwards
    poses[0, 2, :3, 3] = poses[0, 3, :3, 3]  # two coincident centres
    depth = world["depth"].clone()
    depth[0, 3] = 1e-12  # points at the camera centre
    depth.requires_grad_(True)
    poses.requires_grad_(True)
    for robust in ("none", "cauchy", "geman_mcclure"):
        loss = reprojection_loss(depth, poses, world["intrinsics"], world["matches"], robust=robust)
        assert torch.isfinite(loss) and loss.item() > 0.01
        depth.grad = poses.grad = None
        loss.backward()
        assert_finite_grads(depth, poses)


def test_reprojection_half_outliers_finite_and_scores_silence_them():
    world = make_world(5)
    matches, bad = with_outliers(world, 0)
    depth = world["depth"].clone().requires_grad_(True)
    poses = world["cam_to_world"].clone().requires_grad_(True)
    loss = reprojection_loss(depth, poses, world["intrinsics"], matches)
    assert loss.item() > 1e-3
    loss.backward()
    assert_finite_grads(depth, poses)
    scores = torch.ones(matches.shape[0], dtype=F64)
    scores[bad] = 0
    silenced = reprojection_loss(world["depth"], world["cam_to_world"], world["intrinsics"], matches, scores)
    assert abs(silenced.item()) < 1e-10
    # Weighted mean: scaling every score changes nothing.
    a = reprojection_loss(world["depth"], world["cam_to_world"], world["intrinsics"], matches, scores + 0.3)
    b = reprojection_loss(world["depth"], world["cam_to_world"], world["intrinsics"], matches, 7 * (scores + 0.3))
    assert a.item() == pytest.approx(b.item(), rel=1e-12)


def test_robust_cost_bounds_influence_in_angle():
    theta = torch.linspace(1e-4, math.pi, 2001, dtype=F64, requires_grad=True)
    one_minus_cos = 1 - torch.cos(theta)
    for scale_deg in (5.0, 10.0, 30.0):
        grad, = torch.autograd.grad(robust_angle_cost(one_minus_cos, robust="cauchy", scale_deg=scale_deg).sum(),
                                    theta, retain_graph=True)
        assert grad.min() >= 0  # monotone in the angle: never rewards a worse angle
        assert grad.max() <= math.radians(scale_deg) / 2 * 1.01
        # Small angles: equal to the plain cost.
        small = robust_angle_cost(torch.tensor(1e-6, dtype=F64), robust="cauchy", scale_deg=scale_deg)
        assert small.item() == pytest.approx(1e-6, rel=1e-3)
    grad_none, = torch.autograd.grad(one_minus_cos.sum(), theta)
    assert grad_none.max() == pytest.approx(1.0, rel=1e-3)  # sin(90°): plain cost is not robust


def test_outlier_gradient_is_bounded_by_robust_cost():
    # One gross outlier among inliers: its pull on the poses is much weaker under the Cauchy
    # cost than under the plain cost, and it does not grow as the outlier gets worse.
    world = make_world(6)
    k = world["matches"].shape[0]

    def pose_grad(robust, outlier_shift):
        matches = world["matches"].clone()
        matches[0, 5] = (matches[0, 5] + outlier_shift) % 31
        poses = world["cam_to_world"].clone().requires_grad_(True)
        reprojection_loss(world["depth"], poses, world["intrinsics"], matches, robust=robust,
                          scale_deg=5.0).backward()
        return poses.grad.norm().item() * k  # undo the 1/K of the mean

    for shift in (10.0, 15.0):
        assert pose_grad("cauchy", shift) < 0.2 * pose_grad("none", shift)
    assert pose_grad("cauchy", 15.0) < 2 * pose_grad("cauchy", 5.0)


def test_reprojection_zero_matches_is_connected_zero():
    world = make_world(7)
    depth = world["depth"].clone().requires_grad_(True)
    poses = world["cam_to_world"].clone().requires_grad_(True)
    loss = reprojection_loss(depth, poses, world["intrinsics"], torch.zeros(0, 7, dtype=F64))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(depth.grad, torch.zeros_like(depth))
    assert torch.equal(poses.grad, torch.zeros_like(poses))


def test_gradient_descent_reduces_reprojection_loss():
    torch.manual_seed(0)
    world = make_world(8, views=3, dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    log_depth = (world["depth"].log() + 0.1 * torch.randn(world["depth"].shape, generator=g)).requires_grad_(True)
    rot = (0.03 * torch.randn(1, 3, 3, generator=g)).requires_grad_(True)
    trans = (0.1 * torch.randn(1, 3, 3, generator=g)).requires_grad_(True)
    opt = torch.optim.Adam([log_depth, rot, trans], lr=5e-3)

    def loss_fn():
        poses = world["cam_to_world"].clone()
        poses = torch.cat((torch.cat((geometry.axis_angle_to_matrix(rot) @ poses[..., :3, :3],
                                      (poses[..., :3, 3] + trans)[..., None]), -1), poses[..., 3:, :]), -2)
        return reprojection_loss(log_depth.exp(), poses, world["intrinsics"], world["matches"])

    first = loss_fn().item()
    for _ in range(150):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
    last = loss_fn().item()
    assert last < 0.2 * first, (first, last)


# ---------------------------------------------------------------------------------------------
# Supervised sibling.
# ---------------------------------------------------------------------------------------------

def test_supervised_zero_for_ground_truth_and_similarity_invariant():
    world = make_world(9, batch=2, per_pair=1)
    gt_depth, gt_poses = world["depth"], world["cam_to_world"]
    valid = torch.ones_like(gt_depth, dtype=torch.bool)
    assert abs(supervised_loss(gt_depth, gt_poses, gt_depth, gt_poses, valid).item()) < 1e-5
    s, R, t = random_similarity(4)
    d2, p2 = apply_similarity(gt_depth, gt_poses, s, R, t)
    assert abs(supervised_loss(d2, p2, gt_depth, gt_poses, valid).item()) < 1e-5
    depth, poses = perturbed(world, 2)
    base = supervised_loss(depth, poses, gt_depth, gt_poses, valid)
    assert base.item() > 1e-3
    d3, p3 = apply_similarity(depth, poses, s, R, t)
    assert supervised_loss(d3, p3, gt_depth, gt_poses, valid).item() == pytest.approx(base.item(), rel=1e-5)
    # Permutation of the views (no reference view): same loss.
    perm = torch.tensor([2, 0, 3, 1])
    permuted = supervised_loss(depth[:, perm], poses[:, perm], gt_depth[:, perm], gt_poses[:, perm], valid)
    assert permuted.item() == pytest.approx(base.item(), rel=1e-9)


def test_supervised_window_without_enough_depth_weighs_nothing():
    """A window with fewer than ``min_valid`` known depths adds to neither term and gets a zero
    gradient (weighted, not indexed away: the step stays recordable as a CUDA graph); with no
    such window the loss is 0, its gradient 0 and finite."""
    world = make_world(9, batch=2, per_pair=1)
    gt_depth, gt_poses = world["depth"], world["cam_to_world"]
    depth, poses = perturbed(world, 2)
    valid = torch.ones_like(gt_depth, dtype=torch.bool)
    valid[1] = False
    valid[1, 0, 0, :3] = True  # 3 pixels: under min_valid
    alone = supervised_loss(depth[:1], poses[:1], gt_depth[:1], gt_poses[:1], valid[:1])
    depth, poses = depth.clone().requires_grad_(True), poses.clone().requires_grad_(True)
    both = supervised_loss(depth, poses, gt_depth, gt_poses, valid)
    assert both.item() == pytest.approx(alone.item(), rel=1e-12)
    both.backward()
    assert depth.grad[1].abs().max() == 0 and poses.grad[1].abs().max() == 0
    assert depth.grad[0].abs().max() > 0
    depth.grad = poses.grad = None
    none = supervised_loss(depth, poses, gt_depth, gt_poses, torch.zeros_like(valid))
    assert none.item() == 0
    none.backward()
    assert_finite_grads(depth, poses)
    assert depth.grad.abs().max() == 0 and poses.grad.abs().max() == 0


def test_supervised_grows_with_pose_error_and_is_finite_at_optimum():
    world = make_world(11, per_pair=1)
    gt_depth, gt_poses = world["depth"], world["cam_to_world"]
    valid = gt_depth > 0
    losses = []
    for eps in (0.0, 0.05, 0.1, 0.3):
        poses = gt_poses.clone()
        poses[0, 1, :3, 3] += eps
        losses.append(supervised_loss(gt_depth, poses, gt_depth, gt_poses, valid).item())
    assert all(b > a for a, b in zip(losses, losses[1:])), losses
    depth = gt_depth.clone().requires_grad_(True)
    poses = gt_poses.clone().requires_grad_(True)
    supervised_loss(depth, poses, gt_depth, gt_poses, valid).backward()
    assert_finite_grads(depth, poses)


# ---------------------------------------------------------------------------------------------
# Teacher map in the prediction's per-view scale and shift (match terms' depth option).
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("space", ["depth", "disparity"])
def test_teacher_aligned_depth_returns_the_prediction_when_it_is_affine_in_the_teacher(space):
    depth, _, valid, a, shift, g = depth_case(3)
    teacher = a * depth + shift if space == "depth" else a / depth + shift
    teacher = teacher - teacher.amin((-2, -1), keepdim=True) + 0.1  # a teacher's map is > 0
    out = teacher_aligned_depth(depth, teacher, valid, teacher_space=space)
    torch.testing.assert_close(out, depth, rtol=1e-9, atol=1e-9)


def test_teacher_aligned_depth_takes_shape_from_teacher_and_scale_shift_from_prediction():
    depth, _, valid, a, shift, g = depth_case(4)
    shape = depth.clone()  # the true shape
    teacher = 0.5 * shape + 2.0
    # The prediction: the true shape in its own per-view scale and shift, plus zero-mean noise.
    noise = 0.2 * torch.randn(depth.shape, generator=g, dtype=F64)
    pred = a * shape + a.abs() * 0.1 + noise * a
    out = teacher_aligned_depth(pred, teacher, valid)
    expected_fit = a * shape + a.abs() * 0.1  # least squares recovers the scale/shift, not the noise
    err = (out - expected_fit)[valid].abs().max() / expected_fit.abs().max()
    assert err < 0.05
    # Invalid teacher pixels keep the prediction; the map scales with the prediction.
    torch.testing.assert_close(out[~valid], pred[~valid])
    torch.testing.assert_close(teacher_aligned_depth(3.0 * pred, teacher, valid), 3.0 * out)


def test_teacher_aligned_depth_gradient_reaches_only_per_view_scale_and_shift():
    depth, _, valid, a, shift, g = depth_case(5, b=1, v=2)
    teacher = 2.0 * depth + 1.0
    pred = (depth * (1 + 0.1 * torch.randn(depth.shape, generator=g, dtype=F64))).requires_grad_(True)
    out = teacher_aligned_depth(pred, teacher, valid)
    out[0, 0, 3, 4].backward()  # one pixel of view 0 (a valid one, checked below)
    assert bool(valid[0, 0, 3, 4])
    grad = pred.grad
    assert torch.isfinite(grad).all()
    assert torch.count_nonzero(grad[0, 1]) == 0  # view 1 is untouched
    # d out / d pred = d(a T + b)/d pred: affine in T over the valid pixels, zero elsewhere.
    g0 = grad[0, 0]
    assert torch.count_nonzero(g0[~valid[0, 0]]) == 0
    t = teacher[0, 0][valid[0, 0]]
    coef = torch.linalg.lstsq(torch.stack((t, torch.ones_like(t)), 1), g0[valid[0, 0]][:, None]).solution
    torch.testing.assert_close(coef[0, 0] * t + coef[1, 0], g0[valid[0, 0]])
    assert float(g0[valid[0, 0]].sum()) == pytest.approx(1.0)  # shifting pred by c shifts out by c


def test_teacher_aligned_depth_falls_back_to_prediction_when_teacher_cannot_help():
    depth, _, valid, _, _, g = depth_case(6, b=1, v=3)
    teacher = depth.clone()
    teacher[0, 0] = 1.0 / depth[0, 0]  # anti-correlated with the prediction: slope < 0
    teacher[0, 1] = 5.0  # flat: no shape
    teacher[0, 2, :, :] = float("nan")  # no valid pixel
    out = teacher_aligned_depth(depth, teacher, valid)
    torch.testing.assert_close(out, depth)
    with pytest.raises(ValueError, match="teacher_space"):
        teacher_aligned_depth(depth, teacher, valid, teacher_space="inverse")


# ---------------------------------------------------------------------------------------------
# Self-refinement: bundle adjustment of the prediction under the match terms, and the pull
# towards it.
# ---------------------------------------------------------------------------------------------

def mean_pose_errors(poses, gt):
    from evaluation.metrics import pairwise_pose_errors

    errs = [pairwise_pose_errors(poses[b], gt[b]) for b in range(gt.shape[0])]
    return (sum(float(e[0].mean()) for e in errs) / len(errs), sum(float(e[1].mean()) for e in errs) / len(errs))


@pytest.mark.parametrize("solver,steps,tol", [("adam", 100, (0.5, 2.0, 0.01)), ("lm", 4, (1e-3, 1e-2, 1e-4))])
def test_refine_geometry_recovers_poses_and_view_scales_from_matches(solver, steps, tol):
    # Exact matches, exact depth shape but each view's scale off by ~20 %, poses off by ~5° and
    # 0.3 (depth ~3): the bundle adjustment brings back the poses and the relative view scales.
    world = make_world(0, batch=2, per_pair=20)
    g = torch.Generator().manual_seed(3)
    gt = world["cam_to_world"]
    start = gt.clone()
    start[..., :3, :3] = (geometry.axis_angle_to_matrix(0.09 * torch.randn(2, 4, 3, generator=g, dtype=F64))
                          @ gt[..., :3, :3])
    start[..., :3, 3] += 0.3 * torch.randn(2, 4, 3, generator=g, dtype=F64)
    view_scale = torch.exp(0.2 * torch.randn(2, 4, generator=g, dtype=F64))
    depth = world["depth"] * view_scale[..., None, None]
    rot0, trans0 = mean_pose_errors(start, gt)
    poses, log_scale, _ = refine_geometry(depth, start, world["intrinsics"], world["matches"], steps=steps, lr=0.01,
                                       solver=solver, compiled=False)
    rot, trans = mean_pose_errors(poses, gt)
    assert rot0 > 5 and trans0 > 20
    assert rot < tol[0] and trans < tol[1]
    residual = log_scale + view_scale.log()  # exact up to one scale per window (gauge)
    assert (residual - residual.mean(-1, keepdim=True)).abs().max() < tol[2]
    assert not poses.requires_grad and not log_scale.requires_grad
    assert torch.allclose(poses[..., 3, :], torch.tensor([0.0, 0, 0, 1], dtype=F64))


def test_refine_geometry_recovers_view_shifts_and_scales_of_an_affine_depth():
    # Each view's depth is an unknown affine map of the truth (scale ~0.5-2, shift up to 0.6 of
    # its mean, as a relative-depth teacher leaves it) and the poses are off: with shifts, the
    # search's depth exp(σ)(D + c·mean D) is the truth up to one scale per window.
    world = make_world(8, batch=2, per_pair=25)
    g = torch.Generator().manual_seed(8)
    a = torch.exp(0.7 * (torch.rand(2, 4, generator=g, dtype=F64) - 0.5))[..., None, None]
    b = 0.6 * torch.rand(2, 4, generator=g, dtype=F64)[..., None, None] * world["depth"].mean((-2, -1), keepdim=True)
    depth = a * world["depth"] + b
    start = world["cam_to_world"].clone()
    start[..., :3, 3] += 0.1 * torch.randn(2, 4, 3, generator=g, dtype=F64)
    poses, log_scale, shift = refine_geometry(depth, start, world["intrinsics"], world["matches"], steps=400,
                                              lr=0.01, shifts=True, compiled=False)
    fitted = log_scale.exp()[..., None, None] * (depth + (shift * depth.mean((-2, -1)))[..., None, None])
    ratio = fitted / world["depth"]
    spread = (ratio / ratio.flatten(1).median(-1).values[:, None, None, None] - 1).abs()
    unshifted = depth / world["depth"]
    before = (unshifted / unshifted.flatten(1).median(-1).values[:, None, None, None] - 1).abs()
    assert before.mean() > 0.1 and spread.mean() < 0.02
    rot, trans = mean_pose_errors(poses, world["cam_to_world"])
    assert rot < 0.5 and trans < 3.0
    _, _, fixed = refine_geometry(depth, start, world["intrinsics"], world["matches"], steps=20, compiled=False)
    assert torch.equal(fixed, torch.zeros_like(fixed))  # shifts stay 0 unless asked for
    with pytest.raises(ValueError, match="shifts"):
        refine_geometry(depth, start, world["intrinsics"], world["matches"], solver="lm", shifts=True, compiled=False)


def test_refine_geometry_lm_ignores_outliers_and_keeps_exact_geometry():
    # Half of the matches moved to random pixels: the IRLS weights of the robust costs keep the
    # solution at the truth (Adam's search is not so precise: see the test above).
    world = make_world(6, batch=2, per_pair=16)
    noisy, _ = with_outliers(world, 6, fraction=0.5)
    start = world["cam_to_world"].clone()
    start[..., :3, 3] += 0.2 * torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(1), dtype=F64)
    poses, log_scale, _ = refine_geometry(world["depth"], start, world["intrinsics"], noisy, steps=15,
                                       solver="lm", compiled=False)
    rot, trans = mean_pose_errors(poses, world["cam_to_world"])
    assert rot < 0.5 and trans < 3.0
    exact, _, _ = refine_geometry(world["depth"], world["cam_to_world"], world["intrinsics"], world["matches"],
                               steps=5, solver="lm", compiled=False)
    torch.testing.assert_close(exact, world["cam_to_world"], atol=1e-9, rtol=0)
    for solver, steps in (("lm", 5), ("adam", 60)):  # poses only: the depth scales stay 1
        poses, log_scale, _ = refine_geometry(world["depth"], start, world["intrinsics"], world["matches"],
                                           steps=steps, solver=solver, scales=False, compiled=False)
        assert torch.equal(log_scale, torch.zeros_like(log_scale))
        assert mean_pose_errors(poses, world["cam_to_world"])[1] < 1.0
    with pytest.raises(ValueError, match="solver"):
        refine_geometry(world["depth"], start, world["intrinsics"], world["matches"], solver="newton", compiled=False)


def test_refine_geometry_lm_survives_a_singular_system_in_float32():
    # Window 1 has matches in one view pair only, and the depth 5 % per-pixel noise: after a few
    # accepted steps the damping is so small that the float32 system (gauge and two unmatched
    # views) cannot be factorised. Found on held-out windows; the solve used to raise.
    world = make_world(1, batch=2, per_pair=15, dtype=torch.float32)
    m = world["matches"]
    one_pair = m[(m[:, 0] == 0) | ((m[:, 1] == 2) & (m[:, 2] == 3))]
    g = torch.Generator().manual_seed(1)
    depth = world["depth"] * torch.exp(0.05 * torch.randn(world["depth"].shape, generator=g))
    start = world["cam_to_world"].clone()
    start[..., :3, 3] += 0.1  # the truth, up to the gauge
    poses, log_scale, _ = refine_geometry(depth, start, world["intrinsics"], one_pair, steps=20, solver="lm",
                                          compiled=False)
    assert torch.isfinite(poses).all() and torch.isfinite(log_scale).all()
    rot, trans = mean_pose_errors(poses[:1].double(), world["cam_to_world"][:1].double())
    assert rot < 1.0 and trans < 5.0  # the noisy depth moves the poses a little, not away


def test_refine_geometry_keeps_exact_geometry_and_windows_without_matches():
    world = make_world(1, batch=2)
    m = world["matches"]
    only_first = m[m[:, 0] == 0]
    gt = world["cam_to_world"]
    # Exact geometry is the optimum: Levenberg-Marquardt, which steps along the curvature and
    # refuses a step that does not lower the cost, stays on it. The errors (degrees, up to the
    # gauge: pairwise, so one similarity per window does not count) are then the arccos floor
    # of float64, sqrt(2 * 1e-16) rad = 1e-6 deg; 1e-5 leaves ten times that.
    poses, log_scale, _ = refine_geometry(world["depth"], gt, world["intrinsics"], only_first, steps=4, solver="lm",
                                          compiled=False)
    rot, trans = mean_pose_errors(poses, gt)
    assert rot < 1e-5 and trans < 1e-5
    assert (log_scale - log_scale.mean(-1, keepdim=True)).abs().max() < 1e-9
    # Adam from exactly the optimum would follow float noise: its gradient there is ~1e-11,
    # and the normalised step m/(sqrt(v) + 1e-8) amplifies it into full-size steps whose
    # direction depends on the CPU's rounding (0.016 to 0.058 deg after 30 steps on two
    # machines). A start a hair off the optimum (window 0's views turned by 3e-3 rad) gives a
    # gradient ~1e-4, far above both the noise and Adam's eps: every step is then set by the
    # geometry, and the result is the same on any CPU to ~1e-9 deg. What is left is Adam's own
    # resolution: its normalised steps keep moving about their size around the optimum, and
    # with the step size decaying linearly to 0 the last steps are lr / steps = 1e-4 rad
    # (0.006 deg) per coordinate; the bounds below are ~8 such steps (a biased optimum, e.g.
    # a wrong eps in the costs, would move the search by its whole path, lr * steps / 2 =
    # 0.5 rad). The depth scales, searched too, stay equal up to the same resolution.
    start = gt.clone()
    turn = torch.zeros(2, 4, 3, dtype=F64)
    turn[0, :, 0] = 3e-3 * torch.tensor([1.0, -1.0, 0.5, -0.5], dtype=F64)
    turn[0, :, 1] = 3e-3 * torch.tensor([0.3, 0.6, -1.0, 0.2], dtype=F64)
    start[..., :3, :3] = geometry.axis_angle_to_matrix(turn) @ gt[..., :3, :3]
    assert mean_pose_errors(start[:1], gt[:1])[0] > 0.2
    poses, log_scale, _ = refine_geometry(world["depth"], start, world["intrinsics"], only_first, steps=100, lr=0.01,
                                          compiled=False)
    rot, trans = mean_pose_errors(poses, gt)
    assert rot < 0.05 and trans < 0.05
    assert (log_scale - log_scale.mean(-1, keepdim=True)).abs().max() < 1e-3
    moved = world["cam_to_world"].clone()
    moved[1, :, :3, 3] += 0.5  # window 1 has no matches: it keeps its poses
    poses, log_scale, _ = refine_geometry(world["depth"], moved, world["intrinsics"], only_first, steps=30,
                                          compiled=False)
    torch.testing.assert_close(poses[1], moved[1])
    empty = torch.zeros(0, 7, dtype=F64)
    poses, log_scale, _ = refine_geometry(world["depth"], moved, world["intrinsics"], empty, compiled=False)
    torch.testing.assert_close(poses, moved)
    assert torch.equal(log_scale, torch.zeros(2, 4, dtype=F64))
    with pytest.raises(ValueError, match="steps"):
        refine_geometry(world["depth"], moved, world["intrinsics"], m, steps=-1, compiled=False)


def test_refine_geometry_compiled_search_gives_the_eager_result():
    world = make_world(5, batch=2, per_pair=12, dtype=torch.float32)
    start = world["cam_to_world"].clone()
    start[..., :3, 3] += 0.3 * torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(0))
    for k in (len(world["matches"]), len(world["matches"]) - 9):  # a second match count: no recompile needed
        args = (world["depth"], start, world["intrinsics"], world["matches"][:k])
        eager = refine_geometry(*args, steps=20, compiled=False)
        compiled = refine_geometry(*args, steps=20, compiled=True)
        torch.testing.assert_close(compiled[0], eager[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(compiled[1], eager[1], atol=1e-5, rtol=0)


def test_refined_geometry_loss_zero_at_target_gauge_and_similarity_invariant():
    world = make_world(2, batch=2)
    depth, poses = perturbed(world, 2)
    target = world["cam_to_world"]
    sigma = 0.1 * torch.randn(2, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    assert float(refined_geometry_loss(depth, poses, poses, torch.zeros(2, 4, dtype=F64))) < 1e-9
    # Scaling the target's depths and translations together is gauge: it changes nothing.
    grown = poses.clone()
    grown[..., :3, 3] *= math.exp(0.7)
    assert float(refined_geometry_loss(depth, poses, grown, torch.full((2, 4), 0.7, dtype=F64))) < 1e-9
    assert float(refined_geometry_loss(depth, poses, poses, torch.full((2, 4), 0.7, dtype=F64))) > 1e-2
    base = refined_geometry_loss(depth, poses, target, sigma)
    assert float(base) > 1e-3
    for seed in (0, 1):
        s, R, t = random_similarity(seed)  # the whole window, prediction and its target alike
        d2, p2 = apply_similarity(depth, poses, s, R, t)
        _, target2 = apply_similarity(depth, target, s, R, t)
        torch.testing.assert_close(refined_geometry_loss(d2, p2, target2, sigma), base, rtol=1e-9, atol=1e-12)
        _, R3, t3 = random_similarity(seed + 10)  # the target alone, rigidly
        _, target3 = apply_similarity(depth, target, 1.0, R3, t3)
        torch.testing.assert_close(refined_geometry_loss(depth, poses, target3, sigma), base, rtol=1e-9, atol=1e-12)


def test_refined_geometry_loss_gradients_and_window_weights():
    world = make_world(3, batch=2)
    depth, poses = perturbed(world, 3)
    depth.requires_grad_(True)
    poses.requires_grad_(True)
    sigma = torch.tensor([[0.0, 0.2, -0.1, 0.0], [0.1, 0.0, 0.0, 0.0]], dtype=F64)
    loss = refined_geometry_loss(depth, poses, world["cam_to_world"], sigma)
    loss.backward()
    assert_finite_grads(depth, poses)
    assert depth.grad.abs().sum() > 0 and poses.grad.abs().sum() > 0
    # A window of weight 0 gets no gradient; the loss is the other window's.
    depth.grad = poses.grad = None
    only = refined_geometry_loss(depth, poses, world["cam_to_world"], sigma, torch.tensor([1.0, 0.0]))
    only.backward()
    assert depth.grad[1].abs().max() == 0 and poses.grad[1].abs().max() == 0
    first = refined_geometry_loss(depth[:1], poses[:1], world["cam_to_world"][:1], sigma[:1])
    torch.testing.assert_close(only, first)
    # The per-view scale part pulls view 1 of window 0 up (sigma 0.2 above the others).
    depth.grad = None
    refined_geometry_loss(depth, poses.detach(), poses.detach(), sigma).backward()
    assert depth.grad[0, 1].sum() < 0 < depth.grad[0, 2].sum()


@pytest.mark.parametrize("solver,steps,exact_tol", [("adam", 40, 3e-3), ("lm", 5, 1e-8)])
def test_weak_loss_with_refinement_is_zero_for_exact_geometry_and_pulls_a_wrong_view(solver, steps, exact_tol):
    world = make_world(4, batch=2, views=3, per_pair=15)
    m = world["matches"]
    teacher = 2 * world["depth"] + 1
    batch = {"intrinsics": world["intrinsics"], "matches": torch.cat((m, torch.ones(len(m), 1, dtype=F64)), 1),
             "teacher_depth": teacher, "teacher_valid": torch.ones_like(teacher, dtype=torch.bool)}
    cfg = LossConfig(point_weight=1.0, refine=RefineConfig(weight=1.0, steps=steps, compile=False, solver=solver))
    exact = SimpleNamespace(depth=world["depth"], confidence=torch.ones_like(teacher),
                            cam_to_world=world["cam_to_world"])
    _, terms = compute_loss(exact, batch, cfg)
    # Adam's: not exactly 0, its first steps are full-size whatever the gradient (float noise here).
    assert terms["refine"] < exact_tol and terms["reproj"] < 1e-10
    poses = world["cam_to_world"].clone()
    poses[:, 1, :3, 3] += 0.4
    wrong = SimpleNamespace(depth=world["depth"], confidence=exact.confidence, cam_to_world=poses.requires_grad_(True))
    loss, terms = compute_loss(wrong, batch, cfg)
    assert terms["refine"] > 3e-2
    loss.backward()
    assert torch.isfinite(poses.grad).all()
    with pytest.raises(ValueError, match="weight"):
        RefineConfig(weight=-1.0)
    with pytest.raises(ValueError, match="solver"):
        RefineConfig(solver="sgd")


@pytest.mark.parametrize("solver,steps", [("adam", 40), ("lm", 5)])
def test_refinement_on_the_teacher_shape_ignores_the_predictions_shape_errors(solver, steps):
    # Exact poses, but the predicted depth carries 20 % per-pixel noise (a wrong shape): a
    # search on that shape moves the poses away from the truth, one on the teacher's shape
    # (the true depth up to a per-view scale and shift) keeps them.
    world = make_world(7, batch=2, views=3, per_pair=15)
    m = world["matches"]
    g = torch.Generator().manual_seed(7)
    teacher = world["depth"] * torch.tensor([3.0, 0.5, 1.0], dtype=F64)[:, None, None] + 0.7
    batch = {"intrinsics": world["intrinsics"], "matches": torch.cat((m, torch.ones(len(m), 1, dtype=F64)), 1),
             "teacher_depth": teacher, "teacher_valid": torch.ones_like(teacher, dtype=torch.bool)}
    noisy = world["depth"] * torch.exp(0.2 * torch.randn(world["depth"].shape, generator=g, dtype=F64))
    pred = SimpleNamespace(depth=noisy, confidence=torch.ones_like(teacher), cam_to_world=world["cam_to_world"])
    refine = {}
    for source in ("pred", "teacher"):
        cfg = LossConfig(point_weight=1.0, refine=RefineConfig(weight=1.0, steps=steps, compile=False, solver=solver,
                                                               depth=source, scales=False))
        refine[source] = compute_loss(pred, batch, cfg)[1]["refine"]
    assert refine["pred"] > 1e-2
    assert refine["teacher"] < refine["pred"] / 5
    with pytest.raises(ValueError, match="depth"):
        RefineConfig(depth="gt")
    cfg = LossConfig(point_weight=1.0, refine=RefineConfig(weight=1.0, steps=steps if solver == "adam" else 40,
                                                           compile=False, depth="teacher", shifts=True))
    exact = SimpleNamespace(depth=world["depth"], confidence=torch.ones_like(teacher),
                            cam_to_world=world["cam_to_world"])
    assert compute_loss(exact, batch, cfg)[1]["refine"] < 3e-3  # the teacher is the truth up to view affines
    with pytest.raises(ValueError, match="shifts"):
        RefineConfig(shifts=True, solver="lm")


# ---------------------------------------------------------------------------------------------
# compute_loss: the one place weights are applied.
# ---------------------------------------------------------------------------------------------

def batch_and_pred(seed=12, *, teacher=True, n_matches=None):
    world = make_world(seed, batch=2, views=3, dtype=torch.float32)
    m = world["matches"]
    if n_matches is not None:
        m = m[:n_matches]
    g = torch.Generator().manual_seed(seed)
    batch = {"intrinsics": world["intrinsics"],
             "matches": torch.cat((m, torch.rand(m.shape[0], 1, generator=g)), 1),
             "gt_depth": world["depth"], "gt_cam_to_world": world["cam_to_world"]}
    if teacher:
        batch["teacher_depth"] = 1 / world["depth"] + 0.3 * torch.rand(world["depth"].shape, generator=g)
        batch["teacher_valid"] = (torch.rand(world["depth"].shape, generator=g) > 0.1).to(torch.uint8)
    depth, poses = perturbed({k: v.double() for k, v in world.items()}, seed)
    pred = SimpleNamespace(depth=depth.float().requires_grad_(True),
                           confidence=(0.5 + torch.rand(depth.shape, generator=g)).requires_grad_(True),
                           cam_to_world=poses.float().requires_grad_(True))
    return pred, batch


def test_compute_loss_weak_applies_weights():
    pred, batch = batch_and_pred()
    cfg = LossConfig(kind="weak", reproj_weight=0.5, alpha=1.0, point_weight=0.0)  # the paper's two terms
    loss, terms = compute_loss(pred, batch, cfg, teacher_space="disparity")
    assert set(terms) == {"loss", "depth", "reproj", "matches"}
    assert terms["matches"] == batch["matches"].shape[0]
    assert terms["loss"] == pytest.approx(terms["depth"] + 0.5 * terms["reproj"], rel=1e-6)
    expected = relative_depth_loss(pred.depth, batch["teacher_depth"], pred.confidence,
                                   batch["teacher_valid"].bool(), teacher_space="disparity")
    assert terms["depth"] == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert_finite_grads(pred.depth, pred.confidence, pred.cam_to_world)


def test_compute_loss_without_teacher_and_without_matches():
    pred, batch = batch_and_pred(teacher=False, n_matches=0)
    loss, terms = compute_loss(pred, batch, LossConfig())
    assert set(terms) == {"loss", "reproj", "point", "matches"}
    assert terms["matches"] == 0 and loss.item() == 0.0
    loss.backward()
    for x in (pred.depth, pred.confidence, pred.cam_to_world):
        assert x.grad is not None and torch.equal(x.grad, torch.zeros_like(x))


def test_compute_loss_supervised():
    pred, batch = batch_and_pred()
    loss, terms = compute_loss(pred, batch, LossConfig(kind="supervised"))
    assert set(terms) == {"loss", "supervised", "matches"}
    assert terms["loss"] == pytest.approx(terms["supervised"], rel=1e-6) and loss.item() > 0
    loss.backward()
    assert_finite_grads(pred.depth, pred.confidence, pred.cam_to_world)
    del batch["gt_cam_to_world"]
    with pytest.raises(KeyError):
        compute_loss(pred, batch, LossConfig(kind="supervised"))


# ---------------------------------------------------------------------------------------------
# A batch of windows from teachers of both output spaces (per window: ``teacher_disparity``).
# ---------------------------------------------------------------------------------------------

def one_window(seed=5):
    """One float64 window of the synthetic world with every label the default weak objective
    reads (a depth-like teacher map), and a perturbed prediction (depth, confidence, poses)."""
    world = make_world(seed, batch=1, views=3, per_pair=12)
    g = torch.Generator().manual_seed(seed)
    k = world["matches"].shape[0]
    depth, poses = perturbed(world, seed)
    confidence = 0.5 + torch.rand(depth.shape, generator=g, dtype=F64)
    window = {"intrinsics": world["intrinsics"],
              "matches": torch.cat((world["matches"], 0.2 + torch.rand(k, 1, generator=g, dtype=F64)), 1),
              "match_triangulation": torch.cat((1 + 3 * torch.rand(k, 2, generator=g, dtype=F64),
                                                torch.rand(k, 1, generator=g, dtype=F64)), 1),
              "teacher_depth": world["depth"] * (1 + 0.2 * torch.rand(depth.shape, generator=g, dtype=F64)),
              "teacher_valid": torch.rand(depth.shape, generator=g) > 0.1}
    return (depth, confidence, poses), window


def stacked(windows):
    """Windows of one each, stacked as the replay stacks a batch (matches' first column: the window)."""
    out = {name: torch.cat([w[name] for w in windows]) for name in windows[0]}
    out["matches"] = torch.cat([torch.cat((torch.full_like(w["matches"][:, :1], b), w["matches"][:, 1:]), 1)
                                for b, w in enumerate(windows)])
    return out


def leaf_pred(*parts):
    return SimpleNamespace(**{name: torch.cat(p).clone().requires_grad_(True)
                              for name, p in zip(("depth", "confidence", "cam_to_world"), zip(*parts))})


def test_a_batch_of_both_teacher_spaces_scores_each_window_in_its_own_space():
    """A replay batch may hold windows of a depth teacher and of a disparity teacher (a durable run
    resumed with another ``labeler.teacher``); ``teacher_disparity`` [B] names each window's space.
    Two copies of one window, the second's teacher map given as disparity (1 / the first's): every
    term of the default objective weighs the two windows alike (the same valid pixels, matches and
    registration evidence), so the batch's loss and gradient are the mean of each window's alone,
    read in its own space."""
    pred, window = one_window()
    windows, spaces = [window, {**window, "teacher_depth": 1.0 / window["teacher_depth"]}], ("depth", "disparity")
    alone, alone_grads = [], []
    for w, space in zip(windows, spaces):
        p = leaf_pred(pred)
        loss, terms = weighted_loss(p, w, LossConfig(), teacher_space=space)
        alone.append({k: float(v) for k, v in terms.items()})
        alone_grads.append(torch.autograd.grad(loss, (p.depth, p.confidence, p.cam_to_world)))
    assert {"depth", "contrast", "triangulation"} <= set(alone[0])
    _, misread = weighted_loss(leaf_pred(pred), windows[1], LossConfig(), teacher_space="depth")
    assert float(misread["depth"]) > 1.0 + alone[1]["depth"]  # disparities read as depths: the shape inverted
    assert abs(float(misread["contrast"]) - alone[1]["contrast"]) > 0.1
    p = leaf_pred(pred, pred)
    batch = {**stacked(windows), "teacher_disparity": torch.tensor([False, True])}
    loss, terms = weighted_loss(p, batch, LossConfig(), teacher_space="depth")
    for name, value in terms.items():
        if name != "matches":
            assert float(value) == pytest.approx((alone[0][name] + alone[1][name]) / 2, rel=1e-6), name
    grads = torch.autograd.grad(loss, (p.depth, p.confidence, p.cam_to_world))
    for got, g0, g1 in zip(grads, *alone_grads):
        torch.testing.assert_close(got, torch.cat((g0, g1)) / 2, rtol=1e-6, atol=1e-12)


def test_teacher_alignment_and_registration_take_each_windows_space():
    """Per-pixel and per-view results of a batch of two different windows, one of a depth and one
    of a disparity teacher, are each window's alone in its own space; a per-window space that is
    not one bool per window is refused."""
    from learner.losses import depth_contrast_loss, registered_teacher_shift

    (d0, _, _), w0 = one_window(5)
    (d1, _, _), w1 = one_window(6)
    w1 = {**w1, "teacher_depth": 1.0 / w1["teacher_depth"]}
    depth, batch = torch.cat((d0, d1)), stacked([w0, w1])
    space = torch.tensor([False, True])
    aligned = teacher_aligned_depth(depth, batch["teacher_depth"], batch["teacher_valid"], teacher_space=space)
    shift, evidence = registered_teacher_shift(batch["teacher_depth"], batch["teacher_valid"],
                                               batch["matches"][:, :7], batch["match_triangulation"],
                                               batch["intrinsics"], teacher_space=space)
    for b, (d, w, name) in enumerate(((d0, w0, "depth"), (d1, w1, "disparity"))):
        one = teacher_aligned_depth(d, w["teacher_depth"], w["teacher_valid"], teacher_space=name)
        torch.testing.assert_close(aligned[b:b + 1], one, rtol=1e-12, atol=0)
        s, e = registered_teacher_shift(w["teacher_depth"], w["teacher_valid"], w["matches"][:, :7],
                                        w["match_triangulation"], w["intrinsics"], teacher_space=name)
        torch.testing.assert_close(shift[b:b + 1], s, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(evidence[b:b + 1], e, rtol=1e-6, atol=0)
        assert (e > 0).all()
    valid = batch["teacher_valid"]
    for bad in (torch.tensor([True]), torch.tensor([0.0, 1.0]), torch.tensor([[False, True]])):
        with pytest.raises(ValueError, match="teacher_space"):
            relative_depth_loss(depth, batch["teacher_depth"], None, valid, teacher_space=bad)
        with pytest.raises(ValueError, match="teacher_space"):
            depth_contrast_loss(depth, batch["teacher_depth"], valid, batch["matches"][:, :7],
                                batch["match_triangulation"], batch["intrinsics"], teacher_space=bad)


# ---------------------------------------------------------------------------------------------
# The project's synthetic world (ray-cast rooms): ground truth gives ~0, errors do not.
# ---------------------------------------------------------------------------------------------

def test_losses_on_rendered_scene():
    synthetic = pytest.importorskip("reliev3r.synthetic", reason="reliev3r.synthetic not available")
    scene = synthetic.render_scene(0, frames=4, height=48, width=64)
    depth = scene.depth.double()[None]
    poses = scene.cam_to_world.double()[None]
    K = scene.intrinsics.double().expand(1, 4, 3, 3)
    h, w = depth.shape[-2:]
    # Matches from ground truth: every 4th pixel of view i projected into j, kept where view
    # j sees the same surface (its depth agrees within 1%).
    uv = geometry.pixel_grid(h, w, dtype=F64)[2:-2:4, 2:-2:4].reshape(-1, 2)
    rows = []
    for i in range(4):
        for j in range(4):
            if i == j:
                continue
            p = geometry.unproject_points(uv, depth[0, i, uv[:, 1].long(), uv[:, 0].long()], K[0, i])
            p_j = geometry.transform_points(geometry.relative_pose(poses[0, j], poses[0, i]), p)
            uv_j, z_j = geometry.project(p_j, K[0, j])
            inside = (uv_j[:, 0] >= 0) & (uv_j[:, 0] <= w - 1) & (uv_j[:, 1] >= 0) & (uv_j[:, 1] <= h - 1) & (z_j > 0)
            seen = geometry.sample_bilinear(depth[0, j], uv_j.clamp(min=0))
            keep = inside & ((seen - z_j).abs() < 0.01 * z_j)
            n = int(keep.sum())
            rows.append(torch.cat((torch.tensor([[0.0, i, j]], dtype=F64).expand(n, 3), uv[keep], uv_j[keep]), 1))
    matches = torch.cat(rows)
    assert matches.shape[0] > 200
    exact = reprojection_loss(depth, poses, K, matches).item()
    assert exact < 1e-4
    s, R, t = random_similarity(5)
    d2, p2 = apply_similarity(depth, poses, s, R, t)
    assert reprojection_loss(d2, p2, K, matches).item() == pytest.approx(exact, rel=1e-5, abs=1e-9)
    wrong = poses.clone()
    wrong[0, 1, :3, 3] += torch.tensor([0.1, 0.0, 0.05], dtype=F64)
    assert reprojection_loss(depth, wrong, K, matches).item() > 10 * exact + 1e-4
    # A disparity teacher of the scene (affine in 1/depth per frame) costs nothing.
    teacher = 0.3 / depth + torch.tensor([0.1, 0.5, 0.0, 2.0], dtype=F64)[:, None, None]
    valid = torch.ones_like(depth, dtype=torch.bool)
    assert abs(relative_depth_loss(depth, teacher, torch.ones_like(depth), valid,
                                   teacher_space="disparity").item()) < 1e-5
    assert abs(supervised_loss(d2, p2, depth, poses, valid).item()) < 1e-5


# --- shape_damped: the match terms' pull on each view's shape, damped -----------------------------

def _projected(g: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """The orthogonal projection of g onto span{d - mean d, 1} per view (least squares)."""
    flat_g, flat_d = g.flatten(-2), d.flatten(-2)
    basis = torch.stack([flat_d - flat_d.mean(-1, keepdim=True), torch.ones_like(flat_d)], -1)  # [B, V, N, 2]
    coef = torch.linalg.lstsq(basis, flat_g[..., None]).solution
    return (basis @ coef)[..., 0].view_as(g)


@pytest.mark.parametrize("keep", [0.0, 0.3, 1.0])
def test_shape_damped_keeps_values_and_damps_only_the_shape(keep):
    gen = torch.Generator().manual_seed(0)
    depth = (1 + torch.rand(2, 3, 5, 7, generator=gen, dtype=torch.float64)).requires_grad_()
    g = torch.randn(2, 3, 5, 7, generator=gen, dtype=torch.float64)
    out = shape_damped(depth, keep)
    assert torch.equal(out.detach(), depth.detach())
    (out * g).sum().backward()
    along = _projected(g, depth.detach())
    torch.testing.assert_close(depth.grad, along + keep * (g - along), rtol=1e-10, atol=1e-12)


def test_shape_damped_passes_a_pull_on_scale_and_shift_whole():
    # A loss of each view's scale and shift only: its gradient lies in span{D - mean, 1}.
    depth = (1 + torch.rand(1, 2, 4, 6, dtype=torch.float64)).requires_grad_()
    target = torch.tensor([3.0, 0.5], dtype=torch.float64)[None, :, None, None]

    def loss(d):
        return ((2.0 * d + 0.7 - target * depth.detach()) ** 2).sum()

    full = torch.autograd.grad(loss(depth), depth)[0]
    damped = torch.autograd.grad(loss(shape_damped(depth, 0.0)), depth)[0]
    torch.testing.assert_close(damped, full, rtol=1e-10, atol=1e-12)


def test_shape_damped_rejects_a_share_outside_0_1():
    with pytest.raises(ValueError, match="keep"):
        shape_damped(torch.ones(1, 1, 2, 2), 1.5)


@pytest.mark.parametrize("keep", [0.0, 0.3, 1.0])
def test_gradient_share_keeps_values_and_scales_the_gradient(keep):
    x = torch.rand(2, 3, 4, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 3, 4, dtype=torch.float64)
    out = gradient_share(x, keep)
    assert torch.equal(out.detach(), x.detach())
    (out * g).sum().backward()
    torch.testing.assert_close(x.grad, keep * g, rtol=1e-15, atol=0)
    with pytest.raises(ValueError, match="keep"):
        gradient_share(x, -0.1)


def _pair_batch(gen: torch.Generator, b: int, v: int, h: int, w: int, k: int = 12) -> tuple[dict, torch.Tensor]:
    """A weak batch of one window whose views 0 and 1 share k random matches (with a teacher and
    a triangulation), and poses with view 1 moved sideways."""
    xy = torch.rand(k, 4, generator=gen) * (w - 1)
    matches = torch.cat([torch.zeros(k, 1), torch.zeros(k, 1), torch.ones(k, 1), xy, torch.ones(k, 1)], 1)
    intrinsics = torch.tensor([[8.0, 0, 3.5], [0, 8.0, 3.5], [0, 0, 1]]).expand(b, v, 3, 3).clone()
    batch = {"matches": matches, "intrinsics": intrinsics, "teacher_depth": torch.rand(b, v, h, w, generator=gen) + 1,
             "match_triangulation": torch.cat([torch.rand(k, 2, generator=gen) + 1, torch.ones(k, 1)], 1)}
    cam_to_world = torch.eye(4).expand(b, v, 4, 4).clone()
    cam_to_world[0, 1, 0, 3] = 0.2
    return batch, cam_to_world


def test_objective_damps_the_match_terms_pull_on_the_shape():
    """With ``match_shape_weight=0`` the match terms move each view's depth only along its scale
    and shift: the depth's gradient minus the depth term's lies in that span."""
    gen = torch.Generator().manual_seed(1)
    b, v, h, w = 1, 2, 8, 8
    depth = (1 + torch.rand(b, v, h, w, generator=gen)).requires_grad_()
    batch, cam_to_world = _pair_batch(gen, b, v, h, w)
    pred = SimpleNamespace(depth=depth, confidence=torch.ones(b, v, h, w), cam_to_world=cam_to_world)

    def grads(share, without_depth_term):
        depth.grad = None
        cfg = LossConfig(match_shape_weight=share)
        loss, terms = weighted_loss(pred, batch, cfg)
        if without_depth_term:
            loss = loss - relative_depth_loss(depth, batch["teacher_depth"], pred.confidence,
                                              torch.ones_like(depth, dtype=torch.bool))
        return torch.autograd.grad(loss, depth)[0]

    full, damped = grads(1.0, True), grads(0.0, True)
    assert (full - _projected(full, depth.detach())).abs().max() > 1e-3  # the terms do bend the shape
    torch.testing.assert_close(grads(None, True), full, rtol=0, atol=0)  # unchosen outside a pipeline: 1
    torch.testing.assert_close(damped, _projected(full, depth.detach()), rtol=1e-4, atol=1e-6)


def test_objective_routes_the_match_terms_scale_and_shift_to_the_scale_head():
    """A model with ``scale_head``: at ``match_shape_weight=0`` the match terms move each view's
    scale and shift (``log_scale``, ``log_shift``) as at 1 and leave its shape alone."""
    gen = torch.Generator().manual_seed(3)
    b, v, h, w = 1, 2, 8, 8
    shape = (1 + torch.rand(b, v, h, w, generator=gen)).requires_grad_()
    log_scale = torch.tensor([[0.0, 0.3]], requires_grad=True)
    log_shift = torch.tensor([[0.1, -0.2]], requires_grad=True)
    batch, cam_to_world = _pair_batch(gen, b, v, h, w)

    def match_grads(share):
        depth = view_depth(shape, log_scale, log_shift)
        pred = SimpleNamespace(depth=depth, confidence=torch.ones(b, v, h, w), cam_to_world=cam_to_world,
                               shape=shape, log_scale=log_scale, log_shift=log_shift)
        loss, _ = weighted_loss(pred, batch, LossConfig(match_shape_weight=share))
        loss = loss - relative_depth_loss(depth, batch["teacher_depth"], pred.confidence,
                                          torch.ones_like(depth, dtype=torch.bool))
        return torch.autograd.grad(loss, (shape, log_scale, log_shift))

    full, routed = match_grads(1.0), match_grads(0.0)
    assert full[0].abs().max() > 1e-3  # the terms do bend the shape at share 1 ...
    assert routed[0].abs().max() < 1e-6  # ... and not at share 0
    for a, b_ in zip(full[1:], routed[1:]):
        assert a.abs().max() > 1e-3
        torch.testing.assert_close(b_, a, rtol=1e-4, atol=1e-7)
