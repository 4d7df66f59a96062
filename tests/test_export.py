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


def test_the_export_takes_the_views_of_the_snapshots_run_as_export_colmap_does(tmp_path):
    """A run of 3-view windows (``streamer.views: 3`` in its ``config.yaml``; the default is 4):
    ``export --out`` without ``--views`` exports a graph of 3 views, the run's, as ``export
    --colmap``, ``eval`` and ``view`` read the run's windows; ``--views`` and ``--config`` still
    decide where given. Before, it took the default config's 4 views, so the ONNX or .pt2 file of a
    run took windows of another size than the run's, and ``export --out M --colmap D`` in one
    command wrote models of 3-view windows beside a graph of 4."""
    snap = make_tiny_snapshot(tmp_path / "run", steps=1)
    (tmp_path / "run" / "config.yaml").write_text("streamer:\n  views: 3\n")

    def exported(*extra: str) -> list[int]:
        out = tmp_path / "model.pt2"
        assert cli.main(["export", "--checkpoint", str(snap), "--out", str(out), *extra]) == 0
        return json.loads(out.with_name(out.name + ".json").read_text())["inputs"]["images"]

    assert exported() == [1, 3, 3, 48, 64]
    assert exported("--views", "2") == [1, 2, 3, 48, 64]
    (tmp_path / "other.yaml").write_text("streamer:\n  views: 5\n")
    assert exported("--config", str(tmp_path / "other.yaml")) == [1, 5, 3, 48, 64]


def test_format_and_size_checks(snapshot, tmp_path, capsys):
    assert format_of(tmp_path / "m.onnx", None) == "onnx"
    assert format_of(tmp_path / "m.bin", "torch-export") == "torch-export"
    with pytest.raises(ValueError, match="--format"):
        format_of(tmp_path / "m.bin", None)
    # said in a line, exit 2 (a bad value), not a traceback
    assert cli.main(["export", "--checkpoint", str(snapshot), "--out", str(tmp_path / "m.pt2"), "--height", "50"]) == 2
    assert "multiples of the patch size" in capsys.readouterr().err


@pytest.mark.parametrize("argv, said", [(["--height", "0"], "--height: must be >= 1, got 0"),
                                        (["--width", "-14"], "--width: must be >= 1, got -14")])
def test_sizes_below_one_are_refused_by_name(argv, said, tmp_path, capsys):
    """``--height 0`` was read as "the default" (the snapshot's size exported), ``--width -14``
    left to the patch-size check, which named no flag: refused, naming the flag, before anything
    loads (no snapshot is there to load)."""
    with pytest.raises(SystemExit) as stop:
        cli.main(["export", "--checkpoint", str(tmp_path / "nowhere"), "--out", str(tmp_path / "m.pt2"), *argv])
    assert stop.value.code == 2 and said in capsys.readouterr().err
    assert not (tmp_path / "m.pt2").exists()
