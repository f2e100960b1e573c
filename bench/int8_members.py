"""int8 members: what static int8 quantization of a package's members costs in discrimination, size and time.

The budget of the bundled package (60 MB) is nearly spent by float16-stored members (6.8 MB each for
EfficientNet-Lite0); more diverse members fit only if each takes less. This measures, for the members that
output ``--label`` (by default the Tuberculosis members of the bundled package):

- each member alone on the images it did not train on (its fold of ``--run-dir``'s ``folds.csv``): AUROC of
  the float16-stored member and of its int8 twin, and the largest probability difference;
- the ensemble of those members on Montgomery (external), both ways, and how many of its decisions at the
  package's threshold change;
- size on disk and median latency per image (one image at a time, ``--threads``).

The int8 twin: the float16 initializers are widened to float32 (the Cast nodes the export inserted are
folded away) and the "same" padding's pads, which the export computes from the input's shape at run time, are
frozen to constants for the package's input size (:func:`freeze_pads`; left to the quantizer, that shape
arithmetic is quantized too and the pads come out wrong); then ``onnxruntime.quantization.quantize_static``
writes QDQ int8 weights (per channel) and uint8 activations, calibrated on ``--calibration`` images of the
member's own training folds (``--ops Conv``: only the convolutions). ``--weights-only`` instead stores each
Conv and Gemm weight as int8 per output channel (symmetric, 127 levels) behind a DequantizeLinear, with float32
activations and compute (:func:`int8_weights`, the int8 analogue of the float16 storage). Nothing here writes
into a package; the twins stay in ``--work``.

Run on demand (not part of the test suite)::

    .venv/bin/python bench/int8_members.py --run-dir runs/tb-320-strong-aug --out bench/results/int8_members.json
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import shutil
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

from ai.ensemble import session_options, sigmoid
from ai.manifest import bundled_package_dir, load_manifest, member_path
from ai.pixels import read_image_file
from ai.preprocess import preprocess
from training import metrics
from training.export import store_weights_float16, store_weights_int8

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


def freeze_pads(source: Path, target: Path, size: int) -> int:
    """``source`` with every Pad's computed ``pads`` input replaced by its value for a [1, 3, size, size] input (the
    nodes that computed it dropped); the outputs are unchanged. Returns how many Pads were frozen."""
    model = onnx.load(str(source))
    graph = model.graph
    constants = {i.name for i in graph.initializer}
    names = list(dict.fromkeys(n.input[1] for n in graph.node if n.op_type == "Pad" and len(n.input) > 1
                               and n.input[1] and n.input[1] not in constants))
    probe = onnx.load(str(source))
    probe.graph.output.extend(helper.make_tensor_value_info(name, onnx.TensorProto.INT64, None) for name in names)
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    values = session.run(names, {"image": np.zeros((1, 3, size, size), np.float32)})
    graph.initializer.extend(numpy_helper.from_array(v.astype(np.int64), n) for n, v in zip(names, values, strict=True))
    nodes = [n for n in graph.node if not set(n.output) & set(names)]
    outputs = {o.name for o in graph.output}
    while True:  # drop what only fed the frozen pads
        used = {i for n in nodes for i in n.input} | outputs
        kept = [n for n in nodes if any(o in used for o in n.output)]
        if len(kept) == len(nodes):
            break
        nodes = kept
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for n in graph.node for i in n.input}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)
    onnx.save(model, str(target))
    return len(names)


def int8_weights(source: Path, target: Path, only: re.Pattern[str] | None = None) -> int:
    """``source`` with each Conv and Gemm weight (of the nodes whose name ``only`` matches; default all) stored as
    int8 per output channel behind a DequantizeLinear (``training.export.store_weights_int8``), the other weights as
    float16, as in a package (the int8 scales stay float32); activations and compute stay float32."""
    nodes = [n.name for n in onnx.load(str(source)).graph.node
             if n.op_type in ("Conv", "Gemm") and (only is None or only.search(n.name))]
    shutil.copyfile(source, target)
    scales = store_weights_int8(target, nodes)
    store_weights_float16(target, keep=scales)
    return len(scales)


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
    parser.add_argument("--weights-only", action="store_true",
                        help="int8 weights per output channel, the others float16; float32 activations and compute")
    parser.add_argument("--int8-nodes", type=re.compile, metavar="REGEX",
                        help="with --weights-only: only the Conv/Gemm nodes whose name matches are int8 (default all)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("runs/int8-members"))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    manifest = load_manifest(args.package)
    if len(manifest.input_sizes) > 1:
        raise SystemExit(f"{args.package}: members of input sizes {list(manifest.input_sizes)}; this bench takes a "
                         f"package of one input size")
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
                    "weights_only": args.weights_only,
                    "int8_nodes": args.int8_nodes.pattern if args.int8_nodes else "all", "members": []}
    ens16, ens8 = [], []
    for member in manifest.members:
        outputs = member.outputs(manifest.labels)
        if args.label not in outputs or member.fold is None:
            continue
        index = outputs.index(args.label)
        source = member_path(args.package, member)
        wide, int8 = args.work / f"{source.stem}.fp32.onnx", args.work / f"{source.stem}.int8.onnx"
        widen_float16(source, wide)
        freeze_pads(wide, wide, spec.size)
        if args.weights_only:
            int8_weights(wide, int8, args.int8_nodes)
        else:
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
    threshold = manifest.thresholds[args.label].value
    result["montgomery"] = {"auroc_float16": metrics.auroc(y_m, m16), "auroc_int8": metrics.auroc(y_m, m8),
                            "max_abs_prob_diff": float(np.max(np.abs(m16 - m8))), "n": int(y_m.size),
                            "threshold": threshold,
                            "decisions_changed": int(np.sum((m16 >= threshold) != (m8 >= threshold)))}
    print(json.dumps(result["montgomery"]), flush=True)
    args.out.write_text(json.dumps(result, indent=1, default=float) + "\n")


if __name__ == "__main__":
    main()
