"""The bottleneck verdict of benchmarks/pipeline_bottleneck.py on made-up scrapes (no processes)."""

import importlib.util
from pathlib import Path

import pytest

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
                     "s_matches": 0.5 * busy * t, "s_insert": 0.0}))
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


def test_a_starved_learner_is_upstream_bound():
    rec = _recorder(sent=4, credit=0.0, labelers=[(2, 0.95), (2, 0.95)], learner_samples=4, learner_wait=0.5,
                    inserts=4)
    result = pb.analyse(rec, 0, 10, None)
    assert result["bottleneck"] == "labelers" and result["reason"].startswith("upstream-bound")


def test_a_learner_slower_than_every_producer_is_the_bottleneck():
    rec = _recorder(sent=20, credit=1.0, labelers=[(10, 0.3), (10, 0.3)], learner_samples=8, learner_wait=0.0,
                    inserts=20)
    result = pb.analyse(rec, 0, 10, {"samples_per_s": 16.0})
    assert result["bottleneck"] == "learner"
    assert result["capacities"]["streamer"]["exact"]  # labelers waited with credits: streamer flat out
    assert "contention" in result["reason"]  # 8 samples/s in the pipeline against 16 alone
