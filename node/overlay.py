"""Overlay rendering: the Secondary Capture's pixels (evidence outlines, result banner, layout); no DICOM.

What a reader sees, at full size and as a PACS thumbnail (128-256 px wide):

- the source image in gray, resampled so that its long side is 768-1024 px (:func:`overlay_scale`);
- for each finding that sets the triage flag (positive, not informational) with a heatmap (the
  :data:`MAX_FINDINGS_DRAWN` most probable), the outline of where its class activation map is strongest, with
  a faint fill (:func:`evidence_region`). Nothing is drawn for a negative or an informational finding, and
  everything outside the outlined regions stays gray;
- a banner on top. Its first line is large enough to read on a thumbnail ("TB: POSITIVE 0.87",
  "TB: negative 0.12", "NOT ANALYSED") and its background says the same in colour (red, dark gray,
  amber); then "AI RESULT - NOT FOR DIAGNOSTIC USE"; then smaller details (probability and threshold,
  the model's name and version, one line per finding when there are several).

Input problems raise :class:`OverlayInputError`; :mod:`node.results` builds the DICOM objects.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import cv2
import numpy as np

from ai.errors import PermanentError
from ai.findings import Finding

#: Long side of the overlay: 1024 is what a PACS viewer shows of a review annotation (a 2048 px overlay
#: is 4x the data for no visible gain); 768 at least so that the burned-in banner stays legible.
MAX_SIDE = 1024
MIN_SIDE = 768

#: The outlined region: where the CAM (logit space) is at least this far from its minimum to its maximum
#: over the image. 0.7 keeps the strongest evidence only: a median of 7 % of the image (90th percentile
#: 18 %) on the bundled TB model's Shenzhen positives, 81 % of it inside the lungs (docs/overlay).
CONTOUR_LEVEL = 0.7
#: At most this many separate regions per finding (the largest by summed evidence).
MAX_REGIONS = 3
#: Regions smaller than this fraction of the image are specks of the upsampled map, not a finding.
MIN_REGION_FRACTION = 0.002
#: At most this many positive findings are outlined (the most probable); the banner lists them all.
MAX_FINDINGS_DRAWN = 3
#: Opacity of the fill inside an outline: the anatomy underneath stays readable.
FILL_ALPHA = 0.18
#: float32 resolution of a sigmoid near 0 and 1: maps are clipped to it before the logit (|logit| <= 16.6).
_EPS = 2.0**-24

# Colours are RGB.
REGION_COLOURS = ((255, 214, 0), (0, 200, 255), (255, 80, 255))
BANNER_STYLES: dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]] = {  # kind -> (background, text)
    "positive": ((176, 16, 16), (255, 255, 255)),
    "negative": ((36, 36, 36), (235, 235, 235)),
    "not_analysed": ((240, 176, 0), (16, 16, 16)),
}
NOT_FOR_DIAGNOSIS = "AI RESULT - NOT FOR DIAGNOSTIC USE"
NOT_ANALYSED_HEADLINE = "NOT ANALYSED"
#: Short names for the headline (the banner's details and the SR keep the canonical label).
SHORT_LABELS = {"Tuberculosis": "TB"}

# Cap heights of the banner's three text sizes, as fractions of the overlay's width: the headline's is
# 5 % (about 10 px on a 192 px wide thumbnail), the second line's 2.4 %, the details' 1.5 %.
_CAP_FRACTIONS = {"headline": 0.05, "line": 0.024, "detail": 0.015}
_FONT = cv2.FONT_HERSHEY_SIMPLEX
_CAP_AT_SCALE_1 = cv2.getTextSize("H", _FONT, 1.0, 1)[0][1]
_BLANK_SIDE = 768
_BLANK_GRAY = 40

BannerKind = Literal["positive", "negative", "not_analysed"]
TextSize = Literal["headline", "line", "detail"]


class OverlayInputError(PermanentError, ValueError):
    """The inputs cannot be drawn: an image or heatmap of the wrong shape or type."""


class ModelIdentity(Protocol):
    """What the banner says of the model package (``node.results.AlgorithmInfo`` has it)."""

    @property
    def name(self) -> str: ...

    @property
    def version(self) -> str: ...


@dataclass(frozen=True)
class BannerText:
    """The banner's content: its kind (the background colour) and its lines, largest first."""

    kind: BannerKind
    lines: tuple[tuple[str, TextSize], ...]


# --- geometry -------------------------------------------------------------------------------------


def overlay_scale(shape: tuple[int, ...]) -> float:
    """Resampling factor of the overlay: long side at most 1024 and at least 768 (banner legibility)."""
    long_side = max(shape[:2])
    if long_side > MAX_SIDE:
        return MAX_SIDE / long_side
    if long_side < MIN_SIDE:
        return MIN_SIDE / long_side
    return 1.0


def resample(array: np.ndarray, scale: float) -> np.ndarray:
    """``array`` resized by ``scale`` (area averaging down, bilinear up)."""
    if scale == 1.0:
        return array
    height, width = array.shape[:2]
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    interpolation = cv2.INTER_AREA if scale < 1.0 else cv2.INTER_LINEAR
    return np.asarray(cv2.resize(array, size, interpolation=interpolation))


def display_gray(image: np.ndarray) -> tuple[np.ndarray, float]:
    """The image to draw on, as 8-bit gray at overlay size, and the resampling factor applied.

    Args:
        image: 2-D float in [0, 1] (0 = black) or uint8; an RGB(A) image (rows, columns, 3 or 4) is
            averaged to gray.
    """
    pixels = np.asarray(image)
    if pixels.ndim == 3 and pixels.shape[2] in (3, 4):
        pixels = pixels[..., :3].astype(np.float32).mean(axis=2) / (255.0 if pixels.dtype == np.uint8 else 1.0)
    elif pixels.dtype == np.uint8:
        pixels = pixels.astype(np.float32) / 255.0
    if pixels.ndim != 2 or min(pixels.shape) < 1 or not np.issubdtype(pixels.dtype, np.number):
        raise OverlayInputError(
            f"image must be a 2-D float array in [0, 1] or uint8, got shape {pixels.shape} ({pixels.dtype})"
        )
    scale = overlay_scale(pixels.shape)
    pixels = resample(pixels.astype(np.float32), scale)  # first: the checks below then run on <= 1024 px
    pixels = np.clip(np.nan_to_num(pixels, nan=0.0), 0.0, 1.0)
    return np.round(pixels * 255).astype(np.uint8), scale


# --- evidence regions -------------------------------------------------------------------------------


def evidence(heatmap: np.ndarray) -> np.ndarray:
    """The map back in logit space (the CAM), scaled min-max to [0, 1] over the pixels it covers.

    ``Finding.heatmap`` is the sigmoid of the CAM; the logit undoes it (up to float32 saturation, about
    +-16.6), so that the level cuts the CAM itself and not the sigmoid's flat top. Pixels of value 0
    (outside the X-ray field, or cleared by the caller) are no evidence and stay 0; a flat map is all 0.
    """
    heat = np.nan_to_num(np.asarray(heatmap, dtype=np.float32), nan=0.0)
    support = heat > 0
    if not support.any():
        return np.zeros(heat.shape, np.float32)
    clipped = np.clip(heat, _EPS, 1.0 - _EPS)
    logit = np.log(clipped) - np.log1p(-clipped)
    lo, hi = float(logit[support].min()), float(logit[support].max())
    if hi - lo < 1e-6:
        return np.zeros(heat.shape, np.float32)
    return np.where(support, (logit - lo) / (hi - lo), 0.0).astype(np.float32)


def evidence_region(scaled_evidence: np.ndarray, level: float = CONTOUR_LEVEL) -> np.ndarray:
    """Boolean mask of the strongest evidence: ``scaled_evidence >= level``, largest regions only.

    Connected regions smaller than :data:`MIN_REGION_FRACTION` of the image are dropped, and of the
    rest the :data:`MAX_REGIONS` with the most summed evidence are kept.
    """
    mask = (scaled_evidence >= level).astype(np.uint8)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    min_area = MIN_REGION_FRACTION * mask.size
    weight = np.bincount(labels.ravel(), weights=scaled_evidence.ravel(), minlength=count)
    kept = [i for i in range(1, count) if stats[i, cv2.CC_STAT_AREA] >= min_area]
    kept = sorted(kept, key=lambda i: -weight[i])[:MAX_REGIONS]
    return np.isin(labels, kept)


def _drawn_findings(findings: Sequence[Finding], heatmaps: Mapping[str, np.ndarray]) -> list[Finding]:
    flagged = [f for f in findings if f.flags and f.label in heatmaps]
    return sorted(flagged, key=lambda f: -f.probability)[:MAX_FINDINGS_DRAWN]


def finding_regions(
    findings: Sequence[Finding], heatmaps_on_source: Mapping[str, np.ndarray], shape: tuple[int, int], scale: float
) -> list[tuple[Finding, np.ndarray]]:
    """(finding, region mask at overlay size) for each flagged finding drawn (positive, not informational);
    negatives and informational findings never are.

    Raises:
        OverlayInputError: a drawn finding's heatmap does not have the source image's shape.
    """
    regions = []
    for finding in _drawn_findings(findings, heatmaps_on_source):
        hmap = np.asarray(heatmaps_on_source[finding.label], dtype=np.float32)
        if hmap.shape != shape:
            raise OverlayInputError(
                f"heatmap of {finding.label!r} must have the source image's shape {shape}, got {hmap.shape}"
            )
        scaled = evidence(resample(hmap, scale))  # at overlay size (<= 1024 px), not the source's
        smooth = cv2.GaussianBlur(scaled, (0, 0), sigmaX=_smoothing(scaled.shape))
        regions.append((finding, evidence_region(np.clip(smooth, 0.0, 1.0))))
    return regions


def _smoothing(shape: tuple[int, ...]) -> float:
    """Gaussian sigma that rounds the corners of a CAM upsampled from a coarse grid (about 1 % of the width)."""
    return max(1.0, shape[1] / 96)


def outline_width(width: int) -> int:
    """Outline thickness in pixels: about 1 px on a 192 px thumbnail."""
    return max(2, round(width / 200))


def draw_region(rgb: np.ndarray, region: np.ndarray, colour: tuple[int, int, int]) -> None:
    """Outline ``region`` in ``colour`` (drawn inside its edge) and tint its inside faintly, in place."""
    if not region.any():
        return
    width = outline_width(rgb.shape[1])
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * width + 1, 2 * width + 1))
    mask = region.astype(np.uint8)
    inner = cv2.erode(mask, kernel, borderType=cv2.BORDER_CONSTANT, borderValue=0).astype(bool)
    edge = region & ~inner
    tint = np.asarray(colour, dtype=np.float32)
    rgb[inner] = np.round(rgb[inner] * (1.0 - FILL_ALPHA) + tint * FILL_ALPHA).astype(np.uint8)
    rgb[edge] = colour


def _tag(rgb: np.ndarray, region: np.ndarray, text: str, colour: tuple[int, int, int]) -> None:
    """The finding's name above its region's top left corner (only when several findings are drawn)."""
    ys, xs = np.nonzero(region)
    scale = _scale_for(rgb.shape[1], "line")
    thickness = max(1, round(scale * 1.6))
    (w, h), _ = cv2.getTextSize(text, _FONT, scale, thickness)
    x = int(min(max(0, xs.min()), rgb.shape[1] - w - 1))
    y = int(max(h + 2, ys.min() - 4))
    cv2.putText(rgb, text, (x, y), _FONT, scale, (0, 0, 0), thickness + 3, cv2.LINE_AA)
    cv2.putText(rgb, text, (x, y), _FONT, scale, colour, thickness, cv2.LINE_AA)


def draw_findings(gray_u8: np.ndarray, regions: Sequence[tuple[Finding, np.ndarray]]) -> np.ndarray:
    """RGB image: gray everywhere, each finding's region outlined in its own colour."""
    rgb = np.repeat(gray_u8[:, :, None], 3, axis=2)
    for (_, region), colour in zip(regions, REGION_COLOURS, strict=False):
        draw_region(rgb, region, colour)
    if len(regions) > 1:
        for (finding, region), colour in zip(regions, REGION_COLOURS, strict=False):
            if region.any():
                _tag(rgb, region, ascii_text(finding.label), colour)
    return rgb


# --- banner -----------------------------------------------------------------------------------------


def ascii_text(text: str) -> str:
    """Hershey fonts draw printable ASCII only: anything else becomes '?', control characters spaces."""
    printable = "".join(c if c.isprintable() else " " for c in text)
    return printable.encode("ascii", errors="replace").decode("ascii")


def short_label(label: str) -> str:
    return SHORT_LABELS.get(label, label)


def _model_line(algorithm: ModelIdentity) -> str:
    return ascii_text(f"model {algorithm.name} {algorithm.version}")


def banner_text(findings: Sequence[Finding], algorithm: ModelIdentity) -> BannerText:
    """The result banner: headline, "not for diagnostic use", then probability, threshold and model.

    The headline and the banner's colour follow the triage flag: they count the findings that set it. A finding
    the package marks informational (``Finding.informational``) is listed after them on one "info" line with its
    score against its threshold, and never makes the banner positive; a label that does not apply to the patient
    (``Finding.not_applicable``) is listed last as "n/a", without a score."""
    applicable = [f for f in findings if not f.not_applicable]
    triage = [f for f in applicable if not f.informational]
    informational = sorted((f for f in applicable if f.informational), key=lambda f: (not f.positive, -f.probability))
    not_applicable = [f for f in findings if f.not_applicable]
    flagged = sorted((f for f in triage if f.flags), key=lambda f: -f.probability)
    kind: BannerKind = "positive" if flagged else "negative"
    if len(findings) == 1 and triage:
        f = findings[0]
        headline = f"{short_label(f.label)}: {'POSITIVE' if f.positive else 'negative'} {f.probability:.2f}"
        relation = ">=" if f.positive else "<"
        details = [f"p {f.probability:.2f} {relation} threshold {f.threshold:.2f} ({f.threshold_method})"]
    else:
        headline = (f"AI: POSITIVE ({len(flagged)} of {len(triage)})" if flagged
                    else f"AI: negative ({len(triage)} finding{'s' if len(triage) > 1 else ''})" if triage
                    else "AI: no triage finding applies to this patient" if applicable
                    else "AI: no finding applies to this patient")
        ordered = flagged + [f for f in triage if not f.positive]
        details = [
            f"{'POS' if f.positive else 'neg'} {f.label} {f.probability:.2f} (thr {f.threshold:.2f})" for f in ordered
        ]
    details += [f"info (sets no flag) {short_label(f.label)} {f.probability:.3f} {'>=' if f.positive else '<'} "
                f"{f.threshold:.3f}" for f in informational]
    if not_applicable:
        details.append("n/a (patient age): " + ", ".join(short_label(f.label) for f in not_applicable))
    lines: list[tuple[str, TextSize]] = [(ascii_text(headline), "headline"), (NOT_FOR_DIAGNOSIS, "line")]
    lines += [(ascii_text(text), "detail") for text in details]
    lines.append((_model_line(algorithm), "detail"))
    return BannerText(kind, tuple(lines))


def not_analysed_text(reason: str, algorithm: ModelIdentity) -> BannerText:
    """The not-analysed banner: headline, the reason (wrapped later), "not for diagnostic use", model."""
    lines: tuple[tuple[str, TextSize], ...] = (
        (NOT_ANALYSED_HEADLINE, "headline"),
        (ascii_text(" ".join(reason.split())) or "no reason given", "line"),
        (NOT_FOR_DIAGNOSIS, "detail"),
        (_model_line(algorithm), "detail"),
    )
    return BannerText("not_analysed", lines)


def banner_lines(findings: Sequence[Finding], algorithm: ModelIdentity) -> list[tuple[str, bool]]:
    """The result banner's text lines, each with whether it reports a positive result."""
    text = banner_text(findings, algorithm)
    return [(line, text.kind == "positive" and size == "headline") for line, size in text.lines]


def _scale_for(width: int, size: TextSize) -> float:
    return _CAP_FRACTIONS[size] * width / _CAP_AT_SCALE_1


def _thickness(scale: float, size: TextSize) -> int:
    return max(1, round(scale * (2.4 if size == "headline" else 1.5)))


def _text_width(text: str, scale: float, size: TextSize) -> int:
    return int(cv2.getTextSize(text, _FONT, scale, _thickness(scale, size))[0][0])


def _wrap(text: str, scale: float, size: TextSize, room: int) -> list[str]:
    """Greedy word wrap to ``room`` pixels; a single word too long is shrunk later by fitting."""
    lines: list[str] = []
    for word in text.split(" "):
        if lines and _text_width(f"{lines[-1]} {word}", scale, size) <= room:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


@dataclass(frozen=True)
class _Placed:
    text: str
    size: TextSize
    scale: float
    x: int
    baseline: int


def _layout(text: BannerText, width: int) -> tuple[list[_Placed], int]:
    """Where each line goes (the details in two columns when there are more than two) and the height.

    Each line is shrunk, never wrapped, to fit the width, except the second size ("line", e.g. a
    not-analysed reason), which is wrapped at word boundaries first.
    """
    margin = max(6, width // 60)
    room = width - 2 * margin
    details = [line for line, size in text.lines if size == "detail"]
    columns = 2 if len(details) > 2 else 1  # a multi-label package: one finding per line
    column_room = (room - margin * (columns - 1)) // columns
    placed: list[_Placed] = []
    y = 0
    for line, size in text.lines:
        if size == "detail":
            continue
        scale = _scale_for(width, size)
        for part in _wrap(line, scale, size, room) if size == "line" else [line]:
            fit = min(scale, scale * room / max(1, _text_width(part, scale, size)))
            cap = round(_CAP_AT_SCALE_1 * fit)
            y += round(cap * 0.35) + cap
            placed.append(_Placed(part, size, fit, margin, y))
            y += round(cap * 0.25)
    scale = _scale_for(width, "detail")
    widest = max((_text_width(d, scale, "detail") for d in details), default=1)
    scale = min(scale, scale * column_room / max(1, widest))
    cap = round(_CAP_AT_SCALE_1 * scale)
    rows = math.ceil(len(details) / columns)
    for i, line in enumerate(details):
        column, row = divmod(i, rows)
        x = margin + column * (column_room + margin)
        placed.append(_Placed(line, "detail", scale, x, y + round(cap * 1.7) * row + round(cap * 0.5) + cap))
    y += round(cap * 1.7) * rows + round(cap * 0.5)
    return placed, y + margin // 2


def render_banner(text: BannerText, width: int) -> np.ndarray:
    """The banner strip (RGB): background in the kind's colour, the lines in its text colour."""
    background, ink = BANNER_STYLES[text.kind]
    placed, height = _layout(text, width)
    strip = np.empty((height, width, 3), dtype=np.uint8)
    strip[:] = background
    for p in placed:
        cv2.putText(strip, p.text, (p.x, p.baseline), _FONT, p.scale, ink, _thickness(p.scale, p.size), cv2.LINE_AA)
    return strip


# --- whole overlays ---------------------------------------------------------------------------------


def render_overlay(
    image: np.ndarray,
    findings: Sequence[Finding],
    algorithm: ModelIdentity,
    heatmaps_on_source: Mapping[str, np.ndarray],
) -> tuple[np.ndarray, int, float]:
    """The result overlay's RGB pixels: the banner on top of the gray image with its evidence outlined.

    Args:
        image: the source-shaped display image (see :func:`display_gray`).
        findings: the image's findings; only flagged ones (positive, not informational) with a heatmap are
            outlined.
        algorithm: the model package (name and version go in the banner).
        heatmaps_on_source: label -> source-shaped map in [0, 1], the finding's heatmap (the sigmoid of
            the CAM) mapped onto the source; 0 where there is no evidence.

    Returns:
        (RGB uint8 array, banner height in rows, resampling factor applied to the source image).

    Raises:
        OverlayInputError: the image is not 2-D, or a drawn heatmap does not have its shape.
    """
    gray, scale = display_gray(image)
    shape = tuple(np.asarray(image).shape[:2])
    regions = finding_regions(findings, heatmaps_on_source, (int(shape[0]), int(shape[1])), scale)
    banner = render_banner(banner_text(findings, algorithm), gray.shape[1])
    return np.concatenate([banner, draw_findings(gray, regions)], axis=0), banner.shape[0], scale


def blank_field(side: int = _BLANK_SIDE) -> np.ndarray:
    """A dark square for a not-analysed overlay whose source pixels could not be decoded."""
    field = np.full((side, side), _BLANK_GRAY, dtype=np.uint8)
    text = "NO IMAGE PIXELS"
    scale = _scale_for(side, "line")
    thickness = _thickness(scale, "line")
    (w, h), _ = cv2.getTextSize(text, _FONT, scale, thickness)
    cv2.putText(field, text, ((side - w) // 2, (side + h) // 2), _FONT, scale, 160, thickness, cv2.LINE_AA)
    return field


def render_not_analysed(
    image: np.ndarray | None, reason: str, algorithm: ModelIdentity
) -> tuple[np.ndarray, int, float]:
    """The not-analysed overlay's RGB pixels: the amber "NOT ANALYSED" banner and its reason over the image.

    The image is drawn in gray and untouched; when ``image`` is None, a dark field saying "NO IMAGE
    PIXELS" takes its place.

    Returns:
        (RGB uint8 array, banner height in rows, resampling factor applied; 0.0 when there was no image).
    """
    if image is None:
        gray, scale = blank_field(), 0.0
    else:
        gray, scale = display_gray(image)
    banner = render_banner(not_analysed_text(reason, algorithm), gray.shape[1])
    return np.concatenate([banner, np.repeat(gray[:, :, None], 3, axis=2)], axis=0), banner.shape[0], scale
