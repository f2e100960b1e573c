"""`cxr-train` entry point: the offline training workflow, one thin subcommand per step.

The subcommands parse arguments and call the library: :func:`training.loop.fit`,
:func:`training.evaluate.evaluate_dir`, :func:`training.compare.compare`,
:func:`training.export.export_package` (through :func:`export_run`) and
:func:`training.audits.thumbnail_baseline` (through :func:`baseline_run`) and
:func:`training.audits.blackout_report` (through :func:`blackout_run`). The ``*_run`` functions below
compose those steps over a run directory.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ai.errors import CxrError
from storage.files import DISK_FULL_ERRNOS, DiskFull, write_atomic
from training.config import CONFIG_NAME, ConfigError, example_config_text, load_config

log = logging.getLogger(__name__)

WORKFLOW = """\
workflow:
  1. manifest   one CSV per cohort: image,patient_id,site,label_<Label>,... (1, 0, empty = unknown)
                [,age,sex,lung_mask]; image paths relative to the CSV's folder or its parent
                (labels: Tuberculosis, the 14 NIH findings ...; label_tb is accepted)
  2. config     cxr-train init-config run.toml          then edit labels, cohorts, architectures
  3. fit        cxr-train fit --config run.toml --run-dir runs/tb
                (k-fold x architectures; interrupted? run `cxr-train fit --run-dir runs/tb` again)
  4. evaluate   cxr-train baseline --run-dir runs/tb    thumbnail floor (shortcut audit), optional
                cxr-train audit-blackout --run-dir runs/tb   lungs blacked out (shortcut audit,
                                                        needs lung_mask), optional
                (both merge into runs/tb/audits.json, which evaluate puts in the report)
                cxr-train evaluate --run-dir runs/tb    -> runs/tb/report/report.md
                cxr-train compare A.csv B.csv --label Tuberculosis   DeLong between two models
  5. export     cxr-train export --run-dir runs/tb --out packages/tb-v1
  6. deploy     point the node at the package: [model] package = "packages/tb-v1" in node.toml
                (or CXR_MODEL_PACKAGE=packages/tb-v1), then restart cxr-node
  7. site       at another hospital, a labelled local sample (a cohort CSV) sets the site's threshold:
                cxr-train site-threshold --package packages/tb-v1 --cohort site.csv --out calib
                -> held-out sensitivity/specificity of the site rule + the [thresholds] lines for node.toml
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="cxr-train",
        description="Offline training of cxr-node model packages from chest X-ray cohorts.",
        epilog=WORKFLOW,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_, description=help_)

    p = add("init-config", "write a commented example run configuration")
    p.add_argument("path", type=Path, help="the TOML file to write")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")

    p = add("fit", "train every (architecture, fold) unit; resumes an interrupted run")
    p.add_argument("--config", type=Path, help="run configuration (omit to resume with RUN_DIR/config.toml)")
    p.add_argument("--run-dir", type=Path, required=True, help="the run directory")

    p = add("evaluate", "metrics with CIs and a Markdown report from the run's prediction CSVs")
    p.add_argument("--run-dir", type=Path, required=True, help="folder with predictions_*.csv")
    p.add_argument("--out", type=Path, help="report folder (default RUN_DIR/report)")
    p.add_argument("--labels", nargs="+", help="labels to evaluate (default: all scored)")
    p.add_argument("--target-sensitivity", type=float, default=0.90)
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples per CI")

    p = add("compare", "DeLong test between two prediction CSVs on the images both score")
    p.add_argument("a", type=Path, help="prediction CSV of model A")
    p.add_argument("b", type=Path, help="prediction CSV of model B")
    p.add_argument("--label", required=True, help="label, e.g. Tuberculosis")
    p.add_argument("--member-a", default="ensemble", help="member of A (default ensemble)")
    p.add_argument("--member-b", help="member of B (default: same as A)")

    p = add("export", "ONNX members + manifest (thresholds from the OOF predictions) for the node")
    p.add_argument("--run-dir", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="package folder to write")
    p.add_argument("--members", nargs="+", help="architectures to include (default: all trained)")
    p.add_argument("--version", default="", help="package version (default: the run name + date)")
    p.add_argument("--threshold", choices=("youden", "sensitivity"), default="youden",
                   help="operating point written into the manifest (default youden)")
    p.add_argument("--target-sensitivity", type=float, default=0.90)
    p.add_argument("--overwrite", action="store_true", help="replace an existing package")
    p.add_argument("--weights-dtype", choices=("float32", "float16"), default="float32",
                   help="store member weights as float16: half the disk, float32 compute")

    p = add("baseline", "thumbnail + intensity floor on the same folds (shortcut audit) -> RUN_DIR/audits.json")
    p.add_argument("--run-dir", type=Path, required=True)
    p.add_argument("--n-boot", type=int, default=2000)

    p = add("site-threshold", "a site's own operating threshold from its labelled sample, scored by the package "
                              "as the node scores it, with a held-out estimate -> node.toml [thresholds]")
    p.add_argument("--package", type=Path, required=True, help="the model package the node runs")
    p.add_argument("--cohort", type=Path, required=True, help="the site's labelled sample (cohort manifest CSV)")
    p.add_argument("--out", type=Path, required=True, help="folder for scores, site_threshold.json and .md")
    p.add_argument("--target-sensitivity", type=float, default=0.90)
    p.add_argument("--folds", type=int, default=5, help="k of the held-out estimate (default 5)")
    p.add_argument("--seed", type=int, default=0, help="fold and bootstrap seed (default 0)")
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples of the AUROC CI")
    p.add_argument("--threads", type=int, help="onnxruntime threads per member (default: the node's)")
    p.add_argument("--node-config", type=Path,
                   help="the node's node.toml: its [filter] decides which DICOM images count (default: the node's "
                        "defaults)")

    p = sub.add_parser(
        "audit-blackout",
        help="lung-blackout test of the ensemble (shortcut audit; needs lung_mask) -> RUN_DIR/audits.json",
        description=BLACKOUT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--run-dir", type=Path, required=True, help="a finished run (after `cxr-train fit`)")
    p.add_argument("--fill", choices=("zero", "background"), default="zero",
                   help="lung pixels become black (zero, default) or the median grey outside the lungs")
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples per CI (default 2000)")

    p = add("architectures", "list the registered architectures: source, offline ImageNet weights, input size rule")
    p.add_argument("--format", choices=("text", "json"), default="text")

    p = add("gate", "train the node's input gate (frontal chest / lateral / other) and write its package")
    p.add_argument("--config", type=Path, required=True, help="gate configuration (training/configs/gate.toml)")
    p.add_argument("--run-dir", type=Path, required=True, help="folder for the preprocessed pool and fold weights")
    p.add_argument("--out", type=Path, required=True, help="package folder to write (the node's: ai/models/gate)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing package")

    p = add("gate-eval", "score held-out images, fresh patterns and transformed chests through a gate package "
                         "as the node does -> OUT/gate_evaluation.json and README.md")
    p.add_argument("--config", type=Path, required=True, help="the gate configuration the package was trained with")
    p.add_argument("--run-dir", type=Path, required=True, help="the gate run (its out-of-fold scores)")
    p.add_argument("--package", type=Path, required=True, help="the gate package")
    p.add_argument("--out", type=Path, required=True, help="report folder")
    p.add_argument("--per-kind", type=int, default=50, help="fresh patterns and transformed chests per kind")
    return parser


BLACKOUT_HELP = """\
Lung-blackout test of the run's ensemble (shortcut audit).

For every image whose manifest row has a lung_mask, the lungs are blacked out in the source image
(mask resized to it, nearest neighbour), the image goes through the run's preprocessing and is scored
again: training-cohort images by the fold model that held them out (as in predictions_oof.csv),
external images by the mean of the fold models (as in predictions_<cohort>.csv); the score is the mean
over the run's architectures (the ensemble). Per cohort and label, AUROC with the lungs (the ensemble
column of the prediction CSV) vs with the lungs blacked out, bootstrap 95% CIs by patient, paired
DeLong test, and a verdict: a model that reads the lungs falls towards AUROC 0.5; one that does not
fall reads something else (shortcut risk). Images without a mask are left out (counted in the report).

Writes the reports to RUN_DIR/audits.json, replacing earlier lung-blackout entries and keeping the
others (the thumbnail floor of `cxr-train baseline`); `cxr-train evaluate` puts them in report.md.
Cost: one inference per image and architecture (x folds for external cohorts), on the configured device.
"""


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; returns the process exit status (2 for invalid input)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    handlers = {
        "init-config": _init_config,
        "fit": _fit,
        "evaluate": _evaluate,
        "compare": _compare,
        "export": _export,
        "baseline": _baseline,
        "audit-blackout": _audit_blackout,
        "site-threshold": _site_threshold,
        "architectures": _architectures,
        "gate": _gate,
        "gate-eval": _gate_eval,
    }
    try:
        return handlers[args.command](args)
    except Exception as exc:
        full = _disk_full(exc)
        if full is not None:
            print(f"cxr-train {args.command}: {_disk_full_text(full)}. Files already written are whole (each is "
                  "written whole or not at all): free space and run the same command again"
                  f"{'; the run resumes where it stopped' if args.command == 'fit' else ''}.", file=sys.stderr)
            return 1
        if isinstance(exc, (ConfigError, ValueError, FileNotFoundError, FileExistsError, KeyError, CxrError)):
            print(f"cxr-train {args.command}: {exc}", file=sys.stderr)
            return 2
        raise


def _disk_full(exc: BaseException) -> OSError | None:
    """The ENOSPC/EDQUOT ``OSError`` behind ``exc`` (itself, or its cause or context chain), or None."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError) and current.errno in DISK_FULL_ERRNOS:
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _disk_full_text(exc: OSError) -> str:
    """``disk full while writing PATH: reason`` (``DiskFull`` already says it; PATH only where known)."""
    if isinstance(exc, DiskFull):
        return str(exc.strerror)
    where = f" while writing {exc.filename}" if exc.filename else ""
    return f"disk full{where}: {exc.strerror or 'No space left on device'}"


def _init_config(args: argparse.Namespace) -> int:
    if args.path.exists() and not args.force:
        raise FileExistsError(f"{args.path} exists; pass --force to overwrite it")
    write_atomic(args.path, example_config_text().encode("utf-8"))
    print(f"wrote {args.path}; edit it, then: cxr-train fit --config {args.path} --run-dir runs/NAME")
    return 0


def _fit(args: argparse.Namespace) -> int:
    from training.loop import fit

    config = load_config(args.config) if args.config else None
    result = fit(config, args.run_dir)
    print(f"{len(result.units)} unit(s) done; predictions: {', '.join(str(p) for p in result.predictions)}")
    print(f"next: cxr-train evaluate --run-dir {args.run_dir}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from training.evaluate import evaluate_dir

    audits_path = args.run_dir / "audits.json"
    audits = json.loads(audits_path.read_text()) if audits_path.exists() else []
    out = args.out or args.run_dir / "report"
    report = evaluate_dir(args.run_dir, out, args.labels, args.target_sensitivity, args.n_boot, audits=audits)
    print(f"report: {report}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from training.compare import compare

    result = compare(args.a, args.b, args.label, args.member_a, args.member_b)
    print(result["verdict"])
    return 0


def _export(args: argparse.Namespace) -> int:
    package = export_run(args.run_dir, args.out, args.members, args.version, args.threshold,
                         args.target_sensitivity, args.overwrite, args.weights_dtype)
    print(f'package: {package}\nnext: set [model] package = "{package}" in node.toml and restart cxr-node')
    return 0


def _baseline(args: argparse.Namespace) -> int:
    for report in baseline_run(args.run_dir, args.n_boot):
        print(f"{report.get('cohort', '')} {report.get('label', '')}: {report['verdict']}")
    print(f"written to {args.run_dir / 'audits.json'}; `cxr-train evaluate` includes it in the report")
    return 0


def _audit_blackout(args: argparse.Namespace) -> int:
    fill = 0 if args.fill == "zero" else "background"
    for report in blackout_run(args.run_dir, fill, args.n_boot):
        print(f"{report['cohort']} {report['label']} ({report['n']} images with a lung mask): {report['verdict']}")
    print(f"written to {args.run_dir / 'audits.json'}; `cxr-train evaluate` includes it in the report")
    return 0


def _site_threshold(args: argparse.Namespace) -> int:
    """``cxr-train site-threshold``: print each label's result and the node.toml lines."""
    result = site_threshold_run(args.package, args.cohort, args.out, args.target_sensitivity, args.folds,
                                args.seed, args.n_boot, args.threads, args.node_config)
    for entry in result["labels"]:
        pkg, held = entry["package_threshold"], entry["held_out"]["pooled"]
        print(f"{entry['label']}: package threshold {pkg['threshold']:.4f} reaches sensitivity "
              f"{pkg['sensitivity']['value']:.3f} here; site threshold {entry['site_threshold']['value']:.4f} "
              f"(held out: sensitivity {held['sensitivity']['value']:.3f}, "
              f"specificity {held['specificity']['value']:.3f})")
    print(f"report: {args.out / 'site_threshold.md'}\nto apply it, put into node.toml and restart cxr-node:\n")
    print(result["snippet"], end="")
    return 0


# ---------------------------------------------------------------------------------------------------
# Compositions over a run directory
# ---------------------------------------------------------------------------------------------------


def _run_config(run_dir: Path) -> Any:
    """The configuration a run directory was trained with."""
    path = run_dir / CONFIG_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: not a run directory (run `cxr-train fit` first)")
    return load_config(path)


def _ensemble_of(table: Any, label: str, members: Sequence[str]) -> np.ndarray:
    """Mean score of ``members`` for ``label`` in a prediction table (the exported ensemble)."""
    missing = [m for m in members if m not in table.scores.get(label, {})]
    if missing:
        raise ValueError(f"prediction table {table.name!r} has no scores of {missing} for {label}")
    return np.mean([table.scores[label][m] for m in members], axis=0)


def export_run(
    run_dir: str | Path, out: str | Path, members: Sequence[str] | None = None, version: str = "",
    threshold: str = "youden", target_sensitivity: float = 0.90, overwrite: bool = False,
    weights_dtype: str = "float32",
) -> Path:
    """Export the finished units of ``members`` (architectures) as a model package.

    Every fold model of each selected architecture becomes a member (the node averages them all, which
    equals the mean over architectures of their fold means). Thresholds are chosen on the OOF ensemble
    of the selected architectures (Youden J, or the highest threshold reaching ``target_sensitivity``).
    ``weights_dtype="float16"`` stores the members' weights at half the size (float32 compute).

    Raises:
        ValueError: an unknown or unfinished architecture.
        FileNotFoundError: no ``config.toml`` or ``predictions_oof.csv`` in the run directory.
    """
    from training.export import MemberInfo, export_package
    from training.loop import iter_units, load_unit_model

    run_dir = Path(run_dir)
    config = _run_config(run_dir)
    archs = list(members or config.architectures)
    unknown = sorted(set(archs) - set(config.architectures))
    if unknown:
        raise ValueError(f"--members {unknown} not in the run's architectures {list(config.architectures)}")
    units = [key for key, _ in iter_units(run_dir) if key.architecture in archs]
    if len(units) != len(archs) * len(config.fold_indices()):
        raise ValueError(f"{run_dir}: {len(units)} finished unit(s) of {archs}, expected "
                         f"{len(archs) * len(config.fold_indices())}; run `cxr-train fit` first")
    thresholds, evaluation = oof_thresholds(run_dir, config.labels, archs, threshold, target_sensitivity)
    models = []
    for key in units:
        info = MemberInfo(fold=key.fold, weights=config.weights_for(key.architecture) or "random")
        models.append((load_unit_model(run_dir, config, key), info))
    summary_path = run_dir / "cohorts.json"
    return export_package(
        models, out, name=config.name, version=version or f"{config.name}-{_today()}", labels=config.labels,
        spec=config.preprocess_spec(), thresholds=thresholds, overwrite=overwrite, evaluation_summary=evaluation,
        data_summary=json.loads(summary_path.read_text()) if summary_path.exists() else {},
        weights_dtype=weights_dtype, parity_inputs=real_parity_inputs(run_dir, config),
    )


def real_parity_inputs(run_dir: Path, config: Any, n: int = 4) -> np.ndarray:
    """The first ``n`` images of the training cohort, preprocessed exactly as the node does: the
    torch-vs-onnxruntime parity of an export is checked on real chest X-rays, not only on noise."""
    from ai.preprocess import to_model_input
    from training.data import PreprocessCache, load_cohort

    spec = config.preprocess_spec()
    item = config.train
    cohort = load_cohort(item.csv, name=item.name, root=item.root or None, labels=config.labels)
    cache = PreprocessCache(Path(config.cache_dir) if config.cache_dir else run_dir / "cache", spec)
    return np.stack([to_model_input(cache.get(path), spec) for path in cohort.paths[:n]])


def oof_thresholds(
    run_dir: Path, labels: Sequence[str], archs: Sequence[str], threshold: str, target_sensitivity: float
) -> tuple[dict[str, tuple[float, str]], dict[str, Any]]:
    """Per label, the operating threshold on the OOF ensemble of ``archs``, and its OOF AUROC."""
    from training import metrics
    from training.evaluate import read_predictions

    oof = read_predictions(run_dir / "predictions_oof.csv")
    thresholds: dict[str, tuple[float, str]] = {}
    evaluation: dict[str, Any] = {"ensemble_of": list(archs), "oof": {}}
    for label in labels:
        y, p = oof.labels[label], _ensemble_of(oof, label, archs)
        if threshold == "youden":
            thresholds[label] = (float(metrics.youden_threshold(y, p)), "Youden J on OOF ensemble")
        else:
            value = float(metrics.threshold_for_sensitivity(y, p, target_sensitivity))
            thresholds[label] = (value, f"sensitivity >= {target_sensitivity:.2f} on OOF ensemble")
        evaluation["oof"][label] = {"auroc": float(metrics.auroc(y, p)), "n": int(np.sum(~np.isnan(y)))}
    return thresholds, evaluation


def site_threshold_run(
    package: str | Path, cohort_csv: str | Path, out: str | Path, target: float = 0.90, k: int = 5,
    seed: int = 0, n_boot: int = 2000, threads: int | None = None, node_config: str | Path | None = None,
) -> dict[str, Any]:
    """Score a site's labelled sample with a package and calibrate each label (``cxr-train site-threshold``).

    Everything is checked before scoring, and the three outputs are written only when all labels are
    calibrated: ``scores_<cohort>.csv`` (the prediction-CSV format: `evaluate` and `compare` read it),
    ``site_threshold.json`` and ``site_threshold.md`` in ``out``. Returns the JSON's content.

    Raises:
        ValueError: an invalid target or k, an invalid manifest (CohortError) or node config, too few
            positive or negative patients. UnsupportedImage: an image the node could not read.
    """
    from ai.manifest import load_manifest
    from node.config import load_settings
    from node.filter import FilterRules, decide
    from training.data import load_cohort
    from training.evaluate import jsonable, write_predictions
    from training.site import (
        calibrate_label,
        calibrated_labels,
        check_sample,
        report_markdown,
        score_cohort,
        thresholds_snippet,
    )

    if not 0.0 < target <= 1.0 or k < 2:
        raise ValueError(f"--target-sensitivity must be in (0, 1] and --folds at least 2, found {target} and {k}")
    manifest = load_manifest(package)
    cohort = load_cohort(cohort_csv)
    labels = calibrated_labels(manifest.labels, cohort)
    for label in labels:
        check_sample(cohort, label, k)
    settings = load_settings(node_config)  # None: the node's defaults; CXR_* variables apply as in the node
    rules = FilterRules.for_settings(settings)
    def accept(ds: Any) -> tuple[bool, str]:  # the node's chest filter, as configured
        decision = decide(ds, settings.filter, rules)
        return decision.accepted, decision.reason

    scored = score_cohort(package, cohort, labels, accept, threads)
    results = [
        calibrate_label(scored.table, label, manifest.thresholds[label].value, target, k, seed, n_boot)
        for label in labels
    ]
    info = {"name": manifest.name, "version": manifest.version, "path": str(package)}
    snippet = thresholds_snippet(results, cohort.name)
    result = {"package": info, "cohort": cohort.summary(), "excluded_by_filter": scored.excluded,
              "labels": results, "snippet": snippet}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    markdown = report_markdown(results, info, cohort.name, scored.excluded) + f"\n```toml\n{snippet}```\n"
    _write_atomic(out / "site_threshold.json", json.dumps(jsonable(result), indent=1))
    _write_atomic(out / "site_threshold.md", markdown)
    write_predictions(scored.table, out / f"scores_{cohort.name}.csv")
    return result


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) so that ``path`` is either the old file or the whole new one."""
    write_atomic(path, text.encode("utf-8"))


def _today() -> str:
    """The date for default package versions (UTC, YYYYMMDD)."""
    from datetime import UTC, datetime

    return datetime.now(UTC).strftime("%Y%m%d")


def baseline_run(run_dir: str | Path, n_boot: int = 2000) -> list[dict[str, Any]]:
    """Thumbnail floor per label on the run's folds vs the OOF ensemble (and on every external cohort).

    Merges the reports into ``RUN_DIR/audits.json`` (read by ``cxr-train evaluate``; earlier floor
    entries are replaced, other audits kept) and returns them.
    """
    from training.audits import floor_report, thumbnail_baseline
    from training.evaluate import load_prediction_dir
    from training.loop import prepare_run

    run_dir = Path(run_dir)
    config = _run_config(run_dir)
    data = prepare_run(config, run_dir)
    oof, externals = load_prediction_dir(run_dir)
    reports = []
    for j, label in enumerate(config.labels):
        y = data.cohort.y[:, j]
        if len(np.unique(y[~np.isnan(y)])) < 2:
            log.warning("baseline: %s has one class only in %s, skipped", label, data.cohort.name)
            continue
        floor = thumbnail_baseline(data.images, y, data.folds)
        reports.append(_floor_vs_model(floor_report, data.cohort, oof, label, floor.oof_scores, n_boot))
        for cohort, images in data.externals:
            if cohort.name in externals:
                table = externals[cohort.name]
                reports.append(_floor_vs_model(floor_report, cohort, table, label, floor.score(images), n_boot))
    merge_audits(run_dir, "thumbnail_floor", reports)
    return reports


def _floor_vs_model(
    floor_report: Any, cohort: Any, table: Any, label: str, floor_scores: np.ndarray, n_boot: int
) -> dict[str, Any]:
    """Floor report on the images a prediction table scores (matched on the image key)."""
    position = {image: i for i, image in enumerate(cohort.images)}
    rows = np.array([position[str(image)] for image in table.images])
    y = cohort.y[rows, cohort.labels.index(label)]
    model = table.scores[label]["ensemble"]
    groups = np.asarray(cohort.patient_ids)[rows]
    return floor_report(y, model, floor_scores[rows], groups, cohort=table.name, label=label, n_boot=n_boot)


AUDIT_ORDER = ("thumbnail_floor", "lung_blackout")


def merge_audits(run_dir: str | Path, kind: str, reports: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Replace the ``kind`` entries of ``RUN_DIR/audits.json`` by ``reports``, keep the others.

    The file is written atomically; entries are ordered by kind (thumbnail floor, lung blackout, others).
    Returns what was written.
    """
    path = Path(run_dir) / "audits.json"
    old = json.loads(path.read_text(encoding="utf-8")) if path.exists() else []
    if not isinstance(old, list):
        raise ValueError(f"{path}: expected a JSON list of audit reports")
    merged = [a for a in old if a.get("kind") != kind] + list(reports)

    def rank(a: dict[str, Any]) -> int:
        return AUDIT_ORDER.index(a["kind"]) if a.get("kind") in AUDIT_ORDER else len(AUDIT_ORDER)

    merged.sort(key=rank)
    _write_atomic(path, json.dumps(merged, indent=1, default=_plain))
    return merged


def blackout_run(run_dir: str | Path, fill: int | str = 0, n_boot: int = 2000) -> list[dict[str, Any]]:
    """Lung-blackout audit of the run's ensemble per cohort and label (``cxr-train audit-blackout``).

    Only images with a ``lung_mask`` take part. The scores with the lungs are the ``ensemble`` column of
    the run's prediction CSVs; the scores without them come from :func:`blackout_scores` (same models,
    same member/fold assignment). Cohorts without any mask and labels with one class among the masked
    images are skipped (logged). Merges the reports into ``RUN_DIR/audits.json`` and returns them.

    Raises:
        ValueError: No image of any cohort has a lung mask, or the run is not finished.
        FileNotFoundError: Not a run directory, or no prediction CSVs.
    """
    from training.audits import blackout_report
    from training.evaluate import load_prediction_dir
    from training.loop import prepare_run

    run_dir = Path(run_dir)
    config = _run_config(run_dir)
    oof, externals = load_prediction_dir(run_dir)
    data = prepare_run(config, run_dir)
    tables = [(data.cohort, oof)] + [(c, externals[c.name]) for c, _ in data.externals if c.name in externals]
    rows = {}
    for cohort, table in tables:
        position = {image: i for i, image in enumerate(cohort.images)}
        positions = np.array([position[str(image)] for image in table.images], dtype=int)
        with_mask = np.array([cohort.masks[i] is not None for i in positions], dtype=bool)
        if not with_mask.any():
            log.warning("audit-blackout: no image of %s has a lung mask, skipped", cohort.name)
            continue
        rows[cohort.name] = (positions, with_mask)
    if not rows:
        raise ValueError("no image of any cohort has a lung mask (manifest column lung_mask): "
                         "the blackout audit cannot run")
    blacked = blackout_scores(run_dir, data, {name: pos[keep] for name, (pos, keep) in rows.items()}, fill)
    reports = []
    for cohort, table in tables:
        if cohort.name not in rows:
            continue
        positions, keep = rows[cohort.name]
        groups = np.asarray(cohort.patient_ids)[positions[keep]]
        for label in config.labels:
            y = table.labels[label][keep]
            if np.unique(y[~np.isnan(y)]).size < 2:
                log.warning("audit-blackout: %s has one class only among the masked images of %s, skipped",
                            label, cohort.name)
                continue
            report = blackout_report(y, table.scores[label]["ensemble"][keep],
                                     blacked[cohort.name][:, config.labels.index(label)], groups,
                                     cohort=table.name, label=label, n_boot=n_boot)
            report.update(n_without_mask=int(np.sum(~keep)), fill=fill)
            reports.append(report)
    merge_audits(run_dir, "lung_blackout", reports)
    return reports


def blackout_scores(run_dir: Path, data: Any, rows: dict[str, np.ndarray], fill: int | str = 0) -> dict[str, Any]:
    """Ensemble probabilities ``[n, L]`` of images with their lungs blacked out, per cohort name.

    ``rows[name]`` are positions in that cohort (the training cohort: ``data.cohort``; external ones:
    ``data.externals``), each with a lung mask. Each image is read from its source file, blacked out
    there (:func:`training.audits.lung_blackout`, mask read alike) and preprocessed with the run's spec
    (``ai.preprocess.preprocess_gray``). Training-cohort images are scored by the model of their
    held-out fold, external ones by the mean of the fold models; then the mean over architectures.
    """
    from training.loop import UnitKey, iter_units, load_unit_model

    config = data.config
    cohorts = {c.name: c for c in [data.cohort, *(c for c, _ in data.externals)]}
    done = {key for key, _ in iter_units(run_dir)}
    units = [UnitKey(arch, fold) for arch in config.architectures for fold in config.fold_indices()]
    missing = [key.name for key in units if key not in done]
    if missing:
        raise ValueError(f"{run_dir}: unit(s) {missing} not finished; run `cxr-train fit` first")
    pixels = {name: _blacked_pixels(cohorts[name], index, data.spec, fill, config.progress)
              for name, index in rows.items()}
    train = data.cohort.name
    train_folds = data.folds[rows[train]] if train in rows else np.array([], dtype=int)
    sums = {name: np.zeros((len(index), len(config.labels))) for name, index in rows.items()}
    n_folds = len(config.fold_indices())
    for key in units:
        model = load_unit_model(run_dir, config, key, data.device)
        for name, images in pixels.items():
            if name != train:
                sums[name] += _probabilities(model, data, images, desc=f"{key.name} {name}") / n_folds
            elif np.any(held_out := train_folds == key.fold):
                sums[name][held_out] += _probabilities(model, data, images, np.flatnonzero(held_out), key.name)
    return {name: total / len(config.architectures) for name, total in sums.items()}


def _probabilities(model: Any, data: Any, images: np.ndarray, index: Any = None, desc: str = "") -> np.ndarray:
    """Sigmoid probabilities ``[n, L]`` of ``model`` on uint8 images (rows ``index``), as the run scores."""
    from training.loop import _sigmoid, predict_array

    amp = data.device.type == "cuda" and data.config.amp
    logits = predict_array(model, images, data.spec, data.config.batch_size, data.device, amp,
                           desc=f"{desc} blackout", progress=data.config.progress, index=index)
    return _sigmoid(logits)


def _blacked_pixels(cohort: Any, index: np.ndarray, spec: Any, fill: int | str, progress: bool = False) -> np.ndarray:
    """uint8 ``[n, S, S]``: images ``index`` of ``cohort``, lungs blacked out in the source, then preprocessed."""
    from tqdm import tqdm

    from ai.pixels import read_image_file
    from ai.preprocess import preprocess_gray
    from training.audits import lung_blackout

    out = np.empty((len(index), spec.size, spec.size), dtype=np.uint8)
    for n, i in enumerate(tqdm(index, desc=f"blackout {cohort.name}", disable=not progress, leave=False)):
        blacked = lung_blackout(read_image_file(cohort.paths[i]), read_image_file(cohort.masks[i]), fill)
        out[n] = preprocess_gray(blacked, spec)[0]
    return out


def _plain(value: Any) -> Any:
    """JSON for numpy values in audit reports."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


if __name__ == "__main__":
    sys.exit(main())


def _gate(args: argparse.Namespace) -> int:
    from training.gate import export_gate, load_gate_config

    package = export_gate(load_gate_config(args.config), args.run_dir, args.out, overwrite=args.overwrite)
    print(f"gate package: {package}\nnext: cxr-train gate-eval --config {args.config} --run-dir {args.run_dir} "
          f"--package {package} --out docs/gate")
    return 0


def _gate_eval(args: argparse.Namespace) -> int:
    from training.gate_eval import evaluate_gate

    report = evaluate_gate(args.config, args.run_dir, args.package, args.out, per_kind=args.per_kind)
    print(f"report: {report}")
    return 0


def _architectures(args: argparse.Namespace) -> int:
    from training.models import ARCHITECTURES

    if args.format == "json":
        print(json.dumps([{"name": a.name, "source": a.source, "imagenet_offline": a.imagenet is not None,
                           "size_multiple": a.size_multiple, "heavy": a.heavy} for a in ARCHITECTURES.values()],
                         indent=2))
        return 0
    for a in ARCHITECTURES.values():
        weights = "imagenet offline" if a.imagenet is not None else "random init or a local weights file"
        size = f", image_size a multiple of {a.size_multiple}" if a.size_multiple > 1 else ""
        print(f"{a.name:<24} {a.source:<40} {weights}{size}{' (heavy)' if a.heavy else ''}")
    return 0
