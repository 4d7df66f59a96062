"""Labeler throughput: depth-teacher frames/s and XFeat+LighterGlue verified pairs/s,
eager vs torch.compile, with MFU against a bf16 matmul peak measured in the same run.

    python benchmarks/labeler_throughput.py [--out results.json] [--quick]
    python benchmarks/labeler_throughput.py --only cpu-threads [--threads 1 2] [--rounds 3] \\
        [--data .devdata/7s-train .devdata/7s-eval] [--out cpu_threads.json]

Depth teachers: the Depth Anything V2 Small and Base architectures (random weights cost the
same as trained ones) built from transformers configs, saved with ``save_pretrained`` and
loaded through ``make_teacher("hf:<folder>")`` like any user model; 518 px input (480x640
frames -> 518x686, the V2 processor's rule). Two rates per teacher: ``forward`` (the model on
device-resident input) and ``teacher`` (``predict_many`` end to end: uint8 frames from the
host, pinned upload, resize + normalise, forward, resize back, copy to the host).
FLOPs of one forward are counted with ``torch.utils.flop_counter.FlopCounterMode``;
MFU = FLOPs x frames/s / peak.

Matches: ``XFeatMatcher`` on windows of 4 synthetic textured frames (480x640, panning), the
worker's pair plan (3 neighbour pairs + 1 long pair) through ``match_many`` (one batched
LightGlue forward per window on CUDA), then USAC/MAGSAC verification when OpenCV is importable
(the verification runs on the CPU). Accuracy against 7-Scenes ground truth and the comparison
with SIFT, several windows batched as the labeler batches them: ``benchmarks/matching_accuracy.py``.

``--only cpu-threads``: the labeler's CPU work at ``labeler.cpu_threads`` = each of
``--threads``, in one run: ``Labeler.label_many`` (teacher ``none``: SIFT features, matching,
USAC/MAGSAC verification and triangulation, nothing else) over 7-Scenes windows cut as the
streamer cuts them (4 views at 168x224 of ``configs/gpu.yaml``), ``labeler.batch_windows``
windows per call. The settings take turns pass by pass (``--rounds`` passes each, after one
untimed warm-up pass each), so load from other work on the host falls on all of them alike.
OpenCV's own thread count (its parallel loops inside SIFT) is left at its default, as in the
labeler, unless ``--opencv-threads`` sets it.
Reported per setting: labelled windows/s wall-clock, this process's CPU seconds per window
(all threads; a rise is the pool's overhead), concurrency = CPU s / wall s (how many cores the
process really got), the ratio of windows/s to ``cpu_threads=1`` and its ideal,
min(threads, cores); the host's load average before and after; and, from CPU time (so other
load does not change it), the share of the serial pass spent inside OpenCV calls that release
the GIL (:func:`gil_free_share`) with the Amdahl bound it sets for 2-16 threads. The inserts of every setting
are checked to be identical to those of the first.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from labelers.depth import make_teacher

DA_V2 = {
    # depth-anything/Depth-Anything-V2-{Small,Base}-hf configs
    "depth-anything-v2-small": dict(hidden=384, heads=6, fusion=64, neck=[48, 96, 192, 384]),
    "depth-anything-v2-base": dict(hidden=768, heads=12, fusion=128, neck=[96, 192, 384, 768]),
}


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timeit(fn, *, warmup: int, iters: int) -> float:
    """Seconds per call (mean over ``iters`` after ``warmup`` calls)."""
    for _ in range(warmup):
        fn()
    sync()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    return (time.perf_counter() - t) / iters


def gpu_busy(fn, iters: int = 5) -> tuple[float, float]:
    """(ms of kernel time on the GPU, kernels) per call of ``fn``, from the profiler's CUDA
    activity: the GPU time a call takes from any other process on the GPU, whatever its wall
    time (a launch-bound forward leaves the GPU idle between its kernels)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        sync()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return sum(e.device_time for e in kernels) / 1000 / iters, len(kernels) / iters


def matmul_peak(device) -> float:
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    s = timeit(lambda: a @ b, warmup=3, iters=20)
    return 2 * n ** 3 / s


def build_da(folder: Path, arch: dict) -> None:
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

    backbone = Dinov2Config(hidden_size=arch["hidden"], num_hidden_layers=12, num_attention_heads=arch["heads"],
                            intermediate_size=4 * arch["hidden"], patch_size=14, image_size=518,
                            out_indices=[3, 6, 9, 12], reshape_hidden_states=False, layerscale_value=1.0)
    cfg = DepthAnythingConfig(backbone_config=backbone, fusion_hidden_size=arch["fusion"], head_hidden_size=32,
                              neck_hidden_sizes=arch["neck"], reassemble_hidden_size=arch["hidden"],
                              reassemble_factors=[4, 2, 1, 0.5], patch_size=14)
    DepthAnythingForDepthEstimation(cfg).save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "DPTImageProcessor", "size": {"height": 518, "width": 518},
        "keep_aspect_ratio": True, "ensure_multiple_of": 14,
        "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}))


def forward_flops(teacher, x: torch.Tensor) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        teacher._raw_forward(x)
    return counter.get_total_flops() / len(x)


def bench_depth(name: str, folder: Path, *, device: str, batch: int, compile: str, peak: float,
                iters: int) -> dict:
    teacher = make_teacher(f"hf:{folder}", device, batch_frames=batch, compile=compile)
    h, w = teacher.model_size(480, 640)
    x = torch.randn(batch, 3, h, w, device=device)
    flops = forward_flops(teacher, x[:1])

    def forward():
        with torch.inference_mode(), torch.autocast(teacher.device.type, dtype=torch.bfloat16,
                                                    enabled=teacher.dtype == torch.bfloat16):
            teacher.forward(x)

    t0 = time.perf_counter()
    forward()
    sync()
    first_call_s = time.perf_counter() - t0  # includes compilation
    s_fwd = timeit(forward, warmup=2, iters=iters)
    rng = np.random.default_rng(0)
    windows = [rng.integers(0, 256, (4, 480, 640, 3), dtype=np.uint8) for _ in range(batch // 4)]
    s_teacher = timeit(lambda: teacher.predict_many(windows), warmup=1, iters=max(2, iters // 2))
    fps_fwd, fps_teacher = batch / s_fwd, batch / s_teacher
    return {"teacher": name, "compile": teacher.compiled, "dtype": str(teacher.dtype).removeprefix("torch."),
            "input": f"{h}x{w}", "batch": batch, "gflops_per_frame": flops / 1e9,
            "forward_frames_s": fps_fwd, "teacher_frames_s": fps_teacher,
            "mfu_forward": flops * fps_fwd / peak, "mfu_teacher": flops * fps_teacher / peak,
            "first_call_s": first_call_s}


def bench_embedded(*, device: str, batch: int, peak: float, iters: int, frame_size: tuple[int, int] = (480, 640),
                   compile: str = "none") -> dict:
    """The package-shipped embedded U-Net: forward on device-resident input at its own input
    size for frames of ``frame_size``, then end to end on 4-view windows of uint8 frames, a
    window per call (``predict``) and all ``batch // 4`` windows in one call (``predict_many``,
    as a labeler hands it a batch)."""
    from torch.utils.flop_counter import FlopCounterMode

    from labelers.embedded import input_size_for

    teacher = make_teacher("embedded", device, compile=compile)
    fh, fw = frame_size
    h, w = input_size_for(fh, fw, teacher.base_size)
    x = torch.rand(batch, 3, h, w, device=device)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        teacher.module(x[:1])
    flops = counter.get_total_flops()

    def forward():  # as predict_many runs it: compiled where the teacher is
        with torch.inference_mode(), torch.autocast(teacher.device.type, dtype=torch.bfloat16,
                                                    enabled=teacher.dtype == torch.bfloat16):
            teacher.forward(x)

    s_fwd = timeit(forward, warmup=2, iters=iters)
    busy_ms, kernels = gpu_busy(forward) if device == "cuda" else (float("nan"), float("nan"))
    rng = np.random.default_rng(0)
    windows = [rng.integers(0, 256, (4, fh, fw, 3), dtype=np.uint8) for _ in range(max(1, batch // 4))]
    frames = 4 * len(windows)
    t0 = time.perf_counter()
    teacher.predict_many(windows)
    first_call_s = time.perf_counter() - t0
    s_window = timeit(lambda: [teacher.predict(f) for f in windows], warmup=1, iters=max(2, iters // 2))
    s_teacher = timeit(lambda: teacher.predict_many(windows), warmup=1, iters=max(2, iters // 2))
    fps_fwd, fps_window, fps_teacher = batch / s_fwd, frames / s_window, frames / s_teacher
    return {"teacher": f"embedded ({teacher.version})", "compile": teacher.compiled,
            "dtype": str(teacher.dtype).removeprefix("torch."), "frames": f"{fh}x{fw}", "input": f"{h}x{w}",
            "batch": batch, "gflops_per_frame": flops / 1e9, "forward_frames_s": fps_fwd,
            "per_window_frames_s": fps_window, "teacher_frames_s": fps_teacher, "mfu_forward": flops * fps_fwd / peak,
            "mfu_teacher": flops * fps_teacher / peak, "first_call_s": first_call_s,
            "forward_gpu_busy_ms": busy_ms, "forward_kernels": kernels}


def panning_frames(n: int, width: int, height: int, step: int, seed: int) -> np.ndarray:
    """n uint8 RGB frames [n,H,W,3] panning right by ``step`` px over a smooth random texture
    (multi-scale noise, so features exist at every scale)."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    big = torch.zeros(1, 3, height, width + step * n)
    for cells in (8, 32, 128):
        noise = torch.rand(1, 3, cells, cells * (width + step * n) // height, generator=g)
        big += F.interpolate(noise, size=big.shape[-2:], mode="bicubic", align_corners=False)
    big = (big - big.min()) / (big.max() - big.min()) * 255
    img = big[0].permute(1, 2, 0).clamp(0, 255).to(torch.uint8).numpy()
    return np.stack([img[:, i * step:i * step + width] for i in range(n)])


def bench_matches(*, device: str, compile: bool, windows: int) -> dict:
    import importlib.util

    from labelers.matches import XFeatMatcher, match_window, select_pairs

    matcher = XFeatMatcher(device=device)
    if compile:
        matcher.xfeat.net = torch.compile(matcher.xfeat.net, dynamic=False)
    data = [panning_frames(4, 640, 480, step=12, seed=s) for s in range(windows)]
    pairs = select_pairs(4, 1)
    have_cv2 = importlib.util.find_spec("cv2") is not None

    def matched_only(frames):
        feats = matcher.features_many(frames)
        return sum(len(r[0]) > 0 for r in matcher.match_many([(feats[i], feats[j]) for i, j in pairs]))

    def verified(frames):
        _, per_pair = match_window(frames, matcher, long_pairs=1, min_matches=12, max_matches_per_pair=256,
                                   threshold_px=1.0)
        return sum(k > 0 for k in per_pair), per_pair

    for f in data[:2]:  # warm-up (compilation)
        matched_only(f)
    sync()
    t = time.perf_counter()
    for f in data:
        matched_only(f)
    sync()
    s_match = time.perf_counter() - t
    out = {"matcher": matcher.name, "compile_xfeat": compile, "windows": windows, "pairs_per_window": len(pairs),
           "matched_pairs_s": windows * len(pairs) / s_match}
    if have_cv2:
        t = time.perf_counter()
        good, kept = 0, []
        for f in data:
            g, per_pair = verified(f)
            good += g
            kept += per_pair
        s = time.perf_counter() - t
        out.update(verified_pairs_s=good / s, verified_fraction=good / (windows * len(pairs)),
                   median_kept_per_pair=float(np.median(kept)))
    return out


GIL_FREE_CALLS = ("cvtColor", "batchDistance", "findFundamentalMat", "findEssentialMat", "recoverPose")
"""The OpenCV functions of the labeler's CPU work that release the GIL (with ``detectAndCompute``)."""


def gil_free_share(run, matcher) -> float:
    """Share of ``run()``'s CPU time (this process, all threads) spent inside OpenCV calls that
    release the GIL, run serially: 1 - this is the serial part that no thread pool spreads
    (Python and numpy glue, the checks of each window), so n threads give at most
    1 / (serial + (1 - serial) / n) (Amdahl). From CPU time, so other load does not change it."""
    import cv2

    spent = [0.0]

    def timed(fn):
        def call(*a, **k):
            t = time.process_time()
            try:
                return fn(*a, **k)
            finally:
                spent[0] += time.process_time() - t
        return call

    class Detector:
        def __init__(self, inner):
            self.detectAndCompute = timed(inner.detectAndCompute)

    originals = {name: getattr(cv2, name) for name in GIL_FREE_CALLS}
    make_detector = matcher._detector
    try:
        for name in GIL_FREE_CALLS:
            setattr(cv2, name, timed(originals[name]))
        matcher._detector = lambda: Detector(make_detector())
        t = time.process_time()
        run()
        total = time.process_time() - t
    finally:
        for name, fn in originals.items():
            setattr(cv2, name, fn)
        del matcher._detector
    return spent[0] / total


def bench_cpu_threads(folders: list[Path], *, threads: list[int], rounds: int, views: int, height: int,
                      width: int, limit: int) -> dict:
    import cv2

    from labelers.service import Labeler
    from reliev3r.config import PipelineConfig, build
    from reliev3r.protocol import Message
    from streamer.config import StreamerConfig
    from streamer.sources import ImageSequenceSource
    from streamer.windows import windows_of

    cut = StreamerConfig(views=views, height=height, width=width)  # the streamer's keyframe gates
    windows = [w for folder in folders for w in windows_of(str(folder), ImageSequenceSource(folder).frames(), cut)]
    windows = windows[:limit] if limit else windows
    if not windows:
        raise SystemExit(f"no windows in {[str(f) for f in folders]}")
    msgs = [Message("window", {"window_id": f"w{n}", "source": "bench", "frame_indices": list(range(views))},
                    {"frames": np.stack([v.rgb for v in w.views]),
                     "intrinsics": np.stack([v.intrinsics for v in w.views]).astype(np.float32)})
            for n, w in enumerate(windows)]
    labelers = {t: Labeler(build(PipelineConfig, {"labeler": {"teacher": "none", "cpu_threads": t}}))
                for t in threads}
    batch = labelers[threads[0]].cfg.batch_windows
    batches = [msgs[k:k + batch] for k in range(0, len(msgs), batch)]

    def one_pass(labeler):
        # each pass as new windows: a view met again within the pass is not detected again (a
        # matcher without the feature cache, of an older tree on PYTHONPATH, has nothing to forget)
        getattr(labeler.matcher, "forget", lambda: None)()
        return [r for group in batches for r in labeler.label_many(group)]

    def key(results):
        return [(reason, flags, None if insert is None else
                 {k: a.tobytes() for k, a in insert.arrays.items() if k in ("matches", "match_triangulation")})
                for insert, reason, flags in results]

    reference = None
    for t in threads:  # warm-up: first-call allocations, the pool's threads and their detectors
        got = key(one_pass(labelers[t]))
        reference = got if reference is None else reference
        if got != reference:
            raise SystemExit(f"cpu_threads={t} labelled differently from cpu_threads={threads[0]}")
    share = gil_free_share(lambda: one_pass(labelers[1]), labelers[1].matcher) if 1 in labelers else float("nan")
    load_before = os.getloadavg()
    wall = {t: [] for t in threads}
    cpu = {t: [] for t in threads}
    for _ in range(rounds):
        for t in threads:
            w0, c0 = time.perf_counter(), time.process_time()
            results = one_pass(labelers[t])
            wall[t].append(time.perf_counter() - w0)
            cpu[t].append(time.process_time() - c0)
            if key(results) != reference:
                raise SystemExit(f"cpu_threads={t} labelled differently from cpu_threads={threads[0]}")
    load_after = os.getloadavg()
    for labeler in labelers.values():
        labeler.close()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    n = len(msgs)
    rows = []
    for t in threads:
        rate = n * rounds / sum(wall[t])
        rows.append({"cpu_threads": t, "windows_s": rate, "windows_s_per_pass": [n / w for w in wall[t]],
                     "cpu_ms_per_window": 1000 * sum(cpu[t]) / (n * rounds),
                     "concurrency": sum(cpu[t]) / sum(wall[t]), "ideal": min(t, cores)})
    base = rows[0]["windows_s"]
    for r in rows:
        r["ratio"] = r["windows_s"] / base
    return {"windows": n, "views": views, "size": [height, width], "batch_windows": batch, "rounds": rounds,
            "data": [str(f) for f in folders], "cores": cores, "opencv_threads": cv2.getNumThreads(),
            "load_before": load_before, "load_after": load_after,
            "inserted": sum(reason == "" for reason, _, _ in reference), "gil_free_share": share,
            "amdahl": {n: 1 / (1 - share + share / n) for n in (2, 4, 8, 16)}, "rows": rows}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--quick", action="store_true", help="tiny run (CPU smoke test of this script)")
    ap.add_argument("--frame-size", default="480x640", help="embedded: frame size HxW of the windows")
    ap.add_argument("--only", choices=["depth", "matches", "embedded", "cpu-threads"], default=None)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="cpu-threads: labeler.cpu_threads values")
    ap.add_argument("--rounds", type=int, default=3, help="cpu-threads: timed passes per setting")
    ap.add_argument("--data", type=Path, nargs="+", default=[Path(".devdata/7s-train"), Path(".devdata/7s-eval")],
                    help="cpu-threads: 7-Scenes image-sequence folders")
    ap.add_argument("--windows", type=int, default=0, help="cpu-threads: at most this many windows (0: all)")
    ap.add_argument("--opencv-threads", type=int, default=None,
                    help="cpu-threads: cv2.setNumThreads (OpenCV's own parallel loops, e.g. inside SIFT); "
                         "default: OpenCV's default, as the labeler runs")
    args = ap.parse_args()
    if args.only == "cpu-threads":
        if args.opencv_threads is not None:
            import cv2

            cv2.setNumThreads(args.opencv_threads)
        r = bench_cpu_threads(args.data, threads=args.threads, rounds=1 if args.quick else args.rounds, views=4,
                              height=168, width=224, limit=args.windows or (8 if args.quick else 0))
        print(json.dumps(r), flush=True)
        print(f"\n{r['windows']} windows of {r['views']} views at {r['size'][0]}x{r['size'][1]} "
              f"({r['inserted']} inserted), {r['batch_windows']} per label_many call, {r['rounds']} passes per "
              f"setting; {r['cores']} cores, OpenCV threads {r['opencv_threads']}; load average "
              f"{r['load_before'][0]:.1f} before, {r['load_after'][0]:.1f} after")
        print("\n| cpu_threads | windows/s (wall) | ratio to 1 | ideal (min(threads, cores)) | CPU ms/window | "
              "concurrency (CPU s / wall s) |")
        print("|---|---|---|---|---|---|")
        for row in r["rows"]:
            print(f"| {row['cpu_threads']} | {row['windows_s']:.2f} | {row['ratio']:.2f}x | {row['ideal']}x | "
                  f"{row['cpu_ms_per_window']:.1f} | {row['concurrency']:.2f} |")
        print(f"\nCPU time inside GIL-free OpenCV calls (cpu_threads=1): {r['gil_free_share']:.1%}; Amdahl bound "
              + ", ".join(f"{n} threads {x:.2f}x" for n, x in r["amdahl"].items()))
        if args.out:
            args.out.write_text(json.dumps({"date": datetime.date.today().isoformat(), **r}, indent=1))
        return 0
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(min(4, os.cpu_count() or 1))
    results = {"date": datetime.date.today().isoformat(), "torch": torch.__version__,
               "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "depth": [], "matches": []}
    peak = matmul_peak(device) if device == "cuda" else float("nan")
    results["bf16_matmul_peak_tflops"] = peak / 1e12
    print(f"device {results['device']}  bf16 matmul peak {peak / 1e12:.0f} TFLOP/s", flush=True)
    batch = 4 if args.quick else args.batch
    iters = 1 if args.quick else 10
    modes = ["none"] if device == "cpu" else ["none", "inductor"]
    archs = list(DA_V2.items())[:1] if args.quick else list(DA_V2.items())
    if args.only in ("matches", "embedded"):
        archs = []
    if args.only in (None, "depth", "embedded"):
        for mode in modes:
            r = bench_embedded(device=device, batch=batch, peak=peak, iters=iters, compile=mode,
                               frame_size=tuple(int(v) for v in args.frame_size.split("x")))
            results["depth"].append(r)
            print(json.dumps(r), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name, arch in archs:
            folder = Path(tmp) / name
            build_da(folder, arch)
            for mode in modes:
                r = bench_depth(name, folder, device=device, batch=batch, compile=mode, peak=peak, iters=iters)
                results["depth"].append(r)
                print(json.dumps(r), flush=True)
    for compile in ([] if args.only in ("depth", "embedded") else [False] if device == "cpu" else [False, True]):
        r = bench_matches(device=device, compile=compile, windows=2 if args.quick else 12)
        results["matches"].append(r)
        print(json.dumps(r), flush=True)
    print("\n| teacher | compile | input | GFLOP/frame | forward frames/s | MFU | teacher frames/s | MFU | "
          "a window per call, frames/s | forward: GPU busy ms, kernels |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results["depth"]:
        print(f"| {r['teacher']} | {r['compile']} | {r['input']} | {r['gflops_per_frame']:.0f} | "
              f"{r['forward_frames_s']:.1f} | {r['mfu_forward']:.1%} | "
              f"{r['teacher_frames_s']:.1f} | {r['mfu_teacher']:.1%} | "
              f"{r.get('per_window_frames_s', float('nan')):.1f} | "
              f"{r.get('forward_gpu_busy_ms', float('nan')):.2f}, {r.get('forward_kernels', float('nan')):.0f} |")
    print("\n| matcher | compiled XFeat | matched pairs/s | verified pairs/s | verified fraction |")
    print("|---|---|---|---|---|")
    for r in results["matches"]:
        print(f"| {r['matcher']} | {r['compile_xfeat']} | {r['matched_pairs_s']:.1f} | "
              f"{r.get('verified_pairs_s', float('nan')):.1f} | {r.get('verified_fraction', float('nan')):.2f} |")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
