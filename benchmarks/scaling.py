"""Learner data-parallel scaling: samples/s on 1..N ranks, efficiency = T(N) / (N * T(1)).

Each rank trains the FFRM (DistributedDataParallel, NCCL on GPUs, gloo on CPU) on its own
random, well-formed batches (``learner.train.synthetic_batch``: same shapes as replay's) so
the figure isolates the learner from data loading. The driver launches one ``torchrun``
per rank count and prints a table; ``--json`` writes the raw numbers.

    python benchmarks/scaling.py --size base --height 224 --width 224 --views 8 --batch 8 --nprocs 1,2
    python benchmarks/scaling.py --device cpu --size tiny --patch 8 --height 64 --width 96 --views 4 --nprocs 1,2

A rank count above the GPUs present is skipped with a message. ``--height`` and ``--width`` must be
multiples of ``--patch`` (14 by default), as the model takes them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    from learner.config import LearnerConfig, ModelConfig
    from learner.train import Trainer, synthetic_batch

    cfg = LearnerConfig(model=ModelConfig(size=args.size, patch_size=args.patch), batch_size=args.batch,
                        device=args.device, compile=args.compile, ema_decay=args.ema_decay, warmup_steps=0,
                        threads=1 if args.device == "cpu" else 0)
    trainer = Trainer(cfg, device=args.device)
    rank, world = trainer.rank, trainer.world_size
    batch = synthetic_batch(args.batch, args.views, args.height, args.width, k=512, seed=rank, device=trainer.device)
    for _ in range(args.warmup):
        trainer.step(batch)
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
    if world > 1:
        dist.barrier()
    start = time.perf_counter()
    for _ in range(args.steps):
        trainer.step(batch)
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    # On the rank's device: NCCL reduces CUDA tensors only.
    rate = torch.tensor([args.batch * args.steps / elapsed], dtype=torch.float64, device=trainer.device)
    if world > 1:
        dist.all_reduce(rate)  # total samples/s of all ranks
    if rank == 0:
        flops = 3 * trainer.model.flops_per_sample(args.height, args.width, args.views) * rate.item()
        print("RESULT " + json.dumps({"nprocs": world, "samples_per_s": rate.item(), "model_flops_per_s": flops,
                                       "params": trainer.model.num_parameters()}), flush=True)
    if world > 1:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="base")
    parser.add_argument("--patch", type=int, default=14)
    parser.add_argument("--height", type=int, default=224)
    parser.add_argument("--width", type=int, default=224)
    parser.add_argument("--views", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8, help="windows per rank per step")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--ema-decay", type=float, default=0.0, help="learner.ema_decay (0: no EMA weights)")
    parser.add_argument("--nprocs", default="1,2")
    parser.add_argument("--json", default=None, help="write the raw results here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.height % args.patch or args.width % args.patch:
        parser.error(f"--height {args.height} and --width {args.width} must be multiples of --patch {args.patch}")
    if args.worker:
        return worker(args)
    gpus = 0
    if args.device == "cuda":
        import torch

        gpus = torch.cuda.device_count()
    results = []
    for n in (int(x) for x in args.nprocs.split(",")):
        if args.device == "cuda" and n > gpus:
            print(f"skip {n} ranks: only {gpus} GPU(s) here")
            continue
        passed = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                  if k not in ("nprocs", "json", "worker", "compile")]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
               __file__, "--worker", *passed, *(["--compile"] if args.compile else [])]
        env = {**os.environ, "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            print(f"{n} ranks failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
            continue
        results.append(json.loads(line[len("RESULT "):]))
    if not results:
        sys.exit(1)
    base = next((r["samples_per_s"] for r in results if r["nprocs"] == 1), None)
    print(f"\nlearner scaling: size {args.size}, {args.views} views {args.height}x{args.width}, "
          f"batch {args.batch}/rank, device {args.device}{' (compiled)' if args.compile else ''}")
    print("| ranks | samples/s | efficiency T(N)/(N*T(1)) |\n|---:|---:|---:|")
    for r in results:
        eff = r["samples_per_s"] / (r["nprocs"] * base) if base else float("nan")
        r["efficiency"] = eff
        print(f"| {r['nprocs']} | {r['samples_per_s']:.2f} | {eff:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
