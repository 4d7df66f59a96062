"""``reliev3r view RUN_OR_RECONSTRUCTION [--out FILE.rrd]``: a Rerun recording (``rerun-sdk``,
the optional extra ``view``) to open with ``rerun FILE.rrd``.

* a reconstruction folder (``reliev3r reconstruct --out``): on the ``frame`` timeline, each
  frame's camera (pose from ``poses.txt``, pinhole frustum), its depth (``depth/NNNNNN.png``)
  and image (``colmap/images/``, when ``--colmap`` wrote them); the point cloud
  (``points.ply``) static. Each frame's intrinsics are those ``reconstruct`` unprojected it
  with (``reconstruction.json``; from a reconstruction written before they were recorded
  there: its COLMAP model's first camera, else a 60 degree horizontal field of view). A
  replacement of its outputs that a kill interrupted is finished first (:func:`reliev3r.swap.settle`);
* a run folder (``snapshots/`` + ``config.yaml``): on the ``step`` timeline, every snapshot
  (at most ``--snapshots``, spread over the run) predicts the first held-out window(s) of the
  evaluator's data: cameras, images, depth and the unprojected points, Sim(3)-aligned to the
  ground truth (as the ATE is) where the window has ground-truth poses, which are logged too.
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import cv2
import numpy as np

from reliev3r import imaging, swap

MAX_POINTS = 200_000


def _rerun():
    try:
        import rerun as rr
    except ImportError as err:
        raise RuntimeError("reliev3r view needs rerun-sdk: pip install -e '.[view]'") from err
    return rr


def unproject(depth: np.ndarray, K: np.ndarray, cam_to_world: np.ndarray) -> np.ndarray:
    """World points [H*W,3] of one view's depth [H,W] (pixel centres at integer coordinates)."""
    H, W = depth.shape
    v, u = np.mgrid[0:H, 0:W]
    rays = np.stack((u, v, np.ones_like(u)), -1).reshape(-1, 3).astype(np.float64) @ np.linalg.inv(K).T
    cam = rays * depth.reshape(-1, 1)
    return cam @ cam_to_world[:3, :3].T + cam_to_world[:3, 3]


def log_camera(rec, rr, path: str, cam_to_world: np.ndarray, K: np.ndarray, image: np.ndarray | None,
               depth: np.ndarray | None, size: tuple[int, int], *, colour=None) -> None:
    """One camera: ``path`` its pose, ``path/image`` its frustum (pinhole), image and depth."""
    H, W = size
    rec.log(path, rr.Transform3D(translation=cam_to_world[:3, 3], mat3x3=cam_to_world[:3, :3]))
    extent = float(np.median(depth[depth > 0])) * 0.2 if depth is not None and (depth > 0).any() else None
    rec.log(f"{path}/image", rr.Pinhole(image_from_camera=K, width=W, height=H, image_plane_distance=extent,
                                        color=colour))
    if image is not None:
        rec.log(f"{path}/image", rr.Image(image))
    if depth is not None:
        rec.log(f"{path}/image/depth", rr.DepthImage(depth.astype(np.float32), meter=1.0))


def log_window(rec, rr, prefix: str, images: np.ndarray, depth: np.ndarray, cam_to_world: np.ndarray,
               K: np.ndarray, *, max_points: int = MAX_POINTS, seed: int = 0) -> None:
    """A window's cameras (``prefix/camV``) and its unprojected, coloured points (``prefix/points``)."""
    V, H, W = depth.shape
    pts, cols = [], []
    for v in range(V):
        log_camera(rec, rr, f"{prefix}/cam{v}", cam_to_world[v], K[v], images[v], depth[v], (H, W))
        valid = (depth[v] > 0).reshape(-1) & np.isfinite(depth[v]).reshape(-1)
        pts.append(unproject(depth[v], K[v], cam_to_world[v])[valid])
        cols.append(images[v].reshape(-1, 3)[valid])
    points, colours = np.concatenate(pts), np.concatenate(cols)
    if len(points) > max_points:
        keep = np.random.default_rng(seed).choice(len(points), max_points, replace=False)
        points, colours = points[keep], colours[keep]
    rec.log(f"{prefix}/points", rr.Points3D(points, colors=colours, radii=-1.5))


def sim3_to_gt(pred_c2w: np.ndarray, gt_c2w: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """(s, R, t) of the similarity mapping predicted camera centres onto the ground truth's:
    the ATE's alignment (``evaluation.metrics.trajectory_sim3``)."""
    import torch

    from evaluation.metrics import trajectory_sim3

    s, R, t = trajectory_sim3(torch.from_numpy(pred_c2w[:, :3, 3]), torch.from_numpy(gt_c2w[:, :3, 3]))
    return float(s), R.numpy(), t.numpy()


def apply_sim3(s: float, R: np.ndarray, t: np.ndarray, cam_to_world: np.ndarray) -> np.ndarray:
    """Poses [V,4,4] under x -> s R x + t (rotations rotated; depth must be scaled by s)."""
    out = cam_to_world.astype(np.float64).copy()
    out[:, :3, :3] = R @ out[:, :3, :3]
    out[:, :3, 3] = s * out[:, :3, 3] @ R.T + t
    return out


def log_predictions(rec, rr, step: int, windows, predictions) -> None:
    """One snapshot's predictions (depth [V,H,W], cam_to_world [V,4,4]) of ``windows`` at ``step``."""
    rec.set_time("step", sequence=int(step))
    for w, (window, (depth, c2w)) in enumerate(zip(windows, predictions)):
        depth, c2w = np.asarray(depth, np.float64), np.asarray(c2w, np.float64)
        if window.gt_cam_to_world is not None:
            s, R, t = sim3_to_gt(c2w, np.asarray(window.gt_cam_to_world, np.float64))
            depth, c2w = depth * s, apply_sim3(s, R, t, c2w)
        log_window(rec, rr, f"world/window{w}", window.images, depth, c2w, window.intrinsics)


def log_ground_truth(rec, rr, windows) -> None:
    """The windows' ground-truth cameras (green frusta), static."""
    for w, window in enumerate(windows):
        if window.gt_cam_to_world is None:
            continue
        H, W = window.images.shape[1:3]
        for v, c2w in enumerate(window.gt_cam_to_world):
            path = f"world/ground_truth/window{w}/cam{v}"
            rec.log(path, rr.Transform3D(translation=c2w[:3, 3], mat3x3=c2w[:3, :3]), static=True)
            rec.log(f"{path}/image", rr.Pinhole(image_from_camera=window.intrinsics[v], width=W, height=H,
                                                image_plane_distance=0.1, color=(40, 160, 40)), static=True)


def read_ply(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(points [N,3], colours [N,3] uint8) of a binary little-endian vertex PLY (``points.ply``)."""
    kinds = {"float": "<f4", "float32": "<f4", "double": "<f8", "uchar": "u1", "uint8": "u1", "int": "<i4"}
    with open(path, "rb") as f:
        fields, count = [], 0
        while (line := f.readline().decode("ascii").strip()) != "end_header":
            parts = line.split()
            if parts[:2] == ["element", "vertex"]:
                count = int(parts[2])
            elif parts and parts[0] == "property":
                fields.append((parts[2], kinds[parts[1]]))
        data = np.frombuffer(f.read(np.dtype(fields).itemsize * count), dtype=fields, count=count)
    points = np.stack((data["x"], data["y"], data["z"]), -1)
    names = data.dtype.names
    colours = (np.stack((data["red"], data["green"], data["blue"]), -1) if "red" in names
               else np.full((count, 3), 200, np.uint8))
    return points, colours


def reconstruction_intrinsics(folder: Path, frames: int) -> np.ndarray | None:
    """Each frame's intrinsics [frames, 3, 3] in pixels of its depth map, as ``reconstruct``
    unprojected it: its ``reconstruction.json`` ``intrinsics`` (one 3x3 for every frame, or one
    per frame); a reconstruction written before they were recorded there: its COLMAP model's
    first camera (``cameras.txt`` or ``cameras.bin``); None: neither."""
    summary = folder / "reconstruction.json"
    if summary.is_file():
        try:
            K = np.asarray(json.loads(summary.read_text()).get("intrinsics"), np.float64)
        except (ValueError, TypeError, AttributeError):  # not JSON, not an object, not numbers
            K = np.zeros(0)
        if K.shape == (3, 3):
            return np.broadcast_to(K, (frames, 3, 3))
        if K.shape == (frames, 3, 3):
            return K
    K = _colmap_intrinsics(folder)
    return None if K is None else np.broadcast_to(K, (frames, 3, 3))


def _colmap_intrinsics(folder: Path) -> np.ndarray | None:
    """The first PINHOLE camera of ``colmap/sparse/0`` (text or binary), in our pixel convention."""
    sparse = folder / "colmap" / "sparse" / "0"
    params = None
    if (sparse / "cameras.txt").is_file():
        for line in (sparse / "cameras.txt").read_text().splitlines():
            parts = line.split()
            if parts and not line.startswith("#") and parts[1] == "PINHOLE":
                params = tuple(map(float, parts[4:8]))
                break
    elif (sparse / "cameras.bin").is_file():
        from reliev3r.colmap import PINHOLE_MODEL_ID

        data = (sparse / "cameras.bin").read_bytes()
        if len(data) >= 8 + 24 + 32 and struct.unpack_from("<Q", data)[0] > 0:
            _, model, _, _ = struct.unpack_from("<iiQQ", data, 8)
            if model == PINHOLE_MODEL_ID:
                params = struct.unpack_from("<4d", data, 8 + 24)
    if params is None:
        return None
    fx, fy, cx, cy = params
    return np.array([[fx, 0, cx - 0.5], [0, fy, cy - 0.5], [0, 0, 1]])  # COLMAP's half-pixel offset


def log_reconstruction(rec, rr, folder: Path) -> int:
    """A ``reconstruct`` output folder; returns the number of frames logged."""
    from evaluation.tum import read_tum

    _, poses = read_tum(folder / "poses.txt")
    depth_files = sorted((folder / "depth").glob("*.png"))
    image_files = sorted((folder / "colmap" / "images").glob("*.png"))
    Ks = reconstruction_intrinsics(folder, len(poses))
    if (folder / "points.ply").is_file():
        points, colours = read_ply(folder / "points.ply")
        if len(points) > MAX_POINTS:
            keep = np.random.default_rng(0).choice(len(points), MAX_POINTS, replace=False)
            points, colours = points[keep], colours[keep]
        rec.log("world/points", rr.Points3D(points, colors=colours, radii=-1.5), static=True)
    centres = poses[:, :3, 3]
    rec.log("world/trajectory", rr.LineStrips3D([centres], colors=[(31, 119, 180)]), static=True)
    for i, c2w in enumerate(poses):
        rec.set_time("frame", sequence=i)
        depth = (imaging.read_image(depth_files[i], cv2.IMREAD_UNCHANGED).astype(np.float32) / 1000.0
                 if i < len(depth_files) else None)
        image = (cv2.cvtColor(imaging.read_image(image_files[i]), cv2.COLOR_BGR2RGB) if i < len(image_files) else None)
        size = (depth.shape if depth is not None else image.shape[:2] if image is not None else (480, 640))
        H, W = size[:2]
        Ki = Ks[i] if Ks is not None else np.array([[W / (2 * np.tan(np.radians(30))), 0, (W - 1) / 2],
                                               [0, W / (2 * np.tan(np.radians(30))), (H - 1) / 2], [0, 0, 1]])
        log_camera(rec, rr, "world/camera", c2w, Ki, image, depth, (H, W))
    return len(poses)


def log_run(rec, rr, cfg, run: Path, *, snapshots: int = 8, windows: int = 1, device: str = "cpu") -> int:
    """A run folder: its snapshots on the first held-out window(s); returns the snapshots logged."""
    from evaluation.datasets import load_windows
    from evaluation.evaluate import predict
    from learner.snapshot import list_snapshots, load_model

    found = list_snapshots(run / "snapshots")
    if not found:
        raise FileNotFoundError(f"{run}: no snapshots")
    picks = sorted({int(round(x)) for x in np.linspace(0, len(found) - 1, min(snapshots, len(found)))})
    st = cfg.streamer
    wins = load_windows(cfg.evaluator.data, views=st.views, height=st.height, width=st.width, windows=windows,
                        stride=cfg.evaluator.stride, run_dir=run, synthetic_cfg=st.synthetic)[:windows]
    log_ground_truth(rec, rr, wins)
    for k in picks:
        step, path = found[k]
        model, _ = load_model(path, device)
        preds = [tuple(x.cpu().numpy() for x in predict(model, w, device)) for w in wins]
        log_predictions(rec, rr, step, wins, preds)
    return len(picks)


def open_recording(out: Path):
    rr = _rerun()
    rec = rr.RecordingStream("reliev3r")
    out.parent.mkdir(parents=True, exist_ok=True)
    rec.save(str(out))
    rec.log("world", rr.ViewCoordinates.RDF, static=True)  # OpenCV camera axes: x right, y down, z forward
    return rec, rr


def close_recording(rec) -> None:
    rec.flush()
    rec.disconnect()


def main(cfg, args) -> int:
    target = Path(args.target)
    out = Path(args.out) if args.out else target / "view.rrd"
    swap.settle(target)  # a reconstruction's replacement of an earlier one that a kill interrupted
    reconstruction = (target / "poses.txt").is_file()
    if not reconstruction and not (target / "snapshots").is_dir():
        print(f"reliev3r view: {target}: neither a reconstruction (poses.txt) nor a run (snapshots/)", file=sys.stderr)
        return 2
    if not reconstruction:  # the run's windows: its evaluator.data, checked before rerun is looked for
        from reliev3r.config import with_run_config

        try:
            cfg = with_run_config(cfg, target, files=args.config, overrides=args.overrides)
        except Exception as err:  # a run config this version cannot read: said as log_run's problems are
            print(f"reliev3r view: {type(err).__name__}: {err}", file=sys.stderr)
            return 1
        if problem := cfg.data_problem():  # as eval and up say it, not once the recording is open
            print(f"reliev3r view: {problem}", file=sys.stderr)
            return 2
    try:
        rec, rr = open_recording(out)
    except RuntimeError as err:
        print(f"reliev3r view: {err}", file=sys.stderr)
        return 2
    try:
        if reconstruction:
            what = f"{log_reconstruction(rec, rr, target)} frames"
        else:
            what = f"{log_run(rec, rr, cfg, target, snapshots=args.snapshots, windows=args.windows)} snapshots"
    except Exception as err:  # a config or data problem: say it, leave no half recording
        close_recording(rec)
        out.unlink(missing_ok=True)
        print(f"reliev3r view: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    close_recording(rec)
    print(f"wrote {out} ({what}); open it with: rerun {out}")
    return 0
