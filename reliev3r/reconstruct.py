"""``reliev3r reconstruct``: a video or an image folder -> one point cloud, one trajectory.

``--input`` is the one video or image folder, given by its path or by a glob that matches it
(:func:`input_path`, as the streamer expands ``streamer.sources``).

The input is cut into windows of ``views`` frames (``stride`` input frames apart) where
consecutive windows share ``overlap`` frames. The model reconstructs each window in its own
similarity gauge, every window at one size (the snapshot's ``image_size``; a snapshot without
it: the first window's, which a frame turned otherwise is stretched to, as the API stretches
one: ``learner.api``). A window's poses are, by default (``--poses fitted``), fitted to the
model's depth and the window's verified matches (``learner.posefit.fit_poses`` through
``learner.api.Reconstructor.run``: the first view keeps the pose head's pose, every other is
placed by PnP on its matches to the views placed, lifted by their depth; the matches found with
the config's ``labeler.matcher`` and ``labeler.ransac_threshold_px`` on the frames at 640 pixels
on the long side, on ``labeler.cpu_threads`` threads), which scored far better than the pose
head's on held-out 7-Scenes windows (docs/RESULTS.md, "Poses fitted to the model's depth" and
"Matches at 640 pixels for the classical baseline and the fitted poses"); a view the matches do
not place keeps the pose head's pose. ``--poses model`` takes the pose head's poses for every
view. :func:`chain_windows` brings every window into the first one's frame: the depth scale from
the shared frames' median depth ratio, then the rigid motion that maps the new window's shared
camera poses onto the chain's. Units are therefore the first window's relative units, not metres.

Writes into ``--out``:

* ``points.ply``: binary PLY, coloured, confidence-filtered world points (x, y, z float32,
  red, green, blue uint8, confidence float32);
* ``poses.txt``: TUM trajectory (``timestamp tx ty tz qx qy qz qw``, camera-to-world; the
  timestamp is, for a video, the frame's time in seconds from the start of its stream, as the
  streamer times it (``streamer.sources.Frame.timestamp``), for a folder its name or index);
* ``depth/NNNNNN.png``: 16-bit depth, value = depth x 1000 in the model's relative units
  ("millimetres" of a unit that is not a metre; 0 = beyond 65.535 units, or no depth);
  ``depth_color/NNNNNN.png``: the same, colourised (turbo, near = red, shared range);
* ``trajectory.png``: top view (x-z) and side view (z-y) of the camera centres, with the
  ground truth aligned by Umeyama Sim(3) when given (``--gt-poses`` TUM file, or the input
  folder's own poses: 7-Scenes ``*.pose.txt``, a TUM ``groundtruth.txt``; a trajectory matched to
  the frames by ``evaluation.datasets.match_trajectory``, README's one rule; a frame whose pose
  file or trajectory line is no pose goes without, with a warning naming the file (and line)
  and the problem; a ``--gt-poses`` file with no line that is a pose is refused);
* ``reconstruction.json``: what was run (``poses``: ``fitted`` or ``model``, and
  ``head_pose_frames``: how many frames kept the pose head's pose, as a view the fit did not
  place (a window's first view anchors its fit: placed), every frame with ``model``; also
  printed, and ``trajectory.png``'s title says which poses),
  the intrinsics each frame was unprojected with
  (``intrinsics``: one 3x3 when every frame shares it, else one per frame; in pixels of the
  depth maps, ``image_size`` [width, height], the top-left pixel's centre at (0, 0)) and, with
  ground truth, the ATE;
* with ``--colmap bin|txt``: ``colmap/images/NNNNNN.png`` (the frames at the model's
  resolution) and ``colmap/sparse/0/`` (a COLMAP sparse model, :mod:`reliev3r.colmap`: the
  chained poses, the model's intrinsics, and the point cloud, each point observed by the pixel
  it was unprojected from).

They replace an earlier reconstruction's in the same folder, none of it left over, only once
all are written (into a hidden ``.reconstruct-*`` folder inside ``--out`` until then): a run
that fails or is stopped (Ctrl-C) leaves the folder as it was. The replacement itself
(:mod:`reliev3r.swap`) is renames recorded by a marker file (``.reconstruct.swap``) written
once the new outputs are on disk: a run killed outright (SIGKILL, power loss) during it leaves
the earlier set whole (before the marker) or the new one (after), and the next ``reconstruct``
into the folder, or ``reliev3r view`` of it, finishes the renames first.

Long inputs: frames are decoded, reconstructed and chained one window at a time and every
output above is written as its frames are chained (the PLY's vertex count is patched in at the
end; the colour depth PNGs come from a float depth spool once the colour range is known), so
peak memory is flat in the input's length (``benchmarks/reconstruct_memory.py``; what is held
is listed in :mod:`reliev3r.reconstruct_stream`). Beyond ``max_points`` points the PLY (and the
COLMAP model) keep a uniform subsample of exactly ``max_points``; ``--colmap`` holds those kept
points in memory while ``points3D`` is written. A progress bar counts frames (rate, and ETA
when the container gives the frame count).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Literal

import cv2
import numpy as np
import torch
from tqdm import tqdm

from reliev3r import geometry, imaging, swap
from reliev3r.config_base import check_device, check_device_present

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".ts")


# ---------------------------------------------------------------------- input

@dataclass(slots=True)
class Frames:
    """Frames picked from the input: RGB uint8 [H,W,3] each, their timestamps, and the
    intrinsics of the input resolution when known ([3,3] of every frame, or [N,3,3] each frame's;
    else None: 60 degree FoV assumed), and ground-truth cam_to_world [4,4] per frame where the
    input has them."""

    images: list[np.ndarray]
    timestamps: list[float]
    intrinsics: np.ndarray | None
    gt_cam_to_world: list[np.ndarray | None]


@dataclass(slots=True)
class FrameStream:
    """Frames picked from the input, decoded one at a time: ``frames`` yields (RGB uint8
    [H,W,3], timestamp); ``total`` is how many it will yield when the input says (an image
    folder, a video whose container gives its frame count), else None."""

    frames: Iterator[tuple[np.ndarray, float]]
    intrinsics: np.ndarray | None
    """[3,3] of the first frame as shown, every frame's unless :attr:`each` says otherwise; None:
    unknown (60 degree FoV assumed)"""
    gt_cam_to_world: list[np.ndarray | None] | None
    total: int | None
    match_gt: Callable[[np.ndarray], list[np.ndarray | None]] | None = None
    """A video's ground truth where a trajectory is given: the poses of the frames read, from their
    timestamps, once every frame is read (:func:`open_input`)"""
    each: list[np.ndarray] | None = None
    """Each frame's intrinsics [3,3] as it is shown, appended as :attr:`frames` yields it: an image
    folder's matrix turned with each frame's own Exif orientation. None: :attr:`intrinsics` is
    every frame's (:meth:`frame_intrinsics`)"""

    @classmethod
    def of(cls, frames: Frames) -> "FrameStream":
        K = frames.intrinsics
        each = None if K is None or np.ndim(K) == 2 else [np.asarray(k) for k in K]
        return cls(zip(frames.images, frames.timestamps), K if each is None else each[0], frames.gt_cam_to_world,
                   len(frames.images), each=each)

    def frame_intrinsics(self, k: int) -> np.ndarray | None:
        """Frame ``k``'s intrinsics [3,3] as it is shown (once :attr:`frames` has yielded it), or
        None where they are unknown."""
        return self.intrinsics if self.each is None else self.each[k]


def input_path(spec: str) -> Path:
    """``--input``: a path, or a glob (quoted, so the shell leaves it) expanded as the streamer
    expands ``streamer.sources`` (``streamer.sources.spec_paths``), which must match one input:
    FileNotFoundError where it matches none, ValueError naming the matches where several."""
    from streamer.sources import spec_paths

    matched = spec_paths(spec)
    if not matched:
        raise FileNotFoundError(f"{spec}: no file matches")
    if len(matched) > 1:
        raise ValueError(f"{spec}: matches {len(matched)} inputs ({_named([str(p) for p in matched])}): give one")
    return matched[0]


def _named(names: list[str]) -> str:
    """The first three of ``names``, then "..." where there are more."""
    return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")


def open_input(path: Path, *, stride: int, max_frames: int, intrinsics: Path | None = None,
               gt_poses: Path | None = None) -> FrameStream:
    """Every ``stride``-th frame of a video file or an image folder (in natural order, as the
    streamer reads it: ``reliev3r.imaging.natural_key``), at most ``max_frames``, decoded as
    the stream is read (one frame in memory at a time). A video's frames are turned as players
    show them, a folder's images as their Exif orientation says (OpenCV turns them), and
    ``intrinsics`` or a folder's intrinsics file (of the frames as recorded) with them: a video's
    as its display matrix turns it (``reliev3r.imaging.orient_intrinsics``), a folder's with each
    frame's own orientation (``reliev3r.imaging.shown_intrinsics``; :attr:`FrameStream.each`), as
    the streamer and eval turn them. A folder's frames must then all be of one size as recorded,
    the first's, which the one matrix is of: ValueError naming the first frame that is not
    (``reliev3r.imaging.other_size``).

    Ground truth: a folder's own poses, or the TUM trajectory ``gt_poses`` (:func:`read_gt_poses`),
    matched by ``evaluation.datasets.match_trajectory`` (a folder's names as the frames' times, a
    video's times from the start of its stream; by order, line ``k`` to the input's frame ``k``);
    a video's once its frames are read (:attr:`FrameStream.match_gt`)."""
    from evaluation.datasets import folder_poses, match_trajectory
    from reliev3r.imaging import read_intrinsics

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    K = read_intrinsics(intrinsics) if intrinsics else None
    lines = read_gt_poses(gt_poses) if gt_poses is not None else None
    if path.is_dir():
        every = imaging.frame_files(path)
        picked = list(range(len(every)))[::stride][:max_frames]
        files = [every[k] for k in picked]
        if not files:
            videos = sorted(f.name for f in path.iterdir() if f.suffix.lower() in VIDEO_SUFFIXES and f.is_file())
            if videos:  # as the streamer takes a folder of videos
                raise FileNotFoundError(f"{path}: a folder of videos, no images: give one video ({_named(videos)})")
            raise FileNotFoundError(f"{path}: no images")
        try:
            stamps = [float(f.stem) for f in files]
        except ValueError:
            stamps = [float(k * stride) for k in range(len(files))]
        if K is None and (found := imaging.intrinsics_file(path)) is not None:
            K, intrinsics = read_intrinsics(found), found
        published = None if K is not None else imaging.published_intrinsics(every)  # 7-Scenes' own frames
        recorded = K  # of the camera as it records (a file's): turned with each frame (below)

        def shown_K(turn: int, w: int, h: int) -> np.ndarray | None:
            """The matrix of a frame shown ``w`` x ``h`` after its orientation ``turn`` turned it."""
            if published is not None:  # at the frames' size (None at another aspect ratio: the default)
                return published(turn, w, h)
            return _fitting(imaging.shown_intrinsics(recorded, turn, w, h), intrinsics, w, h)

        first, turn = None, 0  # the first frame, decoded for its size and orientation: the stream's first
        first_size = None  # its size as recorded, which the intrinsics are of, where they are known
        if published is not None or K is not None:
            first, turn = imaging.read_image_and_orientation(files[0])
            if first is not None and (K := shown_K(turn, first.shape[1], first.shape[0])) is not None:
                first_size = imaging.recorded_size(turn, first.shape[1], first.shape[0])
                intrinsics = imaging.PUBLISHED if published is not None else intrinsics
        each: list[np.ndarray] | None = [] if first_size is not None else None

        def images() -> Iterator[tuple[np.ndarray, float]]:
            nonlocal first
            for f, t in zip(files, stamps):
                if first is not None:
                    bgr, shown, first = first, turn, None
                else:
                    bgr, shown = imaging.read_image_and_orientation(f)  # each file opened once
                if bgr is None:
                    raise OSError(f"{f}: unreadable image")
                if each is not None:
                    h, w = bgr.shape[:2]
                    size = imaging.recorded_size(shown, w, h)
                    if (problem := imaging.other_size(f, size, files[0], first_size, intrinsics)) is not None:
                        raise ValueError(problem)
                    each.append(shown_K(shown, w, h))
                yield cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), t

        # a trajectory matched by order: to every frame of the folder
        given = (gt_poses, lines) if lines is not None else None  # read once, above
        gt = _without_bad(folder_poses(path, every, picked, trajectory=given))
        return FrameStream(images(), K, gt, len(files), each=each)
    if path.is_file() and path.suffix.lower() in VIDEO_SUFFIXES:
        import av

        from reliev3r.imaging import TRANSPOSE, orient, orient_intrinsics
        from streamer.sources import FrameClock, stream_start, upright, video_stream

        with av.open(str(path)) as container:
            known = video_stream(container).frames  # 0 when the container does not say
            if K is not None:  # given for the frames as recorded: turned with them (below)
                first = next(container.decode(video_stream(container)), None)
                if first is not None:
                    turn = upright(first)
                    shown = (first.height, first.width) if turn & TRANSPOSE else (first.width, first.height)
                    K = _fitting(orient_intrinsics(K, turn, first.width, first.height), intrinsics, *shown)
        total = min(-(-known // stride), max_frames) if known > 0 else None
        seen = None  # how many frames the video has, once decoded to its end

        def decoded() -> Iterator[tuple[np.ndarray, float]]:
            nonlocal seen
            picked = count = 0
            with av.open(str(path)) as container:
                stream = video_stream(container)
                stream.thread_type = "AUTO"
                # timed as the streamer times a frame (Frame.timestamp): from the stream's start, increasing
                clock = FrameClock(float(stream.average_rate or 0) or 25.0, stream_start(stream))
                for k, frame in enumerate(container.decode(stream)):
                    if picked >= max_frames:
                        break
                    count = k + 1
                    clock.tick(k, frame)
                    if k % stride == 0:
                        picked += 1
                        t = clock.time
                        # as players show it (a phone's rotation, a front camera's mirror), as the streamer does
                        yield np.ascontiguousarray(orient(frame.to_ndarray(format="rgb24"), upright(frame))), t
                else:
                    seen = count

        def match(times: np.ndarray) -> list[np.ndarray | None]:
            """The frames' ground truth, by their times or by order (line ``k`` to the video's frame ``k``: the
            video's frame count is the decoder's where it read to the end, else the container's)."""
            names = [f"frame {j * stride} at {t:.3f} s" for j, t in enumerate(times)]
            return _without_bad(match_trajectory(gt_poses, lines, np.asarray(times, np.float64),
                                                 [j * stride for j in range(len(times))],
                                                 seen if seen is not None else known or None, names))

        return FrameStream(decoded(), K, None, total, match if lines is not None else None)
    raise FileNotFoundError(f"{path}: neither an image folder nor a video ({', '.join(VIDEO_SUFFIXES)})")


def _fitting(intrinsics: np.ndarray, file: Path, width: int, height: int) -> np.ndarray:
    """``intrinsics`` (read from ``file``) of ``width`` x ``height`` frames, or ValueError naming
    the file where they cannot be (``reliev3r.imaging.intrinsics_mismatch``)."""
    if (problem := imaging.intrinsics_mismatch(intrinsics, width, height)) is not None:
        raise ValueError(f"{file}: {problem}")
    return intrinsics


def read_input(path: Path, *, stride: int, max_frames: int, intrinsics: Path | None = None) -> Frames:
    """Every ``stride``-th frame of a video file or an image folder (natural order), at most ``max_frames``,
    all in memory (:func:`open_input` decodes them one at a time)."""
    stream = open_input(path, stride=stride, max_frames=max_frames, intrinsics=intrinsics)
    images, stamps = [], []
    for rgb, t in tqdm(stream.frames, total=stream.total, desc="reading", unit="frame"):
        images.append(rgb)
        stamps.append(t)
    if not images:
        raise ValueError(f"{path}: no frames decoded")
    K = stream.intrinsics if stream.each is None else np.stack(stream.each)
    return Frames(images, stamps, K, stream.gt_cam_to_world or [None] * len(images))


def window_starts(frames: int, views: int, overlap: int) -> list[int]:
    """Starts of windows of ``views`` frames, consecutive ones sharing ``overlap`` frames, the
    last one ending at the last frame (so it may overlap its predecessor more)."""
    if not 1 <= overlap < views:
        raise ValueError(f"overlap must be in 1..views-1, got {overlap} with {views} views")
    if frames <= views:
        return [0]
    step = views - overlap
    starts = list(range(0, frames - views + 1, step))
    if starts[-1] + views < frames:
        starts.append(frames - views)
    return starts


# ---------------------------------------------------------------------- chaining

@dataclass(slots=True)
class WindowResult:
    """One window's model output (numpy float32): depth/confidence [V,H,W], cam_to_world [V,4,4]."""

    start: int
    depth: np.ndarray
    confidence: np.ndarray
    cam_to_world: np.ndarray


def _project_rotation(m: np.ndarray) -> np.ndarray:
    u, _, vt = np.linalg.svd(m)
    d = np.sign(np.linalg.det(u @ vt))
    return u @ np.diag([1.0, 1.0, d]) @ vt


def align_to_chain(chain_poses: np.ndarray, chain_depth: np.ndarray, new_poses: np.ndarray,
                   new_depth: np.ndarray) -> tuple[float, np.ndarray]:
    """(scale s, rigid G [4,4]) bringing a new window into the chain's frame, from K shared
    frames: poses [K,4,4] and depth [K,H,W] as the chain and the new window have them.
    A new pose P becomes ``G @ P'`` where P' is P with its translation multiplied by s (a
    similarity of the world scales camera centres and depth alike); new depth becomes s x depth."""
    ratios = []
    for a, b in zip(chain_depth, new_depth):
        ok = np.isfinite(a) & np.isfinite(b) & (a > 0) & (b > 0)
        if ok.any():
            ratios.append(np.median(a[ok] / b[ok]))
    s = float(np.median(ratios)) if ratios else 1.0
    scaled = new_poses.astype(np.float64).copy()
    scaled[:, :3, 3] *= s
    # G = chain @ inv(new) for each shared frame; average them (rotations projected back to SO(3)).
    gs = np.stack([c @ np.linalg.inv(n) for c, n in zip(chain_poses.astype(np.float64), scaled)])
    G = np.eye(4)
    G[:3, :3] = _project_rotation(gs[:, :3, :3].sum(0))
    # Translation: the one that best maps the new shared centres onto the chain's.
    G[:3, 3] = (chain_poses[:, :3, 3] - scaled[:, :3, 3] @ G[:3, :3].T).mean(0)
    return s, G


def chain_windows(results: list[WindowResult], frames: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Chain windows (sorted by start, consecutive ones overlapping) into one trajectory.
    Returns cam_to_world [N,4,4] (float64), depth [N,H,W] and confidence [N,H,W] (float32) of
    every frame in the first window's gauge; a frame seen by several windows keeps its
    first estimate."""
    first = results[0]
    _, h, w = first.depth.shape
    poses = np.full((frames, 4, 4), np.nan)
    depth = np.zeros((frames, h, w), np.float32)
    conf = np.zeros((frames, h, w), np.float32)
    have = np.zeros(frames, bool)
    for r in results:
        idx = np.arange(r.start, r.start + len(r.depth))
        shared = have[idx]
        if r is first:
            s, G = 1.0, np.eye(4)
        else:
            if not shared.any():
                raise ValueError(f"window at frame {r.start} shares no frame with the chain")
            s, G = align_to_chain(poses[idx[shared]], depth[idx[shared]], r.cam_to_world[shared], r.depth[shared])
        new = r.cam_to_world.astype(np.float64).copy()
        new[:, :3, 3] *= s
        new = G @ new
        fresh = ~shared
        poses[idx[fresh]] = new[fresh]
        depth[idx[fresh]] = r.depth[fresh] * s
        conf[idx[fresh]] = r.confidence[fresh]
        have[idx] = True
    return poses, depth, conf


# ---------------------------------------------------------------------- outputs

def write_ply(path: Path, points: np.ndarray, colors: np.ndarray, confidence: np.ndarray | None = None) -> None:
    """Binary little-endian PLY: points [N,3] float, colours [N,3] uint8, optional confidence [N]."""
    fields = [("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("red", "u1"), ("green", "u1"), ("blue", "u1")]
    if confidence is not None:
        fields.append(("confidence", "<f4"))
    data = np.empty(len(points), dtype=fields)
    data["x"], data["y"], data["z"] = points[:, 0], points[:, 1], points[:, 2]
    data["red"], data["green"], data["blue"] = colors[:, 0], colors[:, 1], colors[:, 2]
    if confidence is not None:
        data["confidence"] = confidence
    ply_types = {"<f4": "float", "u1": "uchar"}
    header = ["ply", "format binary_little_endian 1.0", "comment reliev3r reconstruct",
              f"element vertex {len(points)}"]
    header += [f"property {ply_types[t]} {name}" for name, t in fields] + ["end_header"]
    with open(path, "wb") as f:
        f.write(("\n".join(header) + "\n").encode("ascii"))
        f.write(data.tobytes())


def depth_png(depth: np.ndarray) -> np.ndarray:
    """uint16 [H,W] of depth [H,W]: depth x 1000, rounded; 0 where that is beyond 65535 (depth
    beyond 65.535 units) or where there is no depth (not finite, or not positive)."""
    scaled = np.where(np.isfinite(depth) & (depth > 0), np.asarray(depth, np.float64) * 1000.0, 0.0).round()
    return np.where(scaled <= 65535, scaled, 0).astype(np.uint16)


def colorize_depth(depth: np.ndarray, near: float, far: float) -> np.ndarray:
    """BGR uint8 image of depth [H,W] (turbo on inverse depth between near and far)."""
    valid = (depth > 0) & np.isfinite(depth)
    inv = 1.0 / np.clip(np.where(valid, depth, far), near, far)
    t = (inv - 1.0 / far) / max(1.0 / near - 1.0 / far, 1e-12)
    img = cv2.applyColorMap(np.clip(t * 255, 0, 255).astype(np.uint8), cv2.COLORMAP_TURBO)
    img[~valid] = 0
    return img


def _nice_step(span: float) -> float:
    raw = span / 5
    mag = 10 ** np.floor(np.log10(max(raw, 1e-12)))
    return float(mag * min((1, 2, 5, 10), key=lambda m: abs(m * mag - raw)))


def _draw_panel(canvas: np.ndarray, box: tuple[int, int, int, int], tracks: list[tuple[np.ndarray, tuple, str]],
                xlabel: str, ylabel: str, title: str) -> None:
    """Draw 2D tracks (each [N,2], colour BGR, name) into ``box`` (x0, y0, x1, y1) with equal
    axis scales, ticks with values, axis labels and a legend."""
    x0, y0, x1, y1 = box
    font, black, grey = cv2.FONT_HERSHEY_SIMPLEX, (0, 0, 0), (215, 215, 215)
    ml, mr, mt, mb = 70, 20, 40, 55  # margins: room for tick labels and axis labels
    px0, py0, px1, py1 = x0 + ml, y0 + mt, x1 - mr, y1 - mb
    allp = np.concatenate([t for t, _, _ in tracks if len(t)])
    lo, hi = allp.min(0), allp.max(0)
    span = max(float((hi - lo).max()), 1e-6) * 1.1
    centre = (lo + hi) / 2
    scale = min((px1 - px0), (py1 - py0)) / span
    cx, cy = (px0 + px1) / 2, (py0 + py1) / 2

    def to_px(p: np.ndarray) -> np.ndarray:
        return np.stack((cx + (p[:, 0] - centre[0]) * scale, cy - (p[:, 1] - centre[1]) * scale), -1)

    step = _nice_step(max((px1 - px0), (py1 - py0)) / scale)
    for axis in (0, 1):
        lo_v = centre[axis] - (((px1 - px0) if axis == 0 else (py1 - py0)) / 2) / scale
        hi_v = centre[axis] + (((px1 - px0) if axis == 0 else (py1 - py0)) / 2) / scale
        for v in np.arange(np.ceil(lo_v / step) * step, hi_v, step):
            if axis == 0:
                x = int(round(cx + (v - centre[0]) * scale))
                cv2.line(canvas, (x, py0), (x, py1), grey, 1)
                cv2.putText(canvas, f"{v:.3g}", (x - 15, py1 + 18), font, 0.4, black, 1, cv2.LINE_AA)
            else:
                y = int(round(cy - (v - centre[1]) * scale))
                cv2.line(canvas, (px0, y), (px1, y), grey, 1)
                cv2.putText(canvas, f"{v:.3g}", (x0 + 8, y + 4), font, 0.4, black, 1, cv2.LINE_AA)
    cv2.rectangle(canvas, (px0, py0), (px1, py1), black, 1)
    cv2.putText(canvas, title, (px0, y0 + 25), font, 0.6, black, 1, cv2.LINE_AA)
    cv2.putText(canvas, xlabel, ((px0 + px1) // 2 - 20, y1 - 15), font, 0.5, black, 1, cv2.LINE_AA)
    cv2.putText(canvas, ylabel, (x0 + 8, py0 - 8), font, 0.5, black, 1, cv2.LINE_AA)
    for k, (track, colour, name) in enumerate(tracks):
        pts = to_px(track).round().astype(np.int32)
        cv2.polylines(canvas, [pts.reshape(-1, 1, 2)], False, colour, 2, cv2.LINE_AA)
        if len(pts):
            cv2.circle(canvas, tuple(int(v) for v in pts[0]), 5, colour, -1, cv2.LINE_AA)  # start
            cv2.drawMarker(canvas, tuple(int(v) for v in pts[-1]), colour, cv2.MARKER_SQUARE, 10, 2)  # end
        ly = py0 + 18 + 20 * k
        cv2.line(canvas, (px1 - 150, ly), (px1 - 120, ly), colour, 2)
        cv2.putText(canvas, name, (px1 - 112, ly + 5), font, 0.45, black, 1, cv2.LINE_AA)


def plot_trajectory(path: Path, centres: np.ndarray, gt_centres: np.ndarray | None = None, *,
                    title: str = "camera trajectory", unit: str = "model units") -> None:
    """PNG with a top view (x-z) and a side view (z-y, y up) of camera centres [N,3] (OpenCV
    axes: y points down, so it is negated for the side view), ground truth beside them."""
    canvas = np.full((560, 1200, 3), 255, np.uint8)
    est, gt_colour = (200, 90, 20), (40, 160, 40)  # BGR: blue estimate, green ground truth
    def tracks(ix: int, iy: int, sy: float):
        out = [(np.stack((centres[:, ix], sy * centres[:, iy]), -1), est, "estimate")]
        if gt_centres is not None:
            out.insert(0, (np.stack((gt_centres[:, ix], sy * gt_centres[:, iy]), -1), gt_colour, "ground truth"))
        return out
    _draw_panel(canvas, (0, 30, 600, 560), tracks(0, 2, 1.0), f"x [{unit}]", "z", "top view (x-z)")
    _draw_panel(canvas, (600, 30, 1200, 560), tracks(2, 1, -1.0), f"z [{unit}]", "-y (up)", "side view (z-y)")
    cv2.putText(canvas, title + "   (dot: start, square: end)", (20, 22), cv2.FONT_HERSHEY_SIMPLEX, 0.6,
                (0, 0, 0), 1, cv2.LINE_AA)
    if not imaging.write_image(path, canvas):
        raise OSError(f"{path}: cannot write PNG")


# ---------------------------------------------------------------------- main

@dataclass(kw_only=True, slots=True)
class ReconstructOptions:
    views: int = 8
    """Frames per window."""
    stride: int = 1
    """Input frames between consecutive picked frames."""
    overlap: int = 2
    """Frames shared by consecutive windows (>= 1)."""
    max_frames: int = 300
    """Frames picked from the input at most."""
    keep_fraction: float = 0.5
    """Per frame, the most confident fraction of pixels kept in the point cloud."""
    min_confidence: float = 0.0
    """And only pixels with confidence (in (0, 2)) above this: in [0, 2) (2 or more keeps none)."""
    max_points: int = 2_000_000
    """Points written at most (random subset beyond)."""
    colmap: str | None = None
    """Also write a COLMAP model under ``colmap/``: ``bin`` or ``txt`` (None: none)."""
    poses: Literal["fitted", "model"] = "fitted"
    """Each window's poses: ``fitted`` to the model's depth and the window's verified matches, or the
    pose head's (``model``): ``learner.api.Reconstructor.run``'s ``poses``."""

    def __post_init__(self) -> None:
        if self.poses not in ("fitted", "model"):
            raise ValueError(f"poses must be 'fitted' or 'model', got {self.poses!r}")
        if self.views < 2:
            raise ValueError("views must be >= 2")
        if not 1 <= self.overlap < self.views:
            raise ValueError(f"overlap must be in 1..views-1, got {self.overlap} with {self.views} views")
        if self.stride < 1 or self.max_frames < 2:
            raise ValueError("stride must be >= 1 and max_frames >= 2")
        if not 0 < self.keep_fraction <= 1:
            raise ValueError("keep_fraction must be in (0, 1]")
        if not 0 <= self.min_confidence < 2:  # NaN too
            raise ValueError(f"min_confidence must be in [0, 2) (the model's confidence is in (0, 2)), "
                             f"got {self.min_confidence}")


def _without_bad(gt: list) -> list[np.ndarray | None]:
    """Ground truth for the ATE only: a frame whose pose is no pose (``evaluation.datasets.BadPose``) goes without,
    a warning naming each such pose file or trajectory line once."""
    from evaluation.datasets import BadPose

    said = set()
    for k, pose in enumerate(gt):
        if isinstance(pose, BadPose):
            if pose.reason not in said:
                log.warning("ground-truth pose left out: %s", pose.reason)
                said.add(pose.reason)
            gt[k] = None
    return gt


def read_gt_poses(path: Path) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    """``--gt-poses``: (stamps, poses, bad) of a TUM trajectory (``evaluation.tum.read_tum_lines``:
    a line whose pose is no pose is in ``bad``, its frame left out of the ATE);
    ValueError where a line cannot be placed in time or no line is a pose."""
    from evaluation.tum import read_tum_lines

    stamps, poses, bad = read_tum_lines(path)
    if len(bad) == len(stamps):
        raise ValueError(f"{path}: no line is a pose ({len(bad)} lines; the first: {next(iter(bad.values()))})")
    return stamps, poses, bad


OUTPUTS = ("points.ply", "poses.txt", "depth", "depth_color", "trajectory.png", "reconstruction.json", "colmap",
           "view.rrd")
"""What a reconstruction writes into ``--out`` and what ``reliev3r view`` makes of it there (``view.rrd``);
the next reconstruction into the same folder replaces or removes all of it, and nothing else."""
STAGING = ".reconstruct-"
"""Name prefix of the hidden folder inside ``--out`` that a run writes into, then
``<host>-<pid>-<random>``: a run killed outright (SIGKILL) leaves it, and the next run on the
host removes it once that process is gone."""


def reconstruct(reconstructor, frames: Frames | FrameStream, out: Path, opts: ReconstructOptions,
                gt_poses: list[np.ndarray | None] | None = None) -> dict:
    """Run the model over windows of ``frames``, chain, and write every output into ``out``.

    Streams: frames are decoded, reconstructed and chained one window at a time, and each
    frame's depth PNG, pose line, points (and COLMAP image) are written when its window is
    chained, so memory stays flat in the input's length (:mod:`reliev3r.reconstruct_stream`
    lists what is held). Ground truth: ``gt_poses`` (one per frame), else the stream's (a video's
    matched to its frames' timestamps at the end: :attr:`FrameStream.match_gt`).

    The outputs are written into a hidden folder inside ``out`` (:data:`STAGING`) and take the
    place of an earlier reconstruction's (:data:`OUTPUTS`) only once all are written: a run that
    fails (a damaged frame, too few frames) or is stopped (Ctrl-C) leaves ``out`` as it was,
    and removes what it wrote (a folder it created for ``out`` too). The replacement is
    :func:`reliev3r.swap.replace`; an earlier run's that a kill interrupted is finished first
    (:func:`reliev3r.swap.settle`)."""
    out = Path(out)
    made = [d for d in (out, *out.parents) if not d.exists()]  # deepest first
    out.mkdir(parents=True, exist_ok=True)
    swap.settle(out)  # an earlier run's replacement that a kill interrupted
    for stale in out.glob(STAGING + "*"):
        if _abandoned(stale):
            shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{STAGING}{socket.gethostname()}-{os.getpid()}-", dir=out))
    done = swapping = False
    try:
        with contextlib.ExitStack() as held:  # open files and spools, closed however the run ends
            summary = _reconstruct_into(held, reconstructor, frames, staging, opts, gt_poses)
        swapping = True
        swap.replace(out, staging, OUTPUTS)
        for spool in out.glob(".spool-*"):  # spools that runs of earlier versions wrote into out and left
            spool.unlink(missing_ok=True)
        done = True
    finally:
        if not (swapping and (out / swap.MARKER).exists()):  # else it holds the new set: swap.settle finishes
            shutil.rmtree(staging, ignore_errors=True)
        if not done:
            for folder in made:
                try:
                    folder.rmdir()
                except OSError:
                    break
    return summary


def _abandoned(staging: Path) -> bool:
    """Whether a :data:`STAGING` folder belongs to a run of this host that is no longer running."""
    found = re.fullmatch(re.escape(STAGING) + r"(.+)-(\d+)-[^-]+", staging.name)
    if found is None or found[1] != socket.gethostname():
        return False
    try:
        os.kill(int(found[2]), 0)
    except ProcessLookupError:
        return True
    except (OSError, OverflowError):  # another user's process, or no pid at all
        return False
    return False


def _reconstruct_into(held: contextlib.ExitStack, reconstructor, frames: Frames | FrameStream, out: Path,
                      opts: ReconstructOptions, gt_poses: list[np.ndarray | None] | None) -> dict:
    """:func:`reconstruct`'s work, every output written into the empty folder ``out``; what it
    opens is closed by ``held``."""
    from collections import deque

    from evaluation.tum import matrix_to_quaternion
    from reliev3r.reconstruct_stream import (FrameLog, PlyStream, RowSpool, StreamingChain, ValueSample,
                                             subsample_ply)

    stream = frames if isinstance(frames, FrameStream) else FrameStream.of(frames)
    (out / "depth").mkdir()
    (out / "depth_color").mkdir()
    if opts.colmap:
        (out / "colmap" / "images").mkdir(parents=True)
    ply = PlyStream(out / "points.ply")
    held.callback(ply.abandon)
    tum = held.enter_context(open(out / "poses.txt", "w"))
    tum.write("# timestamp tx ty tz qx qy qz qw (camera-to-world)\n")
    depth_spool = None  # float depth of every frame, on disk, for the colour pass
    pixel_spool = RowSpool(out, np.int64, (3,)) if opts.colmap else None  # (frame, x, y) of each point
    if pixel_spool is not None:
        held.callback(pixel_spool.close)
    depth_values = ValueSample()
    chain = StreamingChain()
    timestamps, poses, window_K = FrameLog(), FrameLog((4, 4)), FrameLog((3, 3))  # per frame, no objects
    size = None

    def write_frame(k: int, pose: np.ndarray, depth: np.ndarray, c: np.ndarray, image: np.ndarray,
                    K: np.ndarray) -> None:
        nonlocal depth_spool, size
        if depth_spool is None:
            depth_spool, size = RowSpool(out, np.float32, depth.shape), depth.shape
            held.callback(depth_spool.close)
        if not imaging.write_image(out / "depth" / f"{k:06d}.png", depth_png(depth)):
            raise OSError(f"{out}/depth/{k:06d}.png: cannot write image")
        depth_spool.append(depth[None])
        depth_values.add(depth[(depth > 0) & np.isfinite(depth)])
        keep = (c > opts.min_confidence) & (depth > 0) & np.isfinite(depth)
        if opts.keep_fraction < 1 and keep.any():
            keep &= c >= np.quantile(c[keep], 1 - opts.keep_fraction)
        cam = geometry.unproject_depth(torch.from_numpy(depth).double(), torch.from_numpy(K).double())
        world = geometry.transform_points(torch.from_numpy(pose), cam[torch.from_numpy(keep)]).numpy()
        ply.append(world.astype(np.float32), image[keep], c[keep])
        if pixel_spool is not None:
            pixel_spool.append(np.stack([np.full(int(keep.sum()), k), *np.nonzero(keep)[::-1]], -1))  # frame, x, y
            bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
            if not imaging.write_image(out / "colmap" / "images" / f"{k:06d}.png", bgr):
                raise OSError(f"{out}/colmap/images/{k:06d}.png: cannot write image")
        q = matrix_to_quaternion(pose[:3, :3])
        tum.write(f"{float(timestamps[k]):.6f} " + " ".join(f"{v:.7f}" for v in (*pose[:3, 3], *q)) + "\n")
        poses.append(pose)
        window_K.append(K)

    model_size = None  # (H, W) of the first window, which every later one is brought to
    head_pose_frames = 0  # frames whose pose is the pose head's (their view not placed by the fit)

    def run_window(start: int, images: list[np.ndarray], intrinsics: list[np.ndarray | None]) -> None:
        nonlocal model_size, head_pose_frames
        # One size for every window (a snapshot without image_size would take each window's first frame's)
        pred = reconstructor.run(images, intrinsics=None if intrinsics[0] is None else np.stack(intrinsics),
                                 size=model_size, poses=opts.poses)
        model_size = model_size or tuple(pred["depth"].shape[1:3])
        result = WindowResult(start, pred["depth"], pred["confidence"], pred["cam_to_world"])
        for k, j, pose, depth, c in chain.add(result):
            write_frame(k, pose, depth, c, pred["images"][j], pred["intrinsics"][j])
            head_pose_frames += not pred["fitted"][j]
        ply.flush()
        tum.flush()

    views, overlap = opts.views, min(opts.overlap, opts.views - 1)
    step = views - overlap
    recent: deque[np.ndarray] = deque(maxlen=views)  # the last `views` frames: the next window's
    recent_K: deque[np.ndarray | None] = deque(maxlen=views)  # their intrinsics as shown
    next_start, chained_to = 0, 0
    bar = tqdm(stream.frames, total=stream.total, desc="reconstructing", unit="frame", dynamic_ncols=True)
    for k, (rgb, t) in enumerate(bar):
        recent.append(rgb)
        recent_K.append(stream.frame_intrinsics(k))
        timestamps.append(t)
        if k + 1 == next_start + views:  # the window at next_start is complete
            run_window(next_start, list(recent), list(recent_K))
            chained_to, next_start = k + 1, next_start + step
            bar.set_postfix(windows=chain.windows, points=ply.count, refresh=False)
    bar.close()
    n = len(timestamps)
    if n < 2:  # a window needs two views
        raise ValueError(f"{n} frame{'s' * (n != 1)} decoded (every --stride-th, at most --max-frames): "
                         "a reconstruction needs 2 or more")
    if n < views:  # one window of every frame, as window_starts says
        views = n
        window_starts(n, views, min(overlap, views - 1))  # raises for a single frame
        overlap = min(overlap, views - 1)
        run_window(0, list(recent), list(recent_K))
    elif chained_to < n:  # the last window ends at the last frame
        run_window(n - views, list(recent), list(recent_K))
    tum.close()
    count = ply.close()

    valid_all = depth_values.values()
    near, far = (np.percentile(valid_all, 2), np.percentile(valid_all, 98)) if valid_all.size else (1.0, 2.0)
    for k, depth in enumerate(tqdm(depth_spool, total=n, desc="colouring depth", unit="frame")):
        imaging.write_image(out / "depth_color" / f"{k:06d}.png", colorize_depth(depth, near, max(far, near * 1.01)))
    depth_spool.close()
    kept = count
    if count > opts.max_points:  # a uniform subsample, streamed (reconstruct_stream.sampled_rows)
        kept = subsample_ply(out / "points.ply", ply.header_len, count, opts.max_points)

    poses_arr = poses.array()
    summary = {"frames": n, "windows": chain.windows, "views": views, "overlap": overlap,
               "poses": opts.poses, "head_pose_frames": int(head_pose_frames),
               "points": int(kept), "depth_png_unit": "model relative units x 1000 (first window's gauge)"}
    frame_K = window_K.array()
    shared = bool((frame_K == frame_K[0]).all())
    summary.update(intrinsics=(frame_K[0] if shared else frame_K).tolist(), image_size=[size[1], size[0]])
    centres = poses_arr[:, :3, 3]
    gt = gt_poses if gt_poses is not None else stream.gt_cam_to_world
    if gt is None and stream.match_gt is not None:
        gt = stream.match_gt(timestamps.array())
    gt_centres, unit = None, "model units"
    title = f"{n} frames, {chain.windows} windows of {views} (overlap {summary['overlap']}), {opts.poses} poses"
    known = np.array([g is not None for g in gt]) if gt is not None else np.zeros(n, bool)
    if known.sum() >= 3:
        gt_c = np.stack([gt[k][:3, 3] for k in np.flatnonzero(known)]).astype(np.float64)
        s, R, t = (x.numpy() for x in geometry.umeyama(torch.from_numpy(centres[known]), torch.from_numpy(gt_c)))
        centres = s * centres @ R.T + t  # the estimate in the ground truth's metres
        ate = float(np.sqrt(((centres[known] - gt_c) ** 2).sum(-1).mean()))
        summary.update(ate_m=ate, gt_frames=int(known.sum()))
        gt_centres, unit = gt_c, "m"
        title += f", ATE {ate:.3f} m after Sim(3)"
    plot_trajectory(out / "trajectory.png", centres, gt_centres, title=title, unit=unit)
    if opts.colmap:
        # The kept points (at most max_points) are in memory while points3D is written.
        from reliev3r.colmap import SparseModel, write_model
        from reliev3r.reconstruct_stream import ply_dtype

        with open(out / "points.ply", "rb") as f:
            header = f.read(4096)
            offset = header.index(b"end_header\n") + len(b"end_header\n")
        vertex = np.fromfile(out / "points.ply", ply_dtype(), offset=offset)
        pix = pixel_spool.sampled(opts.max_points) if count > opts.max_points else pixel_spool.sampled(count)
        pixel_spool.close()
        pts = np.stack([vertex["x"], vertex["y"], vertex["z"]], -1)
        cols = np.stack([vertex["red"], vertex["green"], vertex["blue"]], -1)
        model = SparseModel(intrinsics=window_K.array(), cam_to_world=poses_arr, sizes=[size[1], size[0]],
                            names=[f"{k:06d}.png" for k in range(n)], points=pts, colors=cols,
                            errors=np.zeros(len(pts)), obs_point=np.arange(len(pts)), obs_image=pix[:, 0],
                            obs_xy=pix[:, 1:])
        sparse = out / "colmap" / "sparse" / "0"
        write_model(model, sparse, opts.colmap)
        summary["colmap"] = str(sparse.relative_to(out))
    (out / "reconstruction.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(cfg, args: argparse.Namespace) -> int:
    from learner.api import Reconstructor
    from learner.snapshot import resolve_given

    given = {k: getattr(args, k, None) for k in ReconstructOptions.__dataclass_fields__}
    opts = ReconstructOptions(**{k: v for k, v in given.items() if v is not None})
    check_device("--device", args.device, auto=True)
    if args.device != "auto":  # one this host does not have: said before the model loads
        check_device_present("--device", args.device)
    source = input_path(args.input)  # a glob matching none or several: said before the model loads
    # the matches poses are fitted to: found as reliev3r eval finds them (Reconstructor.run)
    reconstructor = Reconstructor.from_snapshot(resolve_given("--checkpoint", args.checkpoint), device=args.device,
                                                matcher=cfg.labeler.matcher,
                                                threshold_px=cfg.labeler.ransac_threshold_px,
                                                threads=cfg.labeler.cpu_threads)
    stream = open_input(source, stride=opts.stride, max_frames=opts.max_frames,
                        intrinsics=Path(args.intrinsics) if args.intrinsics else None,
                        gt_poses=Path(args.gt_poses) if args.gt_poses else None)
    summary = reconstruct(reconstructor, stream, Path(args.out), opts)
    print(json.dumps(summary, indent=2))
    model = ", colmap/" if "colmap" in summary else ""
    print(f"wrote {Path(args.out) / 'points.ply'}, poses.txt, depth/, depth_color/, trajectory.png{model}")
    return 0
