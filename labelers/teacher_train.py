"""The recipe of the embedded depth teacher (``reliev3r teacher-train``).

Everything from scratch, offline: no pretrained weights, no real images.

Data. Frames rendered on the fly by the project's synthetic world (``reliev3r.synthetic``,
exact z-depth), from two kinds of scenes:

* ``random_world`` rooms (the world the pipeline streams), seen from their camera paths
  with the gaze perturbed;
* "kitchen" rooms built here with the same public API (``World``, ``Box``, ``Sphere``,
  ``Material``): counters of cabinet boxes along one to three walls with a worktop slab,
  wall cabinets, tall units, clutter on the worktops, an island or a table (optionally with
  chairs and things on it: ``dining``), and a mix of
  plain, wood-like and patterned materials (real rooms are mostly untextured; the pipeline's
  world is textured everywhere for the matchers). The camera stands anywhere clear of the
  furniture at hand height and looks mostly at the furniture, pitched down, with some roll.

Several views are rendered from each eye position in one ray-casting call (the renderer
takes one origin and any number of rays), which is what makes rendering a pool of tens of
thousands of frames affordable on a GPU.

Augmentation bridges the gap to real cameras: random zoom crops and horizontal flips,
gamma, exposure, white balance, saturation and contrast, a smooth random illumination
field (shading that says nothing about depth), blur, resolution loss, sensor noise and
8-bit quantisation.

Loss. Per frame, the prediction (depth = exp(net output)) is aligned to the ground truth by
least-squares scale (``alignment=scale``, the default and the shipped weights) or scale and shift
(``scale_shift``, the alignment the 7-Scenes benchmark uses, which leaves the teacher's own
shift arbitrary: its near points came out far too near), in closed form and differentiated
through; the loss is the aligned AbsRel plus a multi-scale gradient-matching term on the
aligned residual (MiDaS), which sharpens edges.

Schedule. AdamW, linear warm-up then cosine decay over ``progress = max(step / steps,
elapsed / time_budget)``, so a time-boxed device run still ends its schedule properly; the
meta records the steps actually taken.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from labelers.embedded import DEFAULT_WIDTHS, EmbeddedDepthNet, load_net, save_weights
from reliev3r import geometry
from reliev3r.config_base import check_device, check_device_present
from reliev3r.synthetic import Box, Material, Sphere, World, hsv, random_world, render_rays


@dataclass(kw_only=True, slots=True)
class TeacherTrainConfig:
    out: Path
    """Folder for ``embedded_depth.safetensors``, its JSON meta and ``train_log.jsonl``."""
    steps: int = 20000
    """Optimiser steps (the run may end earlier at ``time_budget_s``)."""
    time_budget_s: float | None = None
    """Wall-clock seconds for the whole run (rendering included); None = no limit."""
    device: str = "cuda"
    """Torch device for rendering and training."""
    seed: int = 0
    batch: int = 32
    """Frames per step."""
    height: int = 192
    """Training height (multiple of 16); frames are rendered at this size."""
    width: int = 256
    """Training width (multiple of 16)."""
    widths: tuple[int, ...] = DEFAULT_WIDTHS
    """U-Net channels per encoder stage."""
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup: int = 300
    """Linear warm-up steps."""
    grad_weight: float = 0.5
    """Weight of the gradient-matching term."""
    alignment: Literal["scale_shift", "scale"] = "scale"
    """Per-frame alignment of the prediction to the ground truth inside the loss: ``scale``
    (least-squares scale only: the teacher learns how near the near points are; the shipped
    weights, and the weak learner trained better with them: docs/RESULTS.md, issue 21) or
    ``scale_shift`` (least-squares scale and shift, the 7-Scenes benchmark's alignment, which
    leaves the teacher's own shift arbitrary). The meta records it as ``ambiguity``."""
    init: Path | None = None
    """Weights (``embedded_depth.safetensors`` of an earlier run) to start from instead of a
    random init, e.g. to change a trained teacher's ``alignment``; ``widths`` are taken from
    them."""
    pool_frames: int = 24000
    """Rendered frames held in the training pool (uint8 RGB + fp16 depth on the device)."""
    render_fraction: float = 0.3
    """Share of ``time_budget_s`` that rendering the pool may take at most."""
    views_per_eye: int = 8
    """Views rendered from one eye position in one call."""
    eyes_per_world: int = 6
    kitchen_share: float = 0.7
    """Share of scenes that are kitchen rooms (the rest: ``random_world`` rooms)."""
    dining: bool = False
    """Kitchen rooms get a table more often, with chairs and things on it (added after the
    shipped weights were trained; off reproduces their data draw for draw)."""
    val_frames: int = 64
    """Held-out synthetic frames (other seeds) scored at the end."""
    precision: Literal["bf16", "fp32"] = "bf16"
    """Autocast dtype on CUDA (CPU always runs fp32)."""
    log_every: int = 100

    def __post_init__(self):
        self.out = Path(self.out)
        self.init = None if self.init is None else Path(self.init)
        self.widths = tuple(int(w) for w in self.widths)
        if self.steps < 1:
            raise ValueError("steps must be >= 1")
        if self.height % 16 or self.width % 16 or self.height < 32 or self.width < 32:
            raise ValueError(f"height and width must be multiples of 16 (>= 32), got {self.height}x{self.width}")
        if self.batch < 1 or self.pool_frames < self.batch:
            raise ValueError("batch must be >= 1 and pool_frames >= batch")
        if not 0 <= self.kitchen_share <= 1:
            raise ValueError("kitchen_share must be in [0, 1]")
        if any(w % 8 for w in self.widths):
            raise ValueError("widths must be multiples of 8 (GroupNorm groups)")
        if self.precision not in ("bf16", "fp32"):
            raise ValueError("precision must be bf16 or fp32")
        if self.alignment not in ("scale_shift", "scale"):
            raise ValueError(f"alignment must be scale_shift or scale, got {self.alignment!r}")
        for key in ("views_per_eye", "eyes_per_world", "val_frames", "log_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0 (0: none), got {self.warmup}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        for key in ("weight_decay", "grad_weight"):
            if not (math.isfinite(getattr(self, key)) and getattr(self, key) >= 0):
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)}")
        if not 0 < self.render_fraction <= 1:
            raise ValueError(f"render_fraction must be in (0, 1], got {self.render_fraction}")
        check_device("device", self.device)
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            raise ValueError(f"time_budget_s must be > 0 (or unset), got {self.time_budget_s}")


# --------------------------------------------------------------------------------------------
# Scenes


def random_material(rng: np.random.Generator) -> Material:
    """Plain (most real surfaces), wood-like stripes, or a pattern like the pipeline's world."""
    kind = rng.choice(3, p=[0.5, 0.25, 0.25])
    if kind == 0:  # plain paint, laminate, metal: one colour, faint detail
        a = hsv(rng.uniform(), rng.uniform(0.0, 0.5), rng.uniform(0.15, 0.95))
        b = tuple(min(1.0, c * rng.uniform(0.9, 1.1)) for c in a)
        return Material(a, b, int(rng.integers(0, 4)), float(rng.uniform(0.2, 1.0)), float(rng.uniform(0, math.pi)),
                        float(rng.uniform(1.0, 8.0)), float(rng.uniform(0.0, 0.25)), int(rng.integers(0, 2**20)))
    if kind == 1:  # wood: brownish fine stripes with strong noise
        h, v = rng.uniform(0.04, 0.12), rng.uniform(0.3, 0.8)
        a, b = hsv(h, rng.uniform(0.3, 0.7), v * 0.7), hsv(h, rng.uniform(0.3, 0.7), v)
        return Material(a, b, 1, float(rng.uniform(0.01, 0.06)),
                        float(rng.choice([0.0, math.pi / 2]) + rng.normal(0, 0.05)),
                        float(rng.uniform(2.0, 10.0)), float(rng.uniform(0.3, 0.6)), int(rng.integers(0, 2**20)))
    h, sat = rng.uniform(), rng.uniform(0.0, 0.8)
    return Material(hsv(h, sat, rng.uniform(0.1, 0.5)), hsv(h, sat * rng.uniform(0.3, 1.0), rng.uniform(0.5, 1.0)),
                    int(rng.integers(0, 4)), float(rng.uniform(0.03, 0.45)), float(rng.uniform(0, math.pi)),
                    float(rng.uniform(2.0, 10.0)), float(rng.uniform(0.1, 0.7)), int(rng.integers(0, 2**20)))


_EYE = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))


def _box(lo, hi, material: Material) -> Box:
    lo, hi = np.asarray(lo, float), np.asarray(hi, float)
    return Box(tuple((lo + hi) / 2), tuple((hi - lo) / 2), _EYE, material)


def kitchen_world(rng: np.random.Generator, *, dining: bool = False) -> World:
    """A room with kitchen-like furniture (axis-aligned boxes) and clutter."""
    size = np.array([rng.uniform(2.6, 6.0), rng.uniform(2.6, 6.0), rng.uniform(2.3, 3.0)])
    lo, hi = np.array([-size[0] / 2, -size[1] / 2, 0.0]), np.array([size[0] / 2, size[1] / 2, size[2]])
    boxes: list[Box] = []
    spheres: list[Sphere] = []
    mat = lambda: random_material(rng)  # noqa: E731

    def run_box(axis: int, side: int, a: float, b: float, z0: float, z1: float, depth: float, m: Material) -> Box:
        # A box against wall (axis, side) spanning [a, b] along the other horizontal axis.
        other = 1 - axis
        blo, bhi = np.zeros(3), np.zeros(3)
        wall = hi[axis] if side else lo[axis]
        blo[axis], bhi[axis] = (wall - depth, wall) if side else (wall, wall + depth)
        blo[other], bhi[other] = a, b
        blo[2], bhi[2] = z0, z1
        return _box(blo, bhi, m)

    walls = rng.permutation(4)[: int(rng.integers(1, 4))]
    for w in walls:
        axis, side = int(w // 2), int(w % 2)
        other = 1 - axis
        span = hi[other] - lo[other]
        a = lo[other] + rng.uniform(0, 0.3) * span
        b = hi[other] - rng.uniform(0, 0.3) * span
        if b - a < 0.8:
            continue
        top, depth = rng.uniform(0.8, 0.95), rng.uniform(0.5, 0.65)
        front = mat() if rng.uniform() < 0.7 else None
        x = a
        while x < b - 0.2:  # cabinet fronts: separate boxes, slightly different depths
            seg = min(b, x + rng.uniform(0.35, 0.8))
            boxes.append(run_box(axis, side, x, seg, 0.0, top, depth - rng.uniform(0.0, 0.03), front or mat()))
            x = seg
        thick = rng.uniform(0.03, 0.06)
        worktop = run_box(axis, side, a, b, top, top + thick, depth + 0.03, mat())
        boxes.append(worktop)
        for _ in range(int(rng.integers(0, 6))):  # clutter on the worktop
            c = rng.uniform(a + 0.15, b - 0.15)
            inset = rng.uniform(0.15, depth - 0.1)
            pos = np.zeros(3)
            pos[axis] = hi[axis] - inset if side else lo[axis] + inset
            pos[other] = c
            if rng.uniform() < 0.6:
                half = rng.uniform(0.04, 0.18, size=3)
                half[axis] = min(half[axis], 0.12)
                pos[2] = top + thick + half[2]
                rot = geometry.axis_angle_to_matrix(torch.tensor([0.0, 0.0, rng.uniform(-0.5, 0.5)])).tolist()
                boxes.append(Box(tuple(pos), tuple(half), tuple(map(tuple, rot)), mat()))
            else:
                r = rng.uniform(0.04, 0.12)
                pos[2] = top + thick + r
                spheres.append(Sphere(tuple(pos), float(r), mat()))
        if rng.uniform() < 0.6:  # wall cabinets
            z0 = rng.uniform(1.35, 1.6)
            z1 = min(hi[2] - 0.05, z0 + rng.uniform(0.5, 0.9))
            m = mat()
            x = a
            while x < b - 0.2:
                seg = min(b, x + rng.uniform(0.35, 0.8))
                boxes.append(run_box(axis, side, x, seg, z0, z1, rng.uniform(0.3, 0.38), m))
                x = seg
        if rng.uniform() < 0.35:  # a tall unit (fridge, larder) beyond the end of the run
            wide = rng.uniform(0.6, 0.9)
            if b + wide < hi[other] - 0.05:
                boxes.append(run_box(axis, side, b, b + wide, 0.0, rng.uniform(1.7, 2.1), rng.uniform(0.6, 0.7), mat()))
    if rng.uniform() < (0.8 if dining else 0.5):  # island or table (dining: chairs, things on it)
        cx, cy = rng.uniform(-0.25, 0.25) * size[0], rng.uniform(-0.25, 0.25) * size[1]
        hx, hy = rng.uniform(0.3, 0.8), rng.uniform(0.3, 0.6)
        top = rng.uniform(0.72, 0.95)
        if rng.uniform() < (0.3 if dining else 0.5):
            boxes.append(_box((cx - hx, cy - hy, 0.0), (cx + hx, cy + hy, top), mat()))
        else:
            m = mat()
            boxes.append(_box((cx - hx, cy - hy, top - 0.04), (cx + hx, cy + hy, top), m))
            for sx in (-1, 1):
                for sy in (-1, 1):
                    px, py = cx + sx * (hx - 0.05), cy + sy * (hy - 0.05)
                    boxes.append(_box((px - 0.025, py - 0.025, 0.0), (px + 0.025, py + 0.025, top - 0.04), m))
            chair = mat() if dining else None
            for _ in range(int(rng.integers(0, 5)) if dining else 0):
                # A chair: seat, back and legs, pushed under one side of the table.
                side, s = int(rng.integers(4)), rng.uniform(0.2, 0.3)
                along = rng.uniform(-0.6, 0.6)
                ax = [(cx - hx - 0.15, cy + along * hy, -1.0), (cx + hx + 0.15, cy + along * hy, 1.0),
                      (cx + along * hx, cy - hy - 0.15, -1.0), (cx + along * hx, cy + hy + 0.15, 1.0)][side]
                px, py, outward = ax
                seat = rng.uniform(0.42, 0.5)
                boxes.append(_box((px - s, py - s, seat - 0.04), (px + s, py + s, seat), chair))
                for lx in (-1, 1):
                    for ly in (-1, 1):
                        qx, qy = px + lx * (s - 0.02), py + ly * (s - 0.02)
                        boxes.append(_box((qx - 0.02, qy - 0.02, 0.0), (qx + 0.02, qy + 0.02, seat - 0.04), chair))
                back = seat + rng.uniform(0.35, 0.5)
                if side < 2:
                    bx = px + outward * (s - 0.02)
                    boxes.append(_box((bx - 0.02, py - s, seat), (bx + 0.02, py + s, back), chair))
                else:
                    by = py + outward * (s - 0.02)
                    boxes.append(_box((px - s, by - 0.02, seat), (px + s, by + 0.02, back), chair))
            for _ in range(int(rng.integers(0, 7)) if dining else 0):  # magazines, boxes, cups on the table
                pos = np.array([cx + rng.uniform(-0.8, 0.8) * hx, cy + rng.uniform(-0.8, 0.8) * hy, 0.0])
                if rng.uniform() < 0.5:
                    half = np.array([rng.uniform(0.08, 0.16), rng.uniform(0.1, 0.2), rng.uniform(0.003, 0.02)])
                elif rng.uniform() < 0.5:
                    half = rng.uniform(0.03, 0.1, size=3)
                else:
                    r = rng.uniform(0.03, 0.07)
                    spheres.append(Sphere((float(pos[0]), float(pos[1]), float(top + r)), float(r), mat()))
                    continue
                pos[2] = top + half[2]
                rot = geometry.axis_angle_to_matrix(torch.tensor([0.0, 0.0, rng.uniform(0, math.pi)])).tolist()
                boxes.append(Box(tuple(pos), tuple(half), tuple(map(tuple, rot)), mat()))
    for _ in range(int(rng.integers(0, 3))):  # things on the floor
        half = rng.uniform(0.1, 0.35, size=3)
        c = np.array([rng.uniform(lo[0] + half[0], hi[0] - half[0]), rng.uniform(lo[1] + half[1], hi[1] - half[1]),
                      half[2]])
        boxes.append(Box(tuple(c), tuple(half), tuple(map(tuple, geometry.axis_angle_to_matrix(
            torch.tensor([0.0, 0.0, rng.uniform(0, math.pi)])).tolist())), mat()))
    light = (float(rng.uniform(-0.4, 0.4) * size[0]), float(rng.uniform(-0.4, 0.4) * size[1]), float(size[2] - 0.2))
    room = tuple(mat() for _ in range(6))
    return World(tuple(lo), tuple(hi), room, tuple(boxes), tuple(spheres), light, float(rng.uniform(0.2, 0.6)))


def _clear_of(world: World, p: np.ndarray, margin: float) -> bool:
    lo, hi = np.asarray(world.room_min), np.asarray(world.room_max)
    if np.any(p < lo + margin) or np.any(p > hi - margin):
        return False
    for b in world.boxes:
        local = (p - np.asarray(b.center)) @ np.asarray(b.rotation)
        if np.linalg.norm(np.maximum(np.abs(local) - np.asarray(b.half_size), 0.0)) < margin:
            return False
    return all(np.linalg.norm(p - np.asarray(s.center)) - s.radius >= margin for s in world.spheres)


def _cameras(rng: np.random.Generator, world: World, eye: np.ndarray, n: int) -> np.ndarray:
    """cam_to_world rotations [n, 3, 3]: gaze towards a random object (or a random yaw),
    pitched down mostly, with a little roll."""
    rots = []
    for _ in range(n):
        if world.boxes and rng.uniform() < 0.6:
            target = np.asarray(world.boxes[int(rng.integers(len(world.boxes)))].center) + rng.normal(0, 0.3, 3)
            d = target - eye
            yaw = math.atan2(d[1], d[0])
            pitch = math.atan2(d[2], math.hypot(d[0], d[1])) + rng.normal(0, 0.1)
        else:
            yaw, pitch = rng.uniform(0, 2 * math.pi), rng.uniform(-0.8, 0.15)
        pitch = float(np.clip(pitch, -1.1, 0.35))
        gaze = np.array([math.cos(yaw) * math.cos(pitch), math.sin(yaw) * math.cos(pitch), math.sin(pitch)])
        pose = geometry.look_at(torch.tensor(eye), torch.tensor(eye + gaze)).numpy()
        roll = rng.normal(0, 0.06)
        c, s = math.cos(roll), math.sin(roll)
        rots.append(pose[:3, :3] @ np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]]))
    return np.stack(rots)


def scene_views(rng: np.random.Generator, cfg: TeacherTrainConfig) -> tuple[World, list[tuple[np.ndarray, np.ndarray]]]:
    """One world and its (eye [3], rotations [V, 3, 3]) groups."""
    groups = []
    if rng.uniform() < cfg.kitchen_share:
        world = kitchen_world(rng, dining=cfg.dining)
        lo, hi = np.asarray(world.room_min), np.asarray(world.room_max)
        for _ in range(200):
            if len(groups) == cfg.eyes_per_world:
                break
            eye = np.array([rng.uniform(lo[0], hi[0]), rng.uniform(lo[1], hi[1]), rng.uniform(0.9, 1.9)])
            if _clear_of(world, eye, 0.3):
                groups.append((eye, _cameras(rng, world, eye, cfg.views_per_eye)))
    else:
        world, path = random_world(rng)
        for s in rng.uniform(0, 1, cfg.eyes_per_world):
            eye = path.eyes(np.array([s]))[0]
            base = path.gazes(np.array([s]))[0]
            rots = []
            for _ in range(cfg.views_per_eye):
                yaw = math.atan2(base[1], base[0]) + rng.normal(0, 0.6)
                pitch = math.asin(np.clip(base[2], -1, 1)) + rng.normal(0, 0.2)
                gaze = np.array([math.cos(yaw) * math.cos(pitch), math.sin(yaw) * math.cos(pitch), math.sin(pitch)])
                rots.append(geometry.look_at(torch.tensor(eye), torch.tensor(eye + gaze)).numpy()[:3, :3])
            groups.append((eye, np.stack(rots)))
    return world, groups


def render_group(world: World, eye: np.ndarray, rotations: np.ndarray, fov_deg: float, height: int, width: int,
                 device) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 RGB [V, H, W, 3] and z-depth [V, H, W] of V views from one eye, in one ray cast."""
    K = geometry.intrinsics_from_fov(fov_deg, width, height).to(device)
    uv = geometry.pixel_grid(height, width, device=device).reshape(-1, 2)
    rays = geometry.unproject_points(uv, torch.ones_like(uv[:, 0]), K)  # z = 1: ray parameter = z-depth
    R = torch.as_tensor(rotations, dtype=torch.float32, device=device)
    dirs = torch.einsum("pc,vwc->vpw", rays, R).reshape(-1, 3)
    t, rgb = render_rays(world, torch.as_tensor(eye, dtype=torch.float32, device=device), dirs)
    v = R.shape[0]
    images = (rgb * 255.0 + 0.5).clamp(0, 255).to(torch.uint8).reshape(v, height, width, 3)
    return images, t.reshape(v, height, width)


def render_pool(cfg: TeacherTrainConfig, frames: int, seed: int, *, deadline: float | None = None,
                at_least: int = 1, device=None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """``frames`` rendered frames (fewer if ``deadline``, a ``time.monotonic()``, passes, but
    ``at_least`` of them; the deadline is checked after every group of views): uint8
    [N, H, W, 3] and fp16 depth [N, H, W] on the device, and counts for the meta."""
    device = device or torch.device(cfg.device)
    rng = np.random.default_rng(seed)
    images = torch.empty(frames, cfg.height, cfg.width, 3, dtype=torch.uint8, device=device)
    depths = torch.empty(frames, cfg.height, cfg.width, dtype=torch.float16, device=device)
    n, worlds, dropped = 0, 0, 0

    def out_of_time() -> bool:
        return deadline is not None and n >= at_least and time.monotonic() >= deadline

    while n < frames and not out_of_time():
        world, groups = scene_views(rng, cfg)
        worlds += 1
        for eye, rots in groups:
            img, dep = render_group(world, eye, rots, float(rng.uniform(50, 72)), cfg.height, cfg.width, device)
            # A view with most of the image closer than 25 cm (nose on a wall) teaches nothing.
            ok = ((dep < 0.25).float().mean(dim=(1, 2)) < 0.5) & torch.isfinite(dep).all(dim=(1, 2))
            dropped += int((~ok).sum())
            img, dep = img[ok], dep[ok]
            k = min(len(img), frames - n)
            images[n:n + k], depths[n:n + k] = img[:k], dep[:k].clamp(max=60000).half()
            n += k
            if n >= frames or out_of_time():
                break
    return images[:n], depths[:n], {"frames": n, "worlds": worlds, "dropped_views": dropped}


# --------------------------------------------------------------------------------------------
# Augmentation and loss


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, radius: int = 3) -> torch.Tensor:
    """Per-image separable Gaussian blur (sigma [B], 0 = identity) through a grouped conv."""
    b, c, h, w = x.shape
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (t[None] / sigma.clamp(min=1e-3)[:, None]) ** 2)
    k = k / k.sum(1, keepdim=True)
    k = k.repeat_interleave(c, 0)  # [B*C, K]
    y = x.reshape(1, b * c, h, w)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="replicate"), k[:, None, None, :], groups=b * c)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="replicate"), k[:, None, :, None], groups=b * c)
    return y.reshape(b, c, h, w)


def augment(images: torch.Tensor, depth: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [B, H, W, 3] + depth [B, H, W] -> float RGB [B, 3, H, W] in [0, 1] and depth [B, H, W]."""
    b, h, w, _ = images.shape
    dev = images.device
    u = lambda *shape: torch.rand(*shape, generator=gen, device=dev)  # noqa: E731
    x = images.permute(0, 3, 1, 2).float() / 255.0
    d = depth.float()[:, None]
    # Zoom crop and flip (one affine grid for colour and depth; depth nearest, no mixing of edges).
    scale = 0.55 + 0.45 * u(b)
    flip = torch.where(u(b) < 0.5, -1.0, 1.0)
    tx, ty = (2 * u(b) - 1) * (1 - scale), (2 * u(b) - 1) * (1 - scale)
    theta = torch.zeros(b, 2, 3, device=dev)
    theta[:, 0, 0], theta[:, 0, 2] = scale * flip, tx
    theta[:, 1, 1], theta[:, 1, 2] = scale, ty
    grid = F.affine_grid(theta, (b, 3, h, w), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    d = F.grid_sample(d, grid, mode="nearest", padding_mode="border", align_corners=False)[:, 0]
    # Camera response and lighting.
    x = x.clamp(1e-4, 1) ** (0.6 + 0.9 * u(b, 1, 1, 1))
    x = x * (0.5 + 0.9 * u(b, 1, 1, 1)) * (0.8 + 0.4 * u(b, 3, 1, 1))
    field = F.interpolate(0.55 + 0.9 * u(b, 1, 3, 4), size=(h, w), mode="bicubic", align_corners=False)
    x = torch.where(u(b, 1, 1, 1) < 0.5, x * field.clamp(0.3, 1.7), x)
    gray = x.mean(1, keepdim=True)
    x = gray + (x - gray) * torch.where(u(b, 1, 1, 1) < 0.07, 0.0, 1.4 * u(b, 1, 1, 1))
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = mean + (x - mean) * (0.6 + 0.7 * u(b, 1, 1, 1))
    # Optics and sensor.
    x = _gaussian_blur(x, 1.6 * u(b) ** 2)
    small = F.interpolate(x, scale_factor=0.5, mode="bilinear", antialias=True, align_corners=False)
    x = torch.where(u(b, 1, 1, 1) < 0.25, F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False), x)
    noise = torch.randn(x.shape, generator=gen, device=dev)
    x = x + noise * (0.035 * u(b, 1, 1, 1)) * (0.3 + x.clamp(0, 1).sqrt())
    x = torch.round(x.clamp(0, 1) * 255.0) / 255.0
    return x, d


def depth_loss(log_depth: torch.Tensor, gt: torch.Tensor, *, grad_weight: float = 0.5,
               scales: int = 4, alignment: str) -> tuple[torch.Tensor, dict[str, float]]:
    """Scale-and-shift-invariant (``alignment="scale"``: scale-invariant) depth loss of a batch:
    per frame, least-squares align exp(log_depth) [B, H, W] to ``gt`` [B, H, W] (0 or
    non-finite = invalid) in depth space with a scale and a shift (or a scale only), then
    aligned AbsRel + ``grad_weight`` x multi-scale gradient matching of the residual
    (normalised by the frame's mean depth). Frames with < 16 valid pixels count for nothing.
    The logged ``absrel`` is the loss's own (aligned the same way)."""
    valid = torch.isfinite(gt) & (gt > 0)
    gt = torch.where(valid, gt, torch.ones_like(gt))
    w = valid.float()
    n = w.sum(dim=(1, 2))
    used = (n >= 16).float()
    n = n.clamp(min=1)
    pred = torch.exp(log_depth.float().clamp(-20, 20))
    gmean = (w * gt).sum(dim=(1, 2)) / n
    g = gt / gmean[:, None, None]  # scale-free ground truth: every frame weighs the same
    mp = (w * pred).sum(dim=(1, 2)) / n
    mg = (w * g).sum(dim=(1, 2)) / n
    if alignment == "scale":
        # argmin_a sum w (a p - g)^2; pred is divided by its mean first so that 1e-8 stays relative
        p = pred / mp[:, None, None].clamp(min=1e-20)
        a = (w * p * g).sum(dim=(1, 2)) / ((w * p * p).sum(dim=(1, 2)) + 1e-8)
        aligned = a[:, None, None] * p
    elif alignment == "scale_shift":
        cov = (w * (pred - mp[:, None, None]) * (g - mg[:, None, None])).sum(dim=(1, 2)) / n
        var = (w * (pred - mp[:, None, None]) ** 2).sum(dim=(1, 2)) / n
        a = cov / (var + 1e-8)
        aligned = a[:, None, None] * (pred - mp[:, None, None]) + mg[:, None, None]
    else:
        raise ValueError(f"alignment must be scale_shift or scale, got {alignment!r}")
    absrel = ((w * (aligned - g).abs() / g).sum(dim=(1, 2)) / n * used).sum() / used.sum().clamp(min=1)
    grad = aligned.new_zeros(())
    res, m = (aligned - g) * w, w
    for s in range(scales):
        if s:
            res = F.avg_pool2d(res[:, None], 2)[:, 0]
            m = -F.max_pool2d(-m[:, None], 2)[:, 0]  # valid only where all 4 children are
            res = res * m
        gx = (res[:, :, 1:] - res[:, :, :-1]).abs() * m[:, :, 1:] * m[:, :, :-1]
        gy = (res[:, 1:] - res[:, :-1]).abs() * m[:, 1:] * m[:, :-1]
        grad = grad + (gx.sum() + gy.sum()) / m.sum().clamp(min=1)
    loss = absrel + grad_weight * grad / scales
    return loss, {"absrel": float(absrel.detach()), "grad": float(grad.detach() / scales)}


def med_absrel(pred_depth: torch.Tensor, gt: torch.Tensor) -> float:
    """Mean over frames of AbsRel after per-frame median scaling (no shift: a teacher trained
    with ``alignment="scale"`` is scored on what it claims to know)."""
    out = []
    for p, g in zip(pred_depth.double(), gt.double()):
        m = torch.isfinite(g) & (g > 0) & (p > 0)
        scaled = p[m] * (g[m].median() / p[m].median())
        out.append(float(((scaled - g[m]).abs() / g[m]).mean()))
    return float(np.mean(out))


def lsq_absrel(pred_depth: torch.Tensor, gt: torch.Tensor) -> float:
    """Mean over frames of AbsRel after per-frame least-squares scale-and-shift (the metric)."""
    out = []
    for p, g in zip(pred_depth.double(), gt.double()):
        m = torch.isfinite(g) & (g > 0)
        A = torch.stack((p[m], torch.ones_like(p[m])), 1)
        coef = torch.linalg.lstsq(A, g[m][:, None]).solution[:, 0]
        out.append(float(((A @ coef - g[m]).abs() / g[m]).mean()))
    return float(np.mean(out))


# --------------------------------------------------------------------------------------------
# Training


def batch_indices(gen: torch.Generator, pool: int, batch: int, *, extra: int = 0,
                  extra_share: float = 0.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Indices of one batch: (into the rendered pool, into the extra samples or None).
    Without extra samples this draws exactly what the recipe always drew. With them,
    ``extra_share`` x ``batch`` of the frames are extra ones (its fraction is rounded up with
    that probability, so the expected share is exact)."""
    device = gen.device
    if not extra:
        return torch.randint(pool, (batch,), generator=gen, device=device), None
    want = extra_share * batch
    n = int(want) + int(float(torch.rand((), generator=gen, device=device)) < want - int(want))
    return (torch.randint(pool, (batch - n,), generator=gen, device=device),
            torch.randint(extra, (n,), generator=gen, device=device))


def train(cfg: TeacherTrainConfig, *, command: str = "", extra: tuple[torch.Tensor, torch.Tensor] | None = None,
          extra_share: float | None = None, extra_meta: dict | None = None) -> dict:
    """Render the pool, train, score held-out synthetic frames, write weights + meta + log.
    Returns the meta.

    ``extra``: more training frames beside the rendered pool (e.g. real images with another
    model's depth, ``reliev3r teacher-train --distill``): uint8 RGB [N, H, W, 3] and depth [N, H, W]
    (0 or non-finite = invalid) at ``cfg.height`` x ``cfg.width``, augmented and scored by the
    same loss; ``extra_share`` (required with them) is their share of each batch, and
    ``extra_meta`` is recorded with their count and share under the meta's ``data.extra``."""
    start = time.monotonic()
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick its fastest kernels
    cfg.out.mkdir(parents=True, exist_ok=True)
    log = open(cfg.out / "train_log.jsonl", "w")

    def emit(record: dict) -> None:
        record = {"t": round(time.monotonic() - start, 2), **record}
        log.write(json.dumps(record) + "\n")
        log.flush()
        print(json.dumps(record), flush=True)

    deadline = None if cfg.time_budget_s is None else start + cfg.render_fraction * cfg.time_budget_s
    images, depths, pool_info = render_pool(cfg, cfg.pool_frames, cfg.seed, deadline=deadline, at_least=cfg.batch,
                                            device=device)
    val_images, val_depths, _ = render_pool(cfg, cfg.val_frames, cfg.seed + 1_000_003, device=device)
    if extra is not None:
        if extra_share is None or not 0 <= extra_share <= 1:
            raise ValueError(f"extra samples need extra_share in [0, 1], got {extra_share!r}")
        extra_images, extra_depths = extra
        if (extra_images.dtype != torch.uint8 or extra_images.shape[1:] != (cfg.height, cfg.width, 3)
                or extra_depths.shape != extra_images.shape[:3] or len(extra_images) < 1):
            raise ValueError(f"extra samples must be uint8 [N, {cfg.height}, {cfg.width}, 3] and depth "
                             f"[N, {cfg.height}, {cfg.width}], got {tuple(extra_images.shape)} {extra_images.dtype} "
                             f"and {tuple(extra_depths.shape)}")
        extra_images = extra_images.to(device)
        extra_depths = torch.where(torch.isfinite(extra_depths) & (extra_depths > 0), extra_depths.float(),
                                   torch.zeros((), device=extra_depths.device)).to(device)
    render_s = time.monotonic() - start
    emit({"event": "pool", **pool_info, "render_s": round(render_s, 1)})

    if cfg.init is not None:
        model, _ = load_net(cfg.init)
        cfg.widths = model.widths
        model.train()
    else:
        model = EmbeddedDepthNet(cfg.widths)
    model = model.to(device).to(memory_format=torch.channels_last)
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    autocast = device.type == "cuda" and cfg.precision == "bf16"
    train_start = time.monotonic()
    train_budget = None if cfg.time_budget_s is None else cfg.time_budget_s - (train_start - start) - 10.0
    step, skipped, recent = 0, 0, []
    while step < cfg.steps:
        progress = step / cfg.steps
        if train_budget is not None:
            progress = max(progress, (time.monotonic() - train_start) / max(train_budget, 1.0))
        if progress >= 1.0:
            break
        lr = cfg.lr * min(1.0, (step + 1) / max(cfg.warmup, 1)) * 0.5 * (1 + math.cos(math.pi * progress))
        for group in opt.param_groups:
            group["lr"] = lr
        idx, extra_idx = batch_indices(gen, len(images), cfg.batch, extra=0 if extra is None else len(extra_images),
                                       extra_share=extra_share or 0.0)
        if extra_idx is None:
            x, d = augment(images[idx], depths[idx], gen)
        else:
            x, d = augment(torch.cat((images[idx], extra_images[extra_idx])),
                           torch.cat((depths[idx].float(), extra_depths[extra_idx])), gen)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            out = model(x.contiguous(memory_format=torch.channels_last))
        loss, terms = depth_loss(out, d, grad_weight=cfg.grad_weight, alignment=cfg.alignment)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if not (torch.isfinite(loss) and torch.isfinite(gnorm)):
            skipped += 1  # never step on NaN
        else:
            opt.step()
        recent.append(terms["absrel"])
        step += 1
        if step % cfg.log_every == 0 or step == 1:
            emit({"step": step, "lr": lr, "loss": float(loss.detach()), **terms,
                  "absrel_avg": float(np.mean(recent)), "skipped": skipped})
            recent = []
    train_s = time.monotonic() - train_start

    model.eval()
    with torch.inference_mode():
        x = val_images.permute(0, 3, 1, 2).float() / 255.0
        pred = torch.cat([torch.exp(model(x[i:i + 32]).float()) for i in range(0, len(x), 32)])
    pred, gt, ones = pred.cpu(), val_depths.float().cpu(), torch.ones_like(val_depths, dtype=torch.float32).cpu()
    val, const = lsq_absrel(pred, gt), lsq_absrel(ones, gt)
    val_med, const_med = med_absrel(pred, gt), med_absrel(ones, gt)
    unknown = "scale" if cfg.alignment == "scale" else "scale and shift"
    meta = {
        "name": "embedded-unet",
        "space": "depth",
        "output": f"log relative depth (depth = exp(output)), per-frame unknown {unknown}",
        "ambiguity": cfg.alignment,
        "input_size": [cfg.height, cfg.width],
        "params": params,
        "recipe": {
            "command": command,
            "config": {k: (str(v) if isinstance(v, Path) else (list(v) if isinstance(v, tuple) else v))
                       for k, v in asdict(cfg).items()},
            "loss": f"per-frame least-squares {unknown.replace(' and ', '-and-')} aligned AbsRel (depth space) "
                    f"+ {cfg.grad_weight} x 4-scale gradient matching",
            "optimizer": f"AdamW lr {cfg.lr} wd {cfg.weight_decay}, warm-up {cfg.warmup}, cosine",
            "torch": torch.__version__,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        },
        "data": {
            "source": "reliev3r.synthetic ray caster: kitchen rooms (labelers.teacher_train.kitchen_world) "
                      "and reliev3r.synthetic.random_world rooms; augmented (labelers.teacher_train.augment)",
            **pool_info,
            "kitchen_share": cfg.kitchen_share,
            **({} if extra is None else {"extra": {"frames": len(extra_images), "share": extra_share,
                                                   **(extra_meta or {})}}),
        },
        "steps": step,
        "skipped_steps": skipped,
        "wall_s": {"render": round(render_s, 1), "train": round(train_s, 1)},
        "metrics": {"synthetic_val": {"frames": len(val_images), "absrel_lsq": round(val, 4),
                                      "constant_absrel_lsq": round(const, 4), "absrel_med": round(val_med, 4),
                                      "constant_absrel_med": round(const_med, 4)}},
    }
    save_weights(model.cpu(), cfg.out / "embedded_depth.safetensors", meta)
    meta = json.loads((cfg.out / "embedded_depth.json").read_text())
    emit({"event": "done", "steps": step, "train_s": round(train_s, 1), "val_absrel_lsq": round(val, 4),
          "val_constant_absrel_lsq": round(const, 4), "val_absrel_med": round(val_med, 4), "params": params})
    log.close()
    return meta


def config_from_args(args: argparse.Namespace) -> TeacherTrainConfig:
    """``reliev3r teacher-train`` flags plus ``key=value`` options for any other field."""
    known = {f.name: f for f in fields(TeacherTrainConfig)}
    values: dict = {"out": Path(args.out)}
    for name in ("steps", "device", "seed", "time_budget_s"):
        if getattr(args, name, None) is not None:
            values[name] = getattr(args, name)
    for option in getattr(args, "options", None) or []:
        key, sep, text = option.partition("=")
        if not sep or key not in known or key == "out":
            raise ValueError(f"{option!r}: expected key=value with key one of {sorted(set(known) - {'out'})}")
        if key == "widths":
            values[key] = tuple(int(v) for v in text.split(","))
        elif key in ("device", "precision", "alignment"):
            values[key] = text
        elif key == "init":
            values[key] = None if text.lower() == "none" else Path(text)
        elif key == "time_budget_s":
            values[key] = None if text.lower() == "none" else float(text)
        else:
            kind = type(getattr(TeacherTrainConfig(out=Path(".")), key))
            values[key] = _yes_no(key, text) if kind is bool else kind(text)
    return TeacherTrainConfig(**values)


def _yes_no(key: str, text: str) -> bool:
    """A yes/no option's value (``bool("false")`` is True: every value read as yes before)."""
    if text.lower() in ("true", "yes", "1", "on"):
        return True
    if text.lower() in ("false", "no", "0", "off"):
        return False
    raise ValueError(f"{key}={text!r}: expected true or false")


def cli_main(args: argparse.Namespace, command: str = "") -> int:
    try:
        cfg = config_from_args(args)
        check_device_present("--device", cfg.device)  # its default, cuda, on a host without: said here
    except ValueError as err:
        print(f"reliev3r teacher-train: {err}", file=sys.stderr)
        return 2
    meta = train(cfg, command=command)
    print(json.dumps({"out": str(cfg.out), "steps": meta["steps"], "version": meta["version"],
                      **meta["metrics"]["synthetic_val"]}))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m labelers.teacher_train`` = ``reliev3r teacher-train`` where the pipeline's
    own dependencies (zmq, av) are not installed, e.g. on a bare GPU machine."""
    import sys

    parser = argparse.ArgumentParser(prog="python -m labelers.teacher_train", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--time-budget", dest="time_budget_s", type=float, default=None)
    parser.add_argument("options", nargs="*", metavar="key=value")
    argv = sys.argv[1:] if argv is None else argv
    return cli_main(parser.parse_args(argv), command=" ".join(["reliev3r teacher-train", *argv]))


if __name__ == "__main__":
    raise SystemExit(main())
