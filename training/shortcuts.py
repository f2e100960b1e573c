"""Shortcut audit statistics: the thumbnail floor and the lung-blackout test, each with a plain verdict.

1. **Thumbnail floor.** A 16x16 thumbnail (area averaging) plus intensity statistics of the
   preprocessed image, fed to a standardised logistic regression trained on the *same* folds as the
   real models. It sees no anatomy at useful resolution, so whatever it reaches comes from global
   brightness, contrast, borders, markers, scanner and site: the floor a real model must beat (a
   published one reaches AUROC 0.86 within Shenzhen TB). :func:`floor_report` tests model vs floor with
   DeLong on the same images.
2. **Lung blackout.** Score each image a second time with the lung pixels set to 0 (or to the image's
   background value). A model that reads the lungs falls towards AUROC 0.5; one that still separates
   the classes reads something else. The scoring function is passed in, so any model works.

Both reports are dicts that :func:`training.evaluate.evaluate_cohorts` carries into the report
(``audits=[...]``); ``training.audits`` runs them over a run directory (and re-exports these names).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from training import metrics
from training.delong import DeLongResult, delong_test
from training.lungs import lung_pixels

PERCENTILES = (1, 5, 10, 25, 50, 75, 90, 95, 99)
THUMBNAIL_SIZE = 16
HISTOGRAM_BINS = 16
ScoreFn = Callable[[Sequence[np.ndarray]], Any]


def _area_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) matrix averaging the input pixels each output pixel covers, by overlap."""
    edges = np.linspace(0.0, n_in, n_out + 1)
    pixel = np.arange(n_in)[None, :]
    overlap = np.minimum(edges[1:, None], pixel + 1) - np.maximum(edges[:-1, None], pixel)
    return np.clip(overlap, 0.0, None) / (n_in / n_out)


def area_downsample(image: np.ndarray, size: int = THUMBNAIL_SIZE) -> np.ndarray:
    """Resize a 2-D image to ``size`` x ``size`` by area averaging (as OpenCV's INTER_AREA).

    Returns:
        float64 array, same intensity scale as the input.
    """
    image = np.asarray(image, dtype=float)
    if image.ndim != 2:
        raise ValueError(f"expected a 2-D grey image, got shape {image.shape}")
    return _area_weights(image.shape[0], size) @ image @ _area_weights(image.shape[1], size).T


def intensity_statistics(image_u8: np.ndarray) -> np.ndarray:
    """Global intensity statistics of a uint8 image on the [0, 1] scale, from its 256-level histogram.

    Exact and sort-free: mean, standard deviation, percentiles (``PERCENTILES``, numpy's linear
    method), skewness and excess kurtosis (scipy's biased defaults; 0 for a constant image), and a
    ``HISTOGRAM_BINS``-bin histogram over [0, 1] as fractions.

    Raises:
        ValueError: The image is not uint8.
    """
    image = np.asarray(image_u8)
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got dtype {image.dtype}")
    counts = np.bincount(image.ravel(), minlength=256).astype(float)
    n = counts.sum()
    levels = np.arange(256) / 255.0
    mean = counts @ levels / n
    m2, m3, m4 = (counts @ (levels - mean) ** k / n for k in (2, 3, 4))
    moments = [m3 / m2**1.5, m4 / m2**2 - 3.0] if m2 > 1e-18 else [0.0, 0.0]
    cdf = np.cumsum(counts)
    pos = np.asarray(PERCENTILES) / 100 * (n - 1)
    low = np.floor(pos)
    v_low = np.searchsorted(cdf, low, side="right")  # order statistic k = first level with cdf > k
    v_high = np.searchsorted(cdf, np.minimum(low + 1, n - 1), side="right")
    percentiles = (v_low + (pos - low) * (v_high - v_low)) / 255.0
    histogram = counts.reshape(HISTOGRAM_BINS, -1).sum(axis=1) / n
    return np.concatenate([[mean, np.sqrt(m2)], percentiles, moments, histogram])


def thumbnail_features(image_u8: np.ndarray, size: int = THUMBNAIL_SIZE) -> np.ndarray:
    """Thumbnail + intensity statistics of one grey uint8 image, all on the [0, 1] scale.

    Features: ``size * size`` thumbnail pixels (area averaging), then :func:`intensity_statistics`.
    """
    return np.concatenate([
        area_downsample(np.asarray(image_u8, dtype=float) / 255.0, size).ravel(),
        intensity_statistics(image_u8),
    ])


def feature_matrix(images_u8: Sequence[np.ndarray] | np.ndarray, size: int = THUMBNAIL_SIZE) -> np.ndarray:
    """:func:`thumbnail_features` of every image, one row each."""
    return np.vstack([thumbnail_features(image, size) for image in images_u8])


def _model(C: float) -> Pipeline:
    return make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=5000))


@dataclass
class ThumbnailBaseline:
    """The fitted floor model and its out-of-fold scores.

    Attributes:
        oof_scores: Probability per training image from the fold model that did not see it.
        model: Standardised logistic regression fitted on every labelled image (for external cohorts).
        size: Thumbnail size.
    """

    oof_scores: np.ndarray
    model: Pipeline
    size: int = THUMBNAIL_SIZE

    def score(self, images_u8: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
        """Probabilities for new images (an external cohort), preprocessed as the training images."""
        return self.model.predict_proba(feature_matrix(images_u8, self.size))[:, 1]


def thumbnail_baseline(
    images_u8: Sequence[np.ndarray] | np.ndarray,
    y: Any,
    folds: Any,
    C: float = 0.1,
    size: int = THUMBNAIL_SIZE,
) -> ThumbnailBaseline:
    """Train the thumbnail + intensity-statistics floor on the same folds as the real models.

    Args:
        images_u8: Preprocessed grey uint8 images (the training cache's pixels).
        y: One label per image: 1, 0 or NaN (unknown: not trained on, still scored).
        folds: Fold id per image (the real models' split); each fold is scored by a model trained on
            the labelled images of the other folds.
        C: Inverse L2 regularisation strength of the logistic regression.
        size: Thumbnail size.

    Raises:
        ValueError: Length mismatch, fewer than two folds, or a training part with one class only.
    """
    X = feature_matrix(images_u8, size)
    y = np.asarray(y, dtype=float).ravel()
    folds = np.asarray(folds).ravel()
    if not X.shape[0] == y.size == folds.size:
        raise ValueError(f"images, labels and folds differ in length: {X.shape[0]}, {y.size}, {folds.size}")
    if np.unique(folds).size < 2:
        raise ValueError(f"thumbnail baseline needs at least 2 folds, got {np.unique(folds).tolist()}")
    known = ~np.isnan(y)
    oof = np.full(y.size, np.nan)
    for fold in np.unique(folds):
        test = folds == fold
        train = known & ~test
        if np.unique(y[train]).size < 2:
            raise ValueError(f"fold {fold!r}: the other folds hold one class only, cannot train the floor")
        oof[test] = _model(C).fit(X[train], y[train]).predict_proba(X[test])[:, 1]
    return ThumbnailBaseline(oof_scores=oof, model=_model(C).fit(X[known], y[known]), size=size)


def _p_text(p: float) -> str:
    return "p<0.001" if p < 0.001 else f"p={p:.3f}"


def _paired_aurocs(
    y: Any, a: Any, b: Any, groups: Any, n_boot: int, seed: int
) -> tuple[np.ndarray, metrics.Interval, metrics.Interval, DeLongResult]:
    """Two scores on the same images (known label, both scores present): the labels kept, each
    score's AUROC with its patient-bootstrap CI, and the paired DeLong test of ``a`` against ``b``."""
    y, a, b = (np.asarray(v, dtype=float).ravel() for v in (y, a, b))
    if not y.size == a.size == b.size:
        raise ValueError(f"labels and the two scores differ in length: {y.size}, {a.size}, {b.size}")
    g = np.arange(y.size) if groups is None else np.asarray(groups).ravel()
    keep = ~(np.isnan(y) | np.isnan(a) | np.isnan(b))
    y, a, b, g = y[keep], a[keep], b[keep], g[keep]
    ci_a = metrics.bootstrap_ci(metrics.auroc, y, a, g, n=n_boot, seed=seed)
    ci_b = metrics.bootstrap_ci(metrics.auroc, y, b, g, n=n_boot, seed=seed)
    return y, ci_a, ci_b, delong_test(y, a, b)


def floor_report(
    y: Any, model_scores: Any, floor_scores: Any, groups: Any = None, cohort: str = "", label: str = "",
    n_boot: int = 2000, seed: int = 0, alpha: float = 0.05,
) -> dict[str, Any]:
    """Model vs thumbnail floor on the same images: AUROCs with bootstrap CIs, DeLong test, verdict.

    Args:
        y: Labels 1/0/NaN.
        model_scores: The real model's scores (e.g. the OOF ensemble).
        floor_scores: The thumbnail baseline's scores on the same images (same folds for OOF).
        groups: Patient id per image, for the bootstrap.
        cohort: Cohort name, for the report.
        label: Label name, for the report.
        n_boot: Bootstrap resamples.
        seed: Bootstrap seed.
        alpha: Significance level of the verdict.
    """
    y, model_ci, floor_ci, test = _paired_aurocs(y, model_scores, floor_scores, groups, n_boot, seed)
    if test.p_value < alpha and test.difference > 0:
        outcome = "above the floor"
    elif test.p_value < alpha:
        outcome = "BELOW the floor: image statistics alone do better than the model"
    else:
        outcome = "not distinguishable from the floor: no evidence the model uses more than image statistics"
    verdict = (f"model AUROC {test.auc1:.3f} vs thumbnail floor {test.auc2:.3f}: "
               f"DeLong {_p_text(test.p_value)}, {outcome}")
    return {
        "kind": "thumbnail_floor", "cohort": cohort, "label": label, "n": int(y.size), "n_pos": int(y.sum()),
        "model_auroc": model_ci.to_dict(), "floor_auroc": floor_ci.to_dict(), "delong": test.to_dict(),
        "verdict": verdict,
    }


def lung_blackout(image_u8: np.ndarray, mask_u8: np.ndarray, fill: int | str = 0) -> np.ndarray:
    """A copy of ``image_u8`` with the lung pixels (``mask > 0``) set to ``fill``.

    The mask is resized to the image with nearest neighbour; it must outline the lungs in the same
    geometry as the image (blacken the source image, then preprocess, or letterbox the mask alike).

    Args:
        image_u8: 2-D grey image.
        mask_u8: 2-D lung mask (any size; an RGB mask is reduced to its maximum channel).
        fill: A grey value, or ``"background"`` for the median of the pixels outside the lungs.

    Raises:
        ValueError: The image is not 2-D or ``fill`` is not understood.
    """
    image = np.asarray(image_u8)
    if image.ndim != 2:
        raise ValueError(f"expected a 2-D grey image, got shape {image.shape}")
    lungs = lung_pixels(mask_u8, image.shape)
    if fill == "background":
        value = np.median(image[~lungs]) if (~lungs).any() else 0
    elif isinstance(fill, int | np.integer):
        value = fill
    else:
        raise ValueError(f"fill must be a grey value or 'background', got {fill!r}")
    out = image.copy()
    out[lungs] = value
    return out


def blackout_report(
    y: Any, scores_orig: Any, scores_blackout: Any, groups: Any = None, cohort: str = "", label: str = "",
    n_boot: int = 2000, seed: int = 0, alpha: float = 0.05,
) -> dict[str, Any]:
    """AUROC with and without the lungs (bootstrap CIs), the paired DeLong test, and a verdict.

    Args:
        y: Labels 1/0/NaN.
        scores_orig: Scores of the untouched images.
        scores_blackout: Scores of the same images with the lungs blacked out (NaN: no mask).
        groups: Patient id per image, for the bootstrap.
        cohort: Cohort name, for the report.
        label: Label name, for the report.
        n_boot: Bootstrap resamples.
        seed: Bootstrap seed.
        alpha: Significance level of the verdict.
    """
    y, orig, black, test = _paired_aurocs(y, scores_orig, scores_blackout, groups, n_boot, seed)
    if orig.low <= 0.5 <= orig.high:
        outcome = "the model does not separate the classes even with the lungs: the test says nothing"
    elif black.low <= 0.5 <= black.high:
        outcome = "falls to chance: the model reads the lungs"
    elif test.p_value < alpha and test.difference > 0:
        outcome = "falls but stays away from chance: part of the signal lies outside the lungs"
    else:
        outcome = "does not fall: the model reads something other than the lungs (shortcut risk)"
    verdict = (f"AUROC {orig.value:.3f} with the lungs, {black.value:.3f} [{black.low:.3f}, "
               f"{black.high:.3f}] with the lungs blacked out (DeLong {_p_text(test.p_value)}): {outcome}")
    return {
        "kind": "lung_blackout", "cohort": cohort, "label": label, "n": int(y.size), "n_pos": int(y.sum()),
        "auroc_original": orig.to_dict(), "auroc_blackout": black.to_dict(), "delong": test.to_dict(),
        "verdict": verdict,
    }


def blackout_audit(
    score_fn: ScoreFn,
    images_u8: Sequence[np.ndarray],
    masks_u8: Sequence[np.ndarray | None],
    y: Any,
    groups: Any = None,
    fill: int | str = 0,
    cohort: str = "",
    label: str = "",
    n_boot: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """Score the images with and without their lungs and report (:func:`blackout_report`).

    Args:
        score_fn: ``score_fn(list of images) -> one score per image`` for ``label`` (any model).
        images_u8: Grey uint8 images, as ``score_fn`` expects them.
        masks_u8: Lung mask per image in the image's geometry; None where there is none (left out).
        y: Labels 1/0/NaN.
        groups: Patient id per image.
        fill: Passed to :func:`lung_blackout`.
        cohort: Cohort name, for the report.
        label: Label name, for the report.
        n_boot: Bootstrap resamples.
        seed: Bootstrap seed.
    """
    if not len(images_u8) == len(masks_u8) == np.asarray(y).size:
        raise ValueError(f"images, masks and labels differ in length: {len(images_u8)}, {len(masks_u8)}, "
                         f"{np.asarray(y).size}")
    pairs = [(i, image, mask) for i, (image, mask) in enumerate(zip(images_u8, masks_u8, strict=True))
             if mask is not None]
    if not pairs:
        raise ValueError("no image has a lung mask: the blackout audit cannot run")
    have = [i for i, _, _ in pairs]
    kept = [image for _, image, _ in pairs]
    blacked = [lung_blackout(image, mask, fill) for _, image, mask in pairs]
    orig = np.asarray(score_fn(kept), dtype=float).ravel()
    black = np.asarray(score_fn(blacked), dtype=float).ravel()
    g = None if groups is None else np.asarray(groups)[have]
    report = blackout_report(np.asarray(y, dtype=float)[have], orig, black, g, cohort, label, n_boot, seed)
    report["n_without_mask"] = len(masks_u8) - len(have)
    report["fill"] = fill
    return report
