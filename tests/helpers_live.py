"""What the live-feed tests share (test_streamer_live, test_streamer_http): a server process
to kill and start again, a minimal labeler peer that acknowledges every window, the streamer
settings of a live feed, and pumping until the feed is back after its server was killed."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time

import pytest
import zmq

from reliev3r import protocol
from reliev3r.protocol import Message

needs_ffmpeg = pytest.mark.skipif(shutil.which("ffmpeg") is None,
                                  reason="ffmpeg binary absent (apt-get install ffmpeg)")


class Server:
    """A server process we can SIGKILL and start again with the same command."""

    def __init__(self, argv, ready_line=None):
        self.argv, self.ready_line, self.proc = argv, ready_line, None
        self.start()

    def start(self):
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True)
        if self.ready_line:
            assert self.proc.stdout.readline().strip() == self.ready_line

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(5)

    def close(self):
        if self.proc.poll() is None:
            self.kill()


class Labeler:
    """A DEALER that keeps credits up and acknowledges every window it gets."""

    def __init__(self, ctx, cfg):
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(cfg.network.connect(cfg.network.work_port))
        self.windows: list[tuple[float, Message]] = []

    def pump(self, seconds):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.sock.send_multipart(protocol.encode(Message("ready", {"credits": 4})))
            if self.sock.poll(100):
                msg = protocol.decode(self.sock.recv_multipart())
                self.windows.append((time.monotonic(), msg))
                self.sock.send_multipart(protocol.encode(Message("done", {
                    "window_id": msg.meta["window_id"], "status": "stored", "reason": ""})))


LIVE = {"views": 2, "frame_stride": 2, "window_step": 2, "keyframe_min_motion": 0, "keyframe_min_flow": 0,
        "blur_ratio": 0, "scene_cut_hist": 0, "scene_cut_motion": 0, "live_open_timeout_s": 2.0,
        "live_read_timeout_s": 1.0, "live_stall_timeout_s": 2.0, "reconnect_initial_s": 0.2, "reconnect_max_s": 1.0}


HANG_S = 120.0
"""Bounds a hang only: every wait ends as soon as what it waits for happened."""


def pump_until(labeler: Labeler, predicate, timeout_s: float = HANG_S) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        labeler.pump(0.3)
    return predicate()


def feed_problems(streamer, name) -> dict:
    """The feed's error counts, for failure messages."""
    return {r: streamer.metric("reliev3r_decode_errors_total", {"source": name, "reason": r})
            for r in ("stalled", "read_failed", "connect_failed", "feed_ended", "corrupt_packet")}


def kill_and_restart_until_back(streamer, labeler, name, server, started_at) -> None:
    """SIGKILL ``server``, start it again once the streamer noticed, and pump until the feed
    itself is back: a gap counted for the outage, three windows made from frames read after the
    kill was noticed, and a moment when the feed is connected. ``started_at``: a
    ``time.monotonic()`` taken before the streamer started.

    Nothing here depends on the machine's speed. Windows made before the kill may still be on
    their way long after the restart (a busy machine lags behind a real-time feed), and a 1 s
    read timeout on a busy machine can cut the feed again now and then, so neither windows
    arriving after the restart nor the connected gauge at one instant says the feed is back."""
    server.kill()

    def metric(key: str) -> float:
        return streamer.metric(f"reliev3r_stream_{key}", {"source": name})

    reconnects = metric("reconnects_total")
    # A reconnect counted after the kill: the connection that was open at the kill is over and
    # every later one is to a dead server, so no frame arrives until the restart, the gap count
    # cannot move before it, and the next gap is this outage ending.
    assert pump_until(labeler, lambda: metric("reconnects_total") > reconnects), \
        f"the streamer notices the server is gone and reconnects ({feed_problems(streamer, name)})"
    noticed_at, gaps = time.monotonic(), metric("gaps_total")
    server.start()
    # A frame's timestamp is its read time less the time the live source was made (after
    # started_at): started_at + timestamp > noticed_at proves it was read after noticed_at, so
    # it came from the restarted server. Later frames all pass, so the wait ends.
    def fresh() -> int:
        return sum(1 for _, m in labeler.windows if started_at + m.meta["timestamps"][0] > noticed_at)

    connected = False

    def back() -> bool:
        nonlocal connected
        if metric("gaps_total") <= gaps:
            return False
        connected = connected or metric("connected") == 1
        return connected and fresh() >= 3

    assert pump_until(labeler, back), \
        f"the feed comes back after the restart: gaps {metric('gaps_total')} (were {gaps}), " \
        f"{fresh()} new windows, connected seen {connected} ({feed_problems(streamer, name)})"


def kill_restart_and_check(stream_cfg, stage, url, server) -> None:
    """The streamer's real ``run`` loop on the live ``url`` served by ``server``: windows of real
    picture content arrive, the server is SIGKILLed and started again
    (:func:`kill_and_restart_until_back`), and the outage is counted (a reconnect, a gap, a
    positive gap duration) and cut into the windows (no window mixes frames from before and
    after it) while the streamer keeps running."""
    import streamer.service as streamer_service
    from streamer.live import live_name

    ctx = zmq.Context()
    cfg = stream_cfg([url], streamer={**LIVE, "height": 48, "width": 64})
    started_at = time.monotonic()
    streamer = stage(streamer_service.run, cfg, "streamer")
    labeler = Labeler(ctx, cfg)
    name = live_name(url)
    try:
        assert pump_until(labeler, lambda: len(labeler.windows) >= 2), "windows from the live feed"
        msg = labeler.windows[0][1]
        assert msg.meta["source"] == name and msg.arrays["frames"].shape == (2, 48, 64, 3)
        assert msg.arrays["frames"].std() > 5  # real picture content, not a blank frame
        kill_and_restart_until_back(streamer, labeler, name, server, started_at)
        assert streamer.metric("reliev3r_stream_reconnects_total", {"source": name}) >= 1
        assert streamer.metric("reliev3r_stream_gaps_total", {"source": name}) >= 1
        # the outage is reported as a duration (its length depends on the machine: only > 0 is certain)
        assert streamer.metric("reliev3r_stream_gap_seconds_total", {"source": name}) > 0
        # the outage is a discontinuity: no window mixes frames from before and after it
        ids = [m.meta["window_id"] for _, m in labeler.windows]
        assert len(set(ids)) == len(ids) and all(i.startswith(name + ":") for i in ids)
        assert streamer.thread.is_alive()
    finally:
        streamer.stop()
        labeler.sock.close(linger=0)
        ctx.destroy(linger=0)
        server.close()
