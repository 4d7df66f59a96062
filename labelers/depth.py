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

from labelers.config import LabelerConfig, teacher_kind

_LABELER = LabelerConfig()
"""Where the teachers' keyword defaults come from (``labeler.device``, ``batch_frames``,
``precision``, ``compile``): one default per setting, the config's."""


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
    exact_shape: bool = False
    """Whether each frame's output is the scene's depth up to that frame's scale and shift and
    pixel noise, with no error in its shape (the oracle without structured errors, a depth
    sensor's): the learner then leaves the shape to the relative-depth loss
    (``learner.loss.match_shape_weight``). A learned monocular teacher's shape has errors."""

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


ORACLE_UNIT = {"gamma": 0.25, "warp": 0.25, "blur": 0.012, "clip": 0.2}
"""The structured errors of ``oracle?strength=1`` (``strength=S`` scales them all by S); set
so that S = 0, 0.5, 1, 2, 4 give per-frame least-squares AbsRel 0.024, 0.064, 0.111, 0.197,
0.316 on 7-Scenes frames, where a constant depth gives 0.353 (``studies/oracle_error.py``;
docs/RESULTS.md, "Oracle teacher error control")."""
ORACLE_OPTIONS = ("strength", "gamma", "warp", "blur", "clip", "noise", "holes")
MAX_CLIP = 0.9
WARP_GRID = (3, 4)


class OracleTeacher(DepthTeacher):
    """Ground-truth depth disguised as a relative-depth teacher: per frame an unknown random
    scale and shift, multiplicative noise and random holes. Deterministic per window id.
    An upper bound for experiments, never a real teacher (hence "oracle-gt").

    Structured, non-affine errors (all off by default; ``oracle?strength=S`` or one by one,
    see :meth:`from_options`), applied to the ground truth before the noise, the unknown scale
    and shift and the holes, in this order:

    * ``blur``: Gaussian blur of the depth map, sigma = ``blur`` x the frame's longer side
      (over the known pixels only), so depth edges bleed into each other;
    * ``gamma``: depth -> depth^g per frame, ln g ~ N(0, ``gamma``); up to the unknown scale
      this is the per-frame contrast of log depth (ln d -> g ln d);
    * ``warp``: a smooth multiplicative field exp(``warp`` x F), F bilinearly upsampled from a
      3x4 grid of standard normals, one per frame;
    * ``clip``: the farthest ``clip`` fraction of each frame's pixels is clamped to the depth
      at that quantile (far-range saturation; at most 0.9).

    The random numbers of the structured errors come from their own stream (seeded by the
    window id, drawn the same whatever the settings), so the plain oracle's outputs do not
    change and a larger setting moves the same draws further.
    """

    name = "oracle-gt"
    version = "1"
    space = "depth"

    def __init__(self, *, noise: float = 0.03, holes: int = 3, seed: int = 0, gamma: float = 0.0,
                 warp: float = 0.0, blur: float = 0.0, clip: float = 0.0):
        values = {"gamma": gamma, "warp": warp, "blur": blur, "clip": clip, "noise": noise}
        for key, value in values.items():
            if not (np.isfinite(value) and value >= 0):
                raise ValueError(f"oracle teacher: {key} must be a finite number >= 0, got {value!r}")
        if clip > MAX_CLIP:
            raise ValueError(f"oracle teacher: clip must be <= {MAX_CLIP} (a fraction of each frame), got {clip!r}")
        if int(holes) != holes or holes < 0:
            raise ValueError(f"oracle teacher: holes must be an integer >= 0, got {holes!r}")
        self.noise, self.holes, self.seed = float(noise), int(holes), seed
        self.gamma, self.warp, self.blur, self.clip = float(gamma), float(warp), float(blur), float(clip)
        self.version = oracle_version(self.settings())

    @property
    def exact_shape(self) -> bool:
        """No structured error: the shape is the ground truth's, up to noise and holes."""
        return not any((self.gamma, self.warp, self.blur, self.clip))

    def settings(self) -> dict[str, float]:
        """The error settings, in the order the version names them."""
        return {"gamma": self.gamma, "warp": self.warp, "blur": self.blur, "clip": self.clip,
                "noise": self.noise, "holes": self.holes}

    @classmethod
    def from_options(cls, query: str, spec: str = "oracle", *, seed: int = 0) -> "OracleTeacher":
        """The oracle of ``oracle?key=value&...``: ``strength=S`` sets gamma, warp, blur and
        clip to S times :data:`ORACLE_UNIT` (clip at most 0.9); ``gamma``, ``warp``, ``blur``,
        ``clip``, ``noise`` (default 0.03) and ``holes`` (default 3) set one error each and
        win over ``strength``. Unknown keys and bad values raise ValueError."""
        from labelers.depth_models import _check_options, parse_options

        opts = parse_options(query)
        _check_options(opts, set(ORACLE_OPTIONS), spec)
        try:
            values = {k: float(v) for k, v in opts.items()}
        except ValueError:
            raise ValueError(f"teacher {spec!r}: option values must be numbers") from None
        strength = values.pop("strength", 0.0)
        if not (np.isfinite(strength) and strength >= 0):
            raise ValueError(f"teacher {spec!r}: strength must be a finite number >= 0")
        kw: dict = {k: min(strength * unit, MAX_CLIP) if k == "clip" else strength * unit
                    for k, unit in ORACLE_UNIT.items()}
        kw.update(values)
        if "holes" in kw:
            if kw["holes"] != int(kw["holes"]):
                raise ValueError(f"teacher {spec!r}: holes must be an integer")
            kw["holes"] = int(kw["holes"])
        try:
            return cls(seed=seed, **kw)
        except ValueError as err:
            raise ValueError(f"teacher {spec!r}: {err}") from None

    def _predict(self, frames, *, gt_depth, window_id):
        if gt_depth is None:
            raise TeacherError("teacher_needs_gt", "the oracle teacher needs windows with gt_depth")
        gt = np.asarray(gt_depth, np.float32)
        digest = hashlib.sha256(f"{self.seed}:{window_id}".encode()).digest()
        rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
        digest = hashlib.sha256(f"{self.seed}:{window_id}:structured".encode()).digest()
        structured_rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
        structured = not self.exact_shape
        views, height, width = gt.shape
        out = np.zeros_like(gt)
        for v in range(views):
            known = np.isfinite(gt[v]) & (gt[v] > 0)
            draws = _structured_draws(structured_rng)
            if not known.any():
                continue
            base = self._structured(gt[v], known, draws) if structured else gt[v]
            scale = np.exp(rng.uniform(np.log(0.25), np.log(4.0)))
            shift = rng.uniform(0.0, 0.5) * float(np.median(base[known]))
            noisy = base * (1 + self.noise * rng.standard_normal((height, width))).clip(0.5, 1.5)
            d = (scale * (noisy + shift)).astype(np.float32)
            d[~known] = 0.0
            for _ in range(self.holes):
                hh, ww = rng.integers(1, max(2, height // 4)), rng.integers(1, max(2, width // 4))
                y, x = rng.integers(0, height - hh + 1), rng.integers(0, width - ww + 1)
                d[y:y + hh, x:x + ww] = 0.0
            out[v] = d
        return out

    def _structured(self, depth: np.ndarray, known: np.ndarray, draws: dict) -> np.ndarray:
        """One frame's depth with blur, gamma, warp and clip applied (known pixels; others 1)."""
        import cv2

        height, width = depth.shape
        d = np.where(known, depth, 0.0).astype(np.float64)
        if self.blur > 0:  # normalised convolution: unknown pixels neither count nor bleed zeros
            sigma = self.blur * max(height, width)
            mask = known.astype(np.float64)
            num = cv2.GaussianBlur(d, (0, 0), sigma, borderType=cv2.BORDER_REFLECT)
            den = cv2.GaussianBlur(mask, (0, 0), sigma, borderType=cv2.BORDER_REFLECT)
            d = np.where(known, num / np.maximum(den, 1e-12), 0.0)
        d = np.where(known & (d > 0), d, 1.0)
        if self.gamma > 0:
            median = float(np.median(d[known]))
            d = median * (d / median) ** np.exp(self.gamma * draws["gamma"])
        if self.warp > 0:
            d = d * np.exp(self.warp * _upsample(draws["warp"], height, width))
        if self.clip > 0:
            d = np.minimum(d, np.quantile(d[known], 1.0 - self.clip))
        return np.where(known, d, 1.0).astype(np.float32)


def _structured_draws(rng: np.random.Generator) -> dict:
    """One frame's standard draws for the structured errors (the same whatever the settings)."""
    return {"gamma": float(rng.standard_normal()), "warp": rng.standard_normal(WARP_GRID)}


def _upsample(grid: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear upsampling of a small grid to [height, width], its nodes on the frame's corners."""
    gy, gx = grid.shape
    y, x = np.linspace(0, gy - 1, height), np.linspace(0, gx - 1, width)
    y0, x0 = np.minimum(y.astype(int), gy - 2), np.minimum(x.astype(int), gx - 2)
    fy, fx = (y - y0)[:, None], (x - x0)[None, :]
    top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x0 + 1] * fx
    bottom = grid[y0 + 1][:, x0] * (1 - fx) + grid[y0 + 1][:, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


def oracle_version(settings: dict[str, float]) -> str:
    """``1`` for the plain oracle; ``1+gamma=..,warp=..,...`` naming every setting that differs
    from it, so labels name exactly which oracle made them."""
    plain = {"gamma": 0.0, "warp": 0.0, "blur": 0.0, "clip": 0.0, "noise": 0.03, "holes": 3}
    changed = [f"{k}={v:.10g}" for k, v in settings.items() if v != plain[k]]
    return "1+" + ",".join(changed) if changed else "1"


def make_teacher(spec: str, device: str = _LABELER.device, *, batch_frames: int = _LABELER.batch_frames,
                 precision: str = _LABELER.precision, compile: str = _LABELER.compile) -> DepthTeacher:
    """The teacher named by ``spec``:

    * ``none``, ``oracle``, ``oracle?strength=S`` or ``oracle?gamma=..&warp=..&blur=..&clip=..&noise=..&holes=..``
      (structured teacher errors, :class:`OracleTeacher`);
    * ``embedded`` (the package-shipped U-Net, :mod:`labelers.embedded`), ``embedded:<weights file>``
      or ``embedded:<folder>`` (the folder ``reliev3r teacher-train --out`` wrote);
    * ``hf:<hub id or local folder>`` (transformers ``AutoModelForDepthEstimation``);
    * ``onnx:<file>``, ``torchscript:<file>``, ``tflite:<file>`` with ``?space=depth|disparity``
      and optional ``&size=HxW&norm=imagenet|unit&output=<name>``;
    * ``pydnet:<file>`` (PyDNet++ TFLite: the right output and space preset).

    ``batch_frames``, ``precision`` (auto = bf16 on CUDA, fp32 on CPU) and ``compile``
    (none, inductor, tensorrt; CUDA only) apply to the torch backends.
    """
    kind = teacher_kind(spec)  # a spec of no known form: ValueError naming the accepted ones
    if kind == "none":
        return NoTeacher()
    if kind == "oracle":
        query = spec.partition("?")[2]
        return OracleTeacher.from_options(query, spec) if query else OracleTeacher()
    target = spec.partition(":")[2]
    if kind == "embedded":  # the package-shipped default; ``embedded:<file or folder>`` for other weights
        from labelers.embedded import EmbeddedTeacher

        return EmbeddedTeacher(device, weights=target or None, batch_frames=batch_frames, precision=precision,
                               compile=compile)
    from labelers.depth_models import make_model_teacher

    return make_model_teacher(kind, target, device=device, batch_frames=batch_frames, precision=precision,
                              compile=compile)
