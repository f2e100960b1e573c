"""Out-of-fold scores of a run's members as a package stores them (``cxr-train export --oof-scores stored``).

A run's ``predictions_oof.csv`` holds its torch models' float32 scores. Members whose weights a package stores
as int8 (``int8-last-stage``) score a little differently: up to 0.056 in probability on tb-320-strong-aug's OOF
images, enough to move decisions within that distance of the threshold (bench/README.md, "int8_members.py").
A threshold must be chosen on the scores the node will produce, so here every unit of the run is written as the
package stores it (:func:`training.export.write_member`) and scored by onnxruntime, with the node's session
options, on the images of the fold it was held out of, read from the run's preprocessing cache. The result is
the run's OOF table with the scores replaced, and the sha256 of each graph that scored, which the export checks
its shipped members against (the same graph, byte for byte).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from ai.ensemble import default_threads, session_options, sigmoid
from ai.manifest import sha256_file
from ai.preprocess import PreprocessSpec, to_model_input
from training.config import RunConfig
from training.data import PreprocessCache
from training.export import INPUT_NAME, write_member
from training.models import keep_labels
from training.predictions import ENSEMBLE, PredictionTable, read_predictions
from training.prepare import preprocess_cache, training_cohort
from training.rundir import RunDir, UnitKey
from training.splits import load_folds
from training.unit import load_unit_model

log = logging.getLogger(__name__)

BATCH = 16


def stored_oof(
    run_dir: str | Path, config: RunConfig, archs: Sequence[str], labels: Sequence[str], weights_dtype: str,
    parity_inputs: np.ndarray, *, opset: int = 17, threads: int | None = None,
) -> tuple[PredictionTable, dict[UnitKey, str]]:
    """The run's OOF table for ``labels`` (run labels, in the run's order) with every score from the stored graphs.

    Each unit of ``archs`` over the run's folds is cut to ``labels`` when the run has more (as the export cuts
    it), written with ``weights_dtype`` and scored on its held-out fold's images; an architecture's column is
    its fold models' scores, ``ensemble`` their mean over the architectures, as in the run's own table.

    Returns:
        (the table, {unit: sha256 of the graph that scored}).

    Raises:
        ValueError: an OOF image that the run's cohorts do not hold (the run's files disagree); SplitError (a
            ValueError) when ``folds.csv`` does not cover the cohorts.
        FileNotFoundError: no ``predictions_oof.csv``, ``folds.csv`` or unit model.
    """
    run = RunDir(run_dir)
    oof = read_predictions(run.oof_predictions)
    spec = config.preprocess_spec()
    cohort, _ = training_cohort(config)
    where = {image: i for i, image in enumerate(cohort.images)}
    unknown = [image for image in oof.images if image not in where]
    if unknown:
        raise ValueError(f"{run.oof_predictions}: {len(unknown)} image(s) not in the run's cohorts, "
                         f"e.g. {unknown[0]}")
    rows = np.array([where[image] for image in oof.images], dtype=np.int64)
    folds = load_folds(run.folds, cohort.images)[rows]
    indices = [config.labels.index(label) for label in labels]
    cache = preprocess_cache(config, run.root, spec)
    threads = threads or config.threads or default_threads()
    scores: dict[str, dict[str, np.ndarray]] = {label: {} for label in labels}
    hashes: dict[UnitKey, str] = {}
    with tempfile.TemporaryDirectory(prefix="cxr-stored-oof-") as scratch:
        for arch in archs:
            out = np.full((len(rows), len(labels)), np.nan, dtype=np.float32)
            for fold in sorted(set(folds.tolist())):
                key = UnitKey(arch, fold)
                model = load_unit_model(run.root, config, key)
                if list(labels) != list(config.labels):
                    model = keep_labels(model, indices)
                path = Path(scratch) / f"{arch}_fold{fold}.onnx"
                write_member(model, path, spec.size, parity_inputs, opset=opset, weights_dtype=weights_dtype)
                hashes[key] = sha256_file(path)
                held = np.flatnonzero(folds == fold)
                out[held] = cached_probabilities(path, cache, [cohort.paths[i] for i in rows[held]], spec, threads)
                log.info("scored %s (%s) on its %d held-out images", key.name, weights_dtype, held.size)
            for j, label in enumerate(labels):
                scores[label][arch] = out[:, j]
    for label in labels:
        scores[label][ENSEMBLE] = np.mean([scores[label][arch] for arch in archs], axis=0)
    table = replace(oof, labels={label: oof.labels[label] for label in labels}, scores=scores,
                    name=f"{oof.name} ({weights_dtype} stored members)", ensemble_computed=set())
    return table, hashes


def cached_probabilities(path: str | Path, cache: PreprocessCache, paths: Sequence[str | Path], spec: PreprocessSpec,
                         threads: int) -> np.ndarray:
    """Probabilities ``[n, L]`` of one ONNX member on cached images, scored as the node scores (CPU)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])
    out = []
    for start in range(0, len(paths), BATCH):
        batch = np.stack([to_model_input(cache.get(p), spec) for p in paths[start:start + BATCH]])
        (logits,) = session.run(["logits"], {INPUT_NAME: batch})
        out.append(sigmoid(logits))
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)
