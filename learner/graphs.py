"""The training step's forward, objective, backward and gradient clipping replayed as CUDA
graphs (``learner.cuda_graphs``): one launch from the host instead of thousands.

Why: at ``configs/gpu.yaml``'s sizes the learner's step is host-bound. The model's blocks are
compiled, but the objective's terms run eagerly (about 1,400 ops forward and their backward),
each a kernel launch from the training thread, and a host busy with labelers slows every one of
them (docs/BENCHMARKS.md, issue 18: 0.70-0.88x beside 12 SIFT threads). A CUDA graph replays
the whole recorded sequence on the GPU from one call.

A graph fixes every shape, and a batch's match count K changes every batch. So the per-match
arrays are padded (:func:`pad_matches`) to a bucket (:func:`match_bucket`: at most 25 % more
rows, about four buckets an octave) with rows of weight 0, which change no loss term and no
gradient (every match term is a weighted mean; ``tests/test_graphs.py``), and one graph is
captured per bucket and batch layout (:class:`StepGraphs`; at most ``MAX_GRAPHS``, one shared
memory pool). The optimizer's fused update, the EMA and the one host read stay outside the graph
(:meth:`learner.train.Trainer.launch` and ``settle``), so the learning rate schedule, the skip on
a non-finite step and snapshots are unchanged.

Nothing in the recorded step may read the device from the host or take a data-dependent shape:
the objective is written that way already (its terms are read back once, after the update).
"""

from __future__ import annotations

import functools
import logging
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from reliev3r.recent import Recent

log = logging.getLogger("reliev3r.learner.graphs")

MATCH_PAD = {"matches": (0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0), "match_triangulation": (1.0, 1.0, 0.0)}
"""A padding row of each per-match array: window 0, views 0 and 1, pixel (0, 0) in both, score 0;
triangulated depths 1 with weight 0 (a real pixel and finite depths: finite costs, so that a
weight of 0 makes their value and gradient exactly 0)."""

MAX_GRAPHS = 8
"""Captured graphs kept (the least recently used is dropped): a run's match counts fall in a
few buckets."""

WARMUP = 3
"""Untimed forward-backward passes on a side stream before a capture (the recipe of PyTorch's
CUDA graphs notes: lazy initialisation, cuBLAS workspaces and the allocator's first blocks
happen outside the graph)."""


def match_bucket(k: int, *, least: int = 64) -> int:
    """Rows that ``k`` matches are padded to: ``k`` rounded up to a multiple of a quarter of its
    power of two (2,030 -> 2,048, 2,100 -> 2,560), at least ``least``; at most 25 % more rows."""
    if k <= least:
        return least
    step = 1 << max(k.bit_length() - 3, 0)
    return -(-k // step) * step


def pad_matches(batch: dict[str, Tensor], rows: int) -> dict[str, Tensor]:
    """``batch`` with each array of :data:`MATCH_PAD` padded to ``rows`` rows by its padding row
    (the others are the same tensors). ``rows`` must be at least the batch's match count."""
    k = batch["matches"].shape[0]
    if rows < k:
        raise ValueError(f"cannot pad {k} matches to {rows} rows")
    other_view = min(1, batch["images"].shape[1] - 1) if "images" in batch else 1
    out = dict(batch)
    for name in MATCH_PAD:
        if name in batch:
            t = batch[name]
            pad = _pad_row(name, t.dtype, t.device, other_view)
            out[name] = torch.cat((t, pad.expand(rows - k, -1)), 0)
    return out


@functools.lru_cache(maxsize=64)
def _pad_row(name: str, dtype: torch.dtype, device: torch.device, other_view: int) -> Tensor:
    """:data:`MATCH_PAD`'s row of ``name`` on ``device``, made once (a copy from the host each
    step would wait for the GPU)."""
    row = list(MATCH_PAD[name])
    if name == "matches":
        row[2] = float(other_view)
    return torch.tensor(row, dtype=dtype, device=device)


class CaptureError(RuntimeError):
    """The step could not be recorded: something in it reads the device from the host or takes
    a shape from data. Names the first error and the line of this project that raised it."""

    def __init__(self, exc: BaseException):
        root, seen = exc, {id(exc)}
        while root.__context__ is not None and id(root.__context__) not in seen:
            root = root.__context__
            seen.add(id(root))
        where = _where(traceback.extract_tb(root.__traceback__))
        first = (str(root).strip().splitlines() or [type(root).__name__])[0]
        super().__init__(f"the training step could not be recorded as a CUDA graph: {first}{where}; "
                         "learner.cuda_graphs=false runs it eagerly")


_OURS = Path(__file__).resolve().parents[1]
"""The repository's root: the frames of a failed capture that name our code."""


def _ours(path: Path) -> bool:
    """A file of this project (not of a package installed in a virtual environment inside it)."""
    return _OURS in path.parents and not {"site-packages", "dist-packages"} & set(path.parts)


def _where(frames: traceback.StackSummary) -> str:
    """" at file:line (code)" of the innermost of ``frames`` in our code outside this module;
    empty when none is."""
    ours = [f for f in frames if _ours(Path(f.filename)) and Path(f.filename).resolve() != Path(__file__).resolve()]
    return f" at {Path(ours[-1].filename).relative_to(_OURS)}:{ours[-1].lineno} ({ours[-1].line})" if ours else ""


class Unrecordable(TorchDispatchMode):
    """Notes the ops dispatched under it that a CUDA graph cannot record, each with the line of
    ours that made it (``found``: "op at file:line (code)"): a tensor made from host data (on a
    GPU a host-to-device copy; Python scalars are not copies), a read of the device from the
    host (``.item()``, ``bool(t)``), and an output whose shape depends on the data (boolean
    indexing, ``nonzero``). Works on the CPU: the ops are the same on every device."""

    READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
             torch.ops.aten.masked_select.default, torch.ops.aten.unique_consecutive.default}

    def __init__(self):
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        made = func is torch.ops.aten.lift_fresh.default and args[0].numel() > 1
        masked = func is torch.ops.aten.index.Tensor and any(t is not None and t.dtype == torch.bool for t in args[1])
        if made or masked or func in self.READS:
            self.found.append(f"{func}{_where(traceback.extract_stack())}")
        return func(*args, **(kwargs or {}))


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: dict[str, Tensor]
    outputs: Any
    grads: list[Tensor | None]


class StepGraphs:
    """``step(batch, space)`` runs ``forward_backward(batch, space)`` (which must leave the
    gradients in ``params``' ``.grad`` and return tensors only, nested in tuples, dicts or
    dataclasses) as a CUDA graph: the batch padded to its match bucket, copied into the graph's
    inputs, the graph replayed, and ``params``' ``.grad`` pointed at the graph's gradients.
    Returns the graph's outputs (valid until the next call) and the batch's real match count.
    """

    def __init__(self, forward_backward: Callable[[dict[str, Tensor], str], Any], params: list[torch.nn.Parameter],
                 *, max_graphs: int = MAX_GRAPHS):
        self.forward_backward = forward_backward
        self.params = params
        self.graphs: Recent = Recent(max_graphs)
        self.pool = torch.cuda.graph_pool_handle()
        """One memory pool for every graph: only the last replayed graph's outputs are read."""
        self.captures = 0

    def step(self, batch: dict[str, Tensor], space: str) -> tuple[Any, int]:
        k = batch["matches"].shape[0]
        padded = pad_matches(batch, match_bucket(k))
        key = (space, *((name, tuple(t.shape), t.dtype) for name, t in sorted(padded.items())))
        entry = self.graphs.recall(key)
        if entry is None:
            entry = self._capture(padded, space)
            self.graphs[key] = entry
        for name, t in padded.items():
            entry.inputs[name].copy_(t, non_blocking=True)
        entry.graph.replay()
        for p, g in zip(self.params, entry.grads):
            p.grad = g
        return entry.outputs, k

    def _capture(self, padded: dict[str, Tensor], space: str) -> _Graph:
        start = time.perf_counter()
        inputs = {name: t.clone() for name, t in padded.items()}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP):
                self._drop_grads()
                self.forward_backward(inputs, space)
        torch.cuda.current_stream().wait_stream(side)
        self._drop_grads()
        graph = torch.cuda.CUDAGraph()
        # thread_local: the learner's other threads (its prefetcher pins the next batch's host
        # memory) may call CUDA while this one records
        try:
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                outputs = self.forward_backward(inputs, space)
        except RuntimeError as exc:
            raise CaptureError(exc) from exc
        self.captures += 1
        log.info("step recorded as a CUDA graph", extra={"match_rows": padded["matches"].shape[0], "space": space,
                                                         "graphs": len(self.graphs) + 1,
                                                         "seconds": round(time.perf_counter() - start, 2)})
        return _Graph(graph, inputs, outputs, [p.grad for p in self.params])

    def _drop_grads(self) -> None:
        for p in self.params:
            p.grad = None
