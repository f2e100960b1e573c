"""The one sigmoid of ``training/``: logits -> probabilities, float64.

Every probability the training code writes (prediction CSVs, the epoch log's metrics, the audits) comes from
:func:`sigmoid`. The node's ``ai.ensemble.sigmoid`` returns float32 (the value the node compares with its
thresholds); the two differ in the last digits, so training keeps its own, unchanged.
"""

from __future__ import annotations

import numpy as np


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """Probabilities from logits (float64, no overflow warnings)."""
    return 1.0 / (1.0 + np.exp(-np.clip(logits.astype(np.float64), -60, 60)))
