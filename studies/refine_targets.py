"""How good are the refinement's targets? Pose errors of a snapshot's prediction and of the
bundle adjustments that ``loss.refine`` pulls it towards, on held-out windows.

    python -m studies.refine_targets .devdata/resume/weak/step-000002000 \\
        [--held synthetic:scenes=48,frames=40,seed=1000,hop=4] [--stride 12] [--raw]

For every search depth (the prediction's own, the teacher's map in the prediction's per-view
scale and shift as ``loss.refine.depth=teacher`` uses it, and the ground-truth map likewise, an
upper bound) and every solver (Adam with 50 and 200 steps, Levenberg-Marquardt with 10
iterations), it runs :func:`learner.refinement.refine_geometry` from the predicted poses with the
objective's default match terms (angle 0.5, point 1) and prints the mean pairwise relative
rotation error and translation direction error (degrees, mean and median over the windows'
pairs) of the result against ground truth, with the search's wall time. Ground truth is used
only to score; the searches see labels and matches only. Runs on CPU in seconds.
"""

from __future__ import annotations

import argparse
from pathlib import Path
import time

import torch

from evaluation import metrics
from learner import losses, refinement
from learner.snapshot import load_model
from studies import held_out

SEARCHES = (("adam", 50), ("adam", 200), ("lm", 10))


def pose_errors(cam_to_world: torch.Tensor, gt: torch.Tensor) -> tuple[float, float, float]:
    """(mean rotation error, mean and median translation direction error) over all view pairs
    of all windows, degrees. ``cam_to_world``, ``gt``: [B, V, 4, 4]."""
    rot, trans = zip(*(metrics.pairwise_pose_errors(p.double(), g.double()) for p, g in zip(cam_to_world, gt)))
    rot, trans = torch.cat(rot), torch.cat(trans)
    return float(rot.mean()), float(trans.mean()), float(trans.median())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("snapshot", type=Path)
    held_out.add_arguments(p)
    args = p.parse_args(argv)

    held, batch = held_out.load(args)
    model, meta = load_model(args.snapshot, ema=not args.raw)
    with torch.no_grad():
        pred = model(batch["images"])
    gt, matches = batch["gt_cam_to_world"], batch["matches"]
    rot, trans, median = pose_errors(pred.cam_to_world, gt)
    print(f"{args.snapshot} (step {meta['step']}, {'raw' if args.raw else 'EMA'} weights), {len(held)} windows")
    print("| search depth | solver | rotation ° | translation ° (median) | seconds |\n|---|---|---|---|---|")
    print(f"| (the prediction) | | {rot:.1f} | {trans:.1f} ({median:.1f}) | |")
    depths = {
        "prediction's": pred.depth,
        "teacher's": losses.teacher_aligned_depth(pred.depth, batch["teacher_depth"], batch["teacher_valid"]),
        "ground truth's": losses.teacher_aligned_depth(pred.depth, batch["gt_depth"], batch["gt_depth"] > 0),
    }
    for name, depth in depths.items():
        for solver, steps in SEARCHES:
            start = time.perf_counter()
            poses, _, _ = refinement.refine_geometry(depth, pred.cam_to_world, batch["intrinsics"], matches[:, :7],
                                              matches[:, 7], steps=steps, point_weight=1.0, solver=solver,
                                              compiled=False)
            seconds = time.perf_counter() - start
            rot, trans, median = pose_errors(poses, gt)
            print(f"| {name} | {solver} {steps} | {rot:.1f} | {trans:.1f} ({median:.1f}) | {seconds:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
