"""``reliev3r teacher-train --distill RUN``: the learner of a run teaches the embedded depth teacher.

A weak run's learner predicts depth for whole windows of views, so its depth carries what the
views agree on (the matches, the registration), which one frame alone cannot see. Distillation
turns that back into a single-frame teacher: the run's EMA model predicts depth on windows
tiled over real frames, and each view's (RGB, predicted depth) becomes a training frame of the
teacher beside the recipe's synthetic pool (``--real-share`` of every batch), trained by
``labelers.teacher_train.train`` with its loss, alignment and augmentation. A run on the
teacher it made can then be distilled again.

    reliev3r up 'streamer.sources=[/data/clips/]' run.dir=runs/a --max-steps 3000
    reliev3r teacher-train --distill runs/a --out runs/teacher-a init=labelers/weights/embedded_depth.safetensors
    reliev3r up 'streamer.sources=[/data/clips/]' labeler.teacher=embedded:runs/teacher-a/embedded_depth.safetensors

Frames. By default the run's own ``streamer.sources`` (its ``config.yaml``): video files,
image-sequence folders, folders of videos and globs, read by the streamer's own readers; live
URLs are left out (named in the log). ``--frames SPEC`` (repeatable) takes other frames:
a source path as in ``streamer.sources``, or a dataset spec of ``reliev3r eval``
(``7scenes:DIR[@A-B]``, ``scannet:DIR[@A-B]``, ``folder:DIR[@A-B]``; ground truth is not read). Every frame is used
once: windows of ``V`` views ``G`` frames apart tile each source (blocks of ``V*G`` frames; a
tail shorter than a block is left out and counted), ``V`` the run's ``streamer.views`` and
``G`` its ``streamer.frame_stride`` unless ``--views`` / ``--gap`` say otherwise; ``--max-frames``
caps the frames taken (reading stops there; the meta says so). Frames are fitted to the
snapshot's training size as the evaluator fits them (``reliev3r.imaging``), then image and
predicted depth both to the teacher's ``height`` x ``width``: pick a teacher size near the
learner's (a larger one upsamples the real images).

Measured (docs/RESULTS.md, issue 21): on held-out 7-Scenes frames the teacher distilled from a
CPU run scored per-frame AbsRel 0.163 against the shipped weights' 0.219 and 0.248 for the same
fine-tuning without the real frames.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
import yaml

from evaluation.datasets import SPEC_KINDS, EvalWindow, load_sequences
from evaluation.evaluate import predict
from labelers.teacher_train import config_from_args, train
from learner.snapshot import load_model, resolve_given
from reliev3r import imaging
from reliev3r.config_base import check_device_present
from streamer.config import StreamerConfig
from streamer.sources import discover

log = logging.getLogger("reliev3r.distill")

RECIPE = ("height=144", "width=192", "render_fraction=0.2", "dining=true", "lr=0.0005", "warmup=100")
"""Teacher settings of the distillations measured through ``reliev3r up`` on the GPU (docs/RESULTS.md,
issue 21: 0.122 and 0.119 per-frame AbsRel on held-out 7-Scenes frames against the shipped
weights' 0.214); ``reliev3r up``'s teacher refresh (``labeler.refresh_step``) uses them there."""

CPU_RECIPE = ("height=96", "width=128", "render_fraction=0.1", "val_frames=16", "dining=true", "lr=0.0005",
              "warmup=20")
"""The same for a distillation on the CPU, where :data:`RECIPE` spends its budget rendering and on
few optimiser steps: fewer pixels, a smaller rendered share and validation pool, a shorter
warm-up. 150 s on a 2-core CPU from the same learner (docs/RESULTS.md, issue 21, ninth pass):
107 optimiser steps against 40, the teacher 0.117 per frame on held-out 7-Scenes frames
against 0.156 (the shipped weights: 0.247)."""


def recipe(device: str) -> tuple[str, ...]:
    """The distillation settings of a teacher refresh on ``device``."""
    return CPU_RECIPE if torch.device(device).type == "cpu" else RECIPE


DATASET_KINDS = tuple(f"{kind}:" for kind in SPEC_KINDS)
"""``--frames`` specs read through ``evaluation.datasets`` (the rest through ``streamer.sources``)."""


def tile_windows(length: int, *, views: int, gap: int) -> list[list[int]]:
    """Frame indices of windows of ``views`` views ``gap`` frames apart that use every frame of
    the first ``length // (views * gap) * views * gap`` exactly once."""
    block = views * gap
    return [[b + j + k * gap for k in range(views)] for b in range(0, length - block + 1, block) for j in range(gap)]


def tiled(frames: Iterable[np.ndarray], *, views: int, gap: int) -> Iterator[list[np.ndarray] | int]:
    """Windows of ``tile_windows`` over a stream of frames, block by block (at most ``views *
    gap`` frames held); last, the count of tail frames left out."""
    block: list[np.ndarray] = []
    for frame in frames:
        block.append(frame)
        if len(block) == views * gap:
            yield from ([block[i] for i in idx] for idx in tile_windows(len(block), views=views, gap=gap))
            block = []
    yield len(block)


def run_streamer(snapshot: Path) -> dict:
    """The ``streamer`` section of the run's ``config.yaml`` beside its snapshots folder ({}
    when there is none)."""
    config = snapshot.parent.parent / "config.yaml"
    data = (yaml.safe_load(config.read_text()) or {}) if config.is_file() else {}
    return data.get("streamer") or {}


def run_defaults(streamer: dict) -> tuple[int, int]:
    """(views, gap): the run's ``streamer.views`` and ``streamer.frame_stride`` (the spacing of
    its training windows before keyframing), else the config defaults."""
    defaults = StreamerConfig()
    return int(streamer.get("views", defaults.views)), int(streamer.get("frame_stride", defaults.frame_stride))


def run_fov(streamer: dict) -> float:
    """The run's ``streamer.fov_deg`` (the horizontal field of view its readers assume), else the
    config default."""
    return float(streamer.get("fov_deg", StreamerConfig().fov_deg))


def trained_size(meta: dict) -> tuple[int, int]:
    """(H, W) the snapshot's learner trained at (its meta's ``image_size``), else the streamer's
    default size."""
    return tuple(meta.get("image_size") or (StreamerConfig().height, StreamerConfig().width))


def run_sources(streamer: dict) -> list[str]:
    """The run's ``streamer.sources`` that are files, folders or globs (live URLs left out)."""
    sources = streamer.get("sources") or []
    live = [s for s in sources if "://" in s or s.startswith("/dev/video")]
    if live:
        log.info("left out the run's live sources (no frames to read back): %s", ", ".join(live))
    return [s for s in sources if s not in live]


def frame_streams(specs: list[str], *, fov_deg: float) -> Iterator[tuple[str, Iterator[np.ndarray]]]:
    """(name, RGB frames) of every source of ``specs``; a source that cannot be read is logged
    with its reason by the reader and skipped."""
    for spec in specs:
        if spec.startswith(DATASET_KINDS):
            for seq in load_sequences(spec):
                yield seq.name, (seq.read(i)[0] for i in range(seq.length))
        else:
            for source in discover([spec], fov_deg=fov_deg):
                yield source.name, (frame.rgb for frame in source.frames())


def real_samples(model: torch.nn.Module, streams: Iterable[tuple[str, Iterable[np.ndarray]]], *, views: int,
                 gap: int, learner_size: tuple[int, int], size: tuple[int, int], device,
                 max_frames: int | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The learner's depth on tiled windows of each stream: uint8 RGB [N, H, W, 3] and depth
    [N, H, W] (0 = invalid: not finite or not > 0) at ``size``, and counts for the meta."""
    lh, lw = learner_size
    height, width = size
    images, depths, windows, dropped, names, capped = [], [], 0, 0, [], False
    model.eval()
    identity = np.eye(3)  # the model takes no intrinsics; the window type wants some
    for name, frames in streams:
        if capped:
            break
        names.append(name)
        for item in tiled(frames, views=views, gap=gap):
            if isinstance(item, int):
                dropped += item
                break
            if max_frames is not None and len(images) + views > max_frames:
                capped = True  # nothing more is read
                break
            fitted = np.stack([imaging.fit_image(f, lh, lw) for f in item])
            window = EvalWindow(f"{name}:{windows}", fitted, np.stack([identity] * views), None, None)
            with torch.no_grad():
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
            "learner_size": [lh, lw], "sources": names, "capped_at_max_frames": capped}
    return torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(depths)), info


def distill(args: argparse.Namespace, command: str = "") -> int:
    """``reliev3r teacher-train --distill RUN ...``; returns the exit code."""
    prog = "reliev3r teacher-train"
    try:
        cfg = config_from_args(args)
        if not 0 <= args.real_share <= 1:
            raise ValueError(f"--real-share must be in [0, 1], got {args.real_share}")
        if args.max_frames < 1 or (args.views is not None and args.views < 2) or (args.gap is not None
                                                                                  and args.gap < 1):
            raise ValueError("--max-frames and --gap must be >= 1 and --views >= 2")
        snap = resolve_given("--distill", Path(args.distill))
        streamer = run_streamer(snap)
        specs = args.frames or run_sources(streamer)
        if not specs:
            raise ValueError(f"{args.distill}: the run names no file or folder sources; give --frames")
        check_device_present("--device", cfg.device)  # its default, cuda, on a host without: said here
    except (ValueError, FileNotFoundError) as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return 2
    model, meta = load_model(snap, cfg.device, ema=True)
    weights = "ema.safetensors" if (snap / "ema.safetensors").is_file() else "model.safetensors"
    run_views, run_gap = run_defaults(streamer)
    views, gap = args.views or run_views, args.gap or run_gap
    try:
        images, depths, info = real_samples(model, frame_streams(specs, fov_deg=run_fov(streamer)), views=views,
                                            gap=gap, learner_size=trained_size(meta), size=(cfg.height, cfg.width),
                                            device=cfg.device, max_frames=args.max_frames)
    except (ValueError, FileNotFoundError) as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return 2
    del model
    source = {"source": "reliev3r teacher-train --distill: the learner's depth on real windows",
              "run": str(args.distill), "snapshot": str(snap), "step": meta["step"], "weights": weights.split(".")[0],
              "weights_sha256": meta["files"].get(weights, {}).get("sha256"), "frames_specs": list(specs), **info}
    out = train(cfg, command=command, extra=(images, depths), extra_share=args.real_share, extra_meta=source)
    print(json.dumps({"out": str(cfg.out), "steps": out["steps"], "version": out["version"],
                      "real_frames": len(images), **out["metrics"]["synthetic_val"]}))
    return 0
