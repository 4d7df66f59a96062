"""No lost work: a real labeler process SIGKILLed in the middle of a window.

The streamer runs in a thread of the test; replay and two labelers are real processes
(``python -m reliev3r.cli replay|label --config <yaml>``) on 127.0.0.1. Labeler A takes windows
while replay is not up (the test holds replay's port with a socket that reads A's inserts and
never answers), and is killed once an insert of it arrived there: it is stuck mid-window
(labelled, insert unacknowledged). Replay then starts with labeler B: the streamer must
re-deliver A's windows to B, and the durable replay store must end with every window exactly once.
"""

from __future__ import annotations

import signal
import subprocess
import threading

import pytest
import yaml
import zmq

import streamer.service as streamer_service
from reliev3r import protocol
from reliev3r.config import PipelineConfig, free_port, load
from reliev3r.service import Runtime
from replay.storage import DiskStorage
from streamer_media import encode, panning_frames

pytestmark = pytest.mark.slow


def _stop(proc: subprocess.Popen) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=120)  # bounds a hang only
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
                     "window_step": 4, "loop": False, "peer_timeout_s": 2.0,
                     # the killed labeler's windows come back through peer_timeout_s; a resend is for a
                     # labeler that answers no more, and 5 of them abandon a window: 60 s each is a hang,
                     # not a slow replay on a loaded machine
                     "resend_timeout_s": 60.0},
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

    # Replay's port, held by the test: it reads what A sends there and never answers.
    silent_ctx = zmq.Context()
    silent = silent_ctx.socket(zmq.ROUTER)
    silent.setsockopt(zmq.LINGER, 0)
    silent.bind(cfg.network.bind(cfg.network.replay_port))

    def insert_arrived() -> bool:
        while silent.poll(0):
            frames = silent.recv_multipart()
            if protocol.decode(frames[1:]).kind == "insert":
                return True
        return False

    procs: list[subprocess.Popen] = []
    try:
        thread.start()
        a = stage("label")
        procs.append(a)
        # A holds windows, and has labelled one and sent its insert, which is never acknowledged
        wait_for(lambda: metric("windows_in_flight") >= 2, 120, "labeler A to take windows", [a])
        wait_for(insert_arrived, 120, "labeler A to label a window and send its insert", [a])
        assert metric("windows_acked_total", {"status": "stored"}) == 0  # nothing answered A's insert
        held = metric("windows_in_flight")
        a.send_signal(signal.SIGKILL)
        a.wait(60)  # bounds a hang only
        assert a.returncode == -signal.SIGKILL
        silent_ctx.destroy(linger=0)  # returns once the socket is closed: the port is free for replay

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
        thread.join(60)  # bounds a hang only
        runtime.close()
        silent_ctx.destroy(linger=0)

    store = DiskStorage(tmp_path / "run" / "replay")
    try:
        ids = [r.window_id for r in store.records.values()]
        assert len(ids) == sent and len(set(ids)) == sent, ids  # every window, each once
        assert not store.verify()  # and every payload reads back with its checksum
    finally:
        store.close()
