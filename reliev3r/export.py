"""``reliev3r export``: a snapshot's model as a deployable file, checked against eager.

Formats (static shapes: one batch of ``views`` images of ``height`` x ``width``, which must
be multiples of the patch size; export again for another size). By default ``views`` is the
run's ``streamer.views`` and the size the snapshot's ``image_size`` (else the run's
``streamer.height`` x ``width``): the run's ``config.yaml`` is read as ``export --colmap`` reads it
(``reliev3r.config.with_run_config``):

* ``torch-export`` (``.pt2``): ``torch.export.export`` + ``torch.export.save``; load with
  ``torch.export.load(path).module()``. No pickle of Python objects is involved in loading
  beyond what ``torch.export.load`` itself does with its own archive format.
* ``onnx`` (``.onnx``): ``torch.onnx.export``, the dynamo exporter when ``onnxscript`` is
  installed, else the TorchScript one (opset 17); run with onnxruntime.

The exported graph takes ``images`` float32 [1, V, 3, H, W] RGB in [0, 1] and returns
``depth`` [1,V,H,W], ``confidence`` [1,V,H,W], ``cam_to_world`` [1,V,4,4] exactly as
:class:`learner.model.Prediction` documents.
A JSON file beside the export (``<file>.json``) records the names, shapes, snapshot and the
measured largest difference to the eager model on a random input.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

Format = Literal["torch-export", "onnx"]
OUTPUTS = ("depth", "confidence", "cam_to_world")


class ExportedFFRM(nn.Module):
    """The model with a tuple output (exporters take tensors, not dataclasses)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        pred = self.model(images)
        return pred.depth, pred.confidence, pred.cam_to_world


def format_of(path: Path, fmt: str | None) -> Format:
    if fmt:
        if fmt not in ("torch-export", "onnx"):
            raise ValueError(f"format must be torch-export or onnx, got {fmt!r}")
        return fmt  # type: ignore[return-value]
    suffix = Path(path).suffix.lower()
    if suffix == ".onnx":
        return "onnx"
    if suffix == ".pt2":
        return "torch-export"
    raise ValueError(f"{path}: say --format (or name the file .pt2 or .onnx)")


def export_model(model: nn.Module, path: Path, *, fmt: Format, views: int, height: int, width: int) -> list[str]:
    """Write the export of ``model`` (CPU, eval) to ``path``; return its output names."""
    wrapper = ExportedFFRM(model.cpu().eval()).eval()
    p = model.cfg.patch_size
    if height % p or width % p:
        raise ValueError(f"height and width must be multiples of the patch size {p}, got {height}x{width}")
    example = torch.rand(1, views, 3, height, width)
    names = list(OUTPUTS)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        if fmt == "torch-export":
            program = torch.export.export(wrapper, (example,))
            torch.export.save(program, str(path))
        else:
            try:
                import onnxscript  # noqa: F401  (the dynamo exporter needs it)
                dynamo = True
            except ImportError:
                dynamo = False
            torch.onnx.export(wrapper, (example,), str(path), input_names=["images"], output_names=names,
                              dynamo=dynamo, **({} if dynamo else {"opset_version": 17}))
    return names


def run_export(path: Path, fmt: Format, images: np.ndarray) -> list[np.ndarray]:
    """Outputs of an exported file on ``images`` [1,V,3,H,W] float32 (numpy)."""
    if fmt == "torch-export":
        module = torch.export.load(str(path)).module()
        with torch.no_grad():
            return [t.numpy() for t in module(torch.from_numpy(images))]
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: images})


def max_difference(model: nn.Module, path: Path, fmt: Format, *, views: int, height: int, width: int,
                   seed: int = 0) -> dict[str, float]:
    """Largest absolute difference per output between the export and eager ``model``."""
    images = torch.rand(1, views, 3, height, width, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        eager = ExportedFFRM(model.cpu().eval())(images)
    exported = run_export(path, fmt, images.numpy())
    return {name: float(np.abs(e.numpy() - x).max()) for name, e, x in zip(OUTPUTS, eager, exported)}


def main(cfg, args: argparse.Namespace) -> int:
    from learner.snapshot import load_model, resolve_given
    from reliev3r.config import run_folder, with_run_config

    out = Path(args.out)
    fmt = format_of(out, args.format)
    snap = resolve_given("--checkpoint", Path(args.checkpoint))
    # the run's windows (views; the size where the snapshot does not record it), as export --colmap reads them
    cfg = with_run_config(cfg, run_folder(snap), files=getattr(args, "config", []),
                          overrides=getattr(args, "overrides", []))
    model, meta = load_model(snap, "cpu")
    size = meta.get("image_size") or (cfg.streamer.height, cfg.streamer.width)
    views = args.views or cfg.streamer.views
    height, width = args.height or int(size[0]), args.width or int(size[1])
    with tqdm(total=2, desc=f"export {fmt}", unit="stage") as bar:
        names = export_model(model, out, fmt=fmt, views=views, height=height, width=width)
        bar.update()
        diff = max_difference(model, out, fmt, views=views, height=height, width=width)
        bar.update()
    info = {"format": fmt, "snapshot": str(snap), "step": meta["step"], "model": meta.get("model"),
            "inputs": {"images": [1, views, 3, height, width]}, "outputs": names,
            "max_abs_difference_to_eager": diff, "torch": torch.__version__}
    Path(f"{out}.json").write_text(json.dumps(info, indent=2))
    print(json.dumps(info, indent=2))
    worst = max(diff.values())
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB); largest difference to eager {worst:.2e}")
    return 0 if worst < 1e-3 else 1
