"""Evaluation step: score tables of every cohort -> metrics with CIs -> Markdown report with plots.

Prediction CSV format (one file per cohort, written by the training loop, read here)
===================================================================================

``predictions_oof.csv`` holds the out-of-fold predictions of the development cohort;
``predictions_<cohort>.csv`` (e.g. ``predictions_montgomery.csv``) one external cohort each. One row
per image, UTF-8, comma-separated, a header row, columns in any order:

- ``image`` (required, unique): the image key, the ``image`` value of the cohort manifest;
- ``patient_id``: patient key (bootstrap resampling moves a patient's images together); empty or
  absent = one patient per image;
- ``site``, ``sex`` (free text, empty = unknown), ``age`` (years, empty = unknown): optional, for
  subgroup analyses (age bands <18, 18-40, 40-60, >=60);
- ``label_<Label>``: ``1``, ``0`` or empty (unknown, masked out per label); ``<Label>`` is the
  canonical label name (``training.labels``), e.g. ``label_Tuberculosis``;
- ``score_<Label>__<member>``: probability in [0, 1] of one ensemble member (an architecture, or an
  (architecture, fold) unit), empty where the member did not score the image (e.g. OOF rows outside
  its held-out fold). The member name follows the first ``__`` and may contain anything but a comma;
- ``score_<Label>__ensemble``: the ensemble's probability (the mean of the members). When absent it
  is computed here as the mean of the members' non-empty scores.

Evaluation protocol: operating thresholds (Youden J; the highest threshold reaching the target
sensitivity) are chosen once, on the OOF ensemble score, and applied unchanged to every member and
every cohort. Every member and the ensemble are reported side by side.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from storage.files import write_atomic
from training import metrics
from training.data import csv_bytes

log = logging.getLogger(__name__)

ENSEMBLE = "ensemble"
OOF = "oof"
FORMAT_VERSION = 1
AGE_BANDS: tuple[tuple[str, float, float], ...] = (
    ("<18", -math.inf, 18.0),
    ("18-40", 18.0, 40.0),
    ("40-60", 40.0, 60.0),
    (">=60", 60.0, math.inf),
)
"""(name, lower bound inclusive, upper bound exclusive) in years."""
_UNKNOWN = {"", "nan", "NaN", "NA"}


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
        self.sites = None if self.sites is None else np.asarray(self.sites, dtype=str)
        self.sexes = None if self.sexes is None else np.asarray(self.sexes, dtype=str)
        self.ages = None if self.ages is None else _column(self.ages, n, "age")

    def __len__(self) -> int:
        return int(self.images.size)

    def members(self, label: str) -> list[str]:
        """Member names for ``label``, the ensemble last."""
        return [m for m in self.scores[label] if m != ENSEMBLE] + [ENSEMBLE]


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
        name = path.stem[len("predictions_"):] if path.stem.startswith("predictions_") else path.stem
    return PredictionTable(
        images=images, patient_ids=patients, name=name,
        labels={label: column(col, {"1", "0", "1.0", "0.0"}) for label, col in label_cols.items()},
        scores={label: {m: column(col) for m, col in cols.items()} for label, cols in score_cols.items()},
        sites=text("site"), sexes=text("sex"), ages=column("age") if "age" in header else None,
    )


def _fmt_cell(value: float) -> str:
    return "" if math.isnan(value) else repr(float(value))


def write_predictions(table: PredictionTable, path: str | Path) -> Path:
    """Write a :class:`PredictionTable` as a prediction CSV (NaN as empty cells); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns: dict[str, list[str]] = {"image": table.images.tolist(), "patient_id": table.patient_ids.tolist()}
    for attr, col in (("sites", "site"), ("sexes", "sex")):
        if getattr(table, attr) is not None:
            columns[col] = getattr(table, attr).tolist()
    if table.ages is not None:
        columns["age"] = [_fmt_cell(v) for v in table.ages]
    for label, y in table.labels.items():
        columns[f"label_{label}"] = ["" if math.isnan(v) else str(int(v)) for v in y]
    for label in table.scores:
        for member in table.members(label):
            columns[f"score_{label}__{member}"] = [_fmt_cell(v) for v in table.scores[label][member]]
    write_atomic(path, csv_bytes([list(columns), *zip(*columns.values(), strict=True)]))
    return path


def load_prediction_dir(folder: str | Path) -> tuple[PredictionTable, dict[str, PredictionTable]]:
    """``predictions_oof.csv`` and every other ``predictions_<cohort>.csv`` of a folder.

    Raises:
        FileNotFoundError: No ``predictions_oof.csv`` in the folder.
    """
    folder = Path(folder)
    oof_path = folder / f"predictions_{OOF}.csv"
    if not oof_path.is_file():
        raise FileNotFoundError(f"{oof_path} not found: the OOF predictions choose the thresholds")
    externals = {
        p.stem[len("predictions_"):]: read_predictions(p)
        for p in sorted(folder.glob("predictions_*.csv")) if p != oof_path
    }
    return read_predictions(oof_path), externals


def choose_thresholds(oof: PredictionTable, label: str, target_sensitivity: float = 0.90) -> dict[str, Any]:
    """Operating thresholds for ``label`` from the OOF ensemble score (``p >= t`` = positive).

    Returns:
        ``{"youden": {"value", "method"}, "sensitivity": {"value", "method", "target"}}``.
    """
    if label not in oof.labels:
        raise ValueError(f"OOF cohort has no label column for {label!r}: cannot choose its thresholds")
    y, p = oof.labels[label], oof.scores[label][ENSEMBLE]
    return {
        "youden": {"value": metrics.youden_threshold(y, p), "method": "Youden J on OOF ensemble"},
        "sensitivity": {
            "value": metrics.threshold_for_sensitivity(y, p, target_sensitivity),
            "method": f"sensitivity >= {target_sensitivity:.2f} on OOF ensemble",
            "target": target_sensitivity,
        },
    }


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
    table: PredictionTable, label: str, thresholds: Mapping[str, Any], n_boot: int, seed: int
) -> dict[str, Any]:
    """Every member and the ensemble on one cohort and label, plus subgroups and the ROC band."""
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
    return out


def evaluate_cohorts(
    oof: PredictionTable,
    externals: Mapping[str, PredictionTable],
    labels: Sequence[str] | None = None,
    target_sensitivity: float = 0.90,
    n_boot: int = 2000,
    seed: int = 0,
    audits: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """Evaluate the OOF cohort and every external cohort; thresholds come from OOF only.

    Args:
        oof: Out-of-fold predictions of the development cohort.
        externals: Cohort name -> predictions.
        labels: Labels to evaluate (default: every label the OOF table scores).
        target_sensitivity: Target of the sensitivity operating point.
        n_boot: Bootstrap resamples per CI.
        seed: Bootstrap seed.
        audits: Shortcut-audit results (``training.audits``) to carry into the report.

    Returns:
        A JSON-ready dict (NaN and infinities as None): ``settings``, ``labels``, ``thresholds``,
        ``cohorts`` (name -> ``n_images``, ``n_patients``, ``labels``), ``audits``.
    """
    if OOF in externals:
        raise ValueError(f"an external cohort may not be named {OOF!r}")
    labels = list(labels) if labels is not None else list(oof.scores)
    thresholds = {label: choose_thresholds(oof, label, target_sensitivity) for label in labels}
    cohorts: dict[str, Any] = {}
    for name, table in {OOF: oof, **externals}.items():
        log.info("evaluating cohort %s (%d images)", name, len(table))
        cohorts[name] = {
            "n_images": len(table),
            "n_patients": int(np.unique(table.patient_ids).size),
            "labels": {label: evaluate_label(table, label, thresholds[label], n_boot, seed)
                       for label in labels},
        }
    results = {
        "format_version": FORMAT_VERSION,
        "settings": {"target_sensitivity": target_sensitivity, "n_boot": n_boot, "seed": seed, "level": 0.95,
                     "threshold_source": "OOF ensemble", "age_bands": [b[0] for b in AGE_BANDS]},
        "labels": labels,
        "thresholds": thresholds,
        "cohorts": cohorts,
        "audits": list(audits),
    }
    return jsonable(results)


def jsonable(obj: Any) -> Any:
    """A copy of ``obj`` that ``json.dumps(allow_nan=False)`` accepts: NaN/inf -> None, numpy -> Python."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | np.ndarray):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _ci(entry: Mapping[str, Any] | None) -> str:
    """``0.912 [0.881, 0.940]``; a dash where undefined."""
    if not entry or entry.get("value") is None:
        return "–"
    low, high = entry.get("low"), entry.get("high")
    if low is None or high is None:
        return f"{entry['value']:.3f}"
    return f"{entry['value']:.3f} [{low:.3f}, {high:.3f}]"


def _rate(entry: Mapping[str, Any]) -> str:
    return f"{_ci(entry)} ({entry['k']}/{entry['n']})"


def _model_name(member: str) -> str:
    return f"**{member}**" if member == ENSEMBLE else member


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return [*lines, ""]


def _each_model(results: Mapping[str, Any], label: str) -> list[tuple[str, str, dict, dict]]:
    """(cohort, member, label entry, model entry) for every evaluated model of ``label``."""
    out = []
    for cohort, c in results["cohorts"].items():
        entry = c["labels"][label]
        for member, m in entry.get("models", {}).items():
            out.append((cohort, member, entry, m))
    return out


def _md_discrimination(results: Mapping[str, Any], label: str) -> list[str]:
    target = results["settings"]["target_sensitivity"]
    header = ["Cohort", "Model", "n (pos)", "AUROC [95% CI]", "AUPRC [95% CI]", "No-skill AUPRC (prevalence)",
              "Bal. acc. @ Youden", f"Bal. acc. @ sens {target:.2f}"]
    rows = []
    for cohort, member, _, m in _each_model(results, label):
        ba = m.get("balanced_accuracy", {})
        prevalence = "–" if m.get("skipped") else f"{m['n_pos'] / m['n']:.3f}"
        rows.append([cohort, _model_name(member), f"{m['n']} ({m['n_pos']})", _ci(m.get("auroc")),
                     _ci(m.get("auprc")), prevalence, _ci(ba.get("youden")), _ci(ba.get("sensitivity"))])
    skipped = [f"- {cohort}: {m['skipped']}" for cohort, member, _, m in _each_model(results, label)
               if member == ENSEMBLE and m.get("skipped")]
    return ["### Discrimination", "", *_table(header, rows), *skipped, *([""] if skipped else [])]


def _md_operating_points(results: Mapping[str, Any], label: str) -> list[str]:
    header = ["Cohort", "Model", "Operating point", "Threshold", "Sensitivity", "Specificity", "PPV", "NPV"]
    rows = []
    for cohort, member, _, m in _each_model(results, label):
        for kind, op in m["operating_points"].items():
            rates = [_rate(op[k]) for k in ("sensitivity", "specificity", "ppv", "npv")]
            rows.append([cohort, _model_name(member), kind, f"{op['threshold']:.4f}", *rates])
    note = ("Thresholds fixed on the OOF ensemble and applied unchanged to every member and cohort; "
            "rates with Wilson 95% CIs (k/n).")
    return ["### Operating points", "", note, "", *_table(header, rows)]


def _md_calibration(results: Mapping[str, Any], label: str) -> list[str]:
    rows = []
    for cohort, member, _, m in _each_model(results, label):
        cal = m.get("calibration") or {}
        if "brier" in cal:
            rows.append([cohort, _model_name(member), f"{cal['brier']:.4f}", f"{cal['ece']:.4f}"])
        else:
            rows.append([cohort, _model_name(member), "–", cal.get("skipped", m.get("skipped", "–"))])
    return ["### Calibration", "", *_table(["Cohort", "Model", "Brier", "ECE (10 bins)"], rows)]


def _md_subgroups(results: Mapping[str, Any], label: str) -> list[str]:
    rows = []
    for cohort, c in results["cohorts"].items():
        for attr, groups in c["labels"][label].get("subgroups", {}).items():
            for value, s in groups.items():
                rows.append([cohort, attr, value, f"{s['n']} ({s['n_pos']})", _ci(s.get("auroc")),
                             _ci(s["sensitivity"]), _ci(s["specificity"]), s.get("skipped", "")])
    if not rows:
        return ["### Subgroups", "", "No subgroup attribute (site, sex, age) with two or more values.", ""]
    header = ["Cohort", "Attribute", "Group", "n (pos)", "AUROC [95% CI]", "Sens @ Youden", "Spec @ Youden",
              "Note"]
    return ["### Subgroups (ensemble)", "", *_table(header, rows)]


def _md_audits(audits: Sequence[Mapping[str, Any]]) -> list[str]:
    lines = ["## Shortcut audits", ""]
    if not audits:
        return [*lines, "No shortcut audit was run (thumbnail floor, lung blackout).", ""]
    for a in audits:
        lines.append(f"- **{a.get('kind', 'audit')}** ({a.get('cohort', '?')}, {a.get('label', '?')}): "
                     f"{a.get('verdict', '')}{_audit_counts(a)}")
    return [*lines, ""]


def _audit_counts(audit: Mapping[str, Any]) -> str:
    """`` [n=40, 20 pos]``; for the lung blackout also the fill and the images without a lung mask."""
    parts = [f"n={audit['n']}, {audit.get('n_pos', '?')} pos"] if "n" in audit else []
    if audit.get("kind") == "lung_blackout":
        fill = audit.get("fill", 0)
        parts.append("lungs set to " + ("the background grey" if fill == "background" else f"grey {fill}"))
        if audit.get("n_without_mask"):
            parts.append(f"{audit['n_without_mask']} image(s) without a lung mask left out")
    return f" [{'; '.join(parts)}]" if parts else ""


def _md_header(results: Mapping[str, Any]) -> list[str]:
    s = results["settings"]
    cohorts = ", ".join(f"{name} ({c['n_images']} images, {c['n_patients']} patients)"
                        for name, c in results["cohorts"].items())
    rows = [[label, f"{t['youden']['value']:.4f}", f"{t['sensitivity']['value']:.4f}"]
            for label, t in results["thresholds"].items()]
    return [
        "# Evaluation report", "",
        f"Cohorts: {cohorts}.", "",
        f"AUROC, AUPRC and balanced accuracy: 95% CIs from {s['n_boot']} bootstrap resamples of patients, "
        f"stratified by label (seed {s['seed']}). Sensitivity, specificity, PPV, NPV: Wilson 95% CIs. "
        "Operating thresholds were chosen on the OOF ensemble only and are applied unchanged to every "
        "member and every cohort (an image is positive when its score >= the threshold).", "",
        "## Operating thresholds", "",
        *_table(["Label", "Youden J", f"Sensitivity >= {s['target_sensitivity']:.2f}"], rows),
    ]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "x"


def _save_figure(fig: Any, path: Path) -> None:
    """Render ``fig`` as PNG in memory, then write it whole (a full disk leaves no half image)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=100, format="png")
    write_atomic(path, buffer.getvalue())


def _new_axes(title: str) -> tuple[Any, Any]:
    from matplotlib.figure import Figure  # no pyplot: no global state, Agg canvas on save

    fig = Figure(figsize=(5.2, 4.6))
    fig.subplots_adjust(left=0.13, right=0.97, bottom=0.11, top=0.93)  # fixed: no extra layout draw
    ax = fig.subplots()
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    return fig, ax


def _plot_roc(entry: Mapping[str, Any], title: str, path: Path) -> None:
    fig, ax = _new_axes(f"ROC: {title}")
    band = entry.get("roc_band")
    if band:
        ax.fill_between(band["fpr"], band["low"], band["high"], color="C0", alpha=0.2,
                        label="ensemble 95% CI")
    for i, (member, m) in enumerate(entry["models"].items()):
        if "curves" not in m:
            continue
        ens = member == ENSEMBLE
        ax.plot(m["curves"]["roc"]["fpr"], m["curves"]["roc"]["tpr"], color="C0" if ens else f"C{i % 9 + 1}",
                lw=2.2 if ens else 0.9, alpha=1 if ens else 0.7, label=f"{member} {m['auroc']['value']:.3f}")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=0.8)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(fontsize=7, loc="lower right")
    _save_figure(fig, path)


def _plot_pr(entry: Mapping[str, Any], title: str, path: Path) -> None:
    fig, ax = _new_axes(f"Precision-recall: {title}")
    for i, (member, m) in enumerate(entry["models"].items()):
        if "curves" not in m:
            continue
        ens = member == ENSEMBLE
        ax.step(m["curves"]["pr"]["recall"], m["curves"]["pr"]["precision"], where="pre",
                color="C0" if ens else f"C{i % 9 + 1}", lw=2.2 if ens else 0.9,
                label=f"{member} AP {m['auprc']['value']:.3f}")
    prevalence = entry["prevalence"]
    ax.axhline(prevalence, ls="--", color="grey", lw=0.8, label=f"no skill (prevalence) {prevalence:.3f}")
    ax.set(xlabel="recall (sensitivity)", ylabel="precision (PPV)", xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(fontsize=7, loc="lower left")
    _save_figure(fig, path)


def _plot_calibration(entry: Mapping[str, Any], title: str, path: Path) -> None:
    fig, ax = _new_axes(f"Calibration: {title}")
    for i, (member, m) in enumerate(entry["models"].items()):
        rel = (m.get("calibration") or {}).get("reliability")
        if not rel:
            continue
        x = np.array(rel["mean_predicted"], dtype=float)  # None (empty bin) -> NaN: not drawn
        y = np.array(rel["fraction_positive"], dtype=float)
        ens = member == ENSEMBLE
        ax.plot(x[~np.isnan(x)], y[~np.isnan(x)], marker="o", ms=4 if ens else 2, lw=2.2 if ens else 0.8,
                color="C0" if ens else f"C{i % 9 + 1}", label=f"{member} ECE {m['calibration']['ece']:.3f}")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=0.8)
    ax.set(xlabel="mean predicted probability", ylabel="observed fraction positive", xlim=(0, 1), ylim=(0, 1))
    ax.legend(fontsize=7, loc="upper left")
    _save_figure(fig, path)


def _plot_histogram(entry: Mapping[str, Any], thresholds: Mapping[str, Any], title: str, path: Path) -> None:
    fig, ax = _new_axes(f"Ensemble scores: {title}")
    hist = entry["models"][ENSEMBLE]["curves"]["histogram"]
    edges = np.asarray(hist["bin_edges"])
    for key, color in (("negative", "C2"), ("positive", "C3")):
        ax.stairs(hist[key], edges, fill=True, alpha=0.45, color=color, label=f"{key} ({sum(hist[key])})")
    for kind, style in (("youden", "-"), ("sensitivity", ":")):
        ax.axvline(thresholds[kind]["value"], color="k", ls=style, lw=1, label=f"{kind} threshold")
    ax.set(xlabel="ensemble score", ylabel="images")
    ax.legend(fontsize=7)
    _save_figure(fig, path)


def write_plots(results: Mapping[str, Any], plot_dir: Path) -> dict[str, dict[str, list[Path]]]:
    """ROC, PR, calibration and histogram PNGs per cohort and label; returns label -> cohort -> paths."""
    plot_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, dict[str, list[Path]]] = {}
    for label in results["labels"]:
        for cohort, c in results["cohorts"].items():
            entry = c["labels"][label]
            if "skipped" in entry or "curves" not in entry["models"][ENSEMBLE]:
                continue
            title = f"{label}, {cohort}"
            stem = f"{_slug(cohort)}_{_slug(label)}.png"
            paths = [plot_dir / f"{kind}_{stem}" for kind in ("roc", "pr", "calibration", "histogram")]
            _plot_roc(entry, title, paths[0])
            _plot_pr(entry, title, paths[1])
            if "brier" in entry["models"][ENSEMBLE]["calibration"]:
                _plot_calibration(entry, title, paths[2])
            else:
                paths.pop(2)
            _plot_histogram(entry, results["thresholds"][label], title, paths[-1])
            written.setdefault(label, {})[cohort] = paths
    return written


def write_report(results: Mapping[str, Any], out_dir: str | Path) -> Path:
    """Write ``report.md``, ``results.json`` and ``plots/*.png`` into ``out_dir``.

    Args:
        results: The output of :func:`evaluate_cohorts`.
        out_dir: Destination folder (created).

    Returns:
        The path of ``report.md``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results_json = json.dumps(jsonable(results), indent=1, allow_nan=False) + "\n"
    write_atomic(out / "results.json", results_json.encode("utf-8"))
    plots = write_plots(results, out / "plots")
    lines = [*_md_header(results), *_md_audits(results.get("audits", []))]
    for label in results["labels"]:
        lines += [f"## {label}", ""]
        lines += _md_discrimination(results, label)
        lines += _md_operating_points(results, label)
        lines += _md_calibration(results, label)
        lines += _md_subgroups(results, label)
        for cohort, paths in plots.get(label, {}).items():
            lines += [f"### Plots: {cohort}", ""]
            lines += [f"![{p.stem}](plots/{p.name})" for p in paths] + [""]
    path = out / "report.md"
    write_atomic(path, "\n".join(lines).encode("utf-8"))
    log.info("evaluation report written to %s", path)
    return path


def evaluate_dir(
    pred_dir: str | Path, out_dir: str | Path, labels: Sequence[str] | None = None,
    target_sensitivity: float = 0.90, n_boot: int = 2000, seed: int = 0,
    audits: Sequence[Mapping[str, Any]] = (),
) -> Path:
    """``cxr-train evaluate`` in one call: read ``predictions_*.csv`` of a folder, evaluate, report.

    Returns:
        The path of ``report.md`` in ``out_dir``.
    """
    oof, externals = load_prediction_dir(pred_dir)
    results = evaluate_cohorts(oof, externals, labels, target_sensitivity, n_boot, seed, audits)
    return write_report(results, out_dir)
