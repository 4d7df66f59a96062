"""Self-refinement: a bundle adjustment of each window's poses and per-view depth scales (and
shifts) under the match terms, from the prediction (:func:`refine_geometry`, an optimiser, not a
loss), and the pull of the prediction towards its result (:func:`refined_geometry_loss`).
The objective adds it when ``learner.loss.refine`` (``learner.config.RefineConfig``) is set.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from learner.config import LossConfig, RefineConfig
from learner.losses.depth import _fp32
from learner.losses.matches import (Robust, _angle_costs, _camera_rays, _match_depths, _match_inputs, _point_costs,
                                    _unit, _world_rays, robust_angle_cost)
from learner.losses.supervised import _relative_pose_errors
from reliev3r import geometry


_REFINE, _TERMS = RefineConfig(), LossConfig()
"""Where :func:`refine_geometry`'s keyword defaults come from: ``learner.loss.refine`` and the
match terms of ``learner.loss`` (one default per setting, the config's)."""


def refine_geometry(
    depth: Tensor,
    cam_to_world: Tensor,
    intrinsics: Tensor,
    matches: Tensor,
    weights: Tensor | None = None,
    *,
    steps: int = _REFINE.steps,
    lr: float = _REFINE.lr,
    reproj_weight: float = _TERMS.reproj_weight,
    point_weight: float = _TERMS.point_weight,
    robust: Robust = _TERMS.robust,
    scale_deg: float = _TERMS.scale_deg,
    compiled: bool,
    solver: Literal["adam", "lm"] = _REFINE.solver,
    scales: bool = _REFINE.scales,
    shifts: bool = _REFINE.shifts,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-window bundle adjustment under the weak match terms: the poses and per-view depth
    scales (and shifts) that minimise ``reproj_weight · L_reproj + point_weight · L_point``
    with the depth's *shape* held fixed, searched from ``cam_to_world``, scale 1 and shift 0.
    The settings default to ``RefineConfig``'s and ``LossConfig``'s (the objective passes the
    run's); ``compiled`` has no default: the objective passes ``RefineConfig.compile``, a caller
    on the CPU or in a test says ``compiled=False``.

    The variables per view are a rotation increment (axis-angle, applied on the left), a
    translation increment in units of the window's mean depth, a log depth scale σ and a depth
    shift c in units of the view's mean depth m: view v's depth becomes exp(σ_v)(D_v + c_v m_v).
    ``solver``:

    * ``adam``: ``steps`` Adam steps, step size ``lr`` decaying linearly to 0. The
      per-coordinate step makes the search independent of how small the loss's gradient is,
      and also moves directions the matches hardly constrain by about as much as the others.
    * ``lm``: ``steps`` Levenberg-Marquardt iterations (``lr`` unused), a damped Gauss-Newton
      system of 7V unknowns per window with the robust functions as IRLS weights; a step that
      does not lower the window's exact cost is refused. It follows the curvature: directions
      the matches hardly constrain move little. From a 10° / 37° start with exact matches it
      is exact after 3 iterations, where 50 Adam steps leave 0.5° / 2°.
    Nothing here sees ground truth: the result is a target built from the matches and the
    model's own depth (see :func:`refined_geometry_loss`).

    Args:
        depth: [B, V, H, W] > 0, cam_to_world: [B, V, 4, 4], intrinsics, matches [K, 7],
            weights [K]: as in :func:`reprojection_loss`.
        compiled: run each Adam step (match terms, gradient, update) as one ``torch.compile``
            graph (for GPUs, where the eager search is launch-bound; same values).
        scales: search the per-view depth scales too (else they stay 1: poses only).
        shifts: search the per-view depth shifts too (else they stay 0; ``adam`` only). A
            depth map's per-view shift is what a relative-depth teacher leaves open besides
            the scale.

    Returns:
        ``(cam_to_world [B, V, 4, 4], log_scale [B, V], shift [B, V])``, detached, fp32 (or
        fp64 for fp64 inputs). A window without matches keeps its poses, scale and shift 0.
    """
    if steps < 0 or lr <= 0:
        raise ValueError(f"steps must be >= 0 and lr > 0, got {steps}, {lr}")
    if solver not in ("adam", "lm"):
        raise ValueError(f"solver must be 'adam' or 'lm', got {solver!r}")
    if shifts and solver != "adam":
        raise ValueError("searching depth shifts needs solver 'adam' (the LM system has 7 unknowns per view)")
    prepared = _match_inputs(depth.detach(), cam_to_world.detach(), intrinsics, matches, weights)
    pose0 = _fp32(cam_to_world.detach()).to(_fp32(depth).dtype)
    b, v = depth.shape[:2]
    log_scale = torch.zeros(b, v, dtype=pose0.dtype, device=pose0.device)
    if isinstance(prepared, Tensor) or steps == 0:
        return pose0.clone(), log_scale, torch.zeros_like(log_scale)
    depth, pose0, intrinsics, matches, weights, _ = prepared
    # Everything but the variables is fixed during the search: sample and unproject once.
    fixed = (pose0[..., :3, :3], pose0[..., :3, 3], depth.flatten(1).mean(1)[:, None, None], depth.flatten(2).mean(2),
             *_camera_rays(intrinsics, matches), *_match_depths(depth, matches), matches, weights)
    if solver == "lm":
        with torch.no_grad():
            omega, delta, log_scale = _refine_lm(fixed, b, v, steps, reproj_weight=reproj_weight,
                                                 point_weight=point_weight, robust=robust, scale_deg=scale_deg,
                                                 scales=scales)
            return geometry.make_pose(*_refined_pose(omega, delta, *fixed[:3])), log_scale, torch.zeros_like(log_scale)
    x = torch.zeros(b, v, 8, dtype=pose0.dtype, device=pose0.device)  # (ω, δ, log scale, shift) per view
    moment, second = torch.zeros_like(x), torch.zeros_like(x)
    movable = torch.ones(8, dtype=x.dtype, device=x.device)
    # A fixed variable gets zero gradient, so Adam's step for it is exactly 0.
    movable[6] = float(scales)
    movable[7] = float(shifts)
    # Step numbers and step sizes as tensors made once: the compiled step sees no new constant.
    counts = torch.arange(1, steps + 1, dtype=x.dtype, device=x.device)
    # Linear decay to 0: Adam's normalised steps would otherwise jitter at ~lr around the
    # optimum (gradient noise is amplified to full-size steps there).
    sizes = lr * (1 - (counts - 1) / steps)
    step_fn = _compiled_adam_step() if compiled else _refine_adam_step
    for k in range(steps):
        x, moment, second = step_fn(x, moment, second, counts[k], sizes[k], movable, *fixed,
                                    reproj_weight=reproj_weight, point_weight=point_weight, robust=robust,
                                    scale_deg=scale_deg)
    with torch.no_grad():
        rotation, translation = _refined_pose(x[..., :3], x[..., 3:6], *fixed[:3])
        return geometry.make_pose(rotation, translation), x[..., 6], x[..., 7]


def _refine_adam_step(x: Tensor, moment: Tensor, second: Tensor, count: Tensor, size: Tensor, movable: Tensor,
                      *fixed: Tensor, reproj_weight: float, point_weight: float, robust: Robust, scale_deg: float
                      ) -> tuple[Tensor, Tensor, Tensor]:
    """One Adam step (``torch.optim.Adam``'s update, betas 0.9 / 0.999, eps 1e-8) on
    :func:`refine_geometry`'s variables x [B, V, 8] = (ω, δ, log scale, shift): the gradient of the
    match terms by ``torch.func.grad``, so that under ``torch.compile`` the whole step (match
    terms, their gradient and the update) is one graph. ``count`` is the step number from 1,
    ``size`` its step size, ``movable`` [8] zeroes the gradient of fixed variables."""
    from torch.func import grad

    def objective(x: Tensor) -> Tensor:
        return _refine_objective(x[..., :3], x[..., 3:6], x[..., 6], x[..., 7], *fixed, reproj_weight=reproj_weight,
                                 point_weight=point_weight, robust=robust, scale_deg=scale_deg)

    g = grad(objective)(x) * movable
    moment = 0.9 * moment + 0.1 * g
    second = 0.999 * second + 0.001 * g * g
    denom = (second / (1 - 0.999 ** count)).sqrt() + 1e-8
    return x - size / (1 - 0.9 ** count) * moment / denom, moment, second


def _refined_pose(omega: Tensor, delta: Tensor, rotation0: Tensor, translation0: Tensor, unit: Tensor
                  ) -> tuple[Tensor, Tensor]:
    """Rotations exp(ω) R0 and translations t0 + δ · unit of :func:`refine_geometry`'s variables."""
    return geometry.axis_angle_to_matrix(omega) @ rotation0, translation0 + delta * unit


def _refine_objective(omega: Tensor, delta: Tensor, log_scale: Tensor, shift: Tensor, *fixed: Tensor,
                      reproj_weight: float, point_weight: float, robust: Robust, scale_deg: float) -> Tensor:
    """The weak match terms of :func:`refine_geometry`'s variables (a scalar)."""
    weights = fixed[-1]
    per_match = _refine_match_costs(omega, delta, log_scale, shift, *fixed, reproj_weight=reproj_weight,
                                    point_weight=point_weight, robust=robust, scale_deg=scale_deg)
    return per_match.sum() / weights.sum().clamp(min=torch.finfo(weights.dtype).tiny)


def _refine_match_costs(omega: Tensor, delta: Tensor, log_scale: Tensor, shift: Tensor, rotation0: Tensor,
                        translation0: Tensor, unit: Tensor, view_mean: Tensor, rays_i: Tensor, rays_j: Tensor,
                        d_i: Tensor, d_j: Tensor, matches: Tensor, weights: Tensor, *, reproj_weight: float,
                        point_weight: float, robust: Robust, scale_deg: float) -> Tensor:
    """w_k x (match k's weak cost) [K] at :func:`refine_geometry`'s variables."""
    bi, i, j = matches[:, 0].long(), matches[:, 1].long(), matches[:, 2].long()
    dir_i, dir_j, baseline = _world_rays(*_refined_pose(omega, delta, rotation0, translation0, unit),
                                         rays_i, rays_j, matches)
    scale, offset = log_scale.exp(), shift * view_mean
    d_i = scale[bi, i] * (d_i + offset[bi, i])
    d_j = scale[bi, j] * (d_j + offset[bi, j])
    cost = reproj_weight * _angle_costs(dir_i, dir_j, d_i, d_j, baseline, robust=robust, scale_deg=scale_deg, eps=1e-6)
    if point_weight > 0:
        cost = cost + point_weight * _point_costs(dir_i, dir_j, d_i, d_j, baseline, scale=0.05, eps=1e-6)
    return weights * cost


def _refine_lm(fixed: tuple[Tensor, ...], b: int, v: int, iterations: int, *, reproj_weight: float,
               point_weight: float, robust: Robust, scale_deg: float, scales: bool
               ) -> tuple[Tensor, Tensor, Tensor]:
    """Levenberg-Marquardt on :func:`refine_geometry`'s variables, one damped Gauss-Newton
    system of 7V unknowns per window; the robust functions enter as IRLS weights. Each window
    keeps its own damping, and a step that does not lower the window's exact cost is refused
    (the damping then grows). Returns (ω, δ, log scale)."""
    from torch.func import grad, jacrev, vmap

    rotation0, translation0, unit, _, rays_i, rays_j, d_i0, d_j0, matches, weights = fixed
    dtype, device = rotation0.dtype, rotation0.device
    bi, i, j = matches[:, 0].long(), matches[:, 1].long(), matches[:, 2].long()
    n = 7 * v
    share = weights / weights.sum().clamp(min=torch.finfo(dtype).tiny)  # m_k: the objective's weights

    def residuals(xi: Tensor, xj: Tensor, r0i, r0j, t0i, t0j, u, ray_i, ray_j, di, dj):
        # One match: r = ((a_i − b_i)/√2, (a_j − b_j)/√2, gap / reach) (the angle costs are
        # |r_1|², |r_2|²; the point term's r is |r_3|), from the two views' 7 variables.
        rot_i, rot_j = geometry.axis_angle_to_matrix(xi[:3]) @ r0i, geometry.axis_angle_to_matrix(xj[:3]) @ r0j
        base = (t0j + xj[3:6] * u) - (t0i + xi[3:6] * u)
        off_i, off_j = di * xi[6].exp() * (rot_i @ ray_i), dj * xj[6].exp() * (rot_j @ ray_j)
        a_i, a_j = _unit(off_i, 0.0), _unit(off_j, 0.0)
        b_i, b_j = _unit(base + off_j, 1e-6 * off_j.norm()), _unit(off_i - base, 1e-6 * off_i.norm())
        gap = (base + off_j - off_i) / (off_i.norm() + off_j.norm())
        r = torch.cat(((a_i - b_i) / math.sqrt(2), (a_j - b_j) / math.sqrt(2), gap))
        return r, r

    jac = vmap(jacrev(residuals, argnums=(0, 1), has_aux=True))
    x = torch.zeros(b, v, 7, dtype=dtype, device=device)
    damping = torch.full((b,), 1e-3, dtype=dtype, device=device)
    # Each match's 14 variables (view i's 7, view j's 7) as columns of its window's system.
    local = torch.arange(7, device=device)
    cols = torch.cat((i[:, None] * 7 + local, j[:, None] * 7 + local), 1)
    flat = (bi[:, None, None] * n * n + cols[:, :, None] * n + cols[:, None, :]).reshape(-1)

    def window_costs(x: Tensor) -> Tensor:
        per_match = _refine_match_costs(x[..., :3], x[..., 3:6], x[..., 6], torch.zeros_like(x[..., 6]), *fixed,
                                        reproj_weight=reproj_weight,
                                        point_weight=point_weight, robust=robust, scale_deg=scale_deg)
        return torch.zeros(b, dtype=dtype, device=device).index_add_(0, bi, per_match)

    cost = window_costs(x)
    for _ in range(iterations):
        (j_i, j_j), r = jac(x[bi, i], x[bi, j], rotation0[bi, i], rotation0[bi, j], translation0[bi, i],
                            translation0[bi, j], unit[bi, 0, 0], rays_i, rays_j, d_i0, d_j0)
        # IRLS: the robust cost's slope at the current residuals, as a weight per residual row.
        angle = torch.stack(((r[:, 0:3] ** 2).sum(-1), (r[:, 3:6] ** 2).sum(-1)), -1)
        slope = grad(lambda a: robust_angle_cost(a, robust=robust, scale_deg=scale_deg).sum())(angle)
        gap = (r[:, 6:9] ** 2).sum(-1).sqrt().clamp(min=1e-3)
        row = torch.cat((reproj_weight * 2 * slope.repeat_interleave(3, -1),
                         (point_weight / (gap * (1 + gap / 0.05)))[:, None].expand(-1, 3)), -1)
        sqrt_w = (share[:, None] * row).sqrt()  # [K, 9]
        jw = torch.cat((j_i, j_j), -1) * sqrt_w[..., None]  # [K, 9, 14]
        if not scales:  # no column for the log scales: their step is 0
            jw = jw * (torch.arange(14, device=device) % 7 != 6)
        rw = r * sqrt_w
        hess = torch.zeros(b * n * n, dtype=dtype, device=device).index_add_(
            0, flat, (jw.transpose(1, 2) @ jw).reshape(-1)).view(b, n, n)
        gradient = torch.zeros(b * n, dtype=dtype, device=device).index_add_(
            0, (bi[:, None] * n + cols).reshape(-1), (jw.transpose(1, 2) @ rw[..., None]).reshape(-1)).view(b, n)
        diag = hess.diagonal(dim1=-2, dim2=-1)
        floor = 1e-9 * diag.mean(-1, keepdim=True) + torch.finfo(dtype).tiny
        system = hess + torch.diag_embed(damping[:, None] * diag + floor)
        # The gauge (a similarity of the window) and views without matches leave the system
        # singular up to the damping; once the damping has shrunk, the factorisation can fail
        # in float32. Such a window's step is refused like one that does not lower the cost.
        solution, info = torch.linalg.solve_ex(system, gradient[..., None])
        solved = (info == 0) & torch.isfinite(solution).all(-1).all(-1)
        step = -torch.where(solved[:, None, None], solution, torch.zeros_like(solution))[..., 0].view(b, v, 7)
        trial = window_costs(x + step)
        better = solved & (trial < cost)
        x = torch.where(better[:, None, None], x + step, x)
        cost = torch.where(better, trial, cost)
        damping = torch.where(better, damping / 3, damping * 5).clamp(1e-9, 1e9)
    return x[..., :3], x[..., 3:6], x[..., 6]


_COMPILED: dict[str, object] = {}


def _compiled_adam_step():
    """:func:`_refine_adam_step` under ``torch.compile`` (symbolic match count): a few fused
    kernels per search step (match terms, gradient and update) instead of ~200 small ones, and
    one Python call (the eager search is launch-bound on a GPU)."""
    if "adam_step" not in _COMPILED:
        _COMPILED["adam_step"] = torch.compile(_refine_adam_step, dynamic=True)
    return _COMPILED["adam_step"]


def refined_geometry_loss(
    pred_depth: Tensor,
    pred_cam_to_world: Tensor,
    target_cam_to_world: Tensor,
    target_log_scale: Tensor,
    window_weight: Tensor | None = None,
) -> Tensor:
    """Pull the prediction towards a per-window bundle adjustment of itself
    (:func:`refine_geometry`), a scalar: the supervised sibling's pose term with the refined
    poses as the target, plus the registration of the per-view depth scales.

    Per window: ``_relative_pose_errors`` (relative rotations; relative translations in units
    of the mean depth, the prediction's own with gradient, the target's of the rescaled depth)
    + mean over views of |(log m_v − sg log m_v) − (σ_v − mean σ)|, with m_v the view's mean
    predicted depth and σ the target log scales (only differences across views count: the
    window's global scale is gauge). The loss is the ``window_weight``-weighted mean over
    windows (default 1 each; e.g. 0 for a window without matches).

    Args:
        pred_depth: [B, V, H, W] > 0. pred_cam_to_world, target_cam_to_world: [B, V, 4, 4].
        target_log_scale: [B, V]. window_weight: [B] >= 0 or None.

    Zero when the target is the prediction (σ = 0), invariant to a similarity of the
    predicted window (with the target moved alike), and it sends gradient to the poses and the
    depth (per-view scale and, through the translation unit, the window's mean).
    """
    depth = _fp32(pred_depth)
    pose = _fp32(pred_cam_to_world).to(depth.dtype)
    target = _fp32(target_cam_to_world).to(depth.dtype).detach()
    sigma = target_log_scale.detach().to(depth.dtype)
    b, v = depth.shape[:2]
    zero = depth.sum() * 0 + pose.sum() * 0
    if v < 2:
        return zero
    view_mean = depth.flatten(2).mean(-1).clamp(min=torch.finfo(depth.dtype).tiny)  # [B, V]
    s_pred = view_mean.mean(-1)
    s_target = (view_mean.detach() * sigma.exp()).mean(-1)
    per_window = _relative_pose_errors(pose, s_pred, target, s_target)
    log_m = view_mean.log()
    shift = (log_m - log_m.detach()) - (sigma - sigma.mean(-1, keepdim=True))
    per_window = per_window + ((shift * shift + 1e-12).sqrt() - 1e-6).mean(-1)
    weight = torch.ones(b, dtype=depth.dtype, device=depth.device) if window_weight is None else \
        window_weight.to(depth.dtype).clamp(min=0)
    return (weight * per_window).sum() / weight.sum().clamp(min=torch.finfo(depth.dtype).tiny) + zero
