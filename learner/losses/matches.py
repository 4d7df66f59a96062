"""The match terms: the trigonometric reprojection loss (Reliev3R) and triangulation
consistency, with their shared per-match geometry (the depth-free epipolar loss, which no
objective uses, is ``studies.epipolar``).

What makes registration observable
----------------------------------
For a match (u_i, u_j) the angle at camera i is taken between ``a = p_ik − t_i`` and
``b = p_jk − t_i``. Because ``a = D̂_i(u_i) R_i K_i⁻¹ ũ_i``, its direction does not depend on
view i's depth at all (for D̂ > 0): the term at camera i only moves the rotation R_i, and,
through ``b = D̂_j(u_j) R_j K_j⁻¹ ũ_j + (t_j − t_i)``, view j's depth at u_j, the rotation
R_j and the relative translation ``t_j − t_i``. The symmetric term at camera j does the same
for D̂_i(u_i). Hence:

* D̂_j and ``t_j − t_i`` enter only through their ratio's geometry: scaling all depths and
  all translations together changes nothing (the global scale gauge), but scaling the depth
  of *one* view (a per-frame scale error, which the depth loss cannot see) bends b away from
  a and is penalised -- provided ``t_j − t_i`` is not zero. With a pure rotation
  (``t_j = t_i``) b is parallel to a for every depth: neither per-view depth scale nor
  translation is observable. Windows need parallax.
* The gradient with respect to translation is perpendicular to b and scales as
  ``sin∠ / |b|``: far points (large D̂_j) give small gradients, near points large ones, and
  matches whose baseline is small compared with depth carry little translation signal. This
  is the weak spot the design note measured: the per-frame shape is learnt from the dense
  depth loss while scale/shift per view and translation come only from the sparse angle
  terms, whose signal is proportional to parallax.
* Per-view depth *shift* (D̂ + c) is invisible to the depth loss too and is observable in
  the angle loss for the same reason as scale, again only with parallax.

The loss values behind these statements (one view perturbed on the test world of
``tests/test_losses.py``) are in docs/RESULTS.md, "Sensitivity of the angle terms".
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from learner.config import LossConfig
from learner.losses.depth import _fp32
from reliev3r import geometry

Robust = Literal["none", "cauchy", "geman_mcclure", "pseudo_huber"]
_TERMS = LossConfig()
"""Where the keyword defaults below come from (``learner.loss``): one default per setting."""


def robust_angle_cost(one_minus_cos: Tensor, *, robust: Robust, scale_deg: float) -> Tensor:
    """ρ(ℓ) for ℓ = 1 − cos θ in [0, 2], elementwise.

    * ``none``: ρ = ℓ (≈ θ²/2; its slope in θ is sin θ, so a 90° outlier pulls harder than
      any inlier).
    * ``cauchy`` (default): ρ = c log(1 + ℓ / c), c = 1 − cos(scale_deg). Equals ℓ for small
      angles; the influence dρ/dθ = c sin θ / (c + ℓ) is at most ≈ scale_deg/2 (radians),
      reached near θ = scale_deg, and never returns to 0, so early in training, when every
      match is "wrong", the loss still gives a direction.
    * ``geman_mcclure``: ρ = c ℓ / (c + ℓ). Redescending (outliers' influence → 0); best
      once the model is roughly registered, risky from scratch.
    * ``pseudo_huber``: ρ = δ² (sqrt(1 + 2ℓ/δ²) − 1), δ = 2 sin(scale_deg / 2) (the chord of
      scale_deg). ≈ ℓ below scale_deg and ≈ δ · chord (∝ θ) above it: the influence stays at
      its maximum for large angles instead of falling, the least robust of the four.
    """
    if scale_deg <= 0:
        raise ValueError(f"scale_deg must be > 0, got {scale_deg}")
    c = 1.0 - math.cos(math.radians(scale_deg))
    if robust == "none":
        return one_minus_cos
    if robust == "cauchy":
        return c * torch.log1p(one_minus_cos / c)
    if robust == "geman_mcclure":
        return c * one_minus_cos / (c + one_minus_cos)
    if robust == "pseudo_huber":
        delta = 2 * math.sin(math.radians(scale_deg) / 2)
        return delta ** 2 * (torch.sqrt(1 + 2 * one_minus_cos / delta ** 2) - 1)
    raise ValueError(f"robust must be 'none', 'cauchy', 'geman_mcclure' or 'pseudo_huber', got {robust!r}")


def _unit(x: Tensor, floor: Tensor | float) -> Tensor:
    """x / |x| with |x| smoothed by ``floor`` (finite value and gradient at x = 0)."""
    return x / ((x * x).sum(-1, keepdim=True) + floor * floor).sqrt()


def _half_sq_chord(a: Tensor, b: Tensor) -> Tensor:
    """1 − cos∠(a, b) for unit vectors, as |a − b|² / 2: exact, and it keeps precision at
    small angles where 1 − a·b cancels."""
    d = a - b
    return 0.5 * (d * d).sum(-1)


def reprojection_loss(
    depth: Tensor,
    cam_to_world: Tensor,
    intrinsics: Tensor,
    matches: Tensor,
    weights: Tensor | None = None,
    *,
    robust: Robust = _TERMS.robust,
    scale_deg: float = _TERMS.scale_deg,
    eps: float = 1e-6,
) -> Tensor:
    """Trigonometry-based reprojection loss (Reliev3R), a scalar.

    For match k between views i and j, both pixels are back-projected with the predicted depth
    and pose to world points p_ik, p_jk; with t_i, t_j the camera centres,
    ``ℓ_k = ρ(1 − cos∠(p_ik − t_i, p_jk − t_i)) + ρ(1 − cos∠(p_jk − t_j, p_ik − t_j))``
    (ρ: :func:`robust_angle_cost`); the loss is ``sum_k w_k ℓ_k / sum_k w_k``.

    Args:
        depth: [B, V, H, W] predicted z-depth (> 0), sampled bilinearly at the match pixels
            with :func:`reliev3r.geometry.sample_bilinear` (border values outside).
        cam_to_world: [B, V, 4, 4] predicted poses (rigid).
        intrinsics: [B, V, 3, 3] in pixels of ``depth``.
        matches: [K, 7] rows (b, i, j, x_i, y_i, x_j, y_j), pixel centres at integers.
        weights: [K] match scores >= 0, or None for 1.
        robust: ρ, see :func:`robust_angle_cost`.
        scale_deg: angle scale of ρ.
        eps: relative floor of vector norms (finite gradients for degenerate points).

    Angles stay defined when a point falls behind a camera (ℓ ≤ 2 per direction) and are not
    dominated by far points. K = 0 (or all weights 0) gives a graph-connected zero.
    """
    prepared = _match_inputs(depth, cam_to_world, intrinsics, matches, weights)
    if isinstance(prepared, Tensor):
        return prepared  # no matches: a graph-connected zero
    depth, cam_to_world, intrinsics, matches, weights, zero = prepared
    geom = _match_geometry(depth, cam_to_world, intrinsics, matches)
    return _weighted_mean(_angle_costs(*geom, robust=robust, scale_deg=scale_deg, eps=eps), weights, zero)


def _angle_costs(dir_i: Tensor, dir_j: Tensor, d_i: Tensor, d_j: Tensor, baseline: Tensor, *,
                 robust: Robust, scale_deg: float, eps: float) -> Tensor:
    """Per-match ℓ_k [K] of :func:`reprojection_loss` from :func:`_match_geometry`'s output."""
    off_i = d_i[:, None] * dir_i  # p_ik − t_i
    off_j = d_j[:, None] * dir_j  # p_jk − t_j
    to_j_from_i = baseline + off_j  # p_jk − t_i
    to_i_from_j = off_i - baseline  # p_ik − t_j
    # Norm floors relative to the point's own depth keep the loss exactly scale-invariant.
    floor_i = eps * off_j.detach().norm(dim=-1, keepdim=True)
    floor_j = eps * off_i.detach().norm(dim=-1, keepdim=True)
    # Direction of p_ik − t_i, taken as that of the ray: D̂ > 0 does not change it.
    cost_i = _half_sq_chord(_unit(dir_i, 0.0), _unit(to_j_from_i, floor_i))
    cost_j = _half_sq_chord(_unit(dir_j, 0.0), _unit(to_i_from_j, floor_j))
    return robust_angle_cost(cost_i, robust=robust, scale_deg=scale_deg) + \
        robust_angle_cost(cost_j, robust=robust, scale_deg=scale_deg)


def _match_inputs(depth: Tensor, cam_to_world: Tensor, intrinsics: Tensor, matches: Tensor,
                  weights: Tensor | None) -> Tensor | tuple[Tensor, ...]:
    """The match losses' common preamble: fp32 inputs, checked matches [K, 7], non-negative
    weights (ones by default) and a zero connected to the graph. Returns that zero alone
    when there are no matches, else (depth, cam_to_world, intrinsics, matches, weights, zero)."""
    depth = _fp32(depth)
    cam_to_world = _fp32(cam_to_world).to(depth.dtype)
    intrinsics = _fp32(intrinsics).to(depth.dtype)
    zero = depth.sum() * 0 + cam_to_world.sum() * 0
    if matches.ndim != 2 or matches.shape[-1] != 7:
        raise ValueError(f"matches must be [K, 7], got {tuple(matches.shape)}")
    k = matches.shape[0]
    if k == 0:
        return zero
    if weights is None:
        weights = torch.ones(k, dtype=depth.dtype, device=depth.device)
    return depth, cam_to_world, intrinsics, matches.to(depth.dtype), weights.to(depth.dtype).clamp(min=0), zero


def _weighted_mean(per_match: Tensor, weights: Tensor, zero: Tensor) -> Tensor:
    """sum_k w_k x_k / sum_k w_k; all weights 0 gives a graph-connected zero (without a host
    sync: the per-match terms are finite, so 0 / tiny is 0)."""
    total = weights.sum().clamp(min=torch.finfo(weights.dtype).tiny)
    return (weights * per_match).sum() / total + zero


def _match_geometry(depth: Tensor, cam_to_world: Tensor, intrinsics: Tensor, matches: Tensor
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dir_i, dir_j [K, 3], d_i, d_j [K], t_j − t_i [K, 3]) of matches [K, 7]: the
    world-frame ray R K⁻¹ũ of each pixel and its bilinearly sampled depth, so that
    p_ik − t_i = d_i dir_i. Computed from the rotated ray, not as a difference of world
    points, so that large camera translations do not cancel away precision."""
    d_i, d_j = _match_depths(depth, matches)
    dir_i, dir_j, baseline = _world_rays(cam_to_world[..., :3, :3], cam_to_world[..., :3, 3],
                                         *_camera_rays(intrinsics, matches), matches)
    return dir_i, dir_j, d_i, d_j, baseline


def _match_depths(depth: Tensor, matches: Tensor) -> tuple[Tensor, Tensor]:
    """Bilinear depth [K] of each match's pixel in view i and in view j."""
    b_, v_, h, w = depth.shape
    k = matches.shape[0]
    b, i, j = matches[:, 0].long(), matches[:, 1].long(), matches[:, 2].long()
    # Sample every match pixel in every map, then keep its own view: O(K·B·V) samples, but
    # one grid_sample call with the project's single bilinear convention.
    maps = depth.reshape(b_ * v_, h, w)
    samples = geometry.sample_bilinear(maps, torch.cat((matches[:, 3:5], matches[:, 5:7]), 0).expand(b_ * v_, 2 * k, 2))
    d = samples.gather(0, torch.cat((b * v_ + i, b * v_ + j))[None]).squeeze(0)
    return d[:k], d[k:]


def _camera_rays(intrinsics: Tensor, matches: Tensor) -> tuple[Tensor, Tensor]:
    """Camera-frame rays K⁻¹ũ [K, 3] (z = 1) of each match's pixel in view i and in view j."""
    b, i, j = matches[:, 0].long(), matches[:, 1].long(), matches[:, 2].long()
    one = torch.ones_like(matches[:, :1])
    rays_i = geometry.unproject_points(matches[:, None, 3:5], one, intrinsics[b, i])[:, 0]
    rays_j = geometry.unproject_points(matches[:, None, 5:7], one, intrinsics[b, j])[:, 0]
    return rays_i, rays_j


def _world_rays(rotation: Tensor, translation: Tensor, rays_i: Tensor, rays_j: Tensor, matches: Tensor
                ) -> tuple[Tensor, Tensor, Tensor]:
    """(R_i K⁻¹ũ_i, R_j K⁻¹ũ_j [K, 3], t_j − t_i [K, 3]) of camera-frame rays, for
    cam-to-world rotations [B, V, 3, 3] and translations [B, V, 3]."""
    b, i, j = matches[:, 0].long(), matches[:, 1].long(), matches[:, 2].long()
    dir_i = (rotation[b, i] @ rays_i[..., None])[..., 0]
    dir_j = (rotation[b, j] @ rays_j[..., None])[..., 0]
    return dir_i, dir_j, translation[b, j] - translation[b, i]


def point_consistency_loss(
    depth: Tensor,
    cam_to_world: Tensor,
    intrinsics: Tensor,
    matches: Tensor,
    weights: Tensor | None = None,
    *,
    scale: float = 0.05,
    eps: float = 1e-6,
) -> Tensor:
    """Triangulation consistency: the two back-projections of a match must meet, a scalar.

    ``r_k = |p_ik − p_jk| / (|p_ik − t_i| + |p_jk − t_j|)`` (the gap between the two points
    relative to their distances from their cameras), ``ρ(r) = scale · log(1 + r / scale)``
    (Cauchy-like: ≈ r for small gaps, logarithmic for outliers), and the loss is
    ``sum_k w_k ρ(r_k) / sum_k w_k``. Shapes and conventions as in :func:`reprojection_loss`.

    Why beside the angle loss: the angle at camera i sees a per-view depth scale error ε of
    view j only through the parallax, with a cost ∝ (ε · baseline / depth)² (see the module
    docstring), whereas the gap here is ≈ ε / 2 at any baseline, and ≈ |δt| / (2 depth) for a
    translation error δt. It is zero for perfect geometry, invariant to a similarity of the
    whole window (a ratio of distances), bounded per match (r ≤ 1 + |t_j − t_i| / depth,
    then compressed by ρ), and finite when a point falls behind a camera. With pure rotation
    it still ties the depths of both views together (same ray origin), unlike the angles.
    """
    if scale <= 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    prepared = _match_inputs(depth, cam_to_world, intrinsics, matches, weights)
    if isinstance(prepared, Tensor):
        return prepared  # no matches: a graph-connected zero
    depth, cam_to_world, intrinsics, matches, weights, zero = prepared
    geom = _match_geometry(depth, cam_to_world, intrinsics, matches)
    return _weighted_mean(_point_costs(*geom, scale=scale, eps=eps), weights, zero)


def _point_costs(dir_i: Tensor, dir_j: Tensor, d_i: Tensor, d_j: Tensor, baseline: Tensor, *,
                 scale: float, eps: float) -> Tensor:
    """Per-match ρ(r_k) [K] of :func:`point_consistency_loss` from :func:`_match_geometry`'s output."""
    off_i, off_j = d_i[:, None] * dir_i, d_j[:, None] * dir_j  # p_ik − t_i, p_jk − t_j
    gap = baseline + off_j - off_i  # p_jk − p_ik
    reach = (off_i.norm(dim=-1) + off_j.norm(dim=-1)).clamp(min=torch.finfo(d_i.dtype).tiny)
    floor = eps * reach.detach()
    r = ((gap * gap).sum(-1) + floor * floor).sqrt() / reach - eps * reach.detach() / reach
    return scale * torch.log1p(r.clamp(min=0) / scale)
