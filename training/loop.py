"""Re-exports of the training loop's steps (prepare, unit, epoch, trainlog, fit) under this import path.

- ``training.rundir``: the run directory's paths (``RunDir``, ``UnitKey``);
- ``training.prepare``: configuration, cohorts, folds, pixel cache (``prepare_run``, ``RunData``);
- ``training.unit``: one (architecture, fold) unit, trained and resumed (``train_unit``, ``load_unit_model``);
- ``training.epoch``: one epoch's pieces (sampling, the training pass, ``predict_array``, ``epoch_metrics``);
- ``training.trainlog``: each unit's ``log.csv`` and ``done.json``;
- ``training.fit``: the fit over all units and its prediction CSVs (``fit``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from training.epoch import balance_weights, epoch_metrics, predict_array
from training.fit import (
    FitResult,
    external_scores,
    fit,
    oof_scores,
    unit_probabilities,
    write_prediction_csv,
)
from training.fit import write_run_predictions as write_predictions
from training.predictions import ENSEMBLE
from training.prepare import RunData, prepare_run, resolve_config
from training.rundir import RunDir, UnitKey
from training.trainlog import LOG_COLUMNS, read_log
from training.trainlog import append_log as _append_log
from training.trainlog import trim_log as _trim_log
from training.unit import EpochCallback, Phase, UnitState, derive_seed, load_unit_model, train_unit

__all__ = [
    "ENSEMBLE",
    "LOG_COLUMNS",
    "EpochCallback",
    "FitResult",
    "Phase",
    "RunData",
    "UnitKey",
    "UnitState",
    "_append_log",
    "_trim_log",
    "balance_weights",
    "derive_seed",
    "epoch_metrics",
    "external_scores",
    "fit",
    "iter_units",
    "load_unit_model",
    "oof_scores",
    "predict_array",
    "prepare_run",
    "read_log",
    "resolve_config",
    "train_unit",
    "unit_probabilities",
    "write_prediction_csv",
    "write_predictions",
]


def iter_units(run_dir: str | Path) -> Iterator[tuple[UnitKey, Path]]:
    """Finished units of a run directory (those with ``done.json``): ``RunDir(run_dir).finished_units()``."""
    for key, unit in RunDir(run_dir).finished_units():
        yield key, unit.path
