"""Input-gate data step: the images the gate learns "frontal chest / lateral / other" from.

Three sources of examples:
- real radiographs of known view: cohort manifests whose rows are all frontal, or that name the view per row
  (``../shared/data/views``: ``L``, ``PA``, ``AP``);
- **generated patterns** that a modality or a broken pipeline can send with chest tags: uniform fields,
  checkerboards, stripes, gradients, noise, smooth blobs, geometric shapes, tiny images blown up;
- **chest images made wrong**: rotated by 90, 180 or 270 degrees, turned upside down, or with the grey
  scale inverted. A left-right mirror is *not* among them: a mirrored chest is still a frontal chest
  (situs inversus exists, and some sites display AP images mirrored), so the gate must not refuse it.

Everything here is numpy: a pattern is drawn from a seeded generator, so a sample is reproducible from its
key alone (``pattern:<kind>:<seed>``).
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

FRONTAL, LATERAL, OTHER = "Frontal chest", "Lateral chest", "Other"
GATE_LABELS: tuple[str, ...] = (FRONTAL, LATERAL, OTHER)
"""The gate's outputs, in the order of the model's logits."""

VIEW_CLASSES = {"PA": FRONTAL, "AP": FRONTAL, "FRONTAL": FRONTAL, "L": LATERAL, "LL": LATERAL, "LATERAL": LATERAL}


class GateDataError(ValueError):
    """A gate source manifest is missing, lacks a column, or names a view the gate does not know."""


@dataclass(frozen=True)
class Sample:
    """One gate example.

    Attributes:
        key: unique name: the image path (with ``|<transform>`` for a transformed one) or ``pattern:<kind>:<seed>``.
        label: one of ``GATE_LABELS``.
        group: what must stay in one fold (the patient; a transformed image keeps its source's group).
        source: the cohort name, ``pattern`` or ``transform:<name>``.
        path: the image file, or None for a pattern.
        transform: a key of ``TRANSFORMS`` applied to the image, or "".
    """

    key: str
    label: str
    group: str
    source: str
    path: str | None = None
    transform: str = ""


# -- chest images made wrong ------------------------------------------------------------------------------


def _invert(image: np.ndarray) -> np.ndarray:
    return (1.0 - image).astype(np.float32)


TRANSFORMS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "rot90": lambda image: np.rot90(image, 1),
    "rot180": lambda image: np.rot90(image, 2),
    "rot270": lambda image: np.rot90(image, 3),
    "upside_down": lambda image: image[::-1],
    "inverted": _invert,
}
"""Transforms that make a chest radiograph something the model must not score (no left-right mirror)."""


# -- generated patterns -------------------------------------------------------------------------------------


def _shape(rng: np.random.Generator) -> tuple[int, int]:
    side = int(rng.integers(256, 1025))
    aspect = float(rng.uniform(0.6, 1.6))
    return side, max(64, int(side * aspect))


def _uniform(rng: np.random.Generator) -> np.ndarray:
    rows, cols = _shape(rng)
    level = float(rng.choice([0.0, 1.0, rng.uniform(0, 1)]))
    return np.full((rows, cols), level, dtype=np.float32)


def _checkerboard(rng: np.random.Generator) -> np.ndarray:
    rows, cols = _shape(rng)
    cell = int(rng.integers(2, 129))
    yy, xx = np.indices((rows, cols))
    board = ((yy // cell + xx // cell) % 2).astype(np.float32)
    lo, hi = sorted(rng.uniform(0, 1, 2))
    return lo + (hi - lo) * board


def _stripes(rng: np.random.Generator) -> np.ndarray:
    rows, cols = _shape(rng)
    period = float(rng.uniform(3, 160))
    angle = float(rng.choice([0.0, 90.0, rng.uniform(0, 180)]))
    yy, xx = np.indices((rows, cols), dtype=np.float32)
    t = xx * np.cos(np.radians(angle)) + yy * np.sin(np.radians(angle))
    wave = np.sin(2 * np.pi * t / period)
    wave = (wave > 0).astype(np.float32) if rng.random() < 0.5 else (wave + 1) / 2
    return wave.astype(np.float32)


def _gradient(rng: np.random.Generator) -> np.ndarray:
    rows, cols = _shape(rng)
    yy, xx = np.indices((rows, cols), dtype=np.float32)
    if rng.random() < 0.6:
        angle = np.radians(rng.uniform(0, 360))
        t = xx * np.cos(angle) + yy * np.sin(angle)
    else:
        cy, cx = rng.uniform(0, rows), rng.uniform(0, cols)
        t = np.hypot(yy - cy, xx - cx)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    return (t ** rng.uniform(0.5, 2.0)).astype(np.float32)


def _noise(rng: np.random.Generator) -> np.ndarray:
    rows, cols = _shape(rng)
    if rng.random() < 0.5:
        return rng.uniform(0, 1, (rows, cols)).astype(np.float32)
    return np.clip(rng.normal(rng.uniform(0.3, 0.7), rng.uniform(0.05, 0.3), (rows, cols)), 0, 1).astype(np.float32)


def _blobs(rng: np.random.Generator) -> np.ndarray:
    """Smooth random field: noise low-passed at a random scale (clouds, not anatomy)."""
    rows, cols = _shape(rng)
    small = rng.normal(0, 1, (max(2, rows // int(rng.integers(8, 64))), max(2, cols // int(rng.integers(8, 64)))))
    field = cv2.resize(small.astype(np.float32), (cols, rows), interpolation=cv2.INTER_CUBIC)
    field = (field - field.min()) / max(float(field.max() - field.min()), 1e-6)
    return field.astype(np.float32)


def _shapes(rng: np.random.Generator) -> np.ndarray:
    """Rectangles, ellipses and lines on a flat background (a test object, a phantom, a form)."""
    rows, cols = _shape(rng)
    canvas = np.full((rows, cols), float(rng.uniform(0, 1)), dtype=np.float32)
    for _ in range(int(rng.integers(1, 12))):
        colour = float(rng.uniform(0, 1))
        p1 = (int(rng.integers(0, cols)), int(rng.integers(0, rows)))
        p2 = (int(rng.integers(0, cols)), int(rng.integers(0, rows)))
        kind = rng.integers(0, 3)
        if kind == 0:
            cv2.rectangle(canvas, p1, p2, colour, -1 if rng.random() < 0.6 else int(rng.integers(1, 8)))
        elif kind == 1:
            axes = (int(rng.integers(5, cols // 2 + 6)), int(rng.integers(5, rows // 2 + 6)))
            cv2.ellipse(canvas, p1, axes, float(rng.uniform(0, 180)), 0, 360, colour, -1)
        else:
            cv2.line(canvas, p1, p2, colour, int(rng.integers(1, 12)))
    return canvas


def _tiny(rng: np.random.Generator) -> np.ndarray:
    """A handful of pixels blown up (an 8 x 8 image scaled to a radiograph's size)."""
    n = int(rng.integers(2, 17))
    small = rng.uniform(0, 1, (n, n)).astype(np.float32)
    rows, cols = _shape(rng)
    interp = cv2.INTER_NEAREST if rng.random() < 0.5 else cv2.INTER_LINEAR
    return cv2.resize(small, (cols, rows), interpolation=interp)


PATTERNS: dict[str, Callable[[np.random.Generator], np.ndarray]] = {
    "uniform": _uniform,
    "checkerboard": _checkerboard,
    "stripes": _stripes,
    "gradient": _gradient,
    "noise": _noise,
    "blobs": _blobs,
    "shapes": _shapes,
    "tiny": _tiny,
}
"""Generated non-radiographs by kind: ``PATTERNS[kind](rng)`` -> float32 image in [0, 1]."""


def pattern(kind: str, seed: int) -> np.ndarray:
    """The pattern ``kind`` drawn from ``seed``; with probability 0.3 some noise on top."""
    rng = np.random.default_rng([seed, sorted(PATTERNS).index(kind)])
    image = PATTERNS[kind](rng)
    if kind not in ("uniform", "tiny") and rng.random() < 0.3:
        image = np.clip(image + rng.normal(0, rng.uniform(0.01, 0.08), image.shape), 0, 1).astype(np.float32)
    return np.ascontiguousarray(image, dtype=np.float32)


# -- real images of known view ------------------------------------------------------------------------------


def read_view_manifest(
    csv_path: str | Path,
    name: str,
    *,
    view: str = "",
    view_column: str = "",
    group_column: str = "",
    image_column: str = "image",
) -> list[Sample]:
    """Rows of a cohort manifest as gate samples (paths resolved as the training cohorts resolve them).

    Args:
        csv_path: the manifest CSV.
        name: the cohort's name.
        view: ``frontal`` or ``lateral`` for every row; or empty and ``view_column`` names the column with
            ``PA``/``AP``/``L`` per row.
        group_column: the patient column; empty: every image is its own group.
        image_column: the column with the image path (relative to the CSV's folder or its parent).

    Raises:
        GateDataError: a missing file or column, or a view the gate does not know (named with the row).
    """
    csv_path = Path(csv_path).resolve()
    if not csv_path.is_file():
        raise GateDataError(f"gate source {name}: manifest {csv_path} does not exist")
    if bool(view) == bool(view_column):
        raise GateDataError(f"gate source {name}: give exactly one of view and view_column")
    with csv_path.open(newline="", encoding="utf-8-sig") as handle:
        rows = list(csv.DictReader(handle))
    needed = [c for c in (image_column, view_column, group_column) if c]
    missing = [c for c in needed if rows and c not in rows[0]]
    if missing:
        raise GateDataError(f"gate source {name}: {csv_path} lacks column(s) {missing}")
    samples = []
    for line, row in enumerate(rows, start=2):
        raw_view = (row[view_column] if view_column else view).strip().upper()
        label = VIEW_CLASSES.get(raw_view)
        if label is None:
            raise GateDataError(f"gate source {name}: {csv_path} line {line}: view {raw_view!r} is not one of "
                                f"{sorted(VIEW_CLASSES)}")
        path = _resolve(csv_path, row[image_column])
        group = f"{name}:{row[group_column]}" if group_column else f"{name}:{row[image_column]}"
        samples.append(Sample(key=str(path), label=label, group=group, source=name, path=str(path)))
    return samples


def _resolve(csv_path: Path, ref: str) -> Path:
    for base in (csv_path.parent, csv_path.parent.parent):
        candidate = base / ref
        if candidate.is_file():
            return candidate
    raise GateDataError(f"{csv_path}: image {ref} not found next to the manifest or in its parent folder")


def pattern_samples(count: int, seed: int) -> list[Sample]:
    """``count`` generated patterns, the kinds in turn, each its own group."""
    kinds = sorted(PATTERNS)
    out = []
    for i in range(count):
        kind = kinds[i % len(kinds)]
        key = f"pattern:{kind}:{seed * 1_000_003 + i}"
        out.append(Sample(key=key, label=OTHER, group=key, source="pattern"))
    return out


def transformed_samples(sources: list[Sample], count: int, seed: int) -> list[Sample]:
    """``count`` transformed copies of randomly chosen ``sources`` (transforms in turn); label Other."""
    rng = np.random.default_rng(seed)
    names = sorted(TRANSFORMS)
    picks = rng.choice(len(sources), size=min(count, len(sources) * len(names)), replace=count > len(sources))
    out = []
    for i, pick in enumerate(picks):
        src = sources[int(pick)]
        name = names[i % len(names)]
        out.append(Sample(key=f"{src.key}|{name}", label=OTHER, group=src.group, source=f"transform:{name}",
                          path=src.path, transform=name))
    return list({s.key: s for s in out}.values())


def load_sample(sample: Sample, read: Callable[[str], np.ndarray]) -> np.ndarray:
    """The float image of a sample, before preprocessing (``read`` opens a file as ``ai.pixels`` does)."""
    if sample.path is None:
        _, kind, seed = sample.key.split(":")
        return pattern(kind, int(seed))
    image = read(sample.path)
    if sample.transform:
        image = TRANSFORMS[sample.transform](image)
    return np.ascontiguousarray(image, dtype=np.float32)
