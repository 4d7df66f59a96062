"""Two-view triangulation labels (labeler) and the terms that use them (learner): known answers
and properties on exact synthetic geometry (CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from labelers.matches import triangulate_matches
from learner.config import LossConfig
from learner.losses import (depth_contrast_loss, registered_teacher_shift, triangulated_depth_loss,
                            triangulated_pose_loss)
from learner.losses.matches import _match_depths
from learner.objective import compute_loss
from reliev3r import geometry
from tests.helpers_world import F64, apply_similarity, assert_finite_grads, make_world, random_similarity


# ---------------------------------------------------------------------------------------------
# Labeler: essential matrix + cheirality + triangulation of verified matches.
# ---------------------------------------------------------------------------------------------

def projected_pair(seed: int, *, translation=(0.4, 0.05, 0.1), rotation_deg=4.0, n=150, width=320, height=240):
    """Exact pixel matches of random points seen by two cameras, with their true z-depths."""
    rng = np.random.default_rng(seed)
    K = geometry.intrinsics_from_fov(60.0, width, height, dtype=F64).numpy()
    axis = rng.normal(size=3)
    R = geometry.axis_angle_to_matrix(torch.from_numpy(axis / np.linalg.norm(axis) * np.radians(rotation_deg))).numpy()
    t = np.asarray(translation, np.float64)
    pts = np.stack([rng.uniform(-1.5, 1.5, n), rng.uniform(-1.0, 1.0, n), rng.uniform(2.0, 6.0, n)], 1)  # cam i
    pts_j = pts @ R.T + t  # cam j = R * cam i + t
    uv_i = pts @ K.T
    uv_j = pts_j @ K.T
    xy_i, xy_j = uv_i[:, :2] / uv_i[:, 2:], uv_j[:, :2] / uv_j[:, 2:]
    keep = (pts_j[:, 2] > 0.5) \
        & (xy_j[:, 0] > 0) & (xy_j[:, 0] < width - 1) & (xy_j[:, 1] > 0) & (xy_j[:, 1] < height - 1) \
        & (xy_i[:, 0] > 0) & (xy_i[:, 0] < width - 1) & (xy_i[:, 1] > 0) & (xy_i[:, 1] < height - 1)
    matches = np.zeros((int(keep.sum()), 7), np.float32)
    matches[:, 0], matches[:, 1] = 0, 1
    matches[:, 2:4], matches[:, 4:6], matches[:, 6] = xy_i[keep], xy_j[keep], 1.0
    intrinsics = np.stack([K, K]).astype(np.float32)
    return matches, intrinsics, pts[keep, 2], pts_j[keep, 2]


def test_triangulation_recovers_depths_up_to_one_scale_per_pair():
    matches, intrinsics, z_i, z_j = projected_pair(0)
    tri = triangulate_matches(matches, intrinsics)
    ok = tri[:, 2] > 0
    assert ok.mean() > 0.9
    ratios = np.concatenate([tri[ok, 0] / z_i[ok], tri[ok, 1] / z_j[ok]])
    # Pixels are float32 (~1e-5 px): the pose and depths are exact to well below 1e-3.
    assert np.abs(ratios / np.median(ratios) - 1).max() < 1e-3
    # the baseline is the unit: |t| = 0.42 here
    assert np.median(ratios) == pytest.approx(1 / np.linalg.norm([0.4, 0.05, 0.1]), rel=1e-3)
    assert ((tri[ok, 2] > 0) & (tri[ok, 2] <= 1)).all()


def test_triangulation_refuses_pure_rotation_and_small_pairs():
    matches, intrinsics, _, _ = projected_pair(1, translation=(0.0, 0.0, 0.0))
    assert not triangulate_matches(matches, intrinsics).any()
    matches, intrinsics, _, _ = projected_pair(2, n=10)
    assert not triangulate_matches(matches, intrinsics).any()
    assert triangulate_matches(np.zeros((0, 7), np.float32), intrinsics).shape == (0, 3)


def test_triangulation_weight_grows_with_parallax():
    near, intrinsics, _, _ = projected_pair(3, translation=(0.08, 0.0, 0.0))
    far, _, _, _ = projected_pair(3, translation=(0.6, 0.0, 0.0))
    w_near = triangulate_matches(near, intrinsics)[:, 2]
    w_far = triangulate_matches(far, intrinsics)[:, 2]
    assert np.median(w_far[w_far > 0]) > np.median(w_near[w_near > 0])


# ---------------------------------------------------------------------------------------------
# Learner: the triangulated depth and pose terms.
# ---------------------------------------------------------------------------------------------

def exact_triangulation(world):
    """Rows (z_i, z_j, 1) from the true depths in the labeler's unit: each pair's baseline."""
    d_i, d_j = _match_depths(world["depth"], world["matches"])
    m = world["matches"].long()
    centres = world["cam_to_world"][..., :3, 3]
    baseline = (centres[m[:, 0], m[:, 2]] - centres[m[:, 0], m[:, 1]]).norm(dim=-1)
    return torch.stack([d_i / baseline, d_j / baseline, torch.ones_like(d_i)], 1)


def test_triangulated_terms_zero_for_exact_geometry_and_similarity_invariant():
    world = make_world(0, batch=2)
    tri = exact_triangulation(world)
    depth, poses = world["depth"], world["cam_to_world"]
    assert float(triangulated_depth_loss(depth, world["matches"], tri)) < 1e-12
    assert float(triangulated_pose_loss(poses, world["intrinsics"], world["matches"], tri)) < 1e-12
    s, R, t = random_similarity(1)
    depth2, poses2 = apply_similarity(depth, poses, s, R, t)
    perturbed = depth * (1 + 0.1 * torch.rand_like(depth))
    a = triangulated_depth_loss(perturbed, world["matches"], tri)
    b = triangulated_depth_loss(perturbed * s, world["matches"], tri)
    assert float(a) > 1e-4
    assert float(b) == pytest.approx(float(a), rel=1e-9)
    wrong = poses.clone()
    wrong[0, 1, :3, 3] += torch.tensor([0.2, -0.1, 0.1], dtype=F64)
    _, wrong2 = apply_similarity(depth, wrong, s, R, t)
    pa = triangulated_pose_loss(wrong, world["intrinsics"], world["matches"], tri)
    pb = triangulated_pose_loss(wrong2, world["intrinsics"], world["matches"], tri)
    assert float(pa) > 1e-5
    assert float(pb) == pytest.approx(float(pa), rel=1e-9)
    assert float(triangulated_pose_loss(poses2, world["intrinsics"], world["matches"], tri)) < 1e-12


def test_triangulated_depth_sees_a_view_shift_that_the_relative_depth_loss_cannot():
    world = make_world(1)
    tri = exact_triangulation(world)
    losses = []
    for shift in (0.0, 0.3, 0.6):
        depth = world["depth"].clone()
        depth[0, 2] += shift
        losses.append(float(triangulated_depth_loss(depth, world["matches"], tri)))
    assert losses[0] < 1e-12 < losses[1] < losses[2]
    depth = world["depth"].clone()
    depth[0, 1] *= 1.3  # one view's scale: both views of a pair share one unit
    assert float(triangulated_depth_loss(depth, world["matches"], tri)) > 1e-3


def test_triangulated_pose_ignores_baseline_length_and_grows_with_direction_and_rotation_errors():
    world = make_world(2)
    tri = exact_triangulation(world)
    poses, K, m = world["cam_to_world"], world["intrinsics"], world["matches"]
    centre = poses[0, :, :3, 3].mean(0)
    shrunk = poses.clone()
    shrunk[0, :, :3, 3] = centre + 0.3 * (poses[0, :, :3, 3] - centre)  # every baseline x 0.3
    assert float(triangulated_pose_loss(shrunk, K, m, tri)) < 1e-12
    errors = []
    for deg in (0.0, 2.0, 6.0):
        wrong = poses.clone()
        wrong[0, 3, :3, :3] = geometry.axis_angle_to_matrix(torch.tensor([0.0, np.radians(deg), 0.0], dtype=F64)) \
            @ poses[0, 3, :3, :3]
        errors.append(float(triangulated_pose_loss(wrong, K, m, tri)))
    assert errors[0] < 1e-12 < errors[1] < errors[2]


def test_triangulated_terms_finite_at_degenerate_inputs_and_connected_zero_without_rows():
    world = make_world(3)
    tri = exact_triangulation(world)
    depth = world["depth"].clone().requires_grad_(True)
    poses = world["cam_to_world"].clone()
    poses[0, :, :3, 3] = 0.0  # every camera at one centre
    poses.requires_grad_(True)
    (triangulated_depth_loss(depth, world["matches"], tri)
     + triangulated_pose_loss(poses, world["intrinsics"], world["matches"], tri)).backward()
    assert_finite_grads(depth, poses)
    none = torch.zeros_like(tri)
    depth.grad = None
    loss = triangulated_depth_loss(depth, world["matches"], none) + \
        triangulated_pose_loss(poses, world["intrinsics"], world["matches"], none)
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert depth.grad is not None and float(depth.grad.abs().sum()) == 0.0
    with pytest.raises(ValueError, match="triangulation"):
        triangulated_depth_loss(depth, world["matches"], tri[:3])


def test_objective_adds_the_triangulation_terms_only_when_weighted_and_labelled():
    world = make_world(4)
    tri = exact_triangulation(world).float()
    m = world["matches"].float()
    matches = torch.cat([m, torch.ones(len(m), 1)], 1)
    depth = world["depth"].float() * 1.1
    depth[0, 1] += 0.4
    pred = type("P", (), {"depth": depth, "confidence": torch.ones_like(depth),
                          "cam_to_world": world["cam_to_world"].float()})()
    batch = {"matches": matches, "intrinsics": world["intrinsics"].float(), "match_triangulation": tri}
    off = dict(triangulation_weight=0.0, triangulation_pose_weight=0.0, contrast_weight=0.0)
    base, terms = compute_loss(pred, batch, LossConfig(**off))
    assert "triangulation" not in terms and "triangulation_pose" not in terms
    loss, terms = compute_loss(pred, batch, LossConfig(**{**off, "triangulation_weight": 2.0,
                                                          "triangulation_pose_weight": 0.5}))
    assert terms["triangulation"] > 1e-3
    assert float(loss) == pytest.approx(float(base) + 2.0 * terms["triangulation"] + 0.5 * terms["triangulation_pose"],
                                        rel=1e-5)
    no_labels = {k: v for k, v in batch.items() if k != "match_triangulation"}
    loss2, terms2 = compute_loss(pred, no_labels, LossConfig(**{**off, "triangulation_weight": 2.0}))
    assert "triangulation" not in terms2 and float(loss2) == pytest.approx(float(base), rel=1e-6)


# ---------------------------------------------------------------------------------------------
# The teacher registered to the triangulation, and the depth-contrast term.
# ---------------------------------------------------------------------------------------------

def dense_world(seed=5):
    """make_world's depth is smooth with exact matches; the teacher is an affine map of it.
    ``fine_intrinsics``: the same cameras with 100x finer pixels, for which the triangulation
    noise that the registration expects (about 1 px / (f x parallax)) is negligible, as it is
    in this exact world."""
    world = make_world(seed, batch=2)
    fine = world["intrinsics"].clone()
    fine[..., :2, :] *= 100
    world["fine_intrinsics"] = fine
    return world, exact_triangulation(world)


@pytest.mark.parametrize("space", ["depth", "disparity"])
def test_registered_shift_recovers_the_teachers_unknown_shift(space):
    world, tri = dense_world()
    depth = world["depth"]
    truth = depth if space == "depth" else 1 / depth
    scale = torch.tensor([[0.5, 2.0, 3.0, 1.0], [1.5, 0.7, 4.0, 2.5]], dtype=F64)[..., None, None]
    # shifts within the registration's grid: -0.8 .. 4 times the teacher's median
    fraction = torch.tensor([[0.3, -0.1, 1.2, 0.0], [2.0, 0.5, -0.05, 0.8]], dtype=F64)[..., None, None]
    offset = fraction * truth.flatten(-2).median(-1).values[..., None, None]
    teacher = scale * (truth + offset)
    valid = torch.ones_like(teacher, dtype=torch.bool)
    shift, evidence = registered_teacher_shift(teacher, valid, world["matches"], tri, world["fine_intrinsics"],
                                               teacher_space=space)
    assert (evidence > 0).all()
    # T + shift is proportional to the truth for shift = -scale * offset, up to the grid's step
    # (0.05 of the view's median teacher value).
    median = teacher.flatten(-2).median(-1).values
    assert ((shift + (scale * offset)[..., 0, 0]).abs() <= 0.026 * median).all()


@pytest.mark.parametrize("space", ["depth", "disparity"])
def test_contrast_term_zero_at_truth_scale_invariant_and_sees_a_shift(space):
    world, tri = dense_world(6)
    depth, m = world["depth"], world["matches"]
    truth = depth if space == "depth" else 1 / depth
    # a wrong shift that the registration's grid holds: T + q median(T) = 3 truth for q = -0.25
    teacher = 3.0 * (truth + truth.flatten(-2).median(-1).values[..., None, None] / 3)
    valid = torch.ones_like(depth, dtype=torch.bool)
    loss = lambda d: float(depth_contrast_loss(d, teacher, valid, m, tri, world["fine_intrinsics"],
                                               teacher_space=space))
    assert loss(depth) < 1e-9  # the registration runs in float32
    assert loss(depth * 2.5) < 1e-9
    shifted = depth.clone()
    shifted[1, 2] += 0.5 * float(depth[1, 2].median())  # one view flatter
    assert loss(shifted) > 1e-3
    assert loss(depth + 1.0) > loss(shifted) > 0  # every view flatter


def test_contrast_term_ignores_views_without_registration_and_is_finite():
    world, tri = dense_world(7)
    depth = world["depth"].clone().requires_grad_(True)
    valid = torch.ones_like(depth, dtype=torch.bool)
    none = torch.zeros_like(tri)
    loss = depth_contrast_loss(depth + 1.0, world["depth"], valid, world["matches"], none, world["intrinsics"])
    assert float(loss.detach()) == 0.0
    loss = depth_contrast_loss(depth * 1.3 + 0.2, world["depth"], valid, world["matches"], tri, world["intrinsics"])
    loss.backward()
    assert_finite_grads(depth)


def test_objective_adds_the_contrast_term_with_a_teacher_and_triangulation():
    world, tri = dense_world(8)
    m = world["matches"].float()
    matches = torch.cat([m, torch.ones(len(m), 1)], 1)
    depth = world["depth"].float() + 0.5
    pred = type("P", (), {"depth": depth, "confidence": torch.ones_like(depth),
                          "cam_to_world": world["cam_to_world"].float()})()
    batch = {"matches": matches, "intrinsics": world["intrinsics"].float(), "match_triangulation": tri.float(),
             "teacher_depth": 2 * world["depth"].float() + 1, "teacher_valid": torch.ones_like(depth, dtype=torch.bool)}
    base, terms = compute_loss(pred, batch, LossConfig(contrast_weight=0.0))
    assert "contrast" not in terms
    loss, terms = compute_loss(pred, batch, LossConfig(contrast_weight=2.0))
    assert terms["contrast"] > 1e-3
    assert float(loss) == pytest.approx(float(base) + 2.0 * terms["contrast"], rel=1e-5)
