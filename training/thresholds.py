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

from ai.manifest import QUANTILE_POINTS, ScoreReference
from training import metrics
from training.predictions import ENSEMBLE, PredictionTable

KINDS = ("youden", "sensitivity")
"""The operating points: Youden J, and the highest threshold reaching the target sensitivity."""

PLACEMENTS = ("midway", "score")
"""Where the threshold lies: ``midway`` between the score that decides the operating point and the next lower
score (:func:`training.metrics.midway_below`: no float32 rounding or other CPU moves an image across it), or on
that ``score`` itself (packages up to chest-default-1.6.x; ``docs/model/threshold-rule.md``)."""


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
    kinds: Sequence[str] = KINDS, placement: str = "midway",
) -> dict[str, Any]:
    """Operating thresholds for ``label`` from the OOF ensemble score (``p >= t`` = positive).

    Args:
        oof: the out-of-fold predictions.
        label: the label.
        target_sensitivity: the target of the ``sensitivity`` operating point.
        members: None: the table's ``ensemble`` column; else the mean of these members' scores
            (:func:`ensemble_of`); a strict subset of the table's members is named in the method.
        kinds: the operating points to choose (``KINDS``).
        placement: ``"midway"`` to the next lower score, or on the ``"score"`` (``PLACEMENTS``); the same decisions
            on these images either way.

    Returns:
        ``{"youden": {"value", "method"}, "sensitivity": {"value", "method", "target"}}`` (those of ``kinds``).

    Raises:
        ValueError: no label column for ``label``, an unknown kind, placement or member.
    """
    if label not in oof.labels:
        raise ValueError(f"OOF cohort has no label column for {label!r}: cannot choose its thresholds")
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        raise ValueError(f"unknown operating point(s) {unknown}; expected {list(KINDS)}")
    if placement not in PLACEMENTS:
        raise ValueError(f"unknown threshold placement {placement!r}; expected one of {list(PLACEMENTS)}")
    y = oof.labels[label]
    source = "OOF ensemble"
    if members is None:
        p = oof.scores[label][ENSEMBLE]
    else:
        p = ensemble_of(oof, label, members)
        if set(members) < set(oof.members(label)) - {ENSEMBLE}:
            source += f" of {', '.join(members)}"
    def placed(score: float) -> float:
        return metrics.midway_below(y, p, score) if placement == "midway" else score

    where = ", midway to the next lower score" if placement == "midway" else ""
    choice: dict[str, Any] = {}
    if "youden" in kinds:
        choice["youden"] = {"value": placed(metrics.youden_threshold(y, p)), "method": f"Youden J on {source}{where}"}
    if "sensitivity" in kinds:
        choice["sensitivity"] = {
            "value": placed(metrics.threshold_for_sensitivity(y, p, target_sensitivity)),
            "method": f"sensitivity >= {target_sensitivity:.2f} on {source}{where}",
            "target": target_sensitivity,
        }
    return choice


def reference_distribution(
    oof: PredictionTable, label: str, members: Sequence[str] | None = None, cohort: str = ""
) -> ScoreReference:
    """The OOF score distribution of ``label`` the package's thresholds were chosen on (manifest ``reference``).

    The scores are those :func:`choose_thresholds` uses (the ensemble, or the mean of ``members``), on the
    images whose label is known: with several training cohorts, those of the one cohort that carries it.

    Args:
        cohort: the training cohort's name, used when the table does not say (one training cohort).

    Raises:
        ValueError: no known label values, or one class only.
    """
    y = oof.labels[label]
    p = oof.scores[label][ENSEMBLE] if members is None else ensemble_of(oof, label, members)
    known = ~np.isnan(y) & ~np.isnan(p)
    y, p = y[known], p[known]
    if not (y == 1).any() or not (y == 0).any():
        raise ValueError(f"{label}: the OOF predictions need both classes for a reference distribution")
    sources = sorted(set(oof.sources[known].tolist())) if oof.sources is not None else [cohort]
    points = np.linspace(0.0, 1.0, QUANTILE_POINTS)

    def quantiles(values: np.ndarray) -> tuple[float, ...]:
        return tuple(round(float(q), 6) for q in np.quantile(values, points))

    subset = members is not None and set(members) < set(oof.members(label)) - {ENSEMBLE}
    return ScoreReference(
        source=f"OOF ensemble of {', '.join(members or ())}" if subset else "OOF ensemble",
        cohort="+".join(sources), n=int(y.size), prevalence=round(float(y.mean()), 6),
        quantiles=quantiles(p), quantiles_positive=quantiles(p[y == 1]), quantiles_negative=quantiles(p[y == 0]),
    )
