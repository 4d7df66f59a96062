"""ScanNet scenes as ScanNet's SensReader exports them (``color/N.jpg``; ``depth/N.png`` uint16
millimetres at another size than the colour; ``pose/N.txt`` 4x4 camera-to-world, ``-inf`` where
its tracking lost the frame; ``intrinsic/intrinsic_color.txt`` and ``intrinsic_depth.txt``, 4x4),
read by the streamer (a source pointed at the scene). Every scene is written here from the
synthetic world, so the answer is known."""

from __future__ import annotations

import re
from pathlib import Path

import cv2
import numpy as np
import pytest

from reliev3r import imaging, synthetic
from streamer.sources import ImageSequenceSource, discover

FRAMES, HEIGHT, WIDTH = 12, 48, 64
FOV_DEG = 50.0
"""The synthetic clip: 12 frames (``10.png`` after ``9.png`` in natural order) at the depth's size,
its field of view not the 60 degrees a reader assumes of frames without intrinsics."""
SCANNET_COLOUR_K = np.array([[1170.187988, 0.0, 647.75], [0.0, 1170.187988, 483.75], [0.0, 0.0, 1.0]])
SCANNET_DEPTH_K = np.array([[571.623718, 0.0, 319.5], [0.0, 571.623718, 239.5], [0.0, 0.0, 1.0]])
"""ScanNet's scene0000_00 intrinsics: its 1296x968 colour camera's and its 640x480 depth camera's,
whose focal lengths are 1.1 % (x) and 1.5 % (y) apart once scaled to one size."""


def _scaled(K: np.ndarray, s: float) -> np.ndarray:
    """``K`` of an image resized by ``s`` (pixel centres at integers, as ``reliev3r.geometry``)."""
    out = K.copy()
    out[:2, :2] *= s
    out[:2, 2] = (out[:2, 2] + 0.5) * s - 0.5
    return out


def _homogeneous(K: np.ndarray) -> np.ndarray:
    """``K`` as ScanNet writes an ``intrinsic_*.txt``: the top-left of a 4x4 identity."""
    out = np.eye(4)
    out[:3, :3] = K
    return out


def _save(path: Path, matrix: np.ndarray) -> None:
    """A matrix as SensReader writes one: a row a line, ``%f`` (``-inf`` for a lost pose)."""
    np.savetxt(path, matrix, fmt="%f")


@pytest.fixture(scope="module")
def clip():
    """(RGB [N,H,W,3], depth uint16 mm [N,H,W], cam_to_world [N,4,4], K [3,3]) of a synthetic clip."""
    scene = synthetic.render_scene(7, frames=FRAMES, height=HEIGHT, width=WIDTH, fov_deg=FOV_DEG)
    depth = np.nan_to_num(scene.depth.numpy() * 1000.0, posinf=0.0)
    depth[depth > 9900] = 0  # the 7-Scenes reader drops depth past 10 m (65535 marks invalid in some releases)
    return (scene.images.numpy(), np.round(depth).astype(np.uint16), scene.cam_to_world.numpy().astype(np.float64),
            scene.intrinsics.numpy().astype(np.float64))


def _write_scannet(root: Path, clip, *, suffix: str = ".png", depth_K: np.ndarray | None = None) -> Path:
    """The clip as a ScanNet scene: colour at twice the depth's size (each pixel repeated 2x2),
    ``intrinsic_color`` the clip's K scaled by 2, ``intrinsic_depth`` the clip's K (or ``depth_K``)."""
    rgb, depth, poses, K = clip
    for sub in ("color", "depth", "pose", "intrinsic"):
        (root / sub).mkdir(parents=True)
    _save(root / "intrinsic" / "intrinsic_color.txt", _homogeneous(_scaled(K, 2.0)))
    _save(root / "intrinsic" / "intrinsic_depth.txt", _homogeneous(K if depth_K is None else depth_K))
    _save(root / "intrinsic" / "extrinsic_color.txt", np.eye(4))
    _save(root / "intrinsic" / "extrinsic_depth.txt", np.eye(4))
    for i in range(len(rgb)):
        colour = np.repeat(np.repeat(rgb[i], 2, axis=0), 2, axis=1)
        imaging.write_image(root / "color" / f"{i}{suffix}", cv2.cvtColor(colour, cv2.COLOR_RGB2BGR))
        imaging.write_image(root / "depth" / f"{i}.png", depth[i])
        _save(root / "pose" / f"{i}.txt", poses[i])
    return root


def test_a_4x4_intrinsics_file_is_read_as_its_top_left_3x3(tmp_path):
    """ScanNet writes intrinsics as a 4x4 whose top-left 3x3 is K: read as K by the one reader of
    intrinsics files (``reliev3r.imaging.read_intrinsics``); a 4x4 whose last row or column is
    not 0 0 0 1 is no such matrix, refused naming the file."""
    file = tmp_path / "intrinsic_color.txt"
    _save(file, _homogeneous(SCANNET_COLOUR_K))
    np.testing.assert_array_equal(imaging.read_intrinsics(file), SCANNET_COLOUR_K)
    bad = _homogeneous(SCANNET_COLOUR_K)
    bad[0, 3] = 2.0
    _save(file, bad)
    with pytest.raises(ValueError, match=f"{re.escape(str(file))}: .*0 0 0 1"):
        imaging.read_intrinsics(file)


def test_the_streamer_reads_a_scannet_scene_with_its_colour_intrinsics(tmp_path, clip):
    """A streamer source pointed at a ScanNet scene reads its ``color/`` frames in natural order
    with the intrinsics of ``intrinsic/intrinsic_color.txt`` (not an assumed field of view)."""
    scene = _write_scannet(tmp_path / "scene0000_00", clip, suffix=".jpg")
    errors = []
    (source,) = discover([str(scene)], on_error=lambda *e: errors.append(e))
    assert isinstance(source, ImageSequenceSource)
    frames = list(source.frames())
    assert not errors
    assert [f.name for f in source.files] == [f"{i}.jpg" for i in range(FRAMES)]
    assert [f.index for f in frames] == list(range(FRAMES))
    for frame in frames:
        np.testing.assert_allclose(frame.intrinsics, _scaled(clip[3], 2.0), rtol=1e-6)
