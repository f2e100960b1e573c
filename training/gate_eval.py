"""Input-gate evaluation step: what the gate refuses, measured as the node runs it.

Every verdict on held-out data comes from ``ai.gate.InputGate.check`` on the decoded image (ONNX package,
the node's preprocessing, the content check first), the call the worker makes. Four kinds of data:

- the training pool, **out of fold** (each image scored by the fold model that did not see it: the
  package's members are those fold models; the content check is applied too): the only held-out estimate
  for the laterals, of which there are few;
- every real frontal image the pool left out (held out entirely), and the real DICOM files, decoded as the
  node decodes them;
- **fresh** generated patterns (seeds the pool never used), per kind, and the patterns the product issue
  names (uniform black and white, checkerboard, stripes, gradient, 8 x 8 pixels, noise);
- held-out frontal images made wrong (rotated, upside down, inverted), per transform.

Writes ``gate_evaluation.json`` and ``evaluation.md`` (tables with Wilson 95 % intervals) to the output
folder.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from ai.gate import FRONTAL, GATE_LABELS, InputGate, content_problem
from ai.pixels import dicom_to_float, read_image_file
from storage.files import write_atomic
from training.gate import OOF_FILE, build_pool, load_gate_config, rate
from training.gate_data import PATTERNS, TRANSFORMS, Sample, pattern

log = logging.getLogger(__name__)

FRESH_SEED_BASE = 7_000_000_000
"""Seeds of the evaluation's patterns start here; the pool's are below 1e9 per config seed unit."""


def named_patterns() -> dict[str, list[np.ndarray]]:
    """The patterns the product issue names, several sizes each (deterministic)."""
    rng = np.random.default_rng(12345)
    out: dict[str, list[np.ndarray]] = {}
    sizes = [(512, 512), (1024, 800), (2048, 2048)]
    out["uniform black"] = [np.zeros(s, np.float32) for s in sizes]
    out["uniform white"] = [np.ones(s, np.float32) for s in sizes]
    out["checkerboard"] = [(((np.indices(s)[0] // c) + (np.indices(s)[1] // c)) % 2).astype(np.float32)
                           for s in sizes for c in (8, 64)]
    out["stripes"] = [((np.indices(s)[axis] // c) % 2).astype(np.float32) for s in sizes for axis in (0, 1)
                      for c in (4, 32)]
    out["gradient"] = [np.broadcast_to(np.linspace(0, 1, s[axis], dtype=np.float32)[:, None] if axis == 0 else
                                       np.linspace(0, 1, s[1], dtype=np.float32)[None, :], s).copy()
                       for s in sizes for axis in (0, 1)]
    out["8 x 8 pixels"] = [rng.uniform(0, 1, (8, 8)).astype(np.float32) for _ in range(3)]
    out["uniform noise"] = [rng.uniform(0, 1, s).astype(np.float32) for s in sizes]
    return out


def _verdicts(gate: InputGate, images: Iterable[np.ndarray]) -> list[dict[str, Any]]:
    out = []
    for image in images:
        verdict = gate.check(image)
        out.append({"analysed": verdict.analysable, "reason": verdict.reason,
                    "p_frontal": verdict.scores.get(FRONTAL)})
    return out


def _refused(verdicts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    k = sum(not v["analysed"] for v in verdicts)
    by_content = sum(v["reason"].startswith("image has no usable content") for v in verdicts)
    return {**rate(k, len(verdicts)), "by_content_check": by_content, "by_view_classifier": k - by_content}


def _read(sample: Sample) -> np.ndarray:
    assert sample.path is not None
    return read_image_file(sample.path)


def _lazy(samples: Sequence[Sample], load: Callable[[Sample], np.ndarray]) -> Iterable[np.ndarray]:
    for sample in samples:
        yield load(sample)


def _oof(run_dir: Path, pool: Sequence[Sample], threshold: float) -> dict[str, Any]:
    """Out-of-fold verdicts of the pool: the fold model's probability, with the content check applied."""
    with (run_dir / OOF_FILE).open(newline="") as handle:
        rows = {row["key"]: row for row in csv.DictReader(handle)}
    groups: dict[str, list[dict[str, Any]]] = {}
    from training.gate_data import load_sample  # the pool's own loader (patterns and transforms)

    for sample in pool:
        p = float(rows[sample.key][f"p_{FRONTAL}"])
        problem = content_problem(load_sample(sample, read_image_file))
        verdict = {"analysed": not problem and p >= threshold, "reason": problem or ("" if p >= threshold else "view"),
                   "p_frontal": p}
        source = sample.source.split(":")[0]
        groups.setdefault(f"{sample.label} / {source}", []).append(verdict)
    return {key: _refused(v) for key, v in sorted(groups.items())}


def evaluate_gate(config_path: str | Path, run_dir: str | Path, package: str | Path, out_dir: str | Path,
                  per_kind: int = 50) -> Path:
    """Score everything listed in the module docstring; returns the Markdown report's path."""
    config = load_gate_config(config_path)
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    gate = InputGate.load(package)
    pool, held_out = build_pool(config)
    started = time.monotonic()
    result: dict[str, Any] = {"package": gate.manifest.version, "threshold": gate.threshold,
                              "threshold_method": gate.ensemble.thresholds[FRONTAL].method}
    result["out_of_fold"] = _oof(run_dir, pool, gate.threshold)

    frontal: dict[str, Any] = {}
    timing_start, timed = time.monotonic(), 0
    for source in sorted({s.source for s in held_out}):
        samples = [s for s in held_out if s.source == source]
        verdicts = _verdicts(gate, _lazy(samples, _read))
        timed += len(samples)
        frontal[source] = _refused(verdicts)
        frontal[source]["lowest_p"] = sorted(float(v["p_frontal"]) for v in verdicts
                                             if v["p_frontal"] is not None)[:5]
        log.info("held-out %s: %d/%d refused", source, frontal[source]["k"], frontal[source]["n"])
    result["held_out_frontal"] = frontal
    result["seconds_per_image"] = (time.monotonic() - timing_start) / max(timed, 1)

    result["dicom"] = _dicom_files(gate, config.sources[0].csv)

    fresh: dict[str, Any] = {}
    for kind in sorted(PATTERNS):
        images = (pattern(kind, FRESH_SEED_BASE + i) for i in range(per_kind))
        fresh[kind] = _refused(_verdicts(gate, images))
    result["fresh_patterns"] = fresh
    result["named_patterns"] = {name: _refused(_verdicts(gate, images)) for name, images in named_patterns().items()}

    rng = np.random.default_rng(99)
    transformed: dict[str, Any] = {}
    for name, transform in sorted(TRANSFORMS.items()):
        picks = [held_out[int(i)] for i in rng.choice(len(held_out), size=min(per_kind, len(held_out)), replace=False)]
        transformed[name] = _refused(_verdicts(gate, (transform(_read(s)) for s in picks)))
    result["held_out_transformed"] = transformed
    result["seconds"] = time.monotonic() - started

    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / "gate_evaluation.json", (json.dumps(result, indent=2) + "\n").encode())
    report = out_dir / "evaluation.md"
    write_atomic(report, markdown(result).encode())
    return report


def _dicom_files(gate: InputGate, views_csv: str) -> list[dict[str, Any]]:
    """The real DICOM files of the data folder (``dicom/files.csv`` beside the views folder), as the node
    decodes them."""
    listing = Path(views_csv).resolve().parent.parent / "dicom" / "files.csv"
    if not listing.is_file():
        return []
    rows = []
    with listing.open(newline="") as handle:
        for row in csv.DictReader(handle):
            ds = pydicom.dcmread(listing.parent / row["file"])
            verdict = gate.check(dicom_to_float(ds))
            rows.append({"file": row["file"], "view_position": row["view_position"], "body_part": row["body_part"],
                         "analysed": verdict.analysable, "reason": verdict.reason,
                         "p_frontal": verdict.scores.get(FRONTAL)})
    return rows


def _pct(entry: dict[str, Any]) -> str:
    lo, hi = entry["ci95"]
    return f"{entry['k']}/{entry['n']} = {100 * entry['rate']:.1f} % ({100 * lo:.1f}-{100 * hi:.1f})"


def markdown(result: dict[str, Any]) -> str:
    """The evaluation as Markdown tables (refused = not analysed; Wilson 95 % intervals)."""
    lines = [f"# Input gate {result['package']}: evaluation", "",
             f"Generated by `cxr-train gate-eval`. Threshold on the Frontal chest probability: "
             f"{result['threshold']:.4f} ({result['threshold_method']}). Refused = not analysed; "
             "brackets: Wilson 95 % interval.", "",
             "## Out of fold (training pool; each image scored by the fold model that did not see it)", "",
             "| class / source | refused | by content check | by view classifier |", "|---|---|---|---|"]
    for key, entry in result["out_of_fold"].items():
        lines.append(f"| {key} | {_pct(entry)} | {entry['by_content_check']} | {entry['by_view_classifier']} |")
    lines += ["", "## Held-out frontal chest radiographs (never in the pool)", "",
              "| source | wrongly refused | lowest Frontal chest p |", "|---|---|---|"]
    for key, entry in result["held_out_frontal"].items():
        low = ", ".join(f"{p:.3f}" for p in entry["lowest_p"])
        lines.append(f"| {key} | {_pct(entry)} | {low} |")
    lines += ["", f"Gate time per held-out image (decode + preprocess + {len(GATE_LABELS)}-output ensemble, one "
              f"CPU process): {1000 * result['seconds_per_image']:.0f} ms.", "",
              "## Real DICOM files (decoded as the node decodes them)", "",
              "| file | tags (view, body part) | verdict | Frontal chest p |", "|---|---|---|---|"]
    for row in result["dicom"]:
        p = "" if row["p_frontal"] is None else f"{row['p_frontal']:.3f}"
        verdict = "analysed" if row["analysed"] else f"refused: {row['reason']}"
        lines.append(f"| {row['file']} | {row['view_position'] or '-'}, {row['body_part'] or '-'} | {verdict} | {p} |")
    for title, key in (("Patterns named in the product issue", "named_patterns"),
                       ("Fresh generated patterns (seeds the pool never used)", "fresh_patterns"),
                       ("Held-out frontal images made wrong", "held_out_transformed")):
        lines += ["", f"## {title}", "", "| kind | caught (refused) | by content check | by view classifier |",
                  "|---|---|---|---|"]
        for kind, entry in result[key].items():
            lines.append(f"| {kind} | {_pct(entry)} | {entry['by_content_check']} | {entry['by_view_classifier']} |")
    return "\n".join(lines) + "\n"
