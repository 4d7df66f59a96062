"""The depth-free epipolar (coplanarity) loss: a match term the studies tried beside the
product's (``python -m studies.study_fit_check direct --epipolar-weight 1``) and that no
objective uses; it shares the match terms' per-match geometry of :mod:`learner.losses.matches`."""

from __future__ import annotations

import torch
from torch import Tensor

from learner.losses.matches import Robust, _match_geometry, _match_inputs, _unit, _weighted_mean, robust_angle_cost


def epipolar_loss(
    depth: Tensor,
    cam_to_world: Tensor,
    intrinsics: Tensor,
    matches: Tensor,
    weights: Tensor | None = None,
    *,
    robust: Robust = "cauchy",
    scale_deg: float = 2.0,
    eps: float = 1e-3,
) -> Tensor:
    """Depth-free epipolar (coplanarity) loss: the two rays of a match and the baseline must
    lie in one plane, a scalar.

    For match k between views i and j, with world-frame rays r_i = R_i K_i⁻¹ũ_i, r_j and the
    baseline b = t_j − t_i, the epipolar plane at camera i is spanned by b and r_i; θ_j is the
    angle between r_j and that plane (sin θ_j = |n_i · r̂_j|, n_i = unit(b × r_i)), θ_i the same
    with i and j swapped, and ``ℓ_k = ρ(1 − cos θ_i) + ρ(1 − cos θ_j)`` (ρ:
    :func:`learner.losses.robust_angle_cost`, default scale 2°: matching noise is ~1 px); the loss is
    ``sum_k w_k ℓ_k / sum_k w_k``. Shapes and conventions as in :func:`learner.losses.reprojection_loss`;
    ``depth`` only sets the scale of the baseline floor (below).

    Why beside the angle and point terms: both of those see the relative translation through
    the predicted depth, so that a depth error is partly explained by a translation error and
    the other way round; the translation direction of a pair is fixed by its matches alone
    (the essential matrix), and this term says so without depth. It depends on b only through
    b's direction, so it never rewards shrinking the baseline; a baseline shorter than
    ``eps`` x the window's mean depth is smoothly faded out (b -> 0 has no plane, and a
    direction that small would give unbounded gradients). Zero for perfect geometry,
    invariant to a similarity of the window, bounded per match, and finite for points
    behind the cameras (rays are lines here: cheirality is the other terms' business).

    Measured so far (``python -m studies.study_fit_check direct``, poses optimised directly on 24
    synthetic windows with corrupted depth, docs/RESULTS.md): weight 1 beside the angle and
    point terms changes the final translation direction error by less than 1°; weight 10
    makes it worse. So it is not part of :mod:`learner.objective` (ARCHITECTURE.md: an option
    without a measured gain lives in studies/).
    """
    prepared = _match_inputs(depth, cam_to_world, intrinsics, matches, weights)
    if isinstance(prepared, Tensor):
        return prepared  # no matches: a graph-connected zero
    depth, cam_to_world, intrinsics, matches, weights, zero = prepared
    dir_i, dir_j, _, _, baseline = _match_geometry(depth, cam_to_world, intrinsics, matches)
    floor = eps * depth.detach().flatten(1).mean(1)[matches[:, 0].long()][:, None]
    b = _unit(baseline, floor)  # |b| ≈ 1 above the floor, -> 0 below it
    ray_i, ray_j = _unit(dir_i, 0.0), _unit(dir_j, 0.0)
    # unit(b × r) with its norm floored at the rays' own scale: a match on the baseline
    # (epipole) has no plane either.
    n_i = _unit(torch.cross(b, ray_i, dim=-1), 1e-6)
    n_j = _unit(torch.cross(b, ray_j, dim=-1), 1e-6)
    sin_j, sin_i = (n_i * ray_j).sum(-1), (n_j * ray_i).sum(-1)
    # 1 − cos θ = sin²θ / (1 + cos θ), exact and without cancellation at small angles.
    cost_j = sin_j ** 2 / (1 + (1 - sin_j ** 2).clamp(min=0).sqrt())
    cost_i = sin_i ** 2 / (1 + (1 - sin_i ** 2).clamp(min=0).sqrt())
    per_match = robust_angle_cost(cost_i, robust=robust, scale_deg=scale_deg) + \
        robust_angle_cost(cost_j, robust=robust, scale_deg=scale_deg)
    return _weighted_mean(per_match, weights, zero)
