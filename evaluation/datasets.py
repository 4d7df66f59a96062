"""Evaluation data with ground truth, cut into windows the model can read.

Specs:

* ``synthetic``: held-out scenes of the embedded world (seed + 1000), rendered on first use
  into ``<run.dir>/eval_world``;
* ``synthetic:DIR``: every ``*.mp4`` in DIR with its ``.gt.npz`` (``reliev3r render`` output);
* ``7scenes:DIR`` or ``7scenes:DIR@FIRST-LAST``: 7-Scenes layout (``frame-NNNNNN.color.jpg``,
  ``.depth.png`` uint16 millimetres with 0 = invalid, ``.pose.txt`` 4x4 cam-to-world,
  ``camera-intrinsics.txt``), optionally only frames FIRST..LAST (inclusive).

Windows are ``views`` frames ``stride`` frames apart, spread evenly over the sequence.
Images, depth and intrinsics are fitted to the model's input size by
``reliev3r.imaging`` exactly as the streamer fits its windows.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

import av
import cv2
import numpy as np

from reliev3r import imaging
from reliev3r.synthetic import ensure_world, load_ground_truth


@dataclass(slots=True)
class EvalWindow:
    """One window with ground truth. images uint8 [V,H,W,3]; intrinsics float32 [V,3,3];
    gt_depth float32 [V,H,W] metres (0 = invalid); gt_cam_to_world float32 [V,4,4]."""

    name: str
    images: np.ndarray
    intrinsics: np.ndarray
    gt_depth: np.ndarray
    gt_cam_to_world: np.ndarray


@dataclass(slots=True)
class Sequence:
    """A frame sequence with ground truth, read lazily by index."""

    name: str
    length: int
    intrinsics: np.ndarray
    read: callable
    """index -> (rgb uint8 [H,W,3], depth float32 [H,W], cam_to_world float32 [4,4])"""


def window_starts(length: int, *, views: int, stride: int, windows: int) -> list[int]:
    span = (views - 1) * stride
    if length <= span:
        return []
    last = length - 1 - span
    count = min(windows, last + 1)
    return sorted({round(k * last / max(count - 1, 1)) for k in range(count)})


def make_windows(sequences: list[Sequence], *, views: int, height: int, width: int, stride: int,
                 windows: int) -> list[EvalWindow]:
    """``windows`` windows spread over the sequences (round-robin), fitted to height x width."""
    per_seq = [window_starts(s.length, views=views, stride=stride, windows=windows) for s in sequences]
    picks: list[tuple[int, int]] = []
    k = 0
    while len(picks) < windows and any(k < len(p) for p in per_seq):
        picks += [(i, p[k]) for i, p in enumerate(per_seq) if k < len(p)]
        k += 1
    out = []
    for seq_index, start in sorted(picks[:windows]):
        seq = sequences[seq_index]
        images, depths, poses, Ks = [], [], [], []
        for idx in range(start, start + views * stride, stride):
            rgb, depth, pose = seq.read(idx)
            h, w = rgb.shape[:2]
            images.append(imaging.fit_image(rgb, height, width))
            depths.append(imaging.fit_image(depth, height, width, nearest=True))
            Ks.append(imaging.fit_intrinsics(seq.intrinsics, h, w, height, width))
            poses.append(pose)
        out.append(EvalWindow(f"{seq.name}:{start}", np.stack(images), np.stack(Ks).astype(np.float32),
                              np.stack(depths).astype(np.float32), np.stack(poses).astype(np.float32)))
    return out


def synthetic_sequences(videos: list[Path]) -> list[Sequence]:
    seqs = []
    for video in videos:
        gt = load_ground_truth(video)
        if gt is None:
            raise FileNotFoundError(f"{video}: no ground truth beside it (<stem>.gt.npz)")
        with av.open(str(video)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        n = min(len(frames), len(gt.depth))
        seqs.append(Sequence(video.stem, n, gt.intrinsics,
                             lambda i, f=frames, g=gt: (f[i], g.depth[i], g.cam_to_world[i])))
    return seqs


def sevenscenes_sequence(folder: Path, first: int | None = None, last: int | None = None) -> Sequence:
    folder = Path(folder)
    indices = sorted(int(m.group(1)) for p in folder.glob("frame-*.color.jpg")
                     if (m := re.match(r"frame-(\d+)\.color\.jpg", p.name)))
    indices = [i for i in indices if (first is None or i >= first) and (last is None or i <= last)]
    if not indices:
        raise FileNotFoundError(f"{folder}: no frame-NNNNNN.color.jpg frames in range")
    K = np.loadtxt(folder / "camera-intrinsics.txt", dtype=np.float64).reshape(3, 3)

    def read(k: int):
        stem = folder / f"frame-{indices[k]:06d}"
        bgr = cv2.imread(f"{stem}.color.jpg", cv2.IMREAD_COLOR)
        depth = cv2.imread(f"{stem}.depth.png", cv2.IMREAD_UNCHANGED)
        if bgr is None or depth is None:
            raise OSError(f"{stem}: unreadable colour or depth image")
        depth = depth.astype(np.float32) / 1000.0
        depth[depth > 10] = 0  # 65535 marks invalid in some 7-Scenes releases
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), depth, np.loadtxt(f"{stem}.pose.txt", dtype=np.float32)

    return Sequence(folder.name, len(indices), K, read)


def load_windows(spec: str, *, views: int, height: int, width: int, windows: int, stride: int,
                 run_dir: Path, synthetic_cfg=None) -> list[EvalWindow]:
    """Parse a dataset spec (module docstring) and return its evaluation windows."""
    kind, _, rest = spec.partition(":")
    if kind == "synthetic" and not rest:
        if synthetic_cfg is None:
            raise ValueError("the 'synthetic' spec needs the synthetic world's config")
        held_out = replace(synthetic_cfg, seed=synthetic_cfg.seed + 1000)
        videos = ensure_world(Path(run_dir) / "eval_world", held_out, progress=False)
        sequences = synthetic_sequences(videos)
    elif kind == "synthetic":
        videos = sorted(Path(rest).glob("*.mp4"))
        if not videos:
            raise FileNotFoundError(f"{rest}: no synthetic videos (*.mp4 with .gt.npz)")
        sequences = synthetic_sequences(videos)
    elif kind == "7scenes":
        folder, _, frame_range = rest.partition("@")
        first = last = None
        if frame_range:
            a, _, b = frame_range.partition("-")
            first, last = int(a), int(b)
        sequences = [sevenscenes_sequence(Path(folder), first, last)]
    else:
        raise ValueError(f"unknown dataset spec {spec!r}: use synthetic, synthetic:DIR or 7scenes:DIR[@A-B]")
    out = make_windows(sequences, views=views, height=height, width=width, stride=stride, windows=windows)
    if not out:
        raise ValueError(f"{spec}: sequences too short for {views} views {stride} frames apart")
    return out
