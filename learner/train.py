"""The training step: model, AdamW, LR schedule, EMA, AMP and DDP policy around :class:`FFRM`.

:class:`Trainer` owns everything whose state a snapshot must restore (model, EMA copy,
optimizer, step counter, RNG). The model itself stays a plain module; this file decides how it
is distributed (DDP under torchrun), compiled and cast (bf16 autocast on CUDA, fp32 on CPU).

"Never step on NaN": a non-finite loss or grad norm skips the update (gradients are dropped)
and is counted in :attr:`Trainer.skipped_steps`. Under DDP every rank skips together, because
the grad norm is computed on the all-reduced gradients, so one rank's NaN reaches all.
On CUDA the skip is decided on the device (fused AdamW's ``found_inf``, and an EMA update
weighted by the finite flag), and the step's loss terms, grad norm and finite flag come back in
one host read (:meth:`Trainer.settle`) that the learner makes after the next step is launched
(:meth:`Trainer.launch`): a sync per term before backward, or even one at the end of each step,
leaves the GPU idle while the host reports the step and prepares the next.

Measured (one H100, bf16, real objective with 2048 matches, 8 views, 2026-11-24): small
p16 256x256 B8 11.3 steps/s; base p16 256x256 B4 10.0 steps/s eager (8% MFU), 14.7 compiled
(12%); large p14 224x224 B2 5.8 steps/s eager (8%), B4 compiled 8.1 steps/s (22% MFU).
Eager is launch-bound at these sizes: use ``compile: true`` on GPUs (:func:`compile_blocks`;
current MFU numbers, base at 224/518 px, are in docs/BENCHMARKS.md). CPU: tiny at 64x96,
V=4, B=2 takes ~0.5 s/step for the model alone on one thread (~1.3 s with the objective).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from learner.augment import augment_batch
from learner.config import LearnerConfig
from learner.graphs import CaptureError, StepGraphs, Unrecordable
from learner.model import FFRM, Block, Prediction
from reliev3r import protocol
from reliev3r.config_base import check_device_present, local_rank, world_size

PER_MATCH = frozenset({"matches", "match_triangulation"})
"""Batch tensors with one row per match (first column of ``matches``: the window)."""

log = logging.getLogger("reliev3r.learner")

LossFn = Callable[..., "tuple[Tensor, dict[str, Tensor | float]]"]
"""``loss_fn(pred, batch, cfg, *, teacher_space) -> (scalar loss, {term: float or scalar tensor})``;
tensor terms are read back after the optimizer step."""


def default_loss_fn() -> LossFn:
    from learner import objective  # imported late: the objective is another module's concern

    return objective.weighted_loss


def resolve_device(name: str | torch.device) -> torch.device:
    """The torch device ``name`` says: ``auto`` (cuda where there is one, else cpu), ``cpu``,
    ``cuda`` (this rank's GPU: ``LOCAL_RANK``) or ``cuda:N``; a ``torch.device`` as its name
    (``torch.device("cuda")``, no index, is this rank's GPU too). A name that is no device (``gpu``)
    or one this host does not have (``cuda`` without CUDA, ``cuda:N`` past its GPUs) is a ValueError
    naming it and the devices there are (:func:`reliev3r.config_base.check_device_present`)."""
    if isinstance(name, torch.device):
        name = "cpu" if name.type == "cpu" else str(name)  # a CPU has no index that matters
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    rank = local_rank() if name == "cuda" else 0  # a LOCAL_RANK that is no rank: said first
    check_device_present("device", name, rank=rank)
    if name == "cuda":
        return torch.device("cuda", rank)
    return torch.device(name)


def init_distributed(device: torch.device) -> tuple[int, int]:
    """Join the process group when launched by torchrun (``WORLD_SIZE`` > 1, read by
    ``reliev3r.config_base.world_size``); -> (rank, size)."""
    world = world_size()
    if world == 1:
        return 0, 1
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def lr_at(cfg: LearnerConfig, step: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warm-up, then constant or
    cosine down to 10% of the peak at ``max_steps``."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "cosine" and cfg.max_steps > cfg.warmup_steps:
        progress = min(1.0, (step - cfg.warmup_steps) / (cfg.max_steps - cfg.warmup_steps))
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
    return cfg.lr


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices and conv kernels only; biases, norms and learned tokens are not decayed."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and not name.endswith("_token") and not name.endswith("_tokens") else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def compile_blocks(model: FFRM, *, mode: str | None = None) -> FFRM:
    """Compile ``model`` in place, one region at a time: each transformer block, and the dense head.

    All blocks share one compiled graph per token layout (frame-wise, global), so compiling
    costs about two blocks' time instead of the whole model's (H100, base, 224 px: 25 s of
    warm-up against 59 s for the whole model, same step time), and the parameter names stay
    those of the plain model. ``dynamic=False``: one specialised graph per image size instead
    of the symbolic-shape one that a second size would otherwise trigger. The dense head's
    convolutions stay cuDNN's; compiling it fuses the pixel shuffle, the skip concatenation and
    the activations around them (H200, base, 224 px B64: 0.394 -> 0.385 s per step).
    """
    for module in model.modules():
        if isinstance(module, Block):
            module.compile(mode=mode, dynamic=False)
    # An instance attribute over the method: the state dict and the module tree are unchanged.
    model._dense_head = torch.compile(model._dense_head, mode=mode, dynamic=False)
    return model


@dataclasses.dataclass(eq=False)
class PendingStep:
    """A step :meth:`Trainer.launch` queued, its numbers on the device until :meth:`Trainer.settle`."""

    values: Tensor
    """Loss, grad norm, finite flag, the window losses, then the terms of ``names`` (float64)."""
    names: list[str]
    windows: int
    lr: float
    step: int
    """:attr:`Trainer.global_step` after this step (one less once settled as skipped)."""
    terms: dict[str, float]
    """The terms known on the host (the batch's match count)."""
    window_losses: list[float] = dataclasses.field(default_factory=list)
    out: dict[str, float] | None = None
    """What :meth:`Trainer.settle` returned, once settled."""
    events: tuple[Any, Any] | None = None
    """CUDA events recorded on the step's stream before its first and after its last operation
    (None on the CPU)."""
    gpu_seconds: float | None = None
    """Once settled on a GPU: the step's span on the GPU's timeline, first operation to last
    (longer than its own work where other processes' kernels took turns with it)."""

    def done(self) -> bool:
        """Whether the GPU has finished the step (always on the CPU): settling it then does not wait."""
        return self.events is None or bool(self.events[1].query())


class Trainer:
    """Model + optimisation state of one learner rank."""

    def __init__(self, cfg: LearnerConfig, *, device: str | torch.device = "auto",
                 teacher_space: str = "depth", loss_fn: LossFn | None = None, seed: int = 0):
        self.cfg = cfg
        self.device = resolve_device(device if device != "auto" else cfg.device)
        self.teacher_space = teacher_space
        self.loss_fn = loss_fn or default_loss_fn()
        if cfg.threads and self.device.type == "cpu":
            torch.set_num_threads(cfg.threads)
        self.rank, self.world_size = init_distributed(self.device)
        torch.manual_seed(seed)  # same init on every rank (DDP also broadcasts rank 0's)
        self.model = FFRM(cfg.model).to(self.device)
        self.ema: FFRM | None = None
        if cfg.ema_decay > 0:
            self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.fused = self.device.type == "cuda"
        """Fused AdamW, which skips a non-finite step on the device (``found_inf``)."""
        self.optimizer = torch.optim.AdamW(param_groups(self.model, cfg.weight_decay), lr=lr_at(cfg, 0),
                                           betas=(0.9, 0.95), fused=self.fused)
        if cfg.compile:
            compile_blocks(self.model)
        self.forward_model: nn.Module = self.model
        if self.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.forward_model = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.graphs: StepGraphs | None = None
        """The step recorded as CUDA graphs (``cuda_graphs``: on one CUDA device, one process)."""
        if cfg.cuda_graphs and self.device.type == "cuda" and self.world_size == 1:
            problems = unrecordable_objective(cfg, self.loss_fn, teacher_space)
            if problems:  # a capture would fail at every start: run eagerly, and say why
                log.warning("learner.cuda_graphs: the step cannot be recorded as a CUDA graph; it runs eagerly",
                            extra={"reason": "unrecordable_step", "detail": "; ".join(problems[:3])})
            else:
                self.graphs = StepGraphs(self._forward_backward, list(self.model.parameters()))
        self.autocast = self.device.type == "cuda" and cfg.precision == "bf16"
        self.global_step = 0
        """Optimizer steps taken (skipped steps not included); names snapshots."""
        self.skipped_steps = 0
        self.target: FFRM | None = None
        """The frozen copy whose depth is the depth term's target (``self_target_step``)."""
        self.samples_seen = 0
        self.image_size: tuple[int, int] | None = None
        """(H, W) of the last training batch, recorded in snapshots for inference."""
        self.unsettled: list[PendingStep] = []
        """Steps launched and not yet read back (:meth:`launch`, :meth:`settle`), oldest first."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------ step
    def step(self, batch: dict[str, Tensor], *, teacher_space: str | None = None,
             window_losses: list[float] | None = None) -> dict[str, float]:
        """One optimisation step on a batch already on :attr:`device` (see
        :func:`batch_from_message`), its numbers read back before it returns: :meth:`launch`
        then :meth:`settle`. Returns loss terms, ``loss``, ``grad_norm``, ``lr``, ``skipped``
        (1.0 when the update was dropped) and ``step``. If ``window_losses`` is a list, it is
        filled with each window's own loss (for the prioritized sampler; costs one extra loss
        evaluation per window, no extra forward)."""
        pending = self.launch(batch, teacher_space=teacher_space, window_losses=window_losses is not None)
        out = self.settle(pending)
        if window_losses is not None:
            window_losses[:] = pending.window_losses
        return out

    def launch(self, batch: dict[str, Tensor], *, teacher_space: str | None = None,
               window_losses: bool = False) -> PendingStep:
        """Queue one optimisation step and return it unread: its numbers stay on the device
        until :meth:`settle`. With the fused update (CUDA) nothing here waits for the GPU: the
        update, the EMA and :attr:`global_step` count the step as taken, and settling a step
        that turns out non-finite (its update and EMA were skipped on the device) takes it back
        from the count, so a step launched meanwhile ran with a schedule one step ahead. A
        learner that settles step N after launching N+1 keeps the GPU busy while the host
        reports N and prepares N+2 (``learner.service``)."""
        self.model.train()
        events = None
        if self.device.type == "cuda":
            events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            events[0].record()
        lr = lr_at(self.cfg, self.global_step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batch = augment_batch(batch, self.cfg.augment)  # the batch itself when augmentation is off
        images = batch["images"]
        space = teacher_space or self.teacher_space
        if self.cfg.self_target_step and self.global_step >= self.cfg.self_target_step and "teacher_depth" in batch:
            if self.target is None:
                self.freeze_target()
            with torch.no_grad(), torch.autocast(device_type=self.device.type, dtype=torch.bfloat16,
                                                 enabled=self.autocast):
                batch = {**batch, "teacher_depth": self.target(images).depth.float()}
            batch.pop("teacher_disparity", None)  # the target's depth is depth in every window
            space = "depth"
        if self.graphs is not None:
            try:
                (pred, loss, terms, grad_norm, finite), matches = self.graphs.step(batch, space)
                terms = {**terms, "matches": float(matches)}  # the batch's, not its padded bucket's
            except CaptureError as exc:  # what the start-up check could not see on the CPU
                log.warning("learner.cuda_graphs: the step could not be recorded; it runs eagerly from now on",
                            extra={"reason": "capture_failed", "detail": str(exc)})
                self.graphs = None
                self.optimizer.zero_grad(set_to_none=True)
        if self.graphs is None:
            pred, loss, terms, grad_norm, finite = self._forward_backward(batch, space)
        if self.fused:  # the update skips itself on the device when the step is not finite
            self.optimizer.found_inf = (~finite).float()
            self.optimizer.step()
        # Evaluated after the update is queued, so that syncs inside the loss cost no GPU time.
        windows = self._window_losses(pred, batch, space) if window_losses else []
        # Every logged number in one tensor: the step's one host read, in settle().
        names = [k for k, v in terms.items() if isinstance(v, Tensor)]
        values = torch.stack([t.double() for t in [loss, grad_norm, finite, *windows] + [terms[k] for k in names]])
        if self.fused:
            self.global_step += 1
            self._update_ema(finite)
        elif bool(finite):  # the host's update needs the flag now (a CPU step: nothing to wait for)
            self.optimizer.step()
            self.global_step += 1
            self._update_ema()
        self.optimizer.zero_grad(set_to_none=True)
        self.samples_seen += images.shape[0] * self.world_size
        self.image_size = (int(images.shape[-2]), int(images.shape[-1]))
        if events is not None:
            events[1].record()
        pending = PendingStep(values=values, names=names, windows=len(windows), lr=lr, step=self.global_step,
                              terms={k: v for k, v in terms.items() if not isinstance(v, Tensor)}, events=events)
        self.unsettled.append(pending)
        return pending

    def settle(self, pending: PendingStep) -> dict[str, float]:
        """Read a launched step's numbers back (waiting for it on the GPU; a second call returns
        the same) and count it: a non-finite step is added to :attr:`skipped_steps` and, on the
        fused path, taken back from :attr:`global_step` (and from the steps launched after it)."""
        if pending.out is not None:
            return pending.out
        values = pending.values.tolist()
        if pending.events is not None:
            pending.events[1].synchronize()
            pending.gpu_seconds = pending.events[0].elapsed_time(pending.events[1]) / 1000.0
        skipped = values[2] == 0.0
        at = self.unsettled.index(pending)
        later = self.unsettled[at + 1:]
        del self.unsettled[at]
        if skipped:
            self.skipped_steps += 1
            if self.fused:
                self.global_step -= 1
                for step in [pending, *later]:
                    step.step -= 1
        pending.window_losses = values[3:3 + pending.windows]
        terms = {**pending.terms, **dict(zip(pending.names, values[3 + pending.windows:]))}
        pending.out = {**terms, "loss": values[0], "grad_norm": values[1], "lr": pending.lr,
                       "skipped": float(skipped), "step": float(pending.step)}
        return pending.out

    def settle_all(self) -> None:
        """Settle every launched step (before the step count or the weights are read as final)."""
        while self.unsettled:
            self.settle(self.unsettled[0])

    def _forward_backward(self, batch: dict[str, Tensor], space: str
                          ) -> tuple[Prediction, Tensor, dict[str, Tensor | float], Tensor, Tensor]:
        """Forward, objective, backward and gradient clipping, reading nothing back (what
        :class:`learner.graphs.StepGraphs` records): (prediction, loss, terms, grad norm, finite
        flag), every tensor detached: nothing handed on keeps the autograd graph alive (a graph
        kept alive holds the parameters' gradient-accumulation nodes, which the next capture, on
        another stream, would accumulate on, with a warning from torch)."""
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            pred: Prediction = self.forward_model(batch["images"])
        loss, terms = self.loss_fn(pred, batch, self.cfg.loss, teacher_space=space)
        # Backward even on a NaN loss: under DDP the all-reduce must happen on every rank, and
        # the NaN then reaches every rank's grad norm, so all ranks skip this step together.
        loss.backward()
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        loss = loss.detach()
        pred = Prediction(**{f.name: None if (v := getattr(pred, f.name)) is None else v.detach()
                             for f in dataclasses.fields(pred)})
        terms = {k: v.detach() if isinstance(v, Tensor) else v for k, v in terms.items()}
        return pred, loss, terms, grad_norm, torch.isfinite(loss) & torch.isfinite(grad_norm)

    def freeze_target(self, state: dict[str, Tensor] | None = None) -> None:
        """Freeze the depth term's target (``self_target_step``): a copy of the EMA weights (the
        model's without EMA), or of ``state`` (a snapshot's ``target.safetensors``)."""
        target = FFRM(self.cfg.model).to(self.device)
        source = self.ema if self.ema is not None else self.model
        target.load_state_dict(state if state is not None else source.state_dict())
        self.target = target.requires_grad_(False).eval()
        if self.cfg.compile:
            compile_blocks(self.target)

    @torch.no_grad()
    def _window_losses(self, pred: Prediction, batch: dict[str, Tensor], space: str) -> list[Tensor]:
        out = []
        for b in range(pred.depth.shape[0]):
            rows = batch["matches"][:, 0] == b
            one = {k: (v[rows] if k in PER_MATCH else v[b:b + 1]) for k, v in batch.items()}
            one["matches"] = one["matches"].clone()
            one["matches"][:, 0] = 0
            view = Prediction(depth=pred.depth[b:b + 1].detach(), confidence=pred.confidence[b:b + 1].detach(),
                              cam_to_world=pred.cam_to_world[b:b + 1].detach())
            out.append(self.loss_fn(view, one, self.cfg.loss, teacher_space=space)[0].detach())
        return out

    @torch.no_grad()
    def _update_ema(self, finite: Tensor | None = None) -> None:
        """EMA towards the model's weights; with ``finite`` (the step's flag on the device) a
        non-finite step leaves it as it was without the host reading the flag."""
        if self.ema is None:
            return
        # Short warm-up of the decay so early snapshots' EMA is not dominated by the init.
        decay = min(self.cfg.ema_decay, (1 + self.global_step) / (10 + self.global_step))
        ema_params = list(self.ema.parameters())
        params = [p.detach() for p in self.model.parameters()]
        if finite is None:
            torch._foreach_lerp_(ema_params, params, 1.0 - decay)
            return
        # ema += w * (params - ema), w = (1 - decay) or 0 on the device (a 0-dim tensor weight
        # of _foreach_lerp_ would be read back to the host).
        steps = torch._foreach_sub(params, ema_params)
        torch._foreach_mul_(steps, finite.float() * (1.0 - decay))
        torch._foreach_add_(ema_params, steps)

    # ------------------------------------------------------------------ state
    def rng_state(self) -> dict[str, Tensor]:
        """Torch RNG states (the only RNG the step draws from)."""
        state = {"torch_cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["torch_cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def set_rng_state(self, state: dict[str, Tensor]) -> None:
        torch.set_rng_state(state["torch_cpu"].cpu())
        if "torch_cuda" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["torch_cuda"].cpu(), self.device)

    def save_state(self, run_snapshots: str | Path, *, final: bool = False,
                   extra_meta: dict[str, Any] | None = None) -> Path:
        """Write a snapshot of this trainer under ``run_snapshots`` (see :mod:`learner.snapshot`)."""
        from learner import snapshot

        return snapshot.save_snapshot(self, run_snapshots, final=final, extra_meta=extra_meta)

    def load_state(self, path: str | Path) -> dict[str, Any]:
        """Restore model, EMA, optimizer, step, skipped/sample counters and RNG from a snapshot
        folder; return its meta. The LR schedule is a function of the step, so it resumes too."""
        from learner import snapshot

        return snapshot.restore_trainer(self, path)


# ---------------------------------------------------------------------- batches

def teacher_spaces_of(msg: protocol.Message) -> list[Any]:
    """Each window's depth teacher space as a batch's meta names it ("depth", "disparity"; None
    where it names none, which is depth: :data:`reliev3r.protocol.TEACHER_SPACES`), as given
    (unchecked). From ``teachers`` (one per window, as the replay sends them), else the batch's
    ``teacher`` for every window."""
    windows = msg.arrays["frames"].shape[0] if "frames" in msg.arrays else len(msg.meta.get("window_ids") or ())
    teachers = msg.meta.get("teachers")
    if not (isinstance(teachers, list) and len(teachers) == windows):
        teachers = [msg.meta.get("teacher")] * windows
    spaces = []
    for teacher in teachers:
        depth = teacher.get("depth") if isinstance(teacher, dict) else None
        spaces.append(depth.get("space") if isinstance(depth, dict) else None)
    return spaces


def teacher_space_of(msg: protocol.Message) -> str | None:
    """The one depth teacher space ("depth", "disparity" ...) every window of a batch names, or
    None when the batch has no windows, a window names none, or they differ (then each window's
    travels in the batch as ``teacher_disparity``, :func:`host_batch`)."""
    spaces = teacher_spaces_of(msg)
    if spaces and all(s == spaces[0] for s in spaces) and isinstance(spaces[0], str):
        return spaces[0]
    return None


BATCH_ARRAYS = ("frames", "intrinsics", "matches", "match_triangulation", "teacher_depth", "teacher_valid", "gt_depth",
                "gt_cam_to_world")
"""The arrays of a replay ``batch`` message the learner uses."""


def batch_from_message(msg: protocol.Message, device: str | torch.device) -> dict[str, Tensor]:
    """Tensors of a replay ``batch`` message on ``device``: :func:`device_batch` of
    :func:`host_batch` (the learner service makes the host batch in its prefetch thread).

    ``images`` float32 [B,V,3,H,W] in [0, 1] (from ``frames`` uint8 [B,V,H,W,3]),
    ``intrinsics`` [B,V,3,3], ``matches`` [K,8], and when present ``match_triangulation`` [K,3],
    ``teacher_depth`` [B,V,H,W],
    ``teacher_valid`` bool [B,V,H,W], ``gt_depth`` [B,V,H,W], ``gt_cam_to_world`` [B,V,4,4];
    ``teacher_disparity`` bool [B] when the windows' teachers differ in space
    (:func:`host_batch`).
    """
    device = torch.device(device)
    return device_batch(host_batch(msg, pin=device.type == "cuda"), device)


def host_batch(msg: protocol.Message, *, pin: bool) -> dict[str, Tensor]:
    """The arrays of a replay ``batch`` message copied out of its (read-only) receive buffers
    into CPU tensors, one copy each, into pinned memory with ``pin`` (for non-blocking copies
    to a GPU). Runs off the training thread (``replay.client.Prefetcher``'s ``prepare``): on a
    GPU host the copies are about 19 MB a step at ``configs/gpu.yaml``'s sizes.

    A batch of windows whose teachers differ in space (a durable replay resumed after
    ``labeler.teacher`` changed) also gets ``teacher_disparity`` bool [B], each window's space
    (:func:`teacher_spaces_of`; the objective reads each window's labels in its own space);
    a batch of one space gets none, and its space goes to the step as ``teacher_space``."""
    out: dict[str, Tensor] = {}
    for name in BATCH_ARRAYS:
        arr = msg.arrays.get(name)
        if arr is None:
            continue
        arr = np.asarray(arr)
        t = torch.empty(arr.shape, dtype=torch.from_numpy(arr[:0].copy()).dtype, pin_memory=pin)
        np.copyto(t.numpy(), arr, casting="no")
        out[name] = t
    disparity = [space == "disparity" for space in teacher_spaces_of(msg)]
    if "teacher_depth" in out and len(set(disparity)) > 1:
        flags = torch.tensor(disparity, dtype=torch.bool)
        out["teacher_disparity"] = flags.pin_memory() if pin else flags
    return out


def device_batch(host: dict[str, Tensor], device: str | torch.device) -> dict[str, Tensor]:
    """:func:`host_batch`'s tensors on ``device`` (non-blocking from pinned memory), frames
    travelling as uint8 (4x fewer bytes) and converted there: the batch
    :meth:`Trainer.step` takes (:func:`batch_from_message`)."""
    device = torch.device(device)
    out = {name: t.to(device, non_blocking=t.is_pinned()) for name, t in host.items()}
    frames = out.pop("frames")
    out["images"] = frames.permute(0, 1, 4, 2, 3).float().div_(255.0)
    if "teacher_valid" in out:
        out["teacher_valid"] = out["teacher_valid"].bool()
    return out


def unrecordable_objective(cfg: LearnerConfig, loss_fn: LossFn, teacher_space: str = "depth") -> list[str]:
    """What in a training step under ``cfg`` a CUDA graph could not record
    (:class:`learner.graphs.Unrecordable`), found on the CPU in a second: a tiny model with
    ``cfg.model``'s heads, ``loss_fn`` under ``cfg.loss`` and the backward, on a synthetic batch
    with every label the objectives read. Empty when the step can be recorded. The random
    state of the caller is left as it was."""
    batch = synthetic_batch(2, 3, 4 * cfg.model.patch_size, 6 * cfg.model.patch_size, k=96, seed=1,
                            triangulation=True, ground_truth=True)
    with torch.random.fork_rng(devices=[]):  # the model's initialisation and any dropout
        model = FFRM(dataclasses.replace(cfg.model, size="tiny"))

        def step() -> None:
            loss, _ = loss_fn(model(batch["images"]), batch, cfg.loss, teacher_space=teacher_space)
            loss.backward()

        step()  # constants cached per device are made here, as in a graph's warm-up
        with Unrecordable() as mode:
            step()
    return mode.found


def synthetic_batch(b: int, v: int, h: int, w: int, *, k: int = 64, seed: int = 0,
                    device: str | torch.device = "cpu", triangulation: bool = False,
                    ground_truth: bool = False) -> dict[str, Tensor]:
    """A random, well-formed batch (for smoke tests and throughput measurements); with
    ``triangulation`` also each match's two-view triangulation (z_i, z_j, weight), so that every
    loss term of a real batch runs (the same batch otherwise); with ``ground_truth`` also the
    labels of the supervised sibling (the teacher's depth as ``gt_depth``, identity poses)."""
    g = torch.Generator().manual_seed(seed)
    focal = 0.5 * w / math.tan(math.radians(30))
    intr = torch.tensor([[focal, 0, (w - 1) / 2], [0, focal, (h - 1) / 2], [0, 0, 1]])
    bi = torch.randint(0, b, (k,), generator=g).float()
    i = torch.randint(0, v, (k,), generator=g)
    j = (i + 1 + torch.randint(0, max(v - 1, 1), (k,), generator=g)) % v
    xy = torch.rand(k, 4, generator=g) * torch.tensor([w - 1, h - 1, w - 1, h - 1])
    matches = torch.cat((bi[:, None], i[:, None].float(), j[:, None].float(), xy, torch.ones(k, 1)), dim=1)
    batch = {"images": torch.rand(b, v, 3, h, w, generator=g), "intrinsics": intr.expand(b, v, 3, 3).clone(),
             "matches": matches, "teacher_depth": 1 + torch.rand(b, v, h, w, generator=g),
             "teacher_valid": torch.ones(b, v, h, w, dtype=torch.bool)}
    if triangulation:
        depths, weights = 1 + 2 * torch.rand(k, 2, generator=g), torch.rand(k, 1, generator=g)
        batch["match_triangulation"] = torch.cat((depths, weights), 1)
    if ground_truth:
        batch["gt_depth"] = batch["teacher_depth"].clone()
        batch["gt_cam_to_world"] = torch.eye(4).expand(b, v, 4, 4).clone()
    return {k_: t.to(device) for k_, t in batch.items()}


def measure_throughput(trainer: Trainer, batch: dict[str, Tensor], steps: int = 5) -> dict[str, float]:
    """Steps per second and model FLOPs utilisation numerator (achieved FLOP/s) on ``batch``."""
    trainer.step(batch)  # warm-up (compile, allocator)
    if trainer.device.type == "cuda":
        torch.cuda.synchronize(trainer.device)
    start = time.perf_counter()
    for _ in range(steps):
        trainer.step(batch)
    if trainer.device.type == "cuda":
        torch.cuda.synchronize(trainer.device)
    elapsed = (time.perf_counter() - start) / steps
    b, v, _, h, w = batch["images"].shape
    flops = 3 * trainer.model.flops_per_sample(h, w, v) * b
    return {"seconds_per_step": elapsed, "steps_per_second": 1 / elapsed, "flops_per_second": flops / elapsed}
