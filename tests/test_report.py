"""The evaluator's picture set (evaluation.pictures) and ``reliev3r report`` (reliev3r.report):
pictures beside each evaluation JSON, one self-contained HTML page of the learning curves, and
that page rendered by headless Chromium (skipped, with the reason, where it is not installed)."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch

from evaluation.datasets import EvalWindow
from evaluation.evaluate import TITLES
from evaluation.pictures import depth_picture, picture_snapshot, write_pictures
from evaluation.service import FITTED_REPORTED
from reliev3r import report
from reliev3r.cli import main as cli_main
from tests.helpers_report import H, V, W, assert_curves, chromium, predicted, screenshot, window


def make_run(folder: Path, steps: list[int], *, pictures: bool, slope: float, fitted: bool = False) -> Path:
    """A run folder with evaluation JSONs as the evaluator writes them (and, optionally, the
    picture set of each)."""
    out = folder / "evaluations"
    out.mkdir(parents=True)
    keys = [k for k in TITLES if k not in ("accuracy", "completeness")]
    baseline = {k: 0.5 + 0.1 * i for i, k in enumerate(keys)}
    for n, step in enumerate(steps):
        stem = f"step-{step:09d}"
        model = {k: 0.2 + 0.05 * i + slope * n for i, k in enumerate(keys)}
        record = {"snapshot": f"{folder}/snapshots/{stem}", "step": step, "data": "synthetic", "windows": 4,
                  "model": model, "baseline_constant_identity": baseline, "seconds": 1.0}
        if fitted:  # as the evaluator writes them where the data has poses
            record["model_fitted_poses"] = {k: model[k] / 2 for k in FITTED_REPORTED if k in model}
        if pictures:
            win = window()
            depth, pose = predicted(win, noise=0.3 / (n + 1))
            record["pictures"] = write_pictures(out, stem, [(win, depth, pose)])
        (out / f"{stem}.json").write_text(json.dumps(record))
    return folder


def test_pictures_are_written_beside_the_json(tmp_path):
    win = window()
    depth, pose = predicted(win)
    names = write_pictures(tmp_path, "step-000000025", [(win, depth, pose)])
    assert names == ["step-000000025.depth.png", "step-000000025.trajectory.png"]
    depth_png = cv2.imread(str(tmp_path / names[0]))
    assert depth_png is not None and depth_png.shape[1] >= 3 * 160  # image | gt | prediction, zoomed
    assert depth_png.std() > 10
    traj = cv2.imread(str(tmp_path / names[1]))
    assert traj is not None and traj.std() > 10
    # both tracks are drawn: pixels of the estimate's blue and the ground truth's green
    for bgr in ((180, 119, 31), (44, 160, 44)):
        assert (np.abs(traj.astype(int) - bgr).max(-1) < 30).sum() > 20
    assert not list(tmp_path.glob("*.tmp*"))


def test_pictures_survive_a_power_loss_before_the_result_names_them(tmp_path, folder_fsyncs, fsynced):
    """The pictures were renamed into place unflushed, and the result naming them written
    durably after: after a power loss the result could name pictures that are gone. Each
    picture's bytes are flushed before its rename, and the folder once it names both."""
    win = window()
    depth, pose = predicted(win)
    flushed = folder_fsyncs(tmp_path, lambda: sorted(p.name for p in tmp_path.glob("*.png") if p in fsynced))
    names = write_pictures(tmp_path, "step-000000025", [(win, depth, pose)])
    assert flushed and flushed[-1] == names == ["step-000000025.depth.png", "step-000000025.trajectory.png"]


def test_pictures_follow_the_ground_truth_there_is(tmp_path):
    win = window()
    depth, pose = predicted(win)
    no_depth = EvalWindow("a", win.images, win.intrinsics, None, win.gt_cam_to_world)
    assert write_pictures(tmp_path, "s", [(no_depth, depth, pose)]) == ["s.trajectory.png"]
    no_pose = EvalWindow("b", win.images, win.intrinsics, win.gt_depth, None)
    assert write_pictures(tmp_path, "t", [(no_pose, depth, pose)]) == ["t.depth.png"]


def test_depth_picture_draws_infinite_ground_truth_as_invalid():
    """Ground truth +inf is no depth: the picture is the one of those pixels at 0 (invalid),
    not one whose colour range and median scale reach infinity."""
    win = window()
    depth, _ = predicted(win)
    inf, zero = win.gt_depth.copy(), win.gt_depth.copy()
    inf[:, :2], zero[:, :2] = np.inf, 0.0  # 2 rows of 24: beyond the 2% the colour range ignores
    np.testing.assert_array_equal(depth_picture(win.images, depth, inf), depth_picture(win.images, depth, zero))


def test_picture_snapshot_runs_the_model_once_per_pictured_window(tmp_path):
    win = window()
    depth, pose = predicted(win)
    calls = []

    class Model(torch.nn.Module):
        def forward(self, images):
            calls.append(tuple(images.shape))
            return SimpleNamespace(depth=torch.from_numpy(depth)[None], cam_to_world=torch.from_numpy(pose)[None])

    model = Model().train()
    names = picture_snapshot(model, [win, win, win], "cpu", tmp_path, "step-000000001")
    assert names == ["step-000000001.depth.png", "step-000000001.trajectory.png"]
    assert calls == [(1, V, 3, H, W)] and model.training


def test_report_page_is_self_contained(tmp_path):
    weak = make_run(tmp_path / "weak", [25, 50, 75, 100], pictures=True, slope=-0.03)
    sup = make_run(tmp_path / "supervised", [25, 50, 100], pictures=False, slope=-0.05)
    out = report.write_report(weak, [sup], tmp_path / "page" / "report.html")
    page = out.read_text()
    keys = report.metric_keys([report.load_run(weak)])
    assert len(keys) == len(TITLES) - 2
    assert page.count("<svg") == len(keys)
    assert page.count('stroke="#1f77b4"') == len(keys) and page.count('stroke="#ff7f0e"') == len(keys)
    assert page.count('stroke-dasharray="6 4"') == len(keys)  # the baseline on every chart
    assert page.count("data:image/png;base64,") == 2  # the weak run's newest pictures
    assert "pictures of step 100" in page
    assert "<script" not in page and "https://" not in page
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")


def test_a_report_survives_a_power_loss_once_written(tmp_path, folder_fsyncs):
    """The page was renamed into place without its folder flushed: after a power loss the
    earlier page (or none) could stand again although ``reliev3r report`` had printed its path."""
    run = make_run(tmp_path / "run", [10], pictures=False, slope=-0.01)
    out = tmp_path / "page" / "report.html"
    out.parent.mkdir()
    out.write_text("earlier")
    flushed = folder_fsyncs(out.parent, lambda: out.read_text() != "earlier")
    assert report.write_report(run, [], out) == out
    assert flushed and flushed[-1] is True and "<svg" in out.read_text()


def test_a_run_someone_sent_embeds_only_its_own_pictures_and_a_bad_record_is_skipped(tmp_path):
    """A record's ``pictures`` naming a file outside its evaluations folder (an absolute path,
    ``..``) or one that is not a PNG is not embedded (the page carried a CURVE secret key,
    base64'd as a picture); a record whose step is no integer is skipped, not the report
    (it stopped with exit 2)."""
    secret = tmp_path / "keys" / "server.key_secret"
    secret.parent.mkdir()
    secret.write_text('secret-key = "TOP-SECRET"\n')
    theirs = make_run(tmp_path / "theirs", [10, 20], pictures=True, slope=-0.01)
    evaluations = theirs / "evaluations"
    newest = evaluations / "step-000000020.json"
    record = json.loads(newest.read_text())
    (evaluations / "notes.png").write_text("not a picture")
    record["pictures"] = [str(secret), "../../keys/server.key_secret", "notes.png", *record["pictures"]]
    newest.write_text(json.dumps(record))
    (evaluations / "step-000000030.json").write_text(json.dumps({**record, "step": "30a"}))
    (evaluations / "step-000000040.json").write_text(json.dumps({**record, "step": float("nan")}))
    run = report.load_run(theirs)
    assert run.steps == [10, 20]
    _, pictures = report.newest_pictures(run)
    assert [p.name for p in pictures] == record["pictures"][3:]
    page = report.write_report(make_run(tmp_path / "mine", [10], pictures=False, slope=-0.01), [theirs],
                               tmp_path / "report.html").read_text()
    assert "TOP-SECRET" not in page and base64.b64encode(secret.read_bytes()).decode()[:16] not in page


def test_report_command(tmp_path, capsys):
    run = make_run(tmp_path / "run", [10, 20], pictures=True, slope=-0.01)
    assert cli_main(["report", str(run)]) == 0
    assert capsys.readouterr().out.strip() == str(run / "report.html")
    assert (run / "report.html").stat().st_size > 1000
    assert cli_main(["report", str(tmp_path / "missing")]) == 2
    assert cli_main(["report", str(run / "evaluations")]) == 0  # given its evaluations: the run's page
    assert capsys.readouterr().out.strip() == str(run / "report.html")
    fresh = tmp_path / "fresh"  # a run not evaluated yet: its page in it, not in the folder above
    fresh.mkdir()
    (fresh / "config.yaml").write_text("run:\n  dir: fresh\n")  # what up writes before anything starts
    assert cli_main(["report", str(fresh)]) == 0
    assert capsys.readouterr().out.strip() == str(fresh / "report.html") and not (tmp_path / "report.html").exists()


def test_a_folder_that_holds_no_run_is_refused_and_no_page_written(tmp_path, capsys):
    """``report`` of a folder with no run in it (empty, or a folder of something else) wrote a page
    of "no evaluations yet" into it and exited 0, as for a run not evaluated yet; a ``--compare``
    alike drew nothing beside the run. Refused in a line naming the folder, exit 2, no page
    written; a run's own folders (its evaluations, a run not evaluated yet) stay reported."""
    run = make_run(tmp_path / "run", [10, 20], pictures=False, slope=-0.01)
    empty, other = tmp_path / "empty", tmp_path / "photos"
    empty.mkdir()
    other.mkdir()
    (other / "cat.jpg").write_bytes(b"not a run")
    for argv, named in (([str(empty)], empty), ([str(other)], other),
                        ([str(run), "--compare", str(empty)], empty)):
        assert cli_main(["report", *argv]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err == (
            f"reliev3r report: {named}: no run there (no evaluations/, step-*.json, config.yaml or snapshots/)\n")
    assert not any(p.name == "report.html" for p in tmp_path.rglob("*"))
    assert cli_main(["report", str(run), "--out", str(empty)]) == 2  # a folder where the page would go
    assert capsys.readouterr().err == f"reliev3r report: --out {empty}: a folder, not a file\n"


def test_report_out_in_folders_not_there_makes_them_and_its_line_names_the_page(tmp_path, capsys, monkeypatch):
    """``--out`` in folders that are not there: they are made (what one asks for, as the default
    page in a run not evaluated yet is), and the one line ``report`` prints is the page's path as
    given, so where the page went is said, not made unsaid."""
    run = make_run(tmp_path / "run", [10, 20], pictures=False, slope=-0.01)
    out = tmp_path / "new" / "dir" / "x.html"
    assert cli_main(["report", str(run), "--out", str(out)]) == 0
    assert capsys.readouterr().out.splitlines() == [str(out)]
    assert "<svg" in out.read_text()
    monkeypatch.chdir(tmp_path)  # a relative --out: the path from where the command ran, as given
    assert cli_main(["report", str(run), "--out", "pages/x.html"]) == 0
    assert capsys.readouterr().out.splitlines() == ["pages/x.html"]
    assert "<svg" in (tmp_path / "pages" / "x.html").read_text()


@pytest.mark.timeout(300)
def test_report_renders_in_headless_chromium(tmp_path):
    if chromium() is None:
        pytest.skip("chromium is not installed (Debian package `chromium`; .ci/run installs it)")
    weak = make_run(tmp_path / "weak", [25, 50, 75, 100, 125, 150, 175, 200], pictures=True, slope=-0.02)
    sup = make_run(tmp_path / "supervised", [25, 50, 100, 200], pictures=False, slope=-0.04)
    page = report.write_report(weak, [sup], tmp_path / "report.html")
    image = screenshot(page, tmp_path / "report.png")
    assert_curves(image, (("weak run (blue)", (180, 119, 31)), ("compared run (orange)", (14, 127, 255))))


def test_each_runs_fitted_poses_are_drawn_on_the_pose_charts_in_a_lighter_shade(tmp_path):
    weak = make_run(tmp_path / "weak", [25, 50, 75], pictures=False, slope=-0.03, fitted=True)
    sup = make_run(tmp_path / "supervised", [25, 50], pictures=False, slope=-0.05)
    page = report.write_report(weak, [sup], tmp_path / "report.html").read_text()
    keys = report.metric_keys([report.load_run(weak)])
    pose_keys = [k for k in keys if k in FITTED_REPORTED]
    assert pose_keys and len(pose_keys) < len(keys)
    # the first run's light blue on every pose chart, and in its legend; the other run has none
    assert page.count(f'stroke="{report.FITTED_COLOURS[0]}"') == len(pose_keys)
    assert f'stroke="{report.FITTED_COLOURS[1]}"' not in page
    assert "weak, poses fitted to its depth</span>" in page
    row = page.split("<td>weak, poses fitted to its depth</td>")[1].split("</tr>")[0]
    assert row.count("<td>–</td>") == len(keys) - len(pose_keys)  # its depth is the model's: no column of it
