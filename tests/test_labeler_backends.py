"""Depth-teacher backends through ``make_teacher`` (the path users take): a tiny transformers
Depth Anything saved and loaded back, an ONNX file and a TorchScript file exported here from a
known tiny model, and the real pretrained PyDNet++ (TFLite) checked against 7-Scenes depth."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from labelers.depth import TeacherError, make_teacher
from labelers.depth_models import fit_size

SHARED = Path(__file__).parents[1].parent / "shared"
PYDNET = SHARED / "models" / "pydnet++.tflite"
KITCHEN = SHARED / "data" / "7scenes-redkitchen"


class Ramp(torch.nn.Module):
    """A known answer: depth = 1 + (mean of the normalised channels) + 0.01 * column index.
    It has a parameter so exporters treat it as a model."""

    def __init__(self):
        super().__init__()
        self.gain = torch.nn.Parameter(torch.ones(()))

    def forward(self, x):
        col = torch.arange(x.shape[-1], dtype=x.dtype, device=x.device).expand(x.shape[0], 1, x.shape[-2], -1)
        return 1 + self.gain * x.mean(1, keepdim=True) + 0.01 * col


def frames(v=3, h=48, w=64, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (v, h, w, 3), dtype=np.uint8)


def ramp_answer(f: np.ndarray) -> np.ndarray:
    """Ramp's output for unit-normalised frames at their own size."""
    x = f.astype(np.float32) / 255
    return 1 + x.mean(-1) + 0.01 * np.arange(f.shape[2], dtype=np.float32)


def test_fit_size_follows_the_dpt_processor_rule():
    # Depth Anything V2: 518 target, keep aspect, multiple of 14 (a 480x640 frame -> 518x686)
    assert fit_size(480, 640, (518, 518), keep_aspect=True, multiple=14) == (518, 686)
    assert fit_size(480, 640, (384, 384), keep_aspect=False, multiple=32) == (384, 384)
    assert fit_size(50, 70, (50, 70), keep_aspect=True, multiple=32) == (64, 64)


def test_torchscript_teacher_known_answer(tmp_path):
    path = tmp_path / "ramp.pt"
    torch.jit.script(Ramp()).save(str(path))
    f = frames()
    teacher = make_teacher(f"torchscript:{path}?space=depth&norm=unit&multiple=16")
    depth, valid = teacher.predict(f)
    assert depth.shape == f.shape[:3] and valid.all()
    np.testing.assert_allclose(depth, ramp_answer(f), atol=1e-4)
    d = teacher.describe()
    assert d["space"] == "depth" and d["name"] == "torchscript:ramp.pt" and len(d["version"]) == 12
    # batched across windows of different sizes: same answers as one by one
    g = frames(2, 32, 48, seed=1)
    (d1, _), (d2, _) = teacher.predict_many([f, g])
    np.testing.assert_allclose(d1, depth, atol=1e-5)
    np.testing.assert_allclose(d2, ramp_answer(g), atol=1e-4)
    with pytest.raises(ValueError, match="space"):
        make_teacher(f"torchscript:{path}")  # a file does not say what it predicts
    with pytest.raises(ValueError, match="unknown options"):
        make_teacher(f"torchscript:{path}?space=depth&colour=red")


def test_non_finite_model_output_is_invalid_and_all_nan_drops(tmp_path):
    class Holes(torch.nn.Module):
        def forward(self, x):
            y = torch.ones_like(x[:, :1])
            y[:, :, :, :8] = float("nan")  # left band unknown
            black = x.abs().sum(dim=(1, 2, 3)) == 0
            return torch.where(black.view(-1, 1, 1, 1), torch.full_like(y, float("inf")), y)

    path = tmp_path / "holes.pt"
    torch.jit.script(Holes()).save(str(path))
    teacher = make_teacher(f"torchscript:{path}?space=depth&norm=unit&multiple=16")
    f = frames(2, 32, 32)
    f[1] = 0  # a black frame: this model answers inf there
    kept, dropped = teacher.predict_many([f, f[1:]])
    depth, valid = kept  # a partly unknown window keeps its known pixels
    assert not valid[0, :, :6].any() and valid[0, :, 10:].all() and not valid[1].any()
    assert np.isfinite(depth).all() and (depth[~valid] == 0).all()
    assert isinstance(dropped, TeacherError) and dropped.reason == "teacher_non_finite"
    with pytest.raises(TeacherError, match="teacher_non_finite"):
        teacher.predict(f[1:])


def test_onnx_teacher_known_answer(tmp_path):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime not installed (extra 'onnx')")
    pytest.importorskip("onnx", reason="onnx not installed (extra 'onnx')")
    path = tmp_path / "ramp.onnx"
    torch.onnx.export(Ramp(), (torch.zeros(1, 3, 48, 64),), str(path), input_names=["image"],
                      output_names=["depth"], dynamic_axes={"image": {0: "batch"}, "depth": {0: "batch"}},
                      dynamo=False)
    f = frames()
    teacher = make_teacher(f"onnx:{path}?space=disparity&norm=unit")
    assert teacher.input_size == (48, 64) and teacher.providers == ["CPUExecutionProvider"]
    depth, valid = teacher.predict(f)
    assert valid.all() and teacher.describe()["space"] == "disparity"
    np.testing.assert_allclose(depth, ramp_answer(f), atol=1e-4)
    assert "CPUExecutionProvider" in ort.get_available_providers()


class RampChannelsLast(Ramp):
    """Ramp with its one channel last ([B,h,w,1]) though its input has channels first."""

    def forward(self, x):
        return super().forward(x).permute(0, 2, 3, 1)


@pytest.mark.parametrize("model, batch", [(Ramp(), 2), (RampChannelsLast(), None), (RampChannelsLast(), 2)])
def test_onnx_teachers_of_either_output_layout_and_a_fixed_batch_give_the_known_answer(tmp_path, model, batch):
    """An ONNX teacher whose output puts its channel last while its input puts it first (its
    first image row was taken for depth: wrong, silently), and one whose batch is fixed (3
    views failed on a batch of 2): the known answer for every view."""
    pytest.importorskip("onnxruntime", reason="onnxruntime not installed (extra 'onnx')")
    pytest.importorskip("onnx", reason="onnx not installed (extra 'onnx')")
    path = tmp_path / "ramp.onnx"
    dynamic = {} if batch else {"dynamic_axes": {"image": {0: "batch"}, "depth": {0: "batch"}}}
    torch.onnx.export(model, (torch.zeros(batch or 1, 3, 48, 64),), str(path), input_names=["image"],
                      output_names=["depth"], dynamo=False, **dynamic)
    f = frames(v=3)
    depth, valid = make_teacher(f"onnx:{path}?space=disparity&norm=unit").predict(f)
    assert valid.all()
    np.testing.assert_allclose(depth, ramp_answer(f), atol=1e-4)


class HalfWithHoles(torch.nn.Module):
    """A prediction at half the input's size: ``value`` on its left half, ``hole`` (no depth
    there: 0, negative or NaN) on its right half."""

    def __init__(self, hole: float, value: float = 10.0):
        super().__init__()
        self.gain = torch.nn.Parameter(torch.ones(()))
        self.hole, self.value = hole, value

    def forward(self, x):
        y = torch.nn.functional.avg_pool2d(x.mean(1, keepdim=True), 2) * 0 + self.value * self.gain
        left = torch.arange(y.shape[-1], device=x.device) < y.shape[-1] // 2
        return torch.where(left, y, torch.full_like(y, self.hole))


@pytest.mark.parametrize("backend", ["torchscript", "onnx"])
@pytest.mark.parametrize("hole", [0.0, -10.0, float("nan")])
def test_a_prediction_smaller_than_the_frames_keeps_its_holes_out_of_the_labels(tmp_path, backend, hole):
    """Resizing a prediction to the frames must not blend its invalid pixels into valid labels
    (a 0 beside a 10 gave labels of 7.5 and 2.5 marked valid): labels come from valid pixels
    alone, and a pixel is valid where most of its interpolation weight is."""
    model = HalfWithHoles(hole)
    if backend == "onnx":
        pytest.importorskip("onnxruntime", reason="onnxruntime not installed (extra 'onnx')")
        pytest.importorskip("onnx", reason="onnx not installed (extra 'onnx')")
        path = tmp_path / "holes.onnx"
        torch.onnx.export(model, (torch.zeros(1, 3, 48, 64),), str(path), input_names=["image"],
                          output_names=["depth"], dynamic_axes={"image": {0: "b"}, "depth": {0: "b"}}, dynamo=False)
    else:
        path = tmp_path / "holes.pt"
        torch.jit.script(model).save(str(path))
    depth, valid = make_teacher(f"{backend}:{path}?space=depth&norm=unit&multiple=16").predict(frames(2, 48, 64))
    np.testing.assert_allclose(depth[valid], 10.0, rtol=1e-6)
    assert valid[..., :30].all() and not valid[..., 34:].any()  # the edge at column 32, within a source pixel


class RampChannelLastOut(torch.nn.Module):
    """Ramp's answer with its one channel last, [B,h,w,1]."""

    def forward(self, x):
        col = torch.arange(x.shape[-1], dtype=x.dtype, device=x.device).expand(x.shape[0], x.shape[-2], -1)
        return (1 + x.mean(1) + 0.01 * col)[..., None]


class RampSqueezed(RampChannelLastOut):
    """Ends in ``squeeze()``: [h,w] for a batch of one frame."""

    def forward(self, x):
        col = torch.arange(x.shape[-1], dtype=x.dtype, device=x.device).expand(x.shape[0], x.shape[-2], -1)
        return (1 + x.mean(1) + 0.01 * col).squeeze()


@pytest.mark.parametrize("model", [RampChannelLastOut(), RampSqueezed()])
def test_torchscript_teachers_of_either_output_layout_and_a_squeezed_batch_of_one(tmp_path, model):
    """As for ONNX teachers: one channel last is read as depth; a model that squeezes its
    output answers [h,w] for the last frame of 17 in batches of 16 (that window was dropped)."""
    path = tmp_path / "ramp.pt"
    torch.jit.script(model).save(str(path))
    teacher = make_teacher(f"torchscript:{path}?space=depth&norm=unit&multiple=16", batch_frames=16)
    f = frames(17, 32, 48)
    depth, valid = teacher.predict(f)
    assert valid.all()
    np.testing.assert_allclose(depth, ramp_answer(f), atol=1e-4)


def _tflite_mean(path: Path, *, quantised_input: bool = False, quantised_output: bool = False) -> Path:
    """A TFLite model written here (no converter needed): the mean over an NHWC [1,48,64,3]
    image's channels, [1,48,64,1]; its input uint8 (scale 1/255) and its output int8 (scale 1/255,
    zero point -128) when quantised, as fully quantised mobile models take and give them."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as S

    codes = [S.BuiltinOperator.MEAN, S.BuiltinOperator.DEQUANTIZE, S.BuiltinOperator.QUANTIZE]
    op_codes = []
    for code in codes:
        c = S.OperatorCodeT()
        c.builtinCode, c.deprecatedBuiltinCode, c.version = code, code, 1
        op_codes.append(c)
    tensors, operators = [], []

    def tensor(name, ttype, shape=(1, 48, 64, 3), buffer=0, quant=None) -> int:
        t = S.TensorT()
        t.name, t.type, t.shape, t.buffer = name.encode(), ttype, list(shape), buffer
        if quant:
            t.quantization = S.QuantizationParametersT()
            t.quantization.scale, t.quantization.zeroPoint = [quant[0]], [quant[1]]
        tensors.append(t)
        return len(tensors) - 1

    def operator(code, inputs, outputs, options=None) -> None:
        o = S.OperatorT()
        o.opcodeIndex, o.inputs, o.outputs = codes.index(code), inputs, outputs
        if options is not None:
            o.builtinOptionsType, o.builtinOptions = S.BuiltinOptions.ReducerOptions, options
        operators.append(o)

    T = S.TensorType
    image = tensor("image", T.UINT8 if quantised_input else T.FLOAT32, quant=(1 / 255, 0) if quantised_input else None)
    real = image
    if quantised_input:
        real = tensor("image_real", T.FLOAT32)
        operator(S.BuiltinOperator.DEQUANTIZE, [image], [real])
    axis = tensor("axis", T.INT32, shape=(1,), buffer=1)
    mean = tensor("depth", T.FLOAT32, shape=(1, 48, 64, 1))
    keep = S.ReducerOptionsT()
    keep.keepDims = True
    operator(S.BuiltinOperator.MEAN, [real, axis], [mean], keep)
    out = mean
    if quantised_output:
        out = tensor("depth_q", T.INT8, shape=(1, 48, 64, 1), quant=(1 / 255, -128))
        operator(S.BuiltinOperator.QUANTIZE, [mean], [out])
    graph = S.SubGraphT()
    graph.tensors, graph.inputs, graph.outputs, graph.operators = tensors, [image], [out], operators
    model = S.ModelT()
    model.version, model.operatorCodes, model.subgraphs = 3, op_codes, [graph]
    model.buffers = [S.BufferT(), S.BufferT()]
    model.buffers[1].data = np.array([3], np.int32).tobytes()
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    path.write_bytes(builder.Output())
    return path


@pytest.mark.parametrize("quantised_input, quantised_output", [(False, False), (True, False), (False, True),
                                                              (True, True)])
def test_tflite_teachers_float_or_quantised_give_the_known_answer(tmp_path, quantised_input, quantised_output):
    """A quantised output is read through its scale and zero point (its raw codes were taken
    for depth, half of them negative and so invalid); a quantised input is fed its codes (every
    window failed on a float tensor)."""
    pytest.importorskip("ai_edge_litert", reason="ai-edge-litert not installed (extra 'tflite')")
    path = _tflite_mean(tmp_path / "mean.tflite", quantised_input=quantised_input, quantised_output=quantised_output)
    f = frames(2, 48, 64)
    depth, valid = make_teacher(f"tflite:{path}?space=disparity&norm=unit").predict(f)
    answer = f.astype(np.float32).mean(-1) / 255
    assert valid[answer > 0].all()
    np.testing.assert_allclose(depth, answer, atol=(0.5 if quantised_output else 1e-4) / 255 + 1e-6)


class RampOfBytes(Ramp):
    """Takes its image as uint8 codes."""

    def forward(self, x):
        return super().forward(x.float() / 255)


class Grey(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.gain = torch.nn.Parameter(torch.ones(()))

    def forward(self, x):
        return 1 + self.gain * x


def test_teachers_that_cannot_take_rgb_frames_or_options_out_of_range_are_refused_at_load(tmp_path):
    """Not on every window at run time, each dropped with a traceback: a one-channel ONNX
    input, an integer one, ``multiple`` below 1 (a division by zero per window), a ``size``
    that is not one and a space that is neither depth nor disparity, named."""
    pytest.importorskip("onnxruntime", reason="onnxruntime not installed (extra 'onnx')")
    pytest.importorskip("onnx", reason="onnx not installed (extra 'onnx')")
    grey = tmp_path / "grey.onnx"
    torch.onnx.export(Grey(), (torch.zeros(1, 1, 48, 64),), str(grey), input_names=["image"],
                      output_names=["depth"], dynamo=False)
    with pytest.raises(ValueError, match="3 channels"):
        make_teacher(f"onnx:{grey}?space=depth")
    ramp = tmp_path / "ramp.onnx"
    torch.onnx.export(Ramp(), (torch.zeros(1, 3, 48, 64),), str(ramp), input_names=["image"],
                      output_names=["depth"], dynamo=False)
    torch.onnx.export(RampOfBytes(), (torch.zeros(1, 3, 48, 64, dtype=torch.uint8),), str(tmp_path / "bytes.onnx"),
                      input_names=["image"], output_names=["depth"], dynamo=False)
    with pytest.raises(ValueError, match="float"):
        make_teacher(f"onnx:{tmp_path / 'bytes.onnx'}?space=depth")
    script = tmp_path / "ramp.pt"
    torch.jit.script(Ramp()).save(str(script))
    for spec, message in [(f"torchscript:{script}?space=depth&multiple=0", "multiple"),
                          (f"onnx:{ramp}?space=depth&multiple=-8", "multiple"),
                          (f"torchscript:{script}?space=depth&size=abc", "size"),
                          (f"onnx:{ramp}?space=Depth", "space")]:
        with pytest.raises(ValueError, match=message):
            make_teacher(spec)


def _tiny_depth_anything(folder: Path) -> None:
    transformers = pytest.importorskip("transformers", reason="transformers not installed (extra 'hf')")
    backbone = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                                         intermediate_size=64, patch_size=14, image_size=56,
                                         out_indices=[1, 2, 3, 4], reshape_hidden_states=False)
    cfg = transformers.DepthAnythingConfig(backbone_config=backbone, fusion_hidden_size=16, head_hidden_size=8,
                                           neck_hidden_sizes=[8, 16, 32, 32], reassemble_hidden_size=32,
                                           patch_size=14)
    torch.manual_seed(0)
    model = transformers.DepthAnythingForDepthEstimation(cfg)
    with torch.no_grad():  # random weights put half the pixels under the final ReLU; lift them
        model.head.conv3.bias.fill_(1.0)
    model.save_pretrained(folder)
    # what Depth Anything V2's hub folder carries, scaled down (518 -> 56)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "DPTImageProcessor", "do_resize": True, "size": {"height": 56, "width": 56},
        "keep_aspect_ratio": True, "ensure_multiple_of": 14, "do_normalize": True,
        "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}))


def test_hf_teacher_from_a_saved_tiny_depth_anything(tmp_path):
    folder = tmp_path / "tiny-depth-anything"
    _tiny_depth_anything(folder)
    from transformers import AutoModelForDepthEstimation

    teacher = make_teacher(f"hf:{folder}")
    d = teacher.describe()
    assert d == {"name": "hf:tiny-depth-anything", "version": d["version"], "space": "disparity"}
    assert d["version"].startswith("depth_anything@") and teacher.dtype == torch.float32
    f = frames(3, 60, 80)
    assert teacher.model_size(60, 80) == (56, 70)
    out = teacher.predict_many([f, f[:2]])
    depth, valid = out[0]
    assert depth.shape == (3, 60, 80) and valid.mean() > 0.9
    np.testing.assert_allclose(out[1][0], depth[:2], rtol=1e-4, atol=1e-5)  # batching changes nothing

    # the same numbers as the model run by hand on the processor's recipe
    model = AutoModelForDepthEstimation.from_pretrained(folder).eval()
    x = torch.from_numpy(f).permute(0, 3, 1, 2).float()
    x = torch.nn.functional.interpolate(x, size=(56, 70), mode="bilinear", align_corners=False, antialias=True)
    x = ((x / 255 - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
         / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
    with torch.inference_mode():
        ref = model(pixel_values=x).predicted_depth[:, None]
    ref = torch.nn.functional.interpolate(ref, size=(60, 80), mode="bilinear", align_corners=False)[:, 0].numpy()
    np.testing.assert_allclose(np.where(valid, depth, 0), np.where(valid, ref, 0), rtol=1e-4, atol=1e-5)

    # a changed weight file is a changed teacher version
    first = d["version"]
    from safetensors.torch import load_file, save_file

    weights = load_file(folder / "model.safetensors")
    weights["head.conv3.bias"] += 0.5
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    assert make_teacher(f"hf:{folder}").describe()["version"] != first
    assert make_teacher(f"hf:{folder}?space=depth").describe()["space"] == "depth"
    for wrong in ("Depth", ""):  # refused as for the other backends (an empty one read disparity as depth)
        with pytest.raises(ValueError, match="space"):
            make_teacher(f"hf:{folder}?space={wrong}")


def _ls_abs_rel(pred: np.ndarray, gt: np.ndarray) -> float:
    ok = gt > 0
    A = np.stack([pred[ok], np.ones(ok.sum())], 1)
    coef, *_ = np.linalg.lstsq(A, gt[ok], rcond=None)
    return float(np.mean(np.abs(A @ coef - gt[ok]) / gt[ok]))


@pytest.mark.skipif(not PYDNET.is_file(), reason=f"PyDNet++ absent ({PYDNET})")
@pytest.mark.skipif(not KITCHEN.is_dir(), reason=f"7-Scenes frames absent ({KITCHEN})")
def test_pydnet_tflite_on_7scenes():
    pytest.importorskip("ai_edge_litert", reason="ai-edge-litert not installed (extra 'tflite')")
    from streamer.sources import ImageSequenceSource

    teacher = make_teacher(f"pydnet:{PYDNET}")
    assert teacher.describe()["space"] == "depth" and teacher.input_size == (448, 640)
    wanted = (0, 150, 300)
    views = []
    for start in wanted:  # frames(start) seeks: no decoding of the frames between
        views.append(next(iter(ImageSequenceSource(KITCHEN).frames(start))))
    assert [v.index for v in views] == list(wanted)
    rgb = np.stack([v.rgb for v in views])
    depth, valid = teacher.predict(rgb)
    assert depth.shape == rgb.shape[:3] and valid.mean() > 0.99
    errors = [_ls_abs_rel(depth[i], views[i].gt_depth) for i in range(len(views))]
    # README: AbsRel 0.245 on 20 frames after least-squares scale-and-shift; constant 0.338
    assert np.mean(errors) < 0.35, errors


def test_labeler_batches_windows_through_the_teacher(tmp_path):
    """Several windows in one label_many call: one shared teacher batch, per-window results
    identical to labelling them one by one, a bad window dropped without its neighbours."""
    from labelers.service import Labeler
    from reliev3r.config import PipelineConfig, build
    from reliev3r.protocol import Message
    from streamer_media import panning_frames

    path = tmp_path / "ramp.pt"
    torch.jit.script(Ramp()).save(str(path))
    cfg = build(PipelineConfig, {"labeler": {"teacher": f"torchscript:{path}?space=depth&norm=unit&multiple=16",
                                             "batch_frames": 4}})
    labeler = Labeler(cfg)
    calls = []
    forward = labeler.teacher.forward
    labeler.teacher.forward = lambda x: calls.append(len(x)) or forward(x)

    def window(frames, wid):
        v, h, w = frames.shape[:3]
        K = np.tile(np.array([[w, 0, w / 2], [0, w, h / 2], [0, 0, 1]], np.float32), (v, 1, 1))
        return Message("window", {"window_id": wid, "source": "s", "frame_indices": list(range(v))},
                       {"frames": frames, "intrinsics": K})

    a, b = panning_frames(3, 128, 96, step=4), panning_frames(3, 128, 96, step=6)
    blank = a.copy()
    blank[1] = 0
    out = labeler.label_many([window(a, "a"), window(blank, "x"), window(b, "b")])
    assert calls == [4, 2]  # 6 frames of two windows in batches of 4; the blank one never ran
    assert [r[1] for r in out] == ["", "blank_frame", ""]
    for (insert, _, _), frames in zip((out[0], out[2]), (a, b)):
        np.testing.assert_allclose(insert.arrays["teacher_depth"], ramp_answer(frames), atol=1e-4)
        assert insert.meta["teacher"]["depth"]["name"] == "torchscript:ramp.pt"
    single = labeler.label(window(b, "b"))[0]
    np.testing.assert_array_equal(single.arrays["teacher_depth"], out[2][0].arrays["teacher_depth"])
    np.testing.assert_array_equal(single.arrays["matches"], out[2][0].arrays["matches"])


def test_depth_beside_the_matching_gives_the_same_labels(tmp_path):
    """A GPU teacher's batch runs on a thread of its own beside the matching (``Labeler.beside``;
    forced here on the CPU): the same inserts as one after the other, and a window whose depth
    fails is still dropped with the teacher's reason, its neighbours kept."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from labelers.service import Labeler
    from reliev3r.config import PipelineConfig, build
    from reliev3r.protocol import Message
    from streamer_media import panning_frames

    path = tmp_path / "ramp.pt"
    torch.jit.script(Ramp()).save(str(path))
    cfg = build(PipelineConfig, {"labeler": {"teacher": f"torchscript:{path}?space=depth&norm=unit&multiple=16"}})

    def window(frames, wid):
        v, h, w = frames.shape[:3]
        K = np.tile(np.array([[w, 0, w / 2], [0, w, h / 2], [0, 0, 1]], np.float32), (v, 1, 1))
        return Message("window", {"window_id": wid, "source": "s", "frame_indices": list(range(v))},
                       {"frames": frames, "intrinsics": K})

    msgs = [window(panning_frames(3, 128, 96, step=s), f"w{s}") for s in (4, 5, 6)]
    out, threads = {}, []
    for beside in (False, True):
        labeler = Labeler(cfg)
        assert labeler.beside is None  # a CPU teacher runs in line
        predict_many = labeler.teacher.predict_many

        def failing_second(frames, **kw):
            threads.append(threading.current_thread().name)
            got = predict_many(frames, **kw)
            return [got[0], TeacherError("teacher_non_finite"), *got[2:]]

        labeler.teacher.predict_many = failing_second
        if beside:
            labeler.beside = ThreadPoolExecutor(1, thread_name_prefix="labeler-depth")
        try:
            out[beside] = labeler.label_many(msgs)
        finally:
            labeler.close()
    assert threads[0] == threading.current_thread().name and threads[1].startswith("labeler-depth")
    assert [r[1] for r in out[True]] == [r[1] for r in out[False]] == ["", "teacher_non_finite", ""]
    for (a, _, flags_a), (b, _, flags_b) in zip(out[False], out[True]):
        assert flags_a == flags_b
        if a is None:
            assert b is None
            continue
        assert a.arrays.keys() == b.arrays.keys() and a.meta == b.meta
        for key in a.arrays:
            assert a.arrays[key].tobytes() == b.arrays[key].tobytes(), key
