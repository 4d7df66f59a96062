"""``reliev3r teacher-train --distill RUN``: the learner's depth on real windows becomes extra
training frames of the embedded teacher, through the teacher recipe's ``extra`` hook."""

from __future__ import annotations

import json
from types import SimpleNamespace
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml

from labelers.depth import make_teacher
from labelers.embedded import weights_digest
from labelers.teacher_train import TeacherTrainConfig, batch_indices, config_from_args, train
from learner.snapshot import load_model
from reliev3r import cli, imaging
from reliev3r.distill import CPU_RECIPE, RECIPE, frame_streams, real_samples, recipe, tile_windows, tiled
from helpers_world import write_7scenes
from streamer_media import encode, panning_frames
from tests.tiny_snapshot import make_tiny_snapshot

H, W = 48, 64
TINY = ["height=48", "width=64", "batch=4", "pool_frames=4", "views_per_eye=2", "eyes_per_world=2",
        "val_frames=2", "widths=8,8,8,16,16", "warmup=1", "log_every=1"]


def test_the_refresh_distils_with_the_recipe_of_its_device():
    assert recipe("cpu") == CPU_RECIPE
    assert recipe("cuda") == recipe("cuda:1") == RECIPE
    for settings in (RECIPE, CPU_RECIPE):  # every setting is a TeacherTrainConfig field
        config_from_args(SimpleNamespace(out="/tmp/t", options=list(settings)))


def test_a_yes_no_setting_reads_no_as_no():
    """``dining=false`` was read as yes (``bool("false")``)."""
    read = [config_from_args(SimpleNamespace(out="/tmp/t", options=[f"dining={v}"])).dining
            for v in ("false", "0", "no", "true", "1", "yes")]
    assert read == [False, False, False, True, True, True]
    with pytest.raises(ValueError, match="expected true or false"):
        config_from_args(SimpleNamespace(out="/tmp/t", options=["dining=maybe"]))


def test_tile_windows_use_every_frame_once():
    tiles = tile_windows(13, views=3, gap=2)
    assert tiles == [[0, 2, 4], [1, 3, 5], [6, 8, 10], [7, 9, 11]]
    assert tile_windows(5, views=3, gap=2) == []


def test_batch_indices_without_extra_draw_what_the_recipe_always_drew():
    a, b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    idx, extra = batch_indices(a, 100, 8)
    assert extra is None
    assert torch.equal(idx, torch.randint(100, (8,), generator=b))
    assert torch.equal(a.get_state(), b.get_state())  # the same draws follow


@pytest.mark.parametrize("share", [0.0, 0.5, 1.0])
def test_batch_indices_give_the_asked_share_exactly_when_it_is_whole(share):
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        idx, extra = batch_indices(gen, 50, 8, extra=7, extra_share=share)
        assert len(extra) == round(share * 8) and len(idx) == 8 - len(extra)
        assert ((extra >= 0) & (extra < 7)).all() and ((idx >= 0) & (idx < 50)).all()


def test_batch_indices_give_the_asked_share_on_average():
    gen = torch.Generator().manual_seed(0)
    counts = [len(batch_indices(gen, 50, 4, extra=7, extra_share=0.3)[1]) for _ in range(2000)]
    assert set(counts) == {1, 2}  # 1.2 frames: one, or two with probability 0.2
    assert np.mean(counts) / 4 == pytest.approx(0.3, abs=0.02)


def test_train_without_extra_records_no_extra(tmp_path):
    torch.set_num_threads(1)
    cfg = TeacherTrainConfig(out=tmp_path / "t", steps=1, device="cpu", height=32, width=32, batch=2, pool_frames=2,
                             views_per_eye=2, eyes_per_world=1, val_frames=1, widths=(8, 8, 8, 16, 16), warmup=1)
    meta = train(cfg, extra=None)
    assert meta["steps"] == 1 and "extra" not in meta["data"]
    with pytest.raises(ValueError, match="extra_share"):
        train(cfg, extra=(torch.zeros(2, 32, 32, 3, dtype=torch.uint8), torch.ones(2, 32, 32)))
    with pytest.raises(ValueError, match="extra samples must be"):
        train(cfg, extra=(torch.zeros(2, 16, 32, 3, dtype=torch.uint8), torch.ones(2, 16, 32)), extra_share=0.5)


def test_distill_writes_a_loadable_teacher_that_records_its_source(tmp_path):
    torch.set_num_threads(1)
    run = tmp_path / "run"
    snap = make_tiny_snapshot(run, height=H, width=W, views=3)
    frames = tmp_path / "frames"
    write_7scenes(frames, 13)
    out = tmp_path / "teacher"
    rc = cli.main(["teacher-train", "--distill", str(run), "--frames", f"7scenes:{frames}", "--out", str(out),
                               "--views", "3", "--gap", "2", "--steps", "2", "--device", "cpu", "--real-share", "0.5",
                               *TINY, "alignment=scale"])
    assert rc == 0
    weights = out / "embedded_depth.safetensors"
    meta = json.loads((out / "embedded_depth.json").read_text())
    assert meta["steps"] == 2 and meta["version"] == weights_digest(weights) and meta["ambiguity"] == "scale"
    extra = meta["data"]["extra"]
    assert extra["frames"] == 12 and extra["share"] == 0.5 and extra["dropped_frames"] == 1
    assert extra["snapshot"] == str(snap) and extra["step"] == 2 and extra["run"] == str(run)
    assert extra["frames_specs"] == [f"7scenes:{frames}"] and extra["views"] == 3 and extra["gap"] == 2
    snap_meta = json.loads((snap / "meta.json").read_text())
    assert extra["weights"] == "model"  # the tiny snapshot keeps no EMA copy
    assert extra["weights_sha256"] == snap_meta["files"]["model.safetensors"]["sha256"]
    assert meta["recipe"]["command"].startswith("reliev3r teacher-train --distill")
    teacher = make_teacher(f"embedded:{weights}", "cpu")
    depth, valid = teacher.predict(np.full((1, 40, 56, 3), 128, np.uint8))
    assert depth.shape == (1, 40, 56) and valid.all()
    # the folder names the same weights (what a user copies from the command's output)
    assert make_teacher(f"embedded:{out}", "cpu").version == teacher.version == meta["version"]


def test_real_samples_are_the_snapshots_prediction(tmp_path):
    """Known answer of step 2: the targets of one window are the snapshot's own depth for those
    frames, fitted as the evaluator fits them."""
    torch.set_num_threads(1)
    snap = make_tiny_snapshot(tmp_path / "run", height=H, width=W, views=3)
    frames = tmp_path / "frames"
    write_7scenes(frames, 7)
    model, _ = load_model(snap, "cpu")
    images, depths, info = real_samples(model, frame_streams([f"7scenes:{frames}"], fov_deg=60.0), views=3, gap=2,
                                        learner_size=(H, W), size=(H, W), device="cpu")
    assert images.shape == (6, H, W, 3) and images.dtype == torch.uint8 and depths.shape == (6, H, W)
    assert info["windows"] == 2 and info["dropped_frames"] == 1
    rgb = [cv2.cvtColor(cv2.imread(str(frames / f"frame-{k:06d}.color.jpg")), cv2.COLOR_BGR2RGB) for k in (1, 3, 5)]
    window = np.stack([imaging.fit_image(f, H, W) for f in rgb])
    with torch.no_grad():
        want = model(torch.from_numpy(window).permute(0, 3, 1, 2).float().div(255)[None]).depth[0]
    np.testing.assert_array_equal(images[3:].numpy(), window)  # the second window: frames 1, 3, 5
    torch.testing.assert_close(depths[3:], want.float(), rtol=1e-5, atol=1e-6)
    assert (depths > 0).all() and torch.isfinite(depths).all()


def test_tiled_streams_blocks_and_counts_the_tail():
    frames = [np.full((2, 2, 3), k, np.uint8) for k in range(13)]
    out = list(tiled(iter(frames), views=3, gap=2))
    assert out[-1] == 1  # frame 12 is left out
    assert [[int(f[0, 0, 0]) for f in w] for w in out[:-1]] == tile_windows(13, views=3, gap=2)


def test_distill_reads_the_runs_own_sources_by_default(tmp_path):
    """Without --frames the run's ``streamer.sources`` (here a video file and a live URL, which
    is left out) are read by the streamer's readers; views and gap come from its config."""
    torch.set_num_threads(1)
    run = tmp_path / "run"
    make_tiny_snapshot(run, height=H, width=W, views=3)
    video = tmp_path / "clip.mp4"
    encode(video, panning_frames(14, width=80, height=60))
    (run / "config.yaml").write_text(yaml.safe_dump(
        {"streamer": {"sources": [str(video), "rtsp://camera.invalid/feed"], "views": 3, "frame_stride": 2}}))
    out = tmp_path / "teacher"
    rc = cli.main(["teacher-train", "--distill", str(run), "--out", str(out), "--steps", "1", "--device", "cpu",
                   *TINY])
    assert rc == 0
    extra = json.loads((out / "embedded_depth.json").read_text())["data"]["extra"]
    assert extra["frames_specs"] == [str(video)] and extra["views"] == 3 and extra["gap"] == 2
    assert extra["frames"] == 12 and extra["dropped_frames"] == 2 and extra["windows"] == 4


def test_distill_refuses_a_device_this_host_does_not_have(tmp_path, capsys):
    """``--distill RUN --device cuda`` on a host without CUDA stopped with torch's "Torch not
    compiled with CUDA enabled" as it loaded the learner (exit 1): said in a line naming the device
    and the devices there are, exit 2, before anything is written."""
    run = tmp_path / "run"
    make_tiny_snapshot(run, height=H, width=W, views=3)
    out = tmp_path / "teacher"
    present = ", ".join(["cpu", *(f"cuda:{k}" for k in range(torch.cuda.device_count()))])
    for device in [f"cuda:{torch.cuda.device_count()}"] + ([] if torch.cuda.is_available() else ["cuda"]):
        assert cli.main(["teacher-train", "--distill", str(run), "--frames", str(tmp_path), "--out", str(out),
                         "--device", device, *TINY]) == 2, device
        said = capsys.readouterr()
        assert f"--device {device!r} is not available here (available: {present})" in said.err and not said.out
        assert not out.exists()


def test_distill_refuses_what_it_cannot_use(tmp_path, capsys):
    """Each refusal is a line on stderr, exit 2, as every other command's (``--distill``'s were
    printed on stdout), and nothing is written."""
    run = tmp_path / "run"
    make_tiny_snapshot(run, height=H, width=W, views=3)
    out = str(tmp_path / "teacher")
    few = tmp_path / "few"  # two frames: no window of the run's views
    few.mkdir()
    for k in range(2):
        imaging.write_image(few / f"img{k:03d}.png", np.full((H, W, 3), 60 * k, np.uint8))

    def refusal() -> str:
        said = capsys.readouterr()
        assert not said.out and said.err.startswith("reliev3r teacher-train: "), said
        assert len(said.err.strip().splitlines()) == 1, said.err
        return said.err

    assert cli.main(["teacher-train", "--distill", str(run), "--out", out, *TINY]) == 2
    assert "names no file or folder sources; give --frames" in refusal()
    assert cli.main(["teacher-train", "--distill", str(run), "--frames", "x", "--real-share", "2", "--out", out]) == 2
    assert "--real-share must be in [0, 1]" in refusal()
    assert cli.main(["teacher-train", "--distill", str(run), "--frames", str(few), "--out", out, "--device", "cpu",
                     *TINY]) == 2
    assert "fits in the given frames" in refusal()
    assert cli.main(["teacher-train", "--frames", "x", "--out", out]) == 2
    assert "go with --distill RUN" in refusal()
    assert cli.main(["teacher-train", "--distill", str(few), "--frames", str(few), "--out", out, *TINY]) == 2
    assert refusal().startswith(f"reliev3r teacher-train: --distill {few}: no valid snapshot there")  # named
    assert not Path(out).exists()


@pytest.mark.parametrize("flag, value, said", [("--views", "1", "must be >= 2, got 1"),
                                               ("--views", "0", "must be >= 2, got 0"),
                                               ("--gap", "0", "must be >= 1, got 0"),
                                               ("--max-frames", "0", "must be >= 1, got 0")])
def test_distill_counts_out_of_their_range_are_refused_naming_the_flag(tmp_path, capsys, flag, value, said):
    """``--views 0`` and ``--gap 0`` were plain ints read as "the run's" (``0 or ...``), and
    without ``--distill`` passed its "go with --distill" check; each is refused as the command
    line is read, exit 2, naming the flag, before the run (not there here) or the device (none
    here: said first otherwise, rather than training) is looked at."""
    for distill in (["--distill", str(tmp_path / "no run")], []):
        with pytest.raises(SystemExit) as stop:
            cli.main(["teacher-train", *distill, "--out", str(tmp_path / "teacher"), "--device", "gpu", flag, value])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and f"argument {flag}: {said}" in err, err
        assert not (tmp_path / "teacher").exists()


def test_max_frames_stops_reading():
    frames = [np.full((8, 8, 3), k, np.uint8) for k in range(40)]
    read = []

    def stream():
        for f in frames:
            read.append(f)
            yield f

    model = torch.nn.Module()
    with pytest.raises(ValueError, match="no window"):
        real_samples(model, [("s", stream())], views=2, gap=2, learner_size=(8, 8), size=(8, 8), device="cpu",
                     max_frames=1)
    assert len(read) == 4  # one block read, then the cap stopped the reading


def test_snapshots_depth_averaged_up_to_a_scale_per_view():
    from studies.distill_snapshots import scale_free_mean

    rng = np.random.default_rng(0)
    depth = torch.from_numpy(rng.uniform(1, 5, (3, 4, 6)).astype(np.float32))
    depth[1, 0, 0] = 0  # invalid in one map: invalid in the mean
    other = depth * torch.tensor([2.0, 0.5, 3.0]).view(3, 1, 1)  # the same up to a scale per view
    other[2] = 0  # nothing valid in one view of one map: that view is invalid
    mean = scale_free_mean([depth, other])
    for i in (0, 1):
        mask = (depth[i] > 0) & (other[i] > 0)
        torch.testing.assert_close(mean[i][mask], depth[i][mask] / depth[i][mask].median())
        assert (mean[i][~mask] == 0).all()
    assert (mean[2] == 0).all()
