"""The keyframe gate's tracking (``streamer.windows.camera_motion``): a turning camera is told
from a moving one with the capped RANSAC, also when a moving object covers part of the view."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from streamer import windows as W
from streamer_media import texture


def _pair(*, rotate: bool, mover: bool, shift: float = 5.0):
    """Two 160x120 grey images: the camera turns (a homography: the whole scene shifts by
    ``shift`` px and turns 1 degree) or slides past two depth layers (a near band moves 3x the
    far scene); with ``mover`` a patch of its own texture (a twentieth of the view) moves
    against the camera, as a hand or a car would."""
    far = cv2.cvtColor(texture(400, 240, 1), cv2.COLOR_RGB2GRAY)
    near = cv2.cvtColor(texture(400, 240, 2), cv2.COLOR_RGB2GRAY)
    obj = cv2.cvtColor(texture(60, 60, 3), cv2.COLOR_RGB2GRAY)

    def view(t: float) -> np.ndarray:
        M = cv2.getRotationMatrix2D((80, 60), 1.0 * t, 1.0)
        M[0, 2] -= shift * t
        img = cv2.warpAffine(far, M, (160, 120), flags=cv2.INTER_LINEAR)
        if not rotate:
            img[40:80] = cv2.warpAffine(near, np.float32([[1, 0, -3 * shift * t], [0, 1, 0]]), (160, 120))[40:80]
        if mover:
            x = int(round(10 + 12 * t))
            img[10:34, x:x + 24] = obj[10:34, 10:34]
        return img

    return view(0.0), view(1.0)


@pytest.mark.parametrize("mover", [False, True])
def test_a_turning_camera_reads_as_rotation(mover):
    a, b = _pair(rotate=True, mover=mover)
    motion = W.camera_motion(W.Reference(a), b)
    assert motion is not None and 2.0 <= motion.flow < 12.0
    assert motion.parallax < 0.4  # the homography explains 80 % of the points within 0.4 px


@pytest.mark.parametrize("mover", [False, True])
def test_a_sliding_camera_past_depth_reads_as_parallax(mover):
    a, b = _pair(rotate=False, mover=mover)
    motion = W.camera_motion(W.Reference(a), b)
    assert motion is not None and motion.flow >= 2.0
    assert motion.parallax > 1.0


def test_homography_fitted_only_when_it_can_change_the_decision():
    a, b = _pair(rotate=True, mover=False)
    motion = W.camera_motion(W.Reference(a), b, lambda flow: False)
    assert motion is not None and np.isnan(motion.parallax)


def test_median_bounds_hold_whatever_the_untracked_values():
    rng = np.random.default_rng(0)
    assert W.median_bounds(np.arange(10.0), 10) is None  # as many unknown as known: no bound
    assert W.median_bounds(np.arange(6.0), 0) == (2.0, 3.0)  # nothing unknown: the two middle values
    assert W.median_bounds(np.arange(60.0), 40) == (9.0, 50.0)
    for _ in range(500):
        known = rng.exponential(3.0, rng.integers(1, 80))
        unknown = int(rng.integers(0, len(known)))
        lo, hi = W.median_bounds(known, unknown)
        for present in (0, unknown // 2, unknown):
            for fill in (0.0, 1e9, None):
                extra = rng.exponential(3.0, present) if fill is None else np.full(present, fill)
                median = float(np.median(np.concatenate([known, extra])))
                assert lo <= median <= hi


def _clip(speeds):
    """Grey frames of a camera panning ``speeds[i]`` px between frame i and i + 1 (0: still)."""
    big = cv2.cvtColor(texture(160 + int(sum(speeds)) + 2, 120, 5), cv2.COLOR_RGB2GRAY)
    x = np.concatenate([[0.0], np.cumsum(speeds)])
    return [np.ascontiguousarray(cv2.warpAffine(big, np.float32([[1, 0, -xi], [0, 1, 0]]), (160, 120))) for xi in x]


def test_the_strongest_corners_first_give_the_decisions_of_all_corners(monkeypatch):
    """Still stretches, slow and fast pans: the same views, skips and candidates whether the
    strongest corners are tracked first (and the rest only when needed) or all at once; the
    split leaves points untracked on the still and fast stretches."""
    from types import SimpleNamespace

    greys = _clip([0.05] * 60 + [0.6] * 30 + [6.0] * 30 + [0.0] * 40 + [1.5] * 30)
    real = cv2.calcOpticalFlowPyrLK

    def run(share):
        monkeypatch.setattr(W, "FIRST_SHARE", share)
        points = []

        def counted(a, b, pts, *args, **kwargs):
            points.append(len(pts))
            return real(a, b, pts, *args, **kwargs)

        monkeypatch.setattr(W.cv2, "calcOpticalFlowPyrLK", counted)
        builder = W.WindowBuilder("s", views=3, height=24, width=32, frame_stride=4, window_step=4,
                                  min_flow=2.0, min_parallax=0.4, rotation_flow=12.0)
        views, candidates = [], []
        for i, g in enumerate(greys):
            rgb = cv2.cvtColor(g, cv2.COLOR_GRAY2RGB)
            made = builder.push(SimpleNamespace(index=i, timestamp=float(i), rgb=rgb, intrinsics=np.eye(3),
                                                gt_depth=None, gt_cam_to_world=None))
            views.append([[v.index for v in w.views] for w in made] or None)
            candidates.append(builder.next_candidate)
        monkeypatch.setattr(W.cv2, "calcOpticalFlowPyrLK", real)
        return views, candidates, (builder.skipped_still, builder.skipped_rotation), sum(points)

    split, whole = run(0.6), run(1.0)
    assert split[:3] == whole[:3]
    assert any(v for v in whole[0]) and whole[2][0] > 5  # views and still skips both happen
    assert split[3] < 0.95 * whole[3]
