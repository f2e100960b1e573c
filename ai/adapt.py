"""Site adaptation step: a label-free threshold for one site and label, from the site's own scores.

Method: unsupervised prediction alignment (Roschewitz et al., Nature Communications 2023), with the
prevalence made explicit. The package's threshold ``t`` was chosen on the reference (``ScoreReference``: the
OOF scores of the training cohort, positives and negatives apart). At a site whose prevalence is ``pi``, a model
that reads the site as it read the reference would flag the share ``1 - G_pi(t)`` of its images, where
``G_pi = pi F_pos + (1 - pi) F_neg``. If the site's scores have moved (another scanner, exposure, positioning),
it flags another share. The aligned threshold is the site's own score quantile at ``G_pi(t)``: it flags the
share the reference would. When the move is the same monotone change for sick and healthy patients (what an
acquisition change does), this restores the package's sensitivity and specificity exactly, whatever the
prevalence, without a single label.

What it assumes, stated with every suggestion:
- **the site's prevalence**. An administrator states it per site and label (``[site_prevalence]``); otherwise
  it is estimated from the scores as the best-fitting mixture (``ai.drift``), which is right when the scores
  did not move and biased when they did (a site whose sick patients score lower looks like one with fewer
  sick patients). A stated prevalence is the better basis; the suggestion says which it used.
- **a move common to both classes**. A change of case mix that moves only the sick patients' scores (milder
  disease) is not what alignment corrects; only labels show it (``cxr-train site-threshold`` with labels).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ai.drift import drift, reference_cdf
from ai.manifest import ScoreReference

METHOD = "prediction alignment"


@dataclass(frozen=True)
class Suggestion:
    """A label-free site threshold and what it rests on.

    Attributes:
        threshold: the suggested threshold on the site's raw scores.
        method: how it was chosen, in words (stored with the threshold and stated in the SR once accepted).
        prevalence: the site prevalence it assumed.
        prevalence_source: ``stated`` (by an administrator) or ``estimated`` (from the scores).
        images: the site scores it used.
        flagged_share: the share of the site's images it flags (= the reference mixture's at ``prevalence``).
    """

    threshold: float
    method: str
    prevalence: float
    prevalence_source: str
    images: int
    flagged_share: float

    def to_dict(self) -> dict[str, float | int | str]:
        return {"threshold": round(self.threshold, 6), "method": self.method, "prevalence": round(self.prevalence, 4),
                "prevalence_source": self.prevalence_source, "images": self.images,
                "flagged_share": round(self.flagged_share, 4)}


def aligned_threshold(scores: np.ndarray, reference: ScoreReference, threshold: float, prevalence: float) -> float:
    """The site threshold that flags the share of ``scores`` the reference mixture at ``prevalence`` flags at
    ``threshold``.

    Raises:
        ValueError: no scores, or a prevalence outside [0, 1].
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.size == 0 or not 0.0 <= prevalence <= 1.0:
        raise ValueError(f"need scores and a prevalence in [0, 1], got {s.size} scores and {prevalence}")
    t = np.array([threshold])
    below = float(prevalence * reference_cdf(reference.quantiles_positive, t)[0]
                  + (1.0 - prevalence) * reference_cdf(reference.quantiles_negative, t)[0])
    return float(np.quantile(s, min(max(below, 0.0), 1.0)))


def suggest(scores: np.ndarray, reference: ScoreReference, threshold: float, prevalence: float | None = None,
            level: float = 0.1) -> Suggestion:
    """The aligned threshold of a site's ``scores`` (see the module docstring); ``prevalence`` None: estimated."""
    s = np.asarray(scores, dtype=np.float64)
    source = "stated"
    if prevalence is None:
        prevalence, source = drift(s, reference, level).prevalence, "estimated"
    value = aligned_threshold(s, reference, threshold, prevalence)
    method = (f"{METHOD} to the package's reference at prevalence {prevalence:.3g} ({source}), "
              f"{s.size} site images, package threshold {threshold:.4g}")
    return Suggestion(value, method, prevalence, source, int(s.size), float(np.mean(s >= value)))
