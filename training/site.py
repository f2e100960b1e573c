"""Site calibration step: choose a site's operating threshold on its own labelled sample.

A package's threshold is chosen on the training cohort's out-of-fold predictions. At another hospital
the scores shift (scanner, population, case mix), so a threshold that reaches sensitivity 0.90 on the
training cohort can reach much less there. The remedy is a local calibration sample: a few dozen
labelled studies from the site, scored by the package exactly as the node scores them (its
preprocessing, its ONNX members, the mean of the members).

For each label this step reports, on that sample:

- the package's own threshold: sensitivity and specificity it reaches at this site;
- the site threshold: the highest threshold reaching the target sensitivity on the whole sample (the
  value to put into ``[thresholds]`` of ``node.toml``). Its in-sample rates are optimistic by
  construction, so they are reported as such;
- the honest estimate of that rule: patient-grouped k-fold inside the sample, the threshold chosen on
  k-1 folds and applied to the held-out fold, the held-out calls pooled, Wilson 95% CIs. This is the
  sensitivity a new patient of this site can expect from the rule, and its spread across folds.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from training import metrics
from training.data import Cohort
from training.evaluate import ENSEMBLE, PredictionTable
from training.splits import grouped_stratified_kfold

log = logging.getLogger(__name__)

MIN_PER_CLASS = 10
"""Fewest positive and fewest negative patients a calibration sample must have, per label."""


def score_cohort(package_dir: str | Path, cohort: Cohort, threads: int | None = None) -> PredictionTable:
    """Score every image of ``cohort`` with the package as the node does; one column per member.

    Args:
        package_dir: the model package (``manifest.json`` + members), verified on load.
        cohort: the calibration sample; its labels are matched to the package's labels.
        threads: onnxruntime threads per member (default: the node's default).

    Returns:
        The prediction table (members ``member<i>`` and their mean ``ensemble``), labels of the
        package's labels that the cohort has.

    Raises:
        ModelPackageError: an invalid package.
        UnsupportedImage: an image that cannot be read (named; nothing is skipped silently).
    """
    from ai.ensemble import Ensemble
    from ai.pixels import read_image_file
    from ai.preprocess import preprocess

    ensemble = Ensemble.load(package_dir, providers=["CPUExecutionProvider"], threads=threads)
    manifest = ensemble.manifest
    labels = [label for label in manifest.labels if label in cohort.labels]
    if not labels:
        raise ValueError(f"cohort {cohort.name!r} has none of the package's labels {list(manifest.labels)} "
                         f"(columns label_<Label>), found {list(cohort.labels)}")  # fmt: skip
    n_members, n_labels = len(manifest.members), len(manifest.labels)
    member_scores = np.empty((n_members, len(cohort), n_labels), dtype=np.float64)
    for i, path in enumerate(cohort.paths):
        x, _ = preprocess(read_image_file(path), manifest.preprocess)
        member_scores[:, i, :] = ensemble.predict(x[np.newaxis]).member_probabilities[:, 0, :]
        if (i + 1) % 50 == 0 or i + 1 == len(cohort):
            log.info("site calibration: scored %d/%d images of %s", i + 1, len(cohort), cohort.name)
    return PredictionTable(
        images=np.asarray(cohort.images),
        patient_ids=np.asarray(cohort.patient_ids),
        labels={label: cohort.y[:, cohort.labels.index(label)] for label in labels},
        scores={
            label: {f"member{m}": member_scores[m, :, manifest.labels.index(label)] for m in range(n_members)}
            for label in labels
        },
        sites=np.asarray(cohort.sites),
        sexes=np.asarray(cohort.sexes),
        ages=cohort.ages,
        name=cohort.name,
    )


def _check_sample(y: np.ndarray, groups: np.ndarray, label: str, k: int) -> None:
    """Enough positive and negative patients for a threshold and a k-fold estimate of it."""
    pos_patients = np.unique(groups[y == 1]).size
    neg_patients = np.unique(groups[y == 0]).size
    need = max(MIN_PER_CLASS, k)
    if pos_patients < need or neg_patients < need:
        raise ValueError(f"{label}: the calibration sample needs at least {need} positive and {need} negative "
                         f"patients, found {pos_patients} and {neg_patients}")  # fmt: skip


def crossval_threshold(
    y: np.ndarray, p: np.ndarray, groups: np.ndarray, target: float = 0.90, k: int = 5, seed: int = 0
) -> dict[str, Any]:
    """Held-out performance of the rule "highest threshold reaching ``target`` sensitivity".

    Patients are split into ``k`` label-stratified folds; for each fold the threshold is chosen on the
    other folds only and applied to it. The held-out calls of all folds are pooled.

    Args:
        y: known labels (1/0) per image.
        p: scores per image.
        groups: patient id per image (a patient's images stay in one fold).
        target: the sensitivity the rule aims at.
        k: number of folds.
        seed: fold assignment seed.

    Returns:
        ``folds`` (per fold: threshold, held-out images, positives, true positives), ``thresholds``
        (min/median/max) and ``pooled`` (:func:`training.metrics.confusion_at` counts and Wilson rates of
        the held-out calls; its ``threshold`` is NaN: each fold had its own).

    Raises:
        ValueError: a training part without both classes.
        SplitError: ``k`` larger than the number of patients.
    """
    y = np.asarray(y, dtype=float)
    p = np.asarray(p, dtype=float)
    # the greedy split balances prevalence; tolerance 1 only skips the guard that small samples could trip
    folds = grouped_stratified_kfold([str(g) for g in groups], y, k=k, seed=seed, tolerance=1.0)
    called = np.zeros(y.size, dtype=bool)
    per_fold = []
    for f in range(k):
        test = folds == f
        t = metrics.threshold_for_sensitivity(y[~test], p[~test], target)
        called[test] = p[test] >= t
        per_fold.append({"fold": f, "threshold": t, "n": int(test.sum()), "positives": int(y[test].sum()),
                         "true_positives": int((called & test & (y == 1)).sum())})  # fmt: skip
    pooled = metrics.confusion_at(y, called.astype(float), 0.5)
    pooled["threshold"] = math.nan
    values = [entry["threshold"] for entry in per_fold]
    return {
        "k": k,
        "seed": seed,
        "folds": per_fold,
        "thresholds": {"min": min(values), "median": float(np.median(values)), "max": max(values)},
        "pooled": pooled,
    }


def floor_threshold(value: float, decimals: int = 6) -> float:
    """``value`` rounded down to ``decimals``: written into node.toml, it still calls the same images positive."""
    scale = 10**decimals
    return math.floor(value * scale) / scale


def calibrate_label(
    table: PredictionTable, label: str, package_threshold: float, target: float = 0.90, k: int = 5,
    seed: int = 0, n_boot: int = 2000,
) -> dict[str, Any]:  # fmt: skip
    """The site-calibration figures of one label on a scored sample (see the module docstring).

    Raises:
        ValueError: fewer than ``max(MIN_PER_CLASS, k)`` positive or negative patients.
    """
    y_all = table.labels[label]
    known = ~np.isnan(y_all)
    y, p = y_all[known], table.scores[label][ENSEMBLE][known]
    groups = table.patient_ids[known]
    _check_sample(y, groups, label, k)
    site_value = metrics.threshold_for_sensitivity(y, p, target)
    written = floor_threshold(site_value)
    return {
        "label": label,
        "n": int(y.size),
        "positives": int(y.sum()),
        "patients": int(np.unique(groups).size),
        "target_sensitivity": target,
        "auroc": metrics.bootstrap_ci(metrics.auroc, y, p, groups, n=n_boot, seed=seed).to_dict(),
        "package_threshold": metrics.confusion_at(y, p, package_threshold),
        "site_threshold": {
            "value": written,
            "method": f"sensitivity >= {target:.2f} on site sample {table.name} ({y.size} images)",
            "in_sample": metrics.confusion_at(y, p, written),
        },
        "held_out": crossval_threshold(y, p, groups, target, k, seed),
        "median_score": {"positives": float(np.median(p[y == 1])), "negatives": float(np.median(p[y == 0]))},
    }


def thresholds_snippet(results: Sequence[dict[str, Any]], cohort: str) -> str:
    """The ``[thresholds]`` table for node.toml, each value with where it came from."""
    lines = [f"[thresholds]   # site calibration on {cohort} (cxr-train site-threshold)"]
    for entry in results:
        held = entry["held_out"]["pooled"]["sensitivity"]
        lines.append(
            f"{entry['label']} = {entry['site_threshold']['value']:.6f}   # target sensitivity "
            f"{entry['target_sensitivity']:.2f}; held-out {held['value']:.3f} [{held['low']:.3f}, {held['high']:.3f}]"
        )
    return "\n".join(lines) + "\n"


def _rate(entry: dict[str, Any]) -> str:
    return f"{entry['value']:.3f} [{entry['low']:.3f}, {entry['high']:.3f}] ({entry['k']}/{entry['n']})"


def report_markdown(results: Sequence[dict[str, Any]], package: dict[str, str], cohort: str) -> str:
    """A short Markdown report of :func:`calibrate_label` results."""
    out = [f"# Site calibration: {package['name']} {package['version']} on {cohort}", ""]
    for e in results:
        held, pkg, ins = e["held_out"], e["package_threshold"], e["site_threshold"]["in_sample"]
        auc = e["auroc"]
        out += [
            f"## {e['label']}", "",
            f"{e['n']} images, {e['positives']} positive, {e['patients']} patients; AUROC "
            f"{auc['value']:.3f} [{auc['low']:.3f}, {auc['high']:.3f}]; median score positives "
            f"{e['median_score']['positives']:.3f}, negatives {e['median_score']['negatives']:.3f}.", "",
            "| threshold | value | sensitivity | specificity | how the rates were measured |",
            "|---|---|---|---|---|",
            f"| package | {pkg['threshold']:.4f} | {_rate(pkg['sensitivity'])} | {_rate(pkg['specificity'])} "
            "| on the whole sample (the threshold was chosen elsewhere) |",
            f"| site (to configure) | {e['site_threshold']['value']:.4f} | {_rate(ins['sensitivity'])} "
            f"| {_rate(ins['specificity'])} | in-sample: chosen on these images, optimistic |",
            f"| site rule, held out | {held['thresholds']['min']:.4f}-{held['thresholds']['max']:.4f} "
            f"| {_rate(held['pooled']['sensitivity'])} | {_rate(held['pooled']['specificity'])} "
            f"| {held['k']}-fold by patient: chosen on {held['k'] - 1} folds, counted on the held-out one |",
            "",
        ]  # fmt: skip
    return "\n".join(out)
