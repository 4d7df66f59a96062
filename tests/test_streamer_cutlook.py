"""The cut test looks at every ``CUT_LOOK_EVERY``-th frame and at candidates only, and at the
frames between when two frames looked at differ (``streamer.windows``, issue 18): the same cuts,
views and windows as looking at every frame, on clips with hard cuts the tests encode; and
views of a JPEG folder made from the JPEG's reduced decode (``fit_rgb_reduced``) without
decoding the frame in full."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from streamer import windows as W
from streamer.config import StreamerConfig
from streamer.sources import ImageSequenceSource, VideoSource, read_image
from streamer.windows import Wanted, fit_rgb, windows_of
from streamer_media import encode, panning_frames

TINTS = [(1.0, 0.5, 0.3), (0.3, 0.6, 1.0), (0.6, 1.0, 0.4), (1.0, 1.0, 1.0)]
SCENES = [23, 30, 9, 26]
"""Frames per scene: cuts at 23, 53 and 62 (not on multiples of the look step)."""
LOOK_EVERY = W.CUT_LOOK_EVERY


def cut_frames(width: int = 128, height: int = 96) -> np.ndarray:
    scenes = []
    for s, (n, tint) in enumerate(zip(SCENES, TINTS)):
        pan = panning_frames(n, width, height, step=3, seed=10 + s).astype(np.float32)
        scenes.append(np.clip(pan * np.array(tint, np.float32), 0, 255).astype(np.uint8))
    return np.concatenate(scenes)


@pytest.fixture(scope="module", params=["libx264", "mpeg4"])
def cut_clip(request, tmp_path_factory):
    """Hard cuts in H.264 with B-frames (frames left undecoded too) and in MPEG-4 (none)."""
    return encode(tmp_path_factory.mktemp("cuts") / f"cuts_{request.param}.mp4", cut_frames(), codec=request.param)


def run(path, look_every: int, monkeypatch, *, skip: bool, gap_at: int | None = None):
    monkeypatch.setattr(W, "CUT_LOOK_EVERY", look_every)
    cfg = StreamerConfig(views=3, height=32, width=48, frame_stride=3, window_step=4, loop=False)
    src = VideoSource(path, decode_threads=1)
    wanted = Wanted() if skip else None
    seen = []

    def frames():
        for f in src.frames(wanted=wanted):
            if f.index == gap_at:
                f.discontinuity = True
            seen.append(f)
            yield f

    built = []
    real = W.builder_for

    def builder_for(*a, **k):
        built.append(real(*a, **k))
        return built[-1]

    monkeypatch.setattr(W, "builder_for", builder_for)
    out = [(w.window_id, [v.index for v in w.views], np.stack([v.rgb for v in w.views]).tobytes())
           for w in windows_of(src.name, frames(), cfg, wanted=wanted)]
    looked = sum(not callable(f._glance) for f in seen)
    return out, built[0].cuts, looked, len(seen)


@pytest.mark.parametrize("skip", [False, True])
def test_same_cuts_and_windows_as_looking_at_every_frame(cut_clip, monkeypatch, skip):
    every, cuts_every, looked_every, decoded_every = run(cut_clip, 1, monkeypatch, skip=skip)
    sparse, cuts_sparse, looked_sparse, _ = run(cut_clip, LOOK_EVERY, monkeypatch, skip=skip)
    # MPEG-4 at its default bit rate smears the first frames after a cut: a second jump there
    assert cuts_every >= len(SCENES) - 1 and cuts_sparse == cuts_every
    assert every and sparse == every
    assert looked_every == decoded_every and looked_sparse < 0.8 * looked_every  # fewer frames looked at
    firsts = {int(w[0].rsplit(":", 1)[1]) for w in sparse}
    bounds = np.cumsum(SCENES)[:-1]
    assert not any(f < b <= f + 6 for f in firsts for b in bounds)  # no window spans a cut


def test_a_gap_among_frames_not_looked_at(cut_clip, monkeypatch):
    """A frame flagged ``discontinuity`` (damage, a reconnect) right after frames not looked at."""
    for gap_at in (14, 38, 55):
        every, cuts_every, _, _ = run(cut_clip, 1, monkeypatch, skip=False, gap_at=gap_at)
        sparse, cuts_sparse, _, _ = run(cut_clip, LOOK_EVERY, monkeypatch, skip=False, gap_at=gap_at)
        assert sparse == every and cuts_sparse == cuts_every


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("jpegs")
    for i, rgb in enumerate(panning_frames(24, 640, 480, step=12, seed=4)):
        cv2.imwrite(str(folder / f"frame-{i:06d}.color.jpg"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        cv2.imwrite(str(folder / f"frame-{i:06d}.depth.png"), np.full((480, 640), 1000 + i, np.uint16))
    return folder


@pytest.mark.parametrize("size", [(96, 128), (120, 160), (48, 48)])
def test_views_from_the_reduced_jpeg_decode(jpeg_folder, size):
    src = ImageSequenceSource(jpeg_folder)
    frames = list(src.frames())
    assert all(f.reduced is not None and f.reduced[0] == 4 for f in frames)
    for f in frames[:6]:
        view = W.resize_view(f, size[1], size[0])
        assert callable(f._rgb)  # the frame was never decoded in full
        full = read_image(jpeg_folder / f"frame-{f.index:06d}.color.jpg")
        assert view.rgb.shape == fit_rgb(full, *size).shape == (*size, 3)
        # as one box filter from another: 0.4-0.7 grey levels on 7-Scenes, more on this fine noise
        assert np.abs(view.rgb.astype(np.float32) - fit_rgb(full, *size)).mean() < 3.0
        K = W.imaging.fit_intrinsics(f.intrinsics, 480, 640, *size)
        np.testing.assert_allclose(view.intrinsics, K)
        assert view.gt_depth.shape == size and np.all(view.gt_depth == (1000 + f.index) / 1000)


def test_views_that_need_more_detail_decode_in_full(jpeg_folder):
    f = next(iter(ImageSequenceSource(jpeg_folder).frames()))
    view = W.resize_view(f, 224, 168)  # one halving: the 1/4 decode has too few pixels
    assert not callable(f._rgb) and view.rgb.shape == (168, 224, 3)
    assert np.array_equal(view.rgb, fit_rgb(f.rgb, 168, 224))


def _views(src: ImageSequenceSource, frames=None):
    cfg = StreamerConfig(views=3, frame_stride=3, window_step=3, loop=False)
    frames = src.frames() if frames is None else frames
    return [([v.index for v in w.views], np.stack([v.rgb for v in w.views]).tobytes())
            for w in windows_of(src.name, frames, cfg)]


def _eager(monkeypatch):
    """Every JPEG decoded when read, as before the lazy decode."""
    from streamer import sources

    real = sources.read_image_glance
    monkeypatch.setattr(sources, "read_image_glance", lambda file, lazy=False: real(file))


def test_jpegs_never_looked_at_are_never_decoded(jpeg_folder, monkeypatch):
    """A JPEG folder's frames are decoded (at the reduced scale) only when a test looks at
    them: the same windows, pixels and all, as decoding every frame when read, with fewer
    decodes."""
    from streamer import sources

    decoded = []
    real = sources._decode_image
    monkeypatch.setattr(sources, "_decode_image", lambda file, data, flag=cv2.IMREAD_COLOR:
                        decoded.append(file.name) or real(file, data, flag))
    src = ImageSequenceSource(jpeg_folder, ground_truth=False)
    lazy = _views(src)
    lazy_decodes = len(decoded)
    decoded.clear()
    _eager(monkeypatch)
    assert lazy and lazy == _views(src)
    assert len(decoded) == len(src.files) and lazy_decodes < len(src.files)


def _bad_jpeg(data: bytes) -> bytes:
    """A JPEG whose markers, size and end check out but that libjpeg cannot decode (a Huffman
    table of a class that does not exist)."""
    at = data.find(b"\xff\xc4")
    return data[: at + 4] + b"\x7f" + data[at + 5:]


def test_an_undecodable_jpeg_is_a_gap_when_looked_at(jpeg_folder, tmp_path, monkeypatch):
    clean = ImageSequenceSource(jpeg_folder, ground_truth=False)
    frames = list(clean.frames())
    _views(clean, iter(frames))
    looked = [f.index for f in frames if not callable(f._glance)]
    unlooked = [i for i in range(2, len(frames) - 2) if i not in looked]
    assert unlooked, looked
    for bad, reported in ((looked[3], ["bad_image"]), (unlooked[0], [])):
        folder = tmp_path / f"bad{bad}"
        folder.mkdir()
        for f in clean.files:
            data = f.read_bytes()
            (folder / f.name).write_bytes(_bad_jpeg(data) if f.name == clean.files[bad].name else data)
        errors = []
        src = ImageSequenceSource(folder, ground_truth=False, on_error=lambda *e: errors.append(e))
        windows = _views(src)
        assert [e[1] for e in errors] == reported and all(clean.files[bad].name in e[2] for e in errors)
        if reported:  # no window spans the frame lost
            assert windows and all(max(w) < bad or min(w) > bad for w, _ in windows), (bad, windows)
        else:  # never looked at: as if it were good
            assert windows == _views(clean)


def test_a_jpeg_with_exif_is_decoded_when_read(tmp_path):
    """An Exif orientation may turn the decoded image (and swap its sides): such a JPEG is
    decoded when read, as before."""
    from streamer.sources import jpeg_layout, read_image_glance

    ok, data = cv2.imencode(".jpg", panning_frames(1, 400, 300)[0])
    tiff = b"II*\x00\x08\x00\x00\x00" + b"\x00\x00" + b"\x00\x00\x00\x00"  # no entries
    app1 = b"\xff\xe1" + (2 + 6 + len(tiff)).to_bytes(2, "big") + b"Exif\x00\x00" + tiff
    (tmp_path / "plain.jpg").write_bytes(data.tobytes())
    (tmp_path / "exif.jpg").write_bytes(data.tobytes()[:2] + app1 + data.tobytes()[2:])
    assert jpeg_layout((tmp_path / "plain.jpg").read_bytes()) == (300, 400, False)
    assert jpeg_layout((tmp_path / "exif.jpg").read_bytes()) == (300, 400, True)
    _, small, _, _ = read_image_glance(tmp_path / "plain.jpg", lazy=True)
    assert callable(small) and small().shape == (150, 200, 3)
    _, small, _, _ = read_image_glance(tmp_path / "exif.jpg", lazy=True)
    assert not callable(small) and small.shape == (150, 200, 3)
