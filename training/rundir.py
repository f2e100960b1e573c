"""Run directory: the one owner of every path of a training run (as timm's ``CheckpointSaver`` owns its folder).

No other module of ``training/`` spells a run directory's file name; they ask a :class:`RunDir` (and, for a
report folder, a :class:`ReportDir`). Layout (``cxr-train fit --run-dir RUN``)::

    config.toml                  the effective configuration (training.config)
    folds.csv                    image, patient_id, fold of the training cohort (checked, training.splits)
    environment.json             where the run was started: library versions, torch's CPU capability, the CPU
    cohorts.json                 counts per cohort and fold prevalences (no patient identifiers)
    cache/                       preprocessed pixels (training.data.PreprocessCache; unless config.cache_dir)
    units/<arch>/fold<k>/        one unit per (architecture, fold):
        checkpoint.pt            last completed epoch: model, optimizer, scheduler, AMP scaler, phase
                                 and early-stopping state (written atomically after every epoch)
        model.pt                 weights of the best monitored loss so far, or with average_last the running
                                 mean of the averaged epochs (the unit's final model once done.json exists)
        log.csv                  one row per epoch (training.trainlog)
        done.json                the unit finished: best epoch and monitored loss (an averaging unit: the
                                 averaged epochs and the mean's own losses), epochs run
        pred_<cohort>.npy        probabilities [N, L] of this unit's model (cache for the CSVs)
    predictions_oof.csv          every training image, scored by the model of the fold that held it out
    predictions_<cohort>.csv     every external image, scored by every fold model
    audits.json                  shortcut audits (training.audits), read by ``cxr-train evaluate``
    report/                      the default report folder (a :class:`ReportDir`)
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

CONFIG_NAME = "config.toml"
OOF = "oof"
"""The cohort name of the out-of-fold predictions (``predictions_oof.csv``)."""
PREDICTIONS_PREFIX = "predictions_"


@dataclass(frozen=True)
class UnitKey:
    """One (architecture, fold) unit of a run."""

    architecture: str
    fold: int

    @property
    def name(self) -> str:
        """``<arch>/fold<k>``: the unit's folder below ``units/``."""
        return f"{self.architecture}/fold{self.fold}"


@dataclass(frozen=True)
class UnitDir:
    """The folder of one unit and its files."""

    path: Path

    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoint.pt"

    @property
    def model(self) -> Path:
        return self.path / "model.pt"

    @property
    def log(self) -> Path:
        return self.path / "log.csv"

    @property
    def done(self) -> Path:
        return self.path / "done.json"

    def scores(self, cohort: str) -> Path:
        """The cached probabilities of this unit's model on ``cohort`` (``pred_<cohort>.npy``)."""
        return self.path / f"pred_{cohort}.npy"

    def cached_scores(self) -> list[Path]:
        """Every ``pred_*.npy`` of the unit."""
        return sorted(self.path.glob("pred_*.npy"))

    def orphans(self) -> list[Path]:
        """Temporary files left by a killed process (``storage.files.write_atomic`` names them ``.*.tmp``)."""
        return sorted(self.path.glob(".*.tmp"))


@dataclass(frozen=True)
class ReportDir:
    """A report folder (``cxr-train evaluate --out``; default ``RUN/report``)."""

    path: Path

    @property
    def results(self) -> Path:
        return self.path / "results.json"

    @property
    def markdown(self) -> Path:
        return self.path / "report.md"

    @property
    def plots(self) -> Path:
        return self.path / "plots"


class RunDir:
    """Every path of one run directory (see the module docstring)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    @property
    def config(self) -> Path:
        return self.root / CONFIG_NAME

    @property
    def folds(self) -> Path:
        return self.root / "folds.csv"

    @property
    def cohorts(self) -> Path:
        return self.root / "cohorts.json"

    @property
    def environment(self) -> Path:
        return self.root / "environment.json"

    @property
    def audits(self) -> Path:
        return self.root / "audits.json"

    @property
    def report(self) -> ReportDir:
        """The default report folder."""
        return ReportDir(self.root / "report")

    def cache(self, cache_dir: str | Path = "") -> Path:
        """The preprocessing cache: ``cache_dir`` when configured, else ``RUN/cache``."""
        return Path(cache_dir) if cache_dir else self.root / "cache"

    def unit(self, key: UnitKey) -> UnitDir:
        return UnitDir(self.root / "units" / key.architecture / f"fold{key.fold}")

    def finished_units(self) -> Iterator[tuple[UnitKey, UnitDir]]:
        """Finished units (those with ``done.json``), in folder order."""
        for done in sorted(self.root.glob("units/*/fold*/done.json")):
            info = json.loads(done.read_text())
            yield UnitKey(info["architecture"], int(info["fold"])), UnitDir(done.parent)

    def predictions(self, cohort: str) -> Path:
        """``predictions_<cohort>.csv``."""
        return self.root / f"{PREDICTIONS_PREFIX}{cohort}.csv"

    @property
    def oof_predictions(self) -> Path:
        return self.predictions(OOF)

    def prediction_files(self) -> list[Path]:
        """Every ``predictions_*.csv`` of the folder, sorted by name."""
        return sorted(self.root.glob(f"{PREDICTIONS_PREFIX}*.csv"))


def prediction_cohort(path: str | Path) -> str:
    """The cohort of a prediction CSV: ``<cohort>`` of ``predictions_<cohort>.csv``, else the file's stem."""
    stem = Path(path).stem
    return stem[len(PREDICTIONS_PREFIX):] if stem.startswith(PREDICTIONS_PREFIX) else stem
