"""Configuration of the Prometheus endpoints every process exposes."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(kw_only=True, slots=True)
class MonitoringConfig:
    enabled: bool = True
    """Serve Prometheus metrics over HTTP from every process."""
    host: str = "127.0.0.1"
    """Address of the metrics endpoints (bind wider only on a trusted network)."""
    ports: dict[str, int] = field(default_factory=lambda: {
        "supervisor": 9700, "streamer": 9701, "labeler": 9702, "replay": 9703,
        "learner": 9704, "evaluator": 9705})
    """Metrics port per stage; 0 picks a free port (the supervisor resolves it)."""
