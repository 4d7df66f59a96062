"""The embedded default depth teacher: shipped weights load offline through ``make_teacher``,
label a synthetic frame better than a constant (known answer: exact rendered depth), and the
recipe (``reliev3r teacher-train``) trains a tiny net on CPU and writes loadable weights."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat

import numpy as np
import pytest
import torch

from labelers.depth import make_teacher
from labelers.embedded import (META, WEIGHTS, EmbeddedDepthNet, EmbeddedTeacher, input_size_for, save_weights,
                               weights_digest)
from reliev3r.synthetic import render_scene
from tests.tiny_snapshot import SHARED


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a socket fails the test: the teacher must load offline."""

    def refuse(*args, **kwargs):
        raise AssertionError("the embedded teacher tried to use the network")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _lsq_absrel(pred: np.ndarray, gt: np.ndarray) -> float:
    ok = np.isfinite(gt) & (gt > 0)
    A = np.stack([pred[ok], np.ones(ok.sum())], 1).astype(np.float64)
    coef, *_ = np.linalg.lstsq(A, gt[ok].astype(np.float64), rcond=None)
    return float(np.mean(np.abs(A @ coef - gt[ok]) / gt[ok]))


def test_shipped_weights_load_offline_and_are_marked(no_network):
    torch.set_num_threads(1)
    assert WEIGHTS.is_file() and META.is_file()
    assert WEIGHTS.stat().st_size < 40e6  # package data stays small
    teacher = make_teacher("embedded", "cpu")
    assert isinstance(teacher, EmbeddedTeacher)
    info = teacher.describe()
    assert info["name"] == "embedded-unet" and info["space"] == "depth"
    assert info["version"] == weights_digest(WEIGHTS) and len(info["version"]) == 12
    meta = json.loads(META.read_text())
    assert meta["version"] == info["version"]  # the meta describes these very weights
    assert meta["recipe"]["command"].startswith("reliev3r teacher-train") and meta["steps"] > 0
    assert "7scenes" in meta["metrics"]


def test_shipped_teacher_beats_constant_on_synthetic_frames():
    """Known answer: exact rendered depth of the pipeline's own world (scenes the recipe never
    saw). The bar is low on purpose and honest: on these wall-heavy, textured views the
    teacher is only somewhat better than a constant (see docs/RESULTS.md); frames of other
    sizes come back at their own size."""
    torch.set_num_threads(1)
    teacher = make_teacher("embedded", "cpu")
    ours, const = [], []
    for seed in (1, 7):
        scene = render_scene(seed, frames=4, height=144, width=192)
        frames, gt = scene.images.numpy(), scene.depth.numpy()
        depth, valid = teacher.predict(frames)
        assert depth.shape == gt.shape and depth.dtype == np.float32
        assert valid.all() and np.isfinite(depth).all() and (depth > 0).all()
        ours += [_lsq_absrel(depth[v], gt[v]) for v in range(len(gt))]
        const += [_lsq_absrel(np.ones_like(gt[v]), gt[v]) for v in range(len(gt))]
    assert np.mean(ours) < np.mean(const), (np.mean(ours), np.mean(const))
    odd = teacher.predict(frames[:1, :101, :133])[0]
    assert odd.shape == (1, 101, 133)
    # Deterministic: the same frames give the same labels.
    again, _ = teacher.predict(frames)
    np.testing.assert_array_equal(depth, again)


def test_windows_labelled_together_get_their_own_labels():
    """A labeler's batch goes through the net as one forward (``predict_many``): windows of one
    size share it, a window of another size gets its own, and each comes back at its own size
    with the labels it gets alone. Batching changes only the order of the convolutions' sums
    (float32 rounding: 1e-7 relative here; the bound, 1e-4, leaves room for any CPU's kernels),
    not what any window sees: the net normalises each image by itself and has no batch
    statistics."""
    torch.set_num_threads(1)
    teacher = make_teacher("embedded", "cpu")
    windows = [render_scene(seed, frames=3, height=96, width=128).images.numpy() for seed in (2, 3)]
    windows.append(render_scene(4, frames=2, height=72, width=160).images.numpy())
    together = teacher.predict_many(windows)
    for frames, (depth, valid) in zip(windows, together):
        alone, alone_valid = teacher.predict(frames)
        assert depth.shape == frames.shape[:3] and np.array_equal(valid, alone_valid)
        np.testing.assert_allclose(depth, alone, rtol=1e-4)


def test_input_size_keeps_aspect_and_multiples():
    assert input_size_for(480, 640) == (192, 256)
    assert input_size_for(192, 256) == (192, 256)
    h, w = input_size_for(720, 1280)
    assert h % 16 == 0 and w % 16 == 0 and abs(w / h - 16 / 9) < 0.1


def test_recipe_trains_a_tiny_net_on_cpu_and_writes_loadable_weights(tmp_path, no_network):
    from reliev3r.cli import main

    torch.set_num_threads(1)
    out = tmp_path / "teacher"
    rc = main(["teacher-train", "--out", str(out), "--steps", "2", "--device", "cpu", "height=64", "width=64",
               "batch=2", "pool_frames=4", "views_per_eye=2", "eyes_per_world=2", "val_frames=2",
               "widths=8,8,8,16,16", "warmup=0", "log_every=1", "alignment=scale"])  # 0: no warm-up
    assert rc == 0
    weights = out / "embedded_depth.safetensors"
    meta = json.loads((out / "embedded_depth.json").read_text())
    assert meta["steps"] == 2 and meta["version"] == weights_digest(weights)
    assert meta["ambiguity"] == "scale" and "unknown scale" in meta["output"]
    assert meta["recipe"]["config"]["widths"] == [8, 8, 8, 16, 16]
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "step" in r] == [1, 2]
    assert all(np.isfinite(r["loss"]) for r in log if "loss" in r)
    teacher = make_teacher(f"embedded:{weights}", "cpu")
    assert teacher.version == meta["version"]
    depth, valid = teacher.predict(np.full((1, 40, 56, 3), 128, np.uint8))
    assert depth.shape == (1, 40, 56) and valid.all()


def test_a_teacher_survives_a_power_loss_weights_first(tmp_path, folder_fsyncs, fsynced):
    """Both files were renamed into place unflushed: after a power loss the meta (the mark of a
    whole teacher, a refresh relies on it) could stand without the weights it names. Each file's
    bytes are flushed before its rename, and the folder once it names the weights, before the
    meta is renamed, and again once it names the meta."""
    weights, meta = tmp_path / "teacher" / "embedded_depth.safetensors", tmp_path / "teacher" / "embedded_depth.json"
    weights.parent.mkdir()
    flushed = folder_fsyncs(weights.parent, lambda: (weights.is_file() and weights in fsynced,
                                                     meta.is_file() and meta in fsynced))
    old = os.umask(0o077)
    try:
        save_weights(EmbeddedDepthNet((8, 8)), weights, {"steps": 0})
    finally:
        os.umask(old)
    assert json.loads(meta.read_text())["version"] == weights_digest(weights)
    assert flushed and flushed[0] == (True, False) and flushed[-1] == (True, True)
    assert stat.S_IMODE(weights.stat().st_mode) == 0o644  # package data, whatever the umask


@pytest.mark.skipif(not (SHARED / "data" / "7scenes-redkitchen").is_dir(), reason="7-Scenes absent (shared data)")
def test_a_7scenes_score_is_recorded_in_the_meta_whole_and_durably(tmp_path, folder_fsyncs, fsynced, capsys):
    """``studies.embedded_teacher_7scenes --record`` rewrote the weights' meta in place, unflushed:
    a crash could leave a part of it (the teacher's meta no longer reads), a power loss the
    earlier one. The meta is renamed into place once its bytes are flushed, and the folder
    flushed once it names it."""
    from studies.embedded_teacher_7scenes import main

    weights, meta = tmp_path / "embedded_depth.safetensors", tmp_path / "embedded_depth.json"
    shutil.copyfile(WEIGHTS, weights)
    shutil.copyfile(META, meta)
    before = json.loads(meta.read_text())
    flushed = folder_fsyncs(tmp_path, lambda: meta in fsynced and "7scenes" in json.loads(meta.read_text())
                            .get("metrics", {}))
    assert main(["--data", str(SHARED / "data" / "7scenes-redkitchen"), "--pydnet", str(tmp_path / "absent"),
                 "--weights", str(weights), "--first", "0", "--last", "0", "--threads", "1", "--record"]) == 0
    after = json.loads(meta.read_text())
    assert after["metrics"]["7scenes"]["data"].endswith("(1 frames)") and after["version"] == before["version"]
    assert flushed == [True] and not list(tmp_path.glob("*.tmp"))


def test_rendering_stops_at_its_deadline_after_a_group_of_views(tmp_path):
    """``render_pool`` checks its deadline after every group of views (one eye's), not only
    between worlds: a deadline already past gives one group (or the groups that make
    ``at_least`` frames), none gives every frame asked."""
    import time

    from labelers.teacher_train import TeacherTrainConfig, render_pool

    cfg = TeacherTrainConfig(out=tmp_path, device="cpu", height=32, width=32, batch=1, pool_frames=12,
                             views_per_eye=3, eyes_per_world=4)
    images, depths, info = render_pool(cfg, 12, seed=0, deadline=time.monotonic())
    assert 1 <= len(images) <= 3 and info["worlds"] == 1 and depths.shape == (len(images), 32, 32)
    images, _, info = render_pool(cfg, 12, seed=0, deadline=time.monotonic(), at_least=5)
    assert 5 <= len(images) <= 8 and info["worlds"] == 1
    images, _, info = render_pool(cfg, 12, seed=0)
    assert len(images) == info["frames"] == 12


def test_recipe_rejects_unknown_options(tmp_path):
    from reliev3r.cli import main

    assert main(["teacher-train", "--out", str(tmp_path), "bogus=1"]) == 2
    assert main(["teacher-train", "--out", str(tmp_path), "height=100"]) == 2  # not a multiple of 16


@pytest.mark.parametrize("steps", ["0", "-3"])
def test_recipe_refuses_steps_below_one_naming_the_flag(tmp_path, capsys, steps):
    """``--steps 0`` was a plain int, refused as "steps must be >= 1" (the field, not the flag)
    once the config was built; now as the command line is read, exit 2, naming ``--steps``."""
    from reliev3r.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["teacher-train", "--out", str(tmp_path), "--device", "cpu", "--steps", steps])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and f"argument --steps: must be >= 1, got {steps}" in err, err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("option", ["eyes_per_world=0", "views_per_eye=0", "val_frames=0", "log_every=0",
                                    "warmup=-1", "lr=-1", "lr=nan", "weight_decay=-0.1", "grad_weight=-1",
                                    "render_fraction=0", "render_fraction=1.5", "time_budget_s=0"])
def test_recipe_refuses_values_it_cannot_run_before_it_renders(tmp_path, option):
    """Each named at start, exit 2: ``eyes_per_world=0`` rendered for ever (the time budget
    never stopped it), ``val_frames=0`` failed after the whole training with no weights
    written, ``log_every=0`` and ``warmup=0`` divided by zero after the pool was rendered."""
    from labelers.teacher_train import TeacherTrainConfig
    from reliev3r.cli import main

    key, _, value = option.partition("=")
    with pytest.raises(ValueError, match=key):
        TeacherTrainConfig(out=tmp_path, **{key: type(getattr(TeacherTrainConfig(out=tmp_path), key) or 1.0)(value)})
    assert main(["teacher-train", "--out", str(tmp_path), "--device", "cpu", option]) == 2
    assert not any(tmp_path.iterdir())



def test_recipe_refuses_a_device_that_is_none(tmp_path):
    from reliev3r.cli import main

    assert main(["teacher-train", "--out", str(tmp_path), "--device", "gpu"]) == 2
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("alignment", ["scale_shift", "scale"])
def test_recipe_loss_is_blind_to_what_its_alignment_leaves_unknown(alignment):
    """Known answers of the recipe's loss: zero for the truth at any scale; a shifted
    prediction costs nothing only when the alignment has a shift."""
    from labelers.teacher_train import depth_loss

    gt = torch.linspace(1.0, 4.0, 32 * 48, dtype=torch.float64).reshape(1, 32, 48).repeat(2, 1, 1)
    gt[1] = gt[1].flip(-1) ** 1.5
    gt[0, :3] = 0  # holes are ignored
    log = lambda d: d.clamp(min=1e-6).log()
    for pred in (gt * 0.37, gt * 5.0):
        loss, terms = depth_loss(log(pred), gt, alignment=alignment)
        assert float(loss) < 1e-6 and terms["absrel"] < 1e-6
    shifted, _ = depth_loss(log(gt + 2.0), gt, alignment=alignment)
    if alignment == "scale_shift":
        assert float(shifted) < 1e-6
    else:
        assert float(shifted) > 0.05
    with pytest.raises(ValueError, match="alignment"):
        depth_loss(log(gt), gt, alignment="affine")
