"""A fixed, labelled dataset of windows for studies: labelled once, cached, served as batches.

Windows are cut from the synthetic world (:mod:`reliev3r.synthetic`, exact ground truth) or
from 7-Scenes folders (:mod:`evaluation.datasets` loaders), labelled ONCE with a depth teacher
(:func:`labelers.depth.make_teacher`) and the real matcher (:func:`labelers.matches.match_window`
with USAC/MAGSAC verification), and cached as one ``.npz`` (read with ``allow_pickle=False``),
so that GPU runs never redo the labelling. :meth:`LabelledDataset.batch` returns the same dict
that :func:`learner.train.batch_from_message` builds from a replay ``batch`` message, so the
:class:`~learner.train.Trainer` is fed identically in studies and in the streaming system.

Specs (:func:`parse_spec`), comma-separated ``key=value`` after the kind:

* ``synthetic:scenes=8,frames=40,seed=0``: ``scenes`` procedural scenes (``render_scene`` seeds
  derived from ``seed``), each a clip of ``frames`` frames; held-out data uses another seed.
* ``7scenes:DIR`` or ``7scenes:DIR@FIRST-LAST``: one 7-Scenes sequence folder. A window with a
  frame that cannot be read (a damaged frame, depth map or pose file; a frame of another size than
  the folder's first, which its one intrinsics matrix does not serve: ``reliev3r.imaging.other_size``)
  is skipped as eval skips it: logged and listed in the meta (``skipped``), the others labelled;
  so is a window its depth teacher cannot label (``TeacherError``).

Windows: ``views`` frames ``stride`` frames apart, starting every ``hop`` frames. Matching
runs on frames ``match_scale`` times larger than the training resolution (SIFT finds few
keypoints on 48x64 images) and the match pixels are mapped down to the training resolution
(pixel centres at integer coordinates: ``x = (x_big + 0.5) / s - 0.5``), as a labeler that
matches at camera resolution would send them.

Labelling runs in a process pool (spawned workers, one matcher each; OpenCV and torch
single-threaded in each), one task per scene.

Cache layout (N windows, V views, M matches in total)::

    images uint8 [N,V,H,W,3]     intrinsics float32 [N,V,3,3]
    gt_depth float32 [N,V,H,W]   gt_cam_to_world float32 [N,V,4,4]
    teacher_depth float32 [N,V,H,W], teacher_valid bool [N,V,H,W]   (absent for teacher none)
    matches float32 [M,8] rows (n, i, j, x_i, y_i, x_j, y_j, score)
    names <U [N]                 meta <U [1] (JSON: spec, teacher/matcher names and versions,
                                              the windows skipped and why)
"""

from __future__ import annotations

import io
import json
import logging
import multiprocessing as mp
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from evaluation.datasets import EvalWindow, Sequence, frame_range, sevenscenes_sequence, spec_parts
from reliev3r import durable

log = logging.getLogger(__name__)

CACHE_VERSION = 2
"""Bumped when the cache layout or the labelling changes: older caches are rebuilt.
2: real teachers see the matching-resolution frames; compressed cache, depths as float16."""

_HALF = ("gt_depth", "teacher_depth")
"""Stored as float16 (relative precision 5e-4, far below teacher noise and metric
resolution) and served as float32: a 7-Scenes cache then fits a device transfer."""


class DatasetError(Exception):
    """A dataset spec cannot be built or a cache file is unusable."""


@dataclass(kw_only=True, slots=True)
class DatasetSpec:
    """What to cut and how to label it."""

    source: str = "synthetic"
    """``synthetic`` or ``7scenes:DIR[@FIRST-LAST]``."""
    scenes: int = 8
    """Synthetic scenes (clips)."""
    frames: int = 40
    """Frames per synthetic clip."""
    seed: int = 0
    """Seed of the synthetic scenes (the held-out set of a study uses another)."""
    views: int = 4
    """Frames per window (V)."""
    stride: int = 4
    """Frames between consecutive views of a window (parallax grows with it)."""
    hop: int = 4
    """Frames between the starts of consecutive windows of one clip."""
    height: int = 48
    width: int = 64
    teacher: str = "oracle"
    """Depth teacher spec for :func:`labelers.depth.make_teacher` (``none``: no depth labels)."""
    matcher: str = "sift"
    match_scale: int = 2
    """Match on frames this many times larger than ``height`` x ``width``."""
    max_matches_per_pair: int = 128
    min_matches: int = 12
    long_pairs: int = 3
    """Long-baseline pairs matched beside neighbours (more parallax per window)."""
    ransac_threshold_px: float = 1.0
    """USAC/MAGSAC threshold in pixels of the matching resolution."""
    fov_deg: float = 60.0
    """Horizontal field of view of the synthetic cameras."""

    def __post_init__(self) -> None:
        if not (self.source == "synthetic" or self.source.startswith("7scenes:")):
            raise ValueError(f"source must be 'synthetic' or '7scenes:DIR[@A-B]', got {self.source!r}")
        if self.source != "synthetic":
            frame_range(self.source)  # refused as the evaluation refuses it (``reliev3r eval``)
        if self.views < 2 or self.stride < 1 or self.hop < 1 or self.scenes < 1 or self.frames < 2:
            raise ValueError("views must be >= 2; stride, hop, scenes >= 1; frames >= 2")
        if self.match_scale < 1:
            raise ValueError("match_scale must be >= 1")

    def key(self) -> str:
        """Stable description used in the cache file name and meta."""
        fields = {k: getattr(self, k) for k in self.__slots__}
        return json.dumps(fields, sort_keys=True)


def parse_spec(text: str, **defaults: Any) -> DatasetSpec:
    """``synthetic:scenes=8,frames=40`` or ``7scenes:DIR@A-B`` (options after ``;``, e.g.
    ``7scenes:DIR@0-499;stride=10``). ``defaults`` (views, height, width, teacher ...) apply
    first, the spec's own options override them."""
    head, _, opts = text.partition(";") if text.startswith("7scenes:") else text.partition(":")
    values: dict[str, Any] = dict(defaults)
    if head.startswith("7scenes:"):
        values["source"] = head
    elif head == "synthetic":
        values["source"] = "synthetic"
    else:
        raise ValueError(f"unknown dataset spec {text!r}: use synthetic[:k=v,...] or 7scenes:DIR[@A-B][;k=v,...]")
    types = {k: type(getattr(DatasetSpec(), k)) for k in DatasetSpec.__slots__}
    for item in filter(None, opts.split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in types or key == "source":
            raise ValueError(f"{key}: unknown dataset option (known: {sorted(set(types) - {'source'})})")
        values[key] = types[key](value)
    return DatasetSpec(**values)


# ---------------------------------------------------------------------- labelling

_WORKER: dict[str, Any] = {}


def _init_worker(matcher: str, teacher: str) -> None:
    import cv2

    from labelers.depth import make_teacher
    from labelers.matches import make_matcher

    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    _WORKER["matcher"] = make_matcher(matcher)
    _WORKER["teacher"] = make_teacher(teacher)


def _synthetic_clip(spec: DatasetSpec, index: int, scale: int,
                    select: list[int] | None = None) -> dict[str, np.ndarray]:
    from reliev3r.synthetic import render_scene, scene_seed

    scene = render_scene(scene_seed(spec.seed, index), frames=spec.frames, height=spec.height * scale,
                         width=spec.width * scale, fov_deg=spec.fov_deg, select=select)
    return {"images": scene.images.numpy(), "depth": scene.depth.numpy(),
            "cam_to_world": scene.cam_to_world.numpy(), "intrinsics": scene.intrinsics.numpy()}


def _windows_of_clip(spec: DatasetSpec, length: int) -> list[list[int]]:
    span = (spec.views - 1) * spec.stride
    return [list(range(s, s + span + 1, spec.stride)) for s in range(0, length - span, spec.hop)]


def _downsample_labels(depth: np.ndarray, valid: np.ndarray, s: int) -> tuple[np.ndarray, np.ndarray]:
    """Block means of [V, s*H, s*W] teacher depth over valid pixels; a small pixel is valid
    when its whole block is (no blending across holes)."""
    v, hh, ww = depth.shape
    blocks = depth.reshape(v, hh // s, s, ww // s, s).astype(np.float64)
    ok = valid.reshape(v, hh // s, s, ww // s, s)
    count = ok.sum((2, 4))
    mean = np.where(ok, blocks, 0).sum((2, 4)) / np.maximum(count, 1)
    return mean.astype(np.float32), count == s * s


def _teacher_labels(teacher: Any, name: str, images: np.ndarray, big: np.ndarray, depth: np.ndarray,
                    scale: int, frame_keys: list[str] | None) -> tuple[np.ndarray, np.ndarray]:
    """A real (image-only) teacher sees the matching-resolution frames, as a labeler at camera
    resolution would, and its output is block-averaged to the training resolution; per-frame
    outputs are memoised by ``frame_keys`` (overlapping windows share frames). The oracle
    needs the ground truth at the training resolution and stays per window."""
    if teacher.name == "oracle-gt" or scale == 1:
        return teacher.predict(images, gt_depth=depth, window_id=name)
    memo = _WORKER.setdefault("memo", {})
    keys = frame_keys or [f"{name}#{v}" for v in range(len(images))]
    todo = [v for v, k in enumerate(keys) if k not in memo]
    if todo:
        d, ok = teacher.predict(big[todo], window_id=name)
        d, ok = _downsample_labels(np.asarray(d, np.float32), np.asarray(ok, bool), scale)
        for n, v in enumerate(todo):
            memo[keys[v]] = (d[n], ok[n])
    return np.stack([memo[k][0] for k in keys]), np.stack([memo[k][1] for k in keys])


def _label(spec: DatasetSpec, name: str, images: np.ndarray, big: np.ndarray, depth: np.ndarray,
           intrinsics: np.ndarray, poses: np.ndarray, frame_keys: list[str] | None = None) -> dict[str, Any]:
    """The labelled window, or ``{"skipped": why}`` where its depth teacher cannot label it."""
    from labelers.depth import TeacherError
    from labelers.matches import match_window

    teacher = _WORKER["teacher"]
    out: dict[str, Any] = {"name": name, "images": images, "gt_depth": depth.astype(np.float32),
                           "intrinsics": intrinsics.astype(np.float32), "gt_cam_to_world": poses.astype(np.float32)}
    if teacher.produces_labels:
        try:
            out["teacher_depth"], out["teacher_valid"] = _teacher_labels(
                teacher, name, images, big, depth, spec.match_scale, frame_keys)
        except TeacherError as err:  # as an unreadable window: said, listed in the meta
            return {"skipped": f"{name}: teacher: {err}"}
    rows, _ = match_window(big, _WORKER["matcher"], long_pairs=spec.long_pairs, min_matches=spec.min_matches,
                           max_matches_per_pair=spec.max_matches_per_pair,
                           threshold_px=spec.ransac_threshold_px * 1.0)
    s = spec.match_scale
    rows = rows.copy()
    rows[:, 2:6] = (rows[:, 2:6] + 0.5) / s - 0.5
    out["matches"] = rows
    return out


def _label_synthetic_scene(spec: DatasetSpec, index: int) -> list[dict[str, Any]]:
    small = _synthetic_clip(spec, index, 1)
    big = _synthetic_clip(spec, index, spec.match_scale) if spec.match_scale > 1 else small
    out = []
    for frames in _windows_of_clip(spec, spec.frames):
        K = np.broadcast_to(small["intrinsics"], (len(frames), 3, 3))
        out.append(_label(spec, f"synthetic-{spec.seed}-{index}:{frames[0]}", small["images"][frames],
                          big["images"][frames], small["depth"][frames], K, small["cam_to_world"][frames]))
    return out


def _sevenscenes(spec: DatasetSpec) -> Sequence:
    """The 7-Scenes sequence of ``spec``'s source (``7scenes:DIR[@FIRST-LAST]``), its frame range
    read as the evaluation reads it (``evaluation.datasets.spec_parts``, ``frame_range``)."""
    return sevenscenes_sequence(Path(spec_parts(spec.source)[1]), *frame_range(spec.source))


def _label_7scenes_chunk(spec: DatasetSpec, starts: list[int]) -> list[dict[str, Any]]:
    from reliev3r import imaging

    seq = _sevenscenes(spec)
    out: list[dict[str, Any]] = []
    for start in starts:
        imgs, bigs, depths, poses, Ks = [], [], [], [], []
        try:
            for idx in range(start, start + spec.views * spec.stride, spec.stride):
                rgb, depth, pose = seq.read(idx)
                h, w = rgb.shape[:2]
                imgs.append(imaging.fit_image(rgb, spec.height, spec.width))
                bigs.append(imaging.fit_image(rgb, spec.height * spec.match_scale, spec.width * spec.match_scale))
                depths.append(imaging.fit_image(depth, spec.height, spec.width, nearest=True))
                Ks.append(imaging.fit_intrinsics(seq.frame_intrinsics(idx, h, w), h, w, spec.height, spec.width))
                poses.append(pose)
        except (OSError, ValueError) as err:  # as eval: a damaged frame or pose file, a frame of another size
            out.append({"skipped": f"{seq.name}:{start}: {err}"})
            continue
        frames = range(start, start + spec.views * spec.stride, spec.stride)
        out.append(_label(spec, f"{seq.name}:{start}", np.stack(imgs), np.stack(bigs), np.stack(depths),
                          np.stack(Ks), np.stack(poses), frame_keys=[f"{seq.name}#{k}" for k in frames]))
    return out


def _tasks(spec: DatasetSpec) -> list[tuple[Any, ...]]:
    if spec.source == "synthetic":
        return [(_label_synthetic_scene, spec, i) for i in range(spec.scenes)]
    length = _sevenscenes(spec).length
    starts = [w[0] for w in _windows_of_clip(spec, length)]
    chunks = [starts[k:k + 8] for k in range(0, len(starts), 8)]
    return [(_label_7scenes_chunk, spec, chunk) for chunk in chunks]


def _run_task(task: tuple[Any, ...]) -> list[dict[str, Any]]:
    fn, *args = task
    return fn(*args)


def build(spec: DatasetSpec, *, workers: int = 0, progress: bool = True) -> dict[str, np.ndarray]:
    """Render/read, label and stack every window of ``spec`` (arrays of the cache layout); a
    window that cannot be read is skipped, logged and listed in the meta (``skipped``);
    :class:`DatasetError` when none is left."""
    from tqdm import tqdm

    tasks = _tasks(spec)
    workers = workers or min(len(tasks), os.cpu_count() or 1)
    items: list[dict[str, Any]] = []
    if workers <= 1:
        _init_worker(spec.matcher, spec.teacher)
        for task in tqdm(tasks, desc="labelling", disable=not progress):
            items += _run_task(task)
    else:
        # spawn, not fork: forking a process whose threads hold locks (torch's pools after any
        # torch work, a test runner) can leave a worker waiting forever (studies.fresh met it).
        ctx = mp.get_context("spawn")
        with ctx.Pool(workers, initializer=_init_worker, initargs=(spec.matcher, spec.teacher)) as pool:
            for part in tqdm(pool.imap(_run_task, tasks), total=len(tasks), desc="labelling", disable=not progress):
                items += part
    skipped = [it["skipped"] for it in items if "skipped" in it]
    items = [it for it in items if "skipped" not in it]
    for why in skipped:
        log.warning("dataset window skipped: %s", why)
    if not items:
        first = f" ({len(skipped)} skipped; the first: {skipped[0]})" if skipped else ""
        raise DatasetError(f"{spec.source}: no window could be labelled{first}")
    from labelers.depth import make_teacher
    from labelers.matches import make_matcher

    teacher, matcher = make_teacher(spec.teacher), make_matcher(spec.matcher)
    arrays: dict[str, np.ndarray] = {k: np.stack([it[k] for it in items])
                                     for k in ("images", "intrinsics", "gt_depth", "gt_cam_to_world")}
    if teacher.produces_labels:
        arrays["teacher_depth"] = np.stack([it["teacher_depth"] for it in items]).astype(np.float32)
        arrays["teacher_valid"] = np.stack([it["teacher_valid"] for it in items]).astype(bool)
    arrays["matches"] = np.concatenate([
        np.concatenate((np.full((len(it["matches"]), 1), n, np.float32), it["matches"]), axis=1)
        for n, it in enumerate(items)]).astype(np.float32)
    arrays["names"] = np.array([it["name"] for it in items])
    meta = {"version": CACHE_VERSION, "spec": json.loads(spec.key()),
            "teacher": teacher.describe(), "matcher": {"name": matcher.name, "version": matcher.version},
            "skipped": skipped}
    arrays["meta"] = np.array([json.dumps(meta)])
    return arrays


def cache_path(spec: DatasetSpec, folder: str | Path) -> Path:
    import hashlib

    digest = hashlib.sha256(f"{CACHE_VERSION}:{spec.key()}".encode()).hexdigest()[:12]
    kind = "synthetic" if spec.source == "synthetic" else "7scenes"
    return Path(folder) / (f"{kind}-{spec.views}v-{spec.height}x{spec.width}-"
                           f"{spec.teacher.replace(':', '_').replace('/', '_')[:24]}-{digest}.npz")


def ensure_dataset(spec: DatasetSpec, folder: str | Path, *, workers: int = 0,
                   progress: bool = True) -> "LabelledDataset":
    """The dataset of ``spec``, from its cache in ``folder`` or built and cached there."""
    path = cache_path(spec, folder)
    if not path.exists():
        start = time.perf_counter()
        arrays = build(spec, workers=workers, progress=progress)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        stored = {k: (a.astype(np.float16) if k in _HALF else a) for k, a in arrays.items()}
        npz = io.BytesIO()
        np.savez_compressed(npz, **stored)
        durable.write(path, npz.getbuffer(), tmp=tmp)
        if progress:
            print(f"labelled {len(arrays['names'])} windows in {time.perf_counter() - start:.1f} s -> {path}")
    return LabelledDataset.load(path)


# ---------------------------------------------------------------------- serving

class LabelledDataset:
    """The cached arrays of a labelled dataset (see the module docstring for the layout)."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        missing = {"images", "intrinsics", "gt_depth", "gt_cam_to_world", "matches", "names", "meta"} - set(arrays)
        if missing:
            raise DatasetError(f"dataset lacks {sorted(missing)}")
        self.arrays = arrays
        self.meta: dict[str, Any] = json.loads(str(arrays["meta"][0]))
        matches = arrays["matches"]
        order = np.argsort(matches[:, 0], kind="stable")
        self._matches = matches[order]
        n = len(arrays["names"])
        self._bounds = np.searchsorted(self._matches[:, 0], np.arange(n + 1) - 0.5)

    @classmethod
    def load(cls, path: str | Path) -> "LabelledDataset":
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: (data[k].astype(np.float32) if k in _HALF else data[k]) for k in data.files}
        except (OSError, ValueError) as err:
            raise DatasetError(f"{path}: unreadable dataset cache ({err})") from err
        ds = cls(arrays)
        if ds.meta.get("version") != CACHE_VERSION:
            raise DatasetError(f"{path}: cache version {ds.meta.get('version')} != {CACHE_VERSION}")
        return ds

    def __len__(self) -> int:
        return len(self.arrays["names"])

    @property
    def teacher_space(self) -> str:
        return str(self.meta.get("teacher", {}).get("space", "depth"))

    def matches_of(self, n: int) -> np.ndarray:
        """[K, 7] rows (i, j, x_i, y_i, x_j, y_j, score) of window ``n``."""
        return self._matches[self._bounds[n]:self._bounds[n + 1], 1:]

    def batch(self, indices: list[int] | np.ndarray, device: str | torch.device = "cpu", *,
              max_matches: int = 0, rng: np.random.Generator | None = None) -> dict[str, Tensor]:
        """The windows ``indices`` as a batch dict, keys and dtypes of
        :func:`learner.train.batch_from_message`: ``images`` float32 [B,V,3,H,W] in [0, 1],
        ``intrinsics`` [B,V,3,3], ``matches`` [K,8] (b, i, j, x_i, y_i, x_j, y_j, score),
        ``teacher_depth``/``teacher_valid`` (when labelled), ``gt_depth``, ``gt_cam_to_world``.
        ``max_matches`` > 0 keeps a random subset of that many matches per window."""
        idx = np.asarray(indices, dtype=np.int64)
        a = self.arrays
        rows = []
        for b, n in enumerate(idx):
            m = self.matches_of(int(n))
            if max_matches and len(m) > max_matches:
                pick = (rng or np.random.default_rng(0)).choice(len(m), max_matches, replace=False)
                m = m[np.sort(pick)]
            rows.append(np.concatenate((np.full((len(m), 1), b, np.float32), m), axis=1))
        device = torch.device(device)
        out = {"images": torch.from_numpy(a["images"][idx]).to(device).permute(0, 1, 4, 2, 3).float().div_(255.0),
               "intrinsics": torch.from_numpy(a["intrinsics"][idx]).to(device),
               "matches": torch.from_numpy(np.concatenate(rows) if rows else np.zeros((0, 8), np.float32)).to(device),
               "gt_depth": torch.from_numpy(a["gt_depth"][idx]).to(device),
               "gt_cam_to_world": torch.from_numpy(a["gt_cam_to_world"][idx]).to(device)}
        if "teacher_depth" in a:
            out["teacher_depth"] = torch.from_numpy(a["teacher_depth"][idx]).to(device)
            out["teacher_valid"] = torch.from_numpy(a["teacher_valid"][idx]).to(device)
        return out

    def windows(self, limit: int = 0) -> list[EvalWindow]:
        """Evaluation windows (images and ground truth), at most ``limit`` (0: all), spread evenly."""
        n = len(self)
        picks = range(n) if not limit or limit >= n else np.linspace(0, n - 1, limit).round().astype(int)
        a = self.arrays
        return [EvalWindow(str(a["names"][k]), a["images"][k], a["intrinsics"][k], a["gt_depth"][k],
                       a["gt_cam_to_world"][k]) for k in picks]

    def stats(self) -> dict[str, float]:
        """Matches per window and mean baseline / median depth (the parallax that makes
        per-view scale and translation observable, see :mod:`learner.losses`)."""
        counts = np.diff(self._bounds)
        return {"windows": float(len(self)), "matches_per_window": float(counts.mean()),
                "baseline_over_depth": baseline_over_depth(self.arrays["gt_cam_to_world"], self.arrays["gt_depth"])}


def baseline_over_depth(cam_to_world: np.ndarray, depth: np.ndarray) -> float:
    """Mean over windows of (mean distance between the window's camera centres) / (median of
    its valid depth): poses [N, V, 4, 4], depth [N, V, H, W] (0 = unknown)."""
    centres = cam_to_world[:, :, :3, 3]
    v = centres.shape[1]
    mean_base = np.linalg.norm(centres[:, :, None] - centres[:, None], axis=-1).sum((1, 2)) / (v * (v - 1))
    med = np.nanmedian(np.where(depth > 0, depth, np.nan).reshape(len(depth), -1), axis=1)
    return float(np.mean(mean_base / med))
