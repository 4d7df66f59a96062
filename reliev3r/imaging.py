"""Fitting images (and their depth maps and intrinsics) to a target size.

Aspect is kept: resize so the target is covered, then crop the centre. Intrinsics follow
exactly (``reliev3r.geometry`` conventions). Shared by the streamer, the evaluator and
reconstruction, so every stage sees frames prepared the same way.
"""

from __future__ import annotations

import re
from pathlib import Path

import cv2
import numpy as np


def natural_key(path: Path) -> tuple[list, str]:
    """Sort key of an image file in natural order (``frame2`` before ``frame10``): its name's
    runs of digits compared as numbers (any that ``int()`` reads), the rest as text; the name
    itself breaks ties (``7.png``, ``07.png``). One order for the streamer, reconstruct and eval."""
    name = Path(path).name
    return [int(t) if i % 2 else t for i, t in enumerate(re.split(r"(\d+)", name))], name


def read_intrinsics(path: Path) -> np.ndarray:
    """3x3 intrinsics from a text file of 9 numbers (row-major) or 4 (``fx fy cx cy``), with
    finite, positive focal lengths and a last row of 0 0 1 (what the wire format takes); raises
    ``ValueError`` naming the file (``OSError``: unreadable)."""
    try:
        values = np.array(Path(path).read_text().split(), dtype=np.float64)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    if values.size == 9:
        K = values.reshape(3, 3)
    elif values.size == 4:
        fx, fy, cx, cy = values
        K = np.array([[fx, 0, cx], [0, fy, cy], [0, 0, 1.0]])
    else:
        raise ValueError(f"{path}: expected 9 or 4 numbers, got {values.size}")
    if not np.isfinite(K).all() or K[0, 0] <= 0 or K[1, 1] <= 0:
        raise ValueError(f"{path}: focal lengths must be finite and > 0")
    if not np.array_equal(K[2], [0.0, 0.0, 1.0]):  # every window would be refused downstream
        raise ValueError(f"{path}: the last row must be 0 0 1, got {' '.join(f'{v:g}' for v in K[2])}")
    return K


def fit_plan(height: int, width: int, target_h: int, target_w: int) -> tuple[int, int, int, int]:
    """(new_w, new_h, left, top): resize to new_w x new_h (one scale for both sides, so the
    target is covered) then crop at (left, top) to the target size."""
    scale = max(target_h / height, target_w / width)
    new_h, new_w = max(target_h, round(height * scale)), max(target_w, round(width * scale))
    return new_w, new_h, (new_w - target_w) // 2, (new_h - target_h) // 2


def fit_image(image: np.ndarray, target_h: int, target_w: int, *, nearest: bool = False,
              like: tuple[int, int] | None = None) -> np.ndarray:
    """Resize-and-centre-crop an [H, W(, C)] image. ``nearest`` for depth maps (no blending
    across depth edges or into invalid zeros; centre-exact, so a pixel samples the source pixel
    under its centre); area averaging otherwise.

    ``like=(height, width)``: the image is another resolution of a view of that size (a depth
    map coarser than its colour frame, say) and lands on exactly the grid the colour frame gets.
    """
    h, w = like if like is not None else image.shape[:2]
    new_w, new_h, left, top = fit_plan(h, w, target_h, target_w)
    new_size = (new_w, new_h)
    # INTER_NEAREST samples floor(x * scale), half a source pixel off the centre convention of
    # reliev3r.geometry; INTER_NEAREST_EXACT samples the pixel under the centre.
    interp = cv2.INTER_NEAREST_EXACT if nearest else (cv2.INTER_AREA if new_size[0] < image.shape[1]
                                                      else cv2.INTER_LINEAR)
    resized = cv2.resize(image, new_size, interpolation=interp)
    return np.ascontiguousarray(resized[top: top + target_h, left: left + target_w])


def fit_intrinsics(intrinsics: np.ndarray, height: int, width: int, target_h: int, target_w: int) -> np.ndarray:
    """Intrinsics [3, 3] of an image after :func:`fit_image`."""
    new_w, new_h, left, top = fit_plan(height, width, target_h, target_w)
    import torch  # here, not at the top: reading frames and intrinsics files needs no torch

    from reliev3r import geometry

    K = torch.as_tensor(np.asarray(intrinsics, dtype=np.float64))
    K = geometry.resize_intrinsics(K, new_w / width, new_h / height)
    return geometry.crop_intrinsics(K, left, top).numpy().astype(np.float32)
