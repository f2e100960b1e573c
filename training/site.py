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

Only images the node would score count: a DICOM file passes the node's tag filter first (``accept``), and
every decoded image the node's input gate (``ai.gate``, ``gate``) before the model, as in
``ai.analyse.analyse_image``. ``cxr-train site-threshold`` passes both in, configured as the node's
``node.toml`` configures them; the images either refuses are left out and listed with the reason.

:func:`site_threshold_run` composes the step; it writes ``scores_<cohort>.csv`` (the prediction-CSV
format), ``site_threshold.json`` and ``site_threshold.md``.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from ai.analyse import model_input
from ai.ensemble import Ensemble, Prediction
from ai.errors import ImageRefused, UnsupportedImage
from ai.gate import InputGate
from ai.manifest import load_manifest
from ai.pixels import dicom_to_float, is_dicom_file, read_dicom_file, read_image_file
from storage.files import write_atomic
from training import metrics
from training.data import Cohort, load_cohort
from training.jsonio import jsonable
from training.predictions import ENSEMBLE, PredictionTable, cohort_table, write_predictions
from training.splits import grouped_stratified_kfold

Accept = Callable[[pydicom.Dataset], tuple[bool, str]]
"""Whether the node would analyse a DICOM dataset, and why (the CLI passes the node's chest filter in)."""

SITE_JSON = "site_threshold.json"
SITE_MARKDOWN = "site_threshold.md"

log = logging.getLogger(__name__)

MIN_PER_CLASS = 10
"""Fewest positive and fewest negative patients a calibration sample must have, per label."""


@dataclass
class ScoredSample:
    """A calibration sample scored by a package.

    Attributes:
        table: the images the node would analyse: members ``member<i>`` and the node's own ensemble
            probability (float32 mean of the members, the value it compares with the threshold).
        excluded: images the node's filter would not analyse (DICOM only), as
            ``{"line": CSV line, "reason": the filter's reason}``.
        refused_by_gate: images the node's input gate refused (any format), as
            ``{"line": CSV line, "reason": the gate's reason}``.
    """

    table: PredictionTable
    excluded: list[dict[str, Any]] = field(default_factory=list)
    refused_by_gate: list[dict[str, Any]] = field(default_factory=list)


def calibrated_labels(package_labels: Sequence[str], cohort: Cohort) -> list[str]:
    """The package's labels that the cohort has (in package order); logs the ones left out.

    Raises:
        ValueError: no label in common.
    """
    labels = [label for label in package_labels if label in cohort.labels]
    if not labels:
        raise ValueError(f"cohort {cohort.name!r} ({cohort.csv_path.name}) has none of the package's labels "
                         f"{list(package_labels)} (columns label_<Label>), found {list(cohort.labels)}")
    ignored = [label for label in (*package_labels, *cohort.labels) if label not in labels]
    log.info("site calibration of %s; not calibrated (absent from the package or the cohort): %s",
             labels, ignored or "none")
    return labels


def check_sample(cohort: Cohort, label: str, k: int, rows: np.ndarray | None = None) -> None:
    """Enough positive and negative patients of ``label`` (among ``rows``) for a threshold and a k-fold.

    Raises:
        ValueError: naming the cohort, the label, the counts needed and found.
    """
    y = cohort.y[:, cohort.labels.index(label)]
    groups = np.asarray(cohort.patient_ids)
    if rows is not None:
        y, groups = y[rows], groups[rows]
    _check_counts(y, groups, f"{cohort.name} ({cohort.csv_path.name}), {label}", k)


def score_cohort(
    package_dir: str | Path, cohort: Cohort, labels: Sequence[str], accept: Accept | None = None,
    threads: int | None = None, gate: InputGate | None = None,
) -> ScoredSample:
    """Score every image of ``cohort`` with the package as the node does.

    DICOM files first pass ``accept`` (``cxr-train site-threshold`` passes the node's chest filter with the
    node's ``[filter]`` and rules file; None: every DICOM file counts); those it refuses are excluded and
    listed with its reason. Every decoded image then passes ``gate`` (the node's input gate; None: every
    image counts), refused ones listed likewise. Then the pixels go through the node's preprocessing and
    ensemble.

    Raises:
        ModelPackageError: an invalid package.
        UnsupportedImage: an image that cannot be read, named with its manifest line (nothing is
            skipped silently).
    """
    ensemble = Ensemble.load(package_dir, providers=["CPUExecutionProvider"], threads=threads)
    manifest = ensemble.manifest
    n_members = len(manifest.members)
    members = np.full((n_members, len(cohort), len(manifest.labels)), np.nan)
    mean = np.full((len(cohort), len(manifest.labels)), np.nan)
    excluded: list[dict[str, Any]] = []
    refused: list[dict[str, Any]] = []
    for i, path in enumerate(cohort.paths):
        where = f"{cohort.csv_path.name} line {i + 2}"
        prediction, by_gate, reason = _score_image(Path(path), ensemble, accept, gate, where)
        if prediction is None:
            (refused if by_gate else excluded).append({"line": i + 2, "reason": reason})
        else:
            members[:, i, :] = prediction.member_probabilities[:, 0, :]
            mean[i] = prediction.probabilities[0]
        if (i + 1) % 50 == 0 or i + 1 == len(cohort):
            log.info("site calibration: %d/%d images of %s done", i + 1, len(cohort), cohort.name)
    if refused:
        log.info("site calibration: the input gate refused %d image(s) of %s", len(refused), cohort.name)
    keep = np.flatnonzero(~np.isnan(mean[:, 0]))
    index = {label: manifest.labels.index(label) for label in labels}
    table = cohort_table(cohort.subset(keep), {
        label: {**{f"member{m}": members[m, keep, j] for m in range(n_members)}, ENSEMBLE: mean[keep, j]}
        for label, j in index.items()
    })
    return ScoredSample(table=table, excluded=excluded, refused_by_gate=refused)


def _score_image(
    path: Path, ensemble: Ensemble, accept: Accept | None, gate: InputGate | None, where: str
) -> tuple[Prediction | None, bool, str]:
    """One file as the node handles it: (the ensemble's prediction, False, ""), or (None, False, the filter's
    reason) for a DICOM file the filter refuses, or (None, True, the gate's reason) for an image the gate refuses."""
    try:
        if is_dicom_file(path):
            ds = read_dicom_file(path)
            accepted, reason = accept(ds) if accept is not None else (True, "")
            if not accepted:
                return None, False, reason
            image = dicom_to_float(ds)
        else:
            image = read_image_file(path)
        x, _ = model_input(image, ensemble, gate)  # the node's gate decision and preprocessing
    except ImageRefused as refused:
        return None, True, refused.reason
    except (InvalidDicomError, OSError, ValueError, EOFError, UnsupportedImage) as exc:
        raise UnsupportedImage(f"{where}: cannot be analysed as the node would: {exc}") from exc
    return ensemble.predict({size: image[np.newaxis] for size, image in x.items()}), False, ""


def _check_counts(y: np.ndarray, groups: np.ndarray, what: str, k: int) -> None:
    """Enough positive and negative patients for a threshold and a k-fold estimate of it."""
    pos_patients = np.unique(groups[y == 1]).size
    neg_patients = np.unique(groups[y == 0]).size
    need = max(MIN_PER_CLASS, k)
    if pos_patients < need or neg_patients < need:
        raise ValueError(f"{what}: the calibration sample needs at least {need} positive and {need} negative "
                         f"patients, found {pos_patients} and {neg_patients}")


def rates_at(
    y: np.ndarray, called: np.ndarray, groups: np.ndarray, n_boot: int = 2000, seed: int = 0
) -> dict[str, Any]:
    """Counts and rates of the calls ``called`` (bool per image), with 95% CIs that respect patients.

    One image per patient: Wilson intervals (:func:`training.metrics.confusion_at`). Otherwise the
    sensitivity and specificity intervals come from a patient-level stratified bootstrap, since Wilson
    over images would treat a patient's images as independent. ``ci`` says which.
    """
    rates = metrics.confusion_at(y, called.astype(float), 0.5)
    rates["threshold"] = math.nan
    rates["ci"] = "wilson"
    if np.unique(groups).size < groups.size:
        rates["ci"] = "patient bootstrap"
        boot = metrics.bootstrap_many(
            {"sensitivity": lambda yy, pp: float(pp[yy == 1].mean()),
             "specificity": lambda yy, pp: float(1.0 - pp[yy == 0].mean())},
            y, called.astype(float), groups, n_boot, seed,
        )
        for name in ("sensitivity", "specificity"):
            rates[name].update(low=boot[name].low, high=boot[name].high)
    return rates


def crossval_threshold(
    y: np.ndarray, p: np.ndarray, groups: np.ndarray, target: float = 0.90, k: int = 5, seed: int = 0,
    n_boot: int = 2000,
) -> dict[str, Any]:
    """Held-out performance of the rule "highest threshold reaching ``target`` sensitivity".

    Patients are split into ``k`` label-stratified folds; for each fold the threshold is chosen on the
    other folds only and applied to it. The held-out calls of all folds are pooled; their CIs treat
    them as independent, although the folds' training parts overlap (the usual approximation).

    Args:
        y: known labels (1/0) per image.
        p: scores per image.
        groups: patient id per image (a patient's images stay in one fold).
        target: the sensitivity the rule aims at.
        k: number of folds.
        seed: fold assignment and bootstrap seed.
        n_boot: bootstrap resamples (used only when a patient has several images).

    Returns:
        ``folds`` (per fold: threshold, images, positives, negatives, true positives and negatives,
        sensitivity, specificity), ``thresholds`` (min/median/max), ``pooled`` (:func:`rates_at` of the
        held-out calls) and ``image_folds`` (the fold of each image).

    Raises:
        ValueError: a training part without both classes.
        SplitError: ``k`` larger than the number of patients.
    """
    y = np.asarray(y, dtype=float)
    p = np.asarray(p, dtype=float)
    groups = np.asarray(groups).astype(str)
    # the greedy split balances prevalence; tolerance 1 only skips the guard that small samples could trip
    folds = grouped_stratified_kfold(list(groups), y, k=k, seed=seed, tolerance=1.0)
    called = np.zeros(y.size, dtype=bool)
    per_fold = []
    for f in range(k):
        test = folds == f
        t = metrics.threshold_for_sensitivity(y[~test], p[~test], target)
        called[test] = p[test] >= t
        pos, neg = test & (y == 1), test & (y == 0)
        n_pos, n_neg = int(pos.sum()), int(neg.sum())
        tp, tn = int((called & pos).sum()), int((~called & neg).sum())
        per_fold.append({"fold": f, "threshold": t, "n": int(test.sum()), "positives": n_pos, "negatives": n_neg,
                         "true_positives": tp, "true_negatives": tn, "sensitivity": tp / max(n_pos, 1),
                         "specificity": tn / max(n_neg, 1)})
    values = [entry["threshold"] for entry in per_fold]
    return {
        "k": k,
        "seed": seed,
        "folds": per_fold,
        "thresholds": {"min": min(values), "median": float(np.median(values)), "max": max(values)},
        "pooled": rates_at(y, called, groups, n_boot, seed),
        "image_folds": folds,
    }


def floor_threshold(value: float, decimals: int = 6) -> float:
    """``value`` rounded down to ``decimals`` for node.toml: every image called positive at ``value`` still is
    (images scoring between the two would be called positive too; the rates are measured at the written value)."""
    scale = 10**decimals
    return math.floor(value * scale) / scale


def calibrate_label(
    table: PredictionTable, label: str, package_threshold: float, target: float = 0.90, k: int = 5,
    seed: int = 0, n_boot: int = 2000,
) -> dict[str, Any]:
    """The site-calibration figures of one label on a scored sample (see the module docstring).

    Raises:
        ValueError: fewer than ``max(MIN_PER_CLASS, k)`` positive or negative patients.
    """
    y_all = table.labels[label]
    known = ~np.isnan(y_all)
    y, p = y_all[known], table.scores[label][ENSEMBLE][known]
    groups = table.patient_ids[known]
    _check_counts(y, groups, f"{table.name}, {label}", k)
    written = floor_threshold(metrics.threshold_for_sensitivity(y, p, target))
    held_out = crossval_threshold(y, p, groups, target, k, seed, n_boot)
    del held_out["image_folds"]
    package = rates_at(y, p >= package_threshold, groups, n_boot, seed)
    package["threshold"] = package_threshold
    in_sample = rates_at(y, p >= written, groups, n_boot, seed)
    in_sample["threshold"] = written
    return {
        "label": label,
        "n": int(y.size),
        "positives": int(y.sum()),
        "patients": int(np.unique(groups).size),
        "target_sensitivity": target,
        "auroc": metrics.bootstrap_ci(metrics.auroc, y, p, groups, n=n_boot, seed=seed).to_dict(),
        "package_threshold": package,
        "site_threshold": {
            "value": written,
            "method": f"sensitivity >= {target:.2f} on site sample {table.name} ({y.size} images)",
            "in_sample": in_sample,
        },
        "held_out": held_out,
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
    """``value [low, high] (k/n)`` of one rate."""
    return f"{entry['value']:.3f} [{entry['low']:.3f}, {entry['high']:.3f}] ({entry['k']}/{entry['n']})"


def report_markdown(
    results: Sequence[dict[str, Any]], package: dict[str, str], cohort: str, excluded: Sequence[dict[str, Any]] = (),
    refused_by_gate: Sequence[dict[str, Any]] = (),
) -> str:
    """A short Markdown report of :func:`calibrate_label` results."""
    out = [f"# Site calibration: {package['name']} {package['version']} on {cohort}", ""]
    if excluded:
        out += [f"{len(excluded)} image(s) left out because the node's filter would not analyse them "
                "(`site_threshold.json` lists their manifest lines and reasons).", ""]
    if refused_by_gate:
        out += [f"{len(refused_by_gate)} image(s) left out because the node's input gate refused them "
                "(`site_threshold.json` lists their manifest lines and reasons).", ""]
    for e in results:
        held, pkg, ins = e["held_out"], e["package_threshold"], e["site_threshold"]["in_sample"]
        auc = e["auroc"]
        folds = ", ".join(f"{f['sensitivity']:.2f}" for f in held["folds"])
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
            f"Held-out sensitivity per fold: {folds}. 95% CIs: {held['pooled']['ci']}; the held-out calls of the "
            "folds are pooled as if independent. The held-out row is what new patients of this site can expect; "
            "a CI reaching below the target means the sample cannot show that the target is met.",
            "",
        ]
    return "\n".join(out)


def site_threshold_run(
    package: str | Path, cohort_csv: str | Path, out: str | Path, target: float = 0.90, k: int = 5,
    seed: int = 0, n_boot: int = 2000, threads: int | None = None, accept: Accept | None = None,
    gate: InputGate | None = None,
) -> dict[str, Any]:
    """Score a site's labelled sample with a package and calibrate each label (``cxr-train site-threshold``).

    ``accept`` and ``gate`` decide, as in the node, which images count (:func:`score_cohort`).
    Everything is checked before scoring, and the three outputs are written only when all labels are
    calibrated: ``scores_<cohort>.csv`` (the prediction-CSV format: `evaluate` and `compare` read it),
    ``site_threshold.json`` and ``site_threshold.md`` in ``out``. Returns the JSON's content.

    Raises:
        ValueError: an invalid target or k, an invalid manifest (CohortError), too few positive or
            negative patients. UnsupportedImage: an image the node could not read.
    """
    if not 0.0 < target <= 1.0 or k < 2:
        raise ValueError(f"--target-sensitivity must be in (0, 1] and --folds at least 2, found {target} and {k}")
    manifest = load_manifest(package)
    cohort = load_cohort(cohort_csv)
    labels = calibrated_labels(manifest.labels, cohort)
    for label in labels:
        check_sample(cohort, label, k)
    scored = score_cohort(package, cohort, labels, accept, threads, gate)
    results = [
        calibrate_label(scored.table, label, manifest.thresholds[label].value, target, k, seed, n_boot)
        for label in labels
    ]
    info = {"name": manifest.name, "version": manifest.version, "path": str(package)}
    gate_info = "off" if gate is None else f"{gate.manifest.name} {gate.manifest.version}"
    snippet = thresholds_snippet(results, cohort.name)
    result = {"package": info, "cohort": cohort.summary(), "excluded_by_filter": scored.excluded,
              "gate": gate_info, "refused_by_gate": scored.refused_by_gate, "labels": results, "snippet": snippet}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    markdown = report_markdown(results, info, cohort.name, scored.excluded, scored.refused_by_gate)
    markdown += f"\n```toml\n{snippet}```\n"
    write_atomic(out / SITE_JSON, json.dumps(jsonable(result), indent=1).encode("utf-8"))
    write_atomic(out / SITE_MARKDOWN, markdown.encode("utf-8"))
    write_predictions(scored.table, out / f"scores_{cohort.name}.csv")
    return result
