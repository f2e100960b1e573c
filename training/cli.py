"""`cxr-train` entry point: the offline training workflow, one thin subcommand per step.

This module only parses arguments and dispatches; each subcommand calls one composition of the library:
:func:`training.fit.fit`, :func:`training.evaluate.evaluate_dir`, :func:`training.compare.compare`,
:func:`training.export_run.export_run`, :func:`training.combine.combine_packages`, :func:`training.audits.baseline_run`,
:func:`training.audits.blackout_run`, :func:`training.site.site_threshold_run` (with the node's chest
filter and input gate, the one place ``training/`` reads the node's configuration),
:func:`training.gate.export_gate` and :func:`training.gate_eval.evaluate_gate`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pydicom

from ai.errors import CxrError
from ai.gate import InputGate
from node.config import load_settings
from node.filter import FilterRules, decide
from node.packages import load_gate
from storage.files import DISK_FULL_ERRNOS, DiskFull, write_atomic
from training.architectures import ARCHITECTURES
from training.audits import baseline_run, blackout_run, blackout_scores, merge_audits, read_audits
from training.combine import combine_packages, reissue_package
from training.compare import compare
from training.config import ConfigError, example_config_text, load_config
from training.evaluate import evaluate_dir
from training.export import WEIGHTS_DTYPES
from training.export_run import OOF_SCORES, export_run, oof_thresholds, real_parity_inputs
from training.fit import fit
from training.gate import export_gate, load_gate_config
from training.gate_eval import evaluate_gate
from training.pretrained import export_weights, provenance_path
from training.rundir import RunDir, UnitKey
from training.site import SITE_MARKDOWN, site_threshold_run
from training.site_unlabelled import SUGGESTION_MARKDOWN, unlabelled_run
from training.thresholds import PLACEMENTS

__all__ = [  # the compositions that lived here, importable from here as before
    "baseline_run",
    "blackout_run",
    "blackout_scores",
    "build_parser",
    "export_run",
    "main",
    "merge_audits",
    "oof_thresholds",
    "real_parity_inputs",
    "site_threshold_run",
]

log = logging.getLogger(__name__)

WORKFLOW = """\
workflow:
  1. manifest   one CSV per cohort: image,patient_id,site,label_<Label>,... (1, 0, empty = unknown)
                [,age,sex,lung_mask]; image paths relative to the CSV's folder or its parent
                (labels: Tuberculosis, Pediatric_Pneumonia, the 14 NIH findings ...; label_tb is
                accepted; other column names: patient_column, site, label_columns in the config)
  2. config     cxr-train init-config run.toml          then edit labels, cohorts, architectures
                (several training cohorts: one [[train]] each, folds and figures per cohort)
                chest init: a run on chest cohorts, then cxr-train weights --run-dir runs/chest
                --unit ARCH/fold0 --out chest.pth, and init = "chest.pth" (provenance checked)
  3. fit        cxr-train fit --config run.toml --run-dir runs/tb
                (k-fold x architectures; interrupted? run `cxr-train fit --run-dir runs/tb` again)
  4. evaluate   cxr-train baseline --run-dir runs/tb    thumbnail floor (shortcut audit), optional
                cxr-train audit-blackout --run-dir runs/tb   lungs blacked out (shortcut audit,
                                                        needs lung_mask), optional
                (both merge into runs/tb/audits.json, which evaluate puts in the report)
                cxr-train evaluate --run-dir runs/tb    -> runs/tb/report/report.md
                cxr-train compare A.csv B.csv --label Tuberculosis   DeLong between two models
  5. export     cxr-train export --run-dir runs/tb --out packages/tb-v1
                (--run-dir twice: two runs' members in one package, also of two image sizes;
                cxr-train combine adds another package's members for some labels, byte for byte;
                cxr-train reissue gives a package the current age ranges under a new version)
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
    p.add_argument("--threshold-at", choices=PLACEMENTS, default="midway", help=THRESHOLD_AT_HELP)
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples per CI")

    p = add("compare", "DeLong test between two prediction CSVs on the images both score")
    p.add_argument("a", type=Path, help="prediction CSV of model A")
    p.add_argument("b", type=Path, help="prediction CSV of model B")
    p.add_argument("--label", required=True, help="label, e.g. Tuberculosis")
    p.add_argument("--member-a", default="ensemble", help="member of A (default ensemble)")
    p.add_argument("--member-b", help="member of B (default: same as A)")

    p = add("export", "ONNX members + manifest (thresholds from the OOF predictions) for the node")
    p.add_argument("--run-dir", type=Path, required=True, action="append",
                   help="the run; repeat to combine several runs' members in one package (same preprocessing)")
    p.add_argument("--out", type=Path, required=True, help="package folder to write")
    p.add_argument("--members", nargs="+", help="architectures to include (default: all trained)")
    p.add_argument("--name", default="", help="package name (default: the run's name, or the runs' names joined "
                   "by '+')")
    p.add_argument("--version", default="", help="package version (default: the name + date)")
    p.add_argument("--threshold", choices=("youden", "sensitivity"), default="youden",
                   help="operating point written into the manifest (default youden)")
    p.add_argument("--target-sensitivity", type=float, default=0.90)
    p.add_argument("--threshold-at", choices=PLACEMENTS, default="midway", help=THRESHOLD_AT_HELP)
    p.add_argument("--overwrite", action="store_true", help="replace an existing package")
    p.add_argument("--weights-dtype", choices=WEIGHTS_DTYPES, default="float32",
                   help="store member weights as float16 (half the disk) or int8-last-stage (the last stage and "
                   "the head int8, the rest float16: about 61 %% of float16's size); compute stays float32")
    p.add_argument("--labels", nargs="+", help="the run's labels the package carries (default: all); the others "
                   "are cut from the members' output layers and named in the manifest")
    p.add_argument("--folds", nargs="+", type=int, action="append",
                   help="export only these folds' members (default: all; thresholds still from every fold's OOF); "
                   "once for every run, or once per --run-dir in the same order")
    p.add_argument("--base-package", type=Path,
                   help="keep this package's members, thresholds and reference unchanged and add the run's "
                   "members for the labels it lacks (one --run-dir)")
    p.add_argument("--informational", nargs="+", default=[], metavar="LABEL",
                   help="labels reported with their decision that do not set the node's triage flag")
    p.add_argument("--oof-scores", choices=OOF_SCORES,
                   help="OOF scores for the thresholds and the reference: 'run' (the run's predictions_oof.csv) or "
                   "'stored' (every fold's unit stored with --weights-dtype and scored by onnxruntime on its "
                   "held-out images); default: stored for int8-last-stage, run otherwise")
    p.add_argument("--oof-out", type=Path, metavar="FOLDER",
                   help="write those OOF scores as FOLDER/predictions_oof.csv (for cxr-train evaluate / compare)")

    p = add("combine", "a package plus another package's members for some labels, copied byte for byte with their "
                       "thresholds and references")
    p.add_argument("--base-package", type=Path, required=True, help="the package whose members all stay")
    p.add_argument("--add-package", type=Path, required=True, help="the package the added labels' members come from")
    p.add_argument("--labels", nargs="+", required=True, help="labels of --add-package that --base-package lacks")
    p.add_argument("--out", type=Path, required=True, help="package folder to write")
    p.add_argument("--name", default="", help="package name (default: the two names joined by '+')")
    p.add_argument("--version", default="", help="package version (default: the name + date)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing package")

    p = add("reissue", "a package under a new version with the project's current age ranges per label, its members, "
                       "thresholds and references byte for byte")
    p.add_argument("--package", type=Path, required=True, help="the package to reissue")
    p.add_argument("--version", required=True, help="the new package version (what the SR and the banner carry)")
    p.add_argument("--out", type=Path, required=True, help="package folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing package")

    p = add("baseline", "thumbnail + intensity floor on the same folds (shortcut audit) -> RUN_DIR/audits.json")
    p.add_argument("--run-dir", type=Path, required=True)
    p.add_argument("--n-boot", type=int, default=2000)

    p = add("site-threshold", "a site's own operating threshold from its labelled sample, scored by the package "
                              "as the node scores it, with a held-out estimate -> node.toml [thresholds]")
    p.add_argument("--package", type=Path, required=True, help="the model package the node runs")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--cohort", type=Path, help="the site's labelled sample (cohort manifest CSV)")
    source.add_argument("--unlabelled", type=Path,
                        help="a folder (or a CSV with an image column) of the site's images without labels: the "
                             "label-free suggestion the node would make (needs the package's reference)")
    p.add_argument("--prevalence", action="append", default=[], metavar="LABEL=P",
                   help="with --unlabelled: the site's prevalence of a label (else estimated from the scores)")
    p.add_argument("--out", type=Path, required=True, help="folder for scores, site_threshold.json and .md")
    p.add_argument("--target-sensitivity", type=float, default=0.90)
    p.add_argument("--folds", type=int, default=5, help="k of the held-out estimate (default 5)")
    p.add_argument("--seed", type=int, default=0, help="fold and bootstrap seed (default 0)")
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples of the AUROC CI")
    p.add_argument("--threads", type=int, help="onnxruntime threads per member (default: the node's)")
    p.add_argument("--node-config", type=Path,
                   help="the node's node.toml: its [filter] decides which DICOM images count, its [model] gate "
                        "which decoded images (default: the node's defaults: the bundled gate)")

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

    p = add("weights", "a finished unit's backbone as a weights file with its provenance (chest-domain init "
                       "for another run: init = FILE)")
    p.add_argument("--run-dir", type=Path, required=True, help="the run that trained the unit")
    p.add_argument("--unit", required=True, help="ARCH/foldK, e.g. efficientnet_lite0/fold0")
    p.add_argument("--out", type=Path, required=True, help="weights file to write (FILE.provenance.json beside it)")

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


THRESHOLD_AT_HELP = (
    "where the threshold lies: midway between the score that reaches the operating point and the next lower OOF "
    "score (default; the same OOF decisions, and no float32 rounding or other CPU moves an image across it), or on "
    "that score (packages up to chest-default-1.6.x; docs/model/threshold-rule.md)"
)

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
    try:
        return HANDLERS[args.command](args)
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
    config = load_config(args.config) if args.config else None
    result = fit(config, args.run_dir)
    print(f"{len(result.units)} unit(s) done; predictions: {', '.join(str(p) for p in result.predictions)}")
    print(f"next: cxr-train evaluate --run-dir {args.run_dir}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    out = args.out or RunDir(args.run_dir).report.path
    report = evaluate_dir(args.run_dir, out, args.labels, args.target_sensitivity, args.n_boot,
                          audits=read_audits(args.run_dir), threshold_at=args.threshold_at)
    print(f"report: {report}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    result = compare(args.a, args.b, args.label, args.member_a, args.member_b)
    print(result["verdict"])
    return 0


def _export(args: argparse.Namespace) -> int:
    package = export_run(args.run_dir, args.out, args.members, args.version, args.threshold,
                         args.target_sensitivity, args.overwrite, args.weights_dtype, args.labels,
                         args.base_package, args.folds, args.informational, args.oof_scores, args.oof_out,
                         args.name, args.threshold_at)
    print(f'package: {package}\nnext: set [model] package = "{package}" in node.toml and restart cxr-node')
    return 0


def _combine(args: argparse.Namespace) -> int:
    package = combine_packages(args.base_package, args.add_package, args.labels, args.out, args.version,
                               args.overwrite, args.name)
    print(f'package: {package}\nnext: set [model] package = "{package}" in node.toml and restart cxr-node')
    return 0


def _reissue(args: argparse.Namespace) -> int:
    package = reissue_package(args.package, args.out, args.version, args.overwrite)
    print(f'package: {package}\nnext: set [model] package = "{package}" in node.toml and restart cxr-node')
    return 0


def _baseline(args: argparse.Namespace) -> int:
    for report in baseline_run(args.run_dir, args.n_boot):
        print(f"{report.get('cohort', '')} {report.get('label', '')}: {report['verdict']}")
    print(f"written to {RunDir(args.run_dir).audits}; `cxr-train evaluate` includes it in the report")
    return 0


def _audit_blackout(args: argparse.Namespace) -> int:
    fill = 0 if args.fill == "zero" else "background"
    for report in blackout_run(args.run_dir, fill, args.n_boot):
        print(f"{report['cohort']} {report['label']} ({report['n']} images with a lung mask): {report['verdict']}")
    print(f"written to {RunDir(args.run_dir).audits}; `cxr-train evaluate` includes it in the report")
    return 0


def _site_threshold(args: argparse.Namespace) -> int:
    """``cxr-train site-threshold``: the node's filter and gate decide which images count; print each label's
    result and the node.toml lines."""
    settings = load_settings(args.node_config)  # None: the node's defaults; CXR_* variables apply as in the node
    rules = FilterRules.for_settings(settings)

    def accept(ds: pydicom.Dataset) -> tuple[bool, str]:  # the node's chest filter, as configured
        decision = decide(ds, settings.filter, rules)
        return decision.accepted, decision.reason

    if args.unlabelled is not None:
        return _site_unlabelled(args, accept, load_gate(settings))
    result = site_threshold_run(args.package, args.cohort, args.out, args.target_sensitivity, args.folds,
                                args.seed, args.n_boot, args.threads, accept, load_gate(settings))
    for entry in result["labels"]:
        pkg, held = entry["package_threshold"], entry["held_out"]["pooled"]
        print(f"{entry['label']}: package threshold {pkg['threshold']:.4f} reaches sensitivity "
              f"{pkg['sensitivity']['value']:.3f} here; site threshold {entry['site_threshold']['value']:.4f} "
              f"(held out: sensitivity {held['sensitivity']['value']:.3f}, "
              f"specificity {held['specificity']['value']:.3f})")
    if result["refused_by_gate"]:
        print(f"{len(result['refused_by_gate'])} image(s) refused by the node's input gate, not counted")
    print(f"report: {args.out / SITE_MARKDOWN}\nto apply it, put into node.toml and restart cxr-node:\n")
    print(result["snippet"], end="")
    return 0


def _site_unlabelled(args: argparse.Namespace, accept: Callable[[pydicom.Dataset], tuple[bool, str]],
                     gate: InputGate | None) -> int:
    """``cxr-train site-threshold --unlabelled``: the label-free suggestion per label."""
    prevalence = {}
    for item in args.prevalence:
        label, sep, value = item.partition("=")
        try:
            prevalence[label.strip()] = float(value) if sep else float("nan")
        except ValueError:
            prevalence[label.strip()] = float("nan")
    result = unlabelled_run(args.package, args.unlabelled, args.out, prevalence, accept, gate, args.threads)
    for entry in result["labels"]:
        s = entry.get("suggestion")
        print(f"{entry['label']}: package threshold {entry['package_threshold']:.4f}; "
              + (f"suggested {s['threshold']:.4f} ({s['method']})" if s else entry["note"]))
    print(f"{result['scored']} of {result['images']} images scored; report: {args.out / SUGGESTION_MARKDOWN}")
    return 0


def _gate(args: argparse.Namespace) -> int:
    package = export_gate(load_gate_config(args.config), args.run_dir, args.out, overwrite=args.overwrite)
    print(f"gate package: {package}\nnext: cxr-train gate-eval --config {args.config} --run-dir {args.run_dir} "
          f"--package {package} --out docs/gate")
    return 0


def _gate_eval(args: argparse.Namespace) -> int:
    report = evaluate_gate(args.config, args.run_dir, args.package, args.out, per_kind=args.per_kind)
    print(f"report: {report}")
    return 0


def _weights(args: argparse.Namespace) -> int:
    arch, _, fold = args.unit.partition("/fold")
    if not arch or not fold.isdigit():
        raise ValueError(f"--unit: expected ARCH/foldK (e.g. efficientnet_lite0/fold0), found {args.unit!r}")
    out = export_weights(args.run_dir, UnitKey(arch, int(fold)), args.out)
    print(f"weights: {out}\nprovenance: {provenance_path(out)}\nnext: init = \"{out}\" in a run configuration")
    return 0


def _architectures(args: argparse.Namespace) -> int:
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


HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "init-config": _init_config,
    "fit": _fit,
    "evaluate": _evaluate,
    "compare": _compare,
    "export": _export,
    "combine": _combine,
    "reissue": _reissue,
    "baseline": _baseline,
    "audit-blackout": _audit_blackout,
    "site-threshold": _site_threshold,
    "weights": _weights,
    "architectures": _architectures,
    "gate": _gate,
    "gate-eval": _gate_eval,
}


if __name__ == "__main__":
    sys.exit(main())
