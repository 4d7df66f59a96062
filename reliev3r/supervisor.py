"""The local supervisor behind ``reliev3r up``: one process per stage, wired over ZeroMQ.

It resolves the ports (free ones for 0, explicit ones checked before anything starts:
``reliev3r.ports``), writes the resolved config to ``<run.dir>/config.yaml`` (every child
reads that one file) and the endpoints to ``<run.dir>/processes.json``, starts streamer,
replay, labeler, learner and evaluator as separate processes (their logs in
``<run.dir>/logs/``, rotated past ``LOG_BYTES``: ``rotate_log``), restarts a child that
crashes (exponential backoff; the status line says why, from the last error in its log),
prints a one-line status from the children's heartbeats (the last line from what the run left
on disk: the final snapshot and evaluation), and ends the run:

* when the learner exits 0 (``--max-steps`` reached, final snapshot written), it waits for
  the evaluator to score that snapshot, then stops the rest and exits 0;
* on SIGINT/SIGTERM it stops the children in pipeline order (sources first, learner last,
  so the learner writes its snapshot), SIGKILLs any that outlive the grace period, exits 0;
* when a child fails ``GIVE_UP_AFTER`` times in a row, each time within ``EARLY_S`` of its
  start and with the same last error (what a config the stage cannot run with does: a teacher
  or dataset that is not there, windows longer than every source), it says so and stops the
  run, exit 1, instead of restarting it for ever.

Children die with the supervisor even if it is SIGKILLed (PR_SET_PDEATHSIG), so no
orphans are left behind. They run as single processes of this host, none through torchrun:
torchrun's variables in the supervisor's own environment (``RANK_VARIABLES``) are not theirs.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml
import zmq

from monitoring.metrics import Metrics
from reliev3r import config as rconfig
from reliev3r import durable
from reliev3r import ports as rports
from reliev3r import protocol, security
from reliev3r.config import PipelineConfig
from reliev3r.status import latest_evaluation

# Start order; stop order is the reverse except that the learner goes last (it snapshots).
STAGES = ("replay", "streamer", "labeler", "learner", "evaluator")
COMMANDS = {"streamer": "stream", "labeler": "label", "replay": "replay", "learner": "learn",
            "evaluator": "evaluate"}
STOP_ORDER = ("streamer", "labeler", "evaluator", "replay", "learner")
GRACE_S = 20.0
STALE_S = 15.0
"""A running child silent for this long is flagged in the status line (hung or overloaded)."""
BEFORE_REFRESH = "before-refresh"
"""Where a teacher refresh moves the run's snapshots, evaluations and replay store (``FIRST_PART``),
then its ``config.yaml``: written last, that file marks the move complete."""
FIRST_PART = ("snapshots", "evaluations", "replay")
"""What a teacher refresh moves into ``BEFORE_REFRESH``: the first learner, its scores, its replay store."""
STATUS_EVERY_S = 2.0
FINAL_EVAL_TIMEOUT_S = 600.0
REASON_CHARS = 160
"""A crashed child's reason in the status line is cut to this many characters."""
LOG_BYTES = 64 << 20
"""A child's log past this size is rotated (``rotate_log``): a run that never stops keeps at most
some ``(LOG_KEEP + 1) * LOG_BYTES`` of logs a child."""
LOG_KEEP = 3
"""Rotated logs kept a child: ``<child>.log.1`` (the newest) to ``<child>.log.LOG_KEEP``."""

SUMMARY = (("absrel_med", "AbsRel", ".3f"), ("absrel_lsq", "AbsRel lsq", ".3f"), ("ate", "ATE", ".3f"),
           ("rra30", "RRA@30", ".2f"), ("rta30", "RTA@30", ".2f"), ("auc30", "AUC@30", ".3f"))
"""The metrics of the evaluation printed when a run ends: (key, title, format)."""

COUNTED = ("sent", "acked", "labelled", "dropped")
"""Heartbeat status keys that count a process's work since it started (the rest are states)."""

RANK_VARIABLES = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                  "ROLE_RANK", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
"""What torchrun tells a process it starts of its place in a job: left out of the children's
environment (``up`` started inside a torchrun job, or from a shell that exported LOCAL_RANK,
moved its learner's metrics to the resolved port plus LOCAL_RANK, and a WORLD_SIZE above 1
would have the learner join a process group of ranks ``up`` never started)."""

GIVE_UP_AFTER = 6
"""Failures in a row, each early and with the same error, after which the run stops (about a
minute of restarts with the backoff: a transient cause has passed by then)."""
EARLY_S = 60.0
"""A child that dies sooner than this after its start failed at start."""


class StartError(Exception):
    """The run cannot start: a stage's device is not on this host, or ``learner.init`` names no
    usable weights for a learner that has no snapshot of its own (a child failing at start would
    be restarted until the run gave up)."""


class RefreshError(Exception):
    """The first part of a refreshed run cannot be moved into ``before-refresh/``: a part of it is
    there already and in the run folder too (nothing is overwritten)."""


def cuda_devices() -> int:
    """GPUs this host shows the run (``CUDA_VISIBLE_DEVICES`` applies); 0 without CUDA."""
    import torch  # here, so that a supervisor without labelers on cuda never loads it

    return torch.cuda.device_count()


@dataclass
class Child:
    name: str
    """Unique per process: the stage name, or ``labeler-K`` for the K-th extra labeler."""
    stage: str
    overrides: list[str] = field(default_factory=list)
    """Config overrides of this process alone (e.g. the labeler's GPU)."""
    proc: subprocess.Popen | None = None
    restarts: int = 0
    finished: bool = False
    """Exited 0 on its own: done, not restarted."""
    next_start: float = 0.0
    status: dict = field(default_factory=dict)
    carried: dict = field(default_factory=dict)
    """The counts (``COUNTED``) of its earlier incarnations: a process counts from 0."""
    pid: int | None = None
    """Its latest incarnation's: a heartbeat of an earlier one (sent as it died) is stale."""
    last_beat: float = 0.0
    started_at: float = 0.0
    log_offset: int = 0
    """Size of its log when this incarnation started: its own lines come after. A rotation since
    (``rotate_log``) takes off what it moved into ``<child>.log.1``: negative, they begin there."""
    last_error: str = ""
    """Why it last died (the last error in its log), shown in the status line."""
    early_failures: int = 0
    """Failures in a row, each within ``EARLY_S`` of its start with the same ``last_error``."""


class Supervisor:
    def __init__(self, cfg: PipelineConfig, *, out=None):
        self.cfg = cfg
        self.run_dir = cfg.run_dir
        self.out = sys.stdout if out is None else out  # the stream of now, not of the import (pytest's capsys)
        self.children = {c.name: c for c in self._plan(cfg)}
        # Before anything starts: an explicit port in use raises rports.PortError here.
        self.ports = rports.resolve(cfg, ["supervisor", *self.children])
        self.stop_requested = False
        self.gave_up: str | None = None
        """Why the run stopped on a child that keeps failing at start (exit 1), or None."""
        self.started = time.time()
        self.metrics = Metrics("supervisor")
        self.restarts = self.metrics.counter("process_restarts_total", "Child processes restarted after a crash",
                                             ["stage"])
        self.child_up = self.metrics.gauge("child_up", "1 while a child process runs", ["stage"])
        for name in self.children:  # series exist at 0 from the start, so rate() and alerts see them
            self.restarts.labels(name)
            self.child_up.labels(name)
        self._last_status_len = 0
        self._learner_done_at: float | None = None
        self._distill: subprocess.Popen | None = None
        self._distill_offset = 0
        """Size of ``distill.log`` when the distillation started, as a child's ``log_offset``."""
        self._write_said: dict[str, str] = {}
        """What was said of a log not rotated, by its name (said again only when it changes)."""
        self._refresh = "waiting" if cfg.refreshes_teacher else "off"
        """labeler.refresh_step: off, waiting (for its snapshot), distilling, done or failed."""
        if self._refresh == "waiting" and self._refreshed():  # a resumed run keeps its refresh (run() finishes it)
            self._relabel_with(self.teacher_file)
            self._refresh = "done"

    @property
    def depth_loss_off(self) -> bool:
        """Whether the learner's loss has no depth term: the weak loss without a depth teacher
        (``labeler.teacher=none``); the supervised loss trains depth on the ground truth."""
        return self.cfg.labeler.teacher == "none" and self.cfg.learner.loss.kind != "supervised"

    def start_line(self) -> str:
        """What ``up`` says as it starts: the run folder, the teacher, the refresh, what the
        snapshots are scored on (with the keys that score a run on its own footage's ground truth
        where it streams footage and is scored on the synthetic world), the end."""
        data = self.cfg.evaluator.data
        scored = f", scored on {data}" + (
            " (the synthetic world, not your sources: evaluator.data=7scenes:DIR, scannet:DIR or folder:DIR scores "
            "on their ground truth)" if self.cfg.streamer.sources and data.split(":")[0] == "synthetic" else "")
        return (f"reliev3r up: run folder {self.run_dir}, logs in {self.run_dir / 'logs'}, "
                f"teacher {self.cfg.labeler.teacher}"
                + (" (depth loss off)" if self.depth_loss_off else "")
                + {"waiting": f", teacher refresh at step {self.cfg.labeler.refresh_step}",
                   "done": f", refreshed to {self.teacher_file}"}.get(self._refresh, "")
                + (f", no teacher refresh ({self.cfg.refresh_skipped})"
                   if self.cfg.labeler.refresh_step and not self.cfg.refreshes_teacher else "")
                + self._learner_start()
                + scored
                + (f", stopping after {self.cfg.learner.max_steps} steps" if self.cfg.learner.max_steps else ""))

    def _learner_start(self) -> str:
        """The start line's words on where a learner with ``learner.init`` starts: from it, or
        from the run's own newest snapshot (resume wins), from it again after a refresh to come."""
        init = self.cfg.learner.init
        if not init:
            return ""
        if (step := snapshot_step(self.run_dir)) is None:
            return f", learner starting from {init}"
        if self._refresh == "waiting":
            return f", learner resuming its snapshot of step {step}, from {init} after the teacher refresh"
        return f", learner resuming its snapshot of step {step} (learner.init ignored: a run resumes its own)"

    # ------------------------------------------------------------------ main loop
    def run(self) -> int:
        """Run until done or stopped; the exit code. Before anything starts, raises
        :class:`StartError` when a child's device is not on this host (:meth:`device_problem`) or
        the evaluator's data is not there (:meth:`reliev3r.config.PipelineConfig.data_problem`) or
        a run that trains on ground truth has no source that can carry it
        (:meth:`~reliev3r.config.PipelineConfig.ground_truth_problem`),
        :class:`RefreshError` when a teacher refresh cannot move the first part aside (one the run
        stopped in), and then :class:`StartError` when ``learner.init`` cannot start the learner
        (checked on the run folder as the refresh left it: the move can take the learner's own
        snapshots, or those ``learner.init`` names, out of ``snapshots/``; and checked where the
        learner resumes its own snapshot with a refresh still to come, which moves that aside and
        starts the learner from ``learner.init``)."""
        if problem := self.device_problem() or self.cfg.data_problem() or self.cfg.ground_truth_problem():
            raise StartError(problem)
        config_file = self.run_dir / "config.yaml"
        refresh_said = self._finish_refresh(config_file)
        if self.cfg.learner.init:
            from learner.warm_start import start_problem  # here, so that a run without init never loads torch

            # a refresh still to come moves the learner's snapshots aside: it then starts from learner.init
            ahead = self._refresh == "waiting"
            if problem := start_problem(self.cfg.learner, self.run_dir, afresh=ahead):
                if refresh_said:
                    self._print(refresh_said)
                if ahead and snapshot_step(self.run_dir) is not None:
                    problem += (f" (this run resumes its own snapshot, but its teacher refresh at step "
                                f"{self.cfg.labeler.refresh_step} moves it into {BEFORE_REFRESH}/ and starts the "
                                "learner from learner.init)")
                raise StartError(problem)  # the run folder left as it was found, but for the refresh's move
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "logs").mkdir(exist_ok=True)
        self._write_config(config_file)
        self.config_file = config_file
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)
        if self.cfg.monitoring.enabled:
            self.metrics.serve(self.cfg.monitoring.host, self.cfg.monitoring.ports.get("supervisor", 0))
        ctx = zmq.Context()
        beats = ctx.socket(zmq.PULL)
        security.secure_server(beats, self.cfg.network.curve, self.metrics)
        beats.bind(self.cfg.network.bind(self.cfg.network.supervisor_port))
        self._print(self.start_line())
        if refresh_said:
            self._print(refresh_said)
        exit_code = 0
        try:
            for stage in STAGES:
                self._start(self.children[stage])
            last_status = 0.0
            while not self.stop_requested:
                self._drain_heartbeats(beats, timeout_ms=200)
                self._reap_and_restart()
                self._rotate_logs()
                self._refresh_teacher()
                if self._run_complete() or self.gave_up:
                    break
                if time.time() - last_status >= STATUS_EVERY_S:
                    self._print_status()
                    last_status = time.time()
            exit_code = self._final_code()
        finally:
            self._stop_all()
            self._drain_heartbeats(beats, timeout_ms=100)  # the last beats the children sent as they exited
            self._print_status(final=True)
            self._print_evaluation()
            beats.close(linger=0)
            security.stop_authenticator(ctx)
            ctx.destroy(linger=0)
            self.metrics.close()
        return exit_code

    def _on_signal(self, signum, _frame) -> None:
        self.stop_requested = True

    @staticmethod
    def _plan(cfg: PipelineConfig, gpus: int | None = None) -> list[Child]:
        """One child per stage, and ``labeler.workers`` labelers: with the labeler device
        ``cuda``, worker K on ``cuda:(K mod gpus)`` (the host's GPUs in turn, so several labelers
        can share one GPU); on any other device all on that device."""
        out = []
        for stage in STAGES:
            if stage != "labeler":
                out.append(Child(stage, stage))
                continue
            spread = cfg.labeler.device == "cuda" and cfg.labeler.workers > 1
            if spread and gpus is None:
                gpus = cuda_devices()
            for k in range(cfg.labeler.workers):
                extra = [f"labeler.device=cuda:{k % max(1, gpus)}"] if spread else []
                out.append(Child("labeler" if k == 0 else f"labeler-{k}", "labeler", extra))
        return out

    def device_problem(self) -> str | None:
        """Why a child cannot run on this host's devices, or None: the config's ``labeler.device``
        and ``learner.device`` (the learner's ``cuda`` is ``cuda:0``: it is no rank of a job), then
        each labeler's own (``cuda:K`` where several share the host's GPUs: ``_plan``), checked by
        :meth:`reliev3r.config.PipelineConfig.device_problem`. The teacher refresh's distillation
        runs on the labelers' device."""
        for child in self.children.values():
            key = f"{child.stage}.device="
            device = next((o.removeprefix(key) for o in child.overrides if o.startswith(key)), None)
            if problem := (self.cfg.device_problem(child.stage)  # the config's value, as it was written
                           or self.cfg.device_problem(child.stage, device=device, instance=child.name)):
                return problem
        return None

    # ------------------------------------------------------------------ teacher refresh
    @property
    def teacher_file(self) -> Path:
        """Where the teacher refresh writes its weights (``reliev3r teacher-train --out``)."""
        return self.run_dir / rconfig.REFRESHED_TEACHER

    def _refreshed(self) -> bool:
        """The refresh's teacher is whole: its weights and then its meta are written last."""
        return rconfig.refreshed_teacher(self.run_dir) is not None

    def _finish_refresh(self, config: Path) -> str | None:
        """Before any stage starts: a refresh whose teacher is whole but whose first part was not all
        moved aside (the run stopped, or the supervisor was killed, in between) is finished, with
        ``config``, the config the first part ran with (this run's replaces it). A first part moved
        aside by a version that wrote no mark (a learner has written snapshots since) only gets its
        mark. A first part moved whole whose ``before-refresh/`` was removed since (none there, and
        not the snapshot the teacher was distilled from in the run folder) is left gone: the run
        goes on as it is. What to say of it, if anything."""
        before = self.run_dir / BEFORE_REFRESH
        if self._refresh != "done" or (before / "config.yaml").is_file():
            return None
        if (before / "snapshots").is_dir() and (self.run_dir / "snapshots").is_dir():
            self._mark_moved(config)
            return None
        if not before.exists() and self._distilled_snapshot_here() is False:
            return (f"warning: the run before the teacher refresh is gone ({before} is missing: the first learner's "
                    f"snapshots, evaluations and replay store); the run goes on as it is on {self.teacher_file}, "
                    "nothing moved")
        self._move_first_part(config)
        return (f"the teacher refresh the run stopped in is finished: the run before it is in {before}, and the "
                f"learner starts afresh on {self.teacher_file} with an empty replay")

    def _distilled_snapshot_here(self) -> bool | None:
        """Whether the run's ``snapshots/`` holds the snapshot the refresh's teacher was distilled
        from (its folder's name and its weights' sha256, which the teacher's meta records:
        ``reliev3r.distill``); None where the meta does not record them (a teacher put there by other
        means): then a first part is taken for one still to move, as before this was checked."""
        try:
            extra = json.loads(self.teacher_file.with_suffix(".json").read_text())["data"]["extra"]
            name, digest = Path(extra["snapshot"]).name, extra["weights_sha256"]
            weights = f"{extra['weights']}.safetensors"
        except (OSError, ValueError, TypeError, KeyError):
            return None
        if not (name and isinstance(digest, str)):
            return None
        try:
            meta = json.loads((self.run_dir / "snapshots" / name / "meta.json").read_text())
            return meta["files"][weights]["sha256"] == digest
        except (OSError, ValueError, TypeError, KeyError):
            return False

    def _move_first_part(self, config: Path) -> None:
        """Move the run before a teacher refresh (``FIRST_PART``) into ``<run.dir>/before-refresh``,
        then copy ``config`` (the config it ran with; this run's where there is none) there last,
        which marks the move complete. Renames only, each part moved unless already there, so a
        move cut short is finished by doing it again. The stages must be stopped."""
        before = self.run_dir / BEFORE_REFRESH
        both = [name for name in FIRST_PART if (self.run_dir / name).exists() and (before / name).exists()]
        if both:  # checked first: nothing is moved
            raise RefreshError(f"cannot move the run before its teacher refresh into {before}: "
                               + ", ".join(both) + " in both the run folder and there; move one of each away")
        before.mkdir(exist_ok=True)
        for name in FIRST_PART:
            if (self.run_dir / name).exists():
                os.replace(self.run_dir / name, before / name)
        durable.fsync(before)  # the move on disk before its mark: a power loss cannot leave a mark without it
        durable.fsync(self.run_dir)
        self._mark_moved(config)

    def _mark_moved(self, config: Path) -> None:
        """Copy ``config`` (this run's where there is none) into ``before-refresh/`` whole: the
        mark of a complete move. eval and view take before-refresh/ for a run of its own
        (reliev3r.config.run_folder) and read their windows from that config.yaml, else from their
        own defaults."""
        before = self.run_dir / BEFORE_REFRESH
        if config.is_file():
            durable.write(before / "config.yaml", config.read_bytes(), tmp=before / "config.yaml.tmp")
        else:
            self._write_config(before / "config.yaml")

    def _write_config(self, path: Path) -> None:
        """This run's config, resolved (its ports among it), to ``path``, atomically and durably."""
        durable.write(path, yaml.safe_dump(rconfig.to_dict(self.cfg), sort_keys=False),
                      tmp=path.with_suffix(".yaml.tmp"))

    def _relabel_with(self, weights: Path) -> None:
        for child in self.children.values():
            if child.stage == "labeler":
                child.overrides = [o for o in child.overrides if not o.startswith("labeler.teacher=")]
                child.overrides.append(f"labeler.teacher=embedded:{weights}")

    def _refresh_teacher(self) -> None:
        """``labeler.refresh_step``: at the first snapshot of that step or later, stop the learner
        (its last snapshot is what is distilled), the labelers and the evaluator (what they would
        make meanwhile is thrown away with the first teacher: the distillation gets the cores
        and the GPU) and distil the learner into a new embedded teacher in a child process; when
        that has written its weights, start the run again on them. A whole teacher (weights, then
        the meta with their digest) is the refresh's whatever the child's exit code, as it is for a
        resumed run (a non-zero code after it is said); a distillation that ends without one has
        failed: that is reported, the labelers go on with their teacher and the learner resumes."""
        lc = self.cfg.labeler
        learner = self.children["learner"]
        if self._refresh == "waiting":
            step = snapshot_step(self.run_dir)
            if step is None or step < lc.refresh_step or learner.finished:
                return
            learner.next_start = math.inf  # held, not restarted, until the refresh is over
            self._stop([learner])
            step = snapshot_step(self.run_dir)
            held = self._held_for_refresh()
            for child in held:
                child.next_start = math.inf
            self._stop(held)
            self._write_pids()  # `reliev3r status` shows them stopped

            # its own session (a SIGINT at the terminal reaches the supervisor only), gone with the
            # supervisor all the same, even if it is SIGKILLed (RELIEV3R_SUPERVISED: die_with_supervisor);
            # appending, so that a rotation (_rotate_logs) leaves no hole, as for a child
            env = self.child_environment()
            with open(self.distill_log, "ab") as log:
                self._distill_offset = log.tell()
                self._distill = subprocess.Popen(self.distill_command(), stdout=log, stderr=subprocess.STDOUT,
                                                 stdin=subprocess.DEVNULL, env=env, start_new_session=True)
            self._refresh = "distilling"
            self._print(f"snapshot of step {step}: distilling the learner into a new teacher for "
                        f"{lc.refresh_seconds:g} s (log: {self.distill_log})")
            return
        if self._refresh != "distilling" or self._distill.poll() is None:
            return
        code, self._distill = self._distill.returncode, None
        for child in [learner, *self._held_for_refresh()]:
            child.next_start = 0.0  # started again below, or by _reap_and_restart
        if not self._refreshed():
            log = self.distill_log
            if not (why := last_error(log, self._distill_offset)):  # else its last line, from where it began
                line = last_line(log, self._distill_offset)[:REASON_CHARS]
                why = f"exit code {code}: {line}" if line else f"exit code {code}"
            self._refresh = "failed"
            self._print(f"teacher refresh failed ({why}); the labelers keep teacher {lc.teacher} and the "
                        "learner resumes")
            return
        self._refresh = "done"
        self._relabel_with(self.teacher_file)
        # What was measured is a new run on the distilled teacher (docs/RESULTS.md, issue 21): a
        # learner that goes on, its replay full of the first teacher's labels, kept their mark.
        restarted = [c for c in self.children.values() if c.stage != "streamer"]
        self._stop(restarted)
        self._move_first_part(self.config_file)
        exited = f" (the distillation exited with code {code} after writing it)" if code else ""
        self._print(f"new teacher {self.teacher_file}{exited}: the learner starts afresh on it with an empty replay "
                    f"(the run before the refresh is in {self.run_dir / BEFORE_REFRESH})")
        for stage in STAGES:
            for child in restarted:
                if child.stage == stage:
                    self._start(child)

    @property
    def distill_log(self) -> Path:
        """The teacher refresh's log, rotated as a child's (``_rotate_logs``)."""
        return self.run_dir / "logs" / "distill.log"

    def distill_command(self) -> list[str]:
        """The command line of the teacher refresh's distillation: ``teacher-train --distill`` of this run."""
        from reliev3r.distill import recipe

        lc = self.cfg.labeler
        return [sys.executable, "-m", "reliev3r.cli", "teacher-train", "--distill", str(self.run_dir),
                "--out", str(self.teacher_file.parent), "--device", lc.device, "--time-budget",
                str(lc.refresh_seconds), "--steps", "100000000", f"init={refresh_init(lc.teacher)}", *recipe(lc.device)]

    def _held_for_refresh(self) -> list[Child]:
        """The children a teacher refresh stops besides the learner: those whose work it throws
        away (replay keeps its windows for a failed refresh; the streamer keeps its place)."""
        return [c for c in self.children.values() if c.stage in ("labeler", "evaluator") and not c.finished]

    def _stop(self, children: list[Child]) -> None:
        """SIGTERM to each, then SIGKILL to those still running ``GRACE_S`` later; waited for in
        ``STOP_ORDER`` (the learner, which writes a snapshot, last) and left stopped."""
        order = sorted(children, key=lambda c: STOP_ORDER.index(c.stage))
        for child in order:
            if child.proc is not None and child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
        deadline = time.time() + GRACE_S
        for child in order:
            if child.proc is None:
                continue
            try:
                child.proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                self._print(f"{child.name} did not stop within {GRACE_S:.0f}s; killing it")
                child.proc.kill()
                child.proc.wait()
            child.proc = None
            self.child_up.labels(child.name).set(0)

    # ------------------------------------------------------------------ children
    def _log_path(self, child: Child) -> Path:
        return self.run_dir / "logs" / f"{child.name}.log"

    def _rotate_logs(self) -> None:
        """Rotate each child's log that has passed ``LOG_BYTES`` (``rotate_log``), its ``log_offset``
        moved with it, and the teacher refresh's ``distill.log`` likewise."""
        for child in self.children.values():
            child.log_offset -= self._rotate(self._log_path(child))
        self._distill_offset -= self._rotate(self.distill_log)

    def _rotate(self, log: Path) -> int:
        """``rotate_log(log)``; one the disk refuses (full, an I/O error) is said once while it
        fails alike, and the log grows on until a later try, which is made at every loop turn."""
        try:
            moved = rotate_log(log)
        except OSError as err:
            said = f"{log.name} not rotated: {err.strerror or err}; tried again until there is room"
            if self._write_said.get(log.name) != said:
                self._write_said[log.name] = said
                self._print(said)
            return 0
        self._write_said.pop(log.name, None)
        return moved

    def command(self, child: Child) -> list[str]:
        """The command line of a child: its stage's ``reliev3r`` command on the run's config."""
        return [sys.executable, "-m", "reliev3r.cli", COMMANDS[child.stage], "--config", str(self.config_file),
                *child.overrides]

    def _start(self, child: Child) -> None:
        # appending (O_APPEND): the child, and what it starts, write at the end of the file, so a
        # rotation's truncation leaves no hole before their next line
        log = open(self._log_path(child), "ab")
        child.log_offset = log.tell()
        env = self.child_environment(child.name)
        cmd = self.command(child)
        for key in COUNTED:
            child.carried[key] = child.carried.get(key, 0) + int(child.status.pop(key, 0))
        child.started_at = time.time()
        child.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      env=env, start_new_session=True)
        child.pid = child.proc.pid
        log.close()
        self.child_up.labels(child.name).set(1)
        self._write_pids()

    @staticmethod
    def child_environment(instance: str | None = None) -> dict[str, str]:
        """The environment of a child: this process's but torchrun's (``RANK_VARIABLES``: the
        child is no rank of a job), marked as supervised by it, with ``instance`` its name (a
        stage's child) or none (the teacher refresh's distillation)."""
        env = {k: v for k, v in os.environ.items() if k not in RANK_VARIABLES}
        env["RELIEV3R_SUPERVISED"] = str(os.getpid())
        if instance is not None:
            env.update({"RELIEV3R_INSTANCE": instance, "PYTHONUNBUFFERED": "1"})
        return env

    def _write_pids(self) -> None:
        """``<run.dir>/processes.json``: pids and endpoints (the resolved ports), for operators
        and ``reliev3r status``."""
        mon, net = self.cfg.monitoring, self.cfg.network

        def metrics(name: str) -> str | None:
            return f"http://{mon.host}:{mon.ports[name]}/metrics" if mon.enabled else None

        data = {"supervisor": {"pid": os.getpid(), "metrics": metrics("supervisor"), "ports": self.ports,
                               "endpoints": {"work": net.connect(net.work_port), "replay": net.connect(net.replay_port),
                                             "heartbeats": net.connect(net.supervisor_port)}}}
        for name, child in self.children.items():
            data[name] = {"pid": child.proc.pid if child.proc else None, "restarts": child.restarts,
                          "metrics": metrics(name), "last_error": child.last_error or None,
                          "held": "teacher refresh" if child.proc is None and child.next_start == math.inf else None}
        try:  # its temporary file removed by durable.write where it fails
            durable.write(self.run_dir / "processes.json", json.dumps(data, indent=2),
                          tmp=self.run_dir / "processes.json.tmp")
        except OSError as err:  # a full disk: the run goes on, the file as it was until the next change
            self._print(f"processes.json not written: {err.strerror or err}; written again at the next start "
                        "or exit of a process")

    def _reap_and_restart(self) -> None:
        now = time.time()
        for child in self.children.values():
            if child.finished:
                continue
            if child.proc is None:
                if now >= child.next_start:
                    self._start(child)
                continue
            code = child.proc.poll()
            if code is None:
                continue
            self.child_up.labels(child.name).set(0)
            child.proc = None
            if code == 0:
                child.finished = True
                self._print(f"{child.name} finished")
                continue
            child.restarts += 1
            self.restarts.labels(child.name).inc()
            delay = min(30.0, 0.5 * 2 ** min(child.restarts - 1, 6))
            child.next_start = now + delay
            how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
            found = last_error(self._log_path(child), child.log_offset)
            cause = found or how
            if now - child.started_at >= EARLY_S:  # it ran a while: not a failure at start
                child.early_failures = 0
            elif child.early_failures and cause != child.last_error:
                child.early_failures = 1
            else:
                child.early_failures += 1
            child.last_error = cause
            if child.early_failures >= GIVE_UP_AFTER:
                self.gave_up = (f"{child.name} failed {child.early_failures} times in a row at start ({cause}); "
                                f"stopping the run (log: {self._log_path(child)})")
                self._print(self.gave_up)
                self._write_pids()
                return
            self._print(f"{child.name} died ({how})" + (f": {found}" if found else "") +
                        f"; restart #{child.restarts} in {delay:.1f}s (log: {self._log_path(child)})")
            self._write_pids()

    def _run_complete(self) -> bool:
        learner, evaluator = self.children["learner"], self.children["evaluator"]
        if not learner.finished:
            return False
        if evaluator.finished:
            return True
        if self._learner_done_at is None:
            self._learner_done_at = time.time()
        if time.time() - self._learner_done_at > FINAL_EVAL_TIMEOUT_S:
            self._print("evaluator did not score the final snapshot in time")
            return True
        return False

    def _final_code(self) -> int:
        if self.gave_up:
            return 1
        if self.stop_requested:
            return 0
        learner, evaluator = self.children["learner"], self.children["evaluator"]
        return 0 if learner.finished and evaluator.finished else 1

    def _stop_all(self) -> None:
        """Stop every child, and a teacher refresh's distillation. A refresh stopped once its teacher
        is whole (the child writes it, meta last, just before it exits; or it had exited unseen) is
        the refresh's: it is finished here (the first part moved into before-refresh, renames only),
        so the run folder is what a whole refresh leaves and a resumed run starts afresh on the new
        teacher (a supervisor killed before this is finished by the next ``run``). Stopped sooner,
        nothing of it is kept and a resumed run distils again."""
        distilling = self._refresh == "distilling"
        if self._distill is not None and self._distill.poll() is None:
            os.killpg(self._distill.pid, signal.SIGKILL)
            self._distill.wait()
        self._stop(list(self.children.values()))
        if not distilling:
            return
        if not self._refreshed():
            self._print("teacher refresh cut short: the run stopped while it distilled (no new teacher; "
                        "resumed, the run distils again)")
            return
        self._refresh = "done"
        try:
            self._move_first_part(self.config_file)
        except RefreshError as err:  # said; resumed, the run refuses to start until it is sorted out
            self._print(f"teacher refresh: the new teacher {self.teacher_file} was written, but {err}")
            return
        self._print(f"teacher refresh: the new teacher {self.teacher_file} was written before the run stopped; "
                    f"the run before it is in {self.run_dir / BEFORE_REFRESH}, and resumed, the learner starts "
                    "afresh on it with an empty replay")

    # ------------------------------------------------------------------ status
    def _drain_heartbeats(self, sock: zmq.Socket, timeout_ms: int) -> None:
        if not sock.poll(timeout_ms):
            return
        while True:
            try:
                frames = sock.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                msg = protocol.decode(frames, kinds=("heartbeat",), max_bytes=1 << 16)
            except protocol.ProtocolError as err:
                self.metrics.reject(err.reason)
                continue
            child = self.children.get(msg.meta.get("stage"))
            if child is not None and msg.meta.get("pid") == child.pid and isinstance(msg.meta.get("status"), dict):
                child.status = msg.meta["status"]
                child.last_beat = time.time()

    def _count(self, stage: str, key: str) -> int:
        """A count over every process of ``stage`` (each labeler) and each one's incarnations."""
        return sum(child.carried.get(key, 0) + int(child.status.get(key, 0))
                   for child in self.children.values() if child.stage == stage)

    def status_line(self, final: bool = False) -> str:
        """The one-line status from the children's heartbeats. ``final``: the run is over, so
        the learner's step and the evaluation come from what it left on disk (a heartbeat is
        up to a second old, and a child's last one can be lost when it exits)."""
        s = {stage: dict(self.children[stage].status) for stage in ("streamer", "replay", "learner", "evaluator")}
        st, rp, ln, ev = s["streamer"], s["replay"], s["learner"], s["evaluator"]
        if final:
            step = snapshot_step(self.run_dir)
            if step is not None and step > ln.get("step", 0):
                ln["step"] = step
            done = latest_evaluation(self.run_dir)
            if done is not None and done.get("step", -1) >= ev.get("step", -1):
                ev = {"step": done["step"], **done["model"]}  # the heartbeat's names
        lb = {key: self._count("labeler", key) for key in ("labelled", "dropped")}
        parts = [f"[{time.time() - self.started:6.1f}s]",
                 f"ingested {self._count('streamer', 'sent')} (in flight {st.get('in_flight', 0)})",
                 f"labelled {lb['labelled']}" + (f" dropped {lb['dropped']}" if lb['dropped'] else ""),
                 f"stored {rp.get('stored', 0)}",
                 f"step {ln.get('step', 0)}"]
        if "loss" in ln:
            parts.append(f"loss {ln['loss']:.4f}")
        if "steps_per_s" in ln:
            parts.append(f"{ln['steps_per_s']:.2f} steps/s")
        if self.depth_loss_off:
            parts.append("depth loss off (teacher none)")
        if ev.get("step") is not None and ("absrel_med" in ev or "ate" in ev):  # each where the data has it
            parts.append(f"eval@{ev['step']}" + (f" AbsRel {ev['absrel_med']:.3f}" if "absrel_med" in ev else "")
                         + (f" ATE {ev['ate']:.3f}" if "ate" in ev else ""))
        for key, said in (("write_error", "writes"), ("read_error", "reads")):
            refused = [f"{c.name}: {c.status[key]}"[:REASON_CHARS] for c in self.children.values() if c.status.get(key)]
            if refused:  # a full disk or an I/O error: the stage goes on, what it could not write (read) is not there
                parts.append(f"{said} refused ({'; '.join(refused)})")
        restarts = sum(c.restarts for c in self.children.values())
        if restarts:
            why = "; ".join(f"{c.name}: {c.last_error[:REASON_CHARS]}" for c in self.children.values() if c.last_error)
            parts.append(f"restarts {restarts}" + (f" ({why})" if why else ""))
        now = time.time()
        silent = [c.name for c in self.children.values() if c.proc is not None and c.proc.poll() is None
                  and now - max(c.last_beat, c.started_at) > STALE_S]
        if silent:
            parts.append(f"no heartbeat: {', '.join(silent)}")
        return " | ".join(parts)

    def _print_status(self, final: bool = False) -> None:
        line = self.status_line(final)
        if self.out.isatty() and not final:
            pad = max(0, self._last_status_len - len(line))
            self.out.write("\r" + line + " " * pad)
            self._last_status_len = len(line)
        else:
            self.out.write(line + "\n")
        self.out.flush()

    def _print_evaluation(self) -> None:
        ev = latest_evaluation(self.run_dir)
        if ev is None:
            return

        def row(m: dict) -> str:  # the metrics the data gives (a folder without poses: no ATE)
            return ", ".join(f"{title} {m[key]:{form}}" for key, title, form in SUMMARY if key in m) or "no metric"

        self._print(f"evaluation of step {ev['step']} on {ev['data']} ({ev['windows']} windows): {row(ev['model'])}")
        if "model_fitted_poses" in ev:  # as reconstruct writes them (learner.posefit)
            self._print(f"  its poses fitted to its depth:                   {row(ev['model_fitted_poses'])}")
        self._print(f"  baseline constant depth + identity poses:        {row(ev['baseline_constant_identity'])}")

    def _print(self, text: str) -> None:
        if self.out.isatty() and self._last_status_len:
            self.out.write("\n")
            self._last_status_len = 0
        self.out.write(text + "\n")
        self.out.flush()


def refresh_init(teacher: str) -> Path:
    """The weights the teacher refresh fine-tunes: the labeler's own embedded teacher
    (``embedded``, ``embedded:FILE``, ``embedded:FOLDER``), else the shipped weights."""
    from labelers.embedded import weights_file

    kind, _, path = teacher.partition(":")
    return weights_file(path if kind == "embedded" else None)


def snapshot_step(run_dir: Path) -> int | None:
    """The step of the newest complete snapshot in ``<run.dir>/snapshots`` (the learner renames a
    finished one into place, so a ``step-N`` folder with its ``meta.json`` is whole), or None."""
    steps = [int(m.group(1)) for p in (run_dir / "snapshots").glob("step-*")
             if (m := re.fullmatch(r"step-(\d+)", p.name)) and (p / "meta.json").is_file()]
    return max(steps, default=None)


def rotate_log(log: Path) -> int:
    """Rotate ``log`` once it has passed ``LOG_BYTES``: ``log.1`` .. ``log.{LOG_KEEP-1}`` shift one up
    (``log.{LOG_KEEP}``, the oldest, is dropped), ``log`` is copied into ``log.1`` and truncated to
    nothing. The bytes moved, 0 when it was not rotated.

    Copy and truncate, because a child writes to the file itself (the descriptor it inherited,
    opened for appending: its next line goes to the start of the truncated file, and the child
    knows nothing of the rotation). The copy reads on until the end of what was written, then the
    file is truncated at once: only what a child writes in that moment, between the copy's last
    read and the truncation, is lost; a line written in several pieces at that moment may be split
    between ``log.1`` and the fresh log. Nothing is written twice (but by a supervisor killed between
    the copy and the truncation). The copy goes to ``log.1.tmp`` first, and the older logs shift only
    once it is whole: a copy the disk refuses (full, an I/O error) raises ``OSError`` with every log
    as it was and no part of the copy left."""
    try:
        if log.stat().st_size <= LOG_BYTES:
            return 0
    except FileNotFoundError:
        return 0
    moved = 0
    copy = log.with_name(f"{log.name}.1.tmp")
    with open(log, "r+b") as src:
        try:
            with open(copy, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
                    moved += len(chunk)
        except OSError:
            copy.unlink(missing_ok=True)
            raise
        for k in range(LOG_KEEP - 1, 0, -1):
            older = log.with_name(f"{log.name}.{k}")
            if older.exists():
                os.replace(older, log.with_name(f"{log.name}.{k + 1}"))
        os.replace(copy, log.with_name(f"{log.name}.1"))
        src.truncate(0)
    return moved


TAIL_BYTES = 1 << 18
_EXCEPTION = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt|Fault)\b.*")


def last_line(log: Path, offset: int = 0) -> str:
    """The last line with text of ``log`` after ``offset`` (where a process's part of it began;
    negative: in the rotated ``log.1``, as :func:`last_error` reads it), read from its last
    ``TAIL_BYTES`` only; empty when it wrote none."""
    text = _tail(log, offset).decode("utf-8", "replace")
    return next((ln.strip() for ln in reversed(re.split(r"[\r\n]+", text)) if ln.strip()), "")


def _tail(log: Path, offset: int) -> bytes:
    """``log`` after ``offset``, its last ``TAIL_BYTES`` at most, across a rotation where
    ``offset`` is negative (that many bytes before the end of ``log.1``)."""
    try:
        with open(log, "rb") as f:
            f.seek(max(offset, f.seek(0, os.SEEK_END) - TAIL_BYTES, 0))
            text = f.read()
    except OSError:
        return b""
    if offset < 0 and (want := min(-offset, TAIL_BYTES - len(text))) > 0:  # its start is in log.1
        try:
            with open(log.with_name(f"{log.name}.1"), "rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - want))
                text = f.read() + text
        except OSError:
            pass
    return text


def last_error(log: Path, offset: int = 0) -> str:
    """Why a child died, from its log after ``offset`` (where this incarnation began; negative:
    that many bytes before the end of the rotated ``log.1``, read on into ``log``): the
    exception of a traceback that ends the log (an error outside the structured log, e.g. at
    import), else the last ERROR/CRITICAL JSON line ("msg: exception" or "msg: detail", and
    the latest problem logged before it when it carries neither). Empty when nothing says."""
    text = _tail(log, offset).decode("utf-8", "replace")
    lines = [ln.strip() for ln in re.split(r"[\r\n]+", text) if ln.strip()]
    problem = ""  # the latest "detail" of a WARNING line: what an error line without one refers to
    error = ""
    for i, line in enumerate(lines):
        if line.startswith("{"):
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if not isinstance(rec, dict):
                continue
            level, msg = rec.get("level"), str(rec.get("msg", ""))
            exc = str(rec.get("exc") or "").strip().splitlines()
            detail = str(rec.get("detail") or "")
            if level in ("ERROR", "CRITICAL"):
                # the exception's own line, not notes printed after it (CUDA's "Compile with
                # TORCH_USE_CUDA_DSA ..."); the last one: the outermost of a chain
                named = [ln for ln in exc if _EXCEPTION.match(ln)]
                own = (named or exc)[-1] if exc else detail
                error = f"{msg}: {own}" if own else (f"{msg} (last problem: {problem})" if problem else msg)
            elif level == "WARNING" and detail:
                reason = rec.get("reason")
                # a SourceError's detail already starts with its reason: said once
                problem = f"{reason}: {detail}" if reason and not detail.startswith(f"{reason}: ") else detail
        elif line.startswith("Traceback (most recent call last)"):
            block = []
            for ln in lines[i + 1:]:
                if ln.startswith("{"):
                    break
                block.append(ln)
            found = [ln for ln in block if _EXCEPTION.match(ln)]
            if found:
                error = found[-1]
    return error
