"""How much of a depth teacher's per-frame error the window's two-view geometry removes
(``labeler.teacher_warp``, ``labelers.registration``), offline: no training.

    python -m studies.teacher_warp [--data 7scenes:.devdata/7s-train] [--height 168 --width 224] \\
        [--windows 40] [--stride 4] [--teacher embedded] [--grid 2 3 4 6]

Windows of 4 views ``stride`` frames apart are cut from the data as ``reliev3r eval`` cuts them;
the labeler's own steps run on each (depth teacher, SIFT matches verified with USAC/MAGSAC, the
two-view triangulation, the warp); ground truth is used only to score: the mean over views of
the per-frame least-squares (scale and shift) AbsRel, before and after, per lattice size.
"""

from __future__ import annotations

import argparse

import numpy as np

from evaluation.datasets import load_windows
from labelers.config import LabelerConfig
from labelers.depth import make_teacher
from labelers.matches import make_matcher, match_window, triangulate_matches
from labelers.registration import warp_to_triangulation


def lsq_absrel(pred: np.ndarray, truth: np.ndarray) -> float:
    """AbsRel of one map after its least-squares scale and shift to the truth (truth > 0)."""
    known = truth > 0
    design = np.stack([pred[known], np.ones(int(known.sum()))], 1)
    a, b = np.linalg.lstsq(design, truth[known], rcond=None)[0]
    return float(np.mean(np.abs(a * pred[known] + b - truth[known]) / truth[known]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="7scenes:.devdata/7s-train")
    p.add_argument("--height", type=int, default=168)
    p.add_argument("--width", type=int, default=224)
    p.add_argument("--windows", type=int, default=40)
    p.add_argument("--stride", type=int, default=4)
    p.add_argument("--teacher", default="embedded")
    p.add_argument("--grid", type=int, nargs="+", default=[2, 3, 4, 6])
    args = p.parse_args(argv)
    cfg = LabelerConfig()
    windows = load_windows(args.data, views=4, height=args.height, width=args.width, windows=args.windows,
                           stride=args.stride, run_dir=None)
    teacher, matcher = make_teacher(args.teacher, "cpu"), make_matcher(cfg.matcher)
    scores: dict = {"teacher": [], **{g: [] for g in args.grid}}
    corrected = {g: 0 for g in args.grid}
    for window in windows:
        depth, valid = teacher.predict(window.images)
        matches, _ = match_window(window.images, matcher, long_pairs=cfg.long_pairs, min_matches=cfg.min_matches,
                                  max_matches_per_pair=cfg.max_matches_per_pair, threshold_px=cfg.ransac_threshold_px)
        tri = triangulate_matches(matches, window.intrinsics, threshold_px=cfg.ransac_threshold_px)
        scores["teacher"] += [lsq_absrel(d.astype(np.float64), t) for d, t in zip(depth, window.gt_depth)]
        for g in args.grid:
            warped, n = warp_to_triangulation(depth, valid, matches, tri, grid=g, space=teacher.space)
            corrected[g] += n
            scores[g] += [lsq_absrel(d.astype(np.float64), t) for d, t in zip(warped, window.gt_depth)]
    views = len(scores["teacher"])
    print(f"{len(windows)} windows, {views} views at {args.height}x{args.width}, teacher {args.teacher}\n")
    print("| teacher map | views corrected | per-frame lsq AbsRel (mean) | (median) |\n|---|---|---|---|")
    for key, values in scores.items():
        label = "as the teacher gives it" if key == "teacher" else f"warped, {key} x {key} lattice"
        done = views if key == "teacher" else corrected[key]
        print(f"| {label} | {done} / {views} | {np.mean(values):.3f} | {np.median(values):.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
