"""Baselines reported beside every model: the depth teacher alone, and classical two-view
poses from the labeler's verified matches (essential matrix + cheirality, per view pair)."""

from __future__ import annotations

import itertools

import cv2
import numpy as np
import torch

from evaluation import metrics
from reliev3r import geometry
from evaluation.datasets import EvalWindow
from labelers.config import LabelerConfig
from labelers.matches import make_matcher, match_window

FAILED_DEG = 180.0
"""Error assigned to a pair the classical method cannot solve (too few matches): a failure
counts against it, as in the VGGT/pi3 protocol."""

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

def classical_pose_baseline(windows: list[EvalWindow], labeler: LabelerConfig) -> dict[str, float]:
    """RRA/RTA/AUC@30 of essential-matrix poses for every view pair of every window."""
    matcher = make_matcher(labeler.matcher if labeler.matcher in ("sift", "orb") else "sift")
    rot_errs, trans_errs = [], []
    for window in windows:
        v = window.images.shape[0]
        matches, _ = match_window(window.images, matcher, long_pairs=v * v, min_matches=8,
                                  max_matches_per_pair=4096, threshold_px=labeler.ransac_threshold_px)
        gt = torch.from_numpy(window.gt_cam_to_world).double()
        for i, j in itertools.combinations(range(v), 2):
            sel = (matches[:, 0] == i) & (matches[:, 1] == j)
            pose = essential_pose(matches[sel, 2:4], matches[sel, 4:6], window.intrinsics[i])
            if pose is None:
                rot_errs.append(FAILED_DEG)
                trans_errs.append(FAILED_DEG)
                continue
            gt_rel = torch.linalg.inv(gt[j]) @ gt[i]  # cam_i_to_cam_j
            est = torch.from_numpy(pose)
            rot_errs.append(float(geometry.rotation_angle_deg(est[:3, :3].T @ gt_rel[:3, :3])))
            trans_errs.append(float(geometry.angle_between_deg(est[:3, 3], gt_rel[:3, 3])))
    return metrics.pose_auc(torch.tensor(rot_errs), torch.tensor(trans_errs))
