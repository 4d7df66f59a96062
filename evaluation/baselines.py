"""Baselines reported beside every model: the depth teacher alone, and classical two-view
poses from the labeler's verified matches (essential matrix + cheirality, per view pair).

A monocular teacher knows each frame's depth only up to its own scale and shift, so its
honest score is after a per-frame least-squares alignment to the ground truth
(``absrel_lsq_frame``, ``delta_lsq_frame``: the same columns the model reports for its depth
*shape*). Disparity teachers are aligned in disparity space (against 1/GT), where their
scale and shift live, and then inverted; aligned disparities are clamped at the smallest
ground-truth disparity over 2 so a fit that dips to or below zero gives a large but finite
depth, counted as the error it is."""

from __future__ import annotations

import itertools

import cv2
import numpy as np
import torch

from evaluation import metrics
from reliev3r import geometry
from reliev3r.protocol import Matches
from evaluation.datasets import EvalWindow
from labelers.config import LabelerConfig
from labelers.matches import make_matcher, match_every_pair

FAILED_DEG = 180.0
"""Error assigned to a pair the classical method cannot solve (too few matches): a failure
counts against it, as in the VGGT/pi3 protocol."""

def align_teacher_frame(teacher: np.ndarray, gt: np.ndarray, valid: np.ndarray, space: str) -> np.ndarray | None:
    """Depth [H,W] of one teacher frame after the per-frame least-squares scale-and-shift to
    ``gt`` (metres) over ``valid``, done in the teacher's ``space``; None if too few pixels."""
    if valid.sum() < metrics.MIN_DEPTH_PIXELS:
        return None
    x = teacher[valid].astype(np.float64)
    y = gt[valid].astype(np.float64)
    if space == "disparity":
        y = 1.0 / y
    A = np.stack((x, np.ones_like(x)), -1)
    (a, b), *_ = np.linalg.lstsq(A, y, rcond=None)
    aligned = a * teacher.astype(np.float64) + b
    if space == "disparity":
        aligned = 1.0 / np.maximum(aligned, 0.5 * y.min())
    return aligned.astype(np.float32)


def teacher_window_metrics(teacher_depth: np.ndarray, teacher_valid: np.ndarray, gt_depth: np.ndarray,
                           space: str) -> dict[str, float] | None:
    """AbsRel and delta<1.25 of one window's teacher labels [V,H,W], each frame aligned to the
    GT by :func:`align_teacher_frame`, pooled over the window's labelled GT pixels (as the
    model is scored), plus ``teacher_coverage``; None when no frame could be aligned."""
    preds, gts = [], []
    gt_valid = np.isfinite(gt_depth) & (gt_depth > 0)  # +inf is no depth, as for the model
    for v in range(gt_depth.shape[0]):
        fit = gt_valid[v] & teacher_valid[v]
        aligned = align_teacher_frame(teacher_depth[v], gt_depth[v], fit, space)
        if aligned is not None:
            preds.append(aligned[fit])
            gts.append(gt_depth[v][fit])
    if not preds:
        return None
    absrel, delta = metrics.absrel_delta(torch.from_numpy(np.concatenate(preds)), torch.from_numpy(np.concatenate(gts)))
    return {"absrel_lsq_frame": absrel, "delta_lsq_frame": delta,
            "teacher_coverage": sum(len(g) for g in gts) / max(int(gt_valid.sum()), 1)}


def teacher_depth_baseline(windows: list[EvalWindow], spec: str, device: str = "cpu", *,
                           teacher=None) -> dict[str, float]:
    """Depth metrics of the teacher named by ``spec`` (``labelers.depth.make_teacher``) alone,
    after per-frame alignment (module docstring). The oracle gets each window's GT depth.
    Also reports ``teacher_coverage``: the fraction of GT pixels the teacher labelled (the
    metrics are over those pixels only, as the learner only ever sees those)."""
    from labelers.depth import TeacherError, make_teacher

    teacher = teacher or make_teacher(spec, device)
    rows, errors = [], []
    for window in windows:
        if window.gt_depth is None:
            continue
        gt = window.gt_depth
        try:
            depth, valid = teacher.predict(window.images, gt_depth=gt, window_id=window.name)
        except TeacherError as err:
            errors.append(err.reason)
            continue
        row = teacher_window_metrics(depth, valid, gt, teacher.space)
        if row is not None:
            rows.append(row)
    if not rows:
        raise ValueError(f"teacher {spec!r} labelled no ground-truth pixel"
                         + (f" ({', '.join(sorted(set(errors)))})" if errors else ""))
    out = metrics.mean_metrics(rows)
    out["teacher_failed_windows"] = float(len(errors))
    return out


def essential_pose(xy_i: np.ndarray, xy_j: np.ndarray, intrinsics: np.ndarray) -> np.ndarray | None:
    """cam_i_to_cam_j [4,4] (unit translation) from matched pixels, or None."""
    if len(xy_i) < 8:
        return None
    K = intrinsics.astype(np.float64)
    E, mask = cv2.findEssentialMat(xy_i.astype(np.float64), xy_j.astype(np.float64), K, method=cv2.USAC_MAGSAC,
                                   prob=0.999, threshold=1.0)
    if E is None or E.shape != (3, 3):
        return None
    _, R, t, _ = cv2.recoverPose(E, xy_i.astype(np.float64), xy_j.astype(np.float64), K, mask=mask)
    pose = np.eye(4)
    pose[:3, :3], pose[:3, 3] = R, t[:, 0]
    return pose


def essential_pose_errors(matches: np.ndarray, intrinsics: np.ndarray,
                          gt_cam_to_world: np.ndarray) -> tuple[list[float], list[float]]:
    """Rotation and translation-direction errors (degrees) of the essential-matrix pose of every
    view pair i < j of one window, from its verified matches [K, 7] (i, j, x_i, y_i, x_j, y_j,
    score); a pair that cannot be solved counts as :data:`FAILED_DEG`."""
    gt = torch.from_numpy(np.asarray(gt_cam_to_world)).double()
    rot_errs, trans_errs = [], []
    named = Matches(matches)
    for i, j in itertools.combinations(range(gt.shape[0]), 2):
        sel = (named.view_i == i) & (named.view_j == j)
        pose = essential_pose(named.xy_i[sel], named.xy_j[sel], intrinsics[i])
        if pose is None:
            rot_errs.append(FAILED_DEG)
            trans_errs.append(FAILED_DEG)
            continue
        gt_rel = torch.linalg.inv(gt[j]) @ gt[i]  # cam_i_to_cam_j
        est = torch.from_numpy(pose)
        rot_errs.append(float(geometry.rotation_angle_deg(est[:3, :3].T @ gt_rel[:3, :3])))
        trans_errs.append(float(geometry.angle_between_deg(est[:3, 3], gt_rel[:3, 3])))
    return rot_errs, trans_errs


def window_matches(windows: list[EvalWindow], labeler: LabelerConfig, device: str = "cpu") -> list[np.ndarray | None]:
    """Verified matches [K, 7] of every view pair of each window with ground-truth poses (None for
    a window without), found on its :meth:`~evaluation.datasets.EvalWindow.matching` frames (the
    views fitted to ``labelers.matches.MATCH_LONG_SIDE`` on the long side) and in their pixels:
    ``labeler.matcher``'s (on ``device``: XFeat's), verified at ``labeler.ransac_threshold_px`` of
    those pixels (``labelers.matches.match_every_pair``). What the classical baseline solves and
    the model's poses are fitted to (``evaluation.evaluate.score_model_and_fitted``'s ``matches``,
    brought to the model's pixels there)."""
    matcher = make_matcher(labeler.matcher, device)
    return [None if window.gt_cam_to_world is None else
            match_every_pair(window.matching()[0], matcher, threshold_px=labeler.ransac_threshold_px)
            for window in windows]


def classical_pose_baseline(windows: list[EvalWindow], labeler: LabelerConfig, device: str = "cpu", *,
                            matches: list[np.ndarray | None] | None = None) -> dict[str, float]:
    """RRA/RTA/AUC@30 of essential-matrix poses for every view pair of every window, from
    :func:`window_matches` (given, or found here)."""
    if matches is None:
        matches = window_matches(windows, labeler, device)
    rot_errs, trans_errs = [], []
    for window, found in zip(windows, matches):
        if found is None:
            continue
        rot, trans = essential_pose_errors(found, window.matching()[1], window.gt_cam_to_world)
        rot_errs += rot
        trans_errs += trans
    return metrics.pose_auc(torch.tensor(rot_errs), torch.tensor(trans_errs))
