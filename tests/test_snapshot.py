"""Snapshots: atomic write, exact resume, corruption detection, pruning, optimizer round trip."""

import json
import logging

import pytest
import torch

from learner import snapshot
from learner.config import ModelConfig
from learner.snapshot import (SnapshotError, latest_snapshot, list_snapshots, load_model, prune_snapshots,
                              verify_snapshot)
from learner.train import Trainer, synthetic_batch
from tests.helpers_train import learner_cfg, toy_loss

torch.set_num_threads(1)


def _trainer(**kw) -> Trainer:
    return Trainer(learner_cfg(**kw), device="cpu", loss_fn=toy_loss)


def _batches(n):
    return [synthetic_batch(1, 2, 16, 16, seed=s) for s in range(n)]


def _reconstructor(tmp_path):
    """The API on a snapshot of one step trained at 16x24 (``tmp_path/run``)."""
    from learner.api import Reconstructor

    trainer = _trainer()
    trainer.step(synthetic_batch(1, 2, 16, 24))
    trainer.save_state(tmp_path / "run" / "snapshots")
    return Reconstructor.from_snapshot(tmp_path / "run", device="cpu")


def test_save_writes_plain_verified_files(tmp_path):
    trainer = _trainer()
    trainer.step(_batches(1)[0])
    path = trainer.save_state(tmp_path, extra_meta={"teachers": {"depth": "embedded"}})
    assert path.name == "step-000000001"
    assert sorted(p.name for p in path.iterdir()) == ["ema.safetensors", "meta.json", "model.safetensors",
                                                       "optimizer.safetensors", "trainer.safetensors"]
    meta = verify_snapshot(path)
    assert meta["step"] == 1 and meta["final"] is False and meta["teachers"] == {"depth": "embedded"}
    assert meta["config"]["model"]["size"] == "tiny" and meta["image_size"] == [16, 16]
    assert meta["versions"]["torch"] == torch.__version__
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]  # temp folder renamed away


def test_meta_that_is_not_plain_json_is_written_as_text(tmp_path):
    """The teacher meta comes from the windows trained on: a name that arrived as bytes, a key
    that is not text or a value JSON has no type for is written as text, never a failed snapshot."""
    trainer = _trainer()
    trainer.step(_batches(1)[0])
    odd = {"depth": {"name": b"fake", b"version": "1", "options": (1, 2), "seen": {3}, 4: None}}
    meta = verify_snapshot(trainer.save_state(tmp_path, extra_meta={"teachers": odd}))
    assert meta["teachers"] == {"depth": {"name": "fake", "version": "1", "options": [1, 2], "seen": "{3}",
                                          "4": None}}


def test_resume_continues_the_loss_curve_exactly(tmp_path):
    batches = _batches(6)
    straight = _trainer()
    expected = [straight.step(b)["loss"] for b in batches]

    first = _trainer()
    for b in batches[:3]:
        first.step(b)
    path = first.save_state(tmp_path)
    resumed = _trainer()
    meta = resumed.load_state(path)
    assert meta["step"] == 3 and resumed.global_step == 3
    got = [resumed.step(b)["loss"] for b in batches[3:]]
    assert got == expected[3:]  # bit-identical: model, EMA, AdamW moments, step and LR restored
    for a, b in zip(straight.ema.parameters(), resumed.ema.parameters()):
        assert torch.equal(a, b)


def test_optimizer_state_round_trip():
    trainer = _trainer()
    trainer.step(_batches(1)[0])
    state = trainer.optimizer.state_dict()
    tensors, structure = snapshot.flatten_optimizer_state(state)
    back = snapshot.unflatten_optimizer_state(tensors, json.loads(json.dumps(structure)))
    assert back["param_groups"] == state["param_groups"]
    assert back["state"].keys() == state["state"].keys()
    for idx, entry in state["state"].items():
        for key, value in entry.items():
            assert torch.equal(back["state"][idx][key], value), (idx, key)


def test_resume_takes_the_optimizer_settings_of_this_run_and_the_moments_of_the_snapshot(tmp_path):
    """A run resumed with another ``learner.weight_decay`` trains with it: the snapshot's param
    groups (written with the old value, and with other betas and eps, as an older version would
    have) give way to the ones this run built; the AdamW moments and step counts are the
    snapshot's."""
    first = _trainer(weight_decay=0.05)
    first.step(_batches(1)[0])
    for group in first.optimizer.param_groups:
        group.update(betas=(0.8, 0.9), eps=1e-6)
    path = first.save_state(tmp_path)
    saved = first.optimizer.state_dict()["state"]

    resumed = _trainer(weight_decay=0.01)
    built = [{k: v for k, v in g.items() if k not in ("params", "lr")} for g in resumed.optimizer.param_groups]
    resumed.load_state(path)
    groups = resumed.optimizer.param_groups
    assert [g["weight_decay"] for g in groups] == [0.01, 0.0]  # the decay group only
    assert [{k: v for k, v in g.items() if k not in ("params", "lr")} for g in groups] == built
    assert all(g["betas"] == (0.9, 0.95) and g["eps"] == 1e-8 for g in groups)
    restored = resumed.optimizer.state_dict()["state"]
    assert restored.keys() == saved.keys() and saved
    for idx, entry in saved.items():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(restored[idx][key], entry[key]), (idx, key)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a CUDA learner's fused AdamW needs a CUDA device")
@pytest.mark.parametrize("saved_on", ["cpu", "cuda"])
def test_a_cuda_learner_resumes_with_its_fused_update(tmp_path, saved_on):
    """On the GPU the learner's AdamW is fused. A snapshot of either device resumes there fused,
    its step counts on the parameters' device as the fused kernel needs, the moments the
    snapshot's; one of the GPU continues the loss curve of a run never stopped (to the
    rounding of the GPU's kernels)."""
    def trainer(device):
        return Trainer(learner_cfg(), device=device, loss_fn=toy_loss)

    batches = [synthetic_batch(1, 2, 16, 16, seed=s, device="cuda") for s in range(6)]
    straight = trainer("cuda")
    expected = [straight.step(b)["loss"] for b in batches]
    first = trainer(saved_on)
    for b in batches[:3]:
        first.step({k: v.to(saved_on) for k, v in b.items()})
    saved = {i: {k: v.cpu() for k, v in e.items()} for i, e in first.optimizer.state_dict()["state"].items()}
    resumed = trainer("cuda")
    assert resumed.load_state(first.save_state(tmp_path))["step"] == 3
    assert all(g["fused"] for g in resumed.optimizer.param_groups)
    state = resumed.optimizer.state_dict()["state"]
    for idx, entry in saved.items():
        assert state[idx]["step"].device.type == "cuda"
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(state[idx][key].cpu(), entry[key]), (idx, key)
    got = [resumed.step(b)["loss"] for b in batches[3:]]
    assert all(torch.isfinite(torch.tensor(got))) and resumed.global_step == 6
    if saved_on == "cuda":
        assert got == pytest.approx(expected[3:], rel=1e-4)


def test_corrupt_and_partial_snapshots_are_skipped_with_a_warning(tmp_path, caplog):
    trainer = _trainer()
    good = None
    for step, b in enumerate(_batches(4)):
        trainer.step(b)
        path = trainer.save_state(tmp_path)
        good = good or path
    snaps = [p for _, p in list_snapshots(tmp_path)]
    assert [p.name for p in snaps] == [f"step-00000000{i}" for i in (1, 2, 3, 4)]
    # step 4: truncated weights; step 3: garbled meta; step 2: missing meta (crashed writer).
    weights = snaps[3] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    (snaps[2] / "meta.json").write_text("{not json")
    (snaps[1] / "meta.json").unlink()
    with caplog.at_level(logging.WARNING, logger="reliev3r.learner.snapshot"):
        assert latest_snapshot(tmp_path) == snaps[0]
    text = caplog.text
    assert "step-000000004" in text and "model.safetensors" in text
    assert "meta.json does not parse" in text and "no meta.json" in text
    with pytest.raises(SnapshotError, match="checksum|bytes"):
        verify_snapshot(snaps[3])
    with pytest.raises(SnapshotError):
        _trainer().load_state(snaps[3])
    assert latest_snapshot(tmp_path / "absent") is None


def test_same_size_bit_flip_is_caught_by_checksum(tmp_path):
    trainer = _trainer()
    path = trainer.save_state(tmp_path)
    data = bytearray((path / "optimizer.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (path / "optimizer.safetensors").write_bytes(bytes(data))
    with pytest.raises(SnapshotError, match="checksum"):
        verify_snapshot(path)


def test_pruning_keeps_last_k_and_every_nth(tmp_path):
    trainer = _trainer()
    for step in range(1, 13):
        trainer.global_step = step
        trainer.save_state(tmp_path)
    (tmp_path / ".tmp-step-000000013-1-1").mkdir()  # a crashed writer's leftovers (fresh: kept)
    removed = prune_snapshots(tmp_path, keep_last=3, keep_every=5)
    kept = [s for s, _ in list_snapshots(tmp_path)]
    assert kept == [5, 10, 11, 12]
    assert len(removed) == 8
    assert (tmp_path / ".tmp-step-000000013-1-1").exists()


def test_load_model_uses_ema_weights(tmp_path):
    trainer = _trainer()
    for b in _batches(3):
        trainer.step(b)
    path = trainer.save_state(tmp_path, final=True)
    model, meta = load_model(path)
    assert meta["final"] is True and not model.training
    for a, b in zip(model.parameters(), trainer.ema.parameters()):
        assert torch.equal(a, b)
    raw, _ = load_model(path, ema=False)
    assert torch.equal(next(raw.parameters()), next(trainer.model.parameters()))


def test_resaving_the_same_step_replaces_atomically(tmp_path):
    trainer = _trainer()
    trainer.save_state(tmp_path)
    path = trainer.save_state(tmp_path, final=True)
    assert verify_snapshot(path)["final"] is True
    assert [p.name for p in tmp_path.iterdir()] == ["step-000000000"]


def test_reconstructor_runs_on_paths_and_arrays(tmp_path):
    import cv2
    import numpy as np

    from learner.api import Reconstructor

    rec = _reconstructor(tmp_path)
    assert rec.image_size == (16, 24)
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "b.png"), cv2.cvtColor(a, cv2.COLOR_RGB2BGR))
    k = np.array([[40.0, 0, 23.5], [0, 40.0, 15.5], [0, 0, 1]], np.float32)
    out = rec.run([a, tmp_path / "b.png"], intrinsics=k)
    assert out["depth"].shape == (2, 16, 24) and out["confidence"].shape == (2, 16, 24)
    assert out["cam_to_world"].shape == (2, 4, 4) and out["points"].shape == (2, 16, 24, 3)
    np.testing.assert_allclose(out["intrinsics"][0], [[20.0, 0, 11.5], [0, 20.0, 7.5], [0, 0, 1]])
    np.testing.assert_array_equal(out["images"][0], out["images"][1])  # path and array read alike
    # World points map back to each camera's depth along its optical axis.
    c2w = out["cam_to_world"][1]
    cam = (out["points"][1].reshape(-1, 3) - c2w[:3, 3]) @ c2w[:3, :3]
    np.testing.assert_allclose(cam[:, 2], out["depth"][1].reshape(-1), rtol=1e-4)
    with pytest.raises(FileNotFoundError):
        Reconstructor.from_snapshot(tmp_path / "nothing")


def test_reconstructor_brings_a_window_to_the_size_it_is_given(tmp_path):
    """``run(..., size=(H, W))`` resizes every image to that size (``reliev3r reconstruct`` passes
    its first window's to every later one, so that a snapshot without ``image_size`` gives one size
    for a whole run); a size that is not in multiples of the patch size is refused, naming it."""
    import numpy as np

    rec = _reconstructor(tmp_path)
    rec.image_size = None  # as a snapshot without image_size in its meta
    p = rec.model.cfg.patch_size
    portrait = np.random.default_rng(0).integers(0, 256, (6 * p, 4 * p, 3), dtype=np.uint8)
    assert rec.run([portrait, portrait])["depth"].shape == (2, 6 * p, 4 * p)
    out = rec.run([portrait, portrait], size=(2 * p, 3 * p))
    assert out["depth"].shape == (2, 2 * p, 3 * p) and out["images"].shape == (2, 2 * p, 3 * p, 3)
    for bad in [(2 * p + 1, 3 * p), (0, 3 * p), (2 * p,)]:
        with pytest.raises(ValueError, match=f"size: .*patch size {p}"):
            rec.run([portrait, portrait], size=bad)


def test_intrinsics_given_with_image_paths_are_turned_with_each_files_exif_orientation(tmp_path):
    """A JPEG stored 64x48 and tagged with Exif orientation 6 (a phone held upright: shown 48x64),
    given by its path with the intrinsics of the file as recorded (principal point (30, 20)):
    the image is read turned (OpenCV turns it) and the intrinsics with it, as the streamer, eval
    and ``reconstruct`` turn an intrinsics file; the same as giving the turned pixels as an array
    with the turned intrinsics (an array is taken as it is). An untagged file's intrinsics are
    kept; a shared matrix is turned for each file as that file is. Before, the recorded
    intrinsics were applied to the turned image (fx and fy, cx and cy each on the wrong axis)."""
    import cv2
    import numpy as np

    from reliev3r.imaging import EXIF_ORIENTATIONS, orient, orient_intrinsics
    from streamer_media import exif_tagged, texture

    rec = _reconstructor(tmp_path)
    stored = texture(64, 48)  # BGR
    ok, data = cv2.imencode(".jpg", stored, [cv2.IMWRITE_JPEG_QUALITY, 100])
    (tmp_path / "upright.jpg").write_bytes(exif_tagged(data.tobytes(), 6))
    (tmp_path / "level.jpg").write_bytes(data.tobytes())
    K = np.array([[50.0, 0, 30], [0, 55.0, 20], [0, 0, 1]])
    out = rec.run([tmp_path / "upright.jpg", tmp_path / "level.jpg"], intrinsics=K)
    # turned: fx and fy swap, cx = 48 - 1 - 20 = 27, cy = 30; resized 48x64 -> 24x16 (pixel centres kept)
    np.testing.assert_allclose(out["intrinsics"][0], [[27.5, 0, 13.25], [0, 12.5, 7.125], [0, 0, 1]], rtol=1e-6)
    # as recorded, resized 64x48 -> 24x16
    np.testing.assert_allclose(out["intrinsics"][1], [[18.75, 0, 10.9375], [0, 55 / 3, 20.5 / 3 - 0.5], [0, 0, 1]],
                               rtol=1e-6)
    shown = cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    turn = EXIF_ORIENTATIONS[6]
    as_array = rec.run([np.ascontiguousarray(orient(shown, turn))], intrinsics=orient_intrinsics(K, turn, 64, 48))
    np.testing.assert_array_equal(as_array["images"][0], out["images"][0])
    np.testing.assert_allclose(as_array["intrinsics"][0], out["intrinsics"][0], rtol=1e-6)
    per_image = rec.run([tmp_path / "upright.jpg", tmp_path / "level.jpg"], intrinsics=np.stack([K, K]))
    np.testing.assert_allclose(per_image["intrinsics"], out["intrinsics"], rtol=1e-6)


def test_api_refuses_intrinsics_that_cannot_be_the_images(tmp_path):
    """Intrinsics of the full-size frames given with an image file 4x smaller (principal point
    (95.5, 63.5) beside a 48x32 image: at its corner) are refused with a ValueError naming the
    image and what ``reliev3r.imaging.intrinsics_mismatch`` says, as ``reliev3r reconstruct``
    refuses such an intrinsics file (the streamer reports ``intrinsics_mismatch``). Before, the
    API reconstructed with them, unprojecting every point through the wrong principal point."""
    import cv2
    import numpy as np

    from reliev3r.imaging import intrinsics_mismatch

    rec = _reconstructor(tmp_path)
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)
    path = tmp_path / "small.png"
    cv2.imwrite(str(path), cv2.cvtColor(a, cv2.COLOR_RGB2BGR))
    full = np.array([[160.0, 0, 95.5], [0, 160.0, 63.5], [0, 0, 1]])  # of the 192x128 frames
    problem = intrinsics_mismatch(full, 48, 32)
    assert problem is not None
    with pytest.raises(ValueError) as err:
        rec.run([path], intrinsics=full)
    assert str(path) in str(err.value) and problem in str(err.value)
    fitting = np.array([[40.0, 0, 23.5], [0, 40.0, 15.5], [0, 0, 1]])
    with pytest.raises(ValueError) as err:  # per image: the second one's do not fit; an array is named by index
        rec.run([path, a], intrinsics=np.stack([fitting, full]))
    assert "images[1]" in str(err.value) and problem in str(err.value)
    assert rec.run([path, a], intrinsics=np.stack([fitting, fitting]))["depth"].shape == (2, 16, 24)


def test_api_refuses_intrinsics_of_another_shape_or_count_naming_what_it_takes(tmp_path):
    """``intrinsics`` is one [3, 3] for every image or one per image, [V, 3, 3]. One matrix in a
    [1, 3, 3] for two images, five for two, or four numbers ``fx fy cx cy`` are refused with a
    ValueError saying what was given and what is taken. Before, the first two for one image came
    out as an IndexError from inside the API, the extra three were dropped without a word, and the
    four numbers an IndexError ("invalid index to scalar variable")."""
    import numpy as np

    rec = _reconstructor(tmp_path)
    a = np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    K = np.array([[40.0, 0, 23.5], [0, 40.0, 15.5], [0, 0, 1]])
    four = np.array([40.0, 40, 23.5, 15.5])
    for given, shape in ((K[None], "[1, 3, 3]"), (np.stack([K] * 5), "[5, 3, 3]"), (four, "[4]")):
        with pytest.raises(ValueError) as err:
            rec.run([a, a], intrinsics=given)
        assert f"intrinsics: expected [3, 3] or [2, 3, 3] for 2 images, got {shape}" == str(err.value)
    assert rec.run([a, a], intrinsics=np.stack([K, K]))["depth"].shape == (2, 16, 24)
    assert rec.run([a, a], intrinsics=K.tolist())["depth"].shape == (2, 16, 24)  # any array-like


@pytest.mark.parametrize("case, row, value, reason", [
    ("zero focal length", (0, 0), 0.0, "focal lengths must be finite and > 0"),
    ("negative focal length", (1, 1), -40.0, "focal lengths must be finite and > 0"),
    ("NaN focal length", (0, 0), float("nan"), "focal lengths must be finite and > 0"),
    ("infinite principal point", (0, 2), float("inf"), "not finite"),
    ("last row not 0 0 1", (2, 1), 1.0, "the last row must be 0 0 1, got 0 1 1"),
])
def test_api_refuses_intrinsics_that_are_no_pinhole_camera_as_an_intrinsics_file_is(tmp_path, case, row, value,
                                                                                     reason):
    """Intrinsics given to the API are checked as ``reconstruct`` and the streamer check an
    intrinsics file (``reliev3r.imaging.intrinsics_problem``): finite, focal lengths > 0, a last
    row of 0 0 1; a ValueError names the image and the problem. Before, the API unprojected
    through them: a zero focal length gave infinite points, a negative one points mirrored through
    the camera, a NaN one NaN points, a last row of 0 1 1 was ignored; an infinite principal point
    was said to lie "far from the centre"."""
    import numpy as np

    rec = _reconstructor(tmp_path)
    a = np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    good = np.array([[40.0, 0, 23.5], [0, 40.0, 15.5], [0, 0, 1]])
    bad = good.copy()
    bad[row] = value
    with pytest.raises(ValueError) as err:
        rec.run([a, a], intrinsics=np.stack([good, bad]))
    assert str(err.value).startswith("images[1]: ") and reason in str(err.value), case


def test_snapshots_and_studies_need_no_pyzmq(tmp_path):
    # GPU hosts may lack pyzmq; a study there crashed at its final snapshot when the config
    # module pulled it in. A fresh interpreter with pyzmq blocked saves and loads a snapshot.
    import subprocess
    import sys
    from pathlib import Path

    code = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "zmq" or name.startswith("zmq."):
            raise ModuleNotFoundError("blocked: " + name)
sys.meta_path.insert(0, Block())
import studies.study
from learner.config import LearnerConfig
from learner.snapshot import load_model
from learner.train import Trainer
path = Trainer(LearnerConfig(), device="cpu").save_state({str(tmp_path)!r}, final=True)
load_model(path)
assert "zmq" not in sys.modules
print("ok")
"""
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=repo)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("ok")


def _with_old_keys(path, model=None, loss=None):
    """Rewrite a snapshot's meta as a version before the removal of options wrote it."""
    meta = json.loads((path / "meta.json").read_text())
    meta["config"]["model"].update({"predict_focal": False, "depth_param": "dense", "translation_unit": "free",
                                    "dense_grad_scale": 1.0, **(model or {})})
    meta["config"]["loss"].update({"match_depth": "pred", **(loss or {})})
    (path / "meta.json").write_text(json.dumps(meta))


def test_snapshots_with_removed_options_at_their_defaults_still_load(tmp_path):
    from reliev3r.config_base import build
    from learner.config import LearnerConfig

    trainer = _trainer()
    trainer.step(_batches(1)[0])
    path = trainer.save_state(tmp_path)
    _with_old_keys(path)
    model, meta = load_model(path)
    assert "predict_focal" not in meta["config"]["model"] and "match_depth" not in meta["config"]["loss"]
    assert "translation_unit" not in meta["config"]["model"] and "dense_grad_scale" not in meta["config"]["model"]
    build(LearnerConfig, meta["config"])  # the upgraded config is this version's
    resumed = _trainer()
    assert resumed.load_state(path)["step"] == 1


def test_snapshots_written_before_the_scale_head_load_and_resume_without_it(tmp_path):
    headless = ModelConfig(size="tiny", registers=2, scale_head=False)
    trainer = _trainer(model=headless)
    trainer.step(_batches(1)[0])
    path = trainer.save_state(tmp_path)
    meta = json.loads((path / "meta.json").read_text())
    del meta["config"]["model"]["scale_head"]  # as written before the option existed
    (path / "meta.json").write_text(json.dumps(meta))
    model, meta = load_model(path)
    assert model.scale_head is None and meta["config"]["model"]["scale_head"] is False
    assert _trainer(model=headless).load_state(path)["step"] == 1
    with pytest.raises(SnapshotError, match="scale_head"):
        _trainer(model=ModelConfig(size="tiny", registers=2, scale_head=True)).load_state(path)


@pytest.mark.parametrize("section, key, value", [("model", "predict_focal", True),
                                                 ("model", "depth_param", "view_scale"),
                                                 ("model", "translation_unit", "depth"),
                                                 ("model", "dense_grad_scale", 0.1),
                                                 ("loss", "match_depth", "teacher")])
def test_snapshots_that_used_a_removed_option_are_refused_naming_it(tmp_path, section, key, value):
    trainer = _trainer()
    trainer.step(_batches(1)[0])
    path = trainer.save_state(tmp_path)
    _with_old_keys(path, **{section: {key: value}})
    with pytest.raises(SnapshotError, match=f"learner.{section}.{key}="):
        load_model(path)
    with pytest.raises(SnapshotError, match=key):
        _trainer().load_state(path)
    assert snapshot.upgrade_config({"loss": {"kind": "weak"}}) == {"loss": {"kind": "weak"}}


def test_flat_refine_keys_of_old_snapshots_become_the_refine_section(tmp_path):
    from reliev3r.config_base import build
    from learner.config import LearnerConfig, RefineConfig

    old = {"refine_weight": 0.0, "refine_depth": "pred", "refine_solver": "adam", "refine_steps": 50,
           "refine_scales": True, "refine_shifts": False, "refine_lr": 0.02, "refine_min_matches": 16,
           "refine_compile": True}
    assert snapshot.upgrade_config({"loss": {"kind": "weak", **old}}) == {"loss": {"kind": "weak", "refine": None}}
    on = snapshot.upgrade_config({"loss": {**old, "refine_weight": 1.0, "refine_depth": "teacher",
                                           "refine_shifts": True}})
    assert build(RefineConfig, on["loss"]["refine"]) == RefineConfig(weight=1.0, depth="teacher", shifts=True)
    trainer = _trainer()
    trainer.step(_batches(1)[0])
    path = trainer.save_state(tmp_path)
    meta = json.loads((path / "meta.json").read_text())
    del meta["config"]["loss"]["refine"]
    meta["config"]["loss"].update({**old, "refine_weight": 1.0, "refine_steps": 5})
    (path / "meta.json").write_text(json.dumps(meta))
    _, meta = load_model(path)
    cfg = build(LearnerConfig, meta["config"])
    assert cfg.loss.refine == RefineConfig(weight=1.0, steps=5)


def test_the_first_snapshot_s_folder_is_flushed_into_its_parent(tmp_path, folder_fsyncs):
    """The snapshots folder made by the first save is flushed into its parent (the run folder)
    once it is there: after a power loss the first snapshot cannot be lost with a folder whose
    name never reached the disk. Before, only the snapshots folder itself was fsynced."""
    trainer = _trainer()
    trainer.step(_batches(1)[0])
    snaps = tmp_path / "snapshots"
    flushed = folder_fsyncs(tmp_path, snaps.is_dir)
    trainer.save_state(snaps)
    assert flushed and flushed[0] is True
    trainer.step(_batches(2)[1])
    again = len(flushed)
    trainer.save_state(snaps)
    assert len(flushed) == again  # an existing folder: its parent is not flushed again
