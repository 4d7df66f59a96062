"""Model FLOPs utilisation of a learner training step against the bf16 matmul peak of this GPU.

    python benchmarks/learner_mfu.py --size base --res 224 518 --views 8 --batch 16 4 --out mfu.json

For each resolution: a full :class:`learner.train.Trainer` step (bf16 autocast trunk, fp32
heads, the real weak objective with 2048 matches, fused AdamW, grad clipping) on a fixed batch,
optionally under ``torch.compile``. FLOPs per step = 3 x ``FFRM.flops_per_sample`` x B (the
analytic count, cross-checked here against ``torch.utils.flop_counter.FlopCounterMode`` on one
forward). The peak is measured in the same run: large square bf16 matmuls (``torch.mm``,
8192^3), best of several. MFU = achieved model FLOP/s / measured peak.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from learner.config import LearnerConfig, ModelConfig  # noqa: E402
from learner.train import Trainer, synthetic_batch  # noqa: E402


def matmul_peak(n: int = 8192, reps: int = 20) -> float:
    """Best achieved bf16 FLOP/s of an n x n x n matmul."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(5):
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        torch.cuda.synchronize()
        best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - t))
    return best


def counted_forward_flops(model: torch.nn.Module, images: torch.Tensor) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16), FlopCounterMode(display=False) as counter:
        model(images)
    return float(counter.get_total_flops())


def bench(size: str, res: int, views: int, batch: int, patch: int, compile_mode: str, steps: int) -> dict:
    cfg = LearnerConfig(model=ModelConfig(size=size, patch_size=patch), batch_size=batch, ema_decay=0.999,
                        warmup_steps=0, compile=False)
    trainer = Trainer(cfg, device="cuda")
    if compile_mode != "none":
        trainer.forward_model = torch.compile(trainer.model, mode=None if compile_mode == "default" else compile_mode)
    data = synthetic_batch(batch, views, res, res, k=2048, device="cuda")
    analytic = trainer.model.flops_per_sample(res, res, views)
    counted = counted_forward_flops(trainer.model, data["images"][:1])
    for _ in range(3):  # compile + allocator warm-up
        trainer.step(data)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        trainer.step(data)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    return {"size": size, "res": res, "views": views, "batch": batch, "patch": patch, "compile": compile_mode,
            "params_m": trainer.model.num_parameters() / 1e6, "seconds_per_step": seconds,
            "analytic_fwd_gflops_per_window": analytic / 1e9, "counted_fwd_gflops_per_window": counted / 1e9,
            "model_tflops_per_s": 3 * analytic * batch / seconds / 1e12,
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2 ** 30}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="base")
    p.add_argument("--res", type=int, nargs="+", default=[224, 518])
    p.add_argument("--batch", type=int, nargs="+", default=[16, 4], help="one per --res")
    p.add_argument("--views", type=int, default=8)
    p.add_argument("--patch", type=int, default=14)
    p.add_argument("--compile", default="default", help="none, default, max-autotune-no-cudagraphs")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--out", default="")
    args = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    peak = matmul_peak()
    rows = []
    for res, batch in zip(args.res, args.batch):
        row = bench(args.size, res, args.views, batch, args.patch, args.compile, args.steps)
        row["peak_tflops"] = peak / 1e12
        row["mfu"] = row["model_tflops_per_s"] * 1e12 / peak
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\ndevice: {torch.cuda.get_device_name()}  torch {torch.__version__}  bf16 matmul peak {peak / 1e12:.0f} TFLOP/s")
    print("| size | res | V | B | compile | s/step | analytic/counted fwd GFLOP | model TFLOP/s | MFU | mem GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']} | {r['res']} | {r['views']} | {r['batch']} | {r['compile']} | {r['seconds_per_step']:.3f} | "
              f"{r['analytic_fwd_gflops_per_window']:.0f}/{r['counted_fwd_gflops_per_window']:.0f} | "
              f"{r['model_tflops_per_s']:.0f} | {100 * r['mfu']:.0f}% | {r['peak_mem_gib']:.1f} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"peak_tflops": peak / 1e12, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
