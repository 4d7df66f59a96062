"""Learner throughput fed by the real replay service vs the same learner on in-memory batches.

    python -m benchmarks.learner_feed --steps 30 --size tiny --device cpu

Starts ``reliev3r replay`` as a subprocess (real ZeroMQ on 127.0.0.1), inserts the windows of
a small labelled dataset (:mod:`studies.dataset`), then times the same :class:`Trainer` for
``--steps`` steps (after warm-up) twice: on batches already in memory
(``LabelledDataset.batch``), and on batches sampled from replay through
``ReplayClient.prefetch`` (a background thread keeps the next batch ready) and
``batch_from_message``. Prints steps/s of both and their ratio (target: >= 0.95).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]

from learner.config import LearnerConfig, ModelConfig
from learner.train import Trainer, batch_from_message
from reliev3r import protocol
from reliev3r.config import free_port
from replay.client import ReplayClient
from studies.dataset import ensure_dataset, parse_spec


def timed(trainer: Trainer, batches, steps: int, warmup: int = 3) -> float:
    it = iter(batches)
    for _ in range(warmup):
        trainer.step(next(it))
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        trainer.step(next(it))
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
    return steps / (time.perf_counter() - start)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="synthetic:scenes=2,frames=24")
    p.add_argument("--cache", default=".devdata/datasets")
    p.add_argument("--size", default="tiny")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ds = ensure_dataset(replace(parse_spec(args.dataset), views=4, stride=4), args.cache, workers=2)
    cfg = LearnerConfig(model=ModelConfig(size=args.size), batch_size=args.batch, warmup_steps=0, ema_decay=0.999)

    port = free_port()
    run_dir = Path(tempfile.mkdtemp(prefix="feed-"))
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    replay = subprocess.Popen([sys.executable, "-m", "reliev3r.cli", "replay", f"run.dir={run_dir}",
                               f"network.replay_port={port}", "monitoring.enabled=false", "replay.min_size=1",
                               "replay.samples_per_insert=0", "run.log_level=WARNING"],
                              cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = ReplayClient(f"tcp://127.0.0.1:{port}", timeout_s=30, retry_s=0.5)
        a = ds.arrays
        for n in range(len(ds)):
            client.insert(protocol.Message("insert", {
                "window_id": f"w{n}", "source": "bench", "frame_indices": list(range(4)),
                "teacher": {"depth": ds.meta["teacher"], "matches": ds.meta["matcher"]}},
                {"frames": a["images"][n], "intrinsics": a["intrinsics"][n], "matches": ds.matches_of(n),
                 "teacher_depth": a["teacher_depth"][n], "teacher_valid": a["teacher_valid"][n].astype(np.uint8)}))
        trainer = Trainer(cfg, device=args.device)
        rng = np.random.default_rng(0)
        memory = [ds.batch(rng.choice(len(ds), args.batch), trainer.device) for _ in range(8)]
        mem_rate = timed(trainer, (memory[k % 8] for k in range(10 ** 9)), args.steps)
        prefetch = client.prefetch(args.batch, depth=2)
        replay_rate = timed(trainer, (batch_from_message(m, trainer.device) for m in prefetch), args.steps)
        prefetch.close()
        client.close()
    finally:
        replay.send_signal(signal.SIGTERM)
        replay.wait(20)
    dev = torch.cuda.get_device_name() if trainer.device.type == "cuda" else f"cpu ({args.threads} thread)"
    print(f"device: {dev}; model {args.size}, B={args.batch}, V=4, {a['images'].shape[2]}x{a['images'].shape[3]}")
    print("| feed | steps/s |\n|---|---|")
    print(f"| in-memory batches | {mem_rate:.2f} |\n| replay service + prefetch | {replay_rate:.2f} |")
    print(f"ratio replay / in-memory: {replay_rate / mem_rate:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
