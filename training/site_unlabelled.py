"""Site calibration without labels (``cxr-train site-threshold --unlabelled``): what the node would suggest.

A site that wants to see its label-free threshold before go-live gives a folder (or a CSV with an ``image``
column) of its own images without labels. Each is scored as the node scores it (its chest filter for DICOM
files, its input gate, preprocessing and ensemble: ``training.site._score_image``), and each label the
package has a reference distribution for gets the suggestion ``ai.adapt.suggest`` makes: prediction alignment
at the prevalence the site states (``--prevalence Label=0.1``), else the one estimated from the scores. The
same computation the node runs once it has seen ``[sites] min_images`` images (``cxr-node sites``).

Writes ``scores_unlabelled.csv`` (image and one ensemble score per label), ``site_suggestion.json`` and
``site_suggestion.md``.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ai.adapt import suggest
from ai.ensemble import Ensemble
from ai.gate import InputGate
from ai.manifest import load_manifest
from ai.pixels import IMAGE_SUFFIXES, is_dicom_file
from storage.files import write_atomic
from training.data import _resolve
from training.jsonio import jsonable
from training.site import Accept, _score_image

SUGGESTION_JSON = "site_suggestion.json"
SUGGESTION_MARKDOWN = "site_suggestion.md"
#: Fewer scored images than this give no suggestion (the node's own floor is [sites] min_images, 200 by default).
MIN_IMAGES = 50


def image_paths(source: str | Path) -> list[Path]:
    """The images of a folder (recursively: DICOM, PNG, JPEG; sorted), or of a CSV's ``image`` column
    (relative paths from the CSV's folder, then its parent).

    Raises:
        ValueError: no images, a CSV without an ``image`` column, or a listed file that does not exist.
    """
    source = Path(source)
    if source.is_dir():
        paths = sorted(p for p in source.rglob("*") if p.is_file()
                       and (p.suffix.lower() in IMAGE_SUFFIXES or is_dicom_file(p)))
    else:
        with source.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
        if not rows or "image" not in rows[0]:
            raise ValueError(f"{source}: expected a CSV with an 'image' column")
        bases = [source.parent, source.parent.parent]
        paths = []
        for line, row in enumerate(rows, start=2):
            missing: list[str] = []
            paths.append(_resolve(row["image"], bases, True, missing))  # as a cohort manifest's paths resolve
            if missing:
                raise ValueError(f"{source} line {line}: image {row['image']!r} not found")
    if not paths:
        raise ValueError(f"{source}: no DICOM, PNG or JPEG images found")
    return paths


def unlabelled_run(package: str | Path, source: str | Path, out: str | Path,
                   prevalence: Mapping[str, float] | None = None, accept: Accept | None = None,
                   gate: InputGate | None = None, threads: int | None = None, level: float = 0.1) -> dict[str, Any]:
    """Score a site's unlabelled images and suggest a threshold per label (see the module docstring).

    Raises:
        ValueError: no images, a prevalence for a label the package lacks or outside (0, 1), too few images
            scored, or a package without a reference distribution for any label.
    """
    manifest = load_manifest(package)
    stated = dict(prevalence or {})
    wrong = {k: v for k, v in stated.items() if k not in manifest.labels or not 0.0 < v < 1.0}
    if wrong:
        raise ValueError(f"--prevalence {wrong}: expected labels of the package {list(manifest.labels)} "
                         "with a prevalence between 0 and 1")
    if not manifest.reference:
        raise ValueError(f"package {manifest.name} {manifest.version} carries no reference score distribution: "
                         "no label-free suggestion is possible (a labelled sample still is: --cohort)")
    paths = image_paths(source)
    ensemble = Ensemble.load(package, providers=["CPUExecutionProvider"], threads=threads)
    scored: list[tuple[Path, np.ndarray]] = []
    skipped: list[dict[str, str]] = []
    for path in paths:
        prediction, _, reason = _score_image(path, ensemble, accept, gate, str(path))
        if prediction is None:
            skipped.append({"image": str(path), "reason": reason})
        else:
            scored.append((path, prediction.probabilities[0]))
    if len(scored) < MIN_IMAGES:
        raise ValueError(f"{len(scored)} of {len(paths)} images could be scored; a suggestion needs at least "
                         f"{MIN_IMAGES}")
    scores = np.stack([p for _, p in scored])
    labels = []
    for j, label in enumerate(manifest.labels):
        reference = manifest.reference.get(label)
        entry: dict[str, Any] = {"label": label, "package_threshold": manifest.thresholds[label].value}
        if reference is None:
            entry["note"] = "no reference distribution for this label in the package"
        else:
            entry["suggestion"] = suggest(scores[:, j], reference, manifest.thresholds[label].value,
                                          stated.get(label), level).to_dict()
        labels.append(entry)
    result = {"package": {"name": manifest.name, "version": manifest.version, "path": str(package)},
              "source": str(source), "images": len(paths), "scored": len(scored), "skipped": skipped,
              "labels": labels}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow(["image", *(f"score_{label}__ensemble" for label in manifest.labels)])
    writer.writerows([str(path), *(f"{v:.8g}" for v in p)] for path, p in scored)
    write_atomic(out / "scores_unlabelled.csv", table.getvalue().encode("utf-8"))
    write_atomic(out / SUGGESTION_JSON, json.dumps(jsonable(result), indent=1).encode("utf-8"))
    write_atomic(out / SUGGESTION_MARKDOWN, markdown(result).encode("utf-8"))
    return result


def markdown(result: Mapping[str, Any]) -> str:
    lines = [f"# Label-free site threshold: {result['package']['name']} {result['package']['version']}", "",
             f"{result['scored']} of {result['images']} images of `{result['source']}` scored as the node scores "
             f"them ({len(result['skipped'])} not: the node's filter or input gate refused them).", "",
             "| label | package threshold | suggestion | prevalence (how) | share flagged |", "|---|---|---|---|---|"]
    for entry in result["labels"]:
        s = entry.get("suggestion")
        lines.append(f"| {entry['label']} | {entry['package_threshold']:.4f} | "
                     + (f"{s['threshold']:.4f} | {s['prevalence']:.3f} ({s['prevalence_source']}) | "
                        f"{s['flagged_share']:.3f} |" if s else f"- | - | {entry['note']} |"))
    lines += ["", "Method: prediction alignment to the package's reference score distribution (ai/adapt.py). It "
              "assumes the stated prevalence (or the one the scores suggest) and a change of the scores common to "
              "sick and healthy patients; a labelled sample (`--cohort`) measures what it cannot.", ""]
    return "\n".join(lines)
