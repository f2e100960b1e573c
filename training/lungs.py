"""Lung regions in model-input geometry, and the training step that hides everything else.

A lung mask (the cohort CSV's ``lung_mask`` column, drawn on the source image) is carried through the image's own
preprocessing geometry (the field crop and letterbox of :func:`ai.preprocess.preprocess_gray`, nearest neighbour)
into a region map on the ``size x size`` model input: ``PADDING`` (the letterbox, 0 in every input), ``FIELD`` (the
X-ray field outside the lungs) and ``LUNGS``.

:class:`OutsideLungs` (``augment.outside_lungs_p``) replaces, in a training sample, the field outside the grown
lungs by the median grey of that region: the burned-in markers, devices, collimation edges, shoulders and abdomen
that a model can learn a site or a source by are gone from the sample, the lungs and the letterbox are untouched.
It asks the model to find the finding inside the lungs as well, the complement of the lung-blackout audit
(:func:`training.shortcuts.lung_blackout`), which measures how much of its signal lies outside them. Serving is
unchanged: the node's preprocessing is the same for every run.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

from ai.preprocess import Letterbox

PADDING, FIELD, LUNGS = 0, 1, 2
OUTSIDE_LUNGS_STREAM = 1  # the step's generator: sample_rng's key with this appended (training.data.CxrDataset)


def resize_nearest(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a 2-D mask (pixel centres mapped, no interpolation)."""
    mask = np.asarray(mask)
    rows = np.minimum(((np.arange(shape[0]) + 0.5) * mask.shape[0] / shape[0]).astype(int), mask.shape[0] - 1)
    cols = np.minimum(((np.arange(shape[1]) + 0.5) * mask.shape[1] / shape[1]).astype(int), mask.shape[1] - 1)
    return mask[np.ix_(rows, cols)]


def lung_pixels(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The lung pixels (``mask > 0``; an RGB mask reduced to its maximum channel) of a lung mask of any size, on an
    image of ``shape`` (nearest neighbour): how both the lung-blackout audit and the lung regions read a mask."""
    mask = np.asarray(mask)
    mask = mask.max(axis=2) if mask.ndim == 3 else mask
    if mask.ndim != 2:
        raise ValueError(f"expected a 2-D lung mask, got shape {mask.shape}")
    return resize_nearest(mask, shape) > 0


def regions_on_input(mask: np.ndarray, box: Letterbox) -> np.ndarray:
    """The region map (uint8 ``size x size``: PADDING, FIELD, LUNGS) of a source-geometry lung mask.

    Args:
        mask: a lung mask of any size, read by :func:`lung_pixels` onto the source image, as
            :func:`training.shortcuts.lung_blackout` reads it.
        box: the image's letterbox (:func:`ai.preprocess.preprocess_gray`).
    """
    lungs = lung_pixels(mask, box.source_shape).astype(np.uint8)
    y0, y1, x0, x1 = box.field
    out_rows, out_cols = box.content_shape
    content = cv2.resize(np.ascontiguousarray(lungs[y0:y1, x0:x1]), (out_cols, out_rows),
                         interpolation=cv2.INTER_NEAREST)
    top, left = box.offset
    regions = np.full((box.size, box.size), PADDING, dtype=np.uint8)
    regions[top : top + out_rows, left : left + out_cols] = np.where(content > 0, LUNGS, FIELD)
    return regions


def grow_lungs(regions: np.ndarray, margin: float) -> np.ndarray:
    """``regions`` with LUNGS grown by ``margin`` x side pixels (a disc) into FIELD only: never into the padding."""
    radius = round(margin * regions.shape[0])
    if radius <= 0 or not (regions == LUNGS).any():
        return regions
    disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    grown = cv2.dilate((regions == LUNGS).astype(np.uint8), disc) > 0
    return np.where(grown & (regions == FIELD), LUNGS, regions).astype(np.uint8)


class OutsideLungs:
    """The training step of ``augment.outside_lungs_p``: with that probability, FIELD pixels become their median.

    Called with a sample's uint8 image, its region map (already grown, :func:`grow_lungs`) and the step's own
    generator; a map without FIELD or LUNGS pixels (an image without a mask) leaves the image as it is, and so
    does a draw that does not fire. One uniform number is drawn per call, whatever happens.
    """

    def __init__(self, p: float) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"outside_lungs_p: expected a probability in [0, 1], found {p}")
        self.p = p

    def __call__(self, image: np.ndarray, regions: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        fire = rng.random() < self.p
        if image.shape != regions.shape:
            raise ValueError(f"image {image.shape} and lung regions {regions.shape} differ in shape")
        outside = regions == FIELD
        if not fire or not outside.any() or not (regions == LUNGS).any():
            return image
        out = image.copy()
        out[outside] = np.uint8(np.median(image[outside]))
        return out


def describe(regions: np.ndarray) -> dict[str, Any]:
    """Counts for the run's summary: images with a mask, and the mean share of the field that is (grown) lung."""
    has = (regions == LUNGS).any(axis=(1, 2))
    field = (regions != PADDING).sum(axis=(1, 2)).astype(float)
    lungs = (regions == LUNGS).sum(axis=(1, 2)).astype(float)
    share = lungs[has] / np.maximum(field[has], 1.0)
    return {"images_with_lung_mask": int(has.sum()), "images": len(regions),
            "mean_lung_share_of_field": round(float(share.mean()), 4) if has.any() else None}
