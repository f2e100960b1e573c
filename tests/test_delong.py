"""DeLong: the fast (Sun & Xu) algorithm against a slow pairwise implementation and hand examples."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from training.delong import binary_labels, delong_ci, delong_test, delong_variance


def slow_delong(y: np.ndarray, scores: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """DeLong et al. (1988) structural components by explicit O(m n) pairwise comparison."""
    y = np.asarray(y)
    v10s, v01s = [], []
    for s in scores:
        x, z = s[y == 1], s[y == 0]
        psi = (x[:, None] > z[None, :]) + 0.5 * (x[:, None] == z[None, :])
        v10s.append(psi.mean(axis=1))
        v01s.append(psi.mean(axis=0))
    v10, v01 = np.array(v10s), np.array(v01s)
    m, n = v10.shape[1], v01.shape[1]
    cov = np.cov(v10) / m + np.cov(v01) / n
    return v10.mean(axis=1), np.atleast_2d(cov)


def _two_models(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    a = np.round(rng.normal(y * 1.0, 1.0), 1)  # rounded: many ties
    b = np.round(0.5 * a + rng.normal(y * 0.6, 1.0), 1)  # correlated with a
    return y, a, b


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fast_equals_slow_pairwise_delong(seed: int) -> None:
    y, a, b = _two_models(150 + 40 * seed, seed)
    aucs, cov = slow_delong(y, [a, b])
    result = delong_test(y, a, b)
    assert result.auc1 == pytest.approx(roc_auc_score(y, a), abs=1e-12)
    assert result.auc2 == pytest.approx(roc_auc_score(y, b), abs=1e-12)
    assert (result.auc1, result.auc2) == pytest.approx(tuple(aucs), abs=1e-12)
    var = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    assert result.se == pytest.approx(np.sqrt(var), rel=1e-10)
    z = (aucs[0] - aucs[1]) / np.sqrt(var)
    assert result.z == pytest.approx(z, rel=1e-10)
    assert result.p_value == pytest.approx(2 * norm.sf(abs(z)), rel=1e-10)
    assert 0.0 <= result.p_value <= 1.0  # a probability, not log10
    assert delong_variance(y, a) == pytest.approx((aucs[0], cov[0, 0]), rel=1e-10)


def test_hand_example_four_cases() -> None:
    # Positives score 0.35 and 0.8, negatives 0.1 and 0.4 (scikit-learn's roc_auc_score example).
    # V10 = [1/2, 1], V01 = [1, 1/2]: AUC 0.75, variance 0.125/2 + 0.125/2 = 0.125.
    y = [0, 0, 1, 1]
    p1 = [0.1, 0.4, 0.35, 0.8]
    assert delong_variance(y, p1) == pytest.approx((0.75, 0.125))
    # A perfect second score has zero variance and zero covariance: z = -0.25 / sqrt(0.125).
    result = delong_test(y, p1, [0.1, 0.2, 0.3, 0.4])
    assert result.auc2 == 1.0
    assert result.difference == pytest.approx(-0.25)
    assert result.z == pytest.approx(-0.70710678)
    assert result.p_value == pytest.approx(0.47950012, abs=1e-7)
    half = 1.959964 * np.sqrt(0.125)
    assert (result.ci_low, result.ci_high) == pytest.approx((-0.25 - half, -0.25 + half), abs=1e-5)


def test_hanley_mcneil_rating_example() -> None:
    # Hanley & McNeil (1982, Radiology 143:29-36), Table 1: 109 CT images rated 1 (definitely normal)
    # to 5 (definitely abnormal). Published AUC 0.893 (SE 0.032 by their approximation).
    normal = [33, 6, 6, 11, 2]
    abnormal = [3, 2, 2, 11, 33]
    ratings = np.arange(1, 6)
    y = np.r_[np.zeros(58), np.ones(51)]
    p = np.r_[np.repeat(ratings, normal), np.repeat(ratings, abnormal)]
    auc, var = delong_variance(y, p)
    # By hand: AUC = sum_r abnormal_r * (normals below r + normals at r / 2) / (51 * 58) = 2642 / 2958.
    assert auc == pytest.approx(2642 / 2958, abs=1e-12)
    assert round(auc, 3) == 0.893
    # Placement values per rating: V10 = (16.5, 36, 42, 50.5, 57) / 58, V01 = (49.5, 47, 45, 38.5, 16.5) / 51.
    v10 = np.repeat(np.array([16.5, 36, 42, 50.5, 57]) / 58, abnormal)
    v01 = np.repeat(np.array([49.5, 47, 45, 38.5, 16.5]) / 51, normal)
    assert var == pytest.approx(v10.var(ddof=1) / 51 + v01.var(ddof=1) / 58, rel=1e-12)
    assert np.sqrt(var) == pytest.approx(0.0307, abs=1e-4)  # close to the published 0.032
    same_auc, low, high = delong_ci(y, p)
    assert same_auc == auc
    assert low == pytest.approx(auc - 1.959964 * np.sqrt(var), abs=1e-6)
    assert low < auc < high <= 1.0


def test_labels_any_two_values_and_clear_errors() -> None:
    y, a, b = _two_models(120, 5)
    reference = delong_test(y, a, b)
    assert delong_test(np.where(y == 1, 2, 1), a, b) == reference
    assert delong_test(np.where(y == 1, "tb", "normal"), a, b, pos_label="tb") == reference
    assert delong_test(y.astype(bool), a, b) == reference
    np.testing.assert_array_equal(binary_labels([-1, 1, 1]), [0, 1, 1])
    with pytest.raises(ValueError, match="exactly two distinct values"):
        delong_test([0, 1, 2, 1], [0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4])
    with pytest.raises(ValueError, match="exactly two distinct values"):
        delong_variance([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="pos_label"):
        binary_labels([0, 1], pos_label=3)
    with pytest.raises(ValueError, match="at least 2 positive"):
        delong_variance([0, 0, 1], [0.1, 0.2, 0.3])


def test_nan_cases_dropped_and_identical_models() -> None:
    y, a, b = _two_models(100, 6)
    yf = y.astype(float)
    yf[:5] = np.nan
    b_nan = b.copy()
    b_nan[5:8] = np.nan
    expected = delong_test(y[8:], a[8:], b[8:])
    assert delong_test(yf, a, b_nan) == expected
    same = delong_test(y, a, a)
    assert (same.difference, same.z, same.p_value) == (0.0, 0.0, 1.0)
