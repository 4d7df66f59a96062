"""How far a score could move with other held-out windows: percentile bootstrap intervals over
windows for one model's mean metric, and paired ones for the ratio of two models' means on the
same windows (``reliev3r eval --compare``).

Every metric of ``evaluation.metrics`` is a mean over windows of a per-window score, so a
resample of the windows (with replacement) is a resample of the score. Pairing matters: two
models scored on the same windows share the windows' difficulty, and the interval of their ratio
comes from resampling the windows once for both (Efron & Tibshirani, An Introduction to the
Bootstrap, 1993, ch. 13 for the percentile interval). The intervals say how much the windows
chosen move a figure, not how much another training seed would; a comparison of runs needs both.
"""

from __future__ import annotations

import numpy as np

RESAMPLES = 2000
"""Bootstrap resamples (Efron & Tibshirani, ch. 19: at least 1,000 for a percentile interval)."""

LEVEL = 0.95

KEYS = ("absrel_med", "absrel_lsq_frame", "ate", "rta30", "auc30")
"""The metrics ``reliev3r eval`` gives intervals for: registered depth, per-frame depth, the
trajectory, and relative poses."""


def _indices(n: int, resamples: int, seed: int) -> np.ndarray:
    """[resamples, n] window indices drawn with replacement (the same for every metric and
    model of one evaluation: pairs stay paired)."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def _percentiles(values: np.ndarray, level: float) -> tuple[float, float]:
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(values, [tail, 100 - tail])
    return float(lo), float(hi)


def column(rows: list[dict[str, float]], key: str) -> np.ndarray | None:
    """Per-window values of ``key`` as float64, or None when a window lacks it."""
    if not rows or any(key not in r for r in rows):
        return None
    return np.array([r[key] for r in rows], dtype=np.float64)


def mean_interval(values: np.ndarray, *, resamples: int = RESAMPLES, level: float = LEVEL,
                  seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (one per window)."""
    idx = _indices(len(values), resamples, seed)
    return _percentiles(values[idx].mean(axis=1), level)


def ratio_interval(values: np.ndarray, against: np.ndarray, *, resamples: int = RESAMPLES, level: float = LEVEL,
                   seed: int = 0) -> tuple[float, float] | None:
    """Paired percentile bootstrap interval of mean(values) / mean(against), the two scored on
    the same windows in the same order; None when a resample's ``against`` mean is 0 (e.g. an
    AUC of 0: no ratio to speak of)."""
    if values.shape != against.shape:
        raise ValueError(f"paired scores need the same windows: {values.shape} against {against.shape}")
    idx = _indices(len(values), resamples, seed)
    den = against[idx].mean(axis=1)
    if np.any(den == 0):
        return None
    return _percentiles(values[idx].mean(axis=1) / den, level)


def intervals(per_window: list[dict[str, float]], *, keys: tuple[str, ...] = KEYS, resamples: int = RESAMPLES,
              level: float = LEVEL, seed: int = 0) -> dict[str, tuple[float, float]]:
    """The interval of the mean of each of ``keys`` that every window of ``per_window`` has."""
    cols = {k: c for k in keys if (c := column(per_window, k)) is not None}
    return {k: mean_interval(c, resamples=resamples, level=level, seed=seed) for k, c in cols.items()}


def ratio_intervals(per_window: list[dict[str, float]], against: list[dict[str, float]], *,
                    keys: tuple[str, ...] = KEYS, resamples: int = RESAMPLES, level: float = LEVEL,
                    seed: int = 0) -> dict[str, tuple[float, float] | None]:
    """The paired interval of the ratio of means, ``per_window`` over ``against`` (the same
    windows in the same order), of each of ``keys`` both have."""
    if len(per_window) != len(against):
        raise ValueError(f"paired scores need the same windows: {len(per_window)} against {len(against)}")
    out = {}
    for k in keys:
        a, b = column(per_window, k), column(against, k)
        if a is not None and b is not None:
            out[k] = ratio_interval(a, b, resamples=resamples, level=level, seed=seed)
    return out


def interval_table(per_window: dict[str, list[dict[str, float]]], ratios: list[tuple[str, str]],
                   titles: dict[str, str], *, keys: tuple[str, ...] = KEYS, resamples: int = RESAMPLES,
                   level: float = LEVEL, seed: int = 0) -> tuple[str, dict[str, dict[str, list[float] | None]]]:
    """A markdown table and its numbers: per row of ``per_window`` each of ``keys`` as "mean
    [lo, hi]", then per ``(row, reference)`` of ``ratios`` the ratio of their means as "r x [lo,
    hi]" (paired). The numbers: row name -> key -> [estimate, lo, hi] (None: no ratio)."""
    present = [k for k in keys if any(column(rows, k) is not None for rows in per_window.values())]
    numbers: dict[str, dict[str, list[float] | None]] = {}
    for name, rows in per_window.items():
        got = intervals(rows, keys=tuple(present), resamples=resamples, level=level, seed=seed)
        numbers[name] = {k: [float(column(rows, k).mean()), *got[k]] for k in got}
    for name, reference in ratios:
        got = ratio_intervals(per_window[name], per_window[reference], keys=tuple(present), resamples=resamples,
                              level=level, seed=seed)
        cells: dict[str, list[float] | None] = {}
        for k, interval in got.items():  # None: a reference mean of 0 in some resample (and so no ratio)
            cells[k] = None if interval is None else [
                float(column(per_window[name], k).mean() / column(per_window[reference], k).mean()), *interval]
        numbers[f"{name} / {reference}"] = cells
    ratio_rows = {f"{name} / {reference}" for name, reference in ratios}
    lines = ["| | " + " | ".join(titles.get(k, k) for k in present) + " |", "|---|" + "---:|" * len(present)]
    for name, cells in numbers.items():
        fmt = "{:.2f}x [{:.2f}, {:.2f}]" if name in ratio_rows else "{:.3f} [{:.3f}, {:.3f}]"
        lines.append(f"| {name} | " + " | ".join(fmt.format(*cells[k]) if cells.get(k) else "–" for k in present)
                     + " |")
    return "\n".join(lines), numbers
