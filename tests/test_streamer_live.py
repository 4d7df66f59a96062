"""Live feeds against real servers on 127.0.0.1 that the test starts, kills mid-stream and
restarts: FFmpeg MPEG-TS over TCP and UDP, and GStreamer's RTSP server. The streamer runs as
its real ``run`` loop with a minimal labeler peer; windows must keep arriving by themselves."""

from __future__ import annotations

import time

import pytest
import zmq

import streamer.service as streamer_service
from reliev3r.config import free_port
from streamer.live import is_live, live_name, open_options
from streamer_media import (RTSP_SERVER, drop_ts_packets, encode, panning_frames, rotate_mp4, rtsp_server_available,
                            serve_once)
from tests.helpers_live import HANG_S, LIVE, Labeler, Server, kill_restart_and_check, needs_ffmpeg, pump_until


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    # Keyframe every 5 frames: a UDP receiver joins mid-stream and needs one soon.
    return encode(tmp_path_factory.mktemp("live") / "pan.mp4", panning_frames(40, 160, 120, step=3), gop=5)


@needs_ffmpeg
def test_mpegts_over_tcp_server_killed_and_restarted(stream_cfg, stage, clip):
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    server = Server(["ffmpeg", "-nostdin", "-loglevel", "error", "-re", "-stream_loop", "-1", "-i", str(clip),
                     "-c", "copy", "-f", "mpegts", f"{url}?listen=1"])
    kill_restart_and_check(stream_cfg, stage, url, server)


@needs_ffmpeg
def test_mpegts_over_udp_sender_killed_and_restarted(stream_cfg, stage, clip):
    port = free_port()
    url = f"udp://127.0.0.1:{port}"
    server = Server(["ffmpeg", "-nostdin", "-loglevel", "error", "-re", "-stream_loop", "-1", "-i", str(clip),
                     "-c", "copy", "-f", "mpegts", f"{url}?pkt_size=1316"])
    kill_restart_and_check(stream_cfg, stage, url, server)


def test_rtsp_server_killed_and_restarted(stream_cfg, stage):
    why = rtsp_server_available()
    if why:
        pytest.skip(why)
    port = free_port()
    server = Server(["/usr/bin/python3", "-c", RTSP_SERVER, str(port)], ready_line="ready")
    kill_restart_and_check(stream_cfg, stage, f"rtsp://127.0.0.1:{port}/feed", server)


def test_url_that_never_answers_is_counted_and_retried(tmp_path, stream_cfg, stage):
    """Nothing listens: connect failures are counted per source, reconnects back off, the
    streamer stays up (and an archive beside it keeps flowing)."""
    ctx = zmq.Context()
    clip = encode(tmp_path / "a.mp4", panning_frames(30, 96, 64))
    url = f"tcp://127.0.0.1:{free_port()}"
    cfg = stream_cfg([url, clip], streamer={**LIVE, "height": 32, "width": 48, "loop": False})
    streamer = stage(streamer_service.run, cfg, "streamer")
    labeler = Labeler(ctx, cfg)
    try:
        name = live_name(url)
        errors = {"source": name, "reason": "connect_failed"}
        failed = lambda: streamer.metric("reliev3r_decode_errors_total", errors)  # noqa: E731
        assert pump_until(labeler, lambda: failed() >= 3 and len(labeler.windows) >= 5), \
            (failed(), len(labeler.windows))
        # retried; how long it waits in between: test_reconnect_backoff_doubles_up_to_its_cap
        assert streamer.metric("reliev3r_stream_reconnects_total", {"source": name}) >= 2
        assert all(m.meta["source"] != name for _, m in labeler.windows)
        assert streamer.thread.is_alive()
    finally:
        streamer.stop()
        labeler.sock.close(linger=0)
        ctx.destroy(linger=0)


def test_reconnect_backoff_doubles_up_to_its_cap():
    """Nothing listens: each failed connect waits a jittered time drawn up to a bound that
    doubles from backoff_initial_s up to backoff_max_s (checked on the bounds drawn, not on
    the clock: the jitter source answers 0, so the test waits for nothing)."""
    import random
    import threading

    from streamer.live import LiveSource

    stop, bounds, errors = threading.Event(), [], []

    class Jitter(random.Random):
        def uniform(self, a, b):
            bounds.append((a, b))
            if len(bounds) == 6:
                stop.set()
            return 0.0

    src = LiveSource(f"tcp://127.0.0.1:{free_port()}", on_error=lambda s, r, d: errors.append(r), stop=stop,
                     open_timeout_s=30.0, read_timeout_s=30.0, backoff_initial_s=0.2, backoff_max_s=1.0,
                     rng=Jitter())
    assert list(src.frames()) == []  # returns once stop is set, after the 6th failed connect
    assert bounds == [(0, pytest.approx(b)) for b in (0.2, 0.4, 0.8, 1.0, 1.0, 1.0)]
    assert errors == ["connect_failed"] * 6 and src.reconnects == 5


def test_live_spec_parsing():
    assert is_live("rtsp://cam/x") and is_live("udp://0.0.0.0:5000") and is_live("/dev/video0")
    assert not is_live("/data/clip.mp4") and not is_live("/dev/video0.mp4")
    name = live_name("rtsp://user:secret@cam.local:554/stream1")
    assert "secret" not in name and ":" not in name and name == live_name("rtsp://user:secret@cam.local:554/stream1")
    opts, fmt = open_options("rtsp://cam/x", 2.5)
    assert opts["rtsp_transport"] == "tcp" and opts["timeout"] == opts["rw_timeout"] == "2500000" and fmt is None
    assert open_options("/dev/video2", 1.0) == ({}, "v4l2")


def read_feed(data: bytes, wait_for, http: bool = False) -> tuple[list, list[str], object]:
    """(frames, reasons reported, source) of a live feed that sends ``data`` to one connection,
    then is gone (a server in this test): over TCP, or as an HTTP server (``data`` its response)."""
    import threading

    from streamer.live import LiveSource

    url = serve_once(data, http=http)  # one connection gets the whole feed, then the server is gone
    errors, frames, stop = [], [], threading.Event()
    # open/read/stall timeouts bound a hang only: the feed is all there, then the server closes (EOF)
    src = LiveSource(url, on_error=lambda s, r, d: errors.append(r), stop=stop,
                     open_timeout_s=HANG_S, read_timeout_s=HANG_S, stall_timeout_s=HANG_S, queue_frames=64,
                     backoff_initial_s=0.5, backoff_max_s=0.5)

    def consume():
        for frame in src.frames():
            frames.append(frame)

    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()
    try:
        wait_for(lambda: ("feed_ended" in errors or "read_failed" in errors) and not src._queue, HANG_S,
                 "the feed's end, every frame consumed")
    finally:
        stop.set()
        consumer.join(60)  # bounds a hang only: it returns within a 0.1 s wait once stop is set
    return frames, errors, src


def test_lost_packets_in_a_live_feed_never_reach_a_window(tmp_path, wait_for):
    """An MPEG-TS feed over TCP (a server in this test) that lost transport packets: nothing
    raises, the decoder conceals what it lost until the next keyframe. Those frames are dropped,
    the loss is counted, and the first frame after it starts a new window."""
    import numpy as np

    from streamer.config import StreamerConfig
    from streamer.sources import VideoSource
    from streamer.windows import windows_of

    truth = panning_frames(40, 128, 96)
    clean = encode(tmp_path / "clean.ts", truth, gop=10)

    def likeness(frame):  # mean absolute difference to the closest true frame
        return min(float(np.abs(frame.rgb.astype(int) - t).mean()) for t in truth)

    limit = 1.3 * max(likeness(f) for f in VideoSource(clean).frames())
    frames, errors, src = read_feed(drop_ts_packets(clean, tmp_path / "lossy.ts").read_bytes(), wait_for)
    assert "corrupt_packet" in errors and 10 <= len(frames) < 40, (errors, len(frames))
    assert all(likeness(f) < limit for f in frames), [round(likeness(f), 1) for f in frames]
    assert any(f.discontinuity for f in frames[1:])
    cfg = StreamerConfig(views=2, height=16, width=16, frame_stride=1, window_step=1, keyframe_min_motion=0,
                         keyframe_min_flow=0, blur_ratio=0, scene_cut_motion=0, scene_cut_hist=0)
    marked = {f.index for f in frames if f.discontinuity}
    windows = [[v.index for v in w.views] for w in windows_of(src.name, iter(frames), cfg)]
    assert windows and not any(i in marked for w in windows for i in w[1:]), (windows, marked)


def test_live_frames_are_converted_only_when_looked_at_as_a_video_files_are(tmp_path, wait_for):
    """The reader thread queues decoded frames: a frame's glance is made from its planes when
    a test asks, its RGB only when it becomes a view; both are a video file's, to the bit."""
    import numpy as np

    from streamer.sources import VideoSource

    clip = encode(tmp_path / "clean.ts", panning_frames(12, 128, 96), gop=4)
    frames, errors, _ = read_feed(clip.read_bytes(), wait_for)
    assert len(frames) == 12 and all(callable(f._rgb) and callable(f._glance) for f in frames), errors
    for live, archived in zip(frames, VideoSource(clip).frames()):
        np.testing.assert_array_equal(live.glance.grey, archived.glance.grey)
        np.testing.assert_array_equal(live.glance.colour, archived.glance.colour)
        np.testing.assert_array_equal(live.rgb, archived.rgb)


def test_a_phones_feed_is_turned_upright_by_its_display_matrix_as_its_recording_is(tmp_path, wait_for):
    """Fragmented MP4 from a phone held upright (landscape pixels, a rotation of -90 degrees, as
    phones stream and record): a live feed's frames, glances and intrinsics are upright, the same
    as the recording read as an archive (before, a live feed's were on their side)."""
    import av
    import numpy as np

    from streamer.sources import VideoSource

    recorded = encode(tmp_path / "recorded.mp4", panning_frames(12, 128, 96), gop=4)
    fragmented = tmp_path / "feed.mp4"
    with av.open(str(recorded)) as src, av.open(str(fragmented), "w", options={
            "movflags": "frag_keyframe+empty_moov"}) as out:  # what a phone streams: the header first
        stream = out.add_stream_from_template(src.streams.video[0])
        for packet in src.demux(src.streams.video[0]):
            if packet.dts is not None:
                packet.stream = stream
                out.mux(packet)
    feed = rotate_mp4(fragmented)
    frames, errors, _ = read_feed(feed.read_bytes(), wait_for)
    archived = list(VideoSource(feed).frames())
    assert len(frames) == len(archived) == 12, errors
    for live, recording in zip(frames, archived):
        assert live.rgb.shape == (128, 96, 3)  # upright: taller than wide
        np.testing.assert_array_equal(live.rgb, recording.rgb)
        np.testing.assert_array_equal(live.glance.grey, recording.glance.grey)
        assert (live.intrinsics[0, 2], live.intrinsics[1, 2]) == (47.5, 63.5)  # the upright picture's centre


def test_an_ip_cameras_mjpeg_feed_is_decoded_only_where_looked_at(wait_for, monkeypatch):
    """Motion JPEG over HTTP (multipart, as IP cameras serve it): each frame is decoded by the
    consumer when a test looks at it (``IntraDecoder``, on a codec context of the feed's own),
    after the camera has closed the connection too; frames never looked at are never decoded, and
    a part whose JPEG was lost is named once looked at, and is a gap (``FrameLost``)."""
    import cv2
    import numpy as np

    from streamer.config import StreamerConfig
    from streamer.sources import FrameLost, IntraDecoder
    from streamer.windows import windows_of

    decoded = []
    decode = IntraDecoder.decode
    monkeypatch.setattr(IntraDecoder, "decode", lambda self, p, i: decoded.append(i) or decode(self, p, i))
    truth = np.repeat(panning_frames(40, 128, 96, step=1).mean(axis=-1, keepdims=True).astype(np.uint8), 3, axis=-1)
    parts = [b"HTTP/1.0 200 OK\r\nContent-Type: multipart/x-mixed-replace;boundary=frame\r\n\r\n"]
    for i, rgb in enumerate(truth):
        jpeg = cv2.imencode(".jpg", rgb[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()
        if i == 30:  # a part whose JPEG was lost on the way
            jpeg = bytes(len(jpeg))
        parts.append(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(jpeg) + jpeg + b"\r\n")
    frames, errors, src = read_feed(b"".join(parts), wait_for, http=True)
    assert len(frames) == 40 and decoded == [], errors  # the first decoded by the reader, the rest not yet
    cfg = StreamerConfig(views=3, height=48, width=64, frame_stride=4, window_step=4, loop=False)
    windows = list(windows_of(src.name, iter(frames), cfg))
    assert windows and 0 < len(decoded) < 25, decoded  # of 39
    for view in windows[0].views:
        assert np.abs(frames[view.index].rgb.astype(int) - truth[view.index]).mean() < 3  # JPEG's loss
    assert "corrupt_packet" not in errors or 30 in decoded  # named only once looked at
    with pytest.raises(FrameLost):
        frames[30].glance
    assert errors.count("corrupt_packet") == 1


def test_a_dropped_frame_passes_its_discontinuity_on():
    """The consumer fell behind and the frame that marked a gap was dropped: the gap is still
    there, so the next frame in the queue carries the mark."""
    import numpy as np

    from streamer.live import LiveSource

    src = LiveSource("tcp://127.0.0.1:9", queue_frames=2)
    rgb = np.zeros((16, 16, 3), np.uint8)
    for damaged in (False, True, False, False):  # the 3rd and 4th push drop the 1st and 2nd frames
        src._push(rgb, (16, 16), 0, damaged=damaged)
    assert [(f.index, f.discontinuity) for f in src._queue] == [(2, True), (3, False)]
