"""Score a model on evaluation windows; baselines that need no model sit beside it."""

from __future__ import annotations

import torch
from tqdm import tqdm

from evaluation import metrics
from evaluation.datasets import EvalWindow


def _window_tensors(window: EvalWindow, device) -> tuple[torch.Tensor, ...]:
    return (torch.from_numpy(window.gt_depth).to(device), torch.from_numpy(window.gt_cam_to_world).to(device),
            torch.from_numpy(window.intrinsics).to(device))


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
            gt_depth, gt_pose, K = _window_tensors(window, device)
            rows.append(metrics.window_metrics(depth.cpu(), pose.cpu(), gt_depth.cpu(), gt_pose.cpu(), K.cpu()))
    finally:
        model.train(was_training)
    return metrics.mean_metrics(rows)


def trivial_baseline(windows: list[EvalWindow]) -> dict[str, float]:
    """Constant depth and identity poses: the floor every learned model must clear."""
    rows = []
    for window in windows:
        gt_depth, gt_pose, K = _window_tensors(window, "cpu")
        row = metrics.depth_metrics(torch.ones_like(gt_depth), gt_depth)
        row.update(metrics.pose_metrics(torch.eye(4).expand_as(gt_pose).clone(), gt_pose))
        rows.append(row)
    return metrics.mean_metrics(rows)
