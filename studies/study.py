"""Train on a fixed labelled dataset and evaluate on held-out windows: learning curves.

    python -m studies.study --train synthetic:scenes=24,frames=40 --views 4 --height 48 --width 64 \\
        --steps 600 --eval-every 100 --set loss.kind=weak --out runs/study/weak

* ``--train`` / ``--eval``: dataset specs (:func:`studies.dataset.parse_spec`); ``--eval``
  defaults to the training spec with ``seed + 1000`` (unseen synthetic scenes). Both are
  labelled once and cached under ``--cache`` (default ``.devdata/datasets``), so a GPU host
  only reads the ``.npz``.
* ``--stream DIR``: train on fresh windows instead of ``--train`` (:mod:`studies.fresh`: every
  window a new scene, written into DIR by ``python -m studies.fresh``; the newest ``--capacity``
  are kept in memory and new ones are loaded every 10 steps; the study waits for
  ``--min-windows`` first). ``--eval`` is then the held-out spec (default: ``--train`` with
  ``seed + 1000``).
* ``--set key=value`` (repeatable) overrides :class:`learner.config.LearnerConfig` fields,
  dotted for nested ones: ``loss.kind=supervised``, ``loss.point_weight=0``, ``model.size=small``,
  ``lr=1e-3``, ``batch_size=8`` (parsed and checked as the pipeline's ``key.sub=value``
  overrides are: :func:`reliev3r.config.with_overrides`).
* ``--steps N`` and/or ``--minutes T``: whichever comes first.
* Every ``--eval-every`` steps (and at the end) the model is scored on the held-out windows
  (and so are its EMA weights when ``--set ema_decay=D`` > 0; the study's default is 0)
  by :func:`evaluation.evaluate.evaluate_model`, the code ``reliev3r eval`` and the evaluator
  use; the trivial baseline (constant depth, identity poses,
  :func:`evaluation.evaluate.trivial_baseline`) is computed once beside it.

Writes ``<out>/curve.json`` (config, dataset stats, baseline, a row per evaluation and
running means of the train loss terms; replaced atomically and durably at each evaluation,
``reliev3r.durable.write``) and ``<out>/table.md`` (so too, at the end); prints the table last.
This module imports neither pyzmq nor PyAV at module level (GPU hosts may lack both).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evaluation.datasets import EvalWindow
from evaluation.evaluate import evaluate_model, markdown_table, trivial_baseline
from learner.config import LearnerConfig
from reliev3r import durable
from reliev3r.config import with_overrides
from studies.dataset import LabelledDataset, ensure_dataset, parse_spec

STUDY_KEYS = ("absrel_med", "absrel_lsq", "absrel_lsq_frame", "delta_med", "rot_err_deg", "trans_err_deg",
              "rra30", "rta30", "auc30", "ate")
"""The metrics a study prints and tabulates (names and titles: ``evaluation.evaluate.TITLES``)."""


def format_table(rows: dict[str, dict[str, float]], keys: tuple[str, ...] = STUDY_KEYS) -> str:
    """The study's markdown table: ``evaluation.evaluate.markdown_table`` over the ``keys`` that
    some row has."""
    return markdown_table(rows, tuple(k for k in keys if any(k in r for r in rows.values())), first="run")


# ---------------------------------------------------------------------- the study

@dataclasses.dataclass(kw_only=True, slots=True)
class StudyResult:
    curve: list[dict[str, Any]]
    baseline: dict[str, float]
    final: dict[str, float]
    steps: int
    seconds: float
    final_ema: dict[str, float] | None = None
    """The EMA weights' scores (when ``ema_decay`` > 0)."""


def run_study(cfg: LearnerConfig, train: LabelledDataset, held_out: list[EvalWindow], *, steps: int,
              minutes: float = 0.0, eval_every: int = 100, max_matches: int = 0, seed: int = 0,
              device: str = "auto", log_every: int = 10, out: Path | None = None,
              on_eval=None, refresh_every: int = 10, resume: str | Path | None = None) -> StudyResult:
    """Train ``cfg`` on ``train`` for ``steps`` steps (or ``minutes``), scoring ``held_out``
    every ``eval_every`` steps. Returns the curve; writes ``out/curve.json`` as it goes and a
    final snapshot under ``out/snapshots`` (:mod:`learner.snapshot`); ``resume`` (a snapshot
    folder) continues a run from it: weights, optimizer, EMA, step and LR schedule.
    A :class:`studies.fresh.FreshStream` ``train`` loads its new windows every ``refresh_every``
    steps; each curve row then says how many windows the run had loaded (``train_windows``)."""
    from learner.train import Trainer

    trainer = Trainer(cfg, device=device, teacher_space=train.teacher_space, seed=seed)
    if resume is not None:
        trainer.load_state(resume)
    rng = np.random.default_rng(seed)
    baseline = trivial_baseline(held_out)
    curve: list[dict[str, Any]] = []
    running: dict[str, list[float]] = {}
    start = time.perf_counter()
    deadline = start + minutes * 60 if minutes > 0 else math.inf
    step = 0
    fresh = hasattr(train, "refresh")

    def record(final: bool = False) -> None:
        row = {"step": trainer.global_step, "seconds": round(time.perf_counter() - start, 2),
               "train": {k: float(np.mean(v)) for k, v in running.items()},
               "eval": evaluate_model(trainer.model, held_out, trainer.device), "final": final}
        if trainer.ema is not None:  # the weights snapshots serve (learner.snapshot.load_model)
            row["eval_ema"] = evaluate_model(trainer.ema, held_out, trainer.device)
        if fresh:
            row["train_windows"] = train.loaded
        running.clear()
        curve.append(row)
        if on_eval is not None:
            on_eval(row)
        if out is not None:
            _write(out, cfg, train, baseline, curve)

    def more() -> bool:  # ``cfg.max_steps`` counts the run's steps, across resumes
        return (step < steps and time.perf_counter() < deadline
                and not (cfg.max_steps and trainer.global_step >= cfg.max_steps))

    while more():
        if fresh and step % refresh_every == 0:
            train.refresh()
        idx = rng.choice(len(train), size=cfg.batch_size, replace=len(train) < cfg.batch_size)
        batch = train.batch(idx, trainer.device, max_matches=max_matches, rng=rng)
        terms = trainer.step(batch)
        step += 1
        for k, v in terms.items():
            if k not in ("step", "lr", "skipped") and math.isfinite(v):
                running.setdefault(k, []).append(v)
        if log_every and step % log_every == 0:
            print(f"step {trainer.global_step} " + " ".join(f"{k}={np.mean(v):.4g}" for k, v in running.items()),
                  flush=True)
        if eval_every and step % eval_every == 0 and more():
            record()
    record(final=True)
    if out is not None:
        trainer.save_state(out / "snapshots", final=True)
    return StudyResult(curve=curve, baseline=baseline, final=curve[-1]["eval"], steps=trainer.global_step,
                       seconds=time.perf_counter() - start, final_ema=curve[-1].get("eval_ema"))


def _write(out: Path, cfg: LearnerConfig, train: LabelledDataset, baseline: dict, curve: list) -> None:
    out.mkdir(parents=True, exist_ok=True)
    doc = {"config": dataclasses.asdict(cfg), "dataset": {"meta": train.meta, "stats": train.stats()},
           "baseline": baseline, "curve": curve}
    durable.write(out / "curve.json", json.dumps(doc, indent=1), tmp=out / "curve.json.tmp")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m studies.study", description=__doc__.split("\n")[0])
    p.add_argument("--train", default="synthetic:scenes=16,frames=40", help="training dataset spec")
    p.add_argument("--eval", default="", help="held-out dataset spec (default: --train with seed + 1000)")
    p.add_argument("--views", type=int, default=4)
    p.add_argument("--height", type=int, default=48)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--stride", type=int, default=8, help="frames between views (parallax)")
    p.add_argument("--teacher", default="oracle", help="depth teacher spec (labelers.depth.make_teacher)")
    p.add_argument("--matcher", default="sift")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--minutes", type=float, default=0.0, help="stop after this long (0: no limit)")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-windows", type=int, default=24)
    p.add_argument("--max-matches", type=int, default=0, help="matches kept per window per step (0: all)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="LearnerConfig override, e.g. loss.kind=supervised, model.size=small, lr=1e-3")
    p.add_argument("--stream", default="", help="train on the fresh windows of this folder (studies.fresh)")
    p.add_argument("--capacity", type=int, default=4096, help="fresh windows kept in memory (--stream)")
    p.add_argument("--min-windows", type=int, default=256, help="fresh windows to wait for before step 1")
    p.add_argument("--cache", default=".devdata/datasets", help="folder of labelled dataset caches")
    p.add_argument("--workers", type=int, default=0, help="labelling processes (0: one per CPU)")
    p.add_argument("--label-only", action="store_true", help="build the dataset caches and exit")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", default="", help="continue from this snapshot folder (a study's out/snapshots/...)")
    p.add_argument("--out", default="runs/study")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    common = dict(views=args.views, height=args.height, width=args.width, stride=args.stride,
                  teacher=args.teacher, matcher=args.matcher)
    train_spec = parse_spec(args.train, **common)
    eval_spec = (parse_spec(args.eval, **common) if args.eval
                 else dataclasses.replace(train_spec, seed=train_spec.seed + 1000))
    held = ensure_dataset(eval_spec, args.cache, workers=args.workers)
    if args.stream:
        from studies.fresh import FreshStream

        if args.label_only:
            return 0
        train = FreshStream(args.stream, capacity=args.capacity, timeout=120)
        train.wait(min(args.min_windows, args.capacity), timeout=600)
    else:
        train = ensure_dataset(train_spec, args.cache, workers=args.workers)
    print(f"train: {train.stats()}\nheld-out: {held.stats()}", flush=True)
    if args.label_only:
        return 0

    defaults = ["ema_decay=0", "warmup_steps=50", "snapshot_every=1000000", "lr=1e-3"]
    cfg = with_overrides(LearnerConfig(), defaults + args.set)
    out = Path(args.out)
    result = run_study(cfg, train, held.windows(args.eval_windows), steps=args.steps, minutes=args.minutes,
                       eval_every=args.eval_every, max_matches=args.max_matches, seed=args.seed,
                       device=args.device, out=out, resume=args.resume or None,
                       on_eval=lambda row: print(f"eval step {row['step']}: " + " ".join(
                           f"{k}={row['eval'][k]:.3f}" for k in STUDY_KEYS if k in row["eval"]), flush=True))
    rows = {"constant depth / identity poses": result.baseline, f"{cfg.loss.kind} (step {result.steps})": result.final}
    if result.final_ema is not None:
        rows[f"{cfg.loss.kind}, EMA {cfg.ema_decay} (step {result.steps})"] = result.final_ema
    table = format_table(rows)
    durable.write(out / "table.md", table + "\n", tmp=out / "table.md.tmp")
    print(f"{result.steps} steps in {result.seconds:.0f} s\n{table}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
