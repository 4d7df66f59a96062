"""A small picture set per evaluated snapshot, written beside its JSON (OpenCV only, no plotting
library): ``<stem>.depth.png`` (image, ground-truth depth and predicted depth of a few views of
the first window, one colour scale per view, the prediction median-scaled to the ground truth
as ``absrel_med`` scores it) and ``<stem>.trajectory.png`` (a top-down view, x-z, of the
camera centres of the first window(s) after the Sim(3) alignment the ATE uses:
``metrics.align_trajectory``, Umeyama's from three views, exact for two).

Cheap by construction: one forward pass per pictured window, at most ``views`` views drawn.
Kept as the snapshots are (:func:`prune_pictures`, with the learner's ``keep_last`` and
``keep_every``): a run that never stops would otherwise keep a set for every snapshot it scored.
"""

from __future__ import annotations

import re
from pathlib import Path

import cv2
import numpy as np
import torch

from evaluation import metrics
from evaluation.datasets import EvalWindow
from evaluation.evaluate import predict
from learner.snapshot import kept_steps
from reliev3r import durable, imaging

PICTURE = re.compile(r"step-(\d+)\..+\.png")
"""A picture of an evaluation (``<stem>.depth.png``, ``<stem>.trajectory.png``, or the temporary
file of one a crash left), by the step of its snapshot."""

TEMPORARY = re.compile(r"step-\d+\..+\.png\.tmp\.png")
"""The temporary file of a picture (:func:`temporary`), which a crash between its write and its
rename leaves behind."""

EST_BGR, GT_BGR = (180, 119, 31), (44, 160, 44)  # blue estimate, green ground truth
"""Colours of the trajectory picture (BGR)."""


def colour_depth(depth: np.ndarray, lo: float, hi: float, valid: np.ndarray | None = None) -> np.ndarray:
    """Depth [H,W] -> BGR uint8 with the turbo colour map over [lo, hi] (near: blue, far: red);
    invalid pixels black."""
    scaled = np.clip((depth - lo) / max(hi - lo, 1e-9), 0, 1)
    out = cv2.applyColorMap((scaled * 255).astype(np.uint8), cv2.COLORMAP_TURBO)
    if valid is not None:
        out[~valid] = 0
    return out


def _label(tile: np.ndarray, text: str) -> np.ndarray:
    band = np.full((18, tile.shape[1], 3), 255, np.uint8)
    cv2.putText(band, text, (3, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate((band, tile), 0)


def depth_picture(images: np.ndarray, pred: np.ndarray, gt: np.ndarray, *, views: int = 4,
                  min_width: int = 160) -> np.ndarray:
    """One row per view (at most ``views``, spread over the window): RGB image, ground-truth
    depth, predicted depth median-scaled to the ground truth (same colour range as the ground
    truth of that view). images uint8 [V,H,W,3] RGB, pred/gt [V,H,W] (gt 0 or not finite = invalid,
    as the metrics read it)."""
    V, H, W = gt.shape
    picks = np.unique(np.linspace(0, V - 1, min(views, V)).round().astype(int))
    gt_valid = np.isfinite(gt) & (gt > 0)
    valid_all = gt_valid & np.isfinite(pred) & (pred > 0)
    scale = float(np.median(gt[valid_all]) / np.median(pred[valid_all])) if valid_all.sum() >= 10 else 1.0
    zoom = max(1, int(np.ceil(min_width / W)))
    rows = []
    for v in picks:
        valid = gt_valid[v]
        lo, hi = (np.percentile(gt[v][valid], (2, 98)) if valid.any() else (0.0, 1.0))
        tiles = [cv2.cvtColor(images[v], cv2.COLOR_RGB2BGR), colour_depth(gt[v], lo, hi, valid),
                 colour_depth(pred[v] * scale, lo, hi, np.isfinite(pred[v]))]
        tiles = [cv2.resize(t, (W * zoom, H * zoom), interpolation=cv2.INTER_NEAREST) for t in tiles]
        names = (f"view {v} image", f"ground truth {lo:.2f}-{hi:.2f} m", "predicted (median-scaled)")
        gap = np.full((H * zoom + 18, 4, 3), 255, np.uint8)
        row = [x for t, n in zip(tiles, names) for x in (_label(t, n), gap)][:-1]
        rows.append(np.concatenate(row, 1))
        rows.append(np.full((4, rows[-1].shape[1], 3), 255, np.uint8))
    return np.concatenate(rows[:-1], 0)


def trajectory_picture(tracks: list[tuple[np.ndarray, np.ndarray]], *, size: int = 420) -> np.ndarray:
    """Top-down (x-z) view of (aligned estimate centres [V,3], ground-truth centres [V,3]) per
    window, each window's ground truth green and estimate blue, a thin line joining each
    estimated centre to its ground truth (the ATE's residual)."""
    canvas = np.full((size + 40, size, 3), 255, np.uint8)
    pts = np.concatenate([np.concatenate(t, 0) for t in tracks], 0)[:, [0, 2]]
    lo, hi = pts.min(0), pts.max(0)
    span = max(float((hi - lo).max()), 1e-9)
    margin = 30
    scale = (size - 2 * margin) / span
    centre = (lo + hi) / 2

    def px(p: np.ndarray) -> np.ndarray:
        q = (p[:, [0, 2]] - centre) * scale
        return np.stack((size / 2 + q[:, 0], 40 + size / 2 - q[:, 1]), -1).round().astype(np.int32)

    for est, gt in tracks:
        pe, pg = px(est), px(gt)
        for a, b in zip(pe, pg):
            cv2.line(canvas, tuple(map(int, a)), tuple(map(int, b)), (170, 170, 170), 1, cv2.LINE_AA)
        for p, colour in ((pg, GT_BGR), (pe, EST_BGR)):
            cv2.polylines(canvas, [p.reshape(-1, 1, 2)], False, colour, 2, cv2.LINE_AA)
            for q in p:
                cv2.circle(canvas, tuple(map(int, q)), 3, colour, -1, cv2.LINE_AA)
    font = cv2.FONT_HERSHEY_SIMPLEX
    cv2.putText(canvas, "top view (x-z), Sim(3)-aligned", (8, 16), font, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(canvas, "ground truth", (8, 34), font, 0.45, GT_BGR, 1, cv2.LINE_AA)
    cv2.putText(canvas, "estimate", (120, 34), font, 0.45, EST_BGR, 1, cv2.LINE_AA)
    cv2.putText(canvas, f"extent {span:.3g} m", (size - 110, 34), font, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    return canvas


def temporary(path: Path) -> Path:
    """The temporary file the picture ``path`` is written through (``reliev3r.durable.write``)."""
    return path.with_name(path.name + ".tmp.png")


def _write_png(path: Path, picture: np.ndarray) -> None:
    """``picture`` to ``path`` as a PNG, whole (``reliev3r.durable.write``); its folder is left
    to the caller, who fsyncs it once after the last picture."""
    encoded = imaging.encode_image(picture, ".png")
    if encoded is None:
        raise OSError(f"{path}: cannot encode PNG")
    durable.write(path, encoded, tmp=temporary(path), fsync_folder=False)


def write_pictures(out_dir: Path, stem: str, predictions: list[tuple[EvalWindow, np.ndarray, np.ndarray]],
                   *, views: int = 4) -> list[str]:
    """Write the picture set of one evaluation into ``out_dir`` from (window, predicted depth
    [V,H,W], predicted cam_to_world [V,4,4]) of the pictured windows (the first one's depth;
    every one's trajectory). Returns the file names written (those the ground truth allows).

    Durable once it returns, so a result written after it never names a picture a power loss
    took: each picture's bytes are fsynced before it is renamed into place, and ``out_dir``
    once after the last rename (one folder fsync flushes every name made in it)."""
    written = []
    with_depth = [(w, d) for w, d, _ in predictions if w.gt_depth is not None]
    if with_depth:
        w, d = with_depth[0]
        name = f"{stem}.depth.png"
        _write_png(out_dir / name, depth_picture(w.images, np.asarray(d, np.float32), w.gt_depth, views=views))
        written.append(name)
    tracks = []
    for w, _, pose in predictions:
        if w.gt_cam_to_world is not None and len(w.gt_cam_to_world) >= 2:
            gt = torch.from_numpy(np.asarray(w.gt_cam_to_world, np.float64))
            aligned = metrics.align_trajectory(torch.from_numpy(np.asarray(pose, np.float64)), gt)
            tracks.append((aligned[:, :3, 3].numpy(), gt[:, :3, 3].numpy()))
    if tracks:
        name = f"{stem}.trajectory.png"
        _write_png(out_dir / name, trajectory_picture(tracks))
        written.append(name)
    if written:
        durable.fsync(out_dir)
    return written


def picture_snapshot(model: torch.nn.Module, windows: list[EvalWindow], device, out_dir: Path, stem: str,
                     *, count: int = 1) -> list[str]:
    """Predict the first ``count`` windows with ``model`` and write their picture set."""
    was_training = model.training
    model.eval()
    try:
        predictions = []
        for window in windows[:count]:
            depth, pose = predict(model, window, device)
            predictions.append((window, depth.cpu().numpy(), pose.cpu().double().numpy()))
    finally:
        model.train(was_training)
    return write_pictures(out_dir, stem, predictions)


def prune_pictures(out_dir: Path, *, keep_last: int, keep_every: int) -> list[Path]:
    """Delete the pictures in ``out_dir`` but those of the steps pictured that
    ``learner.snapshot.kept_steps`` keeps (the snapshots' rule: the newest ``keep_last`` and the
    multiples of ``keep_every``; the pictures of a snapshot kept are kept). The results (JSON)
    stay: they are the learning curves. Returns what was removed."""
    pictures = [(int(m.group(1)), p) for p in Path(out_dir).iterdir() if (m := PICTURE.fullmatch(p.name))]
    keep = kept_steps(sorted({step for step, _ in pictures}), keep_last=keep_last, keep_every=keep_every)
    removed = []
    for step, path in pictures:
        if step not in keep:
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed
