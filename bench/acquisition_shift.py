"""Acquisition-shift probe: how far do acquisition-like image changes move the bundled model's scores?

The bundled TB model ranks Montgomery images well (1.2.0: AUROC 0.89) but scores its TB cases far lower
than Shenzhen's (median 0.61 against 0.93), so the threshold chosen on Shenzhen misses many of them. This
script asks how much of that a change of *acquisition* could explain, using Shenzhen data only: each
Shenzhen image is scored by the member of its own out-of-fold fold (a model that never saw it), as it
is and after one of these changes to the preprocessed image the model sees:

- ``zoom_out_0.8``: the field shrunk to 80 % and centred (black border all round: a wider field);
- ``squeeze_v_0.8``: the height shrunk to 80 % (black bands top and bottom: a landscape detector);
- ``gamma_0.7`` / ``gamma_1.4``: a different tone curve;
- ``contrast_0.7``: contrast lowered about the mean;
- ``blur_1.0``: Gaussian blur, sigma 1 pixel (a softer detector or a lower resolution);
- ``sharpen``: unsharp masking (a harder detector processing).

Per change: AUROC, median score of TB and of non-TB images, sensitivity and specificity at the
package's threshold. The Montgomery row (the package's ensemble mean on the external cohort) is the
shift to be explained. Montgomery's labels are only read to print that reference row.

A package of several members per fold (architectures averaged) scores each image with the weighted mean of its
fold's members, each source (a member file's name without ``_fold<k>.onnx``: one run's architecture) weighing as
many members as the package ships (as ``cxr-train export`` weighs the OOF scores). A package that ships only some
folds of a source names, with ``--fold-members``, a package holding every fold's members stored the same way (the
shipped package still gives the threshold and the weights). Members of another input size (``Member.size``) see the
image preprocessed at their size, changed the same way (the blur's sigma and the sharpening stay one pixel of that
size).

Run on demand (not part of the test suite)::

    .venv/bin/python bench/acquisition_shift.py --run-dir runs/tb-320-strong-aug \
        --out bench/results/acquisition_shift_1.2.0.json
"""

from __future__ import annotations

import argparse
import csv
import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort

from ai.analyse import model_input
from ai.ensemble import Ensemble, sigmoid
from ai.manifest import bundled_package_dir, load_manifest, member_path
from ai.pixels import read_image_file
from ai.preprocess import preprocess_sizes, to_model_input
from training import metrics

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _zoom_out(img: np.ndarray, factor: float) -> np.ndarray:
    size = img.shape[0]
    n = round(size * factor)
    out = np.zeros_like(img)
    top = (size - n) // 2
    out[top : top + n, top : top + n] = cv2.resize(img, (n, n), interpolation=cv2.INTER_AREA)
    return out


def _squeeze_vertical(img: np.ndarray, factor: float) -> np.ndarray:
    size = img.shape[0]
    n = round(size * factor)
    out = np.zeros_like(img)
    top = (size - n) // 2
    out[top : top + n, :] = cv2.resize(img, (size, n), interpolation=cv2.INTER_AREA)
    return out


def _gamma(img: np.ndarray, exponent: float) -> np.ndarray:
    return np.clip(np.rint(255.0 * (img / 255.0) ** exponent), 0, 255).astype(np.uint8)


def _contrast(img: np.ndarray, factor: float) -> np.ndarray:
    mean = float(img.mean())
    return np.clip(np.rint((img.astype(np.float32) - mean) * factor + mean), 0, 255).astype(np.uint8)


def _sharpen(img: np.ndarray) -> np.ndarray:
    return cv2.addWeighted(img, 1.8, cv2.GaussianBlur(img, (0, 0), 1.5), -0.8, 0)


CHANGES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "as_is": lambda img: img,
    "zoom_out_0.8": lambda img: _zoom_out(img, 0.8),
    "squeeze_v_0.8": lambda img: _squeeze_vertical(img, 0.8),
    "gamma_0.7": lambda img: _gamma(img, 0.7),
    "gamma_1.4": lambda img: _gamma(img, 1.4),
    "contrast_0.7": lambda img: _contrast(img, 0.7),
    "blur_1.0": lambda img: cv2.GaussianBlur(img, (0, 0), 1.0),
    "sharpen": _sharpen,
}


def _summary(y: np.ndarray, s: np.ndarray, threshold: float) -> dict[str, float]:
    pos, neg = s[y == 1], s[y == 0]
    return {
        "auroc": float(metrics.auroc(y, s)),
        "median_score_tb": float(np.median(pos)),
        "median_score_non_tb": float(np.median(neg)),
        "sensitivity": float(np.mean(pos >= threshold)),
        "specificity": float(np.mean(neg < threshold)),
    }


def _source(file: str) -> str:
    """A member file's source: its name without ``_fold<k>.onnx`` (``tb-320-strong-aug_efficientnet_lite0``)."""
    return file.rsplit("_fold", 1)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path, required=True, help="the training run (folds.csv)")
    parser.add_argument("--package", type=Path, default=bundled_package_dir())
    parser.add_argument("--fold-members", type=Path, help="package with every fold's members (default: --package)")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    manifest = load_manifest(args.package)
    label = "Tuberculosis"
    if label not in manifest.labels:
        raise SystemExit(f"{args.package} has no {label} label: this bench probes the TB members")
    threshold = float(manifest.thresholds[label].value)
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    shipped = Counter(_source(m.file) for m in manifest.members if label in m.outputs(manifest.labels))
    scorers = args.fold_members or args.package
    scoring = load_manifest(scorers)
    by_fold: dict[int, list[tuple[ort.InferenceSession, int, float, int]]] = {}
    sources_of: dict[int, list[str]] = {}
    for m in scoring.members:
        outputs = m.outputs(scoring.labels)
        if m.fold is None or label not in outputs:
            continue
        source = _source(m.file)
        if source not in shipped:
            raise SystemExit(f"{scorers}: {m.file} comes from no source that {args.package} ships ({sorted(shipped)})")
        session = ort.InferenceSession(str(member_path(scorers, m)), options, providers=["CPUExecutionProvider"])
        by_fold.setdefault(int(m.fold), []).append((session, outputs.index(label), float(shipped[source]),
                                                    m.input_size(scoring.preprocess.size)))
        sources_of.setdefault(int(m.fold), []).append(source)
    with (args.run_dir / "folds.csv").open(newline="") as f:
        fold_of = {row["image"]: int(row["fold"]) for row in csv.DictReader(f)}
    partial = sorted(fold for fold in set(fold_of.values()) | set(sources_of)
                     if sorted(sources_of.get(fold, [])) != sorted(shipped))
    if partial:
        raise SystemExit(f"{scorers}: folds {partial} lack a member of every shipped source {sorted(shipped)}; "
                         "name a package of every fold's members with --fold-members")
    with (args.data / "tb" / "shenzhen.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))

    labels: list[int] = []
    scores: dict[str, list[float]] = {name: [] for name in CHANGES}
    sizes = sorted({size for members in by_fold.values() for *_, size in members})
    for row in rows:
        grays = preprocess_sizes(read_image_file(args.data / row["image"]), scoring.preprocess, sizes)
        members = by_fold[fold_of[row["image"]]]
        labels.append(int(row["label_tb"]))
        for name, change in CHANGES.items():
            x = {size: to_model_input(change(gray), scoring.spec_at(size))[None] for size, (gray, _) in grays.items()}
            p = [float(sigmoid(session.run([manifest.outputs["logits"]], {manifest.input_name: x[size]})[0][0, j]))
                 for session, j, _, size in members]
            scores[name].append(float(np.average(p, weights=[w for _, _, w, _ in members])))
    y = np.asarray(labels)
    results = {name: _summary(y, np.asarray(s), threshold) for name, s in scores.items()}

    ens = Ensemble.load(args.package, threads=args.threads)
    with (args.data / "tb" / "montgomery.csv").open(newline="") as f:
        mont = list(csv.DictReader(f))
    m_scores = []
    for row in mont:
        inputs, _ = model_input(read_image_file(args.data / row["image"]), ens)
        prediction = ens.predict({size: x[None] for size, x in inputs.items()})
        m_scores.append(float(prediction.probabilities[0, manifest.labels.index(label)]))
    results["montgomery (external, for reference)"] = _summary(
        np.asarray([int(r["label_tb"]) for r in mont]), np.asarray(m_scores), threshold)

    print(f"package {manifest.version}, label {label}, threshold {threshold:.4f}; Shenzhen OOF images "
          f"(n={len(rows)}) scored by their own fold's member")
    print(f"{'change':38s} {'AUROC':>6s} {'med TB':>7s} {'med non':>7s} {'sens':>6s} {'spec':>6s}")
    for name, r in results.items():
        print(f"{name:38s} {r['auroc']:6.3f} {r['median_score_tb']:7.3f} {r['median_score_non_tb']:7.3f} "
              f"{r['sensitivity']:6.3f} {r['specificity']:6.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    changed = [r["sensitivity"] for name, r in results.items() if name not in ("as_is",) and name in CHANGES]
    mean_drop = results["as_is"]["sensitivity"] - float(np.mean(changed))
    print(f"mean drop of sensitivity over the {len(changed)} changes: {mean_drop:.4f}")
    args.out.write_text(json.dumps({"package": manifest.version, "threshold": threshold,
                                    "fold_members": scoring.version, "mean_sensitivity_drop": mean_drop,
                                    "n_shenzhen": len(rows), "n_montgomery": len(mont),
                                    "results": results}, indent=2) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
