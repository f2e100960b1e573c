"""Fit step: every (architecture, fold) unit of a run, resumable, then out-of-fold and external predictions.

``fit(config, run_dir)`` prepares the run (``training.prepare``), trains each unit not yet done
(``training.unit``) and writes the prediction CSVs (``training.predictions``, number format ``"run"``);
the run directory's layout is ``training.rundir``'s.

Prediction CSVs: one member per architecture. In ``predictions_oof.csv`` a member's score of an image
comes from that architecture's model of the image's held-out fold; in ``predictions_<cohort>.csv`` it is
the mean probability of that architecture's fold models. ``score_<Label>__ensemble`` is the mean over the
architectures. When ``run_folds`` trains only some folds, the OOF file holds only the images of those folds.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from storage.files import write_atomic
from training.config import RunConfig
from training.data import Cohort, npy_bytes
from training.epoch import predict_array
from training.predictions import ENSEMBLE, cohort_table, write_predictions
from training.prepare import RunData, prepare_run, resolve_config
from training.probability import sigmoid
from training.rundir import OOF, RunDir, UnitKey
from training.unit import EpochCallback, load_unit_model, train_unit, unit_inner_split

if TYPE_CHECKING:
    from training.models import CxrNet

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FitResult:
    """What :func:`fit` produced."""

    run_dir: Path
    units: tuple[UnitKey, ...]
    predictions: tuple[Path, ...]


def fit(config: RunConfig | None, run_dir: str | Path, on_epoch_end: EpochCallback | None = None) -> FitResult:
    """Train every (architecture, fold) unit not yet done, then write the prediction CSVs.

    Args:
        config: the run configuration; None resumes with the run directory's ``config.toml``.
        run_dir: the run directory (created). Rerunning on the same directory resumes: finished units
            are skipped, an interrupted unit continues from its last checkpoint.
        on_epoch_end: called after each epoch's checkpoint with the unit and the epoch's log row.

    Returns:
        The units trained and the prediction files written.

    Raises:
        ConfigError: ``config`` differs from the one the run directory was started with.
        CohortError, SplitError: invalid cohorts or folds.
    """
    run_dir = Path(run_dir)
    config = resolve_config(config, run_dir)
    if config.threads:
        torch.set_num_threads(config.threads)
    data = prepare_run(config, run_dir)
    record_environment(run_dir)
    if config.monitor == "inner":  # every fold's inner split before any unit trains: a bad one fails now
        for fold in config.fold_indices():
            unit_inner_split(data, fold)
    units = tuple(UnitKey(arch, fold) for arch in config.architectures for fold in config.fold_indices())
    for key in units:
        train_unit(data, key, on_epoch_end)
    predictions = write_run_predictions(data, units)
    log.info("run %s: %d unit(s) done, predictions in %s", config.name, len(units), run_dir)
    return FitResult(run_dir, units, tuple(predictions))


def training_environment() -> dict[str, str]:
    """What a CPU run's bits depend on beyond the code and the data: the libraries that compute (torch and the
    kernels its CPU capability selects, numpy, OpenCV for the augmentation, timm) and the machine.

    Measured (docs/model/README.md, "Reproduced from a clean clone"): on one machine the same configuration and code
    gave other fine-tuned weights with OpenCV 5.0 and 5.1 (augmented pixels one grey level apart in places), and
    neither gave the bundled members, which were trained and reproduced on other machines."""
    import platform

    import cv2
    import timm

    cpu = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), "")
    except OSError:
        pass
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cpu_capability": str(torch.backends.cpu.get_cpu_capability()),
        "numpy": np.__version__,
        "opencv": cv2.__version__,
        "timm": timm.__version__,
        "machine": f"{platform.machine()}, {cpu or platform.processor() or 'unknown CPU'}",
    }


def record_environment(run_dir: Path) -> None:
    """Write ``environment.json`` when a run starts; when it is resumed elsewhere, keep the first record and warn
    with what differs: units trained there may not equal an uninterrupted run's bit for bit."""
    path = RunDir(run_dir).environment
    now = training_environment()
    if not path.exists():
        write_atomic(path, (json.dumps(now, indent=2) + "\n").encode("utf-8"))
        return
    try:
        started = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        log.warning("%s unreadable; not compared", path)
        return
    changed = {k: (started.get(k), v) for k, v in now.items() if started.get(k) != v}
    if changed:
        log.warning("run %s resumed in another environment than it started in (%s): units trained from here may "
                    "differ from an uninterrupted run's", run_dir,
                    "; ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()))


def run_probabilities(
    model: CxrNet, data: RunData, images: np.ndarray, index: np.ndarray | None = None, desc: str = "predict"
) -> np.ndarray:
    """Probabilities ``[n, L]`` (float64) of ``model`` on uint8 images (rows ``index``), as the run scores."""
    logits = predict_array(model, images, data.spec, data.config.batch_size, data.device, data.amp,
                           desc=desc, progress=data.config.progress, index=index)
    return sigmoid(logits)


def unit_probabilities(
    data: RunData, key: UnitKey, cohort_name: str, images: np.ndarray, index: np.ndarray | None = None
) -> np.ndarray:
    """Probabilities [n, L] of a finished unit's model on ``images`` (rows ``index``), cached as
    ``pred_<cohort>.npy`` in the unit folder."""
    path = data.paths.unit(key).scores(cohort_name)
    n = len(images) if index is None else len(index)
    if path.exists():
        cached = np.load(path)
        if cached.shape == (n, len(data.config.labels)):
            return cached
    model = load_unit_model(data.run_dir, data.config, key, data.device)
    prob = run_probabilities(model, data, images, index, desc=f"{key.name} {cohort_name}").astype(np.float32)
    write_atomic(path, npy_bytes(prob))
    return prob


def oof_scores(data: RunData, units: Sequence[UnitKey]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Rows of the trained folds and, per architecture, each row scored by its held-out fold's model."""
    trained = sorted({key.fold for key in units})
    rows = np.flatnonzero(np.isin(data.folds, trained))
    scores: dict[str, np.ndarray] = {}
    for arch in dict.fromkeys(key.architecture for key in units):
        out = np.full((len(data.cohort), len(data.config.labels)), np.nan, dtype=np.float32)
        for fold in trained:
            held_out = np.flatnonzero(data.folds == fold)
            out[held_out] = unit_probabilities(data, UnitKey(arch, fold), OOF, data.images, held_out)
        scores[arch] = out[rows]
    return rows, scores


def external_scores(
    data: RunData, units: Sequence[UnitKey], cohort: Cohort, images: np.ndarray
) -> dict[str, np.ndarray]:
    """Per architecture: the mean probability of its fold models on an external cohort."""
    scores: dict[str, np.ndarray] = {}
    for arch in dict.fromkeys(key.architecture for key in units):
        members = [unit_probabilities(data, key, cohort.name, images) for key in units if key.architecture == arch]
        scores[arch] = np.mean(members, axis=0).astype(np.float32)
    return scores


def write_run_predictions(data: RunData, units: Sequence[UnitKey]) -> list[Path]:
    """``predictions_oof.csv`` and one ``predictions_<cohort>.csv`` per external cohort."""
    rows, scores = oof_scores(data, units)
    folds = {"fold": data.folds[rows]}
    if data.several_cohorts and data.sources is not None:  # every figure is then reported per cohort
        folds["cohort"] = data.sources[rows]
    paths = [write_prediction_csv(data.paths.oof_predictions, data.cohort.subset(rows), scores, folds)]
    for cohort, images in data.externals:
        path = data.paths.predictions(cohort.name)
        paths.append(write_prediction_csv(path, cohort, external_scores(data, units, cohort, images)))
    return paths


def write_prediction_csv(
    path: Path, cohort: Cohort, scores: dict[str, np.ndarray], extra: dict[str, np.ndarray] | None = None
) -> Path:
    """One row per image: identifiers, demographics, ``extra``, ``label_*``, ``score_*__<member>``, ``..__ensemble``.

    ``scores``: member -> probabilities ``[n, L]``; the ensemble is their mean.
    """
    members = list(scores)
    ensemble = np.mean([scores[m] for m in members], axis=0)
    table = cohort_table(cohort, {
        label: {**{m: scores[m][:, j] for m in members}, ENSEMBLE: ensemble[:, j]}
        for j, label in enumerate(cohort.labels)
    })
    text = {name: [str(v) for v in values] for name, values in (extra or {}).items()}
    return write_predictions(table, path, number_format="run", extra=text)
