"""Configuration of the streamer: which sources, and how frames become windows."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(kw_only=True, slots=True)
class SyntheticConfig:
    """The embedded default source: procedural scenes rendered by ``reliev3r.synthetic``."""

    scenes: int = 2
    """How many scenes (one video file plus ground truth each) to render on first run."""
    frames: int = 96
    """Frames per scene video."""
    height: int = 192
    """Rendered height in pixels."""
    width: int = 256
    """Rendered width in pixels."""
    fov_deg: float = 60.0
    """Horizontal field of view of the synthetic camera."""
    seed: int = 0
    """Seed of the scenes and trajectories (ground truth is exact and reproducible)."""

    def __post_init__(self) -> None:
        if self.scenes < 1 or self.frames < 2:
            raise ValueError("scenes must be >= 1 and frames >= 2")
        if self.height < 16 or self.width < 16:
            raise ValueError("height and width must be >= 16")


@dataclass(kw_only=True, slots=True)
class StreamerConfig:
    sources: list[str] = field(default_factory=list)
    """Video files, folders, globs, image-sequence folders or URLs. Empty: the synthetic world."""
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    """The embedded default source, used when ``sources`` is empty."""
    views: int = 4
    """V: frames per window."""
    height: int = 96
    """Window frame height after resize (aspect kept by centre crop, intrinsics scaled)."""
    width: int = 128
    """Window frame width after resize."""
    frame_stride: int = 4
    """Frames of the source between consecutive views of a window (before keyframing)."""
    window_step: int = 8
    """Source frames between the first frames of consecutive windows, at least (the keyframe
    gates may put the next window's first view later), except after a scene cut or a gap, where
    the next window starts at the first view kept after it, nearer perhaps. Beyond
    ``(views - 1) * frame_stride`` consecutive windows share no view."""
    fov_deg: float = 60.0
    """Assumed horizontal field of view for sources without intrinsics."""
    loop: bool = True
    """Start archives again from the top when all are read (a never-ending stream)."""
    max_in_flight: int = 32
    """Windows sent but not yet acknowledged by replay; the streamer waits at this bound."""
    resend_timeout_s: float = 60.0
    """A window not acknowledged within this time is sent again (at-least-once)."""
    payload: Literal["raw", "jpeg", "png"] = "raw"
    """How frames travel: raw buffers (one host), or JPEG/PNG files (links between hosts)."""
    jpeg_quality: int = 90
    """JPEG quality of ``payload: jpeg``, 1..100 (OpenCV's scale)."""
    keyframe_min_motion: float = 0.5
    """Cheap pre-gate: a candidate view whose 32x24 grey thumbnail differs from the last kept view
    by less than this mean absolute difference (grey levels, 0-255) is skipped. 0 disables."""
    keyframe_min_flow: float = 2.0
    """Camera-motion gate: median flow of corners tracked from the last kept view, in pixels of
    a 160-pixel-wide image, below which a candidate is skipped (a still camera, even with
    objects moving, does not flood the system). 0 disables tracking."""
    keyframe_min_parallax: float = 0.4
    """80th-percentile homography residual (pixels, 160 wide) under which motion counts as rotation-only
    (nothing to triangulate): such a candidate waits for ``keyframe_rotation_flow``."""
    keyframe_rotation_flow: float = 12.0
    """Flow (pixels, 160 wide) at which a rotation-only candidate is kept anyway (coverage)."""
    blur_ratio: float = 0.35
    """A candidate sharper than this fraction of the running median sharpness (variance of the
    Laplacian) of recent candidates is kept; blurrier ones are skipped. 0 disables."""
    scene_cut_motion: float = 50.0
    """A grey-thumbnail jump (mean absolute difference, 0-255) between consecutive frames above
    this is a hard cut: no window spans it. 0 disables."""
    scene_cut_hist: float = 0.3
    """A hue-saturation histogram jump (Bhattacharyya distance, 0-1) between consecutive frames
    above this is a hard cut as well. 0 disables."""
    interleave: int = 4
    """Sources decoded at once, one window from each in turn (round robin; a decode worker's
    source without a window ready is passed over until it has one)."""
    decode_workers: int = 1
    """Processes that decode archive sources, pick their keyframes and cut their windows, one
    source each at a time (``streamer.workers``), so that up to ``interleave`` sources use as
    many cores; sources beyond the workers are decoded in the streamer process. 1: no workers;
    0: one per core this process may run on (``os.sched_getaffinity``), at most ``interleave``,
    and then no more sources at once than workers (none decoded in the streamer process).
    Windows, their ids and each source's order are the same either way (across sources, a
    worker's window ready is taken before one still being decoded), with one exception: with
    workers, a video of at least two ``streamer.segments.SEGMENT_FRAMES`` (1,500) frames whose
    stamps can be trusted is shared by the workers in segments that start at keyframes, at most
    one segment per worker at a time, and no window spans a segment boundary (a long video: 7.2x
    the in-process frames/s on 16 cores, 1.4-1.5x on 2; docs/BENCHMARKS.md, seventh pass of
    issue 18). 1 is the measured default on a 2-core host (docs/BENCHMARKS.md: 2 workers
    0.76-1.6x of in-process, within the noise of a shared machine; each worker imports the
    stack: 2 s and 320 MiB); 0 is for a host with cores to spare: ``configs/gpu.yaml`` sets it
    (on a 16-core GPU host the streamer decoding in its own process fed the labelers 0.24x of
    the learner's samples/s, with its workers 0.35x; docs/BENCHMARKS.md, twelfth pass)."""
    decoder: Literal["cpu", "cuda"] = "cpu"
    """Where videos are decoded: FFmpeg on the CPU, or ``cuda``: NVIDIA's video decoder (NVDEC)
    through FFmpeg, the frames copied back as NV12 (``streamer.sources.DECODERS``); a codec
    NVDEC lacks is decoded on the CPU, and a host where no CUDA decoder opens decodes on the CPU
    after saying so (``gpu_decode_unavailable``: counted each time a source is opened, logged
    once per source). ``cuda`` is for high-resolution footage: on an H100 host the streamer spent
    0.46x the CPU time a frame of a 4K HEVC video (a phone's), 0.76-0.86x on 640x480 and 720p
    H.264, but 1.6-3.4x on frames of 640x272 and smaller, where NVDEC's own cost a frame exceeds
    the CPU decoder's (docs/BENCHMARKS.md, twenty-first pass of issue 18): ``cpu`` by default.
    The streamer and each decode worker open a CUDA context of their own on the first visible GPU."""
    peer_timeout_s: float = 10.0
    """Credits of a labeler not heard from (``ready``/``done``) for this long expire."""
    settle_s: float = 2.0
    """A video file written to less than this many seconds ago (a copy still arriving in a
    watched folder) is opened once it has been still this long; the other sources flow
    meanwhile. A file that grows after it was opened all the same (a writer that stalled) is
    read on from its last window before a finite run ends, and one replaced under its name is
    read from the start as new content (a looping run reads either whole on its next pass).
    0: every file is taken as it is found."""

    resume: bool = True
    """Persist archive progress in ``<run.dir>/streamer/progress.json`` and continue from it
    after a restart (acknowledged windows are not sent again; the windows after them are those
    an uninterrupted run makes, the blur test's running median included)."""
    live_open_timeout_s: float = 5.0
    """Live feeds: seconds to wait for a connection (and the stream header) before retrying."""
    live_read_timeout_s: float = 5.0
    """Live feeds: a read that returns nothing for this long fails and reconnects."""
    live_stall_timeout_s: float = 8.0
    """Live feeds: watchdog; no decoded frame for this long on an open connection reconnects."""
    reconnect_initial_s: float = 0.5
    """Live feeds: first reconnect backoff; doubles per failure, with full jitter."""
    reconnect_max_s: float = 10.0
    """Live feeds: backoff ceiling."""

    def __post_init__(self) -> None:
        if min(self.live_open_timeout_s, self.live_read_timeout_s, self.live_stall_timeout_s,
               self.reconnect_initial_s) <= 0 or self.reconnect_max_s < self.reconnect_initial_s:
            raise ValueError("live_open_timeout_s, live_read_timeout_s, live_stall_timeout_s and "
                             "reconnect_initial_s must be > 0, reconnect_max_s >= reconnect_initial_s")
        if self.views < 2:
            raise ValueError("views must be >= 2 (a window needs two frames to register)")
        if self.height < 16 or self.width < 16:
            raise ValueError("height and width must be >= 16")
        if self.frame_stride < 1 or self.window_step < 1:
            raise ValueError("frame_stride and window_step must be >= 1")
        if not 1.0 < self.fov_deg < 179.0:
            raise ValueError("fov_deg must lie in (1, 179)")
        if self.max_in_flight < 1:
            raise ValueError("max_in_flight must be >= 1")
        if self.settle_s < 0:
            raise ValueError(f"settle_s must be >= 0, got {self.settle_s}")
        if self.resend_timeout_s <= 0 or self.peer_timeout_s <= 0:
            raise ValueError("resend_timeout_s and peer_timeout_s must be > 0")
        if min(self.keyframe_min_motion, self.scene_cut_motion, self.keyframe_min_flow,
               self.keyframe_min_parallax, self.keyframe_rotation_flow) < 0:
            raise ValueError("keyframe_min_motion, keyframe_min_flow, keyframe_min_parallax, "
                             "keyframe_rotation_flow and scene_cut_motion must be >= 0")
        if not 0 <= self.blur_ratio < 1:
            raise ValueError("blur_ratio must lie in [0, 1)")
        if not 0 <= self.scene_cut_hist <= 1:
            raise ValueError("scene_cut_hist must lie in [0, 1]")
        if self.interleave < 1:
            raise ValueError("interleave must be >= 1")
        if not 1 <= self.jpeg_quality <= 100:  # OpenCV clamps anything else without a word
            raise ValueError(f"jpeg_quality must be in 1..100, got {self.jpeg_quality}")
        if self.decode_workers < 0:
            raise ValueError("decode_workers must be >= 0 (0: one per available core)")
