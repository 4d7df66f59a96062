"""Intra-only videos (MJPEG, ProRes, ...) are decoded a frame at a time, only when a test looks
at the frame (``streamer.sources.IntraDecoder``): the same frames, pixels and windows as
decoding every frame, most frames never decoded, and a frame that cannot be decoded when looked
at is named and taken as a gap."""

from __future__ import annotations

import av
import numpy as np
import pytest

from streamer.config import StreamerConfig
from streamer.sources import FrameLost, IntraDecoder, VideoSource, cuda_decoder_problem
from streamer.windows import windows_of
from streamer_media import encode, panning_frames

INTRA = {"mjpeg": ("mjpeg", "yuvj420p", "avi"), "prores": ("prores_ks", "yuv422p10le", "mov")}
"""Intra-only codecs: encoder, pixel format, container."""


def intra_clip(tmp_path, kind: str, frames: np.ndarray, name: str = "pan"):
    codec, pix_fmt, suffix = INTRA[kind]
    return encode(tmp_path / f"{name}.{suffix}", frames, codec=codec, pix_fmt=pix_fmt)


@pytest.fixture
def decodes(monkeypatch):
    """Counts the frames the intra decoder decodes (a list of their indices)."""
    seen = []
    decode = IntraDecoder.decode

    def counted(self, packet, index):
        seen.append(index)
        return decode(self, packet, index)

    monkeypatch.setattr(IntraDecoder, "decode", counted)
    return seen


def every_frame_decoded(monkeypatch):
    """Turn the intra decoder off: every frame decoded as it is read (the path of other codecs)."""
    monkeypatch.setattr(IntraDecoder, "applies", staticmethod(lambda stream: False))


@pytest.mark.parametrize("kind", sorted(INTRA))
def test_intra_frames_are_the_frames_of_decoding_every_one(tmp_path, kind, decodes):
    clip = intra_clip(tmp_path, kind, panning_frames(12, 96, 64, step=2))
    with av.open(str(clip)) as container:
        assert container.streams.video[0].codec_context.codec.intra_only
        truth = [(f.pts, f.to_ndarray(format="rgb24")) for f in container.decode(video=0)]
    frames = list(VideoSource(clip, decode_threads=1).frames())
    assert [f.index for f in frames] == list(range(12)) and decodes == []  # read, none decoded
    for frame, (pts, rgb) in zip(frames[::-1], truth[::-1]):  # in any order
        np.testing.assert_array_equal(frame.rgb, rgb)
    assert sorted(decodes) == list(range(1, 12))  # the first frame is decoded as it is read
    assert [f.timestamp for f in frames] == pytest.approx([i / 10 for i in range(12)])


@pytest.mark.parametrize("kind", sorted(INTRA))
def test_windows_are_the_same_and_most_intra_frames_are_never_decoded(tmp_path, kind, decodes, monkeypatch):
    # a slow pan in grey (the colour texture's hue-saturation histogram jumps from frame to frame as
    # no footage does): the cut test leaves most frames between its looks unlooked-at
    pan = panning_frames(80, 128, 96, step=1).mean(axis=-1, keepdims=True).astype(np.uint8)
    clip = intra_clip(tmp_path, kind, np.repeat(pan, 3, axis=-1))
    cfg = StreamerConfig(views=3, height=48, width=64, frame_stride=4, window_step=4, loop=False)

    def windows():
        src = VideoSource(clip, decode_threads=1)
        return [([v.index for v in w.views], np.stack([v.rgb for v in w.views]).tobytes())
                for w in windows_of(src.name, src.frames(), cfg)]

    lazily = windows()
    looked = len(decodes)
    every_frame_decoded(monkeypatch)
    assert lazily and windows() == lazily
    assert looked < 40, looked  # of 80


def zero_packets(clip, indices) -> None:
    """Overwrite the data of the packets of frames ``indices`` with zeros (undecodable)."""
    with av.open(str(clip)) as container:
        spans = [(p.pos, p.size) for p in container.demux(video=0) if p.size]
    data = bytearray(clip.read_bytes())
    for i in indices:
        pos, size = spans[i]
        data[pos:pos + size] = bytes(size)
    clip.write_bytes(bytes(data))


def test_an_intra_frame_that_cannot_be_decoded_is_named_when_looked_at_and_is_a_gap(tmp_path):
    clip = intra_clip(tmp_path, "mjpeg", panning_frames(30, 96, 64, step=2))
    zero_packets(clip, [12])
    errors = []
    frames = list(VideoSource(clip, decode_threads=1, on_error=lambda *e: errors.append(e[1:])).frames())
    assert [f.index for f in frames] == list(range(30)) and errors == []  # nothing is decoded yet
    for f in frames:
        if f.index == 12:
            for _ in range(2):  # lost for good, said once
                with pytest.raises(FrameLost):
                    f.glance
        else:
            assert f.glance.grey.shape == (107, 160)  # the glance of the planes
    assert [reason for reason, _ in errors] == ["corrupt_packet"] and "frame 12" in errors[0][1]

    cfg = StreamerConfig(views=3, height=48, width=64, frame_stride=2, window_step=2, loop=False)
    src = VideoSource(clip, decode_threads=1, on_error=lambda *e: None)
    views = [[v.index for v in w.views] for w in windows_of(src.name, src.frames(), cfg)]
    assert views and not any(min(w) < 12 <= max(w) for w in views), views  # none spans the lost frame


def test_an_intra_stream_whose_frames_do_not_decode_is_given_up(tmp_path):
    clip = intra_clip(tmp_path, "mjpeg", panning_frames(70, 32, 24))
    zero_packets(clip, range(1, 70))
    errors = []
    src = VideoSource(clip, decode_threads=1, on_error=lambda *e: errors.append(e[1]))
    lost = 0
    for f in src.frames():
        if f.index == 0:  # decoded as it is read
            continue
        with pytest.raises(FrameLost):
            f.glance
        lost += 1
    assert errors[-1] == "gave_up" and errors.count("corrupt_packet") == lost == 50


def test_an_intra_frame_of_another_size_is_named_and_lost(tmp_path):
    """Matroska carries MJPEG frames of any size; the stream's first frame sets the frames' size."""
    small = intra_clip(tmp_path, "mjpeg", panning_frames(4, 64, 48), "small")
    large = intra_clip(tmp_path, "mjpeg", panning_frames(4, 96, 64), "large")
    joined = tmp_path / "joined.mkv"
    with av.open(str(small)) as a, av.open(str(large)) as b, av.open(str(joined), "w") as out:
        stream = out.add_stream_from_template(a.streams.video[0])
        for i, packet in enumerate(p for c in (a, b) for p in c.demux(video=0) if p.size):
            packet.stream, packet.pts, packet.dts, packet.time_base = stream, i, i, stream.codec_context.time_base
            out.mux(packet)
    errors = []
    frames = list(VideoSource(joined, decode_threads=1, on_error=lambda *e: errors.append(e[1:])).frames())
    assert len(frames) == 8
    assert all(f.rgb.shape == (48, 64, 3) for f in frames[:4])
    with pytest.raises(FrameLost):
        frames[5].glance
    assert errors and errors[0][0] == "size_changed" and "96x64" in errors[0][1]


def test_a_long_intra_video_is_shared_in_segments_with_the_frames_of_the_whole_file(tmp_path):
    """Decode workers share a long video in segments (``streamer.segments``); an intra-only
    video's segments start at any frame and give the whole file's indices, stamps and pixels."""
    from streamer import segments

    clip = intra_clip(tmp_path, "mjpeg", panning_frames(240, 96, 64, step=2, seed=5))
    full = {f.index: (f.timestamp, f.rgb) for f in VideoSource(clip, decode_threads=1).frames()}
    parts = segments.plan(clip, 60)
    assert [(p.start, p.stop) for p in parts] == [(0, 60), (60, 120), (120, 180), (180, 240)]
    for part in parts:
        frames = list(VideoSource(clip, decode_threads=1).frames(segment=part))
        assert [f.index for f in frames] == list(range(part.start, part.stop))
        for f in frames[::-1]:
            timestamp, rgb = full[f.index]
            assert f.timestamp == timestamp and np.array_equal(f.rgb, rgb)


def test_an_intra_video_with_a_display_matrix_is_turned_upright_frame_by_frame(tmp_path):
    from streamer_media import rotate_mp4

    truth = panning_frames(6, 48, 32)
    frames = list(VideoSource(rotate_mp4(intra_clip(tmp_path, "prores", truth)), decode_threads=1).frames())
    assert len(frames) == 6
    for f, rgb in zip(frames, truth):  # the first decoded as read, the others when asked
        assert f.rgb.shape == (48, 32, 3) and np.abs(f.rgb.astype(int) - np.rot90(rgb, -1)).mean() < 12
        assert f.glance.grey.shape == (240, 160)


@pytest.mark.skipif(cuda_decoder_problem() is not None, reason=str(cuda_decoder_problem()))
def test_intra_frames_sent_to_a_gpu_decoder_are_decoded_where_looked_at_as_on_the_cpu(tmp_path, decodes):
    """``streamer.decoder: cuda`` with an intra-only video: NVDEC decodes Motion JPEG (or FFmpeg
    falls back to the CPU for a codec it lacks), one frame at a time where looked at, the frames
    and glances of the CPU decoder within the two JPEG decoders' rounding."""
    clip = intra_clip(tmp_path, "mjpeg", panning_frames(24, 256, 192, step=2))
    errors = []
    src = VideoSource(clip, decoder="cuda", on_error=lambda *e: errors.append(e))
    gpu = [(f.index, f.glance) for f in src.frames()]
    assert not errors and sorted(decodes) == list(range(1, 24))  # each decoded when its glance was asked for
    cpu = [(f.index, f.glance) for f in VideoSource(clip).frames()]
    assert [i for i, _ in gpu] == [i for i, _ in cpu]
    for (_, got), (_, want) in zip(gpu, cpu):
        assert np.abs(got.grey.astype(int) - want.grey).mean() < 1.5
