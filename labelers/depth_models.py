"""Model-backed depth teachers: Hugging Face transformers, TorchScript, ONNX, TFLite.

Every backend turns uint8 RGB frames [V,H,W,3] into float32 depth (or disparity) [V,H,W] at
the frames' own resolution, through three steps:

1. resize to the model's input size (bilinear with antialias) and normalise
   (``(x/255 - mean) / std``);
2. the forward pass, batched over all frames of all windows handed in together;
3. bilinear resize of the prediction back to each window's frame size.

Torch backends do steps 1-3 on the teacher's device: the host only copies uint8 frames into
pinned memory and starts a non-blocking copy on a side stream, so the next window's upload
overlaps the current forward. On CUDA the forward runs in bf16 autocast and, optionally,
through ``torch.compile`` (inductor) or torch-tensorrt; on CPU it runs eager in fp32.

Which space a model predicts matters downstream (the depth loss normalises in the teacher's
own space): Depth Anything and DPT predict relative inverse depth (``disparity``); ZoeDepth,
Depth Pro, GLPN and metric Depth Anything predict ``depth``. File formats carry no such
information, so ONNX / TorchScript / TFLite specs say it: ``?space=disparity``.

Spec options (query string after the path): ``space=depth|disparity``, ``size=HxW`` (model
input; default: the file's static input shape, else the frame size rounded to ``multiple``),
``multiple=N`` (input sides rounded to it; default 32; transformers models use their
processor's ``ensure_multiple_of``),
``norm=imagenet|unit`` (mean/std of ImageNet, or plain [0, 1]), ``output=<name>`` (ONNX/TFLite
output to use; default the first).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Callable, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from labelers.depth import DepthTeacher, TeacherError, sanitize

log = logging.getLogger("reliev3r.labelers")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DISPARITY_MODELS = ("depth_anything", "dpt")
"""transformers ``model_type``s whose ``predicted_depth`` is relative inverse depth."""
Compile = Literal["none", "inductor", "tensorrt"]


def file_digest(paths: Sequence[Path], length: int = 12) -> str:
    """sha256 over the files' bytes (in the given order), hex, truncated: the teacher version."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()[:length]


def parse_options(text: str) -> dict[str, str]:
    """``a=1&b=2`` -> {"a": "1", "b": "2"}; unknown keys are checked by each backend."""
    out = {}
    for part in filter(None, text.split("&")):
        key, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"teacher option {part!r} must be key=value")
        out[key.strip()] = value.strip()
    return out


def _check_options(opts: dict, allowed: set[str], spec: str) -> None:
    unknown = set(opts) - allowed
    if unknown:
        raise ValueError(f"teacher {spec!r}: unknown options {sorted(unknown)} (known: {sorted(allowed)})")


def _parse_size(text: str) -> tuple[int, int]:
    h, _, w = text.lower().partition("x")
    try:
        size = int(h), int(w or h)
    except ValueError:
        size = (0, 0)
    if min(size) < 1:
        raise ValueError(f"size must be HxW with positive integers, got {text!r}")
    return size


def _multiple(opts: dict, spec: str) -> int:
    """``?multiple=``: the model's input sides are multiples of it (32 unless said)."""
    text = opts.get("multiple", "32")
    try:
        multiple = int(text)
    except ValueError:
        multiple = 0
    if multiple < 1:
        raise ValueError(f"teacher {spec!r}: multiple must be a positive integer, got {text!r}")
    return multiple


def _space(opts: dict, default: str | None, spec: str) -> str:
    space = opts.get("space", default)
    if space not in ("depth", "disparity"):
        raise ValueError(f"teacher {spec!r}: say what the model predicts with ?space=depth or ?space=disparity")
    return space


def fit_size(height: int, width: int, target: tuple[int, int], *, keep_aspect: bool, multiple: int) -> tuple[int, int]:
    """Model input size for a frame, as the DPT/Depth Anything processors pick it: scale toward
    ``target``; with ``keep_aspect`` by the one factor closest to 1, rounded to ``multiple``."""
    th, tw = target
    sh, sw = th / height, tw / width
    if keep_aspect:
        if abs(1 - sw) < abs(1 - sh):
            sh = sw
        else:
            sw = sh

    def rnd(x: float) -> int:
        return max(multiple, int(round(x / multiple)) * multiple)

    return rnd(sh * height), rnd(sw * width)


class TorchDepthTeacher(DepthTeacher):
    """``call(module, images)`` maps normalised images [B,3,h,w] to a prediction [B,h',w'].

    ``batch_frames`` frames per forward; on CUDA bf16 autocast (``precision="auto"``) and
    optional compilation. When compiled, the last chunk is padded to ``batch_frames`` so that
    every forward has one shape (no recompilation, CUDA-graph friendly).
    """

    def __init__(self, module: torch.nn.Module | torch.jit.ScriptModule,
                 call: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor], *, device: str,
                 input_size: tuple[int, int] | None, keep_aspect: bool, multiple: int,
                 mean: Sequence[float], std: Sequence[float], batch_frames: int,
                 precision: Literal["auto", "fp32", "bf16"], compile: Compile):
        if batch_frames < 1:
            raise ValueError("batch_frames must be >= 1")
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.module = module.to(self.device).eval()
        self.call = call
        self.input_size, self.keep_aspect, self.multiple = input_size, keep_aspect, multiple
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1) * 255
        self.batch_frames = batch_frames
        if precision == "auto":
            precision = "bf16" if self.cuda else "fp32"
        self.dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        self.compiled = "none"
        self.forward = self._raw_forward
        if compile != "none" and not self.cuda:
            log.info("teacher compilation is for CUDA devices; running eager on %s", self.device)
        elif compile == "tensorrt":
            try:
                import torch_tensorrt  # noqa: F401  (registers the "tensorrt" torch.compile backend)
                self.forward = torch.compile(self._raw_forward, backend="tensorrt",
                                             options={"enabled_precisions": {self.dtype}})
                self.compiled = "tensorrt"
            except ImportError as err:
                log.warning("torch_tensorrt is not importable (%s); falling back to torch.compile "
                            "(inductor). Install the 'tensorrt' extra for the TensorRT backend.", err)
                compile = "inductor"
        if compile == "inductor" and self.cuda:
            self.forward = torch.compile(self._raw_forward, dynamic=False)
            self.compiled = "inductor"
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None

    def _raw_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.call(self.module, x)

    def model_size(self, height: int, width: int) -> tuple[int, int]:
        if self.input_size is None:
            return fit_size(height, width, (height, width), keep_aspect=True, multiple=self.multiple)
        return fit_size(height, width, self.input_size, keep_aspect=self.keep_aspect, multiple=self.multiple)

    def _upload(self, frames: np.ndarray) -> torch.Tensor:
        """uint8 [V,H,W,3] -> uint8 [V,3,H,W] on the device; on CUDA a non-blocking copy from
        pinned memory on the side stream (the caller's stream waits for it)."""
        host = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)
        if not self.cuda:
            return host
        host = host.contiguous().pin_memory()
        with torch.cuda.stream(self.copy_stream):
            dev = host.to(self.device, non_blocking=True)
        torch.cuda.current_stream(self.device).wait_stream(self.copy_stream)
        dev.record_stream(torch.cuda.current_stream(self.device))
        return dev

    def _prepare(self, frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        x = frames.float()
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        return (x - self.mean) / self.std

    @torch.inference_mode()
    def predict_many(self, windows: Sequence[np.ndarray], **_) -> list:
        """Depth of several windows in as few forwards as possible: frames are grouped by model
        input size, run ``batch_frames`` at a time, and resized back per window."""
        uploads = [self._upload(f) for f in windows]
        groups: dict[tuple[int, int], list[tuple[int, torch.Tensor]]] = {}
        for w, frames in enumerate(uploads):
            groups.setdefault(self.model_size(*frames.shape[-2:]), []).append((w, frames))
        preds: list[torch.Tensor | None] = [None] * len(windows)
        for size, members in groups.items():
            x = torch.cat([self._prepare(f, size) for _, f in members])
            out = []
            for start in range(0, len(x), self.batch_frames):
                chunk = x[start:start + self.batch_frames]
                n = len(chunk)
                if self.compiled != "none" and n < self.batch_frames:
                    chunk = torch.cat([chunk, chunk[-1:].expand(self.batch_frames - n, -1, -1, -1)])
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.dtype == torch.bfloat16):
                    y = self.forward(chunk)
                out.append(y[:n].float())
            y = torch.cat(out)
            offset = 0
            for w, frames in members:
                v = len(frames)
                preds[w] = self._to_frames(y[offset:offset + v], tuple(frames.shape[-2:]))
                offset += v
        results = []
        for p in preds:  # one device->host sync for all windows
            try:
                results.append(sanitize(p.cpu().numpy()))
            except TeacherError as err:
                results.append(err)
        return results

    def _valid(self, prediction: torch.Tensor) -> torch.Tensor:
        """The pixels of the net's own prediction that are labels: finite and positive (a
        teacher whose net predicts log depth takes every finite one)."""
        return torch.isfinite(prediction) & (prediction > 0)

    def _output(self, resized: torch.Tensor) -> torch.Tensor:
        """The label from the prediction resized to a window's frames (the prediction itself;
        a teacher whose net predicts log depth exponentiates here)."""
        return resized

    def _to_frames(self, prediction: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Labels [V,H,W] at the frames' ``size`` from a prediction [V,h,w], interpolated from
        its valid pixels alone (an invalid 0 beside a 10 would give a label of 5); NaN, so
        invalid, where less than half of a pixel's interpolation weight is valid."""
        valid = self._valid(prediction)
        weights = [torch.where(valid, prediction, 0), valid.to(prediction.dtype)]
        value, weight = F.interpolate(torch.stack(weights, 1), size=size, mode="bilinear",
                                      align_corners=False).unbind(1)
        return torch.where(weight >= 0.5, self._output(value / weight.clamp_min(0.5)), torch.nan)

    def _predict(self, frames, *, gt_depth, window_id):
        result = self.predict_many([frames])[0]
        if isinstance(result, TeacherError):
            raise result
        return result[0]


def _select_output(out, batch: int) -> torch.Tensor:
    """A prediction [B,h,w] from whatever a model returns for a ``batch`` of images (a tensor
    as :func:`_squeeze_channel` reads it, a tuple, a dict or a transformers ``ModelOutput`` with
    ``predicted_depth``)."""
    if hasattr(out, "predicted_depth"):
        out = out.predicted_depth
    elif isinstance(out, dict):
        out = out.get("predicted_depth", next(iter(out.values())))
    elif isinstance(out, (tuple, list)):
        out = out[0]
    return _squeeze_channel(out, False, batch)


class HFDepthTeacher(TorchDepthTeacher):
    """``AutoModelForDepthEstimation`` from a hub id or a local folder (offline when the folder
    or the hub cache has it). Preprocessing follows the model's image-processor config
    (size, aspect policy, multiple, mean/std), reimplemented on the device."""

    def __init__(self, source: str, *, device: str, space: str | None = None, **kw):
        try:
            from transformers import AutoModelForDepthEstimation
            from transformers.image_processing_utils import ImageProcessingMixin
        except ImportError as err:
            raise ValueError("the hf: teachers need transformers (pip install 'reliev3r[hf]')") from err
        model = AutoModelForDepthEstimation.from_pretrained(source)
        # Read the processor's config rather than instantiate AutoImageProcessor: the
        # processor classes pull torchvision/PIL, and we resize on the device anyway.
        proc, _ = ImageProcessingMixin.get_image_processor_dict(source)
        size = proc.get("size") or {}
        if "height" in size:
            input_size = (int(size["height"]), int(size["width"]))
        elif "shortest_edge" in size:
            input_size = (int(size["shortest_edge"]),) * 2
        else:
            input_size = None
        cfg = model.config
        if space is None:
            metric = getattr(cfg, "depth_estimation_type", "relative") == "metric"
            space = "disparity" if cfg.model_type in DISPARITY_MODELS and not metric else "depth"
        folder = Path(source)
        if folder.is_dir():
            files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".json"))
            digest = file_digest(files)
        else:
            digest = (getattr(cfg, "_commit_hash", None)
                      or hashlib.sha256(cfg.to_json_string().encode()).hexdigest()[:12])
        self.name = f"hf:{folder.name if folder.is_dir() else source}"
        self.version = f"{cfg.model_type}@{digest[:12]}"
        self.space = space
        super().__init__(model, _call_hf, device=device, input_size=input_size,
                         keep_aspect=bool(proc.get("keep_aspect_ratio", False)),
                         multiple=int(proc.get("ensure_multiple_of") or 1),
                         mean=proc.get("image_mean", IMAGENET_MEAN), std=proc.get("image_std", IMAGENET_STD), **kw)


def _call_hf(model, x):
    return _select_output(model(pixel_values=x), len(x))


class TorchScriptDepthTeacher(TorchDepthTeacher):
    """A TorchScript file (``torch.jit.load``, no pickle): images [B,3,h,w] -> [B,(1,)h,w]."""

    OPTIONS = {"space", "size", "multiple", "norm"}

    def __init__(self, path: str, opts: dict, *, device: str, **kw):
        _check_options(opts, self.OPTIONS, path)
        self.space = _space(opts, None, path)
        module = torch.jit.load(path, map_location=device)
        self.name = f"torchscript:{Path(path).name}"
        self.version = file_digest([Path(path)])
        mean, std = _norm(opts)
        super().__init__(module, _call_plain, device=device,
                         input_size=_parse_size(opts["size"]) if "size" in opts else None,
                         keep_aspect=False, multiple=_multiple(opts, path), mean=mean, std=std, **kw)


def _call_plain(module, x):
    return _select_output(module(x), len(x))


def _norm(opts: dict) -> tuple[Sequence[float], Sequence[float]]:
    norm = opts.get("norm", "imagenet")
    if norm == "imagenet":
        return IMAGENET_MEAN, IMAGENET_STD
    if norm == "unit":
        return (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    raise ValueError(f"norm must be 'imagenet' or 'unit', got {norm!r}")


class HostDepthTeacher(DepthTeacher):
    """Base of runtimes fed numpy arrays on the host (ONNX Runtime, LiteRT): cv2 resize and
    normalisation on the CPU, ``_run(batch float32 [B,h,w,3]) -> [B,h,w]``."""

    input_size: tuple[int, int] | None = None
    multiple: int = 32
    mean: np.ndarray
    std: np.ndarray
    max_batch: int = 1
    fixed_batch: bool = False
    """The model takes exactly ``max_batch`` images: a last, shorter chunk is padded (with its
    last image repeated) and its answers trimmed."""

    def _run(self, batch: np.ndarray) -> np.ndarray:
        raise TeacherError("no_backend", self.name)

    def _predict(self, frames, *, gt_depth, window_id):
        import cv2

        views, height, width = frames.shape[:3]
        if self.input_size is None:
            h, w = fit_size(height, width, (height, width), keep_aspect=True, multiple=self.multiple)
        else:
            h, w = self.input_size
        x = np.stack([cv2.resize(f, (w, h), interpolation=cv2.INTER_AREA if h < height else cv2.INTER_LINEAR)
                      for f in frames]).astype(np.float32)
        x = (x / 255.0 - self.mean) / self.std
        out = []
        for s in range(0, views, self.max_batch):
            chunk = x[s:s + self.max_batch]
            n = len(chunk)
            if self.fixed_batch and n < self.max_batch:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], self.max_batch - n, axis=0)])
            out.append(self._run(chunk)[:n])
        y = np.concatenate(out).astype(np.float32)
        return np.stack([_to_frame(d, height, width) for d in y])


def _to_frame(prediction: np.ndarray, height: int, width: int) -> np.ndarray:
    """A prediction [h,w] at the frame's size, interpolated from its valid (finite, positive)
    pixels alone; NaN where less than half of a pixel's interpolation weight is valid (as
    :meth:`TorchDepthTeacher._to_frames`)."""
    import cv2

    valid = np.isfinite(prediction) & (prediction > 0)
    if valid.all():
        return cv2.resize(prediction, (width, height), interpolation=cv2.INTER_LINEAR)
    value, weight = cv2.resize(np.dstack([np.where(valid, prediction, 0), valid]).astype(np.float32),
                               (width, height), interpolation=cv2.INTER_LINEAR).transpose(2, 0, 1)
    return np.where(weight >= 0.5, value / np.maximum(weight, 0.5), np.nan).astype(np.float32)


class ONNXDepthTeacher(HostDepthTeacher):
    """An ONNX file through onnxruntime: CUDA provider when the device is CUDA and the
    provider is installed, CPU otherwise. Input NCHW or NHWC float32 (or float16) RGB, the
    layout read from where its 3 channels are."""

    OPTIONS = {"space", "size", "multiple", "norm", "output"}

    def __init__(self, path: str, opts: dict, *, device: str, threads: int = 0):
        try:
            import onnxruntime as ort
        except ImportError as err:
            raise ValueError("the onnx: teachers need onnxruntime (pip install 'reliev3r[onnx]')") from err
        _check_options(opts, self.OPTIONS, path)
        self.space = _space(opts, None, path)
        providers = ["CPUExecutionProvider"]
        if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
            index = int(device.partition(":")[2] or 0)
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": index}))
        elif device.startswith("cuda"):
            log.warning("onnxruntime has no CUDA provider here; the ONNX teacher runs on the CPU")
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        self.session = ort.InferenceSession(path, sess_options=so, providers=providers)
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        shape = list(inp.shape)
        if len(shape) != 4:
            raise ValueError(f"{path}: expected a 4-d image input, got shape {shape}")
        if inp.type not in ("tensor(float)", "tensor(float16)"):
            raise ValueError(f"{path}: its input takes {inp.type}; a teacher is fed RGB images as float")
        self.input_dtype = np.float16 if inp.type == "tensor(float16)" else np.float32
        if shape[1] != 3 and shape[3] != 3 and (isinstance(shape[1], int) or isinstance(shape[3], int)):
            raise ValueError(f"{path}: expected an image input of 3 channels (RGB), got shape {shape}")
        self.nhwc = shape[1] != 3 and shape[3] == 3
        spatial = shape[1:3] if self.nhwc else shape[2:4]
        if "size" in opts:
            self.input_size = _parse_size(opts["size"])
        elif all(isinstance(s, int) for s in spatial):
            self.input_size = (spatial[0], spatial[1])
        self.multiple = _multiple(opts, path)
        self.fixed_batch = isinstance(shape[0], int)
        self.max_batch = shape[0] if self.fixed_batch else 64
        names = [o.name for o in self.session.get_outputs()]
        self.output = opts.get("output", names[0])
        if self.output not in names:
            raise ValueError(f"{path}: no output {self.output!r} (outputs: {names})")
        mean, std = _norm(opts)
        self.mean, self.std = np.float32(mean), np.float32(std)
        self.name = f"onnx:{Path(path).name}"
        self.version = file_digest([Path(path)])
        self.providers = self.session.get_providers()

    def _run(self, batch):
        x = batch if self.nhwc else batch.transpose(0, 3, 1, 2)
        y = self.session.run([self.output], {self.input_name: np.ascontiguousarray(x, self.input_dtype)})[0]
        return _squeeze_channel(y, self.nhwc, len(batch))


def _squeeze_channel(y, nhwc: bool, batch: int):
    """[B,h,w] of a model's output for a ``batch`` of images (a numpy array or a tensor):
    [B,h,w]; with one channel where the input has its channels or on the other side
    ([B,1,h,w] or [B,h,w,1], whatever the input's layout); [h,w] for a batch of one (a model
    that squeezes its output)."""
    if y.ndim == 4:
        axis = next((a for a in ((3, 1) if nhwc else (1, 3)) if y.shape[a] == 1), None)
        if axis is None:
            raise TeacherError("teacher_bad_output", f"expected one depth channel, got shape {tuple(y.shape)}")
        y = y[..., 0] if axis == 3 else y[:, 0]
    elif y.ndim == 2 and batch == 1:
        y = y[None]
    if y.ndim != 3 or y.shape[0] != batch:
        raise TeacherError("teacher_bad_output", f"expected [{batch},h,w], got shape {tuple(y.shape)}")
    return y


def _quantisation(detail: dict, path: str, what: str) -> tuple[float, int] | None:
    """(scale, zero point) of a quantised TFLite tensor (real = scale * (code - zero point)),
    None for a float one."""
    dtype = np.dtype(detail["dtype"])
    if dtype.kind == "f":
        return None
    scale, zero = detail["quantization"]
    if dtype.kind not in "iu" or not scale:
        raise ValueError(f"{path}: its {what} is {dtype.name} without quantisation parameters; "
                         "a teacher takes float or quantised tensors")
    return float(scale), int(zero)


class TFLiteDepthTeacher(HostDepthTeacher):
    """A TFLite file through ``ai-edge-litert`` (CPU). Mobile depth models ship this way.
    Input NHWC RGB, float or quantised (fed its codes); output by name (``?output=``) or the
    first, float or quantised (read through its scale and zero point)."""

    OPTIONS = {"space", "norm", "output", "threads"}

    def __init__(self, path: str, opts: dict, *, device: str, default_output: str | None = None,
                 default_space: str | None = None, default_norm: str = "unit", name: str = "tflite"):
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError as err:
            raise ValueError("the tflite: teachers need ai-edge-litert (pip install 'reliev3r[tflite]')") from err
        _check_options(opts, self.OPTIONS, path)
        self.space = _space(opts, default_space, path)
        threads = int(opts.get("threads", max(1, torch.get_num_threads())))
        self.interpreter = Interpreter(model_path=path, num_threads=threads)
        self.interpreter.allocate_tensors()
        inp = self.interpreter.get_input_details()[0]
        self.input_index = int(inp["index"])
        _, h, w, c = (int(s) for s in inp["shape"])
        if c != 3:
            raise ValueError(f"{path}: expected an NHWC RGB input, got shape {inp['shape'].tolist()}")
        self.input_size = (h, w)
        self.input_dtype, self.input_quant = np.dtype(inp["dtype"]), _quantisation(inp, path, "input")
        outputs = {o["name"]: o for o in self.interpreter.get_output_details()}
        wanted = opts.get("output", default_output or next(iter(outputs)))
        if wanted not in outputs:
            raise ValueError(f"{path}: no output {wanted!r} (outputs: {sorted(outputs)})")
        self.output_index = int(outputs[wanted]["index"])
        self.output_quant = _quantisation(outputs[wanted], path, "output")
        mean, std = _norm({"norm": opts.get("norm", default_norm)})
        self.mean, self.std = np.float32(mean), np.float32(std)
        self.name = f"{name}:{Path(path).name}"
        self.version = file_digest([Path(path)])
        self.max_batch = 1  # the interpreter's input has a fixed batch of one

    def _run(self, batch):
        x = np.ascontiguousarray(batch, np.float32)
        if self.input_quant is not None:
            scale, zero = self.input_quant
            limits = np.iinfo(self.input_dtype)
            x = np.clip(np.round(x / scale + zero), limits.min, limits.max)
        self.interpreter.set_tensor(self.input_index, x.astype(self.input_dtype))
        self.interpreter.invoke()
        y = self.interpreter.get_tensor(self.output_index).astype(np.float32)
        if self.output_quant is not None:
            scale, zero = self.output_quant
            y = (y - zero) * scale
        return _squeeze_channel(y, True, len(batch))


PYDNET_OUTPUT = "PSD/resize_images/ResizeBilinear"
"""PyDNet++ (mobilePydnet) TFLite: of its three outputs, the full-resolution depth-like one."""


def make_model_teacher(kind: str, target: str, *, device: str, batch_frames: int, precision: str,
                       compile: Compile) -> DepthTeacher:
    """``kind`` in hf, torchscript, onnx, tflite, pydnet; ``target`` = path or hub id plus an
    optional ``?key=value&...`` option string."""
    path, _, query = target.partition("?")
    opts = parse_options(query)
    torch_kw = {"batch_frames": batch_frames, "precision": precision, "compile": compile}
    if kind == "hf":
        _check_options(opts, {"space"}, target)
        return HFDepthTeacher(path, device=device, space=_space(opts, None, target) if "space" in opts else None,
                              **torch_kw)
    if not Path(path).is_file():
        raise ValueError(f"teacher file {path!r} does not exist")
    if kind == "torchscript":
        return TorchScriptDepthTeacher(path, opts, device=device, **torch_kw)
    if kind == "onnx":
        return ONNXDepthTeacher(path, opts, device=device)
    if kind == "tflite":
        return TFLiteDepthTeacher(path, opts, device=device)
    if kind == "pydnet":
        return TFLiteDepthTeacher(path, opts, device=device, default_output=PYDNET_OUTPUT,
                                  default_space="depth", name="pydnet")
    raise ValueError(f"unknown teacher backend {kind!r}")


def describe_runtime(teacher: DepthTeacher) -> dict:
    """Small facts for logs: device, dtype, compiled backend or providers."""
    out = {}
    for key in ("device", "compiled", "providers", "batch_frames"):
        if hasattr(teacher, key):
            out[key] = str(getattr(teacher, key))
    if hasattr(teacher, "dtype"):
        out["dtype"] = str(teacher.dtype).removeprefix("torch.")
    return out


__all__ = ["HFDepthTeacher", "TorchScriptDepthTeacher", "ONNXDepthTeacher", "TFLiteDepthTeacher",
           "TorchDepthTeacher", "make_model_teacher", "fit_size", "describe_runtime", "PYDNET_OUTPUT"]
