"""Trajectories in the TUM RGB-D format: one line per pose, ``timestamp tx ty tz qx qy qz qw``
(camera-to-world, unit quaternion with the scalar last, ``#`` starts a comment).

numpy only, float64; rotation matrices <-> quaternions by the usual branch-free-enough
Shepperd method, which stays accurate near 180 degrees.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def quaternion_to_matrix(q: np.ndarray) -> np.ndarray:
    """[..., 4] (x, y, z, w), normalised here -> [..., 3, 3]."""
    q = np.asarray(q, dtype=np.float64)
    q = q / np.linalg.norm(q, axis=-1, keepdims=True)
    x, y, z, w = np.moveaxis(q, -1, 0)
    rows = [[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]]
    return np.stack([np.stack(r, -1) for r in rows], -2)


def matrix_to_quaternion(R: np.ndarray) -> np.ndarray:
    """[3, 3] rotation -> (x, y, z, w) with w >= 0."""
    R = np.asarray(R, dtype=np.float64)
    trace = np.trace(R)
    if trace > 0:
        s = 2 * np.sqrt(trace + 1)
        q = [(R[2, 1] - R[1, 2]) / s, (R[0, 2] - R[2, 0]) / s, (R[1, 0] - R[0, 1]) / s, s / 4]
    else:
        i = int(np.argmax(np.diag(R)))
        j, k = (i + 1) % 3, (i + 2) % 3
        s = 2 * np.sqrt(max(1 + R[i, i] - R[j, j] - R[k, k], 1e-300))
        q = [0.0, 0.0, 0.0, (R[k, j] - R[j, k]) / s]
        q[i], q[j], q[k] = s / 4, (R[j, i] + R[i, j]) / s, (R[k, i] + R[i, k]) / s
    q = np.asarray(q)
    q /= np.linalg.norm(q)
    return -q if q[3] < 0 else q


def read_tum(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(timestamps [N], cam_to_world [N, 4, 4]) from a TUM trajectory file."""
    rows = []
    for line_no, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        values = line.replace(",", " ").split()
        if len(values) != 8:
            raise ValueError(f"{path}:{line_no}: expected 'timestamp tx ty tz qx qy qz qw', got {len(values)} fields")
        rows.append([float(v) for v in values])
    if not rows:
        raise ValueError(f"{path}: no poses")
    data = np.asarray(rows)
    poses = np.tile(np.eye(4), (len(data), 1, 1))
    poses[:, :3, :3] = quaternion_to_matrix(data[:, 4:8])
    poses[:, :3, 3] = data[:, 1:4]
    return data[:, 0], poses


def write_tum(path: str | Path, timestamps, cam_to_world: np.ndarray) -> None:
    """Write poses [N, 4, 4] (rigid part used) with their timestamps."""
    lines = ["# timestamp tx ty tz qx qy qz qw (camera-to-world)"]
    for t, pose in zip(timestamps, np.asarray(cam_to_world, dtype=np.float64)):
        q = matrix_to_quaternion(pose[:3, :3])
        lines.append(f"{float(t):.6f} " + " ".join(f"{v:.7f}" for v in (*pose[:3, 3], *q)))
    Path(path).write_text("\n".join(lines) + "\n")
