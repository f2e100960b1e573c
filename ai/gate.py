"""Input gate: is this image a frontal chest radiograph at all, whatever its tags say?

The clinical model scores whatever it is given: a lateral view, an upside-down chest, a blank plate or a
test pattern all get a probability. Two checks run before it, on the decoded image:

1. **Content** (:func:`content_problem`): an image too small to hold a chest (under ``MIN_SIDE`` pixels a
   side) or with (nearly) no grey levels (``MIN_LEVELS``: a uniform plate, a two-tone pattern) has no usable
   content. Plain statistics, no model.
2. **View** (:class:`InputGate`): a small classifier package (``ai/models/gate``, made by
   ``cxr-train gate``) with three outputs, ``Frontal chest``, ``Lateral chest`` and ``Other``, run through
   the same preprocessing pipeline as the clinical model (field, letterbox, CLAHE) at its own size. The image
   is analysed only when the ensemble's ``Frontal chest`` probability reaches the package threshold.

A refusal is a :class:`GateVerdict` with a fixed, value-free reason that the "not analysed" SR carries, for
example ``image is not a frontal chest radiograph (p = 0.03; most likely a lateral view)``.
The evaluation (laterals caught, patterns caught, frontal images wrongly refused) is in docs/gate/README.md.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ai.ensemble import Ensemble
from ai.manifest import ModelManifest, ModelPackageError, bundled_gate_dir

log = logging.getLogger(__name__)

FRONTAL, LATERAL, OTHER = "Frontal chest", "Lateral chest", "Other"
GATE_LABELS: tuple[str, ...] = (FRONTAL, LATERAL, OTHER)
"""The labels a gate package must have (the order of its outputs is the manifest's)."""

MIN_SIDE = 64
"""Fewer pixels than this on a side: no chest can be read (the smallest real radiograph here is 169 px)."""
MIN_LEVELS = 16
"""Fewer distinct grey levels (of 256, inside the image) than this: a uniform or two-tone field, not an X-ray."""
MIN_STD = 2.0 / 255.0
"""A standard deviation below this (in [0, 1] grey): a uniform field with noise in the last bit."""



@dataclass(frozen=True)
class GateVerdict:
    """What the gate decided about one image.

    Attributes:
        analysable: True: the clinical model may score the image.
        reason: why not (fixed text with at most a probability), "" when analysable.
        scores: the gate's probability per label (empty when the content check refused the image).
    """

    analysable: bool
    reason: str = ""
    scores: Mapping[str, float] = field(default_factory=dict)


def content_problem(image: np.ndarray) -> str:
    """Why a decoded image has no usable content, or "" when it has some.

    Args:
        image: 2-D float image in [0, 1] (``ai.pixels`` output).
    """
    rows, cols = image.shape[:2]
    if min(rows, cols) < MIN_SIDE:
        return f"image has no usable content (too small: {rows} x {cols} pixels, under {MIN_SIDE} a side)"
    step = max(1, int(max(rows, cols) // 1024))  # statistics on at most ~1024 x 1024 samples
    sample = np.asarray(image[::step, ::step], dtype=np.float32)
    if not np.isfinite(sample).all():
        return "image has no usable content (pixel values that are not numbers)"
    if float(sample.std()) < MIN_STD:
        return "image has no usable content (a uniform field)"
    levels = int(np.count_nonzero(np.bincount(np.clip(np.rint(sample * 255.0), 0, 255).astype(np.uint8).ravel(),
                                              minlength=256)))
    if levels < MIN_LEVELS:
        return f"image has no usable content (only {levels} grey levels)"
    return ""


class InputGate:
    """The view classifier package and its rule.

    Args:
        ensemble: the loaded gate package (labels must include ``GATE_LABELS``).

    Raises:
        ModelPackageError: the package lacks one of ``GATE_LABELS``.
    """

    def __init__(self, ensemble: Ensemble) -> None:
        missing = [label for label in GATE_LABELS if label not in ensemble.manifest.labels]
        if missing:
            raise ModelPackageError(
                f"gate package {ensemble.package_dir}: labels {list(ensemble.manifest.labels)} lack {missing}; "
                f"a gate package has {list(GATE_LABELS)}"
            )
        self.ensemble = ensemble
        self.threshold = float(ensemble.thresholds[FRONTAL].value)

    @classmethod
    def load(cls, package_dir: str | Path | None = None, threads: int | None = None) -> InputGate:
        """Load a gate package (default: the bundled one) on the CPU.

        Raises:
            ModelPackageError: a missing, altered or invalid package.
        """
        return cls(Ensemble.load(package_dir or bundled_gate_dir(), providers=["CPUExecutionProvider"],
                                 threads=threads))

    @property
    def manifest(self) -> ModelManifest:
        return self.ensemble.manifest

    def scores(self, image: np.ndarray) -> dict[str, float]:
        """The gate's probability per label for one decoded image."""
        inputs, _ = self.ensemble.inputs(image)
        probabilities = self.ensemble.predict({size: x[None] for size, x in inputs.items()}).probabilities[0]
        return {label: float(p) for label, p in zip(self.manifest.labels, probabilities, strict=True)}

    def check(self, image: np.ndarray) -> GateVerdict:
        """The content check, then the view classifier: may the clinical model score ``image``?"""
        problem = content_problem(image)
        if problem:
            return GateVerdict(analysable=False, reason=problem)
        scores = self.scores(image)
        p = scores[FRONTAL]
        if p >= self.threshold:
            return GateVerdict(analysable=True, scores=scores)
        likely = "a lateral view" if scores[LATERAL] >= scores[OTHER] else "not a chest radiograph"
        return GateVerdict(
            analysable=False,
            reason=f"image is not a frontal chest radiograph (p = {p:.2f}; most likely {likely})",
            scores=scores,
        )
