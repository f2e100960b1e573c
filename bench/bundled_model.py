"""Bundled-model benchmark: size, CPU latency, float16-vs-float32 members, lung-blackout audit.

Measures the default package (``ai/models/default``) on this machine and on the real TB cohorts:

- size on disk of the package (manifest + members);
- per-image latency of all members together with onnxruntime (``ai.ensemble.Ensemble``, N threads),
  ensemble only and end to end (read PNG + preprocess + ensemble), median and p95 over Montgomery images;
- float16-stored vs float32 members (``--fp32-package``, the same run exported with float32 weights):
  each fold member scores its own out-of-fold Shenzhen images (OOF AUROC of both, largest probability
  difference), and the ensembles score Montgomery;
- lung-blackout audit on Montgomery (every image has a lung mask): AUROC with and without the lungs;
- ``--unchanged-from PACKAGE``: for every label both packages carry, whether the probabilities and maps on
  Montgomery are equal (``np.array_equal``): a package that keeps another's members for a label must score
  it exactly as that package does;
- ``triage``: Montgomery's images through ``Ensemble.findings`` and the age rule as the node decides them (the PNGs
  carry no age): per label how many negatives and positives are Present or not applicable, and how often the
  triage flag (any finding that is not informational) is positive; with ``--unchanged-from``, the images on
  which that package's flag differs;
- ``--predictions FILE``: those probabilities as a prediction CSV (``predictions_montgomery.csv`` beside the
  package's stored OOF scores, ``cxr-train export --oof-out``), for ``cxr-train evaluate``'s per-cohort report.

Run on demand (not part of the test suite)::

    .venv/bin/python bench/bundled_model.py --run-dir runs/tb-default \\
        --fp32-package runs/tb-default/package-fp32 --out runs/tb-default/bench.json
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ai.analyse import model_input
from ai.applicability import apply_ages
from ai.ensemble import Ensemble, sigmoid
from ai.findings import Finding
from ai.manifest import bundled_package_dir, load_manifest, member_path
from ai.pixels import read_image_file
from ai.preprocess import preprocess
from training import metrics
from training.audits import blackout_audit
from training.data import load_cohort
from training.predictions import cohort_table, write_predictions

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _rows(csv_path: Path) -> list[dict[str, str]]:
    with csv_path.open(newline="") as f:
        return list(csv.DictReader(f))


Inputs = dict[int, np.ndarray]
"""{input size: float32 [N, 3, size, size]}: a package's inputs for N images (``ai.analyse.model_input``)."""


def _inputs(ens: Ensemble, images: Sequence[np.ndarray]) -> Inputs:
    """The images preprocessed as the node does, at every input size of the package."""
    each = [model_input(image, ens)[0] for image in images]
    return {size: np.stack([x[size] for x in each]) for size in ens.manifest.input_sizes}


def _latency(ens: Ensemble, paths: list[Path]) -> dict[str, Any]:
    ens.predict(_inputs(ens, [read_image_file(paths[0])]))  # warm-up
    total, model_only = [], []
    for path in paths:
        t0 = time.perf_counter()
        x = _inputs(ens, [read_image_file(path)])
        t1 = time.perf_counter()
        ens.predict(x)
        t2 = time.perf_counter()
        total.append(t2 - t0)
        model_only.append(t2 - t1)

    def stats(v: list[float]) -> dict[str, float]:
        return {"median_ms": 1000 * float(np.median(v)), "p95_ms": 1000 * float(np.percentile(v, 95))}

    return {"n_images": len(paths), "end_to_end": stats(total), "ensemble_only": stats(model_only)}


def _member_scores(package: Path, x: np.ndarray, member_index: int, threads: int) -> np.ndarray:
    import onnxruntime as ort

    from ai.ensemble import session_options

    manifest = load_manifest(package)
    member = manifest.members[member_index]
    session = ort.InferenceSession(
        str(member_path(package, member)), session_options(threads), providers=["CPUExecutionProvider"]
    )
    out = [session.run(["logits"], {"image": x[i : i + 16]})[0] for i in range(0, len(x), 16)]
    return sigmoid(np.concatenate(out))[:, 0]


def _unchanged(ens: Ensemble, other_dir: Path, paths: Sequence[Path], threads: int) -> dict:
    """Per label both packages carry: are probabilities and maps on the images at ``paths`` equal, and the largest
    difference (one image at a time: decoded chest radiographs are large)."""
    other = Ensemble.load(other_dir, providers=["CPUExecutionProvider"], threads=threads)
    shared = [(label, ens.manifest.labels.index(label), other.manifest.labels.index(label))
              for label in ens.manifest.labels if label in other.manifest.labels]
    equal_p = dict.fromkeys((label for label, _, _ in shared), True)
    equal_m = dict(equal_p)
    worst = dict.fromkeys(equal_p, 0.0)
    for path in paths:
        image = read_image_file(path)
        mine, theirs = ens.predict(_inputs(ens, [image])), other.predict(_inputs(other, [image]))
        for label, i, j in shared:
            p, q = mine.probabilities[:, i], theirs.probabilities[:, j]
            equal_p[label] &= bool(np.array_equal(p, q))
            equal_m[label] &= bool(np.array_equal(mine.cams[:, i], theirs.cams[:, j]))
            worst[label] = max(worst[label], float(np.max(np.abs(p - q))))
    return {"package": str(other_dir), "version": other.manifest.version, "n_images": len(paths),
            "labels": {label: {"equal_probabilities": equal_p[label], "equal_maps": equal_m[label],
                               "max_abs_prob_diff": worst[label]} for label in equal_p}}


def _flags(ens: Ensemble, paths: Sequence[Path]) -> tuple[list[list[Finding]], np.ndarray]:
    """Each image's findings as the node decides them for a patient of unknown age, and its triage flag."""
    findings = [apply_ages(ens.findings(model_input(read_image_file(path), ens)[0]), ens.manifest.ages, None)
                for path in paths]
    return findings, np.array([any(f.flags for f in fs) for fs in findings])


def _write_predictions(ens: Ensemble, paths: Sequence[Path], findings: Sequence[Sequence[Finding]], path: Path) -> None:
    """Montgomery's probabilities as the node computed them (``findings``, one list per image in the cohort's row
    order) as a prediction CSV, for each label of the package that the cohort knows: ``cxr-train evaluate`` on a
    folder holding it beside the package's stored OOF scores reports the package per cohort, with its plots."""
    cohort = load_cohort(DATA / "tb" / "montgomery.csv", name="montgomery")
    if [Path(p).resolve() for p in cohort.paths] != [p.resolve() for p in paths]:
        raise SystemExit("montgomery.csv read as a cohort lists its images in another order than its rows")
    known = [label for label in ens.manifest.labels if label in cohort.labels]
    scores = {label: {"ensemble": np.array([fs[ens.manifest.labels.index(label)].probability for fs in findings])}
              for label in known}
    write_predictions(cohort_table(cohort, scores), path)
    print(f"{path}: {len(findings)} images, labels {known}", flush=True)


def _triage(ens: Ensemble, paths: Sequence[Path], y: np.ndarray, other_dir: Path | None, threads: int,
            predictions: Path | None = None) -> dict:
    findings, flag = _flags(ens, paths)
    if predictions is not None:
        _write_predictions(ens, paths, findings, predictions)
    negatives, positives = y == 0, y == 1
    out: dict = {"n_negative": int(negatives.sum()), "n_positive": int(positives.sum()),
                 "flag_on_negatives": int(flag[negatives].sum()), "flag_on_positives": int(flag[positives].sum()),
                 "labels": {}}
    for k, label in enumerate(ens.manifest.labels):
        present = np.array([fs[k].positive for fs in findings])
        out["labels"][label] = {"informational": label in ens.manifest.informational,
                                "not_applicable": int(sum(bool(fs[k].not_applicable) for fs in findings)),
                                "present_on_negatives": int(present[negatives].sum()),
                                "present_on_positives": int(present[positives].sum())}
    if other_dir is not None:
        other = Ensemble.load(other_dir, providers=["CPUExecutionProvider"], threads=threads)
        _, other_flag = _flags(other, paths)
        out["vs"] = {"version": other.manifest.version, "flag_differs_on": int(np.sum(flag != other_flag)),
                     "flag_on_negatives": int(other_flag[negatives].sum()),
                     "flag_on_positives": int(other_flag[positives].sum())}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--package", type=Path, default=bundled_package_dir())
    parser.add_argument("--fp32-package", type=Path)
    parser.add_argument("--unchanged-from", type=Path, help="a package whose shared labels must score identically")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--latency-images", type=int, default=50)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--predictions", type=Path,
                        help="also write Montgomery's probabilities through the node as a prediction CSV here "
                             "(name it predictions_montgomery.csv beside the package's stored OOF scores)")
    args = parser.parse_args()
    result: dict = {"package": str(args.package), "threads": args.threads}
    du = subprocess.run(["du", "-sb", str(args.package)], capture_output=True, text=True, check=True)
    result["size_bytes"] = int(du.stdout.split()[0])
    result["size_mb"] = result["size_bytes"] / 1e6
    ens = Ensemble.load(args.package, providers=["CPUExecutionProvider"], threads=args.threads)
    label = ens.manifest.labels[0]
    mont = _rows(DATA / "tb" / "montgomery.csv")
    mont_paths = [DATA / r["image"] for r in mont]
    result["latency"] = _latency(ens, mont_paths[: args.latency_images])
    print(json.dumps(result, indent=1), flush=True)

    # Montgomery: the ensemble, and the lung-blackout audit (masks in the source geometry)
    y_m = np.array([float(r["label_tb"]) for r in mont])
    raw = [np.round(read_image_file(p) * 255).astype(np.uint8) for p in mont_paths]
    masks = [np.round(read_image_file(DATA / r["lung_mask"]) * 255).astype(np.uint8) for r in mont]

    def score(images: Sequence[np.ndarray]) -> np.ndarray:
        return np.concatenate([ens.predict(_inputs(ens, [im.astype(np.float32) / 255])).probabilities[:, 0]
                               for im in images])  # one at a time: a decoded float image is ~80 MB

    result["blackout_montgomery"] = blackout_audit(
        score, raw, masks, y_m, [r["patient_id"] for r in mont], cohort="montgomery", label=label, n_boot=2000
    )
    print(result["blackout_montgomery"]["verdict"], flush=True)

    # Montgomery as the node reads it, for the package comparisons
    del raw, masks
    result["triage"] = _triage(ens, mont_paths, y_m, args.unchanged_from, args.threads, args.predictions)
    print(json.dumps(result["triage"], indent=1), flush=True)
    if args.unchanged_from:
        result["unchanged_from"] = _unchanged(ens, args.unchanged_from, mont_paths, args.threads)
        print(json.dumps(result["unchanged_from"], indent=1), flush=True)

    if args.fp32_package:
        fp32 = Ensemble.load(args.fp32_package, providers=["CPUExecutionProvider"], threads=args.threads)
        if len(ens.manifest.input_sizes) > 1 or fp32.manifest.input_sizes != ens.manifest.input_sizes:
            raise SystemExit("--fp32-package compares two packages of the same single input size")
        spec = ens.manifest.preprocess
        x_m = np.stack([preprocess(read_image_file(path), spec)[0] for path in mont_paths])
        p16 = np.concatenate([ens.predict(x_m[i : i + 16]).probabilities[:, 0] for i in range(0, len(x_m), 16)])
        p32 = np.concatenate([fp32.predict(x_m[i : i + 16]).probabilities[:, 0] for i in range(0, len(x_m), 16)])
        comparison = {
            "montgomery": {
                "auroc_fp16": metrics.auroc(y_m, p16),
                "auroc_fp32": metrics.auroc(y_m, p32),
                "max_abs_prob_diff": float(np.max(np.abs(p16 - p32))),
            }
        }
        folds = {r["image"]: int(r["fold"]) for r in _rows(args.run_dir / "folds.csv")}
        shz = _rows(DATA / "tb" / "shenzhen.csv")
        y_s = np.array([float(r["label_tb"]) for r in shz])
        fold_of = np.array([folds[r["image"]] for r in shz])
        x_s = np.stack([preprocess(read_image_file(DATA / r["image"]), spec)[0] for r in shz])
        o16, o32 = np.zeros(len(shz)), np.zeros(len(shz))
        for i, member in enumerate(ens.manifest.members):
            idx = np.flatnonzero(fold_of == member.fold)
            o16[idx] = _member_scores(args.package, x_s[idx], i, args.threads)
            o32[idx] = _member_scores(args.fp32_package, x_s[idx], i, args.threads)
        comparison["shenzhen_oof"] = {
            "auroc_fp16": metrics.auroc(y_s, o16),
            "auroc_fp32": metrics.auroc(y_s, o32),
            "max_abs_prob_diff": float(np.max(np.abs(o16 - o32))),
        }
        result["fp16_vs_fp32"] = comparison
    args.out.write_text(json.dumps(result, indent=1, default=float))
    print(json.dumps({k: v for k, v in result.items() if k != "blackout_montgomery"}, indent=1, default=float))


if __name__ == "__main__":
    main()
