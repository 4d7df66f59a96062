"""Frames no keyframe test needs are left undecoded (``streamer.sources.FrameSkipper``, issue 18):
the frames that are decoded keep the indices and timestamps of decoding every frame, every
wanted frame is decoded, the frames read are counted in full, and the windows are the same."""

from __future__ import annotations

import av
import numpy as np
import pytest

from streamer.config import StreamerConfig
from streamer.sources import VideoSource, read_frames
from streamer.windows import Wanted, windows_of
from streamer_media import encode, panning_frames


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """60 frames of a pan in H.264 with B-frames (libx264's default), most of them non-reference."""
    path = encode(tmp_path_factory.mktemp("skip") / "pan.mp4", panning_frames(60, 96, 64, step=2, seed=3))
    with av.open(str(path)) as c:
        b_frames = sum(int(f.pict_type) == 3 for f in c.decode(video=0))  # AV_PICTURE_TYPE_B
    assert b_frames >= 20, b_frames  # the encoder made B-frames, or the test means nothing
    return path


def every(path, **kw):
    return [(f.index, f.timestamp) for f in VideoSource(path, **kw).frames()]


# One thread, and frame threads at a fixed count (what is decoded beyond the wanted frames grows
# with them; 0 would take the host's cores)
@pytest.mark.parametrize("threads", [1, 3])
def test_skipped_frames_keep_indices_timestamps_and_wanted_frames(clip, threads):
    full = every(clip, decode_threads=threads)
    assert [i for i, _ in full] == list(range(60))
    for wanted in (lambda i: i % 4 == 0, lambda i: i % 7 < 2, lambda i: False):
        got = [(f.index, f.timestamp) for f in VideoSource(clip, decode_threads=threads).frames(wanted=wanted)]
        assert set(got) <= set(full)  # the same index with the same timestamp as decoding all
        indices = [i for i, _ in got]
        assert indices == sorted(indices) and {i for i in range(60) if wanted(i)} <= set(indices)
        assert len(got) < 50  # non-reference frames were left undecoded
    assert every(clip, decode_threads=threads) == full


def test_frames_read_are_counted_in_full_and_resume_skips_before_start(clip):
    for start in (0, 17):
        counts = []
        src = VideoSource(clip, decode_threads=1)
        frames = list(read_frames(src, start, lambda i: i % 5 == 0, counts.append))
        assert sum(counts) == 60 - start and len(frames) < 60 - start
        assert frames[0].index >= start and src.position == 60


def test_windows_are_the_same_with_frames_left_undecoded(clip):
    cfg = StreamerConfig(views=3, height=32, width=48, frame_stride=3, window_step=4, loop=False)

    def windows(skip: bool):
        src = VideoSource(clip, decode_threads=1)
        wanted = Wanted() if skip else None
        decoded = []

        def frames():
            for f in src.frames(wanted=wanted):
                decoded.append(f.index)
                yield f

        out = [(w.window_id, [v.index for v in w.views], np.stack([v.rgb for v in w.views]).tobytes())
               for w in windows_of(src.name, frames(), cfg, wanted=wanted)]
        return out, decoded

    (plain, all_decoded), (skipped, some_decoded) = windows(False), windows(True)
    assert plain and skipped == plain
    assert len(all_decoded) == 60 and len(some_decoded) < 50


def test_codecs_without_skipping_decode_every_frame(tmp_path):
    path = encode(tmp_path / "pan.avi", panning_frames(30, 96, 64, step=2), codec="mpeg4")
    got = [f.index for f in VideoSource(path, decode_threads=1).frames(wanted=lambda i: i % 4 == 0)]
    assert got == list(range(30))


def test_frames_to_flow_known_answers():
    from streamer.windows import frames_to_flow

    assert frames_to_flow(3.0, 12.0, 4) == 12  # 0.75 px a frame: 12 px at frame 16, 12 on from frame 4
    assert frames_to_flow(1.0, 2.0, 4) == 4 and frames_to_flow(1.5, 2.0, 4) == 1  # rounded down, at least 1
    assert frames_to_flow(5.0, 2.0, 4) == 1 and frames_to_flow(1.0, 2.0, 0) == 1
    assert frames_to_flow(0.0, 2.0, 4) >= 4  # no motion yet: as far as the caller allows (frame_stride)


def test_damaged_clip_names_the_same_errors_with_frames_left_undecoded(clip, tmp_path):
    import shutil

    from streamer_media import damage_mdat

    bad = damage_mdat(shutil.copy(clip, tmp_path / "bad.mp4"), nbytes=400)

    def run(wanted):
        errors = []
        src = VideoSource(bad, decode_threads=1, on_error=lambda *e: errors.append(e[1]))
        return [f.index for f in src.frames(wanted=wanted)], sorted(set(errors))

    (every_frame, reasons), (some, reasons_skipping) = run(None), run(lambda i: i % 4 == 0)
    assert reasons and reasons_skipping == reasons  # the damage is named the same way
    assert some == sorted(set(some)) and len(some) <= len(every_frame)


def test_frames_after_damage_keep_the_indices_of_decoding_every_frame(tmp_path):
    """A lossy network copy (MPEG-TS that lost transport packets): skipping stops at the damage,
    and the frames already in the decoder that were fed to be skipped still count, so every
    frame has the index that decoding every frame gives its stamp (they came one low)."""
    from streamer_media import drop_ts_packets

    clean = encode(tmp_path / "clean.ts", panning_frames(200, 160, 120, step=1), gop=50)
    lossy = drop_ts_packets(clean, tmp_path / "lossy.ts", at=0.3, count=6)

    def by_stamp(wanted):
        errors = []
        src = VideoSource(lossy, decode_threads=1, on_error=lambda *e: errors.append(e[1]))
        return {round(f.timestamp, 6): f.index for f in src.frames(wanted=wanted)}, errors

    (full, reasons), (some, reasons_skipping) = by_stamp(None), by_stamp(lambda i: i % 9 == 0)
    assert "corrupt_packet" in reasons and sorted(set(reasons_skipping)) == sorted(set(reasons))
    assert len(some) < len(full) and set(some) <= set(full)
    assert {t: full[t] for t in some} == some
