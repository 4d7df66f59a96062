"""The learner's physical limit, measured where it runs: the bf16 matmul peak of its GPU.

MFU (model FLOPs utilisation) = model FLOPs per second / this peak. The peak is measured,
not taken from a datasheet: large square bf16 matmuls, median of repeats, on the same
device in the same process.
"""

from __future__ import annotations

import torch


def bf16_matmul_peak(device: torch.device, *, n: int = 8192, repeats: int = 10) -> float:
    """Achieved bf16 matmul FLOP/s on ``device`` (median of ``repeats`` timed products).
    Fresh random operands (not zeros: zeros run faster than real data)."""
    if device.type != "cuda":
        raise ValueError("the bf16 peak is measured on CUDA devices only")
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):  # warm-up: cuBLAS handle, heuristics, clocks
        a @ b
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return 2 * n ** 3 / times[len(times) // 2]
