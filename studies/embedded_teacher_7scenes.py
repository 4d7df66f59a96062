"""The embedded depth teacher on real frames: 7-Scenes red kitchen, beside PyDNet++ and a constant.

Every teacher sees the same frames (every ``--stride``-th of ``--first``..``--last``, full
640x480 RGB) and is scored by the same code (``evaluation.metrics.depth_metrics`` on each
frame alone): AbsRel and delta<1.25 after per-frame least-squares scale-and-shift (``lsq``)
and after median scaling (``med``), averaged over frames; Kinect holes (depth 0) are ignored.

    .venv/bin/python -m studies.embedded_teacher_7scenes [--data DIR] [--pydnet FILE] [--weights FILE] [--record]

``--data`` and ``--pydnet`` default to ``$RELIEV3R_SHARED/data/7scenes-redkitchen`` and
``$RELIEV3R_SHARED/models/pydnet++.tflite`` (``RELIEV3R_SHARED``: default ``../shared``).

``--record`` writes the result into the weights' JSON meta (``metrics.7scenes``; the meta
replaced whole and durably, ``reliev3r.durable.write``), so the numbers travel with the weights
and the recipe that produced them. Runs on CPU (PyDNet++ needs ``ai-edge-litert``; it is
skipped with a note when absent).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from evaluation.datasets import sevenscenes_sequence
from evaluation.metrics import depth_metrics
from labelers.depth import make_teacher
from labelers.embedded import WEIGHTS, EmbeddedTeacher
from reliev3r import durable

SHARED = Path(os.environ.get("RELIEV3R_SHARED", "../shared"))
"""Where the data sets and models live unless ``--data``/``--pydnet`` say otherwise."""
KITCHEN = SHARED / "data" / "7scenes-redkitchen"
PYDNET = SHARED / "models" / "pydnet++.tflite"
KEYS = ("absrel_lsq", "delta_lsq", "absrel_med", "delta_med")


def score(predict, frames: list[np.ndarray], gts: list[np.ndarray]) -> dict:
    per_frame, seconds = [], 0.0
    for rgb, gt in zip(frames, gts):
        t = time.perf_counter()
        depth = predict(rgb)
        seconds += time.perf_counter() - t
        m = depth_metrics(torch.from_numpy(depth)[None].float(), torch.from_numpy(gt)[None])
        per_frame.append([m[k] for k in KEYS])
    mean = np.mean(per_frame, axis=0)
    return {**{k: round(float(v), 4) for k, v in zip(KEYS, mean)}, "s_per_frame": round(seconds / len(frames), 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=KITCHEN)
    parser.add_argument("--pydnet", type=Path, default=PYDNET, help="PyDNet++ TFLite file (skipped when absent)")
    parser.add_argument("--weights", type=Path, default=WEIGHTS)
    parser.add_argument("--first", type=int, default=0)
    parser.add_argument("--last", type=int, default=599)
    parser.add_argument("--stride", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--record", action="store_true", help="write the result into the weights' JSON meta")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    seq = sevenscenes_sequence(args.data, args.first, args.last)
    picks = list(range(0, seq.length, args.stride))
    frames, gts = [], []
    for k in picks:
        rgb, depth, _ = seq.read(k)
        frames.append(rgb)
        gts.append(depth)
    ids = [args.first + k for k in picks]
    print(f"{len(frames)} frames of {args.data.name}: {ids[0]}..{ids[-1]} every {args.stride}")

    results = {}
    embedded = EmbeddedTeacher("cpu", weights=args.weights)
    results[f"embedded ({embedded.version})"] = score(lambda f: embedded.predict(f[None])[0][0], frames, gts)
    if args.pydnet.is_file():
        try:
            pydnet = make_teacher(f"pydnet:{args.pydnet}")
            results["PyDNet++ (tflite)"] = score(lambda f: pydnet.predict(f[None])[0][0], frames, gts)
        except ImportError as err:
            print(f"PyDNet++ skipped: {err}")
    else:
        print(f"PyDNet++ skipped: {args.pydnet} absent")
    results["constant depth"] = score(lambda f: np.ones(f.shape[:2], np.float32), frames, gts)

    print(f"| teacher | AbsRel lsq | δ<1.25 lsq | AbsRel med | δ<1.25 med | s/frame (CPU, {args.threads} threads) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, r in results.items():
        print(f"| {name} | {r['absrel_lsq']:.3f} | {r['delta_lsq']:.3f} | {r['absrel_med']:.3f} "
              f"| {r['delta_med']:.3f} | {r['s_per_frame']:.3f} |")
    if args.record:
        meta_path = args.weights.with_suffix(".json")
        meta = json.loads(meta_path.read_text())
        meta.setdefault("metrics", {})["7scenes"] = {
            "data": f"{args.data.name} frames {ids[0]}..{ids[-1]} every {args.stride} ({len(frames)} frames)",
            "alignment": "per-frame least-squares scale-and-shift (lsq) / median scaling (med)",
            "benchmark": "studies/embedded_teacher_7scenes.py",
            "results": results,
        }
        durable.write(meta_path, json.dumps(meta, indent=2) + "\n", tmp=meta_path.with_suffix(".json.tmp"))
        print(f"recorded in {meta_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
