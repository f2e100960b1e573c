"""Prediction tables: the one reader and the one writer of prediction CSVs.

Prediction CSV format (one file per cohort: written by the fit, the site calibration and tests, read by
evaluate, compare, the audits and export)
==========================================================================================================

``predictions_oof.csv`` holds the out-of-fold predictions of the development cohort;
``predictions_<cohort>.csv`` (e.g. ``predictions_montgomery.csv``) one external cohort each. One row
per image, UTF-8, comma-separated, a header row, columns in any order:

- ``image`` (required, unique): the image key, the ``image`` value of the cohort manifest;
- ``patient_id``: patient key (bootstrap resampling moves a patient's images together); empty or
  absent = one patient per image;
- ``site``, ``sex`` (free text, empty = unknown), ``age`` (years, empty = unknown): optional, for
  subgroup analyses (age bands <18, 18-40, 40-60, >=60);
- ``cohort``: the training cohort of each row, in the OOF predictions of a run with several training
  cohorts (``[[train]]``): every figure is reported per cohort (:meth:`PredictionTable.by_source`);
- ``fold``: the fold whose model scored the row, in a run's OOF predictions (per-fold figures);
- ``label_<Label>``: ``1``, ``0`` or empty (unknown, masked out per label); ``<Label>`` is the
  canonical label name (``training.labels``), e.g. ``label_Tuberculosis``;
- ``score_<Label>__<member>``: probability in [0, 1] of one ensemble member (an architecture, or an
  (architecture, fold) unit), empty where the member did not score the image (e.g. OOF rows outside
  its held-out fold). The member name follows the first ``__`` and may contain anything but a comma;
- ``score_<Label>__ensemble``: the ensemble's probability (the mean of the members). When absent it
  is computed here as the mean of the members' non-empty scores.

Two number formats, each file's as it always was (:func:`write_predictions`): ``"exact"`` (every digit,
``repr``; site calibration scores and tables written by tests) and ``"run"`` (the fit's
``predictions_*.csv``: scores with 8 significant digits, ages with 6, extra columns such as ``fold``).
"""

from __future__ import annotations

import csv
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from storage.files import write_atomic
from training.data import Cohort, csv_bytes
from training.rundir import RunDir, prediction_cohort

ENSEMBLE = "ensemble"
_UNKNOWN = {"", "nan", "NaN", "NA"}
NumberFormat = Literal["exact", "run"]

@dataclass
class PredictionTable:
    """Per-image labels and scores of one cohort (see the CSV format above).

    Attributes:
        images: Image key per row (unique).
        patient_ids: Patient key per row.
        labels: Label -> float array of 1/0/NaN.
        scores: Label -> member -> float array (NaN = not scored); always holds ``ensemble``.
        sites: Site per row ("" = unknown), or None when absent.
        sexes: Sex per row ("" = unknown), or None when absent.
        ages: Age in years per row (NaN = unknown), or None when absent.
        name: Cohort name.
        sources: Training cohort per row (the ``cohort`` column), or None when absent.
        folds: Fold per row (the ``fold`` column, "" = unknown), or None when absent.
    """

    images: np.ndarray
    patient_ids: np.ndarray
    labels: dict[str, np.ndarray]
    scores: dict[str, dict[str, np.ndarray]]
    sites: np.ndarray | None = None
    sexes: np.ndarray | None = None
    ages: np.ndarray | None = None
    name: str = ""
    ensemble_computed: set[str] = field(default_factory=set)
    sources: np.ndarray | None = None
    folds: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.images = np.asarray(self.images, dtype=str)
        n = self.images.size
        if np.unique(self.images).size != n:
            raise ValueError(f"cohort {self.name!r}: image keys must be unique")
        self.patient_ids = np.asarray(self.patient_ids, dtype=str)
        self.labels = {k: _column(v, n, f"label {k!r}") for k, v in self.labels.items()}
        self.scores = {
            label: {m: _column(v, n, f"score {label!r}/{m!r}") for m, v in members.items()}
            for label, members in self.scores.items()
        }
        for label, members in self.scores.items():
            if ENSEMBLE not in members:
                with warnings.catch_warnings():  # an image no member scored stays NaN
                    warnings.simplefilter("ignore", RuntimeWarning)
                    members[ENSEMBLE] = np.nanmean(np.vstack(list(members.values())), axis=0)
                self.ensemble_computed.add(label)
        for attr in ("patient_ids", "sites", "sexes"):
            value = getattr(self, attr)
            if value is not None and np.asarray(value).size != n:
                size = np.asarray(value).size
                raise ValueError(f"cohort {self.name!r}: {attr} has {size} rows, expected {n}")
        if self.sources is not None and np.asarray(self.sources).size != n:
            raise ValueError(f"cohort {self.name!r}: sources has {np.asarray(self.sources).size} rows, expected {n}")
        self.sources = None if self.sources is None else np.asarray(self.sources, dtype=str)
        if self.folds is not None and np.asarray(self.folds).size != n:
            raise ValueError(f"cohort {self.name!r}: folds has {np.asarray(self.folds).size} rows, expected {n}")
        self.folds = None if self.folds is None else np.asarray(self.folds, dtype=str)
        self.sites = None if self.sites is None else np.asarray(self.sites, dtype=str)
        self.sexes = None if self.sexes is None else np.asarray(self.sexes, dtype=str)
        self.ages = None if self.ages is None else _column(self.ages, n, "age")

    def __len__(self) -> int:
        return int(self.images.size)

    def members(self, label: str) -> list[str]:
        """Member names for ``label``, the ensemble last."""
        return [m for m in self.scores[label] if m != ENSEMBLE] + [ENSEMBLE]

    def subset(self, rows: np.ndarray, name: str) -> PredictionTable:
        """The rows ``rows`` (indices or a mask) as a table named ``name``."""
        def cut(values: np.ndarray | None) -> np.ndarray | None:
            return None if values is None else np.asarray(values)[rows]
        return PredictionTable(
            images=self.images[rows], patient_ids=self.patient_ids[rows], name=name,
            labels={k: v[rows] for k, v in self.labels.items()},
            scores={k: {m: v[rows] for m, v in members.items()} for k, members in self.scores.items()},
            sites=cut(self.sites), sexes=cut(self.sexes), ages=cut(self.ages), sources=cut(self.sources),
            folds=cut(self.folds), ensemble_computed=set(self.ensemble_computed),
        )

    def by_source(self, prefix: str) -> dict[str, PredictionTable]:
        """One table per training cohort (``<prefix>:<cohort>``), or ``{prefix: self}`` for one source."""
        if self.sources is None or np.unique(self.sources).size < 2:
            return {prefix: self}
        return {f"{prefix}:{source}": self.subset(self.sources == source, f"{prefix}:{source}")
                for source in dict.fromkeys(self.sources.tolist())}


def _column(values: Any, n: int, what: str) -> np.ndarray:
    array = np.asarray(values, dtype=float).ravel()
    if array.size != n:
        raise ValueError(f"{what} has {array.size} rows, expected {n}")
    return array


def _cell_float(text: str, where: str, allowed: set[str] | None = None) -> float:
    text = text.strip()
    if text in _UNKNOWN:
        return math.nan
    if allowed is not None and text not in allowed:
        raise ValueError(f"{where}: expected 1, 0 or empty, found {text!r}")
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{where}: expected a number or empty, found {text!r}") from None


def _parse_header(header: Sequence[str], path: Path) -> tuple[dict[str, str], dict[str, dict[str, str]]]:
    """``{label: column}`` and ``{label: {member: column}}`` from a prediction CSV header."""
    if "image" not in header:
        raise ValueError(f"{path}: missing required column 'image' (found {list(header)[:8]})")
    label_cols = {c[len("label_"):]: c for c in header if c.startswith("label_")}
    score_cols: dict[str, dict[str, str]] = {}
    for col in header:
        if not col.startswith("score_"):
            continue
        label, sep, member = col[len("score_"):].partition("__")
        if not sep or not label or not member:
            raise ValueError(f"{path}: score column {col!r} must be named score_<Label>__<member>")
        score_cols.setdefault(label, {})[member] = col
    if not score_cols:
        raise ValueError(f"{path}: no score_<Label>__<member> column found")
    return label_cols, score_cols


def read_predictions(path: str | Path, name: str | None = None) -> PredictionTable:
    """Read a prediction CSV (format at the top of this module).

    Args:
        path: The CSV file.
        name: Cohort name; by default ``<cohort>`` from ``predictions_<cohort>.csv`` (else the stem).

    Raises:
        ValueError: A missing ``image`` column, a misnamed score column or a bad cell, naming the
            file, line and column.
    """
    path = Path(path)
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
        header = list(reader.fieldnames or [])
    label_cols, score_cols = _parse_header(header, path)
    cell = {line: row for line, row in enumerate(rows, start=2)}

    def column(col: str, allowed: set[str] | None = None) -> np.ndarray:
        return np.array([_cell_float(r.get(col) or "", f"{path} line {i} column {col!r}", allowed)
                         for i, r in cell.items()])

    def text(col: str) -> np.ndarray | None:
        return np.array([(r.get(col) or "").strip() for r in rows], dtype=str) if col in header else None

    images = text("image")
    assert images is not None  # _parse_header requires the column
    patients = text("patient_id")
    patients = images if patients is None else np.where(patients == "", images, patients)
    if name is None:
        name = prediction_cohort(path)
    return PredictionTable(
        images=images, patient_ids=patients, name=name,
        labels={label: column(col, {"1", "0", "1.0", "0.0"}) for label, col in label_cols.items()},
        scores={label: {m: column(col) for m, col in cols.items()} for label, cols in score_cols.items()},
        sites=text("site"), sexes=text("sex"), ages=column("age") if "age" in header else None,
        sources=text("cohort"), folds=text("fold"),
    )




def cohort_table(cohort: Cohort, scores: Mapping[str, Mapping[str, np.ndarray]]) -> PredictionTable:
    """The rows of ``cohort`` with ``scores`` (label -> member -> one value per row): its labels (those of
    ``scores``), patients, sites, sexes, ages and name."""
    return PredictionTable(
        images=np.asarray(cohort.images),
        patient_ids=np.asarray(cohort.patient_ids),
        labels={label: cohort.y[:, cohort.labels.index(label)] for label in scores},
        scores={label: dict(members) for label, members in scores.items()},
        sites=np.asarray(cohort.sites),
        sexes=np.asarray(cohort.sexes),
        ages=cohort.ages,
        name=cohort.name,
    )


def _exact(value: float) -> str:
    return "" if math.isnan(value) else repr(float(value))


def _age_cells(ages: np.ndarray, number_format: NumberFormat) -> list[str]:
    if number_format == "run":
        return ["" if math.isnan(age) else f"{age:g}" for age in ages]
    return [_exact(v) for v in ages]


def _score_cells(scores: np.ndarray, number_format: NumberFormat) -> list[str]:
    if number_format == "run":
        return [f"{float(v):.8g}" for v in scores]
    return [_exact(v) for v in scores]


def write_predictions(
    table: PredictionTable, path: str | Path, number_format: NumberFormat = "exact",
    extra: Mapping[str, Sequence[str]] | None = None,
) -> Path:
    """Write a :class:`PredictionTable` as a prediction CSV (the only writer); returns the path.

    Columns: ``image``, ``patient_id``, then ``site``, ``sex``, ``age`` where the table has them, the
    ``extra`` columns (text per row, e.g. the run's ``fold``), ``fold`` and ``cohort`` where the table has
    ``folds`` and ``sources`` (unless ``extra`` names them), ``label_*`` (1, 0, empty) and per label
    ``score_<Label>__<member>`` for every member, the ensemble last.

    Args:
        number_format: ``"exact"``: ages and scores with every digit (``repr``), NaN as empty cells;
            ``"run"``: the fit's files: scores with 8 significant digits, ages with 6 (NaN age empty).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns: dict[str, list[str]] = {"image": table.images.tolist(), "patient_id": table.patient_ids.tolist()}
    if table.sites is not None:
        columns["site"] = table.sites.tolist()
    if table.sexes is not None:
        columns["sex"] = table.sexes.tolist()
    if table.ages is not None:
        columns["age"] = _age_cells(table.ages, number_format)
    for name, cells in (extra or {}).items():
        columns[name] = list(cells)
    if table.folds is not None and "fold" not in columns:
        columns["fold"] = table.folds.tolist()
    if table.sources is not None and "cohort" not in columns:
        columns["cohort"] = table.sources.tolist()
    for label, y in table.labels.items():
        columns[f"label_{label}"] = ["" if math.isnan(v) else str(int(v)) for v in y]
    for label in table.scores:
        for member in table.members(label):
            columns[f"score_{label}__{member}"] = _score_cells(table.scores[label][member], number_format)
    write_atomic(path, csv_bytes([list(columns), *zip(*columns.values(), strict=True)]))
    return path


def load_prediction_dir(folder: str | Path) -> tuple[PredictionTable, dict[str, PredictionTable]]:
    """``predictions_oof.csv`` and every other ``predictions_<cohort>.csv`` of a folder.

    Raises:
        FileNotFoundError: No ``predictions_oof.csv`` in the folder.
    """
    run = RunDir(folder)
    oof_path = run.oof_predictions
    if not oof_path.is_file():
        raise FileNotFoundError(f"{oof_path} not found: the OOF predictions choose the thresholds")
    externals = {prediction_cohort(p): read_predictions(p) for p in run.prediction_files() if p != oof_path}
    return read_predictions(oof_path), externals
