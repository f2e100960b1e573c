"""Lung regions on the model input and the ``augment.outside_lungs_p`` training step (training.lungs)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from ai.pixels import read_image_file
from ai.preprocess import Letterbox, PreprocessSpec, preprocess_gray
from training.augment import AugmentConfig, Augmenter
from training.config import ConfigError, with_overrides
from training.data import CxrDataset, PreprocessCache, sample_rng
from training.fit import fit
from training.gate import load_gate_config
from training.lungs import FIELD, LUNGS, OUTSIDE_LUNGS_STREAM, PADDING, OutsideLungs, grow_lungs, regions_on_input
from training.prepare import prepare_run

from .test_blackout_cli import COLS, LEFT_LUNG, RIGHT_LUNG, ROWS, make_masked_cohort
from .test_loop import make_cohort, tiny_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_a_mask_lands_where_the_letterbox_puts_its_pixels() -> None:
    """A disc drawn on a half-size mask: after the image's own field crop and letterbox its centre and area are
    where the letterbox's scale and offset put them; the padding stays PADDING, the rest of the field FIELD."""
    y0, y1, x0, x1 = 30, 270, 50, 350  # a field cropped out of a 300 x 400 source, letterboxed as the node does
    scale = 64 / max(y1 - y0, x1 - x0)
    rows = round((y1 - y0) * scale)
    box = Letterbox(field=(y0, y1, x0, x1), scale=scale, offset=((64 - rows) // 2, 0), size=64, source_shape=(300, 400))
    mask = np.zeros((150, 200), np.uint8)  # half the source size: resized first, as the blackout audit does
    cv2.circle(mask, (100, 75), 30, 255, -1)  # centre (150, 200) and radius 60 in source pixels
    regions = regions_on_input(mask, box)
    top, left = box.offset
    cy, cx = (150 - y0) * box.scale + top, (200 - x0) * box.scale + left
    assert regions[round(cy), round(cx)] == LUNGS
    area = (regions == LUNGS).sum()
    assert area == pytest.approx(np.pi * (60 * box.scale) ** 2, rel=0.12)
    ys, xs = np.nonzero(regions == LUNGS)
    assert ys.mean() == pytest.approx(cy, abs=1.0) and xs.mean() == pytest.approx(cx, abs=1.0)
    rows, cols = box.content_shape
    content = np.zeros_like(regions, dtype=bool)
    content[top : top + rows, left : left + cols] = True
    assert (regions[~content] == PADDING).all() and (regions[content] != PADDING).all()
    assert (regions == FIELD).sum() == content.sum() - area


def test_growing_the_lungs_never_reaches_into_the_padding() -> None:
    regions = np.full((40, 40), PADDING, np.uint8)
    regions[:, 10:30] = FIELD
    regions[15:25, 12:20] = LUNGS
    grown = grow_lungs(regions, 0.1)  # 4 pixels
    assert (grown[regions == PADDING] == PADDING).all()
    assert (grown[regions == LUNGS] == LUNGS).all()
    assert grown[20, 23] == LUNGS and grown[20, 25] == FIELD  # 3 pixels right of the lungs' edge, then 5
    assert grown[11, 16] == LUNGS and grown[10, 16] == FIELD
    assert np.array_equal(grow_lungs(regions, 0.0), regions)


def test_the_step_fills_the_field_outside_the_lungs_with_its_median_and_nothing_else() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (32, 32), dtype=np.uint8)
    regions = np.full((32, 32), PADDING, np.uint8)
    regions[:, 4:28] = FIELD
    regions[8:24, 8:24] = LUNGS
    out = OutsideLungs(1.0)(image, regions, np.random.default_rng(1))
    assert (out[regions == FIELD] == np.uint8(np.median(image[regions == FIELD]))).all()
    assert np.array_equal(out[regions != FIELD], image[regions != FIELD])
    assert OutsideLungs(0.0)(image, regions, np.random.default_rng(1)) is image
    no_mask = np.zeros_like(regions)  # an image without a lung mask
    assert OutsideLungs(1.0)(image, no_mask, np.random.default_rng(1)) is image
    # one uniform number per call, whether it fires or not
    for p in (0.0, 1.0):
        used, fresh = np.random.default_rng(5), np.random.default_rng(5)
        OutsideLungs(p)(image, regions, used)
        fresh.random()
        assert used.random() == fresh.random()


def _masked_images(tmp_path: Path) -> tuple[np.ndarray, np.ndarray, PreprocessSpec]:
    csv_path = make_masked_cohort(tmp_path / "dev", "dev", 4, 0, unmasked=2)
    rows = list(csv.DictReader(csv_path.open()))
    spec = PreprocessSpec(size=64, field_detection=False)
    cache = PreprocessCache(tmp_path / "cache", spec)
    paths = [csv_path.parent / r["image"] for r in rows]
    masks = [csv_path.parent / r["lung_mask"] if r["lung_mask"] else None for r in rows]
    regions = cache.load_regions(paths, masks)
    assert np.array_equal(regions, cache.load_regions(paths, masks))  # read back from the cache alike
    return cache.load_many(paths), regions, spec


def test_the_cached_regions_of_a_cohort_follow_its_masks(tmp_path: Path) -> None:
    """The masked cohort's source images are 80 x 64 with masks at half size; both lungs of the mask land on the
    letterboxed input; the two images without a mask get maps no step changes."""
    _, regions, spec = _masked_images(tmp_path)
    assert (regions[-2:] == PADDING).all() and (regions[:-2] == LUNGS).any(axis=(1, 2)).all()
    scale = spec.size / max(ROWS, COLS)
    left = (spec.size - round(COLS * scale)) // 2
    for y0, y1, x0, x1 in (LEFT_LUNG, RIGHT_LUNG):
        centre = (round((y0 + y1) / 2 * scale), round((x0 + x1) / 2 * scale) + left)
        assert regions[0][centre] == LUNGS


def test_the_dataset_changes_nothing_but_the_field_outside_the_lungs(tmp_path: Path) -> None:
    """With the step off (p = 0) every item is the plain dataset's, bit for bit: the step's generator is its own,
    so every augmentation draw stays. With p = 1 an item is the augmenter applied to the filled image with that
    same sample generator; an image without a mask is as before."""
    images, regions, spec = _masked_images(tmp_path)
    y = np.zeros((len(images), 1), np.float32)
    augmenter = Augmenter(AugmentConfig(noise_p=1.0, brightness_p=1.0, rotate_p=1.0))

    def dataset(p: float | None) -> CxrDataset:
        step = None if p is None else OutsideLungs(p)
        data = CxrDataset(images, y, spec, augmenter, seed=4, regions=None if p is None else regions,
                          outside_lungs=step)
        data.set_epoch(2)
        return data

    plain, off, on = dataset(None), dataset(0.0), dataset(1.0)
    for i in range(len(images)):
        assert torch.equal(plain[i][0], off[i][0])
    for i in range(len(images)):
        filled = OutsideLungs(1.0)(images[i], regions[i], np.random.default_rng([4, 2, i, OUTSIDE_LUNGS_STREAM]))
        augmented = augmenter(filled, sample_rng(4, 2, i))
        expected = CxrDataset(augmented[None], y[:1], spec)[0][0]
        assert torch.equal(on[i][0], expected)
        assert torch.equal(on[i][0], plain[i][0]) == (i >= len(images) - 2)  # unmasked: unchanged
    with pytest.raises(ValueError, match="come together"):
        CxrDataset(images, y, spec, augmenter, regions=regions)


def test_a_run_with_the_step_trains_and_says_how_many_images_it_covers(tmp_path: Path) -> None:
    dev = make_masked_cohort(tmp_path / "dev", "dev", 8, 0, unmasked=2)
    ext = make_masked_cohort(tmp_path / "ext", "ext", 3, 1)
    augment = AugmentConfig(outside_lungs_p=0.5, outside_lungs_margin=0.05)
    config = tiny_config((dev, ext), run_folds=(0,), epochs_head=1, epochs_finetune=1, augment=augment)
    fit(config, tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "cohorts.json").read_text())["outside_lungs"]
    assert summary["images_with_lung_mask"] == 14 and summary["images"] == 16
    assert 0.2 < summary["mean_lung_share_of_field"] < 0.9
    data = prepare_run(config, tmp_path / "run")
    assert data.regions is not None
    grown, plain = (data.regions == LUNGS).sum(), (
        prepare_run(with_overrides(config, augment=AugmentConfig(outside_lungs_p=0.5, outside_lungs_margin=0.0)),
                    tmp_path / "run").regions == LUNGS).sum()
    assert grown > plain  # the margin grew the lungs
    assert prepare_run(with_overrides(config, augment=AugmentConfig()), tmp_path / "run").regions is None
    no_masks = make_cohort(tmp_path / "plain", "plain", 6, 2)
    with pytest.raises(ConfigError, match="outside_lungs_p: expected lung masks"):
        fit(with_overrides(config, train=tiny_config((no_masks, ext)).train), tmp_path / "refused")


def test_a_margin_of_half_the_side_or_more_is_refused() -> None:
    with pytest.raises(ValueError, match="outside_lungs_margin"):
        AugmentConfig(outside_lungs_margin=0.5)
    with pytest.raises(ValueError, match="outside_lungs_p: expected a probability"):
        AugmentConfig(outside_lungs_p=1.5)


def test_the_view_gate_refuses_the_step(tmp_path: Path) -> None:
    path = tmp_path / "gate.toml"
    path.write_text('[[sources]]\nname = "a"\ncsv = "a.csv"\n\n[augment]\noutside_lungs_p = 0.3\n')
    with pytest.raises(ValueError, match="the view gate trains without lung masks"):
        load_gate_config(path)


@pytest.mark.parametrize("cohort", ["shenzhen", "montgomery"])
def test_real_lung_masks_land_inside_the_field(data_dir: Path, cohort: str) -> None:
    """Real images with their masks at 320 px: the lungs lie inside the letterboxed field and cover a plausible
    share of it."""
    rows = [r for r in csv.DictReader((data_dir / "tb" / f"{cohort}.csv").open()) if r["lung_mask"]][:3]
    spec = PreprocessSpec(size=320)
    for row in rows:
        _, box = preprocess_gray(read_image_file(data_dir / row["image"]), spec)
        regions = regions_on_input(read_image_file(data_dir / row["lung_mask"]), box)
        lungs, field = (regions == LUNGS).sum(), (regions != PADDING).sum()
        assert 0.08 < lungs / field < 0.6, f"{row['image']}: lung share {lungs / field:.2f}"
