"""A small Python API for users: images in, depth, confidence, poses and points out.

    from learner.api import Reconstructor
    rec = Reconstructor.from_snapshot("runs/default")          # newest valid snapshot
    out = rec.run(["a.jpg", "b.jpg", "c.jpg"])                  # or HxWx3 uint8 RGB arrays
    out["depth"].shape, out["cam_to_world"].shape                # (3, H, W), (3, 4, 4)

Images are resized to the size the model was trained at (``image_size`` in the snapshot
meta), or else to the first image's size rounded to multiples of the patch size (``size=``
gives a window another: ``reliev3r reconstruct`` brings every window to its first one's, so
that frames turned otherwise than the first are brought to one size, as the streamer brings
every frame to one); intrinsics, given or assumed
(60 degree horizontal field of view), are scaled with the resize. An image of another aspect
is stretched, not cropped, so the outputs cover all of it: fitting it as the streamer fits its
views (cover, crop the centre) or keeping its aspect was measured no better (docs/RESULTS.md,
"Images of another aspect than the model's"). Outputs live at the model's resolution, in the
model's own world frame (defined up to a similarity).

An image file is read as its Exif orientation shows it (OpenCV turns a JPEG or PNG so tagged),
and intrinsics given with it are those of the file as recorded, turned with it
(``reliev3r.imaging.orient_intrinsics``), as the streamer, ``reliev3r eval`` and
``reliev3r reconstruct`` turn an intrinsics file with each frame. An array is taken as it is,
its intrinsics too. Intrinsics that are no pinhole camera's (``reliev3r.imaging.intrinsics_problem``)
or cannot be an image's (principal point far from its centre: ``reliev3r.imaging.intrinsics_mismatch``)
are refused with a ValueError naming the image; intrinsics of another shape than [3, 3] or [V, 3, 3]
with a ValueError saying so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np
import torch

from learner.model import FFRM
from learner.snapshot import load_model, resolve_snapshot
from learner.train import resolve_device
from reliev3r import geometry, imaging

DEFAULT_HFOV_DEG = 60.0


class Reconstructor:
    def __init__(self, model: FFRM, meta: dict[str, Any], device: torch.device):
        self.model = model.eval()
        self.meta = meta
        self.device = device
        size = meta.get("image_size")
        self.image_size: tuple[int, int] | None = (int(size[0]), int(size[1])) if size else None
        """(H, W) the model was trained at, or None (then inputs keep their size, rounded)."""

    @classmethod
    def from_snapshot(cls, path: str | Path, device: str = "auto", *, ema: bool = True) -> "Reconstructor":
        """``path``: a snapshot folder, a ``snapshots`` folder or a run folder (newest valid one)."""
        path = resolve_snapshot(path)
        dev = resolve_device(device)
        model, meta = load_model(path, dev, ema=ema)
        return cls(model, meta, dev)

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        if self.image_size is not None:
            return self.image_size
        p = self.model.cfg.patch_size
        return max(p, round(height / p) * p), max(p, round(width / p) * p)

    @torch.no_grad()
    def run(self, images: Sequence[np.ndarray | str | Path], intrinsics: np.ndarray | None = None, *,
            size: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
        """Reconstruct one window of V images (RGB uint8 HxWx3 arrays or image file paths).

        ``size``: (H, W) every image is resized to, multiples of the patch size (else ValueError);
        None: :meth:`target_size` of the first image.

        ``intrinsics``: [3, 3] shared or [V, 3, 3] per image (another shape raises ValueError), in
        pixels of the given images: of an array as it is, of an image file as recorded (turned here
        as the file's Exif orientation turns the image: module docstring). Intrinsics that are no
        pinhole camera's (focal lengths not finite and > 0, an entry not finite, a last row other
        than 0 0 1: ``reliev3r.imaging.intrinsics_problem``) or cannot be an image's (a principal
        point far from its centre, as those of the frames before they were downsampled put it:
        ``reliev3r.imaging.intrinsics_mismatch``) raise ValueError naming the image, as
        ``reliev3r reconstruct`` refuses such an intrinsics file. Returns float32 arrays: ``depth``
        [V,H,W], ``confidence`` [V,H,W], ``cam_to_world`` [V,4,4], ``intrinsics`` [V,3,3] (of
        the resized images), ``points`` [V,H,W,3] (world frame) and ``images`` uint8 [V,H,W,3]
        (the resized inputs).
        """
        frames = [_read(im) for im in images]
        if len(frames) < 1:
            raise ValueError("images: need at least one image")
        if size is None:
            h, w = self.target_size(*frames[0][0].shape[:2])
        else:
            p = self.model.cfg.patch_size
            if len(size) != 2 or any(int(n) != n or n < p or n % p for n in size):
                raise ValueError(f"size: (H, W) in positive multiples of the patch size {p}, got {tuple(size)}")
            h, w = int(size[0]), int(size[1])
        arr = None if intrinsics is None else np.asarray(intrinsics, dtype=np.float64)
        if arr is not None and arr.shape not in ((3, 3), (len(frames), 3, 3)):
            raise ValueError(f"intrinsics: expected [3, 3] or [{len(frames)}, 3, 3] for {len(frames)} "
                             f"image{'s' * (len(frames) != 1)}, got {list(arr.shape)}")
        resized, ks = [], []
        for i, (frame, turn) in enumerate(frames):
            fh, fw = frame.shape[:2]
            if arr is None:
                k = geometry.intrinsics_from_fov(DEFAULT_HFOV_DEG, fw, fh)
            else:
                given = arr if arr.ndim == 2 else arr[i]
                recorded = (fh, fw) if turn & imaging.TRANSPOSE else (fw, fh)
                if (problem := imaging.intrinsics_problem(given) or imaging.intrinsics_mismatch(given, *recorded)):
                    name = f"images[{i}]" + (f" ({images[i]})" if isinstance(images[i], (str, Path)) else "")
                    raise ValueError(f"{name}: {problem}")
                k = torch.from_numpy(imaging.shown_intrinsics(given, turn, fw, fh)).float()
            ks.append(geometry.resize_intrinsics(k, w / fw, h / fh))
            resized.append(cv2.resize(frame, (w, h), interpolation=cv2.INTER_AREA if fw > w else cv2.INTER_LINEAR))
        stack = np.stack(resized)
        x = torch.from_numpy(stack).to(self.device).permute(0, 3, 1, 2).float().div(255.0)[None]
        pred = self.model(x)
        k = torch.stack(ks).to(self.device)
        cam_points = geometry.unproject_depth(pred.depth[0], k)  # [V,H,W,3]
        world = geometry.transform_points(pred.cam_to_world[0], cam_points.reshape(len(frames), -1, 3))
        return {"depth": _np(pred.depth[0]), "confidence": _np(pred.confidence[0]),
                "cam_to_world": _np(pred.cam_to_world[0]), "intrinsics": _np(k),
                "points": _np(world.reshape(len(frames), h, w, 3)), "images": stack}


def _read(image: np.ndarray | str | Path) -> tuple[np.ndarray, int]:
    """(RGB uint8 [H, W, 3], the orientation it was turned by: ``reliev3r.imaging.orient`` bits):
    a file as its Exif orientation shows it (OpenCV turns it), an array as it is (0)."""
    if isinstance(image, (str, Path)):
        bgr, turn = imaging.read_image_and_orientation(image)  # the file opened once
        if bgr is None:
            raise FileNotFoundError(f"{image}: cannot read image")
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), turn
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"images: expected HxWx3 uint8 RGB arrays, got {arr.dtype}{list(arr.shape)}")
    return arr, 0


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()

