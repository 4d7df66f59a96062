"""``learner.api.Reconstructor.run(..., poses=...)``: "fitted" (the default) returns the poses
``learner.posefit.fit_poses`` fits to the returned depth, the pose head's poses and the window's
verified matches (found as the labelers and ``reliev3r eval`` find them), with the points of those
poses; "model" returns the pose head's poses as the model gives them. A tiny snapshot trained a
few CPU steps at 96x128 on a ray-cast room (``reliev3r.synthetic``): nothing here asserts how
good its depth or poses are, only which poses come back."""

from __future__ import annotations

import re

import cv2
import numpy as np
import pytest
import torch

from labelers.config import LabelerConfig
from labelers.matches import make_matcher, match_every_pair, match_size
from learner.api import DEFAULT_HFOV_DEG, Reconstructor
from learner.posefit import fit_poses
from reliev3r import geometry, imaging, synthetic
from tests.tiny_snapshot import make_tiny_snapshot

HEIGHT, WIDTH = 96, 128


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    return make_tiny_snapshot(tmp_path_factory.mktemp("run"), height=HEIGHT, width=WIDTH)


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    """Four frames of a rendered room, two clip frames apart (SIFT finds tens of matches a pair)."""
    scene = synthetic.render_scene(0, frames=40, height=HEIGHT, width=WIDTH, select=[0, 2, 4, 6])
    return list(scene.images.numpy())


def window_matches(images: list[np.ndarray], matcher: str, threshold_px: float) -> np.ndarray:
    """The verified matches of a window of ``images`` at the model's size, without intrinsics, as
    ``reliev3r eval`` finds them, with a matcher of its own: on the images resized to
    ``match_size`` (640 pixels on the long side), brought to the model's pixels through the
    intrinsics of both sizes."""
    h, w = images[0].shape[:2]
    big_h, big_w = match_size(h, w)
    big = np.stack([cv2.resize(im, (big_w, big_h), interpolation=cv2.INTER_LINEAR) for im in images])
    found = match_every_pair(big, make_matcher(matcher), threshold_px=threshold_px)
    k = geometry.intrinsics_from_fov(DEFAULT_HFOV_DEG, w, h)  # the Reconstructor's for frames given without
    at = [geometry.resize_intrinsics(k, sx, sy).numpy() for sx, sy in ((big_w / w, big_h / h), (1.0, 1.0))]
    return imaging.rescale_matches(found, *(np.stack([K] * len(images)) for K in at))


def unprojected(out: dict) -> np.ndarray:
    """World points [V,H,W,3] of ``out``'s depth, intrinsics and cam_to_world (float64)."""
    v, h, w = out["depth"].shape
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    pixels = np.stack([xs, ys, np.ones_like(xs)], -1).reshape(-1, 3)
    rays = np.einsum("vij,nj->vni", np.linalg.inv(out["intrinsics"].astype(np.float64)), pixels)
    cam = rays * out["depth"].reshape(v, -1, 1)
    c2w = out["cam_to_world"].astype(np.float64)
    return (np.einsum("vij,vnj->vni", c2w[:, :3, :3], cam) + c2w[:, None, :3, 3]).reshape(v, h, w, 3)


def test_fitted_poses_are_fit_poses_of_the_heads_output_and_the_windows_matches(snapshot, images):
    """The default: every output but the poses and points is the model's as with ``poses="model"``;
    the poses are ``fit_poses`` of the returned depth and intrinsics, the pose head's poses and the
    window's matches (SIFT at ``labeler.ransac_threshold_px``, ``LabelerConfig``'s defaults, on the frames at
    640 pixels on the long side), bit for bit,
    ``fitted`` says which views the fit placed, and the points are the depth unprojected with the
    fitted poses."""
    rec = Reconstructor.from_snapshot(snapshot, device="cpu")
    fitted, head = rec.run(images), rec.run(images, poses="model")
    for key in ("depth", "confidence", "intrinsics", "images"):
        np.testing.assert_array_equal(fitted[key], head[key], err_msg=key)
    defaults = LabelerConfig()
    matches = window_matches(images, defaults.matcher, defaults.ransac_threshold_px)
    want = fit_poses(head["depth"], head["cam_to_world"].astype(np.float64), head["intrinsics"], matches)
    assert want.fitted[1:].any(), "the rendered room should let the fit place a view: else nothing is compared"
    assert fitted["cam_to_world"].dtype == np.float32
    np.testing.assert_array_equal(fitted["cam_to_world"], want.cam_to_world.astype(np.float32))
    np.testing.assert_array_equal(fitted["fitted"], want.fitted)
    assert not np.array_equal(fitted["cam_to_world"], head["cam_to_world"])
    scale = float(np.abs(fitted["points"]).max())
    np.testing.assert_allclose(fitted["points"], unprojected(fitted), rtol=0, atol=1e-5 * scale)
    np.testing.assert_allclose(head["points"], unprojected(head), rtol=0, atol=1e-5 * scale)


def test_model_poses_are_the_pose_heads_as_the_model_gives_them(snapshot, images):
    """``poses="model"``: the pose head's cam_to_world of the resized window, as before the fit
    was the default; ``fitted`` is False for every view (none was placed by matches)."""
    rec = Reconstructor.from_snapshot(snapshot, device="cpu")
    out = rec.run(images, poses="model")
    x = torch.from_numpy(out["images"]).permute(0, 3, 1, 2).float().div(255.0)[None]
    with torch.no_grad():
        pred = rec.model(x)
    np.testing.assert_array_equal(out["cam_to_world"], pred.cam_to_world[0].numpy())
    assert out["fitted"].dtype == bool and out["fitted"].tolist() == [False] * len(images)


def test_the_matcher_and_its_threshold_are_the_reconstructors_made_once(snapshot, images):
    """``from_snapshot(..., matcher=, threshold_px=)`` (``reliev3r reconstruct`` passes its config's
    ``labeler.matcher`` and ``ransac_threshold_px``) gives the matches the poses are fitted to; the
    matcher is made once and kept, so a frame seen again (the overlap of consecutive windows) is
    not detected again."""
    rec = Reconstructor.from_snapshot(snapshot, device="cpu", matcher="orb", threshold_px=2.0)
    out = rec.run(images)
    matches = window_matches(images, "orb", 2.0)
    head = rec.run(images, poses="model")
    want = fit_poses(head["depth"], head["cam_to_world"].astype(np.float64), head["intrinsics"], matches)
    np.testing.assert_array_equal(out["cam_to_world"], want.cam_to_world.astype(np.float32))
    matcher = rec.matcher
    assert matcher.kind == "orb" and (matcher.computed, matcher.reused) == (4, 0)
    rec.run(images[2:] + images[:1])
    assert rec.matcher is matcher and (matcher.computed, matcher.reused) == (4, 3)


def test_a_single_image_keeps_the_heads_pose(snapshot, images):
    """One image: nothing to fit, its pose is the pose head's (the first view anchors a fit)."""
    rec = Reconstructor.from_snapshot(snapshot, device="cpu")
    out = rec.run(images[:1])
    np.testing.assert_array_equal(out["cam_to_world"], rec.run(images[:1], poses="model")["cam_to_world"])
    assert out["fitted"].tolist() == [True]


def test_bad_poses_matcher_or_threshold_are_refused_naming_the_choices(snapshot, images):
    rec = Reconstructor.from_snapshot(snapshot, device="cpu")
    with pytest.raises(ValueError, match=r"poses: 'fitted' or 'model', got 'head'"):
        rec.run(images, poses="head")
    with pytest.raises(ValueError, match=r"matcher: one of sift, orb, xfeat, got 'surf'"):
        Reconstructor.from_snapshot(snapshot, device="cpu", matcher="surf")
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"threshold_px: a finite number of pixels > 0"):
            Reconstructor.from_snapshot(snapshot, device="cpu", threshold_px=bad)


def test_the_fits_matching_on_threads_gives_the_same_poses_and_threads_are_checked(snapshot, images):
    """``threads=2`` (``reliev3r reconstruct`` passes ``labeler.cpu_threads``): the features and the
    verification of the fit's matching on a pool, the same poses bit for bit; a count that is no
    whole number >= 1 is refused naming it."""
    one = Reconstructor.from_snapshot(snapshot, device="cpu").run(images)
    two = Reconstructor.from_snapshot(snapshot, device="cpu", threads=2).run(images)
    np.testing.assert_array_equal(two["cam_to_world"], one["cam_to_world"])
    np.testing.assert_array_equal(two["fitted"], one["fitted"])
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match=f"threads: a whole number >= 1, got {re.escape(repr(bad))}"):
            Reconstructor.from_snapshot(snapshot, device="cpu", threads=bad)
