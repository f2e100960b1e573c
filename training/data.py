"""Data step: read a cohort manifest, cache the node's preprocessed pixels, serve training samples.

A cohort manifest is a CSV with one row per image:

- ``image`` (required): path of a DICOM, PNG or JPEG file, absolute, or relative to the CSV's folder,
  or relative to the folder above it (the shared data's ``tb/shenzhen.csv`` names
  ``tb/shenzhen/images/...`` relative to the data root);
- ``patient_id`` (required, non-empty): folds are grouped by it;
- ``site`` (required): acquisition site, kept for subgroup analyses;
- one ``label_<Label>`` column per label (spellings per :mod:`training.labels`): ``1``, ``0`` or
  empty (= unknown; masked out of losses and metrics). At least one is required;
- optional ``age`` (number or empty), ``sex`` (free text), ``lung_mask`` (a path like ``image``).

Pixels: :class:`PreprocessCache` runs ``ai.pixels.read_image_file`` + ``ai.preprocess.preprocess_gray``
(the one preprocessing the node uses) once per file and spec, and keeps the uint8 SxS result as a
``.npy`` file. :class:`CxrDataset` applies the training augmentation to that uint8 image and then
``ai.preprocess.to_model_input``, so training sees exactly the pixels the node will see.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from storage.files import write_atomic
from training.labels import LabelError, canonical_label, canonical_labels, label_columns

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("image", "patient_id", "site")  # patient and site columns: see load_cohort
_POSITIVE = {"1", "1.0"}
_NEGATIVE = {"0", "0.0"}


class CohortError(ValueError):
    """A cohort manifest is invalid: missing column or file, bad label value, duplicate image."""


@dataclass(frozen=True)
class Cohort:
    """One cohort: images with patient, site, labels and demographics, row order as in the CSV.

    Attributes:
        name: cohort name (``shenzhen``); used in prediction file names.
        csv_path: the manifest it was read from.
        labels: canonical label names, the column order of ``y``.
        images: the ``image`` values as written in the CSV (the key of prediction CSVs).
        paths: resolved absolute file paths.
        patient_ids: patient identifier per image.
        sites: site per image.
        y: float32 ``[N, L]``: 1, 0 or NaN (unknown).
        ages: float ``[N]``, NaN where unknown.
        sexes: sex per image, empty where unknown.
        masks: resolved lung-mask path per image, or None.
    """

    name: str
    csv_path: Path
    labels: tuple[str, ...]
    images: tuple[str, ...]
    paths: tuple[Path, ...]
    patient_ids: tuple[str, ...]
    sites: tuple[str, ...]
    y: np.ndarray
    ages: np.ndarray
    sexes: tuple[str, ...]
    masks: tuple[Path | None, ...]

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, index: Sequence[int] | np.ndarray) -> Cohort:
        """The rows ``index`` (in that order) as a new cohort."""
        idx = [int(i) for i in index]
        return replace(
            self,
            images=tuple(self.images[i] for i in idx),
            paths=tuple(self.paths[i] for i in idx),
            patient_ids=tuple(self.patient_ids[i] for i in idx),
            sites=tuple(self.sites[i] for i in idx),
            y=self.y[idx],
            ages=self.ages[idx],
            sexes=tuple(self.sexes[i] for i in idx),
            masks=tuple(self.masks[i] for i in idx),
        )

    def with_labels(self, labels: Sequence[str]) -> Cohort:
        """The same rows with label columns ``labels`` (canonical order); absent labels are all unknown."""
        wanted = tuple(canonical_label(label) for label in labels)
        y = np.full((len(self), len(wanted)), np.nan, dtype=np.float32)
        for j, label in enumerate(wanted):
            if label in self.labels:
                y[:, j] = self.y[:, self.labels.index(label)]
        return replace(self, labels=wanted, y=y)

    def prevalence(self) -> dict[str, float]:
        """Fraction of positives among the known values, per label (NaN when none is known)."""
        out = {}
        for j, label in enumerate(self.labels):
            known = self.y[~np.isnan(self.y[:, j]), j]
            out[label] = float(known.mean()) if known.size else math.nan
        return out

    def summary(self) -> dict[str, Any]:
        """Counts for reports and the model manifest's data summary (no patient-identifying values)."""
        per_label = {}
        for j, label in enumerate(self.labels):
            col = self.y[:, j]
            per_label[label] = {
                "positive": int(np.sum(col == 1)),
                "negative": int(np.sum(col == 0)),
                "unknown": int(np.sum(np.isnan(col))),
            }
        return {
            "name": self.name,
            "images": len(self),
            "patients": len(set(self.patient_ids)),
            "sites": sorted(set(self.sites)),
            "labels": per_label,
        }


def combine_cohorts(cohorts: Sequence[Cohort]) -> tuple[Cohort, np.ndarray]:
    """Several training cohorts as one (rows in cohort order) and the source cohort of every row.

    Patient keys become ``<cohort>:<patient>`` so that two cohorts' patient numbering cannot merge
    patients; image keys must be unique across the cohorts (they key the prediction CSVs).

    Raises:
        CohortError: cohorts with different label columns, or an image listed by two cohorts.
    """
    if len(cohorts) == 1:
        return cohorts[0], np.full(len(cohorts[0]), cohorts[0].name)
    labels = cohorts[0].labels
    if any(c.labels != labels for c in cohorts):
        raise CohortError(f"cohorts to combine must have the same label columns, found {[c.labels for c in cohorts]}")
    owner: dict[str, str] = {}
    for c in cohorts:
        for image in c.images:
            if image in owner:
                raise CohortError(f"image {image!r} is listed by cohorts {owner[image]!r} and {c.name!r}")
            owner[image] = c.name
    combined = Cohort(
        name="+".join(c.name for c in cohorts),
        csv_path=cohorts[0].csv_path,
        labels=labels,
        images=tuple(i for c in cohorts for i in c.images),
        paths=tuple(p for c in cohorts for p in c.paths),
        patient_ids=tuple(f"{c.name}:{pid}" for c in cohorts for pid in c.patient_ids),
        sites=tuple(site for c in cohorts for site in c.sites),
        y=np.concatenate([c.y for c in cohorts]),
        ages=np.concatenate([c.ages for c in cohorts]),
        sexes=tuple(sex for c in cohorts for sex in c.sexes),
        masks=tuple(m for c in cohorts for m in c.masks),
    )
    return combined, np.concatenate([np.full(len(c), c.name) for c in cohorts])


def load_cohort(
    csv_path: str | Path,
    name: str | None = None,
    root: str | Path | None = None,
    labels: Sequence[str] | None = None,
    check_files: bool = True,
    patient_column: str = "patient_id",
    site: str = "",
    label_columns: Mapping[str, str] | None = None,
    patient_pattern: str = "",
) -> Cohort:
    """Read and validate a cohort manifest.

    Args:
        csv_path: the manifest CSV.
        name: cohort name; defaults to the CSV's file stem.
        root: folder that relative paths start from; default: the CSV's folder, then its parent
            (the first where the file exists, decided per row).
        labels: keep exactly these labels in this order (absent ones become unknown); default: the
            manifest's ``label_*`` columns in header order.
        check_files: require every image and lung-mask file to exist.
        patient_column: the column that groups images by patient.
        site: the site of every image, for a manifest without a ``site`` column (which it may not have
            when ``site`` is given).
        label_columns: ``{column: label}``: exactly these columns are the labels (spelled as any label
            spelling, see ``training.labels``); default: the manifest's ``label_*`` columns.
        patient_pattern: a regular expression taking the patient out of ``patient_column``'s value (its first
            match; a value without one stays whole).

    Returns:
        The validated cohort.

    Raises:
        CohortError: a missing column or file, an invalid label or age value, an empty patient id,
            a duplicated image; the message names the CSV, the row and the column.
    """
    csv_path = Path(csv_path).resolve()
    if not csv_path.is_file():
        raise CohortError(f"cohort manifest {csv_path} does not exist")
    with csv_path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        header = list(reader.fieldnames or [])
        rows = list(reader)
    columns = _check_header(csv_path, header, patient_column, site, label_columns)
    if patient_column != "patient_id" or site or patient_pattern:
        rows = [{**row, "patient_id": _patient(row.get(patient_column) or "", patient_pattern),
                 **({"site": site} if site else {})} for row in rows]
    bases = [Path(root).resolve()] if root is not None else [csv_path.parent, csv_path.parent.parent]
    cohort = _parse_rows(csv_path, name or csv_path.stem, rows, columns, bases, check_files, patient_column)
    return cohort.with_labels(labels) if labels is not None else cohort


def _patient(value: str, pattern: str) -> str:
    """The patient in a column's value: the first match of ``pattern``, else the value."""
    found = re.search(pattern, value) if pattern else None
    return found.group(0) if found else value


def _check_header(
    csv_path: Path, header: list[str], patient_column: str = "patient_id", site: str = "",
    mapping: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Validate the header; returns ``{canonical label: column}``."""
    required = ["image", patient_column, *([] if site else ["site"])]
    missing = [column for column in required if column not in header]
    if missing:
        raise CohortError(f"{csv_path}: missing required column(s) {missing}; found columns {header}")
    if site and "site" in header:
        raise CohortError(f"{csv_path}: has a 'site' column and the configuration gives site {site!r}; "
                          "remove one of them")
    try:
        if mapping:
            absent = [column for column in mapping if column not in header]
            if absent:
                raise LabelError(f"label column(s) {absent} not in the manifest; found columns {header}")
            found = dict(zip(canonical_labels(mapping.values()), mapping, strict=True))
            return found
        columns = label_columns(header)
    except LabelError as exc:
        raise CohortError(f"{csv_path}: {exc}") from exc
    if not columns:
        raise CohortError(f"{csv_path}: no label column; expected at least one 'label_<Label>', found {header}")
    return columns


def _parse_rows(
    csv_path: Path,
    name: str,
    rows: list[dict[str, str]],
    columns: dict[str, str],
    bases: list[Path],
    check_files: bool,
    patient_column: str = "patient_id",
) -> Cohort:
    """Turn validated rows into a :class:`Cohort`, collecting every missing file before raising."""
    if not rows:
        raise CohortError(f"{csv_path}: the manifest has a header but no rows")
    labels = tuple(columns)
    y = np.full((len(rows), len(labels)), np.nan, dtype=np.float32)
    ages = np.full(len(rows), np.nan, dtype=np.float64)
    paths: list[Path] = []
    masks: list[Path | None] = []
    missing: list[str] = []
    seen: dict[str, int] = {}
    for i, row in enumerate(rows):
        line = i + 2  # header is line 1
        image = (row.get("image") or "").strip()
        if not image:
            raise CohortError(f"{csv_path} line {line}: empty 'image'")
        if image in seen:
            raise CohortError(f"{csv_path} line {line}: image {image!r} already listed on line {seen[image]}")
        seen[image] = line
        if not (row.get("patient_id") or "").strip():
            raise CohortError(f"{csv_path} line {line}: empty {patient_column!r} for image {image!r}")
        for j, label in enumerate(labels):
            y[i, j] = _label_value(csv_path, line, columns[label], row.get(columns[label]))
        ages[i] = _age_value(csv_path, line, row.get("age"))
        paths.append(_resolve(image, bases, check_files, missing))
        mask = (row.get("lung_mask") or "").strip()
        masks.append(_resolve(mask, bases, check_files, missing) if mask else None)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CohortError(
            f"{csv_path}: {len(missing)} file(s) not found relative to {[str(b) for b in bases]}: {shown}"
        )
    return Cohort(
        name=name,
        csv_path=csv_path,
        labels=labels,
        images=tuple(row["image"].strip() for row in rows),
        paths=tuple(paths),
        patient_ids=tuple(row["patient_id"].strip() for row in rows),
        sites=tuple((row.get("site") or "").strip() for row in rows),
        y=y,
        ages=ages,
        sexes=tuple((row.get("sex") or "").strip() for row in rows),
        masks=tuple(masks),
    )


def _label_value(csv_path: Path, line: int, column: str, value: str | None) -> float:
    """1, 0 or NaN from a label cell; anything else raises naming the cell."""
    text = (value or "").strip()
    if text in _POSITIVE:
        return 1.0
    if text in _NEGATIVE:
        return 0.0
    if text == "":
        return math.nan
    raise CohortError(f"{csv_path} line {line} column {column!r}: expected 1, 0 or empty, found {text!r}")


def _age_value(csv_path: Path, line: int, value: str | None) -> float:
    """Age in years or NaN; a non-numeric value raises naming the cell."""
    text = (value or "").strip()
    if not text:
        return math.nan
    try:
        return float(text)
    except ValueError:
        raise CohortError(f"{csv_path} line {line} column 'age': expected a number or empty, found {text!r}") from None


def _resolve(ref: str, bases: list[Path], check_files: bool, missing: list[str]) -> Path:
    """Absolute path of ``ref``: as is when absolute, else the first base where it exists."""
    path = Path(ref)
    candidates = [path] if path.is_absolute() else [base / path for base in bases]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    if check_files:
        missing.append(ref)
    return candidates[0]


# ---------------------------------------------------------------------------------------------------
# Preprocessing cache
# ---------------------------------------------------------------------------------------------------


class PreprocessCache:
    """uint8 SxS images as the node's preprocessing makes them, computed once per file and spec.

    Files live in ``cache_dir/<spec digest>/<key>.npy``; the key hashes the resolved path, the file's
    size and modification time, so an edited file is preprocessed again. Writes are atomic (temporary
    file + rename), so parallel runs may share one cache folder.

    Args:
        cache_dir: the cache folder (created on first use).
        spec: an ``ai.preprocess.PreprocessSpec``.
    """

    def __init__(self, cache_dir: str | Path, spec: Any) -> None:
        self.spec = spec
        spec_json = json.dumps(spec.to_dict(), sort_keys=True)
        digest = hashlib.sha256(spec_json.encode()).hexdigest()[:16]
        self.folder = Path(cache_dir) / digest
        self.folder.mkdir(parents=True, exist_ok=True)
        spec_file = self.folder / "spec.json"
        if not spec_file.exists():
            write_atomic(spec_file, spec_json.encode())

    def key(self, path: str | Path) -> str:
        """Cache key of one file: sha256 of (resolved path, size, mtime_ns)."""
        resolved = Path(path).resolve()
        stat = resolved.stat()
        text = f"{resolved}\0{stat.st_size}\0{stat.st_mtime_ns}"
        return hashlib.sha256(text.encode()).hexdigest()

    def get(self, path: str | Path) -> np.ndarray:
        """The preprocessed uint8 ``(size, size)`` image of ``path``, from the cache or computed now."""

        def compute() -> np.ndarray:
            from ai.pixels import read_image_file
            from ai.preprocess import preprocess_gray

            return preprocess_gray(read_image_file(path), self.spec)[0]

        return self._cached(f"{self.key(path)}.npy", compute)

    def get_regions(self, path: str | Path, mask: str | Path) -> np.ndarray:
        """The lung-region map (uint8 ``(size, size)``, :func:`training.lungs.regions_on_input`) of image ``path`` and
        its lung mask ``mask``, in the geometry of :meth:`get`'s image; cached like it, keyed by both files."""

        def compute() -> np.ndarray:
            from ai.pixels import read_image_file
            from ai.preprocess import preprocess_gray
            from training.lungs import regions_on_input

            _, box = preprocess_gray(read_image_file(path), self.spec)
            return regions_on_input(read_image_file(mask), box)

        key = hashlib.sha256(f"{self.key(path)}\0{self.key(mask)}".encode()).hexdigest()
        return self._cached(f"regions-{key}.npy", compute)

    def _cached(self, name: str, compute: Callable[[], np.ndarray]) -> np.ndarray:
        """The uint8 array stored as ``name`` in the cache folder, or ``compute()``'s, stored atomically first."""
        target = self.folder / name
        if target.exists():
            try:
                return np.load(target)
            except (OSError, ValueError):
                log.warning("cache entry %s unreadable, recomputing", target.name)
        array = np.ascontiguousarray(compute(), dtype=np.uint8)
        write_atomic(target, npy_bytes(array))
        return array

    def load_regions(self, paths: Sequence[str | Path], masks: Sequence[str | Path | None], progress: bool = False,
                     desc: str = "lung regions") -> np.ndarray:
        """The region maps of all images stacked (uint8 ``[N, size, size]``); an image without a mask gets an
        all-PADDING map, which no lung step changes."""
        from tqdm import tqdm

        size = int(self.spec.size)
        out = np.zeros((len(paths), size, size), dtype=np.uint8)
        for i, (path, mask) in enumerate(tqdm(list(zip(paths, masks, strict=True)), desc=desc, disable=not progress,
                                              leave=False)):
            if mask is not None:
                out[i] = self.get_regions(path, mask)
        return out

    def load_many(self, paths: Sequence[str | Path], progress: bool = False, desc: str = "preprocess") -> np.ndarray:
        """All images stacked as uint8 ``[N, size, size]`` (in memory; 512px is 256 KiB per image)."""
        from tqdm import tqdm

        size = int(self.spec.size)
        out = np.empty((len(paths), size, size), dtype=np.uint8)
        for i, path in enumerate(tqdm(paths, desc=desc, disable=not progress, leave=False)):
            out[i] = self.get(path)
        return out


def csv_bytes(rows: Iterable[Sequence[object]]) -> bytes:
    """``rows`` as the UTF-8 bytes of a CSV file (``csv`` module defaults), for ``write_atomic``."""
    text = io.StringIO(newline="")
    csv.writer(text).writerows(rows)
    return text.getvalue().encode("utf-8")


def npy_bytes(array: np.ndarray) -> bytes:
    """``array`` as the bytes of a ``.npy`` file, for ``write_atomic``.

    Built in memory on purpose: ``np.save`` into a real file writes through a duplicated C stream whose
    close errors it ignores, so a full disk could leave a short file behind a normal return.
    """
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------------
# Dataset
# ---------------------------------------------------------------------------------------------------


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The augmentation generator of one sample in one epoch: independent of workers and resume."""
    return np.random.default_rng([seed, epoch, index])


class CxrDataset:
    """A torch-style dataset over cached uint8 images: augmentation, then the node's model input.

    Each item is ``(image float32 tensor [C, S, S] in [0, 1], labels float32 tensor [L] with NaN)``.
    Item ``i`` is image ``index[i]`` of ``images`` (all of them when ``index`` is None), so a fold's
    subset needs no copy of the pixels. Its augmentation in epoch ``e`` draws from
    ``sample_rng(seed, e, index[i])``, so a run is reproducible whatever the number of workers and
    after a resume; call :meth:`set_epoch` per epoch.

    Args:
        images: uint8 ``[N, S, S]``.
        y: float32 ``[N, L]`` (NaN = unknown), rows aligned with ``images``.
        spec: the ``PreprocessSpec`` passed to ``to_model_input``.
        augment: ``augment(image_u8, rng) -> image_u8``, or None for evaluation.
        seed: run seed.
        index: the rows of ``images`` this dataset serves, in order.
        regions: uint8 ``[N, S, S]`` lung-region maps aligned with ``images`` (:mod:`training.lungs`); given
            together with ``outside_lungs``.
        outside_lungs: the step applied before ``augment`` (``outside_lungs(image, regions[row], rng)``), whose
            generator is ``sample_rng``'s key with ``training.lungs.OUTSIDE_LUNGS_STREAM`` appended: it leaves every
            draw of ``augment`` as it is without it.
    """

    def __init__(
        self,
        images: np.ndarray,
        y: np.ndarray,
        spec: Any,
        augment: Callable[[np.ndarray, np.random.Generator], np.ndarray] | None = None,
        seed: int = 0,
        index: Sequence[int] | np.ndarray | None = None,
        regions: np.ndarray | None = None,
        outside_lungs: Callable[[np.ndarray, np.ndarray, np.random.Generator], np.ndarray] | None = None,
    ) -> None:
        if len(images) != len(y):
            raise ValueError(f"images and labels differ in length: {len(images)} vs {len(y)}")
        if (regions is None) != (outside_lungs is None):
            raise ValueError("regions and outside_lungs come together")
        if regions is not None and regions.shape != images.shape:
            raise ValueError(f"lung regions {regions.shape} do not match the images {images.shape}")
        self.regions, self.outside_lungs = regions, outside_lungs
        self.images = images
        self.y = np.asarray(y, dtype=np.float32)
        self.index = np.arange(len(images)) if index is None else np.asarray(index, dtype=np.int64)
        self.spec = spec
        self.augment = augment
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation draws of ``epoch``."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, item: int) -> tuple[Any, Any]:
        import torch

        from ai.preprocess import to_model_input

        row = int(self.index[item])
        image = self.images[row]
        if self.outside_lungs is not None and self.regions is not None:
            from training.lungs import OUTSIDE_LUNGS_STREAM

            rng = np.random.default_rng([self.seed, self.epoch, row, OUTSIDE_LUNGS_STREAM])
            image = self.outside_lungs(image, self.regions[row], rng)
        if self.augment is not None:
            image = self.augment(image, sample_rng(self.seed, self.epoch, row))
        x = to_model_input(np.ascontiguousarray(image), self.spec)
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), torch.from_numpy(self.y[row])
