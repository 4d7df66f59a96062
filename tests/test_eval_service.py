"""The evaluator process (``evaluation.service``) in a thread with a real runtime: when it
exits, what it scores, what it survives; and evaluation data that is partly damaged."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from evaluation import service
from learner import snapshot as snapshots
from reliev3r.config import load
from reliev3r.service import Runtime
from helpers_world import write_7scenes
from tiny_snapshot import make_tiny_snapshot


def image_folder(folder: Path, frames: int = 6, *, depth: bool = True) -> Path:
    """A generic image folder (no poses) of random pictures, with depth PNGs (millimetres)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for k in range(frames):
        cv2.imwrite(str(folder / f"img{k:03d}.png"), rng.integers(0, 255, (96, 128, 3), dtype=np.uint8))
        if depth:
            cv2.imwrite(str(folder / f"img{k:03d}.depth.png"), np.full((96, 128), 2000 + 100 * k, np.uint16))
    return folder


def config(run: Path, data: Path, max_steps: int):
    return load(overrides=[f"run.dir={run}", f"evaluator.data=folder:{data}", "evaluator.windows=1",
                           "evaluator.stride=1", "streamer.views=3", "streamer.height=48", "streamer.width=64",
                           "evaluator.poll_s=0.05", "monitoring.enabled=false", f"learner.max_steps={max_steps}"])


class Evaluator:
    """``service.run`` on a thread; ``rc`` once it returned, ``error`` if it raised."""

    def __init__(self, cfg):
        self.runtime = Runtime("evaluator", cfg, install_signals=False, serve_metrics=False)
        self.rc, self.error = None, None

        def target():
            try:
                self.rc = service.run(cfg, self.runtime)
            except BaseException as err:  # noqa: BLE001 (reported by the test)
                self.error = err

        self.thread = threading.Thread(target=target, daemon=True)
        self.thread.start()

    def wait(self, seconds: float) -> bool:
        """True once it has returned (or raised) within ``seconds``."""
        self.thread.join(seconds)
        return not self.thread.is_alive()

    def close(self) -> None:
        self.runtime.stop()
        self.thread.join(30)
        self.runtime.close()


def scored(run: Path) -> list[str]:
    return sorted(p.stem for p in (run / "evaluations").glob("step-*.json"))


@pytest.mark.timeout(300)  # bounds a hang only
def test_a_dataset_without_poses_is_scored_on_depth_and_the_evaluator_carries_on(tmp_path):
    """Metrics a dataset cannot give are left out: the evaluator died on every snapshot of a
    folder with depth and no poses (its status read the ATE), after writing the JSON."""
    data, run = image_folder(tmp_path / "seq"), tmp_path / "run"
    make_tiny_snapshot(run, steps=2)
    evaluator = Evaluator(config(run, data, max_steps=2))
    try:
        assert evaluator.wait(240) and evaluator.error is None and evaluator.rc == 0, evaluator.error
    finally:
        evaluator.close()
    record = json.loads((run / "evaluations" / "step-000000002.json").read_text())
    assert "absrel_med" in record["model"] and "ate" not in record["model"]
    assert "model_fitted_poses" not in record  # no poses to fit them against
    status = evaluator.runtime.status  # the heartbeat names its metrics as the JSON does
    assert status["step"] == 2 and status["absrel_med"] == record["model"]["absrel_med"] and "ate" not in status



@pytest.mark.timeout(300)  # bounds a hang only
def test_a_snapshot_is_scored_again_with_its_poses_fitted_to_its_depth(tmp_path):
    """Where the data has poses, the result carries the pose metrics of the snapshot's poses fitted
    to its depth (learner.posefit: what reconstruct writes), in the JSON and in Prometheus."""
    data = write_7scenes(tmp_path / "seq", 6, width=128, height=96, step=0.02, focal=110.0, suffix=".png")
    run = tmp_path / "run"
    make_tiny_snapshot(run, steps=2)
    cfg = load(overrides=[f"run.dir={run}", f"evaluator.data=7scenes:{data}", "evaluator.windows=1",
                          "evaluator.stride=1", "streamer.views=3", "streamer.height=48", "streamer.width=64",
                          "evaluator.poll_s=0.05", "monitoring.enabled=false", "learner.max_steps=2"])
    evaluator = Evaluator(cfg)
    try:
        assert evaluator.wait(240) and evaluator.error is None and evaluator.rc == 0, evaluator.error
        gauge = evaluator.runtime.metrics.registry.get_sample_value(
            "reliev3r_eval_metric", {"metric": "auc30", "model": "model_fitted_poses"})
    finally:
        evaluator.close()
    record = json.loads((run / "evaluations" / "step-000000002.json").read_text())
    fitted = record["model_fitted_poses"]
    assert set(fitted) == set(service.FITTED_REPORTED) & set(record["model"])
    assert {"ate", "auc30", "rra30"} <= set(fitted) and "absrel_med" not in fitted  # the depth is the model's
    assert all(np.isfinite(v) for v in fitted.values())
    assert gauge == fitted["auc30"]


@pytest.mark.timeout(300)  # bounds a hang only
def test_a_result_survives_a_power_loss_once_written(tmp_path, folder_fsyncs):
    """A result was renamed into place without its folder flushed: after a power loss it could
    be gone again, and its snapshot scored again."""
    data, run = image_folder(tmp_path / "seq"), tmp_path / "run"
    make_tiny_snapshot(run, steps=1)
    (run / "evaluations").mkdir()
    result = run / "evaluations" / "step-000000001.json"
    flushed = folder_fsyncs(run / "evaluations", result.exists)
    evaluator = Evaluator(config(run, data, max_steps=1))
    try:
        assert evaluator.wait(240) and evaluator.rc == 0, evaluator.error
    finally:
        evaluator.close()
    assert result.exists() and flushed and flushed[-1] is True  # the folder flushed once it names the result

@pytest.mark.timeout(300)
def test_a_run_taken_further_scores_its_new_snapshots(tmp_path):
    """``make up`` then ``make up MAX_STEPS=2000``: the first run's final snapshot is scored;
    the evaluator of the second must wait for the snapshots to come (it exited at once, and
    nothing after the first run was ever scored)."""
    data, run = image_folder(tmp_path / "seq"), tmp_path / "run"
    make_tiny_snapshot(run, steps=1)
    first = Evaluator(config(run, data, max_steps=1))
    try:
        assert first.wait(240) and first.rc == 0, first.error
    finally:
        first.close()
    assert scored(run) == ["step-000000001"]
    second = Evaluator(config(run, data, max_steps=3))
    try:
        assert not second.wait(3)  # the learner has not written step 3 yet
        make_tiny_snapshot(run, steps=3)
        assert second.wait(240) and second.rc == 0, second.error
    finally:
        second.close()
    assert scored(run) == ["step-000000001", "step-000000003"]


@pytest.mark.timeout(300)
def test_a_run_already_past_its_max_steps_ends_once_its_newest_snapshot_is_scored(tmp_path):
    """A run stopped by hand at step 2 (no final snapshot) started again with ``--max-steps 1``:
    the learner has nothing to do, so no final snapshot comes; the evaluator waited for one
    (``up`` gave up after ten minutes, exit 1)."""
    data, run = image_folder(tmp_path / "seq"), tmp_path / "run"
    snap = make_tiny_snapshot(run, steps=2)
    meta = json.loads((snap / "meta.json").read_text())
    (snap / "meta.json").write_text(json.dumps({**meta, "final": False}))
    evaluator = Evaluator(config(run, data, max_steps=1))
    try:
        assert evaluator.wait(240) and evaluator.rc == 0, evaluator.error
    finally:
        evaluator.close()
    assert scored(run) == ["step-000000002"]


@pytest.mark.timeout(300)
def test_waiting_for_a_snapshot_reads_no_weights_and_a_snapshot_pruned_before_its_load_is_passed_over(
        tmp_path, monkeypatch):
    """While the newest snapshot is scored, a poll checksums nothing (it hashed the whole
    snapshot every ``poll_s``: a third of a core for the small model, more than a core for the
    large); a snapshot the learner prunes between the evaluator's pick and its load is passed
    over, the next one scored (the evaluator died)."""
    data, run = image_folder(tmp_path / "seq"), tmp_path / "run"
    pruned = make_tiny_snapshot(run, steps=1)
    hashed = []
    sha256 = snapshots._sha256
    monkeypatch.setattr(snapshots, "_sha256", lambda path: hashed.append(path) or sha256(path))
    load_model = snapshots.load_model

    def pruned_first(path, *args, **kw):
        if Path(path) == pruned and pruned.exists():
            shutil.rmtree(pruned)
        return load_model(path, *args, **kw)

    monkeypatch.setattr(snapshots, "load_model", pruned_first)
    evaluator = Evaluator(config(run, data, max_steps=3))
    try:
        deadline = time.time() + 60
        while not hashed and time.time() < deadline:
            time.sleep(0.05)
        assert hashed and not evaluator.wait(2) and scored(run) == [], evaluator.error
        make_tiny_snapshot(run, steps=2)
        deadline = time.time() + 240
        while not scored(run) and time.time() < deadline and evaluator.thread.is_alive():
            time.sleep(0.05)
        assert scored(run) == ["step-000000002"], evaluator.error
        time.sleep(0.5)  # polls while step 2 is the newest and scored
        hashed.clear()
        time.sleep(1.0)
        assert hashed == [] and evaluator.thread.is_alive()
    finally:
        evaluator.close()
    assert evaluator.error is None


@pytest.mark.timeout(600)  # bounds a hang only
def test_a_snapshot_written_again_under_a_scored_name_is_scored_again(tmp_path):
    """A learner started afresh (snapshots/ deleted and the run resumed) writes its steps' names
    again beside the evaluations of the snapshots that had them: the evaluator took a name with an
    evaluation for scored, so the new final snapshot was never scored (``up`` waited ten minutes
    for it) nor a new one on the way. An evaluation names the snapshot it scored (its meta's
    write time and checksums); one of another snapshot of that name is stale and replaced."""
    data, run = image_folder(tmp_path / "seq"), tmp_path / "run"
    make_tiny_snapshot(run, steps=1)
    first = Evaluator(config(run, data, max_steps=2))
    try:
        deadline = time.time() + 240
        while not scored(run) and time.time() < deadline and first.thread.is_alive():
            time.sleep(0.05)
        assert scored(run) == ["step-000000001"], first.error
        old = make_tiny_snapshot(run, steps=2)
        assert first.wait(240) and first.rc == 0, first.error
    finally:
        first.close()
    old_meta = json.loads((old / "meta.json").read_text())
    shutil.rmtree(run / "snapshots")
    # the final snapshot again, written afresh: run() found it scored and exited at once
    new = make_tiny_snapshot(run, steps=2, seed=1)
    new_meta = json.loads((new / "meta.json").read_text())
    assert service.snapshot_id(new_meta) != service.snapshot_id(old_meta)
    second = Evaluator(config(run, data, max_steps=2))
    try:
        assert second.wait(240) and second.rc == 0, second.error
        assert second.runtime.status.get("step") == 2, "exited without scoring the new snapshot"
    finally:
        second.close()
    record = json.loads((run / "evaluations" / "step-000000002.json").read_text())
    assert record["snapshot_id"] == service.snapshot_id(new_meta), "the old snapshot's evaluation was kept"
    # a snapshot on the way (not the last) written again: the running evaluator scores it too
    shutil.rmtree(run / "snapshots")
    again = make_tiny_snapshot(run, steps=1, seed=2)
    third = Evaluator(config(run, data, max_steps=2))
    try:
        deadline = time.time() + 240
        while third.runtime.status.get("step") != 1 and time.time() < deadline and third.thread.is_alive():
            time.sleep(0.05)
        assert third.runtime.status.get("step") == 1, third.error
        record = json.loads((run / "evaluations" / "step-000000001.json").read_text())
        assert record["snapshot_id"] == service.snapshot_id(json.loads((again / "meta.json").read_text()))
    finally:
        third.close()
    assert third.error is None



@pytest.mark.timeout(600)  # bounds a hang only
def test_a_damaged_snapshot_passed_over_then_written_again_whole_is_scored(tmp_path, monkeypatch, wait_for):
    """A snapshot the evaluator could not load was passed over by name for good: written again
    whole under that name (its weights damaged, or its meta), it was never tried again. What is
    passed over is that very snapshot (its meta's ``snapshot_id``, or none readable)."""
    data, run = image_folder(tmp_path / "seq"), tmp_path / "run"
    failed, polls = [], []
    load_model, list_snapshots = snapshots.load_model, snapshots.list_snapshots

    def recorded_load(path, *args, **kw):
        try:
            return load_model(path, *args, **kw)
        except snapshots.SnapshotError:
            failed.append(Path(path).name)
            raise

    monkeypatch.setattr(snapshots, "load_model", recorded_load)
    monkeypatch.setattr(snapshots, "list_snapshots", lambda folder: polls.append(1) or list_snapshots(folder))
    evaluator = Evaluator(config(run, data, max_steps=2))
    try:
        for steps, damage in ((1, "model.safetensors"), (2, "meta.json")):
            made = make_tiny_snapshot(tmp_path / f"aside-{steps}", steps=steps)  # damaged before it is seen
            content = bytearray((made / damage).read_bytes())
            content[len(content) // 2] ^= 0xFF  # one byte changed, the size kept
            (made / damage).write_bytes(bytes(content))
            snap = run / "snapshots" / made.name
            snap.parent.mkdir(parents=True, exist_ok=True)
            made.rename(snap)
            wait_for(lambda: snap.name in failed or not evaluator.thread.is_alive(), 240,
                     f"the load of damaged {snap.name}")
            assert failed == [snap.name] and evaluator.thread.is_alive(), evaluator.error
            failed.clear()
            again = make_tiny_snapshot(run, steps=steps, seed=steps)  # the same name, whole
            result = run / "evaluations" / f"{again.name}.json"
            after = len(polls)
            # the first poll that lists it loads and scores it before the next poll
            wait_for(lambda: result.exists() or len(polls) > after + 2 or not evaluator.thread.is_alive(), 240,
                     f"a poll after {again.name} was written again")
            assert result.exists(), f"{again.name}, written again whole, was not tried again"
            meta = json.loads((again / "meta.json").read_text())
            assert json.loads(result.read_text())["snapshot_id"] == service.snapshot_id(meta) and not failed
        assert evaluator.wait(240) and evaluator.rc == 0, evaluator.error
    finally:
        evaluator.close()
    assert evaluator.error is None

def test_windows_with_an_unreadable_frame_or_no_usable_depth_are_skipped_with_the_reason(tmp_path, caplog):
    """One damaged frame failed the whole dataset, one window without valid ground-truth depth
    the whole evaluation (``reliev3r eval`` exit 2; the evaluator at every start): each is
    skipped, said, and the other windows are scored."""
    from evaluation.datasets import load_windows, window_starts

    data = image_folder(tmp_path / "seq", frames=9)
    assert window_starts(9, views=3, stride=1, windows=3) == [0, 3, 6]
    (data / "img004.png").write_bytes(b"")  # the second window's
    cv2.imwrite(str(data / "img007.depth.png"), np.zeros((96, 128), np.uint16))  # the third's: no depth at all
    for k in (6, 8):
        cv2.imwrite(str(data / f"img{k:03d}.depth.png"), np.zeros((96, 128), np.uint16))
    with caplog.at_level(logging.WARNING):
        windows = load_windows(f"folder:{data}", views=3, height=48, width=64, windows=3, stride=1, run_dir=tmp_path)
    assert [w.name for w in windows] == ["seq:0"]
    said = caplog.text
    assert "seq:3" in said and "img004.png: unreadable image" in said
    assert "seq:6" in said and "valid ground-truth depth" in said
    (data / "img000.depth.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="no window could be read"):
        load_windows(f"folder:{data}", views=3, height=48, width=64, windows=3, stride=1, run_dir=tmp_path)


@pytest.mark.timeout(300)  # bounds a hang only
def test_an_evaluator_before_any_snapshot_says_where_it_waits(tmp_path, caplog, wait_for):
    """An evaluator started before the learner's first snapshot, or on a host whose run.dir is
    not the learner's, logged "loading evaluation data" and then nothing, for ever. It says it
    waits for a snapshot and in which folder, then scores the snapshot once it comes."""
    data, run = image_folder(tmp_path / "seq"), tmp_path / "run"
    caplog.set_level(logging.INFO, logger="reliev3r.evaluator")
    evaluator = Evaluator(config(run, data, max_steps=1))
    try:
        record = wait_for(lambda: next((r for r in caplog.records if r.getMessage() == "waiting for a snapshot"), None),
                          240, "the evaluator's word that it waits")
        assert record.folder == str(run / "snapshots") and "run.dir" in record.note
        make_tiny_snapshot(run, steps=1)
        assert evaluator.wait(240) and evaluator.rc == 0, evaluator.error
    finally:
        evaluator.close()
    assert scored(run) == ["step-000000001"]


@pytest.mark.timeout(600)  # bounds a hang only
def test_the_pictures_of_older_evaluations_are_kept_as_their_snapshots_are(tmp_path):
    """A run that never stops scores snapshot after snapshot, and each evaluation wrote its
    pictures (some 300 KB a set in the demo) for good, while the learner keeps only
    ``learner.keep_last`` snapshots and every ``learner.keep_every``-th: evaluations/ grew
    without bound. The pictures follow the snapshots' retention; every result (a point of the
    learning curves) is kept."""
    data, run = image_folder(tmp_path / "seq"), tmp_path / "run"
    cfg = load(overrides=[f"run.dir={run}", f"evaluator.data=folder:{data}", "evaluator.windows=1",
                          "evaluator.stride=1", "streamer.views=3", "streamer.height=48", "streamer.width=64",
                          "evaluator.poll_s=0.05", "monitoring.enabled=false", "learner.max_steps=5",
                          "learner.keep_last=2", "learner.keep_every=3"])
    evaluator = Evaluator(cfg)
    try:
        for step in range(1, 6):
            make_tiny_snapshot(run, steps=step)
            deadline = time.time() + 240
            while f"step-{step:09d}" not in scored(run) and time.time() < deadline and evaluator.thread.is_alive():
                time.sleep(0.05)
        assert evaluator.wait(240) and evaluator.rc == 0, evaluator.error
    finally:
        evaluator.close()
    assert scored(run) == [f"step-{step:09d}" for step in range(1, 6)]
    pictured = sorted(p.name for p in (run / "evaluations").glob("*.png"))
    assert pictured == [f"step-{step:09d}.depth.png" for step in (3, 4, 5)]


@pytest.mark.timeout(300)  # bounds a hang only
def test_an_evaluator_removes_the_temporary_files_a_crash_left_as_it_starts(tmp_path, caplog):
    """A result and each picture are written to a temporary file then renamed into place: an
    evaluator killed in between left ``step-N.tmp`` (a result's) and ``<picture>.png.tmp.png`` (a
    picture's), removed only if that very step was scored again. An evaluator removes them as it
    starts, saying how many; results, pictures and files of other names are left as they are."""
    data, run = image_folder(tmp_path / "seq"), tmp_path / "run"
    make_tiny_snapshot(run, steps=1)
    out = run / "evaluations"
    out.mkdir()
    stale = ["step-000000007.tmp", "step-000000007.depth.png.tmp.png", "step-000000007.trajectory.png.tmp.png"]
    kept = ["step-000000000.json", "step-000000000.depth.png", "notes.tmp", "step-x.tmp", "mine.png.tmp.png"]
    for name in stale + kept:
        (out / name).write_text("{}")
    caplog.set_level(logging.INFO, logger="reliev3r.evaluator")
    evaluator = Evaluator(config(run, data, max_steps=1))
    try:
        assert evaluator.wait(240) and evaluator.rc == 0, evaluator.error
    finally:
        evaluator.close()
    names = sorted(p.name for p in out.iterdir())
    assert not set(stale) & set(names) and set(kept) <= set(names), names
    assert "step-000000001.json" in names and not any(".tmp" in n for n in names if n not in kept), names
    said = [r for r in caplog.records if r.getMessage() == "removed temporary files a crash left"]
    assert len(said) == 1 and said[0].removed == 3 and said[0].folder == str(out), said


@pytest.mark.timeout(600)  # bounds a hang only
def test_a_result_the_full_disk_refuses_is_said_and_written_once_there_is_room_with_no_scoring_again(
        tmp_path, small_disk, caplog, wait_for):
    """``evaluations/`` on a disk that fills up: the result of a snapshot met ENOSPC, which went
    out of the evaluator, whose restart scored the same snapshot again and met the full disk
    again, in a loop. Now the result not written is said (an error line with the reason, the
    status's ``write_error``, counted by its errno name for the alert), no temporary file is left,
    the evaluator scores the next snapshot, and both results are written once the disk has room;
    each snapshot is scored once."""
    data, run = image_folder(tmp_path / "seq"), tmp_path / "run"
    disk = small_disk(1 << 20)
    (disk.path / "evaluations").mkdir()
    run.mkdir()
    (run / "evaluations").symlink_to(disk.path / "evaluations")  # the results on the small disk
    make_tiny_snapshot(run, steps=1)
    disk.fill()
    caplog.set_level(logging.INFO, logger="reliev3r.evaluator")
    evaluator = Evaluator(config(run, data, max_steps=2))
    status = evaluator.runtime.status
    try:
        wait_for(lambda: status.get("write_error") or evaluator.error or evaluator.rc is not None, 240,
                 "the first result refused")
        assert evaluator.error is None and evaluator.rc is None, (evaluator.error, evaluator.rc)
        assert status["write_error"] == f"result of step-000000001: ENOSPC: {os.strerror(errno.ENOSPC)}"
        assert status["step"] == 1  # scored: its metrics are out, in the status and on the endpoint
        refused_writes = ("reliev3r_result_write_failures_total", {"reason": "ENOSPC"})
        assert evaluator.runtime.metrics.registry.get_sample_value(*refused_writes) >= 1  # for the alert
        make_tiny_snapshot(run, steps=2)  # the last one of the run: scored, its result refused too
        wait_for(lambda: status.get("step") == 2 or evaluator.error or evaluator.rc is not None, 240,
                 "the second snapshot scored")
        assert evaluator.error is None and evaluator.thread.is_alive(), "no exit with a result not written"
        assert status["write_error"].startswith("result of step-000000002: ENOSPC")
        # no result, and no temporary file left (one is there for the moment of each retry: waited past)
        wait_for(lambda: not any((disk.path / "evaluations").iterdir()), 240, "no temporary file left")
        disk.free()
        assert evaluator.wait(240) and evaluator.error is None and evaluator.rc == 0, evaluator.error
    finally:
        evaluator.close()
    assert scored(run) == ["step-000000001", "step-000000002"]
    assert json.loads((run / "evaluations" / "step-000000001.json").read_text())["step"] == 1
    assert "write_error" not in status
    assert [r.step for r in caplog.records if r.getMessage() == "evaluated snapshot"] == [1, 2]  # none again
    refused = [r for r in caplog.records if r.getMessage().startswith("result not written")]
    assert [(r.levelno, r.snapshot, r.reason) for r in refused] == [
        (logging.ERROR, "step-000000001", "ENOSPC"), (logging.ERROR, "step-000000002", "ENOSPC")]


def warnings_said(caplog) -> list[tuple[str, str | None]]:
    """(message up to its first colon, reason) of every warning or error logged."""
    return [(r.getMessage().split(":")[0], getattr(r, "reason", None)) for r in caplog.records
            if r.levelno >= logging.WARNING]


@pytest.mark.timeout(600)  # bounds a hang only
def test_evaluation_data_the_disk_cannot_read_is_counted_as_a_read_and_scored_once_it_reads(tmp_path, caplog,
                                                                                            wait_for):
    """Evaluation data whose reading meets EIO (the folder's intrinsics file: a link to
    ``/proc/self/mem``, whose first page the kernel refuses to read with EIO, as a failing disk
    does) was counted in ``result_write_failures_total`` and shown as a refused write. It is
    counted in ``data_read_failures_total`` by its errno name (no write counted), said once (an
    error line with the reason, the status's ``read_error``), and the data is read and the
    snapshot scored once it reads."""
    data, run = image_folder(tmp_path / "seq"), tmp_path / "run"
    (data / "intrinsics.txt").symlink_to("/proc/self/mem")
    make_tiny_snapshot(run, steps=1)
    caplog.set_level(logging.INFO, logger="reliev3r.evaluator")
    evaluator = Evaluator(config(run, data, max_steps=1))
    status, registry = evaluator.runtime.status, evaluator.runtime.metrics.registry
    counted = {name: (f"reliev3r_{name}_failures_total", {"reason": "EIO"}) for name in ("data_read", "result_write")}
    try:
        refused_twice(evaluator, counted["data_read"], "the data refused twice", wait_for)
        assert registry.get_sample_value(*counted["result_write"]) is None
        assert registry.get_sample_value(*counted["data_read"]) >= 2
        assert status["read_error"] == f"evaluation data folder:{data}: EIO: {os.strerror(errno.EIO)}", status
        assert "write_error" not in status and scored(run) == []
        (data / "intrinsics.txt").unlink()  # the disk reads again (a folder without intrinsics: a field of view)
        assert evaluator.wait(240) and evaluator.error is None and evaluator.rc == 0, evaluator.error
    finally:
        evaluator.close()
    scored_once_and_said_once(run, status, "read_error", caplog, ("evaluation data not read", "EIO"))


def refused_twice(evaluator: Evaluator, sample: tuple[str, dict], what: str, wait_for) -> None:
    """Waits (``wait_for``: the fixture) until the evaluator has counted ``sample`` (a series' name
    and labels) twice, still up."""
    registry = evaluator.runtime.metrics.registry
    wait_for(lambda: evaluator.error or evaluator.rc is not None or (registry.get_sample_value(*sample) or 0) >= 2,
             240, what)
    assert evaluator.error is None and evaluator.rc is None, (evaluator.error, evaluator.rc)


def scored_once_and_said_once(run: Path, status: dict, error: str, caplog, said: tuple[str, str]) -> None:
    """After an evaluator whose data was refused ran on: its one snapshot scored, ``error`` gone from
    its status, the refusal said once (``said``: message and reason) however many turns it was
    refused, no traceback, and the data said loaded."""
    assert scored(run) == ["step-000000001"] and error not in status
    assert warnings_said(caplog) == [said], warnings_said(caplog)
    assert [r for r in caplog.records if r.getMessage() == "evaluation data loaded"]


def run_on_a_full_disk(tmp_path: Path, disk) -> Path:
    """A run folder on ``disk`` (a ``small_disk``), its ``snapshots/`` on another disk with a
    one-step snapshot in it; ``disk`` then filled."""
    run = disk.path / "run"
    (tmp_path / "snapshots").mkdir()
    run.mkdir()
    (run / "snapshots").symlink_to(tmp_path / "snapshots")
    make_tiny_snapshot(run, steps=1)
    disk.fill()
    return run


@pytest.mark.timeout(600)  # bounds a hang only
def test_a_results_folder_the_full_disk_refuses_at_the_first_start_is_said_and_made_once_there_is_room(
        tmp_path, small_disk, caplog, wait_for):
    """A run's first evaluator start on a full disk: making ``evaluations/`` met ENOSPC, which
    went out of the evaluator's start, and every restart met it again (a crash loop). Now it is
    said as a result the disk refuses is (an error line with the reason, the status's
    ``write_error``, counted), the evaluator waits for snapshots and scores them, and the folder
    and the results are made once the disk has room."""
    data = image_folder(tmp_path / "seq")
    disk = small_disk(1 << 20, inodes=64)  # a full ext4 refuses a folder; a tmpfs, once out of inodes
    run = run_on_a_full_disk(tmp_path, disk)
    caplog.set_level(logging.INFO, logger="reliev3r.evaluator")
    evaluator = Evaluator(config(run, data, max_steps=1))
    status = evaluator.runtime.status
    try:
        wait_for(lambda: status.get("step") or evaluator.error or evaluator.rc is not None, 240, "the snapshot scored")
        assert evaluator.error is None and evaluator.rc is None, (evaluator.error, evaluator.rc)
        assert status["write_error"].endswith(f"ENOSPC: {os.strerror(errno.ENOSPC)}"), status
        refused_writes = ("reliev3r_result_write_failures_total", {"reason": "ENOSPC"})
        assert evaluator.runtime.metrics.registry.get_sample_value(*refused_writes) >= 1
        assert not (run / "evaluations").exists()
        disk.free()
        assert evaluator.wait(240) and evaluator.error is None and evaluator.rc == 0, evaluator.error
    finally:
        evaluator.close()
    assert scored(run) == ["step-000000001"] and "write_error" not in status
    said = warnings_said(caplog)  # once each, no traceback (pruning the pictures of a folder not made)
    assert said == [("results folder not made", "ENOSPC"), ("pictures not written", "ENOSPC")], said
    assert [r for r in caplog.records if r.getMessage() == "results folder made"]


@pytest.mark.timeout(600)  # bounds a hang only
def test_a_held_out_world_the_full_disk_refuses_at_the_first_start_is_said_and_rendered_once_there_is_room(
        tmp_path, small_disk, caplog, wait_for):
    """A run's first evaluator start on a full disk with the default ``evaluator.data``
    (``synthetic``: the held-out world rendered into the run folder): the render met ENOSPC,
    which went out of the evaluator's start, and every restart met it again (a crash loop, as
    making ``evaluations/`` did). Now it is said as a result the disk refuses is (an error line
    with the reason, the status's ``write_error``, counted for the alert), no snapshot is scored
    without data, and the world is rendered and the snapshot scored once the disk has room."""
    disk = small_disk(1 << 20)
    run = run_on_a_full_disk(tmp_path, disk)
    caplog.set_level(logging.INFO, logger="reliev3r.evaluator")
    cfg = load(overrides=[f"run.dir={run}", "evaluator.windows=1", "evaluator.stride=1", "streamer.views=3",
                          "streamer.height=48", "streamer.width=64", "streamer.synthetic.scenes=1",
                          "streamer.synthetic.frames=8", "streamer.synthetic.height=48",
                          "streamer.synthetic.width=64", "evaluator.poll_s=0.05", "monitoring.enabled=false",
                          "learner.max_steps=1"])
    assert cfg.evaluator.data == "synthetic"
    evaluator = Evaluator(cfg)
    status = evaluator.runtime.status
    refused_writes = ("reliev3r_result_write_failures_total", {"reason": "ENOSPC"})
    try:
        refused_twice(evaluator, refused_writes, "the held-out world refused twice", wait_for)
        assert status["write_error"] == f"held-out world: ENOSPC: {os.strerror(errno.ENOSPC)}", status
        assert "step" not in status and scored(run) == []  # nothing scored without data
        disk.free()
        assert evaluator.wait(240) and evaluator.error is None and evaluator.rc == 0, evaluator.error
    finally:
        evaluator.close()
    scored_once_and_said_once(run, status, "write_error", caplog, ("evaluation data not loaded", "ENOSPC"))
