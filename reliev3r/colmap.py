"""COLMAP sparse models: cameras, images and points3D, as text (``.txt``) or binary (``.bin``).

What COLMAP, pycolmap and the tools built on them (Gaussian splatting, NeRF trainers, OpenMVS)
read as a reconstruction. Conventions, as COLMAP documents its own output format:

* poses are world-to-camera: ``x_cam = R(q) x_world + t`` with the unit quaternion ``q`` written
  scalar first (``QW QX QY QZ``); we take camera-to-world poses and invert them;
* cameras are ``PINHOLE`` (``fx fy cx cy``; model id 1 in the binary files), one per distinct
  (intrinsics, image size), shared by the images that have it;
* pixel coordinates: COLMAP puts the centre of the top-left pixel at (0.5, 0.5), this project
  at (0, 0) (``reliev3r/geometry.py``), so principal points and 2D observations are written
  0.5 pixel further right and down than we hold them;
* a 3D point's track lists its observations as (IMAGE_ID, POINT2D_IDX), the index into that
  image's list of 2D points, whose third entry names the 3D point back (-1: none);
* ``ERROR`` is the point's mean reprojection error in pixels, -1 where it was not computed
  (COLMAP's own default).

Image and camera ids count from 1 in the order given; 3D point ids count from 1 too.

Layout written by :func:`write_model_folder`: ``<folder>/images/<name>`` (the pictures the
intrinsics belong to) and ``<folder>/sparse/0/{cameras,images,points3D}.{txt|bin}``, what
``colmap gui --import_path``, pycolmap and splatting trainers take.
"""

from __future__ import annotations

import hashlib
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import cv2
import numpy as np

from reliev3r import imaging

Format = Literal["txt", "bin"]
FORMATS = ("bin", "txt")
PINHOLE_MODEL_ID = 1
PIXEL_OFFSET = 0.5
"""Added to our pixel coordinates (centre of the top-left pixel at 0) to get COLMAP's (0.5)."""


def rotation_to_quaternion_wxyz(R: np.ndarray) -> np.ndarray:
    """Rotation matrices [..., 3, 3] -> unit quaternions [..., 4] (w, x, y, z), w >= 0.
    Picks the best-conditioned of the four Shepperd branches per matrix."""
    R = np.asarray(R, dtype=np.float64)
    m00, m11, m22 = R[..., 0, 0], R[..., 1, 1], R[..., 2, 2]
    # 4 q_i^2 for i = w, x, y, z
    sq = np.stack([1 + m00 + m11 + m22, 1 + m00 - m11 - m22, 1 - m00 + m11 - m22, 1 - m00 - m11 + m22], -1)
    best = np.argmax(sq, -1)
    d21, d02, d10 = R[..., 2, 1] - R[..., 1, 2], R[..., 0, 2] - R[..., 2, 0], R[..., 1, 0] - R[..., 0, 1]
    s01, s02, s12 = R[..., 0, 1] + R[..., 1, 0], R[..., 0, 2] + R[..., 2, 0], R[..., 1, 2] + R[..., 2, 1]
    # each branch: 4 q_best * q, divided by 4 q_best = 2 sqrt(sq[best]) * ... below
    cand = np.stack([np.stack([sq[..., 0], d21, d02, d10], -1), np.stack([d21, sq[..., 1], s01, s02], -1),
                     np.stack([d02, s01, sq[..., 2], s12], -1), np.stack([d10, s02, s12, sq[..., 3]], -1)], -2)
    q = np.take_along_axis(cand, best[..., None, None], -2)[..., 0, :]
    q = q / np.linalg.norm(q, axis=-1, keepdims=True)
    return np.where(q[..., :1] < 0, -q, q)


@dataclass(kw_only=True)
class SparseModel:
    """Everything a COLMAP sparse model holds, in this project's conventions (numpy).

    ``observations`` are optional: (point index, image index, x, y) rows saying that point p was
    seen in image i at pixel (x, y) (our pixel convention); they become each image's 2D points
    and each point's track. Without them the model has cameras, posed images and a coloured
    point cloud with empty tracks (still a valid COLMAP model)."""

    intrinsics: np.ndarray
    """[N, 3, 3] pinhole intrinsics, pixels of the image (no skew)."""
    cam_to_world: np.ndarray
    """[N, 4, 4]."""
    sizes: np.ndarray
    """[N, 2] (width, height) in pixels."""
    names: list[str]
    """Image file names (relative to the model's image folder)."""
    points: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))
    """[P, 3] world points."""
    colors: np.ndarray | None = None
    """[P, 3] uint8 RGB (default grey)."""
    errors: np.ndarray | None = None
    """[P] mean reprojection error in pixels (default -1: not computed)."""
    obs_point: np.ndarray | None = None
    """[T] int: the observed point's index into ``points``."""
    obs_image: np.ndarray | None = None
    """[T] int: the observing image's index (0-based)."""
    obs_xy: np.ndarray | None = None
    """[T, 2] float: pixel (x, y) in that image, centre of the top-left pixel at (0, 0)."""

    def __post_init__(self) -> None:
        n = len(self.names)
        self.intrinsics = np.asarray(self.intrinsics, np.float64).reshape(-1, 3, 3)
        self.cam_to_world = np.asarray(self.cam_to_world, np.float64).reshape(-1, 4, 4)
        self.sizes = np.broadcast_to(np.asarray(self.sizes, np.int64).reshape(-1, 2), (n, 2))
        if len(self.intrinsics) == 1 and n > 1:
            self.intrinsics = np.repeat(self.intrinsics, n, 0)
        if len(self.intrinsics) != n or len(self.cam_to_world) != n:
            raise ValueError(f"{n} names, {len(self.intrinsics)} intrinsics, {len(self.cam_to_world)} poses")
        if len(set(self.names)) != n:
            raise ValueError("image names must be unique")
        self.points = np.asarray(self.points, np.float64).reshape(-1, 3)
        p = len(self.points)
        self.colors = (np.full((p, 3), 128, np.uint8) if self.colors is None
                       else np.asarray(self.colors, np.uint8).reshape(p, 3))
        self.errors = np.full(p, -1.0) if self.errors is None else np.asarray(self.errors, np.float64).reshape(p)
        given = [x is not None for x in (self.obs_point, self.obs_image, self.obs_xy)]
        if any(given) and not all(given):
            raise ValueError("observations need obs_point, obs_image and obs_xy together")
        if not any(given):
            self.obs_point, self.obs_image, self.obs_xy = np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 2))
        self.obs_point = np.asarray(self.obs_point, np.int64).reshape(-1)
        self.obs_image = np.asarray(self.obs_image, np.int64).reshape(-1)
        self.obs_xy = np.asarray(self.obs_xy, np.float64).reshape(-1, 2)
        t = len(self.obs_point)
        if len(self.obs_image) != t or len(self.obs_xy) != t:
            raise ValueError("obs_point, obs_image and obs_xy differ in length")
        if t and (self.obs_point.min() < 0 or self.obs_point.max() >= p or self.obs_image.min() < 0
                  or self.obs_image.max() >= n):
            raise ValueError("an observation names a point or image that does not exist")

    # ------------------------------------------------------------------ derived, COLMAP side

    def cameras(self) -> tuple[list[tuple[int, int, np.ndarray]], np.ndarray]:
        """(unique cameras as (width, height, params fx fy cx cy in COLMAP pixels), camera index per image)."""
        K = self.intrinsics
        params = np.stack([K[:, 0, 0], K[:, 1, 1], K[:, 0, 2] + PIXEL_OFFSET, K[:, 1, 2] + PIXEL_OFFSET], -1)
        keys = np.concatenate([self.sizes.astype(np.float64), params], -1)
        _, first, inverse = np.unique(keys, axis=0, return_index=True, return_inverse=True)
        order = np.argsort(first)  # camera ids in order of first use
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        cams = [(int(self.sizes[i, 0]), int(self.sizes[i, 1]), params[i]) for i in first[order]]
        return cams, rank[inverse.reshape(-1)]

    def world_to_camera(self) -> tuple[np.ndarray, np.ndarray]:
        """(quaternions [N, 4] (w, x, y, z), translations [N, 3]) of x_cam = R x_world + t."""
        R = self.cam_to_world[:, :3, :3].transpose(0, 2, 1)
        t = -(R @ self.cam_to_world[:, :3, 3, None])[..., 0]
        return rotation_to_quaternion_wxyz(R), t

    def point2d_index(self) -> np.ndarray:
        """[T] index of each observation in its image's list of 2D points (observation order)."""
        order = np.argsort(self.obs_image, kind="stable")
        counts = np.bincount(self.obs_image, minlength=len(self.names))
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        idx = np.empty(len(order), np.int64)
        idx[order] = np.arange(len(order)) - np.repeat(starts, counts)
        return idx


# ---------------------------------------------------------------------- writers

def _fmt(values) -> str:
    return " ".join(repr(float(v)) for v in values)  # shortest text that reads back to the same double


def write_model(model: SparseModel, folder: str | Path, fmt: Format = "bin") -> list[Path]:
    """Write ``cameras``, ``images`` and ``points3D`` (``.bin`` or ``.txt``) into ``folder``."""
    if fmt not in FORMATS:
        raise ValueError(f"COLMAP format must be one of {FORMATS}, got {fmt!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cams, cam_of_image = model.cameras()
    quats, trans = model.world_to_camera()
    p2d = model.point2d_index()
    img_order = np.argsort(model.obs_image, kind="stable")  # observations grouped by image
    per_image = np.bincount(model.obs_image, minlength=len(model.names))
    img_starts = np.concatenate([[0], np.cumsum(per_image)])
    pt_order = np.argsort(model.obs_point, kind="stable")  # observations grouped by point
    track_len = np.bincount(model.obs_point, minlength=len(model.points))
    pt_starts = np.concatenate([[0], np.cumsum(track_len)])
    paths = [folder / f"{name}.{fmt}" for name in ("cameras", "images", "points3D")]
    if fmt == "txt":
        _write_text(model, paths, cams, cam_of_image, quats, trans, p2d, img_order, img_starts, pt_order,
                    track_len, pt_starts)
    else:
        _write_binary(model, paths, cams, cam_of_image, quats, trans, p2d, img_order, img_starts, pt_order,
                      track_len, pt_starts)
    return paths


def _write_text(model, paths, cams, cam_of_image, quats, trans, p2d, img_order, img_starts, pt_order,
                track_len, pt_starts) -> None:
    with open(paths[0], "w") as f:
        f.write("# Camera list with one line of data per camera:\n"
                "#   CAMERA_ID, MODEL, WIDTH, HEIGHT, PARAMS[]\n"
                f"# Number of cameras: {len(cams)}\n")
        for cid, (w, h, params) in enumerate(cams, 1):
            f.write(f"{cid} PINHOLE {w} {h} {_fmt(params)}\n")
    n_obs = len(model.obs_point)
    with open(paths[1], "w") as f:
        f.write("# Image list with two lines of data per image:\n"
                "#   IMAGE_ID, QW, QX, QY, QZ, TX, TY, TZ, CAMERA_ID, NAME\n"
                "#   POINTS2D[] as (X, Y, POINT3D_ID)\n"
                f"# Number of images: {len(model.names)}, mean observations per image: "
                f"{n_obs / max(len(model.names), 1)}\n")
        for i, name in enumerate(model.names):
            if " " in name:
                raise ValueError(f"{name!r}: COLMAP's text format cannot hold spaces in image names")
            f.write(f"{i + 1} {_fmt(quats[i])} {_fmt(trans[i])} {cam_of_image[i] + 1} {name}\n")
            obs = img_order[img_starts[i]:img_starts[i + 1]]
            xy = model.obs_xy[obs] + PIXEL_OFFSET
            ids = (model.obs_point[obs] + 1).tolist()
            f.write(" ".join(f"{x!r} {y!r} {pid}" for (x, y), pid in zip(xy.tolist(), ids)))
            f.write("\n")
    with open(paths[2], "w") as f:
        f.write("# 3D point list with one line of data per point:\n"
                "#   POINT3D_ID, X, Y, Z, R, G, B, ERROR, TRACK[] as (IMAGE_ID, POINT2D_IDX)\n"
                f"# Number of points: {len(model.points)}, mean track length: "
                f"{n_obs / max(len(model.points), 1)}\n")
        img_ids, idxs = (model.obs_image + 1).tolist(), p2d.tolist()
        pt_order_l, starts = pt_order.tolist(), pt_starts.tolist()
        for p, (xyz, rgb, err) in enumerate(zip(model.points.tolist(), model.colors.tolist(), model.errors.tolist())):
            track = " ".join(f"{img_ids[o]} {idxs[o]}" for o in pt_order_l[starts[p]:starts[p + 1]])
            f.write(f"{p + 1} {xyz[0]!r} {xyz[1]!r} {xyz[2]!r} {rgb[0]} {rgb[1]} {rgb[2]} {err!r}"
                    + (f" {track}\n" if track else "\n"))


def _write_binary(model, paths, cams, cam_of_image, quats, trans, p2d, img_order, img_starts, pt_order,
                  track_len, pt_starts) -> None:
    with open(paths[0], "wb") as f:
        f.write(struct.pack("<Q", len(cams)))
        for cid, (w, h, params) in enumerate(cams, 1):
            f.write(struct.pack("<iiQQ4d", cid, PINHOLE_MODEL_ID, w, h, *params))
    point2d = np.dtype([("x", "<f8"), ("y", "<f8"), ("id", "<i8")])
    with open(paths[1], "wb") as f:
        f.write(struct.pack("<Q", len(model.names)))
        for i, name in enumerate(model.names):
            f.write(struct.pack("<i4d3di", i + 1, *quats[i], *trans[i], int(cam_of_image[i]) + 1))
            f.write(name.encode("utf-8") + b"\0")
            obs = img_order[img_starts[i]:img_starts[i + 1]]
            rec = np.empty(len(obs), point2d)
            rec["x"], rec["y"] = (model.obs_xy[obs] + PIXEL_OFFSET).T
            rec["id"] = model.obs_point[obs] + 1
            f.write(struct.pack("<Q", len(obs)))
            f.write(rec.tobytes())
    with open(paths[2], "wb") as f:
        f.write(struct.pack("<Q", len(model.points)))
        # Records differ in length only by their track: write the points of each track length as one array.
        for length in np.unique(track_len):
            pts = np.flatnonzero(track_len == length)
            track = ("track", [("image", "<i4"), ("idx", "<i4")], (int(length),))
            rec = np.empty(len(pts), np.dtype([("id", "<u8"), ("xyz", "<f8", 3), ("rgb", "u1", 3), ("error", "<f8"),
                                               ("n", "<u8"), track]))
            rec["id"], rec["xyz"], rec["rgb"], rec["error"], rec["n"] = (
                pts + 1, model.points[pts], model.colors[pts], model.errors[pts], length)
            if length:
                obs = pt_order[pt_starts[pts][:, None] + np.arange(length)]  # [len(pts), length]
                rec["track"]["image"] = model.obs_image[obs] + 1
                rec["track"]["idx"] = p2d[obs]
            f.write(rec.tobytes())


def write_model_folder(folder: str | Path, model: SparseModel, images: list[np.ndarray] | None = None,
                       fmt: Format = "bin") -> Path:
    """``folder/images/<name>`` (RGB uint8 [H,W,3] each, when given) and ``folder/sparse/0/``;
    returns the sparse model's folder."""
    folder = Path(folder)
    if images is not None:
        (folder / "images").mkdir(parents=True, exist_ok=True)
        for name, rgb in zip(model.names, images, strict=True):
            path = folder / "images" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            if not imaging.write_image(path, cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR)):
                raise OSError(f"{path}: cannot write image")
    sparse = folder / "sparse" / "0"
    write_model(model, sparse, fmt)
    return sparse


def nearest_rigid(cam_to_world: np.ndarray) -> np.ndarray:
    """Poses [..., 4, 4] (float64) with the rotation part replaced by the nearest rotation (SVD):
    a float32 network output is orthonormal only to ~1e-7, the quaternion written is exactly so."""
    out = np.array(cam_to_world, dtype=np.float64)
    u, _, vt = np.linalg.svd(out[..., :3, :3])
    d = np.sign(np.linalg.det(u @ vt))
    u[..., :, 2] *= d[..., None]
    out[..., :3, :3] = u @ vt
    return out


def pixel_observations(keep: np.ndarray, image_index: int, first_point: int) -> tuple[np.ndarray, ...]:
    """Observations for points unprojected from the pixels ``keep`` [H,W] (bool) of one image,
    in row-major order (the order of ``array[keep]``): (obs_point, obs_image, obs_xy)."""
    ys, xs = np.nonzero(keep)
    n = len(xs)
    return (np.arange(first_point, first_point + n), np.full(n, image_index),
            np.stack([xs, ys], -1).astype(np.float64))


def window_model(images: np.ndarray, depth: np.ndarray, confidence: np.ndarray | None, cam_to_world: np.ndarray,
                 intrinsics: np.ndarray, *, keep_fraction: float = 0.5, max_points: int = 200_000,
                 names: list[str] | None = None, seed: int = 0) -> SparseModel:
    """A sparse model of one window of V views: images uint8 [V,H,W,3], depth and confidence
    [V,H,W], cam_to_world [V,4,4], intrinsics [V,3,3]. Each view's most confident
    ``keep_fraction`` of valid pixels becomes a point observed by that view at that pixel
    (reprojection error 0 by construction); at most ``max_points`` points (random subset)."""
    v, h, w = depth.shape
    cam_to_world = nearest_rigid(cam_to_world)  # what the points use is what the file says
    pts, cols, op, oi, oxy = [], [], [], [], []
    count = 0
    grid = np.stack(np.meshgrid(np.arange(w), np.arange(h)), -1).astype(np.float64)  # [H, W, 2] (x, y)
    for k in range(v):
        keep = np.isfinite(depth[k]) & (depth[k] > 0)
        if confidence is not None and keep_fraction < 1 and keep.any():
            keep &= confidence[k] >= np.quantile(confidence[k][keep], 1 - keep_fraction)
        K = intrinsics[k].astype(np.float64)
        uv = grid[keep]
        z = depth[k][keep].astype(np.float64)
        cam = np.stack([(uv[:, 0] - K[0, 2]) / K[0, 0] * z, (uv[:, 1] - K[1, 2]) / K[1, 1] * z, z], -1)
        pose = cam_to_world[k]
        pts.append(cam @ pose[:3, :3].T + pose[:3, 3])
        cols.append(images[k][keep])
        a, b, c = pixel_observations(keep, k, count)
        op.append(a), oi.append(b), oxy.append(c)
        count += len(a)
    points, colors = np.concatenate(pts), np.concatenate(cols)
    obs_point, obs_image, obs_xy = np.concatenate(op), np.concatenate(oi), np.concatenate(oxy)
    if len(points) > max_points:
        pick = np.sort(np.random.default_rng(seed).choice(len(points), max_points, replace=False))
        points, colors, obs_point, obs_image, obs_xy = (points[pick], colors[pick], np.arange(max_points),
                                                        obs_image[pick], obs_xy[pick])
    return SparseModel(intrinsics=intrinsics, cam_to_world=cam_to_world, sizes=np.array([[w, h]] * v),
                       names=names or [f"{k:06d}.png" for k in range(v)], points=points, colors=colors,
                       errors=np.zeros(len(points)), obs_point=obs_point, obs_image=obs_image, obs_xy=obs_xy)


# ---------------------------------------------------------------------- reliev3r export --colmap

def model_folder_name(name: str, taken: set[str]) -> str:
    """A folder name for window ``name`` in ASCII letters, digits, ``_ . -``: where the name had
    other characters (``szene_ä``, ``szene_ö``) or it is taken, a digest of the name tells it
    apart, so no window's model is written over another's."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
    if safe != name or safe in taken:
        safe = f"{safe}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"
    while safe in taken:  # the same name twice
        safe += "_"
    return safe


def export_held_out(cfg, args) -> int:
    """``reliev3r export --colmap DIR``: run the snapshot on the run's held-out windows (``--data``,
    default ``evaluator.data``; ``--windows``, default ``evaluator.windows``) and write one model
    per window: ``DIR/<window>/images/`` and ``DIR/<window>/sparse/0/`` (the poses ``--poses`` names:
    by default fitted to the model's depth as ``reliev3r reconstruct``'s, ``model`` the pose head's; the
    window's intrinsics, the confident half of each view's depth as points), plus ``DIR/index.json``.
    The ``synthetic`` spec's held-out scenes are those of the snapshot's run (``eval_world/``)."""
    import json

    from tqdm import tqdm

    from evaluation.datasets import load_windows, spec_problem
    from learner.api import Reconstructor
    from learner.snapshot import resolve_given
    from reliev3r.config import run_folder, with_run_config

    fmt = getattr(args, "colmap_format", None) or "bin"
    snap = resolve_given("--checkpoint", args.checkpoint)
    run = run_folder(snap)  # its views, windows, data and held-out synthetic world: the run's
    cfg = with_run_config(cfg, run, files=getattr(args, "config", []), overrides=getattr(args, "overrides", []))
    data = getattr(args, "data", None) or cfg.evaluator.data
    if problem := spec_problem(data):  # before the model loads
        raise ValueError(f"{'--data' if getattr(args, 'data', None) else 'evaluator.data'} {problem}")
    rec = Reconstructor.from_snapshot(snap, device="cpu", matcher=cfg.labeler.matcher,
                                      threshold_px=cfg.labeler.ransac_threshold_px)
    poses = getattr(args, "poses", None) or "fitted"
    height, width = rec.image_size or (cfg.streamer.height, cfg.streamer.width)
    views = getattr(args, "views", None) or cfg.streamer.views
    windows = load_windows(data, views=views, height=height, width=width,
                           windows=getattr(args, "windows", None) or cfg.evaluator.windows,
                           stride=cfg.evaluator.stride, run_dir=run, synthetic_cfg=cfg.streamer.synthetic)
    out = Path(args.colmap)
    index = []
    for window in tqdm(windows, desc="COLMAP export", unit="window"):
        pred = rec.run(list(window.images), intrinsics=window.intrinsics, poses=poses)
        model = window_model(pred["images"], pred["depth"], pred["confidence"], pred["cam_to_world"],
                             pred["intrinsics"])
        folder = out / model_folder_name(window.name, {w["folder"] for w in index})
        write_model_folder(folder, model, list(pred["images"]), fmt)
        index.append({"window": window.name, "folder": folder.name, "images": len(model.names),
                      "points": len(model.points)})
    out.mkdir(parents=True, exist_ok=True)
    (out / "index.json").write_text(json.dumps({"data": data, "views": views, "format": fmt, "poses": poses,
                                                "windows": index}, indent=2))
    print(f"wrote {len(index)} COLMAP models ({fmt}) under {out}")
    return 0
