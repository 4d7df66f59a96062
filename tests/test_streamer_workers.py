"""Decode workers (``streamer.decode_workers``) and the per-frame glance: the same windows, ids,
order per source, pixels and named error reasons with workers as without; a source without a
window ready does not hold the others back; resume from a frame the same;
the glance made from a video's decoder planes agrees with the one made from its RGB frames, and
NV12 planes (a GPU decoder's) give the glance of the same yuv420p planes; ``streamer.decoder:
cuda`` gives the CPU decoder's frames where the host has NVDEC, and says why and decodes on the
CPU where it has not."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import av
import cv2
import numpy as np
import pytest

from streamer import service, workers
from streamer.config import StreamerConfig
from streamer.glance import _plane, glance_of_rgb, glance_of_video_frame
from streamer.progress import Progress
from streamer.service import window_stream
from streamer.sources import ImageSequenceSource, VideoSource, cuda_decoder_problem, discover, source_name
from streamer.windows import Window, builder_for, hs_histogram, thumbnail
from streamer_media import SHARED, encode, panning_frames

KITCHEN = SHARED / "7scenes-redkitchen"
WINDOWS = dict(views=3, height=32, width=48, frame_stride=2, window_step=4, loop=False)


class Events(list):
    def __call__(self, *event):
        self.append(event)


def stream(specs, cfg, progress=None, ground_truth=True):
    """(windows, errors, frames counted per source) through the service's window stream."""
    errors, frames = Events(), {}

    def on_frame(name):
        frames[name] = frames.get(name, 0) + 1

    windows = list(window_stream(lambda: discover(specs, on_error=errors, ground_truth=ground_truth,
                                                  decoder=cfg.decoder), cfg,
                                 on_frame=on_frame,
                                 on_error=errors, log=logging.getLogger("test"), progress=progress))
    return windows, errors, frames


def as_data(windows):
    """Per source, its windows in order: ids, frame indices, timestamps, pixels, intrinsics, the
    blur test's history (across sources the order follows which worker has a window ready first)."""
    per_source: dict[str, list] = {}
    for w in windows:
        per_source.setdefault(w.source, []).append(
            (w.window_id, [v.index for v in w.views], [v.timestamp for v in w.views],
             np.stack([v.rgb for v in w.views]).tobytes(),
             np.stack([v.intrinsics for v in w.views]).astype(np.float32).tobytes(), w.blur_history))
    return per_source


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clips")
    good = [encode(folder / f"pan{i}.mp4", panning_frames(40, 96, 64, step=3 + i, seed=i)) for i in range(3)]
    data = good[0].read_bytes()
    (folder / "zero.mp4").write_bytes(b"")
    (folder / "text.mp4").write_text("this is not a video\n" * 20)
    corrupt = bytearray(data)
    mid = len(corrupt) // 2
    corrupt[mid:mid + 1500] = np.random.default_rng(0).integers(0, 256, 1500, dtype=np.uint8).tobytes()
    (folder / "corrupt.mp4").write_bytes(bytes(corrupt))
    short = encode(folder / "short.mp4", panning_frames(3, 96, 64))
    return [*good, folder / "zero.mp4", folder / "text.mp4", folder / "corrupt.mp4", short, folder / "missing.mp4"]


def test_workers_make_the_same_windows_and_name_the_same_errors(clips):
    specs = [str(c) for c in clips]
    alone, alone_errors, alone_frames = stream(specs, StreamerConfig(**WINDOWS, decode_workers=1))
    pooled, pooled_errors, pooled_frames = stream(specs, StreamerConfig(**WINDOWS, decode_workers=2))
    assert len(alone) >= 20
    assert as_data(pooled) == as_data(alone)  # per source: ids, order, indices, timestamps, pixels, intrinsics
    assert sorted(pooled_errors) == sorted(alone_errors)
    reasons = {(s, r) for s, r, _ in pooled_errors}
    assert {(source_name(clips[3]), "empty_file"), (source_name(clips[4]), "open_failed"),
            (source_name(clips[6]), "too_short"), (source_name(clips[7]), "missing")} <= reasons
    assert any(s == source_name(clips[5]) for s, _ in reasons)  # the corrupt clip says why
    assert pooled_frames == alone_frames  # decode_frames_total per source, counted from the workers' reports


class Held:
    """A worker's windows as ``window_stream`` sees them: ``ready`` says whether one is in; asking
    for one that is not fails the test (the stream would have waited on it)."""

    def __init__(self, name: str, count: int, ready: bool):
        self.name, self.left, self.ready = name, count, ready

    def __iter__(self):
        return self

    def __next__(self):
        assert self.ready, f"{self.name} asked while it had no window in"
        if not self.left:
            raise StopIteration
        self.left -= 1
        return Window(f"{self.name}:0:{self.left}", self.name, [])


def test_a_source_without_a_window_ready_does_not_hold_the_others_back(monkeypatch):
    """Round robin over the sources that have a window in: a slow one is passed over, and the
    stream waits (for a worker's next report) only when none has one."""
    held = {"slow": Held("slow", 2, ready=False), "fast": Held("fast", 3, ready=True)}
    monkeypatch.setattr(service, "source_windows", lambda source, cfg, **kw: held[source.name])
    waits = []

    def wait_for_arrival(seen, timeout):  # the slow worker's first window comes in
        waits.append(seen)
        held["slow"].ready = True

    monkeypatch.setattr(workers, "wait_for_arrival", wait_for_arrival)
    sources = [SimpleNamespace(name="slow"), SimpleNamespace(name="fast")]
    cfg = StreamerConfig(**WINDOWS, decode_workers=1)
    ids = [w.window_id for w in window_stream(lambda: sources, cfg, on_frame=lambda s: None, on_error=Events(),
                                              log=logging.getLogger("test"))]
    assert ids == ["fast:0:2", "fast:0:1", "fast:0:0", "slow:0:1", "slow:0:0"]
    assert len(waits) == 1  # once fast was done and slow had nothing in


def test_with_a_worker_per_core_no_more_sources_are_decoded_at_once_than_workers(monkeypatch):
    """``decode_workers: 0`` gives a worker per core, at most ``interleave``; sources beyond the
    workers would be decoded in the streamer process on the workers' cores, so no more start."""
    started, ended = [], []

    class Counted(Held):
        def __next__(self):
            try:
                return super().__next__()
            except StopIteration:
                ended.append(self.name)
                raise

    def source_windows(source, cfg, **kw):
        started.append(source.name)
        assert len(started) - len(ended) <= 2, "more sources at once than workers"
        return Counted(source.name, 2, ready=True)

    monkeypatch.setattr(service, "source_windows", source_windows)
    monkeypatch.setattr(workers, "available_cores", lambda: 2)
    sources = [SimpleNamespace(name=f"s{i}") for i in range(5)]
    cfg = StreamerConfig(**{**WINDOWS, "decode_workers": 0, "interleave": 16})
    windows = list(window_stream(lambda: sources, cfg, on_frame=lambda s: None, on_error=Events(),
                                 log=logging.getLogger("test")))
    assert len(windows) == 10 and sorted(started) == sorted(ended) == [f"s{i}" for i in range(5)]


def test_workers_resume_where_progress_says(clips, tmp_path):
    """A source resumed at frame 12 gives the windows from there, with workers as without, and
    those of a run never stopped (the blur test starts with the history window 12 was made
    with, carried to the worker and back); acknowledged windows are skipped in the caller
    either way."""
    specs = [str(clips[0]), str(clips[1])]
    name = source_name(clips[0])
    whole = as_data(stream(specs, StreamerConfig(**WINDOWS, decode_workers=1))[0])[name]
    history = {wid: blur for wid, *_, blur in whole}
    assert len(history[f"{name}:0:12"]) >= 5  # the blur test runs at once on the resumed source
    runs = []
    for count in (1, 2):
        path = tmp_path / f"progress-{count}.json"
        first = Progress(path)
        for wid in (f"{name}:0:12", f"{name}:0:18"):
            first.made(name, wid, history[wid])
        first.acked(f"{name}:0:18")  # out of order: 12 still out, so the source resumes at 12
        first.save()
        progress = Progress(path)
        assert progress.start_frame(name) == 12
        windows, errors, _ = stream(specs, StreamerConfig(**WINDOWS, decode_workers=count), progress)
        runs.append((as_data(windows), errors))
        assert runs[-1][0][name] == [w for w in whole if w[0] != f"{name}:0:18"
                                     and int(w[0].rsplit(":", 1)[1]) >= 12]
    assert runs[0] == runs[1]


@pytest.mark.parametrize("workers", [1, 2])
def test_an_image_sequence_read_without_ground_truth_gives_the_same_windows_without_it(tmp_path, workers):
    """When no stage trains on ground truth the streamer neither reads a sequence's depth and
    poses nor sends them; everything else about the windows is the same."""
    folder = tmp_path / "seq"
    folder.mkdir()
    for i, rgb in enumerate(panning_frames(24, 96, 64, step=3, seed=1)):
        cv2.imwrite(str(folder / f"frame-{i:06d}.color.jpg"), rgb[..., ::-1])
        cv2.imwrite(str(folder / f"frame-{i:06d}.depth.png"), np.full((64, 96), 1000 + i, np.uint16))
        (folder / f"frame-{i:06d}.pose.txt").write_text("1 0 0 0\n0 1 0 0\n0 0 1 0\n0 0 0 1\n")
    cfg = StreamerConfig(**WINDOWS, decode_workers=workers)
    with_gt, errors, _ = stream([str(folder)], cfg)
    without, errors_without, _ = stream([str(folder)], cfg, ground_truth=False)
    assert with_gt and as_data(without) == as_data(with_gt) and errors == errors_without == []
    assert all({"gt_depth", "gt_cam_to_world"} <= set(w.to_message().arrays) for w in with_gt)
    assert all(v.gt_depth is None and v.gt_cam_to_world is None for w in without for v in w.views)
    assert all(not {"gt_depth", "gt_cam_to_world"} & set(w.to_message().arrays) for w in without)


def test_worker_count_and_pool_reuse():
    assert workers.available_cores() >= 1
    assert workers.worker_count(StreamerConfig(decode_workers=0, interleave=64)) == min(workers.available_cores(), 64)
    assert workers.worker_count(StreamerConfig(decode_workers=0, interleave=1)) == 1
    assert workers.worker_count(StreamerConfig(decode_workers=3)) == 3
    assert workers.pool_for(StreamerConfig(decode_workers=1)) is None
    pool = workers.pool_for(StreamerConfig(decode_workers=2))
    assert pool is workers.pool_for(StreamerConfig(decode_workers=2))  # one pool per configuration
    with pytest.raises(ValueError, match="decode_workers"):
        StreamerConfig(decode_workers=-1)


def test_window_message_round_trip():
    """A window as it crosses a worker's pipe (the wire format's ``window``), ground truth too."""
    from types import SimpleNamespace

    clip_cfg = StreamerConfig(**{**WINDOWS, "views": 2, "frame_stride": 1, "keyframe_min_flow": 0})
    builder = builder_for("s", clip_cfg)
    window = None
    for i, rgb in enumerate(panning_frames(6, 64, 48, step=4)):
        gt = np.full((24, 32), 2.0, np.float32)
        window = window or next(iter(builder.push(SimpleNamespace(index=i, timestamp=0.1 * i, rgb=rgb,
                                                                  intrinsics=np.eye(3), gt_depth=gt,
                                                                  gt_cam_to_world=np.eye(4)))), None)
    back = workers.window_from_frames(workers.window_message_frames(window))
    a, b = window.to_message(), back.to_message()
    assert a.meta == b.meta and a.arrays.keys() == b.arrays.keys()
    for key in a.arrays:
        np.testing.assert_array_equal(a.arrays[key], b.arrays[key])


# ----------------------------------------------------------------------------- the glance

def test_glance_from_decoder_planes_agrees_with_glance_from_rgb(tmp_path):
    """What the cut and keyframe tests see, made from the decoder's planes (no RGB conversion of
    the frame) or from the RGB frame: grey images within about a grey level, and the cut test
    (grey-thumbnail and hue-saturation jumps between consecutive frames) finds the one cut of a
    clip, and only it, either way."""
    import cv2

    scene_a = panning_frames(8, 160, 120, step=5)
    scene_b = (panning_frames(8, 160, 120, step=5, seed=7)[..., ::-1] * 0.5).astype(np.uint8)  # another place
    clip = encode(tmp_path / "cut.mp4", np.concatenate([scene_a, scene_b]))
    stats = {"planes": [], "rgb": []}
    with av.open(str(clip)) as container:
        for vframe in container.decode(video=0):
            planes = glance_of_video_frame(vframe)
            rgb = glance_of_rgb(vframe.to_ndarray(format="rgb24"))
            assert planes is not None and planes.grey.shape == rgb.grey.shape == (120, 160)
            assert np.abs(planes.grey.astype(int) - rgb.grey).mean() < 1.5
            for key, seen in (("planes", planes), ("rgb", rgb)):
                stats[key].append((thumbnail(seen.grey), hs_histogram(seen.colour)))
    cfg = StreamerConfig()
    for key, frames in stats.items():
        cuts = [i for i in range(1, len(frames))
                if np.abs(frames[i][0] - frames[i - 1][0]).mean() > cfg.scene_cut_motion
                or cv2.compareHist(frames[i][1], frames[i - 1][1], cv2.HISTCMP_BHATTACHARYYA) > cfg.scene_cut_hist]
        assert cuts == [8], key


def samples(vframe) -> list[np.ndarray]:
    """A planar frame's planes, without the padding at the end of their rows (as the glance
    reads them)."""
    return [_plane(vframe, i) for i in range(len(vframe.planes))]


def nv12_twin(vframe) -> av.VideoFrame:
    """The same picture as a yuv420p frame in NV12 (what a GPU decoder hands back): its luma,
    and its two chroma planes interleaved byte by byte."""
    y, u, v = samples(vframe)
    twin = av.VideoFrame(vframe.width, vframe.height, "nv12")
    for plane, rows in zip(twin.planes, (y, np.stack([u, v], axis=-1).reshape(u.shape[0], -1))):
        buf = np.zeros((plane.height, plane.line_size), np.uint8)
        buf[:, :rows.shape[1]] = rows
        plane.update(buf.tobytes())
    return twin


@pytest.mark.parametrize("turns", [0, 1, 2, 3])
def test_glance_from_nv12_planes_is_the_glance_from_the_same_yuv420p_planes(tmp_path, turns):
    """A GPU decoder's NV12 frame gives the glance its yuv420p twin gives, to the bit (the same
    samples, the chroma read interleaved), upright by the same quarter turns."""
    clip = encode(tmp_path / "pan.mp4", panning_frames(3, 160, 120, step=5))
    with av.open(str(clip)) as container:
        for vframe in container.decode(video=0):
            assert vframe.format.name == "yuv420p"
            back = nv12_twin(vframe).reformat(format="yuv420p")  # the twin holds the same samples
            for p, q in zip(samples(vframe), samples(back)):
                np.testing.assert_array_equal(p, q)
            want, got = glance_of_video_frame(vframe, turns), glance_of_video_frame(nv12_twin(vframe), turns)
            np.testing.assert_array_equal(got.grey, want.grey)
            np.testing.assert_array_equal(got.colour, want.colour)


def ten_bit_twin(vframe, fmt: str) -> av.VideoFrame:
    """An 8-bit planar frame's picture in the 10-bit format ``fmt`` (each sample times 4; an alpha
    plane left as allocated: the glance does not read it), or in P010 (``p010le``: a yuv420p
    frame's, times 4 and held 6 bits up, the chroma interleaved)."""
    planes = [p.astype(np.uint16) * 4 for p in samples(vframe)]
    if fmt == "p010le":
        y, u, v = (p << 6 for p in planes)
        planes = [y, np.stack([u, v], axis=-1).reshape(u.shape[0], -1)]
    twin = av.VideoFrame(vframe.width, vframe.height, fmt)
    for plane, rows in zip(twin.planes, planes):
        buf = np.zeros((plane.height, plane.line_size // 2), np.uint16)
        buf[:, :rows.shape[1]] = rows
        plane.update(buf.tobytes())
    return twin


@pytest.mark.parametrize("fmt", ["yuv420p10le", "yuv422p10le", "yuv444p10le", "yuva444p10le", "p010le"])
@pytest.mark.parametrize("turns", [0, 1])
def test_glance_from_10_bit_planes_is_the_glance_of_the_same_picture_in_8_bits(fmt, turns):
    """HEVC Main 10, ProRes and a GPU decoder's P010 frames are glanced from their planes too
    (before, they were converted to RGB in full). The 10-bit path rounds its resizes in quarter
    levels where the 8-bit path rounds in whole ones (up to half a level at each of two steps),
    then rounds to 8 bits: grey within 2 levels; the colour image, whose chroma the conversion
    to RGB multiplies by up to 1.772 (BT.601's blue), within 5."""
    rgb = panning_frames(1, 320, 240)[0]
    vframe = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p" if fmt == "p010le" else
                                                                    fmt.replace("10le", "").replace("yuva", "yuv"))
    twin = ten_bit_twin(vframe, fmt)
    want, got = glance_of_video_frame(vframe, turns), glance_of_video_frame(twin, turns)
    assert got is not None and got.grey.shape == want.grey.shape and got.grey.dtype == np.uint8
    assert np.abs(got.grey.astype(int) - want.grey).max() <= 2
    assert np.abs(got.colour.astype(int) - want.colour).max() <= 5


def decoded(src: VideoSource) -> list:
    """(index, glance, RGB) of every frame of ``src``."""
    return [(f.index, f.glance, f.rgb) for f in src.frames()]


@pytest.mark.skipif(cuda_decoder_problem() is None, reason="this host has a CUDA video decoder")
def test_a_video_sent_to_a_gpu_decoder_the_host_lacks_says_so_once_and_decodes_on_the_cpu(tmp_path):
    clip = encode(tmp_path / "pan.mp4", panning_frames(6, 64, 48))
    errors = Events()
    src = VideoSource(clip, decoder="cuda", on_error=errors)
    first = decoded(src)
    again = decoded(src)  # a second pass (the streamer loops) says nothing more
    assert [e[1] for e in errors] == ["gpu_decode_unavailable"] and src.decoder == "cpu"
    assert "decoding on the CPU" in errors[0][2]
    want = decoded(VideoSource(clip))
    for frames in (first, again):
        assert [f[0] for f in frames] == [f[0] for f in want]
        for (_, glance, rgb), (_, want_glance, want_rgb) in zip(frames, want):
            np.testing.assert_array_equal(rgb, want_rgb)
            np.testing.assert_array_equal(glance.grey, want_glance.grey)


@pytest.mark.skipif(cuda_decoder_problem() is not None, reason=str(cuda_decoder_problem()))
def test_a_gpu_decoder_gives_the_frames_and_glances_of_the_cpu_decoder(tmp_path):
    """H.264 decoding is exact, so NVDEC's frames hold the CPU decoder's samples: the same
    indices and glances to the bit, including frames left undecoded for the keyframe gate
    (B-frames skipped inside the decoder), and RGB within the few levels by which FFmpeg's
    conversions of NV12 and of yuv420p upsample the chroma differently (3-4 levels on average)."""
    clip = encode(tmp_path / "pan.mp4", panning_frames(24, 160, 120, step=4))
    errors = Events()
    got, want = decoded(VideoSource(clip, decoder="cuda", on_error=errors)), decoded(VideoSource(clip))
    assert not errors
    assert [f[0] for f in got] == [f[0] for f in want]
    for (_, glance, rgb), (_, want_glance, want_rgb) in zip(got, want):
        np.testing.assert_array_equal(glance.grey, want_glance.grey)
        np.testing.assert_array_equal(glance.colour, want_glance.colour)
        assert np.abs(rgb.astype(int) - want_rgb).mean() < 8
    # the windows, in the streamer process and in a decode worker
    for workers_ in (1, 2):
        runs = [stream([str(clip)], StreamerConfig(**WINDOWS, decoder=d, decode_workers=workers_))
                for d in ("cuda", "cpu")]
        assert not runs[0][1] and runs[0][0]
        assert [[v.index for v in w.views] for w in runs[0][0]] == [[v.index for v in w.views] for w in runs[1][0]]


@pytest.mark.skipif(cuda_decoder_problem() is not None, reason=str(cuda_decoder_problem()))
def test_a_gpu_decoder_glances_at_10_bit_hevc_from_its_planes_as_the_cpu_decoder_does(tmp_path):
    """HEVC Main 10 (phones' HDR video): NVDEC hands back P010, the CPU decoder yuv420p10le, the
    same samples; both are glanced at from their planes, within the bounds of
    ``test_glance_from_10_bit_planes_is_the_glance_of_the_same_picture_in_8_bits``."""
    from streamer.sources import _open_video

    clip = encode(tmp_path / "pan10.mp4", panning_frames(12, 256, 192, step=4), codec="libx265",
                  pix_fmt="yuv420p10le")
    with _open_video(str(clip), "cuda") as container:
        assert next(container.decode(video=0)).format.name == "p010le"  # decoded on the GPU
    errors = Events()
    got, want = decoded(VideoSource(clip, decoder="cuda", on_error=errors)), decoded(VideoSource(clip))
    assert not errors and [f[0] for f in got] == [f[0] for f in want]
    for (_, glance, _), (_, want_glance, _) in zip(got, want):
        assert np.abs(glance.grey.astype(int) - want_glance.grey).max() <= 2
        assert np.abs(glance.colour.astype(int) - want_glance.colour).max() <= 5


def test_video_frames_convert_to_rgb_only_when_asked(tmp_path):
    truth = panning_frames(6, 64, 48)
    src = VideoSource(encode(tmp_path / "pan.mp4", truth))
    frames = list(src.frames())
    assert all(callable(f._rgb) and f.glance is not None for f in frames)  # nothing converted yet
    assert frames[2].rgb.shape == (48, 64, 3) and np.abs(frames[2].rgb.astype(int) - truth[2]).mean() < 12
    with av.open(str(src.path)) as container:  # the same pixels as PyAV's own conversion
        np.testing.assert_array_equal(frames[2].rgb, list(container.decode(video=0))[2].to_ndarray(format="rgb24"))


@pytest.mark.skipif(not KITCHEN.is_dir(), reason=f"7-Scenes frames absent ({KITCHEN})")
def test_image_sequence_ground_truth_read_when_asked():
    src = ImageSequenceSource(KITCHEN)
    frame = next(iter(src.frames()))
    assert callable(frame._gt_depth) and callable(frame._gt_cam_to_world)
    assert frame.gt_depth.shape == (480, 640) and frame.gt_cam_to_world.shape == (4, 4)
    assert not callable(frame._gt_depth)  # read once, kept



def test_jpeg_frames_glanced_at_a_reduced_scale_and_decoded_in_full_when_asked(tmp_path):
    import cv2

    from streamer.sources import jpeg_size, read_image, read_image_glance

    rgb = panning_frames(1, 400, 300)[0]
    for name, params in (("a.jpg", [cv2.IMWRITE_JPEG_QUALITY, 90]),
                         ("p.jpg", [cv2.IMWRITE_JPEG_QUALITY, 90, cv2.IMWRITE_JPEG_PROGRESSIVE, 1])):
        cv2.imwrite(str(tmp_path / name), rgb[..., ::-1], params)
        assert jpeg_size((tmp_path / name).read_bytes()) == (300, 400)
        full, small, size, _ = read_image_glance(tmp_path / name)
        assert callable(full) and size == (300, 400) and small.shape == (150, 200, 3)  # half scale: >= 160 wide
        np.testing.assert_array_equal(full(), read_image(tmp_path / name))
        assert np.abs(cv2.resize(read_image(tmp_path / name), (200, 150), interpolation=cv2.INTER_AREA).astype(int)
                      - small).mean() < 6  # a noise texture: chroma detail differs most
    cv2.imwrite(str(tmp_path / "b.png"), rgb[..., ::-1])
    full, small, size, _ = read_image_glance(tmp_path / "b.png")  # not a JPEG: decoded in full at once
    assert small is None and size == (300, 400) and full.shape == (300, 400, 3)
    assert jpeg_size(b"\xff\xd8\xff\xda") is None and jpeg_size(b"not a jpeg") is None


def test_a_still_camera_is_tried_less_often_and_its_next_view_comes_within_a_stride():
    """40 still frames, then a pan: still candidates back off to every frame_stride-th frame,
    and the first view after the camera moves comes at most frame_stride - 1 frames after the
    first frame that moved enough (what trying every frame would have kept)."""
    from types import SimpleNamespace

    from streamer import windows as W

    pan = panning_frames(40, 160, 120, step=3, seed=5)
    frames = [pan[0]] * 40 + list(pan)
    cfg = StreamerConfig(views=2, frame_stride=4, window_step=1, keyframe_min_motion=0, blur_ratio=0)
    builder = builder_for("s", cfg)
    tracked = []
    real = W.camera_motion

    def counted(*args, **kwargs):
        tracked.append(1)
        return real(*args, **kwargs)

    W.camera_motion = counted
    try:
        views = []
        for i, rgb in enumerate(frames):
            for window in builder.push(SimpleNamespace(index=i, timestamp=float(i), rgb=rgb, intrinsics=np.eye(3),
                                                       gt_depth=None, gt_cam_to_world=None)):
                views.extend(v.index for v in window.views)
    finally:
        W.camera_motion = real
    assert builder.skipped_still < 20 and len(tracked) < 40  # every frame: 39 still candidates tracked
    after = sorted(v for v in set(views) if v >= 40)
    assert after and after[0] <= 40 + cfg.frame_stride  # the pan moves 3 px a frame: frame 41 is the first with 2 px


def test_a_worker_that_dies_fails_its_source_and_is_replaced(tmp_path):
    import multiprocessing

    cfg = StreamerConfig(**WINDOWS, decode_workers=2)
    pool = workers.WorkerPool(cfg, 1)
    try:  # long enough that the worker cannot have read it all ahead (a few windows at most)
        src = VideoSource(encode(tmp_path / "long.mp4", panning_frames(240, 96, 64, step=3)))
        it = workers.source_windows(src, cfg, start=0, pass_index=0, on_frame=lambda s: None,
                                    on_error=lambda *e: None, pool=pool)
        assert next(it).window_id == f"{src.name}:0:0"
        for child in multiprocessing.active_children():
            if child.name == "streamer-decode":
                child.kill()
        with pytest.raises(RuntimeError, match="decode worker"):
            for _ in it:  # windows read ahead may still come, then the loss
                pass
        assert pool.started == 0  # replaced on the next source
        again = list(workers.source_windows(src, cfg, start=0, pass_index=0, on_frame=lambda s: None,
                                            on_error=lambda *e: None, pool=pool))
        assert again and again[0].window_id == f"{src.name}:0:0"
    finally:
        pool.close()
