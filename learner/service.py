"""The learner process: sample batches from replay, train, write snapshots.

Resumes from the newest valid snapshot under ``<run.dir>/snapshots``, or else starts from
``learner.init``'s weights when set (:mod:`learner.warm_start`); a background thread
keeps the next batch ready while the current step runs, and each step's numbers are read back
after the next one is launched (:meth:`LearnerService.step`); snapshots every
``learner.snapshot_every`` steps, on SIGTERM/SIGINT, and at ``max_steps`` (meta ``final``).
Under torchrun every rank samples its own batches (``rank`` in the request); ranks agree on
stopping through one small all-reduce per step, so no rank is left waiting in a collective.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import torch
import torch.distributed as dist

from learner.perf import bf16_matmul_peak
from learner.snapshot import latest_snapshot, prune_snapshots
from learner.train import LossFn, PendingStep, Trainer, device_batch, host_batch, teacher_space_of, teacher_spaces_of
from monitoring.metrics import Metrics
from reliev3r import durable, protocol
from reliev3r.config import PipelineConfig
from reliev3r.service import Runtime
from replay.client import Prefetcher, ReplayClient, ReplayError

LOG_EVERY_S = 10.0
POLL_S = 0.001
"""How often the learner, with no batch ready, looks whether the GPU has finished its step."""
FATAL_REPLAY_REASONS = ("batch_too_large", "bad_sample_request", "malformed")
"""Refusals of a sample that the replay repeats for every request of this learner (its batch
size against the replay's limits, a request it cannot read, as from another version): the
learner stops with the error instead of asking again for ever. These are all the replay's
refusals of a sample; its "not_ready" and "rate_limited" are waited out by the client."""


class LearnerMetrics:
    """The learner's Prometheus series."""

    def __init__(self, m: Metrics):
        self.step = m.gauge("learner_step", "Optimizer steps taken")
        self.loss = m.gauge("learner_loss", "Loss of the latest step, by term", ["term"])
        self.grad_norm = m.gauge("learner_grad_norm", "Global gradient norm of the latest step (before clipping)")
        self.steps_per_second = m.gauge("learner_steps_per_second", "Training steps per second (smoothed)")
        self.samples = m.counter("learner_samples_total", "Windows trained on (this rank)")
        self.data_wait = m.counter("learner_data_wait_seconds_total",
                                   "Seconds the training loop waited for a batch from replay, the GPU done "
                                   "with its steps (this rank)")
        self.data_waits = m.counter("learner_data_waits_total",
                                    "Times the training loop had no batch when the GPU finished its steps (this rank)")
        self.step_gpu = m.counter("learner_step_gpu_seconds_total",
                                  "Steps' spans on the GPU's timeline, first operation to last, summed: longer "
                                  "than alone where other processes' kernels take turns with the learner's (this rank)")
        self.skipped = m.counter("learner_skipped_steps_total", "Steps dropped for a non-finite loss or grad norm")
        self.snapshot_duration = m.histogram("snapshot_duration_seconds", "Time to write one snapshot",
                                             buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        self.snapshot_failures = m.counter("snapshot_failures_total", "Snapshots the disk refused (ENOSPC: full, "
                                           "EIO: an I/O error), by errno name", ["reason"])
        self.snapshot_step = m.gauge("snapshot_step", "Step of the newest snapshot written")
        self.snapshot_time = m.gauge("snapshot_timestamp_seconds", "Unix time the newest snapshot was written")
        self.lr = m.gauge("learner_lr", "Learning rate of the latest step")
        self.samples_per_second = m.gauge("learner_samples_per_second", "Windows trained on per second (this rank)")
        self.flops = m.gauge("learner_model_flops_per_second",
                             "Model FLOPs per second of training (3x forward FLOPs, this rank)")
        self.mfu = m.gauge("learner_mfu", "Model FLOPs utilisation: model FLOP/s over the bf16 matmul peak "
                                          "measured on this GPU at start-up (0 on CPU)")
        self.gpu_memory = m.gauge("learner_gpu_memory_bytes", "GPU memory of this rank", ["kind"])
        self.peak_flops: float | None = None


class StepRate:
    """Steps per second, smoothed: an exponential average of the interval between steps, then its
    inverse. Steps are read back unevenly (a step settled before a wait for data, the next right
    after the one launched behind it), and an average of 1 / interval would jump at every such
    pair where the average interval gives the rate the steps come at."""

    def __init__(self, now: float, *, keep: float = 0.9):
        self.last, self.keep = now, keep
        self.interval: float | None = None

    def tick(self, now: float) -> None:
        dt = max(now - self.last, 1e-9)
        self.last = now
        self.interval = dt if self.interval is None else self.keep * self.interval + (1 - self.keep) * dt

    @property
    def per_second(self) -> float:
        return 0.0 if self.interval is None else 1.0 / self.interval


@dataclasses.dataclass
class InFlight:
    """A launched step and what its report needs from its batch."""

    pending: PendingStep
    window_ids: Any
    depth_on: bool
    samples: int
    views: int


class LearnerService:
    """One learner rank: the trainer (resumed or warm-started), the prefetching replay client
    and the snapshot bookkeeping; ``step()`` trains on one batch."""

    def __init__(self, cfg: PipelineConfig, runtime: Runtime, metrics: LearnerMetrics, *,
                 loss_fn: LossFn | None = None):
        lcfg = self.cfg = cfg.learner
        self.runtime, self.metrics = runtime, metrics
        trainer = self.trainer = Trainer(lcfg, device=lcfg.device, loss_fn=loss_fn, seed=cfg.run.seed)
        self.folder = cfg.run_dir / "snapshots"
        latest = latest_snapshot(self.folder)
        self.init: dict[str, Any] | None = None
        """Where the weights started (learner.init), kept in every snapshot's meta."""
        if latest is not None:
            self.init = trainer.load_state(latest).get("init")
            runtime.log.info("resumed", extra={"snapshot": str(latest), "step": trainer.global_step})
            if lcfg.init:
                runtime.log.info("learner.init ignored: this run resumes its own snapshot (resume wins)",
                                 extra={"init": lcfg.init, "snapshot": str(latest)})
        elif lcfg.init:
            from learner.warm_start import init_trainer

            self.init = init_trainer(trainer, lcfg.init)
            runtime.log.info("warm start from learner.init", extra={
                "init": self.init["path"], "sha256": self.init["sha256"], "source_step": self.init["step"]})
        metrics.step.set(trainer.global_step)
        if trainer.device.type == "cuda":
            metrics.peak_flops = bf16_matmul_peak(trainer.device)
            runtime.log.info("measured bf16 matmul peak", extra={"tflops": round(metrics.peak_flops / 1e12, 1)})
        runtime.log.info("learner up", extra={"rank": trainer.rank, "world_size": trainer.world_size,
                                              "device": str(trainer.device), "size": lcfg.model.size,
                                              "parameters": trainer.model.num_parameters()})
        self.prefetch: Prefetcher | None = None
        self.reporter: ReplayClient | None = None
        self.in_flight: InFlight | None = None
        """The step launched last and not yet settled (:meth:`step`)."""
        self.finished = bool(lcfg.max_steps) and trainer.global_step >= lcfg.max_steps
        """max_steps was reached before this process started: nothing to do (no connection made)."""
        if self.finished:
            runtime.log.info("max_steps already reached", extra={"step": trainer.global_step})
            return
        endpoint = cfg.network.connect(cfg.network.replay_port)

        def keep_sampling(err: Exception) -> bool:  # in the prefetch thread: wait out replay trouble
            if isinstance(err, TimeoutError):
                runtime.log.info("waiting for replay", extra={"endpoint": endpoint, "reason": str(err)})
                return True
            if isinstance(err, ReplayError) and err.reason in FATAL_REPLAY_REASONS:
                runtime.metrics.reject(f"sample_{err.reason}")
                runtime.log.error("replay refuses the learner's batches", extra={"reason": err.reason,
                                                                                 "detail": err.detail})
                return False  # raised by the next get(): the learner stops with it
            if isinstance(err, ReplayError):
                runtime.metrics.reject(f"sample_{err.reason}")
                runtime.log.warning("replay refused a sample", extra={"reason": err.reason})
                runtime.wait(1.0)
                return True
            return False

        # Short call timeout: an idle or absent replay only costs a retry and a log line.
        # The batch's arrays go into (pinned) host tensors in the prefetch thread: the training
        # thread only queues their copies to the device.
        self.prefetch = Prefetcher(endpoint, lcfg.batch_size, trainer.rank, depth=1, ctx=runtime.ctx, timeout_s=5.0,
                                   retry_s=3.0, curve=cfg.network.curve, on_error=keep_sampling,
                                   prepare=functools.partial(host_batch, pin=trainer.device.type == "cuda"))
        # Per-window losses feed the replay's prioritized sampler; other samplers ignore them.
        self.reporter = (ReplayClient(endpoint, ctx=runtime.ctx, curve=cfg.network.curve)
                         if cfg.replay.sampler == "prioritized" else None)
        self.teachers: Any = None
        self.dropped: set[str] = set()
        """The reasons of the batches dropped before a step (:func:`_unusable`) said so far."""
        self.rate, self.last_log = StepRate(time.perf_counter()), 0.0
        self.last_saved = trainer.global_step if latest is not None else -1

    def close(self) -> None:
        if self.prefetch is not None:
            self.prefetch.close()
        if self.reporter is not None:
            self.reporter.close()

    def step(self) -> int | None:
        """Wait for the next usable batch, launch a step on it, then settle the step launched
        before it (read its numbers, report them, snapshot): the GPU runs the new step while
        the host does that and waits for the next batch. With no batch ready, it waits for one
        while the GPU runs the step in flight and launches it behind that step; once the GPU is
        done it settles the step and counts the rest of the wait as waiting for data. 0 once
        any rank stops (ranks agree on it here, so the loop asks no one else) or ``max_steps``
        is reached, else None. A step that may end in a snapshot or at ``max_steps`` is settled
        before the next is launched, so a snapshot holds exactly the steps it is named after."""
        runtime, trainer, metrics, lcfg = self.runtime, self.trainer, self.metrics, self.cfg
        if self.in_flight is not None and self._boundary(self.in_flight.pending):
            self.settle()
            if self.max_steps_reached():
                return 0
        msg = host = None
        wait_start: float | None = None
        while msg is None and not runtime.stopping:
            busy = wait_start is None and self.in_flight is not None and not self.in_flight.pending.done()
            got = self.prefetch.get(POLL_S if busy else 0.0 if wait_start is None else 0.1)
            if got is None:
                if busy:  # the GPU still runs the step in flight: a batch that comes meanwhile
                    continue  # is launched behind it, the GPU never idle in between
                if wait_start is None:  # no batch, the GPU done: settle the step in flight, so
                    self.settle()       # that the wait counted is time the GPU has nothing to do
                    metrics.data_waits.inc()
                    wait_start = time.perf_counter()
                continue
            msg, host = got
            if reason := _unusable(msg, lcfg.model.patch_size, supervised=lcfg.loss.kind == "supervised"):
                runtime.metrics.reject(reason)
                if reason not in self.dropped:  # said once a reason; every one is counted
                    self.dropped.add(reason)
                    runtime.log.warning("dropped a batch the model cannot take (further ones for this reason are "
                                        "counted, not logged)", extra={"reason": reason,
                                                                       "shape": list(msg.arrays["frames"].shape)})
                msg = None
        if wait_start is not None:
            metrics.data_wait.inc(time.perf_counter() - wait_start)
        if _any_rank_stopping(runtime.stopping, trainer):
            return 0
        self.teachers = msg.meta.get("teacher", self.teachers)
        batch = device_batch(host, trainer.device)
        pending = trainer.launch(batch, teacher_space=teacher_space_of(msg), window_losses=self.reporter is not None)
        previous, self.in_flight = self.in_flight, InFlight(
            pending, msg.meta.get("window_ids"), depth_on="teacher_depth" in batch,
            samples=int(batch["images"].shape[0]), views=int(batch["images"].shape[1]))
        if previous is not None:
            self._conclude(previous)
        return None

    def settle(self) -> None:
        """Settle and report the step in flight, if any (before the replay client closes)."""
        if self.in_flight is not None:
            self._conclude(self.in_flight)
            self.in_flight = None

    def _boundary(self, pending: PendingStep) -> bool:
        """Whether ``pending`` may be the step of a snapshot or the last one."""
        return pending.step % self.cfg.snapshot_every == 0 or (bool(self.cfg.max_steps)
                                                               and pending.step >= self.cfg.max_steps)

    def _conclude(self, flight: InFlight) -> None:
        """Settle a launched step, report it (metrics, log, the prioritized sampler's window
        losses) and write the snapshot it is due, unless ``max_steps`` ends the run there
        (:meth:`finish` writes that one)."""
        trainer, runtime = self.trainer, self.runtime
        out = trainer.settle(flight.pending)
        if flight.pending.gpu_seconds is not None:
            self.metrics.step_gpu.inc(flight.pending.gpu_seconds)
        losses = flight.pending.window_losses
        if self.reporter is not None and losses and not out["skipped"]:
            if isinstance(flight.window_ids, list) and len(flight.window_ids) == len(losses):
                self.reporter.report(flight.window_ids, losses)
        now = time.perf_counter()
        self.rate.tick(now)
        self.report(out, depth_on=flight.depth_on, samples=flight.samples, views=flight.views)
        if now - self.last_log > LOG_EVERY_S:
            self.last_log = now
            runtime.log.info("step", extra={k: round(v, 5) for k, v in out.items()})
        if (not out["skipped"] and not trainer.unsettled and not self.max_steps_reached()
                and trainer.global_step % self.cfg.snapshot_every == 0 and self.snapshot(final=False)):
            self.last_saved = trainer.global_step

    def max_steps_reached(self) -> bool:
        return bool(self.cfg.max_steps) and self.trainer.global_step >= self.cfg.max_steps

    def finish(self) -> int:
        """After the loop and :meth:`settle`: the last snapshot (``final`` at max_steps) unless
        the newest one already has this step; under DDP, leave the process group together.
        1 when the disk refused that snapshot (the steps since the last one are not saved: under
        ``reliev3r up`` the learner is restarted, resumes there and tries again), else 0."""
        trainer = self.trainer
        final = self.max_steps_reached()
        saved = True
        if final or trainer.global_step != self.last_saved:
            saved = self.snapshot(final=final)
        if trainer.world_size > 1 and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
        self.runtime.log.info("learner done", extra={"step": trainer.global_step, "final": final,
                                                     "skipped_steps": trainer.skipped_steps})
        return 0 if saved else 1

    def report(self, out: dict[str, float], *, depth_on: bool, samples: int, views: int) -> None:
        metrics, runtime, trainer, rate = self.metrics, self.runtime, self.trainer, self.rate.per_second
        metrics.step.set(trainer.global_step)
        for term, value in out.items():
            if term not in ("grad_norm", "lr", "skipped", "step", "matches"):
                metrics.loss.labels(term).set(value)
        metrics.grad_norm.set(out["grad_norm"])
        metrics.lr.set(out["lr"])
        metrics.steps_per_second.set(rate)
        metrics.samples.inc(samples)
        metrics.samples_per_second.set(rate * samples)
        if trainer.image_size is not None:
            h, w = trainer.image_size
            flops = 3 * trainer.model.flops_per_sample(h, w, views) * samples * rate
            metrics.flops.set(flops)
            if metrics.peak_flops:
                metrics.mfu.set(flops / metrics.peak_flops)
        if trainer.device.type == "cuda":
            metrics.gpu_memory.labels("allocated").set(torch.cuda.memory_allocated(trainer.device))
            metrics.gpu_memory.labels("reserved").set(torch.cuda.memory_reserved(trainer.device))
        if out["skipped"]:
            metrics.skipped.inc()
            runtime.log.warning("skipped a non-finite step", extra={
                "loss": out["loss"], "grad_norm": out["grad_norm"], "skipped_steps": trainer.skipped_steps})
        runtime.status.update(step=trainer.global_step, loss=round(out["loss"], 5), steps_per_s=round(rate, 3),
                              depth_loss_on=depth_on)

    def snapshot(self, *, final: bool) -> bool:
        """Write this step's snapshot (rank 0; the others have none to write) and prune the old
        ones. False when the disk refused it (full, an I/O error): said in the log, counted by
        errno name and in the status (``write_error``, until a snapshot is written again); the
        snapshots written before stay as they were, and training goes on (the next one is tried
        at its step)."""
        trainer, metrics, folder = self.trainer, self.metrics, self.folder
        if not trainer.is_main:
            return True
        start = time.perf_counter()
        try:
            path = trainer.save_state(folder, final=final, extra_meta={"teachers": self.teachers, "init": self.init})
        except OSError as err:
            reason = durable.errno_name(err)
            metrics.snapshot_failures.labels(reason).inc()
            said = f"snapshot of step {trainer.global_step}: {durable.refusal(err)}"
            self.runtime.status["write_error"] = said
            self.runtime.log.error("snapshot not written: the steps since the last one are not saved yet; training "
                                   "goes on and the next snapshot is tried at its step",
                                   extra={"step": trainer.global_step, "final": final, "reason": reason,
                                          "detail": str(err), "folder": str(folder)})
            return False
        self.runtime.status.pop("write_error", None)
        removed = prune_snapshots(folder, keep_last=self.cfg.keep_last, keep_every=self.cfg.keep_every)
        elapsed = time.perf_counter() - start
        metrics.snapshot_duration.observe(elapsed)
        metrics.snapshot_step.set(trainer.global_step)
        metrics.snapshot_time.set(time.time())
        self.runtime.log.info("snapshot written", extra={"path": str(path), "step": trainer.global_step,
                                                         "final": final, "seconds": round(elapsed, 3),
                                                         "pruned": len(removed)})
        return True


def run(cfg: PipelineConfig, runtime: Runtime, *, loss_fn: LossFn | None = None) -> int:
    """Entry of ``reliev3r learn``. ``loss_fn`` replaces the objective (tests only)."""
    service = LearnerService(cfg, runtime, LearnerMetrics(runtime.metrics), loss_fn=loss_fn)
    if service.finished:
        return 0
    try:
        while service.step() is None:
            pass
        service.settle()
    finally:
        service.close()
    return service.finish()


def _unusable(msg: protocol.Message, patch_size: int, *, supervised: bool = False) -> str | None:
    """Why a well-formed batch still cannot be trained on, or None. Checked before the step
    so that a bad batch is counted and dropped instead of ending the process (a replay
    refuses such windows at the insert; one that stored them before it did still serves them).
    ``supervised``: the batch must carry ``gt_depth`` and ``gt_cam_to_world`` (replay sends them
    only where every window has them; the streamer skips a window without them, but a store
    filled before, or under another config, may hold some): else ``no_ground_truth``. Each rank
    drops its own batch and takes the next, so under DDP the ranks still step together."""
    h, w = msg.arrays["frames"].shape[2:4]
    if h % patch_size or w % patch_size:
        return "image_size_not_multiple_of_patch"
    if supervised and not {"gt_depth", "gt_cam_to_world"} <= msg.arrays.keys():
        return "no_ground_truth"
    if any(space is not None and space not in protocol.TEACHER_SPACES for space in teacher_spaces_of(msg)):
        return "unknown_teacher_space"
    return None


def _any_rank_stopping(stopping: bool, trainer: Trainer) -> bool:
    if trainer.world_size == 1:
        return stopping
    flag = torch.tensor([float(stopping)], device=trainer.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())
