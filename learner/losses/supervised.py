"""The fully-supervised sibling: depth and relative poses against ground truth, for the
comparison with the weak objective only (never the default).
"""

from __future__ import annotations

import torch
from torch import Tensor

from learner.config import LossConfig
from learner.losses.depth import _fp32
from reliev3r import geometry

_TERMS = LossConfig()
"""Where the keyword defaults below come from (``learner.loss``): one default per setting."""


def _relative_poses(cam_to_world: Tensor) -> Tensor:
    """[B, V, V, 4, 4]: entry (i, j) is cam_j_to_cam_i."""
    world_to_cam = geometry.invert_pose(cam_to_world)
    return world_to_cam[:, :, None] @ cam_to_world[:, None, :]


def supervised_loss(
    pred_depth: Tensor,
    pred_cam_to_world: Tensor,
    gt_depth: Tensor,
    gt_cam_to_world: Tensor,
    valid: Tensor,
    *,
    confidence: Tensor | None = None,
    alpha: float = _TERMS.alpha,
    pose_weight: float = 1.0,
    min_valid: int = 16,
) -> Tensor:
    """Fully-supervised sibling of the weak losses (only for the comparison study), a scalar.

    Gauge: scale is normalised per window by the mean depth over the valid pixels
    (prediction by its own mean, ground truth by its own), and poses are compared as relative
    poses ``cam_j_to_cam_i`` over all ordered pairs i != j, with translations divided by the
    same mean depths. This needs no reference view (permutation-equivariant, like the model)
    and no Umeyama alignment (which breaks down for collinear centres, e.g. forward motion,
    and for V = 2). It is invariant to one similarity transform of the predicted window.

    ``L = depth_term + pose_weight * (rot_term + trans_term)``:
      * depth_term: mean over valid pixels of ``|D̂/s_pred − D/s_gt|``, or with confidence W
        ``W |…| − alpha log W``;
      * rot_term: mean over pairs of 1 − cos(angle of R̂_ij^T R_ij), i.e. (3 − tr) / 2;
      * trans_term: mean over pairs of |t̂_ij/s_pred − t_ij/s_gt| (L2 norm).

    Args:
        pred_depth: [B, V, H, W] > 0.  pred_cam_to_world: [B, V, 4, 4].
        gt_depth: [B, V, H, W] (0 = unknown).  gt_cam_to_world: [B, V, 4, 4].
        valid: [B, V, H, W] bool, usable ground-truth depth (combined with gt_depth > 0).
        confidence: [B, V, H, W] in (0, 2) or None.
        min_valid: a window with fewer valid pixels contributes to neither term (weight 0;
            with no such window the loss is 0).
    """
    pred_depth = _fp32(pred_depth)
    dtype = pred_depth.dtype
    pred_pose = _fp32(pred_cam_to_world).to(dtype)
    gt_depth = _fp32(gt_depth).to(dtype)
    gt_pose = _fp32(gt_cam_to_world).to(dtype)
    zero = pred_depth.sum() * 0 + pred_pose.sum() * 0
    if confidence is not None:
        confidence = _fp32(confidence).to(dtype)
        zero = zero + confidence.sum() * 0
    mask = valid.bool() & (gt_depth > 0) & torch.isfinite(gt_depth)
    gt_depth = torch.where(mask, gt_depth, torch.zeros_like(gt_depth))
    count = mask.flatten(1).sum(-1)  # [B]
    # Windows with too few valid pixels are weighted 0, not indexed away: no data-dependent
    # shape and no read from the host, so the step can be recorded as a CUDA graph.
    ok = count >= min_valid
    denom = count.clamp(min=1).to(dtype)
    tiny = torch.finfo(dtype).tiny
    one = torch.ones_like(denom)
    s_pred = (torch.where(mask, pred_depth, torch.zeros_like(pred_depth)).flatten(1).sum(-1) / denom).clamp(min=tiny)
    s_gt = (gt_depth.flatten(1).sum(-1) / denom).clamp(min=tiny)
    s_pred, s_gt = torch.where(ok, s_pred, one), torch.where(ok, s_gt, one)  # finite in a window weighted 0
    mask_ok = mask & ok[:, None, None, None]

    residual = (pred_depth / s_pred[:, None, None, None] - gt_depth / s_gt[:, None, None, None]).abs()
    if confidence is not None:
        per_pixel = confidence * residual - alpha * confidence.clamp(min=1e-6).log()
    else:
        per_pixel = residual
    depth_term = torch.where(mask_ok, per_pixel, torch.zeros_like(per_pixel)).sum() / mask_ok.sum().clamp(min=1)

    if pred_pose.shape[1] < 2:
        return depth_term + zero
    per_window = _relative_pose_errors(pred_pose, s_pred, gt_pose, s_gt)
    pose_term = torch.where(ok, per_window, torch.zeros_like(per_window)).sum() / ok.sum().clamp(min=1)
    return depth_term + pose_weight * pose_term + zero


def _relative_pose_errors(pred: Tensor, s_pred: Tensor, target: Tensor, s_target: Tensor) -> Tensor:
    """[B]: per window, the mean over ordered pairs i != j of (1 − cos of the relative rotation
    error) + |t̂_ij / s_pred − t_ij / s_target| (cam_j_to_cam_i translations in units of each
    window's scale ``s`` [B]). Needs V >= 2; invariant to a similarity of either window."""
    v = pred.shape[1]
    rel_pred, rel_target = _relative_poses(pred), _relative_poses(target)
    off_diag = 1 - torch.eye(v, dtype=pred.dtype, device=pred.device)  # a weight, not a mask: no data-dependent shape
    r_err = rel_pred[..., :3, :3].transpose(-1, -2) @ rel_target[..., :3, :3]
    rot = (3 - r_err.diagonal(dim1=-2, dim2=-1).sum(-1)) / 2  # 1 − cos(angle)
    diff = rel_pred[..., :3, 3] / s_pred[:, None, None, None] - rel_target[..., :3, 3] / s_target[:, None, None, None]
    # Smoothed norm (exactly 0 at a perfect prediction, finite gradient there).
    trans = ((diff * diff).sum(-1) + 1e-12).sqrt() - 1e-6
    return ((rot + trans) * off_diag).sum((-2, -1)) / (v * (v - 1))
