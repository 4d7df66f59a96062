"""Configuration of the learner: model size, optimisation, losses and snapshots."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from reliev3r.config_base import check_device
from reliev3r.protocol import MAX_SAMPLE_WINDOWS


@dataclass(frozen=True, slots=True)
class Size:
    dim: int
    heads: int
    encoder: int
    """Frame-wise blocks before the first global block."""
    pairs: int
    """(frame-wise, global) block pairs after the encoder."""
    mlp_ratio: float
    head_channels: int
    """Channels of the full-resolution dense head."""


SIZES: dict[str, Size] = {
    #            dim  heads enc pairs mlp  head_ch      params (patch 8, 4 registers)
    "tiny": Size(128, 4, 2, 2, 4.0, 16),  # ~1.4 M; CPU tests and smoke runs
    "small": Size(384, 6, 4, 4, 4.0, 32),  # ~22 M; ViT-S width
    "base": Size(768, 12, 6, 6, 4.0, 32),  # ~130 M; ViT-B width, 18 blocks
    "large": Size(1024, 16, 12, 12, 4.0, 48),  # ~458 M; ViT-L width, 36 blocks
}
"""The model sizes (``learner.model.size``), here beside the config so that it can check a
``head_dim`` against its size's dim without building the model."""


def _finite(cfg: object, *names: str) -> None:
    """Refuse a NaN or infinite value in the float fields ``names`` of ``cfg``: a NaN passes
    checks such as ``lr <= 0`` and fails (or trains on NaN) only once the learner runs."""
    for name in names:
        value = getattr(cfg, name)
        if value is not None and not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value}")


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    size: Literal["tiny", "small", "base", "large"] = "tiny"
    """Named size of the pi3-style transformer (``tiny`` runs on a laptop CPU)."""
    patch_size: int = 8
    """Side of the square image patches, in pixels of the input."""
    registers: int = 4
    """Register tokens per frame (same learned init for every frame, so no view is special)."""
    max_log_depth: float = 10.0
    """Log-depth is soft-clamped to +-this before ``exp`` so depth stays finite and > 0."""
    head_dim: int = 0
    """Channels per attention head; 0: the size's own (64 for small, base and large). Another
    value changes the architecture (heads = dim / head_dim; same FLOPs, same parameters but for
    the QK-norm widths):
    128 runs faster attention kernels on Hopper GPUs (docs/BENCHMARKS.md, Learner), but its
    quality is not compared with the default's."""
    scale_head: bool = False
    """Predict each view's depth scale and shift from its camera token (a small MLP) and the
    dense head's depth up to them (``learner.model.view_depth``), so that the match terms can
    register the views without moving the weights that make the shapes (with
    ``learner.loss.match_shape_weight`` < 1 they reach the shapes at that share only). Measured
    through ``reliev3r up`` on 7-Scenes (docs/RESULTS.md, issue 21): on the CPU (demo sizes) with a
    near-exact teacher at ``match_shape_weight=0`` per-frame AbsRel 0.106 against 0.124 (teacher
    0.108, two seeds); on the GPU (``configs/gpu.yaml``, 1,500 steps) a tie with the distilled
    teacher, PyDNet++ and the oracle at share 0 (0.096 against 0.100), but the shipped teacher's
    run at the default share 1 a little worse (0.150 / 0.152 against 0.145): off by default.
    Turn it on with a near-exact teacher at ``match_shape_weight=0``."""

    def __post_init__(self) -> None:
        _finite(self, "max_log_depth")
        if self.size not in SIZES:
            raise ValueError(f"size must be one of {list(SIZES)}, got {self.size!r}")
        if self.patch_size < 2:
            raise ValueError("patch_size must be >= 2")
        if self.head_dim < 0 or self.head_dim % 4:
            raise ValueError(f"head_dim must be 0 or a positive multiple of 4 (2D RoPE), got {self.head_dim}")
        dim = SIZES[self.size].dim
        if self.head_dim and dim % self.head_dim:  # else the model fails to build
            raise ValueError(f"head_dim {self.head_dim} does not divide size {self.size!r}'s dim {dim}")
        if self.registers < 0:
            raise ValueError("registers must be >= 0")
        if self.max_log_depth <= 0:
            raise ValueError("max_log_depth must be > 0")


@dataclass(kw_only=True, slots=True)
class RefineConfig:
    """The self-refinement term, ``learner.loss.refine`` (absent or ``null``: off). Each window's
    poses and per-view depth scales are bundle-adjusted under the weak match terms with a depth
    shape held fixed (``learner.refinement.refine_geometry``, from the predicted poses), and the
    prediction is pulled towards the result (``learner.refinement.refined_geometry_loss``). Weak:
    it uses the matches and the model's own depth (or the teacher's) only. Measured on the
    synthetic world: the first change that moved weak translation per step (sweeps 7-8: 60°
    against 88° at step 1,500, held-out), and part of the staged weak recipe that reached issue
    9's bar (sweep 12, with ``depth: teacher``, ``shifts: true``; docs/RESULTS.md)."""

    weight: float = 1.0
    """Weight of the term in the objective, > 0 (for no refinement leave the section out)."""
    depth: Literal["pred", "teacher"] = "pred"
    """Depth whose shape the bundle adjustment holds fixed: ``pred`` the prediction's own;
    ``teacher`` the teacher's map carried into the prediction's per-view scale and shift
    (``learner.losses.teacher_aligned_depth``), so that the refined poses and view scales rest
    on the teacher's shape rather than the learner's. Weak either way; the pull still acts on
    the prediction. ``teacher`` kept the registered depth from breaking on the synthetic world
    (docs/RESULTS.md, sweeps 9-11)."""
    solver: Literal["adam", "lm"] = "adam"
    """Solver of the bundle adjustment: ``adam`` (first-order, ``steps`` steps of size ``lr``)
    or ``lm`` (Levenberg-Marquardt, ``steps`` iterations; it follows the curvature, so poorly
    constrained directions barely move). ``lm``: no measured gain over ``adam`` on held-out
    windows (docs/RESULTS.md, CPU check after sweep 8): study option."""
    steps: int = 50
    """Adam steps or LM iterations of the bundle adjustment, from the predicted poses."""
    scales: bool = True
    """Let the bundle adjustment move the per-view depth scales too (and pull the prediction's
    per-view mean depths towards them); ``false``: poses only (held registered depth at the
    plain level, less translation gain: docs/RESULTS.md, CPU check after sweep 8)."""
    shifts: bool = False
    """Let the bundle adjustment move a depth shift per view too (view v's depth becomes
    exp(σ_v)(D_v + c_v mean D_v)); the pull then registers the prediction's per-view mean depths
    to the result's. Needs ``solver: adam``. Held the weak run's median-scaled depth (0.188
    against 0.262 without, CPU, from step 2,000; docs/RESULTS.md, issue 9 history)."""
    lr: float = 0.02
    """Adam's step size (radians; translation in units of the window's mean depth; log scale)."""
    min_matches: int = 16
    """Windows with fewer matches get no refinement target."""
    compile: bool = True
    """Run each search step (match terms, their gradient, the Adam update) as one
    ``torch.compile`` graph (same values; the eager step's ~200 small kernels are launch-bound
    on a GPU: 1.8x the training steps per minute, docs/RESULTS.md, sweeps 9-11)."""

    def __post_init__(self) -> None:
        _finite(self, "weight", "lr")
        if self.weight <= 0:
            raise ValueError(f"weight must be > 0 (for no refinement leave learner.loss.refine out), got {self.weight}")
        if self.depth not in ("pred", "teacher"):
            raise ValueError(f"depth must be 'pred' or 'teacher', got {self.depth!r}")
        if self.solver not in ("adam", "lm"):
            raise ValueError(f"solver must be 'adam' or 'lm', got {self.solver!r}")
        if self.shifts and self.solver != "adam":
            raise ValueError("shifts needs solver 'adam'")
        if self.steps < 0 or self.lr <= 0 or self.min_matches < 0:
            raise ValueError("steps and min_matches must be >= 0 and lr > 0")


@dataclass(kw_only=True, slots=True)
class LossConfig:
    kind: Literal["weak", "supervised"] = "weak"
    """``weak``: Reliev3R losses from teacher labels. ``supervised``: the ground-truth sibling,
    only for the comparison study."""
    reproj_weight: float = 0.5
    """lambda in L = L_depth + lambda * L_reproj."""
    alpha: float = 1.0
    """Weight of the -log W confidence regulariser in the depth loss."""
    robust: Literal["none", "cauchy", "geman_mcclure", "pseudo_huber"] = "cauchy"
    """Robust function of the angle terms (``learner.losses.robust_angle_cost``). ``cauchy``
    is the paper's; ``pseudo_huber`` (with ``reproj_weight`` 2) changed nothing in sweep 1
    (docs/RESULTS.md); ``none`` and ``geman_mcclure``: no measured gain: study options."""
    scale_deg: float = 10.0
    """Angle scale of the robust function, degrees."""
    point_weight: float = 1.0
    """mu of the triangulation-consistency term ``mu * L_point``
    (``learner.losses.point_consistency_loss``): the two back-projections of a match must meet,
    relative to their depths. 0 = the paper's losses only. The strongest signal on a depth
    shift common to a window's views, which the depth loss cannot see: at 3 (with the
    refinement) it removed the weak run's drift to too much depth contrast by pulling towards
    less of it, not by estimating the shift without bias (docs/RESULTS.md, sweep 12)."""
    triangulation_weight: float = 1.0
    """Weight of the two-view triangulation depth term (``learner.losses.triangulated_depth_loss``):
    the predicted depth at the matches against their triangulation from the pair's essential
    matrix (one scale per pair left open). Weak: the matches and the intrinsics only. It gives
    each view's depth shift and the views' relative scales, which the relative-depth loss leaves
    open and which the angle terms see only through the predicted poses. 0 = off. With the two
    terms below it took 7-Scenes median-scaled AbsRel from 0.59 (paper terms + point) to 0.35
    and AUC@30 from 0.02 to 0.07 (docs/RESULTS.md, issue 21)."""
    triangulation_pose_weight: float = 1.0
    """Weight of the angle terms evaluated with the triangulated depths
    (``learner.losses.triangulated_pose_loss``): rotations and translation directions towards
    each pair's two-view solution, through no predicted depth. 0 = off. Without it (depth term
    alone) AUC@30 on 7-Scenes stayed at 0.03 (docs/RESULTS.md, issue 21)."""
    contrast_weight: float = 1.0
    """Weight of the depth-contrast term (``learner.losses.depth_contrast_loss``): each view's
    spread of depths relative to their distance (the shift that the relative-depth loss leaves
    open) pulled to that of the teacher registered to the matches' triangulation
    (``learner.losses.registered_teacher_shift``). Weak: the teacher, the matches and the
    intrinsics only. 0 = off. It took 7-Scenes median-scaled AbsRel from 0.43 to 0.35 beside
    the two terms above; at 3 the views' shapes broke (0.54; docs/RESULTS.md, issue 21)."""
    match_shape_weight: float | None = None
    """Share of the match terms' gradient (reprojection, point, triangulation, contrast,
    refinement) that reaches each view's depth *shape*; their pull on its scale and shift is
    always whole (``learner.losses.shape_damped``). 1 = the terms act on every pixel; 0 = the
    shape comes from the relative-depth loss alone. Without a depth teacher (``labeler.teacher:
    none``) the match terms are all the shape has, and the share is not applied. ``null`` (the
    default): chosen by the teacher (``reliev3r.config.PipelineConfig``), 0 for a teacher whose
    shape is exact (``labelers.depth.DepthTeacher.exact_shape``: the oracle without structured
    errors), else 1 (a loss built outside a pipeline: 1). Measured: for the oracle 0 was best,
    7-Scenes on one H200, median-scaled AbsRel 1.06x the supervised sibling's against 1.26x at
    1; for the shipped and the distilled teachers 1 was best or tied, their shapes need the
    matches' correction (docs/RESULTS.md, issue 21, fifth pass)."""
    refine: RefineConfig | None = None
    """The self-refinement term (:class:`RefineConfig`); ``null`` (the default): off. On the
    command line ``learner.loss.refine.weight=1`` turns it on with the section's defaults. Not in
    the default recipe: measured on the synthetic world (docs/RESULTS.md, sweeps 7-12), not on
    real video."""

    def __post_init__(self) -> None:
        _finite(self, "reproj_weight", "alpha", "scale_deg", "point_weight", "triangulation_weight",
                "triangulation_pose_weight", "contrast_weight")
        if min(self.reproj_weight, self.alpha, self.point_weight, self.triangulation_weight,
               self.triangulation_pose_weight, self.contrast_weight) < 0:
            raise ValueError("reproj_weight, alpha, point_weight, triangulation_weight, "
                             "triangulation_pose_weight and contrast_weight must be >= 0")
        if self.scale_deg <= 0:
            raise ValueError("scale_deg must be > 0")
        if self.match_shape_weight is not None and not 0.0 <= self.match_shape_weight <= 1.0:
            raise ValueError(f"match_shape_weight must be in [0, 1], got {self.match_shape_weight}")

    @property
    def shape_share(self) -> float:
        """``match_shape_weight``, 1 where no pipeline chose it."""
        return 1.0 if self.match_shape_weight is None else self.match_shape_weight


@dataclass(kw_only=True, slots=True)
class AugmentConfig:
    """Window augmentation (``learner.augment``): every label kept exact."""

    flip: float = 0.0
    """Probability of mirroring a window left-right (images, depth maps, principal points,
    matches and ground-truth poses together)."""
    color: float = 0.0
    """Per view, brightness gain, contrast and saturation drawn from ``[1 - color, 1 + color]``."""

    def __post_init__(self) -> None:
        if not 0 <= self.flip <= 1 or not 0 <= self.color < 1:
            raise ValueError("augment.flip must lie in [0, 1] and augment.color in [0, 1)")


@dataclass(kw_only=True, slots=True)
class LearnerConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    self_target_step: int = 0
    """From this step on, the depth term's target is the learner's own depth on the same window
    from its weights frozen at that step (the EMA copy) instead of the teacher's; 0: off."""
    batch_size: int = 2
    """Windows per step per rank."""
    lr: float = 3e-4
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.05
    """AdamW weight decay."""
    warmup_steps: int = 100
    """Linear warm-up length."""
    schedule: Literal["constant", "cosine"] = "constant"
    """After warm-up: constant (a stream never ends) or cosine to ``max_steps``."""
    grad_clip: float = 1.0
    """Clip the global grad norm to this value; 0 disables."""
    ema_decay: float = 0.999
    """Decay of the EMA copy of the weights kept in snapshots; 0 disables."""
    max_steps: int = 0
    """Stop after this many steps; 0 means train forever."""
    snapshot_every: int = 50
    """Write a snapshot every this many steps (and at the end)."""
    keep_last: int = 3
    """Keep the newest K snapshots ..."""
    keep_every: int = 1000
    """... plus every snapshot whose step is a multiple of this (the evaluator keeps its pictures
    by the same rule: ``evaluation.pictures.prune_pictures``)."""
    device: str = "auto"
    """``auto`` (cuda when present), ``cuda``, ``cuda:N``, ``cpu``."""
    precision: Literal["bf16", "fp32"] = "bf16"
    """Autocast precision of the trunk and dense head convs on GPU (output activations and the
    camera head run in fp32; CPU runs fp32)."""
    compile: bool = False
    """Wrap the model in torch.compile."""
    cuda_graphs: bool = False
    """Record each step's forward, objective, backward and gradient clipping as a CUDA graph and
    replay it (``learner.graphs``; a graph per bucket of match counts, the matches padded with
    rows of weight 0): one launch from the host instead of thousands, for a step the host
    bounds. CUDA with one learner process only (ignored on the CPU and under DDP). A step that
    cannot be recorded (a loss term that reads the device from the host or takes a shape from
    data: ``.item()``, a boolean mask) is found on the CPU before any capture, logged with its
    line, and run eagerly (``learner.train.unrecordable_objective``); a capture that fails anyway
    is logged (``capture_failed``) and the step runs eagerly from then on. On one H100 host it
    made the learner 2.3x faster in the pipeline, faster than the labelers feed it (each window
    trained 5.7 times; docs/BENCHMARKS.md, issue 18, fourteenth pass); ``configs/gpu.yaml`` turns
    it on beside a bound on that reuse (``replay.limit_inserts``, fifteenth pass). Off by
    default: a CPU run ignores it, and without a bound the learner outruns its data."""
    threads: int = 0
    """CPU threads for torch (0: torch's default)."""
    init: str = ""
    """Warm start: a learner without a snapshot of its own starts from these weights, a
    snapshot folder, a run folder (its newest snapshot) or a ``.safetensors`` file of one
    (e.g. what ``reliev3r pretrain`` prints); the EMA weights when the snapshot has them;
    optimizer, step and schedule start afresh. The model architecture (size, patch size ...)
    must be the same, or the learner stops at start naming both. A run that resumes its own
    snapshot ignores it. Recorded in every snapshot's meta (``init``: path and SHA-256).
    ``""``: from scratch (``learner.warm_start``)."""

    def __post_init__(self) -> None:
        _finite(self, "lr", "weight_decay", "grad_clip")  # grad_clip: 0, not inf, is no clipping
        check_device("device", self.device, auto=True)
        if not 1 <= self.batch_size <= MAX_SAMPLE_WINDOWS:  # a larger one: every sample refused
            raise ValueError(f"batch_size must be >= 1 and <= {MAX_SAMPLE_WINDOWS}, got {self.batch_size}")
        if self.lr <= 0:
            raise ValueError("lr must be > 0")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.grad_clip < 0:  # a negative value silently meant no clipping
            raise ValueError(f"grad_clip must be >= 0 (0: no clipping), got {self.grad_clip}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0 (0: torch's default), got {self.threads}")
        if self.self_target_step < 0:  # a negative step turned it on from the first step
            raise ValueError(f"self_target_step must be >= 0 (0: off), got {self.self_target_step}")
        if self.max_steps < 0 or self.warmup_steps < 0:
            raise ValueError("max_steps and warmup_steps must be >= 0")
        if self.snapshot_every < 1 or self.keep_last < 1 or self.keep_every < 1:
            raise ValueError("snapshot_every, keep_last and keep_every must be >= 1")
        if not 0 <= self.ema_decay < 1:
            raise ValueError("ema_decay must lie in [0, 1)")
