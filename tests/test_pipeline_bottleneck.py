"""The bottleneck verdict of benchmarks/pipeline_bottleneck.py on made-up scrapes (no processes),
one short real run on the CPU for the learner alone on the pipeline's own batches, and its stop
of the pipeline leaving no stage behind."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers_processes import running

SPEC = importlib.util.spec_from_file_location(
    "pipeline_bottleneck", Path(__file__).resolve().parents[1] / "benchmarks" / "pipeline_bottleneck.py")
pb = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(pb)


def _recorder(*, sent, credit, labelers, learner_samples, learner_wait, inserts):
    """Scrapes at t = 0..10 s of counters growing at the given per-second rates."""
    rec = pb.Recorder(Path("/nonexistent"))
    for t in range(11):
        rec.series.setdefault("streamer", []).append(
            (t, {"sent": sent * t, "frames": 8 * sent * t, "resent": 0.0, "in_flight": 4.0,
                 "labelers_with_credit": credit}))
        for k, (rate, busy) in enumerate(labelers):
            name = "labeler" if k == 0 else f"labeler-{k}"
            rec.series.setdefault(name, []).append(
                (t, {"windows_stored": rate * t, "windows_duplicate": 0.0, "windows_dropped": 0.0,
                     "windows_insert_failed": 0.0, "s_decode": 0.0, "s_depth": 0.5 * busy * t,
                     "s_matches": 0.5 * busy * t, "s_labelling": busy * t, "s_insert": 0.0}))
        rec.series.setdefault("replay", []).append(
            (t, {"inserts": inserts * t, "samples": learner_samples * t, "batches": t, "not_ready": 0.0,
                 "s_insert": 0.01 * t, "s_sample": 0.01 * t, "stored": 100.0}))
        rec.series.setdefault("learner", []).append(
            (t, {"step": learner_samples * t / 4, "samples": learner_samples * t, "wait": learner_wait * t,
                 "mfu": 0.3}))
    return rec


def test_labelers_that_cannot_keep_up_are_the_bottleneck():
    rec = _recorder(sent=4, credit=0.0, labelers=[(2, 0.95), (2, 0.95)], learner_samples=8, learner_wait=0.01,
                    inserts=4)
    result = pb.analyse(rec, 0, 10, None)
    assert result["bottleneck"] == "labelers"
    assert result["capacities"]["labelers"]["capacity"] == pytest.approx(4 / 0.95)
    assert result["stages"]["learner"]["data_wait_fraction"] == pytest.approx(0.01)
    assert "reuses windows" in result["reason"]
    assert "| labeler-1 |" in pb.table(result)


def test_a_gpu_teachers_depth_beside_the_matching_counts_once():
    """With the depth stage beside the matching (a GPU teacher) the stages overlap: the labelling
    thread is busy for the batches' whole time, not the sum of their stages."""
    rec = _recorder(sent=4, credit=0.0, labelers=[(2, 0.95), (2, 0.95)], learner_samples=8, learner_wait=0.01,
                    inserts=4)
    for _, scrape in rec.series["labeler"]:
        scrape["s_depth"] = scrape["s_matches"] = scrape["s_labelling"]  # each as long as the batch
    result = pb.analyse(rec, 0, 10, None)
    assert result["stages"]["labeler"]["busy_fraction"] == pytest.approx(0.95)  # not 1.9
    assert result["stages"]["labeler"]["seconds_per_window"]["depth"] == pytest.approx(0.95 / 2)
    assert result["capacities"]["labelers"]["capacity"] == pytest.approx(4 / 0.95)


def test_a_starved_learner_is_upstream_bound():
    rec = _recorder(sent=4, credit=0.0, labelers=[(2, 0.95), (2, 0.95)], learner_samples=4, learner_wait=0.5,
                    inserts=4)
    result = pb.analyse(rec, 0, 10, None)
    assert result["bottleneck"] == "labelers" and result["reason"].startswith("upstream-bound")


def test_a_learner_slower_than_every_producer_is_the_bottleneck():
    rec = _recorder(sent=20, credit=1.0, labelers=[(10, 0.3), (10, 0.3)], learner_samples=8, learner_wait=0.0,
                    inserts=20)
    result = pb.analyse(rec, 0, 10, {"samples_per_s": 16.0, "batches": 16, "steps": 20})
    assert result["bottleneck"] == "learner"
    assert result["capacities"]["streamer"]["exact"]  # labelers waited with credits: streamer flat out
    assert "contention" in result["reason"]  # 8 samples/s in the pipeline against 16 alone


@pytest.mark.timeout(900)  # bounds a hang only (about 55 s on a 2-core VM)
def test_the_learner_alone_trains_on_batches_recorded_from_the_pipelines_replay(tmp_path):
    """``--isolated``: before the pipeline stops, batches are sampled from its replay (its batch
    size, the labels its labelers made); the same config's learner then trains on them alone."""
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, str(root / "benchmarks" / "pipeline_bottleneck.py"), "--config",
           str(root / "configs" / "demo.yaml"), "--out", str(tmp_path), "--json", str(tmp_path / "pb.json"),
           "--warmup", "2", "--measure", "4", "--interval", "1", "--isolated", "--isolated-steps", "2",
           "--isolated-warmup", "1", "--isolated-batches", "2", "learner.threads=1", "streamer.synthetic.scenes=2",
           "learner.batch_size=3", *[f"monitoring.ports.{s}=0" for s in
                                     ("supervisor", "streamer", "labeler", "replay", "learner", "evaluator")]]
    out = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    alone = json.loads((tmp_path / "pb.json").read_text())["isolated_learner"]
    assert alone["batches"] == 2 and alone["steps"] == 2 and alone["samples_per_s"] > 0
    # fed at the pipeline's cadence where its learner waited for data (the demo's learner may not)
    assert (alone["cadence"] is None) == (alone["gated_samples_per_s"] is None)
    # at a cadence of a wait before every step: the rate while not waiting (the waits left out)
    cadenced = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "pipeline_bottleneck.py"), "--alone", str(tmp_path / "batches"),
         "--alone-json", str(tmp_path / "alone.json"), "--alone-cadence", "1", "0.05", "--isolated-steps", "2",
         "--isolated-warmup", "1", "--config", str(root / "configs" / "demo.yaml"), "learner.threads=1",
         "learner.batch_size=3"], cwd=root, capture_output=True, text=True)
    assert cadenced.returncode == 0, cadenced.stdout[-3000:] + cadenced.stderr[-3000:]
    alone = json.loads((tmp_path / "alone.json").read_text())
    assert alone["cadence"] == [1.0, 0.05] and alone["gated_samples_per_s"] > 0
    with np.load(tmp_path / "batches" / "batch-000.npz") as z:
        assert z["frames"].shape[0] == 3 and z["teacher_depth"].shape[:2] == z["frames"].shape[:2]
    meta = json.loads((tmp_path / "batches" / "batch-000.json").read_text())
    assert meta["teacher"]["depth"]  # the labelers' teacher, as the learner reads it
    assert "learner in the pipeline / alone" in out.stdout


@pytest.mark.timeout(120)  # bounds a hang only
def test_stopping_the_pipeline_leaves_no_stage_running(tmp_path):
    """A supervisor that ignores SIGINT and its stage (a real process group, as ``reliev3r up``
    starts it): after the timeout nothing of the group is left, the stage included (killing
    the supervisor alone left the stages running, and a failure while recording batches used to
    skip the stop altogether)."""
    import signal
    import time

    pid_file = tmp_path / "stage.pid"
    script = f"trap '' INT; sleep 600 & echo $! > {pid_file}; wait"
    up = subprocess.Popen(["bash", "-c", script], start_new_session=True)
    while not pid_file.exists() or not pid_file.read_text().strip():
        time.sleep(0.05)
    stage = int(pid_file.read_text())
    pb.stop_pipeline(up, timeout=1.0)
    assert up.returncode == -signal.SIGKILL
    deadline = time.monotonic() + 30
    while running(stage):  # killed, the stage is gone or a zombie left for whoever reaps orphans
        if time.monotonic() > deadline:
            pytest.fail("the stage outlived the pipeline's stop")
        time.sleep(0.05)


