"""Training step: every (architecture, fold) unit, resumable, then out-of-fold and external predictions.

Run directory layout (``fit(config, run_dir)``)::

    config.toml                  the effective configuration (training.config)
    folds.csv                    image, patient_id, fold of the training cohort (checked, training.splits)
    cohorts.json                 counts per cohort and fold prevalences (no patient identifiers)
    units/<arch>/fold<k>/        one unit per (architecture, fold):
        checkpoint.pt            last completed epoch: model, optimizer, scheduler, AMP scaler, phase
                                 and early-stopping state (written atomically after every epoch)
        model.pt                 weights of the best monitored loss so far (the unit's final model
                                 once done.json exists)
        log.csv                  one row per epoch: epoch, phase, lr, train_loss, val_loss, auroc,
                                 auprc, sensitivity, specificity, f1 (macro over labels, threshold 0.5),
                                 seconds
        done.json                the unit finished: best epoch and monitored loss, epochs run
        pred_<cohort>.npy        probabilities [N, L] of this unit's model (cache for the CSVs)
    predictions_oof.csv          every training image, scored by the model of the fold that held it out
    predictions_<cohort>.csv     every external image, scored by every fold model

A unit: phase ``head`` (backbone frozen, its BatchNorm statistics too; ``epochs_head`` epochs at
``lr_head``), then phase ``finetune`` (``unfreeze``: the last backbone stage or all of it;
``epochs_finetune`` epochs at ``lr_finetune``), which starts from the best weights so far. Each phase
has its own AdamW and ReduceLROnPlateau on the monitored loss, and stops early after ``patience``
epochs without a better monitored loss. ``monitor = "validation"`` (default) monitors the held-out
fold's loss, compared across phases; ``"training"`` monitors the epoch's mean training loss, compared
within a phase only (the phases' training losses are not like for like: cached features without
augmentation, then augmented images), so the held-out fold decides nothing. With ``cache_features``
the head phase trains the head on backbone features computed once per image without augmentation
(exact, since the backbone is frozen).

Reproducibility and resume: torch is reseeded at the start of every epoch from (seed, architecture,
fold, epoch), the shuffling/sampling generator likewise, and each sample's augmentation draws from
(unit seed, epoch, index) (``training.data.sample_rng``). So the random state of an epoch follows
from its number, and a unit restarted from its checkpoint gives the same weights as an uninterrupted
run (on the CPU; CUDA kernels may be non-deterministic).

Prediction CSVs (format of ``training.evaluate``): one member per architecture. In
``predictions_oof.csv`` a member's score of an image comes from that architecture's model of the
image's held-out fold; in ``predictions_<cohort>.csv`` it is the mean probability of that
architecture's fold models. ``score_<Label>__ensemble`` is the mean over the architectures. When
``run_folds`` trains only some folds, the OOF file holds only the images of those folds.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, TensorDataset, WeightedRandomSampler

from storage.files import write_atomic
from training.augment import Augmenter
from training.config import (
    CONFIG_NAME,
    RUN_CONFIGURATION,
    ConfigError,
    RunConfig,
    config_differences,
    load_config,
    save_config,
)
from training.data import Cohort, CxrDataset, PreprocessCache, csv_bytes, load_cohort, npy_bytes
from training.labels import label_column, score_column
from training.losses import LossFn, make_loss
from training.splits import check_folds, fold_summary, grouped_stratified_kfold, load_folds, save_folds

if TYPE_CHECKING:
    from training.models import CxrNet

log = logging.getLogger(__name__)

LOG_COLUMNS = (
    "epoch",
    "phase",
    "lr",
    "train_loss",
    "val_loss",
    "auroc",
    "auprc",
    "sensitivity",
    "specificity",
    "f1",
    "seconds",
)
ENSEMBLE = "ensemble"
EpochCallback = Callable[["UnitKey", dict[str, Any]], None]


@dataclass(frozen=True)
class UnitKey:
    """One (architecture, fold) unit of a run."""

    architecture: str
    fold: int

    @property
    def name(self) -> str:
        """``<arch>/fold<k>``: the unit's folder below ``units/``."""
        return f"{self.architecture}/fold{self.fold}"


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

    def unit_dir(self, key: UnitKey) -> Path:
        """The folder of one unit."""
        return self.run_dir / "units" / key.architecture / f"fold{key.fold}"


@dataclass(frozen=True)
class FitResult:
    """What :func:`fit` produced."""

    run_dir: Path
    units: tuple[UnitKey, ...]
    predictions: tuple[Path, ...]


# ---------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------


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
    units = tuple(UnitKey(arch, fold) for arch in config.architectures for fold in config.fold_indices())
    for key in units:
        train_unit(data, key, on_epoch_end)
    predictions = write_predictions(data, units)
    log.info("run %s: %d unit(s) done, predictions in %s", config.name, len(units), run_dir)
    return FitResult(run_dir, units, tuple(predictions))


def resolve_config(config: RunConfig | None, run_dir: Path) -> RunConfig:
    """The configuration to run with; saves it as ``config.toml`` or checks it against the saved one."""
    saved_path = run_dir / CONFIG_NAME
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


def prepare_run(config: RunConfig, run_dir: Path) -> RunData:
    """Load and align the cohorts, make or reload the folds, and cache every image's pixels."""
    spec = config.preprocess_spec()
    cohort = _load(config.train, config.labels)
    folds = _folds(config, run_dir, cohort)
    cache = PreprocessCache(Path(config.cache_dir) if config.cache_dir else run_dir / "cache", spec)
    images = cache.load_many(cohort.paths, progress=config.progress, desc=f"cache {cohort.name}")
    externals = []
    for item in config.external:
        external = _load(item, config.labels)
        pixels = cache.load_many(external.paths, progress=config.progress, desc=f"cache {external.name}")
        externals.append((external, pixels))
    summary = {
        "train": cohort.summary(),
        "external": [c.summary() for c, _ in externals],
        "folds": fold_summary(folds, cohort.y, cohort.labels),
    }
    write_atomic(run_dir / "cohorts.json", json.dumps(summary, indent=2, default=_json_default).encode("utf-8"))
    device = _device(config)
    return RunData(config, run_dir, spec, cohort, folds, images, externals, device)


def _load(item: Any, labels: Sequence[str]) -> Cohort:
    """A configured cohort, its label columns aligned to the run's labels."""
    return load_cohort(item.csv, name=item.name, root=item.root or None, labels=labels)


def _folds(config: RunConfig, run_dir: Path, cohort: Cohort) -> np.ndarray:
    """The saved folds of the run directory (checked again), or new ones saved there."""
    path = run_dir / "folds.csv"
    if path.exists():
        folds = load_folds(path, cohort.images)
        check_folds(folds, cohort.patient_ids, cohort.y, config.folds, config.fold_tolerance, cohort.labels)
        return folds
    folds = grouped_stratified_kfold(cohort.patient_ids, cohort.y, config.folds, config.seed, config.fold_tolerance)
    save_folds(path, cohort.images, cohort.patient_ids, folds)
    return folds


def _device(config: RunConfig) -> torch.device:
    """CUDA when configured or available (``auto``), else the CPU."""
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(["device: 'cuda' requested but CUDA is not available"], RUN_CONFIGURATION)
    if config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def _json_default(value: Any) -> Any:
    """JSON for numpy scalars and NaN-free floats in summaries."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


# ---------------------------------------------------------------------------------------------------
# One unit
# ---------------------------------------------------------------------------------------------------


def derive_seed(*parts: Any) -> int:
    """A 31-bit seed from any parts (stable across processes, unlike ``hash``)."""
    digest = hashlib.sha256("\0".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


@dataclass
class UnitState:
    """Progress of a unit, saved in its checkpoint."""

    epoch: int = 0  # epochs completed in the unit
    phase_index: int = 0
    phase_epoch: int = 0  # epochs completed in the current phase
    bad_epochs: int = 0  # epochs without a better monitored loss in the current phase
    best_val_loss: float = math.inf  # the best monitored loss (validation or training, config.monitor)
    best_epoch: int = 0


@dataclass(frozen=True)
class Phase:
    """A training phase: which parameters train, for how long, at which learning rate."""

    name: str
    epochs: int
    lr: float
    prepare: Callable[[CxrNet], None]


def train_unit(data: RunData, key: UnitKey, on_epoch_end: EpochCallback | None = None) -> None:
    """Train one unit to completion, resuming from its checkpoint; no-op when ``done.json`` exists."""
    unit_dir = data.unit_dir(key)
    if (unit_dir / "done.json").exists():
        return
    unit_dir.mkdir(parents=True, exist_ok=True)
    for stale in unit_dir.glob("pred_*.npy"):  # predictions of weights this training replaces
        stale.unlink()
    for orphan in unit_dir.glob(".*.tmp"):  # left by a killed process (a unit is trained by one process)
        orphan.unlink()
    config = data.config
    torch.manual_seed(derive_seed(config.seed, key.architecture, key.fold, "init"))
    model = _build(config, key.architecture).to(data.device)
    state, checkpoint = _resume(unit_dir, model, data.device)
    _trim_log(unit_dir / "log.csv", state.epoch)
    ctx = _UnitContext(data, key, unit_dir, model, on_epoch_end)
    started = time.monotonic()
    for index, phase in enumerate(_phases(config)):
        if index < state.phase_index:
            continue
        if index > state.phase_index or state.phase_epoch == 0:
            if index > 0 and (unit_dir / "model.pt").exists():
                model.load_state_dict(torch.load(unit_dir / "model.pt", map_location=data.device))
            state.phase_index, state.phase_epoch, state.bad_epochs = index, 0, 0
            checkpoint = None
        ctx.run_phase(phase, state, checkpoint)
        checkpoint = None
    _finish_unit(unit_dir, key, state, time.monotonic() - started, config.monitor)


def _build(config: RunConfig, architecture: str, weights: bool = True) -> CxrNet:
    """The unit's model, initialised as configured (random when ``weights`` is False: weights follow)."""
    from training.models import build_model

    return build_model(
        architecture,
        len(config.labels),
        config.weights_for(architecture) if weights else None,
        size=config.image_size,
        drop_rate=config.drop_rate,
    )


def _phases(config: RunConfig) -> list[Phase]:
    """The configured phases (a phase with 0 epochs is kept so that indices stay stable)."""
    from training.models import freeze_backbone, unfreeze_last_stage

    def finetune(model: CxrNet) -> None:
        freeze_backbone(model)
        if config.unfreeze == "all":
            for param in model.backbone.parameters():
                param.requires_grad_(True)
        else:
            unfreeze_last_stage(model)

    epochs_finetune = config.epochs_finetune if config.unfreeze != "none" else 0
    return [
        Phase("head", config.epochs_head, config.lr_head, freeze_backbone),
        Phase("finetune", epochs_finetune, config.lr_finetune, finetune),
    ]


def _resume(unit_dir: Path, model: CxrNet, device: torch.device) -> tuple[UnitState, dict | None]:
    """The unit's saved state and checkpoint (model weights loaded), or a fresh state."""
    path = unit_dir / "checkpoint.pt"
    if not path.exists():
        return UnitState(), None
    checkpoint = torch.load(path, map_location=device, weights_only=False)
    model.load_state_dict(checkpoint["model"])
    state = UnitState(**checkpoint["state"])
    log.info("resuming %s after epoch %d", unit_dir, state.epoch)
    return state, checkpoint


def _finish_unit(unit_dir: Path, key: UnitKey, state: UnitState, seconds: float, monitor: str) -> None:
    """Write ``done.json``; the checkpoint is kept (it is small next to the log's value)."""
    done = {
        "architecture": key.architecture,
        "fold": key.fold,
        "epochs": state.epoch,
        "best_epoch": state.best_epoch,
        "monitor": monitor,
        "best_monitored_loss": state.best_val_loss,
        **({"best_val_loss": state.best_val_loss} if monitor == "validation" else {}),
        "seconds_last_session": round(seconds, 2),
    }
    write_atomic(unit_dir / "done.json", json.dumps(done, indent=2).encode("utf-8"))


class _UnitContext:
    """The pieces one unit's epochs share: data loaders, loss, model, output files."""

    def __init__(
        self,
        data: RunData,
        key: UnitKey,
        unit_dir: Path,
        model: CxrNet,
        on_epoch_end: EpochCallback | None,
    ) -> None:
        self.data, self.key, self.unit_dir, self.model = data, key, unit_dir, model
        self.on_epoch_end = on_epoch_end
        self.config = data.config
        self.unit_seed = derive_seed(self.config.seed, key.architecture, key.fold)
        self.train_idx = np.flatnonzero(data.folds != key.fold)
        self.val_idx = np.flatnonzero(data.folds == key.fold)
        y = data.cohort.y
        self.loss_fn: LossFn = make_loss(
            self.config.loss,
            y[self.train_idx],
            self.config.loss_smoothing,
            self.config.focal_gamma,
            self.config.focal_alpha,
        )
        self.amp = data.device.type == "cuda" and self.config.amp

    def run_phase(self, phase: Phase, state: UnitState, checkpoint: dict | None) -> None:
        """Epochs of one phase from ``state`` until its epochs are done or it stops early."""
        if state.phase_epoch >= phase.epochs or state.bad_epochs >= self.config.patience:
            return
        if state.phase_epoch == 0 and self.config.monitor == "training":
            state.best_val_loss = math.inf  # training losses are compared within a phase only
        phase.prepare(self.model)
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=phase.lr, weight_decay=self.config.weight_decay)
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=self.config.lr_factor, patience=self.config.lr_patience
        )
        scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        if checkpoint is not None:
            optimizer.load_state_dict(checkpoint["optimizer"])
            scheduler.load_state_dict(checkpoint["scheduler"])
            scaler.load_state_dict(checkpoint["scaler"])
        features = self._features() if phase.name == "head" and self.config.cache_features else None
        while state.phase_epoch < phase.epochs and state.bad_epochs < self.config.patience:
            started = time.monotonic()
            row = self._epoch(phase, state, optimizer, scaler, features)
            scheduler.step(self._monitored(row))
            row["seconds"] = round(time.monotonic() - started, 3)
            self._record(row, state, optimizer, scheduler, scaler)

    def _epoch(
        self,
        phase: Phase,
        state: UnitState,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler,
        features: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> dict[str, Any]:
        """Train one epoch, validate, update the unit state; returns the log row (without seconds)."""
        epoch = state.epoch + 1
        torch.manual_seed(derive_seed(self.unit_seed, "epoch", epoch))
        loader, forward = self._train_loader(epoch, features)
        _set_train_mode(self.model)
        desc = f"{self.key.name} {phase.name} e{epoch}"
        train_loss = _train_epoch(
            loader,
            forward,
            self.loss_fn,
            optimizer,
            scaler,
            self.data.device,
            self.amp,
            desc,
            self.config.progress,
        )
        logits = self._val_logits(features)
        y_val = torch.from_numpy(self.data.cohort.y[self.val_idx])
        val_loss = float(self.loss_fn(torch.from_numpy(logits), y_val))
        if not math.isfinite(train_loss):
            raise FloatingPointError(f"{self.key.name} epoch {epoch}: training loss is {train_loss}")
        if not math.isfinite(val_loss):
            if self.config.monitor == "validation":
                raise FloatingPointError(f"{self.key.name} epoch {epoch}: validation loss is {val_loss}")
            log.warning("%s epoch %d: validation loss is %s (not monitored)", self.key.name, epoch, val_loss)
        state.epoch, state.phase_epoch = epoch, state.phase_epoch + 1
        row = {
            "epoch": epoch,
            "phase": phase.name,
            "lr": optimizer.param_groups[0]["lr"],
            "train_loss": train_loss,
            "val_loss": val_loss,
        }
        monitored = self._monitored(row)
        if monitored < state.best_val_loss:
            state.best_val_loss, state.best_epoch, state.bad_epochs = monitored, epoch, 0
            _atomic_save(self.model.state_dict(), self.unit_dir / "model.pt")
        else:
            state.bad_epochs += 1
        row.update(epoch_metrics(self.data.cohort.y[self.val_idx], _sigmoid(logits)))
        return row

    def _monitored(self, row: dict[str, Any]) -> float:
        """The loss that drives early stopping, the LR schedule and the kept epoch (``config.monitor``)."""
        return float(row["val_loss"] if self.config.monitor == "validation" else row["train_loss"])

    def _record(
        self,
        row: dict[str, Any],
        state: UnitState,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        scaler: torch.amp.GradScaler,
    ) -> None:
        """Append the log row, write the checkpoint, call the epoch callback (in that order)."""
        _append_log(self.unit_dir / "log.csv", row)
        checkpoint = {
            "format": 1,
            "unit": {"architecture": self.key.architecture, "fold": self.key.fold},
            "state": vars(state).copy(),
            "model": self.model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
        }
        _atomic_save(checkpoint, self.unit_dir / "checkpoint.pt")
        log.info(
            "%s epoch %d %s: train %.4f val %.4f auroc %.3f",
            self.key.name,
            row["epoch"],
            row["phase"],
            row["train_loss"],
            row["val_loss"],
            row["auroc"],
        )
        if self.on_epoch_end is not None:
            self.on_epoch_end(self.key, row)

    def _train_loader(self, epoch: int, features: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[Any, Any]:
        """The epoch's loader (seeded order) and the forward function that matches its inputs."""
        config = self.config
        y = self.data.cohort.y[self.train_idx]
        generator = torch.Generator().manual_seed(derive_seed(self.unit_seed, "order", epoch))
        if features is not None:
            dataset: Any = TensorDataset(features[0][self.train_idx], torch.from_numpy(y))
            forward = _head_forward(self.model)
        else:
            dataset = CxrDataset(
                self.data.images,
                self.data.cohort.y,
                self.data.spec,
                Augmenter(config.augment),
                seed=self.unit_seed,
                index=self.train_idx,
            )
            dataset.set_epoch(epoch)
            forward = self.model
        sampler = _sampler(y, config.balance_sampling, generator)
        n = len(dataset)
        loader = DataLoader(
            dataset,
            batch_size=config.batch_size,
            sampler=sampler,
            num_workers=0 if features is not None else config.num_workers,
            drop_last=n > config.batch_size and n % config.batch_size == 1,  # no BatchNorm batch of one
            pin_memory=self.data.device.type == "cuda",
        )
        return loader, forward

    def _features(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled backbone features of every training-cohort image ([N, C] on the device), no augmentation."""
        self.model.eval()
        pool = _pooled_features(self.model)
        feats = predict_array(
            pool,
            self.data.images,
            self.data.spec,
            self.config.batch_size,
            self.data.device,
            self.amp,
            desc=f"{self.key.name} features",
            progress=self.config.progress,
        )
        tensor = torch.from_numpy(feats)
        return tensor, torch.from_numpy(self.data.cohort.y)

    def _val_logits(self, features: tuple[torch.Tensor, torch.Tensor] | None) -> np.ndarray:
        """Validation logits [n_val, L] (evaluation mode, no augmentation)."""
        self.model.eval()
        if features is not None:
            with torch.no_grad():
                return _head_forward(self.model)(features[0][self.val_idx].to(self.data.device)).float().cpu().numpy()
        return predict_array(
            self.model,
            self.data.images,
            self.data.spec,
            self.config.batch_size,
            self.data.device,
            self.amp,
            progress=False,
            index=self.val_idx,
        )


def _pooled_features(model: CxrNet) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> features(x).mean((2, 3))``: what the head of a ``CxrNet`` sees before dropout."""
    return lambda x: model.features(x).mean((2, 3))


def _head_forward(model: CxrNet) -> Callable[[torch.Tensor], torch.Tensor]:
    """``features -> logits`` through the model's dropout and head (the cached-features path)."""
    return lambda f: model.head(model.dropout(f))


def _set_train_mode(model: nn.Module) -> None:
    """Training mode, except BatchNorm layers whose parameters are frozen (their statistics stay fixed)."""
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            params = list(module.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                module.eval()


def _sampler(y: np.ndarray, balance: bool, generator: torch.Generator) -> torch.utils.data.Sampler:
    """Random order, or sampling with replacement inversely to each image's label frequencies."""
    if not balance:
        return RandomSampler(range(len(y)), generator=generator)
    return WeightedRandomSampler(balance_weights(y), num_samples=len(y), replacement=True, generator=generator)


def balance_weights(y: np.ndarray) -> list[float]:
    """Per-image sampling weight: the mean over its known labels of ``0.5 / frequency of its value``.

    With one label this gives both classes the same total weight; an image without known labels
    gets weight 1.
    """
    y = np.asarray(y, dtype=np.float64)
    pos = np.nanmean(np.where(np.isnan(y), np.nan, y == 1), axis=0) if len(y) else np.zeros(y.shape[1])
    pos = np.clip(np.nan_to_num(pos, nan=0.5), 1e-6, 1 - 1e-6)
    per_entry = np.where(y == 1, 0.5 / pos, 0.5 / (1 - pos))
    per_entry = np.where(np.isnan(y), np.nan, per_entry)
    known = ~np.isnan(y)
    weights = np.where(known.any(axis=1), np.nansum(per_entry, axis=1) / np.maximum(known.sum(axis=1), 1), 1.0)
    return weights.tolist()


def _train_epoch(
    loader: Any,
    forward: Callable[[torch.Tensor], torch.Tensor],
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    device: torch.device,
    amp: bool,
    desc: str,
    progress: bool,
) -> float:
    """One pass over ``loader``; returns the mean training loss weighted by batch size."""
    from tqdm import tqdm

    total, count = 0.0, 0
    bar = tqdm(loader, desc=desc, disable=not progress, leave=False)
    for x, y in bar:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=amp):
            logits = forward(x)
        loss = loss_fn(logits.float(), y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        total += float(loss.detach()) * len(x)
        count += len(x)
        bar.set_postfix(loss=f"{total / max(count, 1):.4f}")
    return total / max(count, 1)


def predict_array(
    forward: Callable[[torch.Tensor], torch.Tensor] | nn.Module,
    images: np.ndarray,
    spec: Any,
    batch_size: int,
    device: torch.device,
    amp: bool = False,
    desc: str = "predict",
    progress: bool = False,
    index: np.ndarray | None = None,
) -> np.ndarray:
    """``forward`` applied to uint8 images ``[N, S, S]`` (rows ``index`` only, when given) in batches,
    without gradient; float32 ``[n, ...]``."""
    from tqdm import tqdm

    dataset = CxrDataset(images, np.zeros((len(images), 0), dtype=np.float32), spec, index=index)
    loader: DataLoader[Any] = DataLoader(cast(Any, dataset), batch_size=batch_size, shuffle=False)
    outputs = []
    with torch.no_grad():
        for x, _ in tqdm(loader, desc=desc, disable=not progress, leave=False):
            with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=amp):
                out = forward(x.to(device))
            outputs.append(out.float().cpu())
    return torch.cat(outputs).numpy()


def _sigmoid(logits: np.ndarray) -> np.ndarray:
    """Probabilities from logits (float64, no overflow warnings)."""
    return 1.0 / (1.0 + np.exp(-np.clip(logits.astype(np.float64), -60, 60)))


def epoch_metrics(y: np.ndarray, prob: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """Macro means over labels of AUROC, AUPRC, sensitivity, specificity, F1 at ``threshold``.

    Unknown labels are skipped; a label without both classes contributes no AUROC/AUPRC (NaN when
    no label has both).
    """
    from sklearn.metrics import average_precision_score, roc_auc_score

    values: dict[str, list[float]] = {k: [] for k in ("auroc", "auprc", "sensitivity", "specificity", "f1")}
    for j in range(y.shape[1]):
        known = ~np.isnan(y[:, j])
        truth, score = y[known, j].astype(int), prob[known, j]
        predicted = score >= threshold
        tp, fn = int(np.sum(predicted & (truth == 1))), int(np.sum(~predicted & (truth == 1)))
        tn, fp = int(np.sum(~predicted & (truth == 0))), int(np.sum(predicted & (truth == 0)))
        if tp + fn:
            values["sensitivity"].append(tp / (tp + fn))
        if tn + fp:
            values["specificity"].append(tn / (tn + fp))
        if tp + fn + fp:
            values["f1"].append(2 * tp / (2 * tp + fn + fp))
        if 0 < truth.sum() < truth.size:
            values["auroc"].append(float(roc_auc_score(truth, score)))
            values["auprc"].append(float(average_precision_score(truth, score)))
    return {k: float(np.mean(v)) if v else math.nan for k, v in values.items()}


# ---------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------


def _atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` through ``write_atomic`` (an interruption never leaves half a file)."""
    write_atomic(path, lambda handle: torch.save(obj, handle))


def _format(value: Any) -> str:
    """A log cell: floats with 6 significant digits, NaN as empty."""
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def _append_log(path: Path, row: dict[str, Any]) -> None:
    """Append one epoch row to the unit's CSV log (header written with the first row)."""
    new = not path.exists()
    with path.open("a", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        if new:
            writer.writerow(LOG_COLUMNS)
        writer.writerow([_format(row.get(column, math.nan)) for column in LOG_COLUMNS])


def _trim_log(path: Path, epochs: int) -> None:
    """Keep the log's header and complete rows up to the checkpointed epoch, rewritten whole.

    Rows after the checkpoint come from an interruption between log and checkpoint; a cut last line
    (a crash or a full disk mid-append) is dropped, and a cut header drops the file.
    """
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    rows = [row for row in csv.reader(line for line in lines if line.endswith("\n")) if row]
    kept: list[list[str]] = []
    if rows and rows[0] == list(LOG_COLUMNS):
        kept = [rows[0]] + [
            r for r in rows[1:] if len(r) == len(LOG_COLUMNS) and r[0].isdigit() and int(r[0]) <= epochs
        ]
    if len(kept) == len(lines):
        return
    if not kept:
        path.unlink()
        return
    write_atomic(path, csv_bytes(kept))


def read_log(path: str | Path) -> list[dict[str, str]]:
    """The rows of a unit's ``log.csv``."""
    with Path(path).open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


# ---------------------------------------------------------------------------------------------------
# Predictions
# ---------------------------------------------------------------------------------------------------


def load_unit_model(run_dir: str | Path, config: RunConfig, key: UnitKey, device: torch.device | str = "cpu") -> CxrNet:
    """A unit's model with its best weights (``model.pt``), in evaluation mode.

    Raises:
        FileNotFoundError: the unit has no ``model.pt`` (never trained).
    """
    path = Path(run_dir) / "units" / key.architecture / f"fold{key.fold}" / "model.pt"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: unit {key.name} has not been trained")
    model = _build(config, key.architecture, weights=False)
    model.load_state_dict(torch.load(path, map_location="cpu"))
    return model.to(device).eval()


def unit_probabilities(
    data: RunData, key: UnitKey, cohort_name: str, images: np.ndarray, index: np.ndarray | None = None
) -> np.ndarray:
    """Probabilities [n, L] of a finished unit's model on ``images`` (rows ``index``), cached as
    ``pred_<cohort>.npy`` in the unit folder."""
    unit_dir = data.unit_dir(key)
    path = unit_dir / f"pred_{cohort_name}.npy"
    n = len(images) if index is None else len(index)
    if path.exists():
        cached = np.load(path)
        if cached.shape == (n, len(data.config.labels)):
            return cached
    model = load_unit_model(data.run_dir, data.config, key, data.device)
    amp = data.device.type == "cuda" and data.config.amp
    logits = predict_array(
        model,
        images,
        data.spec,
        data.config.batch_size,
        data.device,
        amp,
        desc=f"{key.name} {cohort_name}",
        progress=data.config.progress,
        index=index,
    )
    prob = _sigmoid(logits).astype(np.float32)
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
            out[held_out] = unit_probabilities(data, UnitKey(arch, fold), "oof", data.images, held_out)
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


def write_predictions(data: RunData, units: Sequence[UnitKey]) -> list[Path]:
    """``predictions_oof.csv`` and one ``predictions_<cohort>.csv`` per external cohort."""
    rows, scores = oof_scores(data, units)
    folds = {"fold": data.folds[rows]}
    paths = [write_prediction_csv(data.run_dir / "predictions_oof.csv", data.cohort.subset(rows), scores, folds)]
    for cohort, images in data.externals:
        path = data.run_dir / f"predictions_{cohort.name}.csv"
        paths.append(write_prediction_csv(path, cohort, external_scores(data, units, cohort, images)))
    return paths


def write_prediction_csv(
    path: Path, cohort: Cohort, scores: dict[str, np.ndarray], extra: dict[str, np.ndarray] | None = None
) -> Path:
    """One row per image: identifiers, demographics, ``label_*``, ``score_*__<member>``, ``..__ensemble``."""
    labels = cohort.labels
    members = list(scores)
    ensemble = np.mean([scores[m] for m in members], axis=0)
    extra = extra or {}
    header = ["image", "patient_id", "site", "sex", "age", *extra, *(label_column(lb) for lb in labels)]
    header += [score_column(lb, m) for lb in labels for m in [*members, ENSEMBLE]]
    rows = (_prediction_row(cohort, i, extra, scores, ensemble, members) for i in range(len(cohort)))
    write_atomic(path, csv_bytes([header, *rows]))
    return path


def _prediction_row(
    cohort: Cohort,
    i: int,
    extra: dict[str, np.ndarray],
    scores: dict[str, np.ndarray],
    ensemble: np.ndarray,
    members: list[str],
) -> list[str]:
    """The cells of one image's prediction row."""
    age = cohort.ages[i]
    cells = [
        cohort.images[i],
        cohort.patient_ids[i],
        cohort.sites[i],
        cohort.sexes[i],
        "" if math.isnan(age) else f"{age:g}",
        *(str(v[i]) for v in extra.values()),
    ]
    for j in range(len(cohort.labels)):
        value = cohort.y[i, j]
        cells.append("" if math.isnan(value) else str(int(value)))
    for j in range(len(cohort.labels)):
        for member in members:
            cells.append(f"{float(scores[member][i, j]):.8g}")
        cells.append(f"{float(ensemble[i, j]):.8g}")
    return cells


def iter_units(run_dir: str | Path) -> Iterator[tuple[UnitKey, Path]]:
    """Finished units of a run directory (those with ``done.json``), for export and reports."""
    for done in sorted(Path(run_dir).glob("units/*/fold*/done.json")):
        info = json.loads(done.read_text())
        yield UnitKey(info["architecture"], int(info["fold"])), done.parent
