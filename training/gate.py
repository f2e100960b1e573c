"""Input-gate step: train, choose the threshold for, export and evaluate the node's view classifier.

``cxr-train gate --config training/configs/gate.toml --run-dir runs/gate --out ai/models/gate`` trains one
network per fold (EfficientNet-Lite0 from ImageNet weights by default; folds patient-grouped and stratified
by class) on the pool ``training.gate_data`` builds, scores every pool image with the fold model that did
not see it (out-of-fold), applies the threshold rule below, and writes a model package the node loads as
its input gate (``ai.gate``). ``cxr-train gate-eval`` (``training.gate_eval``) then scores, **as the node
scores them** (``ai.gate.InputGate``: ONNX, the node's preprocessing), every image the pool left out,
fresh patterns and transformed held-out chests, and writes the tables with Wilson intervals (docs/gate/).

Threshold rule (fixed before any training run): the image is analysed when the ensemble's ``Frontal chest``
probability is at least *t*, with *t* = min(0.5, the 0.5th percentile of the out-of-fold ``Frontal chest``
probability of the pool's frontal images): at most about 1 in 200 training-pool frontal images refused,
never a threshold above an even chance.

Training is resumable: the preprocessed pool is cached in the run directory (``pool.npz``), each fold's
weights are saved when it finishes (``fold<k>.pt``) and a rerun skips finished folds.
"""

from __future__ import annotations

import json
import logging
import math
import time
import tomllib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, WeightedRandomSampler

from ai.gate import FRONTAL, GATE_LABELS, LATERAL, OTHER, InputGate
from ai.pixels import read_image_file
from ai.preprocess import PreprocessSpec, preprocess_gray, to_model_input
from storage.files import write_atomic
from training.augment import AugmentConfig, Augmenter
from training.data import CxrDataset
from training.export import MemberInfo, export_package
from training.gate_data import (
    PATTERNS,
    TRANSFORMS,
    Sample,
    load_sample,
    pattern_samples,
    read_view_manifest,
    transformed_samples,
)
from training.metrics import wilson_ci
from training.models import ARCHITECTURES, CxrNet, build_model
from training.splits import grouped_stratified_kfold

log = logging.getLogger(__name__)

POOL_FILE = "pool.npz"
OOF_FILE = "oof.csv"


@dataclass(frozen=True)
class GateSource:
    """A manifest of real radiographs: ``view`` for all rows, or ``view_column`` per row; ``sample`` rows
    drawn at random (0: all)."""

    name: str
    csv: str
    view: str = ""
    view_column: str = ""
    group_column: str = ""
    sample: int = 0


@dataclass(frozen=True)
class GateConfig:
    """The gate run: sources, generated negatives, size and optimisation (training/configs/gate.toml)."""

    sources: tuple[GateSource, ...]
    name: str = "input-gate"
    version: str = ""
    architecture: str = "efficientnet_lite0"
    init: str = "imagenet"
    image_size: int = 128
    folds: int = 5
    seed: int = 0
    patterns: int = 480
    transformed: int = 400
    epochs: int = 6
    batch_size: int = 32
    lr: float = 5e-4
    weight_decay: float = 1e-4
    threads: int = 2
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    @property
    def spec(self) -> PreprocessSpec:
        return PreprocessSpec(size=self.image_size)


def load_gate_config(path: str | Path) -> GateConfig:
    """Read a gate configuration; source paths are relative to the file's folder.

    Raises:
        ValueError: an unknown key or a source without ``name``/``csv`` (named in the message).
    """
    path = Path(path)
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    known = set(GateConfig.__dataclass_fields__)
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown}; known: {sorted(known)}")
    sources = []
    for i, item in enumerate(data.pop("sources", [])):
        extra = sorted(set(item) - set(GateSource.__dataclass_fields__))
        if extra or "name" not in item or "csv" not in item:
            raise ValueError(f"{path}: sources[{i}] needs name and csv, may have view, view_column, group_column, "
                             f"sample; found {sorted(item)}")
        csv_path = Path(item["csv"])
        item = {**item, "csv": str(csv_path if csv_path.is_absolute() else (path.parent / csv_path).resolve())}
        sources.append(GateSource(**item))
    if not sources:
        raise ValueError(f"{path}: no [[sources]]")
    augment = AugmentConfig(**data.pop("augment", {}))
    if augment.outside_lungs_p > 0:  # the gate's sources (laterals, other body parts) have no lung masks
        raise ValueError(f"{path}: augment.outside_lungs_p: the view gate trains without lung masks; expected 0, "
                         f"found {augment.outside_lungs_p}")
    config = GateConfig(sources=tuple(sources), augment=augment, **data)
    if config.architecture not in ARCHITECTURES:
        raise ValueError(f"{path}: architecture: expected a registered name (cxr-train architectures), "
                         f"found {config.architecture!r}")
    return config


# -- the pool -----------------------------------------------------------------------------------------------


def build_pool(config: GateConfig) -> tuple[list[Sample], list[Sample]]:
    """(the training pool, the real frontal images left out of it) for ``config``."""
    pool: list[Sample] = []
    held_out: list[Sample] = []
    rng = np.random.default_rng(config.seed)
    for source in config.sources:
        samples = read_view_manifest(source.csv, source.name, view=source.view, view_column=source.view_column,
                                     group_column=source.group_column)
        if source.sample and source.sample < len(samples):
            chosen = set(rng.choice(len(samples), size=source.sample, replace=False).tolist())
            pool += [s for i, s in enumerate(samples) if i in chosen]
            held_out += [s for i, s in enumerate(samples) if i not in chosen]
        else:
            pool += samples
    real = list(pool)
    pool += pattern_samples(config.patterns, seed=config.seed)
    pool += transformed_samples(real, config.transformed, seed=config.seed)
    return pool, held_out


def render(sample: Sample, spec: PreprocessSpec) -> np.ndarray:
    """The preprocessed uint8 image of a sample, exactly as the node's gate sees it."""
    gray, _ = preprocess_gray(load_sample(sample, read_image_file), spec)
    return gray


def labels_of(samples: Sequence[Sample]) -> np.ndarray:
    """One-hot float32 ``[N, 3]`` in ``GATE_LABELS`` order."""
    index = {label: i for i, label in enumerate(GATE_LABELS)}
    y = np.zeros((len(samples), len(GATE_LABELS)), dtype=np.float32)
    for row, sample in enumerate(samples):
        y[row, index[sample.label]] = 1.0
    return y


def cached_pool(config: GateConfig, run_dir: Path) -> tuple[list[Sample], np.ndarray, np.ndarray]:
    """(samples, uint8 images, folds), read from ``pool.npz`` when it matches the configuration."""
    pool, _ = build_pool(config)
    keys = np.array([s.key for s in pool])
    cache = run_dir / POOL_FILE
    if cache.is_file():
        with np.load(cache, allow_pickle=False) as data:
            if data["keys"].shape == keys.shape and (data["keys"] == keys).all():
                return pool, data["images"], data["folds"]
        log.info("gate pool changed: rebuilding %s", cache)
    started = time.monotonic()
    images = np.stack([render(s, config.spec) for s in pool])
    folds = grouped_stratified_kfold([s.group for s in pool], labels_of(pool), k=config.folds, seed=config.seed,
                                     tolerance=0.5)
    tmp = cache.with_suffix(".tmp.npz")
    np.savez(tmp, keys=keys, images=images, folds=folds)
    tmp.replace(cache)
    log.info("gate pool: %d images preprocessed in %.0f s", len(pool), time.monotonic() - started)
    return pool, images, folds


# -- training -------------------------------------------------------------------------------------------------


def class_balanced_weights(y: np.ndarray) -> np.ndarray:
    """Sampling weight per image: 1 / (its class's count), so each class is drawn equally often."""
    counts = y.sum(axis=0)
    return (y / np.maximum(counts, 1)).sum(axis=1)


def train_fold(config: GateConfig, images: np.ndarray, y: np.ndarray, train_index: np.ndarray,
               fold: int) -> CxrNet:
    """One network of ``config.architecture`` (every layer trained) on ``train_index``."""
    torch.manual_seed(config.seed * 100 + fold)
    model = build_model(config.architecture, len(GATE_LABELS), config.init or None, size=config.image_size)
    dataset = CxrDataset(images, y, config.spec, augment=Augmenter(config.augment), seed=config.seed * 100 + fold,
                         index=train_index)
    weights = class_balanced_weights(y[train_index])
    generator = torch.Generator().manual_seed(config.seed * 100 + fold)
    sampler = WeightedRandomSampler(weights.tolist(), num_samples=len(train_index), replacement=True,
                                    generator=generator)
    loader: DataLoader[Any] = DataLoader(dataset, batch_size=config.batch_size, sampler=sampler)  # type: ignore[arg-type]
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps = config.epochs * math.ceil(len(train_index) / config.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=steps, pct_start=0.15)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    for epoch in range(config.epochs):
        dataset.set_epoch(epoch)
        model.train()
        total, count, started = 0.0, 0, time.monotonic()
        for x, target in loader:
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), target)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += float(loss.detach()) * len(x)
            count += len(x)
        log.info("gate fold %d epoch %d/%d: loss %.4f (%.0f s)", fold, epoch + 1, config.epochs, total / count,
                 time.monotonic() - started)
    return model.eval()


def predict(model: CxrNet, images: np.ndarray, spec: PreprocessSpec, index: np.ndarray) -> np.ndarray:
    """Sigmoid probabilities ``[len(index), 3]`` of ``model`` on the pool rows ``index``."""
    out = []
    with torch.no_grad():
        for start in range(0, len(index), 64):
            batch = np.stack([to_model_input(images[i], spec) for i in index[start : start + 64]])
            out.append(torch.sigmoid(model(torch.from_numpy(batch))).numpy())
    return np.concatenate(out) if out else np.zeros((0, len(GATE_LABELS)), np.float32)


def fit_gate(config: GateConfig, run_dir: str | Path) -> tuple[list[Sample], np.ndarray, list[CxrNet]]:
    """Train (or resume) every fold; returns (pool, out-of-fold probabilities ``[N, 3]``, fold models)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(config.threads)
    write_atomic(run_dir / "gate_config.json", json.dumps(asdict(config), indent=2).encode())
    pool, images, folds = cached_pool(config, run_dir)
    y = labels_of(pool)
    oof = np.full((len(pool), len(GATE_LABELS)), np.nan, dtype=np.float32)
    models = []
    for fold in range(config.folds):
        weights_path = run_dir / f"fold{fold}.pt"
        held = np.flatnonzero(folds == fold)
        model = build_model(config.architecture, len(GATE_LABELS), None, size=config.image_size)
        if weights_path.is_file():
            model.load_state_dict(torch.load(weights_path, weights_only=True))
            model.eval()
            model.weights = config.init or "random"
        else:
            model = train_fold(config, images, y, np.flatnonzero(folds != fold), fold)
            tmp = weights_path.with_suffix(".tmp")
            torch.save(model.state_dict(), tmp)
            tmp.replace(weights_path)
        oof[held] = predict(model, images, config.spec, held)
        models.append(model)
    write_oof(run_dir / OOF_FILE, pool, folds, oof)
    return pool, oof, models


def write_oof(path: Path, pool: Sequence[Sample], folds: np.ndarray, oof: np.ndarray) -> None:
    lines = ["key,label,source,fold," + ",".join(f"p_{label}" for label in GATE_LABELS)]
    for sample, fold, p in zip(pool, folds, oof, strict=True):
        lines.append(",".join([f'"{sample.key}"', sample.label, sample.source, str(int(fold)),
                               *(f"{v:.6f}" for v in p)]))
    write_atomic(path, ("\n".join(lines) + "\n").encode())


def choose_threshold(pool: Sequence[Sample], oof: np.ndarray) -> tuple[float, str]:
    """The rule in the module docstring, on the pool's out-of-fold probabilities."""
    frontal = np.array([s.label == FRONTAL and s.path is not None and not s.transform for s in pool])
    p = oof[frontal, GATE_LABELS.index(FRONTAL)]
    t = min(0.5, float(np.quantile(p, 0.005)))
    return t, (f"min(0.5, 0.5th percentile of out-of-fold Frontal chest probability of {int(frontal.sum())} "
               f"training-pool frontal images)")


def export_gate(config: GateConfig, run_dir: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Fit (or resume) and write the gate package to ``out_dir``."""
    pool, oof, models = fit_gate(config, run_dir)
    threshold, method = choose_threshold(pool, oof)
    counts = {label: sum(s.label == label for s in pool) for label in GATE_LABELS}
    by_source: dict[str, int] = {}
    for s in pool:
        by_source[s.source] = by_source.get(s.source, 0) + 1
    summary = oof_summary(pool, oof, threshold)
    members = [(model, MemberInfo(fold=fold, weights=config.init or "random")) for fold, model in enumerate(models)]
    version = config.version or f"{config.name}-{datetime.now(UTC):%Y%m%d}"
    return export_package(
        members,
        out_dir,
        name=config.name,
        version=version,
        labels=GATE_LABELS,
        spec=config.spec,
        thresholds={FRONTAL: (threshold, method), LATERAL: (0.5, "informational: the gate uses Frontal chest only"),
                    OTHER: (0.5, "informational: the gate uses Frontal chest only")},
        data_summary={"classes": counts, "sources": by_source, "patterns": sorted(PATTERNS),
                      "transforms": sorted(TRANSFORMS), "folds": config.folds, "seed": config.seed},
        evaluation_summary={"out_of_fold": summary},
        overwrite=overwrite,
        weights_dtype="float16",
    )


# -- evaluation ---------------------------------------------------------------------------------------------------


def refused(p_frontal: np.ndarray, threshold: float) -> np.ndarray:
    return np.asarray(p_frontal) < threshold


def rate(k: int, n: int) -> dict[str, Any]:
    lo, hi = wilson_ci(k, n) if n else (float("nan"), float("nan"))
    return {"k": int(k), "n": int(n), "rate": k / n if n else float("nan"), "ci95": [lo, hi]}


def oof_summary(pool: Sequence[Sample], oof: np.ndarray, threshold: float) -> dict[str, Any]:
    """Per source of the pool: refused / total at ``threshold`` (out-of-fold)."""
    out: dict[str, Any] = {}
    p = oof[:, GATE_LABELS.index(FRONTAL)]
    for source in sorted({s.source for s in pool}):
        for label in GATE_LABELS:
            rows = [i for i, s in enumerate(pool) if s.source == source and s.label == label]
            if rows:
                out[f"{source} ({label})"] = rate(int(refused(p[rows], threshold).sum()), len(rows))
    return out


def gate_scores(gate: InputGate, images: Sequence[np.ndarray]) -> list[tuple[bool, str, float]]:
    """(analysable, reason, p_frontal) per image through the node's gate."""
    out = []
    for image in images:
        verdict = gate.check(image)
        out.append((verdict.analysable, verdict.reason, float(verdict.scores.get(FRONTAL, float("nan")))))
    return out
