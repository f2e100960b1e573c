"""Augmentation step: chest-radiograph-safe perturbations of the preprocessed uint8 image.

Each augmentation fires with its own probability and draws its magnitude from a numpy ``Generator``,
so a sample's augmentation is reproducible from its generator. Order: one affine warp (rotation,
shift, scale together; border = 0, the letterbox pad) -> resolution drop -> Gaussian blur ->
brightness -> contrast -> gamma -> Gaussian noise.

There is deliberately **no horizontal or vertical flip**: anatomy is lateralised (the heart on the left,
the stomach bubble under the left hemidiaphragm), and a flipped radiograph is not a radiograph the
node will ever see. The affine warp is built from a positive scale and a rotation, so its determinant
is positive (no reflection); :func:`affine_matrix` checks it. At evaluation (``training=False``) the
image is returned unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import cv2
import numpy as np


@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities (``*_p``) and magnitudes of the training augmentations (all 0 = none).

    Attributes:
        rotate_p: probability of a rotation; ``rotate_deg``: maximum absolute angle in degrees.
        shift_p: probability of a translation; ``shift_frac``: maximum shift, fraction of the side.
        scale_p: probability of a zoom; ``scale_frac``: scale drawn in ``[1 - f, 1 + f]``.
        brightness_p: probability of an offset; ``brightness``: maximum offset, fraction of 255.
        contrast_p: probability of a contrast change; ``contrast``: factor in ``[1 - c, 1 + c]``
            about the mean.
        gamma_p: probability of a gamma curve; ``gamma``: exponent in ``[1 / (1 + g), 1 + g]``
            (log-uniform).
        noise_p: probability of Gaussian noise; ``noise_std``: its standard deviation, fraction of 255.
        blur_p: probability of a Gaussian blur; ``blur_sigma``: maximum sigma in pixels.
        downsample_p: probability of a resolution drop (down, then back up);
            ``downsample_min``: smallest factor (0.5 = half resolution).
        outside_lungs_p: probability that the field outside the lungs is replaced by its median grey before every
            other augmentation (:class:`training.lungs.OutsideLungs`; images with a lung mask only, training only);
            ``outside_lungs_margin``: the lungs grown by this fraction of the side first, so that the pleura,
            hila and costophrenic angles stay. Not an :class:`Augmenter` step: it needs the mask, and draws from a
            generator of its own, so every other draw of a sample is the same with it or without it.
    """

    rotate_p: float = 0.5
    rotate_deg: float = 7.0
    shift_p: float = 0.5
    shift_frac: float = 0.05
    scale_p: float = 0.5
    scale_frac: float = 0.1
    brightness_p: float = 0.4
    brightness: float = 0.08
    contrast_p: float = 0.4
    contrast: float = 0.15
    gamma_p: float = 0.3
    gamma: float = 0.25
    noise_p: float = 0.2
    noise_std: float = 0.02
    blur_p: float = 0.15
    blur_sigma: float = 1.0
    downsample_p: float = 0.15
    downsample_min: float = 0.5
    outside_lungs_p: float = 0.0
    outside_lungs_margin: float = 0.03

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
                raise ValueError(f"augment.{item.name}: expected a finite number, found {value!r}")
            if item.name.endswith("_p") and not 0.0 <= value <= 1.0:
                raise ValueError(f"augment.{item.name}: expected a probability in [0, 1], found {value}")
            if value < 0:
                raise ValueError(f"augment.{item.name}: expected a value >= 0, found {value}")
        if not 0.0 < self.downsample_min <= 1.0:
            raise ValueError(f"augment.downsample_min: expected a factor in (0, 1], found {self.downsample_min}")
        if self.scale_frac >= 1.0:
            raise ValueError(f"augment.scale_frac: expected a value < 1, found {self.scale_frac}")
        if self.outside_lungs_margin >= 0.5:
            raise ValueError(f"augment.outside_lungs_margin: expected a fraction of the side < 0.5, found "
                             f"{self.outside_lungs_margin}")

    @classmethod
    def none(cls) -> AugmentConfig:
        """A configuration with every probability 0 (identity)."""
        return cls(**{item.name: 0.0 for item in fields(cls) if item.name.endswith("_p")})


def affine_matrix(size: int, angle_deg: float, scale: float, shift: tuple[float, float]) -> np.ndarray:
    """The 2x3 warp matrix: rotation and zoom about the centre, then a shift ``(dx, dy)`` in pixels.

    Raises:
        ValueError: the matrix would reflect the image (non-positive determinant).
    """
    if scale <= 0:
        raise ValueError(f"scale must be positive, found {scale}")
    centre = ((size - 1) / 2.0, (size - 1) / 2.0)
    matrix = cv2.getRotationMatrix2D(centre, angle_deg, scale)
    matrix[:, 2] += np.asarray(shift, dtype=np.float64)
    if np.linalg.det(matrix[:, :2]) <= 0:
        raise ValueError("the augmentation matrix would mirror the image")
    return matrix


class Augmenter:
    """Applies :class:`AugmentConfig` to uint8 square images.

    Args:
        config: probabilities and magnitudes.
    """

    def __init__(self, config: AugmentConfig | None = None) -> None:
        self.config = config or AugmentConfig()

    def __call__(self, image: np.ndarray, rng: np.random.Generator, training: bool = True) -> np.ndarray:
        """The augmented uint8 image (same shape); ``image`` itself when ``training`` is False."""
        if not training:
            return image
        if image.dtype != np.uint8 or image.ndim != 2:
            raise ValueError(f"expected a 2-D uint8 image, found {image.dtype} {image.shape}")
        c = self.config
        fire = rng.random(9)
        out = self._geometry(image, rng, fire[:3])
        out = self._resolution(out, rng, fire[3], fire[4]).astype(np.float32)
        if fire[5] < c.brightness_p:
            out += rng.uniform(-c.brightness, c.brightness) * 255.0
        if fire[6] < c.contrast_p:
            mean = float(out.mean())
            out = (out - mean) * rng.uniform(1 - c.contrast, 1 + c.contrast) + mean
        if fire[7] < c.gamma_p:
            exponent = math.exp(rng.uniform(-math.log1p(c.gamma), math.log1p(c.gamma)))
            out = 255.0 * (np.clip(out, 0, 255) / 255.0) ** exponent
        if fire[8] < c.noise_p:
            out += rng.normal(0.0, c.noise_std * 255.0, size=out.shape).astype(np.float32)
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)

    def _geometry(self, image: np.ndarray, rng: np.random.Generator, fire: np.ndarray) -> np.ndarray:
        """Rotation, shift and scale in one warp (border 0); the input when none fires."""
        c = self.config
        size = image.shape[0]
        angle = rng.uniform(-c.rotate_deg, c.rotate_deg) if fire[0] < c.rotate_p else 0.0
        shift = tuple(rng.uniform(-c.shift_frac, c.shift_frac, size=2) * size) if fire[1] < c.shift_p else (0.0, 0.0)
        scale = rng.uniform(1 - c.scale_frac, 1 + c.scale_frac) if fire[2] < c.scale_p else 1.0
        if angle == 0.0 and scale == 1.0 and shift == (0.0, 0.0):
            return image
        matrix = affine_matrix(size, angle, scale, (float(shift[0]), float(shift[1])))
        return cv2.warpAffine(
            image,
            matrix,
            (image.shape[1], size),
            flags=cv2.INTER_LINEAR,
            borderMode=cv2.BORDER_CONSTANT,
            borderValue=0,
        )

    def _resolution(
        self, image: np.ndarray, rng: np.random.Generator, fire_down: float, fire_blur: float
    ) -> np.ndarray:
        """Resolution drop (area down, linear up) and Gaussian blur, each when it fires."""
        c = self.config
        out = image
        if fire_down < c.downsample_p:
            factor = rng.uniform(c.downsample_min, 1.0)
            h, w = out.shape
            small = cv2.resize(
                out, (max(1, round(w * factor)), max(1, round(h * factor))), interpolation=cv2.INTER_AREA
            )
            out = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
        if fire_blur < c.blur_p and c.blur_sigma > 0:
            sigma = rng.uniform(0.3, max(0.3, c.blur_sigma))
            out = cv2.GaussianBlur(out, (0, 0), sigmaX=sigma)
        return out
