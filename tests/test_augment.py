"""Augmentation: reproducible from its generator, identity at evaluation, never a flip."""

from __future__ import annotations

import numpy as np
import pytest

from training.augment import AugmentConfig, Augmenter, affine_matrix

ALL_ON = AugmentConfig(
    rotate_p=1.0,
    shift_p=1.0,
    scale_p=1.0,
    brightness_p=1.0,
    contrast_p=1.0,
    gamma_p=1.0,
    noise_p=1.0,
    blur_p=1.0,
    downsample_p=1.0,
)


def marker_image(size: int = 64) -> np.ndarray:
    """An asymmetric image: a bright 'L' in the upper left, a gradient rising to the right."""
    img = np.tile(np.linspace(20, 120, size, dtype=np.float32), (size, 1))
    img[8:40, 10:16] = 250
    img[34:40, 10:30] = 250
    return img.astype(np.uint8)


def corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.astype(float).ravel(), b.astype(float).ravel())[0, 1])


def test_never_flips() -> None:
    """Across many strong draws, the result is always closer to the original than to any mirror."""
    image = marker_image()
    mirrors = [np.fliplr(image), np.flipud(image), np.flipud(np.fliplr(image))]
    augment = Augmenter(ALL_ON)
    for seed in range(200):
        out = augment(image, np.random.default_rng(seed))
        straight = corr(out, image)
        assert all(straight > corr(out, mirror) for mirror in mirrors), f"seed {seed}"


def test_reproducible_from_generator_and_varies_between_draws() -> None:
    image = marker_image()
    augment = Augmenter(ALL_ON)
    a = augment(image, np.random.default_rng(5))
    b = augment(image, np.random.default_rng(5))
    c = augment(image, np.random.default_rng(6))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.dtype == np.uint8 and a.shape == image.shape


def test_identity_at_evaluation_and_with_zero_probabilities() -> None:
    image = marker_image()
    assert Augmenter(ALL_ON)(image, np.random.default_rng(0), training=False) is image
    assert np.array_equal(Augmenter(AugmentConfig.none())(image, np.random.default_rng(0)), image)


def test_affine_matrix_has_positive_determinant() -> None:
    rng = np.random.default_rng(0)
    for _ in range(100):
        m = affine_matrix(64, rng.uniform(-30, 30), rng.uniform(0.5, 1.5), (rng.uniform(-5, 5), 0.0))
        assert np.linalg.det(m[:, :2]) > 0
    with pytest.raises(ValueError, match="scale must be positive"):
        affine_matrix(64, 0.0, -1.0, (0.0, 0.0))


def test_config_validation_names_the_key() -> None:
    with pytest.raises(ValueError, match=r"augment.rotate_p: expected a probability"):
        AugmentConfig(rotate_p=1.5)
    with pytest.raises(ValueError, match=r"augment.downsample_min"):
        AugmentConfig(downsample_min=0.0)


def test_rejects_non_uint8() -> None:
    with pytest.raises(ValueError, match="2-D uint8"):
        Augmenter()(np.zeros((8, 8), np.float32), np.random.default_rng(0))
