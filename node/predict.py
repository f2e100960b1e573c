"""Offline prediction: score DICOM, PNG or JPEG files with the node's own preprocessing and ensemble.

DICOM files pass the same chest filter as received images (a lateral or a canine thorax is
``skipped`` with the filter's reason); PNG and JPEG files carry no tags. Every image then passes the node's
input gate (``ai.gate``): one that is not a frontal chest radiograph is ``not analysed`` with the gate's reason.
Every label is printed; one that does not apply to the patient (``ai.applicability``: a patient outside the
label's age range, e.g. pediatric pneumonia on an adult or Tuberculosis under 15, or of unknown age where the range
says so, as for pediatric pneumonia on every PNG or JPEG, which carry no age) keeps its score with
``not applicable`` and the reason, and is never positive. A label the package marks informational keeps its
score and decision with ``(informational)``: it does not set the image's triage flag (``triage`` in JSON lines).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from pydicom.errors import InvalidDicomError

from ai.analyse import analyse_dataset, analyse_image
from ai.ensemble import Ensemble
from ai.errors import CxrError, ImageRefused
from ai.gate import InputGate
from ai.pixels import IMAGE_SUFFIXES, is_dicom_file, read_dicom_file, read_image_file
from node.config import Settings
from node.filter import FilterRules, decide
from node.packages import load_ensemble, load_gate
from node.worker import analysable_paths


def _row(path: Path, status: str, reason: str, findings: Sequence[Any] = ()) -> dict[str, Any]:
    return {
        "path": str(path),
        "status": status,
        "reason": reason,
        "scores": {f.label: round(float(f.probability), 6) for f in findings},
        "positive": {f.label: bool(f.positive) for f in findings},
        "thresholds": {f.label: round(float(f.threshold), 6) for f in findings},
        "not_applicable": {f.label: f.not_applicable for f in findings if f.not_applicable},
        "informational": [f.label for f in findings if f.informational],
        "triage": any(f.flags for f in findings) if findings else None,
    }


def predict_one(path: Path, ensemble: Ensemble, settings: Settings, rules: FilterRules,
                gate: InputGate | None = None) -> dict[str, Any]:
    """Score one file; never raises for a bad input (status ``failed`` or ``not analysed`` with the reason)."""
    try:
        if is_dicom_file(path):
            ds = read_dicom_file(path)
            decision = decide(ds, settings.filter, rules)
            if not decision.accepted:
                return _row(path, "skipped", decision.reason)
            findings = analyse_dataset(ds, ensemble, gate).findings
            return _row(path, "analysed", decision.reason, findings)
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            return _row(path, "skipped", f"not DICOM, PNG or JPEG (suffix {path.suffix or 'none'})")
        findings = analyse_image(read_image_file(path), ensemble, gate).findings
        return _row(path, "analysed", "image file (no DICOM tags to filter on)", findings)
    except ImageRefused as exc:
        return _row(path, "not analysed", exc.reason)
    except (CxrError, InvalidDicomError, OSError, ValueError) as exc:
        return _row(path, "failed", f"{type(exc).__name__}: {exc}")


def predict_paths(settings: Settings, paths: Sequence[Path], model: Path | None = None) -> Iterator[dict[str, Any]]:
    """Yield one result row per input file (folders are expanded), in input order."""
    if model is not None:
        ensemble = Ensemble.load(model, providers=settings.model.providers,
                                 threshold_overrides=settings.thresholds)
    else:
        ensemble = load_ensemble(settings)
    rules = FilterRules.for_settings(settings)
    gate = load_gate(settings)
    for path in analysable_paths(paths):
        if not path.exists():
            yield _row(path, "failed", "file not found")
            continue
        yield predict_one(path, ensemble, settings, rules, gate)
