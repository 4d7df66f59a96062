"""``reliev3r eval`` end to end on real 7-Scenes frames: a tiny CPU-trained snapshot, a second
one to compare, every baseline row, the JSON; and the generic image-folder dataset."""

from __future__ import annotations

import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml

from evaluation.baselines import align_teacher_frame, teacher_depth_baseline
from evaluation.datasets import EvalWindow, load_windows
from evaluation.tum import matrix_to_quaternion, quaternion_to_matrix, read_tum, write_tum
from reliev3r import cli
from reliev3r.geometry import axis_angle_to_matrix
from tests.tiny_snapshot import SHARED, make_tiny_snapshot

KITCHEN = SHARED / "data" / "7scenes-redkitchen"
PYDNET = SHARED / "models" / "pydnet++.tflite"
needs_kitchen = pytest.mark.skipif(not KITCHEN.is_dir(), reason=f"{KITCHEN} absent (shared data)")


@needs_kitchen
def test_eval_cli_on_7scenes_prints_table_with_baselines_and_writes_json(tmp_path, capsys):
    snap = make_tiny_snapshot(tmp_path / "run_a", seed=0)
    other = make_tiny_snapshot(tmp_path / "run_b", seed=1)
    out = tmp_path / "eval"
    argv = ["eval", "--checkpoint", str(snap.parent.parent), "--compare", str(other),
            "--data", f"7scenes:{KITCHEN}@450-599", "--views", "4", "--windows", "3", "--out", str(out),
            "--teacher", "oracle", f"run.dir={tmp_path / 'run'}"]
    assert cli.main(argv) == 0
    printed, spread = capsys.readouterr().out.split("95 % intervals over the 3 windows")
    rows = [line for line in printed.splitlines() if line.startswith("| ")]
    names = [r.split("|")[1].strip() for r in rows[1:]]
    assert names[0].startswith("model run_a/step-000000002 (weak, step 2)")
    # each model again with its poses fitted to its own depth and the windows' verified matches
    assert names[1] == f"{names[0]}, poses fitted to its depth"
    assert names[2].startswith("compare run_b/step-000000002")
    assert names[3] == f"{names[2]}, poses fitted to its depth"
    assert "baseline: constant depth + identity poses" in names
    assert "baseline: teacher depth oracle (per-frame lsq)" in names
    assert any(n.startswith("baseline: two-view essential matrix") for n in names)

    result = json.loads((out / "results.json").read_text())
    spread_rows = [line for line in spread.splitlines() if line.startswith("| ")]
    assert (out / "results.md").read_text().count("\n| ") == len(rows) + len(spread_rows)
    assert result["views"] == 4 and len(result["windows"]) == 3
    assert [result["height"], result["width"]] == [48, 64]  # the snapshot's training size
    # said height x width, as the config's keys and the docs give a window's size (it said 64x48)
    assert "3 windows of 4 views at 48x64 (height x width)" in (out / "results.md").read_text()
    assert "3 windows of 4 views at 48x64 (height x width)" in printed
    assert list(result["rows"]) == names
    # each model row's figures with their spread over the windows, and the model over each sibling
    constant = "baseline: constant depth + identity poses"
    ratio_names = [f"{names[0]} / {names[2]}", f"{names[0]} / {constant}",  # the pose head's rows
                   f"{names[1]} / {names[3]}", f"{names[1]} / {names[0]}"]  # fitted: the sibling's, the head's
    assert list(result["intervals"]) == [*names[:4], constant, *ratio_names]
    assert [r.split("|")[1].strip() for r in spread_rows[1:]] == list(result["intervals"])
    for name in names[:4]:
        est, lo, hi = result["intervals"][name]["absrel_med"]
        assert est == pytest.approx(result["rows"][name]["absrel_med"], rel=1e-9) and lo <= est <= hi
    est, lo, hi = result["intervals"][ratio_names[0]]["absrel_med"]
    assert est == pytest.approx(result["rows"][names[0]]["absrel_med"] / result["rows"][names[2]]["absrel_med"])
    assert lo <= est <= hi
    assert result["intervals"][ratio_names[1]]["auc30"] is None  # the constant's AUC is 0: no ratio
    est, lo, hi = result["intervals"][ratio_names[3]]["ate"]
    assert est == pytest.approx(result["rows"][names[1]]["ate"] / result["rows"][names[0]]["ate"])
    for plain, fitted in ((names[0], names[1]), (names[2], names[3])):  # the same depth, other poses
        for key in ("absrel_med", "absrel_lsq", "absrel_lsq_frame"):
            assert result["rows"][fitted][key] == result["rows"][plain][key], key
        assert 0 <= result["rows"][fitted]["auc30"] <= result["rows"][fitted]["rra30"] <= 1
    model = result["rows"][names[0]]
    for key in ("absrel_med", "delta_med", "absrel_lsq", "absrel_lsq_frame", "ate", "rpe_trans", "rpe_rot_deg",
                "rra30", "rta30", "auc30", "accuracy", "completeness"):
        assert np.isfinite(model[key]), key
    oracle = result["rows"]["baseline: teacher depth oracle (per-frame lsq)"]
    # GT under a per-frame scale and shift plus 3 % noise: per-frame lsq undoes all but the noise.
    assert oracle["absrel_lsq_frame"] < 0.05 and oracle["delta_lsq_frame"] > 0.98
    assert 0.5 < oracle["teacher_coverage"] < 1.0  # holes punched by the oracle
    assert "absrel_med" not in oracle  # no window-level claim for a per-frame teacher
    classical = result["rows"][names[-1]]
    assert 0 <= classical["auc30"] <= classical["rra30"] <= 1
    # Same frames, known-good model-free numbers: constant depth scores ~0.2-0.5 AbsRel here.
    assert 0.05 < result["rows"]["baseline: constant depth + identity poses"]["absrel_med"] < 1.0


def test_a_path_without_a_snapshot_is_said_without_a_traceback(tmp_path, capsys):
    """``--checkpoint`` or ``--compare`` naming a folder with no valid snapshot (a sibling run
    that never trained): exit 2 and one line naming the option and the path, for eval as for
    export and export --colmap (``--checkpoint`` was said as "PATH: no valid snapshot there",
    naming no option, where ``--compare`` was named)."""
    snap = make_tiny_snapshot(tmp_path / "run_a", seed=0)
    empty = tmp_path / "never_trained"
    (empty / "snapshots").mkdir(parents=True)
    assert cli.main(["eval", "--checkpoint", str(empty), f"run.dir={tmp_path / 'run'}"]) == 2
    assert capsys.readouterr().err.startswith(f"reliev3r eval: --checkpoint {empty}: no valid snapshot there")
    assert cli.main(["eval", "--checkpoint", str(snap), "--compare", str(empty), f"run.dir={tmp_path / 'run'}"]) == 2
    assert capsys.readouterr().err.startswith(f"reliev3r eval: --compare {empty}: no valid snapshot there")
    assert cli.main(["export", "--checkpoint", str(empty), "--out", str(tmp_path / "m.onnx")]) == 2
    assert capsys.readouterr().err.startswith(f"reliev3r export: --checkpoint {empty}: no valid snapshot there")
    assert cli.main(["export", "--checkpoint", str(empty), "--colmap", str(tmp_path / "models")]) == 2
    assert capsys.readouterr().err.startswith(f"reliev3r export: --checkpoint {empty}: no valid snapshot there")
    assert not (tmp_path / "models").exists() and not (tmp_path / "m.onnx").exists()


def test_a_wrong_path_option_is_refused_naming_it_before_a_model_loads(tmp_path, capsys):
    """``--out`` naming a file stopped on "[Errno 17] File exists" once every row was scored; a
    ``--teacher`` file that is not there was said once the models were scored; a ``--compare``
    without a snapshot once the first snapshot had loaded, naming no option; ``export``'s ``--out``
    naming a folder once the model was exported. Each is refused in one line naming the option,
    exit 2, before the checkpoint is read: this one has no weights, which would be said first."""
    snap = make_tiny_snapshot(tmp_path / "run")
    half = tmp_path / "half" / "snapshots" / "step-000000005"
    half.mkdir(parents=True)
    (half / "meta.json").write_text((snap / "meta.json").read_text())  # its weights never written
    empty = tmp_path / "never_trained"
    (empty / "snapshots").mkdir(parents=True)
    a_file, missing = tmp_path / "a file", tmp_path / "no such.tflite"
    a_file.write_text("kept\n")
    cases = [(["eval", "--out", str(a_file)], f"--out {a_file}: not a folder"),
             (["eval", "--teacher", f"pydnet:{missing}"], f"--teacher pydnet:{missing}: no such file"),
             (["eval", "--teacher", "pydnet:" + str(tmp_path)], f"--teacher pydnet:{tmp_path}: a folder, not a file"),
             (["eval", "--compare", str(empty)], f"--compare {empty}: no valid snapshot there"),
             (["export", "--out", str(tmp_path)], f"--out {tmp_path}: a folder, not a file"),
             (["export", "--colmap", str(a_file)], f"--colmap {a_file}: not a folder")]
    for (command, *argv), said in cases:
        code = cli.main([command, "--checkpoint", str(half), *argv, f"run.dir={tmp_path / 'default'}"])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith(f"reliev3r {command}: {said}") and len(err.splitlines()) == 1, err
    assert a_file.read_text() == "kept\n" and not (tmp_path / "half" / "eval").exists()


def test_a_dataset_folder_that_is_not_there_is_said_so_naming_the_option_before_a_model_loads(tmp_path, capsys):
    """``--data folder:MISSING`` (or ``7scenes:``, ``synthetic:``) was an "unknown dataset spec",
    as if its form were wrong, or "MISSING: not a folder", naming no option, once the model had
    loaded; ``evaluator.data`` alike. Said for what it is, naming the option (or the key where the
    config gave it), exit 2, before the checkpoint is read (this one has no weights)."""
    snap = make_tiny_snapshot(tmp_path / "run")
    half = tmp_path / "half" / "snapshots" / "step-000000005"
    half.mkdir(parents=True)
    (half / "meta.json").write_text((snap / "meta.json").read_text())  # its weights never written
    missing, a_file = tmp_path / "no such frames", tmp_path / "a file"
    a_file.write_text("frames?\n")
    cases = [(["eval", "--data", f"folder:{missing}"], f"--data folder:{missing}: no such folder"),
             (["eval", "--data", f"folder:{missing}@2-5"], f"--data folder:{missing}@2-5: no such folder"),
             (["eval", "--data", f"7scenes:{missing}@0-9"], f"--data 7scenes:{missing}@0-9: no such folder"),
             (["eval", "--data", f"synthetic:{missing}"], f"--data synthetic:{missing}: no such folder"),
             (["eval", "--data", f"folder:{a_file}"], f"--data folder:{a_file}: {a_file} is not a folder"),
             (["eval", f"evaluator.data=7scenes:{missing}"], f"evaluator.data 7scenes:{missing}: no such folder"),
             (["export", "--colmap", str(tmp_path / "models"), "--data", f"folder:{missing}"],
              f"--data folder:{missing}: no such folder")]
    for (command, *argv), said in cases:
        code = cli.main([command, "--checkpoint", str(half), *argv, f"run.dir={tmp_path / 'default'}"])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith(f"reliev3r {command}: {said}") and len(err.splitlines()) == 1, err
    assert not (tmp_path / "models").exists() and not (tmp_path / "half" / "eval").exists()


def test_a_frame_range_that_is_not_numbers_is_said_naming_the_spec_and_its_form_before_a_model_loads(tmp_path,
                                                                                                   capsys):
    """``folder:D@a-b``, ``7scenes:D@5`` (no LAST), ``scannet:D@3-1`` (LAST before FIRST) stopped
    with Python's ``int()`` message ("invalid literal for int() with base 10: 'a'"), naming
    neither the spec nor the form, once the model had loaded (``folder:D@3-1``: "no images in
    range"). ``datasets.spec_problem`` says each, naming the spec and ``@FIRST-LAST``, so eval,
    export --colmap and a stage's preflight refuse it (exit 2) before the checkpoint (this one
    has no weights) is read."""
    from evaluation.datasets import spec_problem

    snap = make_tiny_snapshot(tmp_path / "run")
    half = tmp_path / "half" / "snapshots" / "step-000000005"
    half.mkdir(parents=True)
    (half / "meta.json").write_text((snap / "meta.json").read_text())  # its weights never written
    frames = tmp_path / "frames"
    frames.mkdir()
    specs = [f"folder:{frames}@a-b", f"7scenes:{frames}@5", f"scannet:{frames}@3-1", f"{frames}@x-2",
             f"folder:{frames}@-3?depth_scale=1000", f"7scenes:{frames}@1-2-3"]
    for spec in specs:
        problem = spec_problem(spec)
        assert problem is not None and problem.startswith(f"{spec}: frame range ") and "@FIRST-LAST" in problem, spec
        cases = [(["eval", "--data", spec], f"--data {problem}"),
                 (["export", "--colmap", str(tmp_path / "models"), "--data", spec], f"--data {problem}"),
                 (["eval", f"evaluator.data={spec}"], f"evaluator.data {problem}")]
        for (command, *argv), said in cases:
            code = cli.main([command, "--checkpoint", str(half), *argv, f"run.dir={tmp_path / 'default'}"])
            err = capsys.readouterr().err
            assert code == 2 and err.startswith(f"reliev3r {command}: {said} ") and len(err.splitlines()) == 1, err
        assert cli.main(["evaluate", f"run.dir={tmp_path / 'default'}", f"evaluator.data={spec}",
                         "monitoring.enabled=false"]) == 2
        assert capsys.readouterr().err == f"reliev3r: evaluator.data {problem}\n"
    for spec in (f"folder:{frames}@0-0", f"7scenes:{frames}@2-9", f"folder:{frames}@10-20?depth_scale=5000",
                 str(frames), f"scannet:{frames}"):
        assert spec_problem(spec) is None, spec
    assert not (tmp_path / "models").exists() and not (tmp_path / "half" / "eval").exists()
    assert not (tmp_path / "default").exists()


def test_eval_and_export_write_into_the_checkpoints_run_and_reuse_its_world(tmp_path, capsys):
    """``eval`` wrote its results into the config's run folder (``runs/default/eval``: a stray
    folder, each checkpoint's results over the one before) and rendered the held-out synthetic
    world there, as ``export --colmap`` did: both use the checkpoint's run folder, and the world
    its evaluator rendered (the run's own spec, from its config.yaml) is reused."""
    world = {"scenes": 1, "frames": 24, "height": 48, "width": 64}  # not the default world
    elsewhere = tmp_path / "default"  # run.dir of the command's own config
    runs = []
    for name, seed in (("run_a", 0), ("run_b", 1)):
        run = make_tiny_snapshot(tmp_path / name, seed=seed).parent.parent
        (run / "config.yaml").write_text(yaml.safe_dump({"streamer": {"synthetic": world}}))
        runs.append(run)
    common = ["--views", "3", "--windows", "1", "--teacher", "none", f"run.dir={elsewhere}"]
    assert cli.main(["eval", "--checkpoint", str(runs[0]), *common]) == 0  # a run folder
    assert cli.main(["eval", "--checkpoint", str(runs[1] / "snapshots"), *common]) == 0  # its snapshots folder
    for run in runs:
        assert Path(json.loads((run / "eval" / "results.json").read_text())["snapshot"]).parent.parent == run
        video = cv2.VideoCapture(str(run / "eval_world" / "synth-s1000-000.mp4"))
        size = (video.get(cv2.CAP_PROP_FRAME_WIDTH), video.get(cv2.CAP_PROP_FRAME_COUNT))
        video.release()
        assert size == (64, 24)  # the run's world, not the config's
    assert not elsewhere.exists()
    rendered = runs[0] / "eval_world" / "synth-s1000-000.mp4"
    stamp = rendered.stat().st_mtime_ns
    snap = runs[0] / "snapshots" / "step-000000002"
    assert cli.main(["eval", "--checkpoint", str(snap), *common]) == 0  # a snapshot: its run's
    assert "wrote " + str(runs[0] / "eval" / "results.json") in capsys.readouterr().out
    assert cli.main(["export", "--checkpoint", str(snap), "--colmap", str(tmp_path / "colmap"), "--views", "3",
                     "--windows", "1", f"run.dir={elsewhere}"]) == 0
    assert (tmp_path / "colmap" / "index.json").is_file()
    assert rendered.stat().st_mtime_ns == stamp  # reused, not rendered again
    assert not elsewhere.exists()


def test_eval_and_export_take_views_windows_and_data_from_the_checkpoints_run(tmp_path):
    """``eval RUN`` scored at the command's defaults (4 views, 8 windows of ``evaluator.data``),
    not at the run's own (``<run>/config.yaml``, as ``view RUN`` reads it): a run of 3 views on
    a dataset of its own got figures that were not its evaluator's; ``export --colmap`` wrote
    those windows too. The command line still wins, and ``--config`` means the command's own
    config."""
    from reliev3r.synthetic import ensure_world
    from streamer.config import SyntheticConfig

    data = tmp_path / "mine"
    ensure_world(data, SyntheticConfig(scenes=1, frames=24, height=48, width=64), progress=False)
    run = make_tiny_snapshot(tmp_path / "run", seed=0).parent.parent
    (run / "config.yaml").write_text(yaml.safe_dump(
        {"streamer": {"views": 3}, "evaluator": {"data": f"synthetic:{data}", "windows": 2, "stride": 2}}))
    snap = run / "snapshots" / "step-000000002"
    common = ["--teacher", "none", f"run.dir={tmp_path / 'default'}"]

    def scored(*argv: str) -> tuple:
        assert cli.main(["eval", "--checkpoint", str(snap), *argv, *common]) == 0
        result = json.loads((run / "eval" / "results.json").read_text())
        return result["data"], result["views"], len(result["windows"]), result["stride"]

    assert scored() == (f"synthetic:{data}", 3, 2, 2)  # the run's
    assert scored("--views", "2", "--windows", "1", "evaluator.stride=1") == (f"synthetic:{data}", 2, 1, 1)
    own = tmp_path / "own.yaml"
    own.write_text(yaml.safe_dump({"evaluator": {"data": f"synthetic:{data}", "windows": 1}}))
    assert scored("--config", str(own)) == (f"synthetic:{data}", 4, 1, 4)  # the command's config alone
    out = tmp_path / "colmap"
    assert cli.main(["export", "--checkpoint", str(snap), "--colmap", str(out), *common[2:]]) == 0
    index = json.loads((out / "index.json").read_text())
    assert (index["data"], index["views"], len(index["windows"])) == (f"synthetic:{data}", 3, 2)


def test_eval_scores_the_baselines_of_the_checkpoints_run(tmp_path):
    """``eval RUN`` read the run's views and data from its ``config.yaml`` but scored the
    command's baselines beside its model: the default teacher (``embedded``) and the default
    matcher (``sift``) for a run that learned from another teacher and matched with ORB. The
    run's ``labeler.teacher``, ``matcher`` and ``ransac_threshold_px`` are now taken (its device
    and threads are not: the host's); ``--teacher``, overrides and ``--config`` still win."""
    from reliev3r.synthetic import ensure_world
    from streamer.config import SyntheticConfig

    data = tmp_path / "world"
    ensure_world(data, SyntheticConfig(scenes=1, frames=24, height=48, width=64), progress=False)
    run = make_tiny_snapshot(tmp_path / "run", seed=0).parent.parent
    (run / "config.yaml").write_text(yaml.safe_dump(
        {"streamer": {"views": 3}, "evaluator": {"data": f"synthetic:{data}", "windows": 1},
         "labeler": {"teacher": "oracle?strength=1", "matcher": "orb", "ransac_threshold_px": 2.0, "device": "cuda:7",
                     "cpu_threads": 64}}))
    common = [f"run.dir={tmp_path / 'default'}"]

    def scored(*argv: str) -> tuple[list[str], str]:
        assert cli.main(["eval", "--checkpoint", str(run), *argv, *common]) == 0
        result = json.loads((run / "eval" / "results.json").read_text())
        assert [name for name in result["rows"] if name.startswith("baseline: teacher")] == [
            f"baseline: teacher depth {t} (per-frame lsq)" for t in result["teachers"]]
        classical = [name for name in result["rows"] if name.startswith("baseline: two-view essential matrix (")]
        assert len(classical) == 1, list(result["rows"])
        return result["teachers"], classical[0].removeprefix("baseline: two-view essential matrix (").rstrip(")")

    assert scored() == (["oracle?strength=1"], "orb")  # the run's
    assert scored("--teacher", "oracle", "labeler.matcher=sift") == (["oracle"], "sift")
    own = tmp_path / "own.yaml"
    own.write_text(yaml.safe_dump({"evaluator": {"data": f"synthetic:{data}", "windows": 1}, "streamer": {"views": 3}}))
    assert scored("--config", str(own), "--teacher", "none") == ([], "sift")  # the command's config alone


def test_disparity_teacher_is_aligned_in_disparity_space():
    rng = np.random.default_rng(0)
    gt = rng.uniform(0.5, 4.0, (12, 16)).astype(np.float32)
    disparity = 3.0 / gt + 0.7  # affine in disparity, not in depth
    valid = np.ones_like(gt, bool)
    np.testing.assert_allclose(align_teacher_frame(disparity, gt, valid, "disparity"), gt, rtol=1e-5)
    depth_fit = align_teacher_frame(disparity, gt, valid, "depth")
    assert np.abs(depth_fit - gt).max() > 0.1  # the wrong space cannot fit it
    # A teacher whose fit goes negative is clamped to a large finite depth, not inf/NaN.
    bad = align_teacher_frame(-disparity, gt, valid[:], "disparity")
    assert np.isfinite(bad).all() and (bad > 0).all()


def test_teacher_baseline_with_a_disparity_teacher_scores_exactly():
    class Disparity:
        space = "disparity"

        def predict(self, frames, *, gt_depth, window_id):
            return (5.0 / np.maximum(gt_depth, 1e-3) + 2.0).astype(np.float32), gt_depth > 0

    gt = np.random.default_rng(1).uniform(1, 3, (2, 3, 8, 8)).astype(np.float32)
    windows = [EvalWindow(f"w{i}", np.zeros((3, 8, 8, 3), np.uint8), np.tile(np.eye(3, dtype=np.float32), (3, 1, 1)),
                          gt[i], None) for i in range(2)]
    row = teacher_depth_baseline(windows, "fake", teacher=Disparity())
    assert row["absrel_lsq_frame"] == pytest.approx(0, abs=1e-5)
    assert row["delta_lsq_frame"] == 1.0 and row["teacher_coverage"] == 1.0


def test_tum_round_trip(tmp_path):
    R = axis_angle_to_matrix(torch.tensor([[0.1, -2.0, 0.5], [3.1, 0.0, 0.0], [0.0, 0.0, 0.0]])).double().numpy()
    poses = np.tile(np.eye(4), (3, 1, 1))
    poses[:, :3, :3] = R
    poses[:, :3, 3] = [[1, 2, 3], [-1, 0, 0.5], [0, 0, 0]]
    write_tum(tmp_path / "t.txt", [0.0, 0.1, 0.2], poses)
    stamps, back = read_tum(tmp_path / "t.txt")
    np.testing.assert_allclose(stamps, [0, 0.1, 0.2])
    np.testing.assert_allclose(back, poses, atol=1e-6)
    q = matrix_to_quaternion(R[1])
    np.testing.assert_allclose(quaternion_to_matrix(q), R[1], atol=1e-12)


def _write_folder(root: Path, *, tum: bool) -> np.ndarray:
    """Six frames of a scene moving along x, 320x240 images, depth in mm, poses."""
    root.mkdir()
    rng = np.random.default_rng(0)
    poses = np.tile(np.eye(4), (6, 1, 1))
    poses[:, 0, 3] = np.arange(6) * 0.1
    stamps = 100.0 + np.arange(6) * 0.033
    for k in range(6):
        name = f"{stamps[k]:.6f}" if tum else f"img{k:03d}"
        cv2.imwrite(str(root / f"{name}.png"), rng.integers(0, 255, (240, 320, 3), dtype=np.uint8))
        depth = np.full((240, 320), 2000 + 100 * k, np.uint16)
        depth[:10] = 0
        if tum:
            (root / "depth").mkdir(exist_ok=True)
            cv2.imwrite(str(root / "depth" / f"{name}.png"), depth * 5)  # TUM: 5000 per metre
        else:
            cv2.imwrite(str(root / f"{name}.depth.png"), depth)
            np.savetxt(root / f"{name}.pose.txt", poses[k])
    if tum:  # a denser trajectory with its own timestamps, matched by nearest time
        fine = 100.0 + np.arange(40) * 0.005
        fine_poses = np.tile(np.eye(4), (40, 1, 1))
        fine_poses[:, 0, 3] = (fine - 100.0) / 0.033 * 0.1
        write_tum(root / "groundtruth.txt", fine, fine_poses)
    return poses


@pytest.mark.parametrize("tum", [False, True])
def test_image_folder_dataset(tmp_path, tum):
    poses = _write_folder(tmp_path / "seq", tum=tum)
    spec = f"folder:{tmp_path / 'seq'}@1-5" + ("?depth_scale=5000" if tum else "")
    windows = load_windows(spec, views=3, height=48, width=64, windows=2, stride=2, run_dir=tmp_path)
    assert [w.name for w in windows] == ["seq:0"]  # frames 1..5: one window of 3 views 2 apart
    w = windows[0]
    assert w.images.shape == (3, 48, 64, 3)
    np.testing.assert_allclose(w.gt_cam_to_world[:, 0, 3], poses[[1, 3, 5], 0, 3],
                               atol=0.01 if tum else 1e-6)  # nearest 5 ms sample
    np.testing.assert_allclose(w.gt_depth[:, -1, 0], [2.1, 2.3, 2.5], rtol=1e-6)
    assert (w.gt_depth[:, 0] == 0).all()  # invalid rows stay invalid
    # No intrinsics file: 60 degree horizontal field of view, scaled to the window.
    assert w.intrinsics[0, 0, 0] == pytest.approx(0.5 * 64 / np.tan(np.radians(30)), rel=1e-3)


@pytest.mark.parametrize("scale", ["0", "-1000", "nan", "inf", "mm"])
def test_image_folder_depth_scale_must_be_a_positive_number(tmp_path, scale):
    """Depth is the PNG value divided by depth_scale: 0 made every depth +inf (or NaN), a
    negative one every depth negative, inf every depth 0; refused with the spec, naming it."""
    _write_folder(tmp_path / "seq", tum=False)
    with pytest.raises(ValueError, match="depth_scale"):
        load_windows(f"folder:{tmp_path / 'seq'}?depth_scale={scale}", views=3, height=48, width=64, windows=1,
                     stride=1, run_dir=tmp_path)


def test_image_folder_without_ground_truth(tmp_path):
    _write_folder(tmp_path / "seq", tum=False)
    for p in list((tmp_path / "seq").glob("*.txt")) + list((tmp_path / "seq").glob("*.depth.png")):
        p.unlink()
    (w,) = load_windows(str(tmp_path / "seq"), views=3, height=48, width=64, windows=1, stride=1, run_dir=tmp_path)
    assert w.gt_depth is None and w.gt_cam_to_world is None
    with pytest.raises(ValueError, match="unknown dataset spec"):
        load_windows(str(tmp_path / "nope"), views=3, height=48, width=64, windows=1, stride=1, run_dir=tmp_path)


EXIF_TURNS = {6: 5, 8: 3, 1: 0, 3: 6}
"""Exif orientations of a phone held four ways, each as the ``reliev3r.imaging.orient`` bits
OpenCV turns the stored pixels by (6: TRANSPOSE | FLIP_COLUMNS, 8: TRANSPOSE | FLIP_ROWS, 3: both flips)."""


def _write_turned_folder(root: Path, suffix: str, *, intrinsics: bool = True, exif=tuple(EXIF_TURNS),
                         pose: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A 7-Scenes layout of frames stored 64x48, tagged with the Exif orientations ``exif`` (those
    of :data:`EXIF_TURNS`) in turn, and their depth maps stored 64x48 as a depth camera writes them
    (no tag); the colour tells a stored pixel's row and column (red 5 a row, green 3 a column),
    the depth too (1000 + 64 row + column mm); each frame's pose file holds ``pose`` (the camera as
    it records; identity unless given). Returns the stored colour and depth."""
    from streamer_media import exif_tagged

    root.mkdir()
    rows, columns = np.mgrid[:48, :64]
    rgb = np.stack([5 * rows, 3 * columns, np.full_like(rows, 128)], -1).astype(np.uint8)
    depth = (1000 + 64 * rows + columns).astype(np.uint16)
    ok, data = cv2.imencode(suffix, rgb[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 100] if suffix == ".jpg" else [])
    assert ok
    for k, value in enumerate(exif):
        (root / f"frame-{k:06d}.color{suffix}").write_bytes(exif_tagged(data.tobytes(), value))
        cv2.imwrite(str(root / f"frame-{k:06d}.depth.png"), depth)
        np.savetxt(root / f"frame-{k:06d}.pose.txt", np.eye(4) if pose is None else pose)
    if intrinsics:
        np.savetxt(root / "camera-intrinsics.txt", [[50.0, 0, 30], [0, 55.0, 20], [0, 0, 1]])
    return rgb, depth


@pytest.mark.parametrize("spec, suffix", [("folder", ".png"), ("folder", ".jpg"), ("7scenes", ".jpg")])
def test_frames_turned_by_their_exif_orientation_get_intrinsics_and_depth_turned_alike(tmp_path, spec, suffix):
    """A folder of a phone held four ways (Exif orientations 6, 8, 1, 3 in one window; stored
    64x48, so two are shown 48x64) with its camera-intrinsics.txt and depth maps of the camera as
    it records: OpenCV shows each frame turned, and each view gets the intrinsics and depth
    turned as its frame is (the recorded principal point (30, 20) lands on the stored pixel
    (row 20, column 30), the focal lengths swap with the axes), depth and colour agreeing at
    every pixel. Before, every view got the intrinsics as recorded and the depth map unturned
    (OpenCV does not turn what it reads with IMREAD_UNCHANGED), stretched onto the turned frame.
    Windows of 48x48 crop the shown frames without scaling them."""
    from reliev3r.imaging import fit_intrinsics, orient, orient_intrinsics

    rgb, depth = _write_turned_folder(tmp_path / "phone", suffix)
    (w,) = load_windows(f"{spec}:{tmp_path / 'phone'}", views=4, height=48, width=48, windows=1, stride=1,
                        run_dir=tmp_path)
    K = np.array([[50.0, 0, 30], [0, 55.0, 20], [0, 0, 1]])
    for v, turn in enumerate(EXIF_TURNS.values()):
        shown_rgb, shown_depth = orient(rgb, turn), orient(depth, turn)
        h, wd = shown_depth.shape
        top, left = (h - 48) // 2, (wd - 48) // 2
        np.testing.assert_allclose(w.gt_depth[v], shown_depth[top:top + 48, left:left + 48] / 1000.0, rtol=1e-6)
        tolerance = 0 if suffix == ".png" else 8  # a JPEG's loss
        assert np.abs(w.images[v].astype(int) - shown_rgb[top:top + 48, left:left + 48]).max() <= tolerance
        np.testing.assert_allclose(w.intrinsics[v], fit_intrinsics(orient_intrinsics(K, turn, 64, 48), h, wd, 48, 48),
                                   atol=1e-5)
        cx, cy = w.intrinsics[v][0, 2], w.intrinsics[v][1, 2]
        assert cx == round(cx) and cy == round(cy)
        assert w.gt_depth[v][round(cy), round(cx)] * 1000 == pytest.approx(1000 + 64 * 20 + 30)
        fx, fy = w.intrinsics[v][0, 0], w.intrinsics[v][1, 1]
        assert (fx, fy) == ((55.0, 50.0) if turn & 1 else (50.0, 55.0))


TURNED_CAMERA = np.array([[0.36, 0.48, -0.8, 1.5], [-0.8, 0.6, 0.0, -0.4], [0.48, 0.64, 0.6, 2.0], [0, 0, 0, 1]])
"""A camera-to-world pose (an exact rotation: rows of 3-4-5 triangles) off every axis."""


@pytest.mark.parametrize("spec, poses", [("7scenes", "files"), ("folder", "files"), ("folder", "tum")])
def test_frames_turned_by_their_exif_orientation_get_their_ground_truth_pose_turned_alike(tmp_path, spec, poses):
    """The phone held four ways (Exif 6, 8, 1, 3) by a camera at one recorded pose, its poses in
    per-frame files or a TUM trajectory: each view's ground-truth pose is the camera turned about
    its optical axis as its image is (``reliev3r.imaging.orient_pose``), so each view's depth
    map, intrinsics and pose put every pixel at the world point of the recorded pixel it shows
    (the depth tells which: 1000 + 64 row + column mm), as the pose metrics and the ATE assume.
    Before, every view got the pose as recorded: its pixels landed turned about the optical
    axis, away from their world points (and two views turned alike were told apart by it)."""
    from reliev3r.imaging import orient_pose

    _write_turned_folder(tmp_path / "phone", ".jpg", pose=TURNED_CAMERA)
    if poses == "tum":
        for f in (tmp_path / "phone").glob("*.pose.txt"):
            f.unlink()
        write_tum(tmp_path / "phone" / "groundtruth.txt", np.arange(4.0), np.tile(TURNED_CAMERA, (4, 1, 1)))
    (w,) = load_windows(f"{spec}:{tmp_path / 'phone'}", views=4, height=48, width=48, windows=1, stride=1,
                        run_dir=tmp_path)
    K = np.array([[50.0, 0, 30], [0, 55.0, 20], [0, 0, 1]])
    rows, columns = np.mgrid[:48, :48]
    for v, turn in enumerate(EXIF_TURNS.values()):
        np.testing.assert_allclose(w.gt_cam_to_world[v], orient_pose(TURNED_CAMERA, turn), atol=1e-6)
        d = w.gt_depth[v].astype(np.float64)
        mm = np.rint(d * 1000).astype(int) - 1000
        recorded = np.stack([mm % 64, mm // 64, np.ones_like(mm)], -1) @ np.linalg.inv(K).T * d[..., None]
        expected = recorded @ TURNED_CAMERA[:3, :3].T + TURNED_CAMERA[:3, 3]
        shown = np.stack([columns, rows, np.ones_like(rows)], -1) @ np.linalg.inv(w.intrinsics[v]).T * d[..., None]
        pose = w.gt_cam_to_world[v].astype(np.float64)
        np.testing.assert_allclose(shown @ pose[:3, :3].T + pose[:3, 3], expected, atol=1e-4)


def test_a_window_with_a_mirrored_frame_and_its_pose_is_skipped_saying_why(tmp_path, caplog):
    """A frame mirrored by its Exif orientation (2: a front camera's) is no view of a camera at
    any pose (its pose would take a rotation of determinant -1): a window with such a frame and a
    ground-truth pose for it is skipped with a warning that names the frame and says so, as one
    whose intrinsics do not fit its frames; the other windows are scored. Without its pose file
    (a folder's) the mirrored frame is read (no pose, no pose metrics for its window). Before, the window was
    scored against the recorded pose of an unmirrored camera."""
    _write_turned_folder(tmp_path / "selfie", ".jpg", exif=(1, 6, 1, 2), pose=TURNED_CAMERA)
    spec = f"7scenes:{tmp_path / 'selfie'}"
    with caplog.at_level("WARNING", logger="evaluation.datasets"):
        windows = load_windows(spec, views=2, height=48, width=48, windows=2, stride=1, run_dir=tmp_path)
    assert [w.name for w in windows] == ["selfie:0"]
    (said,) = [r.getMessage() for r in caplog.records if "window skipped" in r.getMessage()]
    assert "selfie:2" in said and "frame-000003" in said and "mirrored (Exif orientation 2)" in said
    with pytest.raises(ValueError, match="no window could be read.*mirrored"):
        load_windows(f"{spec}@2-3", views=2, height=48, width=48, windows=1, stride=1, run_dir=tmp_path)
    (tmp_path / "selfie" / "frame-000003.pose.txt").unlink()  # a folder's poses are optional (7-Scenes': not)
    windows = load_windows(f"folder:{tmp_path / 'selfie'}", views=2, height=48, width=48, windows=2, stride=1,
                           run_dir=tmp_path)
    assert [w.name for w in windows] == ["selfie:0", "selfie:2"]
    assert windows[0].gt_cam_to_world is not None and windows[1].gt_cam_to_world is None


@pytest.mark.parametrize("spec, intrinsics", [("folder", True), ("folder", False), ("7scenes", True),
                                               ("7scenes", False)])
def test_a_window_with_a_frame_of_another_size_than_the_first_is_skipped_naming_it(tmp_path, caplog, spec,
                                                                                   intrinsics):
    """A folder's one intrinsics matrix (its camera-intrinsics.txt, or 7-Scenes' published one)
    served a frame of another size (resized by an editor, 4:3 kept: its principal point still
    passes ``intrinsics_mismatch``) taken at its own size: its window was scored with wrong
    intrinsics, unsaid. It is skipped as a window with a frame that cannot be read is, the
    warning naming the frame, its size and the first frame's; the other windows are scored."""
    from reliev3r import imaging

    rows, columns = np.mgrid[:48, :64]
    rgb = np.stack([5 * rows, 3 * columns, np.full_like(rows, 128)], -1).astype(np.uint8)
    seq = tmp_path / "seq"
    seq.mkdir()
    for k in range(6):
        bgr = cv2.resize(rgb, (48, 36)) if k == 3 else rgb
        cv2.imwrite(str(seq / f"frame-{k:06d}.color.png"), bgr)
        cv2.imwrite(str(seq / f"frame-{k:06d}.depth.png"), np.full(bgr.shape[:2], 1500, np.uint16))
        np.savetxt(seq / f"frame-{k:06d}.pose.txt", np.eye(4))
    if intrinsics:
        np.savetxt(seq / "camera-intrinsics.txt", [[50.0, 0, 31.5], [0, 50.0, 23.5], [0, 0, 1]])
    with caplog.at_level("WARNING", logger="evaluation.datasets"):
        windows = load_windows(f"{spec}:{seq}", views=2, height=48, width=64, windows=3, stride=1, run_dir=tmp_path)
    assert [w.name for w in windows] == ["seq:0", "seq:4"]
    (said,) = [r.getMessage() for r in caplog.records if "window skipped" in r.getMessage()]
    named = str(seq / "camera-intrinsics.txt") if intrinsics else imaging.PUBLISHED
    assert said == (f"evaluation window skipped: seq:2: {seq / 'frame-000003.color.png'}: 48x36, unlike "
                    f"frame-000000.color.png's 64x48, so the folder's one intrinsics matrix ({named}) cannot serve "
                    "both"), said
    for frames in ("2-3", "3-4"):  # the folder's first frame is the measure, whatever range is read
        with pytest.raises(ValueError, match="no window could be read.*48x36, unlike frame-000000"):
            load_windows(f"{spec}:{seq}@{frames}", views=2, height=48, width=64, windows=1, stride=1,
                         run_dir=tmp_path)


@pytest.mark.parametrize("spec", ["folder", "7scenes"])
def test_each_frame_is_read_once_for_its_pixels_its_orientation_and_its_depth(tmp_path, monkeypatch, spec):
    """Frames with Exif orientations, depth maps and an intrinsics file (both turned as the
    frame is): each colour file is opened once for a window, its orientation read from the
    bytes decoded. Before, each was opened again for the orientation (its depth map's and its
    intrinsics' turn), and a folder's first frame once more when the folder was opened."""
    from streamer_media import count_reads

    _write_turned_folder(tmp_path / "phone", ".jpg")
    reads = count_reads(monkeypatch)
    (w,) = load_windows(f"{spec}:{tmp_path / 'phone'}", views=4, height=48, width=48, windows=1, stride=1,
                        run_dir=tmp_path)
    monkeypatch.undo()
    assert w.images.shape == (4, 48, 48, 3) and w.gt_depth is not None
    frames = sorted((tmp_path / "phone").glob("*.color.jpg"))
    assert {p.name: reads[p.resolve()] for p in frames} == {p.name: 1 for p in frames}


def test_a_folder_without_intrinsics_gets_a_field_of_view_for_each_frame_as_shown(tmp_path):
    """No intrinsics file: each view gets the 60 degree horizontal field of view of its frame as
    shown (as the streamer does), whichever way its Exif orientation turns it. Before, every
    view got the first frame's (shown 48x64), off centre on the frames shown 64x48. (Frames named
    as 7-Scenes names its own get its published intrinsics instead: renamed here.)"""
    from reliev3r.geometry import intrinsics_from_fov
    from reliev3r.imaging import fit_intrinsics

    _write_turned_folder(tmp_path / "phone", ".png", intrinsics=False)
    for frame in (tmp_path / "phone").glob("*.color.png"):
        frame.rename(frame.with_name(frame.name.replace(".color", "")))
    (w,) = load_windows(f"folder:{tmp_path / 'phone'}", views=4, height=48, width=48, windows=1, stride=1,
                        run_dir=tmp_path)
    for v, turn in enumerate(EXIF_TURNS.values()):
        h, wd = (64, 48) if turn & 1 else (48, 64)
        expected = fit_intrinsics(intrinsics_from_fov(60.0, wd, h).double().numpy(), h, wd, 48, 48)
        np.testing.assert_allclose(w.intrinsics[v], expected, atol=1e-5)


@pytest.mark.parametrize("text, problem", [("50 0 30\n0 0 20\n0 0 1\n", "focal lengths must be finite and > 0"),
                                           ("50 0 30\n0 nan 20\n0 0 1\n", "focal lengths must be finite and > 0"),
                                           ("50 55 30\n", "expected 9, 4 or 16 numbers, got 3"),
                                           ("50 0 30\n0 55 20\n0 0 2\n", "the last row must be 0 0 1, got 0 0 2"),
                                           ("fx fy cx cy\n", "could not convert")])
def test_a_7scenes_intrinsics_file_is_read_and_refused_as_a_folders_is(tmp_path, text, problem):
    """A 7-Scenes folder's camera-intrinsics.txt is read by ``reliev3r.imaging.read_intrinsics``,
    as a generic folder's: a malformed one (a focal length of 0 or NaN, 3 numbers, a last row
    other than 0 0 1, words) is refused with the same error naming the file and the problem, and
    the one-line ``fx fy cx cy`` form is read by both. Before, the 7-Scenes loader read it with
    ``np.loadtxt``: a zero or NaN focal length or a bad last row went into every window's
    intrinsics, 3 or 4 numbers failed to reshape without naming the file."""
    _write_turned_folder(tmp_path / "kitchen", ".jpg", exif=(1, 1, 1))
    file = tmp_path / "kitchen" / "camera-intrinsics.txt"
    file.write_text(text)
    for spec in ("folder", "7scenes"):
        with pytest.raises(ValueError, match=problem) as err:
            load_windows(f"{spec}:{tmp_path / 'kitchen'}", views=2, height=48, width=48, windows=1, stride=1,
                         run_dir=tmp_path)
        assert str(err.value).startswith(f"{file}: ")
    file.write_text("50 55 30 20\n")
    read = [load_windows(f"{spec}:{tmp_path / 'kitchen'}", views=2, height=48, width=64, windows=1, stride=1,
                         run_dir=tmp_path)[0].intrinsics for spec in ("folder", "7scenes")]
    np.testing.assert_array_equal(read[0], read[1])
    np.testing.assert_allclose(read[1][0], [[50, 0, 30], [0, 55, 20], [0, 0, 1]])


@pytest.mark.parametrize("argv, said", [(["--windows", "0"], "--windows: must be >= 1, got 0"),
                                        (["--views", "1"], "--views: must be >= 2, got 1")])
def test_counts_below_their_least_are_refused_by_name(argv, said, capsys):
    """``--windows 0`` and ``--views 0`` were read as "the default", ``--windows -1`` as sequences
    too short: refused, naming the flag, before anything loads."""
    from reliev3r import cli

    with pytest.raises(SystemExit) as stop:
        cli.main(["eval", "--checkpoint", "nowhere", *argv])
    assert stop.value.code == 2 and said in capsys.readouterr().err


BAD_POSES = [("1 0 0 0\n0 1 0 0\n0 0 1 0\n", "expected 16 numbers .*got 12"),
             ("1 0 0 0\n0 1 0 0\n0 0 nan 0\n0 0 0 1\n", "the pose is not finite"),
             ("2 0 0 0\n0 2 0 0\n0 0 2 0\n0 0 0 1\n", "the rotation is not a rotation"),
             ("-1 0 0 0\n0 1 0 0\n0 0 1 0\n0 0 0 1\n", "determinant -1"),
             ("1 0 0 0\n0 1 0 0\n0 0 1 0\n0 0 1 1\n", "the last row must be 0 0 0 1"),
             ("a camera pose\n", "not numbers")]
"""A pose file of a frame that is no camera-to-world pose, and what ``reliev3r.imaging.read_pose`` says of it."""


@pytest.mark.parametrize("spec", ["7scenes", "folder"])
@pytest.mark.parametrize("text, problem", BAD_POSES, ids=["3x4", "nan", "scaled", "reflected", "last-row", "words"])
def test_a_window_with_a_frame_whose_pose_file_is_no_pose_is_skipped_naming_it(tmp_path, caplog, spec, text,
                                                                                problem):
    """A frame's ground-truth pose file (``frame-NNNNNN.pose.txt``) that is no pose (3x4, a NaN, a
    scaled or reflected rotation, a last row other than 0 0 0 1, words) is read by
    ``reliev3r.imaging.read_pose``: the window with that frame is skipped with a warning naming
    the file and the problem, as one with a mirrored frame; the other windows are scored, and
    where none is left the dataset is refused saying why. Before, both read it with
    ``np.loadtxt``: a NaN or a scaled or reflected rotation went into the pose metrics; a 3x4
    file beside 4x4 ones stopped the whole evaluation unnamed, 7-Scenes' when the window's poses
    were stacked, a folder's when it was opened (it reshaped every pose file to 4x4 then)."""
    _write_turned_folder(tmp_path / "kitchen", ".jpg", exif=(1, 1, 1, 1), pose=TURNED_CAMERA)
    bad = tmp_path / "kitchen" / "frame-000003.pose.txt"
    bad.write_text(text)
    with caplog.at_level("WARNING", logger="evaluation.datasets"):
        windows = load_windows(f"{spec}:{tmp_path / 'kitchen'}", views=2, height=48, width=48, windows=2, stride=1,
                               run_dir=tmp_path)
    assert [w.name for w in windows] == ["kitchen:0"]
    np.testing.assert_allclose(windows[0].gt_cam_to_world, np.stack([TURNED_CAMERA] * 2), atol=1e-6)
    (said,) = [r.getMessage() for r in caplog.records if "window skipped" in r.getMessage()]
    assert f"kitchen:2: {bad}: " in said
    assert re.search(problem, said)
    with pytest.raises(ValueError, match=f"no window could be read.*{re.escape(str(bad))}: .*{problem}"):
        load_windows(f"{spec}:{tmp_path / 'kitchen'}@2-3", views=2, height=48, width=48, windows=1, stride=1,
                     run_dir=tmp_path)


BAD_TUM_LINES = {"nan": (1, "nan", "the pose is not finite"), "inf": (7, "inf", "the pose is not finite"),
                 "zero-quaternion": (slice(4, 8), ["0"] * 4, "the quaternion is zero"),
                 "word": (3, "z", "'z' is not a number")}
"""A TUM line's field(s) replaced, and what is said of the line."""


def _spoil_tum_line(path: Path, row: int, how: str) -> str:
    """Spoils the pose on row ``row`` of a trajectory written by ``write_tum`` (its line ``row + 2``,
    under the header) as :data:`BAD_TUM_LINES` says; returns 'PATH:LINE: ' that names it."""
    lines = path.read_text().splitlines()
    fields = lines[row + 1].split()
    where, value, _ = BAD_TUM_LINES[how]
    fields[where] = value
    lines[row + 1] = " ".join(fields)
    path.write_text("\n".join(lines) + "\n")
    return f"{path}:{row + 2}: "


@pytest.mark.parametrize("match", ["order", "timestamp"])
@pytest.mark.parametrize("how", list(BAD_TUM_LINES))
def test_a_window_with_a_frame_whose_tum_line_is_no_pose_is_skipped_naming_the_line(tmp_path, caplog, match, how):
    """A TUM trajectory's line whose pose is no pose (a NaN or an inf, a zero quaternion, a word)
    is the pose of the frame matched to it (by order, or by the nearest timestamp): the window
    with that frame is skipped with a warning naming the file, the line and the problem, as one
    whose pose file is no pose; the other windows are scored. Before, a NaN, an inf or a zero
    quaternion (normalised into NaNs) went into the pose metrics, and a word stopped the whole
    dataset with Python's 'could not convert string to float', naming neither file nor line."""
    if match == "order":  # four frames named frame-NNNNNN, rows 0..3 in order
        _write_turned_folder(tmp_path / "seq", ".jpg", exif=(1, 1, 1, 1), pose=TURNED_CAMERA)
        for f in (tmp_path / "seq").glob("*.pose.txt"):
            f.unlink()
        trajectory = tmp_path / "seq" / "groundtruth.txt"
        write_tum(trajectory, np.arange(4.0), np.tile(TURNED_CAMERA, (4, 1, 1)))
        line = _spoil_tum_line(trajectory, 3, how)  # frame 3's: windows of 2 at 0 and 2
        spec, windows, expected, skipped = f"folder:{tmp_path / 'seq'}", 2, ["seq:0"], "seq:2"
    else:  # six frames named by timestamps 0.033 s apart, a trajectory sampled every 5 ms
        _write_folder(tmp_path / "seq", tum=True)
        trajectory = tmp_path / "seq" / "groundtruth.txt"
        line = _spoil_tum_line(trajectory, 33, how)  # 100.165 s: frame 5's, in the window at 4 of 0, 2, 4
        spec, windows, expected, skipped = f"folder:{tmp_path / 'seq'}?depth_scale=5000", 3, ["seq:0", "seq:2"], "seq:4"
    with caplog.at_level("WARNING", logger="evaluation.datasets"):
        read = load_windows(spec, views=2, height=48, width=48, windows=windows, stride=1, run_dir=tmp_path)
    assert [w.name for w in read] == expected
    assert all(w.gt_cam_to_world is not None and np.isfinite(w.gt_cam_to_world).all() for w in read)
    (said,) = [r.getMessage() for r in caplog.records if "window skipped" in r.getMessage()]
    assert f"{skipped}: {line}{BAD_TUM_LINES[how][2]}" in said
    with pytest.raises(ValueError, match=f"{re.escape(line)}{BAD_TUM_LINES[how][2]}"):
        read_tum(trajectory)  # the whole trajectory: refused, naming the line


@pytest.mark.parametrize("stamp", ["nan", "inf", "t0"])
def test_a_tum_line_whose_timestamp_is_no_number_refuses_the_trajectory_naming_it(tmp_path, stamp):
    """A TUM line whose timestamp is not a finite number cannot be placed among the frames (as
    one of other than 8 fields): the trajectory is refused naming the file, the line and the
    problem. Before, a NaN timestamp was matched to every frame named by a timestamp (NaN is
    the least distance to numpy's argmin), none within 20 ms: every frame silently lost its pose;
    a word stopped the dataset naming neither file nor line."""
    _write_folder(tmp_path / "seq", tum=True)
    trajectory = tmp_path / "seq" / "groundtruth.txt"
    lines = trajectory.read_text().splitlines()
    lines[11] = " ".join([stamp] + lines[11].split()[1:])
    trajectory.write_text("\n".join(lines) + "\n")
    for spec in (f"folder:{tmp_path / 'seq'}", str(tmp_path / "seq")):
        with pytest.raises(ValueError, match=rf"^{re.escape(str(trajectory))}:12: the timestamp .* is not a finite"):
            load_windows(spec, views=2, height=48, width=48, windows=3, stride=1, run_dir=tmp_path)


def test_frames_without_a_tum_line_within_the_match_gap_are_said_once_with_their_count(tmp_path, caplog):
    """Frames named by timestamps with no trajectory line within ``TIMESTAMP_MATCH_S`` (20 ms)
    go without a ground-truth pose (their windows are scored without the pose metrics, as a
    folder's without poses): said once per sequence, with the trajectory, how many frames of the
    sequence (its range) and the first one's name; ``reconstruct`` reading the folder says it
    too. Before, such frames lost their poses unsaid."""
    from reliev3r.reconstruct import open_input

    _write_folder(tmp_path / "seq", tum=True)  # frames 0.033 s apart from 100 s, a line every 5 ms
    trajectory = tmp_path / "seq" / "groundtruth.txt"
    stamps, poses = read_tum(trajectory)
    far = (stamps < 100.07) | (stamps > 100.16)  # no line within 20 ms of frames 3 (100.099) and 4 (100.132)
    write_tum(trajectory, stamps[far], poses[far])
    spec = f"folder:{tmp_path / 'seq'}"
    with caplog.at_level("WARNING", logger="evaluation.datasets"):
        windows = load_windows(f"{spec}?depth_scale=5000", views=2, height=48, width=48, windows=5, stride=1,
                               run_dir=tmp_path)
    assert [w.name for w in windows] == [f"seq:{k}" for k in range(5)]
    assert [w.gt_cam_to_world is None for w in windows] == [False, False, True, True, True]
    (said,) = [r.getMessage() for r in caplog.records]
    assert said.startswith(f"{trajectory}: 2 of 6 frames have no line within 20 ms") and "100.099000.png" in said
    caplog.clear()
    with caplog.at_level("WARNING", logger="evaluation.datasets"):
        load_windows(f"{spec}@4-5?depth_scale=5000", views=2, height=48, width=48, windows=1, stride=1,
                     run_dir=tmp_path)
    (said,) = [r.getMessage() for r in caplog.records]
    assert said.startswith(f"{trajectory}: 1 of 2 frames have no line within 20 ms") and "100.132000.png" in said
    caplog.clear()
    with caplog.at_level("WARNING"):
        stream = open_input(tmp_path / "seq", stride=1, max_frames=10)
    assert [g is None for g in stream.gt_cam_to_world] == [False, False, False, True, True, False]
    (said,) = [r.getMessage() for r in caplog.records]
    assert said.startswith(f"{trajectory}: 2 of 6 frames have no line within 20 ms") and "100.099000.png" in said



def test_frames_without_a_pose_file_among_frames_with_one_are_said_once_with_their_count(tmp_path, caplog):
    """A folder of per-frame pose files (``<name>.pose.txt``, ``<name>.txt``, ``poses/<name>.txt``)
    where some frames have none: those go without a ground-truth pose (their windows scored
    without the pose metrics), said once per sequence with the folder, how many frames of the
    sequence (its range) and the first one's name, as frames with no TUM line near are;
    ``reconstruct`` reading the folder says it too. A folder with no pose file says nothing.
    Before, such frames lost their poses unsaid."""
    from reliev3r.reconstruct import open_input

    root = tmp_path / "seq"
    poses = _write_folder(root, tum=False)
    (root / "poses").mkdir()
    (root / "img001.pose.txt").rename(root / "poses" / "img001.txt")
    (root / "img003.pose.txt").rename(root / "img003.txt")
    (root / "img002.pose.txt").unlink()
    (root / "img004.pose.txt").unlink()
    with caplog.at_level("WARNING", logger="evaluation.datasets"):
        windows = load_windows(f"folder:{root}", views=2, height=48, width=48, windows=5, stride=1, run_dir=tmp_path)
    assert [w.name for w in windows] == [f"seq:{k}" for k in range(5)]
    assert [w.gt_cam_to_world is None for w in windows] == [False, True, True, True, True]
    np.testing.assert_allclose(windows[0].gt_cam_to_world[:, 0, 3], poses[[0, 1], 0, 3], atol=1e-6)
    expected = (f"{root}: 2 of 6 frames have no pose file (<name>.pose.txt, <name>.txt or poses/<name>.txt; the "
                "first: img002.png); they go without a ground-truth pose")
    assert [r.getMessage() for r in caplog.records] == [expected]
    caplog.clear()
    with caplog.at_level("WARNING", logger="evaluation.datasets"):
        load_windows(f"folder:{root}@3-5", views=2, height=48, width=48, windows=1, stride=1, run_dir=tmp_path)
    (said,) = [r.getMessage() for r in caplog.records]
    assert said.startswith(f"{root}: 1 of 3 frames have no pose file") and "the first: img004.png" in said
    caplog.clear()
    with caplog.at_level("WARNING"):
        stream = open_input(root, stride=1, max_frames=10)
    assert [g is None for g in stream.gt_cam_to_world] == [False, False, True, False, True, False]
    assert [r.getMessage() for r in caplog.records] == [expected]
    caplog.clear()
    for k in (0, 5):
        (root / f"img{k:03d}.pose.txt").unlink()
    (root / "poses" / "img001.txt").unlink()
    (root / "img003.txt").unlink()
    with caplog.at_level("WARNING"):
        stream = open_input(root, stride=1, max_frames=10)
    assert stream.gt_cam_to_world == [None] * 6 and not caplog.records


def test_a_range_whose_frames_have_no_pose_file_among_a_folder_with_them_is_said_once(tmp_path, caplog):
    """``folder:DIR@A-B`` whose frames A..B have no pose file while other frames of the folder
    have one: they go without a ground-truth pose, said once as frames without one among frames
    with one are (the same warning); ``reconstruct`` picking only such frames (``--stride``) says
    it too. Before, unsaid: the frames with a pose file were looked for among the picked ones only."""
    from reliev3r.reconstruct import open_input

    root = tmp_path / "seq"
    _write_folder(root, tum=False)
    for k in (3, 4, 5):
        (root / f"img{k:03d}.pose.txt").unlink()
    with caplog.at_level("WARNING", logger="evaluation.datasets"):
        windows = load_windows(f"folder:{root}@3-5", views=2, height=48, width=48, windows=2, stride=1,
                               run_dir=tmp_path)
    assert windows and all(w.gt_cam_to_world is None for w in windows)
    assert [r.getMessage() for r in caplog.records] == [
        f"{root}: 3 of 3 frames have no pose file (<name>.pose.txt, <name>.txt or poses/<name>.txt; the first: "
        "img003.png); they go without a ground-truth pose"]
    caplog.clear()
    (root / "img002.pose.txt").unlink()
    np.savetxt(root / "img003.pose.txt", np.eye(4))  # frames 1 and 3 have one; stride 2 picks 0, 2, 4
    (root / "img001.pose.txt").rename(root / "img001.txt")
    (root / "img000.pose.txt").unlink()
    with caplog.at_level("WARNING"):
        stream = open_input(root, stride=2, max_frames=10)
    assert stream.gt_cam_to_world == [None] * 3
    (said,) = [r.getMessage() for r in caplog.records]
    assert said.startswith(f"{root}: 3 of 3 frames have no pose file") and "the first: img000.png" in said


def test_a_tum_quaternion_is_read_as_its_unit_quaternion(tmp_path):
    """A TUM quaternion is normalised (its length carries no rotation): one written twice as
    long reads as the rotation of the unit one."""
    (tmp_path / "t.txt").write_text("0 1 2 3 0 0 0.6 0.8\n1 1 2 3 0 0 1.2 1.6\n")
    _, poses = read_tum(tmp_path / "t.txt")
    np.testing.assert_allclose(poses[1], poses[0], atol=1e-15)
    np.testing.assert_allclose(poses[0][:3, :3], [[0.28, -0.96, 0], [0.96, 0.28, 0], [0, 0, 1]], atol=1e-15)


def test_frames_named_by_index_take_a_same_length_trajectory_by_order(tmp_path, caplog):
    """Frames named ``000000.png``... read as numbers, but no trajectory line is near those
    'times': with as many lines as frames they take the lines by order, as frames named
    otherwise do. Before, they were matched by time and every frame went without a pose."""
    from reliev3r.reconstruct import open_input

    root = tmp_path / "seq"
    _write_folder(root, tum=False)
    poses = np.tile(np.eye(4), (6, 1, 1))
    poses[:, 0, 3] = np.arange(6) * 0.1
    for k in range(6):
        for suffix in (".png", ".depth.png"):
            (root / f"img{k:03d}{suffix}").rename(root / f"{k:06d}{suffix}")
        (root / f"img{k:03d}.pose.txt").unlink()
    write_tum(root / "groundtruth.txt", 1305031102.0 + np.arange(6) * 0.033, poses)
    with caplog.at_level("WARNING", logger="evaluation.datasets"):
        windows = load_windows(f"folder:{root}", views=2, height=48, width=48, windows=5, stride=1,
                               run_dir=tmp_path)
    assert [w.name for w in windows] == [f"seq:{k}" for k in range(5)]
    for k, w in enumerate(windows):
        np.testing.assert_allclose(w.gt_cam_to_world[:, 0, 3], poses[[k, k + 1], 0, 3], atol=1e-6)
    assert not caplog.records
    stream = open_input(root, stride=2, max_frames=10)
    np.testing.assert_allclose([g[0, 3] for g in stream.gt_cam_to_world], poses[[0, 2, 4], 0, 3], atol=1e-6)


def test_the_official_7scenes_layout_is_read(tmp_path, caplog):
    """A sequence folder as Microsoft ships 7-Scenes (``seq-01/frame-NNNNNN.color.png``, depth and
    pose beside it, no intrinsics file: the dataset publishes fx = fy = 585, cx = 320, cy = 240 for
    its 640x480 Kinect frames) is read, those intrinsics said once; a folder that is not there is
    said so. Before, only ``.color.jpg`` frames were looked for ('no frame-NNNNNN.color.jpg frames
    in range') and a missing intrinsics file was a bare 'No such file or directory'."""
    from reliev3r.imaging import fit_intrinsics

    seq = tmp_path / "seq-01"
    seq.mkdir()
    rng = np.random.default_rng(0)
    for k in range(3):
        cv2.imwrite(str(seq / f"frame-{k:06d}.color.png"), rng.integers(0, 255, (480, 640, 3), dtype=np.uint8))
        cv2.imwrite(str(seq / f"frame-{k:06d}.depth.png"), np.full((480, 640), 1500, np.uint16))
        pose = np.eye(4)
        pose[0, 3] = 0.1 * k
        np.savetxt(seq / f"frame-{k:06d}.pose.txt", pose)
    with caplog.at_level("INFO", logger="evaluation.datasets"):
        (w,) = load_windows(f"7scenes:{seq}", views=3, height=48, width=64, windows=1, stride=1, run_dir=tmp_path)
    np.testing.assert_allclose(w.gt_cam_to_world[:, 0, 3], [0.0, 0.1, 0.2], atol=1e-6)
    np.testing.assert_allclose(w.gt_depth[:, 10, 10], 1.5, rtol=1e-6)
    expected = fit_intrinsics(np.array([[585.0, 0, 320], [0, 585, 240], [0, 0, 1]]), 480, 640, 48, 64)
    np.testing.assert_allclose(w.intrinsics[0], expected, atol=1e-4)
    said = [r.getMessage() for r in caplog.records if "585" in r.getMessage()]
    assert len(said) == 1 and "camera-intrinsics.txt" in said[0]
    with pytest.raises(ValueError, match="seq-02: no such folder"):
        load_windows(f"7scenes:{tmp_path / 'seq-02'}", views=3, height=48, width=64, windows=1, stride=1,
                     run_dir=tmp_path)
    for k in range(3):  # a copy at half size: the published intrinsics scaled with it
        frame = seq / f"frame-{k:06d}.color.png"
        cv2.imwrite(str(frame), cv2.resize(cv2.imread(str(frame)), (320, 240), interpolation=cv2.INTER_AREA))
    (w,) = load_windows(f"7scenes:{seq}", views=3, height=240, width=320, windows=1, stride=1, run_dir=tmp_path)
    np.testing.assert_allclose(w.intrinsics[0], [[292.5, 0, 159.75], [0, 292.5, 119.75], [0, 0, 1]], atol=1e-4)


def test_snapshots_of_one_name_get_rows_of_their_own(tmp_path, capsys):
    """Two runs of one name, a snapshot from before a run's teacher refresh and the same snapshot
    given twice each got the row name ``RUN/step-N``: later rows were written over earlier ones
    (a comparison of two runs' ``before-refresh`` snapshots printed one of them)."""
    from reliev3r.synthetic import ensure_world
    from streamer.config import SyntheticConfig

    data = tmp_path / "world"
    ensure_world(data, SyntheticConfig(scenes=1, frames=24, height=48, width=64), progress=False)
    first = make_tiny_snapshot(tmp_path / "a" / "run", seed=0)
    same_name = make_tiny_snapshot(tmp_path / "b" / "run", seed=1)
    before = make_tiny_snapshot(tmp_path / "b" / "run" / "before-refresh", seed=2)
    argv = ["eval", "--checkpoint", str(first), "--compare", str(same_name), "--compare", str(before),
            "--compare", str(first), "--data", f"synthetic:{data}", "--views", "3", "--windows", "1",
            "--out", str(tmp_path / "eval"), "--teacher", "none", f"run.dir={tmp_path / 'default'}"]
    assert cli.main(argv) == 0
    rows = json.loads((tmp_path / "eval" / "results.json").read_text())["rows"]
    models = [name for name in rows if name.startswith(("model ", "compare ")) and not name.endswith("depth")]
    assert models == ["model run/step-000000002 (weak, step 2)", "compare run/step-000000002 (weak, step 2) #2",
                      "compare run/before-refresh/step-000000002 (weak, step 2)",
                      "compare run/step-000000002 (weak, step 2) #3"]
    assert rows[models[0]] == rows[models[3]] and rows[models[0]] != rows[models[1]]
