"""An adversarial corpus through the streamer's real run loop: good clips in many containers,
codecs, pixel formats and shapes, mixed with every kind of bad or odd source made here in
tmp_path. The pass must finish, every bad source must be counted
(``reliev3r_decode_errors_total{source, reason}``) and logged with its named reason, and every
good clip must reach a labeler as windows."""

from __future__ import annotations

import logging
import os
import time
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
import zmq

import streamer.service as streamer_service
from reliev3r import protocol
from reliev3r.protocol import Message
from streamer.sources import source_name
from streamer_media import damage_mdat, encode, panning_frames, rotate_mp4

FRAMES = 12
GATES_OFF = {"views": 2, "height": 16, "width": 16, "frame_stride": 2, "window_step": 4, "keyframe_min_flow": 0,
             "blur_ratio": 0, "scene_cut_motion": 0, "scene_cut_hist": 0}
"""Tiny windows; only the cheap still-camera gate (``keyframe_min_motion``) stays on."""


def _close(container, stream, path: Path) -> Path:
    """Flush ``stream``'s encoder into ``container`` and close it."""
    container.mux(stream.encode())
    container.close()
    return path


def write_video(path: Path, frames: np.ndarray, *, codec: str = "libx264", pix_fmt: str = "yuv420p",
                pts_ms: list[int] | None = None) -> Path:
    """``frames`` [N, H, W, 3] RGB; ``pts_ms``: presentation times (variable frame rate)."""
    container = av.open(str(path), "w")
    stream = container.add_stream(codec, rate=10)
    stream.height, stream.width = frames.shape[1:3]
    stream.pix_fmt = pix_fmt
    if pts_ms is not None:
        stream.codec_context.time_base = Fraction(1, 1000)
    for i, rgb in enumerate(frames):
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
        if pts_ms is not None:
            frame.pts, frame.time_base = pts_ms[i], Fraction(1, 1000)
        container.mux(stream.encode(frame))
    return _close(container, stream, path)


def write_audio_only(path: Path) -> Path:
    container = av.open(str(path), "w")
    stream = container.add_stream("aac", rate=16000)
    for i in range(8):
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate, frame.pts = 16000, i * 1024
        container.mux(stream.encode(frame))
    return _close(container, stream, path)


def image_folder(folder: Path, frames: np.ndarray, ext: str, *, truncate: int | None = None) -> Path:
    folder.mkdir()
    for i, rgb in enumerate(frames):
        data = cv2.imencode(ext, np.ascontiguousarray(rgb[..., ::-1]))[1].tobytes()
        (folder / f"frame-{i:03d}{ext}").write_bytes(data[: len(data) // 2] if i == truncate else data)
    return folder


def build_corpus(root: Path) -> tuple[list[str], dict[str, set[str]], set[str]]:
    """(specs, expected reasons by source name, source names that must yield windows)."""
    def pan(w=32, h=24, n=FRAMES, step=3, seed=0):
        return panning_frames(n, w, h, step=step, seed=seed)

    specs: list[str] = []
    bad: dict[str, set[str]] = {}
    good: set[str] = set()

    def add(spec, *, reasons=(), name=None, windows=False):
        specs.append(str(spec))
        name = name or source_name(Path(spec))
        if reasons:
            bad[name] = set(reasons)
        if windows:
            good.add(name)

    # ---- good clips: containers, codecs, pixel formats, shapes, names
    add(encode(root / "plain.mp4", pan()), windows=True)
    add(encode(root / "ça va — clip ü.mp4", pan(seed=1)), windows=True)
    add(encode(root / "clip [1080p].mp4", pan(seed=2)), windows=True)
    add(write_video(root / "odd 33x17.mp4", pan(33, 17, seed=3), pix_fmt="yuv444p"), windows=True)
    add(encode(root / "wide.mp4", pan(4000, 16, step=300, seed=4)), windows=True)
    add(encode(root / "matroska.mkv", pan(seed=5)), windows=True)
    add(write_video(root / "vp9.webm", pan(seed=6), codec="libvpx-vp9"), windows=True)
    add(write_video(root / "mpeg4.avi", pan(seed=7), codec="mpeg4"), windows=True)
    add(write_video(root / "prores10.mov", pan(seed=8), codec="prores_ks", pix_fmt="yuv422p10le"), windows=True)
    add(write_video(root / "grey.mkv", pan(seed=9), codec="ffv1", pix_fmt="gray"), windows=True)
    add(write_video(root / "yuv444p10.mp4", pan(seed=10), pix_fmt="yuv444p10le"), windows=True)
    add(write_video(root / "vfr.mkv", pan(seed=11), pts_ms=list(np.cumsum([0] + [20, 150, 40, 300] * 3)[:FRAMES])),
        windows=True)
    add(rotate_mp4(encode(root / "portrait.mp4", pan(seed=12))), windows=True)
    add(image_folder(root / "png-seq", pan(seed=13), ".png"), windows=True)
    clips = root / "clips"
    clips.mkdir()
    for k in range(2):
        encode(clips / f"c{k}.mp4", pan(seed=20 + k))
        good.add(source_name(clips / f"c{k}.mp4"))
    add(clips / "*.mp4")  # a glob matching two clips

    # ---- bad, each with the reason it must be reported under
    (root / "zero.mp4").write_bytes(b"")
    add(root / "zero.mp4", reasons={"empty_file"})
    whole = encode(root / "whole.mp4", pan(seed=30)).read_bytes()
    (root / "cut.mp4").write_bytes(whole[: len(whole) // 2])  # its index (moov) was never written
    add(root / "cut.mp4", reasons={"open_failed"})
    (root / "garbage.mp4").write_bytes(np.random.default_rng(1).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    add(root / "garbage.mp4", reasons={"open_failed"})
    (root / "notes.avi").write_text("these are not frames\n" * 40)
    add(root / "notes.avi", reasons={"open_failed"})
    add(write_audio_only(root / "song.mp4"), reasons={"no_video_stream"})
    add(encode(root / "one frame.mp4", pan(n=1, seed=31)), reasons={"too_short"})
    add(encode(root / "two frames.mp4", pan(n=2, seed=32)), reasons={"too_short"})
    add(write_video(root / "1x1.mp4", pan(1, 1, seed=33), pix_fmt="yuv444p"), reasons={"too_small"})
    still = np.repeat(pan(n=1, seed=34), FRAMES, axis=0)
    add(encode(root / "still.mp4", still), reasons={"no_windows"})  # a camera that never moves
    add(damage_mdat(encode(root / "damaged.mp4", pan(n=40, w=64, h=48, seed=35), gop=10)),
        reasons={"corrupt_packet", "skipped_to_keyframe"}, windows=True)  # frames away from the damage are kept
    add(image_folder(root / "jpeg-seq", pan(seed=36), ".jpg", truncate=5), reasons={"truncated_image"}, windows=True)
    (root / "empty").mkdir()
    add(root / "empty", reasons={"empty_folder"})
    (root / "folder.mp4").mkdir()  # a folder where a file was meant
    add(root / "folder.mp4", reasons={"empty_folder"})
    (root / "docs").mkdir()
    (root / "docs" / "readme.txt").write_text("no media here\n")
    add(root / "docs", reasons={"no_frames"})
    (root / "loop.mp4").symlink_to(root / "loop.mp4")
    add(root / "loop.mp4", reasons={"symlink_loop"})
    (root / "ping").symlink_to(root / "pong")
    (root / "pong").symlink_to(root / "ping")
    add(root / "ping" / "clip.mp4", reasons={"symlink_loop"})  # a loop on the way to the file
    (root / "dangling.mp4").symlink_to(root / "deleted.mp4")
    add(root / "dangling.mp4", reasons={"dangling_symlink"})
    os.mkfifo(root / "pipe.mp4")  # opening it for reading would block for ever
    add(root / "pipe.mp4", reasons={"not_a_file"})
    add(root / "nothing-*.mp4", reasons={"missing"})  # a glob that matches nothing
    add(root / "never-made.mp4", reasons={"missing"})
    add(root / "plain.mp4" / "inside.mp4", reasons={"missing"})  # a file used as a folder
    add(root / ("x" * 300 + ".mp4"), reasons={"bad_path"})  # longer than a file name may be
    add(str(root / "nul") + "\0.mp4", reasons={"bad_path"})
    add("~no-such-user-r3/clip.mp4", reasons={"bad_path"})
    add("ftp://example.invalid/clip.mp4", reasons={"unsupported_url"}, name="ftp://example.invalid/clip.mp4")
    mixed = root / "mixed"  # a folder of videos: one good, one looping link, one folder named like a video
    mixed.mkdir()
    encode(mixed / "fine.mp4", pan(seed=37))
    good.add(source_name(mixed / "fine.mp4"))
    (mixed / "self.mkv").symlink_to(mixed / "self.mkv")
    bad[source_name(mixed / "self.mkv")] = {"symlink_loop"}
    (mixed / "album.mov").mkdir()
    bad[source_name(mixed / "album.mov")] = {"not_a_file"}
    add(mixed)
    locked = root / "locked"
    locked.mkdir()
    encode(locked / "hidden.mp4", pan(seed=38))
    locked.chmod(0)
    if not os.access(locked, os.R_OK):  # as root, permissions do not apply: leave the case out
        add(locked, reasons={"permission_denied"})
    return specs, bad, good


def test_adversarial_corpus_one_pass(stream_cfg, stage, tmp_path, ctx, caplog):
    root = tmp_path / "corpus"
    root.mkdir()
    specs, bad, good = build_corpus(root)
    assert len(specs) >= 40 and len(bad) >= 25 and len(good) >= 15
    cfg = stream_cfg(specs, streamer={**GATES_OFF, "max_in_flight": 64})
    caplog.set_level(logging.WARNING, logger="reliev3r")
    streamer = stage(streamer_service.run, cfg, "streamer")
    labeler = ctx.socket(zmq.DEALER)  # takes every window and reports it stored
    labeler.setsockopt(zmq.LINGER, 0)
    labeler.connect(cfg.network.connect(cfg.network.work_port))
    windows: dict[str, list[str]] = {}
    try:
        deadline = time.monotonic() + 300  # bounds a hang only
        while streamer.thread.is_alive() and time.monotonic() < deadline:
            labeler.send_multipart(protocol.encode(Message("ready", {"credits": 16})))
            while labeler.poll(50):
                msg = protocol.decode(labeler.recv_multipart())
                windows.setdefault(msg.meta["source"], []).append(msg.meta["window_id"])
                labeler.send_multipart(protocol.encode(Message("done", {
                    "window_id": msg.meta["window_id"], "status": "stored", "reason": ""})))
        assert not streamer.thread.is_alive(), "the pass over the corpus did not finish"
        assert streamer.rc == 0
    finally:
        labeler.close(linger=0)
        streamer.stop()
        (root / "locked").chmod(0o755)

    logged: dict[str, set[str]] = {}
    for record in caplog.records:
        if getattr(record, "reason", None) and getattr(record, "source", None):
            logged.setdefault(record.source, set()).add(record.reason)
            assert record.detail, record.__dict__  # every report says what and where
    for name, reasons in bad.items():
        for reason in reasons:
            counted = streamer.metric("reliev3r_decode_errors_total", {"source": name, "reason": reason})
            assert counted >= 1, f"{name}: {reason} not counted (logged: {logged.get(name)})"
        assert reasons <= logged.get(name, set()), (name, reasons, logged.get(name))
    assert "producer_failed" not in {r for rs in logged.values() for r in rs}
    for name in good:
        assert windows.get(name), f"{name}: no windows (reported: {logged.get(name)})"
        if name not in bad:
            assert name not in logged, (name, logged[name])  # a good clip is not reported
    assert not set(windows) - good, set(windows) - good  # nothing else made windows
    assert streamer.runtime.status["acked"] == sum(len(v) for v in windows.values())


def test_symlink_loop_beside_a_live_feed_does_not_stop_the_archives(stream_cfg, stage, wait_for, tmp_path, ctx):
    """The report that started issue 22: one symlink loop among the sources killed the
    producer, and with a live feed in the list the streamer then idled for ever."""
    from reliev3r.config import free_port
    from streamer.live import live_name

    good = encode(tmp_path / "good.mp4", panning_frames(FRAMES, 32, 24))
    (tmp_path / "loop.mp4").symlink_to(tmp_path / "loop.mp4")
    url = f"tcp://127.0.0.1:{free_port()}"  # nothing listens: the feed retries in the background
    cfg = stream_cfg([tmp_path / "loop.mp4", url, good], streamer={
        **GATES_OFF, "live_open_timeout_s": 0.5, "reconnect_initial_s": 0.2, "reconnect_max_s": 0.5})
    streamer = stage(streamer_service.run, cfg, "streamer")
    labeler = ctx.socket(zmq.DEALER)
    labeler.setsockopt(zmq.LINGER, 0)
    labeler.connect(cfg.network.connect(cfg.network.work_port))
    sources = []
    try:
        deadline = time.monotonic() + 120  # bounds a hang only
        while len(sources) < 3 and time.monotonic() < deadline:
            labeler.send_multipart(protocol.encode(Message("ready", {"credits": 4})))
            if labeler.poll(100):
                msg = protocol.decode(labeler.recv_multipart())
                sources.append(msg.meta["source"])
                labeler.send_multipart(protocol.encode(Message("done", {
                    "window_id": msg.meta["window_id"], "status": "stored", "reason": ""})))
        assert sources and set(sources) == {source_name(good)}, sources
        assert streamer.metric("reliev3r_decode_errors_total",
                               {"source": source_name(tmp_path / "loop.mp4"), "reason": "symlink_loop"}) >= 1
        assert streamer.metric("reliev3r_decode_errors_total",
                               {"source": "streamer", "reason": "producer_failed"}) == 0
        # the feed's own thread: its first failed connect may come after the clip's windows
        wait_for(lambda: streamer.metric("reliev3r_decode_errors_total",
                                         {"source": live_name(url), "reason": "connect_failed"}) >= 1,
                 120, "the live feed's first failed connect")  # bounds a hang only
        assert streamer.thread.is_alive()
    finally:
        labeler.close(linger=0)
        streamer.stop()
