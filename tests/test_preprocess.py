"""Tests of ai.preprocess: field detection, letterbox geometry, CLAHE output, Letterbox.to_source."""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest

from ai.errors import UnsupportedImage
from ai.pixels import read_image_file
from ai.preprocess import (
    Letterbox,
    PreprocessSpec,
    detect_field,
    preprocess,
    preprocess_gray,
    preprocess_sizes,
    to_model_input,
)


def textured(rows: int, cols: int, seed: int = 0, lo: float = 0.2, hi: float = 0.75) -> np.ndarray:
    """A chest-like field: smooth structure between lo and hi plus fine noise (float32)."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((max(2, rows // 64), max(2, cols // 64))).astype(np.float32)
    smooth = cv2.resize(coarse, (cols, rows), interpolation=cv2.INTER_CUBIC)
    smooth = (smooth - smooth.min()) / (smooth.max() - smooth.min())
    image = lo + (hi - lo) * smooth + rng.normal(0.0, 0.02, (rows, cols)).astype(np.float32)
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def with_borders(field: np.ndarray, widths: tuple[int, int, int, int], value: float, noise: float = 0.0,
                 seed: int = 1) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Surround ``field`` by bands (top, bottom, left, right) of ``value``; returns image and true field."""
    top, bottom, left, right = widths
    rows, cols = field.shape
    rng = np.random.default_rng(seed)
    image = value + rng.normal(0.0, noise, (rows + top + bottom, cols + left + right)) if noise else np.full(
        (rows + top + bottom, cols + left + right), value)
    image = np.clip(image, 0.0, 1.0).astype(np.float32)
    image[top : top + rows, left : left + cols] = field
    return image, (top, top + rows, left, left + cols)


def assert_field_close(found: tuple[int, ...], truth: tuple[int, ...], shape: tuple[int, int]) -> None:
    """Each edge within two thumbnail pixels (the detector works on a 256-pixel thumbnail)."""
    tol = 2 * max(shape) / 256 + 1
    assert all(abs(f - t) <= tol for f, t in zip(found, truth, strict=True)), f"found {found}, truth {truth}"


# --- field detection ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("widths", "value", "noise"),
    [
        ((40, 0, 100, 10), 0.0, 0.0),  # black padding, uneven
        ((0, 120, 0, 0), 0.0, 0.0),  # one black band only
        ((150, 200, 60, 60), 0.95, 0.01),  # noisy white collimation
        ((300, 20, 250, 5), 1.0, 0.0),  # saturated white frame
        ((16, 16, 16, 16), 0.5, 0.0),  # uniform grey frame
    ],
)
def test_collimation_borders_of_different_widths_are_cropped(
    widths: tuple[int, int, int, int], value: float, noise: float
) -> None:
    image, truth = with_borders(textured(1200, 1000), widths, value, noise)
    assert_field_close(detect_field(image), truth, image.shape)


def test_black_border_with_burned_in_text_is_cropped() -> None:
    image, truth = with_borders(textured(900, 800, seed=3), (0, 150, 90, 0), 0.0)
    image[950:990, 10:60] = 1.0  # a text marker inside the bottom band (well under 10 % of a row)
    image[300:330, 20:70] = 0.9  # and one inside the left band
    assert_field_close(detect_field(image), truth, image.shape)


def test_mixed_white_collimation_and_black_padding() -> None:
    inner, _ = with_borders(textured(800, 700, seed=4), (120, 0, 80, 80), 0.93, noise=0.01)
    image, _ = with_borders(inner, (0, 60, 0, 40), 0.0)
    truth = (120, 920, 80, 780)
    assert_field_close(detect_field(image), truth, image.shape)


def test_band_of_two_levels_is_cropped_by_the_second_pass() -> None:
    # A top band that is black padding on the left and white collimation on the right: no line of it
    # is uniform (pass 1), but every pixel is flat and extreme (pass 2).
    image, truth = with_borders(textured(900, 800, seed=12), (140, 0, 0, 0), 0.0)
    image[:140, 400:] = 1.0
    assert_field_close(detect_field(image), truth, image.shape)


def test_image_without_borders_is_kept_whole() -> None:
    image = textured(700, 600, seed=5)
    assert detect_field(image) == (0, 700, 0, 600)


def test_implausibly_small_field_falls_back_to_the_whole_image() -> None:
    image, _ = with_borders(textured(200, 200, seed=6), (400, 400, 400, 400), 0.0)  # 4 % of the area
    assert detect_field(image) == (0, 1000, 0, 1000)


def test_field_detection_accepts_uint8_and_rejects_non_images() -> None:
    image, truth = with_borders(textured(600, 500), (50, 0, 0, 70), 0.0)
    assert_field_close(detect_field(np.rint(image * 255).astype(np.uint8)), truth, image.shape)
    with pytest.raises(UnsupportedImage, match=r"2-D gray image"):
        detect_field(np.zeros((64, 64, 3), np.float32))
    with pytest.raises(UnsupportedImage, match="NaN"):
        detect_field(np.full((64, 64), np.nan, np.float32))


def cohort_rows(data_dir: Path, name: str) -> list[dict[str, str]]:
    with (data_dir / "tb" / f"{name}.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


def edge_black_lines(image: np.ndarray) -> tuple[int, int, int, int]:
    """Field bounded by the fully black lines at each edge (the padding we must remove)."""
    dark_rows = (image <= 2 / 255).all(axis=1)
    dark_cols = (image <= 2 / 255).all(axis=0)

    def run(flags: np.ndarray) -> int:
        nonzero = np.flatnonzero(~flags)
        return int(nonzero[0]) if nonzero.size else flags.size

    rows, cols = image.shape
    return (run(dark_rows), rows - run(dark_rows[::-1]), run(dark_cols), cols - run(dark_cols[::-1]))


@pytest.mark.shared_data
@pytest.mark.parametrize(("cohort", "step"), [("montgomery", 1), ("shenzhen", 10)])
def test_real_fields_drop_black_padding_and_keep_both_lungs(data_dir: Path, cohort: str, step: int) -> None:
    rows = cohort_rows(data_dir, cohort)[::step]
    cropped = 0
    for row in rows:
        image = read_image_file(data_dir / row["image"])
        y0, y1, x0, x1 = detect_field(image)
        inner = edge_black_lines(image)
        tol = 2 * max(image.shape) / 256 + 1
        assert y0 >= inner[0] - tol and y1 <= inner[1] + tol, f"{row['image']}: padding rows kept"
        assert x0 >= inner[2] - tol and x1 <= inner[3] + tol, f"{row['image']}: padding columns kept"
        if not row["lung_mask"]:
            continue  # 96 Shenzhen images have no lung mask
        mask = cv2.imread(str(data_dir / row["lung_mask"]), cv2.IMREAD_GRAYSCALE)
        ys, xs = np.nonzero(mask)
        assert y0 <= ys.min() and y1 > ys.max() and x0 <= xs.min() and x1 > xs.max(), (
            f"{row['image']}: field {(y0, y1, x0, x1)} cuts the lungs "
            f"{(ys.min(), ys.max() + 1, xs.min(), xs.max() + 1)}"
        )
        cropped += (y1 - y0) * (x1 - x0) < image.size
    if cohort == "montgomery":
        assert cropped > len(rows) // 2  # most Montgomery images have black borders


# --- letterbox, CLAHE, model input --------------------------------------------------------------------


def disk_image(rows: int, cols: int, center: tuple[int, int], radius: int) -> np.ndarray:
    image = np.clip(textured(rows, cols, seed=7, lo=0.3, hi=0.45), 0.0, 1.0)
    yy, xx = np.mgrid[0:rows, 0:cols]
    image[(yy - center[0]) ** 2 + (xx - center[1]) ** 2 <= radius**2] = 0.9
    return image


@pytest.mark.parametrize("shape", [(300, 900), (900, 300), (500, 640)])
def test_odd_aspect_ratios_are_letterboxed_without_distortion(shape: tuple[int, int]) -> None:
    rows, cols = shape
    center, radius = (rows // 2 + 17, cols // 2 - 23), 60
    spec = PreprocessSpec(size=256, field_detection=False)
    gray, box = preprocess_gray(disk_image(rows, cols, center, radius), spec)
    scale = 256 / max(rows, cols)
    out_rows, out_cols = round(rows * scale), round(cols * scale)
    top, left = (256 - out_rows) // 2, (256 - out_cols) // 2
    assert box == Letterbox(field=(0, rows, 0, cols), scale=scale, offset=(top, left), size=256,
                            source_shape=(rows, cols))
    padding = np.ones_like(gray, dtype=bool)
    padding[top : top + out_rows, left : left + out_cols] = False
    assert gray[padding].max(initial=0) == 0  # the padding is exactly 0
    content = gray[top : top + out_rows, left : left + out_cols]
    assert content.mean() > 40
    _, binary = cv2.threshold(content, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    _, _, stats, centroids = cv2.connectedComponentsWithStats(binary)
    disk = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    width, height = stats[disk, cv2.CC_STAT_WIDTH], stats[disk, cv2.CC_STAT_HEIGHT]
    assert abs(width - height) <= 2  # a circle stays a circle
    assert abs(width - 2 * radius * scale) <= 3
    np.testing.assert_allclose(centroids[disk][::-1], np.array(center) * scale, atol=1.5)


def test_output_shapes_and_types() -> None:
    image, _ = with_borders(textured(700, 500), (30, 30, 0, 0), 1.0)
    spec = PreprocessSpec(size=128)
    gray, box = preprocess_gray(image, spec)
    assert gray.shape == (128, 128) and gray.dtype == np.uint8
    assert gray.max() == 255  # the field is stretched to the full range
    x = to_model_input(gray, spec)
    assert x.shape == (3, 128, 128) and x.dtype == np.float32 and x.flags.c_contiguous
    assert x.min() >= 0.0 and x.max() == 1.0
    np.testing.assert_array_equal(x[0], x[2])
    np.testing.assert_allclose(x[1] * 255.0, gray, atol=1e-4)
    both, box2 = preprocess(image, spec)
    np.testing.assert_array_equal(both, x)
    assert box2 == box
    one = to_model_input(gray, PreprocessSpec(size=128, channels=1))
    assert one.shape == (1, 128, 128)
    with pytest.raises(ValueError, match=r"uint8 of shape \(128, 128\)"):
        to_model_input(gray.astype(np.float32), spec)


def test_deterministic_and_pure() -> None:
    image, _ = with_borders(textured(1024, 1024, seed=9), (100, 0, 40, 40), 0.95, noise=0.01)
    before = image.copy()
    spec = PreprocessSpec(size=256)
    first, box1 = preprocess(image, spec)
    second, box2 = preprocess(image.copy(), spec)
    np.testing.assert_array_equal(first, second)
    assert box1 == box2
    np.testing.assert_array_equal(image, before)  # the input is not modified


def test_small_images_are_enlarged() -> None:
    gray, box = preprocess_gray(textured(100, 60), PreprocessSpec(size=256, field_detection=False))
    assert box.scale == pytest.approx(2.56) and box.content_shape == (256, 154)
    left = box.offset[1]
    assert left == 51 and gray[:, :left].max() == 0 and gray[:, left + 154 :].max() == 0
    assert gray[:, left : left + 154].mean() > 40


def test_to_source_round_trip_of_a_marker() -> None:
    rows, cols = 1100, 900
    marker = (610, 380)
    field, _ = with_borders(textured(900, 760, seed=11, lo=0.2, hi=0.6), (120, 80, 100, 40), 0.0)
    image = field.copy()
    image[marker[0] - 12 : marker[0] + 12, marker[1] - 12 : marker[1] + 12] = 1.0
    assert image.shape == (rows, cols)
    spec = PreprocessSpec(size=256)
    gray, box = preprocess_gray(image, spec)
    blurred = cv2.blur(gray.astype(np.float32), (5, 5))
    found = np.unravel_index(int(np.argmax(blurred)), blurred.shape)
    heatmap = np.zeros((256, 256), np.float32)
    cv2.circle(heatmap, (int(found[1]), int(found[0])), 3, 1.0, -1)
    back = box.to_source(heatmap)
    assert back.shape == (rows, cols) and back.dtype == np.float32
    ys, xs = np.nonzero(back > 0.5)
    assert abs(ys.mean() - marker[0]) <= 2 / box.scale + 2 and abs(xs.mean() - marker[1]) <= 2 / box.scale + 2
    ones = box.to_source(np.ones((256, 256), np.float32))
    y0, y1, x0, x1 = box.field
    assert ones[y0:y1, x0:x1].min() == 1.0 and ones.sum() == (y1 - y0) * (x1 - x0)  # zeros outside
    with pytest.raises(ValueError, match=r"shape \(256, 256\)"):
        box.to_source(np.zeros((8, 8), np.float32))


def test_spec_round_trip_and_validation() -> None:
    spec = PreprocessSpec(size=384, clahe_clip=1.5, clahe_tile=4, channels=3, field_detection=False)
    assert PreprocessSpec.from_dict(spec.to_dict()) == spec
    assert PreprocessSpec.from_dict({}) == PreprocessSpec()
    with pytest.raises(ValueError, match="clahe_limit"):
        PreprocessSpec.from_dict({"clahe_limit": 2.0})
    with pytest.raises(ValueError, match="size"):
        PreprocessSpec(size=0)


def test_preprocess_sizes_is_preprocess_gray_at_each_size_with_one_field() -> None:
    rng = np.random.default_rng(3)
    image = np.zeros((700, 520), np.float32)
    image[60:650, 40:500] = rng.random((590, 460), dtype=np.float32)  # a field inside black collimation
    spec = PreprocessSpec(size=64, clahe_clip=1.5)
    out = preprocess_sizes(image, spec, [64, 96, 64])
    assert list(out) == [64, 96]
    for size, (gray, box) in out.items():
        expected_gray, expected_box = preprocess_gray(image, replace(spec, size=size))
        np.testing.assert_array_equal(gray, expected_gray)
        assert box == expected_box
    assert out[64][1].field == out[96][1].field


@pytest.mark.parametrize(("grid", "other"), [(320, 384), (384, 320), (64, 96)])
def test_letterboxes_of_two_sizes_differ_by_at_most_one_grid_pixel(grid: int, other: int) -> None:
    """The ensemble resizes a member's map from its own input square onto the package's grid as a whole
    (``ai.ensemble``): that lands the field's edges within one grid pixel of where the grid's own letterbox puts
    them, for fields of any shape."""
    worst = 0.0
    for rows in range(40, 1300, 83):
        for cols in range(40, 1300, 89):
            image = np.full((rows, cols), 0.5, np.float32)
            edges = {}
            for size in (grid, other):
                _, box = preprocess_gray(image, PreprocessSpec(size=size, field_detection=False))
                (top, left), (height, width) = box.offset, box.content_shape
                edges[size] = np.array([top, top + height, left, left + width], np.float64)
            worst = max(worst, float(np.abs(edges[other] * grid / other - edges[grid]).max()))
    assert worst <= 1.0
