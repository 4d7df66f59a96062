"""How wrong is the oracle teacher at each error strength? Per-frame AbsRel against the truth.

    .venv/bin/python -m studies.oracle_error [--data ../shared/data/7scenes-redkitchen] \\
        [--frames 20] [--strengths 0,0.5,1,2,4] [--spec 'oracle?warp=0.2' ...] [--components]

Reads ``--frames`` frames of a 7-Scenes sequence spread over it (depth downsampled with
nearest-neighbour to ``--height`` x ``--width``), groups them into windows of ``--views``, labels
each window with ``oracle?strength=S`` (``labelers.depth.make_teacher``) and prints, per spec:

* ``absrel_lsq_frame``: AbsRel after a least-squares scale and shift per frame (the score of a
  teacher in ``reliev3r eval``, ``evaluation.baselines.teacher_window_metrics``);
* ``absrel_med_frame``: AbsRel after a median scale per frame; it also counts the oracle's
  unknown per-frame shift (up to half the median depth), which no scale removes;
* ``coverage``: fraction of the truth's pixels the teacher labels (holes, clipped-out none).

``--components`` adds each structured error alone at strength 1. The last row, ``constant``, is
one depth everywhere: a teacher that knows nothing. Study code: it imports the
product; the product never imports it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np

from evaluation.baselines import teacher_window_metrics
from evaluation.datasets import sevenscenes_sequence
from labelers.depth import ORACLE_UNIT, make_teacher

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "7scenes-redkitchen"


def load_depths(folder: Path, frames: int, height: int, width: int) -> tuple[list[int], np.ndarray]:
    """(frame indices, depth [N,H,W] in metres, 0 = unknown) of ``frames`` frames spread evenly."""
    seq = sevenscenes_sequence(folder)
    picks = np.linspace(0, seq.length - 1, frames).round().astype(int).tolist()
    depths = []
    for k in picks:
        _rgb, depth, _pose = seq.read(k)
        depths.append(cv2.resize(depth, (width, height), interpolation=cv2.INTER_NEAREST))
    return picks, np.stack(depths).astype(np.float32)


def median_frame_absrel(teacher: np.ndarray, valid: np.ndarray, gt: np.ndarray) -> tuple[float, int]:
    """(sum of |s d - g| / g, pixel count) over the frames, s = median(g) / median(d) per frame."""
    total, count = 0.0, 0
    for v in range(gt.shape[0]):
        fit = valid[v] & (gt[v] > 0)
        if fit.sum() < 10:
            continue
        d, g = teacher[v][fit].astype(np.float64), gt[v][fit].astype(np.float64)
        d *= np.median(g) / np.median(d)
        total += float((np.abs(d - g) / g).sum())
        count += int(fit.sum())
    return total, count


class ConstantTeacher:
    """The reference row: one depth everywhere (what a teacher that knows nothing would say)."""

    version, space = "-", "depth"

    def predict(self, frames, *, gt_depth, window_id):
        return np.ones_like(gt_depth), gt_depth > 0


def score(spec: str, depths: np.ndarray, picks: list[int], views: int, name: str) -> dict[str, float]:
    teacher = ConstantTeacher() if spec == "constant" else make_teacher(spec)
    frames = np.zeros((views, *depths.shape[1:], 3), np.uint8)  # the oracle reads only the truth
    lsq, weights, med_total, med_count, coverage = [], [], 0.0, 0, []
    for start in range(0, len(depths) - views + 1, views):
        gt = depths[start:start + views]
        d, ok = teacher.predict(frames, gt_depth=gt, window_id=f"{name}:{picks[start]}")
        row = teacher_window_metrics(d, ok, gt, teacher.space)
        n = int(((gt > 0) & ok).sum())
        lsq.append(row["absrel_lsq_frame"])
        weights.append(n)
        coverage.append(row["teacher_coverage"])
        total, count = median_frame_absrel(d, ok, gt)
        med_total, med_count = med_total + total, med_count + count
    return {"absrel_lsq_frame": float(np.average(lsq, weights=weights)),
            "absrel_med_frame": med_total / max(med_count, 1), "coverage": float(np.mean(coverage)),
            "version": teacher.version}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="7-Scenes sequence folder")
    p.add_argument("--frames", type=int, default=20)
    p.add_argument("--views", type=int, default=4, help="frames per window (one oracle call)")
    p.add_argument("--height", type=int, default=240)
    p.add_argument("--width", type=int, default=320)
    p.add_argument("--strengths", default="0,0.5,1,2,4")
    p.add_argument("--spec", action="append", default=[], help="another teacher spec to score (repeatable)")
    p.add_argument("--components", action="store_true", help="each structured error alone at strength 1")
    args = p.parse_args(argv)

    picks, depths = load_depths(args.data, args.frames, args.height, args.width)
    specs = [f"oracle?strength={s}" for s in args.strengths.split(",") if s]
    if args.components:
        specs += [f"oracle?{k}={unit:g}" for k, unit in ORACLE_UNIT.items()]
    specs += args.spec + ["constant"]
    print(f"{args.data.name}: {len(picks)} frames ({picks[0]}-{picks[-1]}), {args.height}x{args.width}, "
          f"windows of {args.views}")
    print("| teacher | version | AbsRel lsq/frame | AbsRel med/frame | coverage |")
    print("|---|---|---|---|---|")
    for spec in specs:
        row = score(spec, depths, picks, args.views, args.data.name)
        print(f"| `{spec}` | `{row['version']}` | {row['absrel_lsq_frame']:.3f} | {row['absrel_med_frame']:.3f} "
              f"| {row['coverage']:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
