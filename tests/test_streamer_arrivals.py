"""Files that arrive in a watched source while a run runs (an upload folder, a camera's sync
folder, an rsync or scp target): temporaries written before a rename, files still growing,
files replaced or made readable later. Real files, the real discovery and window stream."""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np

from streamer.config import StreamerConfig
from streamer.service import window_stream
from streamer.sources import discover, source_name
from streamer_media import encode, panning_frames


class Errors(list):
    def __call__(self, source, reason, detail):
        self.append((source, reason, detail))

    def reasons(self):
        return [r for _, r, _ in self]


FAST = dict(views=2, height=16, width=16, frame_stride=1, window_step=2, loop=False, keyframe_min_motion=0,
            keyframe_min_flow=0, blur_ratio=0, scene_cut_motion=0, scene_cut_hist=0)

TEMPORARIES = (".clip.ts.Xy12Ab",  # rsync's, until it renames the file into place
               "._clip.ts",  # macOS's AppleDouble file beside a copied video
               ".syncthing.clip.ts.tmp", "~syncthing~clip.ts.tmp",  # Syncthing's
               "clip.ts.part", "clip.ts.partial", "clip.ts.tmp", "clip.ts.crdownload", "clip.ts.filepart",
               "clip.ts.!sync", "clip.ts~")


def test_temporaries_written_before_a_rename_are_no_sources(tmp_path):
    """A folder and a glob that receive files through temporaries (rsync's hidden
    ``.name.XXXXXX``, a browser's ``.part``, ``.tmp``, an editor's ``~``) hold the file's first
    part under another name until it is renamed into place. Such a name is no source: read, it
    sent the first part's windows under a name of its own (the renamed file's are sent again),
    and its cut end went unsaid (MPEG-TS ends cleanly where it was cut). Only the file renamed
    into place is read; a temporary named in a spec of its own is read, as any named file is."""
    folder = tmp_path / "uploads"
    folder.mkdir()
    clip = encode(folder / "clip.ts", panning_frames(30, 64, 48))
    first_part = clip.read_bytes()[: clip.stat().st_size // 2]
    for name in TEMPORARIES:
        (folder / name).write_bytes(first_part)
    for spec in (str(folder), str(folder / "*")):
        errors = Errors()
        assert [s.path for s in discover([spec], on_error=errors)] == [clip], spec
        assert errors == []
        windows = window_stream(lambda: discover([spec], on_error=errors), StreamerConfig(**FAST),
                                on_frame=lambda s: None, on_error=errors, log=logging.getLogger("t"))
        assert {w.source for w in windows} == {source_name(clip)} and errors == []
    named = folder / "clip.ts.part"
    assert [s.path for s in discover([str(named)], on_error=Errors())] == [named]


def test_an_image_folders_temporaries_are_no_frames(tmp_path):
    """An image folder receiving frames through temporaries reads the frames renamed into
    place alone (hidden names and names whose suffix is no image's were never frames)."""
    folder = tmp_path / "frames"
    folder.mkdir()
    frames = panning_frames(6, 64, 48)
    for k, rgb in enumerate(frames):
        (folder / f"frame-{k}.png").write_bytes(cv2.imencode(".png", rgb[..., ::-1])[1].tobytes())
    data = (folder / "frame-0.png").read_bytes()
    for name in (".frame-6.png.Xy12Ab", "._frame-6.png", "frame-6.png.part", "frame-6.png.tmp", "frame-6.png~"):
        (folder / name).write_bytes(data[: len(data) // 2])
    errors = Errors()
    [source] = discover([str(folder)], on_error=errors)
    read = [f.rgb for f in source.frames()]
    assert len(read) == 6 and all(np.array_equal(a, b) for a, b in zip(read, frames)) and errors == []
