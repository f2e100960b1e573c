"""Loss step: multi-label classification losses with unknown labels masked out.

Every loss takes ``logits [N, L]`` and ``targets [N, L]`` holding 1, 0 or NaN (unknown). Unknown
entries contribute nothing; the result is the **mean over the known entries** (0, still differentiable,
when none is known). With ``p = sigmoid(x)``, ``y`` the target and the mean taken over known entries:

- ``bce``: ``-[y log p + (1 - y) log(1 - p)]``.
- ``weighted_bce``: ``-[w_pos y log p + w_neg (1 - y) log(1 - p)]`` with per-label weights fixed
  from the training labels' frequencies by :func:`class_weights`:
  ``w_pos = n / (2 n_pos)``, ``w_neg = n / (2 n_neg)`` (``n`` = known values; "balanced" weights, both
  1 at 50 % prevalence; a count of 0 is taken as 1).
- ``dynamic_bce`` (:class:`DynamicWeightedBCE`, the seed's loss): the positive weight is recomputed
  from every batch's hard labels, ``pos_weight_l = (n_neg_l + 1) / (n_pos_l + 1)`` (add-one so a batch
  without positives stays finite); targets are smoothed, ``t = y (1 - eps) + eps / 2``; the loss is
  ``-[pos_weight_l t log p + (1 - t) log(1 - p)]``.
- ``focal``: ``-alpha_t (1 - p_t)^gamma log p_t`` with ``p_t = p`` if ``y = 1`` else ``1 - p`` and
  ``alpha_t = alpha`` if ``y = 1`` else ``1 - alpha`` (``alpha = None``: no class weighting).

All log terms use ``logsigmoid`` for numerical stability.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch.nn import functional

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
LOSSES = ("bce", "weighted_bce", "dynamic_bce", "focal")


def _masked_mean(values: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` where ``known``; 0 (connected to the graph) when nothing is known."""
    count = known.sum()
    total = torch.where(known, values, torch.zeros_like(values)).sum()
    return total / count.clamp(min=1)


def _split(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(float logits, targets with NaN replaced by 0, known mask); checks shapes."""
    if logits.shape != targets.shape:
        raise ValueError(
            f"logits and targets must have the same shape, found {tuple(logits.shape)} and {tuple(targets.shape)}"
        )
    known = ~torch.isnan(targets)
    return logits.float(), torch.nan_to_num(targets.float(), nan=0.0), known


def _log_terms(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``log p`` and ``log(1 - p)`` for ``p = sigmoid(x)``, stably."""
    return functional.logsigmoid(x), functional.logsigmoid(-x)


def bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy, mean over the known entries."""
    x, y, known = _split(logits, targets)
    log_p, log_q = _log_terms(x)
    return _masked_mean(-(y * log_p + (1 - y) * log_q), known)


def weighted_bce(
    logits: torch.Tensor, targets: torch.Tensor, pos_weight: torch.Tensor, neg_weight: torch.Tensor
) -> torch.Tensor:
    """Class-weighted binary cross-entropy with per-label weights ``[L]``, mean over the known entries."""
    x, y, known = _split(logits, targets)
    log_p, log_q = _log_terms(x)
    w_pos = pos_weight.to(x)
    w_neg = neg_weight.to(x)
    return _masked_mean(-(w_pos * y * log_p + w_neg * (1 - y) * log_q), known)


def class_weights(y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced per-label weights from training labels: ``n / (2 n_pos)`` and ``n / (2 n_neg)``.

    Args:
        y: ``[N, L]`` labels with 1, 0 or NaN.

    Returns:
        ``(pos_weight [L], neg_weight [L])`` float32 tensors.
    """
    y2 = np.asarray(y, dtype=np.float64).reshape(len(y), -1)
    n_pos = np.maximum(np.nansum(y2 == 1, axis=0), 1)
    n_neg = np.maximum(np.nansum(y2 == 0, axis=0), 1)
    n = n_pos + n_neg
    return (
        torch.tensor(n / (2 * n_pos), dtype=torch.float32),
        torch.tensor(n / (2 * n_neg), dtype=torch.float32),
    )


class DynamicWeightedBCE:
    """The seed's loss: BCE whose positive weight follows each batch's imbalance, with label smoothing.

    Args:
        smoothing: ``eps`` in ``t = y (1 - eps) + eps / 2`` (0 = hard targets).
    """

    def __init__(self, smoothing: float = 0.05) -> None:
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"smoothing must be in [0, 1), found {smoothing}")
        self.smoothing = smoothing

    def pos_weight(self, targets: torch.Tensor) -> torch.Tensor:
        """``(n_neg + 1) / (n_pos + 1)`` per label over the batch's known hard labels."""
        known = ~torch.isnan(targets)
        n_pos = ((targets == 1) & known).sum(dim=0).float()
        n_neg = ((targets == 0) & known).sum(dim=0).float()
        return (n_neg + 1) / (n_pos + 1)

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The loss of one batch."""
        weight = self.pos_weight(targets).detach()
        x, y, known = _split(logits, targets)
        t = y * (1 - self.smoothing) + self.smoothing / 2
        log_p, log_q = _log_terms(x)
        return _masked_mean(-(weight.to(x) * t * log_p + (1 - t) * log_q), known)


def focal(logits: torch.Tensor, targets: torch.Tensor, gamma: float = 2.0, alpha: float | None = 0.25) -> torch.Tensor:
    """Focal loss (Lin et al. 2017), mean over the known entries."""
    x, y, known = _split(logits, targets)
    log_p, log_q = _log_terms(x)
    log_pt = y * log_p + (1 - y) * log_q
    loss = -((1 - log_pt.exp()) ** gamma) * log_pt
    if alpha is not None:
        loss = (alpha * y + (1 - alpha) * (1 - y)) * loss
    return _masked_mean(loss, known)


def make_loss(
    name: str,
    train_y: np.ndarray | None = None,
    smoothing: float = 0.05,
    gamma: float = 2.0,
    alpha: float | None = 0.25,
) -> LossFn:
    """The loss function a run configuration names.

    Args:
        name: one of :data:`LOSSES`.
        train_y: the training labels ``[N, L]`` (needed by ``weighted_bce``).
        smoothing: label smoothing of ``dynamic_bce``.
        gamma: focusing parameter of ``focal``.
        alpha: positive-class weight of ``focal`` (None: unweighted).

    Raises:
        ValueError: an unknown name, or ``weighted_bce`` without training labels.
    """
    if name == "bce":
        return bce
    if name == "weighted_bce":
        if train_y is None:
            raise ValueError("weighted_bce needs the training labels to compute its weights")
        pos_weight, neg_weight = class_weights(train_y)
        return lambda logits, targets: weighted_bce(logits, targets, pos_weight, neg_weight)
    if name == "dynamic_bce":
        return DynamicWeightedBCE(smoothing)
    if name == "focal":
        return lambda logits, targets: focal(logits, targets, gamma, alpha)
    raise ValueError(f"loss must be one of {', '.join(LOSSES)}, found {name!r}")
