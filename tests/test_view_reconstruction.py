"""``reliev3r view`` of a ``reconstruct`` output folder, without rerun-sdk: what the view logs
is caught by stand-ins for rerun's ``RecordingStream`` and archetypes, so the intrinsics of
each frame's camera can be checked against those ``reconstruct`` unprojected its points with."""

from __future__ import annotations

import json
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from evaluation.tum import read_tum
from reliev3r import geometry, view
from reliev3r.reconstruct import FrameStream, ReconstructOptions, reconstruct

H, W = 24, 32


class WideModel:
    """The model's interface: constant depth 2, identity-ish poses along x, and a camera that
    is not the 60 degree one (90 degrees; with ``per_window``, each window a focal length of
    its own, as a model that estimates its intrinsics may give)."""

    def __init__(self, per_window: bool) -> None:
        self.per_window, self.windows = per_window, 0

    def run(self, images, intrinsics=None, size=None, poses="fitted") -> dict:
        v = len(images)
        K = geometry.intrinsics_from_fov(90.0, W, H).numpy()
        if self.per_window:
            K[0, 0] *= 1 + 0.25 * self.windows
            K[1, 1] *= 1 + 0.25 * self.windows
        self.windows += 1
        poses = np.tile(np.eye(4, dtype=np.float32), (v, 1, 1))
        poses[:, 0, 3] = 0.1 * np.arange(v)
        depth = 2.0 + np.random.default_rng(self.windows).random((v, H, W), dtype=np.float32)
        return {"images": np.stack(images), "depth": depth, "confidence": np.full((v, H, W), 1.5, np.float32),
                "cam_to_world": poses, "intrinsics": np.repeat(K[None], v, 0), "fitted": np.zeros(v, bool)}


def _frames(n: int):
    for k in range(n):
        yield np.random.default_rng(k).integers(0, 256, (H, W, 3), dtype=np.uint8), float(k)


def logged_cameras(folder) -> list[np.ndarray]:
    """The pinhole matrix :func:`reliev3r.view.log_reconstruction` logs for each frame."""
    archetype = lambda name: (lambda *args, **kwargs: (name, args, kwargs))  # noqa: E731
    rr = SimpleNamespace(**{name: archetype(name) for name in (
        "Points3D", "LineStrips3D", "Transform3D", "Pinhole", "Image", "DepthImage")})
    logged = []
    rec = SimpleNamespace(log=lambda path, thing, static=False: logged.append(thing), set_time=lambda *a, **k: None)
    view.log_reconstruction(rec, rr, folder)
    return [np.asarray(kwargs["image_from_camera"]) for name, _, kwargs in logged if name == "Pinhole"]


@pytest.mark.parametrize("colmap", [None, "bin", "txt"])
@pytest.mark.parametrize("per_window", [False, True])
def test_a_reconstruction_is_viewed_with_the_intrinsics_it_was_made_with(tmp_path, colmap, per_window):
    """Each frame's camera and depth are drawn with the intrinsics reconstruct unprojected the
    frame with, so the drawn depth lands on the point cloud. Before, the view read them only
    from ``colmap/sparse/0/cameras.txt`` (its first camera for every frame) and otherwise
    guessed a 60 degree field of view: without ``--colmap`` and with ``--colmap`` (binary by
    default), a 90 degree camera's depth was drawn a third of the depth away from its points."""
    out = tmp_path / "rec"
    model = WideModel(per_window)
    n = 10
    reconstruct(model, FrameStream(_frames(n), None, None, n), out,
                ReconstructOptions(views=4, overlap=1, keep_fraction=1.0, colmap=colmap))
    used = []  # what reconstruct unprojected each frame with: its first window's matrix
    for k in range(n):
        starts = [s for s in (0, 3, 6) if s <= k < s + 4]
        window = starts[0] // 3
        K = geometry.intrinsics_from_fov(90.0, W, H).numpy()
        if per_window:
            K[:2, :2] *= 1 + 0.25 * window
        used.append(K)
    cameras = logged_cameras(out)
    assert len(cameras) == n
    np.testing.assert_allclose(np.stack(cameras), np.stack(used), rtol=1e-6, atol=1e-6)
    # The depth drawn through those cameras lands on the point cloud (every pixel kept, in order).
    points, _ = view.read_ply(out / "points.ply")
    _, poses = read_tum(out / "poses.txt")
    for k in (0, n - 1):
        depth = cv2.imread(str(out / "depth" / f"{k:06d}.png"), cv2.IMREAD_UNCHANGED) / 1000.0
        drawn = view.unproject(depth, cameras[k], poses[k])
        np.testing.assert_allclose(drawn, points[k * H * W:(k + 1) * H * W], atol=2e-3)
    if colmap and not per_window:  # a reconstruction from before the JSON recorded them: its COLMAP camera
        summary = json.loads((out / "reconstruction.json").read_text())
        del summary["intrinsics"]
        (out / "reconstruction.json").write_text(json.dumps(summary))
        np.testing.assert_allclose(np.stack(logged_cameras(out)), np.stack(used), rtol=1e-6, atol=1e-6)


def test_an_out_that_is_a_folder_is_refused_naming_it_before_anything_is_read(tmp_path, capsys):
    """``view --out`` naming a folder (or a file under a file) is refused in one line naming the
    option, exit 2, as ``reconstruct``'s and ``export``'s are (``reliev3r.cli.PATH_OPTIONS``),
    before the target is read or rerun-sdk is looked for."""
    from reliev3r import cli

    a_file = tmp_path / "a file"
    a_file.write_text("kept\n")
    for out, said in ((tmp_path, f"--out {tmp_path}: a folder, not a file"),
                      (a_file / "view.rrd", f"--out {a_file / 'view.rrd'}: {a_file} is not a folder")):
        assert cli.main(["view", str(tmp_path / "no such run"), "--out", str(out)]) == 2
        assert capsys.readouterr().err == f"reliev3r view: {said}\n"
    assert a_file.read_text() == "kept\n"


@pytest.mark.parametrize("value", ["0", "-1"])
def test_snapshots_below_one_are_refused_naming_the_option(tmp_path, capsys, value):
    """``view --snapshots 0`` logged no snapshot and wrote an empty recording, ``-1`` stopped in
    numpy's words: refused naming the option, exit 2, as its ``--windows`` is."""
    from reliev3r import cli

    with pytest.raises(SystemExit) as stop:
        cli.main(["view", str(tmp_path), "--snapshots", value])
    assert stop.value.code == 2 and f"argument --snapshots: must be >= 1, got {value}" in capsys.readouterr().err


def test_a_runs_evaluation_data_that_cannot_be_loaded_is_refused_naming_the_key_before_anything_is_written(
        tmp_path, capsys):
    """``view RUN`` read ``evaluator.data`` (the run's config.yaml's, or an override) only in
    ``log_run``: a spec of no form, a folder that is not there, a frame range that is none failed
    there, exit 1, "ValueError: ..." (without rerun-sdk: "needs rerun-sdk", hiding it). Checked
    as ``eval`` and ``up`` check it (``PipelineConfig.data_problem``): one line naming the key,
    exit 2, before rerun is looked for or a recording written."""
    from reliev3r import cli

    run = tmp_path / "run"
    (run / "snapshots").mkdir(parents=True)
    missing = tmp_path / "no such frames"
    out = tmp_path / "view.rrd"
    (run / "config.yaml").write_text(f"evaluator:\n  data: folder:{missing}\n")  # the run's own
    assert cli.main(["view", str(run), "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"reliev3r view: evaluator.data folder:{missing}: no such folder\n"
    spec = f"7scenes:{tmp_path}@5"  # an override on top of the run's
    assert cli.main(["view", str(run), "--out", str(out), f"evaluator.data={spec}"]) == 2
    assert capsys.readouterr().err == (f"reliev3r view: evaluator.data {spec}: frame range '5' is not @FIRST-LAST "
                                       "(frame indices, e.g. @0-99)\n")
    assert not out.exists()
