"""A small Python API for users: images in, depth, confidence, poses and points out.

    from learner.api import Reconstructor
    rec = Reconstructor.from_snapshot("runs/default")          # newest valid snapshot
    out = rec.run(["a.jpg", "b.jpg", "c.jpg"])                  # or HxWx3 uint8 RGB arrays
    out["depth"].shape, out["cam_to_world"].shape                # (3, H, W), (3, 4, 4)
    out["fitted"]                        # (3,) bool: the views whose pose was fitted to the depth (below)

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

Poses (``run(..., poses=)``): ``"fitted"``, the default, keeps the model's depth and its first
view's pose and places every other view by the window's verified matches lifted by that depth
(``learner.posefit.fit_poses``: PnP under RANSAC, then Levenberg-Marquardt); the matches are found
as ``reliev3r eval`` finds them (``labelers.matches.match_every_pair``: every pair, with the
Reconstructor's matcher and verification threshold: ``labelers.config.LabelerConfig``'s ``matcher``
and ``ransac_threshold_px`` unless given), on the images resized to
``labelers.matches.match_size`` (640 pixels on the long side) and brought to the model's pixels. A
view the matches do not place keeps the pose head's pose (``fitted`` says which). On 24 held-out
7-Scenes windows the fitted poses scored AUC@30 0.611 against the pose head's 0.146, ATE 0.011
against 0.053 (docs/RESULTS.md, "Matches at 640 pixels for the classical baseline and the fitted
poses"). ``"model"`` gives the pose head's poses as they are.
"""

from __future__ import annotations

import math
import numbers
import typing
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np
import torch

from labelers.config import LabelerConfig
from labelers.matches import Matcher, make_matcher, match_every_pair, match_size
from learner.model import FFRM
from learner.posefit import fit_poses
from learner.snapshot import load_model, resolve_snapshot
from learner.train import resolve_device
from reliev3r import geometry, imaging

DEFAULT_HFOV_DEG = 60.0
POSES = ("fitted", "model")
"""What ``run(..., poses=)`` returns: poses fitted to the depth and the matches, or the pose head's."""
MATCHERS: tuple[str, ...] = typing.get_args(typing.get_type_hints(LabelerConfig)["matcher"])


class Reconstructor:
    def __init__(self, model: FFRM, meta: dict[str, Any], device: torch.device, *, matcher: str | None = None,
                 threshold_px: float | None = None, threads: int = 1):
        """``matcher`` and ``threshold_px``: the matches poses are fitted to (module docstring), as
        ``labeler.matcher`` and ``labeler.ransac_threshold_px`` (None: ``LabelerConfig``'s defaults);
        ValueError for a matcher that is none of them or a threshold that is not a finite number > 0.
        ``threads``: threads for that matching's per-frame features and per-pair verification, as
        ``labeler.cpu_threads`` gives a labeler (``reliev3r reconstruct`` passes it): the same
        matches, bit for bit; ValueError below 1."""
        self.matcher_kind, self.threshold_px = _matching(matcher, threshold_px)
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads: a whole number >= 1, got {threads!r}")
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="reconstructor-matching") if threads > 1 else None
        self._matcher: Matcher | None = None
        self.model = model.eval()
        self.meta = meta
        self.device = device
        size = meta.get("image_size")
        self.image_size: tuple[int, int] | None = (int(size[0]), int(size[1])) if size else None
        """(H, W) the model was trained at, or None (then inputs keep their size, rounded)."""

    @classmethod
    def from_snapshot(cls, path: str | Path, device: str = "auto", *, ema: bool = True, matcher: str | None = None,
                      threshold_px: float | None = None, threads: int = 1) -> "Reconstructor":
        """``path``: a snapshot folder, a ``snapshots`` folder or a run folder (newest valid one);
        ``matcher``, ``threshold_px``, ``threads``: as :class:`Reconstructor`'s (the matching's checked
        before the model loads)."""
        _matching(matcher, threshold_px)
        path = resolve_snapshot(path)
        dev = resolve_device(device)
        model, meta = load_model(path, dev, ema=ema)
        return cls(model, meta, dev, matcher=matcher, threshold_px=threshold_px, threads=threads)

    @property
    def matcher(self) -> Matcher:
        """The matcher of the fitted poses' matches, made on first use (XFeat on :attr:`device`) and kept:
        a SIFT or ORB matcher keeps the features of the frames it has seen (consecutive windows share some)."""
        if self._matcher is None:
            self._matcher = make_matcher(self.matcher_kind, str(self.device))
        return self._matcher

    def matches(self, images: np.ndarray) -> np.ndarray:
        """Verified matches [K, 7] of every view pair of ``images`` [V,H,W,3] (RGB uint8), as
        ``reliev3r eval`` finds a window's (``labelers.matches.match_every_pair``)."""
        return match_every_pair(images, self.matcher, threshold_px=self.threshold_px, pool=self._pool)

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        if self.image_size is not None:
            return self.image_size
        p = self.model.cfg.patch_size
        return max(p, round(height / p) * p), max(p, round(width / p) * p)

    @torch.no_grad()
    def run(self, images: Sequence[np.ndarray | str | Path], intrinsics: np.ndarray | None = None, *,
            size: tuple[int, int] | None = None, poses: str = "fitted") -> dict[str, np.ndarray]:
        """Reconstruct one window of V images (RGB uint8 HxWx3 arrays or image file paths).

        ``poses``: ``"fitted"`` (the poses fitted to the returned depth and the window's verified
        matches, :meth:`matches`: module docstring) or ``"model"`` (the pose head's); another
        raises ValueError naming the two.

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
        the resized images), ``points`` [V,H,W,3] (world frame, of ``cam_to_world``), ``images``
        uint8 [V,H,W,3] (the resized inputs) and ``fitted`` bool [V]: the views whose pose the fit
        gave (``learner.posefit.FittedPoses.fitted``: the first view, which anchors the fit at the
        pose head's pose, and every view its matches placed); False where ``cam_to_world`` is the
        pose head's pose: a view the matches did not place, every view with ``poses="model"``. A
        single image has nothing to fit: its pose is the pose head's.
        """
        if poses not in POSES:
            raise ValueError(f"poses: 'fitted' or 'model', got {poses!r}")
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
        resized, ks, shown = [], [], []
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
            shown.append(k)
            ks.append(geometry.resize_intrinsics(k, w / fw, h / fh))
            resized.append(_resize(frame, h, w))
        stack = np.stack(resized)
        x = torch.from_numpy(stack).to(self.device).permute(0, 3, 1, 2).float().div(255.0)[None]
        pred = self.model(x)
        k = torch.stack(ks).to(self.device)
        depth, cam_to_world = _np(pred.depth[0]), _np(pred.cam_to_world[0])
        fitted = np.zeros(len(frames), bool)
        if poses == "fitted":
            found = np.zeros((0, 7), np.float32)  # one image: nothing to fit
            if len(frames) > 1:
                big = match_size(h, w)
                if big is None:  # a model reading frames of 640 pixels or more: matched on them
                    found = self.matches(stack)
                else:  # found on the frames resized to match_size, brought to the model's pixels
                    big_k = [geometry.resize_intrinsics(k_i, big[1] / f.shape[1], big[0] / f.shape[0])
                             for k_i, (f, _) in zip(shown, frames)]
                    found = imaging.rescale_matches(self.matches(np.stack([_resize(f, *big) for f, _ in frames])),
                                                    _np(torch.stack(big_k)), _np(k))
            fit = fit_poses(depth, cam_to_world.astype(np.float64), _np(k), found)
            cam_to_world, fitted = fit.cam_to_world.astype(np.float32), fit.fitted
        cam_points = geometry.unproject_depth(pred.depth[0], k)  # [V,H,W,3]
        world = geometry.transform_points(torch.from_numpy(cam_to_world).to(self.device),
                                          cam_points.reshape(len(frames), -1, 3))
        return {"depth": depth, "confidence": _np(pred.confidence[0]), "cam_to_world": cam_to_world,
                "intrinsics": _np(k), "points": _np(world.reshape(len(frames), h, w, 3)), "images": stack,
                "fitted": fitted}


def _resize(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    """``frame`` stretched to ``height`` x ``width``, as :meth:`Reconstructor.run` resizes its images."""
    area = frame.shape[1] > width
    return cv2.resize(frame, (width, height), interpolation=cv2.INTER_AREA if area else cv2.INTER_LINEAR)


def _matching(matcher: str | None, threshold_px: float | None) -> tuple[str, float]:
    """(matcher kind, verification threshold in pixels): those given, else ``LabelerConfig``'s defaults;
    ValueError naming a matcher that is none of ``LabelerConfig.matcher``'s or a threshold not finite and > 0."""
    defaults = LabelerConfig()
    matcher = defaults.matcher if matcher is None else matcher
    threshold_px = defaults.ransac_threshold_px if threshold_px is None else threshold_px
    if matcher not in MATCHERS:
        raise ValueError(f"matcher: one of {', '.join(MATCHERS)}, got {matcher!r}")
    if isinstance(threshold_px, bool) or not isinstance(threshold_px, numbers.Real) or not (
            math.isfinite(threshold_px) and threshold_px > 0):
        raise ValueError(f"threshold_px: a finite number of pixels > 0, got {threshold_px!r}")
    return matcher, float(threshold_px)


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

