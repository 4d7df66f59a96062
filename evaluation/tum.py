"""Trajectories in the TUM RGB-D format: one line per pose, ``timestamp tx ty tz qx qy qz qw``
(camera-to-world, unit quaternion with the scalar last, ``#`` starts a comment).

Reading one (:func:`read_tum_lines`), a quaternion is normalised (its length carries no
rotation). A line that cannot be placed in time, not 8 fields or a timestamp that is not a
finite number, refuses the file; a line whose pose is no pose (a field that is not a number, a
value that is not finite, a zero quaternion) is said by its line and its pose left out, so that
a dataset skips the windows of the frame it belongs to (``evaluation.datasets``);
:func:`read_tum` refuses the file for it.

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


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def read_tum_lines(path: str | Path) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    """(timestamps [N], cam_to_world [N, 4, 4], bad) from a TUM trajectory file, a row per pose
    line: ``bad`` maps the row of each line whose pose is no pose to ``'PATH:LINE: problem'``
    (its pose is NaN). ValueError naming the line where one cannot be placed (module docstring)."""
    stamps, rows, bad = [], [], {}
    for line_no, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        values = line.replace(",", " ").split()
        if len(values) != 8:
            raise ValueError(f"{path}:{line_no}: expected 'timestamp tx ty tz qx qy qz qw', got {len(values)} fields")
        stamp = _number(values[0])
        if stamp is None or not np.isfinite(stamp):
            raise ValueError(f"{path}:{line_no}: the timestamp {values[0]!r} is not a finite number, so the line "
                             "cannot be matched to a frame")
        numbers = [_number(v) for v in values[1:]]
        problem = None
        if (word := next((v for v, x in zip(values[1:], numbers) if x is None), None)) is not None:
            problem = f"{word!r} is not a number"
        elif not np.isfinite(numbers).all():
            problem = f"the pose is not finite (tx ty tz qx qy qz qw = {' '.join(values[1:])})"
        elif not np.linalg.norm(numbers[3:]) > 0:
            problem = "the quaternion is zero (no rotation)"
        if problem is not None:
            bad[len(rows)] = f"{path}:{line_no}: {problem}"
            numbers = [np.nan] * 7
        stamps.append(stamp)
        rows.append(numbers)
    if not rows:
        raise ValueError(f"{path}: no poses")
    data = np.asarray(rows, dtype=np.float64)
    poses = np.tile(np.eye(4), (len(data), 1, 1))
    good = np.ones(len(data), bool)
    good[list(bad)] = False
    poses[~good, :3] = np.nan
    poses[good, :3, :3] = quaternion_to_matrix(data[good, 3:7])
    poses[:, :3, 3] = data[:, :3]
    return np.asarray(stamps), poses, bad


def read_tum(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(timestamps [N], cam_to_world [N, 4, 4]) from a TUM trajectory file; ValueError naming
    the first line that is no pose (:func:`read_tum_lines`)."""
    stamps, poses, bad = read_tum_lines(path)
    if bad:
        raise ValueError(next(iter(bad.values())))
    return stamps, poses


def write_tum(path: str | Path, timestamps, cam_to_world: np.ndarray) -> None:
    """Write poses [N, 4, 4] (rigid part used) with their timestamps."""
    lines = ["# timestamp tx ty tz qx qy qz qw (camera-to-world)"]
    for t, pose in zip(timestamps, np.asarray(cam_to_world, dtype=np.float64)):
        q = matrix_to_quaternion(pose[:3, :3])
        lines.append(f"{float(t):.6f} " + " ".join(f"{v:.7f}" for v in (*pose[:3, 3], *q)))
    Path(path).write_text("\n".join(lines) + "\n")
