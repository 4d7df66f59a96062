"""Model FLOPs utilisation of a learner training step against the bf16 matmul peak of this GPU.

    python benchmarks/learner_mfu.py --size base --runs 224:16 518:4 --profile --out mfu.json

Each run ``RES:B[:ATTENTION[:COMPILE]]`` times a full :class:`learner.train.Trainer` step (bf16
autocast trunk and dense convs, fp32 head outputs, the real weak objective with 2048 matches,
fused AdamW, grad clipping, EMA) on a fixed batch of B windows of ``--views`` RES x RES frames.

* ATTENTION: ``auto`` (PyTorch's choice), ``flash``, ``cudnn`` or ``efficient``: the only SDPA
  backend left enabled, so a fallback fails loudly instead of running slowly.
* COMPILE: ``blocks`` (the Trainer's :func:`learner.train.compile_blocks`: every block and the
  dense head as compiled regions), ``blocks-max`` (the same with
  ``max-autotune-no-cudagraphs``), ``whole`` (``torch.compile`` of the whole model,
  ``dynamic=False``) or ``none``.

``--head-dim 128`` builds the model with 128 channels per attention head instead of the size's
own (base: 64): a different architecture with the same FLOPs.

FLOPs per step = 3 x ``FFRM.flops_per_sample`` x B (the analytic forward count, no recompute;
cross-checked against ``torch.utils.flop_counter.FlopCounterMode`` on one forward). The peak
is measured in the same process, before the runs and again after them: 8192^3 bf16 ``torch.mm``,
median of repeats. The two can differ by several percent (clocks; 722 against 782 TFLOP/s in two
processes of one H200 call), so the table reads MFU against the higher one (the conservative
figure) and also against the first. MFU = achieved model FLOP/s / measured peak. TF32 is left
at PyTorch's defaults, as in training.
``--profile`` adds two profiled steps per run and prints where the GPU time goes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from learner.config import LearnerConfig, ModelConfig
from learner.train import Trainer, compile_blocks, synthetic_batch

ATTENTION = ("auto", "flash", "cudnn", "efficient")
COMPILE = ("blocks", "blocks-max", "whole", "none")


def matmul_peak(n: int = 8192, reps: int = 10, repeats: int = 7) -> float:
    """Median achieved bf16 FLOP/s of an n x n x n matmul (random operands)."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    rates = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            a @ b
        end.record()
        end.synchronize()
        rates.append(2 * n ** 3 * reps / (start.elapsed_time(end) / 1e3))
    return statistics.median(rates)


def set_attention(backend: str) -> None:
    """Leave only ``backend`` enabled (all for ``auto``); read when a graph is traced."""
    on = {b: backend in ("auto", b) for b in ATTENTION[1:]}
    torch.backends.cuda.enable_flash_sdp(on["flash"])
    torch.backends.cuda.enable_cudnn_sdp(on["cudnn"])
    torch.backends.cuda.enable_mem_efficient_sdp(on["efficient"])
    torch.backends.cuda.enable_math_sdp(backend == "auto")


def counted_forward_flops(model: torch.nn.Module, images: torch.Tensor) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16), FlopCounterMode(display=False) as counter:
        model(images)
    return float(counter.get_total_flops())


def kernel_class(name: str) -> str:
    n = name.lower()
    if any(k in n for k in ("flash", "fmha", "attention", "sdpa")):
        return "attention"
    if any(k in n for k in ("conv", "implicit_convolve", "winograd", "cudnn", "xmma_fprop", "dgrad", "wgrad")):
        return "conv"
    if any(k in n for k in ("gemm", "nvjet", "cutlass", "sm90_xmma", "cublas", "matmul")):
        return "gemm"
    if n.startswith("triton"):
        return "triton (fused)"
    if any(k in n for k in ("sort", "radix", "scan", "gather", "scatter", "index")):
        return "sort/gather"
    if "adam" in n or "foreach" in n or "multi_tensor" in n or "lerp" in n:
        return "optimizer/ema"
    if any(k in n for k in ("memcpy", "memset", "copy", "cat", "pixel")):
        return "copies"
    return "other eager"


def profile_steps(trainer: Trainer, data: dict, steps: int, seconds_per_step: float, top: int) -> dict:
    """GPU time per step by kernel and by class, and the share of the step the GPU is busy."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            trainer.step(data)
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    per_step = sorted(((e.self_device_time_total / 1e3 / steps, e.count // steps, e.key) for e in kernels),
                      reverse=True)
    busy = sum(ms for ms, _, _ in per_step)
    classes: dict[str, float] = {}
    for ms, _, name in per_step:
        classes[kernel_class(name)] = classes.get(kernel_class(name), 0.0) + ms
    print(f"  GPU busy {busy:.1f} ms of {1e3 * seconds_per_step:.1f} ms per step; by class (ms/step): "
          + ", ".join(f"{k} {v:.1f}" for k, v in sorted(classes.items(), key=lambda kv: -kv[1])))
    for ms, count, name in per_step[:top]:
        print(f"  {ms:7.2f} ms {100 * ms / busy:4.1f}% x{count:<4d} {name[:110]}")
    return {"gpu_busy_ms": busy, "classes_ms": classes,
            "top": [{"ms": ms, "count": c, "name": n[:200]} for ms, c, n in per_step[:top]]}


def bench(size: str, res: int, views: int, batch: int, patch: int, head_dim: int, attention: str,
          compile_mode: str, steps: int, profile: bool, top: int) -> dict:
    torch._dynamo.reset()
    set_attention(attention)
    # The compile caches are keyed on the graph before SDPA picks its backend: a cached graph
    # from an earlier run would bring that run's backend along (seen: a 'flash' run ran cuDNN).
    torch._functorch.config.enable_autograd_cache = attention == "auto"
    torch._inductor.config.fx_graph_cache = attention == "auto"
    cfg = LearnerConfig(model=ModelConfig(size=size, patch_size=patch, head_dim=head_dim), batch_size=batch,
                        ema_decay=0.999, warmup_steps=0, compile=False)
    trainer = Trainer(cfg, device="cuda")
    data = synthetic_batch(batch, views, res, res, k=2048, device="cuda")
    analytic = trainer.model.flops_per_sample(res, res, views)
    counted = counted_forward_flops(trainer.model, data["images"][:1])  # eager, before any compile
    if compile_mode in ("blocks", "blocks-max"):
        compile_blocks(trainer.model, mode="max-autotune-no-cudagraphs" if compile_mode == "blocks-max" else None)
    elif compile_mode == "whole":
        trainer.forward_model = torch.compile(trainer.model, dynamic=False)
    t0 = time.perf_counter()
    for _ in range(3):  # compile + allocator warm-up
        trainer.step(data)
    torch.cuda.synchronize()
    warmup = time.perf_counter() - t0
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        trainer.step(data)  # returns floats: the step ends synchronised
        times.append(time.perf_counter() - t)
    seconds = statistics.median(times)
    row = {"size": size, "res": res, "views": views, "batch": batch, "patch": patch,
           "head_dim": trainer.model.size.dim // trainer.model.encoder[0].attn.heads, "attention": attention,
           "compile": compile_mode, "params_m": trainer.model.num_parameters() / 1e6, "seconds_per_step": seconds,
           "warmup_s": warmup, "analytic_fwd_gflops_per_window": analytic / 1e9,
           "counted_fwd_gflops_per_window": counted / 1e9, "model_tflops_per_s": 3 * analytic * batch / seconds / 1e12,
           "peak_mem_gib": torch.cuda.max_memory_allocated() / 2 ** 30}
    if profile:
        row["profile"] = profile_steps(trainer, data, 2, seconds, top)
    del trainer, data
    torch.cuda.empty_cache()
    return row


def parse_run(spec: str) -> tuple[int, int, str, str]:
    parts = spec.split(":")
    if len(parts) < 2 or len(parts) > 4:
        raise ValueError(f"run must be RES:B[:ATTENTION[:COMPILE]], got {spec!r}")
    attention = parts[2] if len(parts) > 2 else "auto"
    compile_mode = parts[3] if len(parts) > 3 else "blocks"
    if attention not in ATTENTION or compile_mode not in COMPILE:
        raise ValueError(f"run {spec!r}: attention in {ATTENTION}, compile in {COMPILE}")
    return int(parts[0]), int(parts[1]), attention, compile_mode


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="base")
    p.add_argument("--runs", nargs="+", default=["224:16", "518:4"], help="RES:B[:ATTENTION[:COMPILE]]")
    p.add_argument("--views", type=int, default=8)
    p.add_argument("--patch", type=int, default=14)
    p.add_argument("--head-dim", type=int, default=0, help="channels per attention head (0: the size's own)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--profile", action="store_true", help="two profiled steps per run: GPU time by kernel")
    p.add_argument("--top", type=int, default=12, help="kernels listed per profiled run")
    p.add_argument("--budget-s", type=float, default=0, help="start no run after this many seconds (0: no limit)")
    p.add_argument("--out", default="", help="JSON lines, one per run, appended as they finish")
    args = p.parse_args()
    runs = [parse_run(r) for r in args.runs]
    # One graph per (block layout, size, mode) across the runs: more than the default 8.
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
    begin = time.perf_counter()
    peak = matmul_peak()
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  "
          f"bf16 matmul peak (median) {peak / 1e12:.0f} TFLOP/s", flush=True)
    rows = []
    for res, batch, attention, compile_mode in runs:
        if args.budget_s and time.perf_counter() - begin > args.budget_s:
            print(f"skipped {res}:{batch}:{attention}:{compile_mode}: past --budget-s", flush=True)
            continue
        print(f"run {res}:{batch}:{attention}:{compile_mode}", flush=True)
        try:
            row = bench(args.size, res, args.views, batch, args.patch, args.head_dim, attention, compile_mode,
                        args.steps, args.profile, args.top)
        except Exception as e:  # noqa: BLE001 - one failed variant (OOM, no kernel) must not end the sweep
            print(f"  failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
            torch.cuda.empty_cache()
            continue
        row["peak_tflops"] = peak / 1e12
        row["mfu"] = row["model_tflops_per_s"] * 1e12 / peak
        rows.append(row)
        print("  " + json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
                                 if k != "profile"}), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
    peak_after = matmul_peak()
    top_peak = max(peak, peak_after)
    print(f"\ndevice: {torch.cuda.get_device_name()}  torch {torch.__version__}  bf16 matmul peak "
          f"{peak / 1e12:.0f} TFLOP/s before the runs, {peak_after / 1e12:.0f} after")
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps({"peak_tflops_before": peak / 1e12, "peak_tflops_after": peak_after / 1e12}) + "\n")
    print("| size | head dim | res | V | B | attention | compile | warm-up s | s/step | analytic/counted fwd GFLOP "
          "| model TFLOP/s | MFU (higher peak) | MFU (first peak) | mem GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']} | {r['head_dim']} | {r['res']} | {r['views']} | {r['batch']} | {r['attention']} | "
              f"{r['compile']} | "
              f"{r['warmup_s']:.0f} | {r['seconds_per_step']:.3f} | "
              f"{r['analytic_fwd_gflops_per_window']:.0f}/{r['counted_fwd_gflops_per_window']:.0f} | "
              f"{r['model_tflops_per_s']:.0f} | {100 * r['model_tflops_per_s'] * 1e12 / top_peak:.1f}% | "
              f"{100 * r['mfu']:.1f}% | {r['peak_mem_gib']:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
