"""Images of another aspect than the model's: which way of feeding them scores best.

A snapshot's model is trained on views its streamer resized to cover ``image_size`` and cropped
at the centre (``reliev3r.imaging.fit_image``, what ``reliev3r eval`` reads its windows with
too). An image of another aspect can be fed (a) stretched to ``image_size``, (b) fitted as the
streamer fits its views (the outputs then cover the centre region the crop keeps), or (c) at its
own aspect, about the trained pixel count, the sides rounded to the patch size (the model's 2D
RoPE takes any grid). Held-out 7-Scenes windows are cropped at the centre to each of four
shapes (3:2, the trained aspect: the control, where the three ways feed the same pixels; the
uncropped 4:3 frames; 16:9; a 1:2 portrait), depth and intrinsics cropped alike, and fed the
three ways. Each view is scored alone (``evaluation.metrics.depth_metrics``: AbsRel and
delta<1.25 after median scaling, ``*_med``) against its ground truth sampled at the outputs'
pixels: on all the pixels each way covers ("own"), and on the region way (b) covers, which the
others cover too ("centre": the same scene pixels for every way). A window's score is its
views' mean; the intervals are percentile bootstraps over windows
(``evaluation.intervals``), paired for the ratio to (a) on the same windows. The poses of a
window (``evaluation.metrics.pose_metrics``: a crop moves no camera) are scored too.

    .venv/bin/python -m studies.aspect SNAPSHOT [SNAPSHOT ...] [--data DIR] [--windows 32] [--views 4] [--json FILE]

``--data`` is a 7-Scenes folder (``evaluation.datasets.sevenscenes_sequence``); windows of the
snapshot's views, every ``--stride``-th frame, spread over it (``evaluation.datasets.window_starts``).
Runs on the CPU. Result (neither (b) nor (c) clearly better than (a), which the API keeps):
docs/RESULTS.md, "Images of another aspect than the model's".
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import cv2
import numpy as np
import torch

from evaluation.datasets import sevenscenes_sequence, window_starts
from evaluation.intervals import mean_interval, ratio_interval
from evaluation.metrics import depth_metrics, pose_metrics
from learner.api import Reconstructor
from reliev3r import geometry, imaging

SHAPES = {"3:2": 3 / 2, "4:3": None, "16:9": 16 / 9, "1:2": 1 / 2}
"""Crops (width / height; None: the frame uncropped)."""
WAYS = ("stretch", "cover", "keep")


def centre_crop(h: int, w: int, aspect: float | None) -> tuple[int, int, int, int]:
    """(left, top, width, height) of the largest centred crop of an ``h`` x ``w`` frame at ``aspect``."""
    if aspect is None:
        return 0, 0, w, h
    cw, ch = (w, round(w / aspect)) if aspect > w / h else (round(h * aspect), h)
    return (w - cw) // 2, (h - ch) // 2, cw, ch


def keep_size(h: int, w: int, pixels: int, patch: int) -> tuple[int, int]:
    """(height, width) of about ``pixels`` pixels at the aspect of ``h`` x ``w``, sides rounded to ``patch``."""
    a = w / h
    return (max(patch, round(math.sqrt(pixels / a) / patch) * patch),
            max(patch, round(math.sqrt(pixels * a) / patch) * patch))


def resize(image: np.ndarray, h: int, w: int, *, nearest: bool = False) -> np.ndarray:
    """Stretch to ``h`` x ``w`` as ``learner.api`` did (area averaging down, bilinear up; depth:
    the source pixel under each centre)."""
    interp = cv2.INTER_NEAREST_EXACT if nearest else (cv2.INTER_AREA if image.shape[1] > w else cv2.INTER_LINEAR)
    return cv2.resize(image, (w, h), interpolation=interp)


def feed(way: str, rgb: np.ndarray, depth: np.ndarray, K: np.ndarray, size: tuple[int, int], patch: int):
    """(image, depth, intrinsics, (scale_x, scale_y, left, top)) of one crop fed ``way``: an output
    pixel (i, j) has its centre at input ((j + left + 0.5) / scale_x, (i + top + 0.5) / scale_y)."""
    h, w = rgb.shape[:2]
    H, W = size
    Kt = torch.from_numpy(K).double()
    if way == "cover":
        new_w, new_h, left, top = imaging.fit_plan(h, w, H, W)
        return (imaging.fit_image(rgb, H, W), imaging.fit_image(depth, H, W, nearest=True),
                imaging.fit_intrinsics(K, h, w, H, W), (new_w / w, new_h / h, left, top))
    if way == "keep":
        H, W = keep_size(h, w, H * W, patch)
    k = geometry.resize_intrinsics(Kt, W / w, H / h).numpy()
    return resize(rgb, H, W), resize(depth, H, W, nearest=True), k, (W / w, H / h, 0, 0)


def region_mask(out_hw: tuple[int, int], mapping, box: tuple[float, float, float, float]) -> np.ndarray:
    """Output pixels whose centres fall in ``box`` (x0, y0, x1, y1) of the input."""
    sx, sy, left, top = mapping
    x = (np.arange(out_hw[1]) + left + 0.5) / sx
    y = (np.arange(out_hw[0]) + top + 0.5) / sy
    x0, y0, x1, y1 = box
    return ((y >= y0) & (y < y1))[:, None] & ((x >= x0) & (x < x1))[None, :]


def score_window(model, frames, size, patch) -> dict[str, dict[str, float]]:
    """Per way (and "constant": depth 1 and identity poses on the stretched grid, what no model
    scores): the window's mean over views of absrel/delta (own region, centre region), its poses'
    ``rot_err_deg`` and ``ate``, and the outputs' size."""
    h, w = frames[0][0].shape[:2]
    new_w, new_h, left, top = imaging.fit_plan(h, w, *size)
    centre = (left * w / new_w, top * h / new_h, (left + size[1]) * w / new_w, (top + size[0]) * h / new_h)
    gt_poses = torch.from_numpy(np.stack([f[3] for f in frames])).double()
    out = {}
    for way in WAYS:
        fed = [feed(way, rgb, depth, K, size, patch) for rgb, depth, K, _ in frames]
        x = torch.from_numpy(np.stack([f[0] for f in fed])).permute(0, 3, 1, 2).float().div(255.0)[None]
        with torch.no_grad():
            pred = model(x)
        out[way] = _summary(pred.depth[0], pred.cam_to_world[0], fed, centre, gt_poses)
        if way == "stretch":
            identity = torch.eye(4).expand(len(fed), 4, 4)
            out["constant"] = _summary(torch.ones_like(pred.depth[0]), identity, fed, centre, gt_poses)
    return out


def _summary(depth: torch.Tensor, cam_to_world: torch.Tensor, fed, centre, gt_poses: torch.Tensor) -> dict:
    rows = {"absrel_own": [], "delta_own": [], "absrel_centre": [], "delta_centre": []}
    for v, (_, gt, _, mapping) in enumerate(fed):
        p, g = depth[v][None], torch.from_numpy(gt)[None]
        own = depth_metrics(p, g)
        mid = depth_metrics(p, g, torch.from_numpy(region_mask(gt.shape, mapping, centre))[None])
        for key, value in (("absrel_own", own["absrel_med"]), ("delta_own", own["delta_med"]),
                           ("absrel_centre", mid["absrel_med"]), ("delta_centre", mid["delta_med"])):
            rows[key].append(value)
    r = {k: float(np.mean(v)) for k, v in rows.items()}
    poses = pose_metrics(cam_to_world.double(), gt_poses)
    r.update(rot_err_deg=poses["rot_err_deg"], ate=poses["ate"], out_size=list(depth.shape[-2:]))
    return r


def windows_of(data: Path, views: int, stride: int, count: int):
    """[(name, [(rgb, depth, K, cam_to_world)] * views)] of the 7-Scenes folder, frames as read."""
    seq = sevenscenes_sequence(data)
    out = []
    for start in window_starts(seq.length, views=views, stride=stride, windows=count):
        frames = []
        for idx in range(start, start + views * stride, stride):
            rgb, depth, pose = seq.read(idx)
            frames.append((rgb, depth, seq.frame_intrinsics(idx, *rgb.shape[:2]).astype(np.float64), pose))
        out.append((f"{seq.name}:{start}", frames))
    return out


def cropped(frames, aspect):
    h, w = frames[0][0].shape[:2]
    left, top, cw, ch = centre_crop(h, w, aspect)
    K = [geometry.crop_intrinsics(torch.from_numpy(f[2]), left, top).numpy() for f in frames]
    return [(np.ascontiguousarray(rgb[top:top + ch, left:left + cw]),
             np.ascontiguousarray(depth[top:top + ch, left:left + cw]), k, pose)
            for (rgb, depth, _, pose), k in zip(frames, K)]


KEYS = ("absrel_own", "delta_own", "absrel_centre", "delta_centre", "rot_err_deg", "ate")


def study(snapshot: Path, data: Path, windows: int, views: int, stride: int) -> dict:
    rec = Reconstructor.from_snapshot(snapshot, device="cpu")
    size = rec.image_size
    wins = windows_of(data, views, stride, windows)
    per = {name: {way: [] for way in (*WAYS, "constant")} for name in SHAPES}
    crops = {}
    for _, frames in wins:
        for name, aspect in SHAPES.items():
            c = cropped(frames, aspect)
            crops[name] = c[0][0].shape[:2]
            for way, r in score_window(rec.model, c, size, rec.model.cfg.patch_size).items():
                per[name][way].append(r)
    table = {}
    for name in SHAPES:
        base = per[name]["stretch"]
        for way in (*WAYS, "constant"):
            rows = per[name][way]
            entry = {"crop_hw": list(crops[name]), "out_hw": rows[0]["out_size"], "windows": len(rows)}
            for k in KEYS:
                col = np.array([r[k] for r in rows])
                ref = np.array([r[k] for r in base])
                entry[k] = float(col.mean())
                entry[k + "_ci"] = mean_interval(col)
                entry[k + "_ratio"] = float(col.mean() / ref.mean())
                entry[k + "_ratio_ci"] = ratio_interval(col, ref)
                entry[k + "_better"] = int(((col < ref) if not k.startswith("delta") else (col > ref)).sum())
            table[f"{name} {way}"] = entry
    return {"snapshot": str(snapshot), "image_size": list(size), "views": views, "data": str(data),
            "windows": [n for n, _ in wins], "stride": stride, "table": table}


def print_table(result: dict) -> None:
    print(f"\n{result['snapshot']} (trained at {result['image_size'][0]}x{result['image_size'][1]}), "
          f"{len(result['windows'])} windows of {result['views']} views")
    print("| crop (HxW) | way | output | AbsRel own [95%] | δ own | AbsRel centre [95%] | "
          "÷ stretch, centre [95%] | better / windows | δ centre | rot err ° | ATE m |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for key, e in result["table"].items():
        name, way = key.split(" ")
        lo, hi = e["absrel_own_ci"]
        clo, chi = e["absrel_centre_ci"]
        ratio = e["absrel_centre_ratio_ci"]
        print(f"| {name} ({e['crop_hw'][0]}x{e['crop_hw'][1]}) | {way} | {e['out_hw'][0]}x{e['out_hw'][1]} "
              f"| {e['absrel_own']:.3f} [{lo:.3f}, {hi:.3f}] | {e['delta_own']:.3f} "
              f"| {e['absrel_centre']:.3f} [{clo:.3f}, {chi:.3f}] "
              f"| {e['absrel_centre_ratio']:.3f} [{ratio[0]:.3f}, {ratio[1]:.3f}] "
              f"| {e['absrel_centre_better']}/{e['windows']} | {e['delta_centre']:.3f} "
              f"| {e['rot_err_deg']:.2f} | {e['ate']:.3f} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("snapshots", type=Path, nargs="+", help="snapshot folders (or run folders: their newest)")
    parser.add_argument("--data", type=Path, default=Path(".devdata/7s-eval"), help="a 7-Scenes folder")
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--views", type=int, default=4, help="views a window (the run's streamer.views)")
    parser.add_argument("--stride", type=int, default=4, help="frames between a window's views")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write the results here too")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = [study(s, args.data, args.windows, args.views, args.stride) for s in args.snapshots]
    for r in results:
        print_table(r)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
