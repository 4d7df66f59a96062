"""The synthetic world: procedural rooms rendered by analytic ray casting, with exact ground truth.

It is the embedded default video source (works offline on a fresh machine), the fixture of
geometry tests, and training/evaluation data whose depth and poses are exact.

A scene is a room (a box seen from inside: floor, ceiling, four walls, 3-6 m wide, 2.4-3.2 m
high) holding a few boxes (on the floor, rotated about the vertical, and one tilted box in the
air) and spheres. Every surface carries a procedural texture (checker, stripes, bricks or
blotches, each modulated by multi-octave value noise, random colours per surface) so that
feature matchers find plenty of corners. A camera moves smoothly inside the room (a straight
drift of 0.5-1.3 m plus small wiggles; the gaze sweeps left and right), keeping clear of the
walls and of every object.

Conventions (those of ``reliev3r.geometry``):

* World frame: metres, +z up, the floor is ``z = 0``, the room is centred on x = y = 0.
* Cameras: OpenCV axes (x right, y down, z forward); ``cam_to_world`` 4x4; intrinsics from
  ``geometry.intrinsics_from_fov`` (square pixels, principal point at the image centre);
  pixel centres at integer coordinates.
* ``depth`` is z-depth in metres of the surface seen through each pixel centre.

What is exact:

* Depth and poses: each pixel's depth is the analytic intersection of its centre ray with the
  nearest surface, in float32 arithmetic (a wall at 2 m reads 2 m to 2e-6; CPU and GPU renders
  agree to 4e-5 relative). No anti-aliasing is applied, so the colour of a pixel is the colour
  of the very point its depth describes (and edges alias, as in a real pinhole sample).
* Colour is view-independent: albedo (fixed to the surface, in surface coordinates) times
  Lambert shading from one fixed point light plus ambient, no shadows, no specular. The same
  3D point has the same RGB in every frame (before video compression).
* Videos are H.264 (yuv420p, crf 15): images are close to, not equal to, the rendered ones
  (PSNR > 30 dB). The ground truth beside them (``<name>.gt.npz``) is exact.

Seeds: ``render_scene(seed)`` is deterministic (same seed, same scene and trajectory on any
machine: they are drawn with numpy; a GPU render may differ from a CPU one in the last float
bits). Speed: ~65 ms of one CPU thread per 144x192 frame, ~15 ms per 192x256 frame (height x width) on an H100.
``ensure_world`` derives each scene's seed from ``(cfg.seed, scene index)`` through
``numpy.random.SeedSequence``, so different ``cfg.seed`` give unrelated scenes: the evaluator's
held-out world is ``ensure_world(folder, replace(cfg, seed=cfg.seed + 1000))`` (file names carry
the seed, so both worlds can share a folder).
"""

from __future__ import annotations

import io
import json
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np
import torch
from torch import Tensor

from reliev3r import durable, geometry, imaging

RENDER_VERSION = 1
"""Bumped whenever the renderer's output changes, so that cached worlds are rendered again."""

GT_SUFFIX = ".gt.npz"
_EPS = 1e-4  # metres: hits closer than this along a ray are ignored (self-intersection guard)


# --------------------------------------------------------------------------------------------
# Scene description


@dataclass(frozen=True, slots=True)
class Material:
    """Procedural albedo of one surface. ``pattern``: 0 checker, 1 stripes, 2 bricks, 3 blotches."""

    color_a: tuple[float, float, float]
    color_b: tuple[float, float, float]
    pattern: int
    period: float
    """Pattern period in metres."""
    angle: float
    """Rotation of the pattern in the surface plane, radians."""
    noise_freq: float
    """Base frequency of the value-noise detail, cycles per metre."""
    noise_amp: float
    """Strength of the detail modulation, in [0, 1]."""
    seed: int


@dataclass(frozen=True, slots=True)
class Box:
    """Oriented box: ``rotation`` maps box axes to world axes; ``half_size`` along box axes."""

    center: tuple[float, float, float]
    half_size: tuple[float, float, float]
    rotation: tuple[tuple[float, float, float], ...]
    material: Material


@dataclass(frozen=True, slots=True)
class Sphere:
    center: tuple[float, float, float]
    radius: float
    material: Material


@dataclass(frozen=True, slots=True)
class World:
    """A room ``[room_min, room_max]`` seen from inside, the objects in it and its light."""

    room_min: tuple[float, float, float]
    room_max: tuple[float, float, float]
    room_materials: tuple[Material, ...]
    """Six materials: -x wall, +x wall, -y wall, +y wall, floor, ceiling."""
    boxes: tuple[Box, ...] = ()
    spheres: tuple[Sphere, ...] = ()
    light: tuple[float, float, float] = (0.0, 0.0, 2.5)
    """Point light position (Lambert only, no shadows: shading is view-independent)."""
    ambient: float = 0.35

    def materials(self) -> list[Material]:
        """Materials in surface-id order: room faces, then boxes, then spheres."""
        return [*self.room_materials, *(b.material for b in self.boxes), *(s.material for s in self.spheres)]


@dataclass(slots=True)
class Scene:
    """A rendered clip with exact ground truth.

    images: uint8 [N, H, W, 3] RGB. depth: float32 [N, H, W] z-depth in metres.
    cam_to_world: float32 [N, 4, 4] (OpenCV camera axes). intrinsics: float32 [3, 3].
    """

    images: Tensor
    depth: Tensor
    cam_to_world: Tensor
    intrinsics: Tensor
    world: World | None = field(default=None, repr=False)


@dataclass(slots=True)
class GroundTruth:
    """Ground truth of a synthetic video; frame i of the decoded video is index i.

    depth: float32 [N, H, W] metres. cam_to_world: float32 [N, 4, 4]. intrinsics: float32 [3, 3].
    """

    depth: np.ndarray
    cam_to_world: np.ndarray
    intrinsics: np.ndarray
    fps: int
    config: dict
    bad_poses: dict[int, str] = field(default_factory=dict)
    """Frame index -> ``'PATH: frame K: problem'`` where ``cam_to_world[K]`` is no pose
    (``reliev3r.imaging.pose_problem``; as stored): that frame has no ground-truth pose."""


# --------------------------------------------------------------------------------------------
# Random scenes and trajectories


def hsv(h: float, s: float, v: float) -> tuple[float, float, float]:
    """RGB in [0, 1] of hue ``h``, saturation ``s`` and value ``v`` (each in [0, 1])."""
    k = (np.array([5.0, 3.0, 1.0]) + h * 6.0) % 6.0
    rgb = v - v * s * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)
    return tuple(float(c) for c in rgb)


def _random_material(rng: np.random.Generator) -> Material:
    # A dark and a light shade of nearly one hue: strong contrast makes corners, and keeping
    # it in luminance rather than hue survives yuv420p's half-resolution chroma in the video.
    h, sat = rng.uniform(), rng.uniform(0.2, 0.8)
    return Material(
        color_a=hsv(h, sat, rng.uniform(0.12, 0.35)),
        color_b=hsv((h + rng.uniform(-0.06, 0.06)) % 1.0, sat * rng.uniform(0.3, 1.0), rng.uniform(0.7, 1.0)),
        pattern=int(rng.integers(0, 4)),
        period=float(rng.uniform(0.12, 0.45)),
        angle=float(rng.uniform(0.0, math.pi)),
        noise_freq=float(rng.uniform(3.0, 8.0)),
        noise_amp=float(rng.uniform(0.3, 0.7)),
        seed=int(rng.integers(0, 2**20)),
    )


def _rot_z(yaw: float) -> np.ndarray:
    c, s = math.cos(yaw), math.sin(yaw)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q = rng.normal(size=4)
    w, x, y, z = q / np.linalg.norm(q)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


@dataclass(frozen=True, slots=True)
class CameraPath:
    """Smooth camera path on s in [0, 1]: a straight drift plus two sinusoidal wiggles for the
    eye (metres), a gaze whose yaw sweeps sinusoidally around ``yaw0`` at a slight downward
    ``pitch`` (radians)."""

    center: np.ndarray
    drift: np.ndarray
    wiggle_amp: np.ndarray  # [2, 3]
    wiggle_freq: np.ndarray  # [2]
    wiggle_phase: np.ndarray  # [2, 3]
    yaw0: float
    yaw_amp: float
    yaw_freq: float
    yaw_phase: float
    pitch: float

    def eyes(self, s: np.ndarray) -> np.ndarray:
        wig = sum(self.wiggle_amp[k] * np.sin(2 * math.pi * self.wiggle_freq[k] * s[:, None] + self.wiggle_phase[k])
                  for k in range(2))
        return self.center + (s[:, None] - 0.5) * self.drift + wig

    def gazes(self, s: np.ndarray) -> np.ndarray:
        yaw = self.yaw0 + self.yaw_amp * np.sin(2 * math.pi * self.yaw_freq * s + self.yaw_phase)
        pitch = self.pitch + 0.05 * np.sin(2 * math.pi * 0.7 * s + self.yaw_phase)
        return np.stack((np.cos(yaw) * np.cos(pitch), np.sin(yaw) * np.cos(pitch), np.sin(pitch)), -1)


def _wall_distance(p: np.ndarray, direction: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> float:
    with np.errstate(divide="ignore"):
        t = np.where(direction > 0, (hi - p) / direction, (lo - p) / direction)
    return float(np.min(t[np.abs(direction) > 1e-9]))


def _random_path(rng: np.random.Generator, lo: np.ndarray, hi: np.ndarray, margin: float) -> CameraPath:
    size = hi - lo
    for _ in range(1000):
        center = np.array([rng.uniform(-0.2, 0.2) * size[0], rng.uniform(-0.2, 0.2) * size[1], rng.uniform(1.2, 1.7)])
        heading = rng.uniform(0, 2 * math.pi)
        length = rng.uniform(0.5, 1.3)
        drift = length * np.array([math.cos(heading), math.sin(heading), rng.uniform(-0.15, 0.15)])
        path = CameraPath(
            center=center,
            drift=drift,
            wiggle_amp=rng.uniform(0.03, 0.12, size=(2, 3)) * np.array([1.0, 1.0, 0.5]),
            wiggle_freq=np.array([rng.uniform(0.4, 1.0), rng.uniform(1.0, 2.0)]),
            wiggle_phase=rng.uniform(0, 2 * math.pi, size=(2, 3)),
            yaw0=0.0, yaw_amp=0.0, yaw_freq=0.0, yaw_phase=0.0, pitch=0.0,  # the gaze comes next
        )
        eyes = path.eyes(np.linspace(0, 1, 64))
        if np.any(eyes < lo + margin) or np.any(eyes > hi - margin):
            continue
        # Look towards the open side of the room: a camera staring at a wall 40 cm away
        # sees little and has no parallax to speak of.
        yaws = rng.uniform(0, 2 * math.pi, size=16)
        reach = np.array([_wall_distance(center, np.array([math.cos(y), math.sin(y), 0.0]), lo, hi) for y in yaws])
        good = yaws[reach >= 0.7 * reach.max()]
        return replace(
            path, yaw0=float(good[0]), yaw_amp=float(rng.uniform(0.25, 0.6)), yaw_freq=float(rng.uniform(0.3, 0.8)),
            yaw_phase=float(rng.uniform(0, 2 * math.pi)), pitch=float(rng.uniform(-0.45, -0.15)),
        )
    raise RuntimeError("no camera path fits the room")  # unreachable for rooms >= 3 m


def _point_box_distance(p: np.ndarray, box: Box) -> np.ndarray:
    """Distance of points [N, 3] to a solid box (0 inside)."""
    local = (p - np.asarray(box.center)) @ np.asarray(box.rotation)
    outside = np.maximum(np.abs(local) - np.asarray(box.half_size), 0.0)
    return np.linalg.norm(outside, axis=-1)


def random_world(rng: np.random.Generator) -> tuple[World, CameraPath]:
    """A random room with objects, and a camera path that keeps clear of all of them."""
    size = np.array([rng.uniform(3.0, 6.0), rng.uniform(3.0, 6.0), rng.uniform(2.4, 3.2)])
    lo, hi = np.array([-size[0] / 2, -size[1] / 2, 0.0]), np.array([size[0] / 2, size[1] / 2, size[2]])
    path = _random_path(rng, lo, hi, margin=0.6)
    eyes = path.eyes(np.linspace(0, 1, 256))
    clearance = 0.45  # metres between any camera position and any object

    def spot() -> np.ndarray:
        # Objects go where the camera looks (within ~57 degrees), so that every clip shows some.
        yaw = path.yaw0 + rng.uniform(-1.0, 1.0)
        dist = rng.uniform(1.0, 3.2)
        return path.center + dist * np.array([math.cos(yaw), math.sin(yaw), 0.0])

    boxes: list[Box] = []
    spheres: list[Sphere] = []
    n_floor, n_spheres = int(rng.integers(2, 5)), int(rng.integers(1, 4))
    plans = ["floor"] * n_floor + ["air"] + ["sphere"] * n_spheres
    for kind in plans:
        for _ in range(50):
            c = spot()
            if kind == "floor":
                half = np.array([rng.uniform(0.15, 0.5), rng.uniform(0.15, 0.5), rng.uniform(0.15, 0.6)])
                c[2] = half[2]
                obj = Box(tuple(c), tuple(half), tuple(map(tuple, _rot_z(rng.uniform(0, math.pi)))),
                          _random_material(rng))
            elif kind == "air":
                half = rng.uniform(0.1, 0.3, size=3)
                c[2] = rng.uniform(0.7, 2.0)
                obj = Box(tuple(c), tuple(half), tuple(map(tuple, _random_rotation(rng))), _random_material(rng))
            else:
                r = rng.uniform(0.15, 0.45)
                c[2] = rng.uniform(r, 2.0)
                obj = Sphere(tuple(c), float(r), _random_material(rng))
            if isinstance(obj, Box):
                extent = np.abs(np.asarray(obj.rotation)) @ np.asarray(obj.half_size)  # AABB half size
                near_cam = _point_box_distance(eyes, obj).min()
            else:
                extent = np.full(3, obj.radius)
                near_cam = np.linalg.norm(eyes - c, axis=-1).min() - obj.radius
            inside = np.all(c - extent >= lo - 1e-6) and np.all(c + extent <= hi)
            if inside and near_cam > clearance:
                (boxes if isinstance(obj, Box) else spheres).append(obj)
                break
    light = (float(rng.uniform(-0.3, 0.3) * size[0]), float(rng.uniform(-0.3, 0.3) * size[1]), float(size[2] - 0.3))
    world = World(
        room_min=tuple(lo), room_max=tuple(hi), room_materials=tuple(_random_material(rng) for _ in range(6)),
        boxes=tuple(boxes), spheres=tuple(spheres), light=light, ambient=float(rng.uniform(0.3, 0.4)),
    )
    return world, path


def trajectory(path: CameraPath, frames: int) -> np.ndarray:
    """cam_to_world [N, 4, 4] float64 along ``path`` (s = i / (N - 1))."""
    s = np.linspace(0.0, 1.0, frames)
    eyes = torch.from_numpy(path.eyes(s))
    return geometry.look_at(eyes, eyes + torch.from_numpy(path.gazes(s))).numpy()


# --------------------------------------------------------------------------------------------
# Ray casting


def _hash(ix: Tensor, iy: Tensor, seed: Tensor) -> Tensor:
    """Integer lattice hash -> float in [0, 1). Masks keep every product inside int64."""
    h = ((ix & 0xFFFF) * 73856093) ^ ((iy & 0xFFFF) * 19349663) ^ ((seed & 0xFFFFF) * 83492791)
    h = h & 0x7FFFFFFF
    h = ((h ^ (h >> 13)) * 1274126177) & 0x7FFFFFFF
    h = h ^ (h >> 16)
    return (h & 0xFFFFFF).to(torch.float32) / float(1 << 24)


def _value_noise(u: Tensor, v: Tensor, seed: Tensor) -> Tensor:
    fu, fv = torch.floor(u), torch.floor(v)
    iu, iv = fu.to(torch.int64), fv.to(torch.int64)
    tu, tv = u - fu, v - fv
    tu, tv = tu * tu * (3 - 2 * tu), tv * tv * (3 - 2 * tv)
    a, b = _hash(iu, iv, seed), _hash(iu + 1, iv, seed)
    c, d = _hash(iu, iv + 1, seed), _hash(iu + 1, iv + 1, seed)
    return torch.lerp(torch.lerp(a, b, tu), torch.lerp(c, d, tu), tv)


def _fbm(u: Tensor, v: Tensor, seed: Tensor, octaves: int = 4) -> Tensor:
    total, amp, norm = torch.zeros_like(u), 1.0, 0.0
    for o in range(octaves):
        total = total + amp * _value_noise(u, v, seed + 101 * o)
        norm += amp
        u, v, amp = u * 2.03 + 17.1, v * 2.03 - 5.3, amp * 0.5
    return total / norm


def _shade_albedo(uv: Tensor, mat: dict[str, Tensor]) -> Tensor:
    """Albedo [M, 3] at surface coordinates ``uv`` [M, 2] (metres) of per-ray materials."""
    ca, sa = torch.cos(mat["angle"]), torch.sin(mat["angle"])
    u = (ca * uv[:, 0] + sa * uv[:, 1]) / mat["period"]
    v = (-sa * uv[:, 0] + ca * uv[:, 1]) / mat["period"]
    seed = mat["seed"]
    fu, fv = torch.floor(u), torch.floor(v)
    checker = torch.remainder(fu + fv, 2.0)
    stripes = torch.remainder(fu, 2.0)
    # Bricks: rows of tiles, every other row shifted by half a tile, dark grout between them,
    # and a random shade per tile.
    row = torch.floor(v * 2.0)
    bu = u + 0.5 * torch.remainder(row, 2.0)
    col = torch.floor(bu)
    gu, gv = bu - col, v * 2.0 - row
    grout = (torch.minimum(gu, 1 - gu) < 0.06) | (torch.minimum(gv, 1 - gv) < 0.12)
    bricks = torch.where(grout, torch.zeros_like(u),
                         0.25 + 0.75 * _hash(col.to(torch.int64), row.to(torch.int64), seed + 7))
    blotches = (_fbm(u * 0.8, v * 0.8, seed + 13, octaves=3) > 0.5).to(torch.float32)
    patterns = torch.stack((checker, stripes, bricks, blotches), 0)
    q = patterns.gather(0, mat["pattern"][None])[0]
    albedo = torch.lerp(mat["color_a"], mat["color_b"], q[:, None])
    detail = _fbm(uv[:, 0] * mat["noise_freq"], uv[:, 1] * mat["noise_freq"], seed + 29)
    albedo = albedo * (1.0 + mat["noise_amp"][:, None] * 1.6 * (detail[:, None] - 0.5))
    return albedo.clamp(0.0, 1.0)


@dataclass(slots=True)
class _WorldTensors:
    lo: Tensor
    hi: Tensor
    box_center: Tensor  # [B, 3]
    box_half: Tensor  # [B, 3]
    box_rot: Tensor  # [B, 3, 3]
    sph_center: Tensor  # [S, 3]
    sph_radius: Tensor  # [S]
    light: Tensor
    ambient: float
    materials: dict[str, Tensor]


def _world_tensors(world: World, device) -> _WorldTensors:
    def t(x, dtype=torch.float32) -> Tensor:
        return torch.as_tensor(np.asarray(x, dtype=np.float64), dtype=dtype, device=device)

    mats = world.materials()
    return _WorldTensors(
        lo=t(world.room_min), hi=t(world.room_max),
        box_center=t([b.center for b in world.boxes]).reshape(-1, 3),
        box_half=t([b.half_size for b in world.boxes]).reshape(-1, 3),
        box_rot=t([b.rotation for b in world.boxes]).reshape(-1, 3, 3),
        sph_center=t([s.center for s in world.spheres]).reshape(-1, 3),
        sph_radius=t([s.radius for s in world.spheres]).reshape(-1),
        light=t(world.light), ambient=world.ambient,
        materials={
            "color_a": t([m.color_a for m in mats]), "color_b": t([m.color_b for m in mats]),
            "pattern": torch.tensor([m.pattern for m in mats], dtype=torch.int64, device=device),
            "period": t([m.period for m in mats]), "angle": t([m.angle for m in mats]),
            "noise_freq": t([m.noise_freq for m in mats]), "noise_amp": t([m.noise_amp for m in mats]),
            "seed": torch.tensor([m.seed for m in mats], dtype=torch.int64, device=device),
        },
    )


def _safe(d: Tensor) -> Tensor:
    # Rays parallel to a slab would divide by zero; a tiny signed direction gives +-inf-like
    # distances with the right sign instead of NaN.
    return torch.where(d.abs() < 1e-12, torch.full_like(d, 1e-12), d)


def _face_uv(local: Tensor, axis: Tensor, face: Tensor) -> Tensor:
    """In-plane coordinates [M, 2] of points ``local`` [M, 3] on faces normal to ``axis``;
    each face gets its own offset so that opposite faces do not repeat each other."""
    idx_u = torch.remainder(axis + 1, 3)
    idx_v = torch.remainder(axis + 2, 3)
    u = local.gather(-1, idx_u[..., None])[..., 0]
    v = local.gather(-1, idx_v[..., None])[..., 0]
    return torch.stack((u + 11.3 * face, v - 7.7 * face), -1)


def _cast(wt: _WorldTensors, origin: Tensor, dirs: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Nearest hit of rays ``origin + t * dirs`` (dirs [M, 3], unnormalised).

    Returns t [M], surface id [M], unit normal [M, 3] and surface coordinates [M, 2]."""
    m = dirs.shape[0]
    sd = _safe(dirs)
    # Room, from inside: the exit distance along each axis, the nearest axis wins.
    t_axes = torch.where(sd > 0, (wt.hi - origin) / sd, (wt.lo - origin) / sd)
    t_room, axis = t_axes.min(-1)
    positive = sd.gather(-1, axis[:, None])[:, 0] > 0
    face = 2 * axis + positive.to(torch.int64)
    ts, ids, normals, uvs = [t_room], [face], [], []
    p = origin + t_room[:, None] * dirs
    n = torch.zeros(m, 3, dtype=dirs.dtype, device=dirs.device)
    n.scatter_(-1, axis[:, None], torch.where(positive, -1.0, 1.0)[:, None].to(dirs.dtype))
    normals.append(n)
    uvs.append(_face_uv(p, axis, face))

    n_room = 6
    for b in range(wt.box_center.shape[0]):
        rot = wt.box_rot[b]
        o_l = (origin - wt.box_center[b]) @ rot
        d_l = _safe(dirs @ rot)
        t1, t2 = (-wt.box_half[b] - o_l) / d_l, (wt.box_half[b] - o_l) / d_l
        t_near, ax = torch.minimum(t1, t2).max(-1)
        t_far = torch.maximum(t1, t2).min(-1).values
        hit = (t_near <= t_far) & (t_near > _EPS)
        ts.append(torch.where(hit, t_near, torch.full_like(t_near, math.inf)))
        ids.append(torch.full_like(face, n_room + b))
        sign = -torch.sign(d_l.gather(-1, ax[:, None]))
        n_l = torch.zeros_like(d_l).scatter_(-1, ax[:, None], sign)
        normals.append(n_l @ rot.T)
        local = o_l + t_near[:, None] * d_l
        box_face = 2 * ax + (sign[:, 0] > 0).to(torch.int64)
        uvs.append(_face_uv(local, ax, box_face))

    n_box = wt.box_center.shape[0]
    for s in range(wt.sph_center.shape[0]):
        oc = origin - wt.sph_center[s]
        a = (dirs * dirs).sum(-1)
        half_b = dirs @ oc
        c = oc @ oc - wt.sph_radius[s] ** 2
        disc = half_b * half_b - a * c
        t = (-half_b - torch.sqrt(disc.clamp(min=0.0))) / a
        hit = (disc >= 0) & (t > _EPS)
        ts.append(torch.where(hit, t, torch.full_like(t, math.inf)))
        ids.append(torch.full_like(face, n_room + n_box + s))
        q = (oc + t[:, None] * dirs) / wt.sph_radius[s]
        normals.append(q)
        # Longitude/latitude in metres of arc: texture fixed to the sphere.
        r = wt.sph_radius[s]
        lon = torch.atan2(q[:, 1], q[:, 0]) * r
        lat = torch.asin(q[:, 2].clamp(-1.0, 1.0)) * r
        uvs.append(torch.stack((lon, lat), -1))

    t_all = torch.stack(ts, 0)
    t_best, k = t_all.min(0)
    pick = k[None, :, None]
    sid = torch.stack(ids, 0).gather(0, k[None])[0]
    normal = torch.stack(normals, 0).gather(0, pick.expand(1, m, 3))[0]
    uv = torch.stack(uvs, 0).gather(0, pick.expand(1, m, 2))[0]
    return t_best, sid, normal, uv


def _render_rays(wt: _WorldTensors, origin: Tensor, dirs: Tensor) -> tuple[Tensor, Tensor]:
    t, sid, normal, suv = _cast(wt, origin, dirs)
    mat = {k: v[sid] for k, v in wt.materials.items()}
    albedo = _shade_albedo(suv, mat)
    point = origin + t[:, None] * dirs
    to_light = torch.nn.functional.normalize(wt.light - point, dim=-1)
    lambert = (normal * to_light).sum(-1).clamp(min=0.0)
    return t, albedo * (wt.ambient + (1.0 - wt.ambient) * lambert)[:, None]


def render_rays(world: World, origin: Tensor, dirs: Tensor) -> tuple[Tensor, Tensor]:
    """Cast rays ``origin + t * dirs`` (origin [3], dirs [M, 3] float32, not normalised).

    Returns the ray parameter ``t`` [M] of the nearest hit (the z-depth when the rays' camera
    z component is 1) and linear RGB [M, 3] in [0, 1] (the image is ``round(255 * rgb)``)."""
    return _render_rays(_world_tensors(world, dirs.device), origin, dirs)


def camera_rays(cam_to_world: Tensor, intrinsics: Tensor, uv: Tensor) -> tuple[Tensor, Tensor]:
    """Origin [3] and world directions [M, 3] of pixels ``uv`` [M, 2] of one camera, scaled
    so that the ray parameter equals z-depth in that camera."""
    rays_cam = geometry.unproject_points(uv, torch.ones_like(uv[:, 0]), intrinsics)
    return cam_to_world[:3, 3], rays_cam @ cam_to_world[:3, :3].T


def render_views(world: World, cam_to_world: Tensor, intrinsics: Tensor, height: int, width: int,
                 *, on_frame: Callable[[], None] | None = None) -> tuple[Tensor, Tensor]:
    """Render ``world`` from explicit poses: uint8 images [N, H, W, 3] and z-depth [N, H, W].

    ``cam_to_world`` [N, 4, 4] and ``intrinsics`` [3, 3] live on the device to render on."""
    device = cam_to_world.device
    wt = _world_tensors(world, device)
    K = intrinsics.to(device=device, dtype=torch.float32)
    uv = geometry.pixel_grid(height, width, device=device).reshape(-1, 2)
    images, depths = [], []
    for pose in cam_to_world.to(torch.float32):
        t, rgb = _render_rays(wt, *camera_rays(pose, K, uv))
        images.append((rgb * 255.0 + 0.5).clamp(0, 255).to(torch.uint8).reshape(height, width, 3))
        depths.append(t.reshape(height, width))
        if on_frame is not None:
            on_frame()
    return torch.stack(images), torch.stack(depths)


def render_scene(seed: int, *, frames: int, height: int, width: int, fov_deg: float = 60.0, device="cpu",
                 on_frame: Callable[[], None] | None = None, select: Sequence[int] | None = None) -> Scene:
    """Render the random scene of ``seed``: a clip of ``frames`` frames with exact ground truth.

    ``select``: render only these frame indices of the clip (in this order); the result equals
    the full render indexed by them, at the cost of ``len(select)`` frames."""
    if frames < 1 or height < 1 or width < 1:
        raise ValueError("frames, height and width must be >= 1")
    rng = np.random.default_rng(seed)
    world, path = random_world(rng)
    poses = trajectory(path, frames)
    if select is not None:
        index = np.asarray(select, dtype=np.int64)
        if index.ndim != 1 or len(index) == 0 or index.min() < 0 or index.max() >= frames:
            raise ValueError(f"select must be a non-empty list of frame indices in [0, {frames}), got {select!r}")
        poses = poses[index]
    poses = torch.from_numpy(poses).to(device=device, dtype=torch.float32)
    K = geometry.intrinsics_from_fov(fov_deg, width, height).to(device)
    images, depth = render_views(world, poses, K, height, width, on_frame=on_frame)
    return Scene(images=images, depth=depth, cam_to_world=poses, intrinsics=K, world=world)


# --------------------------------------------------------------------------------------------
# Files


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_scene(scene: Scene, folder: Path, name: str, fps: int = 10, *, config: dict | None = None) -> Path:
    """Write ``folder/name.mp4`` (H.264, yuv420p, crf 15) and ``folder/name.gt.npz`` beside it.

    Atomic and durable (``reliev3r.durable``): both go to temporary names first and are
    fsynced; the old video is removed before the new ground truth lands and the video is
    renamed last, the folder fsynced after each of the three, so a present video always has
    matching ground truth, after a power loss too. ``config`` (JSON-able) is stored in the npz
    for cache checks."""
    import av

    n, h, w, _ = scene.images.shape
    if h % 2 or w % 2:
        raise ValueError(f"height and width must be even for yuv420p video, got {h}x{w}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    video, gt = folder / f"{name}.mp4", folder / f"{name}{GT_SUFFIX}"
    tmp_video, tmp_gt = _tmp(video), _tmp(gt)
    arrays = io.BytesIO()
    np.savez_compressed(
        arrays,
        depth=scene.depth.detach().cpu().numpy().astype(np.float32),
        cam_to_world=scene.cam_to_world.detach().cpu().numpy().astype(np.float32),
        intrinsics=scene.intrinsics.detach().cpu().numpy().astype(np.float32),
        fps=np.int64(fps),
        config=np.array(json.dumps(config or {}, sort_keys=True)),
    )
    try:
        images = scene.images.detach().cpu().numpy()
        with av.open(str(tmp_video), mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=fps)
            stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
            # Full-range colour would be nicer but players disagree on it; BT.601 limited is
            # what decoders assume by default, so decoded RGB stays close to the render.
            stream.options = {"crf": "15", "preset": "medium"}
            for img in images:
                for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        durable.fsync(tmp_video)
        try:
            video.unlink()
        except FileNotFoundError:
            pass
        else:
            durable.fsync(folder)  # gone before the new ground truth can be found beside it
        durable.write(gt, arrays.getbuffer(), tmp=tmp_gt)
        os.replace(tmp_video, video)
        durable.fsync(folder)
    finally:
        tmp_gt.unlink(missing_ok=True)
        tmp_video.unlink(missing_ok=True)
    return video


def _gt_path(video: Path) -> Path:
    video = Path(video)
    return video.with_name(video.stem + GT_SUFFIX)


def load_ground_truth(video: Path) -> GroundTruth | None:
    """Ground truth stored beside a synthetic ``video`` (``<stem>.gt.npz``), None if absent.
    Each pose is checked as a pose file's is (``reliev3r.imaging.pose_problem``): one that is no
    pose is in :attr:`GroundTruth.bad_poses`, named with the file and the frame; ValueError
    naming the file where ``cam_to_world`` is not [N, 4, 4]."""
    path = _gt_path(video)
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as z:
        gt = GroundTruth(
            depth=z["depth"].astype(np.float32),
            cam_to_world=z["cam_to_world"].astype(np.float32),
            intrinsics=z["intrinsics"].astype(np.float32),
            fps=int(z["fps"]),
            config=json.loads(str(z["config"])) if "config" in z.files else {},
        )
    if gt.cam_to_world.ndim != 3 or gt.cam_to_world.shape[1:] != (4, 4):
        raise ValueError(f"{path}: cam_to_world of shape {gt.cam_to_world.shape}, not [N, 4, 4]")
    gt.bad_poses = {k: f"{path}: frame {k}: {problem}" for k, pose in enumerate(gt.cam_to_world)
                    if (problem := imaging.pose_problem(pose)) is not None}
    return gt


def scene_seed(base_seed: int, index: int) -> int:
    """Seed of scene ``index`` of a world with ``base_seed`` (unrelated across base seeds)."""
    return int(np.random.SeedSequence([base_seed, index]).generate_state(1, dtype=np.uint32)[0])


def _cached_config(video: Path) -> dict | None:
    gt = _gt_path(video)
    if not (video.is_file() and gt.is_file()):
        return None
    try:
        with np.load(gt, allow_pickle=False) as z:
            return json.loads(str(z["config"]))
    except (OSError, ValueError, KeyError):
        return None  # a damaged file is rendered again


class WorldSpec(Protocol):
    """What :func:`ensure_world` reads (``streamer.synthetic``, a ``streamer.config.SyntheticConfig``)."""

    scenes: int
    frames: int
    height: int
    width: int
    fov_deg: float
    seed: int


def ensure_world(folder: Path, cfg: WorldSpec, *, fps: int = 10, progress: bool = True) -> list[Path]:
    """Render the ``cfg.scenes`` scenes of ``cfg`` into ``folder`` unless already there.

    Idempotent: a scene is rendered again only when a file is missing or its stored config
    (with ``RENDER_VERSION``) differs. Files: ``synth-s<seed>-<index>.mp4`` + ``.gt.npz``.
    Held-out scenes: pass ``replace(cfg, seed=cfg.seed + 1000)``. Returns sorted video paths.
    NotADirectoryError, before any rendering, where ``folder`` is a file or lies under one."""
    from tqdm import tqdm

    if cfg.height % 2 or cfg.width % 2:
        raise ValueError(f"synthetic height and width must be even (yuv420p video), got {cfg.height}x{cfg.width}")
    folder = Path(folder)
    for above in (folder, *folder.parents):  # said before a frame is rendered, not once the first is written
        if above.exists():
            if not above.is_dir():
                raise NotADirectoryError(f"{folder}: {above} is not a folder")
            break
    todo: list[tuple[Path, int, dict]] = []
    videos = []
    for k in range(cfg.scenes):
        seed = scene_seed(cfg.seed, k)
        video = folder / f"synth-s{cfg.seed}-{k:03d}.mp4"
        wanted = {
            "render_version": RENDER_VERSION, "scene_seed": seed, "frames": cfg.frames, "height": cfg.height,
            "width": cfg.width, "fov_deg": float(cfg.fov_deg), "fps": fps,
        }
        videos.append(video)
        if _cached_config(video) != wanted:
            todo.append((video, seed, wanted))
    if todo:
        with tqdm(total=len(todo) * cfg.frames, desc=f"rendering synthetic world into {folder}", unit="frame",
                  disable=not progress) as bar:
            for video, seed, wanted in todo:
                scene = render_scene(seed, frames=cfg.frames, height=cfg.height, width=cfg.width,
                                     fov_deg=cfg.fov_deg, on_frame=lambda: bar.update(1))
                write_scene(scene, folder, video.stem, fps=fps, config=wanted)
    return sorted(videos)


__all__ = [
    "RENDER_VERSION", "Box", "GroundTruth", "Material", "Scene", "Sphere", "World", "WorldSpec", "camera_rays",
    "ensure_world", "hsv", "load_ground_truth", "random_world", "render_rays", "render_scene", "render_views",
    "scene_seed", "trajectory", "write_scene",
]
