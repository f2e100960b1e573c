"""The one threshold chooser: operating thresholds of a label from the OOF predictions.

``cxr-train evaluate`` reports both operating points of the OOF ensemble; ``cxr-train export`` writes one of
them into the manifest, chosen on the ensemble of the members it exports (``--members``: a subset of the
run's architectures gives another ensemble, hence other thresholds, and the method says which). Both call
:func:`choose_thresholds`, so the same scores always give the same threshold and method text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from training import metrics
from training.predictions import ENSEMBLE, PredictionTable

KINDS = ("youden", "sensitivity")
"""The operating points: Youden J, and the highest threshold reaching the target sensitivity."""


def ensemble_of(table: PredictionTable, label: str, members: Sequence[str]) -> np.ndarray:
    """Mean score of ``members`` for ``label`` in a prediction table (the exported ensemble).

    Raises:
        ValueError: a member the table has no scores of.
    """
    missing = [m for m in members if m not in table.scores.get(label, {})]
    if missing:
        raise ValueError(f"prediction table {table.name!r} has no scores of {missing} for {label}")
    return np.mean([table.scores[label][m] for m in members], axis=0)


def choose_thresholds(
    oof: PredictionTable, label: str, target_sensitivity: float = 0.90, members: Sequence[str] | None = None,
    kinds: Sequence[str] = KINDS,
) -> dict[str, Any]:
    """Operating thresholds for ``label`` from the OOF ensemble score (``p >= t`` = positive).

    Args:
        oof: the out-of-fold predictions.
        label: the label.
        target_sensitivity: the target of the ``sensitivity`` operating point.
        members: None: the table's ``ensemble`` column; else the mean of these members' scores
            (:func:`ensemble_of`); a strict subset of the table's members is named in the method.
        kinds: the operating points to choose (``KINDS``).

    Returns:
        ``{"youden": {"value", "method"}, "sensitivity": {"value", "method", "target"}}`` (those of ``kinds``).

    Raises:
        ValueError: no label column for ``label``, an unknown kind or member.
    """
    if label not in oof.labels:
        raise ValueError(f"OOF cohort has no label column for {label!r}: cannot choose its thresholds")
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        raise ValueError(f"unknown operating point(s) {unknown}; expected {list(KINDS)}")
    y = oof.labels[label]
    source = "OOF ensemble"
    if members is None:
        p = oof.scores[label][ENSEMBLE]
    else:
        p = ensemble_of(oof, label, members)
        if set(members) < set(oof.members(label)) - {ENSEMBLE}:
            source += f" of {', '.join(members)}"
    choice: dict[str, Any] = {}
    if "youden" in kinds:
        choice["youden"] = {"value": metrics.youden_threshold(y, p), "method": f"Youden J on {source}"}
    if "sensitivity" in kinds:
        choice["sensitivity"] = {
            "value": metrics.threshold_for_sensitivity(y, p, target_sensitivity),
            "method": f"sensitivity >= {target_sensitivity:.2f} on {source}",
            "target": target_sensitivity,
        }
    return choice
