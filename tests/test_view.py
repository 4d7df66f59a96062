"""``reliev3r view``: a Rerun recording of a reconstruction folder and of a run's predictions
(skipped without the optional extra ``view``, rerun-sdk)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from evaluation.tum import write_tum
from reliev3r import view
from reliev3r.cli import main as cli_main
from reliev3r.reconstruct import write_ply
from tests.helpers_report import predicted, window

rr = pytest.importorskip("rerun", reason="rerun-sdk is not installed (pip install -e '.[view]')")


def entities(rrd: Path) -> set[str] | None:
    """The entity paths of a recording, read back by rerun's own CLI (``rerun rrd verify`` must
    load it without error); None where the CLI is not beside this interpreter."""
    cli = Path(sys.executable).with_name("rerun")
    if not cli.is_file():
        return None
    verify = subprocess.run([cli, "rrd", "verify", rrd], capture_output=True, text=True, timeout=120)
    assert verify.returncode == 0, verify.stderr[-2000:]
    printed = subprocess.run([cli, "rrd", "print", rrd], capture_output=True, text=True, timeout=120)
    return {word.strip("'\",:;()[]{}") for word in printed.stdout.split() if word.startswith(("world/", "/world/"))}


def test_unproject_inverts_the_projection():
    K = np.array([[50.0, 0, 16], [0, 50, 12], [0, 0, 1]])
    c2w = np.eye(4)
    c2w[:3, 3] = (1, 2, 3)
    depth = np.full((24, 32), 2.0)
    pts = view.unproject(depth, K, c2w)
    cam = pts - c2w[:3, 3]
    uv = cam @ K.T
    assert np.allclose(uv[:, 2], 2.0)
    assert np.allclose(uv[:33, :2] / uv[:33, 2:], np.array([[u, v] for v in range(2) for u in range(32)])[:33])


def _reconstruction(folder):
    folder.mkdir()
    poses = np.tile(np.eye(4), (5, 1, 1))
    poses[:, 0, 3] = np.arange(5) * 0.1
    write_tum(folder / "poses.txt", np.arange(5, dtype=float), poses)
    (folder / "depth").mkdir()
    for i in range(5):
        cv2.imwrite(str(folder / "depth" / f"{i:06d}.png"), np.full((24, 32), 1500 + 100 * i, np.uint16))
    rng = np.random.default_rng(0)
    write_ply(folder / "points.ply", rng.standard_normal((500, 3)).astype(np.float32),
              rng.integers(0, 255, (500, 3), dtype=np.uint8), rng.random(500).astype(np.float32))
    return folder


def test_ply_is_read_back(tmp_path):
    folder = _reconstruction(tmp_path / "recon")
    points, colours = view.read_ply(folder / "points.ply")
    assert points.shape == (500, 3) and colours.shape == (500, 3) and colours.dtype == np.uint8


def test_view_of_a_reconstruction_writes_a_recording(tmp_path, capsys):
    folder = _reconstruction(tmp_path / "recon")
    out = tmp_path / "recon.rrd"
    assert cli_main(["view", str(folder), "--out", str(out)]) == 0
    assert "5 frames" in capsys.readouterr().out
    assert out.is_file() and out.stat().st_size > 10_000  # 500 points, 5 depth images
    found = entities(out)
    if found is not None:
        assert {"world/points", "world/camera", "world/camera/image", "world/camera/image/depth"} <= {
            e.lstrip("/") for e in found}, found


def test_view_of_predictions_writes_a_recording(tmp_path):
    win = window()
    out = tmp_path / "run.rrd"
    rec, rr_ = view.open_recording(out)
    view.log_ground_truth(rec, rr_, [win])
    for step, noise in ((25, 0.3), (50, 0.1)):
        view.log_predictions(rec, rr_, step, [win], [predicted(win, noise)])
    view.close_recording(rec)
    assert out.is_file() and out.stat().st_size > 5_000
    found = entities(out)
    if found is not None:
        assert {"world/window0/points", "world/window0/cam3/image/depth", "world/ground_truth/window0/cam0/image"} <= {
            e.lstrip("/") for e in found}, found


def test_view_refuses_what_it_cannot_show(tmp_path):
    assert cli_main(["view", str(tmp_path), "--out", str(tmp_path / "x.rrd")]) == 2
    assert not (tmp_path / "x.rrd").exists()


def test_a_run_config_is_read_for_its_windows_and_baselines_only(tmp_path):
    """``with_run_config`` (``view RUN``, ``eval RUN``, ``export --colmap``) takes from a run's
    config.yaml its streamer and evaluator sections (its windows) and its labeler's teacher,
    matcher and ransac_threshold_px (``eval``'s baselines, ``reliev3r.config.RUN_LABELER``), the
    command's overrides winning; not the labeler's other keys (its device, a key this version
    lacks) nor the other sections (a learner key this version lacks)."""
    from reliev3r.config import load, with_run_config

    path = tmp_path / "config.yaml"
    path.write_text("streamer:\n  views: 3\nevaluator:\n  windows: 2\nlearner:\n  no_such_key: 1\n"
                    "labeler:\n  teacher: none\n  matcher: orb\n  ransac_threshold_px: 2.0\n  device: cuda:7\n"
                    "  no_such_key: 1\n")
    overrides = ["streamer.height=40", "labeler.ransac_threshold_px=3"]
    cfg = with_run_config(load([], overrides), tmp_path, files=[], overrides=overrides)
    assert (cfg.streamer.views, cfg.evaluator.windows, cfg.streamer.height) == (3, 2, 40)
    assert (cfg.labeler.teacher, cfg.labeler.matcher, cfg.labeler.ransac_threshold_px) == ("none", "orb", 3.0)
    assert cfg.labeler.device == load().labeler.device
