"""Known-answer tests of the synthetic world: exact depth against hand-placed geometry,
multi-view consistency of depth, pose and colour, determinism, the video + ground-truth
files, texture matchability and camera parallax."""

import json
import math
from dataclasses import replace

import av
import cv2
import numpy as np
import pytest
import torch

from reliev3r import geometry, synthetic
from streamer.config import SyntheticConfig

torch.set_num_threads(1)


def _material(seed=0, pattern=0):
    return synthetic.Material(color_a=(0.2, 0.1, 0.1), color_b=(0.9, 0.8, 0.7), pattern=pattern, period=0.3,
                              angle=0.2, noise_freq=4.0, noise_amp=0.5, seed=seed)


def _room(**objects):
    return synthetic.World(room_min=(-2.0, -2.0, 0.0), room_max=(2.0, 2.0, 3.0),
                           room_materials=tuple(_material(k, k % 4) for k in range(6)), **objects)


def _pose(eye, target):
    return geometry.look_at(torch.tensor(eye, dtype=torch.float64), torch.tensor(target, dtype=torch.float64)).float()


def test_depth_of_a_wall_and_objects_is_exact():
    h, w = 48, 64
    K = geometry.intrinsics_from_fov(60.0, w, h)
    # Camera at the room centre, 1.5 m high, facing the +x wall 2 m away: z-depth 2 everywhere
    # (the view spans z in [0.63, 2.37] m there, inside floor and ceiling).
    pose = _pose([0.0, 0.0, 1.5], [1.0, 0.0, 1.5])
    images, depth = synthetic.render_views(_room(), pose[None], K, h, w)
    assert images.shape == (1, h, w, 3) and images.dtype == torch.uint8
    torch.testing.assert_close(depth[0], torch.full((h, w), 2.0), atol=2e-6, rtol=0)

    # A sphere of radius 0.25 centred 1 m ahead: the ray through its centre sees depth 0.75;
    # an axis-aligned box whose -x face is the plane x = 0.9: depth 0.9 on that face.
    sphere = synthetic.Sphere((1.0, 0.0, 1.5), 0.25, _material(7))
    box = synthetic.Box((1.0, 0.6, 1.5), (0.1, 0.1, 0.1), ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)),
                        _material(8, 2))
    world = _room(spheres=(sphere,), boxes=(box,))
    origin, dirs = synthetic.camera_rays(pose, K, torch.tensor([[(w - 1) / 2, (h - 1) / 2]]))
    t, _ = synthetic.render_rays(world, origin, dirs)
    assert t.item() == pytest.approx(0.75, abs=1e-6)
    uv, _ = geometry.project(geometry.transform_points(geometry.invert_pose(pose), torch.tensor([[0.9, 0.6, 1.5]])), K)
    t, _ = synthetic.render_rays(world, *synthetic.camera_rays(pose, K, uv))
    assert t.item() == pytest.approx(0.9, abs=1e-6)

    # A tilted camera: every pixel's unprojected point lies on a room face (floor z=0, ceiling
    # z=3 or a wall at +-2), to float precision.
    pose = _pose([0.3, -0.5, 1.2], [1.5, 0.7, 0.4])
    _, depth = synthetic.render_views(_room(), pose[None], K, h, w)
    pts = geometry.transform_points(pose, geometry.unproject_depth(depth[0], K).reshape(-1, 3))
    gap = torch.stack(((pts[:, :2].abs() - 2.0).abs().min(-1).values, pts[:, 2].abs(), (pts[:, 2] - 3.0).abs()), -1)
    assert gap.min(-1).values.max() < 1e-5
    assert (pts[:, 2].abs() < 1e-5).any()  # it does see the floor


@pytest.fixture(scope="module")
def clip():
    return synthetic.render_scene(3, frames=9, height=144, width=192)


def test_multi_view_consistency_of_depth_pose_and_colour(clip):
    h, w = clip.depth.shape[1:]
    K = clip.intrinsics
    uv_i = geometry.pixel_grid(h, w).reshape(-1, 2)
    for i, j in [(0, 4), (8, 3)]:
        world_pts = geometry.transform_points(clip.cam_to_world[i],
                                              geometry.unproject_points(uv_i, clip.depth[i].reshape(-1), K))
        uv_j, z_j = geometry.project(geometry.transform_points(geometry.invert_pose(clip.cam_to_world[j]),
                                                               world_pts), K)
        inside = (z_j > 0.05) & (uv_j[:, 0] >= 0) & (uv_j[:, 0] <= w - 1) & (uv_j[:, 1] >= 0) & (uv_j[:, 1] <= h - 1)
        assert inside.float().mean() > 0.3, "frames i and j should overlap"
        # Exact check: cast frame j's rays through the projected (sub-pixel) positions. A visible
        # point is hit at exactly its projected depth; an occluded one in front of it; nothing
        # is ever seen behind a surface.
        t_j, rgb_j = synthetic.render_rays(clip.world, *synthetic.camera_rays(clip.cam_to_world[j], K, uv_j[inside]))
        rel = (t_j - z_j[inside]) / z_j[inside]
        assert rel.max() < 1e-4, "a ray of frame j went through a surface seen by frame i"
        agree = rel.abs() < 1e-4
        assert agree.float().mean() > 0.6
        # View-independent colour: the point has frame i's colour when seen from frame j.
        col_i = clip.images[i].reshape(-1, 3)[inside][agree].float()
        diff = (rgb_j[agree] * 255.0 - col_i).abs().max(-1).values
        assert (diff <= 1.0).float().mean() > 0.99
        # Frame j's depth map agrees too: inverse depth is affine in the image across a plane,
        # so bilinear sampling of it is exact except across edges (and on spheres, nearly).
        d_j = 1.0 / geometry.sample_bilinear(1.0 / clip.depth[j], uv_j[inside])
        err = ((d_j - z_j[inside]).abs() / z_j[inside])[agree]
        assert err.median() < 1e-5
        assert (err < 1e-3).float().mean() > 0.9  # the rest: pixels next to edges, spheres


def test_deterministic_by_seed_and_different_across_seeds():
    a = synthetic.render_scene(5, frames=3, height=24, width=32)
    b = synthetic.render_scene(5, frames=3, height=24, width=32)
    c = synthetic.render_scene(6, frames=3, height=24, width=32)
    assert torch.equal(a.images, b.images) and torch.equal(a.depth, b.depth)
    assert torch.equal(a.cam_to_world, b.cam_to_world)
    assert not torch.equal(a.images, c.images) and not torch.allclose(a.cam_to_world, c.cam_to_world)
    # Held-out worlds (cfg.seed + 1000) share no scene with the training world.
    train = {synthetic.scene_seed(0, k) for k in range(8)}
    held_out = {synthetic.scene_seed(1000, k) for k in range(8)}
    assert len(train) == 8 and not train & held_out


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * math.log10(255.0**2 / max(mse, 1e-12))


def test_video_and_ground_truth_round_trip(clip, tmp_path):
    video = synthetic.write_scene(clip, tmp_path, "clip", fps=12)
    assert video == tmp_path / "clip.mp4"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.gt.npz", "clip.mp4"]  # no temp files left
    with av.open(str(video)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == clip.images.shape[0]
    assert frames[0].shape == tuple(clip.images.shape[1:])
    psnr = min(_psnr(f, im.numpy()) for f, im in zip(frames, clip.images))
    assert psnr > 30.0, psnr

    with np.load(tmp_path / "clip.gt.npz", allow_pickle=False) as z:
        assert set(z.files) >= {"depth", "cam_to_world", "intrinsics", "fps"}
    gt = synthetic.load_ground_truth(video)
    assert gt is not None and gt.fps == 12
    np.testing.assert_array_equal(gt.depth, clip.depth.numpy())
    np.testing.assert_array_equal(gt.cam_to_world, clip.cam_to_world.numpy())
    np.testing.assert_array_equal(gt.intrinsics, clip.intrinsics.numpy())
    assert synthetic.load_ground_truth(tmp_path / "other.mp4") is None

    with pytest.raises(ValueError, match="even"):
        synthetic.write_scene(replace(clip, images=clip.images[:, :143]), tmp_path, "odd")


def test_a_scene_survives_a_power_loss_video_last(tmp_path, folder_fsyncs, fsynced):
    """Both files were renamed into place unflushed: after a power loss a cached video could
    stand without its ground truth, or beside the earlier one. Each file's bytes are flushed
    before its rename; the folder once the earlier video is gone, once it names the new ground
    truth, and once it names the new video, so the folder as flushed never pairs a video with
    ground truth it was not written with."""
    scene = synthetic.render_scene(5, frames=3, height=24, width=32)
    video, gt = tmp_path / "s.mp4", tmp_path / "s.gt.npz"
    synthetic.write_scene(scene, tmp_path, "s", config={"n": 1})

    def state():  # the video standing (its inode) and the ground truth's ``n`` where it was flushed
        with np.load(gt, allow_pickle=False) as z:
            written = json.loads(str(z["config"]))["n"] if gt in fsynced else None
        return (video.stat().st_ino if video.exists() else None), written

    flushed = folder_fsyncs(tmp_path, state)
    synthetic.write_scene(scene, tmp_path, "s", config={"n": 2})
    assert video in fsynced and flushed == [(None, 1), (None, 2), (video.stat().st_ino, 2)]


@pytest.mark.parametrize("out", ["file", "file/world"])
def test_render_into_a_file_is_refused_before_rendering_naming_it(tmp_path, capsys, out):
    """``reliev3r render --out`` naming a file (or a folder under one): exit 2, one line naming
    the file, and no frame rendered. It rendered the first scene (11 s at the default size) and
    then stopped on "[Errno 17] File exists"."""
    from reliev3r import cli

    (tmp_path / "file").write_text("the user's own")
    code = cli.main(["render", "--out", str(tmp_path / out), "streamer.synthetic.frames=2",
                     "streamer.synthetic.scenes=1", "streamer.synthetic.height=16", "streamer.synthetic.width=16"])
    said = capsys.readouterr().err
    assert code == 2 and f"{tmp_path / 'file'} is not a folder" in said and "rendering" not in said, said
    assert (tmp_path / "file").read_text() == "the user's own"


def test_ensure_world_is_idempotent_and_follows_the_config(tmp_path):
    cfg = SyntheticConfig(scenes=2, frames=3, height=24, width=32, seed=4)
    videos = synthetic.ensure_world(tmp_path, cfg, progress=False)
    assert videos == sorted(videos) and len(videos) == 2 and all(v.is_file() for v in videos)
    stamps = [v.stat().st_mtime_ns for v in videos]
    assert synthetic.ensure_world(tmp_path, cfg, progress=False) == videos
    assert [v.stat().st_mtime_ns for v in videos] == stamps  # nothing rendered again

    # A changed config renders again; a missing ground-truth file renders that scene again.
    videos2 = synthetic.ensure_world(tmp_path, replace(cfg, frames=4), progress=False)
    assert videos2 == videos and synthetic.load_ground_truth(videos[0]).depth.shape == (4, 24, 32)
    (tmp_path / (videos[1].stem + ".gt.npz")).unlink()
    synthetic.ensure_world(tmp_path, replace(cfg, frames=4), progress=False)
    assert synthetic.load_ground_truth(videos[1]).depth.shape == (4, 24, 32)

    held_out = synthetic.ensure_world(tmp_path, replace(cfg, seed=cfg.seed + 1000), progress=False)
    assert not set(held_out) & set(videos)
    with pytest.raises(ValueError, match="even"):
        synthetic.ensure_world(tmp_path, replace(cfg, height=25), progress=False)


def test_textures_give_sift_plenty_of_keypoints():
    scene = synthetic.render_scene(11, frames=3, height=192, width=256)
    gray = cv2.cvtColor(scene.images[1].numpy(), cv2.COLOR_RGB2GRAY)
    keypoints = cv2.SIFT_create().detect(gray, None)
    assert len(keypoints) > 100, len(keypoints)


@pytest.mark.parametrize("seed", range(12))
def test_camera_has_parallax_and_keeps_clear_of_everything(seed):
    world, path = synthetic.random_world(np.random.default_rng(seed))
    poses = synthetic.trajectory(path, 64)
    eyes = poses[:, :3, 3]
    assert np.linalg.norm(eyes - eyes[0], axis=-1).max() > 0.3
    lo, hi = np.array(world.room_min), np.array(world.room_max)
    assert np.all(eyes > lo + 0.5) and np.all(eyes < hi - 0.5)
    for box in world.boxes:
        local = (eyes - np.array(box.center)) @ np.array(box.rotation)
        assert np.linalg.norm(np.maximum(np.abs(local) - np.array(box.half_size), 0), axis=-1).min() > 0.3
    for sphere in world.spheres:
        assert (np.linalg.norm(eyes - np.array(sphere.center), axis=-1) - sphere.radius).min() > 0.3
    assert len(world.boxes) >= 2 and len(world.spheres) >= 1
    # Smooth: no jumps between consecutive frames.
    assert np.linalg.norm(np.diff(eyes, axis=0), axis=-1).max() < 0.1


def test_a_synthetic_pose_that_is_no_pose_is_named_as_a_pose_file_is(clip, tmp_path, caplog):
    """The synthetic world's ground truth (``<stem>.gt.npz``) is checked as a pose file is
    (``reliev3r.imaging.pose_problem``): a frame whose pose is not finite or not rigid (a scale)
    is named with the file, the frame and the problem; evaluation skips the windows with that
    frame saying so, and the streamer streams it without a pose, reported as ``bad_pose`` (the
    first frame's detail on each report, as for a folder's pose files). Before, the NaN and the
    scaled matrix went into the evaluation's pose metrics and the streamer's windows unsaid."""
    from evaluation.datasets import load_windows
    from streamer.sources import VideoSource

    video = synthetic.write_scene(clip, tmp_path, "clip", fps=12)
    stored_file = tmp_path / "clip.gt.npz"
    with np.load(stored_file, allow_pickle=False) as z:
        stored = dict(z)
    stored["cam_to_world"][1, 0, 3] = np.nan
    stored["cam_to_world"][2, :3, :3] *= 2.0
    np.savez(stored_file, **stored)
    gt = synthetic.load_ground_truth(video)
    assert sorted(gt.bad_poses) == [1, 2]
    assert gt.bad_poses[1] == f"{stored_file}: frame 1: the pose is not finite"
    assert gt.bad_poses[2].startswith(f"{stored_file}: frame 2: the rotation is not a rotation")

    with caplog.at_level("WARNING", logger="evaluation.datasets"):
        windows = load_windows(f"synthetic:{tmp_path}", views=2, height=48, width=64, windows=8, stride=1,
                               run_dir=tmp_path)
    assert [w.name for w in windows] == [f"clip:{k}" for k in range(3, 8)]
    assert all(np.isfinite(w.gt_cam_to_world).all() for w in windows)
    said = [r.getMessage() for r in caplog.records]
    assert said == [f"evaluation window skipped: clip:{k}: {gt.bad_poses[1 if k < 2 else 2]}" for k in range(3)]

    errors = []
    source = VideoSource(video, on_error=lambda *report: errors.append(report))
    frames = list(source.frames())
    assert [f.gt_cam_to_world is None for f in frames] == [False, True, True] + [False] * 6
    np.testing.assert_array_equal(frames[3].gt_cam_to_world, stored["cam_to_world"][3])
    assert [(name, reason) for name, reason, _ in errors] == [(source.name, "bad_pose")] * 2
    assert len({detail for _, _, detail in errors}) == 1 and errors[0][2].startswith(gt.bad_poses[1])
