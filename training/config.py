"""Run configuration step: one typed, validated description of a training run, stored as TOML.

A run directory always holds the effective configuration as ``config.toml`` next to everything the run
produced, so a result can be traced to the settings that made it, and an interrupted run resumes with
the same settings. Cohort paths are resolved relative to the configuration file's folder when read and
written back absolute. :func:`example_config_text` is the commented example ``cxr-train init-config``
writes; every key, its meaning and its default are listed there.
"""

from __future__ import annotations

import json
import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from ai.errors import ConfigError
from storage.files import write_atomic
from training.augment import AugmentConfig
from training.labels import LabelError, canonical_labels
from training.losses import LOSSES
from training.rundir import CONFIG_NAME as CONFIG_NAME  # the run directory owns its file names

UNFREEZE_MODES = ("last_stage", "last_two_stages", "all", "none")
DEVICES = ("auto", "cpu", "cuda")
MONITORS = ("validation", "training", "inner")
# Keys that change how fast a run goes, not what it produces: they may differ on resume.
RUNTIME_KEYS = frozenset({"num_workers", "threads", "progress", "device", "cache_dir"})
RUN_CONFIGURATION = "run configuration"  # what ConfigError names when no file is involved


@dataclass(frozen=True)
class CohortConfig:
    """A cohort manifest: name (used in file names), CSV path, optional root for relative image paths.

    A manifest written by another project may name its columns its own way: ``patient_column`` names the
    column that groups images by patient (e.g. ``group_hint``); ``patient_pattern``, a regular expression, takes
    the patient out of that column's value (its first match; a value without one stays whole: e.g. ``person\\d+``
    puts ``bacteria:person1`` and ``virus:person1``, one child's two images, in one group); ``site`` is the site of
    every image when
    the manifest has no ``site`` column, and ``label_columns`` maps columns to canonical labels (e.g.
    ``{"label_pneumonia": "Pediatric_Pneumonia"}``, or ``{"Atelectasis": "Atelectasis", ...}`` for NIH's
    bare finding columns); when given, exactly those columns are the cohort's labels.
    """

    name: str
    csv: str
    root: str = ""
    patient_column: str = "patient_id"
    patient_pattern: str = ""
    site: str = ""
    label_columns: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """``name``, ``csv``, ``root`` and the column options that differ from their defaults."""
        out: dict[str, Any] = {"name": self.name, "csv": self.csv, "root": self.root}
        if self.patient_column != "patient_id":
            out["patient_column"] = self.patient_column
        if self.patient_pattern:
            out["patient_pattern"] = self.patient_pattern
        if self.site:
            out["site"] = self.site
        if self.label_columns:
            out["label_columns"] = dict(self.label_columns)
        return out


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a training run (see :func:`example_config_text` for each key).

    ``train`` holds one cohort (``[train]``) or several (``[[train]]``): each gets its own patient-grouped
    folds, and fold k of the run is fold k of every cohort. A label may have known values in one training
    cohort only (checked when the run is prepared): a label pooled across sources is learnt as the source.
    """

    train: tuple[CohortConfig, ...]
    name: str = "cxr"
    labels: tuple[str, ...] = ("Tuberculosis",)
    external: tuple[CohortConfig, ...] = ()
    architectures: tuple[str, ...] = ("efficientnet_lite0",)
    init: str = "imagenet"
    weights: dict[str, str] = field(default_factory=dict)
    folds: int = 5
    run_folds: tuple[int, ...] = ()
    fold_tolerance: float = 0.05
    image_size: int = 512
    preprocess: dict[str, Any] = field(default_factory=dict)
    epochs_head: int = 3
    epochs_finetune: int = 5
    unfreeze: str = "last_stage"
    lr_head: float = 1e-3
    lr_finetune: float = 1e-4
    weight_decay: float = 1e-4
    batch_size: int = 16
    drop_rate: float = 0.0
    head: str = "linear"
    loss: str = "bce"
    loss_smoothing: float = 0.05
    focal_gamma: float = 2.0
    focal_alpha: float = 0.25
    balance_sampling: bool = False
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    seed: int = 0
    patience: int = 3
    average_last: int = 0
    monitor: str = "validation"
    inner_folds: int = 5
    lr_patience: int = 1
    lr_factor: float = 0.5
    cache_features: bool = False
    cache_dir: str = ""
    num_workers: int = 0
    threads: int = 0
    device: str = "auto"
    amp: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        problems = _validate(self)
        if problems:
            raise ConfigError(problems, RUN_CONFIGURATION)

    def weights_for(self, architecture: str) -> str | None:
        """Initial weights of ``architecture`` for ``build_model``: None (random), "imagenet" or a path."""
        value = self.weights.get(architecture, self.init)
        return None if value in ("", "random", "none") else value

    def fold_indices(self) -> tuple[int, ...]:
        """The folds this run trains (``run_folds``, or all)."""
        return self.run_folds or tuple(range(self.folds))

    def preprocess_spec(self) -> Any:
        """The ``ai.preprocess.PreprocessSpec`` of this run (``image_size`` + ``preprocess`` overrides)."""
        from ai.preprocess import PreprocessSpec

        return PreprocessSpec.from_dict({**self.preprocess, "size": self.image_size})

    def to_dict(self) -> dict[str, Any]:
        """Plain values (tuples as lists), the shape :func:`config_from_dict` reads."""
        out = asdict(self)
        cohorts = [item.to_dict() for item in self.train]
        out["train"] = cohorts[0] if len(cohorts) == 1 else cohorts  # [train] as it always was, or [[train]]
        out["external"] = [item.to_dict() for item in self.external]
        return dict(json.loads(json.dumps(out)))


def _validate(c: RunConfig) -> list[str]:
    """Every problem of a configuration, each naming the key, what was expected and what was found."""
    problems: list[str] = []

    def need(ok: bool, key: str, expected: str, found: Any) -> None:
        if not ok:
            problems.append(f"{key}: expected {expected}, found {found!r}")

    try:
        canonical_labels(c.labels)
    except LabelError as exc:
        problems.append(f"labels: {exc}")
    need(
        bool(c.architectures) and len(set(c.architectures)) == len(c.architectures),
        "architectures",
        "a non-empty list of distinct names",
        c.architectures,
    )
    from training.models import ARCHITECTURES  # the registry (timm, torch): needed by every run anyway

    unregistered = [a for a in c.architectures if a not in ARCHITECTURES]
    need(not unregistered, "architectures", f"registered names (cxr-train architectures lists them: "
         f"{', '.join(sorted(ARCHITECTURES))})", unregistered)
    misfit = [a for a in c.architectures if a in ARCHITECTURES and c.image_size % ARCHITECTURES[a].size_multiple]
    need(not misfit, "image_size", f"a multiple of {[ARCHITECTURES[a].size_multiple for a in misfit]} for {misfit}",
         c.image_size)
    need(c.folds >= 2, "folds", "an integer >= 2", c.folds)
    need(
        all(0 <= f < c.folds for f in c.run_folds) and len(set(c.run_folds)) == len(c.run_folds),
        "run_folds",
        f"distinct fold indices in 0..{c.folds - 1}",
        c.run_folds,
    )
    need(0 < c.fold_tolerance < 1, "fold_tolerance", "a number in (0, 1)", c.fold_tolerance)
    need(c.image_size >= 8, "image_size", "an integer >= 8", c.image_size)
    for key in ("epochs_head", "epochs_finetune", "seed", "num_workers", "threads", "lr_patience"):
        need(getattr(c, key) >= 0, key, "an integer >= 0", getattr(c, key))
    need(c.epochs_head + c.epochs_finetune >= 1, "epochs_head", "at least one epoch in total", c.epochs_head)
    need(c.patience >= 1, "patience", "an integer >= 1", c.patience)
    need(0 <= c.average_last <= (c.epochs_finetune if c.unfreeze != "none" else 0), "average_last",
         f"an integer from 0 to the fine-tuning epochs ({c.epochs_finetune if c.unfreeze != 'none' else 0})",
         c.average_last)
    need(c.monitor in MONITORS, "monitor", f"one of {list(MONITORS)}", c.monitor)
    need(c.inner_folds >= 2, "inner_folds", "an integer >= 2", c.inner_folds)
    need(c.batch_size >= 1, "batch_size", "an integer >= 1", c.batch_size)
    for key in ("lr_head", "lr_finetune"):
        need(math.isfinite(getattr(c, key)) and getattr(c, key) > 0, key, "a number > 0", getattr(c, key))
    need(c.weight_decay >= 0, "weight_decay", "a number >= 0", c.weight_decay)
    need(0 <= c.drop_rate < 1, "drop_rate", "a number in [0, 1)", c.drop_rate)
    need(c.head in ("linear", "cbam"), "head", "one of linear, cbam", c.head)
    need(not (c.head == "cbam" and c.cache_features), "cache_features",
         "false with head = \"cbam\" (its attention needs the feature map, not pooled features)", c.cache_features)
    need(0 < c.lr_factor < 1, "lr_factor", "a number in (0, 1)", c.lr_factor)
    need(c.loss in LOSSES, "loss", f"one of {', '.join(LOSSES)}", c.loss)
    need(0 <= c.loss_smoothing < 1, "loss_smoothing", "a number in [0, 1)", c.loss_smoothing)
    need(c.focal_gamma >= 0, "focal_gamma", "a number >= 0", c.focal_gamma)
    need(0 <= c.focal_alpha <= 1, "focal_alpha", "a number in [0, 1]", c.focal_alpha)
    need(c.unfreeze in UNFREEZE_MODES, "unfreeze", f"one of {', '.join(UNFREEZE_MODES)}", c.unfreeze)
    need(c.device in DEVICES, "device", f"one of {', '.join(DEVICES)}", c.device)
    unknown = sorted(set(c.weights) - set(c.architectures))
    need(not unknown, "weights", "keys that are configured architectures", unknown)
    if "size" in c.preprocess:
        problems.append("preprocess.size: not allowed here; set image_size instead")
    else:
        try:
            c.preprocess_spec()
        except (TypeError, ValueError) as exc:
            problems.append(f"preprocess: {exc}")
    need(bool(c.train), "train", "one cohort table [train] or several [[train]]", c.train)
    names = [*(t.name for t in c.train), *(e.name for e in c.external)]
    bad_names = [n for n in names if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", n)]
    need(not bad_names, "train.name/external.name", "letters, digits, '_', '.', '-' (used in file names)", bad_names)
    need(
        len(set(names)) == len(names) and "oof" not in names,
        "external",
        "cohort names distinct from each other and from the training cohorts, and not 'oof'",
        names,
    )
    return problems


def config_from_dict(
    data: Mapping[str, Any], base_dir: str | Path = ".", source: str = "run configuration"
) -> RunConfig:
    """Build a :class:`RunConfig` from TOML-shaped data; relative paths start at ``base_dir``.

    Raises:
        ConfigError: unknown keys, wrong types or invalid values, all listed.
    """
    base = Path(base_dir).resolve()
    data = dict(data)
    known = {f.name: f for f in fields(RunConfig)}
    problems = [f"{key}: unknown key; expected one of {', '.join(sorted(known))}" for key in data if key not in known]
    if "train" not in data:
        problems.append("train: required table with 'name' and 'csv' ([train], or [[train]] per cohort) is missing")
    values: dict[str, Any] = {}
    for key, raw in data.items():
        if key not in known:
            continue
        try:
            values[key] = _convert(key, raw, base, known[key].default)
        except (TypeError, ValueError) as exc:
            problems.append(f"{key}: {exc}")
    if problems:
        raise ConfigError(problems, source)
    try:
        return RunConfig(**values)
    except ConfigError as exc:
        raise ConfigError(exc.problems, source) from None


def _convert(key: str, raw: Any, base: Path, default: Any) -> Any:
    """One TOML value -> the dataclass field's type (tuples, nested dataclasses, absolute paths)."""
    if key == "train":
        if isinstance(raw, list):
            return tuple(_cohort(item, base, f"train[{i}]") for i, item in enumerate(raw))
        return (_cohort(raw, base, "train"),)
    if key == "external":
        if not isinstance(raw, list):
            raise TypeError(f"expected an array of tables [[external]], found {raw!r}")
        return tuple(_cohort(item, base, f"external[{i}]") for i, item in enumerate(raw))
    if key == "augment":
        if not isinstance(raw, Mapping):
            raise TypeError(f"expected a table, found {raw!r}")
        return AugmentConfig(**{k: float(v) for k, v in raw.items()})
    if key in ("weights", "preprocess"):
        if not isinstance(raw, Mapping):
            raise TypeError(f"expected a table, found {raw!r}")
        if key == "weights":
            return {str(k): _path_or_word(str(v), base) for k, v in raw.items()}
        return dict(raw)
    if key in ("labels", "architectures", "run_folds"):
        if not isinstance(raw, list):
            raise TypeError(f"expected a list, found {raw!r}")
        return tuple(int(v) for v in raw) if key == "run_folds" else tuple(str(v) for v in raw)
    if key == "init":
        return _path_or_word(str(raw), base)
    if key == "cache_dir":
        return str((base / raw).resolve()) if raw else ""
    return _scalar(raw, default)


def _scalar(raw: Any, default: Any) -> Any:
    """A scalar of the default's type; ints are accepted for floats, nothing else is coerced."""
    if isinstance(default, bool):
        if not isinstance(raw, bool):
            raise TypeError(f"expected true or false, found {raw!r}")
        return raw
    if isinstance(default, int):
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise TypeError(f"expected an integer, found {raw!r}")
        return raw
    if isinstance(default, float):
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            raise TypeError(f"expected a number, found {raw!r}")
        return float(raw)
    if isinstance(default, str):
        if not isinstance(raw, str):
            raise TypeError(f"expected a string, found {raw!r}")
        return raw
    return raw


def _path_or_word(value: str, base: Path) -> str:
    """``imagenet``/``random``/empty stay; anything else is a weights file, made absolute."""
    if value in ("", "imagenet", "random", "none"):
        return value
    return str((base / value).resolve())


COHORT_KEYS = ("name", "csv", "root", "patient_column", "patient_pattern", "site", "label_columns")


def _cohort(raw: Any, base: Path, key: str) -> CohortConfig:
    """A cohort table with ``name``, ``csv`` and the optional keys of :class:`CohortConfig` (paths absolute)."""
    if not isinstance(raw, Mapping) or not raw.get("name") or not raw.get("csv"):
        raise TypeError(f"{key} needs a table with 'name' and 'csv', found {raw!r}")
    extra = sorted(set(raw) - set(COHORT_KEYS))
    if extra:
        raise TypeError(f"{key} has unknown key(s) {extra}; expected {', '.join(COHORT_KEYS)}")
    for text_key in ("patient_column", "site"):
        if text_key in raw and (not isinstance(raw[text_key], str) or (text_key == "patient_column"
                                                                        and not raw[text_key].strip())):
            raise TypeError(f"{key}.{text_key}: expected a non-empty string, found {raw[text_key]!r}")
    pattern = raw.get("patient_pattern", "")
    if not isinstance(pattern, str):
        raise TypeError(f"{key}.patient_pattern: expected a regular expression, found {pattern!r}")
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"{key}.patient_pattern: not a regular expression ({exc}): {pattern!r}") from None
    columns = raw.get("label_columns", {})
    if not isinstance(columns, Mapping) or not all(isinstance(k, str) and isinstance(v, str) and k.strip()
                                                   for k, v in columns.items()):
        raise TypeError(f"{key}.label_columns: expected a table of column = \"Label\", found {columns!r}")
    try:
        labels = canonical_labels(columns.values()) if columns else ()
    except LabelError as exc:
        raise ValueError(f"{key}.label_columns: {exc}") from None
    root = str((base / raw["root"]).resolve()) if raw.get("root") else ""
    return CohortConfig(
        name=str(raw["name"]), csv=str((base / raw["csv"]).resolve()), root=root,
        patient_column=str(raw.get("patient_column", "patient_id")).strip(), patient_pattern=pattern,
        site=str(raw.get("site", "")).strip(),
        label_columns={str(k).strip(): label for k, label in zip(columns, labels, strict=True)},
    )


def load_config(path: str | Path) -> RunConfig:
    """Read a TOML run configuration; relative paths start at the file's folder.

    Raises:
        ConfigError: unreadable TOML or invalid keys (all listed, with the file name).
    """
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError([f"cannot read TOML: {exc}"], str(path)) from exc
    return config_from_dict(data, path.parent, str(path))


def save_config(config: RunConfig, path: str | Path) -> None:
    """Write ``config`` as TOML (absolute paths), atomically."""
    write_atomic(path, to_toml(config.to_dict()).encode("utf-8"))


def config_differences(a: RunConfig, b: RunConfig) -> list[str]:
    """Keys whose values differ between two configurations, runtime-only keys excluded."""
    da, db = a.to_dict(), b.to_dict()
    return sorted(k for k in da if k not in RUNTIME_KEYS and da[k] != db[k])


def with_overrides(config: RunConfig, **changes: Any) -> RunConfig:
    """A copy with fields replaced (validated again)."""
    return replace(config, **changes)


# ---------------------------------------------------------------------------------------------------
# TOML writing (tomllib reads only; the values here are simple)
# ---------------------------------------------------------------------------------------------------


def _toml_value(value: Any) -> str:
    """A TOML literal for a scalar or a list of scalars."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"cannot write {value!r} to TOML")
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{_toml_key(str(k))} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def to_toml(data: Mapping[str, Any]) -> str:
    """TOML text for ``data``: scalars first, then tables, then arrays of tables (one level deep)."""
    lines: list[str] = []
    tables: list[str] = []
    for key, value in data.items():
        if isinstance(value, Mapping):
            tables.append(f"\n[{key}]")
            tables.extend(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items())
        elif isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
            for item in value:
                tables.append(f"\n[[{key}]]")
                tables.extend(f"{k} = {_toml_value(v)}" for k, v in item.items())
        elif not (isinstance(value, list) and not value and _is_table_list(key)):
            lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines + tables) + "\n"


def _toml_key(key: str) -> str:
    """A bare key when TOML allows one, else a quoted key."""
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key, ensure_ascii=False)


def _is_table_list(key: str) -> bool:
    """Keys that are arrays of tables (an empty one is simply left out)."""
    return key in ("external", "train")


def default_value(name: str) -> Any:
    """The default of a :class:`RunConfig` field (for documentation and tests)."""
    item = {f.name: f for f in fields(RunConfig)}[name]
    if item.default is not MISSING:
        return item.default
    if item.default_factory is not MISSING:
        return item.default_factory()
    raise KeyError(f"{name} has no default")


EXAMPLE_CONFIG = """\
# cxr-train run configuration (TOML). Write one with `cxr-train init-config FILE`, edit, then
# `cxr-train fit --config FILE --run-dir runs/NAME`. Relative paths start at this file's folder.
# The effective configuration is saved as runs/NAME/config.toml with everything the run produces.

name = "tb-shenzhen"            # run name (reports, package name)
labels = ["Tuberculosis"]       # canonical labels (training.labels); manifests may spell them label_tb ...

# Architectures of the ensemble (training.models registry), each trained on every fold.
architectures = ["efficientnet_lite0"]
init = "imagenet"               # initial weights: "imagenet" (where offline weights exist), "random", a file
# [weights] below overrides per architecture, e.g.  resnet18 = "weights/resnet18_cxr.pth"

folds = 5                       # patient-grouped, label-stratified k-fold on the training cohort
run_folds = []                  # train only these folds (e.g. [0]); [] = all
fold_tolerance = 0.05           # max |fold prevalence - cohort prevalence| (widened to one patient's weight)

image_size = 512                # model input side = PreprocessSpec.size (the exported package says so too)
epochs_head = 3                 # phase 1: backbone frozen, head trained
epochs_finetune = 5             # phase 2: unfrozen part + head
unfreeze = "last_stage"         # phase 2 unfreezes: "last_stage", "last_two_stages", "all", or "none" (no phase 2)
lr_head = 0.001                 # AdamW learning rate, phase 1
lr_finetune = 0.0001            # AdamW learning rate, phase 2
weight_decay = 0.0001
batch_size = 16
drop_rate = 0.0                 # dropout before the head (a CBAM head: in its dense layers)
head = "linear"                 # "linear" (GAP -> linear, exact CAM) or "cbam" (the seed's NIH head: CBAM
                                # attention, dense 128/64 with dropout; needs cache_features = false)
loss = "bce"                    # "bce", "weighted_bce", "dynamic_bce" (seed's, label smoothing), "focal"
loss_smoothing = 0.05           # dynamic_bce label smoothing eps: t = y (1 - eps) + eps / 2
focal_gamma = 2.0
focal_alpha = 0.25              # focal weight of positives (0.5 = both classes alike)
balance_sampling = false        # sample images inversely to their label frequency
seed = 0
patience = 3                    # early stopping: epochs without a better monitored loss, per phase
average_last = 0                # > 0: the unit keeps the mean of the weights after each of the last N fine-tuning
                                # epochs (weight averaging, SWA-style), and fine-tuning runs all its epochs (no
                                # early stop; fine-tuning starts from the head phase's best monitored epoch);
                                # 0: the epoch with the best monitored loss
monitor = "validation"          # the loss that drives early stopping, ReduceLROnPlateau and the kept epoch (with
                                # average_last: the head phase's kept epoch):
                                # "validation" (the held-out fold: its OOF predictions carry a small selection
                                # bias), "training" (the held-out fold decides nothing: unbiased OOF) or
                                # "inner" (a patient-grouped part of the training folds, which it does not
                                # train on: unbiased OOF, and a loss comparable across phases)
inner_folds = 5                 # monitor = "inner": the training folds are split in this many parts (per
                                # cohort, by patient, stratified), one of them monitored; 5 = a fifth
lr_patience = 1                 # ReduceLROnPlateau on the monitored loss: patience
lr_factor = 0.5                 # ... and factor
cache_features = false          # phase 1 trains the head on backbone features computed once (no augmentation)
cache_dir = ""                  # preprocessing cache; "" = RUN_DIR/cache (share one across runs to save time)
num_workers = 0                 # DataLoader workers
threads = 0                     # torch.set_num_threads; 0 = torch's default
device = "auto"                 # "auto" (CUDA if present), "cpu", "cuda"
amp = true                      # mixed precision, on CUDA only
progress = true                 # tqdm progress bars

[train]                         # the cohort folds are made from; OOF predictions come from it. Several
                                # training cohorts: one [[train]] table each, every one split into its own
                                # patient-grouped folds and reported apart; a label may be known in one only
name = "shenzhen"
csv = "../shared/data/tb/shenzhen.csv"
root = ""                       # "" = image paths relative to the CSV's folder or its parent
# patient_column = "patient_id" # the column grouping images by patient (pediatric_pneumonia: "group_hint")
# patient_pattern = ""          # a regex taking the patient out of that column (first match; e.g. 'person\\d+')
# site = ""                     # the site of every image when the manifest has no 'site' column
# label_columns = { label_pneumonia = "Pediatric_Pneumonia" }   # column = canonical label; when given,
#                               # exactly these columns are labels (default: every label_* column)

[[external]]                    # never used for fitting or thresholds; scored by the mean of the fold models
name = "montgomery"
csv = "../shared/data/tb/montgomery.csv"

[weights]

[preprocess]                    # PreprocessSpec overrides (size comes from image_size)
clahe_clip = 2.0
clahe_tile = 8
field_detection = true

[augment]                       # probability (*_p) and magnitude of each augmentation; never any flip
rotate_p = 0.5
rotate_deg = 7.0                # max |angle|
shift_p = 0.5
shift_frac = 0.05               # max shift, fraction of the side
scale_p = 0.5
scale_frac = 0.1                # zoom in [1 - f, 1 + f]
brightness_p = 0.4
brightness = 0.08               # max offset, fraction of 255
contrast_p = 0.4
contrast = 0.15                 # factor in [1 - c, 1 + c]
gamma_p = 0.3
gamma = 0.25                    # exponent in [1/(1 + g), 1 + g]
noise_p = 0.2
noise_std = 0.02                # fraction of 255
blur_p = 0.15
blur_sigma = 1.0                # max sigma, pixels
downsample_p = 0.15
downsample_min = 0.5            # smallest resolution factor
outside_lungs_p = 0.0           # > 0: the field outside the lungs (each image's lung_mask column) replaced by its
                                # median grey, before the others; images without a mask never; not at evaluation
outside_lungs_margin = 0.03     # the lungs grown first by this fraction of the side (pleura and hila stay)
"""


def example_config_text() -> str:
    """The commented example configuration (every key with its default, paths to the shared TB data)."""
    return EXAMPLE_CONFIG
