"""Replay throughput: inserts/s, samples/s and sample latency, ours against TorchRL.

Windows look like what the labeler inserts: V=8 views of uint8 RGB frames, float32
intrinsics [V,3,3], float32 teacher depth [V,H,W], uint8 teacher validity [V,H,W] and ~2000
verified matches float32 [K,7], at 224 and 518 px (about 3.2 MB and 17 MB per window).
The same windows go, in the same run, through:

* ``service-memory`` / ``service-durable``: the replay service (``replay.service.run`` in a
  thread, exactly what ``reliev3r replay`` runs) and :class:`replay.client.ReplayClient` over
  ZeroMQ TCP on 127.0.0.1; an insert is timed to its ack, a sample to the decoded batch.
  ``--writers N`` inserts from N clients at once (the service then group-commits them).
* ``buffer-memory`` / ``buffer-durable``: :class:`replay.buffer.ReplayBuffer` in-process
  (``MemoryStorage`` / SQLite ``DiskStorage`` with an fsync per commit, checksum on read).
* ``torchrl-memmap``: TorchRL ``ReplayBuffer(storage=LazyMemmapStorage(n))`` with a
  ``TensorDict`` per window (``add`` one at a time, ``sample(B)``). Its storage needs fixed
  shapes, so matches are padded to a fixed K with a count; it does not fsync, checksum or
  restore its index after a crash, so it is the speed reference, not a durability peer.

A sample is a batch of ``--batch`` windows drawn uniformly; samples/s counts windows.
Ratios are ours / TorchRL (above 1 is faster; for latency, above 1 is slower).

Optional dependencies (not in setup.cfg): ``torchrl`` and ``tensordict``. torchrl 0.14.1
with tensordict 0.14.3 work with torch 2.13 (install with ``pip install --no-deps torchrl
tensordict`` plus ``cloudpickle orjson pyvers hoptorch importlib_metadata``, so pip cannot
replace torch). Without them the TorchRL rows are skipped.

    python benchmarks/replay_throughput.py                       # both sizes, every backend
    python benchmarks/replay_throughput.py --sizes 224 --windows 32 --batches 20 --writers 4
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from reliev3r import config as rconfig
from reliev3r import protocol
from reliev3r.service import Runtime
from replay import service
from replay.buffer import ReplayBuffer
from replay.client import ReplayClient
from replay.config import ReplayConfig
from replay.storage import DiskStorage, MemoryStorage

VIEWS = 8
MATCHES = 2000


def make_windows(n: int, size: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        k = MATCHES - 100 + i % 200  # the labeler's match count varies per window
        out.append({"frames": rng.integers(0, 256, (VIEWS, size, size, 3), dtype=np.uint8),
                    "intrinsics": np.tile(np.array([[size, 0, size / 2], [0, size, size / 2], [0, 0, 1]],
                                                   np.float32), (VIEWS, 1, 1)),
                    "teacher_depth": rng.random((VIEWS, size, size), dtype=np.float32) + 0.5,
                    "teacher_valid": np.ones((VIEWS, size, size), np.uint8),
                    "matches": random_matches(rng, k, size)})
    return out


def random_matches(rng: np.random.Generator, k: int, size: int) -> np.ndarray:
    """``k`` matches of the columns ``protocol.MATCH_COLUMNS`` that the replay accepts: whole view
    indices i < j, pixels inside the frame, scores in [0, 1]."""
    i = rng.integers(0, VIEWS - 1, k)
    j = i + 1 + (rng.integers(0, 2**16, k) % (VIEWS - 1 - i))
    pixels = rng.random((k, 4), dtype=np.float32) * (size - 1)
    return np.column_stack([i, j, pixels, rng.random(k)]).astype(np.float32)


def as_insert(arrays: dict[str, np.ndarray], wid: str) -> protocol.Message:
    meta = {"window_id": wid, "source": "bench", "frame_indices": list(range(VIEWS)),
            "teacher": {"depth": {"name": "bench", "version": "1"}, "matches": {"name": "bench", "version": "1"}}}
    return protocol.Message("insert", meta, arrays)


def summary(name: str, size: int, insert_s: list[float], n_windows: int, sample_s: list[float], batch: int) -> dict:
    lat = np.array(sample_s) * 1e3
    return {"backend": name, "size": size, "inserts_per_s": n_windows / sum(insert_s),
            "samples_per_s": batch * len(sample_s) / sum(sample_s),
            "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99))}


def replay_cfg(n: int, window_bytes: int, **kw) -> ReplayConfig:
    return ReplayConfig(capacity_windows=n, capacity_bytes=n * window_bytes * 2, min_size=1,
                        max_window_bytes=window_bytes * 2, dedup=False, **kw)


def bench_buffer(durable: bool, windows, size, batches, batch, tmp: Path) -> dict:
    nbytes = as_insert(windows[0], "x").nbytes()
    storage = DiskStorage(tmp / f"buffer-{size}") if durable else MemoryStorage()
    buf = ReplayBuffer(replay_cfg(len(windows), nbytes, durable=durable), storage)
    insert_s = []
    for i, w in enumerate(windows):
        start = time.perf_counter()
        assert buf.insert(as_insert(w, f"w{i}")).status == "stored"
        insert_s.append(time.perf_counter() - start)
    buf.sample(batch)  # warm-up
    sample_s = []
    for _ in range(batches):
        start = time.perf_counter()
        buf.sample(batch)
        sample_s.append(time.perf_counter() - start)
    buf.close()
    return summary(f"buffer-{'durable' if durable else 'memory'}", size, insert_s, len(windows), sample_s, batch)


@contextlib.contextmanager
def serving(cfg: rconfig.PipelineConfig):
    runtime = Runtime("replay", cfg, install_signals=False, serve_metrics=False)
    thread = threading.Thread(target=service.run, args=(cfg, runtime), daemon=True)
    thread.start()
    try:
        yield cfg.network.connect(cfg.network.replay_port)
    finally:
        runtime.stop()
        thread.join(timeout=30)
        runtime.close()


def bench_service(durable: bool, windows, size, batches, batch, tmp: Path, writers: int) -> dict:
    nbytes = as_insert(windows[0], "x").nbytes()
    n = len(windows)
    cfg = rconfig.load([], [f"run.dir={tmp / f'service-{size}-{durable}-{writers}'}", "monitoring.enabled=false",
                            f"replay.durable={str(durable).lower()}", f"replay.capacity_windows={n}",
                            f"replay.capacity_bytes={2 * n * nbytes}", f"replay.max_window_bytes={2 * nbytes}",
                            "replay.min_size=1", "replay.dedup=false"])
    cfg.network.replay_port = rconfig.free_port()
    with serving(cfg) as endpoint:
        def write(part: int, out: list):
            with ReplayClient(endpoint, timeout_s=120, retry_s=60) as client:
                for i in range(part, n, writers):
                    assert client.insert(as_insert(windows[i], f"w{i}"))["status"] == "stored"

        start = time.perf_counter()
        threads = [threading.Thread(target=write, args=(p, [])) for p in range(writers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        insert_total = time.perf_counter() - start
        with ReplayClient(endpoint, timeout_s=120, retry_s=60) as client:
            assert client.stats()["windows"] == n
            client.sample(batch)  # warm-up
            sample_s = []
            for _ in range(batches):
                start = time.perf_counter()
                got = client.sample(batch)
                sample_s.append(time.perf_counter() - start)
            assert got.arrays["frames"].shape == (batch, VIEWS, size, size, 3)
    name = f"service-{'durable' if durable else 'memory'}" + (f" ({writers} writers)" if writers > 1 else "")
    return summary(name, size, [insert_total], n, sample_s, batch)


def bench_torchrl(windows, size, batches, batch, tmp: Path) -> dict | None:
    try:
        import torch
        from tensordict import TensorDict
        from torchrl.data import LazyMemmapStorage, ReplayBuffer as TorchRLBuffer
    except ImportError as err:
        print(f"torchrl not importable ({err}); skipping its rows", file=sys.stderr)
        return None
    k_max = max(len(w["matches"]) for w in windows)
    rb = TorchRLBuffer(storage=LazyMemmapStorage(len(windows), scratch_dir=str(tmp / f"torchrl-{size}")),
                       batch_size=batch)
    insert_s = []
    for w in windows:
        start = time.perf_counter()  # the conversion to a TensorDict is part of the insert
        matches = np.zeros((k_max, 7), np.float32)
        matches[: len(w["matches"])] = w["matches"]
        td = TensorDict({"frames": torch.from_numpy(w["frames"]), "intrinsics": torch.from_numpy(w["intrinsics"]),
                         "teacher_depth": torch.from_numpy(w["teacher_depth"]),
                         "teacher_valid": torch.from_numpy(w["teacher_valid"]),
                         "matches": torch.from_numpy(matches), "num_matches": torch.tensor(len(w["matches"]))},
                        batch_size=[])
        rb.add(td)
        insert_s.append(time.perf_counter() - start)
    rb.sample()  # warm-up
    sample_s = []
    for _ in range(batches):
        start = time.perf_counter()
        got = rb.sample()
        sample_s.append(time.perf_counter() - start)
    assert tuple(got["frames"].shape) == (batch, VIEWS, size, size, 3)
    return summary("torchrl-memmap", size, insert_s, len(windows), sample_s, batch)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[224, 518])
    ap.add_argument("--windows", type=int, default=0,
                    help="windows inserted per backend (default 48 at 224, 16 at 518)")
    ap.add_argument("--batches", type=int, default=0, help="timed sample calls (default 40 at 224, 20 at 518)")
    ap.add_argument("--batch", type=int, default=4, help="windows per sample call")
    ap.add_argument("--writers", type=int, default=1, help="concurrent inserting clients for the service rows")
    ap.add_argument("--dir", type=Path, default=None, help="scratch folder (default: a temporary one)")
    args = ap.parse_args()
    try:
        import torch
        torch.set_num_threads(1)
    except ImportError:
        pass
    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmpdir:
        tmp = Path(tmpdir)
        for size in args.sizes:
            n = args.windows or (48 if size <= 256 else 16)
            batches = args.batches or (40 if size <= 256 else 20)
            windows = make_windows(n, size)
            mb = as_insert(windows[0], "x").nbytes() / 1e6
            print(f"{size} px: {n} windows of {mb:.1f} MB, {batches} samples of {args.batch}", file=sys.stderr)
            ref = bench_torchrl(windows, size, batches, args.batch, tmp)
            ours = [bench_service(False, windows, size, batches, args.batch, tmp, args.writers),
                    bench_service(True, windows, size, batches, args.batch, tmp, args.writers),
                    bench_buffer(False, windows, size, batches, args.batch, tmp),
                    bench_buffer(True, windows, size, batches, args.batch, tmp)]
            for row in ours:
                if ref is not None:
                    row["ratio"] = (row["inserts_per_s"] / ref["inserts_per_s"],
                                    row["samples_per_s"] / ref["samples_per_s"], row["p50_ms"] / ref["p50_ms"])
                print(row, file=sys.stderr)
            rows += ours + ([ref] if ref is not None else [])
    print(f"\n{datetime.date.today()} {platform.node()} {os.cpu_count()} CPUs, python {platform.python_version()}, "
          f"batch {args.batch}, writers {args.writers}")
    print("| size | backend | inserts/s | samples/s (windows) | p50 ms | p99 ms | "
          "ratio vs TorchRL (ins / samp / p50) |")
    print("|---|---|---:|---:|---:|---:|---|")
    for r in rows:
        ratio = (" / ".join(f"{x:.2f}" for x in r["ratio"]) if "ratio" in r
                 else "1 (reference)" if r["backend"].startswith("torchrl") else "")
        print(f"| {r['size']} | {r['backend']} | {r['inserts_per_s']:.1f} | {r['samples_per_s']:.1f} | "
              f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
