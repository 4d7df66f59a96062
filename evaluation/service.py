"""The evaluator process: scores every new snapshot on held-out ground truth.

Results go to ``<run.dir>/evaluations/step-NNNNNNNNN.json`` (atomic and durable,
``reliev3r.durable.write``; its pictures beside it, durable before it, ``evaluation.pictures``, kept as
the snapshots are: ``learner.keep_last`` and ``learner.keep_every``) and to
Prometheus (``reliev3r_eval_*`` gauges), so a dashboard shows accuracy over training time. Each result names
the snapshot it scored (``snapshot_id``: :func:`snapshot_id` of its meta); a snapshot written again
under a scored name (a learner started afresh, e.g. ``snapshots/`` deleted and the run resumed) is
another snapshot, scored again and its result replaced, as is one beside a result that names none
(written before results named their snapshot). The process exits 0 once it has scored a
snapshot of ``learner.max_steps`` or later (``reliev3r up --max-steps``: the last one the learner
writes; a run taken further waits for the new ones). Waiting for a new snapshot lists the folder
and reads no weights (the metas of the newest one and of those passed over after it only); a
snapshot is checked whole once, when it is loaded, and one that is pruned or damaged before then
is passed over: that very snapshot (its ``snapshot_id``, or none where its meta does not read),
so one written again whole under its name is tried again.

A result or picture is written through a temporary file renamed into place: those a crash left
between the two are removed as the evaluator starts (``remove_temporaries``). A result the disk
refuses (full, an I/O error) is said (an error line, the status's ``write_error``, each try counted
in ``result_write_failures_total``), kept in memory and written at each later turn until there is
room, while the evaluator scores the snapshots that come (scored once each; one whose result was
never written is scored again by a later start). It does not exit on the last snapshot before that
one's result is written. The folder ``evaluations/`` the disk refuses to make (a first start on a
full disk) is said and tried alike, and so is the held-out synthetic world (the default
``evaluator.data``) it refuses to render: no snapshot is scored until it is. Evaluation data the
disk refuses to read (an I/O error) is said and tried alike, counted in ``data_read_failures_total``
under the status's ``read_error``.

SIGTERM/SIGINT are honoured between snapshots and between the windows of a scoring: a scoring
in progress is abandoned after the window at hand (nothing is written for it), so the process
exits within one window's time, not one evaluation's.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path

import torch

from evaluation.baselines import window_matches
from evaluation.config import EvaluatorConfig
from evaluation.datasets import held_out_world, load_windows
from evaluation.evaluate import has_ground_truth, score_model_and_fitted, trivial_baseline
from evaluation.metrics import mean_metrics
from evaluation.pictures import TEMPORARY as PICTURE_TEMPORARY
from evaluation.pictures import picture_snapshot, prune_pictures
from learner import snapshot as snapshots
from monitoring.metrics import Metrics
from reliev3r import durable
from reliev3r.config import PipelineConfig
from reliev3r.service import Runtime, serve

WAIT_SAY_S = 60.0
"""How often an evaluator that has seen no snapshot yet says where it waits for one."""

REPORTED = ("absrel_med", "delta_med", "absrel_lsq", "absrel_lsq_frame", "ate", "rpe_trans", "rpe_rot_deg",
            "rra30", "rta30", "auc30", "accuracy", "completeness")
"""The metrics logged and sent in the heartbeat after each snapshot (each where the data gives
it), under the names of the evaluation's JSON: the supervisor reads either the same way."""
FITTED_REPORTED = ("ate", "rpe_trans", "rpe_rot_deg", "rra30", "rta30", "auc30", "accuracy", "completeness")
"""The metrics of the snapshot with its poses fitted to its depth (``learner.posefit``, what
``reliev3r reconstruct`` writes), where the data has ground-truth poses: those the poses move.
In the JSON under ``model_fitted_poses``, in Prometheus as ``eval_metric{model="model_fitted_poses"}``."""


TEMPORARY = re.compile(r"step-\d+\.tmp")
"""The temporary file of a result (``step-N.json`` written through ``step-N.tmp``: :func:`write_json`)."""


def write_json(path: Path, data: dict) -> None:
    durable.write(path, json.dumps(data, indent=2), tmp=path.with_suffix(".tmp"))


def remove_temporaries(out_dir: Path) -> list[Path]:
    """Remove from ``out_dir`` the temporary files of results (:data:`TEMPORARY`) and of pictures
    (``evaluation.pictures.TEMPORARY``) that a crash between their write and their rename left;
    results, pictures and files of other names stay. For an evaluator's start, before it writes
    any: a temporary file is otherwise removed only when its step is scored again. Returns what
    was removed."""
    removed = []
    for path in Path(out_dir).iterdir():
        if TEMPORARY.fullmatch(path.name) or PICTURE_TEMPORARY.fullmatch(path.name):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


class Stopped(Exception):
    """A stop was asked during a scoring; ``args[0]``: the windows scored before it."""


class StopAware:
    """The evaluation windows, one at a time, while no stop is asked (checked before each):
    ``evaluation.evaluate.score_model_and_fitted`` iterates them, so a stop ends a scoring after
    the window at hand."""

    def __init__(self, windows: list, runtime: Runtime):
        self.windows, self.runtime = windows, runtime

    def __len__(self) -> int:
        return len(self.windows)

    def __iter__(self):
        for i, window in enumerate(self.windows):
            if self.runtime.stopping:
                raise Stopped(i)
            yield window


class EvaluatorMetrics:
    """The evaluator's Prometheus series."""

    def __init__(self, m: Metrics):
        self.metric = m.gauge("eval_metric", "Evaluation metric of the newest scored snapshot", ["metric", "model"])
        self.step = m.gauge("eval_snapshot_step", "Learner step of the newest scored snapshot")
        self.duration = m.gauge("eval_duration_seconds", "Wall time of the newest evaluation")
        self.write_failures = m.counter("result_write_failures_total",
                                        "Writes of a result, of their folder or of the held-out world the disk "
                                        "refused (ENOSPC: full, EIO: an I/O error), by errno name: each try, one a "
                                        "turn while it is refused",
                                        ["reason"])
        self.read_failures = m.counter("data_read_failures_total",
                                       "Reads of the evaluation data the disk refused (EIO: an I/O error), by errno "
                                       "name: each try, one a turn while it is refused", ["reason"])

    def report(self, result: dict, model: str) -> None:
        for key in REPORTED:
            if key in result:
                self.metric.labels(key, model).set(result[key])


class EvaluatorService:
    """Loads the evaluation windows and scores the baseline; ``step()`` scores the newest
    snapshot not scored yet, or waits ``evaluator.poll_s`` when there is none."""

    def __init__(self, cfg: PipelineConfig, runtime: Runtime, metrics: EvaluatorMetrics):
        self.cfg: EvaluatorConfig = cfg.evaluator
        self.runtime, self.metrics = runtime, metrics
        self.snap_dir = cfg.run_dir / "snapshots"
        self.out_dir = cfg.run_dir / "evaluations"
        self.unwritten: dict[str, dict] = {}
        """Results scored and not written yet (the disk refused them), by snapshot name, oldest first."""
        self.refused: dict[str, str] = {}
        """What was said of each result in :attr:`unwritten` (said again only when it changes)."""
        self.folder_refused: str | None = None
        """What was said of :attr:`out_dir` while the disk refuses to make it (None: it is there)."""
        self.data_refused: str | None = None
        """What was said of the evaluation data while the disk refuses it (None: loaded, :meth:`_load_data`)."""
        self.data_status = "write_error"
        """The status key :attr:`data_refused` is under: ``write_error`` (the held-out world's render)
        or ``read_error`` (the data's reading)."""
        if self._make_folder() and (removed := remove_temporaries(self.out_dir)):
            runtime.log.info("removed temporary files a crash left", extra={"folder": str(self.out_dir),
                                                                             "removed": len(removed)})
        self.done = scored(self.out_dir)
        """Snapshot name: the ``snapshot_id`` its result records (None: it records none)."""
        self.passed: dict[str, str | None] = {}
        """Snapshots that could not be loaded (pruned before their load, or damaged): name -> the
        ``snapshot_id`` it had (:func:`read_id`; None: its meta did not read)."""
        self.max_steps = cfg.learner.max_steps
        self.keep_last, self.keep_every = cfg.learner.keep_last, cfg.learner.keep_every
        """The pictures' retention: the snapshots' (``evaluation.pictures.prune_pictures``)."""
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if cfg.learner.threads:
            torch.set_num_threads(cfg.learner.threads)
        self.streamer, self.run_dir = cfg.streamer, cfg.run_dir
        self.windows: list | None = None
        """The evaluation windows, None while the disk refuses the held-out world (:meth:`_load_data`)."""
        self.baseline: dict | None = None
        runtime.log.info("loading evaluation data", extra={"data": self.cfg.data})
        self.matches: list | None = None
        """Each window's verified matches, for the poses fitted to a snapshot's depth (None: no poses
        to score, or the data is not loaded yet)."""
        self.labeler = cfg.labeler
        self._load_data()
        self.seen, self.say_at = False, 0.0
        """A snapshot was in the folder; when :meth:`_say_waiting` may say where it waits again."""
        self.last_scored = False
        """The run's last snapshot (:func:`is_last`) is scored: exit once every result is written."""

    def step(self) -> int | None:
        """Score the newest snapshot if it is new; an exit status once the last one
        (:func:`is_last`) is scored or a stop abandoned the scoring, else None."""
        runtime = self.runtime
        if self.unwritten:
            self._write_results()
        elif self.folder_refused is not None:
            self._make_folder()
        if self.last_scored and not self.unwritten:
            return 0
        if self.windows is None and not self._load_data():  # nothing to score on yet
            runtime.wait(self.cfg.poll_s)
            return None
        windows = self.windows
        newest = self._newest()
        if newest is None:
            self._say_waiting()
            runtime.wait(self.cfg.poll_s)
            return None
        snap, ident = newest
        started = time.time()
        try:
            model, meta = snapshots.load_model(snap, self.device)
        except (snapshots.SnapshotError, OSError) as err:  # pruned by the learner, or damaged
            runtime.log.warning("snapshot passed over", extra={"snapshot": snap.name, "error": str(err)})
            self.passed[snap.name] = ident  # as read before the load: one written again since is tried
            return None
        try:
            rows, fitted_rows = score_model_and_fitted(model, StopAware(windows, runtime), self.device, self.matches)
            result = mean_metrics(rows)
            fitted = None if fitted_rows is None else mean_metrics(fitted_rows)
        except Stopped as stop:
            runtime.log.info("evaluation abandoned on stop", extra={"snapshot": snap.name, "windows": len(windows),
                                                                   "scored": stop.args[0]})
            return 0
        elapsed = time.time() - started
        record = {"snapshot": str(snap), "snapshot_id": snapshot_id(meta), "step": meta["step"],
                  "data": self.cfg.data, "windows": len(windows), "model": result,
                  "baseline_constant_identity": self.baseline, "seconds": elapsed}
        if fitted is not None:
            record["model_fitted_poses"] = {k: fitted[k] for k in FITTED_REPORTED if k in fitted}
        try:  # pictures (durable) before the JSON: who sees the JSON sees them; never fatal
            self.out_dir.mkdir(parents=True, exist_ok=True)  # where the disk refused it so far
            record["pictures"] = picture_snapshot(model, windows, self.device, self.out_dir, snap.name)
        except OSError as err:  # a full disk: the result is written without them
            runtime.log.error("pictures not written", extra={"snapshot": snap.name, "reason": durable.errno_name(err),
                                                             "detail": str(err)})
        except Exception:
            runtime.log.exception("pictures failed", extra={"snapshot": snap.name})
        self.done[snap.name] = record["snapshot_id"]  # scored: not again, whether its result is written or not
        self.unwritten.pop(snap.name, None)
        self.unwritten[snap.name] = record
        self._write_results()
        try:  # as the learner prunes its snapshots; never fatal (none where the folder is not made)
            if self.folder_refused is None:
                prune_pictures(self.out_dir, keep_last=self.keep_last, keep_every=self.keep_every)
        except OSError:
            runtime.log.exception("pruning older pictures failed", extra={"folder": str(self.out_dir)})
        self.metrics.report(result, "model")
        if fitted is not None:
            self.metrics.report(record["model_fitted_poses"], "model_fitted_poses")
        self.metrics.step.set(meta["step"])
        self.metrics.duration.set(elapsed)
        runtime.status.update(step=meta["step"], **{k: result[k] for k in REPORTED if k in result})
        runtime.log.info("evaluated snapshot", extra={"step": meta["step"],
                                                      **{k: round(result[k], 4) for k in REPORTED if k in result}})
        self.last_scored = is_last(meta, self.max_steps)
        return 0 if self.last_scored and not self.unwritten else None

    def _write_results(self, *, closing: bool = False) -> None:
        """Write the results in :attr:`unwritten`, oldest first. One the disk refuses (full, an
        I/O error) stays for the next turn, no temporary file left, and is said: an error line the
        first time it fails so, the status's ``write_error`` until every result is written; none is
        tried while the disk refuses their folder (:meth:`_make_folder`). At ``closing``, those not
        written are said lost (a later start scores them again)."""
        runtime = self.runtime
        made = self._make_folder()
        for name, record in list(self.unwritten.items()) if made else ():
            try:
                write_json(self.out_dir / f"{name}.json", record)
            except OSError as err:
                said = f"result of {name}: {durable.refusal(err)}"
                self.metrics.write_failures.labels(durable.errno_name(err)).inc()
                if self.refused.get(name) != said and not closing:
                    runtime.log.error("result not written: kept, and written once the disk has room; the "
                                      "evaluator goes on", extra={"snapshot": name, "reason": durable.errno_name(err),
                                                                  "detail": str(err)})
                self.refused[name] = said
                continue
            del self.unwritten[name]
            if self.refused.pop(name, None) is not None:
                runtime.log.info("result written", extra={"snapshot": name})
        if not self.unwritten:
            runtime.status.pop("write_error", None)
            return
        newest = next(reversed(self.unwritten))
        runtime.status["write_error"] = self.folder_refused or self.refused[newest]  # the folder's, else the newest's
        if closing:
            runtime.log.warning("results not written at close: their snapshots are scored again at the next start",
                                extra={"snapshots": list(self.unwritten)})

    def _load_data(self) -> bool:
        """Load :attr:`windows` and score :attr:`baseline` on them where not loaded yet; whether
        they are. Data the disk refuses (full, an I/O error: ``reliev3r.durable.REFUSED``) is said as a refused
        result is: an error line the first time it fails so, counted, the status's ``write_error``
        until it is loaded. What it refuses to write (the default ``synthetic`` data's held-out
        world, rendered into the run folder at a run's first start, which went out of the
        evaluator and met the full disk again at every restart) is counted with the results'
        writes; what it refuses to read (the data's files, e.g. 7-Scenes frames and their
        intrinsics) in ``data_read_failures_total``, under the status's ``read_error``. Tried
        again at each turn; no snapshot is scored meanwhile. Any other failure raises, as before."""
        st = self.streamer
        try:
            if self.cfg.data == "synthetic":  # the writes: the held-out world rendered where not there yet
                held_out_world(self.run_dir, st.synthetic)
        except OSError as err:
            if err.errno not in durable.REFUSED:
                raise
            return self._data_refused(err, "write_error")
        try:
            self.windows = load_windows(self.cfg.data, views=st.views, height=st.height, width=st.width,
                                        windows=self.cfg.windows, stride=self.cfg.stride, run_dir=self.run_dir,
                                        synthetic_cfg=st.synthetic)
        except OSError as err:
            if err.errno not in durable.REFUSED:
                raise
            return self._data_refused(err, "read_error")
        self.baseline = trivial_baseline(self.windows)
        self.metrics.report(self.baseline, "constant_identity")
        if self.windows and has_ground_truth(self.windows)[1]:
            self.matches = window_matches(self.windows, self.labeler, self.device)
        if self.data_refused is not None:
            self.runtime.log.info("evaluation data loaded", extra={"data": self.cfg.data})
            self._data_said_no_more()
            self.data_refused = None
        return True

    def _data_said_no_more(self) -> None:
        """Take the status's word on the data (:attr:`data_status`) back: it is loaded, or refused
        the other way now (a ``write_error`` stays while a result or the folder is refused)."""
        if self.data_status == "read_error":
            self.runtime.status.pop("read_error", None)
        elif not self.unwritten and self.folder_refused is None:
            self.runtime.status.pop("write_error", None)

    def _data_refused(self, err: OSError, key: str) -> bool:
        """:meth:`_load_data`'s refused write (``key`` ``write_error``) or read (``read_error``):
        counted, said once while it fails alike, under ``key`` in the status; False (not loaded)."""
        what = "held-out world" if self.cfg.data == "synthetic" else f"evaluation data {self.cfg.data}"
        said = f"{what}: {durable.refusal(err)}"
        series = self.metrics.write_failures if key == "write_error" else self.metrics.read_failures
        series.labels(durable.errno_name(err)).inc()
        if said != self.data_refused or key != self.data_status:
            self.runtime.log.error(f"evaluation data not {'loaded' if key == 'write_error' else 'read'}: tried again "
                                   "at each turn; the evaluator waits",
                                   extra={"data": self.cfg.data, "reason": durable.errno_name(err),
                                          "detail": str(err)})
        if key != self.data_status and self.data_refused is not None:
            self._data_said_no_more()
        self.data_refused, self.data_status = said, key
        self.runtime.status[key] = said
        return False

    def _make_folder(self) -> bool:
        """Make :attr:`out_dir` where it is not there; whether it is. One the disk refuses (full,
        an I/O error; a run's first start on a full disk, which went out of the evaluator and met
        it again at every restart) is said as a refused result is: an error line the first time
        it fails so, counted, the status's ``write_error`` until it is made. Tried again at each
        turn while the evaluator scores the snapshots that come."""
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            said = f"results folder: {durable.refusal(err)}"
            self.metrics.write_failures.labels(durable.errno_name(err)).inc()
            if said != self.folder_refused:
                self.runtime.log.error("results folder not made: tried again at each turn; the evaluator goes on",
                                       extra={"folder": str(self.out_dir), "reason": durable.errno_name(err),
                                              "detail": str(err)})
            self.folder_refused = self.runtime.status["write_error"] = said
            return False
        if self.folder_refused is not None:
            self.runtime.log.info("results folder made", extra={"folder": str(self.out_dir)})
            self.folder_refused = None
            if not self.unwritten and (self.data_refused is None or self.data_status == "read_error"):
                self.runtime.status.pop("write_error", None)
        return True

    def _say_waiting(self) -> None:
        """While the snapshot folder has held no snapshot, say where the evaluator waits for one:
        at its first wait and every :data:`WAIT_SAY_S` after (an evaluator whose run.dir is not
        the learner's, on another host without a shared folder, waited for ever without a word)."""
        if self.seen or time.monotonic() < self.say_at:
            return
        if any(self.snap_dir.glob("step-*")):
            self.seen = True
            return
        self.say_at = time.monotonic() + WAIT_SAY_S
        self.runtime.log.info("waiting for a snapshot", extra={
            "folder": str(self.snap_dir), "note": "the learner of this run.dir writes them there; a learner on "
                                                  "another host must write to this same folder (a shared volume)"})

    def _newest(self) -> tuple[Path, str | None] | None:
        """The newest snapshot not passed over (the one of its name that was, by its
        :func:`read_id`), with its ``read_id``, when it is not scored (its name with a result that
        names it: its meta read, no weights), else None."""
        for _, path in reversed(snapshots.list_snapshots(self.snap_dir)):
            ident = read_id(path)
            if path.name in self.passed and self.passed[path.name] == ident:
                continue
            return None if ident is not None and self.done.get(path.name) == ident else (path, ident)
        return None

    def close(self) -> None:
        """A last try at the results not written yet; nothing to release: each scoring's model is
        dropped after it."""
        if self.unwritten:
            self._write_results(closing=True)


def is_last(meta: dict, max_steps: int) -> bool:
    """Whether a snapshot is the last the learner writes in this run: of ``max_steps`` (its
    final one) or past it (a run started again with fewer steps than it had made)."""
    return bool(max_steps) and int(meta["step"]) >= max_steps


def snapshot_id(meta: dict) -> str:
    """What tells a snapshot from another of the same name: a digest of its meta's write time
    and its files' sizes and checksums (no weights read)."""
    ident = json.dumps({"time": meta.get("time"), "files": meta.get("files")}, sort_keys=True)
    return hashlib.sha256(ident.encode()).hexdigest()


def scored(out_dir: Path) -> dict[str, str | None]:
    """The snapshots with a result in ``out_dir``: name -> the ``snapshot_id`` it records (None
    where it records none or does not parse)."""
    out = {}
    for path in out_dir.glob("step-*.json"):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            record = None
        out[path.stem] = record.get("snapshot_id") if isinstance(record, dict) else None
    return out


def read_id(snap: Path) -> str | None:
    """The ``snapshot_id`` of the snapshot folder ``snap``, from its meta (no weights read);
    None where its meta cannot be read (its load says why)."""
    try:
        meta = json.loads((snap / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    return snapshot_id(meta) if isinstance(meta, dict) else None


def is_scored(snap: Path, done: dict[str, str | None]) -> bool:
    """Whether ``done`` (:func:`scored`) has a result of this very snapshot: one of its name
    that records its ``snapshot_id``. A snapshot whose meta cannot be read is not scored."""
    return done.get(snap.name) is not None and done[snap.name] == read_id(snap)


def run(cfg: PipelineConfig, runtime: Runtime) -> int:
    # A restarted run whose last snapshot was scored before: nothing new will come (checked
    # before loading the evaluation data; latest_snapshot has verified it, so its meta is read).
    latest = snapshots.latest_snapshot(cfg.run_dir / "snapshots")
    out_dir = cfg.run_dir / "evaluations"
    if (latest is not None and is_scored(latest, scored(out_dir))
            and is_last(json.loads((latest / "meta.json").read_text()), cfg.learner.max_steps)):
        runtime.log.info("last snapshot already scored", extra={"snapshot": latest.name})
        return 0
    return serve(EvaluatorService(cfg, runtime, EvaluatorMetrics(runtime.metrics)), runtime)
