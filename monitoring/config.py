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
    ``labeler``'s; labelers started by hand on one host take one ``labeler`` override each). 0
    (the default) picks a free port; ``reliev3r up`` records the endpoints in
    ``<run.dir>/processes.json`` (``reliev3r status`` reads them there). Overriding one key
    (``monitoring.ports.learner=9705``) keeps the others. A scraper that needs fixed ports sets
    them: ``deploy/prometheus/local-ports.yaml``. The learner's ranks of one host (``torchrun
    --nproc-per-node N ... learn``) serve on a fixed ``learner`` port plus their ``LOCAL_RANK``
    (:meth:`port_of`): on one host, no other process's port may lie in the N ports from it."""

    def key(self, stage: str, instance: str) -> str:
        """The ``ports`` key of a process: its instance's (``labeler-K``) where set, else its stage's."""
        return instance if instance in self.ports else stage

    def port_of(self, stage: str, instance: str, local_rank: int = 0) -> int:
        """The metrics port a process serves on (0: a free one): its key's; a learner rank's is
        a fixed ``learner`` port plus its ``LOCAL_RANK`` (``local_rank``:
        :func:`reliev3r.config_base.local_rank`), one port per rank of the host."""
        port = self.ports.get(self.key(stage, instance), 0)
        return port + local_rank if port and stage == RANKED else port


RANKED = "learner"
"""The stage run as several ranks of one host (torchrun); each serves on its own port."""
