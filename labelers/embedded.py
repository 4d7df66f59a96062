"""The embedded default depth teacher: a small U-Net trained by ``reliev3r teacher-train``.

It works offline on a fresh machine: its weights ship inside the package
(``labelers/weights/embedded_depth.safetensors``, fp16) with a JSON meta beside them that
records the recipe, the data, the steps and the measured accuracy. It was trained from scratch
on the project's synthetic world only (no pretrained weights, no real images), so it is a
coarse teacher: see the meta's ``metrics`` and ``docs/RESULTS.md`` for how coarse.

Output: relative z-depth (``space = "depth"``; larger = farther) at the frames' own
resolution. The shipped weights were trained to be right up to a scale per frame
(``reliev3r teacher-train alignment=scale``; the meta's ``ambiguity``), which fixed how near
their near points are (7-Scenes AbsRel after median scaling 0.27, 0.93 before); consumers
still take the output as known up to a scale *and shift*, as for any relative teacher: the
learner registers each view's shift to the matches' triangulation, which trained a better
model than taking the teacher's own shift (docs/RESULTS.md, issue 21). ``version`` is the
sha256 (12 hex) of the weights file, so labels name exactly the weights that made them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from labelers.config import LabelerConfig
from labelers.depth_models import TorchDepthTeacher
from reliev3r import durable

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
WEIGHTS = WEIGHTS_DIR / "embedded_depth.safetensors"
META = WEIGHTS_DIR / "embedded_depth.json"
_LABELER = LabelerConfig()
"""Where the teacher's keyword defaults come from (``labeler.device``, ``batch_frames``,
``precision``): one default per setting, the config's."""
FORMAT = 1
"""Version of the weights+meta layout; bumped (with an upgrade function) if it changes."""
DEFAULT_WIDTHS = (32, 48, 96, 144, 192)
DEFAULT_INPUT = (192, 256)


def _block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    # GroupNorm, not BatchNorm: no running statistics, so training (synthetic batches) and
    # inference (one real frame) normalise the same way.
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.GroupNorm(8, cout), nn.SiLU(inplace=True),
        nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.GroupNorm(8, cout), nn.SiLU(inplace=True),
    )


class EmbeddedDepthNet(nn.Module):
    """U-Net: five stride-2 encoder stages, a global-context vector at 1/32, a decoder with
    skip connections back to 1/2, bilinear upsampling to the input size.

    forward(x) with x float [B, 3, H, W] RGB in [0, 1] returns
    log relative depth [B, H, W] (depth = exp(output), any scale). Sides that are not
    multiples of 32 work too: the decoder resizes to each skip's size.
    Each image is standardised by its own mean and std first: exposure and contrast of
    a camera carry no depth information, and synthetic and real images differ in both.
    """

    def __init__(self, widths: tuple[int, ...] = DEFAULT_WIDTHS):
        super().__init__()
        self.widths = tuple(int(w) for w in widths)
        enc, cin = [], 3
        for w in self.widths:
            enc.append(_block(cin, w, stride=2))
            cin = w
        self.encoder = nn.ModuleList(enc)
        top = self.widths[-1]
        self.context = nn.Sequential(nn.Linear(top, top), nn.SiLU(inplace=True), nn.Linear(top, top))
        dec = []
        for k in range(len(self.widths) - 1, 0, -1):
            dec.append(_block(self.widths[k] + self.widths[k - 1], self.widths[k - 1]))
        self.decoder = nn.ModuleList(dec)
        self.head = nn.Conv2d(self.widths[0], 1, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        std = x.std(dim=(1, 2, 3), keepdim=True).clamp(min=1e-3)
        h = (x - mean) / std
        skips = []
        for stage in self.encoder:
            h = stage(h)
            skips.append(h)
        h = h + self.context(h.mean(dim=(2, 3)))[:, :, None, None]
        for block, skip in zip(self.decoder, reversed(skips[:-1])):
            h = F.interpolate(h, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            h = block(torch.cat((h, skip), 1))
        out = self.head(h)
        out = F.interpolate(out, size=size, mode="bilinear", align_corners=False)
        return out[:, 0].float()


def weights_digest(path: Path, length: int = 12) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()[:length]


def save_weights(model: EmbeddedDepthNet, path: Path, meta: dict) -> None:
    """fp16 safetensors (half the bytes; the net runs in fp32 or bf16 anyway) and the JSON
    meta beside it (``<stem>.json``), both written atomically and durably, the weights first:
    their bytes fsynced, renamed into place and the folder fsynced before the meta is written
    (``reliev3r.durable.write``), so that after a power loss the meta, the mark of a whole
    teacher, never stands without the weights whose digest it records."""
    from safetensors.torch import save

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in model.state_dict().items()}
    data = save(tensors, metadata={"format": str(FORMAT), "widths": json.dumps(list(model.widths))})
    # mode 0644, whatever the umask: package data, readable by everyone who installs it
    durable.write(path, data, tmp=path.with_suffix(".tmp"), mode=0o644)
    meta = {"format": FORMAT, "widths": list(model.widths), **meta, "version": weights_digest(path)}
    durable.write(path.with_suffix(".json"), json.dumps(meta, indent=2) + "\n", tmp=path.with_suffix(".json.tmp"))


def load_net(path: Path = WEIGHTS) -> tuple[EmbeddedDepthNet, dict]:
    """The net (fp32, eval mode, CPU) and its meta from a weights file written by
    :func:`save_weights`. No network, no pickle."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"embedded depth weights missing: {path}")
    with safe_open(str(path), "pt") as f:
        header = f.metadata() or {}
    if header.get("format") != str(FORMAT):
        raise ValueError(f"{path}: weights format {header.get('format')!r}, expected {FORMAT}")
    model = EmbeddedDepthNet(tuple(json.loads(header["widths"])))
    model.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    meta_path = path.with_suffix(".json")
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    return model.eval(), meta


def input_size_for(height: int, width: int, base: tuple[int, int] = DEFAULT_INPUT) -> tuple[int, int]:
    """Net input (multiples of 16) with about the pixel count it was trained at and the
    frame's aspect ratio."""
    area = base[0] * base[1]
    scale = (area / (height * width)) ** 0.5
    return max(32, round(height * scale / 16) * 16), max(32, round(width * scale / 16) * 16)


def weights_file(weights: str | Path | None = None) -> Path:
    """The weights file that ``embedded`` (None: the shipped weights) or ``embedded:<weights>``
    names: a file, or the folder ``reliev3r teacher-train --out`` wrote."""
    path = Path(weights) if weights else WEIGHTS
    return path / WEIGHTS.name if path.is_dir() else path


class EmbeddedTeacher(TorchDepthTeacher):
    """The shipped U-Net behind the :class:`DepthTeacher` interface (``make_teacher("embedded")``).

    A torch teacher like the hub and TorchScript ones: the frames of every window handed in
    together go through the net in batches of ``batch_frames`` (a labeler's batch of four
    4-view windows is one forward), bf16 on CUDA, optionally compiled; the log depth is resized
    to each window's frames and exponentiated there."""

    name = "embedded-unet"
    space = "depth"

    def __init__(self, device: str = _LABELER.device, *, weights: Path | None = None,
                 batch_frames: int = _LABELER.batch_frames, precision: str = _LABELER.precision,
                 compile: str = _LABELER.compile):
        self.weights = weights_file(weights)
        net, self.meta = load_net(self.weights)
        self.version = weights_digest(self.weights)
        base = self.meta.get("input_size", DEFAULT_INPUT)
        self.base_size = (int(base[0]), int(base[1]))
        # The net standardises each image itself: it takes RGB in [0, 1] ("unit" normalisation).
        super().__init__(net, _call_net, device=device, input_size=None, keep_aspect=True, multiple=16,
                         mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), batch_frames=batch_frames,
                         precision=precision, compile=compile)

    def model_size(self, height: int, width: int) -> tuple[int, int]:
        return input_size_for(height, width, self.base_size)

    def _valid(self, prediction: torch.Tensor) -> torch.Tensor:
        return torch.isfinite(prediction)  # log depth: any finite value is a depth

    def _output(self, resized: torch.Tensor) -> torch.Tensor:
        return torch.exp(resized.clamp(-20, 20))

    def describe(self) -> dict:
        return {**super().describe(), "weights": str(self.weights), "input_size": list(self.base_size)}


def _call_net(net: EmbeddedDepthNet, x: torch.Tensor) -> torch.Tensor:
    return net(x)
