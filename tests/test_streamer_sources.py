"""Streamer sources and windows on real files: shared clips, 7-Scenes frames with ground
truth, videos encoded here, and every kind of broken input."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from streamer.config import StreamerConfig
from streamer.sources import (ImageSequenceSource, VideoSource, discover, read_intrinsics, source_name)
from streamer.windows import WindowBuilder, resize_view, windows_of
from streamer_media import (SHARED, damage_mdat, drop_ts_packets, encode, encode_stamped, join_ts, panning_frames,
                            rotate_mp4)

VIDEOS = SHARED / "videos"
KITCHEN = SHARED / "7scenes-redkitchen"
needs_videos = pytest.mark.skipif(not VIDEOS.is_dir(), reason=f"shared videos absent ({VIDEOS})")
needs_kitchen = pytest.mark.skipif(not KITCHEN.is_dir(), reason=f"7-Scenes frames absent ({KITCHEN})")


class Errors(list):
    def __call__(self, source, reason, detail):
        self.append((source, reason, detail))

    def reasons(self):
        return [r for _, r, _ in self]


def take(source, n=None):
    out = []
    for frame in source.frames():
        out.append(frame)
        if n is not None and len(out) >= n:
            break
    return out


# ----------------------------------------------------------------------------- real files

@needs_videos
@pytest.mark.parametrize("name, size, count", [("tree.avi", (240, 320), 68), ("Megamind.avi", (528, 720), None),
                                               ("nasa_13013.mp4", (180, 320), None)])
def test_shared_videos_decode(name, size, count):
    errors = Errors()
    frames = take(VideoSource(VIDEOS / name, on_error=errors), n=None if count else 12)
    assert frames and frames[0].rgb.shape == (*size, 3) and frames[0].rgb.dtype == np.uint8
    assert [f.index for f in frames] == list(range(len(frames)))
    assert all(b.timestamp > a.timestamp for a, b in zip(frames, frames[1:]))
    if count:
        assert len(frames) == count
    K = frames[0].intrinsics  # no metadata: assumed 60 degree horizontal FoV, centred
    assert K[0, 2] == pytest.approx((size[1] - 1) / 2) and K[0, 0] == pytest.approx(size[1] / 2 / np.tan(np.pi / 6))


def test_encoded_video_roundtrip(tmp_path):
    truth = panning_frames(20, 96, 64)
    path = encode(tmp_path / "pan.mp4", truth)
    errors = Errors()
    frames = take(VideoSource(path, on_error=errors))
    assert len(frames) == 20 and not errors
    # lossy codec: close to the truth, not equal
    assert np.abs(frames[5].rgb.astype(int) - truth[5]).mean() < 8
    src = VideoSource(path)
    resumed = list(src.frames(start=15))
    assert [f.index for f in resumed] == list(range(15, 20)) and src.position == 20


def test_source_name_stable_and_unique(tmp_path):
    a, b = tmp_path / "x" / "clip.mp4", tmp_path / "y" / "clip.mp4"
    assert source_name(a) == source_name(a) and source_name(a) != source_name(b)
    assert source_name(a).startswith("clip-")


@needs_kitchen
def test_image_sequence_with_intrinsics_and_gt():
    errors = Errors()
    src = ImageSequenceSource(KITCHEN, on_error=errors)
    frames = take(src, 3)
    assert not errors and len(frames) == 3
    f = frames[0]
    assert f.rgb.shape == (480, 640, 3)
    np.testing.assert_allclose(f.intrinsics, [[585, 0, 320], [0, 585, 240], [0, 0, 1]])
    assert f.gt_depth.dtype == np.float32 and f.gt_depth.shape == (480, 640)
    valid = f.gt_depth[f.gt_depth > 0]
    assert 0.5 < np.median(valid) < 4.0  # metres, not millimetres
    np.testing.assert_allclose(f.gt_cam_to_world[:3, :3] @ f.gt_cam_to_world[:3, :3].T, np.eye(3), atol=1e-3)
    assert src.files[0].name == "frame-000000.color.jpg" and all(".depth." not in p.name for p in src.files)


def test_intrinsics_file_formats(tmp_path):
    (tmp_path / "a.txt").write_text("500 0 320\n0 510 240\n0 0 1\n")
    (tmp_path / "b.txt").write_text("500 510 320 240\n")
    (tmp_path / "c.txt").write_text("hello\n")
    np.testing.assert_allclose(read_intrinsics(tmp_path / "a.txt"), read_intrinsics(tmp_path / "b.txt"))
    with pytest.raises(Exception, match="bad_intrinsics"):
        read_intrinsics(tmp_path / "c.txt")
    (tmp_path / "d.txt").write_text("500 0 320\n0 510 240\n0 0 0\n")  # every window of it refused on the wire
    with pytest.raises(Exception, match="last row must be 0 0 1"):
        read_intrinsics(tmp_path / "d.txt")


def test_a_raw_h264_stream_is_stamped_from_zero_at_its_rate(tmp_path):
    """A raw H.264 stream (a camera's or an encoder's elementary stream: no container, no
    stamps): its frames are stamped by the rate from 0, as a container would stamp them (the
    first was stamped one frame late)."""
    import av

    clip = encode(tmp_path / "raw.h264", panning_frames(12, 64, 48))
    with av.open(str(clip)) as c:
        rate = float(c.streams.video[0].average_rate or 25)
    stamps = [f.timestamp for f in take(VideoSource(clip))]
    assert len(stamps) == 12 and stamps == pytest.approx([i / rate for i in range(12)])


def test_a_duplicated_stamp_is_reported_and_later_frames_keep_their_own(tmp_path):
    """A broken mux that gives a frame the stamp of the frame before (twice running, later on):
    each such frame is reported as ``duplicate_stamp`` and timed between its neighbours, and
    every frame after keeps the time its stamp gives (before, the duplicate was timed a whole
    frame after the one before, and every later frame, its stamp no later than that, a frame
    late: the whole rest of the video drifted). No frame is lost."""
    stamps = [0, 1, 2, 2, 3, 4, 5, 6, 6, 6, 7, 8, 9, 10, 11]
    clip = encode_stamped(tmp_path / "dup.mkv", panning_frames(len(stamps), 64, 48), stamps)
    errors = Errors()
    frames = take(VideoSource(clip, on_error=errors))
    assert [f.index for f in frames] == list(range(len(stamps)))
    times = [f.timestamp for f in frames]
    assert all(b > a for a, b in zip(times, times[1:]))
    duplicates = [3, 8, 9]
    for i, (t, stamp) in enumerate(zip(times, stamps)):
        if i in duplicates:  # after the stamp it repeats, before the next frame's
            assert stamp / 10 < t < (stamp + 1) / 10
        else:
            assert t == pytest.approx(stamp / 10), (i, times)
    assert errors.reasons() == ["duplicate_stamp"] * 3
    assert [f"frame {i}" in detail for i, (_, _, detail) in zip(duplicates, errors)] == [True] * 3


@pytest.mark.parametrize("counters", [False, True])
def test_recordings_joined_end_to_end_keep_their_frame_spacing_from_the_start(tmp_path, counters):
    """Two MPEG-TS recordings joined end to end (``cat``; a camera's or a DVR's segments): the
    second one's stamps start again. Its frames follow the first's, one frame period after the
    last, spaced as their own stamps say; the reset is reported once as ``stamps_reset`` and
    the next frame kept carries ``discontinuity`` (no window spans two recordings). Before,
    every frame of the second was timed within one period of the first's last (halfway each
    time, as a stamp out of order). Times count from the start of the source (the stream of
    an MPEG-TS file starts at 0.2 s of its own stamps here): the first frame is at 0. Joined by
    ``cat``, the demuxer also flags the join (continuity counters) and frames before it are
    dropped as damage; with the counters carried on, every frame is kept and nothing else said."""
    fps = 10
    first = encode(tmp_path / "a.ts", panning_frames(30, 64, 48), fps=fps, gop=5)
    second = encode(tmp_path / "b.ts", panning_frames(30, 64, 48, seed=1), fps=fps, gop=5)
    joined = join_ts(first, second, tmp_path / "joined.ts", counters=counters)
    errors = Errors()
    frames = take(VideoSource(joined, on_error=errors))
    assert frames[-1].index == 59 and len(frames) >= (60 if counters else 50)  # cat: the join's damage dropped
    assert frames[0].index == 0 and frames[0].timestamp == pytest.approx(0.0)
    for a, b in zip(frames, frames[1:]):  # every frame, across the join too, its index's period after the first
        assert b.timestamp - a.timestamp == pytest.approx((b.index - a.index) / fps, abs=1e-3), (a.index, b.index)
    resets = [detail for _, reason, detail in errors if reason == "stamps_reset"]
    assert len(resets) == 1 and "frame 30" in resets[0], errors
    assert next(f for f in frames if f.index >= 30).discontinuity
    if counters:
        assert errors.reasons() == ["stamps_reset"] and [f.index for f in frames if f.discontinuity] == [30]


def test_a_folder_of_videos_with_a_preview_image_reads_every_video(tmp_path):
    """A folder of recordings with a preview picture beside them: each video is a source of
    its own, and the picture an image sequence, which says it is too short for a window (before,
    the folder was read as that one picture and the videos were never named)."""
    import logging

    import cv2

    from streamer.config import StreamerConfig
    from streamer.service import window_stream

    encode(tmp_path / "walk1.mp4", panning_frames(30, 160, 120))
    encode(tmp_path / "walk2.mp4", panning_frames(30, 160, 120, seed=1))
    cv2.imwrite(str(tmp_path / "preview.jpg"), panning_frames(1, 160, 120)[0])
    errors = Errors()
    sources = discover([str(tmp_path)], on_error=errors)
    assert sorted(type(s).__name__ for s in sources) == ["ImageSequenceSource", "VideoSource", "VideoSource"]
    cfg = StreamerConfig(sources=[str(tmp_path)], views=3, height=32, width=48, frame_stride=2, window_step=4,
                         loop=False, keyframe_min_flow=0)
    windows = list(window_stream(lambda: discover(cfg.sources, on_error=errors), cfg, on_frame=lambda s: None,
                                 on_error=errors, log=logging.getLogger("t")))
    assert {w.source for w in windows} == {source_name(tmp_path / "walk1.mp4"), source_name(tmp_path / "walk2.mp4")}
    assert errors.reasons() == ["too_short"] and errors[0][0] == source_name(tmp_path)


def test_image_names_in_natural_order_whatever_their_digits(tmp_path):
    """Frames sort by the numbers in their names (frame2 before frame10); a name with a digit
    that is not a decimal one (a superscript) sorts too, instead of failing the folder."""
    from reliev3r.imaging import frame_files

    for name in ("frame10.png", "frame2.png", "frame1.png", "room1²2.png", "frame١١.png"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in frame_files(tmp_path)] == ["frame1.png", "frame2.png", "frame10.png", "frame١١.png",
                                                       "room1²2.png"]


def test_the_streamer_reconstruct_and_eval_take_the_same_frames_of_a_folder(tmp_path):
    """One list of a folder's frames everywhere (``reliev3r.imaging.frame_files``): the streamer
    read .bmp and .webp frames nowhere, and the ``._frame.png`` files macOS leaves on other disks
    as frames (each one unreadable), while eval and reconstruct passed those over; eval and
    reconstruct read a TUM RGB-D folder's ``rgb/``, the streamer found no frames in it."""
    import cv2

    from evaluation.datasets import folder_sequence
    from reliev3r.reconstruct import open_input

    flat = tmp_path / "flat"
    flat.mkdir()
    for name in ("2.png", "10.jpg", "3.bmp", "1.webp", "._2.png", "2.depth.png"):
        cv2.imwrite(str(flat / name), np.full((24, 32, 3), 128, np.uint8))
    (flat / "notes.txt").write_text("x")
    tum = tmp_path / "tum"
    (tum / "rgb").mkdir(parents=True)
    (tum / "depth").mkdir()
    for name in ("1305031102.211214.png", "1305031102.175304.png"):
        cv2.imwrite(str(tum / "rgb" / name), np.full((24, 32, 3), 128, np.uint8))
        cv2.imwrite(str(tum / "depth" / name), np.full((24, 32), 5000, np.uint16))
    (tum / "groundtruth.txt").write_text("# timestamp tx ty tz qx qy qz qw\n1305031102.1753 0 0 0 0 0 0 1\n"
                                         "1305031102.2112 0.1 0 0 0 0 0 1\n")
    for folder, names in ((flat, ["1.webp", "2.png", "3.bmp", "10.jpg"]),
                          (tum, ["1305031102.175304.png", "1305031102.211214.png"])):
        assert [p.name for p in ImageSequenceSource(folder, on_error=Errors()).files] == names
        assert folder_sequence(folder).length == len(names)
        assert open_input(folder, stride=1, max_frames=100).total == len(names)
    errors = Errors()
    sources = discover([str(tum)], on_error=errors)
    assert len(sources) == 1 and not errors and len(list(sources[0].frames())) == 2


def test_intrinsics_of_frames_before_they_were_resized_are_named_not_used(tmp_path):
    """A 640x480 camera's camera-intrinsics.txt beside its frames downsampled to 32x24 put the
    principal point at the frames' corner and the focal length 20x too long, silently, in the
    streamer, eval and reconstruct alike: the streamer reports ``intrinsics_mismatch`` and
    gives the frames its field of view (as a folder without the file), eval skips the windows
    saying why, reconstruct stops naming the file."""
    import cv2

    from evaluation.datasets import load_windows
    from reliev3r.reconstruct import open_input
    from streamer.sources import fov_intrinsics

    for i in range(6):
        cv2.imwrite(str(tmp_path / f"frame-{i:06d}.color.png"), np.full((24, 32, 3), 20 * i, np.uint8))
    (tmp_path / "camera-intrinsics.txt").write_text("585 0 319.5\n0 585 239.5\n0 0 1\n")
    errors = Errors()
    frames = list(ImageSequenceSource(tmp_path, on_error=errors, fov_deg=60).frames())
    assert len(frames) == 6 and set(errors.reasons()) == {"intrinsics_mismatch"}
    assert "camera-intrinsics.txt" in errors[0][2]
    np.testing.assert_allclose(frames[0].intrinsics, fov_intrinsics(60, 32, 24))
    with pytest.raises(ValueError, match="camera-intrinsics.txt"):
        load_windows(f"folder:{tmp_path}", views=2, height=24, width=32, windows=2, stride=1, run_dir=tmp_path)
    with pytest.raises(ValueError, match="camera-intrinsics.txt"):
        open_input(tmp_path, stride=1, max_frames=10)
    (tmp_path / "camera-intrinsics.txt").write_text("29 0 15.5\n0 29 11.5\n0 0 1\n")  # the frames' own: used
    errors = Errors()
    frames = list(ImageSequenceSource(tmp_path, on_error=errors).frames())
    assert not errors and frames[0].intrinsics[0, 2] == 15.5


def _odd_sized_folder(folder: Path, names: str, odd: int, *, frames: int = 6) -> None:
    """``frames`` frames 64x48 named ``names`` (a format of the index), the ``odd``-th resized to
    48x36 (4:3 kept: its principal point still passes ``intrinsics_mismatch``)."""
    import cv2

    folder.mkdir()
    for i, rgb in enumerate(panning_frames(frames, 64, 48, step=4)):
        bgr = np.ascontiguousarray(rgb[..., ::-1])
        cv2.imwrite(str(folder / names.format(i)), cv2.resize(bgr, (48, 36)) if i == odd else bgr)


@pytest.mark.parametrize("names, intrinsics", [("frame-{:06d}.color.png", True), ("frame-{:06d}.color.png", False),
                                               ("{:04d}.png", True)])
def test_a_frame_of_another_size_than_the_folders_first_is_reported_and_skipped(tmp_path, names, intrinsics):
    """An image folder's one intrinsics matrix (its camera-intrinsics.txt, or 7-Scenes' published
    one at the first frame's size) served a frame of another size (resized or cropped by an
    editor) taken at its own size, unsaid where its principal point still passed
    ``intrinsics_mismatch``: wrong intrinsics, silently. It is reported as ``size_mismatch``
    naming the frame, its size and the first frame's, and skipped as a frame that cannot be read
    is (the next frame carries ``discontinuity``: no window spans the hole); the other frames,
    and the other sources, flow with the folder's intrinsics."""
    from reliev3r import imaging

    seq = tmp_path / "seq"
    _odd_sized_folder(seq, names, odd=3)
    if intrinsics:
        (seq / "camera-intrinsics.txt").write_text("50 0 31.5\n0 50 23.5\n0 0 1\n")
    expected = (np.array([[50.0, 0, 31.5], [0, 50, 23.5], [0, 0, 1]]) if intrinsics
                else imaging.published_intrinsics(imaging.frame_files(seq))(0, 64, 48))
    other = tmp_path / "other"
    _odd_sized_folder(other, "{:04d}.png", odd=-1, frames=4)
    errors = Errors()
    sources = discover([str(seq), str(other)], on_error=errors)
    frames = take(sources[0])
    assert [f.index for f in frames] == [0, 1, 2, 4, 5]
    assert [f.discontinuity for f in frames] == [False, False, False, True, False]
    for f in frames:
        np.testing.assert_allclose(f.intrinsics, expected)
    assert errors.reasons() == ["size_mismatch"], errors
    (_, _, detail), = errors
    said = str(seq / "camera-intrinsics.txt") if intrinsics else imaging.PUBLISHED
    assert detail == (f"{seq / names.format(3)}: 48x36, unlike {names.format(0)}'s 64x48, so the folder's one "
                      f"intrinsics matrix ({said}) cannot serve both"), detail
    assert len(take(sources[1])) == 4 and len(errors) == 1
    resumed = list(sources[0].frames(start=2))  # a resumed pass knows the first frame's size all the same
    assert [f.index for f in resumed] == [2, 4, 5] and errors.reasons() == ["size_mismatch"] * 2
    windows = _stream([str(seq)], StreamerConfig(**{**FAST, "window_step": 1}), errors)
    assert windows and all(v.index != 3 for w in windows for v in w.views)
    assert all(max(v.index for v in w.views) < 3 or min(v.index for v in w.views) > 3 for w in windows)


def test_frames_of_one_size_turned_by_their_exif_orientation_are_not_of_another_size(tmp_path):
    """The size compared is the frame's as recorded: a frame its Exif orientation turns a quarter
    (shown 48x64) is of the first frame's size, its intrinsics turned with it, not reported."""
    import cv2

    from streamer_media import exif_tagged

    ok, data = cv2.imencode(".jpg", np.ascontiguousarray(panning_frames(1, 64, 48)[0][..., ::-1]))
    for k, tag in enumerate((1, 6, 1)):
        (tmp_path / f"frame-{k:06d}.color.jpg").write_bytes(exif_tagged(data.tobytes(), tag))
    (tmp_path / "camera-intrinsics.txt").write_text("50 0 31.5\n0 50 23.5\n0 0 1\n")
    errors = Errors()
    frames = take(ImageSequenceSource(tmp_path, on_error=errors))
    assert not errors and [f.rgb.shape[:2] for f in frames] == [(48, 64), (64, 48), (48, 64)]


# ----------------------------------------------------------------------------- bad inputs

def _bad_files(tmp_path: Path) -> dict[str, Path]:
    good = encode(tmp_path / "good.mkv", panning_frames(40, 64, 48))
    data = good.read_bytes()
    (tmp_path / "zero.mp4").write_bytes(b"")
    (tmp_path / "text.mp4").write_text("this is not a video\n" * 20)
    (tmp_path / "half.mkv").write_bytes(data[: len(data) // 2])
    corrupt = bytearray(data)
    mid = len(corrupt) // 2
    corrupt[mid:mid + 1500] = np.random.default_rng(0).integers(0, 256, 1500, dtype=np.uint8).tobytes()
    (tmp_path / "corrupt.mkv").write_bytes(bytes(corrupt))
    return {"good": good, "zero": tmp_path / "zero.mp4", "text": tmp_path / "text.mp4",
            "half": tmp_path / "half.mkv", "corrupt": tmp_path / "corrupt.mkv", "missing": tmp_path / "nope.mp4"}


def test_bad_inputs_reported_and_others_flow(tmp_path):
    files = _bad_files(tmp_path)
    errors = Errors()
    specs = [str(files[k]) for k in ("zero", "text", "half", "corrupt", "missing", "good")]
    sources = discover(specs, on_error=errors)
    assert len(sources) == 5  # the missing path never becomes a source
    counts = {s.path.name: len(take(s)) for s in sources}
    by_source = {}
    for name, reason, detail in errors:
        by_source.setdefault(name, []).append(reason)
        assert detail  # every problem says what and where
    assert by_source[source_name(files["missing"])] == ["missing"]
    assert by_source[source_name(files["zero"])] == ["empty_file"]
    assert by_source[source_name(files["text"])] == ["open_failed"]
    assert counts["zero.mp4"] == counts["text.mp4"] == 0
    # frames before the cut or corruption are used, and the problem is reported
    assert 5 <= counts["half.mkv"] < 40 and by_source[source_name(files["half"])]
    assert 5 <= counts["corrupt.mkv"] < 40 and by_source[source_name(files["corrupt"])]
    assert counts["good.mkv"] == 40 and source_name(files["good"]) not in by_source


def test_truncated_mp4_and_garbage_middle_mp4(tmp_path):
    good = encode(tmp_path / "good.mp4", panning_frames(30, 64, 48))
    data = good.read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 2])  # index (moov) at the end: unreadable
    errors = Errors()
    assert take(VideoSource(tmp_path / "cut.mp4", on_error=errors)) == []
    assert errors.reasons() == ["open_failed"]
    assert len(take(VideoSource(good))) == 30


@pytest.mark.parametrize("ext, codec", [("mkv", "libx264"), ("webm", "libvpx-vp9")])
def test_a_matroska_file_cut_short_says_it_ended_early(tmp_path, ext, codec):
    """Matroska and WebM end cleanly where the file was cut (a copy or a download that
    stopped): the frames before the cut flow, and the source says the stream ended before the
    header's duration; the whole file says nothing."""
    whole = encode(tmp_path / f"whole.{ext}", panning_frames(60, 160, 120), codec=codec)
    data = whole.read_bytes()
    (tmp_path / f"cut.{ext}").write_bytes(data[: len(data) // 2])
    errors = Errors()
    assert len(take(VideoSource(whole, on_error=errors))) == 60 and errors == []
    assert 5 <= len(take(VideoSource(tmp_path / f"cut.{ext}", on_error=errors))) < 50
    assert errors.reasons() == ["ended_early"] and "of 6.00s" in errors[0][2], errors


@pytest.mark.parametrize("ext", ["mp4", "mkv"])
def test_a_video_whose_sound_runs_on_past_its_picture_is_complete(tmp_path, ext):
    """A recording whose audio track runs 3 s past its last frame (the container's duration is
    the audio's): every frame decodes and nothing is reported; the video's own end is what counts."""
    clip = encode(tmp_path / f"clip.{ext}", panning_frames(30, 160, 120), audio_s=6.0)
    errors = Errors()
    assert len(take(VideoSource(clip, on_error=errors))) == 30
    assert errors == []


def test_the_video_a_player_shows_is_read_where_a_thumbnail_track_comes_first(tmp_path):
    """A Matroska file whose first video track is one picture (a thumbnail, as some cameras and
    editors write) and whose second is the recording: its frames are the recording's, as a
    player shows it (before, the thumbnail alone was read: one frame, then too_short)."""
    import av
    import cv2

    truth = panning_frames(30, 160, 120)
    path = tmp_path / "thumbnail_first.mkv"
    with av.open(str(path), "w") as out:
        thumb = out.add_stream("mjpeg", rate=1)
        thumb.width = thumb.height = 300
        thumb.pix_fmt = "yuvj420p"
        video = out.add_stream("libx264", rate=10, options={"threads": "2"})
        video.width, video.height, video.pix_fmt = 160, 120, "yuv420p"
        picture = av.Packet(cv2.imencode(".jpg", np.full((300, 300, 3), 200, np.uint8))[1].tobytes())
        picture.stream, picture.pts, picture.dts, picture.is_keyframe = thumb, 0, 0, True
        out.mux(picture)
        for rgb in truth:
            out.mux(video.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        out.mux(video.encode())
    errors = Errors()
    frames = take(VideoSource(path, on_error=errors))
    assert len(frames) == 30 and errors == []
    with av.open(str(path)) as played:
        recording = [f.to_ndarray(format="rgb24") for f in played.decode(video=1)]
    assert all(np.array_equal(f.rgb, rgb) for f, rgb in zip(frames, recording))


@needs_videos
def test_streamer_metrics_count_errors_per_source(tmp_path):
    """Through the service's window stream: errors counted per source, good sources flow."""
    from monitoring.metrics import Metrics
    from streamer.service import window_stream
    import logging

    files = _bad_files(tmp_path)
    metrics = Metrics("streamer")
    errs = metrics.counter("decode_errors_total", "", ["source", "reason"])
    frames_total = metrics.counter("decode_frames_total", "", ["source"])
    # tree.avi is a still camera watching a waving tree: the camera-motion gate would (rightly)
    # keep nothing, so it is off here; this test is about counting errors.
    cfg = StreamerConfig(sources=[str(files["text"]), str(files["missing"]), str(VIDEOS / "tree.avi")],
                         loop=False, views=3, frame_stride=2, window_step=4, keyframe_min_flow=0)
    windows = list(window_stream(lambda: discover(cfg.sources, on_error=lambda s, r, d: errs.labels(s, r).inc()),
                                 cfg, on_frame=lambda s: frames_total.labels(s).inc(),
                                 on_error=lambda s, r, d: errs.labels(s, r).inc(), log=logging.getLogger("t")))
    value = metrics.registry.get_sample_value
    assert value("reliev3r_decode_errors_total", {"source": source_name(files["text"]), "reason": "open_failed"}) == 1
    assert value("reliev3r_decode_errors_total", {"source": source_name(files["missing"]), "reason": "missing"}) == 1
    assert value("reliev3r_decode_frames_total", {"source": source_name(VIDEOS / "tree.avi")}) == 68
    assert len(windows) >= 10 and all(w.source == source_name(VIDEOS / "tree.avi") for w in windows)


# ----------------------------------------------------------------------------- windows

def test_window_grouping_and_ids(tmp_path):
    path = encode(tmp_path / "pan.mp4", panning_frames(40, 96, 64))
    cfg = StreamerConfig(views=3, height=32, width=32, frame_stride=4, window_step=8, loop=False)
    src = VideoSource(path)
    windows = list(windows_of(src.name, src.frames(), cfg, pass_index=2))
    assert [[v.index for v in w.views] for w in windows][:3] == [[0, 4, 8], [8, 12, 16], [16, 20, 24]]
    assert windows[1].window_id == f"{src.name}:2:8"
    msg = windows[0].to_message()
    assert msg.arrays["frames"].shape == (3, 32, 32, 3) and msg.arrays["intrinsics"].dtype == np.float32
    assert msg.meta["frame_indices"] == [0, 4, 8] and "gt_depth" not in msg.arrays


def test_motion_gate_skips_still_frames_and_cuts():
    still = np.full((20, 48, 64, 3), 0, np.uint8)
    still[:] = panning_frames(1, 64, 48)[0]
    moving = (panning_frames(20, 64, 48, step=4, seed=3) * 0.3).astype(np.uint8)  # another, darker scene
    frames = [SimpleNamespace(index=i, timestamp=i, rgb=img, intrinsics=np.eye(3), gt_depth=None, gt_cam_to_world=None)
              for i, img in enumerate(np.concatenate([still, moving]))]
    builder = WindowBuilder("s", views=2, height=24, width=32, frame_stride=1, window_step=1,
                            min_motion=0.5, scene_cut=50.0)
    windows = [w for f in frames for w in builder.push(f)]
    firsts = [w.views[0].index for w in windows]
    assert builder.skipped_still >= 18  # the still camera adds no views
    assert builder.cuts == 1 and firsts and min(firsts) >= 20  # no window spans the cut
    assert len(windows) == 19  # every moving frame is a view


def test_window_step_beyond_a_window_and_its_next_view_is_honoured():
    """window_step 12 with 2 views 4 frames apart: the next window starts 12 frames after the
    previous one's first frame (its views kept before that were made into windows 8 frames on);
    after a scene cut the next window starts at the cut, nearer than that."""
    scenes = [panning_frames(26, 64, 48, step=4, seed=3), panning_frames(14, 64, 48, step=4, seed=4) // 4]
    frames = [SimpleNamespace(index=i, timestamp=i, rgb=img, intrinsics=np.eye(3), gt_depth=None, gt_cam_to_world=None)
              for i, img in enumerate(np.concatenate(scenes))]
    builder = WindowBuilder("s", views=2, height=24, width=32, frame_stride=4, window_step=12, min_motion=0.5,
                            scene_cut=50.0)
    windows = [[v.index for v in w.views] for f in frames for w in builder.push(f)]
    assert builder.cuts == 1
    assert windows == [[0, 4], [12, 16], [26, 30]]  # 24 is 12 after 12, but the cut at 26 drops it


def test_two_windows_completed_by_one_frame_are_both_made():
    """2 views a frame apart, window_step 9: after the window at 27 frames 29-31 and 33-35 are
    not looked at (the next candidate is 36), and frame 36 differs from 32, so 33-35 are looked
    at then: cuts at 33 and 35 make windows (33, 34) and, with frame 36, (35, 36), both within
    that one frame's push."""
    a = panning_frames(33, 64, 48, step=4, seed=3)
    b = panning_frames(2, 64, 48, step=4, seed=4) // 4
    c = 255 - panning_frames(16, 64, 48, step=4, seed=5) // 4
    frames = [SimpleNamespace(index=i, timestamp=i, rgb=img, intrinsics=np.eye(3), gt_depth=None, gt_cam_to_world=None)
              for i, img in enumerate(np.concatenate([a, b, c]))]
    cfg = StreamerConfig(views=2, height=24, width=32, frame_stride=1, window_step=9, keyframe_min_motion=0.5,
                         keyframe_min_flow=0.0, blur_ratio=0.0, scene_cut_motion=50.0, scene_cut_hist=0.0)
    windows = [[v.index for v in w.views] for w in windows_of("s", frames, cfg)]
    assert windows == [[0, 1], [9, 10], [18, 19], [27, 28], [33, 34], [35, 36], [44, 45]]


def test_intrinsics_scaling_exact_known_answer():
    """A 3D point projects, in the resized and cropped image, exactly where the full-res pixel
    maps under (x + 0.5) * s - 0.5 - crop."""
    import torch
    from reliev3r import geometry

    from reliev3r import imaging

    K = np.array([[585.0, 0, 320], [0, 585.0, 240], [0, 0, 1]])
    src_w, src_h, rw, rh, left, top = 640, 480, 128, 96, 16, 0
    frame = SimpleNamespace(index=0, timestamp=0.0, rgb=np.zeros((src_h, src_w, 3), np.uint8), intrinsics=K,
                            gt_depth=np.ones((src_h // 2, src_w // 2), np.float32), gt_cam_to_world=None)
    view = resize_view(frame, 96, 96)  # the streamer's path: reliev3r.imaging
    K2 = view.intrinsics
    assert view.rgb.shape == (96, 96, 3) and view.gt_depth.shape == (96, 96)  # half-res depth lands on the grid
    np.testing.assert_allclose(K2, imaging.fit_intrinsics(K, src_h, src_w, 96, 96), atol=1e-4)
    Kt = geometry.crop_intrinsics(geometry.resize_intrinsics(torch.tensor(K), rw / src_w, rh / src_h), left, top)
    np.testing.assert_allclose(K2, Kt.numpy(), atol=1e-4)  # float32 on the wire
    pts = np.array([[0.3, -0.2, 2.0], [-1.0, 0.5, 3.0], [0.0, 0.0, 1.0]])
    full = (pts @ K.T)[:, :2] / pts[:, 2:]
    small = (pts @ K2.T)[:, :2] / pts[:, 2:]
    np.testing.assert_allclose(small, (full + 0.5) * [rw / src_w, rh / src_h] - 0.5 - [left, top], atol=1e-4)


@needs_kitchen
def test_window_gt_projection_consistent_after_resize():
    """Unproject view 0 with its resized GT depth and window intrinsics, move to view 1 with GT
    poses, project with view 1's intrinsics: the depth there agrees with view 1's GT depth."""
    src = ImageSequenceSource(KITCHEN)
    frames = [f for f in take(src, 13)][::12]  # frames 0 and 12
    views = [resize_view(f, 96, 96) for f in frames]  # 640x480 -> 128x96 then 16 px cropped each side

    def agreement(K0, K1):
        d0 = views[0].gt_depth
        ys, xs = np.nonzero(d0 > 0)
        z = d0[ys, xs]
        cam0 = np.stack([(xs - K0[0, 2]) / K0[0, 0] * z, (ys - K0[1, 2]) / K0[1, 1] * z, z], 1)
        T = np.linalg.inv(views[1].gt_cam_to_world) @ views[0].gt_cam_to_world
        cam1 = cam0 @ T[:3, :3].T + T[:3, 3]
        uv = cam1[:, :2] / cam1[:, 2:] * [K1[0, 0], K1[1, 1]] + [K1[0, 2], K1[1, 2]]
        u, v = np.round(uv).astype(int).T
        inside = (u >= 0) & (u < 96) & (v >= 0) & (v < 96) & (cam1[:, 2] > 0)
        d1 = views[1].gt_depth[v[inside], u[inside]]
        ok = d1 > 0
        rel = np.abs(d1[ok] - cam1[inside, 2][ok]) / d1[ok]
        grey = [view.rgb.astype(np.float32).mean(-1) for view in views]
        photometric = np.abs(grey[1][v[inside], u[inside]] - grey[0][ys[inside], xs[inside]])
        return float(np.mean(rel < 0.03)), int(ok.sum()), float(np.median(photometric))

    good, n, photo_good = agreement(views[0].intrinsics, views[1].intrinsics)
    assert n > 3000 and good > 0.8
    # Known-bad contrast: view 1's principal point off by 3 px (e.g. a crop forgotten at a
    # smaller scale): colours no longer agree.
    bad_K = views[1].intrinsics.copy()
    bad_K[0, 2] += 3
    _, _, photo_bad = agreement(views[0].intrinsics, bad_K)
    assert photo_good < 0.6 * photo_bad, (photo_good, photo_bad)


def test_synthetic_default_source_carries_exact_gt(tmp_path):
    """Empty ``sources``: the synthetic world. Its exact GT survives resize + crop: view 0
    carried into view 1 through window intrinsics, GT depth and poses lands on equal depth."""
    from reliev3r.config import PipelineConfig, build
    from streamer.sources import synthetic_sources

    cfg = build(PipelineConfig, {"run": {"dir": str(tmp_path)}, "streamer": {
        "synthetic": {"scenes": 1, "frames": 10, "height": 48, "width": 64},
        "views": 2, "height": 32, "width": 32, "frame_stride": 3, "window_step": 4,
        "keyframe_min_flow": 0}})  # frames 3 and 6 exactly: this test is about the GT, not keyframes
    sources = synthetic_sources(cfg.run_dir, cfg.streamer.synthetic)
    assert len(sources) == 1 and sources[0].gt is not None
    # (frames 0 and 3 of this fast 10-frame path overlap too little for the count below)
    window = next(windows_of(sources[0].name, sources[0].frames(start=3), cfg.streamer))
    msg = window.to_message()
    assert msg.meta["frame_indices"] == [3, 6]
    assert msg.arrays["gt_depth"].shape == (2, 32, 32) and msg.arrays["gt_cam_to_world"].shape == (2, 4, 4)
    K, depth, pose = msg.arrays["intrinsics"].astype(np.float64), msg.arrays["gt_depth"], msg.arrays["gt_cam_to_world"]
    ys, xs = np.nonzero(depth[0] > 0)
    z = depth[0][ys, xs]
    cam0 = np.stack([(xs - K[0, 0, 2]) / K[0, 0, 0] * z, (ys - K[0, 1, 2]) / K[0, 1, 1] * z, z], 1)
    T = np.linalg.inv(pose[1].astype(np.float64)) @ pose[0]
    cam1 = cam0 @ T[:3, :3].T + T[:3, 3]
    u = np.round(cam1[:, 0] / cam1[:, 2] * K[1, 0, 0] + K[1, 0, 2]).astype(int)
    v = np.round(cam1[:, 1] / cam1[:, 2] * K[1, 1, 1] + K[1, 1, 2]).astype(int)
    inside = (u >= 0) & (u < 32) & (v >= 0) & (v < 32)
    rel = np.abs(depth[1][v[inside], u[inside]] - cam1[inside, 2]) / cam1[inside, 2]
    assert inside.sum() > 300 and np.mean(rel < 0.05) > 0.95
    # read without ground truth (no stage trains on it): the same window and intrinsics, no depth or poses
    bare = synthetic_sources(cfg.run_dir, cfg.streamer.synthetic, ground_truth=False)[0]
    plain = next(windows_of(bare.name, bare.frames(start=3), cfg.streamer)).to_message()
    assert not {"gt_depth", "gt_cam_to_world"} & set(plain.arrays)
    assert np.array_equal(plain.arrays["frames"], msg.arrays["frames"])
    assert np.array_equal(plain.arrays["intrinsics"], msg.arrays["intrinsics"])


# ----------------------------------------------------------------------------- keyframes

BIKES_CUTS = [30, 76, 137, 187, 242]
"""First frames of bikes.mp4's shots, found by the HS-histogram jump below (each >= 0.42
Bhattacharyya, the next largest in the clip 0.14)."""


@needs_videos
def test_no_window_spans_a_scene_cut_in_bikes():
    import cv2

    from streamer.windows import builder_for, colour_histogram

    src = VideoSource(VIDEOS / "bikes.mp4")
    frames = take(src)
    hists = [colour_histogram(f.rgb) for f in frames]
    jumps = [cv2.compareHist(a, b, cv2.HISTCMP_BHATTACHARYYA) for a, b in zip(hists, hists[1:])]
    found = [i + 1 for i, d in enumerate(jumps) if d > 0.3]
    assert found == BIKES_CUTS and sorted(jumps)[-6] < 0.2  # the cuts stand far above everything else
    builder = builder_for(src.name, StreamerConfig(views=3, frame_stride=2, window_step=4,
                                                   keyframe_min_flow=0, keyframe_min_motion=0))
    windows = [w for f in frames for w in builder.push(f)]
    assert builder.cuts == len(BIKES_CUTS) and len(windows) >= 20
    for w in windows:
        first, last = w.views[0].index, w.views[-1].index
        assert not any(first < cut <= last for cut in BIKES_CUTS), (first, last)


@needs_videos
def test_still_camera_does_not_flood():
    """nasa_13013.mp4 holds the camera still: no windows at all. box.mp4 is near-still for
    its first 70 frames while objects move: the camera-motion gate keeps about half the
    windows that grey-level differences alone would let through (measured: 27 vs 53)."""
    def rate(name, **gates):
        cfg = StreamerConfig(views=4, frame_stride=4, window_step=8, **gates)
        src = VideoSource(VIDEOS / name)
        frames = take(src)
        return [w.views[0].index for w in windows_of(src.name, iter(frames), cfg)]

    assert rate("nasa_13013.mp4") == []
    gated, ungated = rate("box.mp4"), rate("box.mp4", keyframe_min_flow=0, blur_ratio=0)
    assert len(gated) <= 0.6 * len(ungated) and min(gated) == 0 and gated[1] >= 60


def _homography_frames(n, *, rotate: bool, step: float):
    """A textured scene seen by a camera that either turns in place (a pure homography: no
    parallax) or slides sideways past two depth layers (near layer moves 3x the far one)."""
    import cv2

    far = panning_frames(1, 400, 240, seed=1)[0]
    near = panning_frames(1, 400, 240, seed=2)[0]
    out = []
    for i in range(n):
        if rotate:
            M = np.float32([[1, 0, -i * step], [0, 1, 0]])
            out.append(cv2.warpAffine(far, M, (160, 120)))
        else:
            img = cv2.warpAffine(far, np.float32([[1, 0, -i * step], [0, 1, 0]]), (160, 120))
            fg = cv2.warpAffine(near, np.float32([[1, 0, -i * step * 3], [0, 1, 0]]), (160, 120))
            img[40:80] = fg[40:80]  # a band of near scene: moves 3x faster (parallax)
            out.append(img)
    return [SimpleNamespace(index=i, timestamp=i, rgb=f, intrinsics=np.eye(3), gt_depth=None, gt_cam_to_world=None)
            for i, f in enumerate(out)]


def test_parallax_preferred_over_rotation():
    """Same flow of the far scene: with parallax every candidate is a view; a pure rotation
    waits for keyframe_rotation_flow of motion, so its views are farther apart."""
    cfg = StreamerConfig(views=2, frame_stride=1, window_step=1, keyframe_min_flow=1.0,
                         keyframe_min_parallax=0.4, keyframe_rotation_flow=12.0)
    from streamer.windows import builder_for

    kept = {}
    for rotate in (False, True):
        builder = builder_for("s", cfg)
        windows = [w for f in _homography_frames(40, rotate=rotate, step=2.0) for w in builder.push(f)]
        kept[rotate] = [w.views[0].index for w in windows]
        if rotate:
            assert builder.skipped_rotation > 20
    gaps = {k: np.diff(v).mean() for k, v in kept.items()}
    assert gaps[False] <= 2 and gaps[True] >= 5  # 2 px/frame: rotation waits ~6 frames for 12 px


def test_blurred_candidates_skipped():
    import cv2

    frames = panning_frames(30, 160, 120, step=4)
    blurred = {7, 8, 15}
    for i in blurred:
        frames[i] = cv2.GaussianBlur(frames[i], (0, 0), 4)
    builder = WindowBuilder("s", views=2, height=24, width=32, frame_stride=1, window_step=1, blur_ratio=0.35)
    views = set()
    for i, img in enumerate(frames):
        for w in builder.push(SimpleNamespace(index=i, timestamp=i, rgb=img, intrinsics=np.eye(3), gt_depth=None,
                                              gt_cam_to_world=None)):
            views.update(v.index for v in w.views)
    assert builder.skipped_blur == 3 and not views & blurred and len(views) == 27


# ----------------------------------------------------------------------------- issue 22: odd paths, hidden damage

def _stream(specs, cfg, errors):
    """Windows through the service's window stream (what the streamer process runs)."""
    import logging

    from streamer.service import window_stream

    return list(window_stream(lambda: discover(specs, on_error=errors), cfg, on_frame=lambda s: None,
                              on_error=errors, log=logging.getLogger("t")))


FAST = dict(views=2, height=16, width=16, frame_stride=1, window_step=2, loop=False, keyframe_min_motion=0,
            keyframe_min_flow=0, blur_ratio=0, scene_cut_motion=0, scene_cut_hist=0,
            settle_s=0)  # the files are written whole before they are read (tests/test_streamer_arrivals.py)


def test_symlink_loop_and_dangling_link_are_named_and_others_flow(tmp_path):
    good = encode(tmp_path / "good.mp4", panning_frames(12, 32, 24))
    (tmp_path / "loop.mp4").symlink_to(tmp_path / "loop.mp4")
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    (tmp_path / "gone.mp4").symlink_to(tmp_path / "nowhere.mp4")
    folder = tmp_path / "folder"  # a folder of videos with a looping entry beside a good one
    folder.mkdir()
    encode(folder / "ok.mp4", panning_frames(12, 32, 24, seed=1))
    (folder / "self.mkv").symlink_to(folder / "self.mkv")
    errors = Errors()
    specs = [str(tmp_path / "loop.mp4"), str(tmp_path / "a" / "clip.mp4"), str(tmp_path / "gone.mp4"),
             str(folder), str(good)]
    windows = _stream(specs, StreamerConfig(**FAST), errors)
    reasons = {(s, r) for s, r, _ in errors}
    assert (source_name(tmp_path / "loop.mp4"), "symlink_loop") in reasons
    assert (source_name(tmp_path / "a" / "clip.mp4"), "symlink_loop") in reasons
    assert (source_name(tmp_path / "gone.mp4"), "dangling_symlink") in reasons
    assert (source_name(folder / "self.mkv"), "symlink_loop") in reasons
    assert len(errors) == 4 and all(d for _, _, d in errors)
    assert {w.source for w in windows} == {source_name(good), source_name(folder / "ok.mp4")}


def test_unreadable_folder_is_named_and_others_flow(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    encode(locked / "inside.mp4", panning_frames(12, 32, 24))
    locked.chmod(0)
    try:
        if os.access(locked, os.R_OK):
            pytest.skip("permissions do not apply here (running as root)")
        good = encode(tmp_path / "good.mp4", panning_frames(12, 32, 24))
        errors = Errors()
        windows = _stream([str(locked), str(tmp_path / "*" / "*.mp4"), str(good)], StreamerConfig(**FAST), errors)
        assert errors.reasons() == ["permission_denied"] and errors[0][0] == source_name(locked)
        assert {w.source for w in windows} == {source_name(good)}
    finally:
        locked.chmod(0o755)


def test_existing_name_with_brackets_wins_over_glob(tmp_path):
    clip = encode(tmp_path / "clip [1080p].mp4", panning_frames(12, 32, 24))
    folder = tmp_path / "[2024] trip"
    folder.mkdir()
    inner = encode(folder / "day 1.mp4", panning_frames(12, 32, 24, seed=1))
    errors = Errors()
    sources = discover([str(clip), str(folder / "*.mp4"), str(tmp_path / "*.mp4")], on_error=errors)
    # the literal file; the bracketed folder taken literally under a glob; a glob that matches the
    # file (streamed once: the glob's match is reported as a duplicate)
    assert [s.path for s in sources] == [clip, inner]
    assert errors.reasons() == ["duplicate_source"]


def _bytes_named(folder: Path, name: bytes) -> Path:
    """``folder / name`` for a name of raw bytes (not valid UTF-8: Python spells it with
    surrogates); skip where the filesystem refuses such a name (macOS APFS, some mounts)."""
    raw = os.path.join(os.fsencode(folder), name)
    try:
        open(raw, "wb").close()
    except OSError as err:
        pytest.skip(f"this filesystem refuses a file name that is not valid UTF-8 ({err})")
    os.unlink(raw)
    return Path(os.fsdecode(raw))


def test_a_file_name_that_is_not_utf8_costs_no_other_source(tmp_path):
    """A video whose name is not valid UTF-8 (bytes from another locale) beside a good one,
    under a glob and in a folder: both stream, and every window id (sent on the wire) is valid
    UTF-8. Naming the bad file raised UnicodeEncodeError, again in the error handler, which
    lost every source of the glob or folder."""
    from reliev3r import protocol

    good = encode(tmp_path / "good.mp4", panning_frames(12, 32, 24))
    bad = _bytes_named(tmp_path, b"bad\xff.mp4")
    bad.write_bytes(encode(tmp_path / "other.mp4", panning_frames(12, 32, 24, seed=1)).read_bytes())
    (tmp_path / "other.mp4").unlink()
    name = source_name(bad)
    assert name.encode("utf-8") and name != source_name(good)
    for spec in (str(tmp_path / "*.mp4"), str(tmp_path)):
        errors = Errors()
        windows = _stream([spec], StreamerConfig(**FAST), errors)
        assert not errors, spec
        assert {w.source for w in windows} == {source_name(good), name}, spec
        for w in windows:
            w.window_id.encode("utf-8")
            protocol.decode(protocol.encode(protocol.Message("done", {"window_id": w.window_id, "status": "stored",
                                                                      "reason": ""})))


def test_an_image_folder_whose_name_is_not_utf8_reads_its_depth_maps(tmp_path):
    """An image folder whose name is not valid UTF-8, with depth maps beside its frames: its
    frames carry their depth. OpenCV's imread crashed the process (a segmentation fault) on
    a path spelled with surrogates; the depth map is read as bytes and decoded."""
    import cv2

    folder = _bytes_named(tmp_path, b"scan\xfe")
    folder.mkdir()
    depth = np.full((24, 32), 1500, np.uint16)
    for k, rgb in enumerate(panning_frames(3, 32, 24)):
        (folder / f"frame-{k:06d}.color.png").write_bytes(cv2.imencode(".png", rgb[..., ::-1])[1].tobytes())
        (folder / f"frame-{k:06d}.depth.png").write_bytes(cv2.imencode(".png", depth)[1].tobytes())
    errors = Errors()
    frames = list(ImageSequenceSource(folder, on_error=errors).frames())
    assert not errors and len(frames) == 3
    for frame in frames:
        np.testing.assert_allclose(frame.gt_depth, 1.5)


def test_the_same_file_through_two_specs_or_a_link_is_streamed_once(tmp_path):
    """Specs that overlap (a file and a glob over its folder) and links (to a video, to an image
    folder) reach the same frames more than once: each is one source, named after the file
    the links point to, and every further path to it is reported once as ``duplicate_source``
    naming both specs. Before, a file listed twice was streamed twice under the same name
    (every window decoded, sent and labelled twice), and through a link under the link's name
    (the same frames under other window ids, which replay's dedup by id cannot catch)."""
    import cv2
    from collections import Counter

    clip = encode(tmp_path / "clip.mp4", panning_frames(12, 32, 24))
    (tmp_path / "link.mp4").symlink_to(clip)
    images = tmp_path / "scan"
    images.mkdir()
    for k, rgb in enumerate(panning_frames(12, 32, 24, seed=1)):
        (images / f"{k:03d}.png").write_bytes(cv2.imencode(".png", rgb[..., ::-1])[1].tobytes())
    (tmp_path / "scan-link").symlink_to(images)
    assert source_name(tmp_path / "link.mp4") == source_name(clip)
    assert source_name(tmp_path / "scan-link") == source_name(images)
    specs = [str(clip), str(tmp_path / "*.mp4"), str(images), str(tmp_path / "scan-link"), str(clip)]
    errors = Errors()
    assert [s.path for s in discover(specs, on_error=errors)] == [clip, images]
    assert errors.reasons() == ["duplicate_source"] * 4
    assert [name for name, _, _ in errors] == [source_name(clip)] * 2 + [source_name(images), source_name(clip)]
    pairs = [(specs[0], specs[1])] * 2 + [(specs[2], specs[3]), (specs[0], specs[4])]
    for (_, _, detail), (first, again) in zip(errors, pairs):
        assert first in detail and again in detail, detail
    errors = Errors()
    windows = _stream(specs, StreamerConfig(**FAST), errors)
    ids = Counter(w.window_id for w in windows)
    assert windows and set(ids.values()) == {1}
    assert {w.source for w in windows} == {source_name(clip), source_name(images)}


def _jpeg_folder(folder: Path, n: int, bad: int) -> None:
    import cv2

    folder.mkdir()
    for i, rgb in enumerate(panning_frames(n, 64, 48, step=4)):
        ok, data = cv2.imencode(".jpg", np.ascontiguousarray(rgb[..., ::-1]))
        data = data.tobytes()
        (folder / f"frame-{i:03d}.jpg").write_bytes(data[: len(data) * 2 // 3] if i == bad else data)


def test_truncated_jpeg_rejected_and_no_window_spans_it(tmp_path):
    _jpeg_folder(tmp_path / "seq", 10, bad=4)
    errors = Errors()
    src = ImageSequenceSource(tmp_path / "seq", on_error=errors)
    frames = take(src)
    assert [f.index for f in frames] == [0, 1, 2, 3, 5, 6, 7, 8, 9]
    assert errors.reasons() == ["truncated_image"] and "frame-004.jpg" in errors[0][2]
    assert [f.discontinuity for f in frames].index(True) == 4  # frame 5: the first after the gap
    cfg = StreamerConfig(**{**FAST, "window_step": 1})
    windows = [[v.index for v in w.views] for w in windows_of(src.name, iter(frames), cfg)]
    assert windows and all(max(w) < 4 or min(w) > 4 for w in windows), windows


def test_no_concealed_frame_and_no_window_across_a_decode_error(tmp_path):
    truth = panning_frames(40, 64, 48)
    # One decoder thread: with FFmpeg's frame threads (cores + 1 by default) a decode error surfaces
    # up to that many packets late, and on a host of 11 or more cores after the last keyframe
    # here, which then is not trusted (DamageGate): the frames kept would depend on the host.
    clean = take(VideoSource(encode(tmp_path / "clean.mp4", truth, gop=10), decode_threads=1))

    def likeness(frame):  # mean absolute difference to the closest true frame
        return min(float(np.abs(frame.rgb.astype(int) - t).mean()) for t in truth)

    limit = 1.3 * max(likeness(f) for f in clean)  # what the codec's loss alone gives, with a margin
    errors = Errors()
    src = VideoSource(damage_mdat(encode(tmp_path / "damaged.mp4", truth, gop=10)), on_error=errors, decode_threads=1)
    frames = take(src)
    assert "corrupt_packet" in errors.reasons()
    assert 10 <= len(frames) < 40
    assert all(likeness(f) < limit for f in frames), [round(likeness(f), 1) for f in frames]  # nothing smeared
    gaps = [f.index for f in frames if f.discontinuity]
    assert gaps and all(f.index in gaps for a, f in zip(frames, frames[1:]) if f.index != a.index + 1)
    cfg = StreamerConfig(**{**FAST, "window_step": 1})
    windows = [[v.index for v in w.views] for w in windows_of(src.name, iter(frames), cfg)]
    assert windows and not any(min(w) < g <= max(w) for w in windows for g in gaps), (windows, gaps)


def test_lost_mpegts_packets_reported_and_concealment_dropped(tmp_path):
    """A recorded MPEG-TS that lost transport packets: nothing raises, the demuxer flags the
    packet (continuity counters) and the decoder conceals what it lost, drifting for frames."""
    truth = panning_frames(40, 128, 96)
    clean = take(VideoSource(encode(tmp_path / "clean.ts", truth, gop=10)))

    def likeness(frame):
        return min(float(np.abs(frame.rgb.astype(int) - t).mean()) for t in truth)

    limit = 1.3 * max(likeness(f) for f in clean)
    errors = Errors()
    frames = take(VideoSource(drop_ts_packets(tmp_path / "clean.ts", tmp_path / "lossy.ts"), on_error=errors))
    assert "corrupt_packet" in errors.reasons() and 10 <= len(frames) < 40
    assert all(likeness(f) < limit for f in frames), [round(likeness(f), 1) for f in frames]
    assert any(f.discontinuity for f in frames)


def test_too_short_source_is_reported(tmp_path):
    one = encode(tmp_path / "one.mp4", panning_frames(1, 32, 24))
    three = encode(tmp_path / "three.mp4", panning_frames(3, 32, 24))
    good = encode(tmp_path / "good.mp4", panning_frames(12, 32, 24))
    errors = Errors()
    cfg = StreamerConfig(**{**FAST, "views": 3, "frame_stride": 2})  # a window spans 5 frames
    windows = _stream([str(one), str(three), str(good)], cfg, errors)
    assert sorted((s, r) for s, r, _ in errors) == sorted([(source_name(one), "too_short"),
                                                          (source_name(three), "too_short")])
    assert all("frame" in d for _, _, d in errors)
    assert windows and {w.source for w in windows} == {source_name(good)}


def test_display_matrix_turns_frames_upright(tmp_path):
    truth = panning_frames(6, 48, 32)
    frames = take(VideoSource(rotate_mp4(encode(tmp_path / "portrait.mp4", truth))))
    assert len(frames) == 6 and frames[0].rgb.shape == (48, 32, 3)  # turned: taller than wide
    upright = np.rot90(truth[3], -1)  # a quarter turn clockwise, as players show it
    assert np.abs(frames[3].rgb.astype(int) - upright).mean() < 12
    assert frames[0].intrinsics[0, 2] == pytest.approx((32 - 1) / 2)  # intrinsics of the upright frame


SIGNED_PERMUTATIONS = [(a, b, c, d) for a, b, c, d in itertools.product((-1, 0, 1), repeat=4)
                       if abs(a * d - b * c) == 1 and abs(a) + abs(b) == 1 and abs(c) + abs(d) == 1]


def placed(image: np.ndarray, a: int, b: int, c: int, d: int) -> np.ndarray:
    """``image`` shown by the definition of a display matrix: its pixel (p, q) (column, row) at
    (a p + c q, b p + d q), the picture then moved back into view."""
    q, p = np.mgrid[:image.shape[0], :image.shape[1]]
    x, y = a * p + c * q, b * p + d * q
    shown = np.empty((y.max() - y.min() + 1, x.max() - x.min() + 1, *image.shape[2:]), image.dtype)
    shown[y - y.min(), x - x.min()] = image
    return shown


@pytest.mark.parametrize("a, b, c, d", SIGNED_PERMUTATIONS)
def test_an_orientation_shows_each_pixel_where_its_display_matrix_puts_it(a, b, c, d):
    """Known answer for the eight quarter turns and mirrors: a source pixel (p, q) (column,
    row) is shown at (a p + c q, b p + d q), the picture then moved back into view; the
    orientation read from the matrix puts every pixel there, at any scale of the matrix."""
    from reliev3r.imaging import display_orientation, orient

    source = np.arange(3 * 5).reshape(3, 5)
    shown = placed(source, a, b, c, d)
    matrix = (a * 0x10000, b * 0x10000, 0, c * 0x10000, d * 0x10000, 0, 7 << 16, 9 << 16, 0x40000000)
    assert len(SIGNED_PERMUTATIONS) == 8
    np.testing.assert_array_equal(orient(source, display_orientation(matrix)), shown)
    np.testing.assert_array_equal(orient(source, display_orientation([3 * m for m in matrix])), shown)


@pytest.mark.parametrize("a, b, c, d", SIGNED_PERMUTATIONS)
def test_intrinsics_are_turned_as_the_display_matrix_turns_the_pixels(a, b, c, d):
    """Known answer for the eight quarter turns and mirrors: the recorded pixel (p, q) of the
    ray (X, Y, 1) is shown where the display matrix puts it (:func:`placed`), and the turned
    intrinsics take that pixel back to the ray in the camera axes turned the same way
    (a X + c Y, b X + d Y, 1)."""
    from reliev3r.imaging import display_orientation, orient_intrinsics

    K = np.array([[50.0, 0, 30.25], [0, 55.0, 19.5], [0, 0, 1]])
    q, p = np.mgrid[:48, :64]
    rays = np.stack([p, q, np.ones_like(p)], -1) @ np.linalg.inv(K).T  # of each recorded pixel (column, row)
    rays_turned = placed(np.stack([a * rays[..., 0] + c * rays[..., 1], b * rays[..., 0] + d * rays[..., 1]], -1),
                         a, b, c, d)  # shown where their pixels are
    matrix = (a * 0x10000, b * 0x10000, 0, c * 0x10000, d * 0x10000, 0, 0, 0, 0x40000000)
    turned = orient_intrinsics(K, display_orientation(matrix), 64, 48)
    q, p = np.mgrid[:rays_turned.shape[0], :rays_turned.shape[1]]
    here = np.stack([p, q, np.ones_like(p)], -1) @ np.linalg.inv(turned).T  # the ray of each shown pixel
    np.testing.assert_allclose(here[..., :2], rays_turned, atol=1e-12)
    assert turned[0, 1] == turned[1, 0] == 0 and turned[0, 0] > 0 and turned[1, 1] > 0


def _turn_of(file: Path) -> int:
    """The orientation (``reliev3r.imaging.orient`` bits) OpenCV shows an image file under: the one that
    turns the pixels as stored into those it decodes."""
    import cv2

    from reliev3r.imaging import orient

    shown = cv2.imread(str(file), cv2.IMREAD_COLOR)
    stored = cv2.imread(str(file), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    (turn,) = [b for b in range(8) if orient(stored, b).shape == shown.shape and (orient(stored, b) == shown).all()]
    return turn


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
@pytest.mark.parametrize("value", range(1, 9))
def test_an_images_orientation_is_the_one_opencv_shows_it_under(suffix, value):
    """Known answer against OpenCV for the eight Exif orientations, little- and big-endian, of
    a JPEG (APP1) and a PNG (eXIf chunk): :func:`reliev3r.imaging.image_orientation` turns the
    stored pixels into those OpenCV decodes (0 where this OpenCV does not turn them)."""
    import cv2

    from reliev3r.imaging import image_orientation, orient
    from streamer_media import exif_tagged, texture

    ok, data = cv2.imencode(suffix, texture(64, 48))
    for big_endian in (False, True):
        tagged = exif_tagged(data.tobytes(), value, big_endian=big_endian)
        buffer = np.frombuffer(tagged, np.uint8)
        shown = cv2.imdecode(buffer, cv2.IMREAD_COLOR)
        stored = cv2.imdecode(buffer, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
        np.testing.assert_array_equal(orient(stored, image_orientation(tagged)), shown)
    assert image_orientation(data.tobytes()) == 0


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_a_folders_intrinsics_are_turned_with_each_frame_as_its_exif_orientation_turns_it(tmp_path, suffix):
    """Frames of a phone held in several ways (Exif orientations 6, 8, 1, 3; stored 64x48) and
    the folder's camera-intrinsics.txt of the camera as it records: each frame's intrinsics are
    turned as OpenCV turned its pixels (``reliev3r.imaging.orient_intrinsics``), so the recorded
    principal point (30, 20) is the shown frame's. Before, every frame got the intrinsics as
    recorded, with frames OpenCV had turned."""
    import cv2

    from reliev3r.imaging import FLIP_COLUMNS, FLIP_ROWS, TRANSPOSE, orient, orient_intrinsics
    from streamer_media import exif_tagged, texture

    for k, value in enumerate((6, 8, 1, 3)):
        ok, data = cv2.imencode(suffix, texture(64, 48, seed=k))
        (tmp_path / f"frame{k}{suffix}").write_bytes(exif_tagged(data.tobytes(), value, big_endian=k % 2 == 1))
    (tmp_path / "camera-intrinsics.txt").write_text("50 55 30 20\n")
    turns = [_turn_of(tmp_path / f"frame{k}{suffix}") for k in range(4)]
    if suffix == ".jpg":  # OpenCV turns a JPEG by its Exif orientation (a PNG: some versions)
        assert turns == [TRANSPOSE | FLIP_COLUMNS, TRANSPOSE | FLIP_ROWS, 0, FLIP_ROWS | FLIP_COLUMNS]
    frames = list(ImageSequenceSource(tmp_path).frames())
    assert len(frames) == 4
    K = np.array([[50.0, 0, 30], [0, 55, 20], [0, 0, 1]])
    columns, rows = np.meshgrid(np.arange(64), np.arange(48))
    for frame, turn in zip(frames, turns):
        np.testing.assert_allclose(frame.intrinsics, orient_intrinsics(K, turn, 64, 48))
        shown = orient(np.stack([columns, rows], -1), turn)  # where each recorded pixel is shown
        assert shown.shape[:2] == frame.rgb.shape[:2]
        assert tuple(shown[int(frame.intrinsics[1, 2]), int(frame.intrinsics[0, 2])]) == (30, 20)


def test_a_frames_depth_map_is_turned_with_it_by_its_exif_orientation(tmp_path):
    """Frames stored 64x48 and tagged with Exif orientations 6, 8, 1, 3, each with its depth map
    stored 64x48 as a depth camera writes it (no tag; OpenCV reads it unturned): each frame's
    ground-truth depth is turned as OpenCV turned the frame, so depth and colour agree at every
    pixel (the colour tells a stored pixel's row and column, the depth too). Before, a turned
    frame carried its depth map as stored (48x64 with a 64x48 frame, stretched onto it in a
    window)."""
    import cv2

    from reliev3r.imaging import orient
    from streamer_media import exif_tagged

    rows, columns = np.mgrid[:48, :64]
    rgb = np.stack([5 * rows, 3 * columns, np.full_like(rows, 128)], -1).astype(np.uint8)
    depth = (1000 + 64 * rows + columns).astype(np.uint16)
    ok, data = cv2.imencode(".png", rgb[..., ::-1])
    for k, value in enumerate((6, 8, 1, 3)):
        (tmp_path / f"frame-{k:06d}.color.png").write_bytes(exif_tagged(data.tobytes(), value))
        cv2.imwrite(str(tmp_path / f"frame-{k:06d}.depth.png"), depth)
    frames = list(ImageSequenceSource(tmp_path).frames())
    assert len(frames) == 4
    for k, frame in enumerate(frames):
        turn = _turn_of(tmp_path / f"frame-{k:06d}.color.png")
        np.testing.assert_array_equal(frame.rgb, orient(rgb, turn))
        np.testing.assert_allclose(frame.gt_depth, orient(depth, turn) / 1000.0, rtol=1e-6)
        told = frame.rgb.astype(int)  # the stored pixel each shown pixel is, by its colour and by its depth
        np.testing.assert_array_equal((frame.gt_depth * 1000).round() - 1000,
                                      64 * (told[..., 0] // 5) + told[..., 1] // 3)


def test_a_frames_ground_truth_pose_is_turned_with_it_by_its_exif_orientation(tmp_path):
    """Frames of one camera pose, tagged with Exif orientations 6, 8, 1, 3 and 2, each with its
    ``.pose.txt`` of the camera as it records: a turned frame's ground-truth pose is the camera
    turned about its optical axis as OpenCV turned the frame (``reliev3r.imaging.orient_pose``),
    so its turned intrinsics and depth and its pose put every pixel at the world point of the
    recorded pixel it shows; the mirrored frame (2) has no camera pose: none, reported as
    ``mirrored_pose`` naming the file. Before, every frame carried the pose as recorded."""
    import cv2

    from reliev3r.imaging import orient_pose
    from streamer_media import exif_tagged, texture

    pose = np.array([[0.36, 0.48, -0.8, 1.5], [-0.8, 0.6, 0.0, -0.4], [0.48, 0.64, 0.6, 2.0], [0, 0, 0, 1]])
    rows, columns = np.mgrid[:48, :64]
    ok, data = cv2.imencode(".jpg", texture(64, 48))
    for k, value in enumerate((6, 8, 1, 3, 2)):
        (tmp_path / f"frame-{k:06d}.color.jpg").write_bytes(exif_tagged(data.tobytes(), value))
        cv2.imwrite(str(tmp_path / f"frame-{k:06d}.depth.png"), (1000 + 64 * rows + columns).astype(np.uint16))
        np.savetxt(tmp_path / f"frame-{k:06d}.pose.txt", pose)
    (tmp_path / "camera-intrinsics.txt").write_text("50 55 30 20\n")
    K = np.array([[50.0, 0, 30], [0, 55, 20], [0, 0, 1]])
    errors = []
    frames = list(ImageSequenceSource(tmp_path, on_error=lambda *e: errors.append(e)).frames())
    assert len(frames) == 5
    for k, frame in enumerate(frames[:4]):
        turn = _turn_of(tmp_path / f"frame-{k:06d}.color.jpg")
        assert turn != 0 or k == 2
        np.testing.assert_allclose(frame.gt_cam_to_world, orient_pose(pose, turn), atol=1e-12)
        d = frame.gt_depth.astype(np.float64)
        mm = np.rint(d * 1000).astype(int) - 1000
        recorded = np.stack([mm % 64, mm // 64, np.ones_like(mm)], -1) @ np.linalg.inv(K).T * d[..., None]
        r, c = np.mgrid[:d.shape[0], :d.shape[1]]
        shown = np.stack([c, r, np.ones_like(r)], -1) @ np.linalg.inv(frame.intrinsics).T * d[..., None]
        turned = frame.gt_cam_to_world
        np.testing.assert_allclose(shown @ turned[:3, :3].T + turned[:3, 3],
                                   recorded @ pose[:3, :3].T + pose[:3, 3], atol=1e-9)
    assert errors == []
    assert frames[4].gt_cam_to_world is None and frames[4].gt_depth is not None
    ((_, reason, detail),) = errors
    assert reason == "mirrored_pose" and "frame-000004.pose.txt" in detail and "Exif orientation 2" in detail


POSE_FILES = {  # frame -> its .pose.txt and the problem read_pose names (None: a pose)
    0: ("drift", None),  # a tracker's: orthonormal to 2e-4, as 7-Scenes' poses are to 3e-4
    1: ("1 0 0 0\n0 1 0 0\n0 0 1 0\n", "16 numbers"),  # a 3x4 [R|t]
    2: ("pose unknown\n", "16 numbers"),
    3: ("1 0 0 nan\n0 1 0 0\n0 0 1 0\n0 0 0 1\n", "finite"),
    4: ("2 0 0 0\n0 2 0 0\n0 0 2 0\n0 0 0 1\n", "not a rotation"),  # a scale
    5: ("1 0 0 0\n0 1 0 0\n0 0 -1 0\n0 0 0 1\n", "determinant"),  # a reflection
    6: ("1 0 0 0\n0 1 0 0\n0 0 1 0\n0 0 1 1\n", "last row"),
    7: ("1 0 0 0.5\n0 1 0 0\n0 0 1 0\n0 0 0 1\n", None),
}


def test_a_pose_file_that_is_no_pose_is_named_once_and_its_frame_streams_without_one(tmp_path):
    """Pose files that are no camera-to-world pose (a 3x4, words, a NaN, a scale, a reflection, a
    last row other than 0 0 0 1): each frame streams, with its image and depth, without a pose,
    reported as ``bad_pose``; ``reliev3r.imaging.read_pose`` names each file's problem. A
    tracker's pose, orthonormal only to 2e-4, is kept. Each reason is said once for the folder:
    every report carries the same detail, naming the first file (the streamer counts each and
    logs a detail once: ``streamer.service.FirstSeen``), for ``mirrored_pose`` as for
    ``bad_pose``. Before, such a frame went without a pose unsaid, or carried the matrix as its
    pose, and each mirrored frame was named in a detail of its own."""
    import cv2

    from reliev3r.imaging import read_pose
    from streamer_media import exif_tagged, texture

    turn = np.array([[0.36, 0.48, -0.8], [-0.8, 0.6, 0.0], [0.48, 0.64, 0.6]])
    drift = np.eye(4)
    drift[:3, :3], drift[:3, 3] = turn + 2e-4 * np.array([[1, -1, 0], [0, 1, 1], [-1, 0, 1]]), (1.5, -0.4, 2.0)
    ok, data = cv2.imencode(".jpg", texture(64, 48))
    for k in range(10):
        stem = tmp_path / f"frame-{k:06d}"
        Path(f"{stem}.color.jpg").write_bytes(data.tobytes() if k < 8 else exif_tagged(data.tobytes(), 2))
        cv2.imwrite(f"{stem}.depth.png", np.full((48, 64), 1000 + k, np.uint16))
        text = POSE_FILES[k][0] if k < 8 else "1 0 0 0\n0 1 0 0\n0 0 1 0\n0 0 0 1\n"  # 8, 9: mirrored frames
        Path(f"{stem}.pose.txt").write_text(text) if text != "drift" else np.savetxt(f"{stem}.pose.txt", drift)
    for k, (_, problem) in POSE_FILES.items():
        file = tmp_path / f"frame-{k:06d}.pose.txt"
        if problem is None:
            assert read_pose(file).shape == (4, 4)
        else:
            with pytest.raises(ValueError, match=problem) as err:
                read_pose(file)
            assert str(file) in str(err.value)
    errors = Errors()
    frames = list(ImageSequenceSource(tmp_path, on_error=errors).frames())
    assert len(frames) == 10 and not errors
    poses = [frame.gt_cam_to_world for frame in frames]
    assert [p is not None for p in poses] == [True] + [False] * 6 + [True, False, False]
    np.testing.assert_array_equal(poses[0], np.loadtxt(tmp_path / "frame-000000.pose.txt"))
    assert poses[7][0, 3] == 0.5
    assert [f.gt_depth[0, 0] for f in frames] == pytest.approx([1 + k / 1000 for k in range(10)])
    assert all(f.rgb.shape == (48, 64, 3) for f in frames)
    assert errors.reasons() == ["bad_pose"] * 6 + ["mirrored_pose"] * 2
    bad, mirrored = {d for _, r, d in errors if r == "bad_pose"}, {d for _, r, d in errors if r == "mirrored_pose"}
    assert len(bad) == 1 and len(mirrored) == 1  # said once each
    (bad,), (mirrored,) = bad, mirrored
    assert "frame-000001.pose.txt" in bad and "16 numbers" in bad
    assert "frame-000008.pose.txt" in mirrored and "Exif orientation 2" in mirrored


@needs_kitchen
def test_the_7scenes_poses_are_poses():
    """Every pose of the shared 7-Scenes frames passes ``read_pose`` (KinectFusion's rotations
    are orthonormal to about 3e-4; ``reliev3r.imaging.POSE_TOLERANCE`` is 1e-2)."""
    from reliev3r.imaging import read_pose

    files = sorted(KITCHEN.glob("frame-*.pose.txt"))
    assert len(files) == 600
    for file in files:
        np.testing.assert_array_equal(read_pose(file), np.loadtxt(file))


@pytest.mark.parametrize("name, matrix", [
    ("mirrored", (-0x10000, 0, 0, 0, 0x10000, 0, 48 << 16, 0, 0x40000000)),  # a front camera's
    ("upside_down_mirror", (0x10000, 0, 0, 0, -0x10000, 0, 0, 32 << 16, 0x40000000)),
    ("turned_and_mirrored", (0, 0x10000, 0, 0x10000, 0, 0, 0, 0, 0x40000000))])
def test_mirrored_videos_are_shown_as_players_show_them(tmp_path, name, matrix):
    """Display matrices that mirror the picture (front cameras; FFmpeg reports the mirror as a
    rotation of 180 degrees): the frames are the decoded pixels placed as the matrix says, not
    turned upside down; the glance is made from the planes placed the same way."""
    import av

    from streamer.glance import glance_of_rgb
    from streamer_media import set_display_matrix

    clip = set_display_matrix(encode(tmp_path / f"{name}.mp4", panning_frames(6, 48, 32)), matrix)
    with av.open(str(clip)) as c:
        decoded = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    a, b, c_, d = (m // 0x10000 for m in (matrix[0], matrix[1], matrix[3], matrix[4]))
    frames = take(VideoSource(clip))
    assert len(frames) == 6
    for frame, rgb in zip(frames, decoded):
        shown = placed(rgb, a, b, c_, d)
        np.testing.assert_array_equal(frame.rgb, shown)
        assert np.abs(frame.glance.grey.astype(int) - glance_of_rgb(shown).grey).mean() < 2


def test_tiny_frames_refused(tmp_path):
    import av

    container = av.open(str(tmp_path / "dot.mp4"), "w")  # 4x4 pixels: nothing to learn geometry from
    stream = container.add_stream("libx264", rate=10)
    stream.width = stream.height = 4
    stream.pix_fmt = "yuv444p"
    for rgb in panning_frames(8, 4, 4):
        for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    errors = Errors()
    assert take(VideoSource(tmp_path / "dot.mp4", on_error=errors)) == []
    assert errors.reasons() == ["too_small"]


def test_image_folders_need_no_pyav(tmp_path):
    """PyAV is needed to read video only: with it uninstalled, every stage's process imports and an
    image folder yields its frames (a GPU host that lacks PyAV trains on image sequences)."""
    _jpeg_folder(tmp_path / "seq", 6, bad=-1)
    script = f"""
import sys
sys.modules["av"] = None  # `import av` now raises ImportError, as on a host without PyAV
import importlib
from reliev3r.cli import STAGES
for module, _ in STAGES.values():
    importlib.import_module(module)
from streamer.sources import ImageSequenceSource
print(len(list(ImageSequenceSource({str(tmp_path / "seq")!r}, on_error=print).frames())))
"""
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", script], cwd=repo, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(repo)}, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == "6"


def test_a_source_reported_by_default_is_named_in_the_message(tmp_path, caplog):
    """Without an error sink of its own (teacher-train's frames), a source's problem is logged
    with the source and what went wrong in the message itself: a console that prints messages
    alone said only "decode error"."""
    import logging

    with caplog.at_level(logging.WARNING, logger="reliev3r.streamer"):
        assert discover([str(tmp_path / "nothere.mp4")]) == []
    message = caplog.records[-1].getMessage()
    assert source_name(tmp_path / "nothere.mp4") in message and "nothere.mp4" in message and "missing" in message


def test_a_7scenes_folder_without_an_intrinsics_file_takes_the_published_intrinsics(tmp_path):
    """Microsoft's 7-Scenes download has no intrinsics file (the dataset publishes fx = fy = 585,
    cx = 320, cy = 240 for its 640x480 frames): a folder whose frames are all named as 7-Scenes
    names them (``frame-NNNNNN.color.png``) is read with those, by the streamer, eval's folder
    reader and reconstruct alike; a folder of other names keeps the 60 degree default. Before, the
    streamer trained on 7-Scenes' own frames with a 60 degree field of view (57.4 is theirs)."""
    import cv2

    from evaluation.datasets import load_windows
    from reliev3r.reconstruct import open_input
    from streamer.sources import fov_intrinsics

    seq = tmp_path / "seq-01"
    seq.mkdir()
    rng = np.random.default_rng(0)
    for k in range(3):
        cv2.imwrite(str(seq / f"frame-{k:06d}.color.png"), rng.integers(0, 255, (480, 640, 3), dtype=np.uint8))
    published = np.array([[585.0, 0, 320], [0, 585, 240], [0, 0, 1]])
    errors = Errors()
    (frame,) = take(ImageSequenceSource(seq, on_error=errors), 1)
    assert not errors
    np.testing.assert_allclose(frame.intrinsics, published)
    (w,) = load_windows(f"folder:{seq}", views=3, height=480, width=640, windows=1, stride=1, run_dir=tmp_path)
    np.testing.assert_allclose(w.intrinsics[0], published, atol=1e-4)
    np.testing.assert_allclose(open_input(seq, stride=1, max_frames=3).intrinsics, published)
    (seq / "frame-000003.png").write_bytes((seq / "frame-000000.color.png").read_bytes())  # a name of another kind
    (frame,) = take(ImageSequenceSource(seq, on_error=errors), 1)
    np.testing.assert_allclose(frame.intrinsics, fov_intrinsics(60.0, 640, 480))


def test_7scenes_published_intrinsics_follow_a_resized_copy_and_an_exif_turn():
    """The published intrinsics at a frame's size: a copy resized keeping 4:3 scales them (pixel
    centres at integers, as ``reliev3r.geometry.resize_intrinsics``), a frame turned a quarter by
    its Exif orientation gets them turned (``reliev3r.imaging.shown_intrinsics``), and a frame
    that is not 4:3 as recorded gets none."""
    import torch

    from reliev3r import geometry, imaging

    at = imaging.published_intrinsics([Path("frame-000000.color.png"), Path("frame-000001.color.jpg")])
    np.testing.assert_allclose(at(0, 640, 480), imaging.SEVEN_SCENES_K)
    half = geometry.resize_intrinsics(torch.as_tensor(imaging.SEVEN_SCENES_K), 0.5, 0.5).numpy()
    np.testing.assert_allclose(at(0, 320, 240), half)
    quarter = imaging.TRANSPOSE | imaging.FLIP_COLUMNS
    np.testing.assert_allclose(at(quarter, 240, 320), imaging.shown_intrinsics(half, quarter, 240, 320))
    assert at(0, 320, 180) is None and at(quarter, 320, 240) is None
    assert imaging.published_intrinsics([Path("frame-000000.color.png"), Path("img.png")]) is None


def test_a_frame_without_a_pose_file_among_frames_with_one_is_reported_once_named(tmp_path):
    """In a folder of per-frame pose files, a frame with none streams without a pose, reported as
    ``no_pose`` (counted each, the first named in every report: said once), as eval and
    reconstruct say it; a folder with no pose file at all says nothing. Before, unsaid."""
    import cv2

    from streamer_media import texture

    ok, data = cv2.imencode(".jpg", texture(64, 48))
    for k in range(4):
        Path(tmp_path / f"frame-{k:06d}.color.jpg").write_bytes(data.tobytes())
        if k != 1 and k != 3:
            np.savetxt(tmp_path / f"frame-{k:06d}.pose.txt", np.eye(4))
    errors = Errors()
    frames = list(ImageSequenceSource(tmp_path, on_error=errors).frames())
    assert [f.gt_cam_to_world is not None for f in frames] == [True, False, True, False]
    assert errors.reasons() == ["no_pose"] * 2
    (said,) = {d for _, _, d in errors}
    assert "frame-000001.pose.txt" in said
    for k in (0, 2):
        (tmp_path / f"frame-{k:06d}.pose.txt").unlink()
    errors = Errors()
    frames = list(ImageSequenceSource(tmp_path, on_error=errors).frames())
    assert all(f.gt_cam_to_world is None for f in frames) and not errors
