"""Distil a trained learner back into the embedded depth teacher (issue 21, item 2: "a stronger
teacher"). Not measured yet: an option enters the product only with a measured gain
(ARCHITECTURE.md), so this lives here, not in ``reliev3r teacher-train``.

The learner's EMA model predicts depth for windows of real frames (multi-view, so its depth
carries what the views agree on); each view's (RGB, predicted depth) becomes a training frame
of the teacher, mixed with the recipe's synthetic pool (``--real-share`` of every batch), and
the teacher is trained by ``labelers.teacher_train.train`` with its loss and alignment.

    python -m studies.distill_teacher --run RUN_DIR_OR_SNAPSHOT --frames SPEC [--frames SPEC ...] \\
        --out OUT [--views V] [--gap G] [--real-share 0.5] [--steps N] [--device cuda] \\
        [--time-budget S] [key=value ...]

``SPEC`` is a dataset spec of ``reliev3r eval`` without ground truth needed: ``7scenes:DIR[@A-B]``
(frame numbers), ``folder:DIR[@A-B]`` or a bare folder of images. Every frame is used once:
windows of ``V`` views ``G`` frames apart tile the sequence (blocks of ``V*G`` frames; a tail
shorter than a block is left out and counted). ``V`` defaults to the run's ``streamer.views``
(its ``config.yaml``), ``G`` to its ``evaluator.stride``. Frames are fitted to the snapshot's
training size as the evaluator fits them (``reliev3r.imaging``), then image and predicted depth
both to the teacher's ``height`` x ``width`` (so pick a teacher size near the learner's: a
larger one upsamples the real images). Options after the flags are ``reliev3r teacher-train``'s
``key=value`` ones, e.g. ``init=labelers/weights/embedded_depth.safetensors alignment=scale``.

On the GPU host, after a ``reliev3r up`` run on ``.devdata/7s-train`` (``python -m
studies.prepare_7scenes``), e.g. into ``runs/weak-7s``:

    python -m studies.distill_teacher --run runs/weak-7s --frames 7scenes:.devdata/7s-train \\
        --out runs/teacher-distilled --device cuda --time-budget 420 \\
        init=labelers/weights/embedded_depth.safetensors alignment=scale height=160 width=224
    reliev3r eval --checkpoint runs/weak-7s --data 7scenes:.devdata/7s-eval \\
        --teacher embedded --teacher embedded:runs/teacher-distilled/embedded_depth.safetensors

(score the teacher on frames the learner did not see; the distilled weights record their source
in ``embedded_depth.json`` under ``data.extra``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import yaml

from evaluation.config import EvaluatorConfig
from evaluation.datasets import EvalWindow, Sequence, load_sequences
from evaluation.evaluate import predict
from labelers.teacher_train import config_from_args, train
from learner.snapshot import load_model, resolve_snapshot
from reliev3r import imaging
from streamer.config import StreamerConfig


def tile_windows(length: int, *, views: int, gap: int) -> list[list[int]]:
    """Frame indices of windows of ``views`` views ``gap`` frames apart that use every frame of
    the first ``length // (views * gap) * views * gap`` exactly once."""
    block = views * gap
    return [[b + j + k * gap for k in range(views)] for b in range(0, length - block + 1, block) for j in range(gap)]


def run_defaults(snapshot: Path) -> tuple[int, int]:
    """(views, gap): the run's ``streamer.views`` and ``evaluator.stride`` from its
    ``config.yaml`` when there is one, else the config defaults."""
    views, gap = StreamerConfig().views, EvaluatorConfig().stride
    config = snapshot.parent.parent / "config.yaml"
    if config.is_file():
        data = yaml.safe_load(config.read_text()) or {}
        views = int((data.get("streamer") or {}).get("views", views))
        gap = int((data.get("evaluator") or {}).get("stride", gap))
    return views, gap


def real_samples(model: torch.nn.Module, sequences: list[Sequence], *, views: int, gap: int,
                 learner_size: tuple[int, int], size: tuple[int, int],
                 device) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The learner's depth on tiled windows of ``sequences``: uint8 RGB [N, H, W, 3] and depth
    [N, H, W] (0 = invalid: not finite or not > 0) at ``size``, and counts for the meta."""
    lh, lw = learner_size
    height, width = size
    images, depths, windows, dropped = [], [], 0, 0
    model.eval()
    for seq in sequences:
        tiles = tile_windows(seq.length, views=views, gap=gap)
        dropped += seq.length - len(tiles) * views
        for idx in tiles:
            frames = [seq.read(i)[0] for i in idx]
            fitted = np.stack([imaging.fit_image(f, lh, lw) for f in frames])
            Ks = np.stack([imaging.fit_intrinsics(seq.intrinsics, *f.shape[:2], lh, lw) for f in frames])
            window = EvalWindow(f"{seq.name}:{idx[0]}", fitted, Ks, None, None)
            depth, _ = predict(model, window, device)
            depth = depth.cpu().numpy()
            depth = np.where(np.isfinite(depth) & (depth > 0), depth, 0.0).astype(np.float32)
            for image, d in zip(window.images, depth):
                images.append(imaging.fit_image(image, height, width))
                depths.append(imaging.fit_image(d, height, width, nearest=True, like=(lh, lw)))
            windows += 1
    if not images:
        raise ValueError(f"no window of {views} views {gap} frames apart fits in the given frames")
    info = {"windows": windows, "views": views, "gap": gap, "dropped_frames": dropped,
            "learner_size": [lh, lw]}
    return torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(depths)), info


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m studies.distill_teacher", description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="run folder, snapshots folder or snapshot folder")
    parser.add_argument("--frames", action="append", required=True, metavar="SPEC",
                        help="7scenes:DIR[@A-B], folder:DIR[@A-B] or a folder of images; repeatable")
    parser.add_argument("--out", required=True)
    parser.add_argument("--views", type=int, default=None, help="views per window (default: the run's)")
    parser.add_argument("--gap", type=int, default=None, help="frames between views (default: the run's "
                        "evaluator.stride)")
    parser.add_argument("--real-share", type=float, default=0.5, help="share of real frames in each batch")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--time-budget", dest="time_budget_s", type=float, default=None)
    parser.add_argument("options", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ValueError as err:
        print(f"distill_teacher: {err}")
        return 2
    if not 0 <= args.real_share <= 1:
        print(f"distill_teacher: --real-share must be in [0, 1], got {args.real_share}")
        return 2
    snap = resolve_snapshot(Path(args.run))
    model, meta = load_model(snap, cfg.device, ema=True)
    weights = "ema.safetensors" if (snap / "ema.safetensors").is_file() else "model.safetensors"
    run_views, run_gap = run_defaults(snap)
    views, gap = args.views or run_views, args.gap or run_gap
    learner_size = tuple(meta.get("image_size") or (StreamerConfig().height, StreamerConfig().width))
    sequences = [seq for spec in args.frames for seq in load_sequences(spec)]
    images, depths, info = real_samples(model, sequences, views=views, gap=gap, learner_size=learner_size,
                                        size=(cfg.height, cfg.width), device=cfg.device)
    del model
    source = {"source": "studies.distill_teacher: the learner's depth on real windows", "run": str(args.run),
              "snapshot": str(snap), "step": meta["step"], "weights": weights.split(".")[0],
              "weights_sha256": meta["files"].get(weights, {}).get("sha256"), "frames_specs": list(args.frames),
              **info}
    out = train(cfg, command=" ".join(["python -m studies.distill_teacher", *argv]), extra=(images, depths),
                extra_share=args.real_share, extra_meta=source)
    print(json.dumps({"out": str(cfg.out), "steps": out["steps"], "version": out["version"],
                      "real_frames": len(images), **out["metrics"]["synthetic_val"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
