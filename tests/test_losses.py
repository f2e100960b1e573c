"""Losses against hand-computed values; unknown labels (NaN) never contribute."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from training.losses import (
    DynamicWeightedBCE,
    bce,
    class_weights,
    focal,
    make_loss,
    weighted_bce,
)

LN3 = math.log(3.0)  # sigmoid(ln 3) = 0.75
NAN = float("nan")


def t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def test_bce_hand_values_and_mask() -> None:
    # p = 0.75: -ln 0.75 = 0.2876821 (y=1), -ln 0.25 = 1.3862944 (y=0); logit 0: ln 2 = 0.6931472.
    logits = t([[LN3, LN3], [0.0, 5.0]])
    targets = t([[1.0, 0.0], [1.0, NAN]])
    expected = (0.2876821 + 1.3862944 + 0.6931472) / 3
    assert bce(logits, targets).item() == pytest.approx(expected, abs=1e-6)


def test_all_unknown_gives_zero_with_gradient() -> None:
    logits = torch.zeros(2, 1, requires_grad=True)
    loss = bce(logits, t([[NAN], [NAN]]))
    loss.backward()
    assert loss.item() == 0.0
    assert logits.grad is not None and torch.all(logits.grad == 0)


def test_nan_target_gives_no_gradient_to_its_logit() -> None:
    logits = torch.zeros(2, 1, requires_grad=True)
    focal(logits, t([[1.0], [NAN]])).backward()
    assert logits.grad[1, 0] == 0 and logits.grad[0, 0] != 0


def test_class_weights_are_balanced() -> None:
    # 1 positive, 3 negatives, 1 unknown: w_pos = 4 / 2 = 2, w_neg = 4 / 6 = 0.6667.
    pos, neg = class_weights(np.array([[1.0], [0.0], [0.0], [0.0], [NAN]]))
    assert pos.tolist() == pytest.approx([2.0])
    assert neg.tolist() == pytest.approx([2 / 3])


def test_weighted_bce_hand_value() -> None:
    logits = t([[LN3], [LN3]])
    targets = t([[1.0], [0.0]])
    loss = weighted_bce(logits, targets, torch.tensor([2.0]), torch.tensor([0.5]))
    assert loss.item() == pytest.approx((2.0 * 0.2876821 + 0.5 * 1.3862944) / 2, abs=1e-6)


def test_make_weighted_bce_uses_training_frequencies() -> None:
    train_y = np.array([[1.0], [0.0], [0.0], [0.0]])
    loss = make_loss("weighted_bce", train_y)(t([[LN3], [LN3]]), t([[1.0], [0.0]]))
    assert loss.item() == pytest.approx((2.0 * 0.2876821 + (2 / 3) * 1.3862944) / 2, abs=1e-6)


def test_dynamic_weighted_bce_hand_value() -> None:
    # Batch: 1 positive, 2 negatives -> pos_weight = (2 + 1) / (1 + 1) = 1.5; eps = 0.1 -> t = 0.95 / 0.05.
    logits = t([[LN3], [LN3], [0.0], [7.0]])
    targets = t([[1.0], [0.0], [0.0], [NAN]])
    lp, lq = math.log(0.75), math.log(0.25)
    l0 = -(1.5 * 0.95 * lp + 0.05 * lq)
    l1 = -(1.5 * 0.05 * lp + 0.95 * lq)
    l2 = -(1.5 * 0.05 * math.log(0.5) + 0.95 * math.log(0.5))
    loss = DynamicWeightedBCE(smoothing=0.1)(logits, targets)
    assert loss.item() == pytest.approx((l0 + l1 + l2) / 3, abs=1e-6)


def test_dynamic_weighted_bce_without_smoothing_and_positives() -> None:
    # No positive in the batch: pos_weight = (2 + 1) / 1 = 3, irrelevant with hard zeros.
    loss = DynamicWeightedBCE(smoothing=0.0)(t([[LN3], [LN3]]), t([[0.0], [0.0]]))
    assert loss.item() == pytest.approx(1.3862944, abs=1e-6)


def test_focal_hand_values() -> None:
    # y=1, p=0.75: 0.25 * 0.25^2 * 0.2876821 = 0.0044950; y=0, p=0.75: 0.75 * 0.75^2 * 1.3862944 = 0.5848429.
    loss = focal(t([[LN3], [LN3]]), t([[1.0], [0.0]]), gamma=2.0, alpha=0.25)
    assert loss.item() == pytest.approx((0.0044950 + 0.5848429) / 2, abs=1e-6)


def test_focal_gamma_zero_without_alpha_is_bce() -> None:
    logits = torch.linspace(-3, 3, 8).view(4, 2)
    targets = t([[1, 0], [0, 1], [NAN, 1], [0, 0]])
    assert focal(logits, targets, gamma=0.0, alpha=None).item() == pytest.approx(bce(logits, targets).item())


def test_unknown_loss_name_is_refused() -> None:
    with pytest.raises(ValueError, match="loss must be one of"):
        make_loss("hinge")
