"""A tiny trained snapshot for the offline-tool tests (eval, reconstruct, export): a few CPU
steps of the real objective on a random well-formed batch, saved as a real snapshot."""

from __future__ import annotations

from pathlib import Path

import torch

from learner.config import LearnerConfig, ModelConfig
from learner.snapshot import save_snapshot
from learner.train import Trainer, synthetic_batch

SHARED = Path(__file__).parents[1].parent / "shared"


def make_tiny_snapshot(folder: Path, *, steps: int = 2, height: int = 48, width: int = 64, views: int = 3,
                       seed: int = 0, scale_head: bool = False) -> Path:
    """Train ``steps`` steps and return the snapshot folder (its image size is height x width)."""
    torch.set_num_threads(1)
    cfg = LearnerConfig(model=ModelConfig(size="tiny", registers=2, scale_head=scale_head), lr=1e-3, warmup_steps=1,
                        ema_decay=0.0)
    trainer = Trainer(cfg, device="cpu", seed=seed)
    batch = synthetic_batch(1, views, height, width, k=32, seed=seed)
    for _ in range(steps):
        trainer.step(batch)
    return save_snapshot(trainer, Path(folder) / "snapshots", final=True)
