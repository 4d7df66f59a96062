"""ScanNet scenes as ScanNet's SensReader exports them (``color/N.jpg``; ``depth/N.png`` uint16
millimetres at another size than the colour; ``pose/N.txt`` 4x4 camera-to-world, ``-inf`` where
its tracking lost the frame; ``intrinsic/intrinsic_color.txt`` and ``intrinsic_depth.txt``, 4x4),
read for evaluation (``scannet:DIR``) and by the streamer (a source pointed at the scene).
Every scene is written here from the synthetic world or from a plane, so the answer is known."""

from __future__ import annotations

import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from evaluation.datasets import load_windows
from evaluation.evaluate import evaluate_model, trivial_baseline
from learner.config import ModelConfig
from learner.model import FFRM
from reliev3r import cli, imaging, synthetic
from reliev3r.distill import frame_streams
from streamer.sources import ImageSequenceSource, discover
from tests.tiny_snapshot import make_tiny_snapshot

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


def _write_7scenes(root: Path, clip) -> Path:
    rgb, depth, poses, K = clip
    root.mkdir()
    _save(root / "camera-intrinsics.txt", K)
    for i in range(len(rgb)):
        stem = root / f"frame-{i:06d}"
        imaging.write_image(f"{stem}.color.png", cv2.cvtColor(rgb[i], cv2.COLOR_RGB2BGR))
        imaging.write_image(f"{stem}.depth.png", depth[i])
        _save(Path(f"{stem}.pose.txt"), poses[i])
    return root


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


def _windows(spec: str, tmp_path: Path, **kw):
    args = dict(views=3, height=HEIGHT, width=WIDTH, windows=4, stride=3, run_dir=tmp_path) | kw
    return load_windows(spec, **args)


def test_a_scannet_scene_reads_as_its_frames_written_as_7scenes_and_scores_the_same(tmp_path, clip):
    """Known answer: the same synthetic frames written as a 7-Scenes folder (colour and depth at
    64x48) and as a ScanNet scene (colour at 128x96, each pixel repeated 2x2; depth at 64x48, its
    intrinsics the colour's scaled by 1/2) give the same windows at 64x48, so any model, the
    constant depth and the ground truth score the same on both. Exactly, but for the 6 decimals
    SensReader writes: the 2x2 area average of a repeated pixel is that pixel; the depth brought
    to the colour frame by nearest sampling repeats each depth pixel 2x2 (no colour pixel centre
    falls on a tie between two depth pixels) and the fit to 64x48 samples one of each 2x2; the
    colour's intrinsics scaled by 1/2 are the clip's."""
    seven = _windows(f"7scenes:{_write_7scenes(tmp_path / 'seven', clip)}", tmp_path)
    scan = _windows(f"scannet:{_write_scannet(tmp_path / 'scene0000_00', clip)}", tmp_path)
    assert len(seven) == 4
    assert [w.name for w in scan] == [w.name.replace("seven", "scene0000_00") for w in seven]
    for a, b in zip(seven, scan):
        np.testing.assert_array_equal(b.images, a.images)
        np.testing.assert_array_equal(b.gt_depth, a.gt_depth)
        np.testing.assert_array_equal(b.gt_cam_to_world, a.gt_cam_to_world)
        np.testing.assert_allclose(b.intrinsics, a.intrinsics, rtol=1e-6)
        assert (b.gt_depth > 0).mean() > 0.9
    torch.manual_seed(0)
    model = FFRM(ModelConfig(size="tiny")).eval()
    scored = evaluate_model(model, scan, "cpu")
    assert {"absrel_med", "ate", "accuracy"} <= scored.keys()
    assert scored == pytest.approx(evaluate_model(model, seven, "cpu"), rel=1e-5)
    assert trivial_baseline(scan) == pytest.approx(trivial_baseline(seven), rel=1e-6)


def _plane_depth(K: np.ndarray, width: int, height: int, normal: np.ndarray, d: float) -> np.ndarray:
    """z-depth [H,W] of the plane ``normal . X = d`` seen by a camera of intrinsics ``K``."""
    v, u = np.mgrid[0:height, 0:width].astype(np.float64)
    rays = np.stack([u, v, np.ones_like(u)], -1) @ np.linalg.inv(K).T
    return d / (rays @ normal)


def test_depth_of_the_depth_camera_is_brought_to_the_colour_frame_through_both_intrinsics(tmp_path):
    """Known answer from exact geometry: a tilted plane in front of ScanNet's scene0000_00 cameras
    (1296x968 colour, 640x480 depth; the depth camera sees 1.1 % wider than the colour's scaled,
    SensReader's extrinsics identity). Each colour pixel takes the depth pixel nearest to where its
    ray meets the depth image (within half a depth pixel on each axis), so its depth is the
    plane's along its ray to within what half a depth pixel moves it on the plane, plus the
    half millimetre of the PNG. A plain resize of the depth map to the colour frame's size, which
    takes the depth camera's for the colour's, misplaces the edges by 3 depth pixels: beyond it."""
    scene = tmp_path / "scene0000_00"
    normal, d = np.array([0.5, -0.3, 1.0]), 2.0
    depth = _plane_depth(SCANNET_DEPTH_K, 640, 480, normal, d)
    depth_mm = np.round(depth * 1000).astype(np.uint16)
    for sub in ("color", "depth", "pose", "intrinsic"):
        (scene / sub).mkdir(parents=True)
    _save(scene / "intrinsic" / "intrinsic_color.txt", _homogeneous(SCANNET_COLOUR_K))
    _save(scene / "intrinsic" / "intrinsic_depth.txt", _homogeneous(SCANNET_DEPTH_K))
    for i in range(2):
        imaging.write_image(scene / "color" / f"{i}.jpg", np.full((968, 1296, 3), 128, np.uint8))
        imaging.write_image(scene / "depth" / f"{i}.png", depth_mm)
        _save(scene / "pose" / f"{i}.txt", np.eye(4))
    (w,) = load_windows(f"scannet:{scene}", views=2, height=968, width=1296, windows=1, stride=1, run_dir=tmp_path)
    np.testing.assert_allclose(w.intrinsics[0], SCANNET_COLOUR_K, rtol=1e-6)  # the colour frame, as it is
    truth = _plane_depth(SCANNET_COLOUR_K, 1296, 968, normal, d)
    # z = d / L with L linear in the depth pixel (L = normal . Kd^-1 [x, y, 1]; at the colour ray's own
    # point L is normal . Kc^-1 [u, v, 1]): half a pixel on each axis changes L by at most h
    L = d / truth
    h = 0.5 * (abs(normal[0]) / SCANNET_DEPTH_K[0, 0] + abs(normal[1]) / SCANNET_DEPTH_K[1, 1])
    bound = d * h / (L * (L - h)) + 0.0005 + 1e-6
    for frame in w.gt_depth:
        assert (np.abs(frame - truth) <= bound).all()
    resized = cv2.resize(depth_mm, (1296, 968), interpolation=cv2.INTER_NEAREST_EXACT) / 1000.0
    assert (np.abs(resized - truth) > bound).mean() > 0.1


def _with_poses_lost(scene: Path, clip) -> Path:
    """``scene`` with the poses a SensReader export may hold that are none: frame 4's ``-inf`` (its
    tracking lost), 7's ``nan`` (some exports), 9's missing, and 2's a scaled rotation (no pose)."""
    (scene / "pose" / "4.txt").write_text("-inf -inf -inf -inf\n" * 4)
    (scene / "pose" / "7.txt").write_text("nan nan nan nan\n" * 4)
    (scene / "pose" / "9.txt").unlink()
    scaled = clip[2][2].copy()
    scaled[:3, :3] *= 2
    _save(scene / "pose" / "2.txt", scaled)
    return scene


def test_a_lost_pose_is_no_pose_said_once_and_a_pose_that_is_none_skips_its_windows(tmp_path, clip, caplog):
    """SensReader writes ``-inf`` for every entry of the pose of a frame its tracking lost (some
    exports ``nan``): that frame has no ground-truth pose, so windows with it are scored without
    the pose metrics (its depth is good), said once for the scene with how many and the first, a
    missing pose file with them. A pose file that is there and finite but no pose (a scaled
    rotation) is read as a folder's (``reliev3r.imaging.read_pose``): its windows are skipped,
    naming it."""
    scene = _with_poses_lost(_write_scannet(tmp_path / "scene0000_00", clip), clip)
    with caplog.at_level("WARNING", logger="evaluation.datasets"):
        windows = _windows(f"scannet:{scene}", tmp_path, views=2, stride=1, windows=FRAMES - 1)
    starts = [int(w.name.split(":")[1]) for w in windows]
    assert starts == [0] + list(range(3, FRAMES - 1))  # 1 and 2 hold frame 2
    without = {s for s, w in zip(starts, windows) if w.gt_cam_to_world is None}
    assert without == {3, 4, 6, 7, 8, 9}
    assert all(w.gt_depth is not None for w in windows)
    np.testing.assert_allclose(windows[0].gt_cam_to_world, clip[2][:2], atol=1e-6)
    said = [r.getMessage() for r in caplog.records]
    lost = [m for m in said if "no pose" in m]
    assert lost == [f"{scene}: 3 of {FRAMES} frames have no pose (pose/<name>.txt missing, or not finite as "
                    f"SensReader writes the pose of a frame its tracking lost; the first: pose/4.txt); they go "
                    "without a ground-truth pose"]
    skipped = [m for m in said if "window skipped" in m]
    assert len(skipped) == 2 and all(f"{scene / 'pose' / '2.txt'}: the rotation is not a rotation" in m
                                     for m in skipped)


@pytest.mark.parametrize("depth_K, problem", [
    (np.array([[83.1, 0, 31.5], [0, 83.1, 23.5], [0, 0, 1]]), r"not the colour frames' intrinsics .*scaled"),
    (np.array([[55.4, 0, 63.5], [0, 55.4, 47.5], [0, 0, 1]]), r"principal point \(63.5, 47.5\) far from the centre"),
], ids=["focal", "other-size"])
def test_depth_intrinsics_that_are_not_the_colour_ones_scaled_are_said_and_no_window_is_read(tmp_path, clip,
                                                                                            depth_K, problem):
    """The depth's intrinsics are checked against its maps (its principal point near their centre,
    as a folder's are against its frames) and against the colour's: the colour frame's scaled to
    the depth's size, but for what the calibration of two cameras moves (ScanNet's: 1.5 %). A depth
    camera 1.5 times narrower, or intrinsics of depth maps twice the size, are no such pair: every
    window is skipped naming the file and why, and the scene is refused saying it."""
    scene = _write_scannet(tmp_path / "scene", clip, depth_K=depth_K)
    file = scene / "intrinsic" / "intrinsic_depth.txt"
    with pytest.raises(ValueError, match=f"no window could be read.*{re.escape(str(file))}: {problem}"):
        _windows(f"scannet:{scene}", tmp_path)


def test_a_scannet_range_its_natural_order_and_a_scene_without_intrinsics(tmp_path, clip):
    """``scannet:DIR@A-B`` reads frames A..B of the scene in natural order (``10.jpg`` after
    ``9.jpg``, as SensReader numbers them); a scene without its intrinsics is refused naming the
    file; a path that is no folder is said so."""
    scene = _write_scannet(tmp_path / "scene", clip)
    (w,) = _windows(f"scannet:{scene}@7-11", tmp_path, views=3, stride=2, windows=1)
    np.testing.assert_allclose(w.gt_cam_to_world, clip[2][[7, 9, 11]], atol=1e-6)
    (scene / "intrinsic" / "intrinsic_depth.txt").unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(scene / "intrinsic" / "intrinsic_depth.txt"))):
        _windows(f"scannet:{scene}", tmp_path)
    with pytest.raises(ValueError, match="no such folder"):  # datasets.spec_problem, before anything is read
        _windows(f"scannet:{tmp_path / 'nowhere'}", tmp_path)


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
    with the intrinsics of ``intrinsic/intrinsic_color.txt`` (not an assumed field of view); so
    does ``teacher-train --distill --frames scannet:DIR``."""
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
    streams = [(name, len(list(rgbs))) for name, rgbs in frame_streams([f"scannet:{scene}"], fov_deg=60.0)]
    assert streams == [("scene0000_00", FRAMES)]


def test_reliev3r_eval_takes_a_scannet_spec(tmp_path, clip, capsys):
    """``reliev3r eval --data scannet:DIR@A-B`` scores a snapshot on the scene's windows: the
    constant-depth baseline's row is that of the windows ``evaluation.datasets`` reads."""
    scene = _write_scannet(tmp_path / "scene0000_00", clip, suffix=".jpg")
    snap = make_tiny_snapshot(tmp_path / "run", height=HEIGHT, width=WIDTH)
    out = tmp_path / "eval"
    argv = ["eval", "--checkpoint", str(snap), "--data", f"scannet:{scene}@0-9", "--views", "3", "--windows", "2",
            "--out", str(out), "--teacher", "oracle", f"run.dir={tmp_path / 'run'}"]
    assert cli.main(argv) == 0
    result = json.loads((out / "results.json").read_text())
    assert [w.split(":")[0] for w in result["windows"]] == ["scene0000_00"] * 2
    windows = _windows(f"scannet:{scene}@0-9", tmp_path, views=3, windows=2, stride=result["stride"])
    assert result["rows"]["baseline: constant depth + identity poses"] == pytest.approx(trivial_baseline(windows))


class _Errors(list):
    """A source's ``on_error``: every (source, reason, detail) it reports."""

    def __call__(self, source, reason, detail):
        self.append((source, reason, detail))

    def reasons(self) -> list[str]:
        return [r for _, r, _ in self]


def test_the_streamer_reads_a_scannet_scenes_depth_and_poses_where_a_stage_trains_on_them(tmp_path, clip):
    """Known answer: a streamer source pointed at a ScanNet scene carries each frame's ground truth
    where a stage trains on it (``ground_truth=True``): ``depth/<N>.png`` of the depth camera
    brought to the colour frame's pixels through both intrinsics (here each depth pixel repeated
    2x2, as the colour's are) and ``pose/<N>.txt``. Before, it read neither (it looked for
    ``color/N.depth.png`` and ``color/N.pose.txt``), so a supervised sibling on a ScanNet scene
    got no ground truth. Read without (no stage trains on it), the frames carry none."""
    _, depth, poses, _ = clip
    scene = _write_scannet(tmp_path / "scene0000_00", clip, suffix=".jpg")
    errors = _Errors()
    (source,) = discover([str(scene)], on_error=errors, ground_truth=True)
    frames = list(source.frames())
    assert len(frames) == FRAMES
    for i, frame in enumerate(frames):
        np.testing.assert_array_equal(frame.gt_depth, np.repeat(np.repeat(depth[i], 2, 0), 2, 1) / np.float32(1000))
        np.testing.assert_allclose(frame.gt_cam_to_world, poses[i], atol=1e-6)  # the 6 decimals SensReader writes
    assert not errors
    (bare,) = discover([str(scene)], on_error=errors, ground_truth=False)
    assert all(f.gt_depth is None and f.gt_cam_to_world is None for f in bare.frames())
    assert not errors


def test_a_scannet_frame_whose_tracking_was_lost_streams_without_a_pose_said_once(tmp_path, clip):
    """SensReader's ``-inf`` (``nan`` in some exports) for a frame its tracking lost is no pose
    (``reliev3r.imaging.read_tracked_pose``), as for eval: the frame streams with its depth but
    without a pose, reported as ``lost_pose``; a frame without a pose file as ``no_pose``; a file
    that is no pose (a scaled rotation) as ``bad_pose``. Each reason is counted per frame and
    said once for the source: every report carries the same detail, naming the first file."""
    scene = _with_poses_lost(_write_scannet(tmp_path / "scene0000_00", clip), clip)
    errors = _Errors()
    frames = list(ImageSequenceSource(scene, on_error=errors).frames())
    without = [i for i, f in enumerate(frames) if f.gt_cam_to_world is None]
    assert without == [2, 4, 7, 9]
    assert all(f.gt_depth is not None for f in frames)
    assert errors.reasons() == ["bad_pose", "lost_pose", "lost_pose", "no_pose"]
    said = {r: {d for _, reason, d in errors if reason == r} for r in ("bad_pose", "lost_pose", "no_pose")}
    assert all(len(details) == 1 for details in said.values())  # said once each
    (bad,), (lost,), (missing,) = said["bad_pose"], said["lost_pose"], said["no_pose"]
    assert f"{scene / 'pose' / '2.txt'}: the rotation is not a rotation" in bad
    assert str(scene / "pose" / "4.txt") in lost and "tracking lost" in lost
    assert f"{scene / 'pose' / '9.txt'}: not there" in missing


@pytest.mark.parametrize("depth_K, problem", [
    (np.array([[83.1, 0, 31.5], [0, 83.1, 23.5], [0, 0, 1]]), r"not the colour frames' intrinsics .*scaled"),
    (np.array([[55.4, 0, 63.5], [0, 55.4, 47.5], [0, 0, 1]]), r"principal point \(63.5, 47.5\) far from the centre"),
], ids=["focal", "other-size"])
def test_scannet_depth_intrinsics_that_are_not_the_colour_ones_scaled_are_refused_once(tmp_path, clip, depth_K,
                                                                                       problem):
    """Depth intrinsics the depth maps cannot be of (checked by
    ``reliev3r.imaging.depth_intrinsics_problem``, as eval checks them) are refused once for the
    source, as ``depth_intrinsics_mismatch`` naming the file and why: every frame streams without
    depth (its pose kept), none with depth put on the wrong pixels."""
    scene = _write_scannet(tmp_path / "scene", clip, depth_K=depth_K)
    errors = _Errors()
    frames = list(ImageSequenceSource(scene, on_error=errors).frames())
    assert len(frames) == FRAMES
    assert all(f.gt_depth is None and f.gt_cam_to_world is not None for f in frames)
    (said,) = errors
    assert said[1] == "depth_intrinsics_mismatch"
    assert re.search(f"{re.escape(str(scene / 'intrinsic' / 'intrinsic_depth.txt'))}: {problem}", said[2])


def test_the_streamers_scannet_windows_hold_the_ground_truth_eval_reads_for_their_frames(tmp_path, clip):
    """The windows a streamer cuts from a ScanNet scene hold, for each view, the ground-truth depth
    and pose that ``scannet:DIR`` eval reads for that frame, fitted to the window's size (here a
    crop and a resize: 128x96 to 40x40) by the one fit both sides use
    (``reliev3r.imaging.fit_image``, nearest for depth): exactly, the pose to float32."""
    from streamer.config import StreamerConfig
    from streamer.windows import windows_of

    scene = _write_scannet(tmp_path / "scene0000_00", clip)
    cfg = StreamerConfig(views=3, height=40, width=40, frame_stride=1, window_step=3, keyframe_min_flow=0)
    (source,) = discover([str(scene)], ground_truth=True)
    windows = [w.to_message() for w in windows_of(source.name, source.frames(), cfg)]
    assert len(windows) >= 2
    for msg in windows:
        assert msg.arrays["gt_depth"].shape == (3, 40, 40) and (msg.arrays["gt_depth"] > 0).mean() > 0.9
        for v, index in enumerate(msg.meta["frame_indices"]):
            (truth,) = load_windows(f"scannet:{scene}@{index}-{index}", views=1, height=40, width=40, windows=1,
                                    stride=1, run_dir=tmp_path)
            np.testing.assert_array_equal(msg.arrays["gt_depth"][v], truth.gt_depth[0])
            np.testing.assert_array_equal(msg.arrays["gt_cam_to_world"][v], truth.gt_cam_to_world[0])
            np.testing.assert_allclose(msg.arrays["intrinsics"][v], truth.intrinsics[0], rtol=1e-6)
