"""Split step: patient-grouped, label-stratified k-fold assignment, checked before any training.

Our own greedy implementation rather than scikit-learn's ``StratifiedGroupKFold``, whose
``shuffle=True`` did not stratify before scikit-learn PR 32540 (DESIGN.md, Known traps), and which
handles one label only. Whatever produced the folds, :func:`check_folds` verifies the invariants and
raises when one is violated:

1. every image has a fold in ``0..k-1`` and every fold holds images;
2. no patient has images in two folds;
3. for every label, each fold's prevalence (among its known values) is within the tolerance of the
   cohort's prevalence. The tolerance allowed for a fold is ``max(tolerance, m / n_f)``, where ``n_f``
   is the fold's number of known values for the label and ``m`` the largest number of images one
   patient has: with whole patients per fold, a deviation below one patient's weight cannot be
   guaranteed.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from storage.files import write_atomic
from training.data import csv_bytes


class SplitError(ValueError):
    """Folds violate an invariant: patient in two folds, empty fold, prevalence off, bad fold file."""


def grouped_stratified_kfold(
    patient_ids: Sequence[str],
    y: np.ndarray,
    k: int = 5,
    seed: int = 0,
    tolerance: float = 0.05,
    labels: Sequence[str] | None = None,
) -> np.ndarray:
    """Assign every image to one of ``k`` folds, patients whole, each label's prevalence balanced.

    Algorithm: patients are shuffled with ``seed``, then ordered by how much of the rare labels' positives
    they carry (rarest first, then larger patients first); each patient goes to the fold whose
    squared deviation from the per-fold targets (positives per label, weighted by 1/total positives,
    plus image count, weighted by 1/total images) grows least, ties to the smaller fold.

    Args:
        patient_ids: patient per image.
        y: ``[N]`` or ``[N, L]`` labels with 1, 0 or NaN (unknown).
        k: number of folds (at least 2, at most the number of patients).
        seed: shuffling seed (different seeds give different, equally valid folds).
        tolerance: see :func:`check_folds`.
        labels: label names for messages.

    Returns:
        int64 ``[N]`` fold index per image.

    Raises:
        SplitError: ``k`` out of range, or the assignment fails :func:`check_folds`.
    """
    y2 = _as_2d(y, len(patient_ids))
    groups, inverse = np.unique(np.asarray(patient_ids, dtype=object).astype(str), return_inverse=True)
    if not 2 <= k <= len(groups):
        raise SplitError(f"k must be between 2 and the number of patients ({len(groups)}), found {k}")
    pos = np.zeros((len(groups), y2.shape[1]))
    np.add.at(pos, inverse, np.nan_to_num(y2, nan=0.0))
    size = np.bincount(inverse, minlength=len(groups)).astype(float)
    total_pos = np.maximum(pos.sum(axis=0), 1.0)
    order = _patient_order(pos, size, total_pos, seed)
    fold_pos = np.zeros((k, y2.shape[1]))
    fold_size = np.zeros(k)
    target_pos = pos.sum(axis=0) / k
    target_size = size.sum() / k
    group_fold = np.empty(len(groups), dtype=np.int64)
    for g in order:
        new_pos = fold_pos + pos[g]
        new_size = fold_size + size[g]
        gain = (((new_pos - target_pos) ** 2 - (fold_pos - target_pos) ** 2) / total_pos).sum(axis=1)
        gain += ((new_size - target_size) ** 2 - (fold_size - target_size) ** 2) / size.sum()
        best = min(range(k), key=lambda f: (round(gain[f], 12), fold_size[f], f))
        group_fold[g] = best
        fold_pos[best] += pos[g]
        fold_size[best] += size[g]
    folds = group_fold[inverse]
    check_folds(folds, patient_ids, y2, k, tolerance, labels)
    return folds


def _patient_order(pos: np.ndarray, size: np.ndarray, total_pos: np.ndarray, seed: int) -> np.ndarray:
    """Patients in assignment order: seeded shuffle, then stable sort by rare-label weight, then size."""
    rng = np.random.default_rng(seed)
    shuffled = rng.permutation(len(size))
    rarity = (pos / total_pos).max(axis=1)[shuffled]
    keys = np.lexsort((-size[shuffled], -rarity))  # last key is primary
    return shuffled[keys]


def _as_2d(y: np.ndarray, n: int) -> np.ndarray:
    """Labels as float ``[N, L]``; checks the length."""
    y2 = np.asarray(y, dtype=np.float64)
    if y2.ndim == 1:
        y2 = y2[:, None]
    if y2.ndim != 2 or y2.shape[0] != n:
        raise SplitError(f"labels must be [N] or [N, L] with N = {n} images, found shape {np.shape(y)}")
    return y2


def check_folds(
    folds: np.ndarray,
    patient_ids: Sequence[str],
    y: np.ndarray,
    k: int,
    tolerance: float = 0.05,
    labels: Sequence[str] | None = None,
) -> None:
    """Verify the fold invariants listed in the module docstring; raise on the first violation.

    Args:
        folds: fold index per image.
        patient_ids: patient per image.
        y: ``[N]`` or ``[N, L]`` labels (NaN = unknown).
        k: the number of folds.
        tolerance: absolute prevalence deviation allowed per fold (widened to one patient's weight).
        labels: label names for messages.

    Raises:
        SplitError: naming the fold, patient or label at fault.
    """
    folds = np.asarray(folds)
    y2 = _as_2d(y, len(patient_ids))
    if folds.shape != (len(patient_ids),):
        raise SplitError(f"expected one fold per image ({len(patient_ids)}), found shape {folds.shape}")
    if folds.size and (folds.min() < 0 or folds.max() >= k):
        raise SplitError(f"fold indices must be in 0..{k - 1}, found {folds.min()}..{folds.max()}")
    counts = np.bincount(folds, minlength=k)
    if (counts == 0).any():
        raise SplitError(f"fold(s) {np.flatnonzero(counts == 0).tolist()} hold no image")
    owner: dict[str, int] = {}
    per_patient: dict[str, int] = {}
    for pid, fold in zip(patient_ids, folds, strict=True):
        if owner.setdefault(pid, int(fold)) != fold:
            raise SplitError(f"patient {pid!r} has images in folds {owner[pid]} and {int(fold)}")
        per_patient[pid] = per_patient.get(pid, 0) + 1
    biggest = max(per_patient.values())
    names = list(labels) if labels is not None else [f"label {j}" for j in range(y2.shape[1])]
    for j in range(y2.shape[1]):
        _check_prevalence(folds, y2[:, j], k, tolerance, biggest, names[j])


def _check_prevalence(folds: np.ndarray, col: np.ndarray, k: int, tolerance: float, biggest: int, name: str) -> None:
    """Each fold's prevalence of one label within the allowed deviation of the cohort's."""
    known = ~np.isnan(col)
    if not known.any():
        return
    overall = float(col[known].mean())
    for fold in range(k):
        mask = known & (folds == fold)
        n = int(mask.sum())
        if n == 0:
            continue
        prevalence = float(col[mask].mean())
        allowed = max(tolerance, biggest / n)
        if abs(prevalence - overall) > allowed + 1e-12:
            raise SplitError(
                f"{name}: fold {fold} prevalence {prevalence:.3f} ({n} known) differs from the cohort's "
                f"{overall:.3f} by more than {allowed:.3f}"
            )


def fold_summary(folds: np.ndarray, y: np.ndarray, labels: Sequence[str]) -> list[dict[str, float]]:
    """Per fold: images and prevalence per label (for logs and the run directory)."""
    y2 = _as_2d(y, len(folds))
    rows = []
    for fold in range(int(np.max(folds)) + 1):
        row: dict[str, float] = {"fold": fold, "images": int(np.sum(folds == fold))}
        for j, label in enumerate(labels):
            col = y2[folds == fold, j]
            col = col[~np.isnan(col)]
            row[label] = float(col.mean()) if col.size else math.nan
        rows.append(row)
    return rows


def save_folds(path: str | Path, images: Sequence[str], patient_ids: Sequence[str], folds: np.ndarray) -> None:
    """Write ``image,patient_id,fold`` rows (the run directory's ``folds.csv``)."""
    rows = ([image, pid, int(fold)] for image, pid, fold in zip(images, patient_ids, folds, strict=True))
    write_atomic(path, csv_bytes([["image", "patient_id", "fold"], *rows]))


def load_folds(path: str | Path, images: Sequence[str]) -> np.ndarray:
    """Read a ``folds.csv`` and return the fold of each of ``images`` (in that order).

    Raises:
        SplitError: an image of the cohort has no fold in the file, or the file lists unknown images.
    """
    with Path(path).open(newline="", encoding="utf-8") as handle:
        table = {row["image"]: int(row["fold"]) for row in csv.DictReader(handle)}
    missing = [image for image in images if image not in table]
    if missing or len(table) != len(images):
        raise SplitError(
            f"{path} does not match the cohort: {len(missing)} image(s) without a fold "
            f"(e.g. {missing[:3]}), {len(table)} rows for {len(images)} images"
        )
    return np.array([table[image] for image in images], dtype=np.int64)
