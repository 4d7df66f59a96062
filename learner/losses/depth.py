"""The relative-depth loss (Reliev3R) and the teacher-shape helpers it rests on.

Shapes and conventions as in :mod:`learner.losses`.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from learner.config import LossConfig

_TERMS = LossConfig()
"""Where the keyword defaults below come from (``learner.loss``): one default per setting."""


TeacherSpace = Literal["depth", "disparity"] | Tensor
"""The space of a batch's ``teacher_depth``: ``"depth"`` (larger = farther) or ``"disparity"``
(larger = nearer) for every window, or a bool tensor [B], true where window b's teacher gives
disparity (a batch of windows from teachers of both spaces)."""


def teacher_disparity(teacher_space: TeacherSpace, windows: int) -> bool | Tensor:
    """Whether the teacher's values are disparities: one bool for the batch, or the bool [B]
    tensor ``teacher_space`` itself (checked to be one bool per window: shapes only, no read
    of the device). Raises ``ValueError`` on anything else."""
    if isinstance(teacher_space, Tensor):
        if teacher_space.dtype != torch.bool or tuple(teacher_space.shape) != (windows,):
            raise ValueError(f"teacher_space as a tensor must be bool [{windows}] (one per window), got "
                             f"{teacher_space.dtype} {list(teacher_space.shape)}")
        return teacher_space
    if teacher_space not in ("depth", "disparity"):
        raise ValueError(f"teacher_space must be 'depth' or 'disparity', got {teacher_space!r}")
    return teacher_space == "disparity"


def in_teacher_space(depth: Tensor, disparity: bool | Tensor) -> Tensor:
    """``depth`` (> 0) carried into the teacher's space: itself, or ``1 / depth`` where
    ``disparity`` (a bool, or a bool tensor that broadcasts against ``depth``). The inverse is
    its own inverse, so it also carries teacher-space values back to depth. With a tensor, the
    entries kept as depth are not inverted in the branch ``torch.where`` drops either: a tiny
    depth there would otherwise give its gradient 0 x inf = NaN."""
    tiny = torch.finfo(depth.dtype).tiny
    if not isinstance(disparity, Tensor):
        return 1.0 / depth.clamp(min=tiny) if disparity else depth
    inverse = 1.0 / torch.where(disparity, depth, torch.ones_like(depth)).clamp(min=tiny)
    return torch.where(disparity, inverse, depth)


def _per_view(disparity: bool | Tensor, views: int) -> bool | Tensor:
    """A per-window flag [B] as one per view, [B * V, 1] (the rows of a flattened [B, V, ...])."""
    if not isinstance(disparity, Tensor):
        return disparity
    return disparity[:, None].expand(-1, views).reshape(-1, 1)


def _fp32(x: Tensor) -> Tensor:
    """Half precision in, fp32 out (losses run in fp32); fp32/fp64 pass through."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def weighted_median(values: Tensor, weights: Tensor) -> Tensor:
    """Weighted (lower) median over the last dim: [..., N], [..., N] -> [..., 1].

    The smallest value x_k with ``sum(w[x <= x_k]) >= sum(w) / 2``. Entries of weight 0 are
    ignored; ``weights`` must be >= 0 (not differentiated). The result is one of ``values``
    and carries its gradient.
    """
    order = values.detach().argsort(dim=-1)
    sorted_values = values.gather(-1, order)
    cum = weights.detach().gather(-1, order).cumsum(-1)
    half = 0.5 * cum[..., -1:]
    index = (cum < half).sum(-1, keepdim=True).clamp(max=values.shape[-1] - 1)
    return sorted_values.gather(-1, index)


def median_mad_normalize(values: Tensor, weights: Tensor, *, eps: float = 1e-6) -> Tensor:
    """Γ(x; w) = (x − wmedian(x; w)) / wmean(|x − wmedian(x; w)|; w) over the last dim.

    ``values`` [..., N], ``weights`` [..., N] >= 0 (stop-gradient applied here; 0 = excluded).
    Returns [..., N]. Invariant to ``a * x + b`` for a > 0. A constant map (mean absolute
    deviation ~ 0) is divided by ``eps`` times its mean magnitude instead, which keeps the
    guard scale-invariant and the result finite (0 for an exactly constant map).
    """
    w = weights.detach()
    total = w.sum(-1, keepdim=True).clamp(min=torch.finfo(w.dtype).tiny)
    med = weighted_median(values, w)
    dev = values - med
    mad = (w * dev.abs()).sum(-1, keepdim=True) / total
    magnitude = (w * values.detach().abs()).sum(-1, keepdim=True) / total
    floor = (eps * magnitude).clamp(min=torch.finfo(w.dtype).tiny)
    return dev / torch.maximum(mad, floor)


def relative_depth_loss(
    pred_depth: Tensor,
    teacher_depth: Tensor,
    confidence: Tensor | None,
    valid: Tensor,
    *,
    alpha: float = _TERMS.alpha,
    teacher_space: TeacherSpace = "depth",
    min_valid: int = 16,
    eps: float = 1e-6,
) -> Tensor:
    """Ambiguity-aware relative depth loss (Reliev3R), a scalar.

    ``L = mean over valid pixels of  W |Γ(P; sg W) − Γ(T; sg W)| − alpha log W``, Γ applied per
    view (:func:`median_mad_normalize`).

    Args:
        pred_depth: [B, V, H, W] predicted z-depth D̂ > 0.
        teacher_depth: [B, V, H, W] teacher's relative depth (unknown scale and shift per view);
            values at invalid pixels are ignored, even when non-finite.
        confidence: [B, V, H, W] W in (0, 2), or None for W = 1 (no log term).
        valid: [B, V, H, W] bool (or 0/1) mask of usable teacher pixels.
        alpha: weight of the ``-log W`` regulariser that stops W from collapsing to 0.
        teacher_space: ``"depth"`` (larger = farther): P = D̂. ``"disparity"`` (larger = nearer,
            e.g. Depth Anything's relative output): normalise in the teacher's own space,
            P = 1 / D̂. Or per window, a bool tensor [B] (:data:`TeacherSpace`).
        min_valid: views with fewer valid pixels are skipped.
        eps: relative guard of Γ against a zero mean absolute deviation.

    Reduction: sum over the valid pixels of the kept views / their count. When no view is
    kept the result is a graph-connected zero (gradients exist and are 0), never NaN.
    """
    disparity = teacher_disparity(teacher_space, pred_depth.shape[0])
    if pred_depth.shape != teacher_depth.shape or pred_depth.shape != valid.shape:
        raise ValueError(f"shape mismatch: pred {tuple(pred_depth.shape)}, teacher "
                         f"{tuple(teacher_depth.shape)}, valid {tuple(valid.shape)}")
    pred = _fp32(pred_depth).flatten(-2).flatten(0, -2)  # [B*V, H*W]
    teacher = _fp32(teacher_depth).flatten(-2).flatten(0, -2).to(pred.dtype)
    mask = valid.flatten(-2).flatten(0, -2).bool() & torch.isfinite(teacher)
    if confidence is None:
        conf = torch.ones_like(pred)
        zero = pred.sum() * 0
    else:
        conf = _fp32(confidence).flatten(-2).flatten(0, -2).to(pred.dtype)
        zero = pred.sum() * 0 + conf.sum() * 0

    # Views with too few valid pixels are masked out rather than indexed away: no host sync
    # (the training step reads the device once per step). They are normalised with uniform
    # weights over their own prediction, which keeps them finite, and then contribute nothing.
    keep = (mask.sum(-1) >= min_valid)[:, None]  # [B*V, 1]
    mask = mask & keep

    pred = in_teacher_space(pred, _per_view(disparity, pred_depth.shape[1]))
    # Invalid pixels: weight 0 and a neutral finite value, so NaN/inf labels cannot leak in.
    weights = torch.where(mask, conf.detach(), torch.where(keep, 0.0, 1.0).to(conf.dtype))
    pred = torch.where(mask | ~keep, pred, torch.zeros_like(pred))
    teacher = torch.where(mask, teacher, torch.zeros_like(teacher))
    residual = (median_mad_normalize(pred, weights, eps=eps) - median_mad_normalize(teacher, weights, eps=eps)).abs()

    if confidence is None:
        per_pixel = residual
    else:
        # W < 1e-6 is silenced already; the clamp only keeps log finite.
        per_pixel = conf * residual - alpha * conf.clamp(min=1e-6).log()
    per_pixel = torch.where(mask, per_pixel, torch.zeros_like(per_pixel))
    return per_pixel.sum() / mask.sum().clamp(min=1) + zero


def teacher_aligned_depth(
    pred_depth: Tensor,
    teacher_depth: Tensor,
    valid: Tensor,
    *,
    teacher_space: TeacherSpace = "depth",
    min_valid: int = 16,
) -> Tensor:
    """The teacher's map carried into the prediction's per-view scale and shift, [B, V, H, W].

    Per view, ``(a, b) = argmin sum_valid (a T + b − P)²`` in closed form, with P = D̂
    (``teacher_space="depth"``) or P = 1 / D̂ (``"disparity"``: affine in the teacher's own
    space), and the result is ``a T + b`` (or its inverse) at the valid pixels: the teacher's
    *shape* with the prediction's per-view *scale and shift*. ``a`` and ``b`` are differentiable
    functions of D̂ (the teacher is a label), so a loss on the result moves exactly the two
    numbers per view that :func:`relative_depth_loss` cannot see.

    Why: the match terms (:func:`reprojection_loss`, :func:`point_consistency_loss`) pull the
    poses towards agreement with the depth they are given. Fed the learner's own depth, whose
    per-pixel errors early in training are ~10 %, their optimum has translation directions tens
    of degrees off (docs/RESULTS.md, CPU checks); fed this map, the per-pixel shape is the
    teacher's and only the per-view scale and shift, and the poses, are left to the matches.
    Measured (docs/RESULTS.md, sweep 6): it helped pose fitting on CPU training windows but not
    on held-out windows (translation 79° against 73° with the learner's own depth), so the
    match terms no longer use it; the self-refinement does, with ``loss.refine.depth: teacher``.

    Pixels that are not valid, and views with fewer than ``min_valid`` valid pixels, a
    non-positive slope ``a`` (shape anti-correlated, e.g. at initialisation) or a non-positive
    result keep D̂. Shapes: all [B, V, H, W]; ``valid`` bool; ``teacher_space`` as
    :data:`TeacherSpace` (per window: a bool [B]). No host synchronisation.
    """
    disparity = teacher_disparity(teacher_space, pred_depth.shape[0])
    if isinstance(disparity, Tensor):
        disparity = disparity.view(-1, 1, 1, 1)
    if pred_depth.shape != teacher_depth.shape or pred_depth.shape != valid.shape:
        raise ValueError(f"shape mismatch: pred {tuple(pred_depth.shape)}, teacher "
                         f"{tuple(teacher_depth.shape)}, valid {tuple(valid.shape)}")
    depth = _fp32(pred_depth)
    tiny = torch.finfo(depth.dtype).tiny
    teacher = _fp32(teacher_depth).to(depth.dtype)
    mask = valid.bool() & torch.isfinite(teacher) & (teacher > 0)
    teacher = torch.where(mask, teacher, torch.zeros_like(teacher))
    pred = in_teacher_space(depth, disparity)
    m = mask.to(depth.dtype)
    count = m.sum((-2, -1), keepdim=True)
    n = count.clamp(min=1)
    mean_t = (m * teacher).sum((-2, -1), keepdim=True) / n
    mean_p = (m * pred).sum((-2, -1), keepdim=True) / n
    dt = torch.where(mask, teacher - mean_t, torch.zeros_like(teacher))
    var = (dt * dt).sum((-2, -1), keepdim=True) / n
    cov = (dt * (pred - mean_p)).sum((-2, -1), keepdim=True) / n
    # A flat teacher view (var ~ 0 relative to its mean) has no shape to lend.
    usable = (count >= min_valid) & (var > (1e-6 * mean_t) ** 2)
    a = cov / torch.where(usable, var, torch.ones_like(var))
    b = mean_p - a * mean_t
    aligned = a * teacher + b
    use = mask & usable & (a > 0) & (aligned > 0)
    aligned = in_teacher_space(aligned.clamp(min=tiny), disparity)
    return torch.where(use, aligned, depth)


def shape_damped(depth: Tensor, keep: float) -> Tensor:
    """``depth`` itself, with the share of its gradient that would change each view's shape
    (anything but its scale and shift) multiplied by ``keep``: [B, V, H, W] -> the same values
    (fp32).

    Per view, the incoming gradient g is split into its orthogonal projection P g onto
    span{D̂ − mean D̂, 1} (the directions that scale and shift the view's depth, its shape kept)
    and the rest (the directions that change the shape); the first passes whole, the rest times
    ``keep``: ``∂/∂D̂ = P g + keep (I − P) g``. ``keep = 1`` is the identity, ``keep = 0`` lets a loss
    move only the view's scale and shift. Values are returned exactly.

    Why: the match terms (:mod:`learner.losses.matches`, :mod:`learner.losses.triangulation`)
    are there for what the relative-depth loss leaves open, each view's scale and shift and so
    the registration of the views. Their per-pixel pull at sparse, noisy matches also bends the
    shape: on 7-Scenes with a near-perfect teacher the learner's per-frame AbsRel is 0.087 with
    the depth term alone and 0.135 with the match terms beside it (docs/RESULTS.md, issue 21).
    """
    d = _fp32(depth)
    if keep == 1.0:
        return d
    if not 0.0 <= keep <= 1.0:
        raise ValueError(f"keep must be in [0, 1], got {keep}")
    flat = d.flatten(-2)  # [B, V, N]
    ref = flat.detach()
    centred = ref - ref.mean(-1, keepdim=True)
    norm2 = (centred * centred).sum(-1, keepdim=True).clamp(min=torch.finfo(d.dtype).tiny)
    # Coordinates of D̂ along the two (orthogonal) directions: linear in D̂, so their Jacobian
    # is the projector P; forward they reproduce D̂ (up to rounding, which the deltas drop).
    affine = (flat * centred).sum(-1, keepdim=True) / norm2 * centred + flat.mean(-1, keepdim=True)
    out = ref + keep * (flat - ref) + (1.0 - keep) * (affine - affine.detach())
    return out.view_as(d)


def gradient_share(x: Tensor, keep: float) -> Tensor:
    """``x`` itself (fp32) with the gradient that reaches it multiplied by ``keep`` in [0, 1].

    For a model that predicts each view's depth scale and shift apart from its shape
    (``learner.model.scale_head``): the objective gives the match terms the view's depth
    composed from ``gradient_share(shape, keep)``, so that they move its scale and shift whole
    and bend its shape at the share ``keep``, as :func:`shape_damped` does for a model whose
    depth carries its own scale and shift.
    """
    if not 0.0 <= keep <= 1.0:
        raise ValueError(f"keep must be in [0, 1], got {keep}")
    x = _fp32(x)
    if keep == 1.0:
        return x
    ref = x.detach()
    return ref + keep * (x - ref)
