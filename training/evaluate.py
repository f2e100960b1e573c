"""Evaluation step: prediction tables of every cohort -> metrics with CIs (the report: ``training.report``).

The prediction CSVs are read by ``training.predictions`` (their format is documented there).

Evaluation protocol: operating thresholds (Youden J; the highest threshold reaching the target
sensitivity) are chosen once, on the OOF ensemble score (``training.thresholds``), and applied unchanged
to every member and every cohort. Every member and the ensemble are reported side by side.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from training import metrics
from training.jsonio import jsonable
from training.predictions import (
    ENSEMBLE,
    PredictionTable,
    load_prediction_dir,
    read_predictions,
    write_predictions,
)
from training.report import write_plots, write_report
from training.rundir import OOF
from training.thresholds import choose_thresholds

__all__ = [
    "AGE_BANDS",
    "ENSEMBLE",
    "FORMAT_VERSION",
    "OOF",
    "PredictionTable",
    "age_bands",
    "choose_thresholds",
    "evaluate_cohorts",
    "evaluate_dir",
    "evaluate_label",
    "fold_thresholds",
    "jsonable",
    "load_prediction_dir",
    "model_metrics",
    "read_predictions",
    "subgroup_metrics",
    "write_plots",
    "write_predictions",
    "write_report",
]
# moved, importable from here as before: PredictionTable, ENSEMBLE, read/write/load (training.predictions),
# choose_thresholds (training.thresholds), jsonable (training.jsonio), write_report/write_plots (training.report)

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
AGE_BANDS: tuple[tuple[str, float, float], ...] = (
    ("<18", -math.inf, 18.0),
    ("18-40", 18.0, 40.0),
    ("40-60", 40.0, 60.0),
    (">=60", 60.0, math.inf),
)
"""(name, lower bound inclusive, upper bound exclusive) in years."""


def _thin(*arrays: np.ndarray, max_points: int = 200) -> list[list[float]]:
    """Keep at most ``max_points`` evenly spaced points (first and last kept) of parallel arrays."""
    n = arrays[0].size
    idx = np.unique(np.round(np.linspace(0, n - 1, min(n, max_points))).astype(int))
    return [a[idx].tolist() for a in arrays]


def _curves(y: np.ndarray, p: np.ndarray, n_hist_bins: int = 20) -> dict[str, Any]:
    """ROC and PR curve points (thinned) and score histograms per class, for the plots."""
    roc = metrics.roc_points(y, p)
    pr = metrics.pr_points(y, p)
    lo, hi = (0.0, 1.0) if p.min() >= 0 and p.max() <= 1 else (float(p.min()), float(p.max()))
    edges = np.linspace(lo, hi, n_hist_bins + 1)
    fpr, tpr = _thin(roc["fpr"], roc["tpr"])
    recall, precision = _thin(pr["recall"], pr["precision"])
    return {
        "roc": {"fpr": fpr, "tpr": tpr},
        "pr": {"recall": recall, "precision": precision},
        "histogram": {
            "bin_edges": edges.tolist(),
            "positive": np.histogram(p[y == 1], edges)[0].tolist(),
            "negative": np.histogram(p[y == 0], edges)[0].tolist(),
        },
    }


def _calibration(y: np.ndarray, p: np.ndarray) -> dict[str, Any]:
    if p.min() < 0 or p.max() > 1:
        return {"skipped": f"scores in [{p.min():.3g}, {p.max():.3g}] are not probabilities"}
    return {"brier": metrics.brier(y, p), "ece": metrics.ece(y, p),
            "reliability": metrics.reliability_curve(y, p)}


def _known(y: np.ndarray, p: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    keep = ~(np.isnan(y) | np.isnan(p))
    return y[keep], p[keep], groups[keep]


def model_metrics(
    y: np.ndarray, p: np.ndarray, groups: np.ndarray, thresholds: Mapping[str, Any], n_boot: int, seed: int
) -> dict[str, Any]:
    """All figures of one score on one cohort and label.

    Args:
        y: Labels 1/0/NaN.
        p: Scores (NaN = not scored).
        groups: Patient id per image.
        thresholds: ``choose_thresholds`` output (fixed, from OOF).
        n_boot: Bootstrap resamples.
        seed: Bootstrap seed (the same for every model: paired resamples).
    """
    y, p, groups = _known(y, p, groups)
    n_pos = int(y.sum())
    out: dict[str, Any] = {"n": int(y.size), "n_pos": n_pos, "n_neg": int(y.size) - n_pos,
                           "n_patients": int(np.unique(groups).size)}
    out["operating_points"] = {k: metrics.confusion_at(y, p, t["value"]) for k, t in thresholds.items()}
    if n_pos == 0 or n_pos == y.size:
        out["skipped"] = f"one class only ({n_pos} positive of {y.size}): AUROC, AUPRC, calibration undefined"
        return out
    fns: dict[str, metrics.Metric] = {"auroc": metrics.auroc, "auprc": metrics.auprc}
    for kind, t in thresholds.items():
        fns[f"balanced_accuracy:{kind}"] = partial(metrics.balanced_accuracy, threshold=t["value"])
    ci = metrics.bootstrap_many(fns, y, p, groups, n=n_boot, seed=seed)
    out["auroc"] = ci["auroc"].to_dict()
    out["auprc"] = ci["auprc"].to_dict()
    out["balanced_accuracy"] = {k: ci[f"balanced_accuracy:{k}"].to_dict() for k in thresholds}
    out["calibration"] = _calibration(y, p)
    out["curves"] = _curves(y, p)
    return out


def age_bands(ages: np.ndarray) -> np.ndarray:
    """Age band name per image (``AGE_BANDS``), "" where the age is unknown."""
    bands = np.full(ages.size, "", dtype=object)
    for name, low, high in AGE_BANDS:
        bands[(ages >= low) & (ages < high)] = name
    return bands.astype(str)


def _attributes(table: PredictionTable) -> dict[str, np.ndarray]:
    """Subgroup attributes present with at least two known values."""
    found = {"site": table.sites, "sex": table.sexes,
             "age_band": None if table.ages is None else age_bands(table.ages)}
    return {k: v for k, v in found.items() if v is not None and np.unique(v[v != ""]).size >= 2}


def subgroup_metrics(
    table: PredictionTable, label: str, thresholds: Mapping[str, Any], n_boot: int, seed: int
) -> dict[str, dict[str, Any]]:
    """Ensemble AUROC (bootstrap CI) and sensitivity/specificity at the Youden threshold per subgroup.

    Subgroups with one class only are listed with the reason they were skipped.
    """
    y_all, p_all = table.labels[label], table.scores[label][ENSEMBLE]
    out: dict[str, dict[str, Any]] = {}
    for attr, values in _attributes(table).items():
        out[attr] = {}
        present = set(values.tolist()) - {""}
        ordered = [b[0] for b in AGE_BANDS if b[0] in present] if attr == "age_band" else sorted(present)
        for value in ordered:
            sel = values == value
            y, p, g = _known(y_all[sel], p_all[sel], table.patient_ids[sel])
            n_pos = int(y.sum())
            entry: dict[str, Any] = {"n": int(y.size), "n_pos": n_pos, "n_neg": int(y.size) - n_pos}
            if n_pos == 0 or n_pos == y.size:
                entry["skipped"] = "one class only: AUROC undefined"
            else:
                entry["auroc"] = metrics.bootstrap_ci(metrics.auroc, y, p, g, n=n_boot, seed=seed).to_dict()
            point = metrics.confusion_at(y, p, thresholds["youden"]["value"])
            entry["sensitivity"] = point["sensitivity"]
            entry["specificity"] = point["specificity"]
            out[attr][value] = entry
    return out


def evaluate_label(
    table: PredictionTable, label: str, thresholds: Mapping[str, Any], n_boot: int, seed: int, oof: bool = False
) -> dict[str, Any]:
    """Every member and the ensemble on one cohort and label, plus subgroups and the ROC band; for ``oof`` (a
    training cohort's out-of-fold table) each fold's own threshold where the table has folds."""
    if label not in table.labels:
        return {"skipped": f"cohort {table.name!r} has no label column for {label!r}"}
    if label not in table.scores:
        raise ValueError(f"cohort {table.name!r} has labels but no scores for {label!r}")
    y = table.labels[label]
    known = y[~np.isnan(y)]
    out: dict[str, Any] = {
        "n": int(known.size), "n_pos": int(known.sum()), "n_unknown": int(y.size - known.size),
        "prevalence": float(known.mean()) if known.size else math.nan,
        "ensemble_is_computed_mean": label in table.ensemble_computed,
        "models": {m: model_metrics(y, table.scores[label][m], table.patient_ids, thresholds, n_boot, seed)
                   for m in table.members(label)},
    }
    if "skipped" not in out["models"][ENSEMBLE]:
        out["roc_band"] = metrics.roc_band(y, table.scores[label][ENSEMBLE], table.patient_ids, n=n_boot,
                                           seed=seed)
    out["subgroups"] = subgroup_metrics(table, label, thresholds, n_boot, seed)
    if oof and table.folds is not None and "sensitivity" in thresholds:
        out["fold_thresholds"] = fold_thresholds(table, label, thresholds["sensitivity"]["target"])
    return out


def fold_thresholds(table: PredictionTable, label: str, target_sensitivity: float) -> dict[str, Any]:
    """Each fold's own threshold at ``target_sensitivity`` on its OOF ensemble scores, and their spread.

    The package threshold is chosen on all folds' OOF scores together; each fold's are those of another
    model. Folds calibrated alike give alike thresholds; a wide spread says the pooled threshold rests on
    models whose scores mean different things, and will move with the next training.
    """
    assert table.folds is not None
    y, p = table.labels[label], table.scores[label][ENSEMBLE]
    per_fold: dict[str, Any] = {}
    for fold in sorted(set(table.folds.tolist()) - {""}, key=lambda f: (len(f), f)):
        rows = (table.folds == fold) & ~np.isnan(y) & ~np.isnan(p)
        n_pos = int(y[rows].sum())
        entry: dict[str, Any] = {"n": int(rows.sum()), "n_pos": n_pos}
        if 0 < n_pos < rows.sum():
            entry["threshold"] = metrics.threshold_for_sensitivity(y[rows], p[rows], target_sensitivity)
        per_fold[fold] = entry
    values = [e["threshold"] for e in per_fold.values() if "threshold" in e]
    spread = max(values) - min(values) if len(values) > 1 else math.nan
    return {"target": target_sensitivity, "folds": per_fold, "spread": spread}


def _not_carried(table: PredictionTable, label: str) -> dict[str, Any] | None:
    """A skip for a label another training cohort carries (its OOF rows here are all unknown), else None."""
    if table.name.startswith(f"{OOF}:") and label in table.labels and np.isnan(table.labels[label]).all():
        return {"skipped": f"{label} is not a label of training cohort {table.name[len(OOF) + 1:]!r}"}
    return None


def evaluate_cohorts(
    oof: PredictionTable,
    externals: Mapping[str, PredictionTable],
    labels: Sequence[str] | None = None,
    target_sensitivity: float = 0.90,
    n_boot: int = 2000,
    seed: int = 0,
    audits: Sequence[Mapping[str, Any]] = (),
    threshold_at: str = "midway",
) -> dict[str, Any]:
    """Evaluate the OOF cohort (each training cohort apart) and every external cohort; thresholds from OOF only.

    A run's OOF table has rows of several training cohorts when it trained on several; since a label is
    known in one training cohort only (``training.prepare.check_not_pooled``), its OOF threshold is chosen
    on that cohort's rows, and every figure is reported per cohort (``oof:<cohort>``).

    Args:
        oof: Out-of-fold predictions of the development cohort.
        externals: Cohort name -> predictions.
        labels: Labels to evaluate (default: every label the OOF table scores).
        target_sensitivity: Target of the sensitivity operating point.
        n_boot: Bootstrap resamples per CI.
        seed: Bootstrap seed.
        audits: Shortcut-audit results (``training.audits``) to carry into the report.
        threshold_at: where the OOF thresholds lie (``training.thresholds.PLACEMENTS``).

    Returns:
        A JSON-ready dict (NaN and infinities as None): ``settings``, ``labels``, ``thresholds``,
        ``cohorts`` (name -> ``n_images``, ``n_patients``, ``labels``), ``audits``.
    """
    if OOF in externals:
        raise ValueError(f"an external cohort may not be named {OOF!r}")
    labels = list(labels) if labels is not None else list(oof.scores)
    thresholds = {label: choose_thresholds(oof, label, target_sensitivity, placement=threshold_at) for label in labels}
    cohorts: dict[str, Any] = {}
    oof_tables = oof.by_source(OOF)  # several training cohorts: each its own ("oof:<cohort>"), never pooled
    for name, table in {**oof_tables, **externals}.items():
        log.info("evaluating cohort %s (%d images)", name, len(table))
        cohorts[name] = {
            "n_images": len(table),
            "n_patients": int(np.unique(table.patient_ids).size),
            "labels": {label: _not_carried(table, label) or evaluate_label(table, label, thresholds[label], n_boot,
                                                                            seed, oof=name in oof_tables)
                       for label in labels},
        }
    results = {
        "format_version": FORMAT_VERSION,
        "settings": {"target_sensitivity": target_sensitivity, "n_boot": n_boot, "seed": seed, "level": 0.95,
                     "threshold_source": "OOF ensemble", "threshold_at": threshold_at,
                     "age_bands": [b[0] for b in AGE_BANDS]},
        "labels": labels,
        "thresholds": thresholds,
        "cohorts": cohorts,
        "audits": list(audits),
    }
    return jsonable(results)



def evaluate_dir(
    pred_dir: str | Path, out_dir: str | Path, labels: Sequence[str] | None = None,
    target_sensitivity: float = 0.90, n_boot: int = 2000, seed: int = 0,
    audits: Sequence[Mapping[str, Any]] = (), threshold_at: str = "midway",
) -> Path:
    """``cxr-train evaluate`` in one call: read ``predictions_*.csv`` of a folder, evaluate, report.

    Returns:
        The path of ``report.md`` in ``out_dir``.
    """
    oof, externals = load_prediction_dir(pred_dir)
    results = evaluate_cohorts(oof, externals, labels, target_sensitivity, n_boot, seed, audits, threshold_at)
    return write_report(results, out_dir)
