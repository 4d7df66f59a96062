"""No lost work: a real labeler process SIGKILLed in the middle of a window.

The streamer runs in a thread of the test; replay and two labelers are real processes
(``python -m reliev3r.cli replay|label --config <yaml>``) on 127.0.0.1. Labeler A takes windows
while replay is still down, so it is stuck mid-window (labelled, insert unacknowledged) when
it is killed. Replay then starts with labeler B: the streamer must re-deliver A's windows to
B, and the durable replay store must end with every window exactly once.
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time

import pytest
import yaml

import streamer.service as streamer_service
from reliev3r.config import PipelineConfig, free_port, load
from reliev3r.service import Runtime
from replay.storage import DiskStorage
from streamer_media import encode, panning_frames

pytestmark = pytest.mark.slow


def _stop(proc: subprocess.Popen) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return out


def test_sigkilled_labeler_window_is_redelivered_and_stored_once(tmp_path, wait_for, reliev3r_process):
    video = encode(tmp_path / "pan.mp4", panning_frames(40, 128, 96, step=3))
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump({
        "run": {"dir": str(tmp_path / "run")},
        "network": {"work_port": free_port(), "replay_port": free_port(), "supervisor_port": free_port()},
        "monitoring": {"ports": {s: 0 for s in ("supervisor", "streamer", "labeler", "replay", "learner",
                                                 "evaluator")}},
        "streamer": {"sources": [str(video)], "views": 3, "height": 64, "width": 96, "frame_stride": 2,
                     "window_step": 4, "loop": False, "resend_timeout_s": 3.0, "peer_timeout_s": 2.0},
        "labeler": {"teacher": "none", "matcher": "sift", "credits": 2, "insert_timeout_s": 60.0},
        "replay": {"durable": True, "min_size": 1},
    }))
    cfg = load([config])
    runtime = Runtime("streamer", cfg, install_signals=False, serve_metrics=False)

    def stage(kind: str) -> subprocess.Popen:  # a real replay or labeler process on the same config
        return reliev3r_process(kind, "--config", config, env={"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    thread = threading.Thread(target=streamer_service.run, args=(cfg, runtime), daemon=True)

    def metric(name, labels=None) -> float:
        return runtime.metrics.registry.get_sample_value(f"reliev3r_{name}", labels or {}) or 0.0

    procs: list[subprocess.Popen] = []
    try:
        thread.start()
        a = stage("label")
        procs.append(a)
        # A holds windows it has labelled but cannot insert (replay is not up yet)
        wait_for(lambda: metric("windows_in_flight") >= 2, 120, "labeler A to take windows", [a])
        time.sleep(1.0)
        assert metric("windows_acked_total", {"status": "stored"}) == 0
        held = metric("windows_in_flight")
        a.send_signal(signal.SIGKILL)
        a.wait(10)
        assert a.returncode == -signal.SIGKILL

        replay = stage("replay")
        b = stage("label")
        procs += [replay, b]

        def drained() -> bool:
            sent = metric("windows_sent_total")
            return sent >= 3 and metric("windows_in_flight") == 0 and \
                metric("windows_acked_total", {"status": "stored"}) + \
                metric("windows_acked_total", {"status": "duplicate"}) >= sent
        wait_for(drained, 180, "every window stored", [replay, b])
        sent = int(metric("windows_sent_total"))
        assert metric("windows_resent_total") >= held  # A's windows came back through the resend
        assert metric("windows_abandoned_total") == 0
        outputs = {"replay": _stop(replay), "labeler B": _stop(b)}
        assert replay.returncode == 0 and b.returncode == 0, outputs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
        runtime.stop()
        thread.join(10)
        runtime.close()

    store = DiskStorage(tmp_path / "run" / "replay")
    try:
        ids = [r.window_id for r in store.records.values()]
        assert len(ids) == sent and len(set(ids)) == sent, ids  # every window, each once
        assert not store.verify()  # and every payload reads back with its checksum
    finally:
        store.close()
