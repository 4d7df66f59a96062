"""Score a model on evaluation windows; baselines that need no model sit beside it."""

from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from evaluation import metrics
from evaluation.datasets import EvalWindow
from learner.posefit import fit_poses

TITLES = {"absrel_med": "AbsRel med", "delta_med": "δ<1.25 med", "absrel_lsq": "AbsRel lsq",
          "delta_lsq": "δ<1.25 lsq", "absrel_lsq_frame": "AbsRel lsq/frame", "delta_lsq_frame": "δ<1.25 lsq/frame",
          "ate": "ATE", "rpe_trans": "RPE t", "rpe_rot_deg": "RPE r°", "rot_err_deg": "rot err°",
          "trans_err_deg": "trans err°", "rra30": "RRA@30", "rta30": "RTA@30", "auc30": "AUC@30",
          "accuracy": "Acc", "completeness": "Comp"}
"""Column title of every metric ``score_window`` reports (``evaluation.metrics``)."""


def has_ground_truth(windows: list[EvalWindow]) -> tuple[bool, bool]:
    """(every window has depth, every window has poses)."""
    return all(w.gt_depth is not None for w in windows), all(w.gt_cam_to_world is not None for w in windows)


def score_window(depth: torch.Tensor, cam_to_world: torch.Tensor, window: EvalWindow) -> dict[str, float]:
    """Every metric of one window its ground truth allows (CPU tensors, depth [V,H,W],
    poses [V,4,4]): depth needs GT depth, poses need GT poses, point maps need both."""
    out: dict[str, float] = {}
    if window.gt_depth is not None:
        out.update(metrics.depth_metrics(depth, torch.from_numpy(window.gt_depth)))
    out.update(_pose_scores(depth, cam_to_world, window))
    return out


def _pose_scores(depth: torch.Tensor, cam_to_world: torch.Tensor, window: EvalWindow) -> dict[str, float]:
    """The metrics of :func:`score_window` that the poses move: the poses' and the point maps'."""
    out: dict[str, float] = {}
    if window.gt_cam_to_world is not None:
        gt_pose = torch.from_numpy(window.gt_cam_to_world)
        out.update(metrics.pose_metrics(cam_to_world, gt_pose))
        if window.gt_depth is not None:
            out.update(metrics.pointmap_metrics(depth, cam_to_world, torch.from_numpy(window.gt_depth), gt_pose,
                                                torch.from_numpy(window.intrinsics)))
    return out


@torch.no_grad()
def predict(model: torch.nn.Module, window: EvalWindow, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted depth [V,H,W] and cam_to_world [V,4,4] (fp32) of one window."""
    images = torch.from_numpy(window.images).to(device).permute(0, 3, 1, 2).float().div(255)[None]
    pred = model(images)
    return pred.depth[0].float(), pred.cam_to_world[0].float()


def evaluate_model(model: torch.nn.Module, windows: list[EvalWindow], device, *, progress: bool = False,
                   desc: str = "evaluating") -> dict[str, float]:
    """Mean metrics of ``model`` over ``windows`` (see ``evaluation.metrics``)."""
    return metrics.mean_metrics(score_model(model, windows, device, progress=progress, desc=desc))


def score_model(model: torch.nn.Module, windows: list[EvalWindow], device, *, progress: bool = False,
                desc: str = "evaluating") -> list[dict[str, float]]:
    """The metrics of ``model`` on each of ``windows``, in their order."""
    return score_model_and_fitted(model, windows, device, None, progress=progress, desc=desc)[0]


def score_model_and_fitted(model: torch.nn.Module, windows: list[EvalWindow], device,
                           matches: list[np.ndarray | None] | None, *, progress: bool = False,
                           desc: str = "evaluating") -> tuple[list[dict[str, float]], list[dict[str, float]] | None]:
    """:func:`score_model`'s rows and, with ``matches`` (each window's verified matches,
    ``evaluation.baselines.window_matches``, in pixels of the frames they were found on), the rows
    of the same predictions with their poses
    fitted to the model's depth and the matches (``learner.posefit.fit_poses``; a window whose
    matches are None keeps the pose head's): one forward per window for both (None without
    ``matches``)."""
    was_training = model.training
    model.eval()
    rows, fitted_rows = [], None if matches is None else []
    try:
        for k, window in enumerate(tqdm(windows, desc=desc, unit="window", disable=not progress)):
            depth, pose = predict(model, window, device)
            depth, pose = depth.cpu(), pose.cpu()
            rows.append(score_window(depth, pose, window))
            if fitted_rows is not None:
                fitted = pose
                if matches[k] is not None:
                    fit = fit_poses(depth.numpy(), pose.double().numpy(), window.intrinsics,
                                    window.in_model_pixels(matches[k]))
                    fitted = torch.from_numpy(fit.cam_to_world).to(pose.dtype)
                fitted_rows.append({**rows[-1], **_pose_scores(depth, fitted, window)})  # the depth is the same
    finally:
        model.train(was_training)
    return rows, fitted_rows


def trivial_baseline(windows: list[EvalWindow]) -> dict[str, float]:
    """Constant depth and identity poses: the floor every learned model must clear."""
    return metrics.mean_metrics(score_trivial(windows))


def score_trivial(windows: list[EvalWindow]) -> list[dict[str, float]]:
    """The metrics of :func:`trivial_baseline` on each of ``windows``."""
    rows = []
    for window in windows:
        row = {}
        if window.gt_depth is not None:
            gt_depth = torch.from_numpy(window.gt_depth)
            row.update(metrics.depth_metrics(torch.ones_like(gt_depth), gt_depth))
        if window.gt_cam_to_world is not None:
            gt_pose = torch.from_numpy(window.gt_cam_to_world)
            row.update(metrics.pose_metrics(torch.eye(4).expand_as(gt_pose).clone(), gt_pose))
        rows.append(row)
    return rows


def markdown_table(rows: dict[str, dict[str, float]], keys: tuple[str, ...], *, first: str = "model") -> str:
    """One row per model or baseline, one column per metric key (titled by ``TITLES``); "–"
    where a row lacks the metric."""
    head = f"| {first} | " + " | ".join(TITLES.get(k, k) for k in keys) + " |"
    lines = [head, "|---|" + "---:|" * len(keys)]
    for name, values in rows.items():
        cells = [f"{values[k]:.3f}" if k in values else "–" for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
