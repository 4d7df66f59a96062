"""Trainer: overfits a fixed batch, skips NaN steps, batches from wire messages, DDP on gloo."""

import errno
import logging
import math
import os
import re
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from learner.train import (Trainer, batch_from_message, device_batch, host_batch, lr_at, param_groups, synthetic_batch,
                           teacher_space_of, teacher_spaces_of)
from reliev3r import protocol
from tests.helpers_train import FakeReplay, fake_replay_port, learner_cfg, learner_pipeline, toy_loss

torch.set_num_threads(1)
ROOT = Path(__file__).parents[1]


def nan_loss(pred, batch, cfg, *, teacher_space="depth"):
    loss, terms = toy_loss(pred, batch, cfg)
    return loss * float("nan"), terms


def test_lr_schedule_warmup_then_cosine():
    cfg = learner_cfg(lr=1.0, warmup_steps=4, schedule="cosine", max_steps=14)
    assert [lr_at(cfg, s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(cfg, 4) == pytest.approx(1.0)
    assert lr_at(cfg, 9) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_at(cfg, 14) == pytest.approx(0.1)
    assert lr_at(learner_cfg(lr=1.0, warmup_steps=0), 10_000) == 1.0


def test_step_overfits_a_fixed_batch():
    trainer = Trainer(learner_cfg(), device="cpu", loss_fn=toy_loss)
    batch = synthetic_batch(2, 3, 16, 24)
    losses = [trainer.step(batch)["loss"] for _ in range(12)]
    assert losses[-1] < 0.5 * losses[0], losses
    assert trainer.global_step == 12 and trainer.skipped_steps == 0
    # The EMA copy moved away from the init but lags the live weights.
    p = next(trainer.model.parameters())
    e = next(trainer.ema.parameters())
    assert not torch.equal(p, e)


def test_window_losses_split_the_batch_loss():
    trainer = Trainer(learner_cfg(), device="cpu", loss_fn=toy_loss)
    batch = synthetic_batch(3, 2, 16, 16)
    batch["teacher_depth"][1] *= 5  # one window far off
    losses: list[float] = []
    out = trainer.step(batch, window_losses=losses)
    assert len(losses) == 3 and losses[1] > max(losses[0], losses[2])
    assert sum(losses) / 3 == pytest.approx(out["loss"], rel=1e-5)  # toy loss: equal-size means


def test_weight_decay_only_on_matrices():
    trainer = Trainer(learner_cfg(), device="cpu", loss_fn=toy_loss)
    decayed = {id(p) for g in trainer.optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    for name, p in trainer.model.named_parameters():
        expect = p.ndim >= 2 and not name.endswith(("_token", "_tokens"))
        assert (id(p) in decayed) == expect, name


def fused_adamw(trainer: Trainer) -> Trainer:
    """``trainer`` with the CUDA path's fused AdamW (a non-finite step skipped on the device)."""
    trainer.optimizer = torch.optim.AdamW(param_groups(trainer.model, 0.05), lr=trainer.cfg.lr, betas=(0.9, 0.95),
                                          fused=True)
    trainer.fused = True
    return trainer


@pytest.mark.parametrize("fused", [False, True])
def test_nan_loss_skips_the_step_and_counts_it(fused):
    trainer = Trainer(learner_cfg(), device="cpu", loss_fn=nan_loss)
    if fused:  # the CUDA path: fused AdamW skips the update on the device (found_inf)
        fused_adamw(trainer)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    ema_before = [p.detach().clone() for p in trainer.ema.parameters()]
    out = trainer.step(synthetic_batch(1, 2, 16, 16))
    assert out["skipped"] == 1.0 and not math.isfinite(out["loss"])
    assert trainer.skipped_steps == 1 and trainer.global_step == 0
    for a, b in zip(before, trainer.model.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(ema_before, trainer.ema.parameters()):
        assert torch.equal(a, b)
    assert all(p.grad is None for p in trainer.model.parameters())
    assert all(float(s["step"]) == 0 for s in trainer.optimizer.state.values())
    trainer.loss_fn = toy_loss  # training carries on after a bad batch
    assert trainer.step(synthetic_batch(1, 2, 16, 16))["skipped"] == 0.0
    assert trainer.global_step == 1
    assert all(float(s["step"]) == 1 for s in trainer.optimizer.state.values())


def test_fused_device_skip_steps_like_the_host_skip():
    # Same batches, one NaN step in the middle: the fused (device-side skip) path and the plain
    # path end with the same weights, EMA, counters and logged numbers.
    runs = []
    for fused in (False, True):
        trainer = Trainer(learner_cfg(), device="cpu", loss_fn=toy_loss)
        trainer.optimizer = torch.optim.AdamW(param_groups(trainer.model, 0.05), lr=2e-3, betas=(0.9, 0.95),
                                              fused=fused)
        trainer.fused = fused
        logs = []
        for step in range(4):
            trainer.loss_fn = nan_loss if step == 1 else toy_loss
            logs.append(trainer.step(synthetic_batch(1, 2, 16, 16, seed=step)))
        runs.append((trainer, logs))
    (plain, plain_logs), (fused, fused_logs) = runs
    assert [log["skipped"] for log in fused_logs] == [0.0, 1.0, 0.0, 0.0] == [log["skipped"] for log in plain_logs]
    assert fused.global_step == plain.global_step == 3 and fused.skipped_steps == plain.skipped_steps == 1
    assert fused_logs[0] == plain_logs[0]  # before any update, the logs are bit-identical
    for a, b in zip(fused.model.parameters(), plain.model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)  # fused and foreach kernels round differently
    for a, b in zip(fused.ema.parameters(), plain.ema.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_steps_settled_late_count_and_learn_as_steps_settled_at_once():
    # The learner's order (step N settled after N+1 is launched), one NaN step among four,
    # against step() on a twin: the same counters, logged numbers and weights. The LR is
    # constant: the step launched before the NaN step is settled runs one step ahead on the
    # schedule (and on the EMA's warm-up, so the EMA is not compared).
    batches = [synthetic_batch(1, 2, 16, 16, seed=s) for s in range(4)]
    loss_fns = [toy_loss, nan_loss, toy_loss, toy_loss]
    now, late = (fused_adamw(Trainer(learner_cfg(warmup_steps=0), device="cpu")) for _ in range(2))
    now_logs = []
    for batch, loss_fn in zip(batches, loss_fns):
        now.loss_fn = loss_fn
        now_logs.append(now.step(batch))
    late_logs, previous = [], None
    for batch, loss_fn in zip(batches, loss_fns):
        late.loss_fn = loss_fn
        pending = late.launch(batch)
        if previous is not None:
            late_logs.append(late.settle(previous))
        previous = pending
    assert late.global_step == 3 and late.unsettled == [previous]  # the NaN step taken back, the last counted unread
    late_logs.append(late.settle(previous))
    assert late.settle(previous) is late_logs[-1] and not late.unsettled
    assert (late.global_step, late.skipped_steps) == (now.global_step, now.skipped_steps) == (3, 1)
    assert [log["step"] for log in late_logs] == [log["step"] for log in now_logs] == [1.0, 1.0, 2.0, 3.0]
    assert [log["skipped"] for log in late_logs] == [0.0, 1.0, 0.0, 0.0]
    assert not math.isfinite(late_logs[1]["loss"])
    assert [late_logs[i] for i in (0, 2, 3)] == [now_logs[i] for i in (0, 2, 3)]
    for a, b in zip(late.model.parameters(), now.model.parameters()):
        assert torch.equal(a, b)


def test_a_snapshot_settles_the_steps_in_flight(tmp_path):
    from learner.snapshot import save_snapshot, snapshot_name

    trainer = fused_adamw(Trainer(learner_cfg(), device="cpu", loss_fn=toy_loss))
    trainer.launch(synthetic_batch(1, 2, 16, 16))
    ema = [p.detach().clone() for p in trainer.ema.parameters()]
    trainer.loss_fn = nan_loss
    trainer.launch(synthetic_batch(1, 2, 16, 16, seed=1))
    assert trainer.global_step == 2 and len(trainer.unsettled) == 2  # counted as taken until read
    for a, b in zip(ema, trainer.ema.parameters()):  # the NaN step's EMA update did nothing on the device
        assert torch.equal(a, b)
    path = save_snapshot(trainer, tmp_path / "snapshots")
    assert not trainer.unsettled and (trainer.global_step, trainer.skipped_steps) == (1, 1)
    assert path.name == snapshot_name(1)


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
    host = host_batch(msg, pin=False)  # what the learner's prefetch thread makes: one copy each
    assert {k: t.dtype for k, t in host.items()} == {k: torch.from_numpy(a).dtype for k, a in arrays.items()}
    assert all(np.array_equal(host[k].numpy(), a) for k, a in arrays.items())
    host["frames"][0] = 0
    assert msg.arrays["frames"][0].any()  # not a view of the receive buffer
    again = device_batch(host_batch(msg, pin=False), "cpu")
    assert set(again) == set(batch) and all(torch.equal(again[k], batch_from_message(msg, "cpu")[k]) for k in again)
    assert teacher_space_of(msg) == "disparity"
    assert teacher_space_of(protocol.Message("batch", {"window_ids": []})) is None


def _batch_message(spaces, *, teacher=True):
    """A wire ``batch`` of one window per entry of ``spaces``, each with its teacher's meta as
    the replay sends it (``teachers``, and the first window's as ``teacher``)."""
    rng = np.random.default_rng(1)
    b, v, h, w = len(spaces), 2, 8, 8
    arrays = {"frames": rng.integers(0, 256, (b, v, h, w, 3), dtype=np.uint8),
              "intrinsics": np.tile(np.eye(3, dtype=np.float32), (b, v, 1, 1)),
              "matches": np.array([[0, 0, 1, 1.0, 2.0, 3.0, 4.0, 0.5]], np.float32)}
    if teacher:
        arrays["teacher_depth"] = rng.random((b, v, h, w)).astype(np.float32)
        arrays["teacher_valid"] = np.ones((b, v, h, w), np.uint8)
    teachers = [{"depth": {"name": f"t{n}", "version": "1", **({} if s is None else {"space": s})}}
                for n, s in enumerate(spaces)]
    meta = {"window_ids": [f"w{n}" for n in range(b)], "teacher": teachers[0], "teachers": teachers}
    return protocol.decode([bytes(f) for f in protocol.encode(protocol.Message("batch", meta, arrays))])


def test_a_batch_of_both_teacher_spaces_names_each_windows_space():
    """The replay stacks windows of whatever teachers labelled them (a durable run resumed with
    another ``labeler.teacher``): a batch whose windows differ in space carries each window's as
    ``teacher_disparity`` (true: disparity; a window naming no space is depth), and no single
    space; a batch of one space carries that space alone, as before."""
    mixed = _batch_message(["depth", "disparity", None])
    assert teacher_spaces_of(mixed) == ["depth", "disparity", None]
    assert teacher_space_of(mixed) is None
    batch = batch_from_message(mixed, "cpu")
    assert torch.equal(batch["teacher_disparity"], torch.tensor([False, True, False]))
    for spaces, one in ((["disparity", "disparity"], "disparity"), (["depth", None], None), ([None], None)):
        msg = _batch_message(spaces)
        assert teacher_space_of(msg) == one and "teacher_disparity" not in batch_from_message(msg, "cpu")
    assert "teacher_disparity" not in batch_from_message(_batch_message(["depth", "disparity"], teacher=False), "cpu")
    # a replay that sends no per-window list: the batch's teacher names every window's space
    old = _batch_message(["disparity", "depth"])
    del old.meta["teachers"]
    assert teacher_spaces_of(old) == ["disparity", "disparity"] and teacher_space_of(old) == "disparity"


@pytest.mark.timeout(600)  # bounds a hang only
def test_a_supervised_learner_skips_a_batch_without_ground_truth_and_trains_on(tmp_path, caplog):
    """A replay store filled before the streamer skipped windows without ground truth (or under
    another config) serves the supervised learner a batch without ``gt_depth`` and
    ``gt_cam_to_world``: the batch is dropped before the step, counted under
    ``no_ground_truth`` and said once, and training goes on with the next batch. Before, the
    objective raised KeyError and the learner ended (restarted by ``up``, it met one again)."""
    import zmq

    from learner import service
    from reliev3r.config import free_port
    from reliev3r.service import Runtime

    port = free_port()
    ctx = zmq.Context()
    replay = FakeReplay(ctx, port, ground_truth_from=4)  # requests 2 and 3: batches without it
    try:
        cfg = learner_pipeline(tmp_path, port, max_steps=2, snapshot_every=100)
        cfg.learner.loss.kind = "supervised"
        with Runtime("learner", cfg, install_signals=False, serve_metrics=False) as runtime:
            assert service.run(cfg, runtime) == 0  # the real objective
            assert runtime.status["step"] == 2
            text = _metrics_text(runtime)
        assert 'reliev3r_messages_rejected_total{reason="no_ground_truth",stage="learner"} 2.0' in text
        assert "reliev3r_learner_samples_total 4.0" in text and "reliev3r_learner_skipped_steps_total 0.0" in text
        assert 'reliev3r_learner_loss{term="supervised"}' in text
        said = [r for r in caplog.records if getattr(r, "reason", None) == "no_ground_truth"]
        assert len(said) == 1 and said[0].levelname == "WARNING"
    finally:
        replay.close()
        ctx.destroy(linger=0)


def test_a_batch_with_a_window_of_an_unknown_space_is_unusable():
    """Any window of the batch, not only the first: its labels cannot be read (dropped, counted)."""
    from learner.service import _unusable

    assert _unusable(_batch_message(["depth", "disparity", None]), patch_size=8) is None
    assert _unusable(_batch_message(["depth", "metric"]), patch_size=8) == "unknown_teacher_space"
    assert _unusable(_batch_message(["metric", "depth"]), patch_size=8) == "unknown_teacher_space"


def test_window_losses_of_a_mixed_batch_read_each_window_in_its_own_space():
    """With the real objective, each window's loss (the prioritized sampler's) is that window's
    alone, in its own teacher's space."""
    from learner.objective import compute_loss

    cfg = learner_cfg()
    trainer = Trainer(cfg, device="cpu")
    batch = synthetic_batch(2, 3, 16, 24, k=96, seed=4, triangulation=True)
    batch["teacher_depth"][1] = 1.0 / batch["teacher_depth"][1]
    batch["teacher_disparity"] = torch.tensor([False, True])
    with torch.no_grad():
        pred = trainer.model(batch["images"])  # the weights the step evaluates (no dropout)
    expected = []
    for b, space in enumerate(("depth", "disparity")):
        rows = batch["matches"][:, 0] == b
        one = {k: (t[rows] if k in ("matches", "match_triangulation") else t[b:b + 1]) for k, t in batch.items()
               if k != "teacher_disparity"}
        one["matches"] = one["matches"].clone()
        one["matches"][:, 0] = 0
        view = type(pred)(depth=pred.depth[b:b + 1], confidence=pred.confidence[b:b + 1],
                          cam_to_world=pred.cam_to_world[b:b + 1])
        expected.append(float(compute_loss(view, one, cfg.loss, teacher_space=space)[0]))
    losses: list[float] = []
    trainer.step(batch, window_losses=losses)
    assert losses == pytest.approx(expected, rel=1e-5)


DDP_WORKER = textwrap.dedent("""
    import os, sys, torch
    sys.path.insert(0, os.environ["REPO"])
    torch.set_num_threads(1)
    from tests.helpers_train import learner_cfg, toy_loss
    from learner.train import Trainer, synthetic_batch
    from safetensors.torch import save_file
    trainer = Trainer(learner_cfg(), device="cpu", loss_fn=toy_loss)
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


@pytest.mark.timeout(600)  # bounds a hang only
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
        out, _ = proc.communicate(timeout=300)  # bounds a hang only
        assert proc.returncode == 0, out.decode()[-3000:]
    a, b = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    init = Trainer(learner_cfg(), device="cpu", loss_fn=toy_loss).model.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert any(not torch.equal(a[k], init[k]) for k in a)  # they did train



@pytest.mark.parametrize("value", ["two", "0", "-1", "1.5"])
def test_a_world_size_that_is_no_count_of_ranks_is_refused_naming_the_variable(monkeypatch, value):
    """torchrun's ``WORLD_SIZE`` (how many learner ranks) has one reader, as ``LOCAL_RANK`` has:
    a value that is no count of ranks is refused, the message naming the variable and the value.
    Before, ``two`` stopped with int()'s bare ``invalid literal``, and ``0`` or ``-1`` trained as a
    single rank, as if the variable were unset. Unset, or ``1``, is one rank."""
    monkeypatch.setenv("WORLD_SIZE", value)
    with pytest.raises(ValueError, match=rf"^WORLD_SIZE must be a count of ranks \(an integer >= 1, as torchrun "
                                         rf"sets it\), got '{re.escape(value)}'$"):
        Trainer(learner_cfg(), device="cpu", loss_fn=toy_loss)
    for one in ("1", None):
        if one is None:
            monkeypatch.delenv("WORLD_SIZE")
        else:
            monkeypatch.setenv("WORLD_SIZE", one)
        trainer = Trainer(learner_cfg(), device="cpu", loss_fn=toy_loss)
        assert (trainer.rank, trainer.world_size) == (0, 1)


# ---------------------------------------------------------------------- the learner process

def test_the_step_rate_averages_intervals_so_steps_read_in_pairs_give_their_rate():
    from learner.service import StepRate

    rate = StepRate(0.0)
    assert rate.per_second == 0.0
    for k in range(1, 101):  # two steps every 0.5 s, read one right after the other
        rate.tick(0.5 * k)
        rate.tick(0.5 * k + 1e-6)
    # the average interval swings between 0.05 / 0.19 and 0.9 of that (0.263 / 0.237 s) with the
    # pairs; an average of 1 / interval would be about 1e5
    assert 1 / 0.2632 < rate.per_second < 1 / 0.2368
    steady = StepRate(0.0)
    for k in range(1, 101):
        steady.tick(0.25 * k)
    assert steady.per_second == pytest.approx(4.0)


class FusedTrainer(Trainer):
    """The CUDA path's update on the CPU: fused AdamW, which skips a non-finite step itself, so
    that :meth:`Trainer.launch` leaves each step unread until it is settled."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        fused_adamw(self)


@pytest.mark.timeout(600)  # bounds a hang only
@pytest.mark.parametrize("update", ["plain", "fused"])
def test_learner_process_trains_snapshots_and_resumes(tmp_path, monkeypatch, update):
    import zmq

    from learner import service
    from learner.snapshot import list_snapshots, verify_snapshot
    from reliev3r.config import free_port
    from reliev3r.service import Runtime

    if update == "fused":  # each step settled after the next is launched, as on a GPU
        monkeypatch.setattr(service, "Trainer", FusedTrainer)
    port = free_port()
    ctx = zmq.Context()
    replay = FakeReplay(ctx, port, odd_first=True)
    try:
        cfg = learner_pipeline(tmp_path, port, max_steps=3, snapshot_every=2)
        with Runtime("learner", cfg, install_signals=False, serve_metrics=False) as runtime:
            assert service.run(cfg, runtime, loss_fn=toy_loss) == 0
            assert runtime.status["step"] == 3 and runtime.status["depth_loss_on"] is True
            text = _metrics_text(runtime)
        # The first batch (20x16 pixels, not a multiple of the patch) was counted and dropped.
        assert 'reason="image_size_not_multiple_of_patch"' in text
        assert "reliev3r_learner_step 3.0" in text
        assert "reliev3r_snapshot_step 3.0" in text
        assert 'reliev3r_learner_loss{term="depth"}' in text
        assert "reliev3r_learner_samples_total 6.0" in text
        # The first sample was answered not_ready: the loop waited for data and counted it.
        wait = [ln for ln in text.splitlines() if ln.startswith("reliev3r_learner_data_wait_seconds_total ")]
        assert wait and float(wait[0].split()[1]) > 0
        snaps = list_snapshots(tmp_path / "snapshots")
        assert [s for s, _ in snaps] == [2, 3]
        meta = verify_snapshot(snaps[-1][1])
        assert meta["final"] is True and meta["teachers"]["depth"]["name"] == "toy"
        assert all(r["batch_size"] == 2 and r["rank"] == 0 for r in replay.requests)

        assert replay.priorities == []  # uniform sampler: no loss reports

        # A restart with a higher max_steps resumes at step 3 and ends at 5; with the
        # prioritized sampler it reports each window's loss.
        cfg = learner_pipeline(tmp_path, port, sampler="prioritized", max_steps=5, snapshot_every=100)
        with Runtime("learner", cfg, install_signals=False, serve_metrics=False) as runtime:
            assert service.run(cfg, runtime, loss_fn=toy_loss) == 0
            assert runtime.status["step"] == 5
        assert [s for s, _ in list_snapshots(tmp_path / "snapshots")] == [2, 3, 5]
        deadline = time.monotonic() + 120  # bounds a hang only: the loop ends once both reports are in
        while len(replay.priorities) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(replay.priorities) == 2
        for report in replay.priorities:
            assert report["window_ids"] == ["w0", "w1"] and all(math.isfinite(x) for x in report["losses"])
    finally:
        replay.close()
        ctx.destroy(linger=0)


@pytest.mark.timeout(600)  # bounds a hang only
@pytest.mark.parametrize("odd", ["space", "name"])
def test_learner_process_survives_a_batch_with_odd_teacher_meta(tmp_path, odd):
    """With the real objective: a batch whose teacher names a space the depth loss does not know
    (from a replay that stored it before its insert check refused such windows) is counted and
    dropped; a teacher name that arrived as bytes is written into the snapshot as text."""
    import zmq

    from learner import service
    from learner.snapshot import list_snapshots, verify_snapshot
    from reliev3r.config import free_port
    from reliev3r.service import Runtime

    teacher = ({"depth": {"name": "toy", "version": "1", "space": "metric"}} if odd == "space"
               else {"depth": {"name": b"bytes", "version": "1", "space": "depth"}})
    port = free_port()
    ctx = zmq.Context()
    replay = FakeReplay(ctx, port, first_teacher=teacher)
    try:
        cfg = learner_pipeline(tmp_path, port, max_steps=2, snapshot_every=1)
        with Runtime("learner", cfg, install_signals=False, serve_metrics=False) as runtime:
            assert service.run(cfg, runtime) == 0
            assert runtime.status["step"] == 2
            text = _metrics_text(runtime)
        snaps = list_snapshots(tmp_path / "snapshots")
        assert [s for s, _ in snaps] == [1, 2]
        first = verify_snapshot(snaps[0][1])["teachers"]["depth"]["name"]
        if odd == "space":
            assert 'reason="unknown_teacher_space"' in text and first == "toy"
        else:
            assert "unknown_teacher_space" not in text and first == "bytes"
    finally:
        replay.close()
        ctx.destroy(linger=0)


@pytest.mark.timeout(600)  # bounds a hang only
@pytest.mark.parametrize("reason", ["batch_too_large", "bad_sample_request", "malformed"])
def test_learner_process_stops_when_the_replay_refuses_its_requests(tmp_path, reason):
    """A replay that answers batch_too_large (a batch over what a reply carries, or over what
    its rate limiter can grant), bad_sample_request or malformed (a request it cannot read, as
    from another version) will answer so to every request: the learner ends with that error
    (the process exits 1, its log says why) instead of asking again for ever."""
    import zmq

    from learner import service
    from reliev3r.config import free_port
    from reliev3r.service import Runtime
    from replay.client import ReplayError

    port = free_port()
    ctx = zmq.Context()
    replay = FakeReplay(ctx, port, refuse=reason)
    done = threading.Event()
    try:
        cfg = learner_pipeline(tmp_path, port, max_steps=3, snapshot_every=100)
        with Runtime("learner", cfg, install_signals=False, serve_metrics=False) as runtime:
            def stop_a_learner_that_asks_again():  # its first sample is answered not_ready, the next refused
                while len(replay.requests) < 4 and not done.wait(0.05):
                    pass
                if not done.is_set():
                    runtime.stop()

            threading.Thread(target=stop_a_learner_that_asks_again, daemon=True).start()
            with pytest.raises(ReplayError, match=reason):
                service.run(cfg, runtime, loss_fn=toy_loss)
            done.set()
            assert len(replay.requests) == 2
    finally:
        done.set()
        replay.close()
        ctx.destroy(linger=0)


class BusyGPUTrainer(FusedTrainer):
    """:class:`FusedTrainer` on a GPU that is still running each step whenever the learner asks
    (:meth:`PendingStep.done` is never true; reading the step does not wait: its numbers are on
    the CPU): a batch always comes while a step is in flight, however fast or slow the host."""

    def launch(self, *args, **kwargs):
        pending = super().launch(*args, **kwargs)
        pending.done = lambda: False
        return pending


@pytest.mark.timeout(600)  # bounds a hang only
def test_a_batch_that_comes_while_the_gpu_runs_a_step_is_launched_behind_it(tmp_path, monkeypatch):
    """With no batch ready after a launch, the learner waits for one while the GPU is busy and
    launches it behind the step in flight: only a wait with the GPU done counts as waiting for
    data. The replay here answers each sample after 0.3 s, so that no batch is ready just after
    a step is launched (a learner that read the step in flight then, as before, counted a wait
    each step), and the GPU is busy with every step in flight: the only wait that may count is
    the first sample's, before any step was in flight (none where the host took 0.3 s to get
    there)."""
    import zmq

    from learner import service
    from reliev3r.config import free_port
    from reliev3r.service import Runtime

    monkeypatch.setattr(service, "Trainer", BusyGPUTrainer)
    port = free_port()
    ctx = zmq.Context()
    replay = FakeReplay(ctx, port, delay_s=0.3)
    try:
        cfg = learner_pipeline(tmp_path, port, max_steps=3, snapshot_every=100)
        with Runtime("learner", cfg, install_signals=False, serve_metrics=False) as runtime:
            assert service.run(cfg, runtime, loss_fn=toy_loss) == 0
            assert runtime.status["step"] == 3
            text = _metrics_text(runtime)
        waits = float(re.search(r"^reliev3r_learner_data_waits_total (\S+)$", text, re.M).group(1))
        assert waits <= 1.0, text
        assert "reliev3r_learner_samples_total 6.0" in text
    finally:
        replay.close()
        ctx.destroy(linger=0)


@pytest.mark.timeout(600)  # bounds a hang only
@pytest.mark.parametrize("update", ["plain", "fused"])
def test_learner_process_snapshots_on_stop(tmp_path, monkeypatch, update):
    from learner import service
    from learner.snapshot import latest_snapshot, verify_snapshot
    from reliev3r.service import Runtime

    if update == "fused":  # a step may be in flight when the stop comes: it is read, reported and saved
        monkeypatch.setattr(service, "Trainer", FusedTrainer)
    with fake_replay_port() as port:
        cfg = learner_pipeline(tmp_path, port, max_steps=0, snapshot_every=1000)
        with Runtime("learner", cfg, install_signals=False, serve_metrics=False) as runtime:
            def stop_after_two_steps():
                while runtime.status.get("step", 0) < 2:
                    time.sleep(0.05)
                runtime.stop()  # what SIGTERM does

            threading.Thread(target=stop_after_two_steps, daemon=True).start()
            assert service.run(cfg, runtime, loss_fn=toy_loss) == 0
            reported = runtime.status["step"]
        path = latest_snapshot(tmp_path / "snapshots")
        meta = verify_snapshot(path)
        assert meta["step"] >= 2 and meta["final"] is False
        assert meta["step"] == reported  # the last step reported is the snapshot's


@pytest.mark.timeout(600)  # bounds a hang only
def test_a_snapshot_the_full_disk_refuses_is_said_and_counted_and_training_goes_on(tmp_path, small_disk, caplog):
    """A run folder on a disk that fills up: the snapshot at step 4 meets ENOSPC. The error went
    out of the training loop and ended the learner, whose restart lost every step since step 2 and
    met the full disk again at the same step. Now the learner says the failure (an error line with
    the reason, a count by reason, its status), leaves no part of it behind and the snapshot of
    step 2 as it was, trains on, and writes the next snapshot once the disk has room again."""
    from learner import service
    from learner.snapshot import list_snapshots, verify_snapshot
    from reliev3r.service import Runtime

    disk = small_disk(96 << 20)
    calls, said, status = 0, [], {}

    def loss_filling_the_disk(pred, batch, cfg, *, teacher_space="depth"):
        nonlocal calls
        calls += 1
        if calls == 3:  # step 2 and its snapshot are done: the disk fills before step 4's
            disk.fill()
        elif calls == 5:  # step 4's snapshot failed: room again for step 6's
            said.append(status.get("write_error"))
            disk.free()
        return toy_loss(pred, batch, cfg, teacher_space=teacher_space)

    with fake_replay_port() as port:
        cfg = learner_pipeline(disk.path / "run", port, max_steps=6, snapshot_every=2)
        with Runtime("learner", cfg, install_signals=False, serve_metrics=False) as runtime:
            status = runtime.status
            with caplog.at_level(logging.ERROR, logger="reliev3r.learner"):
                assert service.run(cfg, runtime, loss_fn=loss_filling_the_disk) == 0
            assert runtime.status["step"] == 6 and "write_error" not in runtime.status  # written again
            text = _metrics_text(runtime)
        assert said == [f"snapshot of step 4: ENOSPC: {os.strerror(errno.ENOSPC)}"]  # while the disk was full
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert [(r.getMessage().split(":")[0], r.reason, r.step) for r in errors] == [
            ("snapshot not written", "ENOSPC", 4)]
        assert 'reliev3r_snapshot_failures_total{reason="ENOSPC"} 1.0' in text
        folder = disk.path / "run" / "snapshots"
        assert [s for s, _ in list_snapshots(folder)] == [2, 6]
        assert verify_snapshot(folder / "step-000000002")["step"] == 2
        assert verify_snapshot(folder / "step-000000006")["final"] is True
        assert not list(folder.glob(".tmp-*"))  # nothing of the failed one left to take the room


@pytest.mark.timeout(600)  # bounds a hang only
def test_a_final_snapshot_the_full_disk_refuses_ends_the_learner_with_exit_1(tmp_path, small_disk):
    """At max_steps the final snapshot meets a full disk: the learner exits 1 (its steps are not
    saved, so ``reliev3r up`` restarts it to resume and try again) instead of 0, which would end
    the run as if they were; the snapshot written before stays, and no part of the failed one."""
    from learner import service
    from learner.snapshot import list_snapshots, verify_snapshot
    from reliev3r.service import Runtime

    disk = small_disk(96 << 20)
    calls = 0

    def loss_filling_the_disk(pred, batch, cfg, *, teacher_space="depth"):
        nonlocal calls
        calls += 1
        if calls == 2:  # step 1's snapshot is written: the disk fills before the final one
            disk.fill()
        return toy_loss(pred, batch, cfg, teacher_space=teacher_space)

    with fake_replay_port() as port:
        cfg = learner_pipeline(disk.path / "run", port, max_steps=2, snapshot_every=1)
        with Runtime("learner", cfg, install_signals=False, serve_metrics=False) as runtime:
            assert service.run(cfg, runtime, loss_fn=loss_filling_the_disk) == 1
            assert runtime.status["write_error"].startswith("snapshot of step 2: ENOSPC")
        folder = disk.path / "run" / "snapshots"
        assert [s for s, _ in list_snapshots(folder)] == [1] and verify_snapshot(folder / "step-000000001")
        assert not list(folder.glob(".tmp-*"))


def _metrics_text(runtime) -> str:
    from prometheus_client import generate_latest

    return generate_latest(runtime.metrics.registry).decode()


def test_trainer_with_the_real_objective_steps_and_learns():
    trainer = Trainer(learner_cfg(lr=3e-3), device="cpu")  # default loss: learner.objective.compute_loss
    batch = synthetic_batch(2, 3, 16, 24, k=32)
    per_window: list[float] = []
    first = trainer.step(batch, teacher_space="depth", window_losses=per_window)
    assert len(per_window) == 2 and all(math.isfinite(x) for x in per_window)
    for _ in range(5):
        last = trainer.step(batch, teacher_space="depth")
    assert first["skipped"] == 0.0 and math.isfinite(first["loss"]) and "depth" in first
    assert last["loss"] < first["loss"]


@pytest.mark.timeout(900)  # bounds a hang only (two runs, each joined for up to 300 s)
def test_evaluator_exits_on_a_final_snapshot_also_after_a_restart(tmp_path):
    # `reliev3r up --max-steps N` run twice in one folder: the second learner finds N reached and
    # exits; the evaluator must not wait for a snapshot that will never come.
    import dataclasses

    from evaluation import service
    from reliev3r.config import free_port
    from reliev3r.service import Runtime

    cfg = learner_pipeline(tmp_path, free_port(), max_steps=1)
    cfg = dataclasses.replace(cfg, evaluator=dataclasses.replace(cfg.evaluator, windows=2, poll_s=0.1))
    trainer = Trainer(cfg.learner, device="cpu")
    trainer.global_step = 1  # the learner's final snapshot is of max_steps
    trainer.save_state(tmp_path / "snapshots", final=True)
    for attempt in ("first", "restart"):
        with Runtime("evaluator", cfg, install_signals=False, serve_metrics=False) as runtime:
            result = {}
            worker = threading.Thread(target=lambda: result.setdefault("rc", service.run(cfg, runtime)))
            worker.start()
            worker.join(300)  # bounds a hang only: scoring may render the held-out world first
            by_itself = not worker.is_alive()
            runtime.stop()  # (only matters when it hangs)
            worker.join(10)
            assert by_itself and result.get("rc") == 0, f"{attempt} run did not exit by itself"
    assert len(list((tmp_path / "evaluations").glob("step-*.json"))) == 1
