"""Configuration of the evaluator process that scores each new snapshot."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(kw_only=True, slots=True)
class EvaluatorConfig:
    data: str = "synthetic"
    """Dataset spec: ``synthetic`` (held-out scenes of the embedded world, rendered on first
    use), ``synthetic:DIR``, ``7scenes:DIR``, ``scannet:DIR`` or a folder of images
    (``evaluation.datasets``)."""
    windows: int = 8
    """Windows evaluated per snapshot."""
    stride: int = 4
    """Frames between consecutive views of an evaluation window."""
    poll_s: float = 1.0
    """How often the snapshot folder is checked for a new snapshot."""

    def __post_init__(self) -> None:
        if self.windows < 1 or self.stride < 1:
            raise ValueError("windows and stride must be >= 1")
        if self.poll_s <= 0:
            raise ValueError("poll_s must be > 0")
