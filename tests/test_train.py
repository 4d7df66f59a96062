"""Trainer: overfits a fixed batch, skips NaN steps, batches from wire messages, DDP on gloo."""

import math
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from learner.config import LearnerConfig, ModelConfig
from learner.train import Trainer, batch_from_message, lr_at, synthetic_batch, teacher_space_of
from reliev3r import protocol

torch.set_num_threads(1)
ROOT = Path(__file__).parents[1]


def toy_loss(pred, batch, cfg, *, teacher_space="depth"):
    """A small stand-in objective touching every head (so DDP sees every parameter used)."""
    depth = (pred.depth.log() - batch["teacher_depth"].log()).abs().mean()
    conf = ((pred.confidence - 1.5) ** 2).mean()
    v = pred.cam_to_world.shape[1]
    target = torch.linspace(0, 0.3, v, device=pred.depth.device)
    pose = ((pred.cam_to_world[..., 0, 3] - target) ** 2).mean()
    loss = depth + conf + pose
    return loss, {"depth": float(depth.detach()), "conf": float(conf.detach()), "pose": float(pose.detach())}


def nan_loss(pred, batch, cfg, *, teacher_space="depth"):
    loss, terms = toy_loss(pred, batch, cfg)
    return loss * float("nan"), terms


def _cfg(**kw) -> LearnerConfig:
    base = dict(model=ModelConfig(size="tiny", registers=2), lr=2e-3, warmup_steps=2, ema_decay=0.9,
                snapshot_every=1)
    base.update(kw)
    return LearnerConfig(**base)


def test_lr_schedule_warmup_then_cosine():
    cfg = _cfg(lr=1.0, warmup_steps=4, schedule="cosine", max_steps=14)
    assert [lr_at(cfg, s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(cfg, 4) == pytest.approx(1.0)
    assert lr_at(cfg, 9) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_at(cfg, 14) == pytest.approx(0.1)
    assert lr_at(_cfg(lr=1.0, warmup_steps=0), 10_000) == 1.0


def test_step_overfits_a_fixed_batch():
    trainer = Trainer(_cfg(), device="cpu", loss_fn=toy_loss)
    batch = synthetic_batch(2, 3, 16, 24)
    losses = [trainer.step(batch)["loss"] for _ in range(12)]
    assert losses[-1] < 0.5 * losses[0], losses
    assert trainer.global_step == 12 and trainer.skipped_steps == 0
    # The EMA copy moved away from the init but lags the live weights.
    p = next(trainer.model.parameters())
    e = next(trainer.ema.parameters())
    assert not torch.equal(p, e)


def test_weight_decay_only_on_matrices():
    trainer = Trainer(_cfg(), device="cpu", loss_fn=toy_loss)
    decayed = {id(p) for g in trainer.optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    for name, p in trainer.model.named_parameters():
        expect = p.ndim >= 2 and not name.endswith(("_token", "_tokens"))
        assert (id(p) in decayed) == expect, name


def test_nan_loss_skips_the_step_and_counts_it():
    trainer = Trainer(_cfg(), device="cpu", loss_fn=nan_loss)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    out = trainer.step(synthetic_batch(1, 2, 16, 16))
    assert out["skipped"] == 1.0 and not math.isfinite(out["loss"])
    assert trainer.skipped_steps == 1 and trainer.global_step == 0
    for a, b in zip(before, trainer.model.parameters()):
        assert torch.equal(a, b)
    assert all(p.grad is None for p in trainer.model.parameters())
    trainer.loss_fn = toy_loss  # training carries on after a bad batch
    assert trainer.step(synthetic_batch(1, 2, 16, 16))["skipped"] == 0.0
    assert trainer.global_step == 1


def test_batch_from_message_converts_and_copies():
    rng = np.random.default_rng(0)
    b, v, h, w = 2, 3, 8, 12
    arrays = {"frames": rng.integers(0, 256, (b, v, h, w, 3), dtype=np.uint8),
              "intrinsics": np.tile(np.eye(3, dtype=np.float32), (b, v, 1, 1)),
              "matches": np.array([[1, 0, 2, 1.0, 2.0, 3.0, 4.0, 0.5]], np.float32),
              "teacher_depth": rng.random((b, v, h, w)).astype(np.float32),
              "teacher_valid": np.ones((b, v, h, w), np.uint8)}
    meta = {"window_ids": ["a", "b"], "teacher": {"depth": {"name": "x", "space": "disparity"}}}
    frames = [bytes(f) for f in protocol.encode(protocol.Message("batch", meta, arrays))]
    msg = protocol.decode(frames)  # read-only views on the received buffers
    batch = batch_from_message(msg, "cpu")
    assert batch["images"].shape == (b, v, 3, h, w) and batch["images"].dtype == torch.float32
    assert torch.allclose(batch["images"][1, 2, :, 4, 5] * 255, torch.from_numpy(arrays["frames"][1, 2, 4, 5]).float())
    assert batch["teacher_valid"].dtype == torch.bool
    assert torch.equal(batch["matches"], torch.from_numpy(arrays["matches"]))
    batch["intrinsics"] += 1  # writable: a copy, not the zmq buffer
    assert teacher_space_of(msg) == "disparity"
    assert teacher_space_of(protocol.Message("batch", {"window_ids": []})) is None


DDP_WORKER = textwrap.dedent("""
    import os, sys, torch
    sys.path.insert(0, os.environ["REPO"])
    sys.path.insert(0, os.path.join(os.environ["REPO"], "tests"))
    torch.set_num_threads(1)
    from test_train import _cfg, toy_loss
    from learner.train import Trainer, synthetic_batch
    from safetensors.torch import save_file
    trainer = Trainer(_cfg(), device="cpu", loss_fn=toy_loss)
    rank = trainer.rank
    for step in range(3):
        out = trainer.step(synthetic_batch(1, 2, 16, 16, seed=100 * rank + step))  # own batches per rank
        assert out["skipped"] == 0.0
    save_file({k: v.contiguous() for k, v in trainer.model.state_dict().items()},
              os.path.join(os.environ["OUTDIR"], f"rank{rank}.safetensors"))
    torch.distributed.destroy_process_group()
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(120)
def test_ddp_two_gloo_ranks_keep_identical_parameters(tmp_path):
    from safetensors.torch import load_file

    port = _free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "REPO": str(ROOT), "OUTDIR": str(tmp_path), "RANK": str(rank), "LOCAL_RANK": str(rank),
               "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-c", DDP_WORKER], env=env, cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    for proc in procs:
        out, _ = proc.communicate(timeout=110)
        assert proc.returncode == 0, out.decode()[-3000:]
    a, b = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    init = Trainer(_cfg(), device="cpu", loss_fn=toy_loss).model.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert any(not torch.equal(a[k], init[k]) for k in a)  # they did train
