"""Configuration of a labeler worker: which teachers, how matches are made and verified."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Literal

from reliev3r.config_base import check_device

ORACLE = ("oracle", "oracle-gt")
"""Names of the oracle teacher (``labeler.teacher``, before its ``?options``)."""
MODEL_KINDS = ("hf", "onnx", "torchscript", "tflite", "pydnet")
"""Model backends of ``labeler.teacher``: ``<kind>:<file, folder or hub id>`` (``labelers.depth_models``)."""
TEACHER_FORMS = {"none": "none", "oracle": "oracle[?options]", "oracle-gt": "oracle-gt[?options]",
                 "embedded": "embedded[:<weights file or folder>]",
                 **{kind: f"{kind}:<{'hub id or folder' if kind == 'hf' else 'file'}>[?options]"
                    for kind in MODEL_KINDS}}
"""The forms of a ``labeler.teacher`` spec by name, as an error names them."""


def teacher_kind(spec: str) -> str:
    """What a teacher spec names, from its form alone (no file looked for, no weights loaded):
    ``none``, ``oracle``, ``embedded`` or one of :data:`MODEL_KINDS`. A ``ValueError`` naming
    the accepted forms for any other spec (``embeded``, a bare ``model.onnx``)."""
    if spec == "none":
        return "none"
    if spec.partition("?")[0] in ORACLE:
        return "oracle"
    kind, sep, target = spec.partition(":")
    if kind == "embedded":
        return "embedded"
    if sep and target and kind in MODEL_KINDS:
        return kind
    close = difflib.get_close_matches(kind.partition("?")[0].lower(), TEACHER_FORMS, n=1)
    hint = f" (did you mean {TEACHER_FORMS[close[0]]}?)" if close else ""
    raise ValueError(f"teacher {spec!r} is not available{hint}; accepted: {', '.join(TEACHER_FORMS.values())}")


XFEAT_MIN_SIDE = 32
"""The smallest frame side ``matcher: xfeat`` takes: XFeat resamples a frame to whole 32-pixel
cells (its preprocessing; its network downsamples by 32), and a smaller side has none."""


@dataclass(kw_only=True, slots=True)
class LabelerConfig:
    teacher: str = "embedded"
    """Depth teacher. ``embedded`` (the U-Net shipped with the package, ``labelers/embedded.py``),
    ``embedded:<weights file or folder>`` (the same U-Net with weights ``reliev3r teacher-train``
    wrote), ``none`` (no depth labels: the depth loss is off), ``oracle`` (ground
    truth of synthetic or 7-Scenes sources under an unknown per-frame scale and shift plus 3%
    noise and 3 holes; an upper bound, never a real teacher), ``oracle?strength=S`` (the same
    plus structured, non-affine errors that grow with S >= 0: per-frame gamma (= contrast of
    log depth), a smooth multiplicative warp, blurred depth edges and far-range clipping;
    S = 0, 0.5, 1, 2, 4 give per-frame least-squares AbsRel about 0.02, 0.06, 0.11, 0.20, 0.32
    on 7-Scenes, a constant 0.35; docs/RESULTS.md), or each error on its own with
    ``oracle?gamma=..&warp=..&blur=..&clip=..&noise=..&holes=..`` (``labelers.depth.OracleTeacher``;
    its version names the settings), or a model: ``hf:<hub id or folder>``,
    ``onnx:<file>?space=disparity``, ``torchscript:<file>?space=depth``, ``tflite:<file>?space=...``,
    ``pydnet:<file>`` (see ``labelers/depth_models.py`` for the options). A spec of none of these
    forms, or an oracle option that is not one, is refused at load (:func:`teacher_kind`); a
    model's file is looked for when the labeler starts (a config written on one host often runs
    on another)."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """Teacher arithmetic: ``auto`` is bf16 autocast on CUDA and fp32 on the CPU."""
    compile: Literal["none", "inductor", "tensorrt"] = "none"
    """Compile the torch teachers on CUDA (ignored on the CPU). ``tensorrt`` needs
    torch-tensorrt (extra ``tensorrt``) and falls back to inductor, with a warning, without it.
    Off by default: on an H100, inductor made Depth Anything V2 S/B forwards 2x slower than
    eager bf16 (docs/BENCHMARKS.md), and it costs ~40 s at start-up. The embedded teacher's
    forwards it made 1.5x faster on an H100 (168x224, 16 frames a forward), not yet measured
    inside the pipeline."""
    batch_frames: int = 16
    """Frames per teacher forward (frames of several windows are batched together)."""
    batch_windows: int = 4
    """Windows labelled together when the worker holds several (raise ``credits`` with it)."""
    matcher: Literal["sift", "orb", "xfeat"] = "sift"
    """Sparse match teacher; every match is geometrically verified (USAC/MAGSAC). ``xfeat``
    (XFeat + LighterGlue, extra ``xfeat``) matches the pairs of a batch of windows in one GPU
    forward; on 7-Scenes at 168x224 on the CPU it gave 2.2x SIFT's verified matches at 1.34x
    its median reprojection error and 0.08x its pairs per core (docs/BENCHMARKS.md). It needs
    frames of at least :data:`XFEAT_MIN_SIDE` pixels a side (``streamer.height``, ``width``:
    checked at load)."""
    max_matches_per_pair: int = 256
    """Cap on verified matches kept per view pair (strongest first, spread over the image)."""
    min_matches: int = 12
    """A pair with fewer verified matches contributes none."""
    ransac_threshold_px: float = 1.0
    """Inlier threshold of the fundamental-matrix verification, in pixels."""
    long_pairs: int = 1
    """Long-baseline pairs per window added to the neighbour pairs (i, i+1)."""
    cpu_threads: int = 1
    """Threads of one labeler process for its per-frame and per-pair CPU work: SIFT/ORB features
    and nearest neighbours, USAC/MAGSAC verification, two-view triangulation (OpenCV releases
    the GIL in each; ``labelers.matches``). Labels are the same as with 1, bit for bit. That
    work (99 ms per 8-view window on one core of an H200 host) caps a labeler's fresh windows/s
    (issue 18). Measured (``benchmarks/labeler_throughput.py --only cpu-threads``, 7-Scenes, 4
    views at 168x224, docs/BENCHMARKS.md): 91-92 % of its CPU time is inside those GIL-free
    calls, so n threads give at most 1.8x (2), 3.2x (4), 5x (8), 7x (16) by Amdahl; on a 2-core
    VM shared with other work (load 5), 2 threads gave 1.04-1.16x the windows/s of 1 (ideal 2x;
    the process never got a whole core), so the default stays 1. On a GPU host, set it to the
    cores a labeler process can have (cores / labeler processes) once measured there."""
    device: str = "cpu"
    """Torch device of the teachers (``cuda``, ``cuda:1``, ``cpu``)."""
    workers: int = 1
    """Labeler processes ``reliev3r up`` starts; with ``device: cuda`` worker K uses ``cuda:K``
    modulo the host's GPUs (one per GPU, or several sharing one: the teacher's GPU work is a
    small part of a window's labelling, its matching and verification run on the CPU).
    Labelers on other hosts are started with ``reliev3r label``."""
    refresh_step: int = 0
    """Teacher refresh: once the run has a snapshot at this learner step or later, ``reliev3r up``
    stops the learner and distils it into a new embedded teacher (``reliev3r teacher-train
    --distill`` of the run for ``refresh_seconds`` on this device, into ``<run.dir>/teacher``),
    then starts the run again on it: labelers on the new teacher, an empty replay and a learner
    from scratch (or ``learner.init``), ``learner.max_steps`` counted from there; the first
    part's snapshots, evaluations and replay store move to ``<run.dir>/before-refresh`` (with a
    copy of the run's ``config.yaml``, which ``reliev3r eval`` and ``view`` read there). A
    resumed run keeps the new teacher. The new teacher is fine-tuned from the teacher in use
    when that is ``embedded`` or ``embedded:PATH``, else from the shipped weights (a run that
    starts on ``pydnet:`` goes on with an embedded teacher made from its own learner). Why
    afresh: on the CPU loop a learner that went on after the teacher changed (its replay full
    of the first teacher's labels) scored like one that never changed teacher; afresh, 0.167
    per frame against 0.173 (docs/RESULTS.md, issue 21). Only a run whose learner learns from
    a depth teacher on the user's footage refreshes (``PipelineConfig.refresh_skipped``). 0
    (never) here; ``configs/gpu.yaml`` sets 250 (1.22-1.33x the supervised sibling's
    median-scaled AbsRel against 1.56x without), ``configs/demo.yaml`` 300 with 150 s (per
    frame 0.137 / 0.125 against 0.171 on the CPU)."""
    refresh_seconds: float = 70.0
    """Wall-clock seconds of the refresh's distillation, start-up and rendering included."""
    credits: int = 2
    """Windows a worker asks for ahead of the batch it is labelling (it asks as a batch starts,
    so they travel while it labels); with ``batch_windows`` they bound its batches. On one H100
    host 4 (batches of up to 4 windows: 16 ms of matching per window against 24) gave two
    labelers of 6 threads 1.3x the fresh windows (docs/BENCHMARKS.md, issue 18, tenth pass); on
    the CPU loop (``configs/demo.yaml``, 7-Scenes) three runs with 4 learned no better than five
    with 2 (the labels are the same bit for bit; docs/RESULTS.md, issue 21, tenth pass), so 2
    stays until a weak run with 4 is scored on the GPU."""
    blank_std: float = 2.0
    """A frame whose grey (OpenCV's, from RGB) standard deviation is below this (grey levels) is blank (black,
    white, flat): its window is dropped with reason ``blank_frame``."""
    insert_timeout_s: float = 10.0
    """Wait this long for replay's ``insert_ack`` before retrying on a fresh socket."""
    insert_retries: int = 3
    """Retries of an unacknowledged insert; then the window is left to the streamer's resend."""
    ready_interval_s: float = 1.0
    """An idle worker repeats ``ready`` this often (keep-alive; re-registers with a restarted
    streamer)."""

    @property
    def reads_ground_truth(self) -> bool:
        """Whether the teacher labels from the windows' ground truth (the oracle)."""
        return self.teacher.partition("?")[0] in ORACLE

    @property
    def teacher_exact_shape(self) -> bool:
        """Whether the teacher's per-frame shape has no error of its own
        (``labelers.depth.DepthTeacher.exact_shape``): of the teachers, only the oracle without
        structured errors. Decided from the spec, without loading a model."""
        if not self.reads_ground_truth:
            return False
        from labelers.depth import make_teacher

        return make_teacher(self.teacher).exact_shape

    def __post_init__(self) -> None:
        if teacher_kind(self.teacher) == "oracle":  # its options too: building it loads nothing
            from labelers.depth import make_teacher

            make_teacher(self.teacher)
        check_device("device", self.device)
        if self.workers < 1:
            raise ValueError("workers must be >= 1")
        if self.cpu_threads < 1:
            raise ValueError("cpu_threads must be >= 1")
        if self.max_matches_per_pair < 1 or self.min_matches < 1:
            raise ValueError("max_matches_per_pair and min_matches must be >= 1")
        if self.ransac_threshold_px <= 0:
            raise ValueError("ransac_threshold_px must be > 0")
        if self.batch_frames < 1 or self.batch_windows < 1:
            raise ValueError("batch_frames and batch_windows must be >= 1")
        if self.credits < 1:
            raise ValueError("credits must be >= 1")
        if self.insert_timeout_s <= 0 or self.ready_interval_s <= 0:
            raise ValueError("insert_timeout_s and ready_interval_s must be > 0")
        if self.refresh_step < 0 or self.refresh_seconds <= 0:
            raise ValueError("refresh_step must be >= 0 and refresh_seconds > 0")
        if self.insert_retries < 0 or self.blank_std < 0 or self.long_pairs < 0:
            raise ValueError("insert_retries, blank_std and long_pairs must be >= 0")
