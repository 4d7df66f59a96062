"""FFRM: shapes, ranges, fp32 heads, permutation equivariance, analytic FLOPs."""

import pytest
import torch
import torch.nn.functional as F

from learner.config import ModelConfig
from learner.model import FFRM, SIZES, Prediction, view_depth

torch.set_num_threads(1)


def _model(**kw) -> FFRM:
    torch.manual_seed(0)
    return FFRM(ModelConfig(size="tiny", **kw)).eval()


def test_output_shapes_and_ranges():
    model = _model()
    images = torch.rand(2, 3, 3, 32, 48)
    pred = model(images)
    assert isinstance(pred, Prediction)
    assert pred.depth.shape == (2, 3, 32, 48) and pred.confidence.shape == (2, 3, 32, 48)
    assert pred.cam_to_world.shape == (2, 3, 4, 4)
    assert (pred.depth > 0).all()
    assert ((pred.confidence > 0) & (pred.confidence < 2)).all()
    # Initialisation: depth ~1, confidence ~1, poses near identity, bottom row exact.
    assert (pred.depth - 1).abs().max() < 0.2
    assert (pred.confidence - 1).abs().max() < 0.1
    rot = pred.cam_to_world[..., :3, :3]
    assert torch.allclose(rot @ rot.transpose(-1, -2), torch.eye(3).expand_as(rot), atol=1e-5)
    assert (rot - torch.eye(3)).abs().max() < 0.2
    assert torch.equal(pred.cam_to_world[..., 3, :], torch.tensor([0.0, 0, 0, 1]).expand(2, 3, 4))


def test_heads_run_in_fp32_under_autocast():
    model = _model()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pred = model(torch.rand(1, 2, 3, 16, 16))
    assert pred.depth.dtype == torch.float32
    assert pred.confidence.dtype == torch.float32
    assert pred.cam_to_world.dtype == torch.float32


@pytest.mark.parametrize("scale_head", [False, True])
def test_permuting_views_permutes_outputs(scale_head):
    model = _model(scale_head=scale_head)
    images = torch.rand(1, 4, 3, 24, 32)
    perm = torch.tensor([2, 0, 3, 1])
    with torch.no_grad():
        a, b = model(images), model(images[:, perm])
    torch.testing.assert_close(b.depth, a.depth[:, perm], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b.confidence, a.confidence[:, perm], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b.cam_to_world, a.cam_to_world[:, perm], atol=1e-5, rtol=1e-5)


def test_views_interact_through_global_attention():
    # Changing view 1 must change view 0's output (otherwise the model is per-frame only).
    model = _model()
    images = torch.rand(1, 2, 3, 16, 16)
    other = images.clone()
    other[:, 1] = torch.rand(3, 16, 16)
    with torch.no_grad():
        assert not torch.allclose(model(images).cam_to_world[:, 0], model(other).cam_to_world[:, 0])


def test_rejects_sizes_not_multiple_of_patch():
    model = _model()
    try:
        model(torch.rand(1, 2, 3, 20, 16))
    except ValueError as err:
        assert "patch_size" in str(err)
    else:
        raise AssertionError("expected ValueError")


@pytest.mark.parametrize("scale_head", [False, True])
def test_backward_reaches_every_parameter(scale_head):
    model = _model(scale_head=scale_head).train()
    pred = model(torch.rand(1, 2, 3, 16, 16))
    (pred.depth.mean() + pred.confidence.mean() + pred.cam_to_world.sum()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing


def test_scale_head_predicts_each_views_scale_apart_from_its_shape():
    model = _model(scale_head=True)
    images = torch.rand(2, 3, 3, 16, 24)
    with torch.no_grad():
        model.dense_refine[-1].bias[0] = 0.5  # the dense head's log-depth, moved by 0.5 everywhere
        pred = model(images)
        assert pred.shape.shape == (2, 3, 16, 24) and pred.log_scale.shape == pred.log_shift.shape == (2, 3)
        torch.testing.assert_close(pred.depth, view_depth(pred.shape, pred.log_scale, pred.log_shift))
        # The shape has no scale of its own: its log, soft clamp undone, has mean 0 in each view
        # (up to fp32 rounding of exp and log, a few 1e-7).
        m = model.cfg.max_log_depth
        assert (m * torch.atanh(pred.shape.log() / m)).mean((-2, -1)).abs().max() < 2e-6
        # Moving the scale head rescales each view's depth by one factor and leaves the shape.
        model.scale_head[-1].bias[0] = 0.7
        moved = model(images)
    torch.testing.assert_close(moved.shape, pred.shape)
    ratio = moved.depth / pred.depth
    torch.testing.assert_close(ratio, ratio[..., :1, :1].expand_as(ratio))
    assert (ratio > 1.5).all()
    with torch.no_grad():
        plain = _model(scale_head=False)(images)
    assert plain.shape is None and plain.log_scale is None and plain.log_shift is None


def test_view_depth_scales_and_shifts_each_view_and_stays_positive():
    shape = torch.tensor([[[[1.0, 2.0], [4.0, 0.5]], [[3.0, 3.5], [6.0, 2.0]]]])  # [1, 2, 2, 2], min 0.5 / 2
    zero = torch.zeros(1, 2)
    torch.testing.assert_close(view_depth(shape, zero, zero), shape)
    log_scale = torch.tensor([[0.5, -1.0]])
    torch.testing.assert_close(view_depth(shape, log_scale, zero), shape * log_scale.exp()[..., None, None])
    # log_shift τ moves each view's depth by (exp(τ) - 1) times its smallest depth, everywhere.
    log_shift = torch.tensor([[1.0, -3.0]])
    moved = view_depth(shape, zero, log_shift)
    nearest = torch.tensor([0.5, 2.0])[None, :, None, None]
    torch.testing.assert_close(moved - shape, ((log_shift.exp()[..., None, None] - 1) * nearest).expand_as(shape))
    assert (view_depth(shape, zero, torch.full((1, 2), -50.0)) > 0).all()


def test_flops_scale_with_tokens_and_sizes_are_ordered():
    model = _model()
    f1 = model.flops_per_sample(64, 96, 4)
    assert model.flops_per_sample(64, 96, 8) > 2 * f1  # global attention is quadratic in views
    assert f1 > 2 * model.num_parameters() * 4 * (8 * 12)  # at least 2 FLOPs/param/token
    assert list(SIZES) == ["tiny", "small", "base", "large"]
    dims = [s.dim for s in SIZES.values()]
    assert dims == sorted(dims) and SIZES["base"].dim == 768 and SIZES["base"].heads == 12


def test_dense_trunk_channel_padding_is_the_plain_conv():
    # The trunk pads the first conv's input with zero channels (to a multiple of 8) and its
    # weight with zeros: the result is the unpadded conv's.
    model = _model()
    bv, gh, gw, p = 2, 2, 3, model.cfg.patch_size
    tokens = torch.randn(bv, gh * gw, SIZES["tiny"].dim)
    frames = torch.randn(bv, 3, gh * p, gw * p)
    with torch.no_grad():
        got = model._dense_trunk(tokens, frames, bv, gh, gw)
        c = SIZES["tiny"].head_channels
        feat = F.pixel_shuffle(model.dense_proj(tokens).view(bv, gh, gw, c * p * p).permute(0, 3, 1, 2), p)
        want = model.dense_refine[1](model.dense_refine[0](torch.cat((feat, frames), dim=1)))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_head_dim_option_keeps_parameters_and_flops():
    base, wide = _model(), _model(head_dim=64)  # tiny: 4 heads of 32 -> 2 heads of 64
    assert wide.encoder[0].attn.heads == 2 and base.encoder[0].attn.heads == 4
    assert wide.flops_per_sample(32, 48, 2) == base.flops_per_sample(32, 48, 2)
    blocks = len(wide.encoder) + len(wide.frame_blocks) + len(wide.global_blocks)
    assert wide.num_parameters() - base.num_parameters() == blocks * 2 * 2 * (64 - 32)  # QK-norm widths only
    pred = wide(torch.rand(1, 2, 3, 16, 16))
    assert pred.depth.shape == (1, 2, 16, 16)
    with pytest.raises(ValueError, match="head_dim"):
        _model(head_dim=48)  # does not divide 128
    with pytest.raises(ValueError, match="head_dim"):
        ModelConfig(head_dim=6)


def test_removed_study_options_are_refused_by_the_config():
    # model.translation_unit and model.dense_grad_scale left the product (no held-out gain on
    # the product path; docs/RESULTS.md): an override naming one is an error, not ignored.
    from reliev3r.config_base import ConfigError, build

    for key, value in (("translation_unit", "depth"), ("dense_grad_scale", 0.1)):
        with pytest.raises(ConfigError, match=f"learner.model.{key}: unknown key"):
            build(ModelConfig, {key: value}, "learner.model")


def test_compiled_regions_compute_the_eager_model():
    # compile_blocks compiles every block and the dense head (an instance attribute over the
    # method): outputs, gradients and the state dict must be the eager model's.
    from learner.train import compile_blocks

    eager, compiled = _model(), compile_blocks(_model())
    assert list(compiled.state_dict()) == list(eager.state_dict())
    images = torch.rand(1, 2, 3, 16, 24)
    want, got = eager(images), compiled(images)
    for name in ("depth", "confidence", "cam_to_world"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), atol=1e-5, rtol=1e-4)
    want.depth.log().mean().backward()
    got.depth.log().mean().backward()
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-6, rtol=1e-4, msg=name)
