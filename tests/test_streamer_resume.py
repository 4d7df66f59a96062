"""Resumable archives: a real ``reliev3r stream`` process is SIGKILLed mid-run and started
again; acknowledged windows are never sent again, un-acknowledged ones are, and the stream
goes on past where it stopped. Plus the progress file's own rules."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml
import zmq

from reliev3r import protocol
from reliev3r.config import free_port
from reliev3r.protocol import Message
from streamer.progress import Progress
from streamer_media import encode, panning_frames

REPO = Path(__file__).resolve().parents[1]
HANG_S = 300.0
"""Bounds a hang only: every wait ends as soon as what it waits for happened."""


def start_streamer(config: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "reliev3r.cli", "stream", "--config", str(config)],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})


def receive(sock, ack, seconds=HANG_S, *, stop_after=None, stop_when=lambda: False):
    """Windows received until ``stop_after`` of them or ``stop_when()`` (``seconds`` bounds a
    hang); ``ack(window_id)`` decides which get a ``done``."""
    got = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and (stop_after is None or len(got) < stop_after) and not stop_when():
        sock.send_multipart(protocol.encode(Message("ready", {"credits": 4})))
        if sock.poll(100):
            msg = protocol.decode(sock.recv_multipart())
            wid = msg.meta["window_id"]
            got.append(wid)
            if ack(wid):
                sock.send_multipart(protocol.encode(Message("done", {"window_id": wid, "status": "stored",
                                                                      "reason": ""})))
    return got


def first_frame(wid):
    return int(wid.rsplit(":", 1)[1])


def test_sigkill_and_restart_resumes_without_resending_acked(tmp_path):
    clip = encode(tmp_path / "pan.mp4", panning_frames(120, 96, 64, step=3))
    port = free_port()
    config = tmp_path / "stream.yaml"
    config.write_text(yaml.safe_dump({
        "run": {"dir": str(tmp_path / "run")},
        "network": {"work_port": port, "replay_port": free_port()},
        "monitoring": {"enabled": False},
        "streamer": {"sources": [str(clip)], "views": 2, "height": 32, "width": 48, "frame_stride": 2,
                     "window_step": 4, "loop": False, "max_in_flight": 6, "resend_timeout_s": 30.0}}))
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)  # a minimal labeler/replay peer
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://127.0.0.1:{port}")
    progress_file = tmp_path / "run" / "streamer" / "progress.json"
    order: dict[str, int] = {}
    proc = start_streamer(config)
    try:
        # Acknowledge out of order: every window except the 3rd and the 6th.
        first_run = receive(sock, lambda wid: order.setdefault(wid, len(order)) not in (2, 5), stop_after=12)
        assert len(first_run) == 12
        held = {w for w, i in order.items() if i in (2, 5)}
        acked = set(first_run) - held
        oldest_held = min(first_frame(w) for w in held)
        deadline = time.monotonic() + HANG_S  # wait until the last acknowledgement is on disk
        while time.monotonic() < deadline:
            try:
                state = next(iter(json.loads(progress_file.read_text())["sources"].values()))
                if state["resume"] == oldest_held and len(state["acked"]) == sum(
                        first_frame(w) > oldest_held for w in acked):
                    break
            except (OSError, ValueError, StopIteration):
                pass
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(60)
        state = next(iter(json.loads(progress_file.read_text())["sources"].values()))
        assert state["resume"] == oldest_held and not state["done"]  # the oldest un-acked window
        proc = start_streamer(config)  # restart; everything is acknowledged from here on
        second_run = receive(sock, lambda wid: True, stop_when=lambda: proc.poll() is not None)
        proc.wait(60)  # loop: false, every window done: the streamer exits by itself (bounds a hang)
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        sock.close(linger=0)
        ctx.destroy(linger=0)
    assert not acked & set(second_run), "an acknowledged window was sent again"
    assert held <= set(second_run), "un-acknowledged windows are sent again after the restart"
    assert max(first_frame(w) for w in second_run) > max(first_frame(w) for w in first_run), "the stream goes on"
    assert min(first_frame(w) for w in second_run) == min(first_frame(w) for w in held)  # not from zero
    everything = acked | set(second_run)
    assert len(everything) >= 15  # 120 frames; the rotation-only pan waits for 12 px of flow per view


def test_progress_file_rules(tmp_path):
    path = tmp_path / "streamer" / "progress.json"
    p = Progress(path, window_step=4)
    for first in (0, 4, 8, 12):
        p.made("s", f"s:0:{first}")
    p.acked("s:0:0")
    p.acked("s:0:8")  # out of order: 4 is still out
    assert p.save() and not list(path.parent.glob("*.tmp"))
    q = Progress(path, window_step=4)
    assert q.start_frame("s") == 4 and q.is_acked("s:0:8") and not q.is_acked("s:0:4") and not q.is_acked("s:0:0")
    assert q.start_frame("other") == 0
    p.acked("s:0:4")
    p.acked("s:0:12")
    p.source_done("s")
    p.save()
    q = Progress(path, window_step=4)
    assert q.start_frame("s") is None  # finished, all acknowledged
    path.write_text("{broken")
    assert Progress(path, window_step=4).start_frame("s") == 0  # unreadable: from zero, not a crash
    p.made("t", "t:0:0")
    p.new_pass(1)  # at once: the old pass's window still out does not hold the new pass back
    assert p.pass_index == 1 and p.start_frame("t") == 0 and p.start_frame("s") == 0
    p.made("t", "t:1:0")
    p.acked("t:0:0")  # the old pass's, late: forgotten, nothing of the new pass moves
    p.save()
    q = Progress(path, window_step=4)
    assert q.pass_index == 1 and q.start_frame("t") == 0 and not q.is_acked("t:1:0")
    p.acked("t:1:0")
    p.save()
    assert Progress(path, window_step=4).start_frame("t") == 4  # the new pass goes on after its window
    assert not p.pending
