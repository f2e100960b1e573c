"""A rerun's fold members against a package's: the same held-out images, AUROC per label, DeLong.

A package's members are reproduced bit for bit only on the hardware they were trained on (a GPU's kernels do
not add in a CPU's order). A rerun on other hardware is checked here against the package instead: for every
fold of ``--run-dir`` that the package ships a member of (the package's files named ``<run name>_<arch>_fold<k>``),
the package's stored member and the rerun's unit, written as the package stores it
(:func:`training.export.write_member`, ``--weights-dtype``), score that fold's held-out images from the rerun's
preprocessing cache with the node's session options. Per label, on the images whose cohort knows it (no pooling
across cohorts), this reports both AUROCs with their DeLong CIs, the paired difference with its CI and p, and
the largest probability difference, per fold and over the folds together (each image scored by its own fold's
member, as the package's OOF scores are). Equal sha256 means the rerun's graph is the package's, byte for byte.
``--fill-from-package`` adds the labels' OOF AUROC over all the package's folds of the run, as the package would
have them had it been exported from the rerun: the package's own members stand in for the folds the rerun did not
train (meant for folds an earlier rerun reproduced bit for bit; the script cannot check that without their units).

Run on demand (not part of the test suite)::

    .venv/bin/python bench/rerun_members.py --run-dir runs/chest-multi-320 --fill-from-package \\
        --out bench/results/rerun_members.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ai.ensemble import default_threads
from ai.manifest import bundled_package_dir, load_manifest, member_path, sha256_file
from training.config import load_config
from training.delong import delong_ci, delong_test
from training.export import WEIGHTS_DTYPES, write_member
from training.export_run import real_parity_inputs
from training.models import keep_labels
from training.prepare import preprocess_cache, training_cohort
from training.rundir import RunDir, UnitKey
from training.splits import load_folds
from training.stored_scores import cached_probabilities
from training.unit import load_unit_model


def _auroc(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    auc, low, high = delong_ci(y, p)
    return {"auroc": round(auc, 4), "ci_low": round(low, 4), "ci_high": round(high, 4)}


def _compare(y: np.ndarray, package: np.ndarray, rerun: np.ndarray) -> dict[str, Any]:
    """Both AUROCs and their paired DeLong difference (package - rerun) on the images whose label is known."""
    known = ~np.isnan(y)
    y, package, rerun = y[known], package[known], rerun[known]
    test = delong_test(y, package, rerun)
    return {"n": int(y.size), "positives": int(y.sum()), "package": _auroc(y, package), "rerun": _auroc(y, rerun),
            "difference": round(test.difference, 4), "difference_ci": [round(test.ci_low, 4), round(test.ci_high, 4)],
            "p": round(test.p_value, 4), "max_probability_difference": round(float(np.abs(package - rerun).max()), 4)}


def _together(labels: list[str], y: np.ndarray, run_labels: tuple[str, ...], package_scores: np.ndarray,
              rerun_scores: np.ndarray, rows: np.ndarray, what: str) -> dict[str, Any]:
    """Per label, :func:`_compare` over ``rows`` (each image scored by its own fold's member)."""
    out = {}
    for j, label in enumerate(labels):
        scored = rows & ~np.isnan(package_scores[:, j])
        truth = y[scored, run_labels.index(label)]
        r = out[label] = _compare(truth, package_scores[scored, j], rerun_scores[scored, j])
        print(f"{label}, {what}: package {r['package']['auroc']:.3f} [{r['package']['ci_low']:.3f}, "
              f"{r['package']['ci_high']:.3f}] vs rerun {r['rerun']['auroc']:.3f} [{r['rerun']['ci_low']:.3f}, "
              f"{r['rerun']['ci_high']:.3f}], difference {r['difference']:+.4f} "
              f"[{r['difference_ci'][0]:+.4f}, {r['difference_ci'][1]:+.4f}], p = {r['p']:.3f}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run-dir", type=Path, required=True, help="the rerun")
    ap.add_argument("--package", type=Path, default=None, help="package folder (default: the bundled one)")
    ap.add_argument("--weights-dtype", choices=WEIGHTS_DTYPES, default="int8-last-stage",
                    help="how the package stores its members (default int8-last-stage)")
    ap.add_argument("--fill-from-package", action="store_true",
                    help="also the labels' OOF AUROC over all the package's folds of the run, the package's members "
                         "standing in for the folds the rerun lacks (those shown bit-identical by an earlier rerun)")
    ap.add_argument("--architecture", default=None,
                    help="only this architecture's members (needed when the package ships several of the run)")
    ap.add_argument("--threads", type=int, default=0, help="onnxruntime threads (default: the node's)")
    ap.add_argument("--out", type=Path, default=None, help="write the JSON here (default: print only)")
    args = ap.parse_args()

    package = args.package or bundled_package_dir()
    run = RunDir(args.run_dir)
    config = load_config(run.config)
    manifest = load_manifest(package)
    of_run = [(m, UnitKey(m.architecture, m.fold)) for m in manifest.members
              if m.fold is not None and Path(m.file).name == f"{config.name}_{m.architecture}_fold{m.fold}.onnx"
              and args.architecture in (None, m.architecture)]
    rerun_folds = sorted(key.fold for _, key in of_run if run.unit(key).model.is_file())
    if not rerun_folds:
        raise SystemExit(f"{package}: no member of run {config.name!r} whose fold {run.root} has trained")
    if len({key.architecture for _, key in of_run}) > 1:  # the folds together take one member per image
        raise SystemExit(f"{package}: members of several architectures of run {config.name!r}; "
                         "name one with --architecture")
    labels = list(dict.fromkeys(label for m, _ in of_run for label in (m.labels or manifest.labels)))
    missing = [label for label in labels if label not in config.labels]
    if missing:
        raise SystemExit(f"{run.root}: the run has no label {missing[0]!r} of the package's members")

    spec = config.preprocess_spec()
    for member, _ in of_run:  # a member's input is the package's preprocessing at the member's own size
        if (shipped := manifest.member_spec(member)).to_dict() != spec.to_dict():
            raise SystemExit(f"the run preprocesses as {spec.to_dict()}, the package's {member.file} as "
                             f"{shipped.to_dict()}")
    cohort, _ = training_cohort(config)
    folds = load_folds(run.folds, cohort.images)
    cache = preprocess_cache(config, run.root, spec)
    parity = real_parity_inputs(run.root, config)
    threads = args.threads or default_threads()

    package_scores = np.full((len(cohort.images), len(labels)), np.nan)
    rerun_scores = np.full_like(package_scores, np.nan)
    per_fold: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="cxr-rerun-members-") as scratch:
        for member, key in of_run:
            if key.fold not in rerun_folds and not args.fill_from_package:
                continue
            member_labels = list(member.labels or manifest.labels)
            held = np.flatnonzero(folds == key.fold)
            paths = [cohort.paths[i] for i in held]
            cells = np.ix_(held, np.array([labels.index(x) for x in member_labels], dtype=np.int64))
            package_scores[cells] = cached_probabilities(member_path(package, member), cache, paths, spec, threads)
            if key.fold not in rerun_folds:  # filled: the package's member on both sides
                rerun_scores[cells] = package_scores[cells]
                continue
            model = keep_labels(load_unit_model(run.root, config, key), [config.labels.index(x) for x in member_labels])
            path = Path(scratch) / Path(member.file).name
            write_member(model, path, spec.size, parity, weights_dtype=args.weights_dtype)
            rerun_scores[cells] = cached_probabilities(path, cache, paths, spec, threads)
            same = sha256_file(path) == member.sha256
            per_fold.append({"member": member.file, "fold": key.fold, "same_graph": same, "labels": {
                label: _compare(cohort.y[held, config.labels.index(label)], package_scores[held, labels.index(label)],
                                rerun_scores[held, labels.index(label)]) for label in member_labels}})
            print(f"{member.file}: {'same graph' if same else 'a different graph'}; " + ", ".join(
                f"{label} {r['package']['auroc']:.3f} vs {r['rerun']['auroc']:.3f} (p {r['p']:.3f})"
                for label, r in per_fold[-1]["labels"].items()), flush=True)

    together = _together(labels, cohort.y, config.labels, package_scores, rerun_scores,
                         np.isin(folds, rerun_folds), f"folds {rerun_folds} together")
    result = {"package": f"{manifest.name} {manifest.version}", "run": config.name,
              "folds_sha256": sha256_file(run.folds),  # the run is named, not where it lay: its folds identify it
              "weights_dtype": args.weights_dtype, "folds": per_fold, "together": together}
    filled = sorted(key.fold for _, key in of_run if key.fold not in rerun_folds)
    if args.fill_from_package and filled:
        result["package_folds"] = {
            "filled_from_package": filled,
            "labels": _together(labels, cohort.y, config.labels, package_scores, rerun_scores,
                                np.ones(len(folds), dtype=bool),
                                f"all the package's folds {sorted(k.fold for _, k in of_run)}")}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
