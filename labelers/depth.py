"""Monocular depth teachers behind one interface.

A :class:`DepthTeacher` maps RGB frames uint8 [V,H,W,3] to relative depth float32 [V,H,W]
(or disparity, see ``space``) and a validity mask bool [V,H,W]. Non-finite or non-positive
outputs are invalid pixels, never labels. Model backends (Hugging Face transformers, ONNX,
TorchScript, TFLite) live in :mod:`labelers.depth_models`; :func:`make_teacher` picks one by
spec string.
"""

from __future__ import annotations

import hashlib
from typing import Literal

import numpy as np


class TeacherError(Exception):
    """A teacher cannot label this window; ``reason`` is the countable drop reason."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class DepthTeacher:
    """Base: ``predict`` returns (depth float32 [V,H,W], valid bool [V,H,W]).

    ``gt_depth`` and ``window_id`` are context only the oracle uses; real teachers ignore them.
    """

    name: str = "base"
    version: str = "0"
    space: Literal["depth", "disparity"] = "depth"
    produces_labels: bool = True

    def predict(self, frames: np.ndarray, *, gt_depth: np.ndarray | None = None,
                window_id: str = "") -> tuple[np.ndarray, np.ndarray]:
        depth = self._predict(frames, gt_depth=gt_depth, window_id=window_id)
        return sanitize(depth)

    def predict_many(self, windows, *, gt_depths=None, window_ids=None) -> list:
        """``predict`` over several windows: a list of (depth, valid) or :class:`TeacherError`
        per window. Model teachers override it to batch frames across windows."""
        gt_depths = gt_depths or [None] * len(windows)
        window_ids = window_ids or [""] * len(windows)
        out = []
        for frames, gt, wid in zip(windows, gt_depths, window_ids):
            try:
                out.append(self.predict(frames, gt_depth=gt, window_id=wid))
            except TeacherError as err:
                out.append(err)
        return out

    def _predict(self, frames, *, gt_depth, window_id) -> np.ndarray:
        raise TeacherError("no_backend", self.name)

    def describe(self) -> dict:
        return {"name": self.name, "version": self.version, "space": self.space}


def sanitize(depth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Non-finite and non-positive values become invalid (value 0); raise when nothing is left."""
    depth = np.asarray(depth, dtype=np.float32)
    valid = np.isfinite(depth) & (depth > 0)
    if not valid.any():
        raise TeacherError("teacher_non_finite", "no finite positive output")
    return np.where(valid, depth, np.float32(0)), valid


class NoTeacher(DepthTeacher):
    """No depth labels at all: the learner's depth loss is off for these windows."""

    name = "none"
    version = "0"
    produces_labels = False

    def predict(self, frames, *, gt_depth=None, window_id=""):
        raise TeacherError("no_teacher", "the 'none' teacher makes no depth labels")


class OracleTeacher(DepthTeacher):
    """Ground-truth depth disguised as a relative-depth teacher: per frame an unknown random
    scale and shift, multiplicative noise and random holes. Deterministic per window id.
    An upper bound for experiments, never a real teacher (hence "oracle-gt")."""

    name = "oracle-gt"
    version = "1"
    space = "depth"

    def __init__(self, *, noise: float = 0.03, holes: int = 3, seed: int = 0):
        self.noise, self.holes, self.seed = noise, holes, seed

    def _predict(self, frames, *, gt_depth, window_id):
        if gt_depth is None:
            raise TeacherError("teacher_needs_gt", "the oracle teacher needs windows with gt_depth")
        gt = np.asarray(gt_depth, np.float32)
        digest = hashlib.sha256(f"{self.seed}:{window_id}".encode()).digest()
        rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
        views, height, width = gt.shape
        out = np.zeros_like(gt)
        for v in range(views):
            known = np.isfinite(gt[v]) & (gt[v] > 0)
            if not known.any():
                continue
            scale = np.exp(rng.uniform(np.log(0.25), np.log(4.0)))
            shift = rng.uniform(0.0, 0.5) * float(np.median(gt[v][known]))
            noisy = gt[v] * (1 + self.noise * rng.standard_normal((height, width))).clip(0.5, 1.5)
            d = (scale * (noisy + shift)).astype(np.float32)
            d[~known] = 0.0
            for _ in range(self.holes):
                hh, ww = rng.integers(1, max(2, height // 4)), rng.integers(1, max(2, width // 4))
                y, x = rng.integers(0, height - hh + 1), rng.integers(0, width - ww + 1)
                d[y:y + hh, x:x + ww] = 0.0
            out[v] = d
        return out


MODEL_KINDS = ("hf", "onnx", "torchscript", "tflite", "pydnet")


def make_teacher(spec: str, device: str = "cpu", *, batch_frames: int = 16, precision: str = "auto",
                 compile: str = "none") -> DepthTeacher:
    """The teacher named by ``spec``:

    * ``none``, ``oracle``;
    * ``embedded`` (the package-shipped U-Net, :mod:`labelers.embedded`), ``embedded:<weights file>``;
    * ``hf:<hub id or local folder>`` (transformers ``AutoModelForDepthEstimation``);
    * ``onnx:<file>``, ``torchscript:<file>``, ``tflite:<file>`` with ``?space=depth|disparity``
      and optional ``&size=HxW&norm=imagenet|unit&output=<name>``;
    * ``pydnet:<file>`` (PyDNet++ TFLite: the right output and space preset).

    ``batch_frames``, ``precision`` (auto = bf16 on CUDA, fp32 on CPU) and ``compile``
    (none, inductor, tensorrt; CUDA only) apply to the torch backends.
    """
    if spec == "none":
        return NoTeacher()
    if spec in ("oracle", "oracle-gt"):
        return OracleTeacher()
    kind, sep, target = spec.partition(":")
    if kind == "embedded":  # the package-shipped default; ``embedded:<file>`` for other weights
        from labelers.embedded import EmbeddedTeacher

        return EmbeddedTeacher(device, weights=target or None, batch_frames=batch_frames, precision=precision)
    if sep and kind in MODEL_KINDS and target:
        from labelers.depth_models import make_model_teacher

        return make_model_teacher(kind, target, device=device, batch_frames=batch_frames,
                                  precision=precision, compile=compile)
    raise ValueError(f"teacher {spec!r} is not available (known: none, oracle, embedded, "
                     + ", ".join(f"{k}:<path>" for k in MODEL_KINDS) + ")")
