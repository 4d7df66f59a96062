"""Evaluation metrics against ground truth, for one window at a time (torch, CPU or GPU).

Every metric is invariant to the similarity gauge of the prediction (one scale, rotation
and translation per window), as the model's outputs are defined only up to it:

* depth: AbsRel and delta<1.25 after per-window median scaling (``*_med``), after per-window
  least-squares scale-and-shift (``*_lsq``), and after per-frame least-squares
  scale-and-shift (``*_lsq_frame``: the depth *shape* only, what a monocular teacher can do);
* poses: ATE RMSE of camera centres after Umeyama Sim(3) alignment (metres of the ground
  truth; two views are aligned exactly, :func:`align_trajectory`), RPE between consecutive
  views after the same alignment (RMSE over the pairs of the relative pose error's
  translation in metres and rotation angle in degrees: evo's RPE with delta 1 frame, RMSE
  statistic; tests/test_metrics_evo.py), and over all view pairs the relative rotation error
  and relative translation direction error, their means and RRA@30, RTA@30 and AUC@30 (the
  VGGT/pi3 protocol: AUC of the curve "fraction of pairs with max(rot, trans) error < t",
  t in 1..30°);
* point maps: accuracy (mean distance of predicted points to the nearest ground-truth point)
  and completeness (ground truth to prediction), after a Sim(3) alignment of the predicted
  point map to the ground-truth one over valid pixels (pixels are correspondences).

Shapes: depth [V, H, W], poses cam_to_world [V, 4, 4], intrinsics [V, 3, 3]; gt depth 0 = invalid,
as is one that is not finite (+inf is no depth, and would make AbsRel and the point map's fit NaN).
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

from reliev3r import geometry

DELTA = 1.25


def absrel_delta(pred: Tensor, gt: Tensor) -> tuple[float, float]:
    """(AbsRel, fraction with max(pred/gt, gt/pred) < 1.25) over already aligned values."""
    pred = pred.clamp(min=1e-6)
    absrel = ((pred - gt).abs() / gt).mean()
    delta = (torch.maximum(pred / gt, gt / pred) < DELTA).float().mean()
    return float(absrel), float(delta)


def scale_shift_lsq(pred: Tensor, gt: Tensor) -> tuple[Tensor, Tensor]:
    """(a, b) minimising ||a * pred + b - gt||^2 over the given (valid) values."""
    A = torch.stack((pred, torch.ones_like(pred)), -1).double()
    sol = torch.linalg.lstsq(A, gt.double()[:, None]).solution[:, 0]
    return sol[0].to(pred.dtype), sol[1].to(pred.dtype)


MIN_DEPTH_PIXELS = 10
"""Valid ground-truth depth pixels a window (and, for the per-frame fit, a frame) needs to be
scored; a window with fewer is skipped when the data is read (``evaluation.datasets``)."""


def depth_metrics(pred: Tensor, gt: Tensor, valid: Tensor | None = None) -> dict[str, float]:
    """AbsRel and delta<1.25 of one window's depth [V, H, W] under the three alignments."""
    usable = torch.isfinite(gt) & (gt > 0) & torch.isfinite(pred) & (pred > 0)
    valid = usable if valid is None else valid & usable
    if valid.sum() < MIN_DEPTH_PIXELS:
        raise ValueError("too few valid ground-truth pixels to score depth")
    p, g = pred[valid], gt[valid]
    out = {}
    scale = g.median() / p.median()
    out["absrel_med"], out["delta_med"] = absrel_delta(p * scale, g)
    a, b = scale_shift_lsq(p, g)
    out["absrel_lsq"], out["delta_lsq"] = absrel_delta(a * p + b, g)
    # Per frame: every valid pixel of a frame with enough of them counts, those its fit puts at
    # depth <= 0 too: absrel_delta's clamp scores them as the errors they are, as it does for
    # the window fit and for the teacher baseline's columns of the same name.
    # A window none of whose frames has enough has no per-frame columns (the teacher baseline
    # leaves it out too); ``mean_metrics`` averages each column over the windows that have it.
    fitted = valid & (valid.flatten(1).sum(1) >= MIN_DEPTH_PIXELS)[:, None, None]
    if not fitted.any():
        return out
    aligned = torch.zeros_like(pred)
    for v in range(pred.shape[0]):
        m = fitted[v]
        if m.any():
            a, b = scale_shift_lsq(pred[v][m], gt[v][m])
            aligned[v][m] = a * pred[v][m] + b
    out["absrel_lsq_frame"], out["delta_lsq_frame"] = absrel_delta(aligned[fitted], gt[fitted])
    return out


def rotation_between(source: Tensor, target: Tensor) -> Tensor:
    """The smallest rotation [3, 3] turning the direction of ``source`` [3] onto that of
    ``target`` [3] (identity where either has no length). The angle is atan2 of the cross and
    dot products and the axis the cross product made exactly perpendicular to ``source`` (its
    rounding along ``source`` tilts a near-180° turn), so the result stays accurate near 0° and
    180°; at exactly 180° any axis perpendicular to ``source`` is as small as any other."""
    a, b = source.norm(), target.norm()
    if a <= 1e-12 or b <= 1e-12:
        return torch.eye(3, dtype=source.dtype, device=source.device)
    u, w = source / a, target / b
    cross = torch.linalg.cross(u, w)
    angle = torch.atan2(cross.norm(), (u * w).sum())
    axis = cross - (cross * u).sum() * u
    if axis.norm() > 1e-12:
        axis = axis / axis.norm()
    else:  # parallel or opposite: a perpendicular axis, from the basis vector least along u
        axis = torch.linalg.cross(u, torch.eye(3, dtype=u.dtype, device=u.device)[u.abs().argmin()])
        axis = axis / axis.norm()
    return geometry.axis_angle_to_matrix(axis * angle)


def trajectory_sim3(pred_centres: Tensor, gt_centres: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(s, R, t) of the similarity x -> s R x + t that best maps predicted camera centres
    [V, 3] onto the ground truth's (float64): Umeyama's. Two views fix a similarity only up
    to rotation about the baseline, which moves no centre: the smallest rotation turning the
    predicted baseline onto the ground truth's, the scale of their lengths and the midpoints'
    offset map both centres exactly (a similarity of the truth has ATE 0)."""
    pc, gc = pred_centres.double(), gt_centres.double()
    if pc.shape[0] >= 3:
        return geometry.umeyama(pc, gc)
    s = (gc[1] - gc[0]).norm() / (pc[1] - pc[0]).norm().clamp(min=1e-12)
    R = rotation_between(pc[1] - pc[0], gc[1] - gc[0])
    return s, R, gc.mean(0) - s * R @ pc.mean(0)


def align_trajectory(pred_cam_to_world: Tensor, gt_cam_to_world: Tensor) -> Tensor:
    """Apply :func:`trajectory_sim3` to the predicted poses; returns aligned cam_to_world
    [V, 4, 4] (rotations rotated, centres mapped)."""
    pc = pred_cam_to_world[:, :3, 3].double()
    s, R, t = trajectory_sim3(pc, gt_cam_to_world[:, :3, 3])
    out = pred_cam_to_world.double().clone()
    out[:, :3, :3] = R @ out[:, :3, :3]
    out[:, :3, 3] = s * (pc @ R.T) + t
    return out.to(pred_cam_to_world.dtype)


def pose_metrics(pred_cam_to_world: Tensor, gt_cam_to_world: Tensor) -> dict[str, float]:
    """ATE, RPE, the mean pairwise rotation and translation direction errors (``rot_err_deg``,
    ``trans_err_deg``; a zero translation, as identity poses have, counts 90°: chance) and
    pairwise RRA/RTA/AUC@30 of one window's poses [V, 4, 4]."""
    pred, gt = pred_cam_to_world.double(), gt_cam_to_world.double()
    aligned = align_trajectory(pred, gt)
    out = {"ate": float((aligned[:, :3, 3] - gt[:, :3, 3]).norm(dim=-1).pow(2).mean().sqrt())}
    rel_p = geometry.relative_pose(aligned[:-1], aligned[1:])
    rel_g = geometry.relative_pose(gt[:-1], gt[1:])
    err = geometry.relative_pose(rel_g, rel_p)
    out["rpe_trans"] = float(err[:, :3, 3].norm(dim=-1).pow(2).mean().sqrt())
    out["rpe_rot_deg"] = float(geometry.rotation_angle_deg(err[:, :3, :3]).pow(2).mean().sqrt())
    rot_err, trans_err = pairwise_pose_errors(pred, gt)
    out["rot_err_deg"], out["trans_err_deg"] = float(rot_err.mean()), float(trans_err.mean())
    out.update(pose_auc(rot_err, trans_err))
    return out


def pairwise_pose_errors(pred_cam_to_world: Tensor, gt_cam_to_world: Tensor) -> tuple[Tensor, Tensor]:
    """Relative rotation error and relative translation direction error (degrees) over all
    ordered pairs i < j. Gauge-free: uses only relative poses and translation directions."""
    pairs = list(itertools.combinations(range(pred_cam_to_world.shape[0]), 2))
    i, j = torch.tensor([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs])
    rel_p = geometry.relative_pose(pred_cam_to_world[j], pred_cam_to_world[i])  # cam_i -> cam_j
    rel_g = geometry.relative_pose(gt_cam_to_world[j], gt_cam_to_world[i])
    rot = geometry.rotation_angle_deg(rel_p[:, :3, :3].transpose(-1, -2) @ rel_g[:, :3, :3])
    trans = geometry.angle_between_deg(rel_p[:, :3, 3], rel_g[:, :3, 3])
    return rot, trans


def pose_auc(rot_err: Tensor, trans_err: Tensor, max_threshold: int = 30) -> dict[str, float]:
    """RRA@t, RTA@t and AUC@t from per-pair errors in degrees."""
    worst = torch.maximum(rot_err, trans_err)
    thresholds = torch.arange(1, max_threshold + 1, dtype=worst.dtype)
    curve = (worst[None, :] < thresholds[:, None]).double().mean(1)
    return {f"rra{max_threshold}": float((rot_err < max_threshold).double().mean()),
            f"rta{max_threshold}": float((trans_err < max_threshold).double().mean()),
            f"auc{max_threshold}": float(curve.mean())}


def pointmap_metrics(pred_depth: Tensor, pred_cam_to_world: Tensor, gt_depth: Tensor,
                     gt_cam_to_world: Tensor, intrinsics: Tensor, *, max_points: int = 4096,
                     seed: int = 0) -> dict[str, float]:
    """Accuracy and completeness (metres of the ground truth) of the window's point map."""
    valid = torch.isfinite(gt_depth) & (gt_depth > 0) & torch.isfinite(pred_depth) & (pred_depth > 0)
    p, g = (world_points(pred_depth, pred_cam_to_world, intrinsics)[valid],
            world_points(gt_depth, gt_cam_to_world, intrinsics)[valid])
    gen = torch.Generator().manual_seed(seed)
    if p.shape[0] > max_points:
        idx = torch.randperm(p.shape[0], generator=gen)[:max_points]
        p, g = p[idx], g[idx]
    s, R, t = geometry.umeyama(p, g)
    p = s * p @ R.T + t
    dist = torch.cdist(p, g)
    return {"accuracy": float(dist.min(1).values.mean()), "completeness": float(dist.min(0).values.mean())}


def world_points(depth: Tensor, cam_to_world: Tensor, intrinsics: Tensor) -> Tensor:
    """World point map [V, H, W, 3] (float64) of depth [V, H, W]."""
    cam = geometry.unproject_depth(depth.double(), intrinsics.double()).flatten(1, 2)
    return geometry.transform_points(cam_to_world.double(), cam).reshape(*depth.shape, 3)


def window_metrics(pred_depth: Tensor, pred_cam_to_world: Tensor, gt_depth: Tensor,
                   gt_cam_to_world: Tensor, intrinsics: Tensor) -> dict[str, float]:
    """All metrics of one window."""
    out = depth_metrics(pred_depth, gt_depth)
    out.update(pose_metrics(pred_cam_to_world, gt_cam_to_world))
    out.update(pointmap_metrics(pred_depth, pred_cam_to_world, gt_depth, gt_cam_to_world, intrinsics))
    return out


def mean_metrics(rows: list[dict[str, float]]) -> dict[str, float]:
    """Average each metric over the windows that have it (a window of sparse depth may lack
    the per-frame columns, a dataset without poses every pose metric)."""
    keys = sorted(set().union(*rows))
    return {k: sum(r[k] for r in rows if k in r) / sum(k in r for r in rows) for k in keys}
