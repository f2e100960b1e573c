"""Split invariants: patients never in two folds, each fold's prevalence near the cohort's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from training.splits import (
    SplitError,
    check_folds,
    grouped_stratified_kfold,
    load_folds,
    save_folds,
)


def synthetic(n_patients: int = 120, seed: int = 0) -> tuple[list[str], np.ndarray]:
    """1-4 images per patient, 3 labels of different prevalence, 10 % unknown values."""
    rng = np.random.default_rng(seed)
    patients, rows = [], []
    for p in range(n_patients):
        label = (rng.random(3) < [0.5, 0.2, 0.08]).astype(float)
        for _ in range(rng.integers(1, 5)):
            row = label.copy()
            row[rng.random(3) < 0.1] = np.nan
            patients.append(f"P{p:04d}")
            rows.append(row)
    return patients, np.array(rows)


@pytest.mark.parametrize("seed", [0, 1, 7])
@pytest.mark.parametrize("k", [3, 5])
def test_patients_disjoint_and_prevalence_balanced(seed: int, k: int) -> None:
    patients, y = synthetic(seed=seed)
    folds = grouped_stratified_kfold(patients, y, k=k, seed=seed)
    assert sorted(set(folds.tolist())) == list(range(k))
    owner: dict[str, int] = {}
    for pid, fold in zip(patients, folds, strict=True):
        assert owner.setdefault(pid, int(fold)) == fold
    for j in range(y.shape[1]):
        known = ~np.isnan(y[:, j])
        overall = y[known, j].mean()
        for fold in range(k):
            mask = known & (folds == fold)
            assert abs(y[mask, j].mean() - overall) <= max(0.05, 4 / mask.sum())
    sizes = np.bincount(folds)
    assert sizes.max() - sizes.min() <= 4  # at most one patient's images apart


def test_deterministic_for_a_seed_and_different_across_seeds() -> None:
    patients, y = synthetic()
    a = grouped_stratified_kfold(patients, y, k=5, seed=3)
    assert np.array_equal(a, grouped_stratified_kfold(patients, y, k=5, seed=3))
    assert not np.array_equal(a, grouped_stratified_kfold(patients, y, k=5, seed=4))


def test_one_image_per_patient_binary_is_nearly_exact() -> None:
    y = np.array([1.0] * 50 + [0.0] * 50)
    folds = grouped_stratified_kfold([str(i) for i in range(100)], y, k=5, seed=0)
    assert [int(y[folds == f].sum()) for f in range(5)] == [10] * 5


def test_check_folds_refuses_patient_in_two_folds() -> None:
    with pytest.raises(SplitError, match="patient 'a' has images in folds 0 and 1"):
        check_folds(np.array([0, 1, 1, 0]), ["a", "a", "b", "c"], np.array([1.0, 0, 1, 0]), k=2)


def test_check_folds_refuses_unbalanced_prevalence() -> None:
    y = np.array([1.0] * 20 + [0.0] * 20)
    folds = np.array([0] * 20 + [1] * 20)  # fold 0 all positive
    with pytest.raises(SplitError, match=r"fold 0 prevalence 1\.000"):
        check_folds(folds, [str(i) for i in range(40)], y, k=2, labels=["Tuberculosis"])


def test_check_folds_refuses_empty_fold_and_out_of_range() -> None:
    with pytest.raises(SplitError, match="hold no image"):
        check_folds(np.array([0, 0, 2]), ["a", "b", "c"], np.array([1.0, 0, 1]), k=3)
    with pytest.raises(SplitError, match="fold indices"):
        check_folds(np.array([0, 3]), ["a", "b"], np.array([1.0, 0]), k=2)


def test_k_larger_than_patients_is_refused() -> None:
    with pytest.raises(SplitError, match="number of patients"):
        grouped_stratified_kfold(["a", "a", "b"], np.array([1.0, 1.0, 0.0]), k=3)


def test_save_and_load_roundtrip(tmp_path: Path) -> None:
    patients, y = synthetic(30)
    images = [f"img{i}.png" for i in range(len(patients))]
    folds = grouped_stratified_kfold(patients, y, k=3)
    save_folds(tmp_path / "folds.csv", images, patients, folds)
    assert np.array_equal(load_folds(tmp_path / "folds.csv", images), folds)
    with pytest.raises(SplitError, match="does not match the cohort"):
        load_folds(tmp_path / "folds.csv", [*images, "extra.png"])


@pytest.mark.shared_data
def test_shenzhen_folds(data_dir: Path) -> None:
    from training.data import load_cohort

    cohort = load_cohort(data_dir / "tb" / "shenzhen.csv")
    folds = grouped_stratified_kfold(cohort.patient_ids, cohort.y, k=5, seed=0)
    prevalence = cohort.prevalence()["Tuberculosis"]
    for fold in range(5):
        assert abs(cohort.y[folds == fold, 0].mean() - prevalence) < 0.02
