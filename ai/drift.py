"""Drift step: how far a site's scores of one label are from the scores the package was validated on.

The reference is the package's ``reference`` (``ai.manifest.ScoreReference``: quantiles of the OOF ensemble
scores of the training cohort, of all images and of the positives and negatives apart, with the cohort's
prevalence). A site's scores differ from it for two reasons: a different **prevalence** (more or fewer sick
patients: the mixture of the positive and negative score distributions changes, each stays the same) and
**drift proper** (another scanner, exposure, positioning or population: the distributions themselves move).
Only the second means the model reads the site differently; the first is expected.

So the statistic is prevalence-adjusted: the Kolmogorov-Smirnov distance between the site's empirical score
distribution and the reference mixture ``pi F_pos + (1 - pi) F_neg`` at the ``pi`` that fits best
(:func:`drift`; best by the Cramer-von Mises distance, which uses the whole distribution and so estimates
``pi`` with less noise than the KS supremum). What a prevalence change explains costs nothing; what remains
is drift. The plain distance to the reference's own mixture (its training prevalence) is reported beside
it. An alert needs both a distance above the configured level and above the 99 % two-sample KS critical
value for the numbers of images, so a small week does not alert on noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ai.manifest import QUANTILE_POINTS, ScoreReference

#: The prevalences tried when fitting the mixture (step 0.005).
PREVALENCE_GRID = np.linspace(0.0, 1.0, 201)
#: Order statistics the prevalence fit uses at most.
CVM_POINTS = 5000
#: Two-sample Kolmogorov-Smirnov coefficient c(alpha) for alpha = 0.01.
KS_C_ALPHA_01 = 1.628
_LEVELS = np.linspace(0.0, 1.0, QUANTILE_POINTS)


@dataclass(frozen=True)
class Drift:
    """The drift of one site's scores of one label against the package's reference.

    Attributes:
        n: scores compared.
        statistic: the prevalence-adjusted KS distance (0 = the reference's distributions at some prevalence).
        prevalence: the prevalence of that best-fitting mixture (an estimate of the site's, if nothing drifted).
        unadjusted: the KS distance to the reference at its own training prevalence.
        critical: the 99 % two-sample KS critical value for ``n`` against the reference's ``n``.
        alert: ``statistic`` above both the configured level and ``critical``.
    """

    n: int
    statistic: float
    prevalence: float
    unadjusted: float
    critical: float
    alert: bool

    def to_dict(self) -> dict[str, float | int | bool]:
        return {"n": self.n, "statistic": round(self.statistic, 4), "prevalence": round(self.prevalence, 3),
                "unadjusted": round(self.unadjusted, 4), "critical": round(self.critical, 4), "alert": self.alert}


def reference_cdf(quantiles: tuple[float, ...] | np.ndarray, x: np.ndarray) -> np.ndarray:
    """The CDF at ``x`` of a distribution given by its ``QUANTILE_POINTS`` quantiles (linear between them)."""
    q = np.asarray(quantiles, dtype=np.float64)
    # np.interp needs increasing x-coordinates: a flat stretch (tied quantiles) jumps to its last level
    keep = np.append(np.diff(q) > 0, True)
    return np.interp(x, q[keep], _LEVELS[keep], left=0.0, right=1.0)


def ks_critical(n: int, n_reference: int) -> float:
    """The 99 % critical value of the two-sample KS statistic for samples of ``n`` and ``n_reference``."""
    return KS_C_ALPHA_01 * math.sqrt(1.0 / max(n, 1) + 1.0 / max(n_reference, 1))


def drift(scores: np.ndarray, reference: ScoreReference, level: float) -> Drift:
    """The prevalence-adjusted drift of ``scores`` (probabilities of one label) from ``reference``.

    Raises:
        ValueError: no scores, or a score outside [0, 1].
    """
    s = np.sort(np.asarray(scores, dtype=np.float64))
    if s.size == 0 or not np.all((s >= 0.0) & (s <= 1.0)):
        raise ValueError(f"scores must be a non-empty set of probabilities in [0, 1], got {s.size} values")
    n = s.size
    # the empirical CDF just after and just before each score: the KS supremum is reached at one of them
    after = np.arange(1, n + 1) / n
    before = np.arange(0, n) / n
    grid = np.concatenate([s, np.asarray(reference.quantiles, dtype=np.float64)])
    site_at_grid = np.searchsorted(s, grid, side="right") / n
    pos_s, neg_s = reference_cdf(reference.quantiles_positive, s), reference_cdf(reference.quantiles_negative, s)
    pos_g, neg_g = (reference_cdf(reference.quantiles_positive, grid),
                    reference_cdf(reference.quantiles_negative, grid))

    def distance(pi: float) -> float:
        model_s = pi * pos_s + (1.0 - pi) * neg_s
        model_g = pi * pos_g + (1.0 - pi) * neg_g
        return float(max(np.max(np.abs(after - model_s)), np.max(np.abs(before - model_s)),
                         np.max(np.abs(site_at_grid - model_g))))

    # Cramer-von Mises: sum over the scores of (model CDF - empirical CDF at the midpoint)^2, for every pi at once
    # (on at most CVM_POINTS evenly spaced order statistics: the same fit, bounded memory for a busy site)
    pick = np.unique(np.linspace(0, n - 1, min(n, CVM_POINTS)).round().astype(int))
    mid = (pick + 0.5) / n
    models = (PREVALENCE_GRID[:, None] * pos_s[None, pick]
              + (1.0 - PREVALENCE_GRID[:, None]) * neg_s[None, pick])
    best = int(np.argmin(np.sum((models - mid[None, :]) ** 2, axis=1)))
    prevalence = float(PREVALENCE_GRID[best])
    critical = ks_critical(n, reference.n)
    statistic = distance(prevalence)
    return Drift(n=n, statistic=statistic, prevalence=prevalence,
                 unadjusted=distance(reference.prevalence), critical=critical,
                 alert=statistic > max(level, critical))
