"""Streamer and labeler over real ZeroMQ sockets (threads, 127.0.0.1, free ports), with a
minimal replay peer in the test that acknowledges inserts."""

from __future__ import annotations

import functools
import threading
import time

import numpy as np
import pytest
import zmq

import labelers.service as labeler_service
import streamer.service as streamer_service
from labelers.matches import select_pairs
from reliev3r import protocol
from reliev3r.protocol import Message
from streamer_media import encode, panning_frames


HANG_S = 120.0
"""Bounds a hang only: every wait ends as soon as what it waits for happened."""


class FakeReplay:
    """Acks every ``insert`` after "storing" it; ignores the first ``ignore_first`` inserts."""

    def __init__(self, ctx, cfg, ignore_first=0):
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(cfg.network.bind(cfg.network.replay_port))
        self.stored: dict[str, Message] = {}
        self.inserts = 0
        self.ignore_first = ignore_first
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self):
        while not self._stop.is_set():
            if not self.sock.poll(50):
                continue
            identity, *frames = self.sock.recv_multipart()
            msg = protocol.decode(frames, kinds=("insert",))
            self.inserts += 1
            if self.inserts <= self.ignore_first:
                continue
            wid = msg.meta["window_id"]
            status = "duplicate" if wid in self.stored else "stored"
            self.stored.setdefault(wid, msg)
            self.sock.send_multipart([identity, *protocol.encode(
                Message("insert_ack", {"window_id": wid, "status": status, "reason": ""}))])

    def close(self):
        self._stop.set()
        self.thread.join(5)
        self.sock.close(linger=0)


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    return encode(tmp_path_factory.mktemp("media") / "pan.mp4", panning_frames(30, 160, 120, step=3))


def send(sock, kind, **meta):
    sock.send_multipart(protocol.encode(Message(kind, meta)))


def recv(sock, timeout_s=5.0):
    if not sock.poll(int(timeout_s * 1000)):
        return None
    return protocol.decode(sock.recv_multipart())


def test_windows_flow_end_to_end(tmp_path, stream_cfg, stage, wait_for, ctx, video):
    cfg = stream_cfg([video, tmp_path / "missing.mp4"], streamer={"max_in_flight": 2})
    replay = FakeReplay(ctx, cfg)
    streamer = stage(streamer_service.run, cfg, "streamer")
    labeler = stage(labeler_service.run, cfg, "labeler")
    try:
        streamer.thread.join(HANG_S)
        assert streamer.rc == 0, "streamer did not finish its sources"
        sent = streamer.runtime.status["sent"]
        assert sent >= 5 and streamer.runtime.status == {"sent": sent, "acked": sent, "in_flight": 0}
        assert len(replay.stored) == sent and streamer.metric("reliev3r_windows_acked_total",
                                                              {"status": "stored"}) == sent
        msg = next(iter(replay.stored.values()))
        assert msg.arrays["frames"].shape == (3, 64, 96, 3) and len(msg.arrays["matches"]) >= 12
        assert streamer.metric("reliev3r_decode_errors_total", {"source": msg.meta["source"], "reason": "missing"}) == 0
        assert streamer.metric("reliev3r_decode_frames_total", {"source": msg.meta["source"]}) == 30
        wait_for(lambda: labeler.metric("reliev3r_labeler_windows_total", {"status": "stored"}) == sent, HANG_S,
                 "the labeler to count every window stored")
        # matching is timed once per batch of windows (labeler.batch_windows); every pair is counted
        assert 1 <= labeler.metric("reliev3r_labeler_stage_seconds_count", {"stage": "matches"}) <= sent
        # and each batch once whole (what pipeline_bottleneck reads as the labelling thread's busy time)
        assert labeler.metric("reliev3r_labeler_stage_seconds_count", {"stage": "labelling"}) == \
            labeler.metric("reliev3r_labeler_stage_seconds_count", {"stage": "matches"})
        assert labeler.metric("reliev3r_matches_per_pair_count") == sent * len(select_pairs(3, cfg.labeler.long_pairs))
    finally:
        labeler.stop()
        streamer.stop()
        replay.close()


class SkewedClock:
    """The streamer's Dispatcher clock: real time plus ``skew``, which the test moves forward
    to make resend and peer timeouts expire at a moment it chooses (never on its own on a slow
    machine: the timeouts are hang bounds in real time)."""

    def __init__(self):
        self.skew = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.skew


def test_a_problem_met_again_is_new_only_once():
    seen = streamer_service.FirstSeen(keep=2)
    problem = ("tree-fe6884", "no_windows", "68 frames, no window")
    assert seen(problem) and not seen(problem)  # the next pass of a looped archive: logged once
    assert seen(("tree-fe6884", "no_windows", "another detail"))
    assert not seen(problem)  # still among the last 2
    assert seen(("a", "b", "c")) and seen(("d", "e", "f")) and seen(problem)  # forgotten beyond them


def test_a_window_put_as_the_feed_is_asked_whether_it_is_exhausted_is_not_lost():
    """The producer puts its last window and ends between the two checks of
    ``WindowFeed.exhausted``; forced here: whichever check comes first lets it do so and waits
    for it to end before giving its answer, as seen before. Checked first, an empty queue
    would read as exhausted with the window in it (the streamer then stops asking and never
    sends it); the producers' liveness first, nothing can be put after they are all seen dead."""
    go = threading.Event()

    def last_window():
        go.wait(HANG_S)
        yield "last window"

    feed = streamer_service.WindowFeed([last_window()], on_error=print)
    producer = feed.threads[0]
    answered = []

    def between(answer):
        """The first check's answer, given after the producer has put its window and ended."""
        if not answered:
            answered.append(answer)
            go.set()
            producer.join(HANG_S)
            assert not producer.is_alive()
        return answer

    class Queue(type(feed.queue)):
        def empty(self):
            return between(super().empty())

    class Producer:
        def is_alive(self):
            return between(producer.is_alive())

        def join(self, timeout=None):
            producer.join(timeout)

    feed.queue, feed.threads = Queue(maxsize=feed.queue.maxsize), [Producer()]
    try:
        window = None
        for _ in range(3):  # StreamerService.step: a window if one is ready, else is the feed over?
            window = feed.get()
            if window is not None or feed.exhausted:
                break
        assert window == "last window"
        assert feed.get() is None and feed.exhausted
    finally:
        go.set()
        feed.close()


def test_windows_to_resend_with_no_labeler_wait_for_one():
    """A loop turn waits for labelers' messages unless a window can go now: windows to resend
    and no labeler with a credit (every labeler stopped, as during a teacher refresh) wait
    ``POLL_MS``, not 0 (the loop would spin a core)."""
    disp = streamer_service.Dispatcher(max_in_flight=4, resend_timeout_s=1.0, peer_timeout_s=10.0)
    poll, feed = streamer_service.POLL_MS, streamer_service.FEED_POLL_MS
    assert disp.poll_ms(False, False) == poll
    disp.in_flight["w"] = streamer_service.InFlight([b""], 0.0, b"gone", 1)
    disp.resend.append("w")
    assert disp.poll_ms(False, False) == poll  # nobody to resend to
    disp.on_ready(b"labeler", 0)
    assert disp.poll_ms(False, False) == poll  # a labeler without credits
    disp.on_ready(b"labeler", 2)
    assert disp.poll_ms(True, False) == 0  # the window can be resent now
    disp.resend.clear()
    assert disp.poll_ms(True, False) == feed and disp.poll_ms(True, True) == 0


def test_a_sources_windows_go_to_the_labeler_that_had_its_last_one_while_it_has_credit():
    """Neighbouring windows of a source share views, whose features a labeler keeps: the next
    window of a source goes where the last one went while that labeler has a credit, else to
    the labeler with the most credits."""
    disp = streamer_service.Dispatcher(max_in_flight=8, resend_timeout_s=1000.0, peer_timeout_s=10.0)
    disp.on_ready(b"a", 2)
    disp.on_ready(b"b", 3)
    assert disp.peer("kitchen") == b"b"  # no window of it out yet: the most credits
    disp.sent("kitchen:0:0", [b""], b"b", "kitchen")
    disp.on_ready(b"a", 4)
    assert disp.peer("kitchen") == b"b" and disp.peer("bikes") == b"a" and disp.peer() == b"a"
    disp.sent("kitchen:0:8", [b""], b"b", "kitchen")
    disp.sent("kitchen:0:16", [b""], b"b", "kitchen")
    assert disp.credits[b"b"][0] == 0 and disp.peer("kitchen") == b"a"  # no credit left there


def test_the_dispatcher_remembers_the_last_labeler_of_a_bounded_number_of_sources(monkeypatch):
    """A live run meets new source names for as long as it lives: the labeler of each source's
    last window is kept for the most recent ``LAST_PEER_SOURCES``; a source forgotten goes to
    the labeler with the most credits, as a new one does."""
    monkeypatch.setattr(streamer_service, "LAST_PEER_SOURCES", 3)
    disp = streamer_service.Dispatcher(max_in_flight=64, resend_timeout_s=1000.0, peer_timeout_s=10.0)
    disp.on_ready(b"a", 10)
    for n in range(5):
        disp.sent(f"cam{n}:0", [b""], b"a", f"cam{n}")
    assert list(disp.last_peer) == ["cam2", "cam3", "cam4"]
    disp.on_ready(b"b", 20)
    assert disp.peer("cam0") == b"b" and disp.peer("cam4") == b"a"


def test_windows_of_a_silent_labeler_go_to_another_once_its_credits_expire():
    """A labeler not heard from for ``peer_timeout_s`` is presumed dead: the windows it holds
    go to another labeler as soon as one has credit, long before ``resend_timeout_s``. Alone,
    a slow labeler (a long batch) keeps its windows when it comes back. (A manual clock.)"""
    now = [0.0]
    disp = streamer_service.Dispatcher(max_in_flight=8, resend_timeout_s=1000.0, peer_timeout_s=10.0,
                                       clock=lambda: now[0])
    disp.on_ready(b"slow", 2)
    disp.sent("a", [b""], b"slow")
    now[0] = 11.0
    assert disp.expire() == ([], []) and not disp.credits  # silent, and nobody else to take "a"
    disp.on_ready(b"slow", 1)  # back after its long batch: it keeps "a"
    now[0] = 22.0
    assert disp.expire() == ([], []) and disp.silent == {b"slow"}
    disp.on_ready(b"restarted", 4)  # another labeler with credit: "a" goes to it now
    assert disp.expire() == (["a"], []) and disp.next_resend() == "a"
    disp.sent("a", [b""], b"restarted")
    assert disp.in_flight["a"].attempts == 2
    assert disp.expire() == ([], []) and disp.silent == set()  # "slow" holds nothing now


def test_backpressure_resend_and_dead_labeler(stream_cfg, stage, wait_for, ctx, video, monkeypatch):
    clock = SkewedClock()
    monkeypatch.setattr(streamer_service, "Dispatcher", functools.partial(streamer_service.Dispatcher, clock=clock))
    cfg = stream_cfg([video], streamer={"max_in_flight": 3, "resend_timeout_s": HANG_S,
                                        "peer_timeout_s": HANG_S / 2, "loop": True})
    streamer = stage(streamer_service.run, cfg, "streamer")
    slow = ctx.socket(zmq.DEALER)  # a labeler that takes windows and never finishes them
    slow.setsockopt(zmq.LINGER, 0)
    slow.connect(cfg.network.connect(cfg.network.work_port))
    sent = lambda: streamer.metric("reliev3r_windows_sent_total")  # noqa: E731
    resent_total = lambda: streamer.metric("reliev3r_windows_resent_total")  # noqa: E731
    try:
        send(slow, "ready", credits=10)
        got = []
        while len(got) < 3 and (msg := recv(slow, HANG_S)) is not None:
            got.append(msg.meta["window_id"])
        assert len(set(got)) == len(got) == 3
        # No timeout can expire here, so a 4th window would be a new one: the streamer stops at
        # max_in_flight (the gauge is set at the end of the loop turn that sent the 3rd window).
        wait_for(lambda: streamer.metric("reliev3r_windows_in_flight") == 3, HANG_S, "3 windows in flight")
        assert sent() == 3 and resent_total() == 0, "never more than max_in_flight windows in flight"
        send(slow, "done", window_id=got[0], status="stored", reason="")
        send(slow, "ready", credits=10)
        first = recv(slow, HANG_S)
        assert first is not None and first.meta["window_id"] not in got  # one slot freed, one new window
        got.append(first.meta["window_id"])
        wait_for(lambda: sent() == 4 and streamer.runtime.status["acked"] == 1, HANG_S, "4 sent, 1 acked")
        assert streamer.metric("reliev3r_windows_in_flight") == 3 and resent_total() == 0
        slow.close(linger=0)  # the labeler dies holding windows got[1:]
        clock.skew = 2 * HANG_S  # its credits expire and its windows time out, now
        fresh = ctx.socket(zmq.DEALER)
        fresh.setsockopt(zmq.LINGER, 0)
        fresh.connect(cfg.network.connect(cfg.network.work_port))
        send(fresh, "ready", credits=10)
        resent = set()
        deadline = time.monotonic() + HANG_S
        while len(resent) < 3 and time.monotonic() < deadline:
            msg = recv(fresh, 0.5)
            if msg is not None:
                resent.add(msg.meta["window_id"])
            send(fresh, "ready", credits=10)
        assert resent == set(got[1:]), "windows of the dead labeler go to another one"
        # (counted just after the send: the window can arrive before the counter moves)
        wait_for(lambda: resent_total() >= 3, HANG_S, "3 windows counted resent")
        assert streamer.runtime.status["in_flight"] <= 3
        for wid in resent:
            send(fresh, "done", window_id=wid, status="stored", reason="")
        wait_for(lambda: streamer.runtime.status["acked"] == 4, HANG_S, "4 windows acked")
        fresh.close(linger=0)
    finally:
        streamer.stop()


def test_streamer_rejects_malformed_and_keeps_serving(stream_cfg, stage, wait_for, ctx, video):
    cfg = stream_cfg([video])
    streamer = stage(streamer_service.run, cfg, "streamer")
    peer = ctx.socket(zmq.DEALER)
    peer.setsockopt(zmq.LINGER, 0)
    peer.connect(cfg.network.connect(cfg.network.work_port))
    try:
        peer.send_multipart([b"garbage"])
        peer.send_multipart([protocol.MAGIC, b"\xc1not msgpack"])
        peer.send_multipart(protocol.encode(Message("stats", {})))  # a kind the streamer does not take
        send(peer, "ready", credits="lots")
        send(peer, "done", window_id=7, status="stored")

        def rejected():
            return {r: streamer.metric("reliev3r_messages_rejected_total", {"stage": "streamer", "reason": r})
                    for r in ("too_few_frames", "bad_header", "unexpected_kind", "bad_credits", "bad_done")}

        # waits for all five: the one seen first need not be the last one handled
        wait_for(lambda: all(v == 1 for v in rejected().values()), HANG_S, "each bad message rejected once")
        send(peer, "ready", credits=1)
        msg = recv(peer, HANG_S)
        assert msg is not None and msg.kind == "window" and streamer.thread.is_alive()
    finally:
        peer.close(linger=0)
        streamer.stop()


def test_labeler_rejects_malformed_drops_bad_windows_and_retries_inserts(stream_cfg, stage, ctx):
    # The first insert is lost: the labeler retries after 0.4 s. A busy machine may also be slow
    # to acknowledge a later attempt, so there are retries enough for any machine (they bound a
    # hang) and such a retry is answered "duplicate"; the window is still stored exactly once.
    cfg = stream_cfg([], labeler={"insert_timeout_s": 0.4, "insert_retries": 300})
    replay = FakeReplay(ctx, cfg, ignore_first=1)
    work = ctx.socket(zmq.ROUTER)  # a minimal streamer peer
    work.setsockopt(zmq.LINGER, 0)
    work.bind(cfg.network.bind(cfg.network.work_port))
    labeler = stage(labeler_service.run, cfg, "labeler")

    def window(frames, wid):
        v, h, w = frames.shape[:3]
        K = np.tile(np.array([[w, 0, w / 2], [0, w, h / 2], [0, 0, 1]], np.float32), (v, 1, 1))
        return protocol.encode(Message("window", {"window_id": wid, "source": "t", "frame_indices": [0, 2, 4]},
                                       {"frames": frames, "intrinsics": K}))

    try:
        assert work.poll(int(HANG_S * 1000))
        identity, *frames = work.recv_multipart()
        assert (protocol.decode(frames).kind == "ready"
                and protocol.decode(frames).meta["credits"] == cfg.labeler.credits)
        good = panning_frames(3, 128, 96, step=4)
        blank = good.copy()
        blank[2] = 0
        work.send_multipart([identity, b"junk", b"more junk"])
        bad_window = window(good, "x")
        work.send_multipart([identity, *bad_window[:2], b"short", bad_window[3]])  # buffer size does not match
        work.send_multipart([identity, *window(blank, "t:0:0")])
        work.send_multipart([identity, *window(good, "t:0:8")])
        done = {}
        deadline = time.monotonic() + HANG_S
        while len(done) < 2 and time.monotonic() < deadline:
            if work.poll(200):
                _, *frames = work.recv_multipart()
                msg = protocol.decode(frames)
                if msg.kind == "done":
                    done[msg.meta["window_id"]] = (msg.meta["status"], msg.meta["reason"])
        assert done.pop("t:0:8") in {("stored", ""), ("duplicate", "")}
        assert done == {"t:0:0": ("dropped", "blank_frame")}
        assert replay.inserts >= 2 and list(replay.stored) == ["t:0:8"]  # retried, stored once
        assert labeler.metric("reliev3r_messages_rejected_total", {"stage": "labeler", "reason": "bad_magic"}) == 1
        assert labeler.metric("reliev3r_messages_rejected_total", {"stage": "labeler", "reason": "size_mismatch"}) == 1
        assert labeler.metric("reliev3r_labeler_dropped_total", {"reason": "blank_frame"}) == 1
        assert labeler.runtime.status == {"labelled": 1, "dropped": 1} and labeler.thread.is_alive()
    finally:
        labeler.stop()
        work.close(linger=0)
        replay.close()


def test_the_streamer_keeps_series_for_a_bounded_number_of_sources(tmp_path, stream_cfg, stage, ctx, monkeypatch):
    """A folder or a glob names a source per file, and one that receives files for as long as the
    run lives named new sources for ever: each kept its ``decode_frames_total`` and
    ``decode_errors_total`` series on the endpoint for good. The series of the most recent
    ``SOURCE_SERIES`` sources heard of are kept, an older one's removed."""
    from streamer.sources import source_name

    monkeypatch.setattr(streamer_service, "SOURCE_SERIES", 4)
    folder = tmp_path / "incoming"
    folder.mkdir()
    for k in range(3):
        (folder / f"broken{k}.mp4").write_bytes(b"not a video")
    clips = [encode(folder / f"clip{k}.mp4", panning_frames(10, 96, 64, seed=k)) for k in range(5)]
    streamer, _ = _stream_all(stream_cfg([folder]), stage, ctx)
    labelled = {}
    for family in streamer.runtime.metrics.registry.collect():
        for sample in family.samples:
            if "source" in sample.labels:
                labelled.setdefault(sample.name, set()).add(sample.labels["source"])
    heard = set().union(*labelled.values())
    assert len(heard) <= 4, labelled  # 8 before: every file's
    assert streamer.metric("reliev3r_decode_frames_total", {"source": source_name(clips[-1])}) == 10


def _posed_folder(folder, frames: int, *, no_pose: int, no_depth: int | None = None):
    """An image folder of ``frames`` frames, each with its depth map (partly 0: unknown) and
    ``.pose.txt``, but frame ``no_pose`` without its pose file (and ``no_depth`` without its
    depth map)."""
    import cv2

    from streamer_media import texture

    folder.mkdir()
    for k in range(frames):
        stem = folder / f"frame-{k:06d}"
        cv2.imwrite(f"{stem}.color.png", cv2.cvtColor(np.roll(texture(96, 64), 3 * k, axis=1), cv2.COLOR_RGB2BGR))
        depth = np.full((64, 96), 1500, np.uint16)
        depth[:8] = 0
        if k != no_depth:
            cv2.imwrite(f"{stem}.depth.png", depth)
        pose = np.eye(4)
        pose[0, 3] = 0.01 * k
        if k != no_pose:
            np.savetxt(f"{stem}.pose.txt", pose)
    return folder


GATES_OFF = {"views": 2, "height": 64, "width": 96, "frame_stride": 1, "window_step": 2, "keyframe_min_motion": 0,
             "keyframe_min_flow": 0, "blur_ratio": 0, "scene_cut_motion": 0, "scene_cut_hist": 0, "settle_s": 0,
             "loop": False}


def _stream_all(cfg, stage, ctx):
    from helpers_live import Labeler

    streamer = stage(streamer_service.run, cfg, "streamer")
    labeler = Labeler(ctx, cfg)
    deadline = time.monotonic() + HANG_S
    while streamer.rc is None and time.monotonic() < deadline:
        labeler.pump(0.3)
    assert streamer.rc == 0, "streamer did not finish its sources"
    return streamer, [msg for _, msg in labeler.windows]


@pytest.mark.parametrize("loss, teacher, missing, skipped", [
    ("supervised", "none", "pose", True),  # the supervised loss needs depth and pose
    ("supervised", "none", "depth", True),
    ("weak", "oracle", "depth", True),  # the oracle labels from depth: one without it is skipped
    ("weak", "oracle", "pose", False),  # and needs no pose: the window goes, without gt_cam_to_world
])
def test_a_window_without_the_ground_truth_its_training_needs_is_skipped_and_others_flow(
        tmp_path, make_cfg, stage, ctx, loss, teacher, missing, skipped):
    """Where a stage trains on ground truth, a window that lacks the ground truth it needs for a
    view (a frame without its pose file, a ScanNet frame whose tracking was lost, one without its
    depth map) is not sent: a supervised learner would end at the first batch that sampled it.
    It is counted under ``no_ground_truth`` and the source's other windows flow; depth that is
    partly 0 (unknown) is ground truth."""
    from streamer.sources import source_name

    folder = _posed_folder(tmp_path / "scene", 12, no_pose=5 if missing == "pose" else None,
                           no_depth=5 if missing == "depth" else None)
    cfg = make_cfg(streamer={"sources": [str(folder)], **GATES_OFF}, labeler={"teacher": teacher},
                   learner={"loss": {"kind": loss}})
    streamer, windows = _stream_all(cfg, stage, ctx)
    frames = [m.meta["frame_indices"] for m in windows]
    assert sorted(f for fs in frames for f in fs) == [k for k in range(12) if not (skipped and k in (4, 5))]
    lost = {"source": source_name(folder), "reason": "no_ground_truth"}
    assert streamer.metric("reliev3r_decode_errors_total", lost) == (1 if skipped else 0)
    for m in windows:
        assert m.arrays["gt_depth"].shape == (2, 64, 96)
        assert ("gt_cam_to_world" in m.arrays) == (loss == "supervised" or 5 not in m.meta["frame_indices"])
