"""Does a snapshot's depth carry a per-window offset, and which way do the weak match terms pull it?

    python -m studies.depth_offset SNAPSHOT [SNAPSHOT ...] [--scan] [--raw] \\
        [--held synthetic:scenes=48,frames=40,seed=1000,hop=4] [--stride 12]

Per snapshot, on the held-out windows: AbsRel after per-window median scaling and after per-window
least-squares scale and shift (a gap between the two is an offset that no scale removes), the
mean over views of log(mean |D − m| / m) minus the truth's (the views' contrast: > 0 means near
points too near relative to far ones, which a positive depth shift undoes), and the offset b of
the least-squares fit truth ≈ a·prediction + b, in units of the window's mean true depth.

``--scan`` also adds a shift b·m to every view (m: the view's mean predicted depth) and prints,
for each b, the gradient on b of the reprojection and triangulation-consistency terms at the
predicted poses: where it crosses zero is the offset those terms would settle at. Ground truth
is used only to score. Runs on CPU in seconds (docs/RESULTS.md, sweep 12).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from evaluation import metrics
from learner import losses
from learner.snapshot import load_model
from studies import held_out

SHIFTS = (0.0, 0.2, 0.4, 0.6, 0.9)


def log_contrast(depth: torch.Tensor) -> torch.Tensor:
    """log(mean |D − m| / m) per view, [B, V], of depth maps [B, V, H, W] > 0."""
    flat = depth.flatten(2)
    mean = flat.mean(-1, keepdim=True)
    return ((flat - mean).abs().mean(-1) / mean.squeeze(-1)).log()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("snapshots", type=Path, nargs="+")
    held_out.add_arguments(p)
    p.add_argument("--scan", action="store_true", help="the match terms' gradient on a common view shift")
    args = p.parse_args(argv)

    held, batch = held_out.load(args)
    gt, known = batch["gt_depth"], batch["gt_depth"] > 0
    filled = torch.where(known, gt, gt[known].mean())  # the contrast needs every pixel; holes are rare
    matches, intrinsics = batch["matches"], batch["intrinsics"]
    print(f"{len(held)} held-out windows, {'raw' if args.raw else 'EMA'} weights")
    print("| snapshot | step | AbsRel_med | AbsRel_lsq | contrast − truth's | offset b / mean |\n"
          "|---|---|---|---|---|---|")
    for path in args.snapshots:
        model, meta = load_model(path, ema=not args.raw)
        with torch.no_grad():
            pred = model(batch["images"])
        rows = [metrics.depth_metrics(pred.depth[b], gt[b], known[b]) for b in range(len(held))]
        x, y = pred.depth.flatten(1), filled.flatten(1)
        xc, yc = x - x.mean(1, keepdim=True), y - y.mean(1, keepdim=True)
        slope = (xc * yc).sum(1) / (xc * xc).sum(1)
        offset = (y.mean(1) - slope * x.mean(1)) / y.mean(1)
        contrast = (log_contrast(pred.depth) - log_contrast(filled)).mean()
        print(f"| {path} | {meta['step']} | {np.mean([r['absrel_med'] for r in rows]):.3f} | "
              f"{np.mean([r['absrel_lsq'] for r in rows]):.3f} | {contrast:+.3f} | {offset.mean():+.3f} |")
        if not args.scan:
            continue
        for b0 in SHIFTS:
            b = torch.tensor(b0, dtype=pred.depth.dtype, requires_grad=True)
            depth = pred.depth + b * pred.depth.flatten(2).mean(-1)[..., None, None]
            angle = losses.reprojection_loss(depth, pred.cam_to_world, intrinsics, matches[:, :7], matches[:, 7])
            point = losses.point_consistency_loss(depth, pred.cam_to_world, intrinsics, matches[:, :7], matches[:, 7])
            g_angle, g_point = (float(torch.autograd.grad(t, b, retain_graph=True)[0]) for t in (angle, point))
            shifted = (log_contrast(depth.detach()) - log_contrast(filled)).mean()
            print(f"    shift b = {b0:.1f}: contrast − truth's {shifted:+.3f}, dL_reproj/db {g_angle:+.4f}, "
                  f"dL_point/db {g_point:+.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
