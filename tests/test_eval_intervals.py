"""``evaluation.intervals``: bootstrap intervals over held-out windows, known answers and the
properties the math gives (paired ratios of proportional scores are exact; coverage near the
level on a known distribution)."""

import numpy as np
import pytest

from evaluation.intervals import column, intervals, mean_interval, ratio_interval, ratio_intervals


def test_a_constant_score_has_a_point_interval_and_two_windows_span_both():
    assert mean_interval(np.full(7, 0.25)) == (0.25, 0.25)
    # two windows: resampled means are 0, 0.5, 1 with chances 1/4, 1/2, 1/4
    assert mean_interval(np.array([0.0, 1.0])) == (0.0, 1.0)


def test_paired_ratio_of_proportional_scores_is_exact_however_the_windows_differ():
    """Windows of very different difficulty: a model at exactly 2x (and within 1 % of 1.1x) its
    sibling on every window has a ratio interval of [2, 2] (within [1.089, 1.111]), however wide
    each mean's own interval is."""
    rng = np.random.default_rng(3)
    sibling = rng.lognormal(-2.0, 1.0, size=24)
    assert ratio_interval(2 * sibling, sibling) == (2.0, 2.0)
    noisy = 1.1 * sibling * rng.uniform(0.99, 1.01, size=24)
    lo, hi = ratio_interval(noisy, sibling)
    assert 1.1 * 0.99 <= lo <= hi <= 1.1 * 1.01
    wide_lo, wide_hi = mean_interval(sibling)
    assert (wide_hi - wide_lo) / sibling.mean() > 10 * (hi - lo) / 1.1


def test_coverage_is_near_the_level_on_a_known_distribution():
    """95 % intervals of the mean of 30 normal scores cover the true mean in about 95 % of 300
    draws (the percentile bootstrap runs a little short at n = 30: 0.88-0.99 allowed)."""
    rng = np.random.default_rng(0)
    covered = 0
    for trial in range(300):
        values = rng.normal(0.2, 0.05, size=30)
        lo, hi = mean_interval(values, resamples=1000, seed=trial)
        covered += lo <= 0.2 <= hi
    assert 0.88 <= covered / 300 <= 0.99


def test_rows_of_metrics_intervals_and_what_has_no_ratio():
    model = [{"absrel_med": 0.1, "auc30": 0.2}, {"absrel_med": 0.3, "auc30": 0.0}]
    sibling = [{"absrel_med": 0.05, "auc30": 0.0}, {"absrel_med": 0.15, "auc30": 0.0}]
    assert column(model, "ate") is None and column([{"ate": 1.0}, {}], "ate") is None
    got = intervals(model, keys=("absrel_med", "auc30", "ate"))
    assert set(got) == {"absrel_med", "auc30"} and got["absrel_med"] == (0.1, 0.3)
    ratios = ratio_intervals(model, sibling, keys=("absrel_med", "auc30"))
    assert ratios == {"absrel_med": (2.0, 2.0), "auc30": None}  # a sibling's AUC of 0: no ratio
    with pytest.raises(ValueError, match="same windows"):
        ratio_intervals(model, sibling[:1])
