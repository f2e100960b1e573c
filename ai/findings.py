"""Finding contract: what the model runtime hands to the node for one label of one image."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Finding:
    """One label's result for one image.

    Attributes:
        label: canonical label name, e.g. ``Tuberculosis``.
        probability: ensemble mean probability in [0, 1].
        threshold: the effective operating threshold (package value or site override).
        positive: ``probability >= threshold``.
        threshold_method: how the threshold was chosen, e.g. ``Youden J on OOF`` or ``site override``.
        heatmap: class activation map on the model's input grid (size x size, float32 in [0, 1]),
            or None when the model provides none.
        not_applicable: why the label does not apply to this patient (``ai.applicability``: a label limited to
            an age range, a patient outside it or of unknown age), or "" when it applies. A label
            that does not apply is never positive, and the SR states the reason instead of a score.
        informational: the package reports this label with its decision but does not let it set the triage flag
            (the manifest's ``informational``): a finding whose specificity at its operating point is too low
            to sort studies. The triage flag is positive when a finding that is not informational is.
    """

    label: str
    probability: float
    threshold: float
    positive: bool
    threshold_method: str
    heatmap: np.ndarray | None = None
    not_applicable: str = ""
    informational: bool = False

    @property
    def flags(self) -> bool:
        """Whether this finding sets the image's triage flag: positive and not informational."""
        return self.positive and not self.informational
