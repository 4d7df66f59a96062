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
