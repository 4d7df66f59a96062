"""Where a snapshot's median-scaled depth error comes from: the views' scales, or each view's shift.

    python -m studies.registration_split SNAPSHOT [SNAPSHOT ...] [--data 7scenes:.devdata/7s-eval] [--windows 24]

``reliev3r eval``'s AbsRel med scales each window's depth by one median ratio. A weak model can
miss it in two ways that its per-frame shape (AbsRel lsq/frame) does not show: the views of a
window at different scales (their log median ratios to the truth spread apart), or every view's
depth shifted (too much or too little contrast between near and far points, which no scale
removes). Per snapshot, on the evaluator's windows (views, stride and size as ``reliev3r eval``
takes them):

* ``window med``: AbsRel with one median scale per window (``reliev3r eval``'s AbsRel med);
* ``frame med``: AbsRel with one median scale per view: the part of ``window med`` that the
  views' scales do not explain;
* ``scale spread``: the standard deviation over a window's views of log(median truth / median
  prediction), mean over windows (0: the views are registered in scale);
* ``slope``: median over all views of the slope of log prediction against log truth (1: the right
  contrast; below 1 too flat, as from a positive depth shift; above 1 too steep).

Ground truth is used only to score. CPU, about a minute per snapshot at demo sizes.

``--scan HEIGHTxWIDTH`` (no snapshot needed) asks the weak match terms themselves: on the same
windows at that size, with the labeler's matches and triangulation (``LabelerConfig``'s
defaults) and the *true* depth and poses, every view's depth is shifted by b times its mean
true depth and each term's value is summed over the windows. A term whose minimum is not at
b = 0 pulls the shift away from the truth even when everything else is right.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from evaluation import metrics
from evaluation.config import EvaluatorConfig
from evaluation.datasets import load_windows
from evaluation.evaluate import predict
from labelers.config import LabelerConfig
from labelers.matches import make_matcher, match_window, triangulate_matches
from learner import losses
from learner.snapshot import load_model, resolve_snapshot

SHIFTS = (-0.3, -0.15, 0.0, 0.15, 0.3, 0.6, 1.0)


def split(depth: torch.Tensor, gt: torch.Tensor) -> dict[str, float | list[float]]:
    """The numbers of the module docstring for one window (``slope``: one per view): depth, gt
    [V, H, W] (gt 0 = unknown); the AbsRel values are ``evaluation.metrics``' ``absrel_med``."""
    frames, logs, slopes = [], [], []
    for d, g in zip(depth, gt):
        m = g > 0
        frames.append(metrics.depth_metrics(d[None], g[None])["absrel_med"])
        logs.append(float((g[m].median() / d[m].median()).log()))
        slopes.append(np.polyfit(g[m].log().numpy(), d[m].log().numpy(), 1)[0])
    return {"window_med": metrics.depth_metrics(depth, gt)["absrel_med"], "frame_med": float(np.mean(frames)),
            "scale_spread": float(np.std(logs)), "slope": slopes}


def windows_of(args: argparse.Namespace, height: int, width: int) -> list:
    """The evaluator's windows of ``--data`` at this size (views and count from the arguments)."""
    return load_windows(args.data, views=args.views, height=height, width=width, windows=args.windows,
                        stride=EvaluatorConfig().stride, run_dir=None, synthetic_cfg=None)


def scan(args: argparse.Namespace, height: int, width: int) -> None:
    """Print the match terms' value against a common depth shift at the true depth and poses."""
    labeler = LabelerConfig()
    matcher = make_matcher(labeler.matcher)
    totals = {name: np.zeros(len(SHIFTS)) for name in ("reproj", "point", "triangulation", "contrast")}
    used = 0
    for window in windows_of(args, height, width):
        found, _ = match_window(window.images, matcher, long_pairs=labeler.long_pairs, min_matches=labeler.min_matches,
                                max_matches_per_pair=labeler.max_matches_per_pair,
                                threshold_px=labeler.ransac_threshold_px)
        if len(found) == 0:
            continue
        tri = torch.from_numpy(triangulate_matches(found, window.intrinsics,
                                                   threshold_px=labeler.ransac_threshold_px)).double()
        gt = torch.from_numpy(window.gt_depth)[None].double()
        known = gt > 0
        rows = torch.from_numpy(found).double()
        xy = rows[:, 2:6].round().long()
        on_truth = known[0, rows[:, 0].long(), xy[:, 1], xy[:, 0]] & known[0, rows[:, 1].long(), xy[:, 3], xy[:, 2]]
        matches = torch.cat([torch.zeros(len(rows), 1, dtype=rows.dtype), rows[:, :6]], 1)  # window 0
        score = rows[:, 6] * on_truth
        filled = torch.where(known, gt, gt[known].mean())
        poses = torch.from_numpy(window.gt_cam_to_world)[None].double()
        intrinsics = torch.from_numpy(window.intrinsics)[None].double()
        mean = (filled * known).sum((-2, -1)) / known.sum((-2, -1))
        for n, b in enumerate(SHIFTS):
            depth = filled + b * mean[..., None, None]
            totals["reproj"][n] += float(losses.reprojection_loss(depth, poses, intrinsics, matches, score))
            totals["point"][n] += float(losses.point_consistency_loss(depth, poses, intrinsics, matches, score))
            totals["triangulation"][n] += float(losses.triangulated_depth_loss(depth, matches, tri))
            totals["contrast"][n] += float(losses.depth_contrast_loss(depth, gt, known, matches, tri,
                                                                        intrinsics))
        used += 1
    print(f"{used} windows at {height}x{width}; each term summed over them, at true depth shifted by b x its mean")
    print("| term | " + " | ".join(f"b = {b:+.2f}" for b in SHIFTS) + " | minimum at |")
    print("|---|" + "---|" * (len(SHIFTS) + 1))
    for name, values in totals.items():
        print(f"| {name} | " + " | ".join(f"{v:.4f}" for v in values) + f" | {SHIFTS[int(values.argmin())]:+.2f} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("snapshots", type=Path, nargs="*", help="snapshot, run or snapshots folders")
    p.add_argument("--data", default="7scenes:.devdata/7s-eval", help="a `reliev3r eval --data` spec")
    p.add_argument("--windows", type=int, default=24)
    p.add_argument("--views", type=int, default=4)
    p.add_argument("--scan", metavar="HEIGHTxWIDTH", help="the match terms against a depth shift at the truth")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.scan:
        height, width = (int(x) for x in args.scan.split("x"))
        scan(args, height, width)
    print("| snapshot | window med | frame med | scale spread | slope |\n|---|---|---|---|---|")
    for path in args.snapshots:
        snap = resolve_snapshot(path)
        model, meta = load_model(snap, "cpu")
        height, width = meta["image_size"]
        rows = []
        with torch.no_grad():
            for window in windows_of(args, height, width):
                depth, _ = predict(model, window, "cpu")
                rows.append(split(depth, torch.from_numpy(window.gt_depth)))
        mean = {k: np.mean([r[k] for r in rows]) for k in ("window_med", "frame_med", "scale_spread")}
        slope = np.median([s for r in rows for s in r["slope"]])
        print(f"| {path} | {mean['window_med']:.3f} | {mean['frame_med']:.3f} | {mean['scale_spread']:.3f} | "
              f"{slope:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
