"""Files that arrive in a watched source while a run runs (an upload folder, a camera's sync
folder, an rsync or scp target): temporaries written before a rename, files still growing,
files replaced or made readable later. Real files, the real discovery and window stream."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from streamer.config import StreamerConfig
from streamer.service import window_stream
from streamer.sources import discover, source_name
from streamer_media import EVERY_SECOND_FRAME as FAST
from streamer_media import arriving as arriving_upload
from streamer_media import encode, panning_frames, still


class Errors(list):
    def __call__(self, source, reason, detail):
        self.append((source, reason, detail))

    def reasons(self):
        return [r for _, r, _ in self]


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



def _frames_of(windows) -> dict[str, list[list[int]]]:
    out: dict[str, list[list[int]]] = {}
    for w in windows:
        out.setdefault(w.source, []).append([v.index for v in w.views])
    return out


def test_a_video_still_being_written_is_read_once_it_is_still_and_whole(tmp_path):
    """A copy that arrives in a watched folder while the streamer reads it (``cp`` into an
    upload folder): before, the part copied so far was read, an MPEG-TS file's without a word
    (it ends cleanly where the copy had got to), and the source was done: its later part never
    read. A file written to within ``streamer.settle_s`` is not opened until it has been still
    that long; every other source flows meanwhile, and the run waits for it (``loop: false``)."""
    import threading

    folder = tmp_path / "uploads"
    folder.mkdir()
    whole = encode(tmp_path / "whole.ts", panning_frames(40, 64, 48)).read_bytes()
    other = still(encode(folder / "a-other.ts", panning_frames(30, 64, 48, seed=1)))
    arriving = folder / "b-arriving.ts"
    arriving.write_bytes(whole[: len(whole) // 3])  # written to just now: still arriving
    cfg = StreamerConfig(**{**FAST, "settle_s": 3600.0})
    errors, windows = Errors(), []
    others = _frames_of(window_stream(lambda: discover([str(other)]), StreamerConfig(**FAST), on_frame=lambda s: None,
                                      on_error=errors, log=logging.getLogger("t")))[source_name(other)]
    reader = threading.Thread(target=lambda: windows.extend(window_stream(
        lambda: discover([str(folder)], on_error=errors), cfg, on_frame=lambda s: None, on_error=errors,
        log=logging.getLogger("t"))), daemon=True)
    reader.start()
    for _ in range(600):  # the other source flows while the copy arrives
        if len(windows) == len(others):
            break
        reader.join(0.1)
    assert _frames_of(windows) == {source_name(other): others} and reader.is_alive() and errors == []
    with arriving.open("ab") as out:
        out.write(whole[len(whole) // 3:])
    still(arriving)
    reader.join(60)
    assert not reader.is_alive() and errors == []
    alone = _frames_of(window_stream(lambda: discover([str(arriving)]), StreamerConfig(**FAST),
                                     on_frame=lambda s: None, on_error=errors, log=logging.getLogger("t")))
    assert _frames_of(windows) == {source_name(other): others, **alone} and errors == []


@pytest.mark.parametrize("workers", [1, 0])
def test_a_video_that_grows_after_it_was_read_is_read_on_where_it_stopped(tmp_path, workers):
    """A writer that stalled longer than ``settle_s`` (a network copy, a recorder between
    chunks): the part written so far was read, the source done, the rest never read. A file
    that has grown since it was opened is read on from its last window before a finite run
    ends, said once as ``grew``: the windows are those of the whole file, each made once (in
    this process and in decode workers alike)."""
    whole, arriving = arriving_upload(tmp_path)
    folder, other = arriving.parent, arriving.parent / "b-other.ts"
    cfg = StreamerConfig(**{**FAST, "settle_s": 60.0, "interleave": 1, "decode_workers": workers})
    errors, windows = Errors(), []
    for window in window_stream(lambda: discover([str(folder)], on_error=errors), cfg, on_frame=lambda s: None,
                                on_error=errors, log=logging.getLogger("t")):
        if window.source == source_name(other) and arriving.stat().st_size < len(whole):
            with arriving.open("ab") as out:  # the first source is read: its writer goes on
                out.write(whole[len(whole) // 3:])
            still(arriving)
        windows.append(window)
    assert errors.reasons() == ["grew"] and errors[0][0] == source_name(arriving)
    alone = _frames_of(window_stream(lambda: discover([str(arriving)]), StreamerConfig(**FAST),
                                     on_frame=lambda s: None, on_error=errors, log=logging.getLogger("t")))
    assert _frames_of(windows)[source_name(arriving)] == alone[source_name(arriving)]
    assert len({w.window_id for w in windows}) == len(windows)


def _replace(path: Path, frames: np.ndarray) -> Path:
    """``path`` replaced as rsync and ``mv`` replace a file: another written elsewhere on the same
    file system, then renamed over it (a new inode under the same name), its writer finished an
    hour ago."""
    (path.parent.parent / "incoming").mkdir(exist_ok=True)
    beside = encode(path.parent.parent / "incoming" / path.name, frames)
    still(beside)
    os.replace(beside, path)
    return path


@pytest.mark.parametrize("workers", [1, 0])
def test_a_video_replaced_after_it_was_read_is_read_again_as_new_content(tmp_path, workers):
    """A file replaced under its name after it was read (rsync or ``mv`` renaming another file
    over it): the new content was never read and nothing said so. A finite run reads it from the
    start before it ends, said once as ``replaced``; its windows are those of the new file read
    alone, under ids other than the old content's (replay would drop them as duplicates)."""
    folder = tmp_path / "uploads"
    folder.mkdir()
    old, new = panning_frames(30, 64, 48, seed=2), panning_frames(40, 64, 48, seed=3)
    clip = still(encode(folder / "a-clip.ts", old))
    other = still(encode(folder / "b-other.ts", panning_frames(30, 64, 48, seed=1)))
    cfg = StreamerConfig(**{**FAST, "settle_s": 60.0, "interleave": 1, "decode_workers": workers})
    errors, windows, replaced = Errors(), [], False
    for window in window_stream(lambda: discover([str(folder)], on_error=errors), cfg, on_frame=lambda s: None,
                                on_error=errors, log=logging.getLogger("t")):
        if window.source == source_name(other) and not replaced:
            _replace(clip, new)  # the first source is read: another file takes its name
            replaced = True
        windows.append(window)
    assert errors.reasons() == ["replaced"] and errors[0][0] == source_name(clip)
    log = logging.getLogger("t")
    alone = {}
    for name, frames in (("old", old), ("new", new)):
        (tmp_path / name).mkdir()
        path = encode(tmp_path / name / "a-clip.ts", frames)
        alone[name] = _frames_of(window_stream(lambda: discover([str(path)]), StreamerConfig(**FAST),
                                               on_frame=lambda s: None, on_error=errors, log=log))[source_name(path)]
    assert _frames_of(windows)[source_name(clip)] == alone["old"] + alone["new"]
    assert len({w.window_id for w in windows}) == len(windows)
    assert len(errors) == 1


def test_a_looping_run_reads_a_video_replaced_during_a_pass_whole_on_the_next(tmp_path):
    """A looping run reads a file replaced while it was read (its reader keeps the old file
    open to its end) as new content on its next pass: the new file's windows, all of them."""
    folder = tmp_path / "uploads"
    folder.mkdir()
    clip = still(encode(folder / "clip.ts", panning_frames(30, 64, 48, seed=2)))
    new = panning_frames(40, 64, 48, seed=3)
    errors, passes = Errors(), {}
    for window in window_stream(lambda: discover([str(folder)], on_error=errors),
                                StreamerConfig(**{**FAST, "loop": True, "settle_s": 60.0}), on_frame=lambda s: None,
                                on_error=errors, log=logging.getLogger("t")):
        if not passes:
            _replace(clip, new)
        passes.setdefault(window.window_id.split(":")[1], []).append([v.index for v in window.views])
        if "2" in passes:
            break
    (tmp_path / "new").mkdir()
    path = encode(tmp_path / "new" / "clip.ts", new)
    alone = _frames_of(window_stream(lambda: discover([str(path)]), StreamerConfig(**FAST), on_frame=lambda s: None,
                                     on_error=errors, log=logging.getLogger("t")))[source_name(path)]
    assert passes["1"] == alone and errors == []


@pytest.mark.parametrize("workers", [1, 2])
def test_a_synthetic_video_replaced_after_it_was_read_is_read_again_with_its_new_ground_truth(tmp_path, workers):
    """A synthetic clip (its ground truth in ``<name>.gt.npz`` beside it, read when its source
    was made) replaced under its name by another scene's: the re-read of a finite run reused the
    source made for the old content, so decoded in this process (``decode_workers: 1``) the new
    frames carried the old scene's poses (a decode worker builds its own source of the path).
    Each window's ground truth is its own content's, before and after."""
    from reliev3r import synthetic

    folder = tmp_path / "uploads"
    folder.mkdir()
    old, new = (synthetic.render_scene(seed, frames=frames, height=48, width=64) for seed, frames in ((1, 8), (2, 10)))
    clip = still(synthetic.write_scene(old, folder, "a-clip"))
    other = still(encode(folder / "b-other.ts", panning_frames(12, 64, 48, seed=1)))
    cfg = StreamerConfig(**{**FAST, "settle_s": 60.0, "interleave": 1, "decode_workers": workers})
    errors, scenes, checked = Errors(), {"old": 0, "new": 0}, []
    for window in window_stream(lambda: discover([str(folder)], on_error=errors), cfg, on_frame=lambda s: None,
                                on_error=errors, log=logging.getLogger("t")):
        if window.source == source_name(other) and not scenes["new"]:
            still(synthetic.write_scene(new, folder, "a-clip"))  # the first source is read: another scene
            scenes["new"] = 1
        if window.source != source_name(clip):
            continue
        scene = new if scenes["new"] else old
        for view in window.views:
            truth = scene.cam_to_world[view.index].numpy()
            assert view.gt_cam_to_world is not None and np.allclose(view.gt_cam_to_world, truth, atol=1e-6), (
                scenes, view.index)
            checked.append(scenes["new"])
    assert errors.reasons() == ["replaced"] and errors[0][0] == source_name(clip)
    assert checked.count(0) == 2 * 4 and checked.count(1) == 2 * 5  # views of each content's windows
