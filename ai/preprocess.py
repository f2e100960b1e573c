"""Preprocess step: float image -> detected X-ray field -> letterbox -> CLAHE -> model input.

The one preprocessing shared by training (``training/`` caches the output of ``preprocess_gray``)
and serving (``node/worker.py``), so both see identical pixels. Pure and deterministic: no state,
no randomness; its parameters travel in the model manifest as ``preprocess``.

Pipeline:

1. ``detect_field`` finds the exposed field on a thumbnail (longest side ``THUMB_SIDE``) in two
   passes: (1) strip uniform lines from each side (black or white collimation bands, padding,
   frames; a line is uniform when ``UNIFORM_FRACTION`` of it lies within ``UNIFORM_TOL`` of its
   median, so burned-in text in a band does not stop the strip); (2) on what is left, threshold
   border-like pixels robustly (within ``EXTREME_TOL`` of the 1st / 99th percentile of the field, and
   flat: the local range in a 3x3 window is small) and strip edge rows/columns in which most pixels
   are border-like (tilted or textured bands). A field under ``MIN_FIELD_FRACTION`` of the image
   is implausible: the whole image is used instead.
2. The field is scaled, aspect preserved, to fit ``spec.size`` (``INTER_AREA`` when shrinking,
   ``INTER_LINEAR`` when enlarging) and stretched to the full 8-bit range (min-max of the scaled
   field: 12-bit data stored in 16-bit PNG keeps its grey levels).
3. CLAHE (``spec.clahe_clip``, ``spec.clahe_tile`` x ``spec.clahe_tile``) runs on the field only, which
   is then pasted centred on a zero canvas: the padding stays exactly 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import cv2
import numpy as np

from ai.errors import UnsupportedImage

THUMB_SIDE = 256
UNIFORM_TOL = 0.04
UNIFORM_FRACTION = 0.9
EXTREME_TOL = 0.05
FLAT_RANGE = 0.03
BORDER_LINE_FRACTION = 0.8
MIN_FIELD_FRACTION = 0.25
MIN_SIDE = 8

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class PreprocessSpec:
    """Preprocessing parameters; stored in the model manifest under ``preprocess``.

    Attributes:
        size: side of the square model input in pixels.
        clahe_clip: CLAHE clip limit.
        clahe_tile: CLAHE tiles per side.
        channels: channels of the model input (the gray image replicated).
        field_detection: crop to the detected X-ray field before the letterbox.
    """

    size: int = 512
    clahe_clip: float = 2.0
    clahe_tile: int = 8
    channels: int = 3
    field_detection: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or self.size < MIN_SIDE:
            raise ValueError(f"PreprocessSpec.size must be an int >= {MIN_SIDE}, got {self.size!r}")
        if not isinstance(self.clahe_tile, int) or self.clahe_tile < 1:
            raise ValueError(f"PreprocessSpec.clahe_tile must be an int >= 1, got {self.clahe_tile!r}")
        if not self.clahe_clip > 0:
            raise ValueError(f"PreprocessSpec.clahe_clip must be > 0, got {self.clahe_clip!r}")
        if not isinstance(self.channels, int) or self.channels < 1:
            raise ValueError(f"PreprocessSpec.channels must be an int >= 1, got {self.channels!r}")

    def to_dict(self) -> dict[str, Any]:
        """The spec as plain JSON values."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreprocessSpec:
        """Build a spec from ``to_dict`` output.

        Raises:
            ValueError: an unknown key or an invalid value, named in the message.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown preprocess keys {unknown}; expected a subset of {sorted(known)}")
        return cls(**data)


@dataclass(frozen=True)
class Letterbox:
    """Where the model input came from: the source field and how it was scaled and padded.

    Attributes:
        field: (y0, y1, x0, x1) of the X-ray field in source pixels, end exclusive.
        scale: output pixels per source pixel.
        offset: (top, left) padding in output pixels.
        size: side of the square output.
        source_shape: (rows, columns) of the source image.
    """

    field: tuple[int, int, int, int]
    scale: float
    offset: tuple[int, int]
    size: int
    source_shape: tuple[int, int]

    @property
    def content_shape(self) -> tuple[int, int]:
        """(rows, columns) of the scaled field inside the output."""
        y0, y1, x0, x1 = self.field
        return _scaled_shape(y1 - y0, x1 - x0, self.scale, self.size)

    def to_source(self, heatmap: np.ndarray) -> np.ndarray:
        """Map a size x size map on the model input back onto the source image.

        Args:
            heatmap: 2-D (size, size) array, e.g. a class activation map.

        Returns:
            float32 array of ``source_shape``: the map resized onto the field, zeros outside it.
        """
        heatmap = np.asarray(heatmap, dtype=np.float32)
        if heatmap.shape != (self.size, self.size):
            raise ValueError(f"heatmap must have shape {(self.size, self.size)}, got {heatmap.shape}")
        top, left = self.offset
        rows, cols = self.content_shape
        y0, y1, x0, x1 = self.field
        inner = np.ascontiguousarray(heatmap[top : top + rows, left : left + cols])
        out = np.zeros(self.source_shape, dtype=np.float32)
        out[y0:y1, x0:x1] = cv2.resize(inner, (x1 - x0, y1 - y0), interpolation=cv2.INTER_LINEAR)
        return out


def _scaled_shape(rows: int, cols: int, scale: float, size: int) -> tuple[int, int]:
    return (min(size, max(1, round(rows * scale))), min(size, max(1, round(cols * scale))))


def _as_float_image(image: np.ndarray) -> np.ndarray:
    """Validate a 2-D gray image; float32 in [0, 1] (uint8/uint16 scaled by their maximum)."""
    arr = np.asarray(image)
    if arr.ndim != 2 or min(arr.shape) < MIN_SIDE:
        raise UnsupportedImage(f"expected a 2-D gray image of at least {MIN_SIDE} px a side, got {arr.shape}")
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / np.float32(255.0)
    if arr.dtype == np.uint16:
        return arr.astype(np.float32) / np.float32(65535.0)
    arr = arr.astype(np.float32, copy=False)
    if not np.isfinite(arr).all():
        raise UnsupportedImage("image contains NaN or infinite values")
    return np.clip(arr, 0.0, 1.0)


def detect_field(image: np.ndarray) -> tuple[int, int, int, int]:
    """Find the exposed X-ray field: strip uniform bands, then refine by border-pixel profiles.

    Args:
        image: 2-D gray image, float in [0, 1] (uint8/uint16 accepted).

    Returns:
        (y0, y1, x0, x1) in source pixels, end exclusive; the whole image when the field found is
        smaller than ``MIN_FIELD_FRACTION`` of it.
    """
    return _detect_field(_as_float_image(image))


def _detect_field(img: np.ndarray) -> Box:
    """``detect_field`` on a validated float32 image."""
    rows, cols = img.shape
    factor = min(1.0, THUMB_SIDE / max(rows, cols))
    th, tw = max(MIN_SIDE, round(rows * factor)), max(MIN_SIDE, round(cols * factor))
    thumb = cv2.resize(img, (tw, th), interpolation=cv2.INTER_AREA) if factor < 1.0 else img
    box = _strip_uniform_lines(thumb, (0, th, 0, tw))
    box = _strip_border_lines(thumb, box)
    y0, y1, x0, x1 = box
    if (y1 - y0) * (x1 - x0) < MIN_FIELD_FRACTION * th * tw:
        return (0, rows, 0, cols)
    sy, sx = rows / th, cols / tw
    return (
        max(0, math.floor(y0 * sy)),
        min(rows, math.ceil(y1 * sy)),
        max(0, math.floor(x0 * sx)),
        min(cols, math.ceil(x1 * sx)),
    )


def _leading_run(flags: np.ndarray) -> int:
    """Number of leading True values."""
    false = np.flatnonzero(~flags)
    return int(false[0]) if false.size else int(flags.size)


def _trim(box: Box, row_flags: np.ndarray, col_flags: np.ndarray) -> Box:
    """Shrink the box by the leading/trailing runs of flagged rows and columns (always keeps 1 line)."""
    y0, y1, x0, x1 = box
    top, bottom = _leading_run(row_flags), _leading_run(row_flags[::-1])
    left, right = _leading_run(col_flags), _leading_run(col_flags[::-1])
    ny0, ny1 = (y0 + top, y1 - bottom) if top + bottom < y1 - y0 else (y0, y0 + 1)
    nx0, nx1 = (x0 + left, x1 - right) if left + right < x1 - x0 else (x0, x0 + 1)
    return (ny0, ny1, nx0, nx1)


def _uniform_lines(block: np.ndarray, axis: int) -> np.ndarray:
    """True for each line (along ``axis``) whose pixels mostly lie near the line's median."""
    median = np.median(block, axis=axis, keepdims=True)
    near = np.abs(block - median) <= UNIFORM_TOL
    return np.asarray(near.mean(axis=axis) >= UNIFORM_FRACTION)


def _strip_uniform_lines(thumb: np.ndarray, box: Box, rounds: int = 4) -> Box:
    """Pass 1: remove uniform bands (any grey level) from the four sides, until stable."""
    for _ in range(rounds):
        y0, y1, x0, x1 = box
        block = thumb[y0:y1, x0:x1]
        new = _trim(box, _uniform_lines(block, axis=1), _uniform_lines(block, axis=0))
        if new == box:
            break
        box = new
    return box


def _strip_border_lines(thumb: np.ndarray, box: Box, rounds: int = 3) -> Box:
    """Pass 2: remove edge lines in which most pixels are flat and near the darkest/brightest level."""
    y0, y1, x0, x1 = box
    if y1 - y0 < 3 or x1 - x0 < 3:
        return box
    block = thumb[y0:y1, x0:x1]
    lo, hi = (float(v) for v in np.percentile(block, (1.0, 99.0)))
    kernel = np.ones((3, 3), np.uint8)
    flat = (cv2.dilate(thumb, kernel) - cv2.erode(thumb, kernel)) <= FLAT_RANGE
    border = flat & ((thumb <= lo + EXTREME_TOL) | (thumb >= hi - EXTREME_TOL))
    for _ in range(rounds):
        y0, y1, x0, x1 = box
        part = border[y0:y1, x0:x1]
        row_flags = part.mean(axis=1) >= BORDER_LINE_FRACTION
        col_flags = part.mean(axis=0) >= BORDER_LINE_FRACTION
        new = _trim(box, row_flags, col_flags)
        if new == box:
            break
        box = new
    return box


def preprocess_gray(image: np.ndarray, spec: PreprocessSpec) -> tuple[np.ndarray, Letterbox]:
    """Field crop, aspect-preserving letterbox (padding 0) and CLAHE: what the training cache stores.

    Args:
        image: 2-D gray image, float in [0, 1] (``ai.pixels`` output; uint8/uint16 accepted).
        spec: preprocessing parameters.

    Returns:
        (uint8 array (size, size), the Letterbox that maps results back to the source).
    """
    img = _as_float_image(image)
    return _letterbox_gray(img, _field(img, spec), spec)


def preprocess_sizes(image: np.ndarray, spec: PreprocessSpec,
                     sizes: Sequence[int]) -> dict[int, tuple[np.ndarray, Letterbox]]:
    """``preprocess_gray`` at each of ``sizes`` (``spec`` with its ``size`` replaced), the field detected once: the
    inputs of a package whose members take images of several sizes (``ai.manifest.Member.size``).

    Returns:
        {size: (uint8 array (size, size), its Letterbox)}, in the order of ``sizes``.
    """
    img = _as_float_image(image)
    field = _field(img, spec)
    return {size: _letterbox_gray(img, field, replace(spec, size=size)) for size in dict.fromkeys(sizes)}


def _field(img: np.ndarray, spec: PreprocessSpec) -> Box:
    rows, cols = img.shape
    return _detect_field(img) if spec.field_detection else (0, rows, 0, cols)


def _letterbox_gray(img: np.ndarray, field: Box, spec: PreprocessSpec) -> tuple[np.ndarray, Letterbox]:
    rows, cols = img.shape
    y0, y1, x0, x1 = field
    scale = spec.size / max(y1 - y0, x1 - x0)
    out_rows, out_cols = _scaled_shape(y1 - y0, x1 - x0, scale, spec.size)
    interp = cv2.INTER_AREA if scale < 1.0 else cv2.INTER_LINEAR
    content = cv2.resize(img[y0:y1, x0:x1], (out_cols, out_rows), interpolation=interp)
    content_u8 = _stretch_to_u8(content)
    clahe = cv2.createCLAHE(clipLimit=float(spec.clahe_clip), tileGridSize=(spec.clahe_tile, spec.clahe_tile))
    content_u8 = clahe.apply(content_u8)
    top, left = (spec.size - out_rows) // 2, (spec.size - out_cols) // 2
    canvas = np.zeros((spec.size, spec.size), dtype=np.uint8)
    canvas[top : top + out_rows, left : left + out_cols] = content_u8
    box = Letterbox(field=field, scale=scale, offset=(top, left), size=spec.size, source_shape=(rows, cols))
    return canvas, box


def _stretch_to_u8(content: np.ndarray) -> np.ndarray:
    """Min-max stretch of the scaled field onto 0..255 (a flat field stays as it is)."""
    lo, hi = float(content.min()), float(content.max())
    if hi - lo > 1e-6:
        return cv2.convertScaleAbs(content, alpha=255.0 / (hi - lo), beta=-255.0 * lo / (hi - lo))
    return cv2.convertScaleAbs(content, alpha=255.0)


def to_model_input(gray_u8: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """uint8 (size, size) -> float32 (channels, size, size) in [0, 1]; normalisation is in the graph.

    Raises:
        ValueError: the array is not uint8 of shape (size, size).
    """
    arr = np.asarray(gray_u8)
    if arr.dtype != np.uint8 or arr.shape != (spec.size, spec.size):
        raise ValueError(
            f"to_model_input expects uint8 of shape {(spec.size, spec.size)}, got {arr.dtype} {arr.shape}"
        )
    plane = arr.astype(np.float32) * np.float32(1.0 / 255.0)
    return np.ascontiguousarray(np.broadcast_to(plane, (spec.channels, spec.size, spec.size)))


def preprocess(image: np.ndarray, spec: PreprocessSpec) -> tuple[np.ndarray, Letterbox]:
    """``preprocess_gray`` then ``to_model_input``: float32 (channels, size, size) and its Letterbox."""
    gray, box = preprocess_gray(image, spec)
    return to_model_input(gray, spec), box
