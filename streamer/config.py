"""Configuration of the streamer: which sources, and how frames become windows."""

from __future__ import annotations

from dataclasses import dataclass, field


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
    """Source frames between the first frames of consecutive windows."""
    fov_deg: float = 60.0
    """Assumed horizontal field of view for sources without intrinsics."""
    loop: bool = True
    """Start archives again from the top when all are read (a never-ending stream)."""
    max_in_flight: int = 32
    """Windows sent but not yet acknowledged by replay; the streamer waits at this bound."""
    resend_timeout_s: float = 60.0
    """A window not acknowledged within this time is sent again (at-least-once)."""

    def __post_init__(self) -> None:
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
