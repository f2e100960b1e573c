"""Evaluation step: discrimination, operating-point and calibration metrics with confidence intervals.

Every metric takes per-image labels ``y`` (1, 0 or NaN for unknown) and scores ``p`` (NaN for "not
scored", e.g. an image outside a fold member's held-out fold). Images with an unknown label or a
missing score are masked out, per label, before anything is computed. Scores are "higher = more
likely positive"; an image is called positive when ``p >= threshold``.

Confidence intervals:

- AUROC, AUPRC, balanced accuracy: percentile bootstrap that resamples *patients* (all images of a
  patient move together), stratified by the patient's label (positive when any of its images is
  positive), so every resample keeps the cohort's patient-level class balance.
- Sensitivity, specificity, PPV, NPV: Wilson score intervals at a fixed threshold.

Pure numpy/scipy: no scikit-learn in the hot loop (the bootstrap calls these thousands of times);
the tests check every metric against scikit-learn.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import rankdata

Metric = Callable[[np.ndarray, np.ndarray], float]


@dataclass(frozen=True)
class Interval:
    """A point estimate with the bounds of its confidence interval (NaN where undefined)."""

    value: float
    low: float
    high: float

    def to_dict(self) -> dict[str, float]:
        """The three numbers under the keys ``value``, ``low``, ``high``."""
        return {"value": float(self.value), "low": float(self.low), "high": float(self.high)}


def clean(y: Any, p: Any) -> tuple[np.ndarray, np.ndarray]:
    """Drop images with an unknown label or a missing score; check labels are 0/1.

    Args:
        y: Labels, 1/0 with NaN for unknown.
        p: Scores, NaN for not scored.

    Returns:
        ``(y, p)`` as float arrays without NaN, labels exactly 0.0 or 1.0.

    Raises:
        ValueError: Lengths differ or a label is neither 0, 1 nor NaN.
    """
    y = np.asarray(y, dtype=float).ravel()
    p = np.asarray(p, dtype=float).ravel()
    if y.shape != p.shape:
        raise ValueError(f"labels and scores must have the same length, got {y.size} and {p.size}")
    keep = ~(np.isnan(y) | np.isnan(p))
    y, p = y[keep], p[keep]
    bad = np.setdiff1d(np.unique(y), [0.0, 1.0])
    if bad.size:
        raise ValueError(f"labels must be 1, 0 or NaN (unknown), found {bad[:5].tolist()}")
    return y, p


def _class_counts(y: np.ndarray, what: str) -> tuple[int, int]:
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"{what} needs both classes, got {n_pos} positive and {n_neg} negative images")
    return n_pos, n_neg


def auroc(y: Any, p: Any) -> float:
    """Area under the ROC curve (Mann-Whitney U with midranks for ties; equals scikit-learn's).

    Raises:
        ValueError: Only one class among the known labels.
    """
    y, p = clean(y, p)
    n_pos, n_neg = _class_counts(y, "AUROC")
    ranks = rankdata(p)
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _ranked_counts(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cumulative true/false positives at each distinct score, highest score first."""
    order = np.argsort(-p, kind="mergesort")
    ys, ps = y[order], p[order]
    last = np.r_[np.flatnonzero(np.diff(ps)), ps.size - 1]
    tps = np.cumsum(ys)[last]
    fps = (last + 1) - tps
    return tps, fps, ps[last]


def auprc(y: Any, p: Any) -> float:
    """Average precision, the step-wise area under the precision-recall curve (scikit-learn's
    ``average_precision_score``). Its no-skill value is the prevalence.

    Raises:
        ValueError: No positive among the known labels.
    """
    curve = pr_points(y, p)
    return float(np.sum(np.diff(np.r_[0.0, curve["recall"]]) * curve["precision"]))


def balanced_accuracy(y: Any, p: Any, threshold: float) -> float:
    """Mean of sensitivity and specificity when ``p >= threshold`` is called positive.

    Raises:
        ValueError: Only one class among the known labels.
    """
    y, p = clean(y, p)
    n_pos, n_neg = _class_counts(y, "balanced accuracy")
    called = p >= threshold
    sens = np.count_nonzero(called & (y == 1)) / n_pos
    spec = np.count_nonzero(~called & (y == 0)) / n_neg
    return float((sens + spec) / 2)


def roc_points(y: Any, p: Any) -> dict[str, np.ndarray]:
    """ROC curve vertices: ``fpr``, ``tpr`` and ``threshold`` (first point (0, 0) at +inf).

    Raises:
        ValueError: Only one class among the known labels.
    """
    y, p = clean(y, p)
    n_pos, n_neg = _class_counts(y, "ROC curve")
    tps, fps, thr = _ranked_counts(y, p)
    return {
        "fpr": np.r_[0.0, fps / n_neg],
        "tpr": np.r_[0.0, tps / n_pos],
        "threshold": np.r_[np.inf, thr],
    }


def pr_points(y: Any, p: Any) -> dict[str, np.ndarray]:
    """Precision-recall curve at each distinct score, highest threshold first.

    Raises:
        ValueError: No positive among the known labels.
    """
    y, p = clean(y, p)
    if y.sum() == 0:
        raise ValueError(f"PR curve needs at least one positive image, got 0 of {y.size}")
    tps, fps, thr = _ranked_counts(y, p)
    return {"recall": tps / tps[-1], "precision": tps / (tps + fps), "threshold": thr}


def youden_threshold(y: Any, p: Any) -> float:
    """The threshold maximising Youden's J = sensitivity + specificity - 1.

    Candidates are the observed scores (``p >= t`` positive); on a tie the highest threshold (the
    most specific) wins.
    """
    roc = roc_points(y, p)
    j = roc["tpr"][1:] - roc["fpr"][1:]
    return float(roc["threshold"][1:][int(np.argmax(j))])


def threshold_for_sensitivity(y: Any, p: Any, target: float = 0.90) -> float:
    """The highest threshold whose sensitivity (``p >= t`` positive) is at least ``target``.

    Raises:
        ValueError: ``target`` outside (0, 1] or only one class among the known labels.
    """
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target sensitivity must be in (0, 1], got {target}")
    roc = roc_points(y, p)
    reached = np.flatnonzero(roc["tpr"][1:] >= target - 1e-12)
    return float(roc["threshold"][1:][reached[0]])


def midway_below(y: Any, p: Any, threshold: float) -> float:
    """The midpoint between ``threshold`` and the highest score below it: the same decisions (``p >= t``) on these
    images as ``threshold`` itself, with a margin on both sides.

    A threshold taken from the observed scores sits exactly on one image's score, so the smallest change to that
    score (the node's float32 probability, another CPU's kernels) flips its decision; halfway to the next score no
    such change does. Images with an unknown label or a missing score do not count, as in the choosers above.
    ``threshold`` itself is returned when no score lies below it or no float64 lies strictly between the two.
    """
    _, p = clean(y, p)
    below = p[p < threshold]
    if below.size == 0:
        return float(threshold)
    lower = float(below.max())
    middle = lower + (float(threshold) - lower) / 2
    return middle if lower < middle < threshold else float(threshold)


def wilson_ci(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a proportion ``k / n``; ``(nan, nan)`` when ``n == 0``.

    Raises:
        ValueError: ``k`` outside ``[0, n]``.
    """
    if n == 0:
        return float("nan"), float("nan")
    if not 0 <= k <= n:
        raise ValueError(f"Wilson interval needs 0 <= k <= n, got k={k}, n={n}")
    z2 = z * z
    centre = (k + z2 / 2) / (n + z2)
    half = z * np.sqrt(k * (n - k) / n + z2 / 4) / (n + z2)
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def _rate(k: int, n: int, z: float) -> dict[str, float]:
    low, high = wilson_ci(k, n, z)
    return Interval(k / n if n else float("nan"), low, high).to_dict() | {"k": k, "n": n}


def confusion_at(y: Any, p: Any, threshold: float, z: float = 1.96) -> dict[str, Any]:
    """Counts and rates when ``p >= threshold`` is called positive, each rate with a Wilson CI.

    Returns:
        ``threshold``, ``n``, ``tp``, ``fp``, ``tn``, ``fn`` and ``sensitivity``, ``specificity``,
        ``ppv``, ``npv`` as ``{"value", "low", "high", "k", "n"}`` (NaN where the denominator is 0).
    """
    y, p = clean(y, p)
    called = p >= threshold
    tp = int(np.count_nonzero(called & (y == 1)))
    fp = int(np.count_nonzero(called & (y == 0)))
    fn = int(np.count_nonzero(~called & (y == 1)))
    tn = int(np.count_nonzero(~called & (y == 0)))
    return {
        "threshold": float(threshold),
        "n": int(y.size),
        "tp": tp, "fp": fp, "tn": tn, "fn": fn,
        "sensitivity": _rate(tp, tp + fn, z),
        "specificity": _rate(tn, tn + fp, z),
        "ppv": _rate(tp, tp + fp, z),
        "npv": _rate(tn, tn + fn, z),
    }


def _check_probabilities(p: np.ndarray, what: str) -> None:
    if p.size and (p.min() < 0.0 or p.max() > 1.0):
        raise ValueError(f"{what} needs probabilities in [0, 1], got scores in [{p.min():g}, {p.max():g}]")


def brier(y: Any, p: Any) -> float:
    """Brier score: mean squared difference between probability and label (lower is better)."""
    y, p = clean(y, p)
    _check_probabilities(p, "Brier score")
    return float(np.mean((p - y) ** 2))


def reliability_curve(y: Any, p: Any, n_bins: int = 10) -> dict[str, list[float]]:
    """Observed fraction of positives against mean predicted probability in equal-width bins.

    Bins are ``[0, 1/n]``, ``(1/n, 2/n]``, ... (scikit-learn's ``calibration_curve`` convention).

    Returns:
        ``bin_edges`` (n_bins + 1), and per bin ``count``, ``mean_predicted``, ``fraction_positive``
        (NaN for an empty bin).
    """
    y, p = clean(y, p)
    _check_probabilities(p, "reliability curve")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    ids = np.searchsorted(edges[1:-1], p)
    count = np.bincount(ids, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_pred = np.bincount(ids, weights=p, minlength=n_bins) / count
        frac_pos = np.bincount(ids, weights=y, minlength=n_bins) / count
    return {
        "bin_edges": edges.tolist(),
        "count": count.tolist(),
        "mean_predicted": mean_pred.tolist(),
        "fraction_positive": frac_pos.tolist(),
    }


def ece(y: Any, p: Any, n_bins: int = 10) -> float:
    """Expected calibration error: count-weighted mean |fraction positive - mean probability| over
    the equal-width bins of :func:`reliability_curve`."""
    curve = reliability_curve(y, p, n_bins)
    count = np.asarray(curve["count"], dtype=float)
    gap = np.abs(np.asarray(curve["fraction_positive"]) - np.asarray(curve["mean_predicted"]))
    filled = count > 0
    return float(np.sum(count[filled] * gap[filled]) / count.sum()) if count.sum() else float("nan")


def _group_layout(groups: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Images sorted by group: (order, group start in that order, group size, group code per image)."""
    _, codes = np.unique(groups, return_inverse=True)
    codes = codes.ravel()
    order = np.argsort(codes, kind="mergesort")
    sizes = np.bincount(codes)
    starts = np.r_[0, np.cumsum(sizes)[:-1]]
    return order, starts, sizes, codes


def iter_bootstrap(
    y: np.ndarray, groups: Any = None, n: int = 2000, seed: int = 0, stratified: bool = True
) -> Iterator[np.ndarray]:
    """Yield ``n`` bootstrap resamples as image index arrays into ``y``.

    Patients (``groups``; one image per patient when None) are drawn with replacement and bring all
    their images. With ``stratified``, positive patients (any positive image) and negative patients
    are drawn separately, each stratum keeping its size. The same ``seed`` yields the same resamples,
    so two models scored on the same images are resampled in pairs.

    Args:
        y: Known labels (0/1), already masked.
        groups: Patient id per image, or None.
        n: Number of resamples.
        seed: Seed of the numpy generator.
        stratified: Stratify patients by label.
    """
    groups = np.arange(y.size) if groups is None else np.asarray(groups)
    if groups.shape[0] != y.size:
        raise ValueError(f"groups must have one entry per image, got {groups.shape[0]} for {y.size}")
    order, starts, sizes, codes = _group_layout(groups)
    patient_pos = np.zeros(sizes.size, dtype=bool)
    patient_pos[codes[y == 1]] = True
    strata = [np.flatnonzero(patient_pos), np.flatnonzero(~patient_pos)] if stratified else [
        np.arange(sizes.size)]
    strata = [s for s in strata if s.size]
    rng = np.random.default_rng(seed)
    for _ in range(n):
        picked = np.concatenate([rng.choice(s, size=s.size, replace=True) for s in strata])
        lens = sizes[picked]
        first = np.repeat(starts[picked] - (np.cumsum(lens) - lens), lens)
        yield order[first + np.arange(lens.sum())]


def bootstrap_many(
    metrics: Mapping[str, Metric],
    y: Any,
    p: Any,
    groups: Any = None,
    n: int = 2000,
    seed: int = 0,
    stratified: bool = True,
    level: float = 0.95,
) -> dict[str, Interval]:
    """Point estimates and percentile-bootstrap CIs of several metrics on the same resamples.

    Args:
        metrics: Name -> ``metric(y, p) -> float``.
        y: Labels (1/0/NaN).
        p: Scores (NaN = not scored).
        groups: Patient id per image (None: every image its own patient).
        n: Number of resamples.
        seed: Seed; the same seed gives the same resamples.
        stratified: Stratify patients by label.
        level: Confidence level.

    Returns:
        Name -> :class:`Interval`. A resample where a metric is undefined (one class, possible only
        without stratification) is left out of that metric's interval.
    """
    y_all = np.asarray(y, dtype=float).ravel()
    p_all = np.asarray(p, dtype=float).ravel()
    keep = ~(np.isnan(y_all) | np.isnan(p_all))
    y, p = clean(y_all[keep], p_all[keep])
    g = None if groups is None else np.asarray(groups)[keep]
    point = {name: fn(y, p) for name, fn in metrics.items()}
    stats = {name: np.full(n, np.nan) for name in metrics}
    for i, idx in enumerate(iter_bootstrap(y, g, n, seed, stratified)):
        for name, fn in metrics.items():
            try:
                stats[name][i] = fn(y[idx], p[idx])
            except ValueError:
                continue
    tail = 100 * (1 - level) / 2
    out = {}
    for name, values in stats.items():
        values = values[~np.isnan(values)]
        low, high = np.percentile(values, [tail, 100 - tail]) if values.size else (np.nan, np.nan)
        out[name] = Interval(point[name], float(low), float(high))
    return out


def bootstrap_ci(
    metric: Metric,
    y: Any,
    p: Any,
    groups: Any = None,
    n: int = 2000,
    seed: int = 0,
    stratified: bool = True,
    level: float = 0.95,
) -> Interval:
    """Point estimate and percentile-bootstrap CI of one metric (see :func:`bootstrap_many`)."""
    return bootstrap_many({"m": metric}, y, p, groups, n, seed, stratified, level)["m"]


def roc_band(
    y: Any, p: Any, groups: Any = None, n: int = 2000, seed: int = 0, level: float = 0.95, n_grid: int = 101
) -> dict[str, list[float]]:
    """Pointwise bootstrap band of the ROC curve: TPR quantiles on a fixed FPR grid.

    Returns:
        ``fpr`` (grid), ``tpr`` (the curve itself on the grid), ``low``, ``high``.
    """
    y_all = np.asarray(y, dtype=float).ravel()
    p_all = np.asarray(p, dtype=float).ravel()
    keep = ~(np.isnan(y_all) | np.isnan(p_all))
    y, p = clean(y_all[keep], p_all[keep])
    g = None if groups is None else np.asarray(groups)[keep]
    grid = np.linspace(0.0, 1.0, n_grid)

    def on_grid(yy: np.ndarray, pp: np.ndarray) -> np.ndarray:
        roc = roc_points(yy, pp)
        return np.interp(grid, roc["fpr"], roc["tpr"])

    curves = np.array([on_grid(y[idx], p[idx]) for idx in iter_bootstrap(y, g, n, seed)])
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(curves, [tail, 100 - tail], axis=0)
    return {"fpr": grid.tolist(), "tpr": on_grid(y, p).tolist(), "low": low.tolist(), "high": high.tolist()}
