"""``learner.graphs``: the matches padded to a bucket change no loss term and no gradient (so a
CUDA graph per bucket trains as the eager step does), and on a GPU the replayed step trains as
the eager one."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from learner.config import LearnerConfig, LossConfig, ModelConfig
from learner.graphs import Unrecordable, match_bucket, pad_matches
from learner.objective import weighted_loss
from learner.train import Trainer, default_loss_fn, synthetic_batch, unrecordable_objective
from tests.helpers_world import F64, make_world, perturbed


def test_match_bucket_known_answers():
    assert [match_bucket(k) for k in (0, 1, 64, 65, 100, 2030, 2048, 2049, 2100)] == \
        [64, 64, 64, 80, 112, 2048, 2048, 2560, 2560]


def test_match_bucket_pads_at_most_a_quarter_with_four_buckets_an_octave():
    for k in range(65, 20_000):
        rows = match_bucket(k)
        assert k <= rows <= 1.25 * k
    assert len({match_bucket(k) for k in range(1025, 2049)}) == 4


def weak_case(seed=3):
    """A float64 batch of the synthetic world with every input of the default weak objective
    (teacher, scores, triangulation) and a perturbed prediction that requires grad."""
    world = make_world(seed, batch=2, views=3, per_pair=12)
    g = torch.Generator().manual_seed(seed)
    m = world["matches"]
    k = m.shape[0]
    depth, poses = perturbed(world, seed)
    batch = {"images": torch.zeros(2, 3, 3, *depth.shape[-2:], dtype=F64), "intrinsics": world["intrinsics"],
             "matches": torch.cat((m, 0.2 + torch.rand(k, 1, generator=g, dtype=F64)), 1),
             "match_triangulation": torch.cat((1 + 3 * torch.rand(k, 2, generator=g, dtype=F64),
                                               torch.rand(k, 1, generator=g, dtype=F64)), 1),
             "teacher_depth": 1 / world["depth"] + 0.2 * torch.rand(depth.shape, generator=g, dtype=F64),
             "teacher_valid": torch.rand(depth.shape, generator=g) > 0.1}
    pred = SimpleNamespace(depth=depth.requires_grad_(True),
                           confidence=(0.5 + torch.rand(depth.shape, generator=g, dtype=F64)).requires_grad_(True),
                           cam_to_world=poses.requires_grad_(True))
    return pred, batch


def loss_and_grads(pred, batch):
    loss, terms = weighted_loss(pred, batch, LossConfig(), teacher_space="disparity")
    grads = torch.autograd.grad(loss, (pred.depth, pred.confidence, pred.cam_to_world))
    return {k: float(v) for k, v in terms.items() if k != "matches"}, grads


def test_padding_changes_no_term_and_no_gradient():
    pred, batch = weak_case()
    k = batch["matches"].shape[0]
    padded = pad_matches(batch, match_bucket(k) + 37)
    assert padded["matches"].shape[0] == match_bucket(k) + 37 and torch.equal(padded["matches"][:k], batch["matches"])
    assert padded["images"] is batch["images"]
    terms, grads = loss_and_grads(pred, batch)
    assert {"reproj", "point", "triangulation", "triangulation_pose", "contrast", "depth"} <= set(terms)
    padded_terms, padded_grads = loss_and_grads(pred, padded)
    # The padding rows add exact zeros; only the order of float64 sums over more rows may differ.
    assert padded_terms == pytest.approx(terms, rel=1e-12, abs=1e-15)
    for a, b in zip(grads, padded_grads):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-14)


def test_padding_a_batch_without_matches_gives_a_connected_zero():
    pred, batch = weak_case()
    for name in ("matches", "match_triangulation"):
        batch[name] = batch[name][:0]
    padded = pad_matches(batch, match_bucket(0))
    loss, terms = weighted_loss(pred, padded, LossConfig(), teacher_space="disparity")
    unpadded, _ = weighted_loss(pred, batch, LossConfig(), teacher_space="disparity")
    assert float(loss.detach()) == pytest.approx(float(unpadded.detach()), rel=1e-12)
    assert float(terms["reproj"]) == 0.0 and float(terms["triangulation"]) == 0.0


def test_pad_matches_refuses_fewer_rows():
    _, batch = weak_case()
    with pytest.raises(ValueError, match="cannot pad"):
        pad_matches(batch, batch["matches"].shape[0] - 1)


def test_cuda_graphs_are_ignored_on_the_cpu():
    trainer = Trainer(LearnerConfig(model=ModelConfig(size="tiny"), cuda_graphs=True), device="cpu")
    assert trainer.graphs is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_replayed_step_trains_as_the_eager_step():
    """Two trainers from the same seed, one eager and one replaying graphs, on the same batches
    (match counts in two buckets, one bucket seen twice), in fp32. Each step starts from the same
    weights (the eager trainer's, copied): the replayed step's loss and gradient are the eager
    one's but for the order of float32 sums, which the padded rows change (relative differences
    near sqrt(n) * 6e-8 for sums of n terms; 1e-4 bounds n up to about 1e6). Not the weights
    each trained alone: Adam turns a rounding-sized gradient near 0 into a step of up to lr, so
    two trainers left to themselves part further at every step (on an H100 their gradient norms
    at the fourth step 0.9 % apart, with the same step from the same weights 1e-7 apart)."""
    cfg = LearnerConfig(model=ModelConfig(size="tiny"), batch_size=2, warmup_steps=0, ema_decay=0.9,
                        precision="fp32")
    eager, graphed = (Trainer(replace(cfg, cuda_graphs=on), device="cuda") for on in (False, True))
    batches = [synthetic_batch(2, 3, 56, 80, k=k, seed=seed, device="cuda", triangulation=True)
               for seed, k in enumerate((100, 105, 300))]
    for b in batches:
        with torch.no_grad():
            for p, q in zip(eager.model.parameters(), graphed.model.parameters()):
                q.copy_(p)  # in place: the graph reads the parameters' storage
        start = [p.detach().clone() for p in eager.model.parameters()]
        a, g = eager.step(b), graphed.step(b)
        assert g["matches"] == a["matches"] == b["matches"].shape[0]
        assert g["loss"] == pytest.approx(a["loss"], rel=1e-4)
        assert g["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
        # The update: Adam's moments hold the earlier steps' gradients, alike to rounding, and
        # a rounding-sized gradient near 0 may still move an element by up to
        # lr (1 - beta1) / sqrt(1 - beta2) (Kingma & Ba, 2.1) one way in one and the other way
        # in the other, per step of the moments' memory: the updates as a whole must agree.
        bound = 2 * 3 * cfg.lr * (1 - 0.9) / (1 - 0.999) ** 0.5
        moved_e = torch.cat([(p.detach() - p0).flatten() for p, p0 in zip(eager.model.parameters(), start)])
        moved_g = torch.cat([(q.detach() - p0).flatten() for q, p0 in zip(graphed.model.parameters(), start)])
        assert float((moved_g - moved_e).abs().max()) <= bound
        assert float(torch.nn.functional.cosine_similarity(moved_g, moved_e, dim=0)) > 0.99
    assert graphed.graphs.captures == 2 and graphed.global_step == eager.global_step == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the step's span is timed on a CUDA device")
@pytest.mark.parametrize("graphs", [False, True])
def test_a_launched_step_is_done_once_the_gpu_has_run_it_and_its_span_starts_at_its_first_operation(graphs):
    """:meth:`PendingStep.done` is the GPU's word, and settling gives the step's span on the
    GPU: from its own first operation, not from when the host launched it behind other work."""
    trainer = Trainer(LearnerConfig(model=ModelConfig(size="tiny"), batch_size=2, cuda_graphs=graphs), device="cuda")
    batch = synthetic_batch(2, 3, 56, 80, k=100, seed=0, device="cuda", triangulation=True)
    trainer.settle(trainer.launch(batch))  # the graph's recording, if any
    torch.cuda._sleep(2_000_000_000)  # 2e9 GPU clock cycles: about a second at an H100's 2 GHz
    pending = trainer.launch(batch)
    if graphs:  # a replay and a handful of kernels: the host is back long before the GPU is
        # (an eager step's many kernels may fill CUDA's launch queue and hold the host until
        # the sleep has ended, so there the GPU may be nearly done when launch returns)
        assert not pending.done()
    assert pending.gpu_seconds is None
    torch.cuda.synchronize()
    assert pending.done()
    trainer.settle_all()
    assert 0.0 < pending.gpu_seconds < 0.5  # the tiny step's milliseconds, without the sleep before it


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_a_step_that_fails_to_record_runs_eagerly_from_then_on(monkeypatch, caplog):
    """A step the start-up check passed but CUDA cannot record (here a read from the host the
    check is told not to see): the failed capture is logged with its reason and the trainer goes
    on eagerly, step for step as an eager twin, instead of the learner restarting at each capture."""
    import learner.train as train

    monkeypatch.setattr(train, "unrecordable_objective", lambda *args, **kwargs: [])
    weak = default_loss_fn()

    def with_read(pred, batch, cfg, *, teacher_space):
        loss, terms = weak(pred, batch, cfg, teacher_space=teacher_space)
        return loss * float(pred.depth.detach().amin() >= 0), terms  # 1.0, read from the device

    cfg = LearnerConfig(model=ModelConfig(size="tiny"), batch_size=2, warmup_steps=0, precision="fp32")
    eager, graphed = (Trainer(replace(cfg, cuda_graphs=on), device="cuda", loss_fn=with_read) for on in (False, True))
    assert graphed.graphs is not None
    batches = [synthetic_batch(2, 3, 56, 80, k=100, seed=seed, device="cuda", triangulation=True) for seed in (0, 1)]
    with caplog.at_level("WARNING", logger=train.log.name):
        for b in batches:
            a, g = eager.step(b), graphed.step(b)
            assert g["loss"] == pytest.approx(a["loss"], rel=1e-4)
    assert graphed.graphs is None and graphed.global_step == 2
    failed = [r for r in caplog.records if getattr(r, "reason", None) == "capture_failed"]
    assert len(failed) == 1 and "at tests/test_graphs.py:" in failed[0].detail, failed[0].detail


@pytest.mark.parametrize("kind", ["weak", "supervised"])
def test_the_recorded_step_copies_no_host_data_and_reads_nothing_back(kind):
    """Checked on the CPU as the ops the step dispatches (``Unrecordable``), with every weak loss
    term of the gpu.yaml recipe on, and for the supervised sibling (whose run with
    ``learner.cuda_graphs`` failed to record on an H100 while it tested ``bool(ok.any())``): on
    the trainer's own step, and by the check a CUDA trainer makes before it records."""
    cfg = LearnerConfig(model=ModelConfig(size="tiny"), batch_size=2, loss=LossConfig(kind=kind))
    trainer = Trainer(cfg, device="cpu")
    batch = synthetic_batch(2, 3, 56, 80, k=120, seed=1, triangulation=True, ground_truth=True)
    batch["gt_depth"][1, :, 8:] = 0  # unknown depth in part of a window
    trainer.step(batch)  # constants cached per device are made here, as in a graph's warm-up
    with Unrecordable() as mode:
        _, _, terms, _, _ = trainer._forward_backward(batch, "depth")
    expected = {"supervised"} if kind == "supervised" else \
        {"reproj", "point", "triangulation", "triangulation_pose", "contrast", "depth"}
    assert expected <= set(terms)
    assert mode.found == []
    assert unrecordable_objective(cfg, default_loss_fn()) == []


def test_a_batch_of_both_teacher_spaces_records_as_any_other():
    """A batch whose windows' teachers differ in space carries ``teacher_disparity`` [B]: the
    step reads each window's space from that tensor on the device (a graph input like the
    labels), with nothing copied from the host or read back."""
    cfg = LearnerConfig(model=ModelConfig(size="tiny"), batch_size=2)
    trainer = Trainer(cfg, device="cpu")
    batch = synthetic_batch(2, 3, 56, 80, k=120, seed=1, triangulation=True)
    batch["teacher_disparity"] = torch.tensor([False, True])
    trainer.step(batch)
    with Unrecordable() as mode:
        _, _, terms, _, _ = trainer._forward_backward(batch, "depth")
    assert {"contrast", "depth"} <= set(terms)
    assert mode.found == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_a_batch_of_both_teacher_spaces_replays_as_the_eager_step():
    """The replayed step on batches whose windows' teachers differ in space, in either order,
    trains as the eager one, in fp32, from one graph: the flags [B] are an input like the labels."""
    cfg = LearnerConfig(model=ModelConfig(size="tiny"), batch_size=2, warmup_steps=0, precision="fp32")
    eager, graphed = (Trainer(replace(cfg, cuda_graphs=on), device="cuda") for on in (False, True))
    flags = ([False, True], [True, False], [False, True])
    for seed, flag in enumerate(flags):
        b = synthetic_batch(2, 3, 56, 80, k=100, seed=seed, device="cuda", triangulation=True)
        b["teacher_disparity"] = torch.tensor(flag, device="cuda")
        a, g = eager.step(b), graphed.step(b)
        assert g["loss"] == pytest.approx(a["loss"], rel=1e-3)
        assert g["contrast"] == pytest.approx(a["contrast"], rel=1e-3)
    assert graphed.graphs.captures == 1 and graphed.global_step == 3


def test_a_step_that_reads_the_device_is_found_where_it_does_so_and_the_rng_is_left_alone():
    """A loss term a researcher adds with ``.item()``, a boolean mask or a tensor from host
    data: each found, named by its line, before any capture (a CUDA trainer then runs the step
    eagerly instead of failing at every start); the caller's random state is unchanged."""
    weak = default_loss_fn()

    def with_reads(pred, batch, cfg, *, teacher_space):
        loss, terms = weak(pred, batch, cfg, teacher_space=teacher_space)
        scale = float(pred.depth.detach().mean())  # a read from the host
        kept = pred.depth[pred.depth > scale]  # a shape from data
        return loss + kept.sum() * 0 + torch.tensor([1.0, 2.0]).sum() * 0, terms

    before = torch.get_rng_state()
    found = unrecordable_objective(LearnerConfig(model=ModelConfig(size="tiny")), with_reads)
    assert torch.equal(torch.get_rng_state(), before)
    assert any(f.startswith("aten._local_scalar_dense.default at tests/test_graphs.py:") and "float(pred.depth" in f
               for f in found), found
    assert any(f.startswith("aten.index.Tensor at tests/test_graphs.py:") for f in found), found
    assert any(f.startswith("aten.lift_fresh.default at tests/test_graphs.py:") for f in found), found


def test_a_failed_capture_names_the_first_error_and_our_line():
    """What the status line shows when a step cannot be recorded: CUDA's own error after a
    failed capture ("operation failed due to a previous error during capture") says nothing;
    the first error and the line of ours that raised it do."""
    from learner.graphs import CaptureError

    def step():
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore")

    try:
        try:
            step()
        except RuntimeError:
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture")
    except RuntimeError as exc:
        err = CaptureError(exc)
    assert str(err).startswith("the training step could not be recorded as a CUDA graph: CUDA error: operation "
                               "not permitted when stream is capturing at tests/test_graphs.py:")
    assert str(err).endswith('(raise RuntimeError("CUDA error: operation not permitted when stream is capturing'
                             '\\nmore")); learner.cuda_graphs=false runs it eagerly')
    from learner.graphs import _OURS, _ours

    assert _ours(_OURS / "learner" / "train.py")
    assert not _ours(_OURS / ".venv" / "lib" / "python3.12" / "site-packages" / "torch" / "cuda" / "graphs.py")


def test_a_step_keeps_no_autograd_graph_alive_after_its_backward():
    """What the step hands on (its prediction, terms, the pending numbers; on CUDA the graph's
    outputs, kept with the graph) holds no autograd graph: one kept alive holds the parameters'
    gradient-accumulation nodes, so the next capture, on another stream, accumulates on the stream
    they were made on (torch warns: 'The AccumulateGrad node's stream does not match ...', in
    the learner's log on every run with CUDA graphs)."""
    trainer = Trainer(LearnerConfig(model=ModelConfig(size="tiny"), batch_size=2, warmup_steps=0), device="cpu")
    batch = synthetic_batch(2, 3, 32, 48, k=64, seed=0, triangulation=True)
    pred, loss, terms, grad_norm, finite = trainer._forward_backward(batch, "disparity")
    held = [pred.depth, pred.confidence, pred.cam_to_world, loss, grad_norm, finite,
            *(v for v in terms.values() if isinstance(v, torch.Tensor))]
    assert all(t.grad_fn is None and not t.requires_grad for t in held)
    pending = trainer.launch(batch)
    assert pending.values.grad_fn is None
