"""Shortcut audits: the thumbnail floor learns a brightness shortcut; the blackout hits exactly the lungs."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import kurtosis, skew

from training import audits, metrics


def _images(n: int, seed: int, brightness_shift: float) -> tuple[list[np.ndarray], np.ndarray]:
    """Noise images; positives are globally brighter by ``brightness_shift`` grey levels."""
    rng = np.random.default_rng(seed)
    y = (np.arange(n) % 2).astype(float)
    images = [np.clip(rng.normal(110 + brightness_shift * label, 30, (40, 36)), 0, 255).astype(np.uint8)
              for label in y]
    return images, y


def _folds(n: int) -> np.ndarray:
    """Four folds, each holding both classes (labels alternate image by image)."""
    return (np.arange(n) // 2) % 4


def test_area_downsample_is_block_mean_and_matches_opencv() -> None:
    image = np.random.default_rng(0).integers(0, 256, (64, 48)).astype(np.uint8)
    thumb = audits.area_downsample(image, 16)
    expected = image.reshape(16, 4, 16, 3).mean(axis=(1, 3))
    np.testing.assert_allclose(thumb, expected)
    cv2 = pytest.importorskip("cv2")
    odd = np.random.default_rng(1).random((50, 37)).astype(np.float32)
    reference = cv2.resize(odd, (16, 16), interpolation=cv2.INTER_AREA)
    np.testing.assert_allclose(audits.area_downsample(odd, 16), reference, atol=1e-5)


def test_intensity_statistics_equal_numpy_and_scipy() -> None:
    image = np.clip(np.random.default_rng(2).gamma(2.0, 30.0, (37, 53)), 0, 255).astype(np.uint8)
    values = image.ravel() / 255.0
    expected = np.concatenate([
        [values.mean(), values.std()],
        np.percentile(values, audits.PERCENTILES),
        [skew(values), kurtosis(values)],
        np.histogram(values, bins=audits.HISTOGRAM_BINS, range=(0.0, 1.0))[0] / values.size,
    ])
    np.testing.assert_allclose(audits.intensity_statistics(image), expected, atol=1e-12)
    with pytest.raises(ValueError, match="uint8"):
        audits.intensity_statistics(image.astype(float))


def test_thumbnail_features_shape_and_scale() -> None:
    image = np.full((32, 32), 255, np.uint8)
    features = audits.thumbnail_features(image)
    n_expected = 16 * 16 + 2 + len(audits.PERCENTILES) + 2 + audits.HISTOGRAM_BINS
    assert features.shape == (n_expected,)
    assert np.all(np.isfinite(features))  # a constant image has no skewness: 0, not NaN
    assert features[:256].max() == pytest.approx(1.0)


def test_thumbnail_baseline_learns_a_brightness_shortcut() -> None:
    images, y = _images(120, 0, brightness_shift=12)
    folds = _folds(y.size)
    y_unknown = y.copy()
    y_unknown[:5] = np.nan
    baseline = audits.thumbnail_baseline(images, y_unknown, folds)
    assert baseline.oof_scores.shape == (120,) and np.all(np.isfinite(baseline.oof_scores))
    assert metrics.auroc(y, baseline.oof_scores) > 0.9
    external, y_ext = _images(40, 1, brightness_shift=12)
    assert metrics.auroc(y_ext, baseline.score(external)) > 0.9


def test_thumbnail_baseline_finds_nothing_without_a_shortcut() -> None:
    images, y = _images(120, 2, brightness_shift=0)
    baseline = audits.thumbnail_baseline(images, y, _folds(y.size))
    assert 0.3 < metrics.auroc(y, baseline.oof_scores) < 0.7


def test_thumbnail_baseline_rejects_bad_folds() -> None:
    images, y = _images(20, 3, brightness_shift=0)
    with pytest.raises(ValueError, match="at least 2 folds"):
        audits.thumbnail_baseline(images, y, np.zeros(20))
    with pytest.raises(ValueError, match="differ in length"):
        audits.thumbnail_baseline(images, y[:10], np.arange(20) % 2)


def test_blackout_zeroes_exactly_the_masked_pixels() -> None:
    rng = np.random.default_rng(4)
    image = rng.integers(1, 256, (64, 48)).astype(np.uint8)  # no zero before the blackout
    mask = (rng.random((32, 24)) > 0.6).astype(np.uint8) * 255  # half resolution
    out = audits.lung_blackout(image, mask)
    lungs = np.kron(mask > 0, np.ones((2, 2), bool))
    assert out.dtype == np.uint8 and out.shape == image.shape
    np.testing.assert_array_equal(out == 0, lungs)
    np.testing.assert_array_equal(out[~lungs], image[~lungs])
    same_size = audits.lung_blackout(image, lungs.astype(np.uint8))
    np.testing.assert_array_equal(same_size, out)
    assert image.min() > 0  # the input is untouched
    background = audits.lung_blackout(image, mask, fill="background")
    assert np.all(background[lungs] == np.median(image[~lungs]))


def _lung_images(n: int, seed: int, marker: bool) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
    """Positives have brighter lungs; with ``marker``, also a bright corner outside the lungs."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((32, 32), np.uint8)
    mask[8:28, 4:14] = mask[8:28, 18:28] = 1
    y = (np.arange(n) % 2).astype(float)
    images = []
    for label in y:
        image = rng.integers(60, 100, (32, 32)).astype(np.uint8)
        image[mask > 0] += np.uint8(40 * label)
        if marker:
            image[:4, :4] = 200 if label else 50
        images.append(image)
    return images, [mask] * n, y


def _lung_reader(images: list[np.ndarray]) -> np.ndarray:
    return np.array([image[8:28, 4:28].mean() for image in images]) / 255


def _corner_reader(images: list[np.ndarray]) -> np.ndarray:
    return np.array([image[:4, :4].mean() for image in images]) / 255


def test_blackout_audit_separates_lung_readers_from_shortcuts() -> None:
    images, masks, y = _lung_images(60, 5, marker=True)
    reads_lungs = audits.blackout_audit(_lung_reader, images, masks, y, n_boot=50, cohort="c", label="TB")
    assert reads_lungs["auroc_original"]["value"] == 1.0
    assert reads_lungs["auroc_blackout"]["value"] == pytest.approx(0.5, abs=0.15)
    assert "falls to chance: the model reads the lungs" in reads_lungs["verdict"]
    shortcut = audits.blackout_audit(_corner_reader, images, masks, y, n_boot=50)
    assert shortcut["auroc_blackout"]["value"] == 1.0
    assert "reads something other than the lungs" in shortcut["verdict"]


def test_blackout_audit_leaves_out_images_without_mask() -> None:
    images, masks, y = _lung_images(40, 6, marker=False)
    masks_some: list[np.ndarray | None] = [m if i % 4 else None for i, m in enumerate(masks)]
    report = audits.blackout_audit(_lung_reader, images, masks_some, y, n_boot=20)
    assert report["n"] == 30 and report["n_without_mask"] == 10


def test_floor_report_verdicts() -> None:
    rng = np.random.default_rng(7)
    y = (np.arange(300) % 2).astype(float)
    strong = rng.normal(2.0 * y, 1.0)
    weak = rng.normal(0.3 * y, 1.0)
    above = audits.floor_report(y, strong, weak, n_boot=50, cohort="oof", label="TB")
    assert above["kind"] == "thumbnail_floor"
    assert above["verdict"].startswith(f"model AUROC {metrics.auroc(y, strong):.3f} vs thumbnail floor")
    assert above["verdict"].endswith("above the floor")
    below = audits.floor_report(y, weak, strong, n_boot=50)
    assert "BELOW the floor" in below["verdict"]
    same = audits.floor_report(y, strong, strong + rng.normal(0, 0.01, 300), n_boot=50)
    assert "not distinguishable from the floor" in same["verdict"]


@pytest.mark.slow
@pytest.mark.shared_data
def test_thumbnail_floor_on_shenzhen(data_dir: Path) -> None:
    """The published shortcut floor: a thumbnail + intensity model reaches ~0.86 AUROC within Shenzhen."""
    cv2 = pytest.importorskip("cv2")
    from sklearn.model_selection import StratifiedKFold

    with (data_dir / "tb" / "shenzhen.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    images = [cv2.imread(str(data_dir / row["image"]), cv2.IMREAD_GRAYSCALE) for row in rows]
    y = np.array([float(row["label_tb"]) for row in rows])
    folds = np.zeros(y.size, int)
    for k, (_, test) in enumerate(StratifiedKFold(5, shuffle=True, random_state=0).split(y, y)):
        folds[test] = k
    baseline = audits.thumbnail_baseline(images, y, folds)
    assert 0.80 < metrics.auroc(y, baseline.oof_scores) < 0.95  # 0.895 when written
    row = next(r for r in rows if r["lung_mask"])
    mask = cv2.imread(str(data_dir / row["lung_mask"]), cv2.IMREAD_GRAYSCALE)
    image = cv2.imread(str(data_dir / row["image"]), cv2.IMREAD_GRAYSCALE)
    blacked = audits.lung_blackout(image, mask)
    lungs = audits.resize_nearest(mask, image.shape) > 0
    assert 0.1 < lungs.mean() < 0.6 and np.all(blacked[lungs] == 0)
