"""Epoch step: what one epoch of a unit is made of: sampling, the training pass, batched inference, metrics.

Nothing here knows about run directories or checkpoints (``training.unit`` does); every function works on
a model, tensors or uint8 images and the run's preprocessing spec.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, WeightedRandomSampler

from training.data import CxrDataset
from training.losses import LossFn

if TYPE_CHECKING:
    from training.models import CxrNet


def pooled_features(model: CxrNet) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> features(x).mean((2, 3))``: what the head of a ``CxrNet`` sees before dropout."""
    return lambda x: model.features(x).mean((2, 3))


def head_forward(model: CxrNet) -> Callable[[torch.Tensor], torch.Tensor]:
    """``features -> logits`` through the model's dropout and head (the cached-features path)."""
    return lambda f: model.head(model.dropout(f))


def set_train_mode(model: nn.Module) -> None:
    """Training mode, except BatchNorm layers whose parameters are frozen (their statistics stay fixed)."""
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            params = list(module.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                module.eval()


def sampler(y: np.ndarray, balance: bool, generator: torch.Generator) -> torch.utils.data.Sampler:
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


def train_epoch(
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
