"""The one place where loss terms are weighted and summed.

``L = L_depth + cfg.reproj_weight * L_reproj (+ cfg.point_weight * L_point)
(+ cfg.refine.weight * L_refine, when ``cfg.refine`` is set) (+ cfg.triangulation_weight * L_tri
+ cfg.triangulation_pose_weight * L_tri_pose + cfg.contrast_weight * L_contrast)`` for
``cfg.kind == "weak"``, the match terms evaluated with the learner's depth;
the ground-truth sibling :func:`learner.losses.supervised_loss` for ``"supervised"``.

:func:`weighted_loss` keeps the logged terms on the device, so that the learner can read them all
in one host sync once the optimizer step, and the next training step, have been launched (a
``float()`` per term before backward would stall the GPU once per term); :func:`compute_loss`
returns them as floats.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from learner.config import LossConfig
from learner.losses import (depth_contrast_loss, gradient_share, point_consistency_loss, relative_depth_loss,
                            reprojection_loss, shape_damped, supervised_loss, teacher_aligned_depth,
                            triangulated_depth_loss, triangulated_pose_loss)
from learner.model import view_depth
from learner.refinement import refine_geometry, refined_geometry_loss
from reliev3r.protocol import Matches


def compute_loss(
    pred: Any,
    batch: dict[str, Tensor],
    cfg: LossConfig,
    *,
    teacher_space: str = "depth",
) -> tuple[Tensor, dict[str, float]]:
    """:func:`weighted_loss` with its terms read back as floats (one host sync per term)."""
    loss, terms = weighted_loss(pred, batch, cfg, teacher_space=teacher_space)
    return loss, {k: float(v) for k, v in terms.items()}


def weighted_loss(
    pred: Any,
    batch: dict[str, Tensor],
    cfg: LossConfig,
    *,
    teacher_space: str = "depth",
) -> tuple[Tensor, dict[str, Tensor | float]]:
    """Total loss of a batch and its named terms for logging.

    Args:
        pred: the model's output, with attributes ``depth`` [B, V, H, W] (> 0),
            ``confidence`` [B, V, H, W] in (0, 2) and ``cam_to_world`` [B, V, 4, 4].
        batch: tensors of a replay ``batch`` message (see :mod:`reliev3r.protocol`):
            ``intrinsics`` [B, V, 3, 3], ``matches`` [K, 8] rows
            (b, i, j, x_i, y_i, x_j, y_j, score); optional ``teacher_depth`` [B, V, H, W] with
            ``teacher_valid`` [B, V, H, W] (absent: the teacher is ``none`` and the depth term
            is off); ``gt_depth`` [B, V, H, W] (0 = unknown) and ``gt_cam_to_world``
            [B, V, 4, 4] for ``cfg.kind == "supervised"``.
        cfg: weights and kind.
        teacher_space: ``"depth"`` or ``"disparity"``: the space of ``teacher_depth``
            (from the batch's teacher meta). A batch whose windows' teachers differ in space
            carries ``teacher_disparity`` bool [B] (true where the window's teacher gives
            disparity, :func:`learner.train.host_batch`), which then names each window's space
            in place of ``teacher_space``.

    Returns:
        ``(loss, terms)``: ``loss`` a scalar tensor, ``terms``: ``matches`` (a float) and
        detached scalar tensors ``loss`` and ``depth`` / ``reproj`` / ``point`` / ``refine`` (weak) or
        ``supervised``, unweighted. Terms that do not apply are left out. Unused outputs are
        joined to the graph with a zero so that every head always receives a (possibly zero)
        gradient, which DDP requires.
    """
    depth, confidence, cam_to_world = pred.depth, pred.confidence, pred.cam_to_world
    connect = depth.sum() * 0 + confidence.sum() * 0 + cam_to_world.sum() * 0
    matches = batch["matches"]
    terms: dict[str, Tensor | float] = {"matches": float(matches.shape[0])}

    if cfg.kind == "supervised":
        if "gt_depth" not in batch or "gt_cam_to_world" not in batch:
            raise KeyError("supervised loss needs 'gt_depth' and 'gt_cam_to_world' in the batch")
        gt_depth = batch["gt_depth"].to(depth.device)
        sup = supervised_loss(depth, cam_to_world, gt_depth, batch["gt_cam_to_world"].to(depth.device),
                              gt_depth > 0, confidence=confidence, alpha=cfg.alpha)
        loss = sup + connect
        terms["supervised"] = sup.detach()
    elif cfg.kind == "weak":
        # windows of teachers of both spaces: each window's own (learner.losses.depth.TeacherSpace)
        space = batch["teacher_disparity"].to(depth.device) if "teacher_disparity" in batch else teacher_space
        matches = matches.to(depth.device)
        named = Matches(matches, batched=True)  # protocol.BATCH_MATCH_COLUMNS
        intrinsics = batch["intrinsics"].to(depth.device)
        teacher = valid = None
        if "teacher_depth" in batch:
            teacher = batch["teacher_depth"].to(depth.device)
            valid = batch.get("teacher_valid")
            valid = torch.ones_like(teacher, dtype=torch.bool) if valid is None else valid.to(depth.device).bool()
        # The match terms see the learner's depth; their gradient reaches its shape damped.
        if teacher is None:
            match_depth = depth
        elif getattr(pred, "log_scale", None) is not None:  # learner.model.scale_head
            match_depth = view_depth(gradient_share(pred.shape, cfg.shape_share), pred.log_scale,
                                     pred.log_shift)
        else:
            match_depth = shape_damped(depth, cfg.shape_share)
        reproj = reprojection_loss(match_depth, cam_to_world, intrinsics, named.geometry, named.score,
                                   robust=cfg.robust, scale_deg=cfg.scale_deg)
        loss = cfg.reproj_weight * reproj + connect
        terms["reproj"] = reproj.detach()
        if cfg.point_weight > 0:
            point = point_consistency_loss(match_depth, cam_to_world, intrinsics, named.geometry, named.score)
            loss = loss + cfg.point_weight * point
            terms["point"] = point.detach()
        if cfg.refine is not None:
            search_depth = depth
            if cfg.refine.depth == "teacher" and teacher is not None:
                search_depth = teacher_aligned_depth(depth, teacher, valid, teacher_space=space)
            refined = _refinement_term(match_depth, search_depth, cam_to_world, intrinsics, matches, cfg)
            loss = loss + cfg.refine.weight * refined
            terms["refine"] = refined.detach()
        triangulation = batch.get("match_triangulation")
        if triangulation is not None:
            triangulation = triangulation.to(depth.device)
        if triangulation is not None and cfg.triangulation_weight > 0:
            tri = triangulated_depth_loss(match_depth, named.geometry, triangulation)
            loss = loss + cfg.triangulation_weight * tri
            terms["triangulation"] = tri.detach()
        if triangulation is not None and cfg.triangulation_pose_weight > 0:
            tri_pose = triangulated_pose_loss(cam_to_world, intrinsics, named.geometry, triangulation,
                                              robust=cfg.robust, scale_deg=cfg.scale_deg)
            loss = loss + cfg.triangulation_pose_weight * tri_pose
            terms["triangulation_pose"] = tri_pose.detach()
        if triangulation is not None and teacher is not None and cfg.contrast_weight > 0:
            contrast = depth_contrast_loss(match_depth, teacher, valid, named.geometry, triangulation, intrinsics,
                                           teacher_space=space)
            loss = loss + cfg.contrast_weight * contrast
            terms["contrast"] = contrast.detach()
        if teacher is not None:
            dep = relative_depth_loss(depth, teacher, confidence, valid, alpha=cfg.alpha,
                                      teacher_space=space)
            loss = loss + dep
            terms["depth"] = dep.detach()
    else:
        raise ValueError(f"kind must be 'weak' or 'supervised', got {cfg.kind!r}")
    terms["loss"] = loss.detach()
    return loss, terms


def _refinement_term(depth: Tensor, search_depth: Tensor, cam_to_world: Tensor, intrinsics: Tensor,
                     matches: Tensor, cfg: LossConfig) -> Tensor:
    """``refined_geometry_loss`` of ``depth`` towards the bundle adjustment of the predicted
    poses, with ``search_depth``'s shape, under the objective's own match terms; windows with
    fewer than ``cfg.refine.min_matches`` scored matches get weight 0 (counted on the device:
    no host sync)."""
    refine = cfg.refine
    named = Matches(matches, batched=True)  # protocol.BATCH_MATCH_COLUMNS
    target, log_scale, shift = refine_geometry(
        search_depth, cam_to_world, intrinsics, named.geometry, named.score, steps=refine.steps,
        lr=refine.lr, reproj_weight=cfg.reproj_weight, point_weight=cfg.point_weight, robust=cfg.robust,
        scale_deg=cfg.scale_deg, compiled=refine.compile, solver=refine.solver, scales=refine.scales,
        shifts=refine.shifts)
    counts = torch.bincount(named.window.long(), weights=(named.score > 0).to(depth.dtype),
                            minlength=depth.shape[0])[:depth.shape[0]]
    window_weight = (counts >= refine.min_matches).to(depth.dtype)
    if refine.shifts:
        # The search's view v has depth exp(σ_v)(D_v + c_v m_v), whose mean is exp(σ_v)(1 + c_v) m_v:
        # the pull registers the prediction's view means to that (its shapes are left alone).
        log_scale = log_scale + torch.log1p(shift.clamp(min=-0.9))
    return refined_geometry_loss(depth, cam_to_world, target, log_scale, window_weight)
