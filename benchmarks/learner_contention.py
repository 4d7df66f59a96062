"""What slows a learner that shares its host: CPU load, GPU load, or both (issue 18, placement).

    python benchmarks/learner_contention.py --config configs/gpu.yaml learner.compile=true
    python benchmarks/learner_contention.py --config configs/demo.yaml --quick     # CPU check of the script

Inside ``reliev3r up`` the learner keeps 0.73-0.80x of its rate alone beside two labelers on one
H100 host (docs/BENCHMARKS.md, issue 18), and ``benchmarks/pipeline_bottleneck.py`` cannot say
whether the labelers' CPU threads or their teacher's GPU work take the rest. This script runs the
config's :class:`~learner.train.Trainer` in this process on one fixed batch of the config's size
(:func:`~learner.train.synthetic_batch` with about as many matches as a real batch, and their
triangulation, so every loss term of a real batch runs) and times it
alone and beside loads that stand for the labelers, each a separate process as a labeler is:

* ``cpu``: ``--cpu-threads`` threads running OpenCV SIFT on 168x224 frames (the labeler's CPU
  work; OpenCV releases the GIL, so the threads keep as many cores busy), at niceness
  ``--nice`` (what ``run.feeder_nice`` sets) and at 0;
* ``gpu``: the embedded depth teacher on 4 windows of 4 views a batch, paced at
  ``--teacher-windows`` windows/s (a labeler's depth stage; its own CUDA context, so the GPU
  time-slices between the two processes as it does in the pipeline);
* both together;
* ``gpu-inductor`` (``--loads``): the gpu load with the teacher compiled (``labeler.compile:
  inductor``); timing starts after its first forward (its compilation) and ``--settle``.

Scenarios take turns with "alone" runs between them, so drift of the host falls on all alike;
each ratio is a scenario's steps/s over the mean of the alone runs around it. A short table is
printed last; ``--json`` writes every number.

``--compile-loss`` (a study, not the product's recipe): the loss terms the objective calls
(``COMPILED_TERMS``, the names in ``learner.objective``) under ``torch.compile`` in this
process. The objective runs eagerly in the product: about 1,400 dispatched ops forward at
``configs/gpu.yaml``'s sizes besides the refinement's compiled steps (a CPU count; the model's
forward is 760 before its blocks are compiled), each a kernel launch from the training thread on
a GPU, which is the work a loaded host slows. On the CPU the compiled terms give the same values
(within 1e-6 relative) for 555-701 matches without recompiling (10 graphs, 75 s to compile on 2
cores). On the H100 (docs/BENCHMARKS.md, twelfth pass of issue 18) three of the terms fail to
compile (they run eagerly, logged), and the rest gave no gain: 21.8-26.9 steps/s alone against
23.7-26.8 eager, 0.67x / 0.86x beside the CPU load against 0.72x / 0.83x.

``--blocks-mode reduce-overhead`` (a study, untried on a GPU): the model's blocks compiled with
CUDA graphs (each step a new generation: ``torch.compiler.cudagraph_mark_step_begin``), fewer
launches from the host-bound training thread; ``max-autotune-no-cudagraphs`` for comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

MATCHES_PER_WINDOW = 127
"""Verified matches of a 4-view 7-Scenes window at 168x224 (the demo run's replay: 2,030 in a
batch of 16)."""


COMPILED_TERMS = {"reprojection_loss": True, "point_consistency_loss": True, "triangulated_depth_loss": True,
                  "triangulated_pose_loss": True, "relative_depth_loss": False, "teacher_aligned_depth": False,
                  "refined_geometry_loss": False}
"""The loss terms ``--compile-loss`` compiles (names the objective calls them by), each with
symbolic shapes (True: it takes the batch's matches, whose count changes every batch) or not
(its shapes are the batch's images'). ``depth_contrast_loss`` stays eager, and the image-shaped
terms are not symbolic: with symbolic shapes Inductor's Triton code generation fails on them
(torch 2.11, H100: ``TypeError`` in ``get_block_shape`` of an indirect load)."""


def compile_loss_terms() -> None:
    """Replace each of ``COMPILED_TERMS`` in ``learner.objective`` by its ``torch.compile``,
    in this process only."""
    import torch
    import torch._dynamo

    import learner.objective as objective

    torch._dynamo.config.suppress_errors = True  # a term Inductor fails on runs eagerly (logged), the rest compiled
    for name, dynamic in COMPILED_TERMS.items():
        setattr(objective, name, torch.compile(getattr(objective, name), dynamic=dynamic))


def load_cpu(threads: int) -> None:
    """Busy ``threads`` threads with SIFT on random 168x224 frames until SIGTERM."""
    import threading

    import cv2
    import numpy as np

    cv2.setNumThreads(1)
    rng = np.random.default_rng(0)
    frames = [cv2.GaussianBlur(rng.integers(0, 256, (168, 224), dtype=np.uint8), (5, 5), 1.5) for _ in range(8)]

    def work() -> None:
        sift = cv2.SIFT_create(2048)
        k = 0
        while True:
            sift.detectAndCompute(frames[k % len(frames)], None)
            k += 1

    for _ in range(threads):
        threading.Thread(target=work, daemon=True).start()
    signal.sigwait({signal.SIGTERM})


def load_gpu(windows_per_s: float, device: str, compile: str = "none") -> None:
    """The embedded teacher on batches of 4 windows of 4 views, ``windows_per_s`` windows a
    second (paced, as the labeler's depth stage is paced by its windows), until SIGTERM;
    ``compile`` as ``labeler.compile``."""
    import numpy as np

    from labelers.depth import make_teacher

    teacher = make_teacher("embedded", device, compile=compile)
    rng = np.random.default_rng(0)
    batch = [rng.integers(0, 256, (4, 168, 224, 3), dtype=np.uint8) for _ in range(4)]
    teacher.predict_many(batch)  # compiles a compiled teacher
    print("ready", flush=True)
    period = len(batch) / windows_per_s
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    next_at = time.perf_counter()
    while True:
        teacher.predict_many(batch)
        next_at += period
        time.sleep(max(0.0, next_at - time.perf_counter()))


def start_loads(kind: str, args, nice: int) -> list[subprocess.Popen]:
    me = [sys.executable, str(Path(__file__).resolve()), "--load-nice", str(nice)]
    loads = []
    if kind in ("cpu", "both"):
        loads.append(subprocess.Popen([*me, "--load", "cpu", "--threads", str(args.cpu_threads)]))
    if kind in ("gpu", "both") or kind.startswith("gpu-"):
        compile = kind.removeprefix("gpu-") if kind.startswith("gpu-") else "none"
        teacher = subprocess.Popen([*me, "--load", "gpu", "--rate", str(args.teacher_windows),
                                    "--device", args.teacher_device, "--teacher-compile", compile],
                                   stdout=subprocess.PIPE, text=True)
        loads.append(teacher)
        if teacher.stdout.readline().strip() != "ready":  # after its first forward (and compilation)
            stop_loads(loads)
            raise RuntimeError(f"the {kind} load exited before its first forward (rc {teacher.wait()})")
    time.sleep(args.settle)  # imports, the threads at full speed, the teacher at its pace
    return loads


def stop_loads(loads: list[subprocess.Popen]) -> None:
    for p in loads:
        p.send_signal(signal.SIGTERM)
    for p in loads:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", action="append", default=[], help="config files (as reliev3r up)")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    ap.add_argument("--steps", type=int, default=60, help="timed steps per scenario")
    ap.add_argument("--warmup", type=int, default=10, help="untimed steps first (compilation)")
    ap.add_argument("--cpu-threads", type=int, default=12, help="cpu load: SIFT threads (two labelers of 6)")
    ap.add_argument("--teacher-windows", type=float, default=120.0, help="gpu load: windows/s")
    ap.add_argument("--teacher-device", default="cuda")
    ap.add_argument("--loads", nargs="+", choices=["cpu", "gpu", "both", "gpu-inductor"],
                    default=["cpu", "gpu", "both"],
                    help="scenarios (cpu and both at niceness 0 and --nice; gpu-inductor: the teacher "
                         "compiled, labeler.compile=inductor)")
    ap.add_argument("--nice", type=int, default=10, help="the loads' niceness in the niced scenarios")
    ap.add_argument("--settle", type=float, default=5.0, help="seconds between starting a load and timing")
    ap.add_argument("--quick", action="store_true", help="a few steps, 2 CPU threads, no GPU load (CPU check)")
    ap.add_argument("--blocks-mode", choices=["reduce-overhead", "max-autotune-no-cudagraphs"], default=None,
                    help="compile the model's blocks in this torch.compile mode "
                         "(a study; reduce-overhead: CUDA graphs)")
    ap.add_argument("--compile-loss", action="store_true",
                    help="the objective's loss terms under torch.compile (a study; module docstring)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--load", choices=["cpu", "gpu"], help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--rate", type=float, default=0.0, help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    ap.add_argument("--teacher-compile", default="none", help=argparse.SUPPRESS)
    ap.add_argument("--load-nice", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.load:
        os.nice(args.load_nice)  # before any thread starts, as a niced stage does
    if args.load == "cpu":
        load_cpu(args.threads)
        return 0
    if args.load == "gpu":
        load_gpu(args.rate, args.device, args.teacher_compile)
        return 0

    import torch

    from learner.train import Trainer, synthetic_batch
    from reliev3r import config as rconfig

    cfg = rconfig.load(args.config, args.overrides)
    lcfg = cfg.learner
    if args.compile_loss:
        compile_loss_terms()
    if args.quick:
        args.steps, args.warmup, args.cpu_threads, args.settle = 4, 1, 2, 1.0
    if args.blocks_mode:  # the model's blocks compiled in that mode instead of the default
        from dataclasses import replace

        from learner.train import compile_blocks

        trainer = Trainer(replace(lcfg, compile=False), seed=cfg.run.seed)
        compile_blocks(trainer.model, mode=args.blocks_mode)
    else:
        trainer = Trainer(lcfg, seed=cfg.run.seed)
    if args.blocks_mode == "reduce-overhead":  # CUDA graphs: each step a new generation of them
        launch = trainer.launch  # what Trainer.step and rate() call

        def marked_launch(*a, **kw):
            torch.compiler.cudagraph_mark_step_begin()
            return launch(*a, **kw)

        trainer.launch = marked_launch
    device = trainer.device
    on_gpu = device.type == "cuda"
    scenarios = [(kind, nice) for kind in args.loads if kind == "cpu" or (on_gpu and not args.quick)
                 for nice in ((0, args.nice) if kind in ("cpu", "both") else (0,))]
    views, height, width = cfg.streamer.views, cfg.streamer.height, cfg.streamer.width
    batch = synthetic_batch(lcfg.batch_size, views, height, width, k=MATCHES_PER_WINDOW * lcfg.batch_size,
                            seed=cfg.run.seed, device=device, triangulation=True)
    print(f"learner {lcfg.model.size} on {torch.cuda.get_device_name(device) if on_gpu else 'cpu'}, batch "
          f"{lcfg.batch_size} x {views} views at {height}x{width}, compile {lcfg.compile}, loss terms "
          f"{'compiled' if args.compile_loss else 'eager'}, blocks' mode {args.blocks_mode or 'default'}; "
          f"{os.cpu_count()} cores; "
          f"loads: {args.cpu_threads} SIFT threads, the embedded teacher at {args.teacher_windows:g} windows/s",
          flush=True)
    for _ in range(args.warmup):
        terms = trainer.step(batch)
    print("loss terms:", ", ".join(sorted(k for k in terms if k not in ("lr", "skipped", "step", "grad_norm"))),
          flush=True)
    if on_gpu:
        print(f"CUDA graphs: {'%d captured' % trainer.graphs.captures if trainer.graphs else 'off'}; GPU memory "
              f"peak {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB allocated, "
              f"{torch.cuda.max_memory_reserved(device) / 2**30:.1f} GiB reserved", flush=True)

    def rate() -> tuple[float, float | None]:
        """Steps/s in the learner's order (``learner.service``): each step read back after the
        next is launched, the last one read before the clock stops (its GPU work done); and the
        steps' mean span on the GPU in ms (None on the CPU): longer beside a load when the GPU
        takes turns between the learner and the load's process."""
        t, launched = time.perf_counter(), []
        for _ in range(args.steps):
            launched.append(trainer.launch(batch))
            if len(trainer.unsettled) > 1:
                trainer.settle(trainer.unsettled[0])
        trainer.settle_all()
        steps_per_s = args.steps / (time.perf_counter() - t)
        spans = [p.gpu_seconds for p in launched if p.gpu_seconds is not None]
        return steps_per_s, 1000 * sum(spans) / len(spans) if spans else None

    rows, alone = [], [rate()]
    for kind, nice in scenarios:
        loads = start_loads(kind, args, nice)
        try:
            with_load, span = rate()
        finally:
            stop_loads(loads)
        alone.append(rate())
        (before, span_before), (after, span_after) = alone[-2:]
        ref = (before + after) / 2
        ref_span = (span_before + span_after) / 2 if span_before is not None and span_after is not None else None
        rows.append({"load": kind, "nice": nice, "steps_per_s": with_load, "alone_steps_per_s": ref,
                     "ratio": with_load / ref, "gpu_ms": span, "alone_gpu_ms": ref_span,
                     "gpu_span_ratio": span / ref_span if span and ref_span else None})
        print(json.dumps(rows[-1]), flush=True)
    print("\n| load | loads' niceness | steps/s | alone around it | ratio | step on the GPU, ms (alone) | span ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        span = "-" if r["gpu_ms"] is None else f"{r['gpu_ms']:.2f} ({r['alone_gpu_ms']:.2f})"
        spans = "-" if r["gpu_span_ratio"] is None else f"{r['gpu_span_ratio']:.2f}x"
        print(f"| {r['load']} | {r['nice']} | {r['steps_per_s']:.2f} | {r['alone_steps_per_s']:.2f} | "
              f"**{r['ratio']:.2f}x** | {span} | {spans} |")
    print(f"\nalone, each turn: {', '.join(f'{a:.2f}' for a, _ in alone)} steps/s")
    if args.json:
        args.json.write_text(json.dumps({"alone": [a for a, _ in alone], "rows": rows, "cpu_threads": args.cpu_threads,
                                         "compile_loss": args.compile_loss, "blocks_mode": args.blocks_mode,
                                         "cuda_graphs": trainer.graphs is not None,
                                         "teacher_windows_per_s": args.teacher_windows, "cores": os.cpu_count()},
                                        indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
