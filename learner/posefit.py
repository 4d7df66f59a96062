"""A window's camera poses fitted to the model's own depth and the window's verified matches.

The FFRM predicts depth and poses in one pass; on real footage its depth registers the views
far better than its pose head places them (docs/RESULTS.md, "Poses fitted to the model's
depth"). :func:`fit_poses` keeps the prediction's depth and the first view's pose and solves
every other view's camera from the matches: a view's matched pixels in views already posed are
lifted to 3D by their predicted depth and pose, and the view is placed by PnP under RANSAC
(EPnP on minimal sets, a reprojection threshold in pixels), then Levenberg-Marquardt on the
inliers. Views are posed greedily: next the one with the most matches to the views posed, so a
view that shares nothing with the first is placed through the others. The result lies in the
prediction's frame and scale (the first view's pose, the depth's units): what ``reliev3r
reconstruct`` fuses and ``reliev3r eval`` scores beside the prediction's own poses.

Nothing here sees ground truth; the matches are those of ``labelers.matches`` (rows ``i, j,
x_i, y_i, x_j, y_j[, score]``, pixel centres at integers, in the depth's pixels).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

THRESHOLD_PX = 2.0
"""RANSAC's reprojection threshold, pixels of the depth map (measured: docs/RESULTS.md)."""
MIN_INLIERS = 12
"""A view placed by fewer inliers keeps its predicted pose."""
ITERATIONS = 200
"""RANSAC draws per view."""


@dataclass(frozen=True, slots=True)
class FittedPoses:
    """The fit of one window: cam-to-world [V, 4, 4] (float64) and, per view, whether it was
    placed by the matches (``True``; the first view is, by definition) or kept its predicted pose,
    with the inliers that placed it (0 where none)."""

    cam_to_world: np.ndarray
    fitted: np.ndarray
    inliers: np.ndarray


def bilinear(depth: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """``depth`` [H, W] at pixels ``xy`` [N, 2] (centres at integers), border values outside:
    the convention of ``reliev3r.geometry.sample_bilinear``."""
    h, w = depth.shape
    x = np.clip(xy[:, 0].astype(np.float64), 0, w - 1)
    y = np.clip(xy[:, 1].astype(np.float64), 0, h - 1)
    x0 = np.minimum(np.floor(x).astype(np.int64), max(w - 2, 0))
    y0 = np.minimum(np.floor(y).astype(np.int64), max(h - 2, 0))
    x1, y1 = np.minimum(x0 + 1, w - 1), np.minimum(y0 + 1, h - 1)
    fx, fy = x - x0, y - y0
    d = depth.astype(np.float64)
    top = d[y0, x0] * (1 - fx) + d[y0, x1] * fx
    bottom = d[y1, x0] * (1 - fx) + d[y1, x1] * fx
    return top * (1 - fy) + bottom * fy


def _correspondences(view: int, other: int, cam_to_world: np.ndarray, depth: np.ndarray, intrinsics: np.ndarray,
                     matches: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """World points [N, 3] of ``view``'s matches into the posed view ``other`` (its depth, its pose
    ``cam_to_world``) and ``view``'s pixels [N, 2] of them. Matches whose depth is not positive and
    finite are left out."""
    points, pixels = [np.zeros((0, 3))], [np.zeros((0, 2))]
    i, j = matches[:, 0].astype(np.int64), matches[:, 1].astype(np.int64)
    for mine, theirs, sel in ((slice(2, 4), slice(4, 6), (i == view) & (j == other)),
                              (slice(4, 6), slice(2, 4), (i == other) & (j == view))):
        if not sel.any():
            continue
        xy = matches[sel][:, theirs].astype(np.float64)
        d = bilinear(depth[other], xy)
        ok = np.isfinite(d) & (d > 0)
        rays = np.linalg.solve(intrinsics[other].astype(np.float64), np.c_[xy[ok], np.ones(ok.sum())].T).T
        points.append((rays * d[ok, None]) @ cam_to_world[:3, :3].T + cam_to_world[:3, 3])
        pixels.append(matches[sel][ok][:, mine].astype(np.float64))
    return np.concatenate(points), np.concatenate(pixels)


def _place(points: np.ndarray, pixels: np.ndarray, intrinsics: np.ndarray, threshold_px: float
           ) -> tuple[np.ndarray | None, int]:
    """Cam-to-world [4, 4] of a camera that sees ``points`` at ``pixels`` (PnP, RANSAC, LM on the
    inliers) and its inlier count; (None, 0) where RANSAC finds no pose."""
    if len(points) < 6:
        return None, 0
    k = intrinsics.astype(np.float64)
    ok, rvec, tvec, inliers = cv2.solvePnPRansac(points, pixels, k, None, iterationsCount=ITERATIONS,
                                                 reprojectionError=threshold_px, confidence=0.999,
                                                 flags=cv2.SOLVEPNP_EPNP)
    if not ok or inliers is None or not np.isfinite(rvec).all() or not np.isfinite(tvec).all():
        return None, 0
    keep = inliers[:, 0]
    rvec, tvec = cv2.solvePnPRefineLM(points[keep], pixels[keep], k, None, rvec, tvec)
    world_to_cam = np.eye(4)
    world_to_cam[:3, :3] = cv2.Rodrigues(rvec)[0]
    world_to_cam[:3, 3] = tvec[:, 0]
    return np.linalg.inv(world_to_cam), len(keep)


def fit_poses(depth: np.ndarray, cam_to_world: np.ndarray, intrinsics: np.ndarray, matches: np.ndarray, *,
              threshold_px: float = THRESHOLD_PX, min_inliers: int = MIN_INLIERS) -> FittedPoses:
    """Poses of one window fitted to its depth and verified matches (module docstring).

    Args:
        depth: [V, H, W] predicted depth (> 0 where valid).
        cam_to_world: [V, 4, 4] predicted poses; the first view's is kept, every view not placed
            by the matches keeps its own.
        intrinsics: [V, 3, 3] in pixels of ``depth``.
        matches: [K, 6 or 7] verified matches (``labelers.matches.match_window``'s rows).
        threshold_px: RANSAC's reprojection threshold, pixels.
        min_inliers: a view placed by fewer inliers keeps its predicted pose.
    """
    if not threshold_px > 0 or not math.isfinite(threshold_px) or min_inliers < 4:  # NaN refused too
        raise ValueError(f"threshold_px must be > 0 and min_inliers >= 4, got {threshold_px}, {min_inliers}")
    depth, poses = np.asarray(depth), np.array(cam_to_world, dtype=np.float64)
    matches = np.asarray(matches, dtype=np.float64)
    v = poses.shape[0]
    fitted, inliers = np.zeros(v, bool), np.zeros(v, np.int64)
    fitted[0] = True
    pending = list(range(1, v))
    found: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {view: [] for view in pending}
    """Per view still to place, its correspondences into each view placed, in the order they were placed."""
    placed: int | None = 0  # the view placed last (None: the last one tried was not placed)
    while pending:
        for view in pending if placed is not None else ():  # lift the matches into it, once
            found[view].append(_correspondences(view, placed, poses[placed], depth, intrinsics, matches))
        view = max(pending, key=lambda p: (sum(len(x) for x, _ in found[p]), -p))  # most matches, then earliest
        pending.remove(view)
        points, pixels = (np.concatenate(parts) for parts in zip(*found.pop(view)))
        pose, count = _place(points, pixels, intrinsics[view], threshold_px)
        if pose is not None and count >= min_inliers:
            poses[view], fitted[view], inliers[view] = pose, True, count
            placed = view
        else:  # nothing new to lift: the next turn picks among the others as they stand
            placed = None
    return FittedPoses(poses, fitted, inliers)
