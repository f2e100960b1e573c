"""Prepare step of a fit: the run's configuration, cohorts, folds, pixel cache and device (``RunData``).

:func:`prepare_run` is what every step over a run directory starts from (the fit, the audits): it loads
and aligns the cohorts, makes the folds once and checks them on every later call (``folds.csv``), fills
the preprocessing cache and writes ``cohorts.json``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ai.preprocess import PreprocessSpec
from storage.files import write_atomic
from training.config import (
    RUN_CONFIGURATION,
    CohortConfig,
    ConfigError,
    RunConfig,
    config_differences,
    load_config,
    save_config,
)
from training.data import Cohort, PreprocessCache, combine_cohorts, load_cohort
from training.jsonio import jsonable
from training.lungs import describe as describe_regions
from training.lungs import grow_lungs
from training.pretrained import check_init_cohorts
from training.rundir import RunDir, UnitKey
from training.splits import SplitError, check_folds, fold_summary, grouped_stratified_kfold, load_folds, save_folds


@dataclass
class RunData:
    """What every unit of a run shares: configuration, cohorts, folds and cached pixels."""

    config: RunConfig
    run_dir: Path
    spec: Any
    cohort: Cohort
    folds: np.ndarray
    images: np.ndarray
    externals: list[tuple[Cohort, np.ndarray]] = field(default_factory=list)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    sources: np.ndarray | None = None  # the training cohort of every row of ``cohort`` (several [[train]])
    regions: np.ndarray | None = None  # lung regions of ``images``, grown (augment.outside_lungs_p > 0 only)

    @property
    def several_cohorts(self) -> bool:
        """The run trains on more than one cohort (its OOF rows say which)."""
        return len(self.config.train) > 1

    @property
    def paths(self) -> RunDir:
        """The run directory's paths."""
        return RunDir(self.run_dir)

    @property
    def amp(self) -> bool:
        """Mixed precision: configured and on CUDA."""
        return self.device.type == "cuda" and self.config.amp

    def unit_dir(self, key: UnitKey) -> Path:
        """The folder of one unit."""
        return self.paths.unit(key).path


def resolve_config(config: RunConfig | None, run_dir: Path) -> RunConfig:
    """The configuration to run with; saves it as ``config.toml`` or checks it against the saved one."""
    saved_path = RunDir(run_dir).config
    saved = load_config(saved_path) if saved_path.exists() else None
    if config is None:
        if saved is None:
            raise ConfigError([f"no configuration given and no {saved_path} to resume from"], RUN_CONFIGURATION)
        return saved
    if saved is not None:
        changed = config_differences(saved, config)
        if changed:
            raise ConfigError(
                [f"{key}: differs from the run directory's {saved_path}" for key in changed]
                + ["use a new run directory, or resume with the saved configuration"],
                RUN_CONFIGURATION,
            )
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, saved_path)
    return config


def load_run_config(run_dir: str | Path) -> RunConfig:
    """The configuration a run directory was trained with.

    Raises:
        FileNotFoundError: no ``config.toml``: not a run directory.
    """
    path = RunDir(run_dir).config
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: not a run directory (run `cxr-train fit` first)")
    return load_config(path)


def prepare_run(config: RunConfig, run_dir: Path) -> RunData:
    """Load and align the cohorts, make or reload the folds, and cache every image's pixels."""
    run = RunDir(run_dir)
    spec = config.preprocess_spec()
    provenances = check_init_cohorts(config)
    parts = [load_configured_cohort(item, config.labels) for item in config.train]
    check_not_pooled(parts)
    cohort, sources = combine_cohorts(parts)
    folds = _folds(config, run, cohort, sources)
    cache = preprocess_cache(config, run_dir, spec)
    images = cache.load_many(cohort.paths, progress=config.progress, desc=f"cache {cohort.name}")
    externals = []
    for item in config.external:
        external = load_configured_cohort(item, config.labels)
        pixels = cache.load_many(external.paths, progress=config.progress, desc=f"cache {external.name}")
        externals.append((external, pixels))
    summary: dict[str, Any] = {
        "train": cohort.summary(),
        "external": [c.summary() for c, _ in externals],
        "folds": fold_summary(folds, cohort.y, cohort.labels),
    }
    if provenances:  # where the initial weights came from (the package's data summary carries it on)
        summary["init_weights"] = {arch: {k: p[k] for k in ("file", "sha256", "made_from", "cohorts") if k in p}
                                   for arch, p in provenances.items()}
    if len(parts) > 1:  # per cohort: its counts and its folds' prevalences, never pooled
        summary["train"] = [c.summary() for c in parts]
        summary["folds"] = {c.name: fold_summary(folds[sources == c.name], c.y, c.labels) for c in parts}
    regions = _lung_regions(config, cache, cohort)
    if regions is not None:  # written only when the step is on: every other run's cohorts.json stays as it was
        summary["outside_lungs"] = describe_regions(regions)
    write_atomic(run.cohorts, json.dumps(jsonable(summary, nan="keep"), indent=2).encode("utf-8"))
    device = _device(config)
    return RunData(config, run_dir, spec, cohort, folds, images, externals, device, sources, regions)


def _lung_regions(config: RunConfig, cache: PreprocessCache, cohort: Cohort) -> np.ndarray | None:
    """The training images' lung regions, grown by ``augment.outside_lungs_margin``, when
    ``augment.outside_lungs_p > 0``; refused when no training image has a lung mask (the step would do nothing)."""
    augment = config.augment
    if augment.outside_lungs_p <= 0:
        return None
    if not any(mask is not None for mask in cohort.masks):
        raise ConfigError([f"augment.outside_lungs_p: expected lung masks (a lung_mask column) in the training "
                           f"cohort, found none in {cohort.name}"], RUN_CONFIGURATION)
    regions = cache.load_regions(cohort.paths, cohort.masks, progress=config.progress)
    for i in range(len(regions)):
        regions[i] = grow_lungs(regions[i], augment.outside_lungs_margin)
    return regions


def check_not_pooled(cohorts: Sequence[Cohort]) -> None:
    """Refuse a label with known values in more than one training cohort.

    Sources differ in prevalence, population, label definition and images; a label pooled across them is
    learnt as "which source is this" and a pooled AUROC rewards that. A label of two sources is two labels
    (``label_columns`` maps each source's column onto its own label).

    Raises:
        ConfigError: naming the label, the cohorts and their prevalences.
    """
    problems = []
    for label in cohorts[0].labels if cohorts else ():
        carriers = [(c.name, c.prevalence()[label]) for c in cohorts if not np.isnan(c.prevalence()[label])]
        if len(carriers) > 1:
            shown = ", ".join(f"{name} (prevalence {p:.2f})" for name, p in carriers)
            problems.append(f"{label}: known in training cohorts {shown}; a label is learnt from one source only "
                            "(pooled, it is learnt as the source): give each source its own label (label_columns)")
    if problems:
        raise ConfigError(problems, RUN_CONFIGURATION)


def load_configured_cohort(item: CohortConfig, labels: Sequence[str]) -> Cohort:
    """A configured cohort, its label columns aligned to the run's labels."""
    return load_cohort(item.csv, name=item.name, root=item.root or None, labels=labels,
                       patient_column=item.patient_column, site=item.site, label_columns=item.label_columns or None,
                       patient_pattern=item.patient_pattern)


def training_cohort(config: RunConfig) -> tuple[Cohort, np.ndarray]:
    """The run's training cohorts as one, and each row's source cohort, as :func:`prepare_run` combines them
    (for reading a run that has been prepared: this neither checks nor writes anything)."""
    return combine_cohorts([load_configured_cohort(item, config.labels) for item in config.train])


def preprocess_cache(config: RunConfig, run_dir: str | Path, spec: PreprocessSpec) -> PreprocessCache:
    """The run's preprocessing cache (``config.cache_dir``, else the run directory's)."""
    return PreprocessCache(RunDir(run_dir).cache(config.cache_dir), spec)


def _folds(config: RunConfig, run: RunDir, cohort: Cohort, sources: np.ndarray) -> np.ndarray:
    """The saved folds of the run directory (checked again), or new ones saved there.

    Each training cohort is split on its own (patient-grouped, stratified on the labels it carries); fold k
    of the run is fold k of every cohort.
    """
    saved = run.folds.exists()
    folds = load_folds(run.folds, cohort.images) if saved else np.zeros(len(cohort), dtype=np.int64)
    for name in dict.fromkeys(sources.tolist()):
        rows = np.flatnonzero(sources == name)
        ids, y, names = _split_inputs(cohort, rows)
        if saved:
            check_folds(folds[rows], ids, y, config.folds, config.fold_tolerance, names)
        else:
            folds[rows] = grouped_stratified_kfold(ids, y, config.folds, config.seed, config.fold_tolerance)
    if not saved:
        save_folds(run.folds, cohort.images, cohort.patient_ids, folds)
    return folds


def inner_split(data: RunData, fold: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A fold's training rows in two, patients whole: the rows it trains on, and the rows it monitors.

    For ``monitor = "inner"``: each training cohort's rows outside ``fold`` are split again into
    ``inner_folds`` patient-grouped parts, stratified on the labels that cohort carries (as :func:`_folds`
    splits the cohort), and part 0 of each is monitored. The held-out fold is in neither.

    Raises:
        SplitError: a cohort's training rows cannot be split so (fewer patients than parts, or a part's
            prevalence off), naming the cohort, the fold and ``inner_folds``.
    """
    cohort, config = data.cohort, data.config
    train = np.flatnonzero(data.folds != fold)
    sources = data.sources if data.sources is not None else np.full(len(cohort), cohort.name, dtype=object)
    monitored = np.zeros(len(train), dtype=bool)
    for name in dict.fromkeys(sources[train].tolist()):
        where = np.flatnonzero(sources[train] == name)
        ids, y, names = _split_inputs(cohort, train[where])
        try:
            parts = grouped_stratified_kfold(ids, y, config.inner_folds, seed, config.fold_tolerance, names)
        except SplitError as exc:
            raise SplitError(f"monitor = \"inner\": cohort {name!r}, the training rows of fold {fold}, cannot be "
                             f"split into inner_folds = {config.inner_folds} parts: {exc}") from exc
        monitored[where] = parts == 0
    return train[~monitored], train[monitored]


def _split_inputs(cohort: Cohort, rows: np.ndarray) -> tuple[list[str], np.ndarray, list[str]]:
    """What a split of one cohort's ``rows`` is made on: their patients, and the labels that cohort carries (at
    least one known value) with their names."""
    carried = [j for j in range(len(cohort.labels)) if not np.isnan(cohort.y[rows, j]).all()]
    return [cohort.patient_ids[i] for i in rows], cohort.y[rows][:, carried], [cohort.labels[j] for j in carried]


def _device(config: RunConfig) -> torch.device:
    """CUDA when configured or available (``auto``), else the CPU."""
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(["device: 'cuda' requested but CUDA is not available"], RUN_CONFIGURATION)
    if config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")
