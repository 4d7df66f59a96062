"""The depth-free epipolar (coplanarity) term of the studies (``studies.epipolar``): known
answers and properties on the loss tests' synthetic world (CPU). It sees the translation
direction only."""

from __future__ import annotations

import math

import pytest
import torch

from reliev3r import geometry
from studies.epipolar import epipolar_loss
from tests.helpers_world import (F64, apply_similarity, assert_finite_grads, make_world, perturbed, random_similarity,
                                 with_outliers)


def test_epipolar_zero_for_exact_geometry_and_blind_to_depth():
    world = make_world(0, batch=2)
    args = (world["cam_to_world"], world["intrinsics"], world["matches"])
    assert abs(epipolar_loss(world["depth"], *args).item()) < 1e-12
    # Any depth at all: the term never looks at it (beyond the floor's scale).
    g = torch.Generator().manual_seed(1)
    noisy = world["depth"] * (0.3 + 3 * torch.rand(world["depth"].shape, generator=g, dtype=F64))
    assert abs(epipolar_loss(noisy, *args).item()) < 1e-12
    w32 = {k: v.float() for k, v in world.items()}
    assert abs(epipolar_loss(w32["depth"], w32["cam_to_world"], w32["intrinsics"], w32["matches"]).item()) < 1e-6


@pytest.mark.parametrize("seed", [0, 1])
def test_epipolar_invariant_to_window_similarity_and_baseline_length(seed):
    world = make_world(20 + seed)
    depth, poses = perturbed(world, seed)
    base = epipolar_loss(depth, poses, world["intrinsics"], world["matches"])
    assert base.item() > 1e-4
    s, R, t = random_similarity(seed)
    depth2, poses2 = apply_similarity(depth, poses, s, R, t)
    assert epipolar_loss(depth2, poses2, world["intrinsics"], world["matches"]).item() == \
        pytest.approx(base.item(), rel=1e-6)
    # Stretching every baseline about camera 0 (translations only, depth unchanged) changes
    # nothing: the term depends on the baseline's direction, so it never rewards shrinking it.
    stretched = poses.clone()
    centre = poses[..., :1, :3, 3]
    stretched[..., :3, 3] = centre + 3.0 * (poses[..., :3, 3] - centre)
    assert epipolar_loss(depth, stretched, world["intrinsics"], world["matches"]).item() == \
        pytest.approx(base.item(), rel=1e-6)


def test_epipolar_grows_with_translation_direction_error_and_rotation_error():
    world = make_world(2)
    args = (world["intrinsics"], world["matches"])
    trans, rot = [], []
    for eps in (0.0, 0.05, 0.1, 0.2, 0.4):
        poses = world["cam_to_world"].clone()
        poses[0, 1, :3, 3] += eps * torch.tensor([0.6, -0.3, 0.74], dtype=F64)
        trans.append(epipolar_loss(world["depth"], poses, *args).item())
        poses = world["cam_to_world"].clone()
        poses[0, 2, :3, :3] = (geometry.axis_angle_to_matrix(torch.tensor([0.0, eps / 4, 0.0], dtype=F64))
                               @ poses[0, 2, :3, :3])
        rot.append(epipolar_loss(world["depth"], poses, *args).item())
    for series in (trans, rot):
        assert series[0] < 1e-12
        assert all(b > a for a, b in zip(series, series[1:])), series


def test_epipolar_finite_for_degenerate_baselines_behind_cameras_and_outliers():
    world = make_world(4)
    matches, bad = with_outliers(world, 0)
    poses = world["cam_to_world"].clone()
    flip = geometry.axis_angle_to_matrix(torch.tensor([0.0, math.pi, 0.0], dtype=F64))
    poses[0, 1, :3, :3] = poses[0, 1, :3, :3] @ flip  # camera 1 looks backwards
    poses[0, 2, :3, 3] = poses[0, 3, :3, 3]  # two coincident centres: no epipolar plane
    depth = world["depth"].clone().requires_grad_(True)
    poses.requires_grad_(True)
    loss = epipolar_loss(depth, poses, world["intrinsics"], matches)
    assert torch.isfinite(loss) and loss.item() > 1e-3
    loss.backward()
    assert_finite_grads(poses)
    assert depth.grad is not None and float(depth.grad.abs().max()) == 0.0  # depth-free
    # With exact poses, scores of 0 on the outliers silence them; no matches: a connected zero.
    scores = torch.ones(matches.shape[0], dtype=F64)
    scores[bad] = 0
    assert abs(epipolar_loss(world["depth"], world["cam_to_world"], world["intrinsics"], matches,
                             scores).item()) < 1e-12
    empty = epipolar_loss(depth, poses, world["intrinsics"], matches[:0])
    assert empty.item() == 0 and empty.requires_grad
