"""Export step over a run directory (``cxr-train export``): the finished units of a run -> a model package.

Composes the run's pieces: its configuration and finished units (``training.rundir``, ``training.unit``),
the operating thresholds chosen on the OOF ensemble of the exported members (``training.thresholds``, the
chooser ``cxr-train evaluate`` uses too) and the package writer (``training.export.export_package``).

The OOF scores come from the run's ``predictions_oof.csv`` (torch, float32: ``oof_scores="run"``) or from every
unit written as the package stores it and scored by onnxruntime (``"stored"``, ``training.stored_scores``; the
default for ``int8-last-stage``, whose storage moves scores enough to matter at a threshold).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ai.manifest import load_manifest, member_path
from ai.preprocess import to_model_input
from training import metrics
from training.config import RunConfig
from training.export import INT8_LAST_STAGE, MemberInfo, check_same_preprocessing, default_version, export_package
from training.labels import label_ages
from training.models import CxrNet, keep_labels
from training.predictions import ENSEMBLE, PredictionTable, read_predictions, write_predictions
from training.prepare import load_configured_cohort, load_run_config, preprocess_cache
from training.pretrained import weights_record
from training.rundir import RunDir
from training.stored_scores import stored_oof
from training.thresholds import choose_thresholds, ensemble_of, reference_distribution
from training.unit import UnitKey, load_unit_model

OOF_SCORES = ("run", "stored")


@dataclass
class _RunPart:
    """One run's share of a package: its configuration, the exported architectures and their finished units, and
    (once read, :func:`_read_oof`) its OOF table with the sha256 of the stored graphs that scored it."""

    run: RunDir
    config: RunConfig
    archs: list[str]
    units: list[UnitKey]
    oof: PredictionTable | None = None
    scored_by: dict[UnitKey, str] | None = None

    def table(self) -> PredictionTable:
        """The OOF table (:func:`_read_oof` first)."""
        assert self.oof is not None, "_read_oof first"
        return self.oof


def _run_part(run_dir: str | Path, members: Sequence[str] | None, several: bool,
              folds: Sequence[int] | None = None) -> _RunPart:
    run = RunDir(run_dir)
    config = load_run_config(run.root)
    archs = [a for a in (members or config.architectures) if a in config.architectures] if several else list(
        members or config.architectures)
    unknown = sorted(set(archs) - set(config.architectures))
    if unknown or not archs:
        raise ValueError(f"--members {unknown or list(members or ())} not in the run's architectures "
                         f"{list(config.architectures)}")
    units = [key for key, _ in run.finished_units() if key.architecture in archs]
    if len(units) != len(archs) * len(config.fold_indices()):
        raise ValueError(f"{run.root}: {len(units)} finished unit(s) of {archs}, expected "
                         f"{len(archs) * len(config.fold_indices())}; run `cxr-train fit` first")
    if folds is not None:
        unknown_folds = sorted(set(folds) - set(config.fold_indices()))
        if unknown_folds or not folds:
            raise ValueError(f"--folds {unknown_folds or list(folds)} not among the run's folds "
                             f"{list(config.fold_indices())}")
        units = [key for key in units if key.fold in folds]
    return _RunPart(run, config, archs, units)


def _folds_per_run(folds: Sequence[int] | Sequence[Sequence[int]] | None, runs: int) -> list[list[int] | None]:
    """``folds`` as one list (or None) per run.

    Raises:
        ValueError: per-run lists whose number differs from the number of runs.
    """
    if folds is None:
        return [None] * runs
    lists: list[list[int] | None] = [[int(k) for k in item] for item in folds if isinstance(item, Sequence)]
    flat = [int(item) for item in folds if not isinstance(item, Sequence)]
    if flat and not lists:
        return [flat] * runs
    if flat or len(lists) not in (1, runs):
        raise ValueError(f"--folds: give one list for all {runs} run(s) or one per --run-dir, got {list(folds)}")
    return lists * runs if len(lists) == 1 else lists


def export_run(
    run_dir: str | Path | Sequence[str | Path], out: str | Path, members: Sequence[str] | None = None,
    version: str = "", threshold: str = "youden", target_sensitivity: float = 0.90, overwrite: bool = False,
    weights_dtype: str = "float32", labels: Sequence[str] | None = None,
    base_package: str | Path | None = None, folds: Sequence[int] | Sequence[Sequence[int]] | None = None,
    informational: Sequence[str] = (), oof_scores: str | None = None, oof_out: str | Path | None = None,
    name: str = "", threshold_at: str = "midway",
) -> Path:
    """Export the finished units of ``members`` (architectures) of one run, or of several runs, as a model package.

    Every fold model of each selected architecture becomes a member (the node averages them all, which
    equals the mean over architectures of their fold means). Thresholds are chosen on the OOF ensemble
    of the selected architectures (Youden J, or the highest threshold reaching ``target_sensitivity``), placed
    ``threshold_at`` (``training.thresholds.PLACEMENTS``: midway to the next lower OOF score, or on the score).
    ``weights_dtype="float16"`` stores the members' weights at half the size, ``"int8-last-stage"`` the last backbone
    stage's and the head's as int8 and the rest as float16 (float32 compute either way).
    ``labels``: the run's labels the package carries (default: all), in the run's order; the others are cut
    from every member's output layer and named in the manifest's evaluation summary (``left_out``).

    Several runs (``run_dir`` a sequence; the same preprocessing but for the input size): the package carries the
    union of their labels, each member its own run's (``Member.labels``) and, when its run's ``image_size`` is not the
    first run's (the package's), its own input size (``Member.size``), and a label's score is the mean over the members
    that output it. Its OOF score is the same mean over the runs' OOF ensembles, weighted by their member
    counts: every run must have scored the same images of that label. Member files are prefixed with the
    run's name. ``members`` then selects architectures in whichever runs have them.

    ``folds``: export only these folds' units (the OOF figures, thresholds and reference still come from every
    fold: each image scored by the model that did not train on it); with several runs, one list for all of them or
    one list per run, in ``run_dir``'s order (a run's OOF score then weighs as many members as it ships).

    ``base_package`` (one run, preprocessed as the base at its ``preprocess.size``): the package carries that
    package's members unchanged (byte for byte, with their labels, sizes, thresholds, reference and ages) and, after
    them, the run's members for the run's labels the
    base does not carry (``labels`` narrows them; naming a base label is refused: a label has one source).
    The run's members are cut to those labels and their files prefixed with the run's name; the base's
    informational labels stay informational.

    ``informational``: labels the package reports with their decision but that do not set the node's triage flag
    (manifest ``informational``: a finding too unspecific at its operating point to sort studies).

    ``name``: the package's name; default: the run's name, or the runs' names joined by ``+`` (the base package's
    and the run's, with ``base_package``). ``version`` defaults to the name and today's date, or the date alone
    where that would not fit the 64 characters of a DICOM LO value.

    ``oof_scores``: where the OOF scores behind the thresholds, the OOF AUROC and the reference come from: ``"run"``,
    the run's ``predictions_oof.csv``; ``"stored"``, every unit (all folds, also those ``folds`` leaves out) written
    with ``weights_dtype`` and scored by onnxruntime on its held-out images; the shipped members must then be the
    very graphs that scored (sha256). None: ``"stored"`` for ``int8-last-stage``, else ``"run"``. ``oof_out``: a
    folder to write those OOF scores to as ``predictions_oof.csv`` (for ``cxr-train evaluate`` and ``compare``).

    Raises:
        ValueError: an unknown or unfinished architecture, runs whose preprocessing differs in more than the input
            size, or runs that scored different images for a label they share.
        FileNotFoundError: no ``config.toml`` or ``predictions_oof.csv`` in the run directory.
    """
    oof_scores = oof_scores or ("stored" if weights_dtype == INT8_LAST_STAGE else "run")
    if oof_scores not in OOF_SCORES:
        raise ValueError(f"oof_scores must be one of {OOF_SCORES}, got {oof_scores!r}")
    _check_oof_out(oof_out, overwrite)
    dirs = [run_dir] if isinstance(run_dir, str | Path) else list(run_dir)
    per_run = _folds_per_run(folds, len(dirs))
    parts = [_run_part(d, members, len(dirs) > 1, run_folds) for d, run_folds in zip(dirs, per_run, strict=True)]
    if base_package is not None and len(parts) != 1:
        raise ValueError("a base package takes the members of one run (one --run-dir)")
    union = tuple(dict.fromkeys(label for part in parts for label in part.config.labels))
    foreign = sorted(set(labels or ()) - set(union))
    if foreign:
        raise ValueError(f"--labels {foreign} not among the run's labels {list(union)}")
    if base_package is not None:
        return _export_onto(parts[0], Path(base_package), out, labels, version, threshold, threshold_at,
                            target_sensitivity, overwrite, weights_dtype, informational, oof_scores, oof_out, name)
    carried = tuple(label for label in union if labels is None or label in labels)
    for part in parts:
        own = [label for label in part.config.labels if label in carried]
        if own:  # a run none of whose labels the package carries ships no member and scores nothing
            _read_oof(part, own, oof_scores, weights_dtype)
    if len(parts) > 1:
        return _export_runs(parts, out, carried, version, threshold, threshold_at, target_sensitivity, overwrite,
                            weights_dtype, informational, oof_out, name)
    (part,) = parts
    run, config = part.run, part.config
    thresholds, evaluation, reference = _oof_figures(part, carried, threshold, threshold_at, target_sensitivity,
                                                     weights_dtype)
    left_out = [label for label in config.labels if label not in carried]
    if left_out:
        evaluation["left_out"] = left_out
    package = export_package(
        _members(part, carried, prefixed=False), out, name=name or config.name,
        version=version or default_version(name or config.name), labels=carried, spec=config.preprocess_spec(),
        thresholds=thresholds, overwrite=overwrite, evaluation_summary=evaluation, data_summary=_cohorts(run),
        weights_dtype=weights_dtype, parity_inputs=real_parity_inputs(run.root, config), reference=reference,
        ages=label_ages(carried), informational=informational, expected_sha256=_scored_files(part, prefixed=False),
    )
    _write_oof(oof_out, [part.table()], overwrite)
    return package


def _read_oof(part: _RunPart, labels: Sequence[str], oof_scores: str, weights_dtype: str) -> None:
    """Set ``part.oof`` (and, for stored scores, ``part.scored_by``): the OOF table of ``labels``."""
    if oof_scores == "run":  # cut to the labels and architectures exported, their ensemble recomputed
        oof = read_predictions(part.run.oof_predictions)
        part.oof = replace(oof, labels={label: oof.labels[label] for label in labels}, ensemble_computed=set(),
                           scores={label: {**{arch: oof.scores[label][arch] for arch in part.archs},
                                           ENSEMBLE: ensemble_of(oof, label, part.archs)} for label in labels})
        return
    part.oof, part.scored_by = stored_oof(part.run.root, part.config, part.archs, labels, weights_dtype,
                                          real_parity_inputs(part.run.root, part.config))


def _scored_files(part: _RunPart, prefixed: bool) -> dict[str, str]:
    """Per shipped member file, the sha256 of the stored graph that scored its OOF images ({} for the run's scores)."""
    if part.scored_by is None:
        return {}
    prefix = f"{part.config.name}_" if prefixed else ""
    return {f"{prefix}{key.architecture}_fold{key.fold}.onnx": part.scored_by[key] for key in part.units}


def _oof_record(parts: Sequence[_RunPart], weights_dtype: str) -> dict[str, Any]:
    """The evaluation summary's word on where the OOF scores came from."""
    if all(part.scored_by is None for part in parts):
        return {"source": "the run's predictions_oof.csv (torch, float32)"}
    return {"source": f"each unit stored as {weights_dtype} and scored by onnxruntime on its held-out images",
            "sha256": {f"{part.config.name}/{key.name}": digest
                       for part in parts for key, digest in (part.scored_by or {}).items()}}


def _check_oof_out(folder: str | Path | None, overwrite: bool) -> None:
    """Refuse an ``--oof-out`` folder that is a run directory (its own ``predictions_oof.csv`` would be replaced)
    or that holds OOF scores already, unless ``overwrite``."""
    if folder is None:
        return
    folder = Path(folder)
    if RunDir(folder).config.exists():
        raise ValueError(f"--oof-out {folder} is a run directory: its predictions_oof.csv is the run's own")
    if (folder / "predictions_oof.csv").exists() and not overwrite:
        raise FileExistsError(f"{folder / 'predictions_oof.csv'} exists; --overwrite (overwrite=True) replaces it")


def _write_oof(folder: str | Path | None, tables: Sequence[PredictionTable], overwrite: bool) -> None:
    """The OOF scores the thresholds were chosen on, as ``FOLDER/predictions_oof.csv``, once the package is published:
    the exported architectures' columns and their ensemble for every image of the run (one run), or per label the
    runs' columns and their weighted mean (several runs: tables merged on the image key, a label's cells empty where
    it is unknown)."""
    if folder is None:
        return
    _check_oof_out(folder, overwrite)
    merged = tables[0] if len(tables) == 1 else _merge(tables)
    write_predictions(merged, Path(folder) / "predictions_oof.csv", number_format="exact")


def _merge(tables: Sequence[PredictionTable]) -> PredictionTable:
    """Several OOF tables of different labels as one, rows in first-seen image order; an image's site, sex, age
    and source from any table that has them; folds only when every table has them and none contradicts another
    (runs with other folds of one cohort: a row's fold would name no one model)."""
    images = list(dict.fromkeys(image for table in tables for image in table.images.tolist()))
    at = {image: i for i, image in enumerate(images)}
    patients = np.empty(len(images), dtype=object)
    text = {attr: np.full(len(images), "", dtype=object) for attr in ("sources", "sites", "sexes")}
    ages = np.full(len(images), np.nan)
    fold_seen: list[set[str]] = [set() for _ in images]
    labels: dict[str, np.ndarray] = {}
    scores: dict[str, dict[str, np.ndarray]] = {}
    for table in tables:
        rows = np.array([at[image] for image in table.images.tolist()], dtype=np.int64)
        patients[rows] = table.patient_ids
        for attr, column in text.items():
            values = getattr(table, attr)
            if values is not None:
                column[rows] = values
        if table.ages is not None:
            ages[rows] = table.ages
        if table.folds is not None:
            for row, fold in zip(rows.tolist(), table.folds.tolist(), strict=True):
                fold_seen[row].add(fold)
        for label, values in table.labels.items():
            labels[label] = np.full(len(images), np.nan)
            labels[label][rows] = values
            scores[label] = {}
            for member, column in table.scores[label].items():
                scores[label][member] = np.full(len(images), np.nan)
                scores[label][member][rows] = column
    agreed = all(table.folds is not None for table in tables) and all(len(seen) == 1 for seen in fold_seen)
    folds = np.array([next(iter(seen)) for seen in fold_seen], dtype=str) if agreed else None

    def kept(attr: str) -> np.ndarray | None:
        column = text[attr]
        had = any(getattr(table, attr) is not None for table in tables)
        return column.astype(str) if had and (attr != "sources" or any(column)) else None

    return PredictionTable(images=np.array(images), patient_ids=patients.astype(str), labels=labels, scores=scores,
                           sources=kept("sources"), sites=kept("sites"), sexes=kept("sexes"), folds=folds,
                           ages=ages if any(table.ages is not None for table in tables) else None,
                           name="package OOF")


def _oof_figures(
    part: _RunPart, labels: Sequence[str], threshold: str, placement: str, target_sensitivity: float,
    weights_dtype: str,
) -> tuple[dict[str, tuple[float, str]], dict[str, Any], dict[str, Any]]:
    """One run's thresholds and evaluation (:func:`oof_thresholds`) and reference distributions of ``labels``, from
    its OOF table (:func:`_read_oof`)."""
    oof = part.table()
    thresholds, evaluation = oof_thresholds(oof, labels, part.archs, threshold, target_sensitivity, placement)
    evaluation["oof_scores"] = _oof_record([part], weights_dtype)
    reference = {label: reference_distribution(oof, label, part.archs, part.config.train[0].name)
                 for label in labels}
    return thresholds, evaluation, reference


def _members(part: _RunPart, outputs: Sequence[str], prefixed: bool,
             package_size: int | None = None) -> list[tuple[CxrNet, MemberInfo]]:
    """Each finished unit's model, cut to ``outputs`` (run labels, in the run's order) when it has more, with its
    manifest info; ``prefixed``: the file named after the run and the member's labels set (a package of several
    sources); its input size set when the run's is not ``package_size`` (None: the run's own)."""
    config = part.config
    own = config.preprocess_spec().size
    size = own if package_size is not None and own != package_size else None
    indices = [config.labels.index(label) for label in outputs]
    members = []
    for key in part.units:
        model = load_unit_model(part.run.root, config, key)
        if len(outputs) < len(config.labels):
            model = keep_labels(model, indices)
        weights = weights_record(config.weights_for(key.architecture) or "random")
        info = MemberInfo(fold=key.fold, weights=weights, size=size) if not prefixed else MemberInfo(
            fold=key.fold, weights=weights, file=f"{config.name}_{key.architecture}_fold{key.fold}.onnx",
            labels=tuple(outputs), size=size)
        members.append((model, info))
    return members


def _cohorts(run: RunDir) -> dict[str, Any]:
    """The run's ``cohorts.json`` (the package's data summary), or {} when there is none."""
    return json.loads(run.cohorts.read_text()) if run.cohorts.exists() else {}


def _export_runs(
    parts: list[_RunPart], out: str | Path, carried: tuple[str, ...], version: str, threshold: str, placement: str,
    target_sensitivity: float, overwrite: bool, weights_dtype: str, informational: Sequence[str],
    oof_out: str | Path | None, name: str = "",
) -> Path:
    """The package of several runs (see :func:`export_run`); each part's OOF table read (:func:`_read_oof`)."""
    spec = parts[0].config.preprocess_spec()
    for part in parts[1:]:
        check_same_preprocessing(spec, f"run {parts[0].run.root}", part.config.preprocess_spec(), part.run.root)
    names = [part.config.name for part in parts]
    if len(set(names)) != len(names):
        raise ValueError(f"the runs must have distinct names (member files are prefixed with them), got {names}")
    thresholds: dict[str, tuple[float, str]] = {}
    evaluation: dict[str, Any] = {"runs": {p.config.name: {"ensemble_of": p.archs, "members": len(p.units)}
                                           for p in parts}, "oof": {}, "oof_scores": _oof_record(parts, weights_dtype)}
    reference = {}
    tables = []
    for label in carried:
        table = combined_oof(parts, label)
        tables.append(table)
        point = choose_thresholds(table, label, target_sensitivity, kinds=(threshold,), placement=placement)[threshold]
        thresholds[label] = (float(point["value"]), point["method"])
        y, p = table.labels[label], table.scores[label][ENSEMBLE]
        evaluation["oof"][label] = {"auroc": float(metrics.auroc(y, p)), "n": int(np.sum(~np.isnan(y))),
                                    "runs": [n for n in table.scores[label] if n != ENSEMBLE]}
        reference[label] = reference_distribution(table, label)
    left_out = [label for part in parts for label in part.config.labels if label not in carried]
    if left_out:
        evaluation["left_out"] = list(dict.fromkeys(left_out))
    models = []
    for part in parts:
        outputs = tuple(label for label in part.config.labels if label in carried)
        if outputs:
            models += _members(part, outputs, prefixed=True, package_size=spec.size)
    name = name or "+".join(names)
    package = export_package(
        models, out, name=name, version=version or default_version(name), labels=carried, spec=spec,
        thresholds=thresholds, overwrite=overwrite, evaluation_summary=evaluation,
        data_summary={p.config.name: _cohorts(p.run) for p in parts},
        weights_dtype=weights_dtype, parity_inputs=_parity_by_size(parts),
        reference=reference, ages=label_ages(carried), informational=informational,
        expected_sha256={file: digest for part in parts for file, digest in _scored_files(part, True).items()},
    )
    _write_oof(oof_out, tables, overwrite)
    return package


def _export_onto(
    part: _RunPart, base_dir: Path, out: str | Path, labels: Sequence[str] | None, version: str, threshold: str,
    placement: str, target_sensitivity: float, overwrite: bool, weights_dtype: str, informational: Sequence[str],
    oof_scores: str, oof_out: str | Path | None, name: str = "",
) -> Path:
    """A base package's members unchanged plus one run's members for labels the base lacks (see :func:`export_run`)."""
    base = load_manifest(base_dir, verify=True)
    config = part.config
    if config.preprocess_spec() != base.preprocess:
        raise ValueError(f"{part.run.root} preprocesses differently from the base package {base_dir} "
                         f"({config.preprocess_spec()} vs {base.preprocess}): a run added to a base package takes "
                         f"its preprocessing and size (runs of other sizes: --run-dir twice, or cxr-train combine)")
    shared = [label for label in (labels or ()) if label in base.labels]
    if shared:
        raise ValueError(f"--labels {shared}: the base package {base.name} {base.version} carries them already; "
                         f"a label has one source")
    added = tuple(label for label in config.labels
                  if label not in base.labels and (labels is None or label in labels))
    if not added:
        raise ValueError(f"the run adds no label to the base package's {list(base.labels)}")
    _read_oof(part, added, oof_scores, weights_dtype)
    thresholds, evaluation, reference = _oof_figures(part, added, threshold, placement, target_sensitivity,
                                                     weights_dtype)
    copied = [(member_path(base_dir, m), replace(m, labels=m.outputs(base.labels))) for m in base.members]
    summary: dict[str, Any] = {
        "base_package": {"name": base.name, "version": base.version, "labels": list(base.labels),
                         "evaluation_summary": base.evaluation_summary},
        "added": {"run": config.name, "folds": [key.fold for key in part.units], **evaluation},
    }
    left_out = [label for label in config.labels if label not in added and label not in base.labels]
    if left_out:
        summary["left_out"] = left_out
    name = name or f"{base.name}+{config.name}"
    package = export_package(
        _members(part, added, prefixed=True), out, name=name,
        version=version or default_version(name), labels=base.labels + added,
        spec=base.preprocess, thresholds={**base.thresholds, **thresholds}, overwrite=overwrite,
        evaluation_summary=summary,
        data_summary={base.name: base.data_summary, config.name: _cohorts(part.run)},
        weights_dtype=weights_dtype, parity_inputs=real_parity_inputs(part.run.root, config),
        reference={**base.reference, **reference},
        ages={**base.ages, **label_ages(added)}, copied=copied,
        informational=(*base.informational, *informational), expected_sha256=_scored_files(part, prefixed=True),
    )
    _write_oof(oof_out, [part.table()], overwrite)
    return package


def combined_oof(parts: Sequence[_RunPart], label: str) -> PredictionTable:
    """``label``'s OOF scores of several runs as one table: a column per run (its OOF ensemble of the exported
    architectures) and ``ensemble``, their mean weighted by member count, as the node averages the members. Sites,
    sexes and ages come along; folds where every run split the images alike (an image's fold names its models).

    Raises:
        ValueError: the runs carrying ``label`` scored different images, or disagree on a label value.
    """
    carrying = [part for part in parts if label in part.config.labels]
    first: PredictionTable | None = None
    same_folds = True
    columns: dict[str, np.ndarray] = {}
    weights: list[float] = []
    for part in carrying:
        oof = part.table()
        known = ~np.isnan(oof.labels[label])
        table = oof.subset(np.flatnonzero(known)[np.argsort(oof.images[known])], part.config.name)
        if first is None:
            first = table
        elif not np.array_equal(table.images, first.images) or not np.array_equal(table.labels[label],
                                                                            first.labels[label]):
            raise ValueError(f"{label}: runs {carrying[0].config.name} and {part.config.name} scored different "
                             f"images or labels; a shared label needs the same OOF images in every run")
        same_folds &= table.folds is not None and first.folds is not None and np.array_equal(table.folds,
                                                                                            first.folds)
        columns[part.config.name] = ensemble_of(table, label, part.archs)
        weights.append(float(len(part.units)))
    assert first is not None
    stacked = np.vstack(list(columns.values()))
    combined = (np.asarray(weights)[:, None] * stacked).sum(axis=0) / sum(weights)
    sources = first.sources if first.sources is not None else np.full(first.images.size,
                                                                      carrying[0].config.train[0].name)
    return PredictionTable(images=first.images, patient_ids=first.patient_ids, name="combined OOF",
                           labels={label: first.labels[label]}, scores={label: {**columns, ENSEMBLE: combined}},
                           sources=sources, sites=first.sites, sexes=first.sexes, ages=first.ages,
                           folds=first.folds if same_folds else None)


def _parity_by_size(parts: Sequence[_RunPart]) -> dict[int, np.ndarray]:
    """Real parity images at each run's input size (:func:`real_parity_inputs`; the first run of a size)."""
    out: dict[int, np.ndarray] = {}
    for part in parts:
        size = part.config.preprocess_spec().size
        if size not in out:
            out[size] = real_parity_inputs(part.run.root, part.config)
    return out


def real_parity_inputs(run_dir: Path, config: RunConfig, n: int = 4) -> np.ndarray:
    """The first ``n`` images of the (first) training cohort, preprocessed exactly as the node does: the
    torch-vs-onnxruntime parity of an export is checked on real chest X-rays, not only on noise."""
    spec = config.preprocess_spec()
    cohort = load_configured_cohort(config.train[0], config.labels)
    cache = preprocess_cache(config, run_dir, spec)
    return np.stack([to_model_input(cache.get(path), spec) for path in cohort.paths[:n]])


def oof_thresholds(
    oof: PredictionTable, labels: Sequence[str], archs: Sequence[str], threshold: str, target_sensitivity: float,
    placement: str = "midway",
) -> tuple[dict[str, tuple[float, str]], dict[str, Any]]:
    """Per label, the ``threshold`` operating point (``youden`` or ``sensitivity``) on the OOF ensemble of
    ``archs`` in ``oof``, placed as ``placement`` says (:func:`training.thresholds.choose_thresholds`), and that
    ensemble's OOF AUROC."""
    thresholds: dict[str, tuple[float, str]] = {}
    evaluation: dict[str, Any] = {"ensemble_of": list(archs), "oof": {}}
    for label in labels:
        point = choose_thresholds(oof, label, target_sensitivity, members=archs, kinds=(threshold,),
                                  placement=placement)[threshold]
        thresholds[label] = (float(point["value"]), point["method"])
        y, p = oof.labels[label], ensemble_of(oof, label, archs)
        evaluation["oof"][label] = {"auroc": float(metrics.auroc(y, p)), "n": int(np.sum(~np.isnan(y)))}
    return thresholds, evaluation



