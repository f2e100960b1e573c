"""Comparison step (``cxr-train compare``): DeLong test between two models' predictions on one cohort.

The two prediction CSVs (format in :mod:`training.evaluate`) are matched on the ``image`` column;
only images present in both, with a known label and both scores, are compared. The labels of matched
images must agree, or the files do not describe the same cohort.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from training.delong import delong_test
from training.predictions import ENSEMBLE, PredictionTable, read_predictions


def _score(table: PredictionTable, label: str, column: str, path: Path) -> np.ndarray:
    """Scores of ``label`` by member ``column`` (a member name or a full ``score_<Label>__<member>``)."""
    if label not in table.scores:
        raise ValueError(f"{path}: no score columns for label {label!r} (found {sorted(table.scores)})")
    prefix = f"score_{label}__"
    member = column[len(prefix):] if column.startswith(prefix) else column
    if member not in table.scores[label]:
        raise ValueError(f"{path}: no member {member!r} for label {label!r} (found {table.members(label)})")
    return table.scores[label][member]


def _labels(table: PredictionTable, label: str, path: Path) -> np.ndarray:
    if label not in table.labels:
        raise ValueError(f"{path}: no column label_{label}")
    return table.labels[label]


def compare(
    pred_a_csv: str | Path,
    pred_b_csv: str | Path,
    label: str,
    score_col: str = ENSEMBLE,
    score_col_b: str | None = None,
    level: float = 0.95,
) -> dict[str, Any]:
    """Paired DeLong test of model A against model B on the images both files score.

    Args:
        pred_a_csv: Prediction CSV of model A.
        pred_b_csv: Prediction CSV of model B (may be the same file, to compare two members).
        label: Label to compare, e.g. ``Tuberculosis``.
        score_col: Member (or full score column) of A; ``ensemble`` by default.
        score_col_b: Member of B; ``score_col`` when None.
        level: Confidence level of the CI of the AUROC difference.

    Returns:
        The :class:`~training.delong.DeLongResult` fields plus ``label``, ``a``, ``b`` (file and
        column), ``n_matched``, ``n_only_a``, ``n_only_b`` and a one-line ``verdict``.

    Raises:
        ValueError: Missing label or column, no image in common, or labels that disagree.
    """
    path_a, path_b = Path(pred_a_csv), Path(pred_b_csv)
    table_a, table_b = read_predictions(path_a), read_predictions(path_b)
    col_b = score_col if score_col_b is None else score_col_b
    common, ia, ib = np.intersect1d(table_a.images, table_b.images, return_indices=True)
    if common.size == 0:
        raise ValueError(f"{path_a} and {path_b} have no image in common")
    y_a, y_b = _labels(table_a, label, path_a)[ia], _labels(table_b, label, path_b)[ib]
    both = ~(np.isnan(y_a) | np.isnan(y_b))
    clash = np.flatnonzero(both & (y_a != y_b))
    if clash.size:
        raise ValueError(f"label {label!r} differs between the files for {clash.size} image(s), "
                         f"first {common[clash[0]]!r}: not the same cohort")
    y = np.where(np.isnan(y_a), y_b, y_a)
    a = _score(table_a, label, score_col, path_a)[ia]
    b = _score(table_b, label, col_b, path_b)[ib]
    result = delong_test(y, a, b, level=level)
    verdict = (f"AUROC {result.auc1:.3f} ({score_col}) vs {result.auc2:.3f} ({col_b}), difference "
               f"{result.difference:+.3f} [{result.ci_low:+.3f}, {result.ci_high:+.3f}], DeLong "
               f"{'p<0.001' if result.p_value < 0.001 else f'p={result.p_value:.3f}'}")
    return {
        "label": label,
        "a": {"file": str(path_a), "column": score_col},
        "b": {"file": str(path_b), "column": col_b},
        "n_matched": int(common.size),
        "n_only_a": int(table_a.images.size - common.size),
        "n_only_b": int(table_b.images.size - common.size),
        **result.to_dict(),
        "verdict": verdict,
    }
