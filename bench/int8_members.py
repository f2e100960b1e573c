"""int8 members: what static int8 quantization of a package's members costs in discrimination, size and time.

The budget of the bundled package (60 MB) is nearly spent by float16-stored members (6.8 MB each for
EfficientNet-Lite0); more diverse members fit only if each takes less. This measures, for the members that
output ``--label`` (by default the Tuberculosis members of the bundled package):

- each member alone on the images it did not train on (its fold of ``--run-dir``'s ``folds.csv``): AUROC of
  the float16-stored member and of its int8 twin, and the largest probability difference;
- the ensemble of those members on Montgomery (external), both ways;
- size on disk and median latency per image (one image at a time, ``--threads``).

The int8 twin: the float16 initializers are widened to float32 (the Cast nodes the export inserted are
folded away), then ``onnxruntime.quantization.quantize_static`` writes QDQ int8 weights (per channel) and
uint8 activations, calibrated on ``--calibration`` images of the member's own training folds (``--ops Conv``:
only the convolutions). Nothing here
writes into a package; the twins stay in ``--work``.

Run on demand (not part of the test suite)::

    .venv/bin/python bench/int8_members.py --run-dir runs/tb-320-strong-aug --out bench/results/int8_members.json
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

from ai.ensemble import session_options, sigmoid
from ai.manifest import bundled_package_dir, load_manifest, member_path
from ai.pixels import read_image_file
from ai.preprocess import preprocess
from training import metrics

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
METHODS = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
           "entropy": CalibrationMethod.Entropy}


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def widen_float16(source: Path, target: Path) -> None:
    """``source`` with every float16 initializer that feeds a Cast-to-float32 stored as float32 instead."""
    model = onnx.load(str(source))
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    keep = []
    for node in graph.node:
        init = inits.get(node.input[0]) if node.op_type == "Cast" and node.input else None
        if init is not None and init.data_type == onnx.TensorProto.FLOAT16:
            wide = numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float32), node.output[0])
            graph.initializer.append(wide)
            continue
        keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)
    used = {name for node in graph.node for name in node.input}
    for init in [i for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT16 and i.name not in used]:
        graph.initializer.remove(init)
    onnx.save(model, str(target))


class _Images(CalibrationDataReader):
    def __init__(self, x: np.ndarray) -> None:
        self.items = iter([{"image": x[i : i + 1]} for i in range(len(x))])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.items, None)


def _scores(path: Path, x: np.ndarray, index: int, threads: int) -> np.ndarray:
    session = ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])
    out = [session.run(["logits"], {"image": x[i : i + 8]})[0] for i in range(0, len(x), 8)]
    return sigmoid(np.concatenate(out))[:, index]


def _latency(path: Path, x: np.ndarray, threads: int) -> float:
    session = ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])
    session.run(None, {"image": x[:1]})
    times = []
    for i in range(min(len(x), 20)):
        t0 = time.perf_counter()
        session.run(None, {"image": x[i : i + 1]})
        times.append(time.perf_counter() - t0)
    return 1000 * float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--package", type=Path, default=bundled_package_dir())
    parser.add_argument("--run-dir", type=Path, required=True, help="the run whose folds.csv the members follow")
    parser.add_argument("--label", default="Tuberculosis")
    parser.add_argument("--calibration", type=int, default=64)
    parser.add_argument("--method", choices=("minmax", "percentile", "entropy"), default="minmax",
                        help="activation calibration")
    parser.add_argument("--ops", nargs="+", help="operator types to quantize (default: every one onnxruntime can)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("runs/int8-members"))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    manifest = load_manifest(args.package)
    spec = manifest.preprocess
    args.work.mkdir(parents=True, exist_ok=True)
    folds = {r["image"]: int(r["fold"]) for r in _rows(args.run_dir / "folds.csv")}
    shenzhen = [r for r in _rows(DATA / "tb" / "shenzhen.csv") if r["image"] in folds]
    y_s = np.array([float(r["label_tb"]) for r in shenzhen])
    fold_of = np.array([folds[r["image"]] for r in shenzhen])
    x_s = np.stack([preprocess(read_image_file(DATA / r["image"]), spec)[0] for r in shenzhen])
    montgomery = _rows(DATA / "tb" / "montgomery.csv")
    y_m = np.array([float(r["label_tb"]) for r in montgomery])
    x_m = np.stack([preprocess(read_image_file(DATA / r["image"]), spec)[0] for r in montgomery])
    rng = np.random.default_rng(0)
    result: dict = {"package": manifest.version, "label": args.label, "threads": args.threads,
                    "calibration_images": args.calibration, "calibration": args.method, "ops": args.ops or "all",
                    "members": []}
    ens16, ens8 = [], []
    for member in manifest.members:
        outputs = member.outputs(manifest.labels)
        if args.label not in outputs or member.fold is None:
            continue
        index = outputs.index(args.label)
        source = member_path(args.package, member)
        wide, int8 = args.work / f"{source.stem}.fp32.onnx", args.work / f"{source.stem}.int8.onnx"
        widen_float16(source, wide)
        train = np.flatnonzero(fold_of != member.fold)
        calibration = x_s[rng.choice(train, size=min(args.calibration, train.size), replace=False)]
        quantize_static(str(wide), str(int8), _Images(calibration), quant_format=QuantFormat.QDQ,
                        per_channel=True, weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                        op_types_to_quantize=args.ops, calibrate_method=METHODS[args.method])
        held = np.flatnonzero(fold_of == member.fold)
        p16, p8 = (_scores(p, x_s[held], index, args.threads) for p in (source, int8))
        ens16.append(_scores(source, x_m, index, args.threads))
        ens8.append(_scores(int8, x_m, index, args.threads))
        row = {
            "file": member.file, "fold": member.fold, "n_oof": int(held.size),
            "oof_auroc_float16": metrics.auroc(y_s[held], p16), "oof_auroc_int8": metrics.auroc(y_s[held], p8),
            "oof_max_abs_prob_diff": float(np.max(np.abs(p16 - p8))),
            "size_float16": source.stat().st_size, "size_int8": int8.stat().st_size,
            "latency_ms_float16": _latency(source, x_m, args.threads),
            "latency_ms_int8": _latency(int8, x_m, args.threads),
        }
        result["members"].append(row)
        print(json.dumps(row), flush=True)
    m16, m8 = np.mean(ens16, axis=0), np.mean(ens8, axis=0)
    result["montgomery"] = {"auroc_float16": metrics.auroc(y_m, m16), "auroc_int8": metrics.auroc(y_m, m8),
                            "max_abs_prob_diff": float(np.max(np.abs(m16 - m8))), "n": int(y_m.size)}
    print(json.dumps(result["montgomery"]), flush=True)
    args.out.write_text(json.dumps(result, indent=1, default=float) + "\n")


if __name__ == "__main__":
    main()
