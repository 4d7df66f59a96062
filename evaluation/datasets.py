"""Evaluation data with ground truth, cut into windows the model can read.

Specs:

* ``synthetic``: held-out scenes of the embedded world (seed + 1000), rendered on first use
  into ``<run.dir>/eval_world``;
* ``synthetic:DIR``: every ``*.mp4`` in DIR with its ``.gt.npz`` (``reliev3r render`` output;
  its poses checked as a pose file's, ``reliev3r.imaging.pose_problem``: a window with a frame
  whose pose is no pose is skipped, the warning naming the file, the frame and the problem);
* ``7scenes:DIR`` or ``7scenes:DIR@FIRST-LAST``: 7-Scenes layout (``frame-NNNNNN.color.jpg``
  or ``.color.png`` as Microsoft ships a sequence folder, ``.depth.png`` uint16 millimetres with
  0 = invalid, ``.pose.txt`` 4x4 cam-to-world, read by ``reliev3r.imaging.read_pose``,
  ``camera-intrinsics.txt``, read as a folder's: 3x3 or ``fx fy cx cy``; without one the
  intrinsics 7-Scenes publishes, ``reliev3r.imaging.SEVEN_SCENES_K``), optionally only frames FIRST..LAST
  (inclusive);
* ``scannet:DIR`` or ``scannet:DIR@FIRST-LAST``: a ScanNet scene as its SensReader exports it
  (:func:`scannet_sequence`), read as a folder (below) of its ``color/`` frames (``0.jpg``,
  ``1.jpg``, ... in natural order; FIRST..LAST index them) with ``depth/<name>.png`` (uint16
  millimetres, 0 = invalid), ``pose/<name>.txt`` (4x4 cam-to-world; one that is not finite,
  SensReader's ``-inf`` for a frame its tracking lost, or missing is no pose: the frame goes
  without, said once with how many and the first; one that is no pose skips its windows, as a
  folder's) and ``intrinsic/intrinsic_color.txt`` and ``intrinsic_depth.txt`` (4x4, K the
  top-left), both required. The depth maps, of the depth camera at another size than the
  colour frames (640x480 beside 1296x968), are brought to the colour frame's pixels by nearest
  sampling through both intrinsics (the extrinsics SensReader writes are identity:
  ``reliev3r.imaging.depth_in_colour_frame``), the depth intrinsics checked against the depth
  maps and to be the colour's scaled to their size, but for what the calibration of two cameras
  moves (``reliev3r.imaging.depth_intrinsics_problem``): a window with a frame whose depth they
  cannot be of is skipped, saying why;
* ``folder:DIR[@FIRST-LAST][?depth_scale=S]`` or a bare ``DIR``: a generic folder of images
  (``*.jpg``/``*.png`` in natural order, ``2`` before ``10``, as the streamer reads a folder; in
  DIR or its ``rgb/``, ``images/`` or ``color/`` subfolder; FIRST..LAST index that sorted list)
  with, all optional: poses as a TUM trajectory (``groundtruth.txt``, ``poses.txt``,
  ``trajectory.txt`` or ``*.tum``; matched by :func:`match_trajectory`, as ``reconstruct
  --gt-poses`` matches one: by the image names as timestamps within 20 ms, a frame with no line
  that near going without, said once per sequence with how many and the first, else by order:
  names that read as numbers no line is near, e.g. ``000000.png``, are no timestamps) or per frame 4x4
  cam-to-world text files (``<name>.pose.txt``, ``<name>.txt`` or ``poses/<name>.txt``, read by
  ``reliev3r.imaging.read_pose``; a frame with none among frames with one going without, said
  once per sequence with how many and the first);
  depth PNGs (``<name>.depth.png`` or ``depth/<name>.png``; uint16 divided by ``S`` > 0, default
  1000 = millimetres, TUM uses 5000; 0 = invalid); intrinsics ``camera-intrinsics.txt``,
  ``intrinsics.txt``, ``K.txt`` or ``intrinsic/intrinsic_color.txt`` (3x3, ``fx fy cx cy``, or a
  4x4 whose top-left is K: ``reliev3r.imaging.read_intrinsics``), else a 60 degree horizontal
  field of view of each frame as shown. Metrics that need what a folder lacks are left out.

Images are read as their Exif orientation shows them (OpenCV turns a JPEG or PNG so tagged, as
the streamer reads them); an intrinsics file, depth maps and ground-truth poses, of the camera as
it records (OpenCV reads a depth PNG unturned), are turned with each frame
(``reliev3r.imaging.orient``, ``orient_intrinsics``, ``orient_pose``: a quarter turn of the image
is the camera turned about its optical axis), so frames of one window turned differently each
get their own; a frame of another size as recorded than the folder's first, which the folder's one
intrinsics matrix (its file, 7-Scenes' published one) is taken to be of, is no frame it serves
(``reliev3r.imaging.other_size``): its window is skipped, saying so. A frame mirrored by its
orientation (Exif 2, 4, 5, 7) with a pose is no view of a camera at any pose: its window is
skipped, saying so. So is a window with a frame whose pose file
is no pose (``reliev3r.imaging.read_pose``: not 16 finite numbers, a rotation that is not one, a
last row other than 0 0 0 1), the warning naming the file and the problem, or whose TUM
trajectory line is no pose (a field that is not a number or not finite, a zero quaternion;
``evaluation.tum``), the warning naming the file and the line; a trajectory with a line that
cannot be matched to a frame (not 8 fields, a timestamp that is not a finite number) is refused.

A spec of no form above (a frame range too: ``@FIRST-LAST``, frame indices, FIRST <= LAST), or
whose folder is not there, is refused before anything is read (:func:`spec_problem`:
``folder:DIR: no such folder``).

Windows are ``views`` frames ``stride`` frames apart, spread evenly over the sequence.
Images, depth and intrinsics are fitted to the model's input size by
``reliev3r.imaging`` exactly as the streamer fits its windows. The matches that the classical
baseline solves and a model's poses are fitted to are found on the same views fitted to a larger
size (``labelers.matches.match_size``, :attr:`EvalWindow.match_images`).
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np

from evaluation.metrics import MIN_DEPTH_PIXELS
from labelers.matches import match_size
from reliev3r import imaging
from reliev3r.synthetic import ensure_world, load_ground_truth

log = logging.getLogger(__name__)

SPEC_KINDS = ("synthetic", "7scenes", "scannet", "folder")
"""The kinds of dataset spec (``KIND:...``, module docstring); a bare folder is a ``folder:``."""


@dataclass(slots=True)
class EvalWindow:
    """One window with ground truth. images uint8 [V,H,W,3]; intrinsics float32 [V,3,3];
    gt_depth float32 [V,H,W] metres (0 = invalid); gt_cam_to_world float32 [V,4,4]. A generic
    image folder may lack either (None)."""

    name: str
    images: np.ndarray
    intrinsics: np.ndarray
    gt_depth: np.ndarray | None
    gt_cam_to_world: np.ndarray | None
    match_images: np.ndarray | None = None
    """The views at the size their matches are found at (uint8 [V,h,w,3]: the same crop as
    :attr:`images`, larger, ``labelers.matches.match_size``), or None: at :attr:`images`' size."""
    match_intrinsics: np.ndarray | None = None
    """float32 [V,3,3] of :attr:`match_images` (None with them)."""

    def matching(self) -> tuple[np.ndarray, np.ndarray]:
        """(frames [V,h,w,3], intrinsics [V,3,3]) the window's matches are found on, in their pixels."""
        return (self.images, self.intrinsics) if self.match_images is None else (
            self.match_images, self.match_intrinsics)

    def in_model_pixels(self, matches: np.ndarray) -> np.ndarray:
        """``matches`` [K,7] found on :meth:`matching`'s frames, in pixels of :attr:`images`."""
        if self.match_images is None:
            return matches
        return imaging.rescale_matches(matches, self.match_intrinsics, self.intrinsics)


@dataclass(slots=True)
class Sequence:
    """A frame sequence with ground truth, read lazily by index."""

    name: str
    length: int
    intrinsics: np.ndarray
    """[3,3] of every frame, unless :attr:`intrinsics_of` gives each frame's."""
    read: callable
    """index -> (rgb uint8 [H,W,3], depth float32 [H,W] or None, cam_to_world float32 [4,4] or None):
    the frame as shown (turned by its Exif orientation), its depth map turned alike"""
    intrinsics_of: callable | None = None
    """(index, height, width) -> intrinsics [3,3] of that frame as :attr:`read` gives it
    (``height`` x ``width``); None: :attr:`intrinsics` for every frame"""

    def frame_intrinsics(self, index: int, height: int, width: int) -> np.ndarray:
        """Intrinsics [3,3] of frame ``index`` as :attr:`read` gives it (``height`` x ``width``)."""
        return self.intrinsics if self.intrinsics_of is None else self.intrinsics_of(index, height, width)


def window_starts(length: int, *, views: int, stride: int, windows: int) -> list[int]:
    span = (views - 1) * stride
    if length <= span:
        return []
    last = length - 1 - span
    count = min(windows, last + 1)
    return sorted({round(k * last / max(count - 1, 1)) for k in range(count)})


def make_windows(sequences: list[Sequence], *, views: int, height: int, width: int, stride: int,
                 windows: int) -> list[EvalWindow]:
    """``windows`` windows spread over the sequences (round-robin), fitted to height x width, and
    to ``labelers.matches.match_size`` for the matches (:attr:`EvalWindow.match_images`). A window
    with a frame that cannot be read, or without valid ground-truth depth where its frames have
    depth maps, is skipped with a warning that says why (the others are scored)."""
    per_seq = [window_starts(s.length, views=views, stride=stride, windows=windows) for s in sequences]
    picks: list[tuple[int, int]] = []
    k = 0
    while len(picks) < windows and any(k < len(p) for p in per_seq):
        picks += [(i, p[k]) for i, p in enumerate(per_seq) if k < len(p)]
        k += 1
    out, skipped = [], []
    big_size = match_size(height, width)  # every window's views, for their matches
    for seq_index, start in sorted(picks[:windows]):
        seq = sequences[seq_index]
        name = f"{seq.name}:{start}"
        images, depths, poses, Ks, big, big_Ks = [], [], [], [], [], []
        try:
            for idx in range(start, start + views * stride, stride):
                rgb, depth, pose = seq.read(idx)
                h, w = rgb.shape[:2]
                images.append(imaging.fit_image(rgb, height, width))
                depths.append(None if depth is None else imaging.fit_image(depth, height, width, nearest=True,
                                                                           like=(h, w)))
                recorded_K = seq.frame_intrinsics(idx, h, w)
                Ks.append(imaging.fit_intrinsics(recorded_K, h, w, height, width))
                poses.append(pose)
                if big_size is not None:
                    big.append(imaging.fit_image(rgb, *big_size))
                    big_Ks.append(imaging.fit_intrinsics(recorded_K, h, w, *big_size))
        except (OSError, ValueError) as err:  # a damaged frame, depth map or pose file
            skipped.append(f"{name}: {err}")
            continue
        gt_depth = None if any(d is None for d in depths) else np.stack(depths).astype(np.float32)
        gt_poses = None if any(p is None for p in poses) else np.stack(poses).astype(np.float32)
        usable = None if gt_depth is None else int((np.isfinite(gt_depth) & (gt_depth > 0)).sum())
        if usable is not None and usable < MIN_DEPTH_PIXELS:
            skipped.append(f"{name}: {usable} pixels of valid ground-truth depth (fewer than {MIN_DEPTH_PIXELS})")
            continue
        out.append(EvalWindow(name, np.stack(images), np.stack(Ks).astype(np.float32), gt_depth, gt_poses,
                              np.stack(big) if big else None, np.stack(big_Ks).astype(np.float32) if big else None))
    for why in skipped:
        log.warning("evaluation window skipped: %s", why)
    if skipped and not out:
        raise ValueError(f"no window could be read ({len(skipped)} skipped; the first: {skipped[0]})")
    return out


def synthetic_sequences(videos: list[Path]) -> list[Sequence]:
    import av  # here, not at import: studies read these windows on hosts without PyAV

    seqs = []
    for video in videos:
        gt = load_ground_truth(video)
        if gt is None:
            raise FileNotFoundError(f"{video}: no ground truth beside it (<stem>.gt.npz)")
        with av.open(str(video)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        n = min(len(frames), len(gt.depth))
        seqs.append(Sequence(video.stem, n, gt.intrinsics, lambda i, f=frames, g=gt: _synthetic_frame(f, g, i)))
    return seqs


def _synthetic_frame(frames: list[np.ndarray], gt, i: int):
    """Frame ``i`` of a synthetic video with its ground truth; ValueError naming the file, the
    frame and the problem where its pose is no pose (``GroundTruth.bad_poses``): the window is
    skipped, as one with a pose file that is no pose."""
    if i in gt.bad_poses:
        raise ValueError(gt.bad_poses[i])
    return frames[i], gt.depth[i], gt.cam_to_world[i]


def _checked(intrinsics: np.ndarray, file: Path | str, width: int, height: int) -> np.ndarray:
    """``intrinsics`` (from ``file``, or what names them) of a ``width`` x ``height`` frame, or
    ValueError saying why they cannot be (``reliev3r.imaging.intrinsics_mismatch``): the window
    is skipped."""
    if (problem := imaging.intrinsics_mismatch(intrinsics, width, height)) is not None:
        raise ValueError(f"{file}: {problem}")
    return intrinsics


class _Orientations(dict):
    """Frame index -> the frame's Exif orientation: set by the read that decodes the frame (from
    the bytes it read), else read from the frame's file (``path_of(k)``) when first asked."""

    def __init__(self, path_of: Callable[[int], Path]):
        super().__init__()
        self.path_of = path_of

    def __missing__(self, k: int) -> int:
        self[k] = turn = imaging.file_orientation(self.path_of(k))
        return turn


class _Sizes:
    """The size as recorded (``reliev3r.imaging.recorded_size``) of the first frame of a folder
    that reads, which its one intrinsics matrix is taken to be of (``files``: the folder's frames
    in order, whatever range is read): taken from the read that decodes it (:meth:`saw`), else
    read from its file when first asked for. :meth:`same` checks a frame against it."""

    def __init__(self, path_of: Callable[[int], Path], turns: _Orientations, files: list[Path]):
        self.path_of, self.turns, self.files = path_of, turns, files
        self.first: tuple[Path, tuple[int, int]] | None = None

    def saw(self, k: int, image: np.ndarray) -> None:
        """Frame ``k``, decoded: the first frame's size where it is the folder's first frame."""
        if self.first is None and self.files and self.path_of(k) == self.files[0]:
            self.first = (self.files[0], imaging.recorded_size(self.turns[k], image.shape[1], image.shape[0]))

    def same(self, k: int, width: int, height: int, intrinsics: Path | str, K: np.ndarray) -> np.ndarray:
        """``K`` (the folder's one matrix at frame ``k``, shown ``width`` x ``height``), or
        ValueError naming the frame where it is of another size than the first
        (``reliev3r.imaging.other_size``): the window is skipped."""
        for file in self.files if self.first is None else ():
            image, turn = imaging.read_image_and_orientation(file)
            if image is not None:
                self.first = (file, imaging.recorded_size(turn, image.shape[1], image.shape[0]))
                break
        size = imaging.recorded_size(self.turns[k], width, height)
        if self.first is not None and (problem := imaging.other_size(self.path_of(k), size, *self.first,
                                                                     intrinsics)) is not None:
            raise ValueError(problem)
        return K


def _turned_pose(pose: np.ndarray | None, orientation: int, frame: Path) -> np.ndarray | None:
    """A ground-truth camera-to-world pose of the camera as it records, turned as its frame is
    shown (``reliev3r.imaging.orient_pose``: about the optical axis); ValueError naming the frame
    where the frame is mirrored, which no camera pose shows (the window is skipped)."""
    if pose is None or not orientation:
        return pose
    try:
        return imaging.orient_pose(pose, orientation).astype(np.float32)
    except ValueError as err:
        raise ValueError(f"{frame}: {err}, so its pose cannot be turned with it") from None


def sevenscenes_sequence(folder: Path, first: int | None = None, last: int | None = None) -> Sequence:
    """A 7-Scenes folder (module docstring) as a :class:`Sequence`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a folder")
    colour = {int(m.group(1)): p for p in folder.glob("frame-*.color.*")
              if (m := imaging.SEVEN_SCENES_FRAME.fullmatch(p.name))}
    indices = sorted(i for i in colour if (first is None or i >= first) and (last is None or i <= last))
    if not indices:
        raise FileNotFoundError(f"{folder}: no frame-NNNNNN.color.jpg (or .png) frames in range")
    path = folder / "camera-intrinsics.txt"
    published = None
    if path.is_file():
        K = imaging.read_intrinsics(path)  # checked as a folder's: ValueError naming the file
    else:  # at each frame's size (a copy resized keeping 4:3 scales them)
        K, published = imaging.SEVEN_SCENES_K, imaging.published_intrinsics(list(colour.values()))
        log.info("%s: no camera-intrinsics.txt; 7-Scenes' published intrinsics (fx = fy = 585, cx = 320, cy = 240 "
                 "at 640x480) are taken", folder)
    turns = _Orientations(lambda k: colour[indices[k]])
    sizes = _Sizes(lambda k: colour[indices[k]], turns, [colour[i] for i in sorted(colour)])

    def intrinsics_of(k: int, h: int, w: int) -> np.ndarray:
        if published is None:
            return sizes.same(k, w, h, path, _checked(imaging.shown_intrinsics(K, turns[k], w, h), path, w, h))
        if (at := published(turns[k], w, h)) is None:
            raise ValueError(f"{colour[indices[k]]}: {w}x{h}, not 4:3 as 7-Scenes' frames are: its published "
                             f"intrinsics cannot be this frame's; give the folder a camera-intrinsics.txt")
        return sizes.same(k, w, h, imaging.PUBLISHED, at)

    def read(k: int):
        stem = folder / f"frame-{indices[k]:06d}"
        bgr, turns[k] = imaging.read_image_and_orientation(colour[indices[k]])
        depth = imaging.read_image(f"{stem}.depth.png", cv2.IMREAD_UNCHANGED)
        if bgr is None or depth is None:
            raise OSError(f"{stem}: unreadable colour or depth image")
        sizes.saw(k, bgr)
        # of the frame as recorded (OpenCV turns a colour image by its Exif orientation, not what it
        # reads with IMREAD_UNCHANGED): turned as the frame is shown
        depth = imaging.shown_image(depth.astype(np.float32) / 1000.0, turns[k])
        depth[depth > 10] = 0  # 65535 marks invalid in some 7-Scenes releases
        pose = imaging.read_pose(Path(f"{stem}.pose.txt"))  # ValueError naming the file: the window is skipped
        pose = _turned_pose(pose.astype(np.float32), turns[k], colour[indices[k]])
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), depth, pose

    return Sequence(folder.name, len(indices), K, read, intrinsics_of)


TRAJECTORY_NAMES = ("groundtruth.txt", "poses.txt", "trajectory.txt")
TIMESTAMP_MATCH_S = 0.02
"""Largest gap between an image's timestamp (its name) and the pose used for it."""


def _frame_base(path: Path) -> str:
    """``frame-000001.color.jpg`` -> ``frame-000001``; ``1305031102.175304.png`` -> itself minus .png."""
    return path.stem.removesuffix(".color")


def _timestamps(images: list[Path]) -> np.ndarray | None:
    try:
        return np.array([float(p.stem) for p in images])
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class BadPose:
    """A frame's ground-truth pose that is there but is no pose: ``reason`` names the file and
    the problem. A window with that frame is skipped, saying it."""

    reason: str


def match_trajectory(trajectory: Path, lines: tuple[np.ndarray, np.ndarray, dict[int, str]],
                     times: np.ndarray | None, positions: list[int], frames: int | None,
                     names: list[str]) -> list[np.ndarray | BadPose | None]:
    """The ground-truth poses of an input's frames from a TUM trajectory: the one rule for a
    folder's own trajectory (:func:`folder_poses`) and ``reliev3r reconstruct --gt-poses``.

    ``lines``: ``evaluation.tum.read_tum_lines(trajectory)``; the frames are those at
    ``positions`` of an input of ``frames`` frames (None: not known), ``times`` their timestamps
    in seconds (a folder's names where they read as numbers, a video's times from the start of
    its stream; None where they have none), ``names`` what a warning calls them.

    By time where the frames' times are the trajectory's: each frame takes the nearest line
    within :data:`TIMESTAMP_MATCH_S`, a frame with none going without (None), said once: how
    many, and the first. Times no line is near at all (``000000.png``..., a video whose
    trajectory counts in Unix seconds) are not the trajectory's: a trajectory with a line per
    frame of the input is then matched by order, line ``k`` to the frame at position ``k``.
    ValueError where the frames have no times and the trajectory is not a line per frame. A
    line whose pose is no pose gives its frame a :class:`BadPose` naming the file and line."""
    stamps, poses, bad = lines

    def pose(k: int) -> np.ndarray | BadPose:
        return BadPose(bad[k]) if k in bad else poses[k].astype(np.float32)
    if times is not None:
        nearest = np.abs(times[:, None] - stamps[None, :]).argmin(1)
        close = np.abs(stamps[nearest] - times) <= TIMESTAMP_MATCH_S
        if not close.any() and len(poses) == frames:  # numbers, not its times (000000.png...)
            times = None
    if times is not None:
        if not close.all():
            far = np.flatnonzero(~close)
            why = "" if close.any() else (f"; its {len(poses)} lines are no line per frame of the input "
                                          f"({'unknown' if frames is None else frames}) to match by order")
            log.warning("%s: %d of %d frames have no line within %g ms (the first: %s)%s; they go without a "
                        "ground-truth pose", trajectory, len(far), len(positions), TIMESTAMP_MATCH_S * 1000,
                        names[far[0]], why)
        return [pose(k) if ok else None for k, ok in zip(nearest, close)]
    if len(poses) != frames:
        raise ValueError(f"{trajectory}: {len(poses)} poses for {frames} images, and image names are not "
                         "timestamps to match them by")
    return [pose(k) for k in positions]


def folder_poses(root: Path, images: list[Path], keep: list[int] | None = None, *,
                 trajectory: tuple[Path, tuple[np.ndarray, np.ndarray, dict[int, str]]] | None = None
                 ) -> list[np.ndarray | BadPose | None]:
    """Per-image cam_to_world [4,4] from a TUM trajectory (``trajectory``: its path and its lines
    as ``evaluation.tum.read_tum_lines`` read them, else the folder's own) or per-frame 4x4 files,
    of the images ``keep`` indexes (default all): None where an
    image has none, :class:`BadPose` where its pose file (``reliev3r.imaging.read_pose``) or its
    trajectory line (``evaluation.tum.read_tum_lines``) is no pose, so that one bad file or line
    costs its frame's windows, not the folder. A trajectory is matched by
    :func:`match_trajectory`, the images' names as their times where they read as numbers, by
    order to all ``images``. Kept images without a pose file among images of the folder with one
    (kept or not: a range or a stride may keep none with one) go without, said once: how many of
    the kept, and the first."""
    keep = list(range(len(images))) if keep is None else list(keep)
    if trajectory is None:
        own = [root / n for n in TRAJECTORY_NAMES if (root / n).is_file()] + sorted(root.glob("*.tum"))
        if own:
            from evaluation.tum import read_tum_lines

            trajectory = own[0], read_tum_lines(own[0])
    if trajectory is not None:
        kept = [images[k] for k in keep]
        return match_trajectory(*trajectory, _timestamps(kept), keep, len(images), [p.name for p in kept])
    out, missing = [], []
    for image in (images[k] for k in keep):
        found = _pose_files(root, image)
        if not found:
            out.append(None)
            missing.append(image.name)
            continue
        try:
            out.append(imaging.read_pose(found[0]).astype(np.float32))
        except (OSError, ValueError) as err:  # named by read_pose: 'FILE: problem'
            out.append(BadPose(str(err)))
    # a folder of pose files, some frames without: one with one is kept, or is among the others (a range, a stride)
    picked = set(keep)
    if missing and (len(missing) < len(out) or any(_pose_files(root, images[k])
                                                   for k in range(len(images)) if k not in picked)):
        log.warning("%s: %d of %d frames have no pose file (<name>.pose.txt, <name>.txt or poses/<name>.txt; the "
                    "first: %s); they go without a ground-truth pose", root, len(missing), len(out), missing[0])
    return out


def _pose_files(root: Path, image: Path) -> list[Path]:
    """The per-frame pose files of ``image`` in the folder ``root`` that are there (module docstring)."""
    base = _frame_base(image)
    return [c for c in (image.parent / f"{base}.pose.txt", image.parent / f"{base}.txt", root / "poses" / f"{base}.txt")
            if c.is_file()]


def folder_sequence(folder: Path, first: int | None = None, last: int | None = None, *,
                    depth_scale: float = 1000.0, intrinsics: Path | None = None,
                    depth_intrinsics: Path | None = None,
                    poses_of: Callable[[list[Path], list[int]], list[np.ndarray | BadPose | None]] | None = None
                    ) -> Sequence:
    """A generic image folder (module docstring) as a :class:`Sequence`. ``intrinsics``: the
    frames' intrinsics file (default the folder's own, ``reliev3r.imaging.intrinsics_file``);
    ``depth_intrinsics``: that of the depth maps where another camera's (a ScanNet scene's), each
    brought to its colour frame through both (``reliev3r.imaging.depth_in_colour_frame``; needs
    ``intrinsics``); ``poses_of(frames, kept)``: the ground-truth poses of the kept frames
    (default :func:`folder_poses`)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a folder")
    every = imaging.frame_files(folder)
    keep = [k for k in range(len(every)) if (first is None or k >= first) and (last is None or k <= last)]
    poses = (poses_of or functools.partial(folder_poses, folder))(every, keep)
    images = [every[k] for k in keep]
    if not images:
        raise FileNotFoundError(f"{folder}: no images (*.jpg, *.png) in range")
    turns = _Orientations(lambda k: images[k])
    first_bgr, turns[0] = imaging.read_image_and_orientation(images[0])
    if first_bgr is None:
        raise OSError(f"{images[0]}: unreadable image")
    held = {0: first_bgr}  # read(0)'s image, decoded already
    sizes = _Sizes(lambda k: images[k], turns, every)
    sizes.saw(0, first_bgr)
    found = intrinsics or imaging.intrinsics_file(folder)
    published = None if found is not None else imaging.published_intrinsics(images)  # 7-Scenes' own frames
    if depth_intrinsics is not None and found is None:
        raise ValueError(f"{folder}: depth intrinsics ({depth_intrinsics}) without the frames' to bring depth to")
    depth_K = None if depth_intrinsics is None else imaging.read_intrinsics(depth_intrinsics)
    if found is not None:  # of the camera as it records: turned as each frame is
        K = imaging.read_intrinsics(found)

        def intrinsics_of(k: int, h: int, w: int) -> np.ndarray:
            return sizes.same(k, w, h, found, _checked(imaging.shown_intrinsics(K, turns[k], w, h), found, w, h))
    else:  # of each frame as shown, as the streamer assumes them
        from reliev3r.geometry import intrinsics_from_fov

        def intrinsics_of(k: int, h: int, w: int, checked: bool = True) -> np.ndarray:
            K = published(turns[k], w, h) if published is not None else None  # 7-Scenes', at the frame's size
            if K is not None:
                return sizes.same(k, w, h, imaging.PUBLISHED, K) if checked else K
            return intrinsics_from_fov(60.0, w, h).double().numpy()

        # the range's first frame's (a window's are intrinsics_of's, checked: not refused here)
        K = intrinsics_of(0, *first_bgr.shape[:2], checked=False)

    def depth_path(image: Path) -> Path | None:
        for c in (image.parent / f"{_frame_base(image)}.depth.png", folder / "depth" / f"{image.stem}.png",
                  folder / "depth" / f"{_frame_base(image)}.png"):
            if c.is_file():
                return c
        return None

    def read(k: int):
        if isinstance(poses[k], BadPose):
            raise ValueError(poses[k].reason)  # its windows are skipped, saying it
        bgr = held.pop(k, None)
        if bgr is None:
            bgr, turns[k] = imaging.read_image_and_orientation(images[k])
        if bgr is None:
            raise OSError(f"{images[k]}: unreadable image")
        depth = None
        if (dp := depth_path(images[k])) is not None:
            raw = imaging.read_image(dp, cv2.IMREAD_UNCHANGED)
            if raw is None or raw.ndim != 2:
                raise OSError(f"{dp}: unreadable or not a single-channel depth image")
            depth = raw.astype(np.float32) / depth_scale
            if raw.dtype == np.uint16:
                depth[raw == 65535] = 0
            if depth_K is not None:  # another camera's, both as they record: onto the colour frame's pixels
                size = imaging.recorded_size(turns[k], bgr.shape[1], bgr.shape[0])
                if (problem := imaging.depth_intrinsics_problem(depth_K, depth.shape[::-1], K, size)) is not None:
                    raise ValueError(f"{depth_intrinsics}: {problem}")
                depth = imaging.depth_in_colour_frame(depth, depth_K, K, *size)
            depth = imaging.shown_image(depth, turns[k])  # read unturned (IMREAD_UNCHANGED): turned as its frame
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), depth, _turned_pose(poses[k], turns[k], images[k])

    return Sequence(folder.name, len(images), K, read, intrinsics_of)


def scannet_sequence(folder: Path, first: int | None = None, last: int | None = None) -> Sequence:
    """A ScanNet scene as SensReader exports it (module docstring) as a :class:`Sequence`: read
    as an image folder (:func:`folder_sequence`: its ``color/`` frames, ``depth/`` maps), with its
    colour and depth intrinsics and its poses (:func:`scannet_poses`)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a folder")
    for name in imaging.SCANNET_FILES:
        if not (folder / name).exists():
            raise FileNotFoundError(f"{folder / name}: not there (a ScanNet scene as SensReader exports it has "
                                    f"{', '.join(imaging.SCANNET_FILES)}, depth/ and pose/)")
    return folder_sequence(folder, first, last, intrinsics=folder / imaging.SCANNET_FILES[1],
                           depth_intrinsics=folder / imaging.SCANNET_FILES[2],
                           poses_of=functools.partial(scannet_poses, folder))


def scannet_poses(folder: Path, images: list[Path], keep: list[int]) -> list[np.ndarray | BadPose | None]:
    """The ground-truth cam_to_world [4,4] of a ScanNet scene's frames ``images`` (``keep``
    indexes those read): ``pose/<name>.txt``. None where a frame has none, its file missing or not
    finite (``reliev3r.imaging.read_tracked_pose``: a frame SensReader's tracking lost), said once
    with how many of the kept and the first; :class:`BadPose` where the file is no pose."""
    out, lost = [], []
    for image in (images[k] for k in keep):
        file = folder / "pose" / f"{image.stem}.txt"
        try:
            pose = imaging.read_tracked_pose(file)
        except FileNotFoundError:
            pose = None
        except (OSError, ValueError) as err:  # named by read_tracked_pose: 'FILE: problem'
            out.append(BadPose(str(err)))
            continue
        if pose is None:
            lost.append(file)
        out.append(None if pose is None else pose.astype(np.float32))
    if lost:
        log.warning("%s: %d of %d frames have no pose (pose/<name>.txt missing, or not finite as SensReader writes "
                    "the pose of a frame its tracking lost; the first: %s); they go without a ground-truth pose",
                    folder, len(lost), len(out), lost[0].relative_to(folder))
    return out


FRAME_RANGE = re.compile(r"([0-9]+)-([0-9]+)")
"""A spec's frame range after its ``@``: ``FIRST-LAST``, frame indices, both included."""


def spec_parts(spec: str) -> tuple[str, str, str, str]:
    """A dataset spec as :func:`load_sequences` reads it: its kind (``folder`` for a bare folder),
    its folder, its frame range (what follows the ``@``; "" where none) and a folder's options
    (what follows its ``?``). A ``synthetic`` spec's folder is the rest ("" for the built-in world)."""
    kind, _, rest = spec.partition(":")
    if kind == "synthetic":
        return kind, rest, "", ""
    if kind in ("7scenes", "scannet"):
        folder, _, frames = rest.partition("@")
        return kind, folder, frames, ""
    body, _, query = (rest if kind == "folder" else spec).partition("?")
    folder, _, frames = body.partition("@")
    return "folder", folder, frames, query


def _frame_range_problem(spec: str) -> str | None:
    """Why the frame range of ``spec`` is no ``@FIRST-LAST`` of frame indices, FIRST <= LAST, or None."""
    text = spec_parts(spec)[2]
    if not text:
        return None
    match = FRAME_RANGE.fullmatch(text)
    if match is None:
        return f"{spec}: frame range {text!r} is not @FIRST-LAST (frame indices, e.g. @0-99)"
    if int(match[1]) > int(match[2]):
        return f"{spec}: frame range {text!r} is not @FIRST-LAST with FIRST <= LAST"
    return None


def _frame_range(text: str) -> tuple[int | None, int | None]:
    """``FIRST-LAST`` as (FIRST, LAST); (None, None) for "" (every frame). Checked by :func:`spec_problem`."""
    if not text:
        return None, None
    first, last = FRAME_RANGE.fullmatch(text).groups()
    return int(first), int(last)


def frame_range(spec: str) -> tuple[int | None, int | None]:
    """The frame range of a ``7scenes:``, ``scannet:``, ``folder:`` or bare-folder spec as
    (FIRST, LAST), frame indices both included; (None, None) where it has none (every frame).
    ValueError, in the words of :func:`spec_problem`, where it is no ``@FIRST-LAST`` with
    FIRST <= LAST. For tools that read a spec's parts themselves (the studies' datasets)."""
    if problem := _frame_range_problem(spec):
        raise ValueError(problem)
    return _frame_range(spec_parts(spec)[2])


def _depth_scale(spec: str, text: str) -> float:
    """The ``depth_scale`` option's value: a finite number > 0 (depth is the PNG value divided by
    it: 0 would make every depth +inf, a negative one every depth negative, inf every depth 0)."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (np.isfinite(value) and value > 0):
        raise ValueError(f"{spec!r}: depth_scale must be a finite number > 0 (PNG value per metre), got {text!r}")
    return value


def load_windows(spec: str, *, views: int, height: int, width: int, windows: int, stride: int,
                 run_dir: Path, synthetic_cfg=None) -> list[EvalWindow]:
    """Parse a dataset spec (module docstring) and return its evaluation windows."""
    sequences = load_sequences(spec, run_dir=run_dir, synthetic_cfg=synthetic_cfg)
    out = make_windows(sequences, views=views, height=height, width=width, stride=stride, windows=windows)
    if not out:
        raise ValueError(f"{spec}: sequences too short for {views} views {stride} frames apart")
    return out


SPECS = "synthetic, synthetic:DIR, 7scenes:DIR[@A-B], scannet:DIR[@A-B], folder:DIR[@A-B] or an existing folder"
"""The forms of a dataset spec, as a refusal names them."""


def spec_problem(spec: str) -> str | None:
    """Why the dataset spec cannot be loaded, from its form and whether its folder is there
    (nothing read), or None: a spec of no form (:data:`SPECS`; a bare path that is not a folder
    is one; a frame range that is no ``@FIRST-LAST`` of frame indices, FIRST <= LAST), a
    ``synthetic:``, ``7scenes:``, ``scannet:`` or ``folder:`` folder that is not there, or a file.
    Said starting with the spec, for a caller to put the option or key that gave it before."""
    kind, folder, _, _ = spec_parts(spec)
    if kind == "synthetic" and not folder:
        return None
    if spec.partition(":")[0] not in SPEC_KINDS and not Path(folder).is_dir():
        return f"{spec}: unknown dataset spec (use {SPECS})"
    if problem := _frame_range_problem(spec):
        return problem
    if not Path(folder).exists():
        return f"{spec}: no such folder"
    return None if Path(folder).is_dir() else f"{spec}: {folder} is not a folder"


def held_out_world(run_dir: Path, synthetic_cfg) -> list[Path]:
    """The ``synthetic`` spec's videos: the held-out scenes of the synthetic world (its seed +
    1000), rendered into ``<run_dir>/eval_world`` where they are not there yet
    (``reliev3r.synthetic.ensure_world``): the spec's writes, which the evaluator tells from its
    reads."""
    held_out = replace(synthetic_cfg, seed=synthetic_cfg.seed + 1000)
    return ensure_world(Path(run_dir) / "eval_world", held_out, progress=False)


def load_sequences(spec: str, *, run_dir: Path | None = None, synthetic_cfg=None) -> list[Sequence]:
    """Parse a dataset spec (module docstring) and return its sequences (``run_dir`` is where
    the ``synthetic`` spec renders its scenes). ValueError where :func:`spec_problem` refuses it."""
    if problem := spec_problem(spec):
        raise ValueError(problem)
    kind, folder, frames, query = spec_parts(spec)
    if kind == "synthetic" and not folder:
        if synthetic_cfg is None or run_dir is None:
            raise ValueError("the 'synthetic' spec needs the synthetic world's config and a run folder")
        sequences = synthetic_sequences(held_out_world(run_dir, synthetic_cfg))
    elif kind == "synthetic":
        videos = sorted(Path(folder).glob("*.mp4"))
        if not videos:
            raise FileNotFoundError(f"{folder}: no synthetic videos (*.mp4 with .gt.npz)")
        sequences = synthetic_sequences(videos)
    elif kind == "7scenes":
        sequences = [sevenscenes_sequence(Path(folder), *_frame_range(frames))]
    elif kind == "scannet":
        sequences = [scannet_sequence(Path(folder), *_frame_range(frames))]
    else:
        options = dict(item.partition("=")[::2] for item in query.split("&") if item)
        if set(options) - {"depth_scale"}:
            raise ValueError(f"{spec!r}: unknown option(s) {sorted(set(options) - {'depth_scale'})}; "
                             "known: depth_scale")
        sequences = [folder_sequence(Path(folder), *_frame_range(frames),
                                     depth_scale=_depth_scale(spec, options.get("depth_scale", "1000")))]
    return sequences
