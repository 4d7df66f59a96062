"""A stream of fresh synthetic windows for studies: every window is a scene never seen before.

A fixed dataset is learnt by heart: with 96 to 1,600 windows, even the fully supervised model
fitted the training poses and stayed at identity level on held-out scenes (docs/RESULTS.md,
issue 9). Here producer processes render a new procedural scene for every window
(:func:`reliev3r.synthetic.render_scene`, only the V frames the window uses), label it exactly as
:mod:`studies.dataset` does (the same teacher spec and the real matcher with USAC/MAGSAC, at
``match_scale`` times the training resolution) and write it as one ``.npz`` file into a folder;
learners (``python -m studies.study --stream DIR``) keep the newest ``capacity`` windows in memory,
a FIFO replay, and draw their batches from it. Several learners can read one folder, so the runs
of a comparison see the same windows.

    python -m studies.fresh --out DIR --workers 12 --views 4 --height 48 --width 64 --stride 8 \\
        [--spec synthetic:frames=40,seed=7] [--limit N]

Windows: scene ``k`` is ``scene_seed(spec.seed, k)``; its clip has ``spec.frames`` frames and the
window's ``views`` frames are ``stride`` apart from a start drawn uniformly (seeded by the scene)
among the clip's possible starts: the distribution of :mod:`studies.dataset`'s windows of the
same spec, whose held-out set (another seed) a study scores.

Folder layout: ``meta.json`` (the cache meta of :mod:`studies.dataset`: spec, teacher, matcher)
and ``w000000000.npz``, ``w000000001.npz``, ... numbered in the order written, each written to a
temporary name, fsynced and renamed (``reliev3r.durable.write``: a reader never sees a partial
file). A file holds one window: ``images`` uint8 [V,H,W,3], ``intrinsics`` [V,3,3], ``gt_depth``
float16 [V,H,W], ``gt_cam_to_world`` [V,4,4], ``teacher_depth`` float16 / ``teacher_valid`` bool
[V,H,W] (absent for teacher ``none``), ``matches`` float32 [K,7] rows (i, j, x_i, y_i, x_j, y_j,
score) and ``name``. Windows the teacher refuses are skipped (numbers stay contiguous).
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import signal
import time
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np

from reliev3r import durable
from studies import dataset as ds
from studies.dataset import DatasetError, DatasetSpec, LabelledDataset, parse_spec

META = "meta.json"


def window_frames(spec: DatasetSpec, index: int) -> list[int]:
    """The clip frames of fresh window ``index``: ``views`` frames ``stride`` apart, the start
    drawn uniformly among the clip's possible starts from the scene's own seed."""
    from reliev3r.synthetic import scene_seed

    span = (spec.views - 1) * spec.stride
    if span >= spec.frames:
        raise ValueError(f"views {spec.views} x stride {spec.stride} do not fit a clip of {spec.frames} frames")
    start = int(np.random.default_rng([scene_seed(spec.seed, index), 1]).integers(0, spec.frames - span))
    return list(range(start, start + span + 1, spec.stride))


def label_fresh_window(spec: DatasetSpec, index: int) -> dict[str, Any]:
    """Render and label fresh window ``index`` (in a worker set up by ``dataset._init_worker``);
    ``{"skipped": why}`` when the teacher refuses it (``dataset._label``)."""
    frames = window_frames(spec, index)
    small = ds._synthetic_clip(spec, index, 1, select=frames)
    big = ds._synthetic_clip(spec, index, spec.match_scale, select=frames) if spec.match_scale > 1 else small
    K = np.broadcast_to(small["intrinsics"], (len(frames), 3, 3))
    try:
        return ds._label(spec, f"fresh-{spec.seed}-{index}:{frames[0]}", small["images"], big["images"],
                         small["depth"], K, small["cam_to_world"])
    finally:
        ds._WORKER.pop("memo", None)  # per-frame teacher memo: frames of a fresh scene never recur


def _write_window(folder: Path, number: int, item: dict[str, Any]) -> Path:
    path = folder / f"w{number:09d}.npz"
    tmp = folder / f".w{number:09d}.tmp"
    arrays = {k: item[k] for k in ("images", "intrinsics", "gt_cam_to_world", "matches")}
    arrays["gt_depth"] = item["gt_depth"].astype(np.float16)
    if "teacher_depth" in item:
        arrays["teacher_depth"] = np.asarray(item["teacher_depth"]).astype(np.float16)
        arrays["teacher_valid"] = np.asarray(item["teacher_valid"], dtype=bool)
    arrays["name"] = np.array(item["name"])
    npz = io.BytesIO()
    np.savez(npz, **arrays)
    durable.write(path, npz.getbuffer(), tmp=tmp)
    return path


def _meta(spec: DatasetSpec) -> dict[str, Any]:
    from labelers.depth import make_teacher
    from labelers.matches import make_matcher

    teacher, matcher = make_teacher(spec.teacher), make_matcher(spec.matcher)
    return {"version": ds.CACHE_VERSION, "spec": json.loads(spec.key()), "fresh": True,
            "teacher": teacher.describe(), "matcher": {"name": matcher.name, "version": matcher.version}}


def produce(spec: DatasetSpec, folder: str | Path, *, workers: int = 0, limit: int = 0,
            first_index: int = 0, progress_every: float = 10.0) -> int:
    """Write fresh windows into ``folder`` until ``limit`` are written (0: until SIGTERM/SIGINT).
    Returns the number written. Scene indices start at ``first_index``."""
    if spec.source != "synthetic":
        raise ValueError(f"fresh windows come from the synthetic world, not {spec.source!r}")
    window_frames(spec, first_index)  # fails early on a window that does not fit the clip
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = folder / META
    if meta.exists():
        existing = json.loads(meta.read_text())
        if existing.get("spec") != json.loads(spec.key()):
            raise DatasetError(f"{folder} already holds windows of another spec: use a new folder")
    else:
        durable.write(meta, json.dumps(_meta(spec), indent=1), tmp=folder / f".{META}.tmp")
    written = len(list(folder.glob("w*.npz")))
    target = written + limit if limit else 0
    stop = False

    def on_signal(*_: Any) -> None:
        nonlocal stop
        stop = True

    workers = workers or os.cpu_count() or 1
    # spawn, not fork: a caller with threads (torch's pools, a test runner) can hold a lock
    # at fork time that the child then waits on forever. Workers start once and live long.
    ctx = mp.get_context("spawn")
    start, last_report, refused = time.perf_counter(), time.perf_counter(), 0
    index = first_index + written
    previous: dict[int, Any] = {}
    try:
        with ctx.Pool(workers, initializer=ds._init_worker, initargs=(spec.matcher, spec.teacher)) as pool:
            # Installed after the workers start: they keep the default handlers, so that the
            # pool's own SIGTERM on exit ends them.
            previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
            pending: deque = deque()
            while not stop and (not target or written < target):
                while len(pending) < 2 * workers and (not target or written + len(pending) < target):
                    pending.append(pool.apply_async(label_fresh_window, (spec, index)))
                    index += 1
                item = pending.popleft().get()
                if "skipped" in item:
                    refused += 1
                    continue
                _write_window(folder, written, item)
                written += 1
                now = time.perf_counter()
                if progress_every and now - last_report >= progress_every:
                    print(f"fresh: {written} windows, {written / (now - start):.1f}/s, {refused} refused", flush=True)
                    last_report = now
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return written


class FreshStream(LabelledDataset):
    """The newest ``capacity`` windows of a fresh-window folder, served like a
    :class:`~studies.dataset.LabelledDataset` (same :meth:`batch`). :meth:`refresh` loads the
    windows written since the last call; older ones leave the ring first (FIFO)."""

    def __init__(self, folder: str | Path, capacity: int = 4096, *, timeout: float = 0.0):
        """``timeout``: seconds to wait for a producer just started to write the folder's meta."""
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.folder = Path(folder)
        meta = self.folder / META
        deadline = time.monotonic() + timeout
        while not meta.exists():
            if time.monotonic() >= deadline:
                raise DatasetError(f"{self.folder}: no {META} (start `python -m studies.fresh --out {self.folder}`)")
            time.sleep(0.2)
        self.meta = json.loads(meta.read_text())
        if self.meta.get("version") != ds.CACHE_VERSION:
            raise DatasetError(f"{self.folder}: window version {self.meta.get('version')} != {ds.CACHE_VERSION}")
        self.capacity = capacity
        self.arrays: dict[str, np.ndarray] = {}
        self._slot_matches: list[np.ndarray] = []
        self.loaded = 0
        """Windows loaded so far (unique scenes seen by this learner's ring)."""

    def __len__(self) -> int:
        return min(self.loaded, self.capacity)

    def refresh(self, max_new: int = 0) -> int:
        """Load the windows written since the last call (at most ``max_new``; 0: all). Returns
        how many were loaded."""
        new = 0
        while not max_new or new < max_new:
            path = self.folder / f"w{self.loaded:09d}.npz"
            if not path.exists():
                break
            try:
                with np.load(path, allow_pickle=False) as f:
                    item = {k: f[k] for k in f.files}
            except (OSError, ValueError) as err:
                raise DatasetError(f"{path}: unreadable window ({err})") from err
            self._store(self.loaded % self.capacity, item)
            self.loaded += 1
            new += 1
        return new

    def wait(self, minimum: int, timeout: float) -> None:
        """Block until ``minimum`` windows are in the ring (DatasetError after ``timeout`` s)."""
        deadline = time.monotonic() + timeout
        while True:
            self.refresh()
            if len(self) >= minimum:
                return
            if time.monotonic() > deadline:
                raise DatasetError(f"{self.folder}: {len(self)} windows after {timeout:.0f} s, need {minimum}")
            time.sleep(0.2)

    def _store(self, slot: int, item: dict[str, np.ndarray]) -> None:
        fields = {"images": item["images"], "intrinsics": item["intrinsics"],
                  "gt_depth": item["gt_depth"].astype(np.float32), "gt_cam_to_world": item["gt_cam_to_world"],
                  "names": item["name"]}
        if "teacher_depth" in item:
            fields["teacher_depth"] = item["teacher_depth"].astype(np.float32)
            fields["teacher_valid"] = item["teacher_valid"]
        if not self.arrays:
            self.arrays = {k: np.zeros((self.capacity, *np.shape(v)),
                                       dtype=np.asarray(v).dtype if k != "names" else "<U64")
                           for k, v in fields.items()}
        for k, v in fields.items():
            self.arrays[k][slot] = v
        if slot == len(self._slot_matches):
            self._slot_matches.append(item["matches"])
        else:
            self._slot_matches[slot] = item["matches"]

    def matches_of(self, n: int) -> np.ndarray:
        return self._slot_matches[n]

    def stats(self) -> dict[str, float]:
        n = len(self)
        if not n:
            return {"windows": 0.0, "loaded": 0.0}
        return {"windows": float(n), "loaded": float(self.loaded),
                "matches_per_window": float(np.mean([len(m) for m in self._slot_matches[:n]])),
                "baseline_over_depth": ds.baseline_over_depth(self.arrays["gt_cam_to_world"][:n],
                                                              self.arrays["gt_depth"][:n])}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m studies.fresh", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder to write windows into")
    p.add_argument("--spec", default="synthetic:frames=40,seed=7", help="synthetic dataset spec (scenes is ignored)")
    p.add_argument("--views", type=int, default=4)
    p.add_argument("--height", type=int, default=48)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--stride", type=int, default=8)
    p.add_argument("--teacher", default="oracle")
    p.add_argument("--matcher", default="sift")
    p.add_argument("--workers", type=int, default=0, help="labelling processes (0: one per CPU)")
    p.add_argument("--limit", type=int, default=0, help="stop after this many windows (0: until SIGTERM)")
    p.add_argument("--first-index", type=int, default=0,
                   help="scene index of the first window (a resumed study starts past the scenes it saw)")
    args = p.parse_args(argv)
    spec = parse_spec(args.spec, views=args.views, height=args.height, width=args.width, stride=args.stride,
                      teacher=args.teacher, matcher=args.matcher)
    n = produce(spec, args.out, workers=args.workers, limit=args.limit, first_index=args.first_index)
    print(f"fresh: wrote {n} windows into {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
