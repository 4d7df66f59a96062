"""A small synthetic world for the loss tests (test_losses, test_triangulation, test_epipolar):
cameras with parallax, depth maps and exact matches, similarity transforms of a window, and
the perturbations those tests score (noisy depth and poses, outlier matches); and a small
7-Scenes sequence folder of smooth random pictures (:func:`write_7scenes`)."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import torch

from reliev3r import geometry

F64 = torch.float64


def make_world(seed: int, *, batch: int = 1, views: int = 4, height: int = 24, width: int = 32,
               per_pair: int = 10, baseline: float = 0.6, dtype=F64) -> dict[str, torch.Tensor]:
    """Depth maps and poses with exact matches: each match's pixel in view i sits on a pixel
    centre (bilinear sampling returns it exactly) and the 2x2 neighbourhood of its sub-pixel
    partner in view j is set to the true depth there, so bilinear sampling is exact too."""
    rng = np.random.default_rng(seed)
    K = geometry.intrinsics_from_fov(60.0, width, height, dtype=F64)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    depth = np.empty((batch, views, height, width))
    poses = np.empty((batch, views, 4, 4))
    rows = []
    for b in range(batch):
        eyes = torch.from_numpy(baseline * rng.uniform(-1.0, 1.0, (views, 3)))
        targets = torch.from_numpy(np.array([0.0, 4.0, 0.0]) + rng.uniform(-0.4, 0.4, (views, 3)))
        poses[b] = geometry.look_at(eyes, targets).numpy()
        for v in range(views):
            fx, fy, px, py = rng.uniform(0.05, 0.3, 4)
            depth[b, v] = 3.0 + 0.5 * np.sin(fx * xs + px * 7) * np.cos(fy * ys + py * 7)
        occupied = np.zeros((views, height, width), dtype=bool)
        for i in range(views):
            for j in range(views):
                if i == j:
                    continue
                found, tries = 0, 0
                while found < per_pair and tries < 50 * per_pair:
                    tries += 1
                    x, y = int(rng.integers(1, width - 1)), int(rng.integers(1, height - 1))
                    z = rng.uniform(2.0, 5.0)
                    p_cam = geometry.unproject_points(torch.tensor([[x, y]], dtype=F64),
                                                      torch.tensor([z], dtype=F64), K)
                    p_world = geometry.transform_points(torch.from_numpy(poses[b, i]), p_cam)
                    p_j = geometry.transform_points(geometry.invert_pose(torch.from_numpy(poses[b, j])), p_world)
                    uv_j, z_j = geometry.project(p_j, K)
                    xj, yj = float(uv_j[0, 0]), float(uv_j[0, 1])
                    if float(z_j[0]) < 0.5 or not (1 <= xj <= width - 2 and 1 <= yj <= height - 2):
                        continue
                    x0, y0 = int(math.floor(xj)), int(math.floor(yj))
                    if occupied[i, y, x] or occupied[j, y0:y0 + 2, x0:x0 + 2].any():
                        continue
                    occupied[i, y, x] = True
                    occupied[j, y0:y0 + 2, x0:x0 + 2] = True
                    depth[b, i, y, x] = z
                    depth[b, j, y0:y0 + 2, x0:x0 + 2] = float(z_j[0])
                    rows.append((b, i, j, x, y, xj, yj))
                    found += 1
    return {
        "depth": torch.from_numpy(depth).to(dtype),
        "cam_to_world": torch.from_numpy(poses).to(dtype),
        "intrinsics": K.to(dtype).expand(batch, views, 3, 3).clone(),
        "matches": torch.tensor(rows, dtype=dtype),
    }


def random_similarity(seed: int, dtype=F64) -> tuple[float, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    s = float(torch.empty(1).uniform_(0.2, 5.0, generator=g))
    R = geometry.axis_angle_to_matrix(torch.randn(3, generator=g, dtype=dtype) * 1.5)
    t = torch.randn(3, generator=g, dtype=dtype) * 3
    return s, R, t


def apply_similarity(depth, cam_to_world, s, R, t):
    """The whole window moved by x -> s R x + t: poses stay rigid, depth scales by s."""
    out = cam_to_world.clone()
    out[..., :3, :3] = R @ cam_to_world[..., :3, :3]
    out[..., :3, 3] = s * (cam_to_world[..., :3, 3] @ R.T) + t
    return depth * s, out


def assert_finite_grads(*tensors):
    for x in tensors:
        assert x.grad is not None
        assert torch.isfinite(x.grad).all()


def perturbed(world, seed):
    g = torch.Generator().manual_seed(seed)
    depth = world["depth"] * torch.exp(0.05 * torch.randn(world["depth"].shape, generator=g, dtype=F64))
    poses = world["cam_to_world"].clone()
    poses[..., :3, 3] += 0.1 * torch.randn(poses[..., :3, 3].shape, generator=g, dtype=F64)
    return depth, poses


def with_outliers(world, seed, fraction=0.5):
    g = torch.Generator().manual_seed(seed)
    matches = world["matches"].clone()
    k = matches.shape[0]
    bad = torch.randperm(k, generator=g)[: int(fraction * k)]
    h, w = world["depth"].shape[-2:]
    matches[bad, 5] = torch.rand(len(bad), generator=g, dtype=F64) * (w - 1)
    matches[bad, 6] = torch.rand(len(bad), generator=g, dtype=F64) * (h - 1)
    return matches, bad


def write_7scenes(folder: Path, frames: int, *, width: int = 80, height: int = 60, step: float = 0.05,
                  focal: float = 70.0, suffix: str = ".jpg") -> Path:
    """``frames`` smooth random 7-Scenes frames of ``width`` x ``height`` (colour ``suffix``, depth
    PNG in mm, a pose ``step`` metres along x per frame) and ``camera-intrinsics.txt``."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for k in range(frames):
        small = rng.integers(0, 255, (max(height // 10, 2), max(width // 10, 2), 3), dtype=np.uint8)
        image = cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)
        cv2.imwrite(str(folder / f"frame-{k:06d}.color{suffix}"), image)
        cv2.imwrite(str(folder / f"frame-{k:06d}.depth.png"), np.full((height, width), 1500 + 10 * k, np.uint16))
        pose = np.eye(4)
        pose[0, 3] = step * k
        np.savetxt(folder / f"frame-{k:06d}.pose.txt", pose)
    (folder / "camera-intrinsics.txt").write_text(
        f"{focal} 0 {(width - 1) / 2}\n0 {focal} {(height - 1) / 2}\n0 0 1\n")
    return folder
