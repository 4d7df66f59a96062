"""Known-answer tests of the evaluation metrics: exact predictions, known similarity
transforms, known depth scale/shift, and hand-computed perturbations."""

import math

import numpy as np
import pytest
import torch

from evaluation import metrics
from reliev3r import geometry


def _trajectory(v=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rot = geometry.axis_angle_to_matrix(0.3 * torch.randn(v, 3, generator=gen, dtype=torch.float64))
    centres = torch.randn(v, 3, generator=gen, dtype=torch.float64)
    return geometry.make_pose(rot, centres)


def _similarity(pose, s, axis_angle, t):
    R = geometry.axis_angle_to_matrix(torch.tensor(axis_angle, dtype=torch.float64))
    out = pose.clone()
    out[:, :3, :3] = R @ pose[:, :3, :3]
    out[:, :3, 3] = s * pose[:, :3, 3] @ R.T + torch.tensor(t, dtype=torch.float64)
    return out


def test_depth_median_and_lsq_alignment():
    gt = torch.rand(3, 8, 10, dtype=torch.float64) + 1.0
    m = metrics.depth_metrics(2.5 * gt, gt)  # unknown scale: median scaling removes it
    assert m["absrel_med"] < 1e-12 and m["delta_med"] == 1.0
    m = metrics.depth_metrics(2.5 * gt + 0.7, gt)  # scale and shift: only lsq removes it
    assert m["absrel_med"] > 1e-3
    assert m["absrel_lsq"] < 1e-9 and m["delta_lsq"] == 1.0
    per_frame = torch.stack([gt[0] * 2 + 1, gt[1] * 0.5 - 0.2, gt[2] * 3])
    m = metrics.depth_metrics(per_frame, gt)
    assert m["absrel_lsq_frame"] < 1e-9 and m["absrel_lsq"] > 1e-3


def _compressed_shape(frames):
    """Ground truth 0.2..10 m over ``frames`` frames of 20x20 and a monotone prediction with
    the far range squashed (gt^0.25): its least-squares scale-and-shift puts the nearest
    pixels at depth <= 0."""
    gt = torch.linspace(0.2, 10.0, frames * 400).reshape(frames, 20, 20)
    return gt ** 0.25, gt


def test_depth_lsq_frame_of_one_frame_is_the_window_lsq():
    """With one frame the per-frame and the per-window least-squares fits are the same fit over
    the same pixels, so they score the same, pixels the fit puts at depth <= 0 included (each
    counted through absrel_delta's clamp as an AbsRel of about 1, not dropped). The fit is
    applied in float32 to terms up to about 20 m: a few ulp of it over depths from 0.2 m move
    the mean AbsRel by about 2e-6, so 1e-5 is allowed; delta within one pixel at 1.25."""
    pred, gt = _compressed_shape(1)
    a, b = metrics.scale_shift_lsq(pred.flatten(), gt.flatten())
    assert ((a * pred + b) <= 0).sum() > 0  # the case at stake
    m = metrics.depth_metrics(pred, gt)
    assert m["absrel_lsq_frame"] == pytest.approx(m["absrel_lsq"], abs=1e-5)
    assert m["delta_lsq_frame"] == pytest.approx(m["delta_lsq"], abs=1 / gt.numel())


def test_depth_lsq_frame_scores_a_model_as_the_teacher_baseline_does():
    """The model's ``*_lsq_frame`` and the depth teacher baseline's columns of the same name
    are one definition: the same depth map scored either way gives the same numbers. Both fit
    in float64 and apply the fit in float32 to terms up to about 30 m: a few ulp of it over
    depths from 0.2 m move the mean AbsRel by about 2e-6, so 1e-5 is allowed; delta within one
    pixel at the 1.25 boundary."""
    from evaluation.baselines import teacher_window_metrics

    pred, gt = _compressed_shape(2)
    for v in range(2):  # the case at stake: a frame whose fit goes to depth <= 0
        a, b = metrics.scale_shift_lsq(pred[v].flatten(), gt[v].flatten())
        if ((a * pred[v] + b) <= 0).any():
            break
    else:
        pytest.fail("no frame's fit reaches depth <= 0")
    model = metrics.depth_metrics(pred, gt)
    teacher = teacher_window_metrics(pred.numpy(), np.ones(gt.shape, bool), gt.numpy(), "depth")
    assert model["absrel_lsq_frame"] == pytest.approx(teacher["absrel_lsq_frame"], abs=1e-5)
    assert model["delta_lsq_frame"] == pytest.approx(teacher["delta_lsq_frame"], abs=1 / gt.numel())


def _with_invalid(gt, value):
    """``gt`` with a few pixels of two frames set to ``value``."""
    out = gt.clone()
    out[0, 0, :3] = value
    out[1, 2, 5] = value
    return out


def test_infinite_ground_truth_depth_is_invalid():
    """Ground truth +inf is no depth: it scores as 0 (invalid) does, in every mask, and a
    prediction exact up to scale stays exact (where +inf counted, AbsRel and the point map's
    alignment were NaN)."""
    v, h, w = 3, 6, 8
    gt = torch.rand(v, h, w, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) + 1
    inf, zero = _with_invalid(gt, math.inf), _with_invalid(gt, 0.0)
    pred = _with_invalid(2 * gt, 5.0)
    m = metrics.depth_metrics(pred, inf)
    # the same pixels and fits as with 0, so the same scores to float64 rounding
    assert m == pytest.approx(metrics.depth_metrics(pred, zero), rel=0, abs=1e-12)
    given = metrics.depth_metrics(pred, inf, torch.ones(v, h, w, dtype=torch.bool))  # a given mask too
    assert m == pytest.approx(given, rel=0, abs=1e-12)
    assert max(m["absrel_med"], m["absrel_lsq"], m["absrel_lsq_frame"]) < 1e-12
    assert m["delta_med"] == m["delta_lsq"] == m["delta_lsq_frame"] == 1.0
    pose = _trajectory(v)
    K = geometry.intrinsics_from_fov(60, w, h, dtype=torch.float64).expand(v, 3, 3)
    pred_pose = _similarity(pose, 2.0, [0.1, 0.2, 0.3], [1.0, 2.0, 3.0])
    pm = metrics.pointmap_metrics(pred, pred_pose, inf, pose, K)
    assert pm["accuracy"] < 1e-6 and pm["completeness"] < 1e-6  # cdist uses a matmul expansion


def test_infinite_ground_truth_depth_is_invalid_for_the_teacher_baseline():
    """The teacher baseline's masks (fit and coverage) treat +inf ground truth as 0 too."""
    from evaluation.baselines import teacher_window_metrics

    gt = torch.rand(2, 6, 8, generator=torch.Generator().manual_seed(0)) + 1
    teacher = (_with_invalid(3 * gt + 0.5, 5.0)).numpy()
    labelled = np.ones(gt.shape, bool)
    row = teacher_window_metrics(teacher, labelled, _with_invalid(gt, math.inf).numpy(), "depth")
    zero = teacher_window_metrics(teacher, labelled, _with_invalid(gt, 0.0).numpy(), "depth")
    assert row == pytest.approx(zero, rel=0, abs=1e-6)  # the same pixels and fits; float32 depths of 1..2 m
    assert row["teacher_coverage"] == 1.0 and row["delta_lsq_frame"] == 1.0
    assert row["absrel_lsq_frame"] < 1e-5  # an exact affine fit of values up to 6.5, applied in float32


def test_depth_absrel_hand_computed():
    gt = torch.tensor([[[1.0, 2.0], [4.0, 0.0]]]).repeat(1, 4, 4)  # zeros are invalid
    pred = gt * 1.0
    pred[gt == 1.0] = 1.5  # one value off by 50% (median stays 2)
    m = metrics.depth_metrics(pred, gt)
    # valid values 1, 2, 4 repeated equally; only the "1" pixels err by 0.5/1
    assert m["absrel_med"] == pytest.approx(0.5 / 3, rel=1e-6)
    assert m["delta_med"] == pytest.approx(2 / 3, rel=1e-6)


def test_depth_ignores_invalid_and_rejects_empty():
    gt = torch.zeros(2, 4, 4)
    with pytest.raises(ValueError):
        metrics.depth_metrics(torch.ones(2, 4, 4), gt)


def test_pose_metrics_perfect_under_similarity():
    gt = _trajectory()
    pred = _similarity(gt, 0.37, [0.4, -1.0, 0.2], [3.0, -2.0, 5.0])
    m = metrics.pose_metrics(pred, gt)
    assert m["ate"] < 1e-9 and m["rpe_trans"] < 1e-9 and m["rpe_rot_deg"] < 1e-4
    assert m["rra30"] == 1.0 and m["rta30"] == 1.0 and m["auc30"] == 1.0


@pytest.mark.parametrize("axis_angle", [[0.0, 0.0, 1.2], [0.4, -1.0, 0.2], [0.0, 0.0, math.pi]])
def test_two_view_ate_is_zero_under_similarity(axis_angle):
    """Two views determine a similarity up to rotation about the baseline, which moves no camera
    centre: a prediction that is a similarity of the truth has ATE 0 (float64 rounding only).
    The last rotation reverses the baseline (x), the case where the minimal rotation is 180°."""
    gt = _trajectory(v=2)
    gt[:, :3, 3] = torch.tensor([[0.0, 0, 0], [1.0, 0, 0]], dtype=torch.float64)
    pred = _similarity(gt, 0.5, axis_angle, [2.0, 1.0, 0.0])
    m = metrics.pose_metrics(pred, gt)
    assert m["ate"] < 1e-9 and m["rpe_trans"] < 1e-9
    aligned = metrics.align_trajectory(pred, gt)  # what the trajectory picture draws
    torch.testing.assert_close(aligned[:, :3, 3], gt[:, :3, 3], rtol=0, atol=1e-9)
    assert torch.linalg.det(aligned[:, :3, :3]).sub(1).abs().max() < 1e-9  # rotations stay rotations


def test_rotation_between_turns_source_onto_target_by_their_angle():
    """A rotation (orthonormal, det 1) turning the direction of a onto b by exactly the angle
    between them, also for parallel, opposite and nearly opposite vectors (1e-9 apart, where a
    division by 1 + cos would lose the digits)."""
    a = torch.tensor([0.3, -1.2, 0.5], dtype=torch.float64)
    nearly = -a + torch.tensor([0.0, 0.0, 1e-9], dtype=torch.float64)
    for b in (torch.tensor([2.0, 0.1, -0.7], dtype=torch.float64), 3 * a, -2 * a, nearly):
        R = metrics.rotation_between(a, b)
        torch.testing.assert_close(R @ R.T, torch.eye(3, dtype=torch.float64), rtol=0, atol=1e-12)
        assert torch.linalg.det(R) == pytest.approx(1.0, abs=1e-12)
        torch.testing.assert_close(R @ a / a.norm(), b / b.norm(), rtol=0, atol=1e-12)
        cos = float(a @ b / (a.norm() * b.norm()))
        angle = math.degrees(math.atan2(math.sqrt(max(1 - cos * cos, 0.0)), cos))
        assert float(geometry.rotation_angle_deg(R)) == pytest.approx(angle, abs=1e-6)


def test_pose_ate_known_offset():
    gt = _trajectory(v=4)
    pred = gt.clone()
    # ATE is the RMS residual after the best Sim(3); it can only be below the raw RMS (0.1).
    pred[:, :3, 3] += torch.tensor([[0.1, 0, 0], [-0.1, 0, 0], [0, 0.1, 0], [0, -0.1, 0]], dtype=torch.float64)
    m = metrics.pose_metrics(pred, gt)
    aligned = metrics.align_trajectory(pred, gt)
    rms = (aligned[:, :3, 3] - gt[:, :3, 3]).norm(dim=-1).pow(2).mean().sqrt()
    assert m["ate"] == pytest.approx(float(rms))
    assert 0 < m["ate"] <= 0.1 + 1e-9  # alignment can only reduce the raw RMS of 0.1


def test_pairwise_errors_known_rotation():
    gt = geometry.make_pose(torch.eye(3).repeat(2, 1, 1), torch.tensor([[0.0, 0, 0], [1.0, 0, 0]])).double()
    pred = gt.clone()
    pred[1, :3, :3] = geometry.axis_angle_to_matrix(torch.tensor([0.0, 0.0, math.radians(40)], dtype=torch.float64))
    rot, trans = metrics.pairwise_pose_errors(pred, gt)
    assert rot[0] == pytest.approx(40.0, abs=1e-6)
    m = metrics.pose_auc(rot, trans)
    assert m["rra30"] == 0.0 and m["auc30"] == 0.0


def test_pose_auc_curve_hand_computed():
    rot = torch.tensor([0.5, 10.5, 40.0])
    trans = torch.tensor([0.2, 2.0, 1.0])
    m = metrics.pose_auc(rot, trans)
    # worst errors 0.5, 10.5, 40: pair 1 counts at all 30 thresholds, pair 2 at t=11..30 (20)
    assert m["auc30"] == pytest.approx((30 + 20) / (3 * 30))
    assert m["rra30"] == pytest.approx(2 / 3) and m["rta30"] == 1.0


def test_translation_direction_error_ignores_scale():
    gt = _trajectory(v=3)
    pred = gt.clone()
    pred[:, :3, 3] *= 4.0
    rot, trans = metrics.pairwise_pose_errors(pred, gt)
    assert rot.max() < 1e-4 and trans.max() < 1e-4


def test_pointmap_exact_under_similarity():
    v, h, w = 3, 6, 8
    gt_depth = torch.rand(v, h, w, dtype=torch.float64) + 1
    gt_pose = _trajectory(v)
    K = geometry.intrinsics_from_fov(60, w, h, dtype=torch.float64).expand(v, 3, 3)
    s = 0.5
    pred_pose = _similarity(gt_pose, s, [0.1, 0.2, 0.3], [1.0, 2.0, 3.0])
    m = metrics.pointmap_metrics(s * gt_depth, pred_pose, gt_depth, gt_pose, K)
    assert m["accuracy"] < 1e-6 and m["completeness"] < 1e-6  # cdist uses a matmul expansion
    noisy = metrics.pointmap_metrics(s * gt_depth * (1 + 0.05 * torch.randn(v, h, w, dtype=torch.float64)),
                                     pred_pose, gt_depth, gt_pose, K)
    assert noisy["accuracy"] > 1e-3


def test_window_metrics_and_mean():
    v, h, w = 4, 6, 8
    gt_depth = torch.rand(v, h, w, dtype=torch.float64) + 1
    gt_pose = _trajectory(v)
    K = geometry.intrinsics_from_fov(60, w, h, dtype=torch.float64).expand(v, 3, 3)
    row = metrics.window_metrics(gt_depth * 2, _similarity(gt_pose, 2.0, [0, 0, 0.5], [0, 0, 0]), gt_depth, gt_pose, K)
    assert row["absrel_med"] < 1e-9 and row["ate"] < 1e-9 and row["auc30"] == 1.0
    mean = metrics.mean_metrics([{"a": 1.0, "b": 2.0}, {"a": 3.0}])
    assert mean == {"a": 2.0, "b": 2.0}  # each over the windows that have it


def test_a_window_whose_frames_are_each_too_sparse_has_no_per_frame_fit():
    """Enough valid depth for the window's fits but fewer than MIN_DEPTH_PIXELS in every frame:
    the per-frame columns are left out, as the teacher baseline leaves the window out (they
    were NaN, and a NaN in one window made the dataset's mean NaN)."""
    n = metrics.MIN_DEPTH_PIXELS
    gt = torch.rand(2, 4, n, dtype=torch.float64) + 1
    valid = torch.zeros_like(gt, dtype=torch.bool)
    valid[:, 0, : n - 1] = True  # 2 (n - 1) pixels in all, n - 1 a frame
    sparse = metrics.depth_metrics(gt * 3, gt, valid)
    assert sparse["absrel_med"] < 1e-12 and "absrel_lsq_frame" not in sparse and "delta_lsq_frame" not in sparse
    dense = metrics.depth_metrics(gt * 3, gt)
    mean = metrics.mean_metrics([sparse, dense])
    assert mean["absrel_lsq_frame"] == dense["absrel_lsq_frame"] and math.isfinite(mean["absrel_med"])


@pytest.mark.parametrize("views", [2, 4])
def test_predicted_cameras_are_drawn_under_the_ates_alignment(views):
    """The viewer places predicted cameras with the similarity the ATE scores them under: a
    prediction that is a similarity of the truth lands on it, with two views as with more
    (two views were drawn unaligned)."""
    from reliev3r import view

    rng = np.random.default_rng(views)
    gt = np.tile(np.eye(4), (views, 1, 1))
    gt[:, :3, 3] = rng.normal(size=(views, 3))
    R = geometry.axis_angle_to_matrix(torch.tensor([0.3, -1.1, 0.4], dtype=torch.float64)).numpy()
    pred = view.apply_sim3(0.4, R, np.array([1.0, 2.0, -3.0]), gt)
    aligned = view.apply_sim3(*view.sim3_to_gt(pred, gt), pred)
    np.testing.assert_allclose(aligned[:, :3, 3], gt[:, :3, 3], atol=1e-9)
