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
from labelers.config import XFEAT_MIN_SIDE, LabelerConfig
from learner.config import LearnerConfig
from monitoring.config import MonitoringConfig
from reliev3r.config_base import (ConfigError, CurveConfig, NetworkConfig, RunConfig, build, check_device_present,
                                  free_port, load_data, merge, parse_override, present_devices, to_dict,
                                  with_overrides)
from replay.config import ReplayConfig
from streamer.config import StreamerConfig

__all__ = ["REFRESHED_TEACHER", "ConfigError", "CurveConfig", "NetworkConfig", "PipelineConfig", "RunConfig", "build",
           "free_port", "load", "load_data", "merge", "parse_override", "refreshed_teacher",
           "resolve_ports", "run_folder", "to_dict", "with_overrides", "with_run_config"]


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

    def __post_init__(self) -> None:
        h, w, patch = self.streamer.height, self.streamer.width, self.learner.model.patch_size
        if h % patch or w % patch:  # else the learner drops every batch and never steps
            raise ValueError(f"streamer.height and streamer.width ({h}x{w}) must be multiples of "
                             f"learner.model.patch_size ({patch})")
        if self.labeler.matcher == "xfeat" and min(h, w) < XFEAT_MIN_SIDE:  # else no window is matched
            raise ValueError(f"labeler.matcher=xfeat needs streamer.height and streamer.width of at least "
                             f"{XFEAT_MIN_SIDE} (XFeat works on whole {XFEAT_MIN_SIDE}-pixel cells), got {h}x{w}")
        loss = self.learner.loss
        if loss.match_shape_weight is None:  # chosen by the teacher (LossConfig.match_shape_weight)
            loss.match_shape_weight = 0.0 if self.labeler.teacher_exact_shape else 1.0

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir)

    @property
    def trains_on_ground_truth(self) -> bool:
        """Whether a training stage uses the ground truth a source carries (the oracle teacher,
        the supervised loss); else the streamer neither reads nor sends it."""
        return self.labeler.reads_ground_truth or self.learner.loss.kind == "supervised"

    @property
    def ground_truth_needed(self) -> tuple[str, ...]:
        """The ground truth a window must carry for every view to be trained on (the wire's
        array names): depth and pose for the supervised loss, depth for the oracle teacher (which
        labels from it), none else. The streamer skips a window without it (``no_ground_truth``)."""
        if self.learner.loss.kind == "supervised":
            return ("gt_depth", "gt_cam_to_world")
        return ("gt_depth",) if self.labeler.reads_ground_truth else ()

    @property
    def refreshes_teacher(self) -> bool:
        """Whether ``labeler.refresh_step`` applies: :attr:`refresh_skipped` is None."""
        return self.labeler.refresh_step > 0 and self.refresh_skipped is None

    @property
    def refresh_skipped(self) -> str | None:
        """Why a ``labeler.refresh_step`` does not apply to this run, or None. It applies where
        the learner learns from a depth teacher a distillation could replace (not the oracle,
        whose labels are ground truth, not the supervised loss, which reads no labels, not
        ``teacher=none``), on footage of the user's (``streamer.sources``; not the built-in
        synthetic world, which the shipped teacher was trained on)."""
        if self.trains_on_ground_truth or self.labeler.teacher == "none":
            return "the learner does not learn from this teacher"
        if not self.streamer.sources:
            return "no sources of yours: the built-in synthetic world"
        return None

    def device_problem(self, stage: str, *, device: str | None = None, instance: str = "",
                       rank: int = 0) -> str | None:
        """Why a process of ``stage`` cannot run on this host's devices, or None: its section's
        ``device`` (:data:`DEVICE_STAGES`: ``labeler.device``, ``learner.device``) names one this
        host does not have, said in a line naming the key and the devices there are
        (:func:`reliev3r.config_base.check_device_present`); its process would stop with torch's
        words as it starts. ``auto`` (cuda where there is one, else cpu) and ``cpu`` are on every
        host (checked without loading torch). ``device``: the one the process uses where ``up``
        gave it another than the config's (labeler ``instance`` on ``cuda:K``); ``rank``: a
        learner rank's ``LOCAL_RANK``, whose GPU ``cuda`` is."""
        if stage not in DEVICE_STAGES:
            return None
        key, value = f"{stage}.device", getattr(self, stage).device
        used = device or value
        if used in ("auto", "cpu"):
            return None
        try:
            check_device_present(key, used, rank=rank)
        except ValueError as err:
            if used == value:
                return str(err)
            return (f"{key} {value!r} ({instance} on {used}) is not available here "
                    f"(available: {', '.join(present_devices())})")
        return None

    def data_problem(self) -> str | None:
        """Why the evaluator cannot load ``evaluator.data``, said in a line naming the key, or None:
        a spec of no form, a folder that is not there (``evaluation.datasets.spec_problem``: nothing
        read). Its process would fail as it starts, and be restarted until the run gave up."""
        from evaluation.datasets import spec_problem  # here: the config loads without OpenCV

        problem = spec_problem(self.evaluator.data)
        return f"evaluator.data {problem}" if problem else None

    def ground_truth_problem(self) -> str | None:
        """Why this run would stream nothing, said in a line naming ``streamer.sources``, what
        trains on ground truth and each source with why, or None: it trains on ground truth
        (:attr:`ground_truth_needed`) and no source can carry it (``streamer.sources.ground_truth_absent``:
        a live feed, a video without the synthetic world's, an image folder without 7-Scenes' or
        a ScanNet scene's files). The streamer would skip every window (``no_ground_truth``) and the
        learner wait for ever. One source that may carry it (a folder not there yet too) lets the
        run start: the others' windows are skipped as they come."""
        needed = self.ground_truth_needed
        if not needed or not self.streamer.sources:  # the synthetic world carries it all
            return None
        from streamer.sources import GROUND_TRUTH_NAMES, ground_truth_absent  # here: the config loads without OpenCV

        said = []
        for spec in self.streamer.sources:
            if (why := ground_truth_absent(spec, needed)) is None:
                return None
            said.append(f"{spec}: {why}")
        who = ("learner.loss.kind=supervised trains on" if self.learner.loss.kind == "supervised" else
               f"labeler.teacher={self.labeler.teacher} labels from")
        what = " and ".join(GROUND_TRUTH_NAMES[name] for name in needed)
        return (f"streamer.sources carry none of the ground truth {who} ({what} of every view): {'; '.join(said)}. "
                "Started, every window would be skipped (no_ground_truth) and the learner would wait for ever")


DEVICE_STAGES = ("labeler", "learner")
"""The stages whose section has a ``device`` (the evaluator takes cuda where there is one, else cpu)."""


REFRESHED_TEACHER = Path("teacher") / "embedded_depth.safetensors"
"""Where in a run folder a teacher refresh (``labeler.refresh_step``) writes the new teacher."""


def refreshed_teacher(run_dir: Path) -> Path | None:
    """The teacher a refresh wrote into ``run_dir``, once whole (``reliev3r teacher-train``
    writes its meta after the weights), else None."""
    weights = Path(run_dir) / REFRESHED_TEACHER
    return weights if weights.is_file() and weights.with_suffix(".json").is_file() else None


def run_folder(path: str | Path) -> Path:
    """The run folder ``path`` belongs to: a run folder itself; a snapshot's run
    (``<run>/snapshots/step-N``; a snapshot elsewhere: the folder it is in); an evaluations
    folder's (``step-*.json`` files and no ``evaluations/`` inside) the folder above. The tools'
    results go there by default (``eval``, ``report``), so two runs' results never share a folder."""
    path = Path(path)
    if (path / "meta.json").is_file():  # a snapshot
        return path.parent.parent if path.parent.name == "snapshots" else path.parent
    if not (path / "evaluations").is_dir() and any(path.glob("step-*.json")):  # a run's evaluations
        return path.parent
    return path


RUN_SECTIONS = ("streamer", "evaluator")
"""The sections of a run's ``config.yaml`` a tool reads its snapshots with (:func:`with_run_config`)."""
RUN_LABELER = ("teacher", "matcher", "ransac_threshold_px")
"""The ``labeler`` keys of a run's ``config.yaml`` a tool takes too: those of the baselines
``reliev3r eval`` scores beside the run's model (the depth teacher it learned from, the matcher
of its verified matches and their inlier threshold); the labeler's other keys are how the run
used its hosts (device, workers, threads, batches)."""


def with_run_config(cfg: PipelineConfig, run_dir: Path, *, files: list[str], overrides: list[str]) -> PipelineConfig:
    """The config a tool (``eval``, ``export``, ``view``) reads a run's snapshots with:
    ``cfg`` with the :data:`RUN_SECTIONS` of ``<run_dir>/config.yaml`` (the run's windows: views,
    size, synthetic world, whose held-out scenes its evaluator rendered into
    ``<run_dir>/eval_world`` and a tool reuses rather than renders again with another spec; its
    evaluator's data, windows, stride) and its :data:`RUN_LABELER` keys (its teacher and
    matcher: ``eval``'s baselines), and the ``overrides`` on top, so an option the command does
    not set is the run's; ``cfg`` itself where the command was given config ``files`` or the run
    has no config. The run's other sections and keys are not read (learner options of another
    version still open)."""
    path = Path(run_dir) / "config.yaml"
    if files or not path.is_file():
        return cfg
    data = load_data([path])
    own = {k: data[k] for k in RUN_SECTIONS if k in data}
    labeler = data.get("labeler") or {}
    own["labeler"] = {k: labeler[k] for k in RUN_LABELER if k in labeler}
    return build(PipelineConfig, merge(merge(to_dict(cfg), own), load_data([], overrides)))


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
