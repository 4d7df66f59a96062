"""``reliev3r export``: the exported model (torch.export .pt2, ONNX) loads back and matches
the eager snapshot model on a random input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from learner.snapshot import load_model
from reliev3r import cli
from reliev3r.export import ExportedFFRM, format_of, run_export
from tests.tiny_snapshot import make_tiny_snapshot

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    return make_tiny_snapshot(tmp_path_factory.mktemp("run"), steps=1)


def _check(snapshot, path, fmt):
    model, _ = load_model(snapshot, "cpu")
    images = torch.rand(1, 3, 3, 48, 64, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        eager = ExportedFFRM(model)(images)
    if fmt == "torch-export":  # the user's way of loading it, not our helper
        with torch.no_grad():
            got = [t.numpy() for t in torch.export.load(str(path)).module()(images)]
    else:
        ort = pytest.importorskip("onnxruntime")
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        assert [o.name for o in session.get_outputs()] == ["depth", "confidence", "cam_to_world"]
        got = session.run(None, {"images": images.numpy()})
    assert [g.shape for g in got] == [(1, 3, 48, 64), (1, 3, 48, 64), (1, 3, 4, 4)]
    for e, g in zip(eager, got):
        np.testing.assert_allclose(g, e.numpy(), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(run_export(path, fmt, images.numpy())[2], eager[2].numpy(), atol=1e-4)
    info = json.loads(path.with_name(path.name + ".json").read_text())
    assert info["format"] == fmt and info["inputs"]["images"] == [1, 3, 3, 48, 64]
    assert max(info["max_abs_difference_to_eager"].values()) < 1e-4


def test_torch_export(snapshot, tmp_path):
    out = tmp_path / "model.pt2"
    assert cli.main(["export", "--checkpoint", str(snapshot), "--out", str(out), "--views", "3"]) == 0
    _check(snapshot, out, "torch-export")


def test_onnx_export(snapshot, tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    out = tmp_path / "model.onnx"
    argv = ["export", "--checkpoint", str(snapshot), "--out", str(out), "--views", "3", "--height", "48",
            "--width", "64"]
    assert cli.main(argv) == 0
    _check(snapshot, out, "onnx")


def test_onnx_export_of_a_model_with_the_scale_head(tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    snap = make_tiny_snapshot(tmp_path / "run", steps=1, scale_head=True)
    out = tmp_path / "model.onnx"
    assert cli.main(["export", "--checkpoint", str(snap), "--out", str(out), "--views", "3"]) == 0
    _check(snap, out, "onnx")


def test_format_and_size_checks(snapshot, tmp_path, capsys):
    assert format_of(tmp_path / "m.onnx", None) == "onnx"
    assert format_of(tmp_path / "m.bin", "torch-export") == "torch-export"
    with pytest.raises(ValueError, match="--format"):
        format_of(tmp_path / "m.bin", None)
    # said in a line, exit 2 (a bad value), not a traceback
    assert cli.main(["export", "--checkpoint", str(snapshot), "--out", str(tmp_path / "m.pt2"), "--height", "50"]) == 2
    assert "multiples of the patch size" in capsys.readouterr().err
