"""Overlay rendering: what is drawn (only the strongest evidence of positive findings), the banner at PACS
thumbnail size, the not-analysed overlay, and every overlay kind through dciodvfy."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from pydicom.dataset import Dataset

from ai.findings import Finding
from node import overlay
from node.overlay import (
    BANNER_STYLES,
    CONTOUR_LEVEL,
    MAX_REGIONS,
    NOT_ANALYSED_HEADLINE,
    banner_text,
    evidence,
    not_analysed_text,
    render_not_analysed,
    render_overlay,
)
from node.results import AlgorithmInfo, build_not_analysed_overlay, build_overlay
from tests.test_results import NIH14, blob_heatmap, dciodvfy_lines, finding, load_source, shape_of, write

ALGORITHM = AlgorithmInfo(name="cxr-tb", version="tb-1.2.0")
THUMB = 192
REASON = "image is not a frontal chest radiograph (p = 0.03)"


def chest_like(shape: tuple[int, int]) -> np.ndarray:
    """A gray image with structure: two dark 'lungs' on a brighter field, and a gradient."""
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float32)
    image = 0.35 + 0.3 * rows / shape[0]
    for cx in (0.3, 0.7):
        lung = ((cols / shape[1] - cx) / 0.15) ** 2 + ((rows / shape[0] - 0.45) / 0.3) ** 2 < 1
        image[lung] -= 0.25
    return np.clip(image, 0, 1).astype(np.float32)


def coloured(rgb: np.ndarray) -> np.ndarray:
    """Pixels that are not gray (R, G, B not all equal)."""
    return (rgb[..., 0] != rgb[..., 1]) | (rgb[..., 1] != rgb[..., 2])


def tb(probability: float) -> Finding:
    return Finding("Tuberculosis", probability, 0.39, probability >= 0.39, "sensitivity >= 0.90 on OOF")


def peaks(shape: tuple[int, int], centres: list[tuple[float, float, float]]) -> np.ndarray:
    """Sigmoid of a CAM with Gaussian peaks (row, column as fractions, height in logits) on a -3 floor."""
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float32)
    cam = np.full(shape, -3.0, np.float32)
    for cy, cx, height in centres:
        cam += height * np.exp(-((rows / shape[0] - cy) ** 2 + (cols / shape[1] - cx) ** 2) / 0.06**2)
    return (1.0 / (1.0 + np.exp(-cam))).astype(np.float32)


# --- what is drawn ----------------------------------------------------------------------------------


def test_a_negative_finding_draws_no_colour_and_keeps_the_image() -> None:
    shape = (900, 800)
    image = chest_like(shape)
    rgb, top, scale = render_overlay(image, [tb(0.2)], ALGORITHM, {"Tuberculosis": blob_heatmap(shape)})
    assert scale == 1.0 and rgb.shape == (top + shape[0], shape[1], 3)
    assert not coloured(rgb[top:]).any()
    np.testing.assert_array_equal(rgb[top:, :, 0], np.round(image * 255).astype(np.uint8))


def test_a_positive_finding_colours_only_its_strongest_region() -> None:
    shape = (900, 800)
    image = chest_like(shape)
    heat = blob_heatmap(shape, (0.35, 0.3))
    rgb, top, _ = render_overlay(image, [tb(0.9)], ALGORITHM, {"Tuberculosis": heat})
    drawn = coloured(rgb[top:])
    assert 0.005 < drawn.mean() < 0.08  # a bounded part of the image, not a wash over the chest
    hot = evidence(heat) >= CONTOUR_LEVEL - 0.1  # the thresholded region (with room for the smoothing)
    assert not drawn[~hot].any()
    assert drawn[hot].mean() > 0.5
    gray = np.round(image * 255).astype(np.uint8)
    np.testing.assert_array_equal(rgb[top:, :, 0][~drawn], gray[~drawn])  # the anatomy elsewhere untouched
    inside = drawn & (cv2.erode(drawn.astype(np.uint8), np.ones((25, 25), np.uint8)) > 0)
    tint = np.abs(rgb[top:][inside].astype(int) - gray[inside][:, None].astype(int)).max()
    assert tint < 0.25 * 255  # the fill is translucent: the image shows through


def test_weak_evidence_is_not_outlined_and_regions_are_capped() -> None:
    shape = (800, 800)
    strong_and_weak = peaks(shape, [(0.3, 0.3, 12.0), (0.7, 0.7, 5.0)])
    rgb, top, _ = render_overlay(chest_like(shape), [tb(0.9)], ALGORITHM, {"Tuberculosis": strong_and_weak})
    drawn = coloured(rgb[top:])
    assert drawn[:400, :400].any() and not drawn[400:, 400:].any()
    many = peaks(shape, [(y, x, 12.0) for y in (0.2, 0.5, 0.8) for x in (0.2, 0.5, 0.8)])
    rgb, top, _ = render_overlay(chest_like(shape), [tb(0.9)], ALGORITHM, {"Tuberculosis": many})
    count = cv2.connectedComponents(coloured(rgb[top:]).astype(np.uint8))[0] - 1
    assert 1 <= count <= MAX_REGIONS


@pytest.mark.parametrize("value", [1.0, 0.7, 0.0])
def test_a_flat_map_draws_nothing(value: float) -> None:
    shape = (800, 700)
    rgb, top, _ = render_overlay(chest_like(shape), [tb(0.99)], ALGORITHM,
                                 {"Tuberculosis": np.full(shape, value, np.float32)})
    assert not coloured(rgb[top:]).any()


def test_a_saturated_map_as_the_worker_passes_it_stays_focal() -> None:
    """The finding's map as is (the worker passes it mapped onto the source): the overlay's scaling makes
    the region, even where the sigmoid saturates."""
    shape = (800, 800)
    heat = peaks(shape, [(0.3, 0.3, 25.0), (0.6, 0.7, 8.0)])  # saturated at the first peak, as real CAMs are
    rgb, top, _ = render_overlay(chest_like(shape), [tb(0.99)], ALGORITHM, {"Tuberculosis": heat})
    drawn = coloured(rgb[top:])
    assert 0.003 < drawn.mean() < 0.08
    assert drawn[:400, :400].any()


def test_only_the_most_probable_positive_findings_are_outlined_and_tagged() -> None:
    shape = (800, 800)
    fs = [finding(label, p) for label, p in zip(NIH14, np.linspace(0.05, 0.95, 14), strict=True)]
    heat = {f.label: peaks(shape, [(0.1 + 0.06 * i, 0.5, 12.0)]) for i, f in enumerate(fs)}
    rgb, top, _ = render_overlay(chest_like(shape), fs, ALGORITHM, heat)
    colours = {tuple(int(c) for c in px) for px in rgb[top:][coloured(rgb[top:])]}
    assert set(overlay.REGION_COLOURS) <= colours
    assert coloured(rgb[top:]).mean() < 0.2
    assert not coloured(rgb[top:])[: int(0.6 * shape[0])].any()  # less probable positives (rows 0.46-0.7) are not


def test_large_and_small_sources_keep_the_size_rule() -> None:
    for shape, long_side in (((3000, 2400), 1024), ((400, 300), 768), ((900, 700), 900)):
        rgb, top, _ = render_overlay(np.zeros(shape, np.float32), [tb(0.9)], ALGORITHM, {})
        assert max(rgb.shape[0] - top, rgb.shape[1]) == long_side


# --- banner -----------------------------------------------------------------------------------------


def test_banner_text_says_the_result_in_few_words() -> None:
    assert banner_text([tb(0.87)], ALGORITHM).lines[0] == ("TB: POSITIVE 0.87", "headline")
    assert banner_text([tb(0.12)], ALGORITHM).lines[0] == ("TB: negative 0.12", "headline")
    for text in (banner_text([tb(0.87)], ALGORITHM), not_analysed_text(REASON, ALGORITHM)):
        joined = " | ".join(line for line, _ in text.lines)
        assert "NOT FOR DIAGNOSTIC USE" in joined and "tb-1.2.0" in joined
    assert not_analysed_text(REASON, ALGORITHM).lines[:2] == ((NOT_ANALYSED_HEADLINE, "headline"), (REASON, "line"))
    many = banner_text([finding(label, 0.1) for label in NIH14], ALGORITHM)
    assert many.kind == "negative" and many.lines[0][0] == "AI: negative (14 findings)"


def thumbnail(rgb: np.ndarray) -> np.ndarray:
    height = round(rgb.shape[0] * THUMB / rgb.shape[1])
    return np.asarray(cv2.resize(rgb, (THUMB, height), interpolation=cv2.INTER_AREA))


def headline_rows(banner: np.ndarray, background: tuple[int, int, int]) -> int:
    """Height in rows of the first band of text (pixels far from the background) in a banner."""
    far = np.abs(banner.astype(int) - np.asarray(background)).max(axis=2) > 60
    rows = np.nonzero(far.any(axis=1))[0]
    first_gap = np.nonzero(np.diff(rows) > 1)[0]
    return int(rows[first_gap[0]] - rows[0] + 1) if first_gap.size else int(rows[-1] - rows[0] + 1)


@pytest.mark.parametrize("width", [768, 1024])
def test_banner_reads_at_thumbnail_size(width: int) -> None:
    shape = (width, width)
    image = chest_like(shape)
    heat = {"Tuberculosis": blob_heatmap(shape)}
    renders = {
        "positive": render_overlay(image, [tb(0.87)], ALGORITHM, heat),
        "negative": render_overlay(image, [tb(0.12)], ALGORITHM, heat),
        "not_analysed": render_not_analysed(image, REASON, ALGORITHM),
    }
    backgrounds = {}
    for kind, (rgb, top, _) in renders.items():
        small = thumbnail(rgb)
        band = small[: round(top * THUMB / width)]
        background = BANNER_STYLES[kind][0]
        backgrounds[kind] = np.median(band.reshape(-1, 3), axis=0)
        assert np.abs(backgrounds[kind] - background).max() <= 8, kind  # a solid band of the kind's colour
        luminance = band.astype(float) @ [0.299, 0.587, 0.114]
        assert luminance.max() - luminance.min() > 150, kind  # the text stands out on it
        assert headline_rows(band, background) >= 8, kind  # a headline of about 10 px on a 192 px thumbnail
        assert top <= 200 * width / 1024  # and the image keeps the most of the thumbnail
    colours = list(backgrounds.values())
    assert all(np.abs(a - b).max() > 100 for i, a in enumerate(colours) for b in colours[i + 1 :])


@pytest.mark.parametrize("labels", [1, 2, 3])
def test_banner_of_a_small_package_takes_at_most_200_rows_at_1024(labels: int) -> None:
    fs = [finding(label, 0.9 - 0.3 * i) for i, label in enumerate(NIH14[:labels])]
    _, top, _ = render_overlay(np.zeros((1024, 1024), np.float32), fs, ALGORITHM, {})
    assert top <= 200


def test_long_text_is_shrunk_or_wrapped_to_fit() -> None:
    long_label = Finding("Pleural_Thickening_of_a_very_long_label_name", 0.9, 0.4, True, "x" * 120)
    rgb, top, _ = render_overlay(np.zeros((800, 800), np.float32), [long_label], ALGORITHM, {})
    assert rgb.shape[1] == 800 and top < 400
    reason = "the image could not be analysed because " + "of a long list of reasons " * 8
    rgb, top, _ = render_not_analysed(np.zeros((800, 800), np.float32), reason, ALGORITHM)
    right = rgb[:top, -4:]
    assert (right == BANNER_STYLES["not_analysed"][0]).all()  # nothing ran off the right edge


# --- not analysed -----------------------------------------------------------------------------------


def test_not_analysed_overlay_shows_the_image_untouched_under_its_banner() -> None:
    image = chest_like((900, 800))
    rgb, top, scale = render_not_analysed(image, REASON, ALGORITHM)
    assert scale == 1.0 and not coloured(rgb[top:]).any()
    np.testing.assert_array_equal(rgb[top:, :, 0], np.round(image * 255).astype(np.uint8))
    u8, _, _ = render_not_analysed((image * 255).round().astype(np.uint8), REASON, ALGORITHM)
    np.testing.assert_array_equal(u8, rgb)


def test_not_analysed_overlay_without_pixels_is_a_blank_field() -> None:
    rgb, top, scale = render_not_analysed(None, REASON, ALGORITHM)
    assert scale == 0.0 and rgb.shape == (top + 768, 768, 3)
    body = rgb[top:]
    assert not coloured(body).any() and np.median(body) < 64


# --- DICOM ------------------------------------------------------------------------------------------


def every_overlay_kind(source: Dataset) -> dict[str, Dataset]:
    shape = shape_of(source)
    image = chest_like(shape)
    heat = blob_heatmap(shape)
    nih = [finding(label, p) for label, p in zip(NIH14, np.linspace(0.05, 0.95, 14), strict=True)]
    return {
        "positive": build_overlay(source, image, [tb(0.9)], ALGORITHM, {"Tuberculosis": heat}, device_ae="CXR"),
        "negative": build_overlay(source, image, [tb(0.1)], ALGORITHM, {}, device_ae="CXR"),
        "nih14": build_overlay(source, image, nih, ALGORITHM, {f.label: heat for f in nih}),
        "not-analysed": build_not_analysed_overlay(source, image, REASON, ALGORITHM, device_ae="CXR"),
        "not-analysed-u8": build_not_analysed_overlay(source, (image * 255).astype(np.uint8), REASON, ALGORITHM),
        "not-analysed-no-pixels": build_not_analysed_overlay(source, None, "pixel data could not be decoded",
                                                             ALGORITHM),
    }


@pytest.mark.integration
def test_every_overlay_kind_passes_dciodvfy(tmp_path: Path) -> None:
    source = load_source("RG1_UNCR.dcm")
    for kind, ds in every_overlay_kind(source).items():
        errors = [line for line in dciodvfy_lines(write(ds, tmp_path / f"{kind}.dcm")) if line.startswith("Error")]
        assert errors == [], f"{kind}: {errors}"
