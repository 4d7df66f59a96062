"""The assembled pipeline config: every stage's section plus ``run`` and ``network``.

Each component keeps its own ``@dataclass(kw_only=True, slots=True)`` config beside its code
(``streamer/config.py``, ``learner/config.py`` ...); :class:`PipelineConfig` only composes them,
so this module sits above the stages (ARCHITECTURE.md): the processes and the command line
read it, a stage's library code never does. The machinery (strict building, YAML files,
``key.sub=value`` overrides, :class:`ConfigError`) is :mod:`reliev3r.config_base`, re-exported
here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from evaluation.config import EvaluatorConfig
from labelers.config import LabelerConfig
from learner.config import LearnerConfig
from monitoring.config import MonitoringConfig
from reliev3r.config_base import (ConfigError, CurveConfig, NetworkConfig, RunConfig, build, free_port, load_data,
                                  merge, parse_override, to_dict, with_overrides)
from replay.config import ReplayConfig
from streamer.config import StreamerConfig

__all__ = ["ConfigError", "CurveConfig", "NetworkConfig", "PipelineConfig", "RunConfig", "build", "free_port",
           "load", "load_data", "merge", "parse_override", "resolve_ports", "to_dict", "with_overrides"]


@dataclass(kw_only=True, slots=True)
class PipelineConfig:
    """The whole pipeline; each process reads its own section plus ``run`` and ``network``."""

    run: RunConfig = field(default_factory=RunConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    streamer: StreamerConfig = field(default_factory=StreamerConfig)
    labeler: LabelerConfig = field(default_factory=LabelerConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    evaluator: EvaluatorConfig = field(default_factory=EvaluatorConfig)
    monitoring: MonitoringConfig = field(default_factory=MonitoringConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir)

    @property
    def trains_on_ground_truth(self) -> bool:
        """Whether a training stage uses the ground truth a source carries (the oracle teacher,
        the supervised loss); else the streamer neither reads nor sends it."""
        return self.labeler.reads_ground_truth or self.learner.loss.kind == "supervised"


def load(paths: list[str | Path] = (), overrides: list[str] = ()) -> PipelineConfig:
    """Load YAML files (later ones win), apply overrides, validate into PipelineConfig."""
    return build(PipelineConfig, load_data(paths, overrides))


def resolve_ports(cfg: PipelineConfig) -> PipelineConfig:
    """Replace port 0 with free ports on the bind host (the supervisor does this once)."""
    net = cfg.network
    for name in ("work_port", "replay_port", "supervisor_port"):
        if getattr(net, name) == 0:
            setattr(net, name, free_port(net.host))
    return cfg
