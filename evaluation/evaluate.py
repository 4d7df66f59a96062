"""Score a model on evaluation windows; baselines that need no model sit beside it."""

from __future__ import annotations

import torch
from tqdm import tqdm

from evaluation import metrics
from evaluation.datasets import EvalWindow


def has_ground_truth(windows: list[EvalWindow]) -> tuple[bool, bool]:
    """(every window has depth, every window has poses)."""
    return all(w.gt_depth is not None for w in windows), all(w.gt_cam_to_world is not None for w in windows)


def score_window(depth: torch.Tensor, cam_to_world: torch.Tensor, window: EvalWindow) -> dict[str, float]:
    """Every metric of one window its ground truth allows (CPU tensors, depth [V,H,W],
    poses [V,4,4]): depth needs GT depth, poses need GT poses, point maps need both."""
    out: dict[str, float] = {}
    K = torch.from_numpy(window.intrinsics)
    if window.gt_depth is not None:
        out.update(metrics.depth_metrics(depth, torch.from_numpy(window.gt_depth)))
    if window.gt_cam_to_world is not None:
        gt_pose = torch.from_numpy(window.gt_cam_to_world)
        out.update(metrics.pose_metrics(cam_to_world, gt_pose))
        if window.gt_depth is not None:
            out.update(metrics.pointmap_metrics(depth, cam_to_world, torch.from_numpy(window.gt_depth), gt_pose, K))
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
    was_training = model.training
    model.eval()
    rows = []
    try:
        for window in tqdm(windows, desc=desc, unit="window", disable=not progress):
            depth, pose = predict(model, window, device)
            rows.append(score_window(depth.cpu(), pose.cpu(), window))
    finally:
        model.train(was_training)
    return metrics.mean_metrics(rows)


def trivial_baseline(windows: list[EvalWindow]) -> dict[str, float]:
    """Constant depth and identity poses: the floor every learned model must clear."""
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
    return metrics.mean_metrics(rows)
