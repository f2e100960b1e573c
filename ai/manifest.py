"""Model package step: read, validate and write the manifest that describes an ONNX ensemble.

A model package is a folder with ``manifest.json`` and one ``.onnx`` file per member. The manifest
carries its own contract: labels, preprocessing, members with sha256 checksums, the aggregation,
per-label operating thresholds with how they were chosen, summaries of the training data and the
evaluation, and a version. ``load_manifest`` refuses anything it cannot vouch for with a
``ModelPackageError`` that names the file and the key, the value expected and the value found.

``manifest.json`` (``FORMAT_VERSION`` 1)::

    {"format_version": 1, "name": "cxr-tb", "version": "2025.06.1", "created": "2025-06-01T12:00:00Z",
     "labels": ["Tuberculosis"],
     "preprocess": {"size": 512, "clahe_clip": 2.0, "clahe_tile": 8, "channels": 3,
                    "field_detection": true},
     "input_name": "image", "outputs": {"logits": "logits", "cam": "cam"},
     "aggregation": "mean",
     "members": [{"file": "m0.onnx", "sha256": "<64 hex>", "architecture": "resnet50",
                  "fold": 0, "weights": "imagenet"}],   # optional per member: "labels": [its outputs],
                                                          # "size": its input side when not preprocess.size
     "thresholds": {"Tuberculosis": {"value": 0.42, "method": "Youden J on OOF"}},
     "data_summary": {}, "evaluation_summary": {},
     "reference": {"Tuberculosis": {"source": "OOF ensemble", "cohort": "shenzhen", "n": 662,
                                    "prevalence": 0.508, "quantiles": [101 numbers], ...}}}

``reference`` (optional) is the score distribution the package was validated on, per label: the OOF
ensemble's scores on the training cohort that carries the label, as ``QUANTILE_POINTS`` quantiles (0 %,
1 %, ..., 100 %) of all scores and of the positives' and negatives' scores, with that cohort's prevalence. A
site's scores are compared against it (drift, label-free threshold adaptation).

``ages`` (optional) names the labels limited to an age range, e.g. ``{"Pediatric_Pneumonia":
{"from_years": 1, "below_years": 6, "population": "children aged 1-5 (Guangzhou pediatric set)"}}``: the node
reports such a label only for a patient whose age is in ``[from_years, below_years)``, and says in the SR that it
did not apply otherwise (``ai.applicability``). A patient of unknown age does not get it either, unless the entry
says ``"unknown_age": "applies"`` (a label learnt from most ages, limited only where it was never shown to work).

A member's ``size`` (optional) is the side of the square input it takes when that is not ``preprocess.size``; the
rest of the preprocessing is shared. The node preprocesses an image once per distinct size
(``ModelManifest.input_sizes``) and averages the members' outputs; their class activation maps are drawn on the
``preprocess.size`` grid, which at least one member must take (``ai.ensemble``).

``informational`` (optional) lists labels the node reports (SR group, banner, ``predict``) with their
probability and decision at their threshold, but whose positive decision does not set the image's triage flag,
e.g. ``["Effusion"]``: a finding whose specificity at the operating point is too low to sort studies. Absent,
every label sets it; at least one label must.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from itertools import pairwise
from pathlib import Path
from typing import Any

from ai.errors import ModelPackageError
from ai.preprocess import MIN_SIDE, PreprocessSpec

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
AGGREGATIONS = ("mean",)
OUTPUT_KEYS = ("logits", "cam")
REQUIRED_KEYS = ("format_version", "name", "version", "labels", "preprocess", "members", "thresholds")
OPTIONAL_KEYS = ("aggregation", "input_name", "outputs", "data_summary", "evaluation_summary", "created",
                 "reference", "ages", "informational")
AGE_KEYS = ("from_years", "below_years", "population", "unknown_age")
UNKNOWN_AGE = ("not_applicable", "applies")
MAX_AGE_YEARS = 150
REFERENCE_KEYS = ("source", "cohort", "n", "prevalence", "quantiles", "quantiles_positive", "quantiles_negative")
QUANTILE_POINTS = 101
"""Quantiles of a reference distribution: 0 %, 1 %, ..., 100 %."""
MEMBER_KEYS = ("file", "sha256", "architecture", "fold", "weights", "labels", "size")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
MAX_TEXT = 64
"""The longest ``name`` and ``version``: the node writes both into its results' DICOM LO attributes."""
CHUNK = 1 << 20
JSON_TYPE_NAMES = {str: "string", int: "integer", float: "number", list: "array", dict: "object",
                   type(None): "null", bool: "boolean"}


@dataclass(frozen=True)
class Member:
    """One ONNX model of the ensemble.

    Attributes:
        file: path of the ``.onnx`` file relative to the package folder.
        sha256: hex digest of that file.
        architecture: the architecture's registry name, e.g. ``resnet50``.
        fold: the cross-validation fold it was trained without, or None (trained on all data).
        weights: where the initial weights came from, e.g. ``imagenet`` or ``random``.
        labels: the package labels this member outputs, in its output order; None: all of them, in the
            package's order. A package may combine members of several runs (a TB-only member beside
            multi-label ones): a label's probability is the mean over the members that output it.
        size: the side of the square input this member takes; None: the package's ``preprocess.size``.
    """

    file: str
    sha256: str
    architecture: str
    fold: int | None
    weights: str
    labels: tuple[str, ...] | None = None
    size: int | None = None

    def outputs(self, package_labels: tuple[str, ...]) -> tuple[str, ...]:
        """The labels of this member's outputs, in order."""
        return self.labels if self.labels is not None else package_labels

    def input_size(self, package_size: int) -> int:
        """The side of this member's input: its own ``size``, else the package's."""
        return self.size if self.size is not None else package_size

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"file": self.file, "sha256": self.sha256, "architecture": self.architecture,
                               "fold": self.fold, "weights": self.weights}
        if self.labels is not None:
            out["labels"] = list(self.labels)
        return {**out, "size": self.size} if self.size is not None else out


@dataclass(frozen=True)
class Threshold:
    """A per-label operating threshold on the ensemble probability.

    Attributes:
        value: threshold in [0, 1]; a probability at or above it is positive.
        method: how it was chosen, e.g. ``Youden J on OOF`` or ``sensitivity 0.90 on OOF``.
    """

    value: float
    method: str


@dataclass(frozen=True)
class ScoreReference:
    """The score distribution a package was validated on, for one label (``reference`` in the manifest).

    Attributes:
        source: which scores, e.g. ``OOF ensemble``.
        cohort: the training cohort that carries the label.
        n: images with a known label.
        prevalence: the fraction of positives among them.
        quantiles: ``QUANTILE_POINTS`` non-decreasing quantiles in [0, 1] of every image's score.
        quantiles_positive: the same of the positives' scores.
        quantiles_negative: the same of the negatives' scores.
    """

    source: str
    cohort: str
    n: int
    prevalence: float
    quantiles: tuple[float, ...]
    quantiles_positive: tuple[float, ...]
    quantiles_negative: tuple[float, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "cohort": self.cohort, "n": self.n, "prevalence": self.prevalence,
                "quantiles": list(self.quantiles), "quantiles_positive": list(self.quantiles_positive),
                "quantiles_negative": list(self.quantiles_negative)}


@dataclass(frozen=True)
class AgeRange:
    """The patients a label was learnt from (``ages`` in the manifest): ages in ``[from_years, below_years)``.

    Attributes:
        from_years: the youngest age, in years, the label applies to.
        below_years: the first age, in years, it no longer applies to.
        population: who the training images came from, in words (said in the SR when the label does not apply).
        unknown_age: what a patient of unknown age gets: "not_applicable" (the strict default, for a label learnt
            from one age group only) or "applies" (for a label learnt from most ages).
    """

    from_years: float
    below_years: float
    population: str
    unknown_age: str = "not_applicable"

    def contains(self, age_years: float) -> bool:
        return self.from_years <= age_years < self.below_years

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"from_years": self.from_years, "below_years": self.below_years,
                               "population": self.population}
        if self.unknown_age != "not_applicable":  # the default is left out: older manifests write as they were
            out["unknown_age"] = self.unknown_age
        return out


@dataclass(frozen=True)
class ModelManifest:
    """The validated content of ``manifest.json`` (see the module docstring for the file)."""

    name: str
    version: str
    labels: tuple[str, ...]
    preprocess: PreprocessSpec
    members: tuple[Member, ...]
    aggregation: str = "mean"
    thresholds: dict[str, Threshold] = field(default_factory=dict)
    input_name: str = "image"
    outputs: dict[str, str] = field(default_factory=lambda: {"logits": "logits", "cam": "cam"})
    data_summary: dict[str, Any] = field(default_factory=dict)
    evaluation_summary: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    format_version: int = FORMAT_VERSION
    reference: dict[str, ScoreReference] = field(default_factory=dict)
    ages: dict[str, AgeRange] = field(default_factory=dict)
    informational: tuple[str, ...] = ()

    @property
    def input_sizes(self) -> tuple[int, ...]:
        """The distinct input sides of the members: ``preprocess.size`` first, then the others in member order."""
        size = self.preprocess.size
        return tuple(dict.fromkeys([size, *(m.input_size(size) for m in self.members)]))

    def member_spec(self, member: Member) -> PreprocessSpec:
        """The preprocessing of one member's input: the package's, at the member's size."""
        return self.spec_at(member.input_size(self.preprocess.size))

    def spec_at(self, size: int) -> PreprocessSpec:
        """The package's preprocessing at another input side."""
        return self.preprocess if size == self.preprocess.size else replace(self.preprocess, size=size)

    @property
    def same_score_versions(self) -> tuple[str, ...]:
        """Earlier versions of this package that score every image as it does, latest first: the versions it was
        reissued from with other age ranges only (``evaluation_summary.reissues``, ``cxr-train reissue``)."""
        reissues = self.evaluation_summary.get("reissues", [])
        if not isinstance(reissues, list):
            return ()
        versions = [r.get("from_version") for r in reissues if isinstance(r, dict)]
        return tuple(v for v in reversed(versions) if isinstance(v, str) and v and v != self.version)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values, in the order of the file format."""
        return {
            "format_version": self.format_version,
            "name": self.name,
            "version": self.version,
            "created": self.created,
            "labels": list(self.labels),
            "preprocess": self.preprocess.to_dict(),
            "input_name": self.input_name,
            "outputs": dict(self.outputs),
            "aggregation": self.aggregation,
            "members": [m.to_dict() for m in self.members],
            "thresholds": {k: {"value": t.value, "method": t.method} for k, t in self.thresholds.items()},
            "data_summary": self.data_summary,
            "evaluation_summary": self.evaluation_summary,
            **({"reference": {k: r.to_dict() for k, r in self.reference.items()}} if self.reference else {}),
            **({"ages": {k: a.to_dict() for k, a in self.ages.items()}} if self.ages else {}),
            **({"informational": list(self.informational)} if self.informational else {}),
        }


SITE_OVERRIDE = "site override"


def effective_thresholds(manifest: ModelManifest, overrides: Mapping[str, float]) -> dict[str, Threshold]:
    """The package's thresholds with the site's overrides applied (method ``site override``).

    Raises:
        ValueError: an override for a label the package does not have, or outside [0, 1].
    """
    out = dict(manifest.thresholds)
    for label, value in overrides.items():
        if label not in manifest.labels:
            raise ValueError(
                f"threshold override for unknown label {label!r}: expected one of {list(manifest.labels)}"
            )
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"threshold override for {label!r}: expected a number in [0, 1], got {value!r}")
        out[label] = Threshold(float(value), SITE_OVERRIDE)
    return out


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def bundled_package_dir() -> Path:
    """The default model package shipped inside the ``ai`` package (``ai/models/default``)."""
    return Path(__file__).resolve().parent / "models" / "default"


GATE_DIR_NAME = "gate"
GATE_OFF = "off"
"""``[model] gate`` value that turns the input gate off."""


def bundled_gate_dir() -> Path:
    """The input-gate package shipped with the node (``ai/models/gate``, beside the default model)."""
    return Path(__file__).resolve().parent / "models" / GATE_DIR_NAME


def member_path(package_dir: str | Path, member: Member) -> Path:
    """Absolute path of a member's ``.onnx`` file."""
    return Path(package_dir) / member.file


def write_manifest(package_dir: str | Path, manifest: ModelManifest) -> Path:
    """Write ``manifest.json`` atomically (temporary file, fsync, rename) and return its path."""
    package_dir = Path(package_dir)
    package_dir.mkdir(parents=True, exist_ok=True)
    path = package_dir / MANIFEST_NAME
    tmp = path.with_name(f".{MANIFEST_NAME}.tmp")
    text = json.dumps(manifest.to_dict(), indent=2, ensure_ascii=False) + "\n"
    try:
        with tmp.open("w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_manifest(package_dir: str | Path, verify: bool = True) -> ModelManifest:
    """Read and validate a package's manifest; with ``verify``, check every member file's sha256.

    Args:
        package_dir: the package folder.
        verify: also check that each member file exists and matches its sha256.

    Raises:
        ModelPackageError: missing manifest or member, invalid JSON, a missing, unknown or invalid
            key, or a checksum mismatch; the message names the file and the key.
    """
    package_dir = Path(package_dir)
    path = package_dir / MANIFEST_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ModelPackageError(f"{path}: manifest not found in model package {package_dir}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelPackageError(f"{path}: cannot read manifest: {exc}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno} column {exc.colno}"
        raise ModelPackageError(f"{path}: invalid JSON at {where}: {exc.msg}") from exc
    manifest = parse_manifest(data, path)
    if verify:
        verify_members(package_dir, manifest)
    return manifest


def verify_members(package_dir: str | Path, manifest: ModelManifest) -> None:
    """Check that every member file exists and matches its sha256.

    Raises:
        ModelPackageError: naming the member file, the expected and the found digest.
    """
    for member in manifest.members:
        file = member_path(package_dir, member)
        if not file.is_file():
            raise ModelPackageError(f"{file}: member file listed in {MANIFEST_NAME} not found")
        found = sha256_file(file)
        if found != member.sha256:
            raise ModelPackageError(
                f"{file}: sha256 mismatch: expected {member.sha256} (from {MANIFEST_NAME}), found {found}"
            )


class _Reader:
    """Typed access to manifest values; every failure names the file and the key."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, key: str, expected: str, found: Any) -> ModelPackageError:
        return ModelPackageError(f"{self.path}: key {key!r}: expected {expected}, found {found!r}")

    def unknown(self, key: str, known: tuple[str, ...]) -> ModelPackageError:
        return ModelPackageError(f"{self.path}: unknown key {key!r}: expected one of {sorted(known)}")

    def require(self, data: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str = "") -> Any:
        """``data[key]`` if present and of a JSON type in ``kind`` (a bool is not a number)."""
        name = f"{where}{key}"
        if key not in data:
            raise ModelPackageError(f"{self.path}: missing key {name!r}")
        value = data[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            names = " or ".join(JSON_TYPE_NAMES.get(k, k.__name__) for k in kinds)
            raise self.fail(name, f"a JSON {names}", value)
        return value

    def string(self, data: dict[str, Any], key: str, where: str = "") -> str:
        value = self.require(data, key, str, where)
        if not value.strip():
            raise self.fail(f"{where}{key}", "a non-empty string", value)
        return str(value)


def parse_manifest(data: Any, path: Path) -> ModelManifest:
    """Validate decoded manifest JSON (``path`` only names the file in errors)."""
    reader = _Reader(path)
    if not isinstance(data, dict):
        found = type(data).__name__
        raise ModelPackageError(f"{path}: expected a JSON object at the top level, found {found}")
    unknown = sorted(set(data) - set(REQUIRED_KEYS) - set(OPTIONAL_KEYS))
    if unknown:
        raise reader.unknown(str(unknown[0]), REQUIRED_KEYS + OPTIONAL_KEYS)
    for key in REQUIRED_KEYS:
        reader.require(data, key, object)
    version = reader.require(data, "format_version", int)
    if version != FORMAT_VERSION:
        raise reader.fail("format_version", str(FORMAT_VERSION), version)
    labels = _parse_labels(reader, data)
    preprocess = _parse_preprocess(reader, data)
    return ModelManifest(
        name=_dicom_text(reader, data, "name"),
        version=_dicom_text(reader, data, "version"),
        labels=labels,
        preprocess=preprocess,
        members=_parse_members(reader, data, labels, preprocess.size),
        aggregation=_parse_aggregation(reader, data),
        thresholds=_parse_thresholds(reader, data, labels),
        input_name=reader.string(data, "input_name") if "input_name" in data else "image",
        outputs=_parse_outputs(reader, data),
        data_summary=dict(reader.require(data, "data_summary", dict)) if "data_summary" in data else {},
        evaluation_summary=(
            dict(reader.require(data, "evaluation_summary", dict)) if "evaluation_summary" in data else {}
        ),
        created=str(reader.require(data, "created", str)) if "created" in data else "",
        format_version=FORMAT_VERSION,
        reference=_parse_reference(reader, data, labels),
        ages=_parse_ages(reader, data, labels),
        informational=_parse_informational(reader, data, labels),
    )


def dicom_text_problem(value: str) -> str:
    """Why ``value`` cannot be a package's name or version in the node's results ("" when it can)."""
    if not value.strip() or len(value) > MAX_TEXT or "\\" in value or not value.isprintable():
        return f"1-{MAX_TEXT} printable characters without a backslash (a DICOM LO value in the results)"
    return ""


def _dicom_text(reader: _Reader, data: dict[str, Any], key: str) -> str:
    value = reader.string(data, key)
    problem = dicom_text_problem(value)
    if problem:
        raise reader.fail(key, problem, value)
    return value


def _parse_labels(reader: _Reader, data: dict[str, Any]) -> tuple[str, ...]:
    labels = reader.require(data, "labels", list)
    if not labels or not all(isinstance(x, str) and x.strip() for x in labels):
        raise reader.fail("labels", "a non-empty list of non-empty strings", labels)
    if len(set(labels)) != len(labels):
        raise reader.fail("labels", "unique label names", labels)
    return tuple(labels)


def _parse_preprocess(reader: _Reader, data: dict[str, Any]) -> PreprocessSpec:
    raw = reader.require(data, "preprocess", dict)
    try:
        return PreprocessSpec.from_dict(raw)
    except (TypeError, ValueError) as exc:
        raise ModelPackageError(f"{reader.path}: key 'preprocess': {exc}") from exc


def _parse_members(reader: _Reader, data: dict[str, Any], labels: tuple[str, ...],
                   package_size: int) -> tuple[Member, ...]:
    raw = reader.require(data, "members", list)
    if not raw:
        raise reader.fail("members", "at least one member", raw)
    members = []
    for i, item in enumerate(raw):
        where = f"members[{i}]."
        if not isinstance(item, dict):
            raise reader.fail(f"members[{i}]", "a JSON object", item)
        unknown = sorted(set(item) - set(MEMBER_KEYS))
        if unknown:
            raise reader.unknown(f"{where}{unknown[0]}", MEMBER_KEYS)
        file = reader.string(item, "file", where)
        if Path(file).is_absolute() or ".." in Path(file).parts:
            raise reader.fail(f"{where}file", "a path relative to the package folder", file)
        sha = reader.string(item, "sha256", where)
        if not SHA256_RE.match(sha):
            raise reader.fail(f"{where}sha256", "64 lower-case hex characters", sha)
        fold = reader.require(item, "fold", (int, type(None)), where)
        outputs = None
        if "labels" in item:
            raw_labels = reader.require(item, "labels", list, where)
            if (not raw_labels or len(set(map(str, raw_labels))) != len(raw_labels)
                    or not all(isinstance(x, str) and x in labels for x in raw_labels)):
                raise reader.fail(f"{where}labels", f"distinct labels of the package {list(labels)}", raw_labels)
            outputs = tuple(raw_labels)
        size = None
        if "size" in item:
            size = reader.require(item, "size", int, where)
            if size < MIN_SIDE:
                raise reader.fail(f"{where}size", f"an input side >= {MIN_SIDE} pixels", size)
        members.append(Member(file, sha, reader.string(item, "architecture", where), fold,
                              reader.string(item, "weights", where), outputs, size))
    if not any(m.input_size(package_size) == package_size for m in members):
        raise reader.fail("members", f"at least one member at preprocess.size {package_size} (the heat maps' grid)",
                          sorted({m.size for m in members if m.size is not None}))
    files = [m.file for m in members]
    if len(set(files)) != len(files):
        raise reader.fail("members", "distinct member files", files)
    orphans = [label for label in labels if not any(label in m.outputs(labels) for m in members)]
    if orphans:
        raise reader.fail("members", "every label output by at least one member", f"none outputs {orphans}")
    return tuple(members)


def _parse_aggregation(reader: _Reader, data: dict[str, Any]) -> str:
    if "aggregation" not in data:
        return "mean"
    value = reader.string(data, "aggregation")
    if value not in AGGREGATIONS:
        raise reader.fail("aggregation", f"one of {list(AGGREGATIONS)}", value)
    return value


def _parse_thresholds(reader: _Reader, data: dict[str, Any], labels: tuple[str, ...]) -> dict[str, Threshold]:
    raw = reader.require(data, "thresholds", dict)
    if set(raw) != set(labels):
        missing, extra = sorted(set(labels) - set(raw)), sorted(set(raw) - set(labels))
        found = f"missing {missing}, extra {extra}"
        raise reader.fail("thresholds", f"one entry per label {list(labels)}", found)
    out = {}
    for label in labels:
        where = f"thresholds.{label}."
        item = raw[label]
        if not isinstance(item, dict):
            raise reader.fail(f"thresholds.{label}", "a JSON object with value and method", item)
        value = reader.require(item, "value", (int, float), where)
        if not 0.0 <= float(value) <= 1.0:
            raise reader.fail(f"{where}value", "a number in [0, 1]", value)
        out[label] = Threshold(float(value), reader.string(item, "method", where))
    return out


def _parse_outputs(reader: _Reader, data: dict[str, Any]) -> dict[str, str]:
    if "outputs" not in data:
        return {"logits": "logits", "cam": "cam"}
    raw = reader.require(data, "outputs", dict)
    if set(raw) != set(OUTPUT_KEYS) or not all(isinstance(v, str) and v for v in raw.values()):
        raise reader.fail("outputs", f"an object mapping {list(OUTPUT_KEYS)} to output names", raw)
    return {k: str(raw[k]) for k in OUTPUT_KEYS}


def _label_entries(reader: _Reader, data: dict[str, Any], key: str, labels: tuple[str, ...],
                   keys: tuple[str, ...]) -> Iterator[tuple[str, dict[str, Any], str]]:
    """(label, its JSON object, the key path for errors) of an optional per-label table such as ``reference``:
    entries for the package's labels only, each an object of ``keys``."""
    if key not in data:
        return
    raw = reader.require(data, key, dict)
    extra = sorted(set(raw) - set(labels))
    if extra:
        raise reader.fail(key, f"entries for the package's labels {list(labels)}", extra)
    for label, item in raw.items():
        if not isinstance(item, dict):
            raise reader.fail(f"{key}.{label}", "a JSON object", item)
        unknown = sorted(set(item) - set(keys))
        if unknown:
            raise reader.unknown(f"{key}.{label}.{unknown[0]}", keys)
        yield label, item, f"{key}.{label}."


def _parse_reference(reader: _Reader, data: dict[str, Any], labels: tuple[str, ...]) -> dict[str, ScoreReference]:
    out = {}
    for label, item, where in _label_entries(reader, data, "reference", labels, REFERENCE_KEYS):
        n = reader.require(item, "n", int, where)
        prevalence = float(reader.require(item, "prevalence", (int, float), where))
        if n < 1 or not 0.0 <= prevalence <= 1.0:
            raise reader.fail(f"{where}n/prevalence", "n >= 1 and a prevalence in [0, 1]", (n, prevalence))
        curves = {}
        for key in ("quantiles", "quantiles_positive", "quantiles_negative"):
            values = reader.require(item, key, list, where)
            numbers = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
            if (len(values) != QUANTILE_POINTS or len(numbers) != len(values)
                    or any(not 0.0 <= v <= 1.0 for v in numbers)
                    or any(b < a for a, b in pairwise(numbers))):
                raise reader.fail(f"{where}{key}", f"{QUANTILE_POINTS} non-decreasing numbers in [0, 1]",
                                  values[:5] if len(values) > 5 else values)
            curves[key] = tuple(float(v) for v in numbers)
        out[label] = ScoreReference(reader.string(item, "source", where), reader.string(item, "cohort", where), n,
                                    prevalence, curves["quantiles"], curves["quantiles_positive"],
                                    curves["quantiles_negative"])
    return out


def _parse_ages(reader: _Reader, data: dict[str, Any], labels: tuple[str, ...]) -> dict[str, AgeRange]:
    out = {}
    for label, item, where in _label_entries(reader, data, "ages", labels, AGE_KEYS):
        low = reader.require(item, "from_years", (int, float), where)
        high = reader.require(item, "below_years", (int, float), where)
        if isinstance(low, bool) or isinstance(high, bool) or not 0 <= low < high <= MAX_AGE_YEARS:
            raise reader.fail(f"{where}from_years/below_years", f"0 <= from_years < below_years <= {MAX_AGE_YEARS}",
                              (low, high))
        unknown = item.get("unknown_age", "not_applicable")
        if unknown not in UNKNOWN_AGE:
            raise reader.fail(f"{where}unknown_age", f"one of {list(UNKNOWN_AGE)}", unknown)
        out[label] = AgeRange(float(low), float(high), reader.string(item, "population", where), unknown)
    return out


def _parse_informational(reader: _Reader, data: dict[str, Any], labels: tuple[str, ...]) -> tuple[str, ...]:
    if "informational" not in data:
        return ()
    raw = reader.require(data, "informational", list)
    if not all(isinstance(x, str) for x in raw) or len(set(raw)) != len(raw) or not set(raw) <= set(labels):
        raise reader.fail("informational", f"unique labels of the package {list(labels)}", raw)
    if set(raw) == set(labels):
        raise reader.fail("informational", "at least one label left to set the triage flag", raw)
    return tuple(raw)
