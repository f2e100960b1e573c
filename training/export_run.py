"""Export step over a run directory (``cxr-train export``): the finished units of a run -> a model package.

Composes the run's pieces: its configuration and finished units (``training.rundir``, ``training.unit``),
the operating thresholds chosen on the OOF ensemble of the exported members (``training.thresholds``, the
chooser ``cxr-train evaluate`` uses too) and the package writer (``training.export.export_package``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from ai.preprocess import to_model_input
from training import metrics
from training.config import RunConfig
from training.export import MemberInfo, export_package
from training.labels import LABEL_AGES
from training.models import keep_labels
from training.predictions import read_predictions
from training.prepare import load_configured_cohort, load_run_config, preprocess_cache
from training.pretrained import weights_record
from training.rundir import RunDir
from training.thresholds import choose_thresholds, ensemble_of, reference_distribution
from training.unit import load_unit_model


def export_run(
    run_dir: str | Path, out: str | Path, members: Sequence[str] | None = None, version: str = "",
    threshold: str = "youden", target_sensitivity: float = 0.90, overwrite: bool = False,
    weights_dtype: str = "float32", labels: Sequence[str] | None = None,
) -> Path:
    """Export the finished units of ``members`` (architectures) as a model package.

    Every fold model of each selected architecture becomes a member (the node averages them all, which
    equals the mean over architectures of their fold means). Thresholds are chosen on the OOF ensemble
    of the selected architectures (Youden J, or the highest threshold reaching ``target_sensitivity``).
    ``weights_dtype="float16"`` stores the members' weights at half the size (float32 compute).
    ``labels``: the run's labels the package carries (default: all), in the run's order; the others are cut
    from every member's output layer and named in the manifest's evaluation summary (``left_out``).

    Raises:
        ValueError: an unknown or unfinished architecture.
        FileNotFoundError: no ``config.toml`` or ``predictions_oof.csv`` in the run directory.
    """
    run = RunDir(run_dir)
    config = load_run_config(run.root)
    archs = list(members or config.architectures)
    unknown = sorted(set(archs) - set(config.architectures))
    if unknown:
        raise ValueError(f"--members {unknown} not in the run's architectures {list(config.architectures)}")
    units = [key for key, _ in run.finished_units() if key.architecture in archs]
    if len(units) != len(archs) * len(config.fold_indices()):
        raise ValueError(f"{run.root}: {len(units)} finished unit(s) of {archs}, expected "
                         f"{len(archs) * len(config.fold_indices())}; run `cxr-train fit` first")
    foreign = sorted(set(labels or ()) - set(config.labels))
    if foreign:
        raise ValueError(f"--labels {foreign} not among the run's labels {list(config.labels)}")
    carried = tuple(label for label in config.labels if labels is None or label in labels)
    thresholds, evaluation = oof_thresholds(run.root, carried, archs, threshold, target_sensitivity)
    left_out = [label for label in config.labels if label not in carried]
    if left_out:
        evaluation["left_out"] = left_out
    oof = read_predictions(run.oof_predictions)
    reference = {label: reference_distribution(oof, label, archs, config.train[0].name) for label in carried}
    indices = [config.labels.index(label) for label in carried]
    models = []
    for key in units:
        info = MemberInfo(fold=key.fold, weights=weights_record(config.weights_for(key.architecture) or "random"))
        model = load_unit_model(run.root, config, key)
        models.append((keep_labels(model, indices) if left_out else model, info))
    return export_package(
        models, out, name=config.name, version=version or f"{config.name}-{_today()}", labels=carried,
        spec=config.preprocess_spec(), thresholds=thresholds, overwrite=overwrite, evaluation_summary=evaluation,
        data_summary=json.loads(run.cohorts.read_text()) if run.cohorts.exists() else {},
        weights_dtype=weights_dtype, parity_inputs=real_parity_inputs(run.root, config), reference=reference,
        ages={label: LABEL_AGES[label] for label in carried if label in LABEL_AGES},
    )


def real_parity_inputs(run_dir: Path, config: RunConfig, n: int = 4) -> np.ndarray:
    """The first ``n`` images of the (first) training cohort, preprocessed exactly as the node does: the
    torch-vs-onnxruntime parity of an export is checked on real chest X-rays, not only on noise."""
    spec = config.preprocess_spec()
    cohort = load_configured_cohort(config.train[0], config.labels)
    cache = preprocess_cache(config, run_dir, spec)
    return np.stack([to_model_input(cache.get(path), spec) for path in cohort.paths[:n]])


def oof_thresholds(
    run_dir: Path, labels: Sequence[str], archs: Sequence[str], threshold: str, target_sensitivity: float
) -> tuple[dict[str, tuple[float, str]], dict[str, Any]]:
    """Per label, the ``threshold`` operating point (``youden`` or ``sensitivity``) on the OOF ensemble of
    ``archs`` (:func:`training.thresholds.choose_thresholds`), and that ensemble's OOF AUROC."""
    oof = read_predictions(RunDir(run_dir).oof_predictions)
    thresholds: dict[str, tuple[float, str]] = {}
    evaluation: dict[str, Any] = {"ensemble_of": list(archs), "oof": {}}
    for label in labels:
        point = choose_thresholds(oof, label, target_sensitivity, members=archs, kinds=(threshold,))[threshold]
        thresholds[label] = (float(point["value"]), point["method"])
        y, p = oof.labels[label], ensemble_of(oof, label, archs)
        evaluation["oof"][label] = {"auroc": float(metrics.auroc(y, p)), "n": int(np.sum(~np.isnan(y)))}
    return thresholds, evaluation


def _today() -> str:
    """The date for default package versions (UTC, YYYYMMDD)."""
    return datetime.now(UTC).strftime("%Y%m%d")
