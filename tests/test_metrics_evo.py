"""Our ATE and RPE (``evaluation/metrics.py``) against ``evo``, the package the SLAM and 3D-vision
field computes them with, on synthetic trajectories with known noise and a scale difference.

The definitions that agree (to 1e-6 relative; in practice to float64 rounding):

* ATE = evo's APE, translation part, after Umeyama Sim(3) alignment (``align(correct_scale=True)``),
  statistic RMSE;
* RPE = evo's RPE over consecutive frames (delta 1, unit frames) after that same alignment,
  statistic RMSE: ``rpe_trans`` of the translation part (units of the ground truth),
  ``rpe_rot_deg`` of the rotation angle in degrees. The error of a pair is
  ``inv(inv(Q_i) Q_j) inv(P_i) P_j`` (Q ground truth, P the aligned estimate).

The trajectories go through TUM files (our writer, evo's reader) and evo's timestamp association,
so the test also covers our TUM output being what evo reads.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from evaluation import metrics
from evaluation.tum import write_tum
from reliev3r import geometry

pytest.importorskip("evo", reason="evo (extras 'evo' and 'test') is the reference implementation")
from evo.core import metrics as evo_metrics  # noqa: E402
from evo.core import sync  # noqa: E402
from evo.core.units import Unit  # noqa: E402
from evo.tools import file_interface  # noqa: E402


def _rotation(axis_angle: np.ndarray) -> np.ndarray:
    return geometry.axis_angle_to_matrix(torch.from_numpy(np.asarray(axis_angle, np.float64))).numpy()


def _fixture(kind: str, n: int, seed: int) -> np.ndarray:
    """Ground-truth cam_to_world [n, 4, 4]: an orbit, a forward walk with head turns, a helix."""
    rng = np.random.default_rng(seed)
    t = np.linspace(0, 1, n)
    if kind == "orbit":
        eyes = np.stack([2 * np.cos(2 * np.pi * t), 0.2 * np.sin(6 * t), 2 * np.sin(2 * np.pi * t)], -1)
        return geometry.look_at(torch.from_numpy(eyes), torch.zeros(n, 3, dtype=torch.float64)).numpy()
    if kind == "walk":
        poses = np.tile(np.eye(4), (n, 1, 1))
        for k in range(1, n):
            step = np.eye(4)
            step[:3, :3] = _rotation(rng.normal(0, 0.05, 3))
            step[:3, 3] = [rng.normal(0, 0.02), rng.normal(0, 0.01), 0.1]
            poses[k] = poses[k - 1] @ step
        return poses
    if kind == "helix":
        eyes = np.stack([np.cos(8 * t), np.sin(8 * t), 3 * t], -1)
        targets = eyes + np.stack([-np.sin(8 * t), np.cos(8 * t), 0.3 + 0 * t], -1)
        return geometry.look_at(torch.from_numpy(eyes), torch.from_numpy(targets)).numpy()
    raise ValueError(kind)


def _estimate(gt: np.ndarray, *, scale: float, trans_sigma: float, rot_sigma_deg: float, seed: int) -> np.ndarray:
    """The ground truth in another similarity gauge (scale, rotation, translation), with
    Gaussian noise on every camera centre and orientation."""
    rng = np.random.default_rng(seed + 1)
    G = np.eye(4)
    G[:3, :3], G[:3, 3] = _rotation([0.3, -1.2, 0.5]), [4.0, -1.0, 2.5]
    est = gt.copy()
    for k in range(len(gt)):
        est[k, :3, :3] = _rotation(rng.normal(0, np.radians(rot_sigma_deg), 3)) @ gt[k, :3, :3]
        est[k, :3, 3] = gt[k, :3, 3] + rng.normal(0, trans_sigma, 3)
    est[:, :3, 3] *= scale
    return G @ est


CASES = {  # kind, poses, scale, translation noise (gt units), rotation noise (degrees)
    "orbit, scale 0.37": ("orbit", 60, 0.37, 0.02, 1.0),
    "walk, scale 2.5": ("walk", 80, 2.5, 0.01, 0.5),
    "helix, scale 11, large noise": ("helix", 50, 11.0, 0.1, 5.0),
    "orbit, exact similarity": ("orbit", 30, 0.8, 0.0, 0.0),
}


def _evo_trajectories(tmp_path, gt: np.ndarray, est: np.ndarray):
    """Both through TUM files (ours written, evo's reader) and evo's timestamp association; the
    estimate has its own clock (offset under the association's tolerance) and two extra poses."""
    stamps = 100.0 + 0.1 * np.arange(len(gt))
    write_tum(tmp_path / "gt.txt", stamps, gt)
    extra = np.stack([est[0], est[-1]])
    write_tum(tmp_path / "est.txt", np.concatenate([stamps + 0.003, [99.5, 200.0]]), np.concatenate([est, extra]))
    ref = file_interface.read_tum_trajectory_file(str(tmp_path / "gt.txt"))
    est_t = file_interface.read_tum_trajectory_file(str(tmp_path / "est.txt"))
    ref, est_t = sync.associate_trajectories(ref, est_t, max_diff=0.01)
    assert ref.num_poses == est_t.num_poses == len(gt)
    return ref, est_t


def _evo_numbers(ref, est) -> dict[str, dict[str, float]]:
    est = copy.deepcopy(est)
    est.align(ref, correct_scale=True)  # Umeyama Sim(3), as `evo_ape/evo_rpe --align --correct_scale`
    out = {}
    ape = evo_metrics.APE(evo_metrics.PoseRelation.translation_part)
    ape.process_data((ref, est))
    out["ate"] = ape.get_all_statistics()
    for key, relation in (("rpe_trans", evo_metrics.PoseRelation.translation_part),
                          ("rpe_rot_deg", evo_metrics.PoseRelation.rotation_angle_deg)):
        rpe = evo_metrics.RPE(relation, delta=1, delta_unit=Unit.frames, all_pairs=False)
        rpe.process_data((ref, est))
        out[key] = rpe.get_all_statistics()
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_ate_and_rpe_match_evo(tmp_path, case):
    kind, n, scale, trans_sigma, rot_sigma = CASES[case]
    gt = _fixture(kind, n, seed=n)
    est = _estimate(gt, scale=scale, trans_sigma=trans_sigma, rot_sigma_deg=rot_sigma, seed=n)
    ref_t, est_t = _evo_trajectories(tmp_path, gt, est)
    evo = _evo_numbers(ref_t, est_t)
    # ours on exactly the poses evo compares (as read back from the TUM files)
    ours = metrics.pose_metrics(torch.from_numpy(np.stack(est_t.poses_se3)),
                                torch.from_numpy(np.stack(ref_t.poses_se3)))
    for key in ("ate", "rpe_trans", "rpe_rot_deg"):
        assert ours[key] == pytest.approx(evo[key]["rmse"], rel=1e-6, abs=1e-9), key
    if trans_sigma == 0:
        # the TUM files hold 7 decimals: what is left of an exact similarity is their rounding
        assert ours["ate"] < 1e-6 and ours["rpe_trans"] < 1e-6 and ours["rpe_rot_deg"] < 1e-4
    else:
        # sanity: the noise we put in is what comes out (centre noise sigma per axis: ATE ~ sqrt(3) sigma)
        assert 0.6 < ours["ate"] / (np.sqrt(3) * trans_sigma) < 1.4
        assert ours["rpe_trans"] > ours["ate"]  # two noisy centres per pair
