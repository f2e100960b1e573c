"""Evaluation step: DeLong variance of an AUROC and the paired DeLong test of two correlated AUROCs.

Implements the fast algorithm of Sun & Xu (2014, IEEE Signal Processing Letters 21(11):1389-1393),
which computes DeLong, DeLong & Clarke-Pearson's (1988) structural components from midranks in
O(n log n) instead of the O(m n) pairwise comparisons.

For ``m`` positive and ``n`` negative cases and a score vector, with X the positive scores and Y the
negative ones: ``V10(X_i) = mean_j psi(X_i, Y_j)`` and ``V01(Y_j) = mean_i psi(X_i, Y_j)`` where
``psi(x, y) = 1 if x > y, 1/2 if x == y, 0 otherwise``. The AUC is their mean, and the covariance of
the AUCs of several score vectors on the same cases is ``S10 / m + S01 / n`` (S10, S01: sample
covariances of the V10 and V01 components).

Differences from the widely copied yandexdataschool reference: the p-value is a probability (not
log10), labels may be any two values (coerced to 0/1, or ``pos_label`` names the positive one), and
no removed numpy aliases. The AUC is not flipped when it is below 0.5 (unlike pROC's automatic
direction): higher score = more likely positive, always.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy.stats import norm, rankdata


@dataclass(frozen=True)
class DeLongResult:
    """Paired DeLong test of ``auc1 - auc2`` on the same cases.

    Attributes:
        auc1: AUROC of the first score.
        auc2: AUROC of the second score.
        difference: ``auc1 - auc2``.
        se: Standard error of the difference.
        z: ``difference / se`` (0 when both are 0, +-inf when only ``se`` is 0).
        p_value: Two-sided p-value (a probability, not its log).
        ci_low: Lower bound of the CI of the difference.
        ci_high: Upper bound of the CI of the difference.
        level: Confidence level of the CI.
        n_pos: Positive cases used.
        n_neg: Negative cases used.
    """

    auc1: float
    auc2: float
    difference: float
    se: float
    z: float
    p_value: float
    ci_low: float
    ci_high: float
    level: float
    n_pos: int
    n_neg: int

    def to_dict(self) -> dict[str, float]:
        """All fields as plain Python numbers."""
        return {k: (int(v) if k.startswith("n_") else float(v)) for k, v in asdict(self).items()}


def binary_labels(y: Any, pos_label: Any = None) -> np.ndarray:
    """Coerce labels with exactly two distinct values to 0/1.

    Args:
        y: Labels of any type (numbers, booleans, strings).
        pos_label: The value meaning positive; by default the larger of the two sorted values.

    Returns:
        int8 array of 0/1.

    Raises:
        ValueError: Not exactly two distinct values, or ``pos_label`` not among them.
    """
    y = np.asarray(y).ravel()
    values = np.unique(y)
    if values.size != 2:
        raise ValueError(
            f"DeLong needs binary labels (exactly two distinct values), found {values.size}: "
            f"{values[:5].tolist()}"
        )
    if pos_label is None:
        pos_label = values[1]
    elif pos_label not in values.tolist():
        raise ValueError(f"pos_label {pos_label!r} is not among the labels {values.tolist()}")
    return (y == pos_label).astype(np.int8)


def _prepare(y: Any, scores: list[Any], pos_label: Any) -> tuple[np.ndarray, int]:
    """Drop cases with a NaN label or score; return scores (k, m + n) positives first, and m."""
    y = np.asarray(y).ravel()
    s = np.vstack([np.asarray(x, dtype=float).ravel() for x in scores])
    if s.shape[1] != y.size:
        raise ValueError(f"labels and scores must have the same length, got {y.size} and {s.shape[1]}")
    keep = ~np.isnan(s).any(axis=0)
    if y.dtype.kind == "f":
        keep &= ~np.isnan(y)
    y01 = binary_labels(y[keep], pos_label)
    s = s[:, keep]
    m, n = int(y01.sum()), int(y01.size - y01.sum())
    if m < 2 or n < 2:
        raise ValueError(f"DeLong needs at least 2 positive and 2 negative cases, got {m} and {n}")
    order = np.argsort(-y01, kind="mergesort")
    return s[:, order], m


def fast_delong(scores_pos_first: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Sun & Xu's fast DeLong on scores whose first ``m`` columns are the positive cases.

    Args:
        scores_pos_first: Array (k, m + n): k score vectors on the same cases.
        m: Number of positive cases.

    Returns:
        ``(aucs, cov)``: the k AUCs and their (k, k) DeLong covariance matrix.
    """
    s = np.atleast_2d(scores_pos_first)
    n = s.shape[1] - m
    tx = rankdata(s[:, :m], axis=1)
    ty = rankdata(s[:, m:], axis=1)
    tz = rankdata(s, axis=1)
    aucs = (tz[:, :m].sum(axis=1) - m * (m + 1) / 2) / (m * n)
    v10 = (tz[:, :m] - tx) / n
    v01 = 1.0 - (tz[:, m:] - ty) / m
    cov = np.atleast_2d(np.cov(v10)) / m + np.atleast_2d(np.cov(v01)) / n
    return aucs, cov


def delong_variance(y: Any, p: Any, pos_label: Any = None) -> tuple[float, float]:
    """AUROC of one score and its DeLong variance.

    Returns:
        ``(auc, variance)``.
    """
    s, m = _prepare(y, [p], pos_label)
    aucs, cov = fast_delong(s, m)
    return float(aucs[0]), float(cov[0, 0])


def delong_ci(y: Any, p: Any, level: float = 0.95, pos_label: Any = None) -> tuple[float, float, float]:
    """AUROC with its DeLong (normal approximation) CI, clipped to [0, 1].

    Returns:
        ``(auc, low, high)``.
    """
    auc, var = delong_variance(y, p, pos_label)
    half = norm.ppf(0.5 + level / 2) * np.sqrt(max(var, 0.0))
    return auc, float(max(0.0, auc - half)), float(min(1.0, auc + half))


def delong_test(
    y: Any, p1: Any, p2: Any, level: float = 0.95, pos_label: Any = None
) -> DeLongResult:
    """Paired two-sided DeLong test of H0: AUC(p1) == AUC(p2) on the same cases.

    Args:
        y: Labels with two distinct values (NaN entries of a float array are dropped).
        p1: First score (e.g. model A); NaN cases are dropped from both.
        p2: Second score on the same cases, in the same order.
        level: Confidence level of the CI of the difference.
        pos_label: The label value meaning positive (default: the larger value).

    Returns:
        The :class:`DeLongResult`.
    """
    s, m = _prepare(y, [p1, p2], pos_label)
    aucs, cov = fast_delong(s, m)
    diff = float(aucs[0] - aucs[1])
    var = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    se = float(np.sqrt(max(var, 0.0)))
    # se == 0: identical scores (0 / 0 -> z = 0) or a difference without variance (z = +-inf).
    z = diff / se if se > 0 else (0.0 if diff == 0 else float(np.copysign(np.inf, diff)))
    p_value = float(2 * norm.sf(abs(z)))
    half = float(norm.ppf(0.5 + level / 2)) * se
    return DeLongResult(
        auc1=float(aucs[0]), auc2=float(aucs[1]), difference=diff, se=se, z=float(z), p_value=p_value,
        ci_low=diff - half, ci_high=diff + half, level=level, n_pos=m, n_neg=s.shape[1] - m,
    )
