"""7-Scenes frames downsampled into image-sequence folders that a device call can carry.

    .venv/bin/python -m studies.prepare_7scenes [--data ../shared/data/7scenes-redkitchen] \\
        [--out .devdata] [--scale 0.35] [--every 2]

Writes ``OUT/7s-train`` (frames 0-449) and ``OUT/7s-eval`` (frames 450-599), every ``--every``-th
frame, colour (JPEG), depth (uint16 mm PNG, nearest-neighbour) and pose beside each frame, and
``camera-intrinsics.txt`` scaled with pixel centres at integer coordinates (the project's
convention). At scale 0.35 (files of 224x168, width x height: the 168x224 windows of
``configs/gpu.yaml``) the two folders hold about 11 MB. Both are read by ``reliev3r up`` as an
image-sequence source and by ``reliev3r eval --data 7scenes:DIR``. Study code: it imports nothing of the product.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import cv2


def write_sequence(src: Path, out: Path, frames: range, scale: float) -> int:
    out.mkdir(parents=True, exist_ok=True)
    width, height = round(640 * scale), round(480 * scale)
    for n in frames:
        stem = f"frame-{n:06d}"
        image = cv2.imread(str(src / f"{stem}.color.jpg"))
        depth = cv2.imread(str(src / f"{stem}.depth.png"), cv2.IMREAD_UNCHANGED)
        cv2.imwrite(str(out / f"{stem}.color.jpg"), cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA),
                    [cv2.IMWRITE_JPEG_QUALITY, 92])
        cv2.imwrite(str(out / f"{stem}.depth.png"), cv2.resize(depth, (width, height), interpolation=cv2.INTER_NEAREST),
                    [cv2.IMWRITE_PNG_COMPRESSION, 9])
        shutil.copy(src / f"{stem}.pose.txt", out)
    focal, centre = 585 * scale, lambda c: (c + 0.5) * scale - 0.5
    (out / "camera-intrinsics.txt").write_text(f"{focal} 0 {centre(320)}\n0 {focal} {centre(240)}\n0 0 1\n")
    return len(frames)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/7scenes-redkitchen"))
    parser.add_argument("--out", type=Path, default=Path(".devdata"))
    parser.add_argument("--scale", type=float, default=0.35)
    parser.add_argument("--every", type=int, default=2)
    args = parser.parse_args()
    for name, frames in (("7s-train", range(0, 450, args.every)), ("7s-eval", range(450, 600, args.every))):
        count = write_sequence(args.data, args.out / name, frames, args.scale)
        print(f"{args.out / name}: {count} frames")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
