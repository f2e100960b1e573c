"""Evaluation metrics: checked against scikit-learn, textbook values and hand examples."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.calibration import calibration_curve
from sklearn.metrics import (
    average_precision_score,
    balanced_accuracy_score,
    brier_score_loss,
    precision_recall_curve,
    roc_auc_score,
    roc_curve,
)

from training import metrics as m


def _data(n: int = 300, seed: int = 0, ties: bool = True) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n).astype(float)
    p = np.clip(rng.normal(0.4 + 0.2 * y, 0.2), 0, 1)
    return y, (np.round(p, 2) if ties else p)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auroc_auprc_balanced_accuracy_equal_sklearn(seed: int) -> None:
    y, p = _data(seed=seed)
    assert m.auroc(y, p) == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert m.auprc(y, p) == pytest.approx(average_precision_score(y, p), abs=1e-12)
    for thr in (0.3, 0.5, 0.62):
        expected = balanced_accuracy_score(y, (p >= thr).astype(int))
        assert m.balanced_accuracy(y, p, thr) == pytest.approx(expected, abs=1e-12)


def test_curves_equal_sklearn() -> None:
    y, p = _data(seed=3)
    fpr, tpr, _ = roc_curve(y, p, drop_intermediate=False)
    roc = m.roc_points(y, p)
    np.testing.assert_allclose(roc["fpr"], fpr)
    np.testing.assert_allclose(roc["tpr"], tpr)
    precision, recall, _ = precision_recall_curve(y, p)
    pr = m.pr_points(y, p)
    # scikit-learn lists the lowest threshold first and appends (recall 0, precision 1).
    np.testing.assert_allclose(pr["precision"], precision[:-1][::-1])
    np.testing.assert_allclose(pr["recall"], recall[:-1][::-1])


def test_unknown_labels_and_missing_scores_are_masked() -> None:
    y, p = _data(seed=4)
    y_nan, p_nan = y.copy(), p.copy()
    y_nan[::7] = np.nan
    p_nan[3::11] = np.nan
    keep = ~(np.isnan(y_nan) | np.isnan(p_nan))
    assert m.auroc(y_nan, p_nan) == pytest.approx(roc_auc_score(y[keep], p[keep]))
    assert m.auprc(y_nan, p_nan) == pytest.approx(average_precision_score(y[keep], p[keep]))
    assert m.confusion_at(y_nan, p_nan, 0.5)["n"] == keep.sum()


def test_bad_labels_and_one_class_raise() -> None:
    with pytest.raises(ValueError, match="labels must be 1, 0 or NaN"):
        m.auroc([0, 1, 2], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="both classes"):
        m.auroc([1, 1, np.nan], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="probabilities"):
        m.brier([0, 1], [-0.5, 2.0])


def test_wilson_textbook_value() -> None:
    # k = 8 of n = 10, z = 1.96: 0.4902 to 0.9433 (Newcombe 1998, method 3).
    low, high = m.wilson_ci(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-4)
    assert high == pytest.approx(0.9433, abs=1e-4)
    assert m.wilson_ci(0, 10)[0] == 0.0
    assert m.wilson_ci(10, 10)[1] == 1.0
    assert all(np.isnan(m.wilson_ci(0, 0)))


def test_youden_threshold_hand_example() -> None:
    y = [0, 0, 0, 1, 0, 1, 1, 1]
    p = [0.1, 0.2, 0.3, 0.35, 0.4, 0.6, 0.7, 0.9]
    # t = 0.6: sens 3/4, spec 4/4, J = 0.75; t = 0.35: sens 4/4, spec 3/4, J = 0.75: the tie goes to
    # the higher (more specific) threshold. Every other t has J <= 0.5.
    assert m.youden_threshold(y, p) == 0.6


def test_threshold_for_sensitivity_reaches_target_and_is_highest() -> None:
    y, p = _data(n=400, seed=5, ties=False)
    for target in (0.8, 0.9, 0.95):
        t = m.threshold_for_sensitivity(y, p, target)
        sens = np.mean(p[y == 1] >= t)
        assert sens >= target
        above = p[p > t].min()
        assert np.mean(p[y == 1] >= above) < target


def test_midway_below_hand_example() -> None:
    y = [0, 0, 1, 0, 1, 1, np.nan]
    p = [0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 0.28]  # the last image's label is unknown: it does not count
    t = m.threshold_for_sensitivity(y, p, 1.0)
    assert t == 0.3
    assert m.midway_below(y, p, t) == pytest.approx(0.25, abs=1e-15)
    assert m.midway_below(y, p, 0.7) == pytest.approx(0.6, abs=1e-15)
    assert m.midway_below(y, p, 0.1) == 0.1  # nothing below: the threshold itself
    close = [0.3, float(np.nextafter(0.3, 0.0)), 0.9]  # no float64 strictly between the two lowest
    assert m.midway_below([1, 0, 1], close, 0.3) == 0.3


def test_midway_threshold_survives_the_nodes_float32_probability() -> None:
    # The threshold reached is one image's ensemble score, the float64 mean of its members' float32 scores; the
    # node stores that mean as float32, which can round below it and flip the image. Midway it cannot.
    a, b = np.float32(0.39), np.float32(0.3920001)
    y = np.array([0, 0, 1, 1, 1, 0])
    p = np.array([0.2, 0.35, (float(a) + float(b)) / 2, 0.6, 0.8, 0.95])
    on_score = m.threshold_for_sensitivity(y, p, 1.0)
    assert on_score == p[2] and float(np.float32(p[2])) < on_score  # the trap this placement avoids
    midway = m.midway_below(y, p, on_score)
    assert midway == pytest.approx((0.35 + p[2]) / 2)
    node = np.float32(p).astype(float)  # the node compares float(its float32 probability) >= threshold
    assert (node >= on_score).tolist() != (p >= on_score).tolist()
    assert (node >= midway).tolist() == (p >= on_score).tolist() == [False, False, True, True, True, True]


def test_confusion_at_counts_and_wilson() -> None:
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    p = np.array([0.9, 0.8, 0.7, 0.2, 0.6, 0.3, 0.2, 0.1, 0.1, 0.0])
    c = m.confusion_at(y, p, 0.5)
    assert (c["tp"], c["fn"], c["fp"], c["tn"]) == (3, 1, 1, 5)
    assert c["sensitivity"]["value"] == 0.75
    assert c["specificity"]["value"] == pytest.approx(5 / 6)
    assert c["ppv"]["value"] == 0.75
    assert (c["npv"]["low"], c["npv"]["high"]) == pytest.approx(m.wilson_ci(5, 6))


def test_brier_reliability_ece_against_sklearn() -> None:
    y, p = _data(seed=6, ties=False)
    assert m.brier(y, p) == pytest.approx(brier_score_loss(y, p))
    curve = m.reliability_curve(y, p, n_bins=10)
    prob_true, prob_pred = calibration_curve(y, p, n_bins=10, strategy="uniform")
    filled = np.asarray(curve["count"]) > 0
    np.testing.assert_allclose(np.asarray(curve["fraction_positive"])[filled], prob_true)
    np.testing.assert_allclose(np.asarray(curve["mean_predicted"])[filled], prob_pred)
    count = np.asarray(curve["count"])[filled]
    assert m.ece(y, p) == pytest.approx(np.sum(count * np.abs(prob_true - prob_pred)) / count.sum())
    assert m.ece([0, 1, 0, 1], [0.0, 1.0, 0.0, 1.0]) == 0.0


def test_bootstrap_ci_contains_estimate_and_shrinks_with_n() -> None:
    widths = []
    for n in (100, 1600):
        y, p = _data(n=n, seed=7, ties=False)
        ci = m.bootstrap_ci(m.auroc, y, p, n=200, seed=1)
        assert ci.low <= ci.value <= ci.high
        assert ci.value == pytest.approx(roc_auc_score(y, p))
        widths.append(ci.high - ci.low)
    assert widths[1] < widths[0] / 2


def test_bootstrap_is_reproducible_with_a_seed() -> None:
    y, p = _data(seed=8)
    assert m.bootstrap_ci(m.auprc, y, p, n=50, seed=3) == m.bootstrap_ci(m.auprc, y, p, n=50, seed=3)


def test_bootstrap_moves_patients_as_units_and_keeps_strata() -> None:
    rng = np.random.default_rng(9)
    patients = np.repeat(np.arange(40), rng.integers(1, 4, 40))
    y = (patients < 12).astype(float)  # 12 positive patients, each image positive
    for idx in m.iter_bootstrap(y, patients.astype(str), n=30, seed=2):
        drawn = patients[idx]
        ids, counts = np.unique(drawn, return_counts=True)
        sizes = np.bincount(patients)[ids]
        assert np.all(counts % sizes == 0)  # whole patients only, possibly several times
        assert np.sum(counts[ids < 12] // sizes[ids < 12]) == 12  # positive stratum keeps its size
        assert np.sum(counts[ids >= 12] // sizes[ids >= 12]) == 28


def test_roc_band_brackets_the_curve() -> None:
    y, p = _data(n=200, seed=10, ties=False)
    band = m.roc_band(y, p, n=50, seed=0)
    tpr, low, high = (np.asarray(band[k]) for k in ("tpr", "low", "high"))
    assert np.mean((low <= tpr + 1e-9) & (tpr <= high + 1e-9)) > 0.95
