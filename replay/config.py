"""Configuration of the replay service: storage bounds, sampling and the rate limiter."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(kw_only=True, slots=True)
class ReplayConfig:
    capacity_windows: int = 10_000
    """At most this many windows are stored; the eviction policy makes room."""
    capacity_bytes: int = 8 << 30
    """At most this many payload bytes are stored."""
    eviction: Literal["fifo", "reservoir"] = "fifo"
    """Which window leaves when the store is full."""
    sampler: Literal["uniform", "recency", "prioritized"] = "uniform"
    """How windows are drawn for learners."""
    min_size: int = 4
    """No sample is served before this many windows are stored."""
    samples_per_insert: float = 0.0
    """Target ratio of sampled windows to inserted windows; 0 disables the limiter."""
    tolerance: float = 64.0
    """Slack of the limiter, in sampled windows, around the target ratio."""
    durable: bool = False
    """Keep windows on disk under ``<run.dir>/replay`` (survives restarts) instead of memory."""

    def __post_init__(self) -> None:
        if self.capacity_windows < 1 or self.capacity_bytes < 1:
            raise ValueError("capacity_windows and capacity_bytes must be >= 1")
        if self.min_size < 1:
            raise ValueError("min_size must be >= 1")
        if self.samples_per_insert < 0 or self.tolerance < 0:
            raise ValueError("samples_per_insert and tolerance must be >= 0")
