"""Unit step: train one (architecture, fold) unit to completion, resumable, and load its final model.

A unit: phase ``head`` (backbone frozen, its BatchNorm statistics too; ``epochs_head`` epochs at
``lr_head``), then phase ``finetune`` (``unfreeze``: the last backbone stage, the last two, or all of it;
``epochs_finetune`` epochs at ``lr_finetune``), which starts from the best weights so far. Each phase
has its own AdamW and ReduceLROnPlateau on the monitored loss, and stops early after ``patience``
epochs without a better monitored loss. ``monitor = "validation"`` (default) monitors the held-out
fold's loss, compared across phases; ``"training"`` monitors the epoch's mean training loss, compared
within a phase only (the phases' training losses are not like for like: cached features without
augmentation, then augmented images), so the held-out fold decides nothing; ``"inner"`` monitors the loss
on one of ``inner_folds`` patient-grouped parts of the training folds, which the unit then does not train
on (:func:`training.prepare.inner_split`): compared across phases like the held-out loss, and the held-out
fold decides nothing either. The held-out fold's loss and metrics are logged under every monitor.
``average_last = N > 0`` keeps instead the mean of the weights after each of the last N fine-tuning epochs (all
parameters and BatchNorm statistics, the statistics averaged rather than recomputed for the mean; weight averaging
over the end of fine-tuning after SWA), and fine-tuning then runs all its epochs: in that phase the monitored loss
drives the learning rate only. The head phase still keeps its best monitored epoch, which fine-tuning starts from, so
under ``monitor = "validation"`` the held-out fold still chooses that starting point (and the learning rate): its
selection bias is reduced, not removed. With
``cache_features`` the head phase trains the head on backbone features computed once per image without
augmentation (exact, since the backbone is frozen).

Reproducibility and resume: torch is reseeded at the start of every epoch from (seed, architecture,
fold, epoch), the shuffling/sampling generator likewise, and each sample's augmentation draws from
(unit seed, epoch, index) (``training.data.sample_rng``). So the random state of an epoch follows
from its number, and a unit restarted from its checkpoint gives the same weights as an uninterrupted
run (on the CPU; CUDA kernels may be non-deterministic).
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from storage.files import write_atomic
from training.augment import Augmenter
from training.config import RunConfig
from training.data import CxrDataset
from training.epoch import (
    epoch_metrics,
    head_forward,
    pooled_features,
    predict_array,
    sampler,
    set_train_mode,
    train_epoch,
)
from training.losses import LossFn, make_loss
from training.lungs import OutsideLungs
from training.prepare import RunData, inner_split
from training.probability import sigmoid
from training.rundir import RunDir, UnitDir, UnitKey
from training.trainlog import append_log, trim_log, write_done

if TYPE_CHECKING:
    from training.models import CxrNet

log = logging.getLogger(__name__)

EpochCallback = Callable[[UnitKey, dict[str, Any]], None]


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
    averaged: int = 0  # fine-tuning epochs averaged into the kept weights so far (config.average_last)


@dataclass(frozen=True)
class Phase:
    """A training phase: which parameters train, for how long, at which learning rate."""

    name: str
    epochs: int
    lr: float
    prepare: Callable[[CxrNet], None]



def train_unit(data: RunData, key: UnitKey, on_epoch_end: EpochCallback | None = None) -> None:
    """Train one unit to completion, resuming from its checkpoint; no-op when ``done.json`` exists."""
    unit = data.paths.unit(key)
    if unit.done.exists():
        return
    unit.path.mkdir(parents=True, exist_ok=True)
    for stale in unit.cached_scores():  # predictions of weights this training replaces
        stale.unlink()
    for orphan in unit.orphans():  # left by a killed process (a unit is trained by one process)
        orphan.unlink()
    config = data.config
    torch.manual_seed(derive_seed(config.seed, key.architecture, key.fold, "init"))
    model = build_unit_model(config, key.architecture).to(data.device)
    state, checkpoint = _resume(unit, model, data.device)
    trim_log(unit.log, state.epoch)
    ctx = _UnitContext(data, key, unit, model, on_epoch_end)
    started = time.monotonic()
    for index, phase in enumerate(_phases(config)):
        if index < state.phase_index:
            continue
        if index > state.phase_index or state.phase_epoch == 0:
            if index > 0 and unit.model.exists():
                model.load_state_dict(torch.load(unit.model, map_location=data.device))
            state.phase_index, state.phase_epoch, state.bad_epochs = index, 0, 0
            checkpoint = None
        ctx.run_phase(phase, state, checkpoint)
        checkpoint = None
    kept = ctx.kept_losses() if state.averaged else None
    _finish_unit(unit, key, state, time.monotonic() - started, config.monitor, ctx.inner_idx, kept)


def unit_inner_split(data: RunData, fold: int) -> tuple[np.ndarray, np.ndarray]:
    """The fold's rows trained on and monitored under ``monitor = "inner"`` (one split for every architecture)."""
    return inner_split(data, fold, derive_seed(data.config.seed, "inner", fold))


def build_unit_model(config: RunConfig, architecture: str, weights: bool = True) -> CxrNet:
    """A unit's model, initialised as configured (random when ``weights`` is False: weights follow)."""
    from training.models import build_model

    return build_model(
        architecture,
        len(config.labels),
        config.weights_for(architecture) if weights else None,
        size=config.image_size,
        drop_rate=config.drop_rate,
        head=config.head,
    )


def load_unit_model(run_dir: str | Path, config: RunConfig, key: UnitKey, device: torch.device | str = "cpu") -> CxrNet:
    """A unit's model with its best weights (``model.pt``), in evaluation mode.

    Raises:
        FileNotFoundError: the unit has no ``model.pt`` (never trained).
    """
    path = RunDir(run_dir).unit(key).model
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: unit {key.name} has not been trained")
    model = build_unit_model(config, key.architecture, weights=False)
    model.load_state_dict(torch.load(path, map_location="cpu"))
    return model.to(device).eval()


def _phases(config: RunConfig) -> list[Phase]:
    """The configured phases (a phase with 0 epochs is kept so that indices stay stable)."""
    from training.models import freeze_backbone, unfreeze_last_stages

    def finetune(model: CxrNet) -> None:
        freeze_backbone(model)
        if config.unfreeze == "all":
            for param in model.backbone.parameters():
                param.requires_grad_(True)
        else:
            unfreeze_last_stages(model, 2 if config.unfreeze == "last_two_stages" else 1)

    epochs_finetune = config.epochs_finetune if config.unfreeze != "none" else 0
    return [
        Phase("head", config.epochs_head, config.lr_head, freeze_backbone),
        Phase("finetune", epochs_finetune, config.lr_finetune, finetune),
    ]


def _resume(unit: UnitDir, model: CxrNet, device: torch.device) -> tuple[UnitState, dict | None]:
    """The unit's saved state and checkpoint (model weights loaded), or a fresh state."""
    if not unit.checkpoint.exists():
        return UnitState(), None
    checkpoint = torch.load(unit.checkpoint, map_location=device, weights_only=False)
    model.load_state_dict(checkpoint["model"])
    state = UnitState(**checkpoint["state"])
    log.info("resuming %s after epoch %d", unit.path, state.epoch)
    return state, checkpoint


def _finish_unit(
    unit: UnitDir,
    key: UnitKey,
    state: UnitState,
    seconds: float,
    monitor: str,
    inner_idx: np.ndarray | None,
    kept: dict[str, float] | None = None,
) -> None:
    """Write ``done.json``; the checkpoint is kept (it is small next to the log's value).

    A unit that kept its best epoch reports that epoch's monitored loss (``best_monitored_loss``, and
    ``best_val_loss`` under ``monitor = "validation"``). An averaging unit (``average_last``) kept no epoch: it
    reports the losses of the mean it kept instead (``kept``, from :meth:`_UnitContext.kept_losses`), since the
    lowest loss of any single epoch describes weights it did not keep."""
    chosen = {
        "best_monitored_loss": state.best_val_loss,
        **({"best_val_loss": state.best_val_loss} if monitor == "validation" else {}),
    }
    done = {
        "architecture": key.architecture,
        "fold": key.fold,
        "epochs": state.epoch,
        "best_epoch": state.best_epoch,
        **({"averaged_epochs": list(range(state.epoch - state.averaged + 1, state.epoch + 1))}
           if state.averaged else {}),
        "monitor": monitor,
        **(kept if kept is not None else chosen),
        **({"inner_images": len(inner_idx)} if inner_idx is not None else {}),
        "seconds_last_session": round(seconds, 2),
    }
    write_done(unit.done, done)


def _atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` through ``write_atomic`` (an interruption never leaves half a file)."""
    write_atomic(path, lambda handle: torch.save(obj, handle))


class _UnitContext:
    """The pieces one unit's epochs share: data loaders, loss, model, output files."""

    def __init__(
        self,
        data: RunData,
        key: UnitKey,
        unit: UnitDir,
        model: CxrNet,
        on_epoch_end: EpochCallback | None,
    ) -> None:
        self.data, self.key, self.unit, self.model = data, key, unit, model
        self.on_epoch_end = on_epoch_end
        self.config = data.config
        self.unit_seed = derive_seed(self.config.seed, key.architecture, key.fold)
        self.train_idx = np.flatnonzero(data.folds != key.fold)
        self.val_idx = np.flatnonzero(data.folds == key.fold)
        self.inner_idx: np.ndarray | None = None  # the monitored part of the training folds (monitor "inner")
        if self.config.monitor == "inner":
            self.train_idx, self.inner_idx = unit_inner_split(data, key.fold)
        y = data.cohort.y
        self.loss_fn: LossFn = make_loss(
            self.config.loss,
            y[self.train_idx],
            self.config.loss_smoothing,
            self.config.focal_gamma,
            self.config.focal_alpha,
        )
        self.amp = data.amp
        self.average: dict[str, torch.Tensor] | None = None  # the running mean of config.average_last

    def _averaging(self, phase: Phase) -> bool:
        """Whether ``phase`` keeps averaged weights instead of its best epoch (``config.average_last``)."""
        return phase.name == "finetune" and self.config.average_last > 0

    def _stopped(self, phase: Phase, state: UnitState) -> bool:
        """Early stop: ``patience`` epochs without a better monitored loss (never in an averaging phase)."""
        return state.bad_epochs >= self.config.patience and not self._averaging(phase)

    def _update_average(self, phase: Phase, state: UnitState) -> None:
        """After an epoch inside the last ``average_last`` of an averaging phase: fold the weights into the running
        mean and write the mean as the unit's model (floating tensors averaged; counters taken as they are)."""
        if not self._averaging(phase) or state.phase_epoch <= phase.epochs - self.config.average_last:
            return
        current = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        n = state.averaged + 1
        if self.average is None or state.averaged == 0:
            self.average = current
        else:
            for name, value in current.items():
                if value.is_floating_point():
                    self.average[name] += (value - self.average[name]) / n
                else:
                    self.average[name] = value
        state.averaged, state.best_epoch = n, state.epoch
        _atomic_save(self.average, self.unit.model)

    def run_phase(self, phase: Phase, state: UnitState, checkpoint: dict | None) -> None:
        """Epochs of one phase from ``state`` until its epochs are done or it stops early."""
        if state.phase_epoch >= phase.epochs or self._stopped(phase, state):
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
            self.average = checkpoint.get("average")
            if state.averaged and self.average is None:  # restarting the mean would average fewer epochs than it says
                raise ValueError(f"{self.unit.checkpoint}: {state.averaged} averaged epoch(s) recorded but no stored "
                                 "mean; the checkpoint was not written by this unit's training")
        features = self._features() if phase.name == "head" and self.config.cache_features else None
        while state.phase_epoch < phase.epochs and not self._stopped(phase, state):
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
        set_train_mode(self.model)
        desc = f"{self.key.name} {phase.name} e{epoch}"
        train_loss = train_epoch(
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
        logits = self._logits(features, self.val_idx)
        val_loss = self._loss(logits, self.val_idx)
        if not math.isfinite(train_loss):
            raise FloatingPointError(f"{self.key.name} epoch {epoch}: training loss is {train_loss}")
        inner: dict[str, float] = {}
        if self.inner_idx is not None:
            inner["inner_loss"] = self._loss(self._logits(features, self.inner_idx), self.inner_idx)
            if not math.isfinite(inner["inner_loss"]):
                raise FloatingPointError(f"{self.key.name} epoch {epoch}: inner loss is {inner['inner_loss']}")
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
            **inner,
        }
        monitored = self._monitored(row)
        if monitored < state.best_val_loss:
            state.best_val_loss, state.bad_epochs = monitored, 0
            if not self._averaging(phase):
                state.best_epoch = epoch
                _atomic_save(self.model.state_dict(), self.unit.model)
        else:
            state.bad_epochs += 1
        self._update_average(phase, state)
        row.update(epoch_metrics(self.data.cohort.y[self.val_idx], sigmoid(logits)))
        return row

    def kept_losses(self) -> dict[str, float]:
        """The losses of the weights the unit keeps (its ``model.pt``), evaluated once more: the held-out fold's
        (``kept_val_loss``) and, under ``monitor = "inner"``, the monitored part's (``kept_inner_loss``). Logged
        only: nothing is chosen by them. The training loss of an epoch has no counterpart for averaged weights."""
        self.model.load_state_dict(torch.load(self.unit.model, map_location=self.data.device))
        losses = {"kept_val_loss": self._loss(self._logits(None, self.val_idx), self.val_idx)}
        if self.inner_idx is not None:
            losses["kept_inner_loss"] = self._loss(self._logits(None, self.inner_idx), self.inner_idx)
        return losses

    def _monitored(self, row: dict[str, Any]) -> float:
        """The loss that drives early stopping, the LR schedule and the kept epoch (``config.monitor``)."""
        column = {"validation": "val_loss", "training": "train_loss", "inner": "inner_loss"}[self.config.monitor]
        return float(row[column])

    def _loss(self, logits: np.ndarray, index: np.ndarray) -> float:
        """The unit's loss over rows ``index`` of the cohort, from their logits."""
        return float(self.loss_fn(torch.from_numpy(logits), torch.from_numpy(self.data.cohort.y[index])))

    def _record(
        self,
        row: dict[str, Any],
        state: UnitState,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        scaler: torch.amp.GradScaler,
    ) -> None:
        """Append the log row, write the checkpoint, call the epoch callback (in that order)."""
        append_log(self.unit.log, row)
        checkpoint = {
            "format": 1,
            "unit": {"architecture": self.key.architecture, "fold": self.key.fold},
            "state": vars(state).copy(),
            "model": self.model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            **({"average": self.average} if self.average is not None and state.averaged else {}),
        }
        _atomic_save(checkpoint, self.unit.checkpoint)
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
            forward = head_forward(self.model)
        else:
            dataset = CxrDataset(
                self.data.images,
                self.data.cohort.y,
                self.data.spec,
                Augmenter(config.augment),
                seed=self.unit_seed,
                index=self.train_idx,
                regions=self.data.regions,
                outside_lungs=OutsideLungs(config.augment.outside_lungs_p) if self.data.regions is not None else None,
            )
            dataset.set_epoch(epoch)
            forward = self.model
        order = sampler(y, config.balance_sampling, generator)
        n = len(dataset)
        loader = DataLoader(
            dataset,
            batch_size=config.batch_size,
            sampler=order,
            num_workers=0 if features is not None else config.num_workers,
            drop_last=n > config.batch_size and n % config.batch_size == 1,  # no BatchNorm batch of one
            pin_memory=self.data.device.type == "cuda",
        )
        return loader, forward

    def _features(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled backbone features of every training-cohort image ([N, C] on the device), no augmentation."""
        self.model.eval()
        pool = pooled_features(self.model)
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

    def _logits(self, features: tuple[torch.Tensor, torch.Tensor] | None, index: np.ndarray) -> np.ndarray:
        """Logits [len(index), L] of cohort rows ``index`` (evaluation mode, no augmentation)."""
        self.model.eval()
        if features is not None:
            with torch.no_grad():
                return head_forward(self.model)(features[0][index].to(self.data.device)).float().cpu().numpy()
        return predict_array(
            self.model,
            self.data.images,
            self.data.spec,
            self.config.batch_size,
            self.data.device,
            self.amp,
            progress=False,
            index=index,
        )

