"""Learning studies: the labelled dataset cache, the study loop, the triangulation-consistency
term and view-scale depth parametrisation, a golden file of the first losses of a
deterministic tiny run, and a SIGKILL resume test with real learner and replay processes."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from learner import losses
from learner.config import LearnerConfig, LossConfig, ModelConfig
from reliev3r import geometry
from reliev3r.synthetic import render_scene
from studies.dataset import DatasetError, LabelledDataset, ensure_dataset, parse_spec

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "golden" / "first_losses.json"
REGEN = "RELIEV3R_REGEN_GOLDEN"
"""Set to 1 to rewrite the golden file (after an intended change of model, init or losses)."""

SPEC = dict(scenes=1, frames=12, views=3, stride=3, hop=4, height=24, width=32, match_scale=4, seed=5)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> LabelledDataset:
    spec = replace(parse_spec("synthetic"), **SPEC)
    return ensure_dataset(spec, tmp_path_factory.mktemp("cache"), workers=1, progress=False)


# --------------------------------------------------------------------------- dataset

def test_dataset_labels_once_and_serves_trainer_batches(dataset, tmp_path):
    assert len(dataset) == 2  # starts 0 and 4 of a 12-frame clip, span 6
    assert dataset.meta["teacher"]["name"] == "oracle-gt" and dataset.meta["matcher"]["name"] == "opencv-sift"
    m = dataset.matches_of(0)
    assert len(m) >= 12 and set(np.unique(m[:, :2]).astype(int)) <= {0, 1, 2}
    assert (m[:, 2] >= -0.5).all() and (m[:, 2] <= 31.5).all() and (m[:, 3] <= 23.5).all()
    # Matches found at 4x and mapped down agree with the ground truth: most reproject within
    # a pixel at the training resolution.
    a = dataset.arrays
    K, pose, depth = (torch.from_numpy(a[k][0]) for k in ("intrinsics", "gt_cam_to_world", "gt_depth"))
    i, j = m[:, 0].astype(int), m[:, 1].astype(int)
    uv_i, uv_j = torch.from_numpy(m[:, 2:4]), torch.from_numpy(m[:, 4:6])
    d_i = torch.stack([geometry.sample_bilinear(depth[v], uv_i[n:n + 1])[0] for n, v in enumerate(i)])
    world = torch.stack([geometry.transform_points(pose[v],
                                                   geometry.unproject_points(uv_i[n:n + 1], d_i[n:n + 1], K[v]))[0]
                         for n, v in enumerate(i)])
    proj = torch.stack([geometry.project(geometry.transform_points(geometry.invert_pose(pose[v]), world[n:n + 1]),
                                         K[v])[0][0]
                        for n, v in enumerate(j)])
    assert float(((proj - uv_j).norm(dim=-1) < 1.0).float().mean()) > 0.7

    batch = dataset.batch([1, 0])
    assert batch["images"].shape == (2, 3, 3, 24, 32) and batch["images"].dtype == torch.float32
    assert batch["teacher_valid"].dtype == torch.bool and batch["matches"].shape[1] == 8
    assert set(batch) == {"images", "intrinsics", "matches", "teacher_depth", "teacher_valid", "gt_depth",
                          "gt_cam_to_world"}
    # Window 1 is batch row 0: its matches carry b = 0.
    assert (batch["matches"][: len(dataset.matches_of(1)), 0] == 0).all()
    capped = dataset.batch([0, 1], max_matches=5, rng=np.random.default_rng(0))
    assert capped["matches"].shape[0] == 10

    # The cache is a plain npz (no pickle) and is reused, not rebuilt.
    spec = replace(parse_spec("synthetic"), **SPEC)
    cache = tmp_path / "c"
    first = ensure_dataset(spec, cache, workers=1, progress=False)
    files = list(cache.glob("*.npz"))
    mtime = files[0].stat().st_mtime_ns
    again = ensure_dataset(spec, cache, workers=1, progress=False)
    assert files[0].stat().st_mtime_ns == mtime and len(again) == len(first)
    np.load(files[0], allow_pickle=False)["names"]
    files[0].write_bytes(b"not a zip")
    with pytest.raises(DatasetError):
        LabelledDataset.load(files[0])


def test_parse_spec_names_bad_options():
    spec = parse_spec("synthetic:scenes=3,stride=5", views=3)
    assert (spec.scenes, spec.stride, spec.views) == (3, 5, 3)
    assert parse_spec("7scenes:/x/seq@0-99;stride=10").source == "7scenes:/x/seq@0-99"
    with pytest.raises(ValueError, match="bogus"):
        parse_spec("synthetic:bogus=1")
    with pytest.raises(ValueError, match="unknown dataset spec"):
        parse_spec("kitti")
    with pytest.raises(ValueError, match="views"):
        parse_spec("synthetic", views=1)



@pytest.mark.parametrize("frames", ["@5", "@9-3", "@a-b", "@-1-5", "@0-99x"])
def test_a_malformed_frame_range_is_refused_as_the_evaluation_refuses_it(frames):
    """The studies parsed a 7-Scenes spec's ``@A-B`` themselves: ``@5`` or ``@a-b`` failed later
    in the labelling with int()'s message, ``@9-3`` was taken. Now the spec is refused as it is
    parsed, with the words of ``evaluation.datasets`` (``spec_problem``, as ``reliev3r eval`` says it)."""
    from evaluation.datasets import spec_problem

    source = f"7scenes:/x/seq{frames}"
    said = spec_problem(source)
    assert said is not None and said.startswith(f"{source}: frame range")
    with pytest.raises(ValueError) as err:
        parse_spec(f"{source};stride=10")
    assert str(err.value) == said


def test_real_teacher_labels_at_match_resolution_are_block_averaged_and_memoised():
    from studies import dataset as ds

    # Block means over valid pixels; a small pixel is valid only when its whole block is.
    big = np.arange(2 * 4 * 6, dtype=np.float32).reshape(2, 4, 6)
    valid = np.ones_like(big, dtype=bool)
    valid[1, 0, 0] = False
    small, ok = ds._downsample_labels(big, valid, 2)
    assert small.shape == (2, 2, 3) and ok.shape == (2, 2, 3)
    assert small[0, 0, 0] == pytest.approx((0 + 1 + 6 + 7) / 4) and ok[0].all()
    assert not ok[1, 0, 0] and ok[1].sum() == 5 and small[1, 0, 0] == pytest.approx((25 + 30 + 31) / 3)

    class Counting:
        name = "counting"

        def __init__(self):
            self.frames = 0

        def predict(self, frames, *, gt_depth=None, window_id=""):
            self.frames += len(frames)
            assert gt_depth is None and frames.shape[1:3] == (8, 12)  # the large frames only
            return frames[..., 0].astype(np.float32) + 1, np.ones(frames.shape[:3], bool)

    teacher = Counting()
    ds._WORKER.pop("memo", None)
    try:
        frames = np.random.default_rng(0).integers(0, 255, (5, 8, 12, 3), dtype=np.uint8)
        # Two overlapping windows (frames 0-2 and 2-4) share frame 2: 5 predictions, not 6.
        a, _ = ds._teacher_labels(teacher, "w0", frames[:3, ::2, ::2], frames[:3], None, 2, ["f0", "f1", "f2"])
        b, _ = ds._teacher_labels(teacher, "w1", frames[2:, ::2, ::2], frames[2:], None, 2, ["f2", "f3", "f4"])
        assert teacher.frames == 5 and a.shape == (3, 4, 6)
        np.testing.assert_array_equal(a[2], b[0])
        want = frames[2, ..., 0].astype(np.float64).reshape(4, 2, 6, 2).mean((1, 3)) + 1
        np.testing.assert_allclose(b[0], want, rtol=1e-6)
    finally:
        ds._WORKER.pop("memo", None)


def test_a_7scenes_window_with_a_frame_of_another_size_is_skipped_saying_so(tmp_path, caplog):
    """A 7-Scenes folder whose frame 3 was resized (4:3 kept) is no frame its one intrinsics
    matrix serves (``reliev3r.imaging.other_size``): as in eval, the windows with it are skipped
    and said (logged, and listed in the cache's meta), the others labelled. Before, the reader's
    ValueError stopped the whole build."""
    import cv2

    from reliev3r import imaging

    rng = np.random.default_rng(0)
    texture = cv2.GaussianBlur(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8), (3, 3), 0)
    seq = tmp_path / "seq"
    seq.mkdir()
    for k in range(6):
        bgr = texture[k:k + 48, k:k + 64]
        bgr = cv2.resize(bgr, (48, 36)) if k == 3 else bgr
        cv2.imwrite(str(seq / f"frame-{k:06d}.color.png"), bgr)
        cv2.imwrite(str(seq / f"frame-{k:06d}.depth.png"), np.full(bgr.shape[:2], 1500, np.uint16))
        np.savetxt(seq / f"frame-{k:06d}.pose.txt", np.eye(4))
    spec = parse_spec(f"7scenes:{seq};views=2,stride=1,hop=1,height=48,width=64,match_scale=1")
    with caplog.at_level("WARNING", logger="studies.dataset"):
        data = ensure_dataset(spec, tmp_path / "cache", workers=1, progress=False)
    assert list(data.arrays["names"]) == ["seq:0", "seq:1", "seq:4"]
    why = (f"{seq / 'frame-000003.color.png'}: 48x36, unlike frame-000000.color.png's 64x48, so the folder's one "
           f"intrinsics matrix ({imaging.PUBLISHED}) cannot serve both")
    said = [r.getMessage() for r in caplog.records if "window skipped" in r.getMessage()]
    assert said == [f"dataset window skipped: seq:{k}: {why}" for k in (2, 3)], said
    assert data.meta["skipped"] == [f"seq:{k}: {why}" for k in (2, 3)]
    only = parse_spec(f"7scenes:{seq}@2-4;views=2,stride=1,hop=1,height=48,width=64,match_scale=1")
    with pytest.raises(DatasetError, match=r"no window could be labelled \(2 skipped; the first: seq:0: .*48x36"):
        ensure_dataset(only, tmp_path / "cache", workers=1, progress=False)


def test_a_window_its_teacher_cannot_label_is_skipped_saying_so(tmp_path, caplog, monkeypatch):
    """A window the depth teacher refuses (``TeacherError``: e.g. no valid depth in a view) was
    dropped without a word; it is now skipped as an unreadable one is: logged and listed in the
    cache's meta (``skipped``), the others labelled."""
    from labelers.depth import TeacherError
    from studies import dataset

    labels = dataset._teacher_labels

    def refusing(teacher, name, *args, **kwargs):
        if name.endswith(":1"):
            raise TeacherError("no_valid_depth", "every pixel of view 0 is a hole")
        return labels(teacher, name, *args, **kwargs)

    monkeypatch.setattr(dataset, "_teacher_labels", refusing)
    spec = parse_spec("synthetic:scenes=1,frames=4,views=2,stride=1,hop=1,height=24,width=32,match_scale=1")
    with caplog.at_level("WARNING", logger="studies.dataset"):
        data = ensure_dataset(spec, tmp_path / "cache", workers=1, progress=False)
    names = list(data.arrays["names"])
    assert names and all(not n.endswith(":1") for n in names), names
    said = ":1: teacher: no_valid_depth: every pixel of view 0 is a hole"
    why = [w for w in data.meta["skipped"] if w.endswith(said)]
    assert len(why) == 1, data.meta["skipped"]
    assert any(why[0] in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]


# --------------------------------------------------------------------------- study

def test_study_trains_evaluates_and_writes_the_curve(dataset, tmp_path):
    from evaluation.evaluate import trivial_baseline
    from reliev3r.config import with_overrides
    from studies.study import run_study

    torch.set_num_threads(1)
    cfg = with_overrides(LearnerConfig(), ["batch_size=1", "ema_decay=0", "warmup_steps=0", "device=cpu",
                                            "loss.point_weight=1", "model.max_log_depth=8"])
    assert cfg.loss.point_weight == 1.0 and cfg.model.max_log_depth == 8.0
    with pytest.raises(ValueError, match="loss.kind"):
        with_overrides(LearnerConfig(), ["loss.kind=magic"])
    with pytest.raises(ValueError, match="nope"):
        with_overrides(LearnerConfig(), ["nope=1"])
    windows = dataset.windows(1)
    result = run_study(cfg, dataset, windows, steps=3, eval_every=2, device="cpu", log_every=0, out=tmp_path)
    assert result.steps == 3 and [r["step"] for r in result.curve] == [2, 3]
    doc = json.loads((tmp_path / "curve.json").read_text())
    assert doc["curve"][-1]["final"] and "point" in doc["curve"][0]["train"]
    assert doc["dataset"]["meta"]["teacher"]["name"] == "oracle-gt"
    for key in ("absrel_med", "rot_err_deg", "trans_err_deg"):
        assert math.isfinite(result.final[key])
    base = trivial_baseline(windows)
    assert base["trans_err_deg"] == 90.0 and base["rot_err_deg"] > 0


def test_the_curve_survives_a_power_loss_once_written(dataset, tmp_path, folder_fsyncs):
    """``curve.json`` was renamed into place without its folder flushed: after a power loss an
    earlier curve (or none) could stand again. The folder is flushed once it names each new one."""
    from studies.study import run_study

    torch.set_num_threads(1)
    cfg = replace(LearnerConfig(), batch_size=1, ema_decay=0.0, warmup_steps=0, device="cpu")
    curve = tmp_path / "curve.json"
    flushed = folder_fsyncs(tmp_path, lambda: len(json.loads(curve.read_text())["curve"]) if curve.exists() else 0)
    result = run_study(cfg, dataset, dataset.windows(1), steps=2, eval_every=1, device="cpu", log_every=0,
                       out=tmp_path)
    assert [r["step"] for r in result.curve] == [1, 2]
    assert flushed and flushed[0] == 1 and flushed[-1] == 2  # each row's curve flushed as it is written


def test_the_study_s_table_is_written_whole_and_survives_a_power_loss(tmp_path, folder_fsyncs, fsynced):
    """``python -m studies.study`` wrote ``table.md`` in place, unflushed: a crash could leave a
    part of it, a power loss none. It is renamed into place once its bytes are flushed, and the
    folder flushed once it names it."""
    from studies.study import main

    torch.set_num_threads(1)
    out = tmp_path / "out"
    out.mkdir()
    table = out / "table.md"
    flushed = folder_fsyncs(out, lambda: table.is_file() and table in fsynced)
    spec = "synthetic:" + ",".join(f"{k}={v}" for k, v in SPEC.items() if k not in ("views", "height", "width"))
    assert main(["--train", spec, "--eval", spec, "--views", "3", "--height", "24", "--width", "32",
                 "--stride", "3", "--steps", "1", "--eval-every", "0", "--eval-windows", "1", "--workers", "1",
                 "--cache", str(tmp_path / "cache"), "--device", "cpu", "--set", "batch_size=1",
                 "--out", str(out)]) == 0
    assert table.read_text().startswith("| run |") and not list(out.glob("*.tmp"))
    assert flushed and flushed[-1] is True


def test_study_resumes_from_its_final_snapshot_and_stops_at_max_steps(dataset, tmp_path):
    # A long study split over several processes (device calls): each ends with a snapshot, the
    # next resumes it, and max_steps counts the run's steps, not the process's.
    from learner.snapshot import list_snapshots
    from reliev3r.config import with_overrides
    from studies.study import run_study

    torch.set_num_threads(1)
    cfg = with_overrides(LearnerConfig(), ["batch_size=1", "ema_decay=0.9", "warmup_steps=0", "device=cpu",
                                            "schedule=cosine", "max_steps=5"])
    windows = dataset.windows(1)
    first = run_study(cfg, dataset, windows, steps=3, eval_every=0, device="cpu", log_every=0, out=tmp_path / "a")
    ((step, snap),) = list_snapshots(tmp_path / "a" / "snapshots")
    assert first.steps == 3 and step == 3
    second = run_study(cfg, dataset, windows, steps=100, eval_every=0, device="cpu", log_every=0,
                       out=tmp_path / "b", resume=snap)
    assert second.steps == 5 and [r["step"] for r in second.curve] == [5]
    assert first.final_ema is not None and second.final_ema is not None
    ((_, done),) = list_snapshots(tmp_path / "b" / "snapshots")
    third = run_study(cfg, dataset, windows, steps=100, eval_every=0, device="cpu", log_every=0,
                      out=tmp_path / "c", resume=done)
    assert third.steps == 5  # already at max_steps: no step taken


# --------------------------------------------------------------------------- losses

@pytest.fixture(scope="module")
def scene():
    s = render_scene(3, frames=9, height=24, width=32)
    idx = [0, 2, 4]
    depth = s.depth[idx][None].double()
    pose = s.cam_to_world[idx][None].double()
    K = s.intrinsics.double().expand(1, 3, 3, 3).clone()
    # Matches from the ground truth: pixels of view i reprojected into view j.
    rows = []
    g = torch.Generator().manual_seed(0)
    for i, j in [(0, 1), (1, 2), (0, 2)]:
        uv = torch.rand(100, 2, generator=g, dtype=torch.float64) * torch.tensor([31.0, 23.0], dtype=torch.float64)
        d = geometry.sample_bilinear(depth[0, i], uv)
        world = geometry.transform_points(pose[0, i], geometry.unproject_points(uv, d, K[0, i]))
        uvj, z = geometry.project(geometry.transform_points(geometry.invert_pose(pose[0, j]), world), K[0, j])
        # keep matches whose reprojection is seen (not occluded) in view j
        dj = geometry.sample_bilinear(depth[0, j], uvj.clamp(min=0))
        ok = (uvj[:, 0] > 1) & (uvj[:, 0] < 30) & (uvj[:, 1] > 1) & (uvj[:, 1] < 22) & ((dj - z).abs() < 0.001 * z)
        n = int(ok.sum())
        rows.append(torch.cat((torch.zeros(n, 1, dtype=torch.float64), torch.full((n, 1), i, dtype=torch.float64),
                               torch.full((n, 1), j, dtype=torch.float64), uv[ok], uvj[ok]), 1))
    return depth, pose, K, torch.cat(rows)


def _sim(pose: torch.Tensor, depth: torch.Tensor, s: float):
    R = geometry.axis_angle_to_matrix(torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64))
    T = geometry.make_pose(R, torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
    out = T @ pose
    out[..., :3, 3] = out[..., :3, 3] * s
    return out, depth * s


def test_point_consistency_zero_invariant_and_first_order_in_view_scale(scene):
    depth, pose, K, matches = scene
    assert matches.shape[0] > 30
    zero = losses.point_consistency_loss(depth, pose, K, matches)
    assert float(zero) < 1e-4  # bilinear depth at non-integer pixels is not exact
    # A similarity of the whole window changes nothing.
    pose2, depth2 = _sim(pose, depth, 3.7)
    bad = depth.clone()
    bad[:, 1] *= 1.1
    a = losses.point_consistency_loss(bad, pose, K, matches)
    b = losses.point_consistency_loss(bad * 3.7, pose2, K, matches)
    assert float(a) > 0 and abs(float(a) - float(b)) < 1e-9 * max(1.0, float(a)) + 1e-12
    assert abs(float(losses.point_consistency_loss(depth2, pose2, K, matches)) - float(zero)) < 1e-9
    # First order in the per-view scale error (≈ ε/2 per match touching the view, 2/3 of
    # the matches here), where the angle loss is second order and scaled by (baseline/depth)².
    angle = losses.reprojection_loss(bad, pose, K, matches, robust="none")
    assert 0.01 < float(a) < 0.06 and float(a) > 20 * float(angle)


def test_point_consistency_finite_behind_cameras_and_with_outliers(scene):
    depth, pose, K, matches = scene
    d = depth.clone().requires_grad_(True)
    p = pose.clone().requires_grad_(True)
    m = matches.clone()
    g = torch.Generator().manual_seed(1)
    half = m.shape[0] // 2
    m[:half, 5:7] = (torch.rand(half, 2, generator=g, dtype=torch.float64)
                     * torch.tensor([31.0, 23.0], dtype=torch.float64))
    flipped = d * torch.where(torch.arange(3)[None, :, None, None] == 2, -1.0, 1.0).double()  # behind the camera
    loss = losses.point_consistency_loss(flipped, p, K, m, torch.rand(m.shape[0], generator=g, dtype=torch.float64))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(d.grad).all() and torch.isfinite(p.grad).all()
    empty = losses.point_consistency_loss(d, p, K, m[:0])
    assert float(empty.detach()) == 0.0 and empty.requires_grad


def test_pseudo_huber_cost_matches_small_angles_and_grows_like_the_chord():
    ell = torch.tensor([1e-6, 0.5, 2.0], dtype=torch.float64)
    rho = losses.robust_angle_cost(ell, robust="pseudo_huber", scale_deg=10.0)
    assert abs(float(rho[0]) - 1e-6) < 1e-9
    chord, delta = (2 * ell).sqrt(), 2 * math.sin(math.radians(5.0))
    assert 0.8 < float(rho[2] / (delta * chord[2])) < 1 and float(rho[1]) < float(rho[2])


def test_negative_point_weight_is_refused():
    with pytest.raises(ValueError, match="point_weight"):
        LossConfig(point_weight=-1)


# --------------------------------------------------------------------------- golden file

def _first_losses(steps: int = 4) -> list[dict[str, float]]:
    from learner.train import Trainer, synthetic_batch

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        cfg = LearnerConfig(model=ModelConfig(size="tiny"), loss=LossConfig(point_weight=1.0), batch_size=2,
                            warmup_steps=2, ema_decay=0, device="cpu")
        trainer = Trainer(cfg, device="cpu", seed=0)
        batch = synthetic_batch(2, 3, 16, 24, k=48, seed=0)
        out = []
        for _ in range(steps):
            terms = trainer.step(batch)
            out.append({k: terms[k] for k in ("loss", "depth", "reproj", "point", "grad_norm")})
        return out
    finally:
        torch.use_deterministic_algorithms(False)


def test_first_losses_match_the_golden_file():
    got = _first_losses()
    if os.environ.get(REGEN) == "1" or not GOLDEN.exists():
        if os.environ.get(REGEN) != "1":
            pytest.fail(f"{GOLDEN} is missing: run with {REGEN}=1 to write it")
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps({"about": "first losses of a deterministic tiny run (tests/test_learning.py)",
                                      "steps": got}, indent=1) + "\n")
    want = json.loads(GOLDEN.read_text())["steps"]
    assert len(got) == len(want)
    for step, (g, w) in enumerate(zip(got, want)):
        for key, value in w.items():
            # fp32 on CPU: BLAS/thread differences move the 5th digit; a changed model,
            # init or loss moves the 2nd.
            assert g[key] == pytest.approx(value, rel=2e-3, abs=1e-6), (step, key, g[key], value)
    assert got[-1]["loss"] < got[0]["loss"]


# --------------------------------------------------------------------------- SIGKILL resume

def _snapshot_steps(run_dir: Path) -> list[int]:
    from learner.snapshot import list_snapshots

    return [s for s, _ in list_snapshots(run_dir / "snapshots")]


@pytest.mark.slow
@pytest.mark.timeout(900)  # bounds a hang only (the waits below end once what they wait for happened)
def test_sigkilled_learner_process_resumes_from_its_last_snapshot(dataset, tmp_path, reliev3r_process):
    from learner.snapshot import latest_snapshot, verify_snapshot
    from reliev3r import protocol
    from reliev3r.config import free_port
    from replay.client import ReplayClient

    port = free_port()
    run_dir = tmp_path / "run"

    def _spawn(stage: str, *extra: str, log: Path) -> subprocess.Popen:
        return reliev3r_process(stage, f"run.dir={run_dir}", f"network.replay_port={port}", "monitoring.enabled=false",
                                *extra, stdout=subprocess.DEVNULL, stderr=open(log, "ab"))

    learner_args = ["learner.device=cpu", "learner.threads=1", "learner.batch_size=1", "learner.snapshot_every=2",
                    "learner.ema_decay=0.9", "learner.max_steps=10000", "replay.min_size=1"]
    replay = _spawn("replay", "replay.min_size=1", log=tmp_path / "replay.log")
    learner = None
    try:
        with ReplayClient(f"tcp://127.0.0.1:{port}", timeout_s=120, retry_s=0.5) as client:
            a = dataset.arrays
            for n in range(len(dataset)):
                m = dataset.matches_of(n)
                msg = protocol.Message("insert", {
                    "window_id": f"w{n}", "source": "test", "frame_indices": list(range(3)),
                    "teacher": {"depth": dataset.meta["teacher"], "matches": dataset.meta["matcher"]}},
                    {"frames": a["images"][n], "intrinsics": a["intrinsics"][n], "matches": m,
                     "teacher_depth": a["teacher_depth"][n], "teacher_valid": a["teacher_valid"][n].astype(np.uint8)})
                assert client.insert(msg)["status"] == "stored"
        learner = _spawn("learn", *learner_args, log=tmp_path / "learner.log")
        deadline = time.monotonic() + 300  # bounds a hang only
        while time.monotonic() < deadline and not [s for s in _snapshot_steps(run_dir) if s >= 4]:
            assert learner.poll() is None, (tmp_path / "learner.log").read_text()[-3000:]
            time.sleep(0.2)
        steps_before = _snapshot_steps(run_dir)
        assert steps_before and steps_before[-1] >= 4, steps_before
        learner.send_signal(signal.SIGKILL)  # no chance to write a final snapshot
        learner.wait(60)
        last = _snapshot_steps(run_dir)[-1]
        meta_before = verify_snapshot(latest_snapshot(run_dir / "snapshots"))
        assert meta_before["final"] is False

        target = last + 3
        learner = _spawn("learn", *learner_args[:-2], f"learner.max_steps={target}",
                         "replay.min_size=1", log=tmp_path / "learner2.log")
        assert learner.wait(300) == 0, (tmp_path / "learner2.log").read_text()[-3000:]
        log = (tmp_path / "learner2.log").read_text()
        resumed = [json.loads(line) for line in log.splitlines() if '"resumed"' in line]
        assert resumed and resumed[0]["step"] == last, log[-2000:]
        final = verify_snapshot(latest_snapshot(run_dir / "snapshots"))
        assert final["final"] is True and final["step"] == target
    finally:
        for proc in (learner, replay):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
