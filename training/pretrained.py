"""Chest weights step: a trained unit's backbone as a weights file with its provenance, for ``init``.

Chest-domain initialisation is made here from the project's own data: a run on chest cohorts (e.g. the
pediatric and NIH sets, ``cxr-train fit``) trains a unit, and ``cxr-train weights`` writes that unit's
backbone (the head is left out: a run that starts from it has its own labels) to ``FILE`` and its
provenance to ``FILE.provenance.json``: the run, the unit, the labels, every cohort it was trained on (CSV
path, sha256, images) and the recipe, with the weights' sha256. A run configuration names the file as
``init`` (or in ``[weights]``); the package manifest then records the file's name and sha256 per member and
the provenance in its data summary.

A cohort the weights were trained on may not be a cohort of a run that starts from them: as an external
cohort its figures would no longer be external, as a training cohort its OOF figures would be biased
(the backbone saw the held-out images with their labels). :func:`check_init_cohorts` refuses both, by
the cohort CSV's sha256.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from ai.errors import ConfigError
from ai.manifest import sha256_file
from storage.files import write_atomic
from training.config import RUN_CONFIGURATION, CohortConfig, RunConfig, load_config
from training.rundir import RunDir, UnitKey

PROVENANCE_SUFFIX = ".provenance.json"
PROVENANCE_FORMAT = 1


def provenance_path(weights: str | Path) -> Path:
    """``FILE.provenance.json`` beside a weights file."""
    weights = Path(weights)
    return weights.with_name(weights.name + PROVENANCE_SUFFIX)


def _cohort_record(cohort: CohortConfig, role: str) -> dict[str, Any]:
    path = Path(cohort.csv)
    with path.open(encoding="utf-8") as handle:
        images = max(sum(1 for _ in handle) - 1, 0)
    return {"name": cohort.name, "role": role, "csv": str(path), "csv_sha256": sha256_file(path), "images": images}


def export_weights(run_dir: str | Path, unit: UnitKey, out: str | Path) -> Path:
    """Write a finished unit's backbone to ``out`` and its provenance beside it; returns ``out``.

    Raises:
        FileNotFoundError: the run directory or the unit is not finished.
    """
    run = RunDir(run_dir)
    if not run.config.exists():
        raise FileNotFoundError(f"{run.config} not found: not a run directory")
    config = load_config(run.config)
    unit_dir = run.unit(unit)
    if not unit_dir.done.exists():
        raise FileNotFoundError(f"{unit_dir.done} not found: unit {unit.name} of {run.root} is not finished")
    state = torch.load(unit_dir.model, map_location="cpu", weights_only=True)
    backbone = {k: v for k, v in state.items() if k.startswith("backbone.body.")}
    buffer = io.BytesIO()
    torch.save(backbone, buffer)
    data = buffer.getvalue()
    out = Path(out)
    write_atomic(out, data)
    done = json.loads(unit_dir.done.read_text(encoding="utf-8"))
    held_out = f"fold {unit.fold} of {config.folds} (its images never trained these weights)"
    provenance = {
        "format": PROVENANCE_FORMAT,
        "file": out.name,
        "sha256": hashlib.sha256(data).hexdigest(),
        "architecture": unit.architecture,
        "image_size": config.image_size,
        "made_from": {"run": config.name, "unit": unit.name, "held_out": held_out,
                      "best_epoch": done.get("best_epoch"), "labels": list(config.labels),
                      **({"averaged_epochs": done["averaged_epochs"]} if "averaged_epochs" in done else {})},
        "cohorts": [_cohort_record(c, "train") for c in config.train]
        + [_cohort_record(c, "external (scored, never trained on)") for c in config.external],
        "recipe": config.to_dict(),
        "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    write_atomic(provenance_path(out), (json.dumps(provenance, indent=2) + "\n").encode("utf-8"))
    return out


def read_provenance(weights: str | Path) -> dict[str, Any] | None:
    """The provenance of a weights file, or None when it has none (e.g. a file made elsewhere).

    Raises:
        ConfigError: a provenance file that cannot be read, or whose sha256 is not the file's.
    """
    path = provenance_path(weights)
    if not path.exists():
        return None
    try:
        provenance = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError([f"{path}: cannot read the weights' provenance: {exc}"], RUN_CONFIGURATION) from exc
    found = sha256_file(weights)
    if provenance.get("sha256") != found:
        raise ConfigError([f"{path}: records sha256 {provenance.get('sha256')!r}, but {weights} has {found}: "
                           "the weights changed after their provenance was written"], RUN_CONFIGURATION)
    return dict(provenance)


def init_files(config: RunConfig) -> dict[str, str]:
    """Architecture -> the local weights file it starts from (architectures starting from files only)."""
    out = {}
    for arch in config.architectures:
        weights = config.weights_for(arch)
        if weights is not None and weights != "imagenet":
            out[arch] = weights
    return out


def check_init_cohorts(config: RunConfig) -> dict[str, dict[str, Any]]:
    """Refuse a run whose cohorts trained its initial weights; returns architecture -> provenance.

    Raises:
        ConfigError: a training or external cohort of the run (same CSV sha256) trained the weights.
    """
    run_cohorts: Sequence[tuple[str, CohortConfig]] = [("training", c) for c in config.train] + [
        ("external", c) for c in config.external]
    digests = {sha256_file(c.csv): (role, c.name) for role, c in run_cohorts if Path(c.csv).is_file()}
    problems, provenances = [], {}
    for arch, weights in init_files(config).items():
        provenance = read_provenance(weights)
        if provenance is None:
            continue
        provenances[arch] = provenance
        for cohort in provenance.get("cohorts", []):
            if cohort.get("role") != "train" or cohort.get("csv_sha256") not in digests:
                continue
            role, name = digests[cohort["csv_sha256"]]
            why = ("its figures would no longer be external" if role == "external"
                   else "its OOF figures would be biased: the backbone saw the held-out images with their labels")
            problems.append(f"{arch}: the initial weights {weights} were trained on cohort {cohort['name']!r}, "
                            f"the run's {role} cohort {name!r}: {why}")
    if problems:
        raise ConfigError(problems, RUN_CONFIGURATION)
    return provenances


def weights_record(weights: str) -> str:
    """What the manifest says a member started from: ``imagenet``/``random``, or a file's name and sha256."""
    if weights in ("imagenet", "random", ""):
        return weights or "random"
    path = Path(weights)
    return f"{path.name} (sha256 {sha256_file(path)[:16]})" if path.is_file() else path.name
