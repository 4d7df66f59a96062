"""Distil several snapshots of one run into one teacher: their depth averaged per view.

A study of what a teacher refresh (``labeler.refresh_step``) should distil. One learner's
snapshots 25 steps apart made teachers 0.118-0.125 per frame on held-out 7-Scenes frames, more
apart than two seeds of the same distillation (docs/RESULTS.md, "How long to distil"): which
snapshot is distilled matters. Here every snapshot predicts depth on the same tiled windows of
the run's frames (``reliev3r.distill.real_samples``), each view's map is divided by its median
over the pixels every snapshot finds valid (the learner's depth is up to scale, and the teacher
is trained with a per-frame scale alignment), and the average of those maps is what the teacher
is fine-tuned on, as ``reliev3r teacher-train --distill`` does with one snapshot:

    python -m studies.distill_snapshots R/snapshots/step-000000250 R/snapshots/step-000000275 \\
        R/snapshots/step-000000300 --out T --device cpu --steps 107 --pool-frames 256
    reliev3r eval --config configs/demo.yaml --checkpoint R --data 7scenes:.devdata/7s-eval --teacher embedded:T

The settings are the refresh's on that device (``reliev3r.distill.recipe``), fine-tuned from
the shipped weights, the real frames ``--real-share`` of each batch as in ``--distill``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace

import torch

from labelers.embedded import WEIGHTS
from labelers.teacher_train import config_from_args, train
from learner.snapshot import load_model, resolve_snapshot
from reliev3r.distill import (frame_streams, real_samples, recipe, run_defaults, run_fov, run_sources, run_streamer,
                              trained_size)


def scale_free_mean(depths: list[torch.Tensor]) -> torch.Tensor:
    """The per-view average of depth maps [N, H, W] that agree up to a scale per view: each
    map divided by its median over the pixels valid (> 0) in all of them, then averaged there;
    0 (invalid) elsewhere, and for a view with no pixel valid in all."""
    stack = torch.stack([d.float() for d in depths])  # [S, N, H, W]
    valid = (stack > 0).all(0)  # [N, H, W]
    out = torch.zeros_like(stack[0])
    for i in range(stack.shape[1]):
        mask = valid[i]
        if not mask.any():
            continue
        normed = [s[i][mask] / s[i][mask].median() for s in stack]
        out[i][mask] = torch.stack(normed).mean(0)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("snapshots", nargs="+", help="snapshot folders of one run (or run folders: their newest)")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pool-frames", type=int, required=True, help="rendered synthetic frames")
    ap.add_argument("--real-share", type=float, default=0.5)
    args = ap.parse_args(argv)

    snaps = [resolve_snapshot(s) for s in args.snapshots]
    cfg = config_from_args(SimpleNamespace(out=args.out, steps=args.steps, seed=args.seed, device=args.device,
                                           time_budget_s=None,
                                           options=[*recipe(args.device), f"pool_frames={args.pool_frames}",
                                                    f"init={WEIGHTS}"]))
    streamer = run_streamer(snaps[0])
    views, gap = run_defaults(streamer)
    images, depths, info, steps = None, [], {}, []
    for snap in snaps:
        model, meta = load_model(snap, cfg.device, ema=True)
        imgs, d, info = real_samples(model, frame_streams(run_sources(streamer), fov_deg=run_fov(streamer)),
                                     views=views, gap=gap, learner_size=trained_size(meta),
                                     size=(cfg.height, cfg.width), device=cfg.device)
        if images is not None and not torch.equal(images, imgs):
            raise SystemExit(f"{snap}: its windows differ from the first snapshot's (another run?)")
        images = imgs
        depths.append(d)
        steps.append(int(meta["step"]))
        del model
    mean = scale_free_mean(depths)
    source = {"source": "studies.distill_snapshots: the scale-free mean of several snapshots' depth",
              "snapshots": [str(s) for s in snaps], "steps": steps, **info,
              "valid_share": float((mean > 0).float().mean())}
    out = train(cfg, command="studies.distill_snapshots", extra=(images, mean), extra_share=args.real_share,
                extra_meta=source)
    print(json.dumps({"out": str(cfg.out), "steps": out["steps"], "snapshots": steps, "real_frames": len(images),
                      "valid_share": round(source["valid_share"], 3), **out["metrics"]["synthetic_val"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
