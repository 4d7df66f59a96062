"""The camera pose of a frame shown turned (``reliev3r.imaging.orient_pose``): a quarter turn of
the image is the recorded camera turned about its optical axis; a mirror is no camera pose."""

import numpy as np
import pytest

from reliev3r.imaging import EXIF_ORIENTATIONS, orient, orient_intrinsics, orient_pose


def _rotation(axis_angle) -> np.ndarray:
    """Rodrigues: [3, 3] rotation by ``|axis_angle|`` radians about its direction."""
    angle = np.linalg.norm(axis_angle)
    k = np.asarray(axis_angle, dtype=np.float64) / angle
    cross = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * cross @ cross


def _project(points: np.ndarray, K: np.ndarray, cam_to_world: np.ndarray) -> np.ndarray:
    """Pixels (column, row) [N, 2] of world points [N, 3] seen by a camera."""
    world_to_cam = np.linalg.inv(cam_to_world)
    cam = points @ world_to_cam[:3, :3].T + world_to_cam[:3, 3]
    pix = cam @ K.T
    return pix[:, :2] / pix[:, 2:]


@pytest.mark.parametrize("exif", range(1, 9))
def test_world_points_project_where_the_turned_image_shows_their_recorded_pixels(exif):
    """The projection identity, for the eight Exif orientations: world points seen by a camera
    (a general pose, intrinsics with a principal point off centre) at whole recorded pixels of a
    64x48 image are projected, by the turned intrinsics (``orient_intrinsics``) and the turned
    pose, exactly where ``orient`` shows those recorded pixels. For the four quarter turns the pose
    is a rigid camera (rotation of determinant +1, the same centre); a mirrored orientation (2, 4,
    5, 7) has no camera pose that does it (it would take a rotation of determinant -1), and is
    refused by name."""
    turn = EXIF_ORIENTATIONS[exif]
    K = np.array([[50.0, 0, 30.25], [0, 55.0, 19.5], [0, 0, 1]])
    pose = np.eye(4)
    pose[:3, :3], pose[:3, 3] = _rotation([0.3, -0.8, 0.2]), [1.5, -0.4, 2.0]
    rng = np.random.default_rng(exif)
    rows, columns = rng.integers(0, 48, 50), rng.integers(0, 64, 50)
    depth = rng.uniform(0.5, 5.0, 50)
    rays = np.stack([columns, rows, np.ones(50)], -1) @ np.linalg.inv(K).T
    points = (rays * depth[:, None]) @ pose[:3, :3].T + pose[:3, 3]  # world points seen at those pixels
    np.testing.assert_allclose(_project(points, K, pose), np.stack([columns, rows], -1), atol=1e-9)
    grid_rows, grid_columns = np.mgrid[:48, :64]
    shown = orient(np.stack([grid_columns, grid_rows], -1), turn)  # the recorded pixel each shown pixel shows
    where = {tuple(shown[r, c]): (c, r) for r in range(shown.shape[0]) for c in range(shown.shape[1])}
    expected = np.array([where[(c, r)] for c, r in zip(columns, rows)], dtype=np.float64)
    turned_K = orient_intrinsics(K, turn, 64, 48)
    if exif in (2, 4, 5, 7):
        with pytest.raises(ValueError, match=rf"mirrored \(Exif orientation {exif}\).*no camera pose"):
            orient_pose(pose, turn)
        return
    turned = orient_pose(pose, turn)
    np.testing.assert_allclose(_project(points, turned_K, turned), expected, atol=1e-9)
    assert np.linalg.det(turned[:3, :3]) == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(turned[:3, :3].T @ turned[:3, :3], np.eye(3), atol=1e-12)
    np.testing.assert_array_equal(turned[:3, 3], pose[:3, 3])  # the camera stays where it was
    np.testing.assert_array_equal(turned[3], [0, 0, 0, 1])
    np.testing.assert_allclose(turned[:3, 2], pose[:3, 2], atol=1e-15)  # it looks the same way


def test_a_quarter_turn_known_answer():
    """Exif 6 (shown turned 90 degrees clockwise: the top of the stored image is the right of the
    shown one, its right the shown one's bottom): the shown camera's x axis is the recorded
    camera's -y, its y axis the recorded x, its optical axis the same. Exif 3 (upside down):
    x and y both reversed. Exif 1: the pose as it is."""
    from reliev3r.imaging import FLIP_COLUMNS, FLIP_ROWS, TRANSPOSE

    turned = orient_pose(np.eye(4), TRANSPOSE | FLIP_COLUMNS)
    np.testing.assert_array_equal(turned, [[0, 1, 0, 0], [-1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    np.testing.assert_array_equal(orient_pose(np.eye(4), FLIP_ROWS | FLIP_COLUMNS), np.diag([-1.0, -1, 1, 1]))
    pose = np.arange(16.0).reshape(4, 4)
    pose[3] = [0, 0, 0, 1]
    np.testing.assert_array_equal(orient_pose(pose, 0), pose)
    assert orient_pose(pose.astype(np.float32), 0).dtype == np.float64
