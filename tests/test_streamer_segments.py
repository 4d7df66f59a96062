"""A long video shared by several decode workers (``streamer.segments``, issue 18): segments
start at closed keyframes and partition the file; a segment's frames have the indices,
timestamps and pixels of decoding the whole file; the window stream with workers decodes a
long video in segments whose windows are those of each segment on its own, resumes each
segment where it stopped, and leaves files whose stamps cannot be trusted whole."""

from __future__ import annotations

import logging

import av
import numpy as np
import pytest

from streamer import segments, workers
from streamer.config import StreamerConfig
from streamer.progress import Progress
from streamer.service import window_stream
from streamer.sources import VideoSource, discover, source_name
from streamer.windows import Wanted, windows_of
from streamer_media import SHARED, encode, join_ts, panning_frames, restamped

LENGTH = 60
"""Segment length of these tests (the product's is ``segments.SEGMENT_FRAMES``)."""
WINDOWS = dict(views=3, height=32, width=48, frame_stride=2, window_step=4, loop=False)


@pytest.fixture(scope="module")
def long_clip(tmp_path_factory):
    """240 frames of a pan in H.264 with B-frames, a keyframe every 25 frames."""
    return encode(tmp_path_factory.mktemp("segments") / "long.mp4", panning_frames(240, 96, 64, step=2, seed=5), gop=25)


@pytest.fixture(scope="module")
def long_ts(tmp_path_factory):
    """The same pan as MPEG-TS (broadcast, dashcams, camcorders): its demuxer seeks by decode
    stamps and lands on the packet after a keyframe asked for by its presentation stamp."""
    return encode(tmp_path_factory.mktemp("segments") / "long.ts", panning_frames(240, 96, 64, step=2, seed=5), gop=25)


def whole(path):
    return {f.index: (f.timestamp, f.rgb) for f in VideoSource(path, decode_threads=1).frames()}


def test_segments_partition_the_file_at_keyframes(long_clip):
    parts = segments.plan(long_clip, LENGTH)
    assert len(parts) >= 3
    assert parts[0].start == 0 and parts[0].seek_pts is None and parts[-1].stop == 240 and parts[-1].last
    assert all(a.stop == b.start for a, b in zip(parts, parts[1:]))
    assert all(p.stop - p.start >= LENGTH for p in parts[:-1]) and parts[-1].stop - parts[-1].start >= LENGTH // 2
    assert not any(p.last for p in parts[:-1])
    with av.open(str(long_clip)) as c:
        keys = {f.pts for f in c.decode(video=0) if f.key_frame}
    assert all(p.seek_pts in keys and p.pts[0] == p.seek_pts for p in parts[1:])
    assert segments.plan(long_clip, 121) == []  # shorter than two segments: whole


@pytest.mark.parametrize("clip", ["long_clip", "long_ts"])
def test_a_segment_gives_the_frames_of_decoding_the_whole_file(clip, request):
    long_clip = request.getfixturevalue(clip)
    full = whole(long_clip)
    assert len(full) == 240
    for part in segments.plan(long_clip, LENGTH):
        frames = list(VideoSource(long_clip, decode_threads=1).frames(segment=part))
        assert [f.index for f in frames] == list(range(part.start, part.stop))
        for f in frames:
            timestamp, rgb = full[f.index]
            assert f.timestamp == timestamp and np.array_equal(f.rgb, rgb)
    part = segments.plan(long_clip, LENGTH)[1]
    resumed = [f.index for f in VideoSource(long_clip, decode_threads=1).frames(part.start + 7, segment=part)]
    assert resumed == list(range(part.start + 7, part.stop))


def whole_because(split):
    assert isinstance(split, segments.Whole), split
    return split.reason


def test_untrusted_stamps_leave_a_file_whole():
    keys = [i % 10 == 0 for i in range(40)]
    display = list(range(40))
    assert [(p.start, p.stop) for p in segments._split(display, keys, False, 10)] == [(0, 10), (10, 20), (20, 30),
                                                                                     (30, 40)]
    assert whole_because(segments._split(display, keys, False, 21)) == "too_short"
    assert whole_because(segments._split(display, keys, True, 10)) == "decode_order_stamps"  # B-frames
    assert whole_because(segments._split([None] + display[1:], keys, False, 10)) == "missing_stamps"
    assert whole_because(segments._split([0] + display[:-1], keys, False, 10)) == "repeated_stamps"
    # two recordings joined end to end, the second's stamps starting again between the first's
    joined = [2 * i for i in range(20)] + [2 * i + 1 for i in range(20)]
    assert whole_because(segments._split(joined, keys, False, 10)) == "stamps_reset"
    assert whole_because(segments._split(joined, keys, True, 10)) == "stamps_reset"  # a keyframe stamped back
    # a packet stamped before packets decoded before it: without B-frames none may be; with them,
    # no more than a decoder holds back (REORDER_LIMIT)
    keyed = [i in (0, 30) for i in range(40)]

    def moved_back(k):
        """40 packets' stamps, the 21st's before those of the k packets decoded before it."""
        pts = [2 * i for i in range(40)]
        pts[20] = 2 * (20 - k) - 1
        return pts

    assert whole_because(segments._split(moved_back(1), keyed, False, 10)) == "stamps_reset"
    assert whole_because(segments._split(moved_back(segments.REORDER_LIMIT + 1), keyed, True, 10)) == "stamps_reset"
    assert [p.start for p in segments._split(moved_back(segments.REORDER_LIMIT), keyed, True, 10)] == [0, 30]
    # B-frames: the keyframe shown 8th is followed in decode order by the 7th (open: not a
    # boundary); those shown 12th and 21st are closed
    reordered = [0, 2, 1, 3, 5, 4, 6, 8, 7, 9, 11, 10, 12, 14, 13, 15, 17, 16, 18, 20, 19, 21, 23, 22, 24]
    keyed = [pts in (0, 8, 12, 21) for pts in reordered]
    assert [p.start for p in segments._split(reordered, keyed, True, 5)] == [0, 12, 21]
    assert [p.start for p in segments._split(reordered, keyed, True, 10)] == [0, 12]


@pytest.mark.parametrize("second", ["starts again", "goes on"])
def test_recordings_joined_end_to_end_are_split_only_where_their_stamps_go_on(tmp_path, caplog, second):
    """Two MPEG-TS recordings joined end to end (``cat a.ts b.ts``, 10 frames/s). When the second's
    stamps start again (half a frame after the first's: no two the same), the whole file decodes
    to the first recording's frames, then the second's (the source reports ``stamps_reset``),
    whereas a segment's frames take the rank of their stamps among both recordings' (the two
    interleaved: other indices and times): the file is read whole, and the log says why. When
    they go on after the first's, the segments give the frames of the whole file."""
    first = encode(tmp_path / "a.ts", panning_frames(120, 96, 64, step=2, seed=5), gop=25)
    second_part = encode(tmp_path / "b.ts", panning_frames(240, 96, 64, step=2, seed=6), gop=25)
    shift = 0.05 if second == "starts again" else 12.05
    joined = join_ts(first, restamped(second_part, tmp_path / "b2.ts", shift), tmp_path / "joined.ts", counters=True)
    with av.open(str(joined)) as c:
        stamps = [p.pts for p in c.demux(video=0) if p.size]
    assert len(stamps) == 360 and len(set(stamps)) == 360  # no stamp repeats
    errors = []
    full = [(f.index, f.timestamp) for f in VideoSource(joined, decode_threads=1,
                                                        on_error=lambda *e: errors.append(e)).frames()]
    assert ("stamps_reset" in {reason for _, reason, _ in errors}) == (second == "starts again")
    with caplog.at_level(logging.INFO, logger="reliev3r.streamer.segments"):
        parts = segments.plan(joined, LENGTH)
    read = full if not parts else [(f.index, f.timestamp) for part in parts
                                   for f in VideoSource(joined, decode_threads=1).frames(segment=part)]
    assert read == full  # as the decode workers read it: whole, or by segment
    reasons = [r.reason for r in caplog.records if r.getMessage() == "not split"]
    assert (reasons, len(parts) >= 3) == ((["stamps_reset"], False) if second == "starts again" else ([], True))


@pytest.mark.skipif(not (SHARED / "videos").is_dir(), reason="needs ../shared/data/videos")
def test_shared_videos_split_only_where_their_stamps_hold():
    videos = SHARED / "videos"
    assert segments.plan(videos / "box.mp4", 40) == []  # decode stamps written as presentation stamps
    assert segments.plan(videos / "Megamind.avi", 40) == []  # MPEG-4 packed B-frames in AVI
    for name in ("bikes.mp4", "cup.mp4"):
        parts = segments.plan(videos / name, 40)
        assert len(parts) >= 2
        full = whole(videos / name)
        for part in parts:
            frames = list(VideoSource(videos / name, decode_threads=1).frames(segment=part))
            assert [f.index for f in frames] == list(range(part.start, part.stop))
            assert all(np.array_equal(f.rgb, full[f.index][1]) for f in frames[:3] + frames[-3:])


def stream(specs, cfg, progress=None):
    errors = []
    windows = list(window_stream(lambda: discover(specs, on_error=lambda *e: errors.append(e)), cfg,
                                 on_frame=lambda name: None, on_error=lambda *e: errors.append(e),
                                 log=logging.getLogger("test"), progress=progress))
    return windows, errors


def data(windows):
    return sorted((w.window_id, [v.index for v in w.views], np.stack([v.rgb for v in w.views]).tobytes())
                  for w in windows)


def test_workers_decode_a_long_video_in_segments(long_clip, monkeypatch, caplog):
    monkeypatch.setattr(segments, "SEGMENT_FRAMES", LENGTH)
    cfg = StreamerConfig(**WINDOWS, decode_workers=2)
    parts = segments.plan(long_clip, LENGTH)
    assert workers.segments_of(VideoSource(long_clip), cfg) == parts
    assert workers.segments_of(VideoSource(long_clip), StreamerConfig(**WINDOWS, decode_workers=1)) == []
    with caplog.at_level(logging.INFO, logger="test"):
        windows, errors = stream([str(long_clip)], cfg)
    assert [r.segments for r in caplog.records if r.getMessage() == "source in segments"] == [len(parts)]
    assert not errors and len(windows) >= 20
    expected = []
    for part in parts:  # each segment on its own, in this process
        src = VideoSource(long_clip, decode_threads=1)
        wanted = Wanted()
        expected += windows_of(src.name, src.frames(wanted=wanted, segment=part), StreamerConfig(**WINDOWS),
                               wanted=wanted)
    assert data(windows) == data(expected)
    for w in windows:  # no window spans a boundary
        assert len({next(i for i, p in enumerate(parts) if p.start <= v.index < p.stop) for v in w.views}) == 1


def test_each_segment_resumes_where_it_stopped(long_clip, tmp_path, monkeypatch):
    monkeypatch.setattr(segments, "SEGMENT_FRAMES", LENGTH)
    cfg = StreamerConfig(**WINDOWS, decode_workers=2)
    name = source_name(long_clip)
    everything, _ = stream([str(long_clip)], cfg)
    path = tmp_path / "progress.json"
    first = Progress(path)
    parts = segments.plan(long_clip, LENGTH)
    by_part = {p.start: [w.window_id for w in everything if p.start <= w.views[0].index < p.stop] for p in parts}
    done_part, half_part = parts[0], parts[1]
    for wid in by_part[done_part.start]:
        first.made(f"{name}@{done_part.start}", wid)
        first.acked(wid)
    first.source_done(f"{name}@{done_part.start}")
    half = by_part[half_part.start][: len(by_part[half_part.start]) // 2]
    for wid in half:
        first.made(f"{name}@{half_part.start}", wid)
        first.acked(wid)
    first.save()
    again, errors = stream([str(long_clip)], cfg, Progress(path))
    ids = [w.window_id for w in again]
    assert not errors
    assert not set(ids) & set(by_part[done_part.start]) and not set(ids) & set(half)  # acknowledged: not again
    assert set(by_part[half_part.start]) - set(half) <= set(ids)  # the rest of the half-done segment
    for part in parts[2:]:  # untouched segments: every window
        assert set(by_part[part.start]) <= set(ids)


def test_damage_inside_one_segment_is_named_and_the_others_flow(long_clip, tmp_path, monkeypatch):
    """A long video with garbage in the middle of its media data: the segment holding it names
    the damage (the damage gate's reasons, as for a whole file) and no window spans it; every
    segment still gives windows."""
    from streamer_media import damage_mdat

    monkeypatch.setattr(segments, "SEGMENT_FRAMES", LENGTH)
    damaged = tmp_path / "damaged.mp4"
    damaged.write_bytes(long_clip.read_bytes())
    damage_mdat(damaged, nbytes=400, seed=1)
    parts = segments.plan(damaged, LENGTH)
    assert len(parts) >= 3  # the packets and their stamps are intact: the file is still split
    windows, errors = stream([str(damaged)], StreamerConfig(**WINDOWS, decode_workers=2))
    assert errors and {reason for _, reason, _ in errors} <= {"corrupt_packet", "corrupt_frame",
                                                               "skipped_to_keyframe"}
    for part in parts:
        assert any(part.start <= w.views[0].index < part.stop for w in windows)


def test_a_still_segment_does_not_report_the_video_as_without_windows(tmp_path, monkeypatch):
    """A long video whose first segment is a still camera: its other segments give windows, and
    nothing says the video has none (``no_windows`` is a whole source's finding)."""
    monkeypatch.setattr(segments, "SEGMENT_FRAMES", LENGTH)
    pan = panning_frames(140, 96, 64, step=2, seed=6)
    frames = np.concatenate([np.repeat(pan[:1], 100, axis=0), pan])
    clip = encode(tmp_path / "still_then_pan.mp4", frames, gop=25)
    parts = segments.plan(clip, LENGTH)
    assert len(parts) >= 3 and parts[1].start <= 100
    windows, errors = stream([str(clip)], StreamerConfig(**WINDOWS, decode_workers=2))
    assert windows and not any(w.views[0].index < parts[0].stop for w in windows)  # the still part gave none
    assert not errors
