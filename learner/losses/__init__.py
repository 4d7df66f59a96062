"""The Reliev3R losses, the terms this project adds to them, and the fully-supervised sibling:
pure functions of predictions, labels and masks, each returning a scalar. One module per kind
of label: :mod:`~learner.losses.depth` (teacher depth), :mod:`~learner.losses.matches`
(verified matches), :mod:`~learner.losses.triangulation` (their two-view triangulation) and
:mod:`~learner.losses.supervised` (ground truth). The self-refinement, an optimiser rather than a
loss, is :mod:`learner.refinement`; :mod:`learner.objective` weights and sums the terms.

Shapes: B windows, V views, H x W pixels, K matches. Conventions (axes, pixel centres at
integer coordinates, ``cam_to_world``) are those of :mod:`reliev3r.geometry`.

Gauge
-----
A window's prediction is defined only up to one similarity transform ``x -> s R x + t``
applied to every camera and point at once (depth scales by ``s``). Every loss here is
invariant to it:

* :func:`relative_depth_loss` normalises each view by its own weighted median and mean
  absolute deviation (Γ), so it is invariant to *any per-view* scale and shift of the
  prediction, and of the teacher (which only knows shape). That is more invariance than the
  gauge: the depth loss says nothing about how the views of a window fit together.
* :func:`reprojection_loss` and :func:`point_consistency_loss` compare directions and ratios
  of distances, which a similarity keeps.
* :func:`triangulated_depth_loss`, :func:`triangulated_pose_loss` and
  :func:`depth_contrast_loss` compare against the labeler's two-view triangulation with one
  free scale per pair (and per view), so a similarity changes nothing.
* :func:`supervised_loss` normalises scale by the window's mean depth and compares relative
  poses between every pair of views (permutation-equivariant, no reference view).
"""

from learner.losses.depth import (gradient_share, median_mad_normalize, relative_depth_loss, shape_damped,
                                  teacher_aligned_depth, weighted_median)
from learner.losses.matches import point_consistency_loss, reprojection_loss, robust_angle_cost
from learner.losses.supervised import supervised_loss
from learner.losses.triangulation import (depth_contrast_loss, registered_teacher_shift, triangulated_depth_loss,
                                          triangulated_pose_loss)

__all__ = [
    "weighted_median",
    "median_mad_normalize",
    "relative_depth_loss",
    "teacher_aligned_depth",
    "gradient_share",
    "shape_damped",
    "robust_angle_cost",
    "reprojection_loss",
    "point_consistency_loss",
    "triangulated_depth_loss",
    "triangulated_pose_loss",
    "registered_teacher_shift",
    "depth_contrast_loss",
    "supervised_loss",
]
