"""Shortcut audit step over a run directory: ``cxr-train baseline`` and ``cxr-train audit-blackout``.

:func:`baseline_run` trains the thumbnail floor on the run's folds and compares it with the OOF ensemble
(and every external cohort); :func:`blackout_run` scores the images again with their lungs blacked out.
Both merge their reports into the run's ``audits.json`` (:func:`merge_audits`), which ``cxr-train
evaluate`` puts in the report. The statistics themselves live in ``training.shortcuts``; their names
stay importable from here.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ai.pixels import read_image_file
from ai.preprocess import PreprocessSpec, preprocess_gray
from storage.files import write_atomic
from training.data import Cohort
from training.fit import run_probabilities
from training.jsonio import jsonable
from training.lungs import resize_nearest
from training.predictions import ENSEMBLE, PredictionTable, load_prediction_dir
from training.prepare import RunData, load_run_config, prepare_run
from training.rundir import RunDir, UnitKey
from training.shortcuts import (
    HISTOGRAM_BINS,
    PERCENTILES,
    THUMBNAIL_SIZE,
    ScoreFn,
    ThumbnailBaseline,
    area_downsample,
    blackout_audit,
    blackout_report,
    feature_matrix,
    floor_report,
    intensity_statistics,
    lung_blackout,
    thumbnail_baseline,
    thumbnail_features,
)
from training.unit import load_unit_model

__all__ = [
    "AUDIT_ORDER",
    "HISTOGRAM_BINS",
    "PERCENTILES",
    "THUMBNAIL_SIZE",
    "ScoreFn",
    "ThumbnailBaseline",
    "area_downsample",
    "baseline_run",
    "blackout_audit",
    "blackout_report",
    "blackout_run",
    "blackout_scores",
    "feature_matrix",
    "floor_report",
    "intensity_statistics",
    "lung_blackout",
    "merge_audits",
    "read_audits",
    "resize_nearest",
    "thumbnail_baseline",
    "thumbnail_features",
]

log = logging.getLogger(__name__)

AUDIT_ORDER = ("thumbnail_floor", "lung_blackout")


def read_audits(run_dir: str | Path) -> list[dict[str, Any]]:
    """The audit reports of a run directory's ``audits.json`` ([] when there is none).

    Raises:
        ValueError: the file is not a JSON list.
    """
    path = RunDir(run_dir).audits
    audits = json.loads(path.read_text(encoding="utf-8")) if path.exists() else []
    if not isinstance(audits, list):
        raise ValueError(f"{path}: expected a JSON list of audit reports")
    return audits


def merge_audits(run_dir: str | Path, kind: str, reports: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Replace the ``kind`` entries of ``RUN_DIR/audits.json`` by ``reports``, keep the others.

    The file is written atomically; entries are ordered by kind (thumbnail floor, lung blackout, others).
    Returns what was written.
    """
    merged = [a for a in read_audits(run_dir) if a.get("kind") != kind] + list(reports)

    def rank(a: dict[str, Any]) -> int:
        return AUDIT_ORDER.index(a["kind"]) if a.get("kind") in AUDIT_ORDER else len(AUDIT_ORDER)

    merged.sort(key=rank)
    text = json.dumps(jsonable(merged, nan="keep"), indent=1)
    write_atomic(RunDir(run_dir).audits, text.encode("utf-8"))
    return merged


def baseline_run(run_dir: str | Path, n_boot: int = 2000) -> list[dict[str, Any]]:
    """Thumbnail floor per label on the run's folds vs the OOF ensemble (and on every external cohort).

    Merges the reports into ``RUN_DIR/audits.json`` (read by ``cxr-train evaluate``; earlier floor
    entries are replaced, other audits kept) and returns them.
    """
    run_dir = Path(run_dir)
    config = load_run_config(run_dir)
    data = prepare_run(config, run_dir)
    oof, externals = load_prediction_dir(run_dir)
    reports = []
    for j, label in enumerate(config.labels):
        y = data.cohort.y[:, j]
        if not _both_classes(y):
            log.warning("baseline: %s has one class only in %s, skipped", label, data.cohort.name)
            continue
        floor = thumbnail_baseline(data.images, y, data.folds)
        reports.append(_floor_vs_model(data.cohort, oof, label, floor.oof_scores, n_boot))
        for cohort, images in data.externals:
            if cohort.name not in externals:
                continue
            if not _both_classes(cohort.y[:, j]):  # e.g. a child-only label on an adult TB cohort
                log.warning("baseline: %s is not known with both classes in %s, skipped", label, cohort.name)
                continue
            reports.append(_floor_vs_model(cohort, externals[cohort.name], label, floor.score(images), n_boot))
    merge_audits(run_dir, "thumbnail_floor", reports)
    return reports


def _both_classes(y: np.ndarray) -> bool:
    """Labels 1/0/NaN with both classes among the known ones (an AUROC needs both)."""
    return len(np.unique(y[~np.isnan(y)])) >= 2


def _floor_vs_model(
    cohort: Cohort, table: PredictionTable, label: str, floor_scores: np.ndarray, n_boot: int
) -> dict[str, Any]:
    """Floor report on the images a prediction table scores (matched on the image key)."""
    rows = _table_rows(cohort, table)
    y = cohort.y[rows, cohort.labels.index(label)]
    model = table.scores[label][ENSEMBLE]
    groups = np.asarray(cohort.patient_ids)[rows]
    return floor_report(y, model, floor_scores[rows], groups, cohort=table.name, label=label, n_boot=n_boot)


def _table_rows(cohort: Cohort, table: PredictionTable) -> np.ndarray:
    """The cohort row of each image of a prediction table."""
    position = {image: i for i, image in enumerate(cohort.images)}
    return np.array([position[str(image)] for image in table.images], dtype=int)


def blackout_run(run_dir: str | Path, fill: int | str = 0, n_boot: int = 2000) -> list[dict[str, Any]]:
    """Lung-blackout audit of the run's ensemble per cohort and label (``cxr-train audit-blackout``).

    Only images with a ``lung_mask`` take part. The scores with the lungs are the ``ensemble`` column of
    the run's prediction CSVs; the scores without them come from :func:`blackout_scores` (same models,
    same member/fold assignment). Cohorts without any mask and labels with one class among the masked
    images are skipped (logged). Merges the reports into ``RUN_DIR/audits.json`` and returns them.

    Raises:
        ValueError: No image of any cohort has a lung mask, or the run is not finished.
        FileNotFoundError: Not a run directory, or no prediction CSVs.
    """
    run_dir = Path(run_dir)
    config = load_run_config(run_dir)
    oof, externals = load_prediction_dir(run_dir)
    data = prepare_run(config, run_dir)
    tables = [(data.cohort, oof)] + [(c, externals[c.name]) for c, _ in data.externals if c.name in externals]
    rows = {}
    for cohort, table in tables:
        positions = _table_rows(cohort, table)
        with_mask = np.array([cohort.masks[i] is not None for i in positions], dtype=bool)
        if not with_mask.any():
            log.warning("audit-blackout: no image of %s has a lung mask, skipped", cohort.name)
            continue
        rows[cohort.name] = (positions, with_mask)
    if not rows:
        raise ValueError("no image of any cohort has a lung mask (manifest column lung_mask): "
                         "the blackout audit cannot run")
    blacked = blackout_scores(run_dir, data, {name: pos[keep] for name, (pos, keep) in rows.items()}, fill)
    reports = []
    for cohort, table in tables:
        if cohort.name not in rows:
            continue
        positions, keep = rows[cohort.name]
        groups = np.asarray(cohort.patient_ids)[positions[keep]]
        for label in config.labels:
            y = table.labels[label][keep]
            if np.unique(y[~np.isnan(y)]).size < 2:
                log.warning("audit-blackout: %s has one class only among the masked images of %s, skipped",
                            label, cohort.name)
                continue
            report = blackout_report(y, table.scores[label][ENSEMBLE][keep],
                                     blacked[cohort.name][:, config.labels.index(label)], groups,
                                     cohort=table.name, label=label, n_boot=n_boot)
            report.update(n_without_mask=int(np.sum(~keep)), fill=fill)
            reports.append(report)
    merge_audits(run_dir, "lung_blackout", reports)
    return reports


def blackout_scores(
    run_dir: Path, data: RunData, rows: dict[str, np.ndarray], fill: int | str = 0
) -> dict[str, np.ndarray]:
    """Ensemble probabilities ``[n, L]`` of images with their lungs blacked out, per cohort name.

    ``rows[name]`` are positions in that cohort (the training cohort: ``data.cohort``; external ones:
    ``data.externals``), each with a lung mask. Each image is read from its source file, blacked out
    there (:func:`training.shortcuts.lung_blackout`, mask read alike) and preprocessed with the run's spec
    (``ai.preprocess.preprocess_gray``). Training-cohort images are scored by the model of their
    held-out fold, external ones by the mean of the fold models; then the mean over architectures.
    """
    config = data.config
    cohorts = {c.name: c for c in [data.cohort, *(c for c, _ in data.externals)]}
    done = {key for key, _ in RunDir(run_dir).finished_units()}
    units = [UnitKey(arch, fold) for arch in config.architectures for fold in config.fold_indices()]
    missing = [key.name for key in units if key not in done]
    if missing:
        raise ValueError(f"{run_dir}: unit(s) {missing} not finished; run `cxr-train fit` first")
    pixels = {name: _blacked_pixels(cohorts[name], index, data.spec, fill, config.progress)
              for name, index in rows.items()}
    train = data.cohort.name
    train_folds = data.folds[rows[train]] if train in rows else np.array([], dtype=int)
    sums = {name: np.zeros((len(index), len(config.labels))) for name, index in rows.items()}
    n_folds = len(config.fold_indices())
    for key in units:
        model = load_unit_model(run_dir, config, key, data.device)
        for name, images in pixels.items():
            if name != train:
                sums[name] += run_probabilities(model, data, images, desc=f"{key.name} {name} blackout") / n_folds
            elif np.any(held_out := train_folds == key.fold):
                sums[name][held_out] += run_probabilities(model, data, images, np.flatnonzero(held_out),
                                                          desc=f"{key.name} blackout")
    return {name: total / len(config.architectures) for name, total in sums.items()}


def _blacked_pixels(
    cohort: Cohort, index: np.ndarray, spec: PreprocessSpec, fill: int | str, progress: bool = False
) -> np.ndarray:
    """uint8 ``[n, S, S]``: images ``index`` of ``cohort``, lungs blacked out in the source, then preprocessed."""
    out = np.empty((len(index), spec.size, spec.size), dtype=np.uint8)
    for n, i in enumerate(tqdm(index, desc=f"blackout {cohort.name}", disable=not progress, leave=False)):
        mask = cohort.masks[i]
        assert mask is not None  # the caller passes only images with a mask
        blacked = lung_blackout(read_image_file(cohort.paths[i]), read_image_file(mask), fill)
        out[n] = preprocess_gray(blacked, spec)[0]
    return out
