"""A depth teacher's smooth errors corrected per view by the window's two-view geometry, and
how much that helps: the labels (offline) and a learner trained on them (``reliev3r up``).

    python -m studies.teacher_warp [--data 7scenes:.devdata/7s-train] [--height 168 --width 224] \\
        [--windows 40] [--stride 4] [--teacher embedded] [--grid 2 3 4 6]

The idea. A single-frame teacher's errors are systematic: the same content gets the same wrong
shape in every window. The verified matches of a window, triangulated pair by pair
(``labelers.matches.triangulate_matches``), know each view's depth at the match pixels up to
one scale per pair, independently of the teacher. So each view's teacher map is multiplied by
a smooth field ``exp(f(x, y))``, ``f`` bilinear on a ``grid`` x ``grid`` lattice, fitted to the
log ratio of triangulated to teacher values at the matches,

    log y_k - log T(p_k) = f(p_k) + c_pair(k) + noise        (y = z, or 1/z for a disparity teacher)

with one free log scale ``c`` per view pair, a ridge ``RIDGE`` pulling the lattice values to 0,
weights from the triangulation's parallax and a Huber reweighting against wrong
triangulations. The field is centred; views with fewer than ``min_points`` triangulated matches
are left unchanged.

What this tool measures. Windows of 4 views ``stride`` frames apart are cut from the data as
``reliev3r eval`` cuts them, and the labeler's own steps run on each: the depth teacher, SIFT
matches verified with USAC/MAGSAC, and the two-view triangulation. Ground truth is used only to
score: the mean over views of the per-frame least-squares (scale and shift) AbsRel, before and
after the warp, for each lattice size.

Measured (docs/RESULTS.md, issue 21). The labels get better: 0.228 -> 0.169 with the embedded
teacher at 168x224 and a 4 x 4 lattice. But a weak learner trained on such labels through
``reliev3r up`` (demo sizes, two seeds) got worse depth, so this is not a labeler option.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from evaluation import metrics
from evaluation.datasets import load_windows
from labelers.config import LabelerConfig
from labelers.depth import make_teacher
from labelers.matches import make_matcher, match_window, triangulate_matches
from reliev3r.protocol import Matches


RIDGE = 0.09
"""The fit's penalty ``RIDGE * f**2`` on each lattice value, against the squared residuals of
the matches weighted by their parallax weights (each up to 1)."""
HUBER = 1.5
"""Huber threshold in robust standard deviations (1.4826 x median absolute residual, at least
``SIGMA_FLOOR``)."""
SIGMA_FLOOR = 0.02
"""Smallest robust standard deviation of the log residuals: a triangulation is not better than
about 1 px over the focal length times the parallax (a few per cent), so smaller residuals are
not evidence of outliers among the rest."""
IRLS_STEPS = 5


def bilinear_basis(x: np.ndarray, y: np.ndarray, grid: int) -> np.ndarray:
    """[N, grid*grid] weights of the lattice values at points with x, y in [0, 1] (the four
    corners of each point's cell, summing to 1)."""
    if grid < 2:
        raise ValueError(f"grid must be >= 2, got {grid}")
    gx, gy = np.clip(x, 0, 1) * (grid - 1), np.clip(y, 0, 1) * (grid - 1)
    ix, iy = np.minimum(gx.astype(np.int64), grid - 2), np.minimum(gy.astype(np.int64), grid - 2)
    fx, fy = gx - ix, gy - iy
    out = np.zeros((len(x), grid * grid))
    rows = np.arange(len(x))
    for dx, dy, w in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)), (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
        np.add.at(out, (rows, (iy + dy) * grid + ix + dx), w)
    return out


def _field(log_ratio: np.ndarray, weight: np.ndarray, basis: np.ndarray, pair: np.ndarray) -> np.ndarray:
    """Lattice values (centred) of the weighted robust fit ``log_ratio ≈ basis @ f + c[pair]``."""
    n_f, n_c = basis.shape[1], int(pair.max()) + 1
    design = np.concatenate([basis, np.eye(n_c)[pair]], axis=1)
    ridge = np.concatenate([np.eye(n_f) * np.sqrt(RIDGE), np.zeros((n_f, n_c))], axis=1)
    w = weight.copy()
    for _ in range(IRLS_STEPS):
        sw = np.sqrt(w)[:, None]
        sol = np.linalg.lstsq(np.concatenate([design * sw, ridge]),
                              np.concatenate([log_ratio * sw[:, 0], np.zeros(n_f)]), rcond=None)[0]
        residual = np.abs(log_ratio - design @ sol)
        sigma = max(1.4826 * float(np.median(residual)), SIGMA_FLOOR)
        w = weight * np.minimum(1.0, HUBER * sigma / np.maximum(residual, 1e-12))
    f = sol[:n_f]
    return f - f.mean()


def warp_to_triangulation(teacher: np.ndarray, valid: np.ndarray, matches: np.ndarray, triangulation: np.ndarray,
                          *, grid: int, space: str = "depth", min_points: int = 20) -> tuple[np.ndarray, int]:
    """The teacher maps [V, H, W] (``space`` depth or disparity), each view multiplied by its
    smooth field fitted to the window's triangulated matches (module docstring), and how many
    views were corrected. ``matches`` [K, 7], ``triangulation`` [K, 3] rows (z_i, z_j, weight)
    at the teacher's resolution; invalid teacher pixels stay as they are."""
    if space not in ("depth", "disparity"):
        raise ValueError(f"space must be 'depth' or 'disparity', got {space!r}")
    views, height, width = teacher.shape
    out = teacher.astype(np.float32, copy=True)
    m = Matches(np.asarray(matches))
    tri = np.asarray(triangulation, np.float64)
    if len(tri) == 0:
        return out, 0
    i, j = m.view_i.astype(np.int64), m.view_j.astype(np.int64)
    pair_id = i * views + j
    lattice_y, lattice_x = np.mgrid[0:height, 0:width]
    full_basis = None
    corrected = 0
    for v in range(views):
        sides = [(i == v, m.xy_i, tri[:, 0]), (j == v, m.xy_j, tri[:, 1])]
        keep = [(sel & (tri[:, 2] > 0) & (z > 0), xy, z) for sel, xy, z in sides]
        xy = np.concatenate([np.asarray(xy, np.float64)[k] for k, xy, _ in keep])
        z = np.concatenate([z[k] for k, _, z in keep])
        weight = np.concatenate([tri[k, 2] for k, _, _ in keep])
        pairs = np.concatenate([pair_id[k] for k, _, _ in keep])
        px = np.clip(np.rint(xy[:, 0]).astype(np.int64), 0, width - 1)
        py = np.clip(np.rint(xy[:, 1]).astype(np.int64), 0, height - 1)
        t = teacher[v, py, px].astype(np.float64)
        ok = valid[v, py, px].astype(bool) & np.isfinite(t) & (t > 0)
        if ok.sum() < min_points:
            continue
        y = z[ok] if space == "depth" else 1.0 / z[ok]
        _, pair = np.unique(pairs[ok], return_inverse=True)
        f = _field(np.log(y) - np.log(t[ok]), weight[ok],
                   bilinear_basis(xy[ok, 0] / max(width - 1, 1), xy[ok, 1] / max(height - 1, 1), grid), pair)
        if full_basis is None:
            full_basis = bilinear_basis(lattice_x.ravel() / max(width - 1, 1), lattice_y.ravel() / max(height - 1, 1),
                                        grid)
        field = np.exp(full_basis @ f).reshape(height, width).astype(np.float32)
        out[v] = np.where(valid[v].astype(bool), out[v] * field, out[v])
        corrected += 1
    return out, corrected


def lsq_absrel(pred: np.ndarray, truth: np.ndarray) -> float:
    """AbsRel of one map after its least-squares scale and shift to the truth (truth > 0), as
    ``reliev3r eval`` aligns a frame (``evaluation.metrics``)."""
    known = truth > 0
    p, g = torch.from_numpy(pred[known].astype(np.float64)), torch.from_numpy(truth[known].astype(np.float64))
    a, b = metrics.scale_shift_lsq(p, g)
    return metrics.absrel_delta(a * p + b, g)[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="7scenes:.devdata/7s-train")
    p.add_argument("--height", type=int, default=168)
    p.add_argument("--width", type=int, default=224)
    p.add_argument("--windows", type=int, default=40)
    p.add_argument("--stride", type=int, default=4)
    p.add_argument("--teacher", default="embedded")
    p.add_argument("--grid", type=int, nargs="+", default=[2, 3, 4, 6])
    args = p.parse_args(argv)
    cfg = LabelerConfig()
    windows = load_windows(args.data, views=4, height=args.height, width=args.width, windows=args.windows,
                           stride=args.stride, run_dir=None)
    teacher, matcher = make_teacher(args.teacher, "cpu"), make_matcher(cfg.matcher)
    scores: dict = {"teacher": [], **{g: [] for g in args.grid}}
    corrected = {g: 0 for g in args.grid}
    for window in windows:
        depth, valid = teacher.predict(window.images)
        matches, _ = match_window(window.images, matcher, long_pairs=cfg.long_pairs, min_matches=cfg.min_matches,
                                  max_matches_per_pair=cfg.max_matches_per_pair, threshold_px=cfg.ransac_threshold_px)
        tri = triangulate_matches(matches, window.intrinsics, threshold_px=cfg.ransac_threshold_px)
        scores["teacher"] += [lsq_absrel(d.astype(np.float64), t) for d, t in zip(depth, window.gt_depth)]
        for g in args.grid:
            warped, n = warp_to_triangulation(depth, valid, matches, tri, grid=g, space=teacher.space)
            corrected[g] += n
            scores[g] += [lsq_absrel(d.astype(np.float64), t) for d, t in zip(warped, window.gt_depth)]
    views = len(scores["teacher"])
    print(f"{len(windows)} windows, {views} views at {args.height}x{args.width}, teacher {args.teacher}\n")
    print("| teacher map | views corrected | per-frame lsq AbsRel (mean) | (median) |\n|---|---|---|---|")
    for key, values in scores.items():
        label = "as the teacher gives it" if key == "teacher" else f"warped, {key} x {key} lattice"
        done = views if key == "teacher" else corrected[key]
        print(f"| {label} | {done} / {views} | {np.mean(values):.3f} | {np.median(values):.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
