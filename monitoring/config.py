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
        "supervisor": 0, "streamer": 0, "labeler": 0, "replay": 0, "learner": 0, "evaluator": 0})
    """Metrics port per process (``labeler-K``: the K-th extra labeler of ``reliev3r up``, else
    ``labeler``'s). 0 (the default) picks a free port; ``reliev3r up`` records the endpoints in
    ``<run.dir>/processes.json`` (``reliev3r status`` reads them there). Overriding one key
    (``monitoring.ports.learner=9704``) keeps the others. A scraper that needs fixed ports sets
    them: ``deploy/prometheus/local-ports.yaml``. Ranks of one host (``torchrun --nproc-per-node
    N ... learn``) serve on a fixed port plus their ``LOCAL_RANK``."""
