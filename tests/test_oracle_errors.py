"""The oracle teacher's error control (``oracle?strength=S``, ``oracle?gamma=..&warp=..``):
the plain oracle is unchanged, the error grows with the setting, every output is a usable
label, and the version names the settings."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from evaluation.baselines import teacher_window_metrics
from labelers.depth import ORACLE_UNIT, OracleTeacher, make_teacher

STRENGTHS = (0.0, 0.5, 1.0, 2.0, 4.0)


def scene(views: int = 3, height: int = 60, width: int = 80) -> np.ndarray:
    """A floor receding from 6 m to a far wall at 2 m and a box at 1.2 m in front: a wide depth
    range and sharp depth edges, so every structured error has something to act on."""
    y = np.mgrid[0:height, 0:width][0].astype(np.float32)
    out = []
    for v in range(views):
        d = 2.0 + 4.0 * (1 - y / height) + 0.5 * v
        d[height // 4:height // 2, width // 4 + 5 * v:width // 2 + 5 * v] = 1.2
        out.append(d)
    return np.stack(out)


def frames_for(gt: np.ndarray) -> np.ndarray:
    return np.zeros((*gt.shape, 3), np.uint8)


def lsq_error(spec: str, gt: np.ndarray, windows: int = 8) -> float:
    """Per-frame least-squares AbsRel against the truth, averaged over several window ids."""
    teacher = make_teacher(spec)
    rows = [teacher_window_metrics(*teacher.predict(frames_for(gt), gt_depth=gt, window_id=f"w:{i}"), gt,
                                   "depth")["absrel_lsq_frame"] for i in range(windows)]
    return float(np.mean(rows))


def plain_oracle_reference(gt: np.ndarray, window_id: str, noise: float = 0.03, holes: int = 3) -> np.ndarray:
    """The oracle as it was before the error control (same draws, same order)."""
    digest = hashlib.sha256(f"0:{window_id}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    views, height, width = gt.shape
    out = np.zeros_like(gt)
    for v in range(views):
        known = np.isfinite(gt[v]) & (gt[v] > 0)
        if not known.any():
            continue
        scale = np.exp(rng.uniform(np.log(0.25), np.log(4.0)))
        shift = rng.uniform(0.0, 0.5) * float(np.median(gt[v][known]))
        noisy = gt[v] * (1 + noise * rng.standard_normal((height, width))).clip(0.5, 1.5)
        d = (scale * (noisy + shift)).astype(np.float32)
        d[~known] = 0.0
        for _ in range(holes):
            hh, ww = rng.integers(1, max(2, height // 4)), rng.integers(1, max(2, width // 4))
            y, x = rng.integers(0, height - hh + 1), rng.integers(0, width - ww + 1)
            d[y:y + hh, x:x + ww] = 0.0
        out[v] = d
    return out


def test_strength_zero_is_the_plain_oracle_exactly():
    gt = scene()
    gt[1, :5] = 0  # unknown depth
    plain = make_teacher("oracle")
    assert plain.version == "1" and plain.name == "oracle-gt"
    for spec in ("oracle?strength=0", "oracle-gt?strength=0", "oracle?gamma=0&warp=0&blur=0&clip=0&noise=0.03&holes=3"):
        teacher = make_teacher(spec)
        assert teacher.version == "1" and teacher.name == "oracle-gt"
        for wid in ("a:0:0", "a:0:4"):
            d0, v0 = plain.predict(frames_for(gt), gt_depth=gt, window_id=wid)
            d1, v1 = teacher.predict(frames_for(gt), gt_depth=gt, window_id=wid)
            np.testing.assert_array_equal(d0, d1)
            np.testing.assert_array_equal(v0, v1)
            np.testing.assert_array_equal(d0, plain_oracle_reference(gt, wid))


def test_only_the_oracle_without_structured_errors_has_an_exact_shape():
    for spec in ("oracle", "oracle?strength=0", "oracle?noise=0.2&holes=8"):
        assert make_teacher(spec).exact_shape, spec
    for spec in ("oracle?strength=0.1", "oracle?gamma=0.1", "oracle?warp=0.1", "oracle?blur=0.01", "oracle?clip=0.1",
                 "none"):
        assert not make_teacher(spec).exact_shape, spec


def test_error_grows_with_strength():
    gt = scene()
    # Without noise and holes, strength 0 is an exact affine map of the truth: no error at all.
    assert lsq_error("oracle?strength=0&noise=0&holes=0", gt) < 1e-4
    errors = [lsq_error(f"oracle?strength={s}", gt) for s in STRENGTHS]
    assert errors[0] < 0.04  # 3% multiplicative noise: E|n| = 0.03 * sqrt(2 / pi) ~ 0.024
    for weaker, stronger in zip(errors, errors[1:]):
        assert stronger > 1.1 * weaker, errors
    assert errors[-1] > 0.2, errors


@pytest.mark.parametrize("key", sorted(ORACLE_UNIT))
def test_each_structured_error_grows_with_its_setting(key):
    gt = scene()
    unit = ORACLE_UNIT[key]
    none, one, two = (lsq_error(f"oracle?{key}={k * unit:g}&noise=0&holes=0", gt, windows=4) for k in (0, 1, 2))
    assert none < 1e-4 and one > 0.005 and two > 1.1 * one, (none, one, two)


def test_deterministic_per_window_id():
    gt = scene()
    a = make_teacher("oracle?strength=2")
    b = make_teacher("oracle?strength=2")
    d1, v1 = a.predict(frames_for(gt), gt_depth=gt, window_id="s:3:12")
    d2, v2 = b.predict(frames_for(gt), gt_depth=gt, window_id="s:3:12")
    d3, _ = a.predict(frames_for(gt), gt_depth=gt, window_id="s:3:16")
    np.testing.assert_array_equal(d1, d2)
    np.testing.assert_array_equal(v1, v2)
    assert not np.allclose(d1, d3)


@pytest.mark.parametrize("spec", ["oracle?strength=4", "oracle?strength=1&holes=5",
                                  "oracle?gamma=2&warp=2&blur=0.1&clip=0.9&noise=0.2"])
def test_labels_are_finite_positive_and_holes_are_zero(spec):
    gt = scene(views=4)
    gt[0, :6] = 0.0
    gt[2, 10:14, 10:20] = np.nan
    depth, valid = make_teacher(spec).predict(frames_for(gt), gt_depth=gt, window_id="x:0:0")
    assert depth.dtype == np.float32 and depth.shape == gt.shape
    assert np.isfinite(depth).all()
    assert (depth[valid] > 0).all() and (depth[~valid] == 0).all()
    assert not valid[0, :6].any() and not valid[2, 10:14, 10:20].any()  # unknown truth stays unlabelled
    holes = OracleTeacher.from_options(spec.partition("?")[2]).holes
    for v in range(gt.shape[0]):  # the holes punched into known pixels
        assert (~valid[v] & (gt[v] > 0)).any() == (holes > 0)
    no_holes = make_teacher(spec + "&holes=0").predict(frames_for(gt), gt_depth=gt, window_id="x:0:0")[1]
    np.testing.assert_array_equal(no_holes, np.isfinite(gt) & (gt > 0))


def test_options_version_and_rejections():
    teacher = make_teacher("oracle?strength=2&clip=0&holes=1")
    assert (teacher.gamma, teacher.warp, teacher.blur, teacher.clip, teacher.holes) == (
        2 * ORACLE_UNIT["gamma"], 2 * ORACLE_UNIT["warp"], 2 * ORACLE_UNIT["blur"], 0.0, 1)
    assert teacher.version.startswith("1+") and "clip" not in teacher.version and "holes=1" in teacher.version
    assert teacher.describe()["version"] == teacher.version
    assert make_teacher("oracle?strength=100").clip == 0.9  # clip saturates, the others keep growing
    versions = {make_teacher(f"oracle?strength={s}").version for s in STRENGTHS}
    assert len(versions) == len(STRENGTHS)
    for bad, match in (("oracle?contrast=1", "unknown options"), ("oracle?strength=-1", "strength"),
                       ("oracle?gamma=abc", "numbers"), ("oracle?clip=0.95", "clip"),
                       ("oracle?holes=2.5", "holes"), ("oracle?noise", "key=value"),
                       ("oracle?warp=nan", "warp")):
        with pytest.raises(ValueError, match=match):
            make_teacher(bad)
