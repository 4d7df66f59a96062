"""How much of a depth teacher's error on 7-Scenes is smooth: AbsRel after a least-squares
scale and shift per cell of an n x n grid over each frame.

With one cell this is the teacher's per-frame score (as ``reliev3r eval`` aligns a frame). With
more cells each cell gets its own scale and shift, so the error left is what no smooth,
piecewise-affine correction removes; what one cell has and four do not is the teacher's
low-frequency error. A constant map scored the same way says how much signal a cell's shape
still carries: a depth loss normalised per cell sees only that.

    .venv/bin/python -m studies.teacher_cells --data .devdata/7s-eval --first 450 --last 599 --stride 5 \\
        --weights labelers/weights/embedded_depth.safetensors --weights OTHER.safetensors
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np
import torch

from evaluation.datasets import sevenscenes_sequence
from labelers.embedded import WEIGHTS, EmbeddedTeacher
from studies.teacher_warp import lsq_absrel


def cell_absrel(pred: np.ndarray, gt: np.ndarray, cells: int, *, min_pixels: int = 16) -> float:
    """AbsRel of ``pred`` against ``gt`` (0 = no depth) after a least-squares scale and shift per
    cell of a ``cells`` x ``cells`` grid (each cell as ``studies.teacher_warp.lsq_absrel`` aligns
    a frame), over all pixels; cells with fewer than ``min_pixels`` depths are left out."""
    h, w = gt.shape
    cell = (np.arange(h) * cells // h)[:, None] * cells + (np.arange(w) * cells // w)[None, :]
    total = count = 0.0
    for k in range(cells * cells):
        inside = cell == k
        n = int((gt[inside] > 0).sum())
        if n >= min_pixels:
            total += n * lsq_absrel(pred[inside], gt[inside])
            count += n
    return total / count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="a 7-Scenes folder (studies.prepare_7scenes)")
    parser.add_argument("--first", type=int, default=0)
    parser.add_argument("--last", type=int, default=599)
    parser.add_argument("--stride", type=int, default=5)
    parser.add_argument("--weights", type=Path, action="append",
                        help="embedded teacher weights (repeat; default: shipped)")
    parser.add_argument("--cells", type=int, nargs="+", default=[1, 2, 3, 4])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    seq = sevenscenes_sequence(args.data, args.first, args.last)
    frames = [seq.read(k)[:2] for k in range(0, seq.length, args.stride)]
    teachers = {str(w): EmbeddedTeacher("cpu", weights=w).predict for w in (args.weights or [WEIGHTS])}
    teachers["constant depth"] = lambda rgb: np.ones((1, 1, *rgb.shape[1:3]), np.float32)
    print(f"{len(frames)} frames of {args.data.name}, {args.first}..{args.last} every {args.stride}")
    print("| teacher | " + " | ".join(f"{n}x{n} cells" for n in args.cells) + " |")
    print("|---|" + "---|" * len(args.cells))
    for name, predict in teachers.items():
        scores = {n: [] for n in args.cells}
        for rgb, gt in frames:
            pred = predict(rgb[None])[0][0].astype(np.float64)
            gt = cv2.resize(gt, pred.shape[::-1], interpolation=cv2.INTER_NEAREST).astype(np.float64)
            for n in args.cells:
                scores[n].append(cell_absrel(pred, gt, n))
        print(f"| {name} | " + " | ".join(f"{np.mean(scores[n]):.3f}" for n in args.cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
