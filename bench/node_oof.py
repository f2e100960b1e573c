"""Does the node still compute the scores a package's threshold was chosen on?

A label's threshold and reference distribution (``manifest.reference``) come from out-of-fold scores: each training
image scored by the stored members of the fold that held it out. This script scores every image of a run's
``folds.csv`` the way the node does (``ai.pixels.read_image_file``, ``Ensemble.inputs``: the field detected once,
each member's input size) with the package's members of that image's fold (``members[].fold``), averages them, and
compares:

- the 101 quantiles of those scores, of the positives' and of the negatives', with the manifest's reference (which
  the export rounded to 6 decimals): equal within that rounding means the node reproduces the OOF scores;
- sensitivity and specificity at the package threshold on them, with counts, against what the threshold was chosen
  for (``--target-sensitivity``);
- the images nearest the threshold: how little it takes to flip a decision there (another machine's arithmetic; the
  float32 the node stores a probability in, against a threshold chosen on float64 scores).

``--copy-as S``: every image first turned into a copy like the Guangzhou pediatric set's (resized to S x S pixels,
the aspect squashed to square, stored as JPEG at ``--jpeg-quality``), then read and scored the same way: what such a
copy alone does to the scores of the cohort the threshold was chosen on (bench/tb_on_children.py).

Run on demand (not part of the test suite)::

    .venv/bin/python bench/node_oof.py --folds runs/tb-320-strong-aug/folds.csv \\
        --cohort ../shared/data/tb/shenzhen.csv --label Tuberculosis --label-column label_tb \\
        --out bench/results/node_oof_1.6.0.json --scores runs/node_oof_1.6.0.csv

Results: bench/README.md, "node_oof.py".
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import onnxruntime as ort

from ai.ensemble import Ensemble, session_options, sigmoid
from ai.manifest import bundled_package_dir
from ai.pixels import read_image_file


def fold_members(ensemble: Ensemble, label: str) -> dict[int, list[int]]:
    """Per fold, the indices of the package's members that output ``label`` and were trained without that fold."""
    manifest = ensemble.manifest
    out: dict[int, list[int]] = {}
    for i, member in enumerate(manifest.members):
        if label in member.outputs(manifest.labels):
            if member.fold is None:
                raise SystemExit(f"{member.file}: the manifest names no fold, so its held-out images are unknown")
            out.setdefault(int(member.fold), []).append(i)
    return out


def squashed_jpeg_copy(image: np.ndarray, size: int, quality: int) -> np.ndarray:
    """``image`` (float in [0, 1]) as an 8-bit ``size`` x ``size`` JPEG copy (aspect squashed), read back as the node
    reads a JPEG (float in [0, 1])."""
    resized = cv2.resize(np.clip(image * 255.0 + 0.5, 0, 255).astype(np.uint8), (size, size),
                         interpolation=cv2.INTER_AREA)
    ok, encoded = cv2.imencode(".jpg", resized, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    decoded = cv2.imdecode(encoded, cv2.IMREAD_GRAYSCALE)
    if decoded is None:
        raise RuntimeError("JPEG decoding failed")
    return decoded.astype(np.float32) / 255.0


def score(ensemble: Ensemble, label: str, images: list[tuple[Path, int]], threads: int,
          change: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
    """Each image's mean over its fold's members as the node computes a label's probability (``Ensemble.predict``:
    the float32 members' scores summed in float64, the mean stored as float32), after ``change`` of the decoded
    image when given."""
    manifest = ensemble.manifest
    members = fold_members(ensemble, label)
    options = session_options(threads)
    sessions = {i: ort.InferenceSession(str(ensemble.package_dir / manifest.members[i].file), options,
                                        providers=["CPUExecutionProvider"])
                for indices in members.values() for i in indices}
    out = np.empty(len(images))
    for n, (path, fold) in enumerate(images):
        image = read_image_file(path)
        inputs, _ = ensemble.inputs(change(image) if change is not None else image)
        scores = []
        for i in members[fold]:
            member = manifest.members[i]
            logits = sessions[i].run([manifest.outputs["logits"]],
                                     {manifest.input_name: inputs[member.input_size(manifest.preprocess.size)][None]})
            scores.append(float(sigmoid(logits[0])[0, member.outputs(manifest.labels).index(label)]))
        out[n] = float(np.float32(np.sum(scores, dtype=np.float64) / len(scores)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--package", type=Path, default=bundled_package_dir())
    parser.add_argument("--folds", type=Path, required=True, help="the run's folds.csv (image, patient_id, fold)")
    parser.add_argument("--cohort", type=Path, required=True, help="the cohort CSV with the label column")
    parser.add_argument("--root", type=Path, help="folder the image paths are relative to (default: the "
                                                    "cohort CSV's parent's parent, as ../shared/data is laid out)")
    parser.add_argument("--label", default="Tuberculosis")
    parser.add_argument("--label-column", default="label_tb")
    parser.add_argument("--target-sensitivity", type=float, default=0.90)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--scores", type=Path, help="also write every image's score as CSV")
    parser.add_argument("--copy-as", type=int, metavar="S", help="score S x S squashed JPEG copies of the images")
    parser.add_argument("--jpeg-quality", type=int, default=90)
    args = parser.parse_args()

    root = args.root or args.cohort.resolve().parent.parent
    with args.cohort.open(newline="") as f:
        labels = {r["image"]: int(r[args.label_column]) for r in csv.DictReader(f)}
    with args.folds.open(newline="") as f:
        folds = [(r["image"], int(r["fold"])) for r in csv.DictReader(f)]
    ensemble = Ensemble.load(args.package, providers=["CPUExecutionProvider"], threads=args.threads)
    manifest = ensemble.manifest
    missing = sorted({fold for _, fold in folds} - set(fold_members(ensemble, args.label)))
    if missing:  # e.g. a label whose package ships some folds' members only: its reference spans all folds
        raise SystemExit(f"the package has no {args.label} member for fold(s) {missing} of {args.folds}")
    started = time.monotonic()
    change = partial(squashed_jpeg_copy, size=args.copy_as, quality=args.jpeg_quality) if args.copy_as else None
    s = score(ensemble, args.label, [(root / image, fold) for image, fold in folds], args.threads, change)
    seconds = time.monotonic() - started
    y = np.array([labels[image] for image, _ in folds])

    reference = manifest.reference[args.label]
    points = np.linspace(0.0, 1.0, len(reference.quantiles))
    quantiles = {}
    for name, values, recorded in (("all", s, reference.quantiles),
                                   ("positive", s[y == 1], reference.quantiles_positive),
                                   ("negative", s[y == 0], reference.quantiles_negative)):
        got = np.round(np.quantile(values, points), 6)
        quantiles[name] = float(np.max(np.abs(got - np.asarray(recorded))))
    threshold = manifest.thresholds[args.label].value
    tp, fn = int(np.sum((s >= threshold) & (y == 1))), int(np.sum((s < threshold) & (y == 1)))
    tn, fp = int(np.sum((s < threshold) & (y == 0))), int(np.sum((s >= threshold) & (y == 0)))
    nearest = np.argsort(np.abs(s - threshold))[:5]
    result: dict[str, Any] = {
        "package": f"{manifest.name} {manifest.version}",
        "label": args.label,
        "copy": ({"size": args.copy_as, "jpeg_quality": args.jpeg_quality, "aspect": "squashed to square"}
                 if args.copy_as else None),
        "n": len(folds),
        "seconds": round(seconds, 1),
        "reference_cohort": reference.cohort,
        "quantiles_max_abs_diff": quantiles,
        "threshold": threshold,
        "threshold_method": manifest.thresholds[args.label].method,
        "sensitivity": {"value": tp / (tp + fn), "count": [tp, tp + fn]},
        "specificity": {"value": tn / (tn + fp), "count": [tn, tn + fp]},
        "target_sensitivity": args.target_sensitivity,
        "nearest_to_threshold": [{"image": folds[i][0], "label": int(y[i]), "score": float(s[i]),
                                  "score_minus_threshold": float(s[i] - threshold)} for i in nearest],
        "machine": {"processor": platform.processor() or platform.machine(), "onnxruntime": ort.__version__,
                    "python": platform.python_version()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    if args.scores:
        with args.scores.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["image", "fold", args.label_column, f"score_{args.label}"])
            writer.writerows([image, fold, int(label), f"{value:.9f}"]
                             for (image, fold), label, value in zip(folds, y, s, strict=True))
    print(f"{len(folds)} images in {seconds:.0f} s; quantiles vs the manifest's reference, largest difference: "
          + ", ".join(f"{k} {v:.1e}" for k, v in quantiles.items()))
    print(f"at the package threshold {threshold:.6f}: sensitivity {tp}/{tp + fn} = {tp / (tp + fn):.3f}, "
          f"specificity {tn}/{tn + fp} = {tn / (tn + fp):.3f}")
    for i in nearest:
        print(f"  {folds[i][0]} (label {y[i]}): score {s[i]:.9f}, {s[i] - threshold:+.2e} from the threshold")


if __name__ == "__main__":
    main()
