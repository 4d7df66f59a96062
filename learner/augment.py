"""Window augmentation: mirrored windows and per-view colour jitter, every label kept exact.

A weak learner on a looping archive sees each window many times, and after its first few
hundred steps it starts to fit its teacher's per-frame errors: held-out depth is best early
and then worsens (docs/RESULTS.md, issue 21). Augmentation shows it a different sample each
time while keeping every label exact:

* ``flip``: the probability of mirroring a whole window left-right. A mirrored window is the
  window of the mirrored world ``x -> -x`` (camera and world frames alike), so every label has
  an exact counterpart: images, depth maps and masks flip their columns; the principal point
  goes to ``W - 1 - cx`` (pixel centres at integers) and each match's x coordinates to
  ``W - 1 - x``; poses are conjugated by ``diag(-1, 1, 1, 1)`` (``R -> M R M``, ``t -> M t``);
  z-depths, triangulated ones included, do not change.
* ``color``: per view, a brightness gain, a contrast and a saturation factor drawn uniformly
  from ``[1 - color, 1 + color]``, on the images only (the teacher labelled the frame as it
  was; depth does not depend on the exposure).

Random draws come from torch's global generator on the batch's device, whose state the
trainer saves in its snapshots.
"""

from __future__ import annotations

import torch
from torch import Tensor

from learner.config import AugmentConfig

MAPS = ("teacher_depth", "teacher_valid", "gt_depth")
"""Per-pixel labels [B, V, H, W] that flip with the images."""


def mirror_pose(cam_to_world: Tensor) -> Tensor:
    """Poses [..., 4, 4] of the mirrored world: ``M T M`` with ``M = diag(-1, 1, 1, 1)``."""
    m = torch.ones(4, dtype=cam_to_world.dtype, device=cam_to_world.device)
    m[0] = -1.0
    return cam_to_world * m[:, None] * m[None, :]


def flip_windows(batch: dict[str, Tensor], flip: Tensor) -> dict[str, Tensor]:
    """The batch with the windows where ``flip`` [B] (bool) is true mirrored left-right."""
    out = dict(batch)
    width = batch["images"].shape[-1]
    sel = flip.view(-1, 1, 1, 1, 1)
    out["images"] = torch.where(sel, batch["images"].flip(-1), batch["images"])
    for name in MAPS:
        if name in batch:
            out[name] = torch.where(sel[:, :, 0], batch[name].flip(-1), batch[name])
    k = batch["intrinsics"].clone()
    k[..., 0, 2] = torch.where(flip[:, None], (width - 1) - k[..., 0, 2], k[..., 0, 2])
    k[..., 0, 1] = torch.where(flip[:, None], -k[..., 0, 1], k[..., 0, 1])  # a skew changes sign
    out["intrinsics"] = k
    matches = batch["matches"].clone()
    rows = flip[matches[:, 0].long()]
    for col in (3, 5):  # (b, i, j, x_i, y_i, x_j, y_j, score)
        matches[:, col] = torch.where(rows, (width - 1) - matches[:, col], matches[:, col])
    out["matches"] = matches
    if "gt_cam_to_world" in batch:
        poses = batch["gt_cam_to_world"]
        out["gt_cam_to_world"] = torch.where(flip.view(-1, 1, 1, 1), mirror_pose(poses), poses)
    return out


def jitter_colors(images: Tensor, strength: float) -> Tensor:
    """Images [B, V, 3, H, W] in [0, 1] with a random gain, contrast and saturation per view."""
    b, v = images.shape[:2]
    gain, contrast, saturation = (1.0 + strength * (2.0 * torch.rand(3, b, v, 1, 1, 1, device=images.device,
                                                                       dtype=images.dtype) - 1.0)).unbind(0)
    gray = (0.299 * images[:, :, 0:1] + 0.587 * images[:, :, 1:2] + 0.114 * images[:, :, 2:3])
    mean = gray.mean(dim=(-2, -1), keepdim=True)
    out = torch.lerp(gray, images, saturation)  # saturation: 0 gray, 1 unchanged
    out = (out - mean) * contrast + mean
    return (out * gain).clamp_(0.0, 1.0)


def augment_batch(batch: dict[str, Tensor], cfg: AugmentConfig) -> dict[str, Tensor]:
    """``batch`` (as :func:`learner.train.batch_from_message` makes it) augmented by ``cfg``."""
    if cfg.flip > 0:
        flip = torch.rand(batch["images"].shape[0], device=batch["images"].device) < cfg.flip
        batch = flip_windows(batch, flip)
    if cfg.color > 0:
        batch = {**batch, "images": jitter_colors(batch["images"], cfg.color)}
    return batch
