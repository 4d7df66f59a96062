"""``studies.teacher_warp``: the teacher's smooth errors corrected by the window's triangulation.

Known answers on exact data: a teacher that is the truth times a smooth field on the lattice,
triangulated depths that are the truth times one scale per pair; the fit must give back the
truth up to one scale per view. Tolerances come from the ridge: with N matches spread over
G x G lattice nodes, each node's value is shrunk by about RIDGE / (RIDGE + N / G**2)."""

from __future__ import annotations

import numpy as np
import pytest

from studies.teacher_warp import RIDGE, bilinear_basis, warp_to_triangulation

V, H, W, G = 3, 48, 64, 4


def _world(seed: int = 0, points: int = 400):
    """Truth [V,H,W], a teacher = truth x exp(field) (disparity: 1 / that), matches of view
    pairs (0,1), (1,2), (0,2) at integer pixels, triangulated = truth x pair scale."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:H, 0:W]
    truth = (2.0 + 0.8 * np.sin(xx / 9.0) + 0.5 * (yy / H)).astype(np.float64)[None].repeat(V, 0)
    truth *= np.array([1.0, 1.1, 0.9])[:, None, None]
    lattice = rng.normal(0, 0.3, (V, G * G))
    basis = bilinear_basis(xx.ravel() / (W - 1), yy.ravel() / (H - 1), G)
    field = np.stack([(basis @ f).reshape(H, W) for f in lattice])
    teacher = truth * np.exp(field)
    rows, tri = [], []
    for pair, (i, j) in enumerate(((0, 1), (1, 2), (0, 2))):
        scale = 0.5 + pair  # one unknown scale per pair
        xi, yi = rng.integers(0, W, points), rng.integers(0, H, points)
        xj, yj = rng.integers(0, W, points), rng.integers(0, H, points)
        rows.append(np.stack([np.full(points, i), np.full(points, j), xi, yi, xj, yj, np.ones(points)], 1))
        tri.append(np.stack([truth[i, yi, xi] * scale, truth[j, yj, xj] * scale, np.ones(points)], 1))
    return truth, teacher, np.concatenate(rows).astype(np.float32), np.concatenate(tri).astype(np.float32)


def _relative_error(pred: np.ndarray, truth: np.ndarray) -> float:
    """Max over views of the relative error after each view's best log scale."""
    worst = 0.0
    for p, t in zip(pred, truth):
        log_ratio = np.log(p) - np.log(t)
        worst = max(worst, float(np.abs(np.exp(log_ratio - np.median(log_ratio)) - 1).max()))
    return worst


def test_bilinear_basis_interpolates_the_lattice():
    rng = np.random.default_rng(1)
    x, y = rng.random(50), rng.random(50)
    b = bilinear_basis(x, y, 3)
    assert np.allclose(b.sum(1), 1) and (b >= 0).all()
    plane = lambda u, v: 2 * u - 3 * v + 1  # noqa: E731 - bilinear reproduces planes exactly
    nodes = np.array([plane(c / 2, r / 2) for r in range(3) for c in range(3)])
    assert np.allclose(b @ nodes, plane(x, y))
    with pytest.raises(ValueError):
        bilinear_basis(x, y, 1)


@pytest.mark.parametrize("space", ["depth", "disparity"])
def test_the_field_is_recovered(space):
    truth, teacher, matches, tri = _world()
    before = _relative_error(teacher, truth)
    given = teacher if space == "depth" else 1 / teacher
    out, corrected = warp_to_triangulation(given.astype(np.float32), np.ones(given.shape, bool), matches, tri,
                                           grid=G, space=space)
    assert corrected == V
    got = out if space == "depth" else 1 / out
    # 800 matches per view over 16 nodes: shrink <= RIDGE / 50 of a field of |f| <= ~1
    assert _relative_error(got, truth) < 4 * RIDGE / 50 < 0.1 * before


def test_wrong_triangulations_are_outvoted():
    truth, teacher, matches, tri = _world(seed=2)
    bad = np.random.default_rng(0).random(len(tri)) < 0.1
    tri[bad, :2] *= 3.0
    out, _ = warp_to_triangulation(teacher.astype(np.float32), np.ones(teacher.shape, bool), matches, tri, grid=G)
    assert _relative_error(out, truth) < 0.2 * _relative_error(teacher, truth)


def test_views_without_evidence_and_invalid_pixels_stay():
    truth, teacher, matches, tri = _world(points=5)  # 10 matches a view: fewer than min_points
    valid = np.ones(teacher.shape, bool)
    out, corrected = warp_to_triangulation(teacher.astype(np.float32), valid, matches, tri, grid=G)
    assert corrected == 0 and np.array_equal(out, teacher.astype(np.float32))
    truth, teacher, matches, tri = _world()
    valid[:, :10] = False
    out, corrected = warp_to_triangulation(teacher.astype(np.float32), valid, matches, tri, grid=G)
    assert corrected == V and np.array_equal(out[:, :10], teacher[:, :10].astype(np.float32))
    assert not np.array_equal(out[:, 10:], teacher[:, 10:].astype(np.float32))
    empty = np.zeros((0, 7), np.float32)
    assert warp_to_triangulation(teacher, valid, empty, np.zeros((0, 3), np.float32), grid=G)[1] == 0
