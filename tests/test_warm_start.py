"""Warm start (``learner.init``): a learner without a snapshot of its own starts from another
run's weights (EMA preferred), a different architecture stops it naming both, and a run that
resumes its own snapshot ignores it."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file

from learner.config import LearnerConfig, ModelConfig
from learner.snapshot import save_snapshot, verify_snapshot
from learner.train import Trainer, synthetic_batch
from learner.warm_start import InitError, check_init, init_trainer, start_problem
from tests.helpers_train import FakeReplay, learner_pipeline, toy_loss

torch.set_num_threads(1)


def _source(folder, *, size="tiny", patch_size=8, ema_decay=0.5, steps=2, seed=3, scale_head=False):
    """A real snapshot whose model and EMA weights differ from each other and from any init."""
    model = ModelConfig(size=size, patch_size=patch_size, registers=2, scale_head=scale_head)
    cfg = LearnerConfig(model=model, lr=1e-3, warmup_steps=1, ema_decay=ema_decay)
    trainer = Trainer(cfg, device="cpu", seed=seed, loss_fn=toy_loss)
    batch = synthetic_batch(1, 2, 16, 16, k=16, seed=seed)
    for _ in range(steps):
        trainer.step(batch)
    return save_snapshot(trainer, folder / "snapshots", final=True)


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


def _fresh(**kw) -> Trainer:
    cfg = LearnerConfig(model=ModelConfig(size="tiny", registers=2, **kw), ema_decay=0.9)
    return Trainer(cfg, device="cpu", seed=0, loss_fn=toy_loss)


def test_init_reproduces_the_source_weights_at_step_zero(tmp_path):
    snap = _source(tmp_path / "src")
    ema = load_file(str(snap / "ema.safetensors"))
    model = load_file(str(snap / "model.safetensors"))
    assert not _equal(ema, model)
    for given in (snap, tmp_path / "src", tmp_path / "src" / "snapshots"):  # snapshot, run, snapshots folder
        trainer = _fresh()
        assert not _equal(trainer.model.state_dict(), ema)
        record = init_trainer(trainer, given)
        assert trainer.global_step == 0 and not trainer.optimizer.state  # only the weights
        assert _equal(trainer.model.state_dict(), ema) and _equal(trainer.ema.state_dict(), ema)  # EMA preferred
        assert record["weights"] == "ema" and record["path"] == str(snap / "ema.safetensors")
        assert record["sha256"] == verify_snapshot(snap)["files"]["ema.safetensors"]["sha256"]
        assert record["step"] == 2 and record["requested"] == str(given)
    trainer = _fresh()  # a weights file names its copy itself
    assert init_trainer(trainer, snap / "model.safetensors")["weights"] == "model"
    assert _equal(trainer.model.state_dict(), model)
    # a source without EMA: its model weights
    plain = _source(tmp_path / "plain", ema_decay=0.0)
    trainer = _fresh()
    assert init_trainer(trainer, plain)["weights"] == "model"
    assert _equal(trainer.model.state_dict(), load_file(str(plain / "model.safetensors")))


def test_another_architecture_fails_naming_both(tmp_path):
    snap = _source(tmp_path / "src")
    with pytest.raises(InitError, match=r"size=tiny.*size=small"):
        check_init(ModelConfig(size="small", registers=2), snap)
    with pytest.raises(InitError, match=r"patch_size=8.*patch_size=4"):
        check_init(ModelConfig(size="tiny", patch_size=4, registers=2), snap)
    # a bare weights file (no snapshot around it) is checked by its tensors' shapes
    bare = tmp_path / "bare.safetensors"
    bare.write_bytes((snap / "model.safetensors").read_bytes())
    with pytest.raises(InitError, match=r"weights file of \d+ tensors.*size=tiny, patch_size=4.*other shapes"):
        check_init(ModelConfig(size="tiny", patch_size=4, registers=2), bare)
    assert check_init(ModelConfig(size="tiny", registers=2), bare).step is None
    # fields that do not change the weights' layout may differ
    assert check_init(ModelConfig(size="tiny", registers=2, max_log_depth=8.0), snap).step == 2
    for missing in (tmp_path / "nowhere", tmp_path / "src" / "meta.json"):
        with pytest.raises(InitError):
            check_init(ModelConfig(size="tiny", registers=2), missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InitError, match="no valid snapshot"):
        check_init(ModelConfig(size="tiny", registers=2), tmp_path / "empty")


def test_a_source_without_the_scale_head_starts_a_model_with_a_fresh_one(tmp_path):
    snap = _source(tmp_path / "src", scale_head=False)
    ema = load_file(str(snap / "ema.safetensors"))
    trainer = _fresh(scale_head=True)
    head = {k: v.clone() for k, v in trainer.model.state_dict().items() if k.startswith("scale_head.")}
    assert head and not any(k.startswith("scale_head.") for k in ema)
    init_trainer(trainer, snap)
    for weights in (trainer.model.state_dict(), trainer.ema.state_dict()):
        assert _equal({k: v for k, v in weights.items() if k in ema}, ema)
        assert _equal({k: v for k, v in weights.items() if k in head}, head)
    # the other way round a tensor would be dropped: refused, naming the option
    with_head = _source(tmp_path / "head", scale_head=True)
    with pytest.raises(InitError, match="scale_head"):
        check_init(ModelConfig(size="tiny", registers=2, scale_head=False), with_head)


@pytest.mark.timeout(600)  # bounds a hang only
def test_learner_process_starts_from_init_and_resume_wins(tmp_path, caplog):
    import zmq

    from learner import service
    from learner.snapshot import list_snapshots
    from reliev3r.config import free_port
    from reliev3r.service import Runtime

    source = _source(tmp_path / "src")
    wrong = _source(tmp_path / "wrong", patch_size=4)
    run = tmp_path / "run"
    port = free_port()
    ctx = zmq.Context()
    replay = FakeReplay(ctx, port)
    caplog.set_level(logging.INFO, logger="reliev3r")
    try:
        cfg = learner_pipeline(run, port, max_steps=2, snapshot_every=100, init=str(source))
        with Runtime("learner", cfg, install_signals=False, serve_metrics=False) as runtime:
            assert service.run(cfg, runtime, loss_fn=toy_loss) == 0
        assert "warm start from learner.init" in caplog.text
        meta = verify_snapshot(list_snapshots(run / "snapshots")[-1][1])
        assert meta["step"] == 2
        assert meta["init"]["path"] == str(source / "ema.safetensors")
        assert meta["init"]["sha256"] == verify_snapshot(source)["files"]["ema.safetensors"]["sha256"]
        assert meta["config"]["init"] == str(source)

        # A restart in the same run folder resumes its own snapshot: init is ignored (even one that
        # could not load), said in the log, and the record of where the weights started is kept.
        caplog.clear()
        cfg = learner_pipeline(run, port, max_steps=3, snapshot_every=100, init=str(wrong))
        with Runtime("learner", cfg, install_signals=False, serve_metrics=False) as runtime:
            assert service.run(cfg, runtime, loss_fn=toy_loss) == 0
        assert "learner.init ignored" in caplog.text and "warm start" not in caplog.text
        meta = verify_snapshot(list_snapshots(run / "snapshots")[-1][1])
        assert meta["step"] == 3 and meta["init"]["path"] == str(source / "ema.safetensors")

        # A fresh run folder with the wrong architecture stops at start, naming both (``up``
        # asks start_problem before it starts any process).
        assert start_problem(cfg.learner, run) is None  # resumes: init not even looked at
        cfg = learner_pipeline(tmp_path / "run2", port, max_steps=1, init=str(wrong))
        assert "patch_size=4" in start_problem(cfg.learner, tmp_path / "run2")
        with Runtime("learner", cfg, install_signals=False, serve_metrics=False) as runtime:
            with pytest.raises(InitError, match=r"patch_size=4.*patch_size=8"):
                service.run(cfg, runtime, loss_fn=toy_loss)
        assert not (tmp_path / "run2" / "snapshots").exists()
    finally:
        replay.close()
        ctx.destroy(linger=0)
    json.dumps(meta["init"])  # plain data
