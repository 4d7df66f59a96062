"""Sanity checks before spending device time on accuracy studies (CPU, a few minutes).

1. ``fit``: can the fully-supervised sibling FIT the poses of a handful of training windows?
   A tiny model trained on 8 windows for a few hundred steps must bring the training-set
   relative rotation / translation-direction errors well below identity poses'. If it cannot,
   something between the loss, the camera head, the batch's GT keys and the metric is broken.
2. ``direct``: optimise the poses of one window directly (no network) under the weak losses
   with the exact depth: starting from identity poses they must converge to the ground truth
   (relative rotation error and translation direction error near 0).

    .venv/bin/python -m studies.study_fit_check fit --data .devdata/datasets/X.npz --steps 300
    .venv/bin/python -m studies.study_fit_check direct --data .devdata/datasets/X.npz

This script imports neither pyzmq nor PyAV.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from evaluation import metrics
from learner import losses
from learner.config import LearnerConfig
from evaluation.evaluate import evaluate_model, trivial_baseline
from reliev3r import geometry
from reliev3r.config import with_overrides
from studies.dataset import LabelledDataset
from studies.epipolar import epipolar_loss


def fit(args: argparse.Namespace) -> None:
    from learner.train import Trainer

    data = LabelledDataset.load(args.data)
    picks = list(range(0, len(data), max(1, len(data) // args.windows)))[:args.windows]
    all_windows = data.windows()
    windows = [all_windows[k] for k in picks[:: max(1, len(picks) // 16)]]  # scored: <= ~16 of them
    held = LabelledDataset.load(args.held_out).windows(16) if args.held_out else []
    batch = args.batch or len(picks)
    rng = np.random.default_rng(args.seed)
    cfg = with_overrides(LearnerConfig(), ["ema_decay=0", "snapshot_every=1000000", f"lr={args.lr}",
                                            f"warmup_steps={args.warmup}", f"batch_size={batch}"] + args.set)
    trainer = Trainer(cfg, device="cpu", teacher_space=data.teacher_space, seed=args.seed)
    base = trivial_baseline(windows)
    print(f"identity on these {len(picks)} training windows: rot {base['rot_err_deg']:.2f} "
          f"trans {base['trans_err_deg']:.2f}")
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        idx = picks if batch == len(picks) else rng.choice(picks, batch, replace=False)
        terms = trainer.step(data.batch(idx))
        if step % args.every == 0 or step == args.steps:
            ev = evaluate_model(trainer.model, windows, trainer.device)
            line = (f"step {step} {time.perf_counter() - start:.0f}s loss={terms['loss']:.4f} "
                    f"gn={terms['grad_norm']:.3f} train rot={ev['rot_err_deg']:.2f} trans={ev['trans_err_deg']:.2f} "
                    f"absrel_med={ev['absrel_med']:.3f}")
            if held:
                hv = evaluate_model(trainer.model, held, trainer.device)
                line += (f" | held-out rot={hv['rot_err_deg']:.2f} trans={hv['trans_err_deg']:.2f} "
                         f"absrel_med={hv['absrel_med']:.3f}")
            print(line, flush=True)


def direct(args: argparse.Namespace) -> None:
    """Optimise per-view 6D rotation + translation under the weak losses, with the exact depth
    or (``--depth-error s``) a corrupted one: per view a random scale exp(s N(0,1)) and per pixel
    a factor exp(p N(0,1)) (p: ``--pixel-error``, default s), about what a learner's depth gets
    wrong. ``--free-scale``: one log-scale per view is optimised beside the poses (what the
    weak terms must recover for the learner: the depth loss cannot see per-view scale).
    Windows ``--window`` .. ``--window + --windows - 1``; the last line gives the mean final
    errors (one window: also the curve every ``--every`` steps)."""
    data = LabelledDataset.load(args.data)
    g = torch.Generator().manual_seed(0)
    finals = []
    for n in range(args.window, min(len(data), args.window + args.windows)):
        batch = data.batch([n])
        depth = batch["gt_depth"].clone()
        depth = torch.where(depth > 0, depth, depth[depth > 0].median())
        depth = depth / depth.mean()  # the model's own scale: the losses are scale-invariant
        if args.depth_error or args.pixel_error:
            view = torch.exp(args.depth_error * torch.randn(*depth.shape[:2], 1, 1, generator=g))
            pixel = args.depth_error if args.pixel_error < 0 else args.pixel_error
            depth = depth * view * torch.exp(pixel * torch.randn(depth.shape, generator=g))
        gt = batch["gt_cam_to_world"][0].double()
        v = depth.shape[1]
        d6 = torch.tensor([1.0, 0, 0, 0, 1, 0]).repeat(v, 1)
        d6 = (d6 + 1e-3 * torch.randn(v, 6, generator=g)).requires_grad_(True)
        t = (1e-3 * torch.randn(v, 3, generator=g)).requires_grad_(True)
        log_scale = torch.zeros(1, v, 1, 1, requires_grad=True)
        opt = torch.optim.Adam([d6, t] + ([log_scale] if args.free_scale else []), lr=args.lr)
        m = batch["matches"]
        K, rows, w = batch["intrinsics"], m[:, :7], m[:, 7]
        # The oracle's exact matches would be too easy: use the cached (real SIFT) ones.
        for step in range(args.steps + 1):
            pose = geometry.make_pose(geometry.rotation_6d_to_matrix(d6), t)[None]
            d = depth * torch.exp(log_scale)
            loss = losses.reprojection_loss(d, pose, K, rows, w)
            if args.point_weight:
                loss = loss + args.point_weight * losses.point_consistency_loss(d, pose, K, rows, w)
            if args.epipolar_weight:
                loss = loss + args.epipolar_weight * epipolar_loss(d, pose, K, rows, w)
            if args.every and step % args.every == 0 and args.windows == 1:
                rot, trans = metrics.pairwise_pose_errors(pose[0].detach().double(), gt)
                print(f"step {step} loss={float(loss):.5f} rot={float(rot.mean()):.2f} trans={float(trans.mean()):.2f}")
            opt.zero_grad()
            loss.backward()
            opt.step()
        rot, trans = metrics.pairwise_pose_errors(pose[0].detach().double(), gt)
        finals.append((float(rot.mean()), float(trans.mean())))
    r, tr = np.mean(finals, axis=0)
    print(f"{len(finals)} windows, step {args.steps}: mean rot={r:.2f} trans={tr:.2f} "
          f"(median trans {np.median([f[1] for f in finals]):.2f})")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=("fit", "direct"))
    p.add_argument("--data", required=True)
    p.add_argument("--windows", type=int, default=0,
                   help="fit: training windows (default 8); direct: windows optimised one after another (default 1)")
    p.add_argument("--window", type=int, default=0)
    p.add_argument("--batch", type=int, default=0, help="fit: windows per step drawn from the pool (0: all)")
    p.add_argument("--held-out", default="", help="fit: also score 16 windows of this cache")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--every", type=int, default=50)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--point-weight", type=float, default=0.0)
    p.add_argument("--epipolar-weight", type=float, default=0.0)
    p.add_argument("--depth-error", type=float, default=0.0, help="direct: log-normal depth corruption")
    p.add_argument("--free-scale", action="store_true", help="direct: optimise a log depth scale per view too")
    p.add_argument("--pixel-error", type=float, default=-1.0,
                   help="direct: per-pixel part of the corruption (default: --depth-error)")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0, help="fit: model init and batch order")
    args = p.parse_args()
    args.windows = args.windows or (8 if args.mode == "fit" else 1)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    np.random.seed(0)
    (fit if args.mode == "fit" else direct)(args)


if __name__ == "__main__":
    main()
