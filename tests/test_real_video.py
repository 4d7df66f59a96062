"""The product path on real video, on the CPU: ``reliev3r up`` with the shipped defaults and the
demo sizes on a 7-Scenes image sequence, scored on other frames of the same kitchen.

A smoke check of what the GPU runs of docs/RESULTS.md measure at scale: the real frames flow
through keyframe selection, the embedded teacher, SIFT + MAGSAC and two-view triangulation into
the weak objective, every shipped loss term is computed on them, and the evaluator scores the
final snapshot against the ground truth beside the constant baseline. Learning quality itself is
measured on the GPU (a few hundred CPU steps say little and would make the suite slow).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import pytest

from learner.config import LossConfig

ROOT = Path(__file__).resolve().parents[1]
KITCHEN = ROOT.parent / "shared" / "data" / "7scenes-redkitchen"
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800),  # bounds a hang only (above the run's 900 s)
              pytest.mark.skipif(not KITCHEN.is_dir(), reason=f"7-Scenes frames not found at {KITCHEN}")]


def _sequence(folder: Path, frames: range, scale: float = 0.2) -> Path:
    """7-Scenes frames downsampled into ``folder`` (colour, depth, pose, intrinsics)."""
    folder.mkdir(parents=True)
    for n in frames:
        stem = f"frame-{n:06d}"
        image = cv2.imread(str(KITCHEN / f"{stem}.color.jpg"))
        depth = cv2.imread(str(KITCHEN / f"{stem}.depth.png"), cv2.IMREAD_UNCHANGED)
        size = (round(640 * scale), round(480 * scale))
        cv2.imwrite(str(folder / f"{stem}.color.jpg"), cv2.resize(image, size, interpolation=cv2.INTER_AREA))
        cv2.imwrite(str(folder / f"{stem}.depth.png"), cv2.resize(depth, size, interpolation=cv2.INTER_NEAREST))
        (folder / f"{stem}.pose.txt").write_text((KITCHEN / f"{stem}.pose.txt").read_text())
    f, c = 585 * scale, lambda v: (v + 0.5) * scale - 0.5
    (folder / "camera-intrinsics.txt").write_text(f"{f} 0 {c(320)}\n0 {f} {c(240)}\n0 0 1\n")
    return folder


def test_up_with_shipped_defaults_learns_from_a_real_image_sequence(tmp_path):
    train = _sequence(tmp_path / "train", range(0, 160, 2))
    held_out = _sequence(tmp_path / "eval", range(450, 520, 2))
    run = tmp_path / "run"
    ports = [f"network.{k}=0" for k in ("work_port", "replay_port", "supervisor_port")]
    ports += [f"monitoring.ports.{s}=0"
              for s in ("supervisor", "streamer", "labeler", "replay", "learner", "evaluator")]
    cmd = [sys.executable, "-m", "reliev3r.cli", "up", "--config", str(ROOT / "configs" / "demo.yaml"),
           "--max-steps", "12", f"run.dir={run}", f"streamer.sources=[{train}]", "replay.dedup=false",
           "replay.min_size=2", f"evaluator.data=7scenes:{held_out}", "evaluator.windows=2", "learner.threads=1",
           "learner.snapshot_every=6", *ports]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "evaluation of step 12 on 7scenes:" in out, out[-3000:]
    assert "baseline constant depth + identity poses" in out
    assert "its poses fitted to its depth:" in out  # the held-out frames have poses: fitted too

    log = [json.loads(line) for line in (run / "logs" / "learner.log").read_text().splitlines() if line.startswith("{")]
    assert any(row["msg"] == "learner done" and row["step"] == 12 for row in log)
    steps = [row for row in log if row["msg"] == "step"]  # logged every few seconds: at least the first
    assert steps
    shipped = LossConfig()
    expected = {"depth", "reproj"} | ({"point"} if shipped.point_weight > 0 else set()) \
        | ({"triangulation"} if shipped.triangulation_weight > 0 else set()) \
        | ({"triangulation_pose"} if shipped.triangulation_pose_weight > 0 else set())
    for row in steps:
        assert expected <= set(row), (expected, row)
        assert all(isinstance(row[k], float) and row[k] == row[k] for k in expected)
    # Real frames give verified, triangulated matches (the labeler's counters).
    assert max(row["matches"] for row in steps) > 0


def test_up_refreshes_its_teacher_from_its_learner_and_relabels_with_it(tmp_path):
    """``labeler.refresh_step``: at that snapshot ``reliev3r up`` distils its learner into a new
    embedded teacher (the real ``teacher-train --distill``) and starts again on it: the labeler on
    the new teacher, the learner from scratch on an empty replay, the first part kept aside. The
    run is stopped once the new learner has written a snapshot."""
    train = _sequence(tmp_path / "train", range(0, 160, 2))
    run = tmp_path / "run"
    ports = [f"network.{k}=0" for k in ("work_port", "replay_port", "supervisor_port")]
    ports += [f"monitoring.ports.{s}=0"
              for s in ("supervisor", "streamer", "labeler", "replay", "learner", "evaluator")]
    cmd = [sys.executable, "-m", "reliev3r.cli", "up", "--config", str(ROOT / "configs" / "demo.yaml"),
           f"run.dir={run}", f"streamer.sources=[{train}]", "replay.dedup=false", "replay.min_size=2",
           f"evaluator.data=7scenes:{train}", "evaluator.windows=1", "learner.threads=1", "learner.snapshot_every=4",
           "labeler.refresh_step=4", "labeler.refresh_seconds=20", *ports]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    weights = run / "teacher" / "embedded_depth.safetensors"
    try:
        lines = []
        for line in proc.stdout:  # bounded by the module's timeout
            lines.append(line)
            if "distilling the learner into a new teacher" in line:
                # the labeler and the evaluator wait for the new teacher (their work meanwhile
                # would be thrown away); the streamer keeps its place and replay its windows
                pids = {k: v["pid"] for k, v in json.loads((run / "processes.json").read_text()).items()}
                assert pids["labeler"] is pids["evaluator"] is pids["learner"] is None, pids
                assert pids["streamer"] and pids["replay"], pids
            if "starts afresh on it" in line or "teacher refresh failed" in line:
                break
        out = "".join(lines)
        assert "teacher embedded, teacher refresh at step 4" in out, out[-3000:]
        assert f"new teacher {weights}: the learner starts afresh on it with an empty replay" in out, out[-3000:]
        version = json.loads(weights.with_suffix(".json").read_text())["version"]
        log = run / "logs" / "labeler.log"
        while not (any(f'"{version}"' in line and "labeler up" in line for line in log.read_text().splitlines())
                   and list((run / "snapshots").glob("step-*/meta.json"))):
            assert proc.poll() is None, "".join(lines)[-3000:]
            time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, rest[-3000:]
    meta = json.loads(weights.with_suffix(".json").read_text())
    assert meta["data"]["extra"]["run"] == str(run) and meta["data"]["extra"]["step"] >= 4
    assert meta["data"]["extra"]["snapshot"].startswith(str(run / "snapshots"))  # distilled before the move
    first = sorted((run / "before-refresh" / "snapshots").glob("step-*/meta.json"))
    assert first and json.loads(first[-1].read_text())["step"] >= 4
    learner = [json.loads(line) for line in (run / "logs" / "learner.log").read_text().splitlines()
               if line.startswith("{")]
    assert not any(row["msg"] == "resumed" for row in learner)  # the second learner started from scratch
    # `reliev3r eval` scores, beside a snapshot, the teacher its learner trained on
    from evaluation.cli import default_teachers
    from reliev3r.config import load

    cfg = load([ROOT / "configs" / "demo.yaml"])
    after = sorted((run / "snapshots").glob("step-*"))[-1]
    assert default_teachers(cfg, after) == ["embedded", f"embedded:{weights}"]
    assert default_teachers(cfg, first[-1].parent) == ["embedded"]
