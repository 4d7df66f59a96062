"""COLMAP export: a model written from known poses, intrinsics and points (text and binary)
reads back with pycolmap (COLMAP's own reader) as written, with COLMAP's projection landing on
the observations we wrote; ``reliev3r reconstruct --colmap`` and ``reliev3r export --colmap``
write models that pycolmap loads and that agree with their other outputs."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch

from evaluation.tum import quaternion_to_matrix, read_tum
from reliev3r import cli, geometry
from reliev3r.colmap import SparseModel, rotation_to_quaternion_wxyz, write_model
from streamer_media import encode, panning_frames
from tests.tiny_snapshot import make_tiny_snapshot

pycolmap = pytest.importorskip("pycolmap", reason="pycolmap (extras 'colmap' and 'test') reads the models back")

W, H = 64, 48


def _known_model() -> tuple[SparseModel, dict]:
    """4 cameras on an arc looking at the origin (two intrinsics), 40 points in front of them,
    each observed by every view it projects into, plus 2 points observed by none."""
    rng = np.random.default_rng(3)
    angles = np.linspace(-0.6, 0.6, 4)
    eyes = np.stack([3 * np.sin(angles), 0.3 * np.arange(4) - 0.4, -3 * np.cos(angles)], -1)
    c2w = geometry.look_at(torch.from_numpy(eyes), torch.zeros(4, 3, dtype=torch.float64),
                           torch.tensor([0.0, -1.0, 0.0], dtype=torch.float64).expand(4, 3)).numpy()
    K1 = np.array([[55.0, 0, 31.5], [0, 57.25, 23.5], [0, 0, 1]])
    K2 = np.array([[70.125, 0, 30.0], [0, 70.125, 24.75], [0, 0, 1]])
    K = np.stack([K1, K1, K2, K2])
    points = rng.uniform(-0.8, 0.8, (42, 3))
    obs = []
    for p in range(40):
        for i in range(4):
            cam = np.linalg.inv(c2w[i]) @ np.append(points[p], 1.0)
            x, y = (K[i] @ cam[:3])[:2] / cam[2]
            if cam[2] > 0 and -0.5 <= x < W - 0.5 and -0.5 <= y < H - 0.5:
                obs.append((p, i, x, y))
    obs = np.array(obs)
    obs = obs[rng.permutation(len(obs))]  # observations in any order
    model = SparseModel(intrinsics=K, cam_to_world=c2w, sizes=[W, H], names=[f"view_{i}.png" for i in range(4)],
                        points=points, colors=rng.integers(0, 256, (42, 3)), errors=rng.uniform(0, 1, 42),
                        obs_point=obs[:, 0].astype(int), obs_image=obs[:, 1].astype(int), obs_xy=obs[:, 2:])
    return model, {"K": K, "c2w": c2w, "points": points, "obs": obs}


@pytest.mark.parametrize("fmt", ["txt", "bin"])
def test_pycolmap_reads_back_what_was_written(tmp_path, fmt):
    model, truth = _known_model()
    paths = write_model(model, tmp_path, fmt)
    assert [p.name for p in paths] == [f"cameras.{fmt}", f"images.{fmt}", f"points3D.{fmt}"]
    rec = pycolmap.Reconstruction(str(tmp_path))
    assert (rec.num_cameras(), rec.num_images(), rec.num_points3D()) == (2, 4, 42)
    obs = truth["obs"]
    assert rec.compute_num_observations() == len(obs)

    # Written as float64 (text: the shortest repr that reads back to the same double), so exact to
    # float64 rounding; what pycolmap derives (matrices from quaternions, projections) to 1e-9.
    for i, image in sorted(rec.images.items()):
        k = i - 1
        assert image.name == f"view_{k}.png" and image.camera_id == (1 if k < 2 else 2)
        cam = rec.cameras[image.camera_id]
        assert cam.model == pycolmap.CameraModelId.PINHOLE and (cam.width, cam.height) == (W, H)
        K = truth["K"][k]
        # COLMAP's pixel centres sit at +0.5 of ours: principal point shifted, focal lengths not
        np.testing.assert_allclose(cam.params, [K[0, 0], K[1, 1], K[0, 2] + 0.5, K[1, 2] + 0.5], rtol=1e-15)
        w2c = np.linalg.inv(truth["c2w"][k])
        np.testing.assert_allclose(image.cam_from_world().matrix(), w2c[:3], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(image.projection_center(), truth["c2w"][k][:3, 3], rtol=1e-9, atol=1e-12)
        mine = obs[obs[:, 1] == k]
        assert image.num_points2D() == len(mine)
        for row, p2d in zip(mine, image.points2D):  # each image's 2D points keep observation order
            assert p2d.point3D_id == int(row[0]) + 1
            np.testing.assert_allclose(p2d.xy, row[2:] + 0.5, rtol=1e-15)
            # COLMAP's own projection of the 3D point lands on the 2D point we wrote
            xyz = rec.points3D[p2d.point3D_id].xyz
            np.testing.assert_allclose(cam.img_from_cam(image.cam_from_world() * xyz), p2d.xy, rtol=1e-9)
    for pid, point in rec.points3D.items():
        p = pid - 1
        np.testing.assert_allclose(point.xyz, truth["points"][p], rtol=1e-15)
        np.testing.assert_array_equal(point.color, model.colors[p])
        assert point.error == model.errors[p]
        track = {(e.image_id, e.point2D_idx) for e in point.track.elements}
        assert {image_id for image_id, _ in track} == {int(i) + 1 for i in obs[obs[:, 0] == p, 1]}
        for image_id, idx in track:  # the track and the image's 2D points name each other
            assert rec.images[image_id].points2D[idx].point3D_id == pid
    assert all(len(rec.points3D[pid].track.elements) == 0 for pid in (41, 42))  # seen by no image


def test_text_and_binary_hold_the_same_model(tmp_path):
    model, _ = _known_model()
    write_model(model, tmp_path / "t", "txt")
    write_model(model, tmp_path / "b", "bin")
    t, b = pycolmap.Reconstruction(str(tmp_path / "t")), pycolmap.Reconstruction(str(tmp_path / "b"))
    for i in t.images:
        np.testing.assert_array_equal(t.images[i].cam_from_world().matrix(), b.images[i].cam_from_world().matrix())
    for p in t.points3D:
        np.testing.assert_array_equal(t.points3D[p].xyz, b.points3D[p].xyz)


def test_quaternions_of_every_branch():
    rotations = [np.eye(3), np.diag([1.0, -1, -1]), np.diag([-1.0, 1, -1]), np.diag([-1.0, -1, 1])]
    gen = torch.Generator().manual_seed(0)
    rotations += list(geometry.axis_angle_to_matrix(
        torch.randn(20, 3, generator=gen, dtype=torch.float64) * 3).numpy())
    for axis in np.eye(3):  # just short of half a turn
        rotations.append(geometry.axis_angle_to_matrix(torch.from_numpy(axis * (np.pi - 1e-9))).numpy())
    q = rotation_to_quaternion_wxyz(np.stack(rotations))
    assert (q[:, 0] >= 0).all()
    np.testing.assert_allclose(np.linalg.norm(q, axis=-1), 1, rtol=1e-15)
    np.testing.assert_allclose(quaternion_to_matrix(np.roll(q, -1, axis=-1)), np.stack(rotations), atol=1e-14)
    # and COLMAP's own matrix of the quaternion (pycolmap takes x, y, z, w)
    for r, wxyz in zip(rotations, q):
        np.testing.assert_allclose(pycolmap.Rotation3d(np.roll(wxyz, -1)).matrix(), r, atol=1e-14)


def test_model_rejects_inconsistent_input():
    model, _ = _known_model()
    with pytest.raises(ValueError, match="observation names"):
        SparseModel(intrinsics=model.intrinsics, cam_to_world=model.cam_to_world, sizes=[W, H], names=model.names,
                    points=np.zeros((1, 3)), obs_point=[1], obs_image=[0], obs_xy=[[0.0, 0.0]])
    with pytest.raises(ValueError, match="unique"):
        SparseModel(intrinsics=model.intrinsics, cam_to_world=model.cam_to_world, sizes=[W, H], names=["a"] * 4)


def _check_single_view_points(rec, images_dir, *, px_tol: float):
    """Every point is seen by exactly one image at the pixel it was unprojected from."""
    assert rec.num_points3D() > 100
    for image in rec.images.values():
        cam = rec.cameras[image.camera_id]
        picture = cv2.imread(str(images_dir / image.name))
        assert picture.shape == (cam.height, cam.width, 3)
        for p2d in list(image.points2D)[::7]:
            xyz = rec.points3D[p2d.point3D_id].xyz
            np.testing.assert_allclose(cam.img_from_cam(image.cam_from_world() * xyz), p2d.xy, atol=px_tol)
    assert all(len(p.track.elements) == 1 for p in rec.points3D.values())


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    return make_tiny_snapshot(tmp_path_factory.mktemp("run"))


def test_reconstruct_writes_a_colmap_model(tmp_path, snapshot, capsys):
    clip = encode(tmp_path / "pan.mp4", panning_frames(10, 96, 72))
    out = tmp_path / "rec"
    argv = ["reconstruct", "--checkpoint", str(snapshot), "--input", str(clip), "--out", f"{out}/", "--views", "4",
            "--overlap", "1", "--max-frames", "7", "--device", "cpu", "--colmap"]
    assert cli.main(argv) == 0
    # what it wrote is said, the model too (the line left it out); --out given with a slash said no 'rec//points.ply'
    said = capsys.readouterr().out.strip().splitlines()[-1]
    assert said == f"wrote {out}/points.ply, poses.txt, depth/, depth_color/, trajectory.png, colmap/", said
    summary = json.loads((out / "reconstruction.json").read_text())
    assert summary["colmap"] == "colmap/sparse/0"
    assert sorted(p.name for p in (out / "colmap" / "sparse" / "0").iterdir()) == ["cameras.bin", "images.bin",
                                                                                 "points3D.bin"]
    rec = pycolmap.Reconstruction(str(out / "colmap" / "sparse" / "0"))
    assert rec.num_images() == 7 and rec.num_points3D() == summary["points"]
    _, poses = read_tum(out / "poses.txt")
    for i, image in rec.images.items():
        assert image.name == f"{i - 1:06d}.png"
        np.testing.assert_allclose(image.cam_from_world().matrix(), np.linalg.inv(poses[i - 1])[:3], atol=1e-5)
    # points are float32 in the PLY and here: their projection lands within a thousandth of a pixel
    _check_single_view_points(rec, out / "colmap" / "images", px_tol=1e-3)


@pytest.mark.parametrize("poses", [None, "model"])
def test_export_writes_a_colmap_model_per_held_out_window(tmp_path, snapshot, poses):
    """One model per window, with the poses fitted to the model's depth unless ``--poses model``."""
    frames = tmp_path / "frames"
    frames.mkdir()
    for k, rgb in enumerate(panning_frames(12, 96, 72)):
        cv2.imwrite(str(frames / f"{k:04d}.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    out = tmp_path / "colmap"
    argv = ["export", "--checkpoint", str(snapshot), "--colmap", str(out), "--colmap-format", "txt", "--views", "3",
            "--data", f"folder:{frames}", "--windows", "2", "evaluator.stride=2",
            *(["--poses", poses] if poses else [])]
    assert cli.main(argv) == 0
    index = json.loads((out / "index.json").read_text())
    assert index["format"] == "txt" and len(index["windows"]) == 2 and index["poses"] == (poses or "fitted")
    for entry in index["windows"]:
        folder = out / entry["folder"]
        assert (folder / "sparse" / "0" / "points3D.txt").is_file()
        rec = pycolmap.Reconstruction(str(folder / "sparse" / "0"))
        assert rec.num_images() == 3 and rec.num_points3D() == entry["points"]
        cam = rec.cameras[1]
        assert (cam.width, cam.height) == (W, H)  # the snapshot's resolution
        K = geometry.intrinsics_from_fov(60.0, W, H).double().numpy()  # a folder without intrinsics: 60 degrees
        np.testing.assert_allclose(cam.params, [K[0, 0], K[1, 1], K[0, 2] + 0.5, K[1, 2] + 0.5], rtol=1e-6)
        _check_single_view_points(rec, folder / "images", px_tol=1e-6)


def test_windows_whose_names_differ_only_beyond_ascii_get_folders_of_their_own():
    """``szene_ä`` and ``szene_ö`` both became ``szene__``: the second window's model was written
    over the first's while index.json listed both."""
    from reliev3r.colmap import model_folder_name

    taken: set[str] = set()
    for name in ("szene_ä_0", "szene_ö_0", "plain_0", "plain_0"):
        folder = model_folder_name(name, taken)
        assert folder not in taken and all(c.isascii() and (c.isalnum() or c in "_.-") for c in folder)
        taken.add(folder)
    assert "plain_0" in taken  # a name that is already fine is kept as it is


def test_export_needs_out_or_colmap(snapshot, capsys):
    assert cli.main(["export", "--checkpoint", str(snapshot)]) == 2
    assert "--colmap" in capsys.readouterr().err
